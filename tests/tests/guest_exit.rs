//! How guest exits become the VMM's exit status, with tiny hand-made PVH kernels.

use e2e::elf::{acpi_poweroff_code, debug_exit_code, pvh_kernel, triple_fault_code};
use e2e::{require_kvm, Outcome, TempDir, VmCommand};

fn run_code(dir: &TempDir, name: &str, code: &[u8]) -> Outcome {
    let kernel = dir.join(name);
    std::fs::write(&kernel, pvh_kernel(code)).unwrap();
    let mut cmd = VmCommand::bare().memory("64M");
    cmd.kernel = Some(kernel);
    cmd.run()
}

#[test]
fn debug_exit_port_value_becomes_the_exit_status() {
    if !require_kvm("debug_exit_port_value_becomes_the_exit_status") {
        return;
    }
    let dir = TempDir::new();
    for value in [42u32, 7] {
        let out = run_code(&dir, "exit.elf", &debug_exit_code(value));
        assert!(!out.timed_out, "{}", out.describe());
        assert!(!out.panicked(), "{}", out.describe());
        assert_eq!(out.code(), Some(value as i32), "{}", out.describe());
    }
}

#[test]
fn acpi_poweroff_exits_zero() {
    if !require_kvm("acpi_poweroff_exits_zero") {
        return;
    }
    let dir = TempDir::new();
    let out = run_code(&dir, "off.elf", &acpi_poweroff_code());
    assert!(!out.timed_out, "{}", out.describe());
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(out.stderr_lines().is_empty(), "{}", out.describe());
}

#[test]
fn guest_triple_fault_is_a_nonzero_exit_with_one_error_line() {
    if !require_kvm("guest_triple_fault_is_a_nonzero_exit_with_one_error_line") {
        return;
    }
    let dir = TempDir::new();
    let out = run_code(&dir, "tf.elf", &triple_fault_code());
    assert!(!out.timed_out, "{}", out.describe());
    assert!(!out.panicked(), "{}", out.describe());
    assert!(
        matches!(out.code(), Some(c) if c != 0),
        "a triple fault must not look like success\n{}",
        out.describe()
    );
    assert_eq!(out.stderr_lines().len(), 1, "{}", out.describe());
}

#[test]
fn a_kernel_that_is_not_elf_or_bzimage_is_one_error_line() {
    if !require_kvm("a_kernel_that_is_not_elf_or_bzimage_is_one_error_line") {
        return;
    }
    let dir = TempDir::new();
    let (kernel, _) = dir.disk("garbage.bin", 64 * 1024, 77);
    let mut cmd = VmCommand::bare().memory("64M");
    cmd.kernel = Some(kernel);
    let out = cmd.run();
    assert!(!out.timed_out, "{}", out.describe());
    assert!(!out.panicked(), "{}", out.describe());
    assert!(
        matches!(out.code(), Some(c) if c != 0),
        "{}",
        out.describe()
    );
    assert_eq!(out.stderr_lines().len(), 1, "{}", out.describe());
}
