//! Output to a reader that went away (`pocketvisor doctor | head -1`) or to a full disk.

mod common;

use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

/// A pipe whose read end is already closed: every write to the returned end fails with EPIPE.
fn pipe_without_reader() -> OwnedFd {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe(2) to fill.
    let rc = unsafe { libc::pipe(fds.as_mut_ptr()) };
    assert_eq!(rc, 0, "pipe: {}", std::io::Error::last_os_error());
    // SAFETY: pipe(2) succeeded, so both descriptors are open and owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    write
}

#[test]
fn doctor_into_a_closed_pipe_exits_cleanly() {
    for args in [&["doctor"][..], &["doctor", "--json"][..]] {
        let out = Command::new(common::bin())
            .args(args)
            .stdout(Stdio::from(pipe_without_reader()))
            .output()
            .expect("spawn pocketvisor");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert!(
            !stderr.contains("writing to stdout"),
            "{args:?}: a closed reader is not an error: {stderr}"
        );
        // doctor exits 0 where the probe runs, 1 where it does not: never a panic's 101.
        assert!(
            matches!(out.status.code(), Some(0 | 1)),
            "{args:?}: {:?} {stderr}",
            out.status
        );
    }
}

#[test]
fn doctor_into_a_full_disk_fails_with_a_message() {
    let Ok(full) = std::fs::OpenOptions::new().write(true).open("/dev/full") else {
        common::skip("/dev/full is not available here");
        return;
    };
    let out = Command::new(common::bin())
        .arg("doctor")
        .stdout(Stdio::from(full))
        .output()
        .expect("spawn pocketvisor");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("writing to stdout"), "{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
}
