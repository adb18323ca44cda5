//! The handset's `profile replicate` (issue 13) against a real cloud host (`pocketvisor cloud
//! serve`) on loopback: a profile writing its disk (the probe in blk-counter mode) is
//! replicated with the handset's identity towards cloud hosts (`<state>/cloud/`); the
//! device is lost (its daemon and VMM killed) and `pocketvisor cloud recover`, with that
//! identity and the recovery key, gives back the guest as the last checkpoint left it: it
//! counts on from there and its disk is, byte for byte, what it had written. `profile
//! recover` on a new handset makes it a suspended profile there that resumes the same way.
//!
//! Skipped (with a SKIP line on stderr) where /dev/kvm is missing or the probe cannot be built.

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

#[test]
fn a_replicated_profile_comes_back_on_another_device_from_its_last_checkpoint() {
    let Some(probe) = probe("handset_replica") else {
        return;
    };
    let host = CloudHost::start("pv-hreplicatest", "replicate");
    let s = Scratch::new("pv-hreplicatest", "device");
    let dir = s.path("state");
    let mut daemon = Daemon::start_with(&dir, Some(&probe), &[], &["--no-jail"]);
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
    let replicate = |count: &str| {
        profile(
            &dir,
            &[
                "replicate",
                "work",
                "--to",
                &host.addr,
                "--every",
                "1s",
                "--recipient",
                &public,
                "--count",
                count,
            ],
        )
    };

    // Not running: refused in words.
    let out = replicate("1");
    assert!(!out.status.success());
    assert!(said(&out).contains("does not run here"), "{}", said(&out));

    daemon.profile(&["start", "work"]);
    let serial = dir.join("profiles/work/run/serial.log");
    assert!(
        common::wait_for(&serial, "PROBE blk-counter 3\n", WAIT),
        "the guest does not write: {}",
        common::read(&serial)
    );
    // Without an identity towards cloud hosts: refused in words.
    let out = replicate("1");
    assert!(!out.status.success());
    assert!(
        said(&out).contains("no identity towards cloud hosts"),
        "{}",
        said(&out)
    );

    host.give_identity(&dir, "phone");
    let before = *blk_counters(&common::read(&serial)).last().unwrap();
    let out = replicate("2");
    assert!(out.status.success(), "{}", said(&out));
    let lines = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(lines.lines().count(), 2, "{lines}");
    assert!(
        lines.contains("seq=2 ") && lines.contains("full=false"),
        "{lines}"
    );
    // Plaintext checkpoints do not stay on the device.
    let left: Vec<_> = std::fs::read_dir(dir.join("profiles/work/replica"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // The device is lost: the profile's VMM and its daemon are gone.
    daemon.profile(&["stop", "work"]);
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
    assert!(
        said(&rec).contains("recovered checkpoints=2"),
        "{}",
        said(&rec)
    );
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
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(
        common::wait_until(
            || blk_counters(&common::read(&back_serial)).len() >= 5,
            WAIT
        ),
        "the recovered guest does not count: {}",
        common::read(&back_serial)
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
    assert!(
        said(&out).contains("recovered (suspended) checkpoints=2"),
        "{}",
        said(&out)
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
    let second = Daemon::start_with(&new, Some(&probe), &[], &["--no-jail"]);
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

#[test]
fn a_profile_in_a_jailed_vmm_is_refused_in_words() {
    let Some(probe) = probe("handset_replica") else {
        return;
    };
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        common::skip("a jailed VMM needs root");
        return;
    }
    let host = CloudHost::start("pv-hreplicatest", "jailed");
    let s = Scratch::new("pv-hreplicatest", "jailed-device");
    let dir = s.path("state");
    // The handset's default: every VMM jailed.
    let daemon = Daemon::start_with(&dir, Some(&probe), &[], &[]);
    let spec = s.path("work.toml");
    std::fs::write(
        &spec,
        "name = \"work\"\nkernel = \"probe\"\ncmdline = \"pv.mode=counter pv.counter.ms=20\"\n\
         memory_mib = 64\n",
    )
    .unwrap();
    daemon.profile(&["create", "--file", spec.to_str().unwrap()]);
    daemon.profile(&["start", "work"]);
    let serial = dir.join("profiles/work/run/serial.log");
    assert!(
        common::wait_for(&serial, "PROBE counter 3\n", WAIT),
        "the guest does not count: {}",
        common::read(&serial)
    );
    host.give_identity(&dir, "phone");
    let out = profile(
        &dir,
        &[
            "replicate",
            "work",
            "--to",
            &host.addr,
            "--recipient",
            "pvp-public-unused",
            "--count",
            "1",
        ],
    );
    assert!(!out.status.success());
    assert!(said(&out).contains("jailed VMM"), "{}", said(&out));
    assert!(host.twin_dirs().is_empty(), "{:?}", host.twin_dirs());
}
