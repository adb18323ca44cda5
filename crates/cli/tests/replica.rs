//! Replicas (issue 13): the probe guest (blk-counter mode: it counts and writes a 4 KiB block
//! of its disk every 20 ms) runs in `pocketvisor run --api-socket`; `pocketvisor cloud
//! replicate` sends sealed incremental checkpoints to `pocketvisor cloud serve` on loopback;
//! the device's VMM is killed (kill -9) and `pocketvisor cloud recover` writes the VM as the
//! last stored checkpoint left it, which `pocketvisor restore` runs in a new process: the
//! counter goes on from there and the disk is, byte for byte, what the guest had written.
//! The host's files hold none of what the guest wrote in the clear; another device cannot
//! recover the replica; a flipped byte in a stored checkpoint is refused; a host killed while
//! it stores a checkpoint, and a device whose VMM is killed in the middle of one, leave the
//! one before recoverable. The main round trip and the host killed mid-store run again with
//! the checkpoints in an object store (`cloud serve --replica-store file:///DIR`), and serve
//! refuses a store URL it cannot use before it listens.
//!
//! Skipped (with a SKIP line on stderr) where /dev/kvm is missing or the probe cannot be built.

mod cloud_common;
mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cloud_common::{authority, blk_counters, issue, tls_args};
use common::{bin, read, wait_for, wait_until, Scratch, Vmm};

const WAIT: Duration = Duration::from_secs(30);
const DISK_BYTES: usize = 4 << 20;
/// What the probe writes into each disk block, a pattern the host must never see.
const PATTERN: &[u8] = b"pocketvisor-probe-blk:";

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The disk image the device's VM starts with: half data, half zeros.
fn device_image() -> Vec<u8> {
    let mut image: Vec<u8> = (0..DISK_BYTES / 2)
        .map(|i| u8::try_from((i * 7) % 251).unwrap())
        .collect();
    image.resize(DISK_BYTES, 0);
    image
}

/// Checks the recovered `disk` byte for byte after the blk-counter writes 0..=`last` (see
/// [`cloud_common::assert_disk_after_writes`]).
fn assert_disk_after_writes(disk: &[u8], last: u64) {
    cloud_common::assert_disk_after_writes(disk, &device_image(), last, "the recovered disk");
}

/// Where the cloud host keeps replicas.
#[derive(Clone, Copy, PartialEq)]
enum Keep {
    /// Files in the replica twin's directory (the default).
    TwinDir,
    /// object_store's local-file backend (`--replica-store file:///<scratch>/objects`).
    Objects,
}

/// A cloud host on loopback, two devices' certificates (`phone`, `tablet`), a recovery key
/// pair, and the phone's counting, disk-writing VM.
struct Setup {
    dir: Scratch,
    serve: Option<Vmm>,
    addr: String,
    phone: Option<Vmm>,
    keep: Keep,
}

impl Setup {
    fn new(name: &str, keep: Keep) -> Option<Setup> {
        Setup::new_with(name, &[], keep)
    }

    /// [`Setup::new`], the device's VMM started with `env`.
    fn new_with(name: &str, env: &[(&str, &str)], keep: Keep) -> Option<Setup> {
        let probe = common::probe(true)?;
        // Each store's run of a test in a directory of its own (they run at once).
        let name = match keep {
            Keep::TwinDir => name.to_string(),
            Keep::Objects => format!("{name}-objects"),
        };
        let dir = Scratch::new("pv-replicatest", &name);
        let ca = authority();
        issue(&dir.0, "cloud", "127.0.0.1", &ca);
        issue(&dir.0, "phone", "phone.example", &ca);
        issue(&dir.0, "tablet", "tablet.example", &ca);
        std::fs::write(dir.path("cloud.mkey"), "5a".repeat(32) + "\n").unwrap();
        let keygen = Command::new(bin())
            .args(["keygen", "-o"])
            .arg(dir.path("recovery.key"))
            .output()
            .unwrap();
        assert!(keygen.status.success(), "{}", text(&keygen));
        std::fs::write(dir.path("recovery.pub"), &keygen.stdout).unwrap();
        std::fs::write(dir.path("phone.img"), device_image()).unwrap();
        let phone = Vmm(Command::new(bin())
            .args(["run", "--kernel", probe.to_str().unwrap()])
            .args(["--cmdline", "pv.mode=blk-counter pv.counter.ms=20"])
            .args(["--memory", "64M", "--serial"])
            .arg(format!("file:{}", dir.path("phone.serial").display()))
            .arg("--api-socket")
            .arg(dir.path("phone.sock"))
            .arg("--disk")
            .arg(dir.path("phone.img"))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(File::create(dir.path("phone.stderr")).unwrap())
            .spawn()
            .expect("start the device's VM"));
        assert!(
            wait_for(&dir.path("phone.serial"), "PROBE blk-counter 3\n", WAIT),
            "the device's guest does not count: {}",
            read(&dir.path("phone.stderr"))
        );
        let mut s = Setup {
            dir,
            serve: None,
            addr: String::new(),
            phone: Some(phone),
            keep,
        };
        s.serve(&[]);
        Some(s)
    }

    /// (Re)starts the cloud host on the same state, its processes with `env`.
    fn serve(&mut self, env: &[(&str, &str)]) {
        self.serve = None;
        let (serve, addr) = cloud_common::serve(
            &self.dir.0,
            &self.dir.path("cloud.mkey"),
            &self.replica_store(),
            env,
        );
        self.addr = addr;
        self.serve = Some(serve);
    }

    /// The host's `--replica-store` (its directory created), if it keeps objects.
    fn replica_store(&self) -> Vec<String> {
        if self.keep == Keep::TwinDir {
            return Vec::new();
        }
        let objects = self.dir.path("objects");
        std::fs::create_dir_all(&objects).unwrap();
        vec![
            "--replica-store".into(),
            format!("file://{}", objects.display()),
        ]
    }

    /// The migration key's and `who`'s certificate flags.
    fn tls(&self, who: &str) -> Vec<String> {
        let mut args = vec![
            "--key".into(),
            self.dir.path("cloud.mkey").display().to_string(),
        ];
        args.extend(tls_args(&self.dir.0, who));
        args
    }

    /// `cloud replicate phone` every second, `count` checkpoints (None: until killed).
    fn replicate(&self, count: Option<u64>) -> Command {
        let mut c = Command::new(bin());
        c.args(["cloud", "replicate", "phone", "--api-socket"])
            .arg(self.dir.path("phone.sock"))
            .args(["--to", &self.addr, "--every", "1s", "--recipient"])
            .arg(read(&self.dir.path("recovery.pub")).trim())
            .arg("--work")
            .arg(self.dir.path("work"))
            .args(self.tls("phone"));
        if let Some(n) = count {
            c.args(["--count", &n.to_string()]);
        }
        c
    }

    /// `cloud recover phone` as `who` into `<out>` and `<out>.img`.
    fn recover(&self, who: &str, out: &str) -> Output {
        Command::new(bin())
            .args([
                "cloud",
                "recover",
                "phone",
                "--from",
                &self.addr,
                "--identity",
            ])
            .arg(self.dir.path("recovery.key"))
            .arg("-o")
            .arg(self.dir.path(out))
            .arg("--disk")
            .arg(self.dir.path(&format!("{out}.img")))
            .args(self.tls(who))
            .output()
            .unwrap()
    }

    /// Kills the device's VMM (kill -9) and returns the last counter it printed.
    fn lose_the_phone(&mut self) -> u64 {
        let mut vm = self.phone.take().unwrap();
        vm.0.kill().unwrap();
        vm.0.wait().unwrap();
        *blk_counters(&read(&self.dir.path("phone.serial")))
            .last()
            .unwrap()
    }

    /// Restores `<out>` with `<out>.img` in a new process and returns the first counters it
    /// prints, with the disk as recovered (read before the guest runs on).
    fn restore(&self, out: &str) -> (Vec<u64>, Vec<u8>, Vmm) {
        let disk = std::fs::read(self.dir.path(&format!("{out}.img"))).unwrap();
        let serial = self.dir.path(&format!("{out}.serial"));
        let vm = Vmm(Command::new(bin())
            .arg("restore")
            .arg(self.dir.path(out))
            .arg("--disk")
            .arg(self.dir.path(&format!("{out}.img")))
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .stdout(Stdio::null())
            .stderr(File::create(self.dir.path(&format!("{out}.stderr"))).unwrap())
            .spawn()
            .unwrap());
        assert!(
            wait_until(|| blk_counters(&read(&serial)).len() >= 5, WAIT),
            "the recovered guest does not count: {}{}",
            read(&self.dir.path(&format!("{out}.stderr"))),
            read(&serial)
        );
        (blk_counters(&read(&serial)), disk, vm)
    }

    /// Recovers the phone's replica as the phone into `back` and `back.img`, from a chain of
    /// `checkpoints`, and restores it in a new process: the first counters it prints, its disk
    /// checked to be what the guest had written before the first of them.
    fn recover_and_restore(&self, checkpoints: u64) -> (Vec<u64>, Vmm) {
        let got = self.recover("phone", "back");
        assert!(got.status.success(), "{}", text(&got));
        assert!(
            text(&got).contains(&format!("recovered checkpoints={checkpoints}")),
            "{}",
            text(&got)
        );
        let (counted, disk, vm) = self.restore("back");
        assert_disk_after_writes(&disk, counted[0] - 1);
        (counted, vm)
    }

    /// Every checkpoint the host stores (a file, or an object of its local-file backend),
    /// whole (not an object store's staging file, `<key>#<n>`).
    fn stored(&self) -> Vec<PathBuf> {
        let mut all = Vec::new();
        let mut dirs = vec![self.dir.path("state")];
        if self.keep == Keep::Objects {
            dirs.push(self.dir.path("objects"));
        }
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "pvr") {
                    all.push(p);
                }
            }
        }
        all.sort();
        all
    }
}

impl Setup {
    /// The one directory in `<scratch>/<dir>` (a device's, named by its hexadecimal id).
    fn only_device_in(&self, dir: &str) -> String {
        let names: Vec<String> = std::fs::read_dir(self.dir.path(dir))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        names[0].clone()
    }
}

/// The `key=N` figure of a line.
fn figure(line: &str, key: &str) -> u64 {
    line.split(&format!(" {key}="))
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

/// Whether any file under `dir` holds `needle`.
fn any_file_holds(dir: &Path, needle: &[u8]) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = any_file_holds(&p, needle) {
                return Some(f);
            }
        } else if std::fs::read(&p)
            .unwrap_or_default()
            .windows(needle.len())
            .any(|w| w == needle)
        {
            return Some(p);
        }
    }
    None
}

#[test]
fn a_lost_device_s_guest_resumes_from_its_last_checkpoint_and_only_its_owner_can_have_it() {
    lost_device_recovers(Keep::TwinDir);
}

#[test]
fn a_lost_device_recovers_from_an_object_store() {
    lost_device_recovers(Keep::Objects);
}

fn lost_device_recovers(keep: Keep) {
    let Some(mut s) = Setup::new("recover", keep) else {
        return;
    };
    let before = *blk_counters(&read(&s.dir.path("phone.serial")))
        .last()
        .unwrap();
    let out = s.replicate(Some(3)).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    // The first is full; the others hold only what changed (a few blocks and pages).
    assert!(
        lines[0].contains("seq=1 ") && lines[0].contains("full=true"),
        "{lines:?}"
    );
    for l in &lines[1..] {
        assert!(l.contains("full=false"), "{l}");
        assert!(figure(l, "bytes") < figure(&lines[0], "bytes"), "{lines:?}");
    }
    eprintln!("MEASURE replica-checkpoints {lines:?}");
    let lost_at = s.lose_the_phone();

    // The host holds ciphertext only: not one block the guest wrote.
    let stored = s.stored();
    assert_eq!(stored.len(), 3, "{stored:?}");
    assert_eq!(any_file_holds(&s.dir.path("state"), PATTERN), None);
    if keep == Keep::Objects {
        // All in the object store, under the device's key, none in the twin's directory.
        let device = s.dir.path("objects").join(s.only_device_in("objects"));
        assert!(
            stored.iter().all(|p| p.starts_with(device.join("phone"))),
            "{stored:?}"
        );
        assert_eq!(any_file_holds(&s.dir.path("objects"), PATTERN), None);
    }

    // Another device cannot have it, and is told it does not exist.
    let theirs = s.recover("tablet", "stolen");
    assert!(!theirs.status.success());
    assert!(text(&theirs).contains("no twin named"), "{}", text(&theirs));
    assert!(!s.dir.path("stolen").exists() && !s.dir.path("stolen.img").exists());

    let (counted, _vm) = s.recover_and_restore(3);
    // It goes on from the last checkpoint: after what it had counted before replicating,
    // not after what it counted when it was lost, and never backwards.
    let first = counted[0];
    assert!(
        first > before + 1 && first <= lost_at + 1,
        "the recovered guest starts at {first}: before replicating {before}, lost at {lost_at}"
    );
    assert!(counted.windows(2).all(|w| w[1] == w[0] + 1), "{counted:?}");

    // One flipped byte in a stored checkpoint: refused, nothing written.
    let victim = &s.stored()[1];
    let mut bytes = std::fs::read(victim).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    std::fs::write(victim, &bytes).unwrap();
    let bad = s.recover("phone", "damaged");
    assert!(!bad.status.success());
    assert!(text(&bad).contains("checkpoint 2"), "{}", text(&bad));
    assert!(!s.dir.path("damaged").exists() && !s.dir.path("damaged.img").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&s.dir.0)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".damaged"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_host_killed_while_it_stores_a_checkpoint_keeps_the_one_before() {
    host_killed_while_storing(Keep::TwinDir);
}

#[test]
fn a_host_killed_while_it_stores_an_object_keeps_the_one_before() {
    host_killed_while_storing(Keep::Objects);
}

fn host_killed_while_storing(keep: Keep) {
    let Some(mut s) = Setup::new("killed", keep) else {
        return;
    };
    let first = s.replicate(Some(1)).output().unwrap();
    assert!(first.status.success(), "{}", text(&first));
    let at_first = *blk_counters(&read(&s.dir.path("phone.serial")))
        .last()
        .unwrap();
    // Every process of the host now dies (kill -9) once a piece of a checkpoint after a
    // chain's first is written; the device's replicate goes on trying.
    s.serve(&[("POCKETVISOR_KILL_AT", "replica-store")]);
    let stderr = s.dir.path("replicate.stderr");
    let mut replicating = Vmm(s
        .replicate(None)
        .stdout(Stdio::null())
        .stderr(File::create(&stderr).unwrap())
        .spawn()
        .unwrap());
    // A new run starts a new chain: its full checkpoint is stored, the next is killed.
    assert!(
        wait_until(|| read(&stderr).matches("not stored").count() >= 2, WAIT),
        "{}",
        read(&stderr)
    );
    replicating.0.kill().unwrap();
    replicating.0.wait().unwrap();
    let lost_at = s.lose_the_phone();
    let stored = s.stored();
    assert_eq!(stored.len(), 1, "{stored:?}");
    s.serve(&[]);
    let (counted, _vm) = s.recover_and_restore(1);
    assert!(
        counted[0] > at_first && counted[0] <= lost_at + 1,
        "{counted:?} after {at_first}, lost at {lost_at}"
    );
}

#[test]
fn a_new_full_checkpoint_every_n_replaces_the_chain_at_the_host() {
    let Some(mut s) = Setup::new("full-every", Keep::TwinDir) else {
        return;
    };
    let out = s
        .replicate(Some(3))
        .args(["--full-every", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let full: Vec<bool> = said.lines().map(|l| l.contains("full=true")).collect();
    assert_eq!(full, vec![true, false, true], "{said}");
    assert!(said.lines().nth(2).unwrap().contains("seq=1 "), "{said}");
    // The host keeps only the new chain.
    assert_eq!(s.stored().len(), 1);
    let lost_at = s.lose_the_phone();
    let (counted, _vm) = s.recover_and_restore(1);
    assert!(counted[0] <= lost_at + 1, "{counted:?} lost at {lost_at}");
}

#[test]
fn a_device_killed_in_the_middle_of_a_checkpoint_leaves_the_one_before() {
    // The device's VMM dies (kill -9) once the live copy of an incremental checkpoint is
    // written, before its pause: the first (full) checkpoint is stored, the second never is.
    let Some(mut s) = Setup::new_with(
        "vmm-killed",
        &[("POCKETVISOR_KILL_AT", "checkpoint-live")],
        Keep::TwinDir,
    ) else {
        return;
    };
    let out = s.replicate(Some(3)).output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(said.lines().count(), 1, "{said}");
    assert!(
        said.contains("seq=1 ") && said.contains("full=true"),
        "{said}"
    );
    let vm = s.phone.as_mut().unwrap();
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = vm.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < WAIT,
            "the device's VMM was not killed: {}",
            text(&out)
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "{status:?}"
    );
    let lost_at = s.lose_the_phone();
    // The host has the first one only.
    assert_eq!(s.stored().len(), 1);
    let (counted, _vm) = s.recover_and_restore(1);
    assert!(counted[0] <= lost_at + 1, "{counted:?} lost at {lost_at}");
}

#[test]
fn serve_refuses_a_replica_store_it_cannot_use_before_it_listens() {
    let dir = Scratch::new("pv-replicatest", "bad-store");
    std::fs::write(dir.path("cloud.mkey"), "5a".repeat(32) + "\n").unwrap();
    let objects = dir.path("objects");
    for (url, why) in [
        ("s3://bucket/replicas".to_string(), "file:///ABS/DIR"),
        ("file://objects".to_string(), "must be absolute"),
        (format!("file://{}", objects.display()), "no such directory"),
    ] {
        let out = Command::new(bin())
            .args(["cloud", "serve", "--listen", "127.0.0.1:0", "--state"])
            .arg(dir.path("state"))
            .arg("--key")
            .arg(dir.path("cloud.mkey"))
            .args([
                "--tls-cert",
                "c.pem",
                "--tls-key",
                "c.key",
                "--tls-ca",
                "ca.pem",
            ])
            .args(["--replica-store", &url])
            .output()
            .unwrap();
        let said = text(&out);
        assert!(!out.status.success(), "{url}: {said}");
        assert!(
            said.contains("--replica-store") && said.contains(why),
            "{url}: {said}"
        );
        assert!(!said.contains("listening"), "{url}: {said}");
    }
}
