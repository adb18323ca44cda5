//! The aarch64 parts of the seccomp allowlist.
//!
//! arm64 has only the generic syscall table: no `open`, `mkdir`, `unlink`, `rename`, `chmod`,
//! `poll` or `epoll_wait` (std and the C library use the `*at`, `ppoll` and `epoll_pwait`
//! forms in [`COMMON_SYSCALLS`](super::COMMON_SYSCALLS)), so nothing is added here.
//!
//! aarch64 snapshots do not exist yet (issue 14); when they do, their state ioctls go in
//! [`ARCH_IOCTLS`]: `KVM_GET_ONE_REG` and `KVM_GET_REG_LIST` for the vCPU registers,
//! `KVM_GET_DEVICE_ATTR` for the GIC. Until then none is allowed.

/// aarch64-only syscalls allowed without argument checks: none.
pub const ARCH_SYSCALLS: &[(i64, &str)] = &[];

/// The aarch64 KVM ioctls the VMM makes after the VM is built: none beyond the common ones.
pub const ARCH_IOCTLS: &[(u64, &str)] = &[];
