//! Hardware-path checks, run inside L1: a QEMU TCG machine with a hardware-style KVM (AMD SVM
//! with nested paging), where pocketvisor meets real KVM semantics (`e2e::nested`).
//!
//! Every `#[test]` here is a check with two lives. On the host, the first one to run boots L1
//! once and runs this very test binary inside it (`PV_NESTED_INSIDE=1`, one test at a time);
//! each test then reports its own result from that run, so one L1 boot serves them all. Inside
//! L1, each test runs its body for real. Built only with `--features nested`
//! (`make test-nested`); where QEMU is missing every check says SKIP loudly.
//!
//! Environment on the host: `NESTED_FILTER` (a libtest filter for the run in L1),
//! `NESTED_INCLUDE_IGNORED` (run the ignored checks in L1 too) and those of `e2e::nested`
//! (`NESTED_TIMEOUT`, ...).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use e2e::linux::{
    assert_clean_kernel_log, assert_selftest, base64, field, linux_line, linux_lines,
};
use e2e::nested::{l1_timeout, run_in_l1_watched, L1Arch, L1Run};
use e2e::{Outcome, TempDir, VmCommand};

/// SeaBIOS and OVMF booting the whole Debian disk image (issue 8, firmware half).
#[path = "nested/firmware.rs"]
mod firmware;
#[path = "nested/handset.rs"]
mod handset;
/// Linux's virtio_gpu and virtio_input drivers on our display devices, over VNC (issue 11).
#[path = "nested/screen.rs"]
mod screen;

const INSIDE: &str = "PV_NESTED_INSIDE";
/// Linux under nested SVM on TCG: 11-40 s on a loaded 2-core machine; generous.
const LINUX_TIMEOUT: Duration = Duration::from_secs(300);

fn inside_l1() -> bool {
    std::env::var_os(INSIDE).is_some()
}

/// Runs the check `name`: its body inside L1, its result from the shared L1 run on the host.
fn check(name: &str, body: impl FnOnce()) {
    if inside_l1() {
        let start = Instant::now();
        body();
        e2e::host::loud(&format!("check {name}: {:.1?}", start.elapsed()));
        return;
    }
    let group = match shared_l1_runs() {
        Ok(group) => group,
        Err(why) if why.contains("not installed") => {
            e2e::skip(why, name);
            return;
        }
        Err(why) => panic!("L1 could not run: {why}"),
    };
    // The last run with a result for `name`: a check that hung one L1 ran again in the next.
    let found = group
        .runs
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, run)| Some((i, run, libtest_result(&run.output, name)?)));
    let Some((at, run, result)) = found else {
        if let Some(run) = group.hung_in(name) {
            panic!(
                "{name} hung or died L1 twice: no result in two L1 boots (each killed \
                 after {:?} of silence, or ended by itself), and the checks after it ran in a \
                 new L1\n{}",
                check_budget(),
                run.describe()
            );
        }
        let last = group.runs.last().expect("at least one L1 run");
        panic!(
            "no result for {name} from L1 (filtered out with NESTED_FILTER, or L1 died)\n{}\n--- job output ---\n{}",
            last.describe(),
            last.output
        );
    };
    if let Some(first) = group.hung_at(name).filter(|&first| first < at) {
        e2e::host::loud(&format!(
            "nested: {name} hung L1 run {} ({}; console.log, l1-live.txt and hang.txt are in \
             {}), and in the next L1 it gave {result}",
            first + 1,
            group.runs[first].hang.as_deref().unwrap_or("L1 died"),
            group.runs[first].dir.display()
        ));
    }
    match result {
        "ok" => {}
        "FAILED" => panic!(
            "{name} failed in L1:\n{}\n(L1 job dir {})",
            failure_section(&run.output, name),
            run.dir.display()
        ),
        "ignored" => panic!("{name} was ignored in L1: set NESTED_INCLUDE_IGNORED=1"),
        other => panic!(
            "{name}: unexpected result {other:?} in L1\n{}",
            run.describe()
        ),
    }
}

/// The longest one check may run in L1 before the host gives up on that L1
/// (`NESTED_CHECK_BUDGET` seconds, default 450): past it, L1 is killed, the check fails as
/// hung, and the checks after it run in a new L1. A guest stuck inside L1 is normally ended by
/// the check's own deadline ([`LINUX_TIMEOUT`]); a hang of L1 itself is caught sooner, when
/// L1's heartbeat stops (`e2e::l1_watch`).
fn check_budget() -> Duration {
    Duration::from_secs(
        std::env::var("NESTED_CHECK_BUDGET")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(450),
    )
}

/// The L1 runs of this binary that the checks on the host read their results from: one,
/// plus one more after each check during which L1 hung or died (at most [`MAX_L1_RUNS`]). Such
/// a check runs once more, first in the next L1 (L1 itself has been seen to hang or die under
/// QEMU's nested SVM, its kernel oopsing in `svm_vcpu_enter_exit`); one that hangs twice fails.
struct GroupRuns {
    runs: Vec<L1Run>,
    /// Each hung check and the index of the run it hung in.
    hung: Vec<(String, usize)>,
}

/// A bound on fresh L1 boots after hangs, so a group that hangs every L1 still ends.
const MAX_L1_RUNS: usize = 4;

impl GroupRuns {
    /// The (first) run `name` hung in.
    fn hung_in(&self, name: &str) -> Option<&L1Run> {
        self.hung_at(name).map(|at| &self.runs[at])
    }

    /// The index of the first run `name` hung in.
    fn hung_at(&self, name: &str) -> Option<usize> {
        self.hung
            .iter()
            .find(|(hung, _)| hung == name)
            .map(|(_, at)| *at)
    }

    /// How many L1 runs `name` hung.
    fn hangs(&self, name: &str) -> usize {
        self.hung.iter().filter(|(hung, _)| hung == name).count()
    }
}

/// The name of the check libtest had started and not finished when L1's console went
/// silent or L1 died: the last console line `test NAME ... ` with no result after it.
fn unfinished_check(run: &L1Run) -> Option<String> {
    let last = run
        .qemu
        .serial()
        .filter(|l| l.starts_with("test "))
        .last()?;
    // L1's kernel may have printed on the same console line after libtest's ` ... `.
    let (name, after) = last.strip_prefix("test ")?.split_once(" ...")?;
    let after = after.trim_start();
    let finished = ["ok", "FAILED", "ignored"]
        .iter()
        .any(|result| after.starts_with(result));
    (!finished).then(|| name.to_string())
}

fn shared_l1_runs() -> Result<&'static GroupRuns, &'static str> {
    static RUNS: OnceLock<Result<GroupRuns, String>> = OnceLock::new();
    RUNS.get_or_init(|| {
        let mut group = GroupRuns {
            runs: Vec::new(),
            hung: Vec::new(),
        };
        let mut skip = String::new();
        while group.runs.len() < MAX_L1_RUNS {
            let run = l1_run_of_checks(&skip)?;
            // L1 hung (killed for a silent console) or died (its kernel panicked and QEMU
            // ended): either way the job never reported a status.
            let died = run.stalled || run.rc.is_none();
            group.runs.push(run);
            if !died {
                break;
            }
            let run = group.runs.last().expect("just pushed");
            let Some(hung) = unfinished_check(run) else {
                break; // silent before or after the checks: nothing to skip and retry
            };
            let again = group.hangs(&hung) == 0;
            e2e::host::loud(&format!(
                "nested: L1 hung or died in {hung} ({}); {} and the checks after it run in a \
                 new L1",
                run.hang.as_deref().unwrap_or("L1 ended without a result"),
                if again {
                    "it"
                } else {
                    "not it (its second hang),"
                }
            ));
            // libtest's --skip matches substrings; the check names are not substrings of
            // one another, and --exact would also make NESTED_FILTER exact.
            for done in run.output.lines().filter_map(|l| l.strip_prefix("test ")) {
                if let Some((name, result)) = done.split_once(" ... ") {
                    if result_word(result).is_some() {
                        skip.push_str(&format!(" --skip {name}"));
                    }
                }
            }
            if !again {
                skip.push_str(&format!(" --skip {hung}"));
            }
            group.hung.push((hung, group.runs.len() - 1));
        }
        Ok(group)
    })
    .as_ref()
    .map_err(String::as_str)
}

/// One L1 boot that runs this test binary inside, skipping `skip` (libtest arguments).
fn l1_run_of_checks(skip: &str) -> Result<L1Run, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let manifest = e2e::workspace_root().join("tests");
    let mut filter = std::env::var("NESTED_FILTER").unwrap_or_default();
    if std::env::var_os("NESTED_INCLUDE_IGNORED").is_some() {
        filter.push_str(" --include-ignored");
    }
    // One test at a time: L1 has 2 vCPUs, and the guests' timings are judged.
    let script = format!(
        "export {INSIDE}=1 CARGO_MANIFEST_DIR='{}' RUST_BACKTRACE=1\n\
         '{}' --test-threads=1 --color never {filter}{skip} 2>checks.err\n",
        manifest.display(),
        exe.display()
    );
    e2e::host::loud(&format!(
        "nested: booting L1 (QEMU TCG, nested SVM) for the hardware-path checks; \
         deadline {:?}, {:?} per check",
        l1_timeout(),
        check_budget()
    ));
    let run = run_in_l1_watched(L1Arch::X86_64, &script, l1_timeout(), Some(check_budget()))?;
    e2e::host::loud(&format!(
        "nested: L1 job rc={:?}, L1 boot {:?}, total {:?}{} (job dir {})",
        run.rc,
        run.l1_boot,
        run.qemu.elapsed,
        if run.stalled { ", STALLED" } else { "" },
        run.dir.display()
    ));
    Ok(run)
}

/// `ok`, `FAILED` or `ignored` from libtest's `test NAME ... RESULT` line; none while the
/// line has no result (the check was running when L1 stopped; L1's kernel may have printed
/// after the ` ... `).
fn libtest_result<'a>(output: &'a str, name: &str) -> Option<&'a str> {
    let prefix = format!("test {name} ... ");
    output
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(result_word)
}

/// The result word at the start of what follows libtest's ` ... `, if there is one.
fn result_word(after: &str) -> Option<&str> {
    let word = after.trim().split([',', ' ']).next()?;
    ["ok", "FAILED", "ignored"].contains(&word).then_some(word)
}

/// libtest's `---- NAME stdout ----` section of a failed test (its output and panic message).
fn failure_section(output: &str, name: &str) -> String {
    let header = format!("---- {name} stdout ----");
    let Some(at) = output.find(&header) else {
        return "(no failure section)".into();
    };
    let rest = &output[at..];
    let end = rest[header.len()..]
        .find("\n---- ")
        .or_else(|| rest.find("\nfailures:"))
        .map_or(rest.len(), |e| e + header.len());
    rest[..end].to_string()
}

fn linux_dir() -> PathBuf {
    e2e::workspace_root().join("guest/out/linux")
}

/// A `pocketvisor run` of the Debian Linux guest (PVH vmlinux unless `kernel` says otherwise).
fn linux_vm(kernel: &str, vcpus: u32, cmdline: &str) -> VmCommand {
    let dir = linux_dir();
    assert!(
        dir.join("vmlinux").is_file(),
        "{} is not built: run guest/build-linux.sh",
        dir.display()
    );
    let mut cmd = VmCommand::bare()
        .memory("512M")
        .vcpus(vcpus)
        .rng()
        .timeout(LINUX_TIMEOUT);
    cmd.kernel = Some(dir.join(kernel));
    cmd.initrd = Some(dir.join("initramfs.cpio.gz"));
    cmd.cmdline = Some(format!("console=ttyS0 quiet {cmdline}"));
    cmd
}

fn cpus(out: &Outcome) -> Option<u32> {
    field(linux_line(out, "ready")?, "cpus")?.parse().ok()
}

/// The standard boot: 8 MiB disk, rng, `vcpus` vCPUs; asserts the self-test, the vCPU count
/// and a clean kernel log.
fn boot_linux(kernel: &str, vcpus: u32) {
    let dir = TempDir::new();
    let (disk, _) = dir.disk("linux.img", 8 * 1024 * 1024, 21);
    let out = linux_vm(kernel, vcpus, "").disk(&disk, false).run();
    assert_selftest(&out);
    assert_eq!(cpus(&out), Some(vcpus), "{}", out.describe());
    assert_clean_kernel_log(&out);
    e2e::host::loud(&format!(
        "linux {kernel} {vcpus} vCPU(s): powered off after {:.1?}",
        out.elapsed
    ));
}

#[test]
fn doctor_reports_hardware_svm() {
    check("doctor_reports_hardware_svm", || {
        let out = std::process::Command::new(e2e::pocketvisor_bin())
            .arg("doctor")
            .output()
            .expect("run pocketvisor doctor");
        let text = String::from_utf8_lossy(&out.stdout);
        let first = text.lines().next().unwrap_or_default();
        assert!(
            first.contains("Hardware") && first.contains("AMD SVM"),
            "doctor in L1 says {first:?}\n{text}"
        );
        assert!(
            text.contains("Linux guest:  yes"),
            "doctor in L1 says Linux cannot run:\n{text}"
        );
        assert_eq!(out.status.code(), Some(0), "{text}");
    });
}

#[test]
fn probe_guest_passes_on_hardware_kvm() {
    check("probe_guest_passes_on_hardware_kvm", || {
        let dir = TempDir::new();
        let (disk, _) = dir.disk("probe.img", 1024 * 1024, 5);
        VmCommand::probe("pv.tests=pci,smp,blk,rng")
            .vcpus(2)
            .disk(&disk, false)
            .rng()
            .run()
            .assert_clean_pass();
    });
}

#[test]
fn linux_pvh_2_vcpus_disk_rng() {
    check("linux_pvh_2_vcpus_disk_rng", || boot_linux("vmlinux", 2));
}

#[test]
fn linux_pvh_1_vcpu() {
    check("linux_pvh_1_vcpu", || boot_linux("vmlinux", 1));
}

#[test]
fn linux_pvh_4_vcpus() {
    check("linux_pvh_4_vcpus", || boot_linux("vmlinux", 4));
}

#[test]
fn linux_bzimage_2_vcpus() {
    check("linux_bzimage_2_vcpus", || boot_linux("bzImage", 2));
}

#[test]
fn linux_blk_read_write_flush_and_read_only() {
    check("linux_blk_read_write_flush_and_read_only", || {
        let dir = TempDir::new();
        let (rw, rw_bytes) = dir.disk("rw.img", 8 * 1024 * 1024, 31);
        let (ro, ro_bytes) = dir.disk("ro.img", 1024 * 1024, 32);
        let out = linux_vm("vmlinux", 1, "pv.blk.rw=vda pv.blk.ro=vdb")
            .disk(&rw, false)
            .disk(&ro, true)
            .run();
        assert_selftest(&out);
        // Read: the guest's hash of block 0 is the host's.
        let read = linux_line(&out, "blkread vda").expect("no blkread line");
        assert_eq!(
            field(read, "sha256"),
            Some(sha256_hex(&rw_bytes[..4096]).as_str()),
            "{}",
            out.describe()
        );
        // Write + flush: dd with conv=fsync succeeded on a write-back cache (so the fsync
        // was a flush request), the data is in the host file, and re-read equals it.
        let write = linux_line(&out, "blkwrite vda").expect("no blkwrite line");
        assert_eq!(field(write, "status"), Some("ok"), "{}", out.describe());
        assert_eq!(
            field(write, "cache"),
            Some("write_back"),
            "{}",
            out.describe()
        );
        let expected: Vec<u8> = b"pocketvisor-blk\n"
            .iter()
            .copied()
            .cycle()
            .take(65536)
            .collect();
        let on_host = std::fs::read(&rw).expect("read rw.img");
        let at = 256 * 4096;
        assert!(
            on_host[at..at + expected.len()] == expected[..],
            "the guest's write is not in the host file"
        );
        assert!(
            on_host[..at] == rw_bytes[..at],
            "bytes before the guest's write changed"
        );
        let reread = linux_line(&out, "blkreread vda").expect("no blkreread line");
        assert_eq!(
            field(reread, "sha256"),
            Some(sha256_hex(&expected).as_str()),
            "{}",
            out.describe()
        );
        // Read-only: the guest sees ro=1, its write is refused, the file is unchanged.
        let ro_line = linux_line(&out, "blkro vdb").expect("no blkro line");
        assert_eq!(field(ro_line, "ro"), Some("1"), "{}", out.describe());
        assert_eq!(
            field(ro_line, "write"),
            Some("refused"),
            "{}",
            out.describe()
        );
        assert!(std::fs::read(&ro).expect("read ro.img") == ro_bytes);
        assert_clean_kernel_log(&out);
    });
}

#[test]
fn linux_sees_hidden_cpuid_flags_gone() {
    check("linux_sees_hidden_cpuid_flags_gone", || {
        let flags_of = |hide: Option<&str>| {
            let mut cmd = linux_vm("vmlinux", 1, "pv.cpuflags=1");
            if let Some(list) = hide {
                cmd = cmd.arg("--cpuid-hide").arg(list);
            }
            let out = cmd.run();
            assert_eq!(out.code(), Some(0), "{}", out.describe());
            let flags: Vec<String> = linux_line(&out, "cpuflags")
                .unwrap_or_else(|| panic!("no cpuflags line\n{}", out.describe()))
                .split_whitespace()
                .map(str::to_string)
                .collect();
            (flags, out)
        };
        let (hidden, out) = flags_of(Some("xsave,rdrand"));
        for gone in ["xsave", "rdrand"] {
            assert!(
                !hidden.iter().any(|f| f == gone),
                "{gone} still in the guest's flags: {hidden:?}"
            );
        }
        for kept in ["fpu", "sse2", "lm"] {
            assert!(
                hidden.iter().any(|f| f == kept),
                "{kept} gone too: {hidden:?}"
            );
        }
        // Without XSAVE the nested setup's XSAVE warning cannot appear: the log is clean.
        assert!(
            !out.serial().any(|l| l.contains("XSAVE consistency")),
            "{}",
            out.describe()
        );
        let (plain, _) = flags_of(None);
        assert!(
            plain.iter().any(|f| f == "rdrand"),
            "rdrand missing without hiding: {plain:?}"
        );
    });
}

#[test]
fn linux_net_ping_and_tcp_over_a_tap_to_a_netns_peer() {
    check("linux_net_ping_and_tcp_over_a_tap_to_a_netns_peer", || {
        use std::io::Read;
        use std::net::TcpListener;

        let ns = e2e::host::NetNs::create().expect("create a network namespace");
        let tap = "pvt0";
        ns.add_tap(tap).expect("create the tap in the namespace");
        let ip = |args: &[&str]| {
            let st = std::process::Command::new("ip")
                .args(["-n", ns.name()])
                .args(args)
                .status()
                .expect("run ip");
            assert!(st.success(), "ip {args:?} failed");
        };
        ip(&["addr", "add", "10.0.2.1/24", "dev", tap]);
        let listener = ns
            .run_inside(|| TcpListener::bind("10.0.2.1:5555"))
            .expect("listen in the namespace");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let receiver = std::thread::spawn(move || -> Result<Vec<u8>, String> {
            let deadline = Instant::now() + LINUX_TIMEOUT;
            loop {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                        stream
                            .set_read_timeout(Some(Duration::from_secs(60)))
                            .map_err(|e| e.to_string())?;
                        let mut data = Vec::new();
                        stream.read_to_end(&mut data).map_err(|e| e.to_string())?;
                        return Ok(data);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            return Err("no TCP connection from the guest".into());
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        });
        let dir = TempDir::new();
        let (disk, _) = dir.disk("linux.img", 8 * 1024 * 1024, 41);
        let out = linux_vm("vmlinux", 2, "pv.net=10.0.2.2/24,10.0.2.1,5555")
            .disk(&disk, false)
            .net(&format!("tap={tap},mac=02:50:56:00:00:08"))
            .in_netns(ns.name())
            .run();
        assert_selftest(&out);
        assert!(
            out.serial()
                .any(|l| l.contains("LINUX virtio") && l.contains("driver=virtio_net")),
            "{}",
            out.describe()
        );
        let ping = linux_line(&out, "ping 10.0.2.1").expect("no ping line");
        assert_eq!(field(ping, "status"), Some("ok"), "{}", out.describe());
        let tcp = linux_line(&out, "tcp").expect("no tcp line");
        assert_eq!(field(tcp, "status"), Some("ok"), "{}", out.describe());
        assert_eq!(field(tcp, "sent"), Some("1048576"), "{}", out.describe());
        let received = receiver
            .join()
            .expect("receiver thread")
            .unwrap_or_else(|e| panic!("{e}\n{}", out.describe()));
        assert_eq!(received.len(), 1_048_576, "{}", out.describe());
        assert_eq!(
            field(tcp, "sha256"),
            Some(sha256_hex(&received).as_str()),
            "the bytes received differ from those the guest sent"
        );
        assert_clean_kernel_log(&out);
    });
}

/// `(n, epoch, uptime)` of a `LINUX tick n=.. epoch=.. uptime=..` line.
fn tick(line: &str) -> Option<(u32, u64, f64)> {
    let rest = &line[line.find("LINUX tick ")? + "LINUX tick ".len()..];
    Some((
        field(rest, "n")?.parse().ok()?,
        field(rest, "epoch")?.parse().ok()?,
        field(rest, "uptime")?.parse().ok()?,
    ))
}

fn host_epoch() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// How far the restored guest's wall clock may be from the host's (a tick line's travel).
const WALL_CLOCK_SLACK: u64 = 3;

#[test]
fn linux_snapshot_restore_keeps_running_with_a_correct_clock() {
    check(
        "linux_snapshot_restore_keeps_running_with_a_correct_clock",
        || {
            let dir = TempDir::new();
            let (disk, _) = dir.disk("linux.img", 8 * 1024 * 1024, 51);
            let sock = dir.join("api.sock");
            let snap = dir.join("snap");
            let mut src = linux_vm("vmlinux", 2, "pv.tick=40")
                .disk(&disk, false)
                .arg("--api-socket")
                .arg(sock.to_str().expect("utf-8 path"))
                .spawn();
            let before = src
                .wait_for_line(LINUX_TIMEOUT, |l| tick(l).is_some_and(|t| t.0 >= 3))
                .and_then(|(_, l)| tick(&l))
                .unwrap_or_else(|| {
                    panic!(
                        "no tick 3 from the source\n{}\nstderr: {}",
                        src.drain(),
                        src.stderr_so_far()
                    )
                });
            let mut snapshot = std::process::Command::new(e2e::pocketvisor_bin());
            snapshot
                .args(["snapshot", "--api-socket"])
                .arg(&sock)
                .arg("-o")
                .arg(&snap)
                .arg("--stop");
            // Bounded: a VMM that never answers fails this check, not the whole L1 run.
            let out = e2e::RunningVm::spawn(snapshot, Duration::from_secs(120)).wait();
            assert_eq!(out.code(), Some(0), "snapshot failed: {}", out.describe());
            let src = src.wait_for(Duration::from_secs(60));
            assert_eq!(src.code(), Some(0), "{}", src.describe());
            // Time passes while the guest is saved.
            std::thread::sleep(Duration::from_secs(5));

            let mut cmd = std::process::Command::new(e2e::pocketvisor_bin());
            cmd.arg("restore").arg(&snap);
            let mut dst = e2e::RunningVm::spawn(cmd, LINUX_TIMEOUT);
            let ticks: Vec<(u32, u64, f64)> = (0..3)
                .filter_map(|_| {
                    dst.wait_for_line(Duration::from_secs(60), |l| tick(l).is_some())
                        .and_then(|(_, l)| tick(&l))
                })
                .collect();
            let now = host_epoch();
            assert_eq!(
                ticks.len(),
                3,
                "the restored guest stopped ticking\n{}",
                dst.drain()
            );
            let (n, epoch, uptime) = ticks[2];
            assert!(n > before.0, "ticks went back: {before:?} then {ticks:?}");
            assert!(
                uptime > before.2,
                "the guest's uptime went back: {before:?} then {ticks:?}"
            );
            // The guest's wall clock: the restore moves the kvmclock on by the time the
            // snapshot spent saved, so the guest's time is the host's again (it lagged by that
            // time when the kvmclock was restored as is).
            let saved_for = now.saturating_sub(before.1);
            assert!(
                epoch <= now + 1 && now.saturating_sub(epoch) <= WALL_CLOCK_SLACK,
                "the restored guest's wall clock is {epoch}, the host's {now}: more than \
                 {WALL_CLOCK_SLACK} s apart (before the snapshot: {before:?}; after: {ticks:?})"
            );
            e2e::host::loud(&format!(
                "snapshot/restore: the guest's wall clock is {} s behind the host {} s after \
                 tick {} (saved for 5 s of it)",
                now.saturating_sub(epoch),
                saved_for,
                before.0
            ));
            let dst = dst.wait();
            assert!(
                dst.serial().any(|l| l.contains("LINUX done")),
                "{}",
                dst.describe()
            );
            assert_eq!(dst.code(), Some(0), "{}", dst.describe());
            assert_clean_kernel_log(&dst);
        },
    );
}

#[test]
fn linux_cmos_rtc_reads_the_host_time() {
    check("linux_cmos_rtc_reads_the_host_time", || {
        let out = linux_vm("vmlinux", 1, "pv.clock=1").run();
        let now = host_epoch();
        assert_eq!(out.code(), Some(0), "{}", out.describe());
        let clock = linux_line(&out, "clock").expect("no clock line");
        let rtc: u64 = field(clock, "rtc")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no RTC in the guest: {clock}\n{}", out.describe()));
        let epoch: u64 = field(clock, "epoch")
            .and_then(|v| v.parse().ok())
            .expect("epoch");
        // The RTC was read just before the guest powered off; allow for the run's length.
        let slack = out.elapsed.as_secs() + 2;
        assert!(
            rtc <= now + 1 && now.saturating_sub(rtc) <= slack,
            "the guest's RTC says {rtc}, the host {now}: {clock}"
        );
        assert!(epoch.abs_diff(rtc) <= 2, "{clock}");
        assert!(
            !out.serial()
                .any(|l| l.contains("rtc_cmos") && l.contains("broken")),
            "{}",
            out.describe()
        );
        assert_clean_kernel_log(&out);
    });
}

#[test]
fn linux_reboot_ends_the_vm() {
    check("linux_reboot_ends_the_vm", || {
        let out = linux_vm("vmlinux", 1, "pv.reboot=1").run();
        assert!(!out.timed_out, "{}", out.describe());
        assert!(
            linux_line(&out, "rebooting").is_some(),
            "{}",
            out.describe()
        );
        assert_eq!(out.code(), Some(0), "{}", out.describe());
    });
}

/// Asserts a guest that ran `LINUX done` powered off by itself (exit 0) with a clean kernel log.
fn assert_powered_off_cleanly(out: Outcome) {
    assert!(
        !out.timed_out,
        "the guest did not power off\n{}",
        out.describe()
    );
    assert!(
        linux_lines(&out).contains(&"LINUX done"),
        "{}",
        out.describe()
    );
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_clean_kernel_log(&out);
}

/// The Linux agent's vsock port (`guest/agent`).
const AGENT_PORT: u32 = 1025;

/// One request line to the guest's agent through the VMM's vsock socket (`CONNECT` first, as
/// the handset does); returns the answer line.
fn agent_call(socket: &std::path::Path, request: &str) -> Result<String, String> {
    use std::io::{BufRead, BufReader, Write};
    let mut stream =
        std::os::unix::net::UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(format!("CONNECT {AGENT_PORT}\n{request}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut reader = BufReader::new(stream);
    let mut ok = String::new();
    reader
        .read_line(&mut ok)
        .map_err(|e| format!("read OK: {e}"))?;
    if !ok.starts_with("OK ") {
        return Err(format!("the VMM answered {ok:?} to CONNECT {AGENT_PORT}"));
    }
    let mut answer = String::new();
    reader
        .read_line(&mut answer)
        .map_err(|e| format!("read the answer: {e}"))?;
    Ok(answer.trim_end().to_string())
}

#[test]
fn linux_agent_clipboard_and_file_over_vsock() {
    check("linux_agent_clipboard_and_file_over_vsock", || {
        let dir = TempDir::new();
        let sock = dir.join("vsock.sock");
        let mut vm = linux_vm("vmlinux", 1, "pv.agent=1").vsock(3, &sock).spawn();
        let started = vm.wait_for_line(LINUX_TIMEOUT, |l| {
            l.contains("LINUX agent starting") || l.contains("LINUX done")
        });
        assert!(
            started.is_some_and(|(_, l)| l.contains("agent starting")),
            "the guest did not start its agent (built into the initramfs by guest/build-linux.sh \
             from guest/agent)\n{}\nstderr: {}",
            vm.drain(),
            vm.stderr_so_far()
        );
        // The agent listens a moment after /init starts it.
        let deadline = Instant::now() + Duration::from_secs(60);
        let health = loop {
            match agent_call(&sock, r#"{"op":"health"}"#) {
                Ok(answer) => break answer,
                Err(e) if Instant::now() > deadline => {
                    panic!("no answer from the agent: {e}\n{}", vm.drain())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        assert!(
            health.contains(r#""ok":true"#) && health.contains(r#""agent":"linux""#),
            "{health}"
        );
        // Copy into the guest's clipboard, paste it back on a new connection.
        let text = "copied on the handset \u{2192} pasted in the Linux guest";
        let set = agent_call(
            &sock,
            &format!(
                r#"{{"op":"clipboard_set","mime":"text/plain","data_b64":"{}"}}"#,
                base64(text.as_bytes())
            ),
        )
        .expect("clipboard_set");
        assert_eq!(set, format!(r#"{{"ok":true,"bytes":{}}}"#, text.len()));
        let get = agent_call(&sock, r#"{"op":"clipboard_get"}"#).expect("clipboard_get");
        assert!(
            get.contains(r#""ok":true"#)
                && get.contains(&format!(r#""data_b64":"{}""#, base64(text.as_bytes()))),
            "{get}"
        );
        // A file into the guest's inbox, listed and read back.
        let file: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let put = agent_call(
            &sock,
            &format!(
                r#"{{"op":"file_put","name":"report.bin","data_b64":"{}"}}"#,
                base64(&file)
            ),
        )
        .expect("file_put");
        assert!(put.contains(r#""bytes":70000"#), "{put}");
        let list = agent_call(&sock, r#"{"op":"file_list"}"#).expect("file_list");
        assert!(
            list.contains(r#"{"name":"report.bin","bytes":70000}"#),
            "{list}"
        );
        let back = agent_call(&sock, r#"{"op":"file_get","name":"report.bin"}"#).expect("file_get");
        assert!(
            back.contains(&format!(r#""data_b64":"{}""#, base64(&file))),
            "the file read back differs"
        );
        // A hostile request gets an error answer and the agent keeps serving.
        let bad = agent_call(&sock, r#"{"op":"file_get","name":"../../etc/shadow"}"#)
            .expect("bad file_get");
        assert!(bad.contains(r#""ok":false"#), "{bad}");
        assert!(agent_call(&sock, r#"{"op":"health"}"#)
            .expect("health after")
            .contains(r#""ok":true"#));
        // A file named pv-poweroff ends the guest's agent session (its /init waits for it);
        // the guest then judges its kernel log and powers off.
        let stop = agent_call(
            &sock,
            r#"{"op":"file_put","name":"pv-poweroff","data_b64":""}"#,
        )
        .expect("file_put pv-poweroff");
        assert!(stop.contains(r#""ok":true"#), "{stop}");
        assert_powered_off_cleanly(vm.wait_for(Duration::from_secs(120)));
    });
}

/// One request to the VMM's API socket; returns the answer's JSON.
fn api(socket: &std::path::Path, request: &str) -> serde_json::Value {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("API socket {}: {e}", socket.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("read timeout");
    (&stream)
        .write_all(format!("{request}\n").as_bytes())
        .expect("write the request");
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .expect("read the answer");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{request}: bad answer {line:?}: {e}"))
}

/// The balloon's part of the API's `stats` answer.
fn balloon_stats(socket: &std::path::Path) -> serde_json::Value {
    let answer = api(socket, r#"{"op":"stats"}"#);
    assert_eq!(answer["ok"], true, "{answer}");
    let info: serde_json::Value =
        serde_json::from_str(answer["info"].as_str().expect("info")).expect("stats JSON");
    info["balloon"].clone()
}

/// `VmRSS` of process `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("read /proc/<pid>/status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Polls the balloon until `actual_pages` is `pages` and returns those statistics; none after
/// `timeout`. (The answer that met the condition is the last one to ask for: a guest may power
/// off as soon as its balloon is back down, and its VMM with it.)
fn balloon_reaches(
    socket: &std::path::Path,
    pages: u64,
    timeout: Duration,
) -> Option<serde_json::Value> {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        let stats = balloon_stats(socket);
        if stats["actual_pages"].as_u64() == Some(pages) {
            return Some(stats);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    None
}

#[test]
fn linux_balloon_inflate_gives_memory_back_and_deflate_returns_it() {
    check(
        "linux_balloon_inflate_gives_memory_back_and_deflate_returns_it",
        || {
            const TOUCH_MIB: u64 = 128;
            const TARGET_MIB: u64 = 256;
            let dir = TempDir::new();
            let sock = dir.join("api.sock");
            let mut vm = linux_vm(
                "vmlinux",
                1,
                &format!("pv.memtouch={TOUCH_MIB} pv.balloon=1"),
            )
            .arg("--balloon")
            .arg("--api-socket")
            .arg(sock.to_str().expect("utf-8 path"))
            .spawn();
            let pid = vm.pid();
            assert!(
                vm.wait_for_line(LINUX_TIMEOUT, |l| l.contains("LINUX memtouch"))
                    .is_some(),
                "the guest did not fill its memory\n{}",
                vm.drain()
            );
            let touched = rss_kib(pid);
            vm.wait_for_line(Duration::from_secs(60), |l| l.contains("LINUX memfreed"))
                .expect("the guest did not free its memory");
            let driver = vm.drain();
            assert!(
                driver.contains("device=0x0005 driver=virtio_balloon"),
                "virtio_balloon did not bind\n{driver}"
            );

            // Inflate: the guest hands TARGET_MIB to the balloon; the VMM drops those pages.
            let answer = api(
                &sock,
                &format!(r#"{{"op":"balloon","target_mib":{TARGET_MIB}}}"#),
            );
            assert_eq!(answer["ok"], true, "{answer}");
            assert!(
                balloon_reaches(&sock, TARGET_MIB * 256, Duration::from_secs(180)).is_some(),
                "the Linux driver did not inflate to {TARGET_MIB} MiB: {}",
                balloon_stats(&sock)
            );
            let inflated = rss_kib(pid);
            // Deflate: the pages go back to the guest.
            let answer = api(&sock, r#"{"op":"balloon","target_mib":0}"#);
            assert_eq!(answer["ok"], true, "{answer}");
            // The guest powers off soon after this: no question to its VMM after it.
            let stats = balloon_reaches(&sock, 0, Duration::from_secs(180))
                .unwrap_or_else(|| panic!("the Linux driver did not deflate"));
            e2e::host::loud(&format!(
                "balloon with Linux: VMM RSS {} MiB with {TOUCH_MIB} MiB touched, {} MiB \
                 inflated to {TARGET_MIB} MiB; {stats}",
                touched / 1024,
                inflated / 1024,
            ));
            assert!(
                inflated + TOUCH_MIB * 1024 / 2 <= touched,
                "RSS {touched} KiB with the guest's memory touched, {inflated} KiB after it was \
                 freed and the balloon inflated: not given back"
            );
            let pages = TARGET_MIB * 256;
            assert_eq!(stats["inflated_pages"].as_u64(), Some(pages), "{stats}");
            assert_eq!(stats["deflated_pages"].as_u64(), Some(pages), "{stats}");
            assert!(
                stats["guest_stats"]["total_memory"].as_u64().is_some(),
                "no statistics from the Linux driver: {stats}"
            );
            // The guest waits for the balloon to go up and all the way down again, says what
            // its kernel counted, judges its kernel log and powers off.
            let out = vm.wait_for(Duration::from_secs(120));
            let seen = linux_line(&out, "balloon ")
                .unwrap_or_else(|| panic!("no `LINUX balloon` line\n{}", out.describe()));
            let expected = pages.to_string();
            assert_eq!(
                (field(seen, "inflated_pages"), field(seen, "deflated_pages")),
                (Some(expected.as_str()), Some(expected.as_str())),
                "the guest's /proc/vmstat balloon counters: {seen}"
            );
            assert_powered_off_cleanly(out);
        },
    );
}

/// SHA-256 through coreutils' `sha256sum` (the test crate has no hash dependency).
fn sha256_hex(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run sha256sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("feed sha256sum");
    let out = child.wait_with_output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}
