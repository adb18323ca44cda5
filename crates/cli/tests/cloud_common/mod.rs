//! Helpers for tests that use a cloud host: certificates, `pocketvisor cloud serve` on
//! loopback, and the probe's blk-counter writes (what a disk must hold after them).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{bin, read, wait_until, Scratch, Vmm};

/// A certificate authority.
pub struct Authority {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// A new certificate authority.
pub fn authority() -> Authority {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    Authority {
        cert: params.self_signed(&key).unwrap(),
        key,
    }
}

/// Writes `who`.pem, `who`.key and `who`-ca.pem into `dir`: a certificate for `name`
/// signed by `ca`, its key, and `ca` itself.
pub fn issue(dir: &Path, who: &str, name: &str, ca: &Authority) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&key, &ca.cert, &ca.key)
        .unwrap();
    std::fs::write(dir.join(format!("{who}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{who}.key")), key.serialize_pem()).unwrap();
    std::fs::write(dir.join(format!("{who}-ca.pem")), ca.cert.pem()).unwrap();
}

/// A cloud host on loopback (`pocketvisor cloud serve`), with the certificates of two
/// devices (`phone`, `tablet`) in its scratch directory.
pub struct CloudHost {
    /// Its scratch directory (certificates, `state/`, `serve.stderr`).
    pub dir: Scratch,
    _serve: Vmm,
    /// Where it listens, `127.0.0.1:PORT`.
    pub addr: String,
    /// The migration key file it shares with the devices.
    pub key: PathBuf,
}

impl Drop for CloudHost {
    fn drop(&mut self) {
        // Twins outlive `cloud serve`.
        crate::common::kill_twins(&self.state());
    }
}

impl CloudHost {
    /// Starts one in a new scratch directory.
    pub fn start(prefix: &str, name: &str) -> CloudHost {
        let dir = Scratch::new(prefix, name);
        let ca = authority();
        issue(&dir.0, "cloud", "127.0.0.1", &ca);
        issue(&dir.0, "phone", "phone.example", &ca);
        issue(&dir.0, "tablet", "tablet.example", &ca);
        let key = dir.path("cloud.mkey");
        std::fs::write(&key, "5a".repeat(32) + "\n").unwrap();
        let (serve, addr) = serve(&dir.0, &key, &[], &[]);
        CloudHost {
            dir,
            _serve: serve,
            addr,
            key,
        }
    }

    /// The host's state directory.
    pub fn state(&self) -> PathBuf {
        self.dir.path("state")
    }

    /// The directories of every device's twins, as `<device>/<name>`.
    pub fn twin_dirs(&self) -> Vec<String> {
        twin_dirs(&self.state())
    }

    /// `pocketvisor cloud return NAME` to this host as the device `who`, with `more` flags.
    pub fn cloud_return(&self, who: &str, name: &str, more: &[&str]) -> std::process::Output {
        Command::new(bin())
            .args(["cloud", "return", name, "--from", &self.addr, "--key"])
            .arg(&self.key)
            .args(tls_args(&self.dir.0, who))
            .args(more)
            .output()
            .expect("run pocketvisor cloud return")
    }

    /// Gives a handset's state directory `state` the identity of device `who` towards this
    /// host (`<state>/cloud/`: cert.pem, key.pem, ca.pem, migration.key).
    pub fn give_identity(&self, state: &Path, who: &str) {
        use std::os::unix::fs::PermissionsExt;
        let cloud = state.join("cloud");
        std::fs::create_dir_all(&cloud).unwrap();
        for (from, to, mode) in [
            (format!("{who}.pem"), "cert.pem", 0o644),
            (format!("{who}.key"), "key.pem", 0o600),
            (format!("{who}-ca.pem"), "ca.pem", 0o644),
            ("cloud.mkey".to_string(), "migration.key", 0o600),
        ] {
            std::fs::copy(self.dir.path(&from), cloud.join(to)).unwrap();
            std::fs::set_permissions(cloud.join(to), std::fs::Permissions::from_mode(mode))
                .unwrap();
        }
    }
}

/// The flags naming the certificate, key and CA of `who` in `dir` (see [`issue`]).
pub fn tls_args(dir: &Path, who: &str) -> Vec<String> {
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

/// Starts `pocketvisor cloud serve` on loopback on the state `dir/state`, with the migration
/// key `key`, the certificate `cloud` in `dir` and the flags `more`, its processes with `env`;
/// its stderr is appended to `dir/serve.stderr` (a host started again keeps what the one
/// before said). Returns it once it listens, and the address it listens on.
pub fn serve(dir: &Path, key: &Path, more: &[String], env: &[(&str, &str)]) -> (Vmm, String) {
    serve_in(None, dir, key, more, env)
}

/// [`serve`] inside the network namespace `netns` when given (`ip netns exec`, which execs
/// pocketvisor: the process is the host's).
pub fn serve_in(
    netns: Option<&str>,
    dir: &Path,
    key: &Path,
    more: &[String],
    env: &[(&str, &str)],
) -> (Vmm, String) {
    let stderr = dir.join("serve.stderr");
    let before = read(&stderr).len();
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, bin()]);
            c
        }
        None => Command::new(bin()),
    };
    let serve = Vmm(command
        .args(["cloud", "serve", "--listen", "127.0.0.1:0", "--state"])
        .arg(dir.join("state"))
        .arg("--key")
        .arg(key)
        .args(tls_args(dir, "cloud"))
        .args(more)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&stderr)
                .unwrap(),
        )
        .spawn()
        .expect("start pocketvisor cloud serve"));
    let listen_line = || {
        let text = read(&stderr);
        let rest = text
            .get(before..)?
            .split("cloud host listening on ")
            .nth(1)?;
        let (addr, _) = rest.split_once('\n')?;
        Some(addr.trim().to_string())
    };
    assert!(
        wait_until(|| listen_line().is_some(), Duration::from_secs(30)),
        "the cloud host did not listen: {}",
        read(&stderr)
    );
    let addr = listen_line().unwrap();
    (serve, addr)
}

/// The directories of every device's twins in a host's state directory `state`, as
/// `<device>/<name>`, sorted.
pub fn twin_dirs(state: &Path) -> Vec<String> {
    let mut all = Vec::new();
    let Ok(devices) = std::fs::read_dir(state.join("twins")) else {
        return all;
    };
    for d in devices {
        let d = d.unwrap();
        for t in std::fs::read_dir(d.path()).unwrap() {
            let t = t.unwrap();
            all.push(format!(
                "{}/{}",
                d.file_name().to_string_lossy(),
                t.file_name().to_string_lossy()
            ));
        }
    }
    all.sort();
    all
}

/// The values of every complete `PROBE blk-counter N` line (a line cut short by a switch
/// is not one: its number may be cut too).
pub fn blk_counters(text: &str) -> Vec<u64> {
    text.split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
        .filter_map(|l| l.trim_end().strip_prefix("PROBE blk-counter "))
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// The 4 KiB the probe's blk-counter mode writes for tag `n`.
pub fn blk_pattern(n: u64) -> Vec<u8> {
    let line = format!("pocketvisor-probe-blk:{n}\n");
    line.bytes().cycle().take(4096).collect()
}

/// Checks `disk` byte for byte against `initial` after the blk-counter writes 0..=`last`
/// (each at slot n modulo the disk's slots, later ones over earlier ones); the slot of write
/// `last + 1` may hold it too (done, its line not yet printed).
pub fn assert_disk_after_writes(disk: &[u8], initial: &[u8], last: u64, what: &str) {
    assert_eq!(disk.len(), initial.len(), "{what}: size");
    let slots = u64::try_from(initial.len() / 4096).unwrap();
    let mut expected = initial.to_vec();
    for n in last.saturating_sub(slots - 1)..=last {
        let at = usize::try_from(n % slots).unwrap() * 4096;
        expected[at..at + 4096].copy_from_slice(&blk_pattern(n));
    }
    let pending = usize::try_from((last + 1) % slots).unwrap() * 4096;
    for slot in 0..initial.len() / 4096 {
        let range = slot * 4096..(slot + 1) * 4096;
        let ok = disk[range.clone()] == expected[range.clone()]
            || (range.start == pending && disk[range.clone()] == blk_pattern(last + 1)[..]);
        assert!(
            ok,
            "{what}: 4 KiB slot {slot} is not what the guest wrote (last write {last})"
        );
    }
}

/// The twin's VM (the one the host said it started last, `jailed VMM is pid N`) runs jailed:
/// as the unprivileged twin user, without capabilities, under seccomp, and sees nothing of
/// the host but /dev/kvm and its twin's directory (no TLS key, no migration key, no store).
pub fn the_twin_runs_jailed(serve_stderr: &str) {
    the_twin_runs_jailed_with(serve_stderr, &["serial.log", "disk0.img"]);
}

/// [`the_twin_runs_jailed`] for a twin whose directory, as its jailed VM sees it, holds
/// `files`; returns the jailed process's pid.
pub fn the_twin_runs_jailed_with(serve_stderr: &str, files: &[&str]) -> u32 {
    let vmm: u32 = serve_stderr
        .rsplit_once("jailed VMM is pid ")
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("the host names no twin VMM: {serve_stderr}"));
    // The jailed process: the child of that VMM process, in a pid namespace of its own.
    let child = || {
        std::fs::read_dir("/proc").ok()?.find_map(|e| {
            let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == vmm).then_some(pid)
        })
    };
    assert!(
        wait_until(|| child().is_some(), Duration::from_secs(30)),
        "the twin's VMM {vmm} has no jailed child"
    );
    let pid = child().unwrap();
    let status = read(Path::new(&format!("/proc/{pid}/status")));
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("no {key}: {status}"))
            .split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    for key in ["Uid", "Gid"] {
        let ids = field(key);
        assert!(
            ids.iter().all(|id| id != "0" && id == &ids[0]),
            "{key} {ids:?}"
        );
    }
    assert_eq!(field("CapEff"), ["0000000000000000"]);
    assert_eq!(field("NoNewPrivs"), ["1"]);
    assert_eq!(field("Seccomp"), ["2"]);
    // Its root is the jail's: the devices and the twin's directory, nothing else.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut top: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["dev", "run"], "the twin's VMM sees more of the host");
    let run: Vec<String> = std::fs::read_dir(root.join("run"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(run, ["0"]);
    for f in files {
        assert!(
            root.join("run/0").join(f).exists(),
            "the jailed VM has no {f}"
        );
    }
    // The connection's key file is gone once the VMM was connected.
    assert!(!root.join("run/0/receive.key").exists());
    pid
}
