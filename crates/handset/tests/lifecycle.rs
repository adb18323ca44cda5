//! End-to-end tests of the handset daemon with probe-guest profiles (need /dev/kvm and the
//! built `pocketvisor` binary).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{can_run_vms, last_counter, loud, wait_until, Daemon};
use handset::client::ClientError;
use handset::{ProfileInfo, ProfileState};

fn stdout(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn create_list_show_delete_through_the_cli() {
    let d = Daemon::start("crud");
    let out = stdout(&d.cli(&["create", "work", "--template", "work"]));
    assert!(out.contains("created profile work"), "{out}");
    stdout(&d.cli(&["create", "home", "--template", "personal"]));
    // Duplicate names and bad names are refused on one line.
    let dup = d.cli(&["create", "work", "--template", "work"]);
    assert!(!dup.status.success());
    let err = String::from_utf8_lossy(&dup.stderr);
    assert!(
        err.contains("already exists") && err.lines().count() == 1,
        "{err}"
    );
    let bad = d.cli(&["create", "Work!", "--template", "work"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("must be 1-32"));

    let spec = d.dir.join("lab.toml");
    std::fs::write(
        &spec,
        "name = \"lab\"\nkernel = \"probe\"\nmemory_mib = 96\nvcpus = 2\n\
         disks = [{ name = \"root\", size_mib = 32 }, { name = \"ro\", size_mib = 1, read_only = true }]\n\
         display = { width = 720, height = 1280 }\nrestart = \"never\"\nbackground = \"suspend\"\n",
    )
    .unwrap();
    stdout(&d.cli(&["create", "--file", spec.to_str().unwrap()]));

    let list: Vec<ProfileInfo> =
        serde_json::from_str(&stdout(&d.cli(&["list", "--json"]))).unwrap();
    let names: Vec<&str> = list.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["home", "lab", "work"]);
    assert!(list.iter().all(|p| p.state == ProfileState::Stopped));
    let table = stdout(&d.cli(&["list"]));
    assert!(
        table.starts_with("NAME") && table.contains("lab"),
        "{table}"
    );

    let lab: ProfileInfo =
        serde_json::from_str(&stdout(&d.cli(&["show", "lab", "--json"]))).unwrap();
    assert_eq!(lab.spec.vcpus, 2);
    assert_eq!(lab.spec.display.width, 720);
    let img = d.dir.join("profiles/lab/disks/root.img");
    let meta = std::fs::metadata(&img).unwrap();
    assert_eq!(meta.len(), 32 << 20);
    use std::os::unix::fs::MetadataExt;
    assert!(meta.blocks() * 512 < (1 << 20), "disk is not sparse");
    let toml_text = std::fs::read_to_string(d.dir.join("profiles/lab/profile.toml")).unwrap();
    // The old word for pausing in memory reads as the new one and is written as it.
    assert!(toml_text.contains("background = \"pause\""), "{toml_text}");

    stdout(&d.cli(&["delete", "lab"]));
    assert!(!d.dir.join("profiles/lab").exists());
    let gone = d.cli(&["show", "lab"]);
    assert!(String::from_utf8_lossy(&gone.stderr).contains("no profile named \"lab\""));
    let events = stdout(&d.cli(&["events", "lab"]));
    assert!(
        events.contains("created") && events.contains("deleted"),
        "{events}"
    );
    let audit = stdout(&d.cli(&["audit"]));
    // The caller's credentials are recorded.
    assert!(audit.contains("uid 0 pid "), "{audit}");
    assert!(
        audit.contains("create") && audit.contains("delete"),
        "{audit}"
    );
}

/// Scripts tell "not found" (3) and "refused by policy" (4) from other failures (1), and
/// with --json the failure is JSON on stdout too; the daemon's log has no colour codes.
#[test]
fn exit_statuses_and_json_errors_tell_failures_apart() {
    let d = Daemon::start("exits");
    for t in ["work", "personal"] {
        assert!(d.cli(&["create", t, "--template", t]).status.success());
    }
    let nope = d.cli(&["show", "nope"]);
    assert_eq!(nope.status.code(), Some(3), "{nope:?}");
    assert!(String::from_utf8_lossy(&nope.stderr).starts_with("pocketvisor: error: no profile"));
    let json = d.cli(&["show", "nope", "--json"]);
    assert_eq!(json.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["exit_code"], 3);
    assert!(
        v["error"].as_str().unwrap().contains("no profile named"),
        "{v}"
    );
    // work -> personal is denied by the templates' channels.
    let denied = d.cli(&["clipboard", "copy", "--from", "work", "--to", "personal"]);
    let err = String::from_utf8_lossy(&denied.stderr);
    assert_eq!(denied.status.code(), Some(4), "{err}");
    assert!(err.contains("denied by policy"), "{err}");
    // A state refusal is a plain failure.
    let stopped = d.cli(&["stop", "work"]);
    assert_eq!(stopped.status.code(), Some(1));
    // A usage error is 2, as with any bad flag.
    assert_eq!(d.cli(&["show"]).status.code(), Some(2));
    assert!(!d.log().contains('\x1b'), "ANSI codes in the daemon's log");
    // A rejected name with a terminal escape is audited as sent, printed escaped.
    let req = serde_json::json!({"name": "\u{1b}[2Jevil", "template": "work"});
    let bad = d
        .client()
        .raw("POST", "/v1/profiles", Some(req.to_string().as_bytes()))
        .unwrap();
    assert_eq!(bad.status, 400);
    let audit = d.cli(&["audit"]);
    let text = String::from_utf8_lossy(&audit.stdout);
    assert!(!text.contains('\x1b'), "raw escape in `profile audit`");
    assert!(text.contains("\\u{1b}[2Jevil"), "{text}");
}

#[test]
fn cli_without_daemon_says_how_to_start_it() {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(common::pv_bin())
        .args(["profile", "list", "--state-dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pocketvisor handset") && err.lines().count() == 1,
        "{err}"
    );
}

#[test]
fn two_profiles_run_and_switch() {
    if !can_run_vms("two_profiles_run_and_switch") {
        return;
    }
    // Unjailed (`pocketvisor run`); the other VM tests use the default jailed VMMs.
    let d = Daemon::start_with("two", &["--no-jail"]);
    d.create_probe("work", 80, "");
    d.create_probe("home", 80, "background = \"pause\"");
    let w = d.act("work", "start").unwrap();
    let h = d.act("home", "start").unwrap();
    assert_eq!(w.state, ProfileState::Running);
    // work started first and stays in the foreground; home (suspend in background) is paused.
    assert!(d.show("work").foreground);
    assert_eq!(h.state, ProfileState::Paused);
    assert!(
        wait_until(Duration::from_secs(10), || last_counter(&d.serial("work"))
            .is_some_and(|n| n >= 3)),
        "work does not count: {}",
        d.serial("work")
    );
    // Paused: home's counter does not move.
    let frozen = last_counter(&d.serial("home"));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(last_counter(&d.serial("home")), frozen);

    let fg_weight = d.weight_file("work");
    if fg_weight.is_none() {
        loud(
            "SKIP (no cgroups on this host): cpu weight assertions of two_profiles_run_and_switch",
        );
    }
    let read = |n: &str| {
        std::fs::read_to_string(d.weight_file(n).unwrap())
            .unwrap()
            .trim()
            .to_string()
    };
    let v1 = fg_weight
        .as_ref()
        .is_some_and(|p| p.ends_with("cpu.shares"));
    let (hi, lo) = if v1 {
        ("10240", "1024")
    } else {
        ("1000", "100")
    };
    if fg_weight.is_some() {
        assert_eq!(
            (read("work"), read("home")),
            (hi.to_string(), lo.to_string())
        );
    }

    let t0 = Instant::now();
    let s = d.act("home", "switch").unwrap();
    let switch_ms = t0.elapsed().as_secs_f64() * 1000.0;
    assert!(s.foreground);
    assert_eq!(s.state, ProfileState::Running);
    assert!(!d.show("work").foreground);
    if fg_weight.is_some() {
        assert_eq!(
            (read("work"), read("home")),
            (lo.to_string(), hi.to_string())
        );
    }
    // Both count now (home was resumed).
    let (w0, h0) = (
        last_counter(&d.serial("work")),
        last_counter(&d.serial("home")),
    );
    assert!(wait_until(Duration::from_secs(5), || {
        last_counter(&d.serial("work")) > w0 && last_counter(&d.serial("home")) > h0
    }));
    let t1 = Instant::now();
    d.act("work", "switch").unwrap();
    let switch_back_ms = t1.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(d.show("home").state, ProfileState::Paused);
    let rss: Vec<String> = ["work", "home"]
        .iter()
        .map(|n| format!("{n}={}KiB", d.show(n).rss_kib.unwrap_or(0)))
        .collect();
    loud(&format!(
        "MEASURE switch: {switch_ms:.2} ms (resume a paused profile), {switch_back_ms:.2} ms (pause one); vmm RSS {}",
        rss.join(" ")
    ));
    // A paused background profile can be suspended to disk; resumed, it is paused again
    // (still in the background), and switching to it runs it.
    assert_eq!(d.show("home").state, ProfileState::Paused);
    assert_eq!(
        d.act("home", "suspend").unwrap().state,
        ProfileState::Suspended
    );
    assert_eq!(d.act("home", "resume").unwrap().state, ProfileState::Paused);
    assert_eq!(
        d.act("home", "switch").unwrap().state,
        ProfileState::Running
    );
    let h1 = last_counter(&d.serial("home"));
    assert!(wait_until(Duration::from_secs(5), || last_counter(
        &d.serial("home")
    ) > h1));
    d.act("work", "switch").unwrap();
    // Stopping a paused profile works through its API (no signals needed).
    assert_eq!(d.show("home").state, ProfileState::Paused);
    d.act("home", "stop").unwrap();
    let stops: Vec<handset::Event> = d
        .client()
        .call("GET", "/v1/profiles/home/events", None::<&()>)
        .unwrap();
    let last = stops.iter().rev().find(|e| e.event == "stopped").unwrap();
    assert_eq!(last.detail, "api stop");
    // Switching to a stopped profile is refused.
    match d.act("home", "switch") {
        Err(ClientError::Api { status: 409, .. }) => {}
        other => panic!("switch to a stopped profile: {other:?}"),
    }
    d.act("work", "stop").unwrap();
    assert!(d.our_processes().is_empty());
    let ev = d.events("home");
    for e in ["started", "paused", "foreground", "unpaused", "stopped"] {
        assert!(ev.iter().any(|x| x == e), "no {e} in {ev:?}");
    }
}

#[test]
fn killed_vmm_is_restarted_until_the_limit() {
    if !can_run_vms("killed_vmm_is_restarted_until_the_limit") {
        return;
    }
    let d = Daemon::start("crash");
    d.create_probe("w", 80, "");
    d.create_probe("n", 80, "restart = \"never\"");
    let mut pid = d.act("w", "start").unwrap().pid.unwrap();
    let n_pid = d.act("n", "start").unwrap().pid.unwrap();
    for i in 0..5 {
        // SAFETY: kill(2) on the test's own VMM process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert!(
            wait_until(Duration::from_secs(10), || {
                let p = d.show("w");
                p.state == ProfileState::Running && p.pid.is_some_and(|x| x != pid)
            }),
            "restart {i} did not happen: {:?}",
            d.show("w")
        );
        pid = d.show("w").pid.unwrap();
    }
    let ev = d.events("w");
    assert_eq!(ev.iter().filter(|e| *e == "crashed").count(), 5, "{ev:?}");
    // The crashed run's serial log is kept.
    let prev = std::fs::read_to_string(d.dir.join("profiles/w/run/serial.log.prev")).unwrap();
    assert!(prev.contains("PROBE ready"), "{prev}");
    assert_eq!(
        ev.iter().filter(|e| *e == "restarting").count(),
        5,
        "{ev:?}"
    );
    // The sixth crash within a minute hits the limit.
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(10), || d.show("w").state
        == ProfileState::Failed));
    assert!(d.show("w").detail.contains("restart limit"));
    // restart = never: recorded, stopped.
    // SAFETY: as above.
    unsafe { libc::kill(n_pid, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(10), || d.show("n").state
        == ProfileState::Stopped));
    assert!(d.events("n").iter().any(|e| e == "crashed"));
    // A failed profile can be started again by hand.
    assert_eq!(d.act("w", "start").unwrap().state, ProfileState::Running);
    d.act("w", "stop").unwrap();
    assert!(wait_until(Duration::from_secs(5), || d
        .our_processes()
        .is_empty()));
}

#[test]
fn restarted_daemon_adopts_running_profiles() {
    if !can_run_vms("restarted_daemon_adopts_running_profiles") {
        return;
    }
    let mut d = Daemon::start("adopt");
    d.create_probe("a", 80, "");
    d.create_probe("b", 80, "restart = \"never\"");
    let a_pid = d.act("a", "start").unwrap().pid.unwrap();
    let b_pid = d.act("b", "start").unwrap().pid.unwrap();
    d.act("b", "switch").unwrap();
    d.kill9();
    // While the daemon is down, b's VMM dies too.
    // SAFETY: kill(2) on the test's own VMM process.
    unsafe { libc::kill(b_pid, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(100));
    d.spawn();
    let a = d.show("a");
    assert_eq!((a.state, a.pid), (ProfileState::Running, Some(a_pid)));
    assert!(d.events("a").iter().any(|e| e == "adopted"));
    let b = d.show("b");
    assert_eq!(b.state, ProfileState::Stopped, "{b:?}");
    assert!(d.events("b").iter().any(|e| e == "lost"));
    // b was the foreground; a took over.
    assert!(a.foreground);
    assert!(!d.dir.join("profiles/b/run/api.sock").exists());
    // The adopted VMM is watched: a crash is noticed and restarted.
    // SAFETY: as above.
    unsafe { libc::kill(a_pid, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(10), || {
        let p = d.show("a");
        p.state == ProfileState::Running && p.pid.is_some_and(|x| x != a_pid)
    }));
    // A VMM the registry does not know (its daemon died before recording it) is killed
    // when the next daemon starts.
    d.kill9();
    let stray = std::process::Command::new(common::pv_bin())
        .args(["run", "--config"])
        .arg(d.dir.join("profiles/a/vm.toml"))
        .arg("--api-socket")
        .arg(d.dir.join("profiles/b/run/api.sock"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stray_pid = stray.id() as i32;
    assert!(wait_until(Duration::from_secs(5), || d
        .dir
        .join("profiles/b/run/api.sock")
        .exists()));
    d.spawn();
    assert!(d.events("b").iter().any(|e| e == "stray-killed"));
    let mut stray = stray;
    let _ = stray.wait();
    assert!(
        !std::path::Path::new(&format!("/proc/{stray_pid}")).exists() || {
            let st = std::fs::read_to_string(format!("/proc/{stray_pid}/stat")).unwrap_or_default();
            st.contains(") Z")
        }
    );
    // SIGTERM: the daemon stops the VMs and exits 0.
    assert!(d.terminate().success());
    assert!(wait_until(Duration::from_secs(5), || d
        .our_processes()
        .is_empty()));
    d.spawn();
    assert_eq!(d.show("a").state, ProfileState::Stopped);
}

#[test]
fn suspend_and_resume_continue_the_guest() {
    if !can_run_vms("suspend_and_resume_continue_the_guest") {
        return;
    }
    let d = Daemon::start("suspend");
    d.create_probe("s", 80, "");
    d.act("s", "start").unwrap();
    assert!(wait_until(Duration::from_secs(10), || last_counter(
        &d.serial("s")
    )
    .is_some_and(|n| n >= 5)));
    let t0 = Instant::now();
    let s = d.act("s", "suspend").unwrap();
    let suspend_ms = t0.elapsed().as_secs_f64() * 1000.0;
    assert_eq!((s.state, s.pid), (ProfileState::Suspended, None));
    assert!(d.dir.join("profiles/s/snapshot").is_dir());
    assert!(d.our_processes().is_empty());
    let at = last_counter(&d.serial("s")).unwrap();
    let t1 = Instant::now();
    let r = d.act("s", "resume").unwrap();
    let resume_ms = t1.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(r.state, ProfileState::Running);
    assert!(!d.dir.join("profiles/s/snapshot").exists());
    assert!(wait_until(Duration::from_secs(10), || last_counter(
        &d.serial("s")
    )
    .is_some_and(|n| n > at + 2)));
    // The counter continued from where it was, not from 0.
    let serial = d.serial("s");
    let after: Vec<u64> = serial
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("PROBE counter "))
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(after.iter().rev().take(3).all(|&n| n > at), "{after:?}");
    loud(&format!(
        "MEASURE suspend {suspend_ms:.1} ms, resume {resume_ms:.1} ms (80 MiB probe)"
    ));
    // Suspend twice, then start (= resume) works too.
    d.act("s", "suspend").unwrap();
    assert_eq!(d.act("s", "start").unwrap().state, ProfileState::Running);
    d.act("s", "suspend").unwrap();
    // Stop and delete of a suspended profile would lose its guest: refused, saying what
    // would be lost and how to go on; nothing changes.
    for (args, hint) in [(["stop", "s"], "--discard"), (["delete", "s"], "--force")] {
        let out = d.cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.starts_with("pocketvisor: error: profile \"s\" is suspended")
                && err.contains("saved guest")
                && err.contains(hint),
            "{err}"
        );
        assert_eq!(d.show("s").state, ProfileState::Suspended);
        assert!(d.dir.join("profiles/s/snapshot").is_dir());
    }
    // Asked for, they do it.
    let out = d.cli(&["stop", "s", "--discard"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(d.show("s").state, ProfileState::Stopped);
    assert!(!d.dir.join("profiles/s/snapshot").exists());
    d.act("s", "start").unwrap();
    d.act("s", "suspend").unwrap();
    let out = d.cli(&["delete", "s", "--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!d.dir.join("profiles/s").exists());
}

#[test]
fn concurrent_cli_creates_are_safe() {
    let d = Daemon::start("conc");
    let handles: Vec<_> = (0..10)
        .map(|i| {
            let dir = d.dir.clone();
            std::thread::spawn(move || {
                std::process::Command::new(common::pv_bin())
                    .args(["profile", "--state-dir"])
                    .arg(&dir)
                    .args(["create", &format!("p{i}"), "--template", "work"])
                    .output()
                    .unwrap()
            })
        })
        .collect();
    for h in handles {
        let o = h.join().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // Ten more, racing for the same name: exactly one wins.
    let racers: Vec<_> = (0..10)
        .map(|_| {
            let dir = d.dir.clone();
            std::thread::spawn(move || {
                std::process::Command::new(common::pv_bin())
                    .args(["profile", "--state-dir"])
                    .arg(&dir)
                    .args(["create", "same", "--template", "personal"])
                    .output()
                    .unwrap()
                    .status
                    .success()
            })
        })
        .collect();
    let wins = racers
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|&w| w)
        .count();
    assert_eq!(wins, 1);
    let list: Vec<ProfileInfo> = d.client().call("GET", "/v1/profiles", None::<&()>).unwrap();
    assert_eq!(list.len(), 11);
    let cids: std::collections::BTreeSet<u32> = list.iter().map(|p| p.vsock_cid).collect();
    assert_eq!(cids.len(), 11, "vsock CIDs must be unique");
}

#[test]
fn eight_profiles_at_once() {
    if !can_run_vms("eight_profiles_at_once") {
        return;
    }
    let d = Daemon::start("eight");
    let names: Vec<String> = (0..8).map(|i| format!("p{i}")).collect();
    for n in &names {
        d.create_probe(n, 80, "");
    }
    let t0 = Instant::now();
    for n in &names {
        assert_eq!(d.act(n, "start").unwrap().state, ProfileState::Running);
    }
    let start_ms = t0.elapsed().as_millis();
    for n in &names {
        assert!(
            wait_until(Duration::from_secs(20), || last_counter(&d.serial(n))
                .is_some_and(|c| c >= 2)),
            "{n} does not count"
        );
    }
    let mut switch_ms = vec![];
    for n in names.iter().rev() {
        let t = Instant::now();
        assert!(d.act(n, "switch").unwrap().foreground);
        switch_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let list: Vec<ProfileInfo> = d.client().call("GET", "/v1/profiles", None::<&()>).unwrap();
    assert_eq!(list.iter().filter(|p| p.foreground).count(), 1);
    let rss: Vec<u64> = list.iter().filter_map(|p| p.rss_kib).collect();
    assert_eq!(rss.len(), 8);
    switch_ms.sort_by(f64::total_cmp);
    loud(&format!(
        "MEASURE eight profiles: started in {start_ms} ms; switch median {:.2} ms max {:.2} ms; \
         vmm RSS KiB min {} max {}",
        switch_ms[4],
        switch_ms[7],
        rss.iter().min().unwrap(),
        rss.iter().max().unwrap()
    ));
    for n in &names {
        d.act(n, "stop").unwrap();
    }
    assert!(d.our_processes().is_empty());
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn fifty_cycles_leak_nothing() {
    if !can_run_vms("fifty_cycles_leak_nothing") {
        return;
    }
    let d = Daemon::start("leak");
    let cycle = |i: usize| {
        let name = format!("c{}", i % 3);
        d.create_probe(&name, 72, "");
        let p = d.act(&name, "start").unwrap();
        assert_eq!(p.state, ProfileState::Running, "cycle {i}");
        d.act(&name, "stop").unwrap();
        d.client()
            .call::<()>("DELETE", &format!("/v1/profiles/{name}"), None::<&()>)
            .unwrap();
    };
    cycle(0);
    // Settle: the last answer's connection may still be closing.
    std::thread::sleep(Duration::from_millis(100));
    let fds = fd_count(d.pid());
    let t0 = Instant::now();
    for i in 1..=50 {
        cycle(i);
    }
    let per_cycle = t0.elapsed().as_secs_f64() * 1000.0 / 50.0;
    assert!(d.our_processes().is_empty(), "leftover processes");
    assert!(
        wait_until(Duration::from_secs(2), || fd_count(d.pid()) <= fds),
        "daemon fds: {fds} before, {} after",
        fd_count(d.pid())
    );
    let profiles: Vec<_> = std::fs::read_dir(d.dir.join("profiles")).unwrap().collect();
    assert!(profiles.is_empty(), "leftover files: {profiles:?}");
    let jails: Vec<_> = std::fs::read_dir(d.dir.join("jail"))
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(jails.is_empty(), "leftover jail dirs: {jails:?}");
    for root in [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/memory",
    ] {
        let p = std::path::Path::new(root).join(&d.cgroup_parent);
        if let Ok(rd) = std::fs::read_dir(&p) {
            let groups: Vec<_> = rd.flatten().filter(|e| e.path().is_dir()).collect();
            assert!(
                groups.is_empty(),
                "leftover cgroups in {}: {groups:?}",
                p.display()
            );
        }
    }
    loud(&format!(
        "MEASURE leak test: {per_cycle:.1} ms per create/start/stop/delete cycle"
    ));
}

#[test]
fn jailed_profiles_run_switch_and_restart() {
    if !can_run_vms("jailed_profiles_run_switch_and_restart") {
        return;
    }
    let d = Daemon::start("jail");
    d.create_probe("ja", 80, "");
    d.create_probe("jb", 80, "");
    let a = d.act("ja", "start").unwrap();
    let b = d.act("jb", "start").unwrap();
    let pid = a.pid.unwrap();
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
    assert!(
        cmd.contains(" vmm ") && cmd.contains("--jail-id ja"),
        "{cmd}"
    );
    for n in ["ja", "jb"] {
        assert!(
            wait_until(Duration::from_secs(10), || last_counter(&d.serial(n))
                .is_some_and(|c| c >= 2)),
            "{n} does not count: {}",
            std::fs::read_to_string(d.dir.join(format!("profiles/{n}/run/vmm.log")))
                .unwrap_or_default()
        );
    }
    assert!(d.dir.join("jail/ja").is_dir());
    let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let kid = kids.split_whitespace().next().expect("no jailed child");
    // The jailed VMM sees its run directory (serial log, sockets) but not its own
    // configuration: vm.toml lives outside what the jail binds.
    let jail_run = std::path::PathBuf::from(format!("/proc/{kid}/root/run/0"));
    let seen: Vec<String> = std::fs::read_dir(&jail_run)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(seen.iter().any(|n| n == "serial.log"), "{seen:?}");
    assert!(!seen.iter().any(|n| n == "vm.toml"), "{seen:?}");
    // The jailed child (pid 1 of its namespace) is in the profile's cgroup too.
    if d.weight_file("ja").is_some() {
        let cg = std::fs::read_to_string(format!("/proc/{kid}/cgroup")).unwrap();
        assert!(cg.contains(&format!("{}/ja", d.cgroup_parent)), "{cg}");
    }
    // Suspend and resume a jailed profile: the restored VM is jailed too.
    let at = last_counter(&d.serial("jb")).unwrap();
    let s = d.act("jb", "suspend").unwrap();
    assert_eq!(s.state, ProfileState::Suspended);
    assert!(d.dir.join("profiles/jb/snapshot").is_dir());
    let r = d.act("jb", "resume").unwrap();
    assert_eq!(r.state, ProfileState::Running);
    let rpid = r.pid.unwrap();
    let cmd = std::fs::read(format!("/proc/{rpid}/cmdline")).unwrap();
    let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
    assert!(
        cmd.contains(" vmm --restore ") && cmd.contains("--jail-id jb"),
        "{cmd}"
    );
    assert!(wait_until(Duration::from_secs(10), || last_counter(
        &d.serial("jb")
    )
    .is_some_and(|c| c > at + 1)));
    let s = d.act("jb", "switch").unwrap();
    assert!(s.foreground && !d.show("ja").foreground);
    // A killed jailer is noticed and restarted; its jailed child died with it.
    // SAFETY: kill(2) on the test's own VMM process.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(10), || {
        let p = d.show("ja");
        p.state == ProfileState::Running && p.pid.is_some_and(|x| x != pid)
    }));
    assert_eq!(b.state, ProfileState::Running);
    assert_eq!(d.show("jb").state, ProfileState::Running);
    d.act("ja", "stop").unwrap();
    d.act("jb", "stop").unwrap();
    assert!(wait_until(Duration::from_secs(5), || d
        .our_processes()
        .is_empty()));
    let left: Vec<_> = std::fs::read_dir(d.dir.join("jail"))
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "jail dirs left: {left:?}");
}

#[test]
fn a_vmm_that_cannot_start_leaves_nothing_behind() {
    if !can_run_vms("a_vmm_that_cannot_start_leaves_nothing_behind") {
        return;
    }
    let d = Daemon::start("badkernel");
    std::fs::write(d.dir.join("assets/junk.elf"), b"this is not a kernel").unwrap();
    let text = "name = \"bad\"\nkernel = \"junk.elf\"\nmemory_mib = 80\n";
    let req = handset::CreateProfile {
        spec: Some(handset::ProfileSpec::from_toml(text).unwrap()),
        ..Default::default()
    };
    let _: ProfileInfo = d.client().call("POST", "/v1/profiles", Some(&req)).unwrap();
    match d.act("bad", "start") {
        Err(ClientError::Api {
            status: 500,
            message,
        }) => {
            assert!(message.contains("exited at start"), "{message}")
        }
        other => panic!("start of a junk kernel: {other:?}"),
    }
    let p = d.show("bad");
    assert_eq!((p.state, p.pid), (ProfileState::Stopped, None));
    assert!(d.our_processes().is_empty());
    assert!(!d.dir.join("profiles/bad/run/api.sock").exists());
    assert!(!d.dir.join("jail/bad").exists());
    // A missing kernel is refused at create, and at start (removed since) before anything
    // is spawned.
    let text = "name = \"gone\"\nkernel = \"vmlinux-missing\"\nmemory_mib = 80\n";
    let req = handset::CreateProfile {
        spec: Some(handset::ProfileSpec::from_toml(text).unwrap()),
        ..Default::default()
    };
    match d
        .client()
        .call::<ProfileInfo>("POST", "/v1/profiles", Some(&req))
    {
        Err(ClientError::Api {
            status: 400,
            message,
        }) => assert!(message.contains("does not exist"), "{message}"),
        other => panic!("create with a missing kernel: {other:?}"),
    }
    let missing = d.dir.join("assets/vmlinux-missing");
    std::fs::write(&missing, b"soon gone").unwrap();
    let _: ProfileInfo = d.client().call("POST", "/v1/profiles", Some(&req)).unwrap();
    std::fs::remove_file(&missing).unwrap();
    match d.act("gone", "start") {
        Err(ClientError::Api {
            status: 400,
            message,
        }) => {
            assert!(message.contains("does not exist"), "{message}")
        }
        other => panic!("start of a missing kernel: {other:?}"),
    }
}

/// A spec with a free host path, a name beginning with `-`: refused at create and audited.
/// Special files as kernel, initrd or disk: refused at start before anything waits on them.
/// The state directory and its database: owner only. (No VM is started: no KVM needed.)
#[test]
fn a_profile_reaches_only_its_own_files() {
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start("confine");
    let create = |spec: &str| {
        let req = serde_json::json!({ "spec": toml::from_str::<toml::Value>(spec).unwrap() });
        d.client()
            .call::<ProfileInfo>("POST", "/v1/profiles", Some(&req))
    };
    let refused = |spec: &str, needle: &str| match create(spec) {
        Err(ClientError::Api {
            status: 400,
            message,
        }) => assert!(message.contains(needle), "{spec}: {message}"),
        other => panic!("{spec}: accepted: {other:?}"),
    };
    // Another profile's disk, a host file, a relative escape: never a free path.
    std::fs::write(d.dir.join("assets/k.elf"), b"not a kernel").unwrap();
    refused(
        "name = \"w\"\nkernel = \"/etc/shadow\"\nmemory_mib = 80\n",
        "asset directory",
    );
    refused(
        "name = \"w\"\nkernel = \"k.elf\"\ninitrd = \"../profiles/work/disks/data.img\"\nmemory_mib = 80\n",
        "asset directory",
    );
    refused(
        "name = \"-w\"\nkernel = \"k.elf\"\nmemory_mib = 80\n",
        "not beginning with -",
    );
    let audit: Vec<handset::Event> = d
        .client()
        .call("GET", "/v1/audit?limit=100", None::<&()>)
        .unwrap();
    let refusals: Vec<_> = audit
        .iter()
        .filter(|e| e.event == "create-refused")
        .collect();
    assert_eq!(refusals.len(), 3, "{audit:#?}");
    assert!(refusals[0].detail.contains("/etc/shadow"), "{refusals:#?}");
    assert!(d.show_all_names().is_empty());

    // A FIFO as initrd (it would block a reader forever), a directory as kernel: refused
    // at create. Put there after create (and /dev/zero as a disk): refused at start.
    let fifo = d.dir.join("assets/fifo");
    let mkfifo = || {
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    };
    let f_spec = "name = \"f\"\nkernel = \"k.elf\"\ninitrd = \"fifo\"\nmemory_mib = 80\n";
    let dir_spec = "name = \"dir\"\nkernel = \"dir\"\nmemory_mib = 80\n";
    mkfifo();
    std::fs::create_dir(d.dir.join("assets/dir")).unwrap();
    refused(f_spec, "is a FIFO");
    refused(dir_spec, "is a directory");
    std::fs::remove_file(&fifo).unwrap();
    std::fs::remove_dir(d.dir.join("assets/dir")).unwrap();
    std::fs::write(&fifo, b"initrd").unwrap();
    std::fs::write(d.dir.join("assets/dir"), b"kernel").unwrap();
    create(f_spec).unwrap();
    create(dir_spec).unwrap();
    std::fs::remove_file(&fifo).unwrap();
    mkfifo();
    std::fs::remove_file(d.dir.join("assets/dir")).unwrap();
    std::fs::create_dir(d.dir.join("assets/dir")).unwrap();
    create(
        "name = \"z\"\nkernel = \"k.elf\"\nmemory_mib = 80\ndisks = [{name = \"data\", size_mib = 1}]\n",
    )
    .unwrap();
    let disk = d.dir.join("profiles/z/disks/data.img");
    std::fs::remove_file(&disk).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &disk).unwrap();
    for (name, needle) in [
        ("f", "initrd"),
        ("f", "is a FIFO"),
        ("z", "is a device"),
        ("dir", "is a directory"),
    ] {
        let t0 = Instant::now();
        match d.act(name, "start") {
            Err(ClientError::Api {
                status: 400,
                message,
            }) => assert!(message.contains(needle), "{name}: {message}"),
            other => panic!("start of {name}: {other:?}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert_eq!(d.show(name).state, ProfileState::Stopped);
    }
    assert!(d.our_processes().is_empty());

    // Owner only: the state directory, the database, the audit key.
    for (file, mode) in [("", 0o700), ("handset.db", 0o600), ("audit.key", 0o600)] {
        let m = std::fs::metadata(d.dir.join(file))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(m, mode, "{file}: {m:o}");
    }
}

#[test]
fn a_clean_daemon_stop_suspends_or_stops_per_profile_and_autostart_brings_them_back() {
    if !can_run_vms(
        "a_clean_daemon_stop_suspends_or_stops_per_profile_and_autostart_brings_them_back",
    ) {
        return;
    }
    let mut d = Daemon::start("shutdown");
    // keep: suspended at shutdown and started again with the daemon; plain: the default
    // (stop); tmpl: a template (suspend at shutdown, no autostart).
    d.create_probe("keep", 80, "on_shutdown = \"suspend\"\nautostart = true\n");
    d.create_probe("plain", 80, "");
    let out = d.cli(&["create", "tmpl", "--template", "work"]);
    assert!(out.status.success());
    for n in ["keep", "plain", "tmpl"] {
        d.act(n, "start").unwrap();
    }
    assert!(wait_until(Duration::from_secs(10), || last_counter(
        &d.serial("keep")
    )
    .is_some_and(|n| n >= 3)));
    let status = d.terminate();
    assert!(status.success(), "{status:?}\n{}", d.log());
    let at = last_counter(&d.serial("keep")).unwrap();
    assert!(d.our_processes().is_empty(), "a VMM outlived the daemon");
    assert!(d.dir.join("profiles/keep/snapshot").is_dir());
    assert!(d.dir.join("profiles/tmpl/snapshot").is_dir());
    assert!(!d.dir.join("profiles/plain/snapshot").exists());

    d.spawn();
    assert_eq!(d.show("keep").state, ProfileState::Running);
    assert_eq!(d.show("tmpl").state, ProfileState::Suspended);
    assert_eq!(d.show("plain").state, ProfileState::Stopped);
    let ev = d.events("keep");
    assert!(
        ev.ends_with(&["suspended".into(), "resumed".into(), "autostarted".into()]),
        "{ev:?}"
    );
    // The guest went on from where the daemon stopped it, not from 0.
    assert!(wait_until(Duration::from_secs(10), || last_counter(
        &d.serial("keep")
    )
    .is_some_and(|n| n > at + 2)));
}

/// A flipped byte in any snapshot file: resume refuses with a clear error, the profile stays
/// suspended with its snapshot untouched; once the byte is back, resume continues the guest.
#[test]
fn a_damaged_snapshot_is_refused_and_kept() {
    use std::os::unix::fs::FileExt;
    if !can_run_vms("a_damaged_snapshot_is_refused_and_kept") {
        return;
    }
    let d = Daemon::start("damaged");
    d.create_probe("s", 80, "");
    d.act("s", "start").unwrap();
    assert!(wait_until(Duration::from_secs(10), || last_counter(
        &d.serial("s")
    )
    .is_some_and(|n| n >= 3)));
    d.act("s", "suspend").unwrap();
    let at = last_counter(&d.serial("s")).unwrap();
    let snap = d.dir.join("profiles/s/snapshot");
    for (file, needle) in [
        ("memory.bin", "memory.bin is damaged"),
        ("state.bin", "state.bin"),
        ("config.json", "config.json is damaged"),
        ("COMPLETE", "COMPLETE is damaged"),
    ] {
        let path = snap.join(file);
        let good = std::fs::read(&path).unwrap();
        // The first non-zero byte (memory.bin is mostly holes), else the middle one.
        let at_byte = good
            .iter()
            .position(|&b| b != 0)
            .filter(|_| file == "memory.bin")
            .unwrap_or(good.len() / 2);
        let mut bad = good.clone();
        bad[at_byte] ^= 0x01;
        // In place (rewriting memory.bin whole would fill its holes).
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.write_all_at(&bad[at_byte..=at_byte], at_byte as u64)
            .unwrap();
        match d.act("s", "resume") {
            Err(ClientError::Api { message, .. }) => {
                assert!(message.contains(needle), "{file}: {message}")
            }
            other => panic!("resume with a damaged {file}: {other:?}"),
        }
        let p = d.show("s");
        assert_eq!((p.state, p.pid), (ProfileState::Suspended, None), "{file}");
        assert_eq!(std::fs::read(&path).unwrap(), bad, "{file} was changed");
        assert!(d.our_processes().is_empty());
        f.write_all_at(&good[at_byte..=at_byte], at_byte as u64)
            .unwrap();
    }
    assert_eq!(d.act("s", "resume").unwrap().state, ProfileState::Running);
    assert!(!snap.exists());
    assert!(wait_until(Duration::from_secs(10), || last_counter(
        &d.serial("s")
    )
    .is_some_and(|n| n > at + 2)));
}

/// A jailed VMM runs as its profile's own unprivileged uid: from inside the jail (a self-test
/// the VMM runs once its privileges are gone) no root-owned file it can see is writable,
/// neither its kernel, disk, device nodes nor the jail's root; only its run directory is.
/// Its configuration (`vm.toml`) is not in its view at all, and two profiles differ in uid.
#[test]
fn a_jailed_vmm_runs_as_its_own_uid_and_cannot_write_root_files() {
    if !can_run_vms("a_jailed_vmm_runs_as_its_own_uid_and_cannot_write_root_files") {
        return;
    }
    // Jail paths: its root, kernel, disk, /dev/kvm, the serial log the jailer opened as
    // root, where vm.toml would be, and its own run directory.
    let paths = [
        "/",
        "/boot/kernel",
        "/disks/0",
        "/dev/kvm",
        "/run",
        "/run/0/serial.log",
        "/run/0/vm.toml",
        "/run/0",
    ];
    let env = format!("write:{}", paths.join(":"));
    let d = Daemon::start_env("uid", &[("POCKETVISOR_JAIL_SELFTEST", env.as_str())]);
    d.create_probe("ua", 80, "");
    d.create_probe("ub", 80, "");
    let mut uids = Vec::new();
    for n in ["ua", "ub"] {
        let p = d.act(n, "start").unwrap();
        assert!(wait_until(Duration::from_secs(10), || last_counter(
            &d.serial(n)
        )
        .is_some_and(|c| c >= 2)));
        let pid = p.pid.unwrap();
        let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
        let kid = kids.split_whitespace().next().expect("no jailed child");
        let status = std::fs::read_to_string(format!("/proc/{kid}/status")).unwrap();
        let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        let ids: Vec<u32> = uid_line
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap())
            .collect();
        let want = handset::vmm_proc::jail_uid(p.vsock_cid).unwrap();
        assert_eq!(ids, [want; 4], "{n}: real, effective, saved, fs uid");
        uids.push(want);
        // The run directory is the VMM's, nothing else of the profile is.
        use std::os::unix::fs::MetadataExt;
        let run = std::fs::metadata(d.dir.join(format!("profiles/{n}/run"))).unwrap();
        assert_eq!((run.uid(), run.mode() & 0o777), (want, 0o700));
        for f in ["profile.toml", "vm.toml", "disks/data.img"] {
            let m = std::fs::metadata(d.dir.join(format!("profiles/{n}/{f}"))).unwrap();
            assert_eq!(m.uid(), 0, "{f}");
        }
        let log = std::fs::read_to_string(d.dir.join(format!("profiles/{n}/run/vmm.log")))
            .unwrap_or_default();
        for path in paths {
            let line = log
                .lines()
                .find(|l| l.contains(&format!("jail-selftest write {path}:")))
                .unwrap_or_else(|| panic!("{n}: no self-test line for {path}: {log}"));
            if path == "/run/0" {
                assert!(line.ends_with(": written"), "{line}");
            } else {
                // EACCES (not its file), EROFS (read-only mount), ENOENT (not there).
                let refused = ["errno=13 ", "errno=30 ", "errno=2 "]
                    .iter()
                    .any(|e| line.contains(e));
                assert!(refused, "{n} can write {path}: {line}");
            }
            loud(&format!("MEASURE {n} (uid {want}): {line}"));
        }
    }
    assert_ne!(uids[0], uids[1], "two profiles share a uid");
    // A suspend (written by the VMM into its run directory) and resume work as that uid.
    assert_eq!(
        d.act("ua", "suspend").unwrap().state,
        ProfileState::Suspended
    );
    assert_eq!(d.act("ua", "resume").unwrap().state, ProfileState::Running);
    for n in ["ua", "ub"] {
        d.act(n, "stop").unwrap();
    }
}

/// The audit records of `profile` as "action: detail" lines.
fn audit_of(d: &Daemon, profile: &str) -> Vec<String> {
    let list: Vec<handset::Event> = d
        .client()
        .call("GET", "/v1/audit?limit=1000", None::<&()>)
        .unwrap();
    list.into_iter()
        .filter(|e| e.profile == profile)
        .map(|e| format!("{}: {}", e.event, e.detail))
        .collect()
}

/// Refused starts are audited (a special file as kernel, a name that is no profile name);
/// a spec from before guest assets were confined (a host path as kernel) is listed with what
/// to do, refused at start with that message, and rewritten to the asset's file name by the
/// next daemon once the administrator put the file in the asset directory.
#[test]
fn refused_starts_are_audited_and_old_specs_are_migrated() {
    let mut d = Daemon::start("refused");
    // A FIFO as the kernel (put there after create, which refuses one): refused before
    // anything waits on it, audited.
    let fifo = d.dir.join("assets/fifo.elf");
    std::fs::write(&fifo, b"a kernel, for now").unwrap();
    let req = handset::CreateProfile {
        spec: Some(
            handset::ProfileSpec::from_toml(
                "name = \"ff\"\nkernel = \"fifo.elf\"\nmemory_mib = 64\n",
            )
            .unwrap(),
        ),
        ..Default::default()
    };
    let _: ProfileInfo = d.client().call("POST", "/v1/profiles", Some(&req)).unwrap();
    std::fs::remove_file(&fifo).unwrap();
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = d.act("ff", "start").unwrap_err().to_string();
    assert!(e.contains("regular file") || e.contains("FIFO"), "{e}");
    let audit = audit_of(&d, "ff");
    assert!(
        audit
            .iter()
            .any(|a| a.starts_with("start-refused: ") && a.contains("kernel")),
        "{audit:?}"
    );
    // A name that is no profile name is recorded under "-", escaped.
    let _ = d
        .client()
        .raw("POST", "/v1/profiles/-x/start", None)
        .unwrap();
    let anon = audit_of(&d, "-");
    assert!(
        anon.iter()
            .any(|a| a.starts_with("start: name \"-x\"") && a.contains("error")),
        "{anon:?}"
    );
    assert!(audit_of(&d, "-x").is_empty());

    // An old spec: kernel by a host path.
    d.create_probe("old", 64, "");
    let outside = d.dir.join("legacy-vmlinux.elf");
    std::fs::write(&outside, b"whatever").unwrap();
    let spec = d.dir.join("profiles/old/profile.toml");
    let text = std::fs::read_to_string(&spec).unwrap().replace(
        "kernel = \"probe\"",
        &format!("kernel = {:?}", outside.to_str().unwrap()),
    );
    assert!(text.contains("legacy-vmlinux.elf"), "{text}");
    std::fs::write(&spec, &text).unwrap();
    // Listed (the whole list does not fail), saying what to do.
    let list: Vec<ProfileInfo> = d.client().call("GET", "/v1/profiles", None::<&()>).unwrap();
    let old = list
        .iter()
        .find(|p| p.name == "old")
        .expect("old is listed");
    assert!(
        old.detail.contains("assets/legacy-vmlinux.elf"),
        "{}",
        old.detail
    );
    let e = d.act("old", "start").unwrap_err().to_string();
    assert!(
        e.contains("copy") && e.contains("restart the handset daemon"),
        "{e}"
    );
    assert!(audit_of(&d, "old")
        .iter()
        .any(|a| a.starts_with("start-refused: ")));
    // The next daemon leaves it alone while the asset is missing (it never copies a host
    // path itself) ...
    d.kill9();
    d.spawn();
    assert_eq!(std::fs::read_to_string(&spec).unwrap(), text);
    // ... and rewrites it once the administrator put the file in the asset directory.
    std::fs::copy(&outside, d.dir.join("assets/legacy-vmlinux.elf")).unwrap();
    d.kill9();
    d.spawn();
    assert_eq!(d.show("old").spec.kernel, "legacy-vmlinux.elf");
    assert!(d.events("old").iter().any(|e| e == "spec-migrated"));
    assert!(audit_of(&d, "old")
        .iter()
        .any(|a| a.starts_with("spec-migrated: kernel /")));
}

/// Lines a child writes on stdout, read on a thread (for waiting with a timeout).
fn lines_of(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits until a line satisfying `f` arrives; false after `timeout`.
fn wait_line(
    rx: &std::sync::mpsc::Receiver<String>,
    timeout: Duration,
    f: impl Fn(&str) -> bool,
) -> bool {
    let t0 = Instant::now();
    while let Some(left) = timeout.checked_sub(t0.elapsed()) {
        match rx.recv_timeout(left) {
            Ok(l) if f(&l) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

#[test]
fn logs_and_events_can_be_read_and_followed() {
    if !can_run_vms("logs_and_events_can_be_read_and_followed") {
        return;
    }
    let d = Daemon::start("follow");
    d.create_probe("l", 64, "");
    // Nothing has run yet: no log, said with the not-found status.
    assert_eq!(d.cli(&["logs", "l"]).status.code(), Some(3));
    d.act("l", "start").unwrap();
    assert!(wait_until(Duration::from_secs(10), || last_counter(
        &d.serial("l")
    )
    .is_some_and(|n| n >= 2)));
    let out = d.cli(&["logs", "l"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("PROBE counter 1"));
    assert!(d.cli(&["logs", "l", "--vmm"]).status.success());

    let spawn = |args: &[&str]| {
        std::process::Command::new(common::pv_bin())
            .args(["profile", "--state-dir"])
            .arg(&d.dir)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Events, followed as JSON lines: the stop shows up.
    let mut ev = spawn(&["events", "l", "--follow", "--json"]);
    let ev_lines = lines_of(&mut ev);
    assert!(wait_line(&ev_lines, Duration::from_secs(10), |l| l
        .contains("\"started\"")));
    d.act("l", "stop").unwrap();
    assert!(wait_line(&ev_lines, Duration::from_secs(10), |l| {
        serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| v["event"] == "stopped")
    }));
    let _ = ev.kill();
    let _ = ev.wait();

    // The serial log, followed across a restart: the new run's first line arrives too.
    let mut logs = spawn(&["logs", "l", "-f"]);
    let log_lines = lines_of(&mut logs);
    assert!(wait_line(&log_lines, Duration::from_secs(10), |l| l
        .starts_with("PROBE counter 0")));
    d.act("l", "start").unwrap();
    assert!(
        wait_line(&log_lines, Duration::from_secs(20), |l| l
            .starts_with("PROBE counter 0")),
        "the restarted guest's log was not followed"
    );
    let _ = logs.kill();
    let _ = logs.wait();
    // The first run's log is kept as the previous one.
    let prev = d.cli(&["logs", "l", "--previous"]);
    assert!(String::from_utf8_lossy(&prev.stdout).contains("PROBE counter 1"));
}

/// `profile set`: checked whole (all or nothing), applied when the VMM next starts, refused
/// for the machine's shape while a saved guest exists.
#[test]
fn profile_set_changes_settings_all_or_nothing_for_the_next_start() {
    let d = Daemon::start("set");
    d.create_probe("s", 64, "");
    // A channel peer must be a profile (or the host), and not the profile itself.
    for (peer, why) in [
        ("[\"other\"]", "names other, which is no profile"),
        ("[\"s\"]", "names s itself"),
    ] {
        let out = d.cli(&["set", "s", &format!("channels.files_to={peer}")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(why), "{err}");
    }
    let text = "name = \"t\"\nkernel = \"probe\"\nmemory_mib = 64\n[channels]\nclipboard_to = [\"ghost\"]\n";
    let req = handset::CreateProfile {
        spec: Some(handset::ProfileSpec::from_toml(text).unwrap()),
        ..Default::default()
    };
    let e = d
        .client()
        .call::<ProfileInfo>("POST", "/v1/profiles", Some(&req))
        .unwrap_err();
    assert!(
        matches!(e, ClientError::Api { status: 400, .. })
            && e.to_string()
                .contains("clipboard_to names ghost, which is no profile"),
        "{e}"
    );
    d.create_probe("other", 64, "");
    let out = d.cli(&[
        "set",
        "s",
        "memory_mib=96",
        "vcpus=2",
        "autostart=true",
        "cpu.foreground=300",
        "channels.clipboard_to=[\"other\"]",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("s: changed memory_mib=96"), "{out:?}");
    let spec = d.show("s").spec;
    assert_eq!((spec.memory_mib, spec.vcpus, spec.autostart), (96, 2, true));
    assert_eq!(spec.cpu.foreground, 300);
    assert_eq!(spec.channels.clipboard_to, ["other"]);
    let toml = std::fs::read_to_string(d.dir.join("profiles/s/profile.toml")).unwrap();
    assert!(toml.contains("memory_mib = 96"), "{toml}");

    // One bad value refuses the whole change: the good one beside it is not applied.
    for bad in [
        &["autostart=false", "memory_mib=1"][..],
        &["autostart=false", "name=t"],
        &["autostart=false", "disks=[]"],
        &["autostart=false", "vcpus=lots"],
        &["autostart=false", "cpu.nonsense=1"],
    ] {
        let mut args = vec!["set", "s"];
        args.extend_from_slice(bad);
        let out = d.cli(&args);
        assert_eq!(out.status.code(), Some(1), "{bad:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("pocketvisor: error:"), "{err}");
        assert!(d.show("s").spec.autostart, "{bad:?} changed autostart");
    }
    let out = d.cli(&["set", "nope", "autostart=true"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(d.events("s").iter().any(|e| e.contains("changed")));

    if !can_run_vms("profile_set_changes_settings_all_or_nothing_for_the_next_start (VM part)") {
        return;
    }
    d.act("s", "start").unwrap();
    let vm = std::fs::read_to_string(d.dir.join("profiles/s/vm.toml")).unwrap();
    assert!(
        vm.contains("memory_mib = 96") && vm.contains("vcpus = 2"),
        "{vm}"
    );
    assert!(wait_until(Duration::from_secs(60), || d
        .serial("s")
        .contains("PROBE counter 1")));
    d.act("s", "suspend").unwrap();
    let out = d.cli(&["set", "s", "memory_mib=128"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("suspended") && err.contains("memory_mib"),
        "{err}"
    );
    // Policy keys may change while suspended.
    let out = d.cli(&["set", "s", "on_shutdown=stop"]);
    assert!(out.status.success(), "{out:?}");
    d.act("s", "resume").unwrap();
    d.act("s", "stop").unwrap();
}

/// `profile pause` / `unpause`: the guest stops counting with its VMM and memory kept, stays
/// paused when switched to, refuses transfers and unpause-less operations say why; `list`
/// shows `paused` with the detail `user`; events record both.
#[test]
fn pause_keeps_the_guest_in_memory_until_unpause() {
    if !can_run_vms("pause_keeps_the_guest_in_memory_until_unpause") {
        return;
    }
    let d = Daemon::start("pause");
    d.create_probe("work", 64, "");
    d.create_probe("home", 64, "");
    let before = d.act("work", "start").unwrap();
    d.act("home", "start").unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || last_counter(&d.serial("work"))
            .is_some_and(|n| n >= 3)),
        "work does not count: {}",
        d.serial("work")
    );
    let out = d.cli(&["pause", "work"]);
    let said = stdout(&out);
    assert!(said.starts_with("work: paused"), "{said}");
    let p = d.show("work");
    assert_eq!((p.state, p.detail.as_str()), (ProfileState::Paused, "user"));
    assert_eq!(p.pid, before.pid, "the same VMM keeps the guest");
    // Paused: the counter does not move (20 ms ticks), also after a switch to it. (What the
    // guest printed before the pause may still be on its way to the log: let it land.)
    std::thread::sleep(Duration::from_millis(300));
    let frozen = last_counter(&d.serial("work"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(last_counter(&d.serial("work")), frozen);
    d.act("home", "switch").unwrap();
    d.act("work", "switch").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(last_counter(&d.serial("work")), frozen);
    assert_eq!(d.show("work").state, ProfileState::Paused);
    let table = stdout(&d.cli(&["list"]));
    let row = table.lines().find(|l| l.starts_with("work ")).unwrap();
    assert!(row.contains("paused") && row.ends_with("user"), "{table}");
    // What does not apply says why.
    let e = d.act("work", "pause").unwrap_err().to_string();
    assert!(e.contains("already paused"), "{e}");
    let e = d.act("home", "unpause").unwrap_err().to_string();
    assert!(e.contains("running, not paused"), "{e}");
    let e = d.act("work", "resume").unwrap_err().to_string();
    assert!(e.contains("not suspended: unpause it"), "{e}");
    let out = d.cli(&["clipboard", "set", "work", "x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("profile unpause work"), "{err}");

    let said = stdout(&d.cli(&["unpause", "work"]));
    assert!(said.starts_with("work: running"), "{said}");
    let f = frozen.unwrap_or(0);
    assert!(
        wait_until(Duration::from_secs(20), || last_counter(&d.serial("work"))
            .is_some_and(|n| n > f)),
        "work does not count again: {}",
        d.serial("work")
    );
    assert_eq!(d.show("work").pid, before.pid);
    let events = d.events("work");
    let i = events
        .iter()
        .position(|e| e == "paused")
        .expect("paused event");
    assert!(events[i..].iter().any(|e| e == "unpaused"), "{events:?}");
    // A stopped profile cannot be paused.
    d.act("home", "stop").unwrap();
    let e = d.act("home", "pause").unwrap_err().to_string();
    assert!(e.contains("stopped, not running"), "{e}");
}

/// A firmware profile from a template: its `system` disk is a sparse copy of the disk image
/// asset with the image's SHA-256 recorded, its firmware and image are confined guest assets
/// checked at create. (No VM is started: no KVM needed.)
#[test]
fn a_firmware_template_profile_starts_with_a_copy_of_its_disk_image() {
    use std::os::unix::fs::MetadataExt;
    let d = Daemon::start("firmware");
    let assets = d.dir.join("assets");
    std::fs::write(assets.join("bios.bin"), vec![0xf4u8; 128 << 10]).unwrap();
    // A disk image: an MBR, 3 MiB of nothing, a tail; 4 MiB + 3 bytes.
    let mut image = vec![0u8; (4 << 20) + 3];
    image[510..512].copy_from_slice(&[0x55, 0xaa]);
    image[4 << 20..].copy_from_slice(b"end");
    std::fs::write(assets.join("debian.raw"), &image).unwrap();

    let out = stdout(&d.cli(&[
        "create",
        "fw",
        "--template",
        "work",
        "--firmware",
        "bios.bin",
        "--disk-image",
        "debian.raw",
    ]));
    assert!(
        out.contains("created profile fw (firmware bios.bin)"),
        "{out}"
    );
    let p = d.show("fw");
    assert_eq!(p.spec.firmware.as_deref(), Some("bios.bin"));
    assert!(p.spec.kernel.is_empty() && p.spec.cmdline.is_empty());
    let system = &p.spec.disks[0];
    assert_eq!((system.name.as_str(), system.size_mib), ("system", 5));
    let sha = std::process::Command::new("sha256sum")
        .arg(assets.join("debian.raw"))
        .output()
        .unwrap();
    let sha = String::from_utf8_lossy(&sha.stdout);
    assert_eq!(
        system.image_sha256.as_deref(),
        sha.split_whitespace().next()
    );
    let disk_path = d.dir.join("profiles/fw/disks/system.img");
    let disk = std::fs::read(&disk_path).unwrap();
    assert_eq!(disk.len(), 5 << 20);
    assert!(disk[..image.len()] == image[..] && disk[image.len()..].iter().all(|&b| b == 0));
    let blocks = std::fs::metadata(&disk_path).unwrap().blocks();
    assert!(
        blocks * 512 <= 1 << 20,
        "the copy is not sparse: {blocks} blocks"
    );
    // The profile.toml on disk says the same (what start and a policy check read).
    let text = std::fs::read_to_string(d.dir.join("profiles/fw/profile.toml")).unwrap();
    assert!(
        text.contains("firmware = \"bios.bin\"") && !text.contains("kernel"),
        "{text}"
    );

    // Missing firmware or image, a path, a kernel too: refused, nothing made.
    for (args, needle) in [
        (
            &["--firmware", "nothing.bin", "--disk-image", "debian.raw"][..],
            "does not exist",
        ),
        (
            &["--firmware", "bios.bin", "--disk-image", "missing.raw"][..],
            "does not exist",
        ),
        (
            &[
                "--firmware",
                "/usr/share/seabios/bios.bin",
                "--disk-image",
                "debian.raw",
            ][..],
            "asset directory",
        ),
        (&["--firmware", "bios.bin"][..], "--disk-image"),
        (
            &[
                "--firmware",
                "bios.bin",
                "--disk-image",
                "debian.raw",
                "--kernel",
                "k",
            ][..],
            "cannot be used with",
        ),
    ] {
        let mut all = vec!["create", "bad", "--template", "work"];
        all.extend_from_slice(args);
        let o = d.cli(&all);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains(needle),
            "{args:?}: {err}"
        );
    }
    assert!(!d.dir.join("profiles/bad").exists());
    assert_eq!(d.show_all_names(), ["fw"]);
}

/// Whatever replaced a profile's files after create (a directory or a device as its initrd;
/// a FIFO or a device as its disk) is refused at start before anything waits on it, with an
/// error naming the file, audited, and no VMM left; a suspended profile whose spec was edited
/// to name a host path, or whose disk became a FIFO, is refused at resume (audited) and stays
/// suspended with its snapshot.
#[test]
fn special_files_and_host_paths_are_refused_at_every_start_and_resume() {
    if !can_run_vms("special_files_and_host_paths_are_refused_at_every_start_and_resume") {
        return;
    }
    let d = Daemon::start("special");
    let initrd = d.dir.join("assets/i.img");
    std::fs::write(&initrd, b"an initrd, for now").unwrap();
    let req = handset::CreateProfile {
        spec: Some(
            handset::ProfileSpec::from_toml(
                "name = \"s\"\nkernel = \"probe\"\ninitrd = \"i.img\"\n\
                 cmdline = \"pv.mode=counter pv.counter.ms=20\"\nmemory_mib = 64\n\
                 disks = [{ name = \"data\", size_mib = 8 }]\n",
            )
            .unwrap(),
        ),
        ..Default::default()
    };
    let _: ProfileInfo = d.client().call("POST", "/v1/profiles", Some(&req)).unwrap();
    let disk = d.dir.join("profiles/s/disks/data.img");
    let saved_disk = d.dir.join("data.img.saved");
    std::fs::rename(&disk, &saved_disk).unwrap();
    std::fs::rename(&initrd, d.dir.join("i.img.saved")).unwrap();
    let mknod = |path: &Path, mode: libc::mode_t, dev: libc::dev_t| {
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: mknod(2) with a NUL-terminated path.
        assert_eq!(unsafe { libc::mknod(c.as_ptr(), mode, dev) }, 0, "{path:?}");
    };
    let zero = libc::makedev(1, 5); // What /dev/zero is.
    type Make = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, &Path, Make)> = vec![
        (
            "initrd",
            &initrd,
            Box::new(|p: &Path| std::fs::create_dir(p).unwrap()),
        ),
        (
            "initrd",
            &initrd,
            Box::new(move |p: &Path| mknod(p, libc::S_IFCHR | 0o600, zero)),
        ),
        (
            "disk",
            &disk,
            Box::new(move |p: &Path| mknod(p, libc::S_IFIFO | 0o600, 0)),
        ),
        (
            "disk",
            &disk,
            Box::new(move |p: &Path| mknod(p, libc::S_IFCHR | 0o600, zero)),
        ),
    ];
    let mut refused = 0;
    for (what, path, make) in &cases {
        // The other file is a good one, so the refusal is this one's.
        let (other, other_saved) = if *what == "disk" {
            (initrd.clone(), d.dir.join("i.img.saved"))
        } else {
            (disk.clone(), saved_disk.clone())
        };
        std::fs::copy(&other_saved, &other).unwrap();
        make(path);
        let t0 = Instant::now();
        let e = d.act("s", "start").unwrap_err().to_string();
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{what}: took {:?}",
            t0.elapsed()
        );
        assert!(
            e.contains(what) && e.contains(path.to_str().unwrap()),
            "{e}"
        );
        refused += 1;
        let audit = audit_of(&d, "s");
        assert_eq!(
            audit
                .iter()
                .filter(|a| a.starts_with("start-refused: "))
                .count(),
            refused,
            "{audit:?}"
        );
        assert!(d.our_processes().is_empty(), "{what}: a VMM was spawned");
        assert_ne!(d.show("s").state, ProfileState::Running);
        let meta = std::fs::symlink_metadata(path).unwrap();
        if meta.is_dir() {
            std::fs::remove_dir(path).unwrap();
        } else {
            std::fs::remove_file(path).unwrap();
        }
        std::fs::remove_file(&other).unwrap();
    }
    loud(&format!(
        "MEASURE special files refused at start: {refused} (directory and device as initrd, \
         FIFO and device as disk)"
    ));
    // With good files again, it starts; then the resume checks.
    std::fs::rename(&saved_disk, &disk).unwrap();
    std::fs::rename(d.dir.join("i.img.saved"), &initrd).unwrap();
    assert_eq!(d.act("s", "start").unwrap().state, ProfileState::Running);
    assert_eq!(
        d.act("s", "suspend").unwrap().state,
        ProfileState::Suspended
    );
    let spec = d.dir.join("profiles/s/profile.toml");
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(&spec, text.replace("\"i.img\"", "\"/etc/passwd\"")).unwrap();
    let e = d.act("s", "resume").unwrap_err().to_string();
    assert!(e.contains("/etc/passwd"), "{e}");
    std::fs::write(&spec, &text).unwrap();
    std::fs::rename(&disk, &saved_disk).unwrap();
    mknod(&disk, libc::S_IFIFO | 0o600, 0);
    let t0 = Instant::now();
    let e = d.act("s", "resume").unwrap_err().to_string();
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert!(e.contains("disk"), "{e}");
    let audit = audit_of(&d, "s");
    assert_eq!(
        audit
            .iter()
            .filter(|a| a.starts_with("resume-refused: "))
            .count(),
        2,
        "{audit:?}"
    );
    assert_eq!(d.show("s").state, ProfileState::Suspended);
    assert!(d.dir.join("profiles/s/snapshot/COMPLETE").is_file());
    std::fs::remove_file(&disk).unwrap();
    std::fs::rename(&saved_disk, &disk).unwrap();
    assert_eq!(d.act("s", "resume").unwrap().state, ProfileState::Running);
    assert_eq!(d.act("s", "stop").unwrap().state, ProfileState::Stopped);
}
