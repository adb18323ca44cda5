//! End-to-end: host input to the guest's 16550 through the VMM's API socket (device id
//! `serial`), with the probe's echo console (`pv.mode=echo`): a typed line reaches the guest
//! through receive interrupts, a line longer than the 64-byte FIFO arrives whole, input typed
//! into a paused VM is kept in its snapshot and read after the restore, and `quit` powers off.
//!
//! Skipped (with a SKIP line on stderr) where /dev/kvm or the probe guest is missing.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::{Scratch, Vmm};

/// Sends one API request; returns the answer's `info` decoded as JSON (panics on an error).
fn api(sock: &Path, req: &Value) -> Value {
    let t0 = Instant::now();
    let s = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) if t0.elapsed() > Duration::from_secs(10) => panic!("API socket: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    (&s).write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    let answer: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(answer["ok"], true, "{req}: {answer}");
    serde_json::from_str(answer["info"].as_str().unwrap()).unwrap_or(Value::Null)
}

fn type_in(sock: &Path, text: &[u8]) -> Value {
    api(
        sock,
        &serde_json::json!({"op": "device", "id": "serial",
                            "request": {"op": "input", "bytes": text}}),
    )
}

fn wait_for(path: &Path, needle: &str) -> bool {
    common::wait_for(path, needle, Duration::from_secs(30))
}

fn spawn(args: &[&str]) -> Vmm {
    common::spawn(args, Stdio::null())
}

#[test]
fn typed_lines_reach_the_guest_through_receive_interrupts_and_survive_a_snapshot() {
    let Some(probe) = common::probe(false) else {
        return;
    };
    let s = Scratch::new("pv-serial-input", "echo");
    let (log, sock, snap) = (s.path("src.log"), s.path("src.sock"), s.path("snap"));
    let serial = format!("file:{}", log.display());
    let mut src = spawn(&[
        "run",
        "--kernel",
        probe.to_str().unwrap(),
        "--cmdline",
        "pv.mode=echo",
        "--memory",
        "64M",
        "--serial",
        &serial,
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    assert!(wait_for(&log, "PROBE echo ready"), "{}", common::read(&log));

    let answer = type_in(&sock, b"hello world\r");
    assert_eq!(answer, serde_json::json!({"accepted": 12, "dropped": 0}));
    assert!(
        wait_for(&log, "text=\"hello world\""),
        "{}",
        common::read(&log)
    );
    let text = common::read(&log);
    let line = text.lines().find(|l| l.contains("hello world\"")).unwrap();
    let irqs: u32 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("irqs="))
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(irqs >= 1, "no receive interrupt reached the guest: {line}");
    // The guest's echo of what was typed, as a terminal shows it.
    assert!(text.contains("hello world\r\n"), "{text}");

    // Five times the FIFO's depth in one request, in order and whole.
    let long: String = (0..320)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    type_in(&sock, format!("{long}\r").as_bytes());
    assert!(
        wait_for(&log, &format!("text=\"{long}\"")),
        "{}",
        common::read(&log)
    );

    // Typed while the VM is paused: kept in the snapshot, read by the restored guest.
    api(&sock, &serde_json::json!({"op": "pause"}));
    type_in(&sock, b"after restore\r");
    let counters = api(
        &sock,
        &serde_json::json!({"op": "device", "id": "serial", "request": {"op": "counters"}}),
    );
    assert_eq!(counters["waiting"], 14, "{counters}");
    let dir = snap.to_str().unwrap();
    api(&sock, &serde_json::json!({"op": "snapshot", "dir": dir}));
    api(&sock, &serde_json::json!({"op": "stop"}));
    assert_eq!(
        common::wait_exit(&mut src, Duration::from_secs(10)),
        Some(0)
    );
    assert!(!common::read(&log).contains("after restore"));

    let (log2, sock2) = (s.path("dst.log"), s.path("dst.sock"));
    let serial2 = format!("file:{}", log2.display());
    let mut dst = spawn(&[
        "restore",
        dir,
        "--serial",
        &serial2,
        "--api-socket",
        sock2.to_str().unwrap(),
    ]);
    assert!(
        wait_for(&log2, "text=\"after restore\""),
        "{}",
        common::read(&log2)
    );
    type_in(&sock2, b"quit\r");
    assert_eq!(
        common::wait_exit(&mut dst, Duration::from_secs(10)),
        Some(0)
    );
    assert!(common::read(&log2).contains("PROBE done ok"));
}

#[test]
fn bad_serial_requests_are_refused_with_what_is_accepted() {
    let Some(probe) = common::probe(false) else {
        return;
    };
    let s = Scratch::new("pv-serial-input", "bad");
    let (log, sock) = (s.path("s.log"), s.path("s.sock"));
    let serial = format!("file:{}", log.display());
    let _vmm = spawn(&[
        "run",
        "--kernel",
        probe.to_str().unwrap(),
        "--cmdline",
        "pv.mode=echo",
        "--memory",
        "64M",
        "--serial",
        &serial,
        "--api-socket",
        sock.to_str().unwrap(),
    ]);
    assert!(wait_for(&log, "PROBE echo ready"), "{}", common::read(&log));
    let stream = UnixStream::connect(&sock).unwrap();
    let mut answers = BufReader::new(stream.try_clone().unwrap());
    let too_long = vec![b'x'; 4097];
    for req in [
        serde_json::json!({"op": "device", "id": "serial", "request": {"op": "input"}}),
        serde_json::json!({"op": "device", "id": "serial",
                           "request": {"op": "input", "bytes": too_long}}),
        serde_json::json!({"op": "device", "id": "serial",
                           "request": {"op": "input", "bytes": [300]}}),
    ] {
        (&stream).write_all(format!("{req}\n").as_bytes()).unwrap();
        let mut line = String::new();
        answers.read_line(&mut line).unwrap();
        let answer: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(answer["ok"], false, "{line}");
        assert!(
            answer["error"].as_str().unwrap().contains("ops: input"),
            "{line}"
        );
    }
    let counters = api(
        &sock,
        &serde_json::json!({"op": "device", "id": "serial", "request": {"op": "counters"}}),
    );
    assert_eq!(counters["input_bytes"], 0, "{counters}");
}
