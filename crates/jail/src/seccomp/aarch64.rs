//! The aarch64 parts of the seccomp allowlist.
//!
//! arm64 has only the generic syscall table: no `open`, `mkdir`, `unlink`, `rename`, `chmod`,
//! `poll` or `epoll_wait` (std and the C library use the `*at`, `ppoll` and `epoll_pwait`
//! forms in [`COMMON_SYSCALLS`](super::COMMON_SYSCALLS)). The aarch64 build is static musl,
//! whose `pthread_kill` uses `tkill`; the ioctls are those of an aarch64 snapshot (vCPU
//! registers, the vGIC and its ITS).

use super::{ioc, KVMIO, R, W};

/// aarch64-only syscalls allowed without argument checks, with the reason.
pub const ARCH_SYSCALLS: &[(i64, &str)] = &[(
    libc::SYS_tkill,
    "vCPU kicks: musl's pthread_kill (the static aarch64 build) sends with tkill, not \
     tgkill; the jail's own PID namespace holds no other process",
)];

/// The aarch64 KVM ioctls the VMM makes after the VM is built (a snapshot's vCPU and vGIC
/// state), with the reason.
pub const ARCH_IOCTLS: &[(u64, &str)] = &[
    (
        ioc(R | W, KVMIO, 0xb0, 8),
        "KVM_GET_REG_LIST: snapshot (which registers a vCPU has)",
    ),
    (
        ioc(W, KVMIO, 0xab, 16),
        "KVM_GET_ONE_REG: snapshot (each vCPU register), the PC in error messages",
    ),
    (ioc(R, KVMIO, 0x98, 4), "KVM_GET_MP_STATE: snapshot"),
    (
        ioc(W, KVMIO, 0xe2, 24),
        "KVM_GET_DEVICE_ATTR: snapshot (vGIC and ITS registers)",
    ),
    (
        ioc(W, KVMIO, 0xe1, 24),
        "KVM_SET_DEVICE_ATTR: snapshot (the vGIC flushes its LPI pending and ITS tables into \
         guest RAM on this request)",
    ),
];

#[cfg(test)]
mod tests {
    use super::super::tests::{ioctl, size};

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(ioctl("KVM_GET_REG_LIST"), 0xc008_aeb0);
        assert_eq!(ioctl("KVM_GET_ONE_REG"), 0x4010_aeab);
        assert_eq!(ioctl("KVM_GET_MP_STATE"), 0x8004_ae98);
        assert_eq!(ioctl("KVM_GET_DEVICE_ATTR"), 0x4018_aee2);
        assert_eq!(ioctl("KVM_SET_DEVICE_ATTR"), 0x4018_aee1);
    }

    #[test]
    fn ioctl_sizes_match_the_kvm_structs() {
        use kvm_bindings::*;
        use std::mem::size_of;
        let sized = [
            ("KVM_GET_REG_LIST", size_of::<kvm_reg_list>()),
            ("KVM_GET_ONE_REG", size_of::<kvm_one_reg>()),
            ("KVM_GET_MP_STATE", size_of::<kvm_mp_state>()),
            ("KVM_GET_DEVICE_ATTR", size_of::<kvm_device_attr>()),
            ("KVM_SET_DEVICE_ATTR", size_of::<kvm_device_attr>()),
        ];
        for (name, want) in sized {
            assert_eq!(size(ioctl(name)), want, "{name}");
        }
    }
}
