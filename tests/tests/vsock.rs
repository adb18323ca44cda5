//! virtio-vsock: the host reaches a guest port through the unix socket (Firecracker's way).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use e2e::{require_kvm, TempDir, VmCommand};

/// Connects to guest port `port` through the VMM's socket; retries until the guest listens.
fn connect(socket: &std::path::Path, port: u32, deadline: Instant) -> Result<UnixStream, String> {
    let mut last = String::from("never tried");
    while Instant::now() < deadline {
        match try_connect(socket, port) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(last)
}

fn try_connect(socket: &std::path::Path, port: u32) -> Result<UnixStream, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("write CONNECT: {e}"))?;
    // Read the reply byte by byte so no echoed data is swallowed into a buffer.
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\n") {
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(format!(
                    "closed after {:?}",
                    String::from_utf8_lossy(&reply)
                ))
            }
            Ok(_) => reply.push(byte[0]),
            Err(e) => return Err(format!("read OK: {e}")),
        }
        if reply.len() > 64 {
            return Err("overlong reply".into());
        }
    }
    let reply = String::from_utf8_lossy(&reply);
    if !reply.starts_with("OK ") {
        return Err(format!("reply {reply:?}"));
    }
    Ok(stream)
}

#[test]
fn vsock_host_connect_echoes_through_the_guest() {
    if !require_kvm("vsock_host_connect_echoes_through_the_guest") {
        return;
    }
    let dir = TempDir::new();
    let socket = dir.join("vsock.sock");
    // The part ends 1 s after the last connection closes (or 1 s after listening with none).
    let mut vm = VmCommand::probe("pv.tests=vsock pv.vsock.port=1234 pv.vsock.wait=1000")
        .vsock(3, &socket)
        .spawn();
    let listening = vm.wait_for_line(Duration::from_secs(20), |l| {
        l.starts_with("PROBE vsock listening")
    });
    assert!(
        listening.is_some(),
        "the guest never listened\nserial:\n{}\nstderr: {}",
        vm.drain(),
        vm.stderr_so_far()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stream = match connect(&socket, 1234, deadline) {
        Ok(s) => s,
        Err(e) => {
            panic!(
                "could not connect to guest port 1234: {e}\nserial:\n{}\nstderr: {}",
                vm.drain(),
                vm.stderr_so_far()
            );
        }
    };
    let message = b"hello from the host over vsock\n";
    stream.write_all(message).unwrap();
    let mut echoed = vec![0u8; message.len()];
    stream.read_exact(&mut echoed).expect("read the echo");
    assert_eq!(echoed, message);
    // A second, larger write: more than one virtio buffer's worth.
    let big: Vec<u8> = (0..20000u32).map(|i| (i % 251) as u8).collect();
    let writer = {
        let mut s = stream.try_clone().unwrap();
        let big = big.clone();
        std::thread::spawn(move || s.write_all(&big))
    };
    let mut back = vec![0u8; big.len()];
    stream.read_exact(&mut back).expect("read the big echo");
    writer.join().unwrap().unwrap();
    assert!(back == big, "the big echo differs");
    drop(stream);

    let out = vm.wait();
    let report = out.assert_clean_pass();
    let vsock = report.expect(&["vsock", "ok"]);
    assert_eq!(vsock.field_u64("cid"), Some(3), "{}", out.describe());
    assert!(
        vsock.field_u64("conns").unwrap_or(0) >= 1,
        "{}",
        out.describe()
    );
    assert!(
        vsock.field_u64("bytes").unwrap_or(0) >= (message.len() + big.len()) as u64,
        "{}",
        out.describe()
    );
}
