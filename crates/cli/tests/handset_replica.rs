//! The handset daemon's replication (issue 13) against a real cloud host (`pocketvisor cloud
//! serve`) on loopback: a profile in a jailed VMM (the daemon's default) writing its disk (the
//! probe in blk-counter mode) is replicated by the daemon on its timer (`profile replicate`,
//! POST /v1/profiles/NAME/replicate) with the handset's identity towards cloud hosts
//! (`<state>/cloud/`); it goes on after a daemon restart, ends with a suspend, goes on after
//! the resume and ends with the profile's stop.
//! `pocketvisor cloud recover`, with that identity and the recovery key, gives back the guest
//! as the last checkpoint left it: it counts on from there and its disk is, byte for byte,
//! what it had written. `profile recover` on a new handset makes it a suspended profile
//! there that resumes the same way.
//!
//! Skipped (with a SKIP line on stderr) where /dev/kvm is missing, the probe cannot be built
//! or the test does not run as root (a jailed VMM needs root).

mod cloud_common;
mod common;
mod portable_common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use cloud_common::{assert_disk_after_writes, blk_counters, CloudHost};
use portable_common::{probe, run, Daemon, Scratch};

const WAIT: Duration = Duration::from_secs(60);
const DISK_MIB: usize = 4;

fn said(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn profile(dir: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["profile", "--state-dir", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    run(&all, &[])
}

fn client(dir: &Path) -> handset::client::Client {
    handset::client::Client::new(&handset::StateDir::new(dir).unwrap().socket())
}

/// The profile's events `kind` after event id `after`, as (id, detail).
fn events(dir: &Path, name: &str, kind: &str, after: i64) -> Vec<(i64, String)> {
    let all: Vec<handset::Event> = client(dir)
        .call(
            "GET",
            &format!("/v1/profiles/{name}/events?limit=10000"),
            None::<&()>,
        )
        .unwrap_or_default();
    all.into_iter()
        .filter(|e| e.event == kind && e.id > after)
        .map(|e| (e.id, e.detail))
        .collect()
}

/// Whether a `cloud replicate` of profile `name` of state directory `dir` runs (its command
/// line names the profile's API socket; a process that ended has none).
fn replicating(dir: &Path, name: &str) -> bool {
    let api = dir.join(format!("profiles/{name}/run/api.sock"));
    let needle = api.to_str().unwrap().as_bytes().to_vec();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .any(|c| {
            let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
            args.windows(2)
                .any(|w| w == [&b"cloud"[..], &b"replicate"[..]])
                && args.contains(&needle.as_slice())
        })
}

/// POSTs a replication body to the daemon; the status and the error message.
fn post(dir: &Path, body: &serde_json::Value) -> (u16, String) {
    let a = client(dir)
        .raw(
            "POST",
            "/v1/profiles/work/replicate",
            Some(body.to_string().as_bytes()),
        )
        .unwrap();
    (a.status, String::from_utf8_lossy(&a.body).into_owned())
}

#[test]
fn a_jailed_profile_replicated_by_the_daemon_comes_back_from_its_last_checkpoint() {
    let Some(probe) = probe("handset_replica") else {
        return;
    };
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        common::skip("a jailed VMM needs root");
        return;
    }
    let host = CloudHost::start("pv-hreplicatest", "replicate");
    let s = Scratch::new("pv-hreplicatest", "device");
    let dir = s.path("state");
    // The handset's default: every VMM jailed. The daemon that adopts them later runs with
    // the same cgroup parent.
    let cgroup = format!("pv-hreplicatest-{}", std::process::id());
    let flags = ["--cgroup-parent", cgroup.as_str()];
    let mut daemon = Daemon::start_with(&dir, Some(&probe), &[], &flags);
    let spec = s.path("work.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"work\"\nkernel = \"probe\"\n\
             cmdline = \"pv.mode=blk-counter pv.counter.ms=20\"\nmemory_mib = 64\n\
             disks = [{{name = \"data\", size_mib = {DISK_MIB}}}]\n"
        ),
    )
    .unwrap();
    daemon.profile(&["create", "--file", spec.to_str().unwrap()]);
    let recovery = s.path("recovery.key");
    let keygen = run(&["keygen", "-o", recovery.to_str().unwrap()], &[]);
    assert!(keygen.status.success(), "{}", said(&keygen));
    let public = String::from_utf8(keygen.stdout).unwrap().trim().to_string();
    let replicate = |every: &str| {
        profile(
            &dir,
            &[
                "replicate",
                "work",
                "--to",
                &host.addr,
                "--every",
                every,
                "--recipient",
                &public,
            ],
        )
    };

    // Without an identity towards cloud hosts: refused in words.
    let out = replicate("1s");
    assert!(!out.status.success());
    assert!(
        said(&out).contains("no identity towards cloud hosts"),
        "{}",
        said(&out)
    );
    host.give_identity(&dir, "phone");
    // A bad host, period or key: 400 with what is wrong, and nothing kept.
    let good = serde_json::json!({"to": host.addr, "every_s": 1, "recipients": [public]});
    for (field, value, says) in [
        ("to", serde_json::json!("no-port"), "HOST:PORT"),
        ("to", serde_json::json!("a b:7000"), "HOST:PORT"),
        ("every_s", serde_json::json!(0), "every_s 0"),
        ("every_s", serde_json::json!(86_401), "every_s 86401"),
        ("recipients", serde_json::json!([]), "0 recipients"),
        (
            "recipients",
            serde_json::json!(["pvp-public-00"]),
            "not a public key",
        ),
    ] {
        let mut body = good.clone();
        body[field] = value;
        let (status, error) = post(&dir, &body);
        assert_eq!(status, 400, "{field}: {error}");
        assert!(error.contains(says), "{field}: {error}");
    }
    let out = replicate("500ms");
    assert!(!out.status.success());
    assert!(said(&out).contains("whole seconds"), "{}", said(&out));
    let show = daemon.profile(&["show", "work"]);
    assert!(show.contains("replicated: -"), "{show}");

    // Set while stopped: it waits for the profile to run.
    let out = replicate("1s");
    assert!(out.status.success(), "{}", said(&out));
    assert!(
        said(&out).contains("idle: the profile does not run"),
        "{}",
        said(&out)
    );
    daemon.profile(&["start", "work"]);
    let serial = dir.join("profiles/work/run/serial.log");
    assert!(
        common::wait_for(&serial, "PROBE blk-counter 3\n", WAIT),
        "the guest does not write: {}",
        common::read(&serial)
    );
    let before = *blk_counters(&common::read(&serial)).last().unwrap();
    assert!(
        common::wait_until(|| events(&dir, "work", "replicated", 0).len() >= 2, WAIT),
        "no two checkpoints stored: {:?}",
        events(&dir, "work", "replicate-failed", 0)
    );
    let stored = events(&dir, "work", "replicated", 0);
    assert!(
        stored[0].1.starts_with("seq=1 ") && stored[0].1.contains("full=true"),
        "{stored:?}"
    );
    assert!(
        stored[1].1.starts_with("seq=2 ") && stored[1].1.contains("full=false"),
        "{stored:?}"
    );
    assert!(stored[1].1.contains(" pause_ms="), "{stored:?}");
    let show = daemon.profile(&["show", "work"]);
    assert!(
        show.contains(&format!(
            "replicated: to {} every 1s (checkpointing",
            host.addr
        )),
        "{show}"
    );
    // The jailed VMM wrote them in its run directory, handed to it.
    let vmm_dir = std::fs::symlink_metadata(dir.join("profiles/work/run/replica")).unwrap();
    let run_dir = std::fs::metadata(dir.join("profiles/work/run")).unwrap();
    assert!(vmm_dir.is_dir());
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&vmm_dir),
        std::os::unix::fs::MetadataExt::uid(&run_dir)
    );

    // The daemon dies and another adopts the VMM: the replication goes on, in a new chain.
    let chain = |detail: &str| detail.split("chain=").nth(1).unwrap_or("").to_string();
    let old_chain = chain(&stored[0].1);
    daemon.kill();
    assert!(
        common::wait_until(|| !replicating(&dir, "work"), WAIT),
        "the replication outlived its daemon"
    );
    let mut daemon = Daemon::start_with(&dir, Some(&probe), &[], &flags);
    let new_chain = || {
        events(&dir, "work", "replicated", 0)
            .into_iter()
            .filter(|(_, d)| chain(d) != old_chain)
            .collect::<Vec<_>>()
    };
    assert!(
        common::wait_until(|| new_chain().len() >= 2, WAIT),
        "no checkpoint after the daemon restart: {:?}",
        events(&dir, "work", "replicate-failed", 0)
    );
    let after = new_chain();
    assert!(
        after[0].1.starts_with("seq=1 ") && after[0].1.contains("full=true"),
        "{after:?}"
    );

    // Suspend ends it; resume takes it up again, in a new chain.
    daemon.profile(&["suspend", "work"]);
    assert!(
        common::wait_until(|| !replicating(&dir, "work"), WAIT),
        "the replication outlived the suspend"
    );
    let second_chain = chain(&after[0].1);
    daemon.profile(&["resume", "work"]);
    let last_chain = || {
        let all = events(&dir, "work", "replicated", 0);
        let c = all.last().map(|(_, d)| chain(d)).unwrap_or_default();
        all.into_iter()
            .filter(|(_, d)| chain(d) == c)
            .collect::<Vec<_>>()
    };
    assert!(
        common::wait_until(
            || {
                let l = last_chain();
                l.len() >= 2 && chain(&l[0].1) != second_chain && chain(&l[0].1) != old_chain
            },
            WAIT
        ),
        "no checkpoint after the resume: {:?}",
        events(&dir, "work", "replicate-failed", 0)
    );
    assert!(
        last_chain()[0].1.starts_with("seq=1 "),
        "{:?}",
        last_chain()
    );

    // Stop ends it: no replication runs, and none is shown as running.
    daemon.profile(&["stop", "work"]);
    assert!(
        common::wait_until(|| !replicating(&dir, "work"), WAIT),
        "the replication outlived the stop"
    );
    let st: handset::api_types::ReplicationStatus = client(&dir)
        .call("GET", "/v1/profiles/work/replicate", None::<&()>)
        .unwrap();
    assert!(!st.active && st.setting.is_some(), "{st:?}");
    let checkpoints = last_chain().len() as u64;
    // The setting goes with DELETE (once).
    let out = profile(&dir, &["replicate", "work", "--stop"]);
    assert!(out.status.success(), "{}", said(&out));
    let out = profile(&dir, &["replicate", "work", "--stop"]);
    assert!(said(&out).contains("not replicated"), "{}", said(&out));
    // The device is lost.
    daemon.stop();
    let initial = std::fs::read(dir.join("profiles/work/disks/data.img"))
        .map(|d| vec![0u8; d.len()])
        .unwrap();
    let lost_at = *blk_counters(&common::read(&serial)).last().unwrap();

    // Another device, the same identity and the recovery key.
    let cloud = dir.join("cloud");
    let arg = |f: &str| cloud.join(f).display().to_string();
    let out_dir = s.path("back");
    let disk = s.path("back.img");
    let rec = run(
        &[
            "cloud",
            "recover",
            "work",
            "--from",
            &host.addr,
            "--identity",
            recovery.to_str().unwrap(),
            "-o",
            out_dir.to_str().unwrap(),
            "--disk",
            disk.to_str().unwrap(),
            "--key",
            &arg("migration.key"),
            "--tls-cert",
            &arg("cert.pem"),
            "--tls-key",
            &arg("key.pem"),
            "--tls-ca",
            &arg("ca.pem"),
        ],
        &[],
    );
    assert!(rec.status.success(), "{}", said(&rec));
    // Every checkpoint recorded since the restart (and one the stop cut off after the host
    // stored it, before the daemon heard).
    let recovered_count = |text: &str, prefix: &str| -> u64 {
        let n = text
            .split(prefix)
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{text}"));
        assert!(
            (checkpoints..=checkpoints + 1).contains(&n),
            "{n} recovered, {checkpoints} recorded: {text}"
        );
        n
    };
    let n = recovered_count(&said(&rec), "recovered checkpoints=");
    let recovered = std::fs::read(&disk).unwrap();
    let back_serial = s.path("back.serial");
    let _vm = common::Vmm(
        Command::new(common::bin())
            .arg("restore")
            .arg(&out_dir)
            .arg("--disk")
            .arg(&disk)
            .arg("--serial")
            .arg(format!("file:{}", back_serial.display()))
            // The jailed VMM named its socket as its jail shows it.
            .arg("--vsock-socket")
            .arg(s.path("back.vsock"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(s.path("back.stderr")).unwrap())
            .spawn()
            .unwrap(),
    );
    assert!(
        common::wait_until(
            || blk_counters(&common::read(&back_serial)).len() >= 5,
            WAIT
        ),
        "the recovered guest does not count: {}\n{}",
        common::read(&back_serial),
        common::read(&s.path("back.stderr"))
    );
    let counted = blk_counters(&common::read(&back_serial));
    assert!(
        counted[0] > before + 1 && counted[0] <= lost_at + 1,
        "{counted:?}: before replicating {before}, lost at {lost_at}"
    );
    assert!(counted.windows(2).all(|w| w[1] == w[0] + 1), "{counted:?}");
    assert_disk_after_writes(&recovered, &initial, counted[0] - 1, "the recovered disk");

    // A new handset with the same identity: `profile recover` makes it a suspended profile
    // there, which resumes from the same checkpoint with the same disk.
    let new = s.path("new");
    host.give_identity(&new, "phone");
    let recover = || {
        profile(
            &new,
            &[
                "recover",
                "work",
                "--from",
                &host.addr,
                "--identity",
                recovery.to_str().unwrap(),
            ],
        )
    };
    let out = recover();
    assert!(out.status.success(), "{}", said(&out));
    assert_eq!(
        recovered_count(&said(&out), "recovered (suspended) checkpoints="),
        n
    );
    let again = recover();
    assert!(!again.status.success());
    assert!(said(&again).contains("already exists"), "{}", said(&again));
    assert_eq!(
        std::fs::read(new.join("profiles/work/disks/data.img")).unwrap(),
        recovered,
        "the profile's disk is the recovered one"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&new)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".recover"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let second = Daemon::start_with(&new, Some(&probe), &[], &[]);
    let show = second.profile(&["list"]);
    assert!(show.contains("suspended"), "{show}");
    second.profile(&["resume", "work"]);
    let serial = new.join("profiles/work/run/serial.log");
    assert!(
        common::wait_until(|| blk_counters(&common::read(&serial)).len() >= 5, WAIT),
        "the recovered profile does not count: {}",
        common::read(&serial)
    );
    let resumed = blk_counters(&common::read(&serial));
    assert_eq!(resumed[0], counted[0], "{resumed:?} against {counted:?}");
}
