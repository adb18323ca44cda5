//! The handset's `profile offload` and `profile return` (issue 13) against a real cloud host
//! (`pocketvisor cloud serve`) on loopback: the probe guest writing its disk (blk-counter)
//! counts on at the host and back on the device, never going back; its disk is, byte for
//! byte, every block it wrote; an offloaded profile is refused what would run it here; an
//! offload that cannot reach its host leaves it running here; a daemon restart keeps it
//! offloaded. `profile clone`: a copy runs at the host with a vsock CID of its own, which the
//! guest sees, while the original runs on; only its device reaches it, and it does not
//! return. `profile file from-clone` and `to-clone`: a file in the clone's agent inbox comes
//! into the original's, and one of the original's goes into the clone's, under the
//! original's channel rules and audit.
//!
//! Skipped (with a SKIP line on stderr) where /dev/kvm is missing or the probe cannot be built.

mod cloud_common;
mod common;
mod portable_common;

use std::path::Path;
use std::time::Duration;

use cloud_common::{assert_disk_after_writes, blk_counters, CloudHost};
use portable_common::{assert_ok, probe, run, Daemon, Scratch};

const WAIT: Duration = Duration::from_secs(60);
const DISK_MIB: usize = 4;

/// A `pocketvisor cloud return` or `pocketvisor vmm --return-twin` process serving `api`
/// (the return's VMM, unjailed or jailed), if one runs.
fn returning_vmm(api: &Path) -> Option<u32> {
    let want = api.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let returning = args.contains(&&b"return"[..]) || args.contains(&&b"--return-twin"[..]);
        (returning && args.contains(&want)).then_some(pid)
    })
}

/// The last 1,000 bytes of `text` (a log in an assertion's message).
fn tail(text: &str) -> &str {
    let mut at = text.len().saturating_sub(1000);
    while !text.is_char_boundary(at) {
        at += 1;
    }
    &text[at..]
}

fn blk_last(path: &Path) -> u64 {
    blk_counters(&common::read(path))
        .last()
        .copied()
        .unwrap_or(0)
}

fn profile(dir: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["profile", "--state-dir", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    run(&all, &[])
}

fn said(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn info(dir: &Path) -> serde_json::Value {
    let out = profile(dir, &["show", "work", "--json"]);
    assert_ok(&out, "profile show");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The spec of `work` running the probe writing its disk (blk-counter).
fn blk_counter_spec() -> String {
    format!(
        "name = \"work\"\nkernel = \"probe\"\n\
         cmdline = \"pv.mode=blk-counter pv.counter.ms=20\"\nmemory_mib = 64\n\
         disks = [{{name = \"data\", size_mib = {DISK_MIB}}}]\n"
    )
}

/// A daemon (with `flags`) on a new state directory in `s` and its profile `work` created
/// from `spec` and started, once its serial log says `ready`; the serial log.
fn running(
    s: &Scratch,
    probe: &Path,
    flags: &[&str],
    spec: &str,
    ready: &str,
) -> (Daemon, std::path::PathBuf) {
    let dir = s.path("state");
    let daemon = Daemon::start_with(&dir, Some(probe), &[], flags);
    let file = s.path("work.toml");
    std::fs::write(&file, spec).unwrap();
    daemon.profile(&["create", "--file", file.to_str().unwrap()]);
    daemon.profile(&["start", "work"]);
    let serial = dir.join("profiles/work/run/serial.log");
    assert!(
        common::wait_for(&serial, ready, WAIT),
        "the guest did not say {ready:?}: {}",
        common::read(&serial)
    );
    (daemon, serial)
}

/// [`running`] `work` writing its disk, the daemon with the identity of the device `phone`.
fn device(
    host: &CloudHost,
    s: &Scratch,
    probe: &Path,
    flags: &[&str],
) -> (Daemon, std::path::PathBuf) {
    let r = running(
        s,
        probe,
        flags,
        &blk_counter_spec(),
        "PROBE blk-counter 3\n",
    );
    host.give_identity(&s.path("state"), "phone");
    r
}

/// The serial log of the host's one twin, which must be `work`'s.
fn only_twin_log(host: &CloudHost) -> std::path::PathBuf {
    let twins = host.twin_dirs();
    assert_eq!(twins.len(), 1, "{twins:?}");
    assert!(twins[0].ends_with("/work"), "{twins:?}");
    host.state()
        .join("twins")
        .join(&twins[0])
        .join("serial.log")
}

/// The twin writes on at the host from the block after `at_switch`, the device's last.
fn assert_twin_goes_on(twin_log: &Path, at_switch: u64) {
    assert!(
        common::wait_until(|| blk_last(twin_log) > at_switch + 10, WAIT),
        "the twin does not write on from {at_switch}: {}",
        common::read(twin_log)
    );
    let first_there = blk_counters(&common::read(twin_log))[0];
    assert!(
        first_there > at_switch && first_there <= at_switch + 2,
        "the twin went on at {first_there}; the device stopped at {at_switch}"
    );
}

/// Back on the device, the guest writes on (the serial log's counters after the first
/// `before`) from the block after the twin's last, and no block was written twice.
fn assert_back_from_twin(serial: &Path, twin_log: &Path, before: usize) {
    let twin_last = blk_last(twin_log);
    let back = || blk_counters(&common::read(serial))[before..].to_vec();
    assert!(
        common::wait_until(|| back().len() > 5, WAIT),
        "the returned guest does not write: {}",
        common::read(serial)
    );
    let back_first = back()[0];
    assert!(
        back_first > twin_last && back_first <= twin_last + 2,
        "back at the device from {back_first}; the twin stopped at {twin_last}"
    );
    let all: Vec<u64> = blk_counters(&common::read(serial))
        .into_iter()
        .chain(blk_counters(&common::read(twin_log)))
        .collect();
    let mut sorted = all.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        all.len(),
        "a write was made twice: the guest went back"
    );
}

/// The host's log says the twin went back to its device (its VMM ends then).
fn assert_twin_returned(host: &CloudHost) {
    assert!(
        common::wait_until(
            || common::read(&host.dir.path("serve.stderr")).contains("returned to"),
            WAIT
        ),
        "{}",
        common::read(&host.dir.path("serve.stderr"))
    );
}

#[test]
fn a_clone_runs_at_the_cloud_host_with_its_own_cid_while_the_original_runs_on() {
    let Some(probe) = probe("handset_cloud clone") else {
        return;
    };
    let host = CloudHost::start("pv-hcloudtest", "clone-host");
    let s = Scratch::new("pv-hcloudtest", "clone");
    let (daemon, serial) = device(&host, &s, &probe, &["--no-jail"]);
    let dir = s.path("state");
    let cid = info(&dir)["vsock_cid"].as_u64().unwrap();
    let pid = info(&dir)["pid"].as_u64().unwrap();

    let before_clone = blk_last(&serial);
    let out = profile(&dir, &["clone", "work", "--to", &host.addr]);
    assert!(out.status.success(), "clone failed: {}", said(&out));
    let at_clone = blk_last(&serial);
    // The original runs on here, in the same VMM.
    let p = info(&dir);
    assert_eq!(
        (p["state"].as_str(), p["pid"].as_u64()),
        (Some("running"), Some(pid))
    );
    assert!(daemon.profile(&["events", "work"]).contains("cloned"));
    let twins = host.twin_dirs();
    assert_eq!(twins.len(), 1, "{twins:?}");
    let twin_log = host
        .state()
        .join("twins")
        .join(&twins[0])
        .join("serial.log");
    // Both write on: the clone from where the original was at the switch.
    assert!(
        common::wait_until(
            || blk_last(&twin_log) > at_clone + 10 && blk_last(&serial) > at_clone + 10,
            WAIT
        ),
        "both do not write on from {at_clone}: here {}, there {}\n{}\nthe clone's log ends:\n{}",
        blk_last(&serial),
        blk_last(&twin_log),
        common::read(&host.dir.path("serve.stderr")),
        tail(&common::read(&twin_log))
    );
    // The clone goes on from the switch, which lies within the clone call (the call also
    // waits for the twin's notice, seconds at load 10): a clone that booted anew would start
    // at 0.
    let first_there = blk_counters(&common::read(&twin_log))[0];
    assert!(
        first_there > 3 && first_there >= before_clone && first_there <= at_clone + 2,
        "the clone went on at {first_there}; the original was at {before_clone} before the \
         clone and at {at_clone} after it"
    );
    // The clone's identity is its own, and its guest saw it; the original's is unchanged.
    let twin_text = common::read(&twin_log);
    let seen: Vec<u64> = twin_text
        .lines()
        .filter_map(|l| l.strip_prefix("PROBE twin cid="))
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    assert_eq!(
        seen.len(),
        1,
        "the clone's guest saw no new CID: {twin_text}"
    );
    assert_ne!(seen[0], cid, "the clone kept the original's CID");
    assert!(
        common::read(&host.dir.path("serve.stderr")).contains(&format!(
            "with vsock CID {} (the original's is {cid})",
            seen[0]
        )),
        "{}",
        common::read(&host.dir.path("serve.stderr"))
    );
    assert!(!common::read(&serial).contains("PROBE twin"));
    assert_eq!(info(&dir)["vsock_cid"].as_u64(), Some(cid));
    cloud_common::the_twin_runs_jailed(&common::read(&host.dir.path("serve.stderr")));

    // Another device does not reach it; its own device cannot take it back over the original.
    let out = host.cloud_return("tablet", "work", &[]);
    assert!(!out.status.success(), "the tablet got the phone's clone");
    assert!(
        said(&out).contains("no twin named \"work\""),
        "{}",
        said(&out)
    );
    let out = host.cloud_return("phone", "work", &[]);
    assert!(!out.status.success(), "a clone returned over its original");
    assert!(said(&out).contains("is a clone"), "{}", said(&out));
    let (here, there) = (blk_last(&serial), blk_last(&twin_log));
    assert!(
        common::wait_until(
            || blk_last(&twin_log) > there + 3 && blk_last(&serial) > here + 3,
            WAIT
        ),
        "a refused request stopped one of them"
    );
    drop(daemon);
}

#[test]
fn a_jailed_profile_is_cloned_through_the_daemons_relay() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        portable_common::loud(
            "SKIP a_jailed_profile_is_cloned_through_the_daemons_relay: needs root",
        );
        return;
    }
    let Some(probe) = probe("handset_cloud jailed clone") else {
        return;
    };
    let host = CloudHost::start("pv-hcloudtest", "jail-host");
    let s = Scratch::new("pv-hcloudtest", "jail");
    // The handset's default: jailed VMMs, whose seccomp filter allows no TCP.
    let (daemon, serial) = device(&host, &s, &probe, &[]);
    let dir = s.path("state");
    let cid = info(&dir)["vsock_cid"].as_u64().unwrap();
    let out = profile(&dir, &["clone", "work", "--to", &host.addr]);
    assert!(out.status.success(), "clone failed: {}", said(&out));
    let at_clone = blk_last(&serial);
    let twins = host.twin_dirs();
    assert_eq!(twins.len(), 1, "{twins:?}");
    let twin_log = host
        .state()
        .join("twins")
        .join(&twins[0])
        .join("serial.log");
    assert!(
        common::wait_until(
            || blk_last(&twin_log) > at_clone + 10 && blk_last(&serial) > at_clone + 10,
            WAIT
        ),
        "both do not write on from {at_clone}: here {}, there {}",
        blk_last(&serial),
        blk_last(&twin_log)
    );
    let twin_text = common::read(&twin_log);
    assert!(
        twin_text.contains("PROBE twin cid=") && !twin_text.contains(&format!("cid={cid}\n")),
        "{twin_text}"
    );
    // Nothing of the relay is left in the VMM's run directory.
    for f in ["cloud.sock", "cloud.key"] {
        assert!(!dir.join("profiles/work/run").join(f).exists(), "{f} left");
    }
    // A host that is down: refused in words, the original writes on.
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let out = profile(&dir, &["clone", "work", "--to", &down]);
    assert!(!out.status.success(), "cloned to a host that is down");
    assert!(said(&out).contains("cannot connect"), "{}", said(&out));
    let now = blk_last(&serial);
    assert!(
        common::wait_until(|| blk_last(&serial) > now + 3, WAIT),
        "the guest stopped after a failed clone"
    );
    drop(daemon);
}

#[test]
fn a_profile_offloaded_through_the_handset_counts_on_in_the_cloud_and_back_with_its_disk() {
    let Some(probe) = probe("handset_cloud") else {
        return;
    };
    let host = CloudHost::start("pv-hcloudtest", "offload");
    let s = Scratch::new("pv-hcloudtest", "device");
    let dir = s.path("state");
    // An unjailed VMM connects to the host itself (a jailed one: the test below).
    let (mut daemon, serial) = running(
        &s,
        &probe,
        &["--no-jail"],
        &blk_counter_spec(),
        "PROBE blk-counter 3\n",
    );

    // Without an identity towards cloud hosts: refused in words, the guest runs on.
    let out = profile(&dir, &["offload", "work", "--to", &host.addr]);
    assert!(!out.status.success(), "offloaded without an identity");
    assert!(
        said(&out).contains("no identity towards cloud hosts"),
        "{}",
        said(&out)
    );
    host.give_identity(&dir, "phone");

    // A host that is down: the offload fails, the profile runs on here.
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let out = profile(&dir, &["offload", "work", "--to", &down]);
    assert!(!out.status.success(), "offloaded to a host that is down");
    assert!(said(&out).contains("runs on here"), "{}", said(&out));
    assert_eq!(info(&dir)["state"], "running");
    let now = blk_last(&serial);
    assert!(
        common::wait_until(|| blk_last(&serial) > now + 3, WAIT),
        "the guest stopped after a failed offload"
    );
    assert!(!dir.join("profiles/work/cloud-kept").exists());

    // The offload: the profile is offloaded to the host and its twin writes on there.
    let out = profile(&dir, &["offload", "work", "--to", &host.addr]);
    assert!(out.status.success(), "offload failed: {}", said(&out));
    let p = info(&dir);
    assert_eq!(p["state"], "offloaded", "{p}");
    assert_eq!(p["offloaded_to"], host.addr.as_str(), "{p}");
    assert!(p["pid"].is_null(), "{p}");
    let at_switch = blk_last(&serial);
    let list = daemon.profile(&["list"]);
    assert!(
        list.contains("offloaded") && list.contains(&host.addr),
        "{list}"
    );
    let twin_log = only_twin_log(&host);
    assert_twin_goes_on(&twin_log, at_switch);

    // What would run it here too is refused, saying how to bring it back.
    for args in [["start", "work"], ["switch", "work"], ["delete", "work"]] {
        let out = profile(&dir, &args);
        assert!(!out.status.success(), "{args:?} of an offloaded profile");
        assert!(
            said(&out).contains("profile return work"),
            "{args:?}: {}",
            said(&out)
        );
    }
    let pass = s.path("pass");
    std::fs::write(&pass, "correct horse battery staple\n").unwrap();
    let out = run(
        &[
            "export",
            "work",
            "-o",
            s.path("work.pvp").to_str().unwrap(),
            "--state-dir",
            dir.to_str().unwrap(),
            "--passphrase-file",
            pass.to_str().unwrap(),
        ],
        &[("POCKETVISOR_KDF", "fast")],
    );
    assert!(!out.status.success(), "an offloaded profile was exported");
    assert!(said(&out).contains("offloaded"), "{}", said(&out));
    assert!(!s.path("work.pvp").exists());

    // A daemon restart keeps it offloaded (and does not touch the twin). This daemon's
    // VMMs die (kill -9) while the twin's pages arrive: the return fails, nothing runs here,
    // the disk is as it was, the profile stays offloaded with its kept copy and the twin
    // works on.
    daemon.stop();
    let mut daemon = Daemon::start_with(
        &dir,
        Some(&probe),
        &[("POCKETVISOR_KILL_AT", "receive-round")],
        &["--no-jail"],
    );
    assert_eq!(info(&dir)["state"], "offloaded");
    let now = blk_last(&twin_log);
    assert!(
        common::wait_until(|| blk_last(&twin_log) > now + 3, WAIT),
        "the twin stopped when the device's daemon restarted"
    );
    let data = dir.join("profiles/work/disks/data.img");
    let kept_disk = std::fs::read(&data).unwrap();
    let out = profile(&dir, &["return", "work"]);
    assert!(!out.status.success(), "a return killed half-way succeeded");
    assert!(
        said(&out).contains("stays offloaded") && said(&out).contains("signal: 9"),
        "{}",
        said(&out)
    );
    let p = info(&dir);
    assert_eq!(p["state"], "offloaded", "{p}");
    assert_eq!(p["offloaded_to"], host.addr.as_str(), "{p}");
    assert!(
        std::fs::read(&data).unwrap() == kept_disk,
        "a failed return changed the disk"
    );
    assert!(dir.join("profiles/work/cloud-kept/COMPLETE").is_file());
    let now = blk_last(&twin_log);
    assert!(
        common::wait_until(|| blk_last(&twin_log) > now + 3, WAIT),
        "the twin stopped after a failed return: {}",
        common::read(&host.dir.path("serve.stderr"))
    );
    daemon.stop();
    let daemon = Daemon::start_with(&dir, Some(&probe), &[], &["--no-jail"]);

    // The return: the guest runs here again from where the twin was, onto the kept copy.
    // The daemon is killed (kill -9) while it waits for the return's VMM: its next start
    // adopts that VMM once the guest runs here (or, if the return was done by then, the
    // running profile as any other).
    let before = blk_counters(&common::read(&serial)).len();
    let mut returning = std::process::Command::new(common::bin())
        .args([
            "profile",
            "--state-dir",
            dir.to_str().unwrap(),
            "return",
            "work",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let api = dir.join("profiles/work/run/api.sock");
    assert!(
        common::wait_until(|| returning_vmm(&api).is_some(), WAIT),
        "the return's VMM did not start"
    );
    let mut daemon = daemon;
    daemon.kill();
    let _ = returning.wait();
    let daemon = Daemon::start_with(&dir, Some(&probe), &[], &["--no-jail"]);
    let events = daemon.profile(&["events", "work"]);
    portable_common::loud(&format!(
        "handset_cloud: the return after the daemon's kill was {}",
        if events.contains("finished after a daemon restart") {
            "finished by the next daemon"
        } else {
            "done before the kill"
        }
    ));
    let p = info(&dir);
    assert_eq!(p["state"], "running", "{p}");
    assert!(p["offloaded_to"].is_null(), "{p}");
    assert!(!dir.join("profiles/work/cloud-kept").exists());
    let events = daemon.profile(&["events", "work"]);
    assert!(events.contains("returned bytes_received="), "{events}");
    // The twin's VMM ends once the guest runs here: its log is final.
    assert_twin_returned(&host);
    assert_back_from_twin(&serial, &twin_log, before);

    // Its disk is every block it wrote: at the device, at the host and back here.
    daemon.profile(&["stop", "work"]);
    let last = blk_last(&serial);
    let disk = std::fs::read(&data).unwrap();
    assert_disk_after_writes(&disk, &vec![0u8; DISK_MIB << 20], last, "the device's disk");
}

#[test]
fn a_jailed_profile_is_offloaded_and_returned_through_the_daemons_relay() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        portable_common::loud(
            "SKIP a_jailed_profile_is_offloaded_and_returned_through_the_daemons_relay: \
             needs root",
        );
        return;
    }
    let Some(probe) = probe("handset_cloud jailed offload") else {
        return;
    };
    let host = CloudHost::start("pv-hcloudtest", "jail-offload-host");
    let s = Scratch::new("pv-hcloudtest", "jail-offload");
    // The handset's default: jailed VMMs, whose seccomp filter allows no TCP.
    let (mut daemon, serial) = device(&host, &s, &probe, &[]);
    let dir = s.path("state");
    let run = dir.join("profiles/work/run");
    // The relay's socket and key, the staged kept copy, the returning disks and their
    // temporary files.
    let relay_files = || {
        std::fs::read_dir(&run)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("cloud") || n.contains("return-"))
            .collect::<Vec<_>>()
    };

    // The offload, through the daemon's relay; the kept copy taken out of the run directory.
    let out = profile(&dir, &["offload", "work", "--to", &host.addr]);
    assert!(out.status.success(), "offload failed: {}", said(&out));
    let p = info(&dir);
    assert_eq!(p["state"], "offloaded", "{p}");
    let at_switch = blk_last(&serial);
    let twin_log = only_twin_log(&host);
    assert_twin_goes_on(&twin_log, at_switch);
    assert!(dir.join("profiles/work/cloud-kept/COMPLETE").is_file());
    assert_eq!(relay_files(), Vec::<String>::new(), "left in run/");

    // The returning VMM dies (kill -9) while the twin's pages arrive: the return fails,
    // nothing runs here, the disk and the kept copy are as they were, nothing is left in the
    // run directory, and the twin works on.
    daemon.stop();
    let mut daemon = Daemon::start_with(
        &dir,
        Some(&probe),
        &[("POCKETVISOR_KILL_AT", "receive-round")],
        &[],
    );
    let data = dir.join("profiles/work/disks/data.img");
    let kept_disk = std::fs::read(&data).unwrap();
    let out = profile(&dir, &["return", "work"]);
    assert!(!out.status.success(), "a return killed half-way succeeded");
    assert!(said(&out).contains("stays offloaded"), "{}", said(&out));
    assert_eq!(info(&dir)["state"], "offloaded");
    assert!(
        std::fs::read(&data).unwrap() == kept_disk,
        "a failed return changed the disk"
    );
    assert!(dir.join("profiles/work/cloud-kept/COMPLETE").is_file());
    assert_eq!(relay_files(), Vec::<String>::new(), "left in run/");
    assert!(
        returning_vmm(&run.join("api.sock")).is_none(),
        "the failed return's VMM runs on"
    );
    let now = blk_last(&twin_log);
    assert!(
        common::wait_until(|| blk_last(&twin_log) > now + 3, WAIT),
        "the twin stopped after a failed return"
    );
    daemon.stop();

    // The return: the jailed VMM counts on from where the twin stopped, onto its disk. The
    // daemon is killed (kill -9) once the guest runs here, before it moved the received disk
    // out of the run directory: the next daemon adopts the VMM and moves it.
    let flag = s.path("return-launched");
    let hold = format!("return-launched:{}", flag.display());
    let mut daemon = Daemon::start_with(
        &dir,
        Some(&probe),
        &[("POCKETVISOR_HOLD_AT", hold.as_str())],
        &[],
    );
    let before = blk_counters(&common::read(&serial)).len();
    let mut returning = std::process::Command::new(common::bin())
        .args(["profile", "--state-dir", dir.to_str().unwrap()])
        .args(["return", "work"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        common::wait_until(|| flag.exists(), WAIT),
        "the return did not reach its hold point"
    );
    daemon.kill();
    let _ = returning.wait();
    assert!(run.join("return-0.img").is_file(), "no disk to take");
    let daemon = Daemon::start_with(&dir, Some(&probe), &[], &[]);
    let events = daemon.profile(&["events", "work"]);
    assert!(
        events.contains("finished after a daemon restart"),
        "{events}"
    );
    let p = info(&dir);
    assert_eq!(p["state"], "running", "{p}");
    let pid = p["pid"].as_u64().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("--return-twin"),
        "not the jailed return's VMM"
    );
    assert!(!dir.join("profiles/work/cloud-kept").exists());
    assert_twin_returned(&host);
    assert_back_from_twin(&serial, &twin_log, before);
    assert_eq!(relay_files(), Vec::<String>::new(), "left in run/");
    daemon.profile(&["stop", "work"]);
    let last = blk_last(&serial);
    let disk = std::fs::read(&data).unwrap();
    assert_disk_after_writes(&disk, &vec![0u8; DISK_MIB << 20], last, "the device's disk");
    let meta = std::fs::symlink_metadata(&data).unwrap();
    assert!(meta.file_type().is_file(), "the disk is not a regular file");
}

/// The FNV-1a of every frame the probe in screen mode reported in the log at `path`.
fn reported_frames(path: &Path) -> Vec<u64> {
    common::read(path)
        .lines()
        .filter_map(e2e::probe::ProbeLine::parse)
        .filter(|p| p.starts_with(&["screen", "frame"]))
        .filter_map(|p| p.field("fnv").and_then(|h| u64::from_str_radix(h, 16).ok()))
        .collect()
}

/// `profile view`'s loopback VNC address of `work`.
fn view_address(daemon: &Daemon) -> u16 {
    let text = daemon.profile(&["view", "work"]);
    text.lines()
        .next()
        .and_then(|l| l.strip_prefix("work: vnc 127.0.0.1:"))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no loopback address: {text}"))
}

/// An offloaded profile's screen on the device: `profile view` of a profile with a screen
/// offloaded through the handset shows its twin (the daemon relays the profile's screen
/// socket to the twin's screen at the cloud host), a frame the guest drew, and a key from the
/// viewer reaches the twin's guest; after the return the same address shows the guest run
/// here again.
#[test]
fn an_offloaded_profiles_screen_is_its_twins_on_the_device() {
    let Some(probe) = probe("handset_cloud_screen") else {
        return;
    };
    let host = CloudHost::start("pv-hcloudtest", "screen");
    let s = Scratch::new("pv-hcloudtest", "screen-device");
    let dir = s.path("state");
    let (daemon, serial) = running(
        &s,
        &probe,
        &["--no-jail"],
        "name = \"work\"\nkernel = \"probe\"\n\
         cmdline = \"pv.mode=screen pv.screen.hash=1 pv.screen.rgb=2060a0\"\n\
         memory_mib = 64\nscreen = true\ndisplay = { width = 180, height = 320 }\n",
        "PROBE screen frame n=1",
    );
    host.give_identity(&dir, "phone");
    let out = profile(&dir, &["offload", "work", "--to", &host.addr]);
    assert!(out.status.success(), "offload failed: {}", said(&out));
    assert_eq!(info(&dir)["state"], "offloaded");
    let twins = host.twin_dirs();
    let twin_log = host
        .state()
        .join("twins")
        .join(&twins[0])
        .join("serial.log");

    // The relay starts with the offload: its socket answers once it has reached the host.
    let socket = dir.join("profiles/work/run/vnc.sock");
    assert!(
        common::wait_until(
            || std::os::unix::net::UnixStream::connect(&socket).is_ok(),
            WAIT
        ),
        "no screen for the offloaded profile: {}",
        daemon.profile(&["events", "work"])
    );
    let mut viewer = e2e::rfb_client::RfbClient::connect(view_address(&daemon));
    let frame = viewer.full_frame();
    let drawn = e2e::host::fnv1a64(&frame);
    let by_guest = || [reported_frames(&serial), reported_frames(&twin_log)].concat();
    assert!(
        common::wait_until(|| by_guest().contains(&drawn), WAIT),
        "the frame (fnv {drawn:016x}) is none the guest drew: {:x?}",
        by_guest()
    );
    viewer.key(0x61, true);
    viewer.key(0x61, false);
    assert!(
        common::wait_for(&twin_log, "PROBE input key", WAIT),
        "the twin's guest saw no key: {}",
        common::read(&twin_log)
    );
    drop(viewer);

    // Back on the device, the profile's screen is its own VMM's again.
    let out = profile(&dir, &["return", "work"]);
    assert!(out.status.success(), "return failed: {}", said(&out));
    let mut viewer = e2e::rfb_client::RfbClient::connect(view_address(&daemon));
    let frame = viewer.full_frame();
    let drawn = e2e::host::fnv1a64(&frame);
    assert!(
        common::wait_until(|| by_guest().contains(&drawn), WAIT),
        "after the return, the frame (fnv {drawn:016x}) is none the guest drew"
    );
}

/// One agent request through the vsock socket `sock` (a VMM's, or one `cloud vsock` serves).
fn agent_at(sock: &Path, req: &serde_json::Value) -> serde_json::Value {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"CONNECT 1025\n").unwrap();
    let mut r = std::io::BufReader::new(s.try_clone().unwrap());
    let mut ok = String::new();
    r.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK "), "vsock handshake: {ok:?}");
    s.write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad answer {line:?}: {e}"))
}

/// `channel-file` audit records of the daemon on `dir`.
fn file_audit(dir: &Path) -> Vec<String> {
    let out = profile(dir, &["audit", "--limit", "1000", "--json"]);
    assert_ok(&out, "profile audit");
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    all.into_iter()
        .filter(|e| e["event"] == "channel-file")
        .map(|e| {
            format!(
                "{} {}",
                e["profile"].as_str().unwrap(),
                e["detail"].as_str().unwrap()
            )
        })
        .collect()
}

/// `cloud vsock` processes serving a socket under `dir`.
fn relays_under(dir: &Path) -> Vec<u32> {
    let Ok(all) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let dir = dir.as_os_str().as_encoded_bytes();
    all.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            (args.windows(2).any(|w| w == [&b"cloud"[..], &b"vsock"[..]])
                && args.iter().any(|a| a.starts_with(dir)))
            .then_some(pid)
        })
        .collect()
}

/// A `cloud vsock` process serving the agent of the phone's clone `work` at `host` on a
/// socket in `s` (named after `tag`), as the test's own way into the clone; the socket.
fn clone_agent(host: &CloudHost, s: &Scratch, tag: &str) -> (common::Vmm, std::path::PathBuf) {
    let listen = s.path(&format!("clone-agent-{tag}.sock"));
    let stderr = s.path(&format!("clone-agent-{tag}.stderr"));
    let relay = common::Vmm(
        std::process::Command::new(common::bin())
            .args(["cloud", "vsock", "work", "--from", &host.addr, "--key"])
            .arg(&host.key)
            .arg("--tls-cert")
            .arg(host.dir.path("phone.pem"))
            .arg("--tls-key")
            .arg(host.dir.path("phone.key"))
            .arg("--tls-ca")
            .arg(host.dir.path("phone-ca.pem"))
            .arg("--listen")
            .arg(&listen)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    assert!(
        common::wait_until(|| common::read(&stderr).contains(" on unix:"), WAIT),
        "cloud vsock did not serve: {}",
        common::read(&stderr)
    );
    (relay, listen)
}

/// A clone works for its original: a file put into the clone's agent inbox (through `cloud
/// vsock`, at the cloud host) comes into the original's inbox with `profile file from-clone`
/// and reads back byte for byte with `profile file pull`; a file pushed into the original's
/// inbox goes into the clone's with `profile file to-clone` and reads back byte for byte
/// there; every attempt is audited; the original's `files_from` without `cloud` refuses the
/// first, its `files_to` without `cloud` the second (exit 4, one line) and nothing moves; a
/// profile without a clone, and a device the host keeps no such clone for, are refused in
/// words. Nothing of the relay is left behind.
#[test]
fn files_move_between_the_original_and_its_clone_under_the_originals_rules() {
    let Some(probe) = probe("handset_cloud files from a clone") else {
        return;
    };
    let host = CloudHost::start("pv-hcloudtest", "files-host");
    let s = Scratch::new("pv-hcloudtest", "files");
    let dir = s.path("state");
    // The handset's default (jailed VMMs, cloned through the daemon's relay) where the test
    // may jail, else unjailed: the file comes back through the daemon either way.
    // SAFETY: geteuid has no preconditions.
    let flags: &[&str] = if unsafe { libc::geteuid() } == 0 {
        &[]
    } else {
        &["--no-jail"]
    };
    let (daemon, serial) = running(
        &s,
        &probe,
        flags,
        "name = \"work\"\nkernel = \"probe\"\ncmdline = \"pv.mode=agent\"\nmemory_mib = 128\n\
         [channels]\nfiles_to = [\"host\"]\n",
        "PROBE agent listening",
    );
    host.give_identity(&dir, "phone");
    let profile_dir = dir.join("profiles/work");
    let relay_left = || {
        std::fs::read_dir(&profile_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("clone-vsock"))
            .collect::<Vec<_>>()
    };
    // Nothing of the daemon's relay outlives a call: neither its socket nor its process.
    let nothing_left = || {
        assert!(relay_left().is_empty(), "{:?}", relay_left());
        assert!(
            relays_under(&profile_dir).is_empty(),
            "the relay process outlived the call: {:?}",
            relays_under(&profile_dir)
        );
    };
    // One `channel-file` record starting with `head` of a move of `bytes` that went through.
    let moved = |head: &str, bytes: usize| {
        let audit = file_audit(&dir);
        let ok = format!(
            "clone-at={} decision=allowed result=ok bytes={bytes}",
            host.addr
        );
        assert!(
            audit.iter().any(|r| r.starts_with(head) && r.contains(&ok)),
            "{audit:#?}"
        );
    };

    // Not cloned yet: refused in words, before any host is asked.
    let out = profile(&dir, &["file", "from-clone", "work", "report.bin"]);
    assert!(!out.status.success(), "a file came from no clone");
    assert!(
        said(&out).contains("has no clone at a cloud host"),
        "{}",
        said(&out)
    );
    assert!(info(&dir)["cloned_to"].is_null());

    let out = profile(&dir, &["clone", "work", "--to", &host.addr]);
    assert!(out.status.success(), "clone failed: {}", said(&out));
    assert_eq!(info(&dir)["cloned_to"], host.addr.as_str());
    assert!(
        daemon
            .profile(&["show", "work"])
            .contains(&format!("clone at:   {}", host.addr)),
        "profile show does not say where the clone is"
    );
    let twins = host.twin_dirs();
    assert_eq!(twins.len(), 1, "{twins:?}");
    let twin_log = host
        .state()
        .join("twins")
        .join(&twins[0])
        .join("serial.log");
    // The clone's agent serves on its new CID once its vsock device's reset told it, and the
    // daemon told it whose twin it is (the original's agent hears nothing of it).
    assert!(
        common::wait_for(&twin_log, "PROBE twin cid=", WAIT),
        "the clone's agent did not learn its CID: {}",
        common::read(&twin_log)
    );
    assert!(
        common::wait_for(&twin_log, "PROBE agent twin of=work\n", WAIT),
        "the clone's agent was not told it is a twin: {}\n{}",
        common::read(&twin_log),
        daemon.profile(&["events", "work"])
    );
    assert!(!common::read(&serial).contains("agent twin"));
    assert!(daemon
        .profile(&["events", "work"])
        .contains("twin-notified"));

    // A file in the clone's inbox, put there at the host through `cloud vsock`.
    let data: Vec<u8> = (0..3000u32)
        .map(|i| u8::try_from((i * 31 + i / 7) % 251).unwrap())
        .collect();
    let b64 = |d: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(d)
    };
    {
        let (_relay, clone) = clone_agent(&host, &s, "put");
        let put = agent_at(
            &clone,
            &serde_json::json!({"op": "file_put", "name": "report.bin", "data_b64": b64(&data)}),
        );
        assert_eq!(put["ok"], true, "{put}");
    }
    // The original's inbox does not have it (the clone's inbox is the clone's own).
    let original = dir.join("profiles/work/run/vsock.sock");
    let list = agent_at(&original, &serde_json::json!({"op": "file_list"}));
    assert_eq!(list["files"], serde_json::json!([]), "{list}");

    // Brought into the original's inbox, and back out to the host byte for byte.
    let out = profile(
        &dir,
        &[
            "file",
            "from-clone",
            "work",
            "report.bin",
            "--as",
            "from-cloud.bin",
        ],
    );
    assert!(out.status.success(), "from-clone failed: {}", said(&out));
    assert!(
        said(&out).contains("file from-cloud.bin: 3000 bytes from cloud to work"),
        "{}",
        said(&out)
    );
    let local = s.path("from-cloud.bin");
    let out = profile(
        &dir,
        &[
            "file",
            "pull",
            "work",
            "from-cloud.bin",
            local.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "pull failed: {}", said(&out));
    assert!(
        std::fs::read(&local).unwrap() == data,
        "the file changed on its way"
    );
    moved(
        "work from=cloud to=work name=report.bin as=from-cloud.bin ",
        3000,
    );
    nothing_left();

    // The original's rules without `cloud`: refused, audited, nothing moves.
    daemon.profile(&["set", "work", "channels.files_from=[\"host\"]"]);
    let out = profile(
        &dir,
        &[
            "file",
            "from-clone",
            "work",
            "report.bin",
            "--as",
            "second.bin",
        ],
    );
    assert_eq!(out.status.code(), Some(4), "{}", said(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("denied by policy") && stderr.contains("files_from does not include cloud"),
        "{stderr}"
    );
    let audit = file_audit(&dir);
    assert!(
        audit
            .iter()
            .any(|r| r.contains("name=report.bin as=second.bin ")
                && r.contains("decision=denied result=error")),
        "{audit:#?}"
    );
    let list = agent_at(&original, &serde_json::json!({"op": "file_list"}));
    assert_eq!(
        list["files"],
        serde_json::json!([{"name": "from-cloud.bin", "bytes": 3000}]),
        "{list}"
    );
    nothing_left();

    // Work handed to the twin: a file of the original's inbox goes into the clone's only once
    // the original's files_to lists `cloud` (before: exit 4, one line, nothing moves), and
    // reads back there byte for byte.
    let task: Vec<u8> = (0..5000u32)
        .map(|i| u8::try_from((i * 17 + i / 13) % 253).unwrap())
        .collect();
    let task_file = s.path("task.bin");
    std::fs::write(&task_file, &task).unwrap();
    let out = profile(
        &dir,
        &[
            "file",
            "push",
            "work",
            task_file.to_str().unwrap(),
            "task.bin",
        ],
    );
    assert!(out.status.success(), "push failed: {}", said(&out));
    let to_clone = [
        "file",
        "to-clone",
        "work",
        "task.bin",
        "--as",
        "for-twin.bin",
    ];
    let out = profile(&dir, &to_clone);
    assert_eq!(out.status.code(), Some(4), "{}", said(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("denied by policy") && stderr.contains("files_to does not include cloud"),
        "{stderr}"
    );
    nothing_left();
    let (_relay, clone) = clone_agent(&host, &s, "get");
    let list = agent_at(&clone, &serde_json::json!({"op": "file_list"}));
    assert_eq!(
        list["files"],
        serde_json::json!([{"name": "report.bin", "bytes": 3000}]),
        "{list}"
    );
    daemon.profile(&["set", "work", "channels.files_to=[\"host\", \"cloud\"]"]);
    let out = profile(&dir, &to_clone);
    assert!(out.status.success(), "to-clone failed: {}", said(&out));
    assert!(
        said(&out).contains("file for-twin.bin: 5000 bytes from work to cloud"),
        "{}",
        said(&out)
    );
    let got = agent_at(
        &clone,
        &serde_json::json!({"op": "file_get", "name": "for-twin.bin"}),
    );
    assert_eq!(got["ok"], true, "{got}");
    assert!(
        got["data_b64"].as_str() == Some(b64(&task).as_str()),
        "the file changed on its way to the clone"
    );
    let audit = file_audit(&dir);
    let to_cloud = "work from=work to=cloud name=task.bin as=for-twin.bin ";
    assert!(
        audit.iter().any(|r| r.starts_with(to_cloud)
            && r.contains("decision=denied result=error")
            && r.contains("files_to does not include cloud")),
        "{audit:#?}"
    );
    moved(to_cloud, 5000);
    nothing_left();

    // A device the host keeps no clone `work` for (the tablet's identity): refused in words.
    daemon.profile(&["set", "work", "channels.files_from=[\"host\", \"cloud\"]"]);
    host.give_identity(&dir, "tablet");
    let out = profile(&dir, &["file", "from-clone", "work", "report.bin"]);
    assert!(
        !out.status.success(),
        "the tablet reached the phone's clone"
    );
    assert!(
        said(&out).contains("no twin named \"work\""),
        "{}",
        said(&out)
    );
    let audit = file_audit(&dir);
    assert!(
        audit.last().is_some_and(
            |r| r.contains("decision=allowed result=error") && r.contains("no twin named")
        ),
        "{audit:#?}"
    );
    nothing_left();
    drop(daemon);
}
