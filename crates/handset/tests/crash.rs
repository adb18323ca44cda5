//! Crash consistency of the lifecycle steps: a suspend on a full disk leaves the guest
//! running; a daemon killed (SIGKILL) at many points of a suspend, resume or stop comes back
//! with every profile in a state its files agree with, reachable by the normal commands, and
//! never cold-boots a guest whose snapshot is on disk. Needs /dev/kvm, root (tmpfs mount) and
//! the built `pocketvisor` binary.

mod common;

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{can_run_vms, last_counter, loud, wait_until, Daemon};
use handset::client::ClientError;
use handset::ProfileState;

/// A small tmpfs mounted on a temporary directory (unmounted on drop).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size_mib: u64) -> Option<Tmpfs> {
        let dir = tempfile::Builder::new()
            .prefix("pv-tmpfs-")
            .tempdir()
            .ok()?;
        let target = CString::new(dir.path().to_str()?).ok()?;
        let opts = CString::new(format!("size={size_mib}m,mode=0700")).ok()?;
        // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        (r == 0).then_some(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes free (tmpfs keeps no reserve).
    fn free(&self) -> u64 {
        let p = CString::new(self.path().to_str().unwrap()).unwrap();
        // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: statvfs fills the struct we pass; the path is NUL-terminated.
        let r = unsafe { libc::statvfs(p.as_ptr(), &mut st) };
        assert_eq!(r, 0);
        st.f_bavail * st.f_frsize
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let p = CString::new(self.path().to_str().unwrap()).unwrap();
        // SAFETY: umount2(2) of the mount made in `mount`, lazily.
        unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Fills `fs` until `leave` bytes are free; returns the filler's path.
fn fill(fs: &Tmpfs, leave: u64) -> PathBuf {
    use std::io::Write;
    let p = fs.path().join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let chunk = vec![0x55u8; 64 << 10];
    while fs.free() > leave + chunk.len() as u64 {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    p
}

/// A suspend whose snapshot cannot be written (no space left) fails with an error and the
/// guest runs on in the same VMM, as before; with space again, suspend and resume work.
#[test]
fn a_suspend_on_a_full_disk_leaves_the_guest_running() {
    if !can_run_vms("a_suspend_on_a_full_disk_leaves_the_guest_running") {
        return;
    }
    let Some(fs) = Tmpfs::mount(96) else {
        loud("SKIP (cannot mount a tmpfs: not root?): a_suspend_on_a_full_disk_leaves_the_guest_running");
        return;
    };
    let d = Daemon::start_in("enospc", fs.path());
    d.create_probe("s", 80, "");
    let pid = d.act("s", "start").unwrap().pid;
    assert!(wait_until(Duration::from_secs(10), || last_counter(
        &d.serial("s")
    )
    .is_some_and(|n| n >= 3)));
    let filler = fill(&fs, 32 << 10);
    match d.act("s", "suspend") {
        Err(ClientError::Api { message, .. }) => {
            assert!(message.to_lowercase().contains("space"), "{message}")
        }
        other => panic!("suspend on a full disk: {other:?}"),
    }
    let p = d.show("s");
    assert_eq!((p.state, p.pid), (ProfileState::Running, pid));
    assert!(!fs.path().join("profiles/s/snapshot").exists());
    assert!(!fs.path().join("profiles/s/intent").exists());
    // Running, not paused: the counter goes on.
    let at = last_counter(&d.serial("s")).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || last_counter(&d.serial("s"))
            .is_some_and(|n| n > at + 2)),
        "the guest stays paused after a failed suspend"
    );
    std::fs::remove_file(filler).unwrap();
    assert_eq!(
        d.act("s", "suspend").unwrap().state,
        ProfileState::Suspended
    );
    assert_eq!(d.act("s", "resume").unwrap().state, ProfileState::Running);
    drop(d);
}

/// What one kill point left.
#[derive(Default, Debug)]
struct Outcomes {
    running: u32,
    suspended: u32,
    stopped: u32,
}

/// Sends `action` for `name` on a thread, kills the daemon with SIGKILL `delay` into it and
/// starts a new one on the same state directory.
fn kill_during(d: &mut Daemon, name: &str, action: &str, delay: Duration) {
    let client = d.client();
    let path = format!("/v1/profiles/{name}/{action}");
    let t = std::thread::spawn(move || {
        let _ = client.call::<handset::ProfileInfo>("POST", &path, None::<&()>);
    });
    std::thread::sleep(delay);
    d.kill9();
    let _ = t.join();
    d.spawn();
}

/// Checks what the new daemon made of `name`: a state its files agree with, no step left
/// half done, no cold boot; returns the state.
fn check_settled(d: &Daemon, name: &str, boots_before: usize) -> ProfileState {
    let p = d.show(name);
    let snap = d.dir.join(format!("profiles/{name}/snapshot"));
    assert!(
        !d.dir.join(format!("profiles/{name}/intent")).exists(),
        "intent left"
    );
    match p.state {
        ProfileState::Running => {
            let pid = p.pid.expect("running without a pid");
            assert!(
                Path::new(&format!("/proc/{pid}")).exists(),
                "dead pid {pid}"
            );
            assert!(!snap.exists(), "running with a snapshot left on disk");
        }
        ProfileState::Suspended => {
            assert!(
                snap.join("COMPLETE").is_file(),
                "suspended without a snapshot"
            );
            assert_eq!(p.pid, None);
        }
        ProfileState::Stopped => assert_eq!(p.pid, None),
        other => panic!("{name} ended {other:?}"),
    }
    let boots = cold_boots(d, name);
    assert_eq!(
        boots,
        boots_before,
        "cold boot after a kill: {:?}",
        d.events(name)
    );
    p.state
}

/// Boots from scratch recorded for `name` (starts and crash restarts).
fn cold_boots(d: &Daemon, name: &str) -> usize {
    d.events(name)
        .iter()
        .filter(|e| matches!(e.as_str(), "started" | "restarting"))
        .count()
}

/// Waits until the guest's counter passes `at` (it went on, it did not start over).
fn goes_on(d: &Daemon, name: &str, at: u64) {
    assert!(
        wait_until(Duration::from_secs(15), || last_counter(&d.serial(name))
            .is_some_and(|n| n > at)),
        "the counter did not pass {at}: {:?}",
        d.serial(name).lines().rev().take(3).collect::<Vec<_>>()
    );
}

/// SIGKILL of the daemon at many points of suspend, resume and stop.
#[test]
fn a_daemon_killed_in_any_step_comes_back_consistent() {
    if !can_run_vms("a_daemon_killed_in_any_step_comes_back_consistent") {
        return;
    }
    const POINTS_MS: [u64; 10] = [0, 5, 15, 30, 60, 100, 160, 250, 400, 700];
    let mut d = Daemon::start("kill9");
    d.create_probe("k", 80, "restart = \"always\"\n");
    d.act("k", "start").unwrap();
    goes_on(&d, "k", 3);
    let t0 = Instant::now();
    for op in ["suspend", "resume", "stop"] {
        let mut out = Outcomes::default();
        for ms in POINTS_MS {
            // The precondition of `op`.
            let want = if op == "resume" {
                ProfileState::Suspended
            } else {
                ProfileState::Running
            };
            let state = d.show("k").state;
            if state != want {
                match want {
                    ProfileState::Suspended => d.act("k", "suspend").unwrap(),
                    _ => d.act("k", "start").unwrap(),
                };
            }
            let at = last_counter(&d.serial("k")).unwrap_or(0);
            let boots = cold_boots(&d, "k");
            kill_during(&mut d, "k", op, Duration::from_millis(ms));
            let state = check_settled(&d, "k", boots);
            match state {
                ProfileState::Running => {
                    out.running += 1;
                    if op != "stop" {
                        goes_on(&d, "k", at);
                    }
                }
                ProfileState::Suspended => {
                    out.suspended += 1;
                    // The normal command brings it back where it was.
                    assert_eq!(d.act("k", "resume").unwrap().state, ProfileState::Running);
                    goes_on(&d, "k", at);
                }
                _ => {
                    out.stopped += 1;
                    assert_eq!(op, "stop", "{op} ended stopped");
                    assert!(d.our_processes().is_empty());
                }
            }
        }
        loud(&format!(
            "MEASURE kill -9 during {op}: {} points -> {out:?}",
            POINTS_MS.len()
        ));
    }
    let events = d.events("k");
    let count = |e: &str| events.iter().filter(|x| x.as_str() == e).count();
    loud(&format!(
        "MEASURE kill -9: 3 operations x {} points x 1 run in {:.1} s; settled at restart: \
         {} adopted, {} suspend-rolled-back, {} resume-rolled-back, {} stray VMMs killed",
        POINTS_MS.len(),
        t0.elapsed().as_secs_f64(),
        count("adopted"),
        count("suspend-rolled-back"),
        count("resume-rolled-back"),
        count("stray-killed"),
    ));
}

/// A stop on a disk with no byte left (the intent, the registry or the logs cannot be
/// written) leaves a state the normal commands recover from: running with a live VMM, or
/// stopped with none; with space again, stop and start work.
#[test]
fn a_stop_on_a_full_disk_is_recoverable() {
    if !can_run_vms("a_stop_on_a_full_disk_is_recoverable") {
        return;
    }
    let Some(fs) = Tmpfs::mount(96) else {
        loud("SKIP (cannot mount a tmpfs: not root?): a_stop_on_a_full_disk_is_recoverable");
        return;
    };
    let d = Daemon::start_in("stopfull", fs.path());
    d.create_probe("f", 80, "");
    d.act("f", "start").unwrap();
    goes_on(&d, "f", 3);
    let filler = fill(&fs, 0);
    {
        // The last bytes too, in small pieces.
        use std::io::Write;
        let mut f = std::fs::File::options().append(true).open(&filler).unwrap();
        while f.write_all(&[0x55; 512]).is_ok() {}
    }
    let stopped = d.act("f", "stop");
    let p = d.show("f");
    match p.state {
        ProfileState::Running => {
            assert!(
                stopped.is_err(),
                "stop said {stopped:?} but the profile runs"
            );
            let pid = p.pid.expect("running without a pid");
            assert!(
                Path::new(&format!("/proc/{pid}")).exists(),
                "running with a dead pid {pid} after a failed stop"
            );
        }
        ProfileState::Stopped => assert!(d.our_processes().is_empty(), "a VMM is left"),
        other => panic!("after a stop on a full disk: {other:?} ({stopped:?})"),
    }
    loud(&format!(
        "MEASURE stop on a full disk: {} -> {:?}",
        match &stopped {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("error {e}"),
        },
        p.state
    ));
    std::fs::remove_file(filler).unwrap();
    if p.state == ProfileState::Running {
        assert_eq!(d.act("f", "stop").unwrap().state, ProfileState::Stopped);
    }
    assert!(d.our_processes().is_empty());
    assert_eq!(d.act("f", "start").unwrap().state, ProfileState::Running);
    goes_on(&d, "f", 3);
    assert_eq!(d.act("f", "stop").unwrap().state, ProfileState::Stopped);
    drop(d);
}

/// The disk fills at the worst moment of a stop and of a suspend: after the VMM ended (the
/// guest is gone, or in its complete snapshot) and before the registry records it. The step
/// fails with an error; with space again, the normal command settles the profile (stopped;
/// suspended with its snapshot, then resumed where the guest was, never cold-booted), and
/// the profile works on. The moment is held by `POCKETVISOR_HOLD_AT` (`handset::fault`).
#[test]
fn a_disk_that_fills_after_the_vmm_ended_leaves_a_recoverable_state() {
    if !can_run_vms("a_disk_that_fills_after_the_vmm_ended_leaves_a_recoverable_state") {
        return;
    }
    let Some(fs) = Tmpfs::mount(128) else {
        loud("SKIP (cannot mount a tmpfs: not root?): a_disk_that_fills_after_the_vmm_ended");
        return;
    };
    let flags = tempfile::Builder::new()
        .prefix("pv-hold-")
        .tempdir()
        .unwrap();
    for (op, point, settled) in [
        ("stop", "stop-vmm-ended", ProfileState::Stopped),
        ("suspend", "suspend-vmm-ended", ProfileState::Suspended),
    ] {
        let flag = flags.path().join(point);
        let dir = fs.path().join(op);
        std::fs::create_dir(&dir).unwrap();
        let mut d = Daemon::start_in(op, &dir);
        d.kill9();
        d.env = vec![(
            handset::fault::HOLD_AT_VAR.to_string(),
            format!("{point}:{}", flag.display()),
        )];
        d.spawn();
        d.create_probe("f", 64, "");
        d.act("f", "start").unwrap();
        goes_on(&d, "f", 3);
        let sock = d.dir.join("handset.sock");
        let path = format!("/v1/profiles/f/{op}");
        let step = std::thread::spawn(move || {
            handset::client::Client::new(&sock).call::<handset::ProfileInfo>(
                "POST",
                &path,
                None::<&()>,
            )
        });
        assert!(
            wait_until(Duration::from_secs(60), || flag.exists()),
            "{op}: never reached {point}\n{}",
            d.log()
        );
        let last_before = last_counter(&d.serial("f")).unwrap_or(0);
        // No byte left, then the step goes on to its registry write.
        let filler = fill(&fs, 0);
        {
            use std::io::Write;
            let mut f = std::fs::File::options().append(true).open(&filler).unwrap();
            while f.write_all(&[0x55; 512]).is_ok() {}
        }
        std::fs::remove_file(&flag).unwrap();
        let failed = step.join().unwrap();
        assert!(
            failed.is_err(),
            "{op}: the registry write on a full disk succeeded ({failed:?}): nothing was tested"
        );
        let seen = d.show("f").state;
        loud(&format!(
            "MEASURE {op} with the disk full after the VMM ended: {failed:?}; the registry \
             says {seen:?} until the next command"
        ));
        std::fs::remove_file(filler).unwrap();
        assert!(d.our_processes().is_empty(), "{op}: a VMM is left");
        // The normal command settles it; no error for what is now done.
        let after = d.act("f", op).unwrap();
        assert_eq!(after.state, settled, "{op}: after the repeated command");
        if op == "suspend" {
            assert!(
                d.dir.join("profiles/f/snapshot/COMPLETE").is_file(),
                "suspended without its snapshot"
            );
            let log_len = d.serial("f").len();
            assert_eq!(d.act("f", "resume").unwrap().state, ProfileState::Running);
            // The guest goes on from where it was: its first count after the resume is past
            // the last one before the suspend (a cold boot counts from 1).
            assert!(
                wait_until(Duration::from_secs(15), || first_counter_after(
                    &d.serial("f"),
                    log_len
                )
                .is_some()),
                "no count after the resume"
            );
            let first = first_counter_after(&d.serial("f"), log_len).unwrap();
            assert!(
                first >= last_before,
                "resumed at {first}, suspended after {last_before}: a cold boot"
            );
        } else {
            assert_eq!(d.act("f", "start").unwrap().state, ProfileState::Running);
        }
        goes_on(&d, "f", 3);
        assert_eq!(d.act("f", "stop").unwrap().state, ProfileState::Stopped);
        assert!(
            !d.dir.join("profiles/f/intent").exists(),
            "{op}: intent left"
        );
        drop(d);
    }
}

/// The first `PROBE counter N` in `serial` after byte `from` (the whole log if it is now
/// shorter: a new log).
fn first_counter_after(serial: &str, from: usize) -> Option<u64> {
    let tail = serial.get(from..).unwrap_or(serial);
    tail.lines()
        .find_map(|l| l.trim_end().strip_prefix("PROBE counter "))
        .and_then(|n| n.trim().parse().ok())
}
