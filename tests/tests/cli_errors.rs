//! Bad input gets one clear error line and a nonzero status, never a panic.

use e2e::{Outcome, TempDir, VmCommand};

fn assert_one_error_line(out: &Outcome, mentions: &str) {
    assert!(!out.timed_out, "{}", out.describe());
    assert!(!out.panicked(), "panicked\n{}", out.describe());
    assert!(
        matches!(out.code(), Some(c) if c != 0),
        "expected a nonzero exit\n{}",
        out.describe()
    );
    let lines = out.stderr_lines();
    assert_eq!(
        lines.len(),
        1,
        "exactly one stderr line\n{}",
        out.describe()
    );
    assert!(
        lines[0].to_lowercase().contains(&mentions.to_lowercase()),
        "the error line should mention {mentions:?}: {}",
        lines[0]
    );
    assert!(
        out.probe().lines.is_empty(),
        "the guest ran\n{}",
        out.describe()
    );
}

/// Argument-parser errors: clap prints a usage hint after the error, so require exactly
/// one line that says "error".
fn assert_usage_error(out: &Outcome) {
    assert!(!out.timed_out, "{}", out.describe());
    assert!(!out.panicked(), "panicked\n{}", out.describe());
    assert!(
        matches!(out.code(), Some(c) if c != 0),
        "{}",
        out.describe()
    );
    let errors = out
        .stderr_lines()
        .iter()
        .filter(|l| l.to_lowercase().contains("error"))
        .count();
    assert_eq!(errors, 1, "one error line\n{}", out.describe());
}

#[test]
fn missing_kernel_file_is_one_error_line() {
    let mut cmd = VmCommand::bare();
    cmd.kernel = Some("/nonexistent/pocketvisor/kernel.elf".into());
    assert_one_error_line(&cmd.run(), "/nonexistent/pocketvisor/kernel.elf");
}

#[test]
fn no_kernel_at_all_is_one_error_line() {
    assert_one_error_line(&VmCommand::bare().run(), "--kernel");
}

#[test]
fn firmware_errors_are_one_error_line_or_a_usage_error() {
    // A missing firmware file is named.
    let missing = VmCommand::bare()
        .arg("--firmware")
        .arg("/nonexistent/pocketvisor/bios.bin");
    assert_one_error_line(&missing.run(), "/nonexistent/pocketvisor/bios.bin");
    // A file that is no ROM: refused by size on hardware KVM, for real mode on kvm_pvm.
    let dir = TempDir::new();
    let tiny = dir.join("tiny.bin");
    std::fs::write(&tiny, [0u8; 512]).unwrap();
    let out = VmCommand::bare()
        .arg("--firmware")
        .arg(&tiny.display().to_string())
        .run();
    let mentions = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        "real mode"
    } else {
        "64 KiB to 16 MiB"
    };
    assert_one_error_line(&out, mentions);
    // Firmware with a kernel, an initrd or a command line is a usage error.
    for extra in [
        &["--kernel", "k"][..],
        &["--initrd", "i"],
        &["--cmdline", "c"],
    ] {
        let mut cmd = VmCommand::bare()
            .arg("--firmware")
            .arg(&tiny.display().to_string());
        cmd.extra.extend(extra.iter().map(|s| s.to_string()));
        assert_usage_error(&cmd.run());
    }
}

#[test]
fn too_little_memory_is_one_error_line() {
    assert_one_error_line(&VmCommand::probe("").memory("1M").run(), "memory");
}

#[test]
fn malformed_flags_are_usage_errors() {
    for args in [
        &["--memory", "lots"][..],
        &["--vcpus", "zero"],
        &["--disk", "x.img,bogus"],
        &["--net", "mac=02:00:00:00:00:01"],
        &["--vsock", "cid=3"],
        &["--serial", "printer"],
        &["--no-such-flag"],
    ] {
        let mut cmd = VmCommand::probe("");
        cmd.extra = args.iter().map(|s| s.to_string()).collect();
        assert_usage_error(&cmd.run());
    }
}

#[test]
fn invalid_values_are_one_error_line() {
    let dir = TempDir::new();
    for (args, mentions) in [
        (&["--vcpus", "0"][..], "vcpus"),
        (
            &[
                "--vsock",
                &format!("cid=2,socket={}", dir.join("v").display()),
            ],
            "cid",
        ),
        (
            &["--net", "tap=name-longer-than-15,mac=02:00:00:00:00:01"],
            "tap",
        ),
    ] {
        let mut cmd = VmCommand::probe("");
        cmd.extra = args.iter().map(|s| s.to_string()).collect();
        assert_one_error_line(&cmd.run(), mentions);
    }
}

#[test]
fn bad_config_file_is_one_error_line() {
    let dir = TempDir::new();
    let config = dir.join("vm.toml");
    std::fs::write(&config, "kernel = \"k\"\nno_such_key = 1\n").unwrap();
    let mut cmd = VmCommand::bare();
    cmd.config = Some(config);
    assert_one_error_line(&cmd.run(), "vm.toml");
}

#[test]
fn missing_dev_kvm_is_one_error_line() {
    if e2e::host::which("unshare").is_none() {
        e2e::skip("no unshare(1)", "missing_dev_kvm_is_one_error_line");
        return;
    }
    // A private mount namespace with an empty /dev: no /dev/kvm in there.
    let vm = VmCommand::probe("pv.tests=");
    let mut script = String::from("mount -t tmpfs none /dev && exec");
    script.push_str(&format!(" {}", shell_quote(&vm.bin.display().to_string())));
    for arg in vm.args() {
        script.push(' ');
        script.push_str(&shell_quote(&arg));
    }
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let out = e2e::RunningVm::spawn(cmd, e2e::vm::default_timeout()).wait();
    assert_one_error_line(&out, "/dev/kvm");
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[test]
fn doctor_json_reports_the_kvm_kind() {
    let out = e2e::RunningVm::spawn(
        {
            let mut c = std::process::Command::new(e2e::pocketvisor_bin());
            c.args(["doctor", "--json"]);
            c
        },
        e2e::vm::default_timeout(),
    )
    .wait();
    assert!(!out.panicked(), "{}", out.describe());
    let json: String = out.serial().collect::<Vec<_>>().join("\n");
    let v: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("doctor --json is not JSON ({e})\n{}", out.describe()));
    let kind = v["kvm"].as_str().unwrap_or_default().to_string();
    assert!(
        ["hardware", "pvm", "unknown", "absent"].contains(&kind.as_str()),
        "kvm kind {kind:?}"
    );
    let has_kvm = std::path::Path::new("/dev/kvm").exists();
    assert_eq!(kind != "absent", has_kvm, "{json}");
    assert_eq!(v["guests"]["probe"].as_bool(), Some(has_kvm), "{json}");
    if has_kvm {
        assert_eq!(out.code(), Some(0), "{}", out.describe());
    }
}

#[test]
fn special_files_as_disk_or_initrd_are_one_error_line_and_do_not_block() {
    if !e2e::require_kvm("special_files_as_disk_or_initrd_are_one_error_line_and_do_not_block") {
        return;
    }
    // /dev/zero used to pass for an empty disk; a FIFO as initrd blocked the VMM.
    let zero = std::path::Path::new("/dev/zero");
    assert_one_error_line(
        &VmCommand::probe("").disk(zero, false).run(),
        "not a regular file",
    );
    let tmp = TempDir::new();
    let fifo = tmp.join("initrd.fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut cmd = VmCommand::probe("");
    cmd.initrd = Some(fifo);
    let t0 = std::time::Instant::now();
    assert_one_error_line(&cmd.run(), "not a regular file");
    assert!(t0.elapsed() < std::time::Duration::from_secs(10));
}
