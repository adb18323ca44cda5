//! `pocketvisor vmm`: the jail around one VM, checked from the outside.
//!
//! Needs root and /dev/kvm; each test prints a SKIP line on stderr and passes otherwise.

use std::collections::BTreeSet;
mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{bin, counters, skip, wait_exit, wait_until, Scratch, Vmm};

/// Scratch directories' prefix.
const SCRATCH: &str = "pv-jailtest";

/// The probe kernel; None (after a SKIP line) without root, KVM or the probe.
fn probe() -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("jail tests need root");
        return None;
    }
    Some(common::probe(true)?.canonicalize().unwrap())
}

impl Scratch {
    /// The jail root inside the scratch directory.
    fn jail_root(&self) -> PathBuf {
        self.path("jails")
    }
}

/// One profile's files: `<scratch>/<name>/{disk.img,vm.toml,run/}`.
struct Profile {
    dir: PathBuf,
}

impl Profile {
    fn new(s: &Scratch, name: &str, probe: &Path, cmdline: &str, extra: &str) -> Profile {
        let dir = s.path(name);
        std::fs::create_dir_all(dir.join("run")).unwrap();
        std::fs::File::create(dir.join("disk.img"))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let toml = format!(
            "kernel = {probe:?}\ncmdline = {cmdline:?}\nmemory_mib = 128\nrng = true\n\
             disks = [{{ path = {:?} }}]\nserial = {{ file = {:?} }}\n{extra}",
            dir.join("disk.img"),
            dir.join("run/serial.log"),
        );
        std::fs::write(dir.join("vm.toml"), toml).unwrap();
        Profile { dir }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    fn serial(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.path("run/serial.log")).unwrap_or_default())
            .into_owned()
    }
}

fn vmm_command(s: &Scratch, p: &Profile, id: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.arg("vmm")
        .arg("--config")
        .arg(p.path("vm.toml"))
        .arg("--jail-id")
        .arg(id)
        .arg("--jail-root")
        .arg(s.jail_root())
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Everything the VMM wrote on stderr; a VMM still running is killed first (its stderr
/// would not end, and a failing check would hang instead of saying why).
fn stderr_of(vmm: &mut Vmm) -> String {
    if matches!(vmm.0.try_wait(), Ok(None)) {
        let _ = vmm.0.kill();
        let _ = vmm.0.wait();
    }
    let mut s = String::new();
    if let Some(e) = vmm.0.stderr.as_mut() {
        use std::io::Read;
        let _ = e.read_to_string(&mut s);
    }
    s
}

/// The jailed process: the child of the `pocketvisor vmm` process we started.
fn jailed_pid(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let after_comm = stat.rsplit_once(')')?.1;
        let ppid: u32 = after_comm.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == parent).then_some(pid)
    })
}

/// `Key:` value of /proc/<pid>/status.
fn status_field(pid: u32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// The thread kind of a VMM thread's name (vcpu, worker, api, log, spawner), if it has one.
fn thread_kind(comm: &str) -> Option<&'static str> {
    match comm.trim() {
        c if c.starts_with("vcpu") => Some("vcpu"),
        c if c.starts_with("virtio-") => Some("worker"),
        c if c.starts_with("api") => Some("api"),
        c if c.starts_with("vnc") => Some("display"),
        "serial-log" => Some("log"),
        "spawner" => Some("spawner"),
        _ => None,
    }
}

/// Checks that each vCPU, device worker and API thread of `pid` has exactly one filter more
/// than the main thread (its kind's own, no other kind's), the spawner none; returns the
/// kinds seen with their filter counts. None (after a SKIP line) when the kernel does not
/// show `Seccomp_filters` (before Linux 5.9).
fn thread_filters(pid: u32) -> Option<std::collections::BTreeMap<&'static str, u32>> {
    let filters = |tid: &str| -> Option<u32> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("Seccomp_filters:"))?
            .trim()
            .parse()
            .ok()
    };
    let Some(base) = filters(&pid.to_string()) else {
        skip("no Seccomp_filters in /proc: the per-thread filters are not counted");
        return None;
    };
    let mut kinds = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid = task.unwrap().file_name().to_string_lossy().into_owned();
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")) else {
            continue;
        };
        let Some(kind) = thread_kind(&comm) else {
            continue;
        };
        let Some(n) = filters(&tid) else { continue };
        let want = if kind == "spawner" { base } else { base + 1 };
        assert_eq!(n, want, "{comm:?} has {n} filters, the main thread {base}");
        kinds.insert(kind, n);
    }
    Some(kinds)
}

/// Every path under `dir` (relative), without following mounts' contents we do not own.
fn listing(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            out.insert(p.strip_prefix(dir).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out
}

#[test]
fn jailed_selftest_passes_and_writes_through_the_bind_mount() {
    let Some(probe) = probe() else { return };
    let s = Scratch::new(SCRATCH, "selftest");
    let p = Profile::new(&s, "a", &probe, "pv.tests=blk,rng pv.blk.write=8", "");
    let mut vmm = Vmm(vmm_command(&s, &p, "selftest", &[]).spawn().unwrap());
    let code = wait_exit(&mut vmm, Duration::from_secs(60));
    let err = stderr_of(&mut vmm);
    assert_eq!(code, Some(0), "stderr: {err}\nserial: {}", p.serial());
    assert!(p.serial().contains("PROBE done ok"), "{}", p.serial());
    let disk = std::fs::read(p.path("disk.img")).unwrap();
    assert!(
        disk[8 * 512..].starts_with(b"pocketvisor-prob"),
        "sector 8 not written through the jail's bind mount"
    );
    assert!(
        !s.jail_root().join("selftest").exists(),
        "jail directory left behind"
    );
}

/// FNV-1a 64 (the probe's `sector0_fnv`).
fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Runs the jailed probe with `cmdline` on `p`'s disk, encrypted under `key` (given on stdin);
/// returns its serial log.
fn run_encrypted(s: &Scratch, p: &Profile, id: &str, cmdline: &str, key: &[u8; 64]) -> String {
    let toml = std::fs::read_to_string(p.path("vm.toml")).unwrap();
    let toml = toml
        .lines()
        .map(|l| match l.strip_prefix("cmdline = ") {
            Some(_) => format!("cmdline = {cmdline:?}"),
            None if l.starts_with("disks") && !l.contains("encrypted = true") => {
                l.replace(" }]", ", encrypted = true }]")
            }
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(p.path("vm.toml"), toml).unwrap();
    let _ = std::fs::remove_file(p.path("run/serial.log"));
    let mut c = vmm_command(s, p, id, &["--disk-keys-stdin"]);
    c.stdin(Stdio::piped());
    let mut child = c.spawn().unwrap();
    child.stdin.take().unwrap().write_all(key).unwrap();
    let mut vmm = Vmm(child);
    let code = wait_exit(&mut vmm, Duration::from_secs(60));
    let err = stderr_of(&mut vmm);
    let toml = std::fs::read_to_string(p.path("vm.toml")).unwrap();
    assert_eq!(
        code,
        Some(0),
        "stderr: {err}\nserial: {}\n{toml}",
        p.serial()
    );
    p.serial()
}

#[test]
fn an_encrypted_disk_holds_only_ciphertext_and_reads_back_with_its_key() {
    let Some(probe) = probe() else { return };
    let s = Scratch::new(SCRATCH, "encrypted");
    let p = Profile::new(&s, "a", &probe, "pv.tests=blk", "");
    let key: [u8; 64] = std::array::from_fn(|i| u8::try_from(i * 7 % 251).unwrap());
    // The guest writes its pattern at sector 0 and reads it back (the probe checks that).
    let serial = run_encrypted(&s, &p, "enc1", "pv.tests=blk pv.blk.write=0", &key);
    assert!(
        serial.contains("PROBE done ok") && serial.contains("wrote=0"),
        "{serial}"
    );
    let disk = std::fs::read(p.path("disk.img")).unwrap();
    assert!(disk[..4096].iter().any(|&b| b != 0), "nothing was written");
    assert!(
        !disk.windows(16).any(|w| w == b"pocketvisor-prob"),
        "the guest's pattern is in the host file in clear"
    );
    // Booted again with the same key, the guest reads its own sector 0 ...
    let unit = b"pocketvisor-probe-blk:0\n";
    let sector0: Vec<u8> = unit.iter().copied().cycle().take(512).collect();
    let want = format!("sector0_fnv={:016x}", fnv1a64(&sector0));
    let serial = run_encrypted(&s, &p, "enc2", "pv.tests=blk", &key);
    assert!(serial.contains(&want), "{want} not in {serial}");
    // ... and with another key it reads something else.
    let mut wrong = key;
    wrong[0] ^= 1;
    let serial = run_encrypted(&s, &p, "enc3", "pv.tests=blk", &wrong);
    assert!(
        serial.contains("blk ok") && !serial.contains(&want),
        "{serial}"
    );
    assert_eq!(std::fs::read(p.path("disk.img")).unwrap(), disk);
}

#[test]
fn forbidden_syscall_kills_the_process_with_sigsys() {
    let Some(probe) = probe() else { return };
    let s = Scratch::new(SCRATCH, "sigsys");
    let p = Profile::new(&s, "a", &probe, "pv.mode=counter", "");
    let mut c = vmm_command(&s, &p, "sigsys", &[]);
    c.env("POCKETVISOR_JAIL_SELFTEST", "forbidden-syscall");
    let mut vmm = Vmm(c.spawn().unwrap());
    let code = wait_exit(&mut vmm, Duration::from_secs(30));
    let err = stderr_of(&mut vmm);
    assert_eq!(code, Some(128 + libc::SIGSYS), "stderr: {err}");
    assert!(err.contains("killed by signal 31"), "{err}");
    assert!(!err.contains("survived"), "{err}");
    assert!(!s.jail_root().join("sigsys").exists());
    // Without the filter the same call is harmless: the filter is what killed it.
    let mut c = vmm_command(&s, &p, "sigsys", &["--no-seccomp"]);
    c.env("POCKETVISOR_JAIL_SELFTEST", "forbidden-syscall");
    let mut vmm = Vmm(c.spawn().unwrap());
    let code = wait_exit(&mut vmm, Duration::from_secs(30));
    let err = stderr_of(&mut vmm);
    assert_eq!(code, Some(3), "stderr: {err}");
    assert!(err.contains("survived"), "{err}");
}

#[test]
fn a_running_jail_sees_only_its_own_files_network_and_no_privileges() {
    let Some(probe) = probe() else { return };
    let s = Scratch::new(SCRATCH, "isolation");
    let tap = format!("pvj{}", std::process::id() % 100_000);
    let a = Profile::new(
        &s,
        "a",
        &probe,
        "pv.mode=counter",
        &format!("net = [{{ tap = {tap:?} }}]\n"),
    );
    let b = Profile::new(&s, "b", &probe, "pv.mode=counter", "");
    // The jail root and the run directory must be reachable by the unprivileged user.
    for d in [s.0.clone(), a.path("run")] {
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    }
    let cgroup = jail_cgroup("isolation-a");
    let mut args = vec!["--uid", "65534", "--gid", "65534"];
    let cgroup_s = cgroup.as_ref().map(|(p, _)| p.display().to_string());
    if let (Some(path), Some((_, memory))) = (&cgroup_s, &cgroup) {
        args.extend(["--cgroup", path.as_str()]);
        if *memory {
            args.extend(["--memory-max", "400M"]);
        }
    }
    // Another profile's disk, run directory and socket, and the host's own files.
    let b_socket = b.path("run/api.sock");
    let _b_listener = std::os::unix::net::UnixListener::bind(&b_socket).unwrap();
    let foreign = [
        b.path("disk.img"),
        b.path("run"),
        b_socket,
        PathBuf::from("/etc/passwd"),
        PathBuf::from("/proc/self/status"),
        PathBuf::from("/sys/fs/cgroup"),
    ];
    let mut c = vmm_command(&s, &a, "iso-a", &args);
    let list: Vec<String> = foreign.iter().map(|p| p.display().to_string()).collect();
    c.env(
        "POCKETVISOR_JAIL_SELFTEST",
        format!("open:{}", list.join(":")),
    );
    let mut vmm = Vmm(c.spawn().unwrap());
    let running = wait_until(
        || a.serial().contains("PROBE counter 2"),
        Duration::from_secs(30),
    );
    assert!(running, "no counter: {}", stderr_of(&mut vmm));
    let pid = jailed_pid(vmm.0.id()).expect("jailed child");

    // Files: only its own kernel, disk, devices and run directory.
    let seen = listing(Path::new(&format!("/proc/{pid}/root")));
    let want: BTreeSet<String> = [
        "boot",
        "boot/kernel",
        "dev",
        "dev/kvm",
        "dev/net",
        "dev/net/tun",
        "disks",
        "disks/0",
        "run",
        "run/0",
        "run/0/serial.log",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(seen, want);

    // Mounts: the jail's read-only root and one bind per thing it needs; the old root is gone.
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let mounts: BTreeSet<(String, bool)> = mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let ro = f.get(5)?.split(',').any(|o| o == "ro");
            Some((f.get(4)?.to_string(), ro))
        })
        .collect();
    let want_mounts: BTreeSet<(String, bool)> = [
        ("/", true),
        ("/dev/kvm", false),
        ("/dev/net/tun", false),
        ("/boot/kernel", true),
        ("/disks/0", false),
        ("/run/0", false),
    ]
    .into_iter()
    .map(|(m, ro)| (m.to_string(), ro))
    .collect();
    assert_eq!(mounts, want_mounts, "{mountinfo}");

    // Descriptors: nothing inherited that leads outside (no directory at all).
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let fd = fd.unwrap().path();
        if let Ok(meta) = std::fs::metadata(&fd) {
            let target = std::fs::read_link(&fd).unwrap_or_default();
            assert!(!meta.is_dir(), "{} -> {}", fd.display(), target.display());
        }
    }

    // Privileges: none, for every thread.
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid: u32 = task.unwrap().file_name().to_str().unwrap().parse().unwrap();
        for key in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
            assert_eq!(status_field(tid, key), "0000000000000000", "{key} of {tid}");
        }
        assert_eq!(status_field(tid, "NoNewPrivs"), "1");
        assert_eq!(
            status_field(tid, "Seccomp"),
            "2",
            "thread {tid} is filtered"
        );
    }
    // One more filter per thread kind (jail::seccomp::threads), each its own: a device
    // worker (started by the spawner thread, not by the vCPU that activated its device)
    // does not carry the vCPU's.
    if let Some(kinds) = thread_filters(pid) {
        assert!(kinds.contains_key("vcpu"), "{kinds:?}");
    }
    assert!(status_field(pid, "Uid").starts_with("65534\t65534"));
    // Not dumpable: its /proc files belong to root although it runs as 65534; no core dumps.
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(format!("/proc/{pid}/environ"))
        .unwrap()
        .uid();
    assert_eq!(owner, 0, "the jailed process is not dumpable");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    assert_eq!(
        core.split_whitespace().collect::<Vec<_>>()[4..6],
        ["0", "0"],
        "{core}"
    );
    assert!(
        status_field(pid, "NSpid").ends_with("\t1"),
        "pid 1 in its namespace"
    );

    // Network: its own namespace with lo and its tap only; the tap is not on the host.
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_ne!(ours, theirs);
    let links = Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["ip", "-o", "link", "show"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&links.stdout);
    let names: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n))
        .collect();
    assert_eq!(names, BTreeSet::from(["lo", tap.as_str()]), "{text}");
    assert!(!Path::new("/sys/class/net").join(&tap).exists());

    // cgroup: the jailed process is in the requested group, with its memory.max.
    if let Some((path, memory)) = &cgroup {
        let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap();
        assert!(procs.lines().any(|l| l == pid.to_string()), "{procs}");
        if *memory {
            let max = std::fs::read_to_string(path.join("memory.max")).unwrap();
            assert_eq!(max.trim(), (400u64 << 20).to_string());
        }
    }

    // Stop: SIGTERM to the outer process is forwarded; everything is cleaned up.
    // SAFETY: kill with a pid we started.
    unsafe { libc::kill(vmm.0.id() as i32, libc::SIGTERM) };
    let code = wait_exit(&mut vmm, Duration::from_secs(10));
    let err = stderr_of(&mut vmm);
    assert_eq!(code, Some(128 + libc::SIGTERM), "{err}");
    for p in &foreign {
        assert!(
            err.contains(&format!(
                "jail-selftest open {}: failed errno={}",
                p.display(),
                libc::ENOENT
            )),
            "{}: {err}",
            p.display()
        );
    }
    assert!(!s.jail_root().join("iso-a").exists(), "jail directory left");
    if let Some((path, _)) = &cgroup {
        assert!(!path.exists(), "cgroup left behind");
        // The vmm made the parent group too and leaves it (it may hold other profiles).
        std::fs::remove_dir(path.parent().unwrap()).unwrap();
    }
}

/// A cgroup v2 path for a test, and whether memory.max can be set there; None (after a SKIP
/// line) when this host has no cgroup v2 hierarchy.
fn jail_cgroup(id: &str) -> Option<(PathBuf, bool)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let Some(mount) = info.lines().find_map(|l| {
        let (left, right) = l.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| PathBuf::from(left.split_whitespace().nth(4).unwrap_or("")))
    }) else {
        skip("no cgroup v2 hierarchy: cgroup checks skipped");
        return None;
    };
    let controllers = std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
    let memory = controllers.split_whitespace().any(|c| c == "memory");
    if !memory {
        skip(&format!(
            "the cgroup v2 hierarchy at {} has no memory controller (hybrid cgroup host): \
             memory.max not checked",
            mount.display()
        ));
    }
    Some((
        mount
            .join(format!("pocketvisor-test-{}", std::process::id()))
            .join(id),
        memory,
    ))
}

#[test]
fn vsock_api_and_snapshot_work_under_the_filter() {
    let Some(probe) = probe() else { return };
    let s = Scratch::new(SCRATCH, "vsock");
    vsock_api_and_snapshot(&s, &probe, None);
}

/// Every thread kind, traced (`strace -f`) through the vsock, API, snapshot, disk and rng
/// run of the jailed VMM, makes none of the syscalls its filter denies; prints what each
/// kind made (how `jail::seccomp::threads::denied` was derived).
#[test]
fn each_thread_kind_makes_only_the_syscalls_its_filter_allows() {
    let Some(probe) = probe() else { return };
    if Command::new("strace").arg("-V").output().is_err() {
        skip("no strace: the per-thread syscall trace is not checked (apt-get install strace)");
        return;
    }
    let s = Scratch::new(SCRATCH, "trace");
    let trace = s.path("trace");
    vsock_api_and_snapshot(&s, &probe, Some(&trace));
    let mut made = syscalls_by_kind(&std::fs::read_to_string(&trace).unwrap());
    let screen_trace = s.path("trace-screen");
    vnc_viewer_session(&s, &probe, &screen_trace);
    for (kind, calls) in syscalls_by_kind(&std::fs::read_to_string(&screen_trace).unwrap()) {
        made.entry(kind).or_default().extend(calls);
    }
    use jail::seccomp::threads::{allowed, Need, ThreadKind};
    for (kind, name) in [
        (ThreadKind::Vcpu, "vcpu"),
        (ThreadKind::DeviceWorker, "worker"),
        (ThreadKind::Api, "api"),
        (ThreadKind::Display, "display"),
        (ThreadKind::LogWriter, "log"),
    ] {
        let calls = made
            .get(name)
            .unwrap_or_else(|| panic!("no {name} thread traced: {made:?}"));
        eprintln!(
            "MEASURE syscalls made by {name} threads under their filter: {:?}",
            calls.values().collect::<Vec<_>>()
        );
        let allowed = allowed(kind);
        // Every call made is allowed (else the filter would have killed the VMM)...
        for (nr, call) in calls {
            assert!(
                allowed.iter().any(|(n, _)| n == nr),
                "a {name} thread made {call} ({nr}), which its filter denies"
            );
        }
        // ... and every allowed call is needed: made here, or on a documented rare path.
        let unseen: Vec<i64> = allowed
            .iter()
            .filter(|(nr, need)| *need == Need::Traced && !calls.contains_key(nr))
            .map(|(nr, _)| *nr)
            .collect();
        assert!(
            unseen.is_empty(),
            "{name}: allowed as traced but not made in the traced run (remove them, or list \
             them as rare with a reason): {unseen:?}"
        );
        let rare = allowed.iter().filter(|(_, n)| *n != Need::Traced).count();
        eprintln!(
            "MEASURE {name} allowlist: {} syscalls, {} made in the traced run, {rare} rare-path",
            allowed.len(),
            allowed.len() - rare
        );
    }
}

/// Per thread kind (by the name each thread sets), the syscalls (number and name) made under
/// the kind's filter, from `strace -f -n` output: a thread's calls after its own `seccomp`
/// call, and all calls of a thread started by a thread that already had its filter (an API
/// or VNC thread's connection threads inherit it from their first instruction).
fn syscalls_by_kind(
    text: &str,
) -> std::collections::BTreeMap<&'static str, std::collections::BTreeMap<i64, String>> {
    use std::collections::BTreeMap;
    let mut names: BTreeMap<&str, &str> = BTreeMap::new();
    let mut own_filter: BTreeSet<&str> = BTreeSet::new();
    // Child thread -> the filtered thread that started it.
    let mut born_filtered: BTreeMap<String, &str> = BTreeMap::new();
    // Per thread: (number, name, made after the thread's own seccomp call).
    let mut per_tid: BTreeMap<&str, Vec<(i64, &str, bool)>> = BTreeMap::new();
    for line in text.lines() {
        // `<tid> [ <nr>] name(args...` (calls cut by a thread switch resume without it).
        let Some((tid, rest)) = line.split_once(' ') else {
            continue;
        };
        let Some((nr, call)) = rest
            .trim_start()
            .strip_prefix('[')
            .and_then(|r| r.split_once(']'))
        else {
            continue;
        };
        let Ok(nr) = nr.trim().parse::<i64>() else {
            continue;
        };
        let call = call.trim_start();
        // A call cut by another thread's resumes as `<... name resumed>`; signals are not
        // calls.
        let name = match call.strip_prefix("<... ") {
            Some(rest) => rest.split(' ').next().unwrap_or(""),
            None => call.split('(').next().unwrap_or(""),
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            continue;
        }
        if name == "prctl" && call.starts_with("prctl(PR_SET_NAME, \"") {
            if let Some(n) = call.split('"').nth(1) {
                names.insert(tid, n);
            }
        }
        let filtered = own_filter.contains(tid) || born_filtered.contains_key(tid);
        if filtered && (name == "clone" || name == "clone3") {
            // `= 12 /* 17081 in strace's PID NS */` (`--decode-pids=pidns`): the thread id
            // as the trace names it is the second.
            let child = call
                .rsplit_once(" = ")
                .and_then(|(_, r)| r.split_once("/* "))
                .and_then(|(_, r)| r.split(' ').next())
                .filter(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()));
            if let Some(child) = child {
                born_filtered.insert(child.to_string(), tid);
            }
        }
        // A thread's own `seccomp` call (entry or resumed line) is made before its filter.
        let after_own = own_filter.contains(tid) && name != "seccomp";
        per_tid.entry(tid).or_default().push((nr, name, after_own));
        // A thread kind's filter is added to the calling thread only (no TSYNC, which is
        // the process allowlist).
        if call.starts_with("seccomp(SECCOMP_SET_MODE_FILTER, 0,") {
            own_filter.insert(tid);
        }
    }
    let mut kinds: BTreeMap<&'static str, BTreeMap<i64, String>> = BTreeMap::new();
    for (tid, calls) in per_tid {
        let parent = born_filtered.get(tid).copied();
        let kind = names
            .get(tid)
            .or_else(|| parent.and_then(|p| names.get(p)))
            .and_then(|n| thread_kind(n));
        let Some(kind) = kind else {
            continue;
        };
        let counted = calls
            .into_iter()
            .filter(|&(_, _, after_own)| after_own || parent.is_some())
            .map(|(nr, name, _)| (nr, name.to_string()));
        kinds.entry(kind).or_default().extend(counted);
    }
    kinds
}

/// Under `strace -f -n` into `trace`: a jailed VMM with a screen draws the probe's home
/// screen, and a viewer on its `vnc.sock` does the RFB 3.8 handshake, gets a whole frame and
/// sends a key; the VMM is stopped through the API.
fn vnc_viewer_session(s: &Scratch, probe: &Path, trace: &Path) {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let p = Profile::new(
        s,
        "screen",
        probe,
        "pv.mode=screen pv.screen.rgb=2a9d8f pv.screen.ms=100",
        "gpu = { width = 180, height = 320 }\ninput = true\n",
    );
    let api = p.path("run/api.sock");
    let api_s = api.display().to_string();
    let c = vmm_command(s, &p, "trace-screen", &["--api-socket", &api_s]);
    let mut traced = Command::new("strace");
    traced
        .args(["-f", "-n", "-qq", "--decode-pids=pidns", "-o"])
        .arg(trace)
        .arg(c.get_program())
        .args(c.get_args())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut vmm = Vmm(traced.spawn().unwrap());
    assert!(
        wait_until(
            || p.serial().contains("PROBE screen frame"),
            Duration::from_secs(60)
        ),
        "{}\n{}",
        p.serial(),
        stderr_of(&mut vmm)
    );
    let mut v = UnixStream::connect(p.path("run/vnc.sock")).unwrap();
    v.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut version = [0u8; 12];
    if let Err(e) = v.read_exact(&mut version) {
        panic!(
            "no RFB version: {e}\n{}\n{}",
            stderr_of(&mut vmm),
            killed_threads(trace)
        );
    }
    assert_eq!(&version, b"RFB 003.008\n");
    v.write_all(b"RFB 003.008\n").unwrap();
    let mut n = [0u8; 1];
    v.read_exact(&mut n).unwrap();
    let mut types = vec![0u8; usize::from(n[0])];
    v.read_exact(&mut types).unwrap();
    assert!(types.contains(&1), "security None offered: {types:?}");
    v.write_all(&[1]).unwrap();
    let mut result = [0u8; 4];
    v.read_exact(&mut result).unwrap();
    assert_eq!(result, [0; 4], "security result");
    v.write_all(&[1]).unwrap(); // ClientInit: shared.
    let mut init = [0u8; 24];
    v.read_exact(&mut init).unwrap();
    let (w, h) = (
        u16::from_be_bytes([init[0], init[1]]),
        u16::from_be_bytes([init[2], init[3]]),
    );
    let bytes_per_pixel = usize::from(init[4] / 8);
    let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]);
    let mut name = vec![0u8; usize::try_from(name_len).unwrap()];
    v.read_exact(&mut name).unwrap();
    // A whole-frame update request, then the update: Raw rectangles of the frame.
    let mut req = vec![3u8, 0, 0, 0, 0, 0];
    req.extend(w.to_be_bytes());
    req.extend(h.to_be_bytes());
    v.write_all(&req).unwrap();
    let mut header = [0u8; 4];
    v.read_exact(&mut header).unwrap();
    assert_eq!(header[0], 0, "a FramebufferUpdate");
    let mut pixels = 0usize;
    for _ in 0..u16::from_be_bytes([header[2], header[3]]) {
        let mut rect = [0u8; 12];
        v.read_exact(&mut rect).unwrap();
        let (rw, rh) = (
            usize::from(u16::from_be_bytes([rect[4], rect[5]])),
            usize::from(u16::from_be_bytes([rect[6], rect[7]])),
        );
        let encoding = i32::from_be_bytes([rect[8], rect[9], rect[10], rect[11]]);
        if encoding != 0 {
            continue; // A pseudo-encoding (DesktopSize): no pixels.
        }
        let mut data = vec![0u8; rw * rh * bytes_per_pixel];
        v.read_exact(&mut data).unwrap();
        pixels += rw * rh;
    }
    assert_eq!(pixels, usize::from(w) * usize::from(h), "the whole frame");
    // A key down and up (the space bar).
    for down in [1u8, 0] {
        let mut key = vec![4u8, down, 0, 0];
        key.extend(0x20u32.to_be_bytes());
        v.write_all(&key).unwrap();
    }
    drop(v);
    let a = UnixStream::connect(&api).unwrap();
    a.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    (&a).write_all(b"{\"op\":\"stop\"}\n").unwrap();
    let code = wait_exit(&mut vmm, Duration::from_secs(30));
    let err = stderr_of(&mut vmm);
    assert_eq!(code, Some(0), "{err}\n{}", killed_threads(trace));
}

/// The threads of an `strace -f` trace that SIGSYS killed: each one's name and last call (the
/// one whose call was refused is among them), to say which filter refused what.
fn killed_threads(trace: &Path) -> String {
    let text = std::fs::read_to_string(trace).unwrap_or_default();
    let mut names = std::collections::BTreeMap::new();
    let mut last = std::collections::BTreeMap::new();
    let mut out = String::new();
    for line in text.lines() {
        let Some((tid, rest)) = line.split_once(' ') else {
            continue;
        };
        if let Some(n) = rest.split("PR_SET_NAME, \"").nth(1) {
            names.insert(tid, n.split('"').next().unwrap_or(""));
        }
        if rest.contains("killed by SIGSYS") {
            let name = names.get(tid).copied().unwrap_or("?");
            let call = last.get(tid).copied().unwrap_or("?");
            out += &format!("killed: {tid} {name}: last call {call}\n");
        } else {
            last.insert(tid, rest);
        }
    }
    out
}

/// Runs the probe's disk, rng and vsock tests in a jailed VMM (under `strace -f -n` into
/// `trace` if given): a host connection echoes through the guest, the API pauses, resumes
/// and snapshots, and the VMM exits 0 after `PROBE done ok`.
fn vsock_api_and_snapshot(s: &Scratch, probe: &Path, trace: Option<&Path>) {
    let p = Profile::new(
        s,
        "a",
        probe,
        "pv.tests=blk,rng,vsock pv.vsock.wait=2000",
        &format!(
            "vsock = {{ cid = 3, socket = {:?} }}\n",
            s.path("a/run/v.sock")
        ),
    );
    let api = p.path("run/api.sock");
    let api_s = api.display().to_string();
    let id = if trace.is_some() { "trace" } else { "vsock" };
    let mut c = vmm_command(s, &p, id, &["--api-socket", &api_s]);
    if let Some(trace) = trace {
        let mut traced = Command::new("strace");
        traced
            .args(["-f", "-n", "-qq", "--decode-pids=pidns", "-o"])
            .arg(trace)
            .arg(c.get_program())
            .args(c.get_args())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c = traced;
    }
    let mut vmm = Vmm(c.spawn().unwrap());
    assert!(
        wait_until(
            || p.serial().contains("vsock listening"),
            Duration::from_secs(30)
        ),
        "{}",
        stderr_of(&mut vmm)
    );
    use std::io::{BufRead, BufReader, Read};
    use std::os::unix::net::UnixStream;
    let mut v = UnixStream::connect(p.path("run/v.sock")).unwrap();
    v.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    v.write_all(b"CONNECT 1234\n").unwrap();
    let mut ok = BufReader::new(v.try_clone().unwrap());
    let mut line = String::new();
    ok.read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "{line:?}");
    v.write_all(b"through the jail").unwrap();
    let mut echo = [0u8; 16];
    ok.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"through the jail");

    let a = UnixStream::connect(&api).unwrap();
    a.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut answers = BufReader::new(a.try_clone().unwrap());
    for req in [
        r#"{"op":"pause"}"#,
        r#"{"op":"resume"}"#,
        r#"{"op":"snapshot","dir":"/run/0/snap","resume":true}"#,
    ] {
        (&a).write_all(format!("{req}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        answers.read_line(&mut answer).unwrap();
        assert!(answer.contains(r#""ok":true"#), "{req}: {answer}");
    }
    drop(v);
    let code = wait_exit(&mut vmm, Duration::from_secs(30));
    let err = stderr_of(&mut vmm);
    assert_eq!(code, Some(0), "{err}\n{}", p.serial());
    assert!(p.serial().contains("PROBE vsock ok"), "{}", p.serial());
    assert!(
        p.path("run/snap/COMPLETE").exists(),
        "snapshot written into the run dir"
    );
}

#[test]
fn a_prepared_network_namespace_is_joined() {
    let Some(probe) = probe() else { return };
    let ns = format!("pvjail{}", std::process::id());
    let ip = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ip(&["netns", "add", &ns]) {
        skip("ip netns add failed: --netns not checked");
        return;
    }
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _ns = Ns(ns.clone());
    assert!(ip(&["-n", &ns, "tuntap", "add", "pvjt0", "mode", "tap"]));
    let s = Scratch::new(SCRATCH, "netns");
    let p = Profile::new(
        &s,
        "a",
        &probe,
        "pv.tests=net",
        "net = [{ tap = \"pvjt0\" }]\n",
    );
    let path = format!("/var/run/netns/{ns}");
    let mut vmm = Vmm(vmm_command(&s, &p, "netns", &["--netns", &path])
        .spawn()
        .unwrap());
    let code = wait_exit(&mut vmm, Duration::from_secs(30));
    let err = stderr_of(&mut vmm);
    assert_eq!(code, Some(0), "{err}\n{}", p.serial());
    assert!(p.serial().contains("PROBE net ok"), "{}", p.serial());
    assert!(
        !Path::new("/sys/class/net/pvjt0").exists(),
        "tap stayed in its namespace"
    );
}

#[test]
fn a_snapshot_taken_in_a_jail_restores_in_a_jail() {
    let Some(probe) = probe() else { return };
    let s = Scratch::new(SCRATCH, "restore");
    // The agent counts like counter mode, with its vsock device active (a worker thread the
    // restore starts before the filters exist).
    let p = Profile::new(
        &s,
        "a",
        &probe,
        "pv.mode=agent pv.counter.ms=20",
        &format!(
            "vsock = {{ cid = 3, socket = {:?} }}\n",
            s.path("a/run/v.sock")
        ),
    );
    let api = p.path("run/api.sock");
    let api_s = api.display().to_string();
    let mut src = Vmm(
        vmm_command(&s, &p, "restore-src", &["--api-socket", &api_s])
            .spawn()
            .unwrap(),
    );
    assert!(
        wait_until(
            || p.serial().contains("PROBE counter 5"),
            Duration::from_secs(30)
        ),
        "{}",
        stderr_of(&mut src)
    );
    use std::io::{BufRead, BufReader};
    let a = std::os::unix::net::UnixStream::connect(&api).unwrap();
    let mut answers = BufReader::new(a.try_clone().unwrap());
    for req in [
        r#"{"op":"snapshot","dir":"/run/0/snap"}"#,
        r#"{"op":"stop"}"#,
    ] {
        (&a).write_all(format!("{req}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        answers.read_line(&mut answer).unwrap();
        assert!(answer.contains(r#""ok":true"#), "{req}: {answer}");
    }
    assert_eq!(wait_exit(&mut src, Duration::from_secs(10)), Some(0));
    let saved = p.serial();
    let last = *counters(&saved).last().unwrap();

    // The saved paths are the jail's (/disks/0, /run/0/serial.log): override with host paths.
    std::fs::create_dir_all(s.path("b")).unwrap();
    let log = s.path("b/serial.log");
    let mut c = Command::new(bin());
    c.arg("vmm")
        .arg("--restore")
        .arg(p.path("run/snap"))
        .arg("--disk")
        .arg(p.path("disk.img"))
        .arg("--serial")
        .arg(format!("file:{}", log.display()))
        .arg("--vsock-socket")
        .arg(s.path("b/v.sock"))
        .args(["--jail-id", "restore-dst", "--jail-root"])
        .arg(s.jail_root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut dst = Vmm(c.spawn().unwrap());
    let read_log =
        || String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    let continued = wait_until(|| counters(&read_log()).len() >= 5, Duration::from_secs(30));
    assert!(continued, "{}\n{}", read_log(), stderr_of(&mut dst));
    // The output of both processes together is one unbroken count: a line the snapshot cut in
    // half is finished by the restored guest, so its first complete counter may be last + 2.
    let restored = read_log();
    let all = counters(&format!("{saved}{restored}"));
    assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "{all:?}");
    let first = counters(&restored)[0];
    assert!(
        first == last + 1 || first == last + 2,
        "the restored counter continues where the saved one stopped: {first} after {last}"
    );
    let pid = jailed_pid(dst.0.id()).expect("jailed child");
    assert_eq!(status_field(pid, "Seccomp"), "2");
    // The workers the restore started before the filters existed narrowed themselves too.
    if let Some(kinds) = thread_filters(pid) {
        assert!(
            kinds.contains_key("vcpu") && kinds.contains_key("worker"),
            "{kinds:?}"
        );
    }
    let seen = listing(Path::new(&format!("/proc/{pid}/root")));
    assert!(
        seen.contains("snapshot/memory.bin") && !seen.contains("boot"),
        "{seen:?}"
    );
    // SAFETY: kill with a pid we started.
    unsafe { libc::kill(dst.0.id() as i32, libc::SIGTERM) };
    assert_eq!(wait_exit(&mut dst, Duration::from_secs(10)), Some(143));
    assert!(!s.jail_root().join("restore-dst").exists());
}
