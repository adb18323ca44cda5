//! `pocketvisor profile console NAME` and `GET /v1/profiles/{name}/console` against a real
//! daemon running the probe's echo console (`pv.mode=echo`): a script's line reaches the
//! guest and its echo comes back after the recent history; a script's console ends even with
//! a guest that never stops printing; one console at a time; the route's refusals (no
//! upgrade 426, a stopped profile 409, unknown 404, bad history 400); attaches and refusals
//! are audited; the session closes when the guest powers off; on a terminal (a pty) the
//! console announces the escape key, Ctrl-] detaches and the terminal's settings come back.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{can_run_vms, pv_bin, wait_until, Daemon};
use handset::client::ClientError;
use handset::{CreateProfile, ProfileSpec};

fn create_echo(d: &Daemon, name: &str) {
    let text = format!(
        "name = \"{name}\"\nkernel = \"probe\"\ncmdline = \"pv.mode=echo\"\nmemory_mib = 64\n"
    );
    let req = CreateProfile {
        spec: Some(ProfileSpec::from_toml(&text).unwrap()),
        ..Default::default()
    };
    let _: handset::ProfileInfo = d.client().call("POST", "/v1/profiles", Some(&req)).unwrap();
}

fn start_echo(d: &Daemon, name: &str) {
    create_echo(d, name);
    d.act(name, "start").unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || d
            .serial(name)
            .contains("PROBE echo ready")),
        "{}",
        d.serial(name)
    );
}

/// `pocketvisor profile console NAME ARGS...` with `input` on a pipe.
fn console(d: &Daemon, name: &str, args: &[&str], input: &[u8]) -> (i32, String, String) {
    let mut child = Command::new(pv_bin())
        .args(["profile", "--state-dir"])
        .arg(&d.dir)
        .args(["console", name])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn api_error(r: Result<(std::os::unix::net::UnixStream, Vec<u8>), ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Api { status, message }) => (status, message),
        Err(e) => panic!("not an API error: {e}"),
        Ok(_) => panic!("attached"),
    }
}

const PROTO: &str = handset::console::PROTOCOL;

#[test]
fn a_scripted_console_types_into_the_guest_one_console_at_a_time() {
    if !can_run_vms("a_scripted_console_types_into_the_guest") {
        return;
    }
    let d = Daemon::start("console");
    start_echo(&d, "e");

    let t0 = Instant::now();
    let (rc, out, err) = console(&d, "e", &[], b"hello console\r");
    assert_eq!(rc, 0, "{err}");
    // History first (the probe's boot lines), then the echo and the guest's report.
    let ready = out.find("PROBE echo ready").expect(&out);
    let echoed = out.find("text=\"hello console\"").expect(&out);
    assert!(ready < echoed, "{out}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert!(err.is_empty(), "a script gets no banner: {err}");

    // --history 0: only what the guest prints from now on.
    let (rc, out, _) = console(&d, "e", &["--history", "0"], b"two\r");
    assert_eq!(rc, 0);
    assert!(!out.contains("PROBE echo ready"), "{out}");
    assert!(out.contains("text=\"two\""), "{out}");

    // A guest that never stops printing still lets a script's console end.
    d.create_probe("c", 64, "");
    d.act("c", "start").unwrap();
    let t0 = Instant::now();
    let (rc, out, _) = console(&d, "c", &["--history", "0", "--drain-max-ms", "1500"], b"");
    assert_eq!(rc, 0);
    assert!(out.contains("PROBE counter"), "{out}");
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    d.act("c", "stop").unwrap();

    // One console at a time: a second is refused while the first is attached.
    let c = d.client();
    let (first, _) = c
        .upgrade("/v1/profiles/e/console?history=0", PROTO)
        .unwrap();
    let (status, msg) = api_error(c.upgrade("/v1/profiles/e/console", PROTO));
    assert_eq!(status, 409);
    assert!(msg.contains("already has a console attached"), "{msg}");
    let (rc, _, err) = console(&d, "e", &[], b"");
    assert_eq!(rc, 1, "{err}");
    assert!(err.contains("already has a console attached"), "{err}");
    drop(first);
    assert!(
        wait_until(Duration::from_secs(5), || c
            .upgrade("/v1/profiles/e/console?history=0", PROTO)
            .is_ok()),
        "the console stayed taken after its client left"
    );

    // What the route refuses, each with the JSON error body.
    let plain = c.raw("GET", "/v1/profiles/e/console", None).unwrap();
    assert_eq!(
        plain.status,
        426,
        "{}",
        String::from_utf8_lossy(&plain.body)
    );
    let (status, _) = api_error(c.upgrade("/v1/profiles/nobody/console", PROTO));
    assert_eq!(status, 404);
    let (status, msg) = api_error(c.upgrade("/v1/profiles/e/console?history=2000000", PROTO));
    assert_eq!(status, 400, "{msg}");
    let (status, _) = api_error(c.upgrade("/v1/profiles/e/console", "websocket"));
    assert_eq!(status, 426);

    // Every attach and refusal is audited, with the client's credentials.
    let audit: Vec<handset::Event> = c.call("GET", "/v1/audit?limit=1000", None::<&()>).unwrap();
    let consoles: Vec<&handset::Event> = audit
        .iter()
        .filter(|e| e.profile == "e" && e.event == "console")
        .collect();
    assert!(
        consoles.iter().any(|e| e.detail.ends_with(": ok")),
        "{consoles:?}"
    );
    assert!(
        consoles
            .iter()
            .any(|e| e.detail.contains("already has a console attached")),
        "{consoles:?}"
    );

    // The guest powering off ends the session, after its last words.
    let (mut s, mut out) = c
        .upgrade("/v1/profiles/e/console?history=0", PROTO)
        .unwrap();
    s.write_all(b"quit\r").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.read_to_end(&mut out)
        .expect("the session did not end with the guest");
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("PROBE done ok"), "{out}");
    assert!(
        wait_until(Duration::from_secs(10), || d.show("e").state
            == handset::ProfileState::Stopped),
        "{:?}",
        d.show("e").state
    );
    let (status, msg) = api_error(c.upgrade("/v1/profiles/e/console", PROTO));
    assert_eq!(status, 409, "{msg}");
    assert!(msg.contains("stopped"), "{msg}");
}

/// A pseudo-terminal pair: (master, slave).
fn openpty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let (mut m, mut s) = (-1, -1);
    // SAFETY: openpty writes two fds into valid ints; the name, termios and size are null.
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds are fresh and owned by nobody else.
    unsafe { (std::fs::File::from_raw_fd(m), std::fs::File::from_raw_fd(s)) }
}

fn termios(f: &std::fs::File) -> libc::termios {
    use std::os::fd::AsRawFd;
    // SAFETY: termios is plain data; tcgetattr fills it for the pty's fd.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid termios.
    assert_eq!(unsafe { libc::tcgetattr(f.as_raw_fd(), &mut t) }, 0);
    t
}

#[test]
fn on_a_terminal_the_console_is_raw_and_ctrl_bracket_detaches_restoring_the_terminal() {
    if !can_run_vms("on_a_terminal_the_console_is_raw") {
        return;
    }
    let d = Daemon::start("console-tty");
    start_echo(&d, "t");
    let (mut master, slave) = openpty();
    let before = termios(&slave);
    assert_ne!(before.c_lflag & libc::ICANON, 0, "a fresh pty is canonical");
    let mut child = Command::new(pv_bin())
        .args(["profile", "--state-dir"])
        .arg(&d.dir)
        .args(["console", "t", "--history", "0"])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap())
        .spawn()
        .unwrap();
    // Read the pty on a thread (the child's output would otherwise fill it).
    let mut reader = master.try_clone().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut wait_for = |needle: &str| {
        let t0 = Instant::now();
        while !String::from_utf8_lossy(&seen).contains(needle) {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "no {needle:?} in {:?}",
                String::from_utf8_lossy(&seen)
            );
            if let Ok(b) = rx.recv_timeout(Duration::from_millis(100)) {
                seen.extend(b);
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    };
    wait_for("escape character is ^]");
    // Raw: no echo by the terminal and Ctrl-C goes to the guest as a byte, not a signal.
    let raw = termios(&slave);
    assert_eq!(raw.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
    master.write_all(b"ab\x03cd\r").unwrap();
    wait_for("text=\"ab\\u{3}cd\"");
    master.write_all(&[0x1d]).unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "Ctrl-] did not detach"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    let out = wait_for("Detached from profile t");
    let after = termios(&slave);
    assert_eq!(
        (after.c_lflag, after.c_iflag, after.c_oflag, after.c_cflag),
        (
            before.c_lflag,
            before.c_iflag,
            before.c_oflag,
            before.c_cflag
        ),
        "the terminal was not restored: {out}"
    );
    // The guest still runs and another console may attach.
    assert_eq!(d.show("t").state, handset::ProfileState::Running);
    let (rc, out, _) = console(&d, "t", &["--history", "0"], b"again\r");
    assert_eq!(rc, 0);
    assert!(out.contains("text=\"again\""), "{out}");
}
