//! End-to-end: `pocketvisor vsock`, the command-line client of the VMM's vsock socket, with the
//! probe guest's echo server (`pv.tests=vsock`): stdin reaches the guest, the guest's bytes
//! come out on stdout, and a port nobody listens on is one error line.
//!
//! Skipped (with a SKIP line on stderr) where /dev/kvm or the probe guest is missing.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::Scratch;

/// Runs `pocketvisor vsock --vsock-socket SOCK ARGS...` with `input` on stdin, to its end.
fn vsock_cmd(sock: &Path, args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(common::bin())
        .args(["vsock", "--vsock-socket", sock.to_str().unwrap()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pocketvisor vsock");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

#[test]
fn the_vsock_command_sends_stdin_to_a_guest_port_and_prints_its_answer() {
    let Some(probe) = common::probe(false) else {
        return;
    };
    let s = Scratch::new("pv-vsock-cmd", "echo");
    let (log, sock) = (s.path("vm.log"), s.path("v.sock"));
    // The probe echoes what port 1234 receives and ends 8 s after the last connection closes
    // (or 8 s after it listens, if none comes).
    let mut vm = common::spawn(
        &[
            "run",
            "--kernel",
            probe.to_str().unwrap(),
            "--cmdline",
            "pv.tests=vsock pv.vsock.port=1234 pv.vsock.wait=8000",
            "--vsock",
            &format!("cid=3,socket={}", sock.display()),
            "--serial",
            &format!("file:{}", log.display()),
        ],
        Stdio::null(),
    );
    // --wait covers the guest's boot: the socket appears, then the guest listens.
    let input: Vec<u8> = b"hello from the host\n"
        .iter()
        .copied()
        .chain((0..20000u32).map(|i| (i % 251) as u8))
        .collect();
    let out = vsock_cmd(&sock, &["--port", "1234", "--wait", "30"], &input);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{out:?}\n{}",
        common::read(&log)
    );
    assert!(
        out.stdout == input,
        "the echo differs: {} bytes back",
        out.stdout.len()
    );
    // Nobody listens on port 99: refused at once without --wait, one line, status 1.
    let out = vsock_cmd(&sock, &["--port", "99"], b"");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim_end(),
        "pocketvisor: error: guest port 99 refused the connection (is anything listening?)"
    );
    assert_eq!(common::wait_exit(&mut vm, Duration::from_secs(60)), Some(0));
    let serial = common::read(&log);
    let ok = serial
        .lines()
        .find(|l| l.starts_with("PROBE vsock ok "))
        .unwrap_or_else(|| panic!("no vsock result:\n{serial}"));
    assert!(ok.contains(&format!("bytes={}", input.len())), "{ok}");
}
