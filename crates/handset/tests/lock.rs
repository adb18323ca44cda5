//! Lock and unlock with probe guests: a locked profile is paused and refuses whatever would
//! let its guest run or its data out until its passcode unlocks it; failed attempts make the
//! next ones wait; the lock and the failure count survive a daemon restart, and a locked
//! profile found running at the daemon's start is paused.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{can_run_vms, last_counter, pv_bin, wait_until, Daemon};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(out: &Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", text(out));
    text(out)
}

/// A refusal: exit status 4 (refused), its message.
fn refused(out: &Output, what: &str) -> String {
    assert_eq!(out.status.code(), Some(4), "{what}: {}", text(out));
    text(out)
}

/// Whether the guest's counter stands still for a while (its vCPUs are paused).
fn counter_stands_still(d: &Daemon, name: &str) -> bool {
    std::thread::sleep(Duration::from_millis(300));
    let a = last_counter(&d.serial(name));
    std::thread::sleep(Duration::from_millis(700));
    a.is_some() && last_counter(&d.serial(name)) == a
}

/// Waits until the guest's counter moves past where it is now.
fn counter_moves(d: &Daemon, name: &str) -> bool {
    let a = last_counter(&d.serial(name));
    wait_until(Duration::from_secs(30), || {
        last_counter(&d.serial(name)) > a
    })
}

fn audit(d: &Daemon, action: &str) -> Vec<String> {
    let list: Vec<handset::Event> = d
        .client()
        .call("GET", "/v1/audit?limit=1000", None::<&()>)
        .unwrap();
    list.into_iter()
        .filter(|e| e.event == action)
        .map(|e| e.detail)
        .collect()
}

fn unlock_with(d: &Daemon, file: &Path) -> Output {
    d.cli(&["unlock", "work", "--passcode-file", file.to_str().unwrap()])
}

#[test]
fn a_locked_profile_is_paused_refuses_everything_and_unlocks_only_with_its_passcode() {
    if !can_run_vms("a_locked_profile_is_paused_refuses_everything") {
        return;
    }
    let mut d = Daemon::start("lock");
    d.create_probe("work", 128, "screen = true\n");
    let tmp = tempfile::tempdir().unwrap();
    let right = tmp.path().join("right");
    let wrong = tmp.path().join("wrong");
    std::fs::write(&right, "4711-secret\n").unwrap();
    std::fs::write(&wrong, "0000-nope\n").unwrap();

    // No passcode yet: nothing could unlock it, so it is not locked.
    let out = d.cli(&["lock", "work"]);
    assert!(
        !out.status.success() && text(&out).contains("passcode set"),
        "{}",
        text(&out)
    );
    // Set from stdin (the first line), then replaced from a file.
    let mut set = Command::new(pv_bin())
        .args(["profile", "--state-dir"])
        .arg(&d.dir)
        .args(["passcode", "set", "work"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    set.stdin
        .take()
        .unwrap()
        .write_all(b"first-code\n")
        .unwrap();
    ok(&set.wait_with_output().unwrap(), "passcode set (stdin)");
    ok(
        &d.cli(&[
            "passcode",
            "set",
            "work",
            "--passcode-file",
            right.to_str().unwrap(),
        ]),
        "passcode set (file)",
    );
    let state = std::fs::read_to_string(d.dir.join("profiles/work/lock.json")).unwrap();
    assert!(
        !state.contains("4711") && state.contains("argon2id$"),
        "{state}"
    );

    d.act("work", "start").unwrap();
    assert!(counter_moves(&d, "work"), "{}", d.serial("work"));
    ok(&d.cli(&["lock", "work"]), "lock");
    let p = d.show("work");
    assert!(p.locked && p.state.as_str() == "paused", "{p:?}");
    assert!(counter_stands_still(&d, "work"), "the locked guest runs on");
    let table = ok(&d.cli(&["list"]), "list");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("work ") && l.trim_end().ends_with("locked")),
        "{table}"
    );

    // Everything that would let the guest run or its data out is refused (exit 4).
    for (args, what) in [
        (vec!["unpause", "work"], "unpause"),
        (vec!["switch", "work"], "a switch"),
        (vec!["screenshot", "work", "-o"], "a screenshot"),
        (vec!["view", "work"], "viewing"),
        (vec!["clipboard", "get", "work"], "a channel"),
        (
            vec!["file", "from-clone", "work", "a.txt"],
            "a file from a clone",
        ),
        (
            vec!["file", "to-clone", "work", "a.txt"],
            "a file to a clone",
        ),
        (
            vec!["passcode", "set", "work", "--passcode-file"],
            "changing its passcode",
        ),
    ] {
        let mut args = args;
        let shot = tmp.path().join("shot.png").to_str().unwrap().to_string();
        if args.last() == Some(&"-o") {
            args.push(&shot);
        }
        let wrong_s = wrong.to_str().unwrap().to_string();
        if args.last() == Some(&"--passcode-file") {
            args.push(&wrong_s);
        }
        let msg = refused(&d.cli(&args), what);
        assert!(msg.contains("locked"), "{what}: {msg}");
    }
    let pass = tmp.path().join("pass");
    std::fs::write(&pass, "correct horse battery\n").unwrap();
    let msg = refused(
        &Command::new(pv_bin())
            .args(["export", "work", "-o"])
            .arg(tmp.path().join("w.pvp"))
            .arg("--state-dir")
            .arg(&d.dir)
            .args(["--passphrase-file", pass.to_str().unwrap()])
            .output()
            .unwrap(),
        "export",
    );
    assert!(msg.contains("locked"), "{msg}");
    assert!(counter_stands_still(&d, "work"));
    let refusals = audit(&d, "locked");
    for what in [
        "unpause",
        "a switch to it",
        "a screenshot",
        "viewing its screen",
        "a channel transfer",
        "a file from its clone",
        "a file to its clone",
    ] {
        assert!(
            refusals
                .iter()
                .any(|r| r.starts_with(&format!("refused {what}"))),
            "{what} not audited: {refusals:?}"
        );
    }

    // Wrong passcodes: three tried at once, then each waits (1 s, 2 s, ...), counted from the
    // last failure; the right one made too soon is refused without being tried.
    for n in 1..=3 {
        let msg = refused(&unlock_with(&d, &wrong), "wrong passcode");
        assert!(
            msg.contains(&format!("wrong passcode ({n} failed")),
            "{msg}"
        );
    }
    std::thread::sleep(Duration::from_millis(1100));
    let msg = refused(&unlock_with(&d, &wrong), "wrong passcode");
    assert!(
        msg.contains("wrong passcode (4 failed") && msg.contains("waits 2 s"),
        "{msg}"
    );
    let msg = refused(&unlock_with(&d, &right), "too soon");
    assert!(msg.contains("try again in"), "{msg}");
    assert!(d.show("work").locked);

    // The lock and the failures survive a daemon killed and started again; the VMM, adopted,
    // stays paused.
    d.kill9();
    d.spawn();
    let p = d.show("work");
    assert!(p.locked && p.state.as_str() == "paused", "{p:?}");
    assert!(counter_stands_still(&d, "work"));
    refused(&d.cli(&["unpause", "work"]), "unpause after restart");
    std::thread::sleep(Duration::from_millis(2100));
    let msg = refused(&unlock_with(&d, &wrong), "wrong passcode after restart");
    assert!(msg.contains("wrong passcode (5 failed"), "{msg}");
    std::thread::sleep(Duration::from_millis(4100));
    ok(&unlock_with(&d, &right), "unlock");
    let p = d.show("work");
    assert!(!p.locked && p.state.as_str() == "running", "{p:?}");
    assert!(counter_moves(&d, "work"), "the unlocked guest does not run");
    let unlocks = audit(&d, "unlock");
    assert_eq!(
        unlocks.iter().filter(|u| u.contains("error")).count(),
        6,
        "{unlocks:?}"
    );
    assert!(unlocks.last().unwrap().ends_with(": ok"), "{unlocks:?}");
    assert!(audit(&d, "lock").iter().any(|l| l.ends_with(": ok")));

    // A lock persisted by a daemon that died before it paused the guest: the next daemon
    // pauses it at its start.
    d.kill9();
    let mut st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.dir.join("profiles/work/lock.json")).unwrap())
            .unwrap();
    st["locked"] = true.into();
    std::fs::write(
        d.dir.join("profiles/work/lock.json"),
        serde_json::to_vec(&st).unwrap(),
    )
    .unwrap();
    assert!(counter_moves(&d, "work"));
    d.spawn();
    assert!(
        wait_until(Duration::from_secs(20), || d.show("work").state.as_str()
            == "paused"),
        "{:?}",
        d.show("work")
    );
    assert!(counter_stands_still(&d, "work"));
    assert!(audit(&d, "lock")
        .iter()
        .any(|l| l == "paused: the profile is locked"));

    // Suspended while locked (its memory leaves the host's RAM), it does not resume until
    // unlocked; then it goes on where it was.
    ok(&d.cli(&["suspend", "work"]), "suspend a locked profile");
    let msg = refused(&d.cli(&["resume", "work"]), "resume while locked");
    assert!(msg.contains("locked"), "{msg}");
    ok(&unlock_with(&d, &right), "unlock a suspended profile");
    assert_eq!(d.show("work").state.as_str(), "suspended");
    ok(&d.cli(&["resume", "work"]), "resume");
    assert!(counter_moves(&d, "work"), "the resumed guest does not run");
}

/// An RFB stream read from a websocket's binary messages.
struct WsBytes {
    ws: tungstenite::WebSocket<std::os::unix::net::UnixStream>,
    pending: std::collections::VecDeque<u8>,
}

impl WsBytes {
    fn read(&mut self, n: usize) -> Vec<u8> {
        while self.pending.len() < n {
            match self.ws.read().unwrap() {
                tungstenite::Message::Binary(b) => self.pending.extend(b.iter()),
                other => panic!("not RFB bytes: {other:?}"),
            }
        }
        self.pending.drain(..n).collect()
    }

    fn write(&mut self, bytes: &[u8]) {
        self.ws
            .send(tungstenite::Message::binary(bytes.to_vec()))
            .unwrap();
    }
}

/// Connects to profile `name`'s screen websocket and reads one full frame (RGB) of a
/// `w` x `h` screen (RFB 3.8, security None, Raw).
fn screen_frame(d: &Daemon, name: &str, w: usize, h: usize) -> Vec<u8> {
    screen_session(d, name, w, h).1
}

/// [`screen_frame`], keeping the session open.
fn screen_session(d: &Daemon, name: &str, w: usize, h: usize) -> (WsBytes, Vec<u8>) {
    let sock = std::os::unix::net::UnixStream::connect(d.dir.join("handset.sock")).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let url = format!("ws://localhost/v1/profiles/{name}/screen");
    let (ws, _) = tungstenite::client(url, sock)
        .map_err(|e| format!("{e:?}"))
        .unwrap();
    let mut s = WsBytes {
        ws,
        pending: Default::default(),
    };
    assert_eq!(s.read(12), b"RFB 003.008\n");
    s.write(b"RFB 003.008\n");
    assert_eq!(s.read(2), [1, 1]);
    s.write(&[1]);
    assert_eq!(s.read(4), [0; 4]);
    s.write(&[1]);
    let init = s.read(24);
    let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]);
    s.read(usize::try_from(name_len).unwrap());
    let mut req = vec![3, 0, 0, 0, 0, 0];
    req.extend_from_slice(&u16::try_from(w).unwrap().to_be_bytes());
    req.extend_from_slice(&u16::try_from(h).unwrap().to_be_bytes());
    s.write(&req);
    let head = s.read(16);
    assert_eq!(head[..4], [0, 0, 0, 1], "one rectangle");
    let frame = s
        .read(w * h * 4)
        .chunks_exact(4)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect();
    (s, frame)
}

#[test]
fn a_locked_profiles_screen_shows_the_hosts_lock_notice() {
    if !can_run_vms("a_locked_profiles_screen_shows_the_hosts_lock_notice") {
        return;
    }
    const RGB: [u8; 3] = [0x2a, 0x9d, 0x8f];
    let d = Daemon::start("lockscreen");
    let spec = handset::ProfileSpec::from_toml(
        "name = \"work\"\nkernel = \"probe\"\n\
         cmdline = \"pv.mode=screen pv.screen.rgb=2a9d8f pv.screen.ms=60000\"\n\
         memory_mib = 80\nscreen = true\ndisplay = { width = 180, height = 320 }\n",
    )
    .unwrap();
    let req = handset::CreateProfile {
        spec: Some(spec),
        ..Default::default()
    };
    let _: handset::ProfileInfo = d.client().call("POST", "/v1/profiles", Some(&req)).unwrap();
    d.act("work", "start").unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || d
            .serial("work")
            .contains("PROBE screen frame n=1 why=full")),
        "the probe never drew: {}",
        d.serial("work")
    );
    let (mut open_ws, frame) = screen_session(&d, "work", 180, 320);
    assert!(
        frame.chunks_exact(3).any(|p| p == RGB),
        "the guest's screen"
    );
    // A VNC viewer of `profile view`, connected before the lock.
    let view: serde_json::Value = d
        .client()
        .call("GET", "/v1/profiles/work/view", None::<&()>)
        .unwrap();
    let mut vnc = std::net::TcpStream::connect(view["vnc"].as_str().unwrap()).unwrap();
    vnc.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = [0u8; 12];
    std::io::Read::read_exact(&mut vnc, &mut greeting).unwrap();
    assert_eq!(&greeting, b"RFB 003.008\n");
    let code = serde_json::json!({"passcode": "9876-screen"});
    let _: serde_json::Value = d
        .client()
        .call("PUT", "/v1/profiles/work/passcode", Some(&code))
        .unwrap();
    d.act("work", "lock").unwrap();
    // Sessions opened before the lock end (within a second or so), the VNC one too.
    let t0 = std::time::Instant::now();
    let mut rest = [0u8; 64];
    let ended = match std::io::Read::read(&mut vnc, &mut rest) {
        Ok(0) => true,
        Ok(_) => std::io::Read::read(&mut vnc, &mut rest).is_ok_and(|n| n == 0),
        Err(e) => {
            e.kind() != std::io::ErrorKind::WouldBlock && e.kind() != std::io::ErrorKind::TimedOut
        }
    };
    assert!(ended, "the view of a locked profile goes on");
    assert!(t0.elapsed() < Duration::from_secs(15));
    open_ws
        .ws
        .get_mut()
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let ws_ended = loop {
        match open_ws.ws.read() {
            Ok(tungstenite::Message::Close(_)) => break true,
            Ok(_) => continue,
            Err(tungstenite::Error::Io(e))
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                break false
            }
            Err(_) => break true,
        }
    };
    assert!(ws_ended, "the screen session of a locked profile goes on");
    let frame = screen_frame(&d, "work", 180, 320);
    let text = frame
        .chunks_exact(3)
        .filter(|p| *p == rfb::notice::TEXT)
        .count();
    assert!(
        frame
            .chunks_exact(3)
            .all(|p| p == rfb::notice::TEXT || p == rfb::notice::BACKGROUND),
        "a guest pixel on a locked screen"
    );
    assert!(text > 100, "the notice is drawn ({text} pixels)");
    let _: handset::ProfileInfo = d
        .client()
        .call("POST", "/v1/profiles/work/unlock", Some(&code))
        .unwrap();
    let frame = screen_frame(&d, "work", 180, 320);
    assert!(
        frame.chunks_exact(3).any(|p| p == RGB),
        "the guest's screen again"
    );
    d.act("work", "stop").unwrap();
}
