//! Live migration between two VMM processes, as a user runs it: `pocketvisor run
//! --api-socket` at the source, `pocketvisor receive` at the destination, `pocketvisor
//! migrate` to move the probe guest (counter mode) from one to the other. And kill -9 of
//! either process at each phase (named kill points, `POCKETVISOR_KILL_AT`): the guest runs on
//! exactly one side, or, when the destination dies after the source committed, stays paused
//! at the source, where `unpause` runs it again. The connection is TLS 1.3 with both hosts'
//! certificates (made with rcgen); a host whose certificate another authority signed is
//! refused, whichever side it is.
//!
//! Skipped (with a SKIP line on stderr) where /dev/kvm is missing or the probe cannot be built.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{bin, counters, read, wait_exit, wait_for, wait_until, Scratch, Vmm};

const SCRATCH: &str = "pv-migtest";
const KILL_AT: &str = "POCKETVISOR_KILL_AT";
const WAIT: Duration = Duration::from_secs(20);

/// The two sides of one migration, their logs in a scratch directory.
struct Pair {
    dir: Scratch,
    source: Vmm,
    dest: Vmm,
    /// Where the destination listens.
    addr: String,
}

impl Pair {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path(name)
    }

    fn src_log(&self) -> PathBuf {
        self.path("src.serial")
    }

    fn dst_log(&self) -> PathBuf {
        self.path("dst.serial")
    }

    fn sock(&self) -> PathBuf {
        self.path("src.sock")
    }

    /// `pocketvisor migrate` from the source to the destination with `key`.
    fn migrate(&self, key: &Path) -> Output {
        self.migrate_as(key, "src")
    }

    /// `pocketvisor migrate` showing the certificate `who` (see [`issue`]).
    fn migrate_as(&self, key: &Path, who: &str) -> Output {
        Command::new(bin())
            .args(["migrate", "--api-socket"])
            .arg(self.sock())
            .args(["--to", &self.addr, "--key"])
            .arg(key)
            .args(tls_args(self.dir.0.as_path(), who))
            .output()
            .expect("run pocketvisor migrate")
    }
}

/// Writes `who`.pem, `who`.key and `who`-ca.pem into `dir`: a certificate for `names`
/// signed by the authority `ca`, and the authority that host trusts (`trusts`).
fn issue(dir: &Path, who: &str, names: &[&str], ca: &Authority, trusts: &Authority) {
    let key = rcgen::KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let cert = rcgen::CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &ca.cert, &ca.key)
        .unwrap();
    std::fs::write(dir.join(format!("{who}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{who}.key")), key.serialize_pem()).unwrap();
    std::fs::write(dir.join(format!("{who}-ca.pem")), trusts.cert.pem()).unwrap();
}

/// A certificate authority.
struct Authority {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

fn authority() -> Authority {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    Authority {
        cert: params.self_signed(&key).unwrap(),
        key,
    }
}

/// The hosts' certificates in `dir`: `src` and `dst` from one authority, each trusting it;
/// `stranger-src` and `stranger-dst` from another authority, trusting the first.
fn certificates(dir: &Path) {
    let (ours, theirs) = (authority(), authority());
    issue(dir, "src", &["source.example"], &ours, &ours);
    issue(dir, "dst", &["127.0.0.1"], &ours, &ours);
    issue(dir, "stranger-src", &["source.example"], &theirs, &ours);
    issue(dir, "stranger-dst", &["127.0.0.1"], &theirs, &ours);
}

/// The `--tls-*` flags for the certificate `who` in `dir`.
fn tls_args(dir: &Path, who: &str) -> Vec<String> {
    let f = |suffix: &str| dir.join(format!("{who}{suffix}")).display().to_string();
    vec![
        "--tls-cert".into(),
        f(".pem"),
        "--tls-key".into(),
        f(".key"),
        "--tls-ca".into(),
        f("-ca.pem"),
    ]
}

fn write_key(path: &Path, byte: u8) -> PathBuf {
    std::fs::write(path, format!("{byte:02x}").repeat(32) + "\n").unwrap();
    path.to_path_buf()
}

fn stderr_to(path: &Path) -> Stdio {
    Stdio::from(File::create(path).unwrap())
}

fn spawn_env(args: &[String], stderr: &Path, env: &[(&str, &str)]) -> Vmm {
    let mut c = Command::new(bin());
    c.args(args).stdout(Stdio::null()).stderr(stderr_to(stderr));
    for (k, v) in env {
        c.env(k, v);
    }
    Vmm(c.spawn().expect("start pocketvisor"))
}

/// The last counter the log at `path` shows (0 when none yet).
fn last(path: &Path) -> u64 {
    counters(&read(path)).last().copied().unwrap_or(0)
}

/// Whether the counter in `path` goes on past what it showed.
fn keeps_counting(path: &Path) -> bool {
    let now = last(path);
    wait_until(|| last(path) >= now + 3, WAIT)
}

/// A counting source (its env carries `src_env`) and a destination waiting with the key
/// byte `dst_key` (its env carries `dst_env`). None when KVM or the probe is missing.
fn pair(
    name: &str,
    dst_key: u8,
    src_env: &[(&str, &str)],
    dst_env: &[(&str, &str)],
) -> Option<Pair> {
    pair_as(name, dst_key, "dst", src_env, dst_env, false)
}

/// Bytes of the disks of [`pair_with_disks`].
const DISK_BYTES: usize = 4 << 20;

/// [`pair`] with a disk at each side: `src.img` (data, then zeros) and `dst.img` (0xee).
fn pair_with_disks(name: &str, src_env: &[(&str, &str)], dst_env: &[(&str, &str)]) -> Option<Pair> {
    pair_as(name, 7, "dst", src_env, dst_env, true)
}

/// [`pair`] with the destination showing the certificate `dst_cert`.
fn pair_as(
    name: &str,
    dst_key: u8,
    dst_cert: &str,
    src_env: &[(&str, &str)],
    dst_env: &[(&str, &str)],
    disks: bool,
) -> Option<Pair> {
    let probe = common::probe(true)?;
    let dir = Scratch::new(SCRATCH, name);
    let (mut src_disk, mut dst_disk) = (Vec::new(), Vec::new());
    if disks {
        let mut image: Vec<u8> = (0..DISK_BYTES / 2)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        image.resize(DISK_BYTES, 0);
        std::fs::write(dir.path("src.img"), image).unwrap();
        std::fs::write(dir.path("dst.img"), vec![0xeeu8; DISK_BYTES]).unwrap();
        src_disk = strings(&["--disk", dir.path("src.img").to_str().unwrap()]);
        dst_disk = strings(&["--disk", dir.path("dst.img").to_str().unwrap()]);
    }
    certificates(&dir.0);
    let key = write_key(&dir.path("dst.mkey"), dst_key);
    let serial = format!("file:{}", dir.path("src.serial").display());
    let mut src_args = strings(&[
        "run",
        "--kernel",
        probe.to_str().unwrap(),
        "--cmdline",
        "pv.mode=counter pv.counter.ms=20",
        "--memory",
        "64M",
        "--rng",
        "--serial",
        &serial,
        "--api-socket",
        dir.path("src.sock").to_str().unwrap(),
    ]);
    src_args.extend(src_disk);
    let source = spawn_env(&src_args, &dir.path("src.stderr"), src_env);
    let dst_serial = format!("file:{}", dir.path("dst.serial").display());
    let mut dest_args = strings(&[
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--key",
        key.to_str().unwrap(),
        "--serial",
        &dst_serial,
    ]);
    dest_args.extend(tls_args(&dir.0, dst_cert));
    dest_args.extend(dst_disk);
    let dest = spawn_env(&dest_args, &dir.path("dst.stderr"), dst_env);
    let stderr = dir.path("dst.stderr");
    // The line may be written in pieces (eprintln! writes each part of
    // its format separately): wait for it to be complete.
    let listen_line = || {
        let text = read(&stderr);
        let rest = text.split("waiting for a migration on ").nth(1)?;
        let (addr, _) = rest.split_once('\n')?;
        Some(addr.trim().to_string())
    };
    assert!(
        wait_until(|| listen_line().is_some(), WAIT),
        "the destination did not listen: {}",
        read(&stderr)
    );
    let addr = listen_line().expect("the listening line was complete");
    assert!(
        wait_for(&dir.path("src.serial"), "PROBE counter 3\n", WAIT),
        "the source does not count: {}",
        read(&dir.path("src.stderr"))
    );
    Some(Pair {
        dir,
        source,
        dest,
        addr,
    })
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_guest_moves_to_the_other_process_and_counts_on_there() {
    let Some(mut p) = pair("ok", 7, &[], &[]) else {
        return;
    };
    let key = write_key(&p.path("src.mkey"), 7);
    let out = p.migrate(&key);
    assert!(out.status.success(), "migrate failed: {}", text(&out));
    assert!(text(&out).contains("migrated rounds="), "{}", text(&out));
    // The source ends, with status 0, only once the destination runs the guest.
    assert_eq!(wait_exit(&mut p.source, WAIT), Some(0));
    let at_source = last(&p.src_log());
    assert!(
        wait_until(|| last(&p.dst_log()) > at_source + 3, WAIT),
        "the destination does not count on from {at_source}: {}\n{}",
        read(&p.dst_log()),
        read(&p.path("dst.stderr"))
    );
    // The guest's memory came along: it counts on from where it was, not from 0.
    let first_there = counters(&read(&p.dst_log()))[0];
    assert!(
        first_there > at_source.saturating_sub(5) && first_there <= at_source + 5,
        "the destination started at {first_there}, the source ended at {at_source}"
    );
    assert!(
        p.dest.0.try_wait().unwrap().is_none(),
        "the destination ended"
    );
}

#[test]
fn another_key_is_refused_and_the_guest_runs_on_at_the_source() {
    let Some(mut p) = pair("key", 8, &[], &[]) else {
        return;
    };
    let key = write_key(&p.path("src.mkey"), 7);
    let out = p.migrate(&key);
    assert!(!out.status.success(), "migrated under another key");
    assert!(
        text(&out).contains("the guest runs on here"),
        "{}",
        text(&out)
    );
    assert_eq!(wait_exit(&mut p.dest, WAIT), Some(1));
    assert!(
        read(&p.path("dst.stderr")).contains("nothing runs here"),
        "{}",
        read(&p.path("dst.stderr"))
    );
    assert!(keeps_counting(&p.src_log()), "the source stopped counting");
    assert!(counters(&read(&p.dst_log())).is_empty());
}

#[test]
fn a_source_with_a_certificate_from_another_authority_is_refused() {
    let Some(mut p) = pair("stranger-src", 7, &[], &[]) else {
        return;
    };
    let key = write_key(&p.path("src.mkey"), 7);
    let out = p.migrate_as(&key, "stranger-src");
    assert!(
        !out.status.success(),
        "migrated with a stranger's certificate"
    );
    assert!(
        text(&out).contains("the guest runs on here"),
        "{}",
        text(&out)
    );
    assert_eq!(wait_exit(&mut p.dest, WAIT), Some(1));
    let why = read(&p.path("dst.stderr"));
    assert!(why.contains("TLS handshake"), "{why}");
    assert!(keeps_counting(&p.src_log()), "the source stopped counting");
    assert!(counters(&read(&p.dst_log())).is_empty());
}

#[test]
fn a_destination_with_a_certificate_from_another_authority_is_refused() {
    let Some(mut p) = pair_as("stranger-dst", 7, "stranger-dst", &[], &[], false) else {
        return;
    };
    let key = write_key(&p.path("src.mkey"), 7);
    let out = p.migrate(&key);
    assert!(!out.status.success(), "migrated to a stranger");
    assert!(text(&out).contains("TLS handshake"), "{}", text(&out));
    assert!(
        text(&out).contains("the guest runs on here"),
        "{}",
        text(&out)
    );
    assert_eq!(wait_exit(&mut p.dest, WAIT), Some(1));
    assert!(keeps_counting(&p.src_log()), "the source stopped counting");
    assert!(counters(&read(&p.dst_log())).is_empty());
}

/// The source is killed at `point`: the destination must not run the guest.
fn source_killed_before_commit(point: &str) {
    let env = [(KILL_AT, point)];
    let Some(mut p) = pair(&format!("src-{point}"), 7, &env, &[]) else {
        return;
    };
    let key = write_key(&p.path("src.mkey"), 7);
    let out = p.migrate(&key);
    assert!(!out.status.success(), "{}", text(&out));
    assert_eq!(
        wait_exit(&mut p.source, WAIT),
        None,
        "not killed at {point}"
    );
    assert_eq!(
        wait_exit(&mut p.dest, WAIT),
        Some(1),
        "{}",
        read(&p.path("dst.stderr"))
    );
    assert!(
        counters(&read(&p.dst_log())).is_empty(),
        "the guest ran at the destination"
    );
}

#[test]
fn source_killed_during_the_rounds_runs_nothing_at_the_destination() {
    source_killed_before_commit("migrate-round");
}

#[test]
fn source_killed_during_stop_and_copy_runs_nothing_at_the_destination() {
    source_killed_before_commit("migrate-stop-copy");
}

#[test]
fn source_killed_just_after_the_commit_leaves_the_guest_at_the_destination() {
    let env = [(KILL_AT, "migrate-committed")];
    let Some(mut p) = pair("src-committed", 7, &env, &[]) else {
        return;
    };
    let key = write_key(&p.path("src.mkey"), 7);
    let _ = p.migrate(&key);
    assert_eq!(wait_exit(&mut p.source, WAIT), None, "not killed");
    assert!(
        wait_until(|| last(&p.dst_log()) > 3, WAIT),
        "the destination does not run the guest: {}",
        read(&p.path("dst.stderr"))
    );
    assert!(keeps_counting(&p.dst_log()));
}

/// The destination is killed at `point` before the source committed: the guest runs on at
/// the source.
fn destination_killed_before_commit(point: &str) {
    let env = [(KILL_AT, point)];
    let Some(mut p) = pair(&format!("dst-{point}"), 7, &[], &env) else {
        return;
    };
    let key = write_key(&p.path("src.mkey"), 7);
    let out = p.migrate(&key);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("the guest runs on here"),
        "{}",
        text(&out)
    );
    assert_eq!(wait_exit(&mut p.dest, WAIT), None, "not killed at {point}");
    assert!(keeps_counting(&p.src_log()), "the source stopped counting");
}

#[test]
fn destination_killed_during_the_rounds_leaves_the_guest_at_the_source() {
    destination_killed_before_commit("receive-round");
}

#[test]
fn destination_killed_during_stop_and_copy_leaves_the_guest_at_the_source() {
    destination_killed_before_commit("receive-state");
}

#[test]
fn destination_killed_after_the_commit_leaves_the_guest_paused_at_the_source() {
    let env = [(KILL_AT, "receive-committed")];
    let Some(mut p) = pair("dst-committed", 7, &[], &env) else {
        return;
    };
    let key = write_key(&p.path("src.mkey"), 7);
    let out = p.migrate(&key);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("in doubt"), "{}", text(&out));
    assert_eq!(wait_exit(&mut p.dest, WAIT), None, "not killed");
    // In doubt: paused here, never lost; the guest did not run there.
    let held = last(&p.src_log());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(last(&p.src_log()), held, "the source ran on while in doubt");
    assert!(p.source.0.try_wait().unwrap().is_none(), "the source ended");
    assert!(counters(&read(&p.dst_log())).is_empty());
    let out = Command::new(bin())
        .args(["unpause", "--api-socket"])
        .arg(p.sock())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(keeps_counting(&p.src_log()), "unpause did not run it again");
}

/// The file names in `dir` that are not the ones a pair starts with.
fn temporary_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("migrating"))
        .collect()
}

#[test]
fn a_disk_goes_with_the_guest_and_replaces_the_destinations() {
    let Some(p) = pair_with_disks("disk-ok", &[], &[]) else {
        return;
    };
    let key = write_key(&p.path("src.mkey"), 7);
    let out = p.migrate(&key);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("disk_chunks="), "{}", text(&out));
    assert!(keeps_counting(&p.dst_log()));
    assert!(
        std::fs::read(p.path("dst.img")).unwrap() == std::fs::read(p.path("src.img")).unwrap(),
        "the destination disk is not the source's"
    );
    assert_eq!(temporary_files(&p.dir.0), Vec::<String>::new());
}

#[test]
fn destination_killed_mid_disk_changes_no_disk_and_the_guest_runs_on_at_the_source() {
    let env = [(KILL_AT, "receive-disk")];
    let Some(mut p) = pair_with_disks("dst-receive-disk", &[], &env) else {
        return;
    };
    let key = write_key(&p.path("src.mkey"), 7);
    let src_before = std::fs::read(p.path("src.img")).unwrap();
    let out = p.migrate(&key);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("the guest runs on here"),
        "{}",
        text(&out)
    );
    assert_eq!(
        wait_exit(&mut p.dest, WAIT),
        None,
        "not killed at receive-disk"
    );
    assert!(keeps_counting(&p.src_log()), "the source stopped counting");
    assert!(
        std::fs::read(p.path("dst.img")).unwrap() == vec![0xeeu8; DISK_BYTES],
        "the destination disk changed"
    );
    assert!(
        std::fs::read(p.path("src.img")).unwrap() == src_before,
        "the source disk changed"
    );
    // SIGKILL leaves the temporary file (the next migration to that disk removes it).
    assert_eq!(
        temporary_files(&p.dir.0).len(),
        1,
        "{:?}",
        temporary_files(&p.dir.0)
    );
}
