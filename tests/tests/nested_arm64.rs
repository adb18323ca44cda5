//! The arm64 port's checks on emulated arm64 hardware: an L1 machine under
//! `qemu-system-aarch64 -M virt,virtualization=on,gic-version=3 -accel tcg` whose Debian kernel
//! runs KVM at the emulated EL2 (`e2e::nested::run_in_l1_on` with `L1Arch::Aarch64`).
//!
//! Each check boots its own L1 (one at a time, about 4 s to its shell under TCG on an idle
//! machine) and runs one shell script there with
//! L1's busybox; aarch64 binaries come from the checkout, which L1 sees read-only at its host
//! path. Built with `--features nested` (`make test-nested-arm64`); where
//! `qemu-system-aarch64` is missing every check prints SKIP.

use std::time::Duration;

use e2e::nested::{run_in_l1_with, L1Arch, L1Run};

/// L1's deadline: its boot plus the job, generous for a loaded 2-core machine.
const L1_TIMEOUT: Duration = Duration::from_secs(600);

/// Runs `script` in a new arm64 L1; `None` (after a loud SKIP) where QEMU is missing. One L1
/// at a time: each is a busy TCG machine, and the guests' timings are read.
fn in_l1(test: &str, script: &str) -> Option<L1Run> {
    in_l1_with(test, script, "")
}

/// [`in_l1`] with `kernel_args` on L1's kernel command line. A job whose L1 kernel crashed
/// under it (an oops or an RCU stall of L1's own kernel, seen under TCG now and then) runs once
/// more in a new L1, said loudly; a second crash is the check's result, with the crash shown.
fn in_l1_with(test: &str, script: &str, kernel_args: &str) -> Option<L1Run> {
    static ONE_L1: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = ONE_L1.lock().unwrap_or_else(|e| e.into_inner());
    for attempt in 1.. {
        let run = match run_in_l1_with(L1Arch::Aarch64, script, L1_TIMEOUT, kernel_args) {
            Ok(run) => run,
            Err(why) if why.contains("not installed") => {
                e2e::skip(&why, test);
                return None;
            }
            Err(why) => panic!("the arm64 L1 could not run: {why}"),
        };
        e2e::host::loud(&format!(
            "{test}: arm64 L1 job rc={:?}, L1 boot {:?}, total {:.1?}",
            run.rc, run.l1_boot, run.qemu.elapsed
        ));
        match &run.l1_crash {
            Some(crash) if attempt == 1 => e2e::host::loud(&format!(
                "{test}: L1's kernel crashed under the job ({}; job dir {}); the check runs \
                 again in a new L1",
                crash.lines().next().unwrap_or_default().trim(),
                run.dir.display()
            )),
            _ => return Some(run),
        }
    }
    unreachable!("the loop returns")
}

#[test]
fn l1_runs_a_command_with_kvm_at_el2() {
    let Some(run) = in_l1(
        "l1_runs_a_command_with_kvm_at_el2",
        "uname -m; test -c /dev/kvm && echo have-kvm; echo to-stderr >&2; exit 7\n",
    ) else {
        return;
    };
    assert_eq!(run.rc, Some(7), "{}", run.describe());
    assert!(run.output.contains("aarch64"), "{}", run.describe());
    assert!(run.output.contains("have-kvm"), "{}", run.describe());
    assert!(run.output.contains("to-stderr"), "{}", run.describe());
    // Debian's kernel says which mode KVM runs in (VHE by default with -cpu max).
    assert!(
        run.l1_info.contains("mode initialized successfully"),
        "KVM did not initialise at EL2 in L1:\n{}",
        run.l1_info
    );
}

/// The harness sees L1's own kernel crash: a job that prints a guest-style kernel line (which
/// must not count) and then crashes L1's kernel through sysrq ends with `l1_crash` set to L1's
/// crash, not the job's line (the retry in [`in_l1_with`] rests on this).
#[test]
fn a_crash_of_l1s_kernel_is_told_from_a_guest_log_the_job_prints() {
    let name = "a_crash_of_l1s_kernel_is_told_from_a_guest_log_the_job_prints";
    let script = "echo '[    1.000000] BUG: a line of a guest log, not L1s'\n\
                  sleep 1\n\
                  echo c >/proc/sysrq-trigger\n\
                  sleep 30\n";
    let run = match run_in_l1_with(L1Arch::Aarch64, script, L1_TIMEOUT, "") {
        Ok(run) => run,
        Err(why) if why.contains("not installed") => return e2e::skip(&why, name),
        Err(why) => panic!("the arm64 L1 could not run: {why}"),
    };
    assert_eq!(run.rc, None, "L1 survived sysrq-c:\n{}", run.describe());
    assert!(
        run.output.contains("not L1s"),
        "the job did not run:\n{}",
        run.describe()
    );
    let crash = run
        .l1_crash
        .as_deref()
        .unwrap_or_else(|| panic!("no crash seen:\n{}", run.describe()));
    assert!(
        !crash.contains("not L1s"),
        "the job's line counted:\n{crash}"
    );
    assert!(
        crash.contains("sysrq") || crash.contains("Kernel panic"),
        "not L1's crash:\n{crash}"
    );
}

/// The static aarch64 build of pocketvisor (`make build-arm64`), as L1 sees it;
/// `NESTED_ARM64_PV` names another one in the checkout (a release build for figures).
fn pocketvisor_aarch64() -> std::path::PathBuf {
    let bin = std::env::var_os("NESTED_ARM64_PV")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            e2e::workspace_root().join("target/aarch64-unknown-linux-musl/debug/pocketvisor")
        });
    assert!(
        bin.is_file(),
        "{} is missing: run make build-arm64",
        bin.display()
    );
    bin
}

/// A `pocketvisor run` of Debian's arm64 kernel with the guest initramfs
/// (`tests/nested/guest-init-arm64`), followed by a line with its exit status.
fn guest_run_script(args: &str) -> String {
    let assets = e2e::nested::nested_dir_of(L1Arch::Aarch64);
    format!(
        "'{pv}' run --kernel '{kernel}' --initrd '{initrd}' --memory 256M {args}\n\
         echo \"PV rc=$?\"\n",
        pv = pocketvisor_aarch64().display(),
        kernel = assets.join("vmlinuz").display(),
        initrd = assets.join("guest-initramfs.cpio.gz").display(),
    )
}

/// The value of `key=` in the first output line that starts with `prefix`.
fn guest_field<'a>(output: &'a str, prefix: &str, key: &str) -> Option<&'a str> {
    let line = output.lines().find(|l| l.starts_with(prefix))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// Boots Debian's arm64 kernel on pocketvisor with 2 vCPUs in an L1 whose KVM runs with
/// `kernel_args`, and checks that it reached its init, saw its vCPUs and memory, and powered
/// off with status 0. Returns L1's KVM lines and the guest's uptime at init. The VMM's peak
/// RSS (VmHWM, guest RAM it touched included), sampled every 0.5 s, is printed.
fn boot_to_init(name: &str, kernel_args: &str) -> Option<(String, f64)> {
    let assets = e2e::nested::nested_dir_of(L1Arch::Aarch64);
    let script = format!(
        "'{pv}' run --kernel '{kernel}' --initrd '{initrd}' --memory 256M --vcpus 2 \
         --cmdline 'console=ttyS0 quiet' &\n\
         pid=$!; hwm=0\n\
         while kill -0 $pid 2>/dev/null; do\n\
         h=$(sed -n 's/^VmHWM:[^0-9]*\\([0-9]*\\) kB/\\1/p' /proc/$pid/status 2>/dev/null)\n\
         [ -n \"$h\" ] && hwm=$h; sleep 0.5\n\
         done\n\
         wait $pid; echo \"PV rc=$?\"; echo \"PV vmm_hwm_kb=$hwm\"\n",
        pv = pocketvisor_aarch64().display(),
        kernel = assets.join("vmlinuz").display(),
        initrd = assets.join("guest-initramfs.cpio.gz").display(),
    );
    let run = in_l1_with(name, &script, kernel_args)?;
    let out = &run.output;
    assert!(out.contains("PV rc=0"), "{out}\n{}", run.describe());
    assert_eq!(guest_field(out, "GUEST init", "cpus"), Some("2"), "{out}");
    let mem_kb: u64 = guest_field(out, "GUEST init", "mem_kb")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        (200_000..=262_144).contains(&mem_kb),
        "the guest should see about 256 MiB: {mem_kb} kB\n{out}"
    );
    assert!(out.contains("GUEST done"), "{out}");
    let uptime: f64 = guest_field(out, "GUEST init", "uptime")
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    let hwm_kb: u64 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("PV vmm_hwm_kb="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(hwm_kb > 0, "no VMM RSS sampled:\n{out}");
    e2e::host::loud(&format!(
        "{name}: guest uptime at init {uptime:.2} s (L1 boot {:?}), VMM peak RSS {} MiB",
        run.l1_boot,
        hwm_kb / 1024
    ));
    Some((run.l1_info, uptime))
}

#[test]
fn pocketvisor_boots_debian_arm64_to_init_and_powers_off() {
    let name = "pocketvisor_boots_debian_arm64_to_init_and_powers_off";
    let Some((kvm, _)) = boot_to_init(name, "") else {
        return;
    };
    assert!(kvm.contains("VHE mode initialized"), "{kvm}");
}

/// Android's protected KVM (pKVM): the hypervisor stays at EL2 in nVHE mode and the host
/// kernel is deprivileged; pocketvisor's guests run there unchanged.
#[test]
fn pocketvisor_boots_debian_arm64_under_protected_kvm() {
    let name = "pocketvisor_boots_debian_arm64_under_protected_kvm";
    let Some((kvm, _)) = boot_to_init(name, "kvm-arm.mode=protected") else {
        return;
    };
    assert!(
        kvm.contains("Protected nVHE mode initialized"),
        "L1's KVM is not in protected mode:\n{kvm}"
    );
}

#[test]
fn the_arm64_guest_uses_virtio_blk_and_rng_over_pci_with_msix_through_the_its() {
    let name = "the_arm64_guest_uses_virtio_blk_and_rng_over_pci_with_msix_through_the_its";
    // The disk starts with a known 16 bytes; the guest reads them back through virtio-blk.
    let script = format!(
        "printf 'pocketvisor-arm64' >disk.img && truncate -s 8M disk.img || exit 9\n{}",
        guest_run_script("--vcpus 2 --disk disk.img --rng --cmdline 'console=ttyS0 quiet'")
    );
    let Some(run) = in_l1(name, &script) else {
        return;
    };
    let out = &run.output;
    assert!(out.contains("PV rc=0"), "{out}\n{}", run.describe());
    assert_eq!(guest_field(out, "GUEST blk", "dev"), Some("vda"), "{out}");
    assert_eq!(
        guest_field(out, "GUEST blk", "sectors"),
        Some("16384"),
        "{out}"
    );
    let first: String = b"pocketvisor-arm6"
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        guest_field(out, "GUEST blk", "first"),
        Some(first.as_str()),
        "{out}"
    );
    assert_eq!(guest_field(out, "GUEST rng", "bytes"), Some("64"), "{out}");
    // The virtio interrupts are MSI-X vectors translated by the ITS (Linux: "ITS-MSI").
    assert!(
        out.lines()
            .any(|l| l.starts_with("GUEST irq") && l.contains("ITS-MSI") && l.contains("virtio")),
        "no virtio MSI through the ITS:\n{out}"
    );
}

/// What L1 puts in the arm64 guest agent's clipboard over vsock; the guest answers with
/// `guest saw: ` and this text in the same clipboard.
const VSOCK_TEXT: &str = "sent from L1 over vsock to the arm64 guest";
/// The balloon target L1 asks for (of the guest's 256 MiB).
const BALLOON_MIB: u64 = 64;

/// The other devices on arm64 Linux: virtio-net pings the TAP's end in L1; a vsock stream both
/// ways between L1 (`pocketvisor vsock`) and the guest agent (`guest/agent` built for
/// aarch64): the text L1 puts in the agent's clipboard is what the guest reads there, and the
/// guest's answer in the clipboard is what L1 reads back; the balloon inflates to the target
/// `pocketvisor balloon` sets, by the VMM's count and by the guest's own (`/proc/vmstat`); the
/// PL031 gave the guest its clock at boot (within a minute of L1's), and a PSCI reboot ends the
/// VM with status 0. One L1 boot for all of it.
#[test]
fn the_arm64_guest_pings_over_net_talks_over_vsock_inflates_its_balloon_reads_the_pl031_and_reboots(
) {
    let name =
        "the_arm64_guest_pings_over_net_talks_over_vsock_inflates_its_balloon_reads_the_pl031_and_reboots";
    let assets = e2e::nested::nested_dir_of(L1Arch::Aarch64);
    let set = format!(
        r#"{{"op":"clipboard_set","mime":"text/plain","data_b64":"{}"}}"#,
        e2e::linux::base64(VSOCK_TEXT.as_bytes())
    );
    let answer_b64 = e2e::linux::base64(format!("guest saw: {VSOCK_TEXT}").as_bytes());
    let script = format!(
        "'{pv}' run --kernel '{kernel}' --initrd '{initrd}' --memory 256M --vcpus 2 \
           --net tap=tap0 --vsock cid=3,socket=/tmp/v.sock --balloon --api-socket /tmp/api.sock \
           --serial file:guest.log \
           --cmdline 'console=ttyS0 quiet guest.ip=10.0.2.2 guest.peer=10.0.2.1 guest.agent=1 \
             guest.balloon={BALLOON_MIB} guest.end=reboot' \
           & pid=$!\n\
         i=0; while ! ip link show tap0 >/dev/null 2>&1; do\n\
           i=$((i + 1)); [ $i -lt 120 ] && kill -0 $pid || break; sleep 1\n\
         done\n\
         ip addr add 10.0.2.1/24 dev tap0 && ip link set tap0 up && echo 'TAP up'\n\
         echo \"L1 start epoch=$(date +%s)\"\n\
         echo '{set}' | '{pv}' vsock --vsock-socket /tmp/v.sock --port 1025 --wait 300 \
           >vsock-set.out 2>&1\n\
         echo \"VSOCK set rc=$?\"; sed 's/^/VSOCK set: /' vsock-set.out\n\
         i=0; while [ $i -lt 120 ]; do\n\
           echo '{{\"op\":\"clipboard_get\"}}' | '{pv}' vsock --vsock-socket /tmp/v.sock \
             --port 1025 >vsock-get.out 2>&1\n\
           grep -q '{answer_b64}' vsock-get.out && break\n\
           i=$((i + 1)); sleep 1\n\
         done\n\
         echo \"VSOCK get tries=$i\"; sed 's/^/VSOCK get: /' vsock-get.out\n\
         '{pv}' balloon --api-socket /tmp/api.sock --target-mib {BALLOON_MIB} --wait 300 \
           >balloon.out 2>&1\n\
         echo \"BALLOON rc=$?\"; sed 's/^/BALLOON: /' balloon.out\n\
         wait $pid; echo \"PV rc=$?\"\n\
         echo \"L1 end epoch=$(date +%s)\"\n\
         cat guest.log\n",
        pv = pocketvisor_aarch64().display(),
        kernel = assets.join("vmlinuz").display(),
        initrd = assets.join("guest-initramfs.cpio.gz").display(),
    );
    let Some(run) = in_l1(name, &script) else {
        return;
    };
    let out = &run.output;
    assert!(out.contains("TAP up"), "{out}\n{}", run.describe());
    assert!(out.contains("PV rc=0"), "{out}\n{}", run.describe());
    assert_eq!(guest_field(out, "GUEST net", "ping"), Some("ok"), "{out}");
    // virtio device ids: 1 net, 5 balloon, 0x13 vsock.
    for (kind, driver) in [
        ("0x0001", "virtio_net"),
        ("0x0005", "virtio_balloon"),
        ("0x0013", "vmw_vsock_virtio_transport"),
    ] {
        assert!(
            out.lines().any(|l| l.starts_with("GUEST virtio")
                && l.contains(&format!("type={kind}"))
                && l.ends_with(&format!("driver={driver}"))),
            "no {driver} bound:\n{out}"
        );
    }
    // vsock, L1 to the guest: the agent took the text, and the guest read it in its clipboard.
    assert!(out.contains("VSOCK set rc=0"), "{out}");
    let set_answer = format!(r#"VSOCK set: {{"ok":true,"bytes":{}}}"#, VSOCK_TEXT.len());
    assert!(out.lines().any(|l| l == set_answer), "{out}");
    let guest_line = format!("GUEST agent clipboard={VSOCK_TEXT} waited=");
    assert!(out.lines().any(|l| l.starts_with(&guest_line)), "{out}");
    // The guest to L1: its answer came back through the agent.
    let get_answer =
        format!(r#"VSOCK get: {{"ok":true,"mime":"text/plain","data_b64":"{answer_b64}"}}"#);
    assert!(out.lines().any(|l| l == get_answer), "{out}");
    // The balloon: the VMM saw the driver reach the target, and so did the guest itself.
    assert!(out.contains("BALLOON rc=0"), "{out}");
    let pages = BALLOON_MIB * 256;
    let vmm_line = format!(
        "BALLOON: balloon target={BALLOON_MIB} MiB actual={BALLOON_MIB} MiB ({pages} pages)"
    );
    assert!(out.lines().any(|l| l == vmm_line), "{out}");
    assert_eq!(
        guest_field(out, "GUEST balloon", "pages"),
        Some(pages.to_string().as_str()),
        "the guest's /proc/vmstat does not count {pages} pages in the balloon:\n{out}"
    );
    assert_eq!(
        guest_field(out, "GUEST rtc", "name"),
        Some("rtc-pl031"),
        "{out}"
    );
    let guest_epoch: i64 = guest_field(out, "GUEST rtc", "epoch")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // The guest read its clock between L1's two readings (give or take a minute).
    let l1_epoch = |when: &str| -> i64 {
        guest_field(out, &format!("L1 {when}"), "epoch")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (start, end) = (l1_epoch("start"), l1_epoch("end"));
    assert!(
        start > 0 && (start - 60..=end + 60).contains(&guest_epoch),
        "the guest's clock {guest_epoch} is not L1's ({start} to {end}):\n{out}"
    );
    assert!(out.contains("GUEST done"), "{out}");
    assert!(out.contains("reboot: Restarting system"), "{out}");
}

/// The beats (`GUEST beat n=N uptime=S`) in `output`, in order.
fn beats(output: &str) -> Vec<(u32, f64)> {
    output
        .lines()
        .filter(|l| l.starts_with("GUEST beat"))
        .filter_map(|l| {
            Some((
                guest_field(l, "GUEST beat", "n")?.parse().ok()?,
                guest_field(l, "GUEST beat", "uptime")?.parse().ok()?,
            ))
        })
        .collect()
}

/// Snapshot and restore on arm64: Debian's arm64 kernel with 2 vCPUs, a disk and rng (PCI
/// with MSI-X through the ITS) counts a beat a second; it is snapshotted while it counts and
/// ended, then restored by a new pocketvisor process, where it goes on counting from the
/// next beat with a sane clock (uptime continues from where it was, a second a beat), reads
/// its disk and rng through interrupts the restored ITS translates, and powers off (status 0).
#[test]
fn an_arm64_linux_guest_is_snapshotted_while_running_and_restored_in_a_new_process() {
    let name = "an_arm64_linux_guest_is_snapshotted_while_running_and_restored_in_a_new_process";
    const BEATS: u32 = 8;
    // Seconds between the end of the first process and the restore: the guest's clock must
    // not jump by them (nor by less: the pause before the snapshot, slow under load, does
    // count, and took 7 s at a load average of 11).
    const AWAY_S: u32 = 20;
    let assets = e2e::nested::nested_dir_of(L1Arch::Aarch64);
    let pv = pocketvisor_aarch64();
    let script = format!(
        "printf 'pocketvisor-arm64' >disk.img && truncate -s 8M disk.img || exit 9\n\
         '{pv}' run --kernel '{kernel}' --initrd '{initrd}' --memory 256M --vcpus 2 \
           --disk disk.img --rng --serial file:first.log --api-socket /tmp/api.sock \
           --cmdline 'console=ttyS0 quiet guest.beats={BEATS}' & pid=$!\n\
         i=0; while ! grep -q 'GUEST beat n=3' first.log 2>/dev/null; do\n\
           i=$((i + 1)); [ $i -lt 300 ] && kill -0 $pid || {{ echo 'no third beat'; kill $pid; cat first.log; exit 8; }}; sleep 1\n\
         done\n\
         t0=$(cut -d' ' -f1 /proc/uptime)\n\
         '{pv}' snapshot --api-socket /tmp/api.sock -o snap --stop; echo \"SNAP rc=$?\"\n\
         t1=$(cut -d' ' -f1 /proc/uptime); echo \"SNAP took t0=$t0 t1=$t1\"\n\
         wait $pid; echo \"PV1 rc=$?\"\n\
         sed 's/^/FIRST /' first.log\n\
         sleep {AWAY_S}\n\
         '{pv}' restore snap --serial stdout; echo \"PV2 rc=$?\"\n\
         rm -rf snap\n",
        pv = pv.display(),
        kernel = assets.join("vmlinuz").display(),
        initrd = assets.join("guest-initramfs.cpio.gz").display(),
    );
    let Some(run) = in_l1(name, &script) else {
        return;
    };
    let out = &run.output;
    assert!(out.contains("SNAP rc=0"), "{out}\n{}", run.describe());
    assert!(out.contains("PV1 rc=0"), "{out}\n{}", run.describe());
    assert!(out.contains("PV2 rc=0"), "{out}\n{}", run.describe());
    let (first_part, restored) = out
        .split_once("FIRST ")
        .map(|(_, rest)| rest)
        .and_then(|rest| {
            let at = rest.find("\nGUEST ")?;
            Some((&rest[..at], &rest[at..]))
        })
        .unwrap_or_else(|| panic!("no restored guest output:\n{out}"));
    let before = beats(&first_part.replace("FIRST ", ""));
    let after = beats(restored);
    let (&(last_n, last_up), &(next_n, next_up)) = before
        .last()
        .zip(after.first())
        .unwrap_or_else(|| panic!("beats missing before or after the restore:\n{out}"));
    assert!(last_n >= 3, "{out}");
    // The restored guest goes on from the next beat (or repeats the one being printed).
    assert!(
        next_n == last_n + 1 || next_n == last_n,
        "beat {last_n} before the snapshot, {next_n} after:\n{out}"
    );
    assert_eq!(after.last().map(|b| b.0), Some(BEATS), "{out}");
    // The guest's clock continues where it was saved: no jump back, none by the time away.
    assert!(
        next_up >= last_up && next_up < last_up + f64::from(AWAY_S),
        "uptime {last_up} before the snapshot, {next_up} after:\n{out}"
    );
    let (first, last) = (after[0], after[after.len() - 1]);
    if last.0 > first.0 {
        let per_beat = (last.1 - first.1) / f64::from(last.0 - first.0);
        assert!(
            (0.9..4.0).contains(&per_beat),
            "{per_beat:.2} s of guest uptime per one-second beat after the restore:\n{out}"
        );
    }
    // Interrupts through the restored ITS: the disk and rng answer after the restore.
    let first_bytes: String = b"pocketvisor-arm6"
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        guest_field(restored, "GUEST blk", "first"),
        Some(first_bytes.as_str()),
        "{out}"
    );
    assert_eq!(
        guest_field(restored, "GUEST rng", "bytes"),
        Some("64"),
        "{out}"
    );
    assert!(restored.contains("GUEST done"), "{out}");
    // The quiet console still shows errors: no lockup, stall or oops after the restore.
    for bad in ["BUG:", "stall", "Oops", "Internal error"] {
        assert!(!restored.contains(bad), "{bad} after the restore:\n{out}");
    }
    e2e::host::loud(&format!(
        "{name}: beat {last_n} at uptime {last_up} s before the snapshot, beat {next_n} at \
         {next_up} s after; {}",
        out.lines()
            .find(|l| l.starts_with("snapshot written") || l.starts_with("SNAP took"))
            .unwrap_or("")
    ));
}

/// The jail on arm64 (`pocketvisor vmm`: namespaces, private root, dropped privileges and the
/// aarch64 seccomp lists): Debian's arm64 kernel with 2 vCPUs, a disk and rng boots jailed
/// and counts; a snapshot is taken through the jailed VMM's API (the vCPU registers and the
/// vGIC/ITS state ioctls the aarch64 allowlist has) and the VM ended; a second jailed VMM
/// restores it, and the guest counts on, reads its disk and rng and powers off. A syscall
/// or ioctl outside the lists would kill the VMM with SIGSYS (status 159).
#[test]
fn an_arm64_linux_guest_runs_snapshots_and_restores_in_the_jail() {
    let name = "an_arm64_linux_guest_runs_snapshots_and_restores_in_the_jail";
    let assets = e2e::nested::nested_dir_of(L1Arch::Aarch64);
    // L1's root is its initramfs (rootfs), which pivot_root refuses to leave: the script
    // runs again chrooted into a bind mount of it, which the jail can pivot away from.
    // Unix sockets cannot live on L1's 9p share: the profile is on its tmpfs.
    let script = format!(
        "if [ -z \"${{BIND_ROOT:-}}\" ]; then\n\
           mkdir -p /tmp/bindroot && mount --rbind / /tmp/bindroot || exit 9\n\
           export BIND_ROOT=1; exec chroot /tmp/bindroot /bin/sh -c \"cd '$PWD' && . ./run\"\n\
         fi\n\
         set -u; p=/tmp/profile; mkdir -p $p/run && cd $p || exit 9\n\
         printf 'pocketvisor-arm64' >disk.img && truncate -s 8M disk.img || exit 9\n\
         cat >vm.toml <<EOF\n\
         kernel = \"{kernel}\"\n\
         initrd = \"{initrd}\"\n\
         cmdline = \"console=ttyS0 quiet guest.beats=6\"\n\
         memory_mib = 256\n\
         vcpus = 2\n\
         rng = true\n\
         disks = [{{ path = \"$p/disk.img\" }}]\n\
         serial = {{ file = \"$p/run/serial.log\" }}\n\
         EOF\n\
         '{pv}' vmm --config vm.toml --jail-id arm64 --jail-root /tmp/jails \
           --api-socket $p/run/api.sock & pid=$!\n\
         i=0; while ! grep -q 'GUEST beat n=2' run/serial.log 2>/dev/null; do\n\
           i=$((i + 1)); [ $i -lt 300 ] && kill -0 $pid || {{ echo 'no second beat'; cat run/serial.log; wait $pid; echo \"JAIL1 rc=$?\"; exit 8; }}; sleep 1\n\
         done\n\
         '{pv}' snapshot --api-socket $p/run/api.sock -o /run/0/snap --stop; echo \"SNAP rc=$?\"\n\
         wait $pid; rc=$?; echo \"JAIL1 rc=$rc\"\n\
         [ $rc = 0 ] || dmesg | grep -i -E 'seccomp|audit' | tail -n 5\n\
         sed 's/^/FIRST /' run/serial.log\n\
         '{pv}' vmm --restore $p/run/snap --jail-id arm64-restored --jail-root /tmp/jails \
           --disk $p/disk.img --serial file:$p/restored.log; echo \"JAIL2 rc=$?\"\n\
         cat restored.log\n",
        pv = pocketvisor_aarch64().display(),
        kernel = assets.join("vmlinuz").display(),
        initrd = assets.join("guest-initramfs.cpio.gz").display(),
    );
    let Some(run) = in_l1(name, &script) else {
        return;
    };
    let out = &run.output;
    assert!(out.contains("SNAP rc=0"), "{out}\n{}", run.describe());
    assert!(out.contains("JAIL1 rc=0"), "{out}\n{}", run.describe());
    assert!(out.contains("JAIL2 rc=0"), "{out}\n{}", run.describe());
    let restored = out.split("JAIL2 rc=0").nth(1).unwrap_or_default();
    let before = beats(&out.replace("FIRST ", ""));
    assert!(before.iter().any(|b| b.0 == 2), "{out}");
    let after = beats(restored);
    assert!(
        after.first().is_some_and(|b| b.0 > 2) && after.last().is_some_and(|b| b.0 == 6),
        "the restored guest did not count on to 6:\n{out}"
    );
    assert_eq!(
        guest_field(restored, "GUEST rng", "bytes"),
        Some("64"),
        "{out}"
    );
    assert_eq!(
        guest_field(restored, "GUEST blk", "dev"),
        Some("vda"),
        "{out}"
    );
    assert!(restored.contains("GUEST done"), "{out}");
}

/// A snapshot carries its architecture: one of an x86_64 guest, taken on this host, is
/// refused by the arm64 pocketvisor with an error that says so, before anything runs.
#[test]
fn an_x86_64_snapshot_is_refused_on_arm64() {
    let name = "an_x86_64_snapshot_is_refused_on_arm64";
    if !e2e::require_kvm(name) {
        return;
    }
    // The snapshot lives in the checkout, which L1 sees (read-only is enough to refuse it).
    let snap = e2e::nested::nested_dir_of(L1Arch::Aarch64)
        .join("runs")
        .join(e2e::host::unique_name("x86-snapshot"));
    let sock = e2e::TempDir::new();
    let sock = sock.path().join("api.sock");
    let mut vm = e2e::VmCommand::probe("pv.mode=counter")
        .arg("--api-socket")
        .arg(sock.to_str().expect("utf-8 path"))
        .spawn();
    assert!(
        vm.wait_for_line(Duration::from_secs(60), |l| l.contains("PROBE counter 1"))
            .is_some(),
        "the probe did not count: {}",
        vm.drain()
    );
    let out = std::process::Command::new(e2e::pocketvisor_bin())
        .args(["snapshot", "--api-socket"])
        .arg(&sock)
        .arg("-o")
        .arg(&snap)
        .arg("--stop")
        .output()
        .expect("run pocketvisor snapshot");
    assert!(
        out.status.success(),
        "snapshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(vm.wait_for(Duration::from_secs(60)));

    let script = format!(
        "'{}' restore '{}'\necho \"PV rc=$?\"\n",
        pocketvisor_aarch64().display(),
        snap.display()
    );
    let run = in_l1(name, &script);
    let _ = std::fs::remove_dir_all(&snap);
    let Some(run) = run else {
        return;
    };
    let out = &run.output;
    assert!(out.contains("PV rc=1"), "{out}\n{}", run.describe());
    assert!(
        out.contains("this snapshot holds a x86_64 guest; this pocketvisor runs aarch64 guests"),
        "{out}"
    );
}

/// A minimal arm64 `Image`: its code writes the UART's scratch register `writes` times (each
/// write one MMIO exit to pocketvisor's bus) and powers off through PSCI `SYSTEM_OFF`.
fn mmio_loop_image(writes: u32) -> Vec<u8> {
    let [lo, hi] = [writes & 0xffff, writes >> 16];
    let code: [u32; 11] = [
        0xD2A1_2001,             // movz x1, #0x0900, lsl #16 (the UART at 0x0900_0000)
        0xD280_0002 | (lo << 5), // movz x2, #lo
        0xF2A0_0002 | (hi << 5), // movk x2, #hi, lsl #16
        0xB400_0082,             // cbz x2, off (4 instructions on)
        0x3900_1C20,             // loop: strb w0, [x1, #7] (scratch register)
        0xF100_0442,             // subs x2, x2, #1
        0x54FF_FFC1,             // b.ne loop
        0x5280_0100,             // off: movz w0, #0x0008
        0x72B0_8000,             // movk w0, #0x8400, lsl #16 (PSCI SYSTEM_OFF)
        0xD400_0002,             // hvc #0
        0x1400_0000,             // b . (not reached)
    ];
    let mut image = vec![0u8; 64];
    image[0..4].copy_from_slice(&0x1400_0010u32.to_le_bytes()); // b +64: over the header
    let size = u64::try_from(64 + code.len() * 4).expect("small");
    image[16..24].copy_from_slice(&size.to_le_bytes()); // image_size (text_offset 0)
    image[56..60].copy_from_slice(b"ARM\x64");
    for word in code {
        image.extend(word.to_le_bytes());
    }
    image
}

/// pocketvisor's MMIO exit round trip on arm64 KVM: the guest's UART writes go through
/// KVM_RUN, the vCPU loop and the MMIO bus. In the same L1, interleaved, the same images run
/// on `rawexit-arm64` (a bare KVM_RUN loop that answers each exit with nothing,
/// `bench/rawexit-arm64`). The check is that every run powers off with status 0 and the raw
/// loop counted exactly the guest's writes; the figures (per exit, from the difference
/// between a long and an empty loop, best of 3) and their ratio are printed for the README.
#[test]
fn mmio_exits_round_trip_through_pocketvisor_on_arm64() {
    let name = "mmio_exits_round_trip_through_pocketvisor_on_arm64";
    const WRITES: u32 = 100_000;
    let dir = e2e::nested::nested_dir_of(L1Arch::Aarch64).join("runs");
    std::fs::create_dir_all(&dir).expect("runs dir");
    let images = [0, WRITES].map(|n| {
        let path = dir.join(e2e::host::unique_name(&format!("mmio-{n}")));
        std::fs::write(&path, mmio_loop_image(n)).expect("write the image");
        path
    });
    let raw = e2e::workspace_root().join("target/aarch64-unknown-linux-musl/debug/rawexit-arm64");
    assert!(
        raw.is_file(),
        "{} is missing: run make build-arm64",
        raw.display()
    );
    // Three runs of each on each, timed in L1 by its own clock (/proc/uptime, 10 ms steps).
    let mut script = String::new();
    for round in 0..3 {
        for (n, image) in [0, WRITES].iter().zip(&images) {
            for (vmm, command) in [
                (
                    "pv",
                    format!(
                        "'{}' run --kernel '{}' --memory 32M --serial none",
                        pocketvisor_aarch64().display(),
                        image.display()
                    ),
                ),
                ("raw", format!("'{}' '{}'", raw.display(), image.display())),
            ] {
                script.push_str(&format!(
                    "t0=$(cut -d' ' -f1 /proc/uptime); {command}; \
                     rc=$?; t1=$(cut -d' ' -f1 /proc/uptime); \
                     echo \"MMIO vmm={vmm} round={round} writes={n} rc=$rc t0=$t0 t1=$t1\"\n",
                ));
            }
        }
    }
    let run = in_l1(name, &script);
    for image in &images {
        let _ = std::fs::remove_file(image);
    }
    let Some(run) = run else {
        return;
    };
    let out = &run.output;
    let runs: Vec<(String, u32, i32, f64)> = out
        .lines()
        .filter(|l| l.starts_with("MMIO "))
        .filter_map(|l| {
            let get = |k: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
            };
            Some((
                get("vmm")?.to_string(),
                get("writes")?.parse().ok()?,
                get("rc")?.parse().ok()?,
                get("t1")?.parse::<f64>().ok()? - get("t0")?.parse::<f64>().ok()?,
            ))
        })
        .collect();
    assert_eq!(runs.len(), 12, "{out}\n{}", run.describe());
    assert!(runs.iter().all(|r| r.2 == 0), "a run failed:\n{out}");
    assert_eq!(
        out.matches(&format!("RAW mmio_exits={WRITES}\n")).count(),
        3,
        "the raw loop did not count the guest's writes:\n{out}"
    );
    assert_eq!(out.matches("RAW mmio_exits=0\n").count(), 3, "{out}");
    let best = |vmm: &str, n: u32| {
        runs.iter()
            .filter(|r| r.0 == vmm && r.1 == n)
            .map(|r| r.3)
            .fold(f64::INFINITY, f64::min)
    };
    let mut per_exit = Vec::new();
    for vmm in ["pv", "raw"] {
        let (empty, full) = (best(vmm, 0), best(vmm, WRITES));
        assert!(full > empty, "{vmm}: the loop took no time:\n{out}");
        let us = (full - empty) * 1e6 / f64::from(WRITES);
        e2e::host::loud(&format!(
            "{name}: {vmm}: {WRITES} MMIO exits in {:.2} s over an empty run of {empty:.2} s \
             (best of 3): {us:.1} us per exit, {:.0} exits/s",
            full - empty,
            1e6 / us
        ));
        per_exit.push(us);
    }
    e2e::host::loud(&format!(
        "{name}: pocketvisor's exit round trip is {:.2}x the raw loop's (load {})",
        per_exit[0] / per_exit[1],
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    ));
}

/// The arm64 probe (`guest/out/probe-arm64.img`, built by `guest/build-probe.sh`): an arm64
/// `Image` that pocketvisor boots from its header; it reads its command line from the device
/// tree, reports on the 16550 with the x86 probe's `PROBE` lines and powers off through PSCI
/// (status 0). Its `gic` test brings up the GICv3, takes an SGI it sends itself and then
/// virtual timer ticks (100 Hz) while idle in `wfi`: eleven ticks must take at least 100 ms
/// of the counter (the timer paces them). An unknown mode must end in `done fail=1`, so the
/// check sees the probe's verdict and not only that it ran.
#[test]
fn the_arm64_probe_boots_from_its_image_header_and_powers_off() {
    let name = "the_arm64_probe_boots_from_its_image_header_and_powers_off";
    let probe = e2e::workspace_root().join("guest/out/probe-arm64.img");
    assert!(
        probe.is_file(),
        "{} is missing: run guest/build-probe.sh",
        probe.display()
    );
    let mut script = String::new();
    for mode in ["selftest", "nosuchmode"] {
        script.push_str(&format!(
            "'{pv}' run --kernel '{probe}' --memory 64M --cmdline 'pv.mode={mode}'\n\
             echo \"PV mode={mode} rc=$?\"\n",
            pv = pocketvisor_aarch64().display(),
            probe = probe.display(),
        ));
    }
    let Some(run) = in_l1(name, &script) else {
        return;
    };
    let out = &run.output;
    let selftest = out
        .split("PV mode=selftest")
        .next()
        .expect("split yields one part");
    assert!(
        out.contains("PV mode=selftest rc=0"),
        "{out}\n{}",
        run.describe()
    );
    assert!(selftest.contains("PROBE ready"), "{out}");
    assert!(
        selftest.contains("PROBE boot ok cmdline=\"pv.mode=selftest\""),
        "{out}"
    );
    assert!(selftest.contains("PROBE info arch=aarch64"), "{out}");
    assert!(selftest.contains("PROBE done ok"), "{out}");
    let gic = selftest
        .lines()
        .find_map(|l| l.trim().strip_prefix("PROBE gic ok "))
        .unwrap_or_else(|| panic!("no gic ok line:\n{out}"));
    let field = |key: &str| -> u64 {
        gic.split(' ')
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key}= in gic line: {gic}"))
    };
    assert_eq!(field("sgi"), 1, "{gic}");
    assert!(gic.contains(" timer=ok "), "{gic}");
    assert!(field("ticks") >= 11, "{gic}");
    assert!(field("wfi_wakes") >= 1, "{gic}");
    let elapsed_us = field("elapsed_us");
    assert!(
        (100_000..60_000_000).contains(&elapsed_us),
        "11 ticks of a 100 Hz timer took {elapsed_us} us: {gic}"
    );
    e2e::host::loud(&format!("{name}: {gic}"));
    assert!(
        out.contains("PROBE boot fail unknown-mode nosuchmode")
            && out.contains("PROBE done fail=1"),
        "{out}"
    );
}

/// SMP on arm64: the probe's `smp` test (the x86 probe's name and lines) starts every CPU of
/// the device tree through PSCI `CPU_ON`; each secondary brings up its own GIC redistributor
/// and reports its MPIDR, which must be the one the tree gave it. With 2 and 4 vCPUs (in an
/// L1 of 2): `cpu <i> up mpidr=<hex>` for each and `smp ok count=<n>`.
#[test]
fn the_arm64_probe_starts_its_cpus_through_psci_cpu_on() {
    let name = "the_arm64_probe_starts_its_cpus_through_psci_cpu_on";
    let probe = e2e::workspace_root().join("guest/out/probe-arm64.img");
    assert!(
        probe.is_file(),
        "{} is missing: run guest/build-probe.sh",
        probe.display()
    );
    let mut script = String::new();
    for vcpus in [2, 4] {
        script.push_str(&format!(
            "echo \"PV begin vcpus={vcpus}\"\n\
             '{pv}' run --kernel '{probe}' --memory 64M --vcpus {vcpus} \
             --cmdline 'pv.tests=smp'\n\
             echo \"PV vcpus={vcpus} rc=$?\"\n",
            pv = pocketvisor_aarch64().display(),
            probe = probe.display(),
        ));
    }
    let Some(run) = in_l1(name, &script) else {
        return;
    };
    let out = &run.output;
    for vcpus in [2u64, 4] {
        let part = out
            .split(&format!("PV begin vcpus={vcpus}"))
            .nth(1)
            .and_then(|rest| rest.split(&format!("PV vcpus={vcpus} rc=")).next())
            .unwrap_or_else(|| panic!("no run with {vcpus} vCPUs:\n{out}\n{}", run.describe()));
        assert!(
            out.contains(&format!("PV vcpus={vcpus} rc=0")),
            "{out}\n{}",
            run.describe()
        );
        assert!(
            part.contains(&format!("PROBE smp ok count={vcpus}")),
            "{vcpus} vCPUs:\n{out}"
        );
        for index in 0..vcpus {
            // pocketvisor's MPIDRs: Aff0 = vCPU index (below 16), as its device tree says.
            assert!(
                part.contains(&format!("PROBE cpu {index} up mpidr={index:x}")),
                "cpu {index} of {vcpus}:\n{out}"
            );
        }
        assert!(part.contains("PROBE done ok"), "{vcpus} vCPUs:\n{out}");
    }
}

/// PCI on arm64: the probe's `pci` test (the x86 test's name and lines) finds the host
/// bridge in the device tree, enumerates bus 0 through its ECAM window and checks that every
/// memory BAR the VMM assigned lies inside one of the bridge's `ranges` windows. With a disk
/// and rng: the virtio-blk (1af4:1042) and virtio-rng (1af4:1044) functions are listed.
#[test]
fn the_arm64_probe_enumerates_pci_over_ecam() {
    let name = "the_arm64_probe_enumerates_pci_over_ecam";
    let probe = e2e::workspace_root().join("guest/out/probe-arm64.img");
    assert!(
        probe.is_file(),
        "{} is missing: run guest/build-probe.sh",
        probe.display()
    );
    let script = format!(
        "printf 'pocketvisor-arm64' >disk.img && truncate -s 8M disk.img || exit 9\n\
         '{pv}' run --kernel '{probe}' --memory 64M --disk disk.img --rng \
         --cmdline 'pv.tests=pci'\n\
         echo \"PV rc=$?\"\n",
        pv = pocketvisor_aarch64().display(),
        probe = probe.display(),
    );
    let Some(run) = in_l1(name, &script) else {
        return;
    };
    let out = &run.output;
    assert!(out.contains("PV rc=0"), "{out}\n{}", run.describe());
    let pci: Vec<&str> = out
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("PROBE pci "))
        .collect();
    e2e::host::loud(&format!("{name}: {}", pci.join(" | ")));
    for id in ["vendor=1af4 device=1042", "vendor=1af4 device=1044"] {
        assert!(pci.iter().any(|l| l.contains(id)), "no {id}:\n{out}");
    }
    let bars = pci.iter().filter(|l| l.contains(" bar")).count();
    assert!(bars >= 2, "fewer than 2 assigned BARs:\n{out}");
    assert!(
        pci.iter().all(|l| !l.contains("in-ranges=no")),
        "a BAR outside the ranges:\n{out}"
    );
    let listed = pci.iter().filter(|l| l.contains(" vendor=")).count();
    assert!(
        pci.contains(&format!("PROBE pci ok count={listed}").as_str()),
        "{out}"
    );
    assert!(out.contains("PROBE done ok"), "{out}");
}

/// virtio-rng over PCI on arm64: the probe's `rng` test (the x86 test's name and lines)
/// drives the 1af4:1044 function through the modern virtio-pci transport over ECAM and gets
/// 32 bytes that are not all the same, the completion taken as an LPI: MSI-X entry 0 points
/// at the ITS, which the probe programmed to translate the function's requester id
/// (`irq=msix hits=1`). Two runs must not return the same bytes.
#[test]
fn the_arm64_probe_reads_virtio_rng_over_pci() {
    let name = "the_arm64_probe_reads_virtio_rng_over_pci";
    let probe = e2e::workspace_root().join("guest/out/probe-arm64.img");
    assert!(
        probe.is_file(),
        "{} is missing: run guest/build-probe.sh",
        probe.display()
    );
    let run_line = format!(
        "'{pv}' run --kernel '{probe}' --memory 64M --rng --cmdline 'pv.tests=rng'\n\
         echo \"PV rc=$?\"\n",
        pv = pocketvisor_aarch64().display(),
        probe = probe.display(),
    );
    let script = format!("{run_line}{run_line}");
    let Some(run) = in_l1(name, &script) else {
        return;
    };
    let out = &run.output;
    assert_eq!(
        out.matches("PV rc=0").count(),
        2,
        "{out}\n{}",
        run.describe()
    );
    let bytes: Vec<&str> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("PROBE rng ok bytes="))
        .collect();
    assert_eq!(bytes.len(), 2, "{out}");
    for b in &bytes {
        assert_eq!(b.len(), 64, "{out}");
        assert!(b.chars().all(|c| c.is_ascii_hexdigit()), "{out}");
    }
    assert_ne!(bytes[0], bytes[1], "two runs read the same bytes:\n{out}");
    assert_eq!(
        out.matches("PROBE rng irq=msix hits=1 polled=0 lpi=8192")
            .count(),
        2,
        "{out}"
    );
    assert_eq!(out.matches("PROBE done ok").count(), 2, "{out}");
    e2e::host::loud(&format!("{name}: {}", bytes.join(" ")));
}

/// virtio-blk over PCI on arm64: the probe's `blk` test (the x86 test's name and lines)
/// reads sector 0 of an 8 MiB disk whose first bytes L1 wrote, and with `pv.blk.write=16`
/// writes 4 KiB of its pattern at sector 16 and reads it back; L1 then finds the pattern in
/// the image file. Each of the three completions is an LPI through the ITS; an rng function
/// in the same guest gets the next LPI, so two functions' MSIs (the same address and data)
/// are told apart only by the device id our MSI routes carry.
#[test]
fn the_arm64_probe_reads_and_writes_virtio_blk_over_pci() {
    let name = "the_arm64_probe_reads_and_writes_virtio_blk_over_pci";
    let probe = e2e::workspace_root().join("guest/out/probe-arm64.img");
    assert!(
        probe.is_file(),
        "{} is missing: run guest/build-probe.sh",
        probe.display()
    );
    let script = format!(
        "printf 'pocketvisor-arm64' >disk.img && truncate -s 8M disk.img || exit 9\n\
         '{pv}' run --kernel '{probe}' --memory 64M --disk disk.img \
         --rng --cmdline 'pv.tests=blk,rng pv.blk.write=16'\n\
         echo \"PV rc=$?\"\n\
         echo \"PV sector16=$(dd if=disk.img bs=512 skip=16 count=1 2>/dev/null | head -c 24)\"\n",
        pv = pocketvisor_aarch64().display(),
        probe = probe.display(),
    );
    let Some(run) = in_l1(name, &script) else {
        return;
    };
    let out = &run.output;
    assert!(out.contains("PV rc=0"), "{out}\n{}", run.describe());
    let mut sector0 = b"pocketvisor-arm64".to_vec();
    sector0.resize(512, 0);
    let fnv = sector0.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let expected =
        format!("PROBE blk ok capacity=16384 ro=0 sector0_fnv={fnv:016x} id=\"\" wrote=16");
    assert!(out.contains(&expected), "no '{expected}':\n{out}");
    assert!(
        out.contains("PROBE blk irq=msix hits=3 polled=0 lpi=8192"),
        "{out}"
    );
    assert!(
        out.contains("PROBE rng irq=msix hits=1 polled=0 lpi=8193"),
        "{out}"
    );
    assert!(
        out.contains("PV sector16=pocketvisor-probe-blk:16"),
        "the write did not reach the image:\n{out}"
    );
    assert!(out.contains("PROBE done ok"), "{out}");
    e2e::host::loud(&format!("{name}: {expected}"));
}

/// The top directories of L1 the handset check's new root binds: the system's, and the one
/// the checkout lives under (`/work/...` for a worktree, `/tmp/...` for a CI clone).
fn root_dirs_to_bind() -> Vec<String> {
    let mut dirs: Vec<String> = ["bin", "proc", "sys", "dev", "tmp"]
        .map(String::from)
        .to_vec();
    let top = e2e::workspace_root()
        .components()
        .nth(1)
        .and_then(|c| c.as_os_str().to_str().map(String::from));
    if let Some(top) = top.filter(|t| !dirs.contains(t)) {
        dirs.push(top);
    }
    dirs
}

/// The handset on arm64: a `pocketvisor handset` daemon in L1 (its VMMs jailed, as a user
/// runs it) creates `work` and
/// `personal` from the templates with the arm64 probe in its `counter` mode, starts both,
/// both count on their consoles, `switch` moves the foreground each way (`list` marks it),
/// and `stop` ends both: stopped in `list`, no VMM process left. L1 runs from its initramfs,
/// where `pivot_root` (the jail's) is refused, so the script first chroots into a tmpfs root
/// with L1's directories bound in, after mounting cgroup v2 (L1's init does neither; a
/// handset's root is a real file system).
#[test]
fn the_handset_runs_two_arm64_probe_profiles_switches_and_stops_them() {
    let name = "the_handset_runs_two_arm64_probe_profiles_switches_and_stops_them";
    let probe = e2e::workspace_root().join("guest/out/probe-arm64.img");
    assert!(
        probe.is_file(),
        "{} is missing: run guest/build-probe.sh",
        probe.display()
    );
    let script = format!(
        r#"mkdir -p /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup || exit 9
R=/newroot
mkdir -p $R && mount -t tmpfs tmpfs $R || exit 9
for d in {dirs}; do
    mkdir -p $R/$d && mount --rbind /$d $R/$d || exit 9
done
cat >handset.sh <<'END'
pv='{pv}'
S=/tmp/hs
# Under TCG a start can take minutes: let the CLI wait (it says in words when it gives up).
export POCKETVISOR_CLIENT_TIMEOUT=1500
mkdir -p $S/assets && cp '{probe}' $S/assets/probe-arm64.img || exit 9
"$pv" handset --state-dir $S >/tmp/daemon.log 2>&1 &
i=0
until "$pv" profile --state-dir $S status >/dev/null 2>&1; do
    i=$((i+1)); [ $i -gt 300 ] && {{ echo "PV daemon-silent"; cat /tmp/daemon.log; exit 8; }}
    sleep 0.2
done
p() {{ "$pv" profile --state-dir $S "$@"; echo "PV rc=$? profile $*"; }}
for n in work personal; do
    p create $n --template $n --kernel probe-arm64.img --cmdline 'pv.mode=counter pv.counter.ms=100'
done
p start work
p start personal
sleep 3
p list
echo "PV running-vmms=$(ps -o args | grep -c '^[^ ]*pocketvisor vmm .*--jail-id')"
for n in work personal; do
    echo "PV $n first=$(grep -c 'PROBE counter' $S/profiles/$n/run/serial.log)"
done
sleep 2
for n in work personal; do
    echo "PV $n then=$(grep -c 'PROBE counter' $S/profiles/$n/run/serial.log)"
done
p switch work
p list
p switch personal
p list
p stop work
p stop personal
p list
sleep 1
echo "PV vmms=$(ps -o args | grep -c '[p]ocketvisor vmm')"
kill %1
wait
echo "PV --- daemon log ---"
cat /tmp/daemon.log
END
chroot $R /bin/sh -c "cd '$PWD' && sh ./handset.sh"
"#,
        dirs = root_dirs_to_bind().join(" "),
        pv = pocketvisor_aarch64().display(),
        probe = probe.display(),
    );
    let Some(run) = in_l1(name, &script) else {
        return;
    };
    let out = &run.output;
    for step in [
        "create work --template work",
        "create personal --template personal",
        "start work",
        "start personal",
        "switch work",
        "switch personal",
        "stop work",
        "stop personal",
    ] {
        assert!(
            out.contains(&format!("PV rc=0 profile {step}")),
            "'{step}' failed:\n{out}\n{}",
            run.describe()
        );
    }
    let count = |key: &str| -> u64 {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no '{key}':\n{out}"))
    };
    for n in ["work", "personal"] {
        let (first, then) = (
            count(&format!("PV {n} first=")),
            count(&format!("PV {n} then=")),
        );
        assert!(first > 0, "{n} did not count:\n{out}");
        assert!(
            then > first,
            "{n} stopped counting ({first} then {then}):\n{out}"
        );
    }
    assert!(out.contains("work is in the foreground"), "{out}");
    assert!(out.contains("personal is in the foreground"), "{out}");
    // Each jailed VMM is two processes: the one the daemon started and its child in the
    // jail's namespaces.
    assert!(
        out.contains("PV running-vmms=4"),
        "not two jailed VMMs:\n{out}"
    );
    assert!(out.contains("PV vmms=0"), "a VMM outlived its stop:\n{out}");
    let fg = |n: &str| {
        out.lines()
            .filter(|l| l.starts_with(n) && l.contains("running"))
            .map(|l| l.split_whitespace().nth(2) == Some("*"))
            .collect::<Vec<_>>()
    };
    // `list` after both started (the first started has the foreground), after `switch
    // work`, after `switch personal`.
    assert_eq!(fg("work "), [true, true, false], "{out}");
    assert_eq!(fg("personal "), [false, false, true], "{out}");
    e2e::host::loud(&format!(
        "{name}: counted work {}->{}, personal {}->{} in 2 s",
        count("PV work first="),
        count("PV work then="),
        count("PV personal first="),
        count("PV personal then=")
    ));
}

/// The probe under Android's protected KVM (`kvm-arm.mode=protected`, pKVM: KVM's hypervisor
/// stays at EL2 in nVHE mode and L1's kernel is deprivileged): one run with 2 vCPUs, a disk
/// and rng passes every arm64 test, `pci`, `blk` (written and read back) and `rng` with their
/// completions as LPIs through the ITS, `gic` and `smp`, as in the other checks' L1 (VHE).
#[test]
fn the_arm64_probe_passes_its_tests_under_protected_kvm() {
    let name = "the_arm64_probe_passes_its_tests_under_protected_kvm";
    let probe = e2e::workspace_root().join("guest/out/probe-arm64.img");
    assert!(
        probe.is_file(),
        "{} is missing: run guest/build-probe.sh",
        probe.display()
    );
    let script = format!(
        "truncate -s 8M disk.img || exit 9\n\
         '{pv}' run --kernel '{probe}' --memory 64M --vcpus 2 --disk disk.img --rng \
         --cmdline 'pv.tests=pci,blk,rng,gic,smp pv.blk.write=16'\n\
         echo \"PV rc=$?\"\n",
        pv = pocketvisor_aarch64().display(),
        probe = probe.display(),
    );
    let Some(run) = in_l1_with(name, &script, "kvm-arm.mode=protected") else {
        return;
    };
    assert!(
        run.l1_info.contains("Protected nVHE mode initialized"),
        "L1's KVM is not in protected mode:\n{}",
        run.l1_info
    );
    let out = &run.output;
    assert!(out.contains("PV rc=0"), "{out}\n{}", run.describe());
    for line in [
        "PROBE pci ok count=",
        "PROBE blk ok capacity=16384 ro=0 ",
        "PROBE blk irq=msix hits=3 polled=0 lpi=8192",
        "PROBE rng irq=msix hits=1 polled=0 lpi=8193",
        "PROBE gic ok sgi=1 timer=ok ",
        "PROBE smp ok count=2",
        "PROBE done ok",
    ] {
        assert!(out.contains(line), "no '{line}':\n{out}");
    }
    e2e::host::loud(&format!(
        "{name}: all probe tests passed under pKVM (L1 boot {:?}, job {:.1?})",
        run.l1_boot, run.qemu.elapsed
    ));
}

/// pocketvisor against QEMU on the same Debian arm64 guest in one L1 (the issue's "Linux boot
/// to init ... vs QEMU, `qemu-system-aarch64 -accel kvm` inside L1"): Debian's arm64 QEMU runs
/// from `guest/out/nested-arm64/qemu-root` (Debian's arm64 packages unpacked there by
/// `tests/nested/build-qemu-arm64-root.sh`, chrooted into in L1), two boots of each,
/// alternating. Both must reach the guest's init with 2 vCPUs and power off; the guest's
/// uptime at init (its own clock) is printed for each, with the VMM's peak RSS.
#[test]
fn qemu_and_pocketvisor_boot_the_same_arm64_guest_in_one_l1() {
    let name = "qemu_and_pocketvisor_boot_the_same_arm64_guest_in_one_l1";
    let assets = e2e::nested::nested_dir_of(L1Arch::Aarch64);
    let root = assets.join("qemu-root");
    if !root.join("usr/bin/qemu-system-aarch64").is_file() {
        let why = format!(
            "{} has no arm64 QEMU: run tests/nested/build-qemu-arm64-root.sh",
            root.display()
        );
        assert!(std::env::var_os("CI").is_none(), "{why}");
        e2e::skip(&why, name);
        return;
    }
    let script = format!(
        r#"R='{root}'
mount --bind '{assets}' $R/assets || exit 9
mount -t proc proc $R/proc && mount --bind /dev $R/dev && mount -t tmpfs tmpfs $R/tmp || exit 9
peak() {{
    pid=$1; hwm=0
    while kill -0 $pid 2>/dev/null; do
        h=$(sed -n 's/^VmHWM:[^0-9]*\([0-9]*\) kB/\1/p' /proc/$pid/status 2>/dev/null)
        [ -n "$h" ] && hwm=$h; sleep 0.5
    done
    wait $pid; echo "PV rc=$? hwm_kb=$hwm"
}}
for i in 1 2; do
    echo "PV vmm=pocketvisor"
    '{pv}' run --kernel '{assets}/vmlinuz' --initrd '{assets}/guest-initramfs.cpio.gz' \
        --memory 256M --vcpus 2 --cmdline 'console=ttyS0 quiet' &
    peak $!
    echo "PV vmm=qemu"
    chroot $R /usr/bin/qemu-system-aarch64 -M virt,gic-version=3 -accel kvm -cpu host \
        -smp 2 -m 256M -nographic -no-reboot -monitor none -nodefaults -serial stdio \
        -kernel /assets/vmlinuz -initrd /assets/guest-initramfs.cpio.gz \
        -append 'console=ttyAMA0 quiet' </dev/null &
    peak $!
done
"#,
        root = root.display(),
        assets = assets.display(),
        pv = pocketvisor_aarch64().display(),
    );
    let Some(run) = in_l1(name, &script) else {
        return;
    };
    let out = &run.output;
    // Each boot's lines run from its `PV vmm=` line to its `PV rc=` line.
    let mut boots: Vec<(String, f64, u64)> = Vec::new();
    let mut current: Option<String> = None;
    let mut uptime = f64::NAN;
    for line in out.lines().map(str::trim) {
        if let Some(vmm) = line.strip_prefix("PV vmm=") {
            current = Some(vmm.to_string());
            uptime = f64::NAN;
        } else if line.starts_with("GUEST init") {
            assert_eq!(guest_field(line, "GUEST init", "cpus"), Some("2"), "{out}");
            uptime = guest_field(line, "GUEST init", "uptime")
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
        } else if let Some(rest) = line.strip_prefix("PV rc=") {
            let vmm = current.take().unwrap_or_default();
            assert!(
                rest.starts_with("0 "),
                "{vmm} failed: {line}\n{out}\n{}",
                run.describe()
            );
            let hwm = rest
                .split_whitespace()
                .find_map(|w| w.strip_prefix("hwm_kb="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            assert!(
                uptime.is_finite(),
                "{vmm}'s guest never reached init:\n{out}"
            );
            boots.push((vmm, uptime, hwm));
        }
    }
    assert_eq!(boots.len(), 4, "two boots of each:\n{out}");
    for (vmm, up, hwm) in &boots {
        e2e::host::loud(&format!(
            "MEASURE {name}: {vmm}: guest uptime at init {up:.2} s, VMM peak RSS {} MiB",
            hwm / 1024
        ));
    }
}
