//! The x86_64 parts of the seccomp allowlist: the legacy syscalls std and glibc still use
//! here, and the KVM ioctls of an x86_64 snapshot.

use super::{ioc, KVMIO, R, W};

/// x86_64-only syscalls allowed without argument checks, with the reason.
pub const ARCH_SYSCALLS: &[(i64, &str)] = &[
    (libc::SYS_mkdir, "snapshot directories"),
    (
        libc::SYS_unlink,
        "stale and finished unix sockets, snapshot temporaries",
    ),
    (libc::SYS_rename, "snapshot: atomic replace"),
    (libc::SYS_chmod, "the API socket is made owner-only"),
    (libc::SYS_poll, "the VMM's main loop"),
    (libc::SYS_epoll_wait, "device workers"),
];

/// The x86_64 KVM ioctls the VMM makes after the VM is built (a snapshot's vCPU and VM
/// state), with the reason.
pub const ARCH_IOCTLS: &[(u64, &str)] = &[
    (ioc(R, KVMIO, 0x81, 144), "KVM_GET_REGS: snapshot"),
    (ioc(R, KVMIO, 0x83, 312), "KVM_GET_SREGS: snapshot"),
    (ioc(R | W, KVMIO, 0x88, 8), "KVM_GET_MSRS: snapshot"),
    (ioc(R, KVMIO, 0x8e, 1024), "KVM_GET_LAPIC: snapshot"),
    (ioc(R, KVMIO, 0x98, 4), "KVM_GET_MP_STATE: snapshot"),
    (ioc(R, KVMIO, 0x9f, 64), "KVM_GET_VCPU_EVENTS: snapshot"),
    (ioc(R, KVMIO, 0xa1, 128), "KVM_GET_DEBUGREGS: snapshot"),
    (ioc(R, KVMIO, 0xa4, 4096), "KVM_GET_XSAVE: snapshot"),
    (ioc(R, KVMIO, 0xa6, 392), "KVM_GET_XCRS: snapshot"),
    (ioc(R | W, KVMIO, 0x62, 520), "KVM_GET_IRQCHIP: snapshot"),
    (ioc(R, KVMIO, 0x9f, 112), "KVM_GET_PIT2: snapshot"),
    (ioc(R, KVMIO, 0x7c, 48), "KVM_GET_CLOCK: snapshot"),
];

#[cfg(test)]
mod tests {
    use super::super::tests::{ioctl, size};

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(ioctl("KVM_GET_REGS"), 0x8090_ae81);
        assert_eq!(ioctl("KVM_GET_SREGS"), 0x8138_ae83);
        assert_eq!(ioctl("KVM_GET_MSRS"), 0xc008_ae88);
        assert_eq!(ioctl("KVM_GET_LAPIC"), 0x8400_ae8e);
        assert_eq!(ioctl("KVM_GET_XSAVE"), 0x9000_aea4);
    }

    #[test]
    fn ioctl_sizes_match_the_kvm_structs() {
        use kvm_bindings::*;
        use std::mem::size_of;
        let sized = [
            ("KVM_GET_REGS", size_of::<kvm_regs>()),
            ("KVM_GET_SREGS", size_of::<kvm_sregs>()),
            ("KVM_GET_MSRS", size_of::<kvm_msrs>()),
            ("KVM_GET_LAPIC", size_of::<kvm_lapic_state>()),
            ("KVM_GET_MP_STATE", size_of::<kvm_mp_state>()),
            ("KVM_GET_VCPU_EVENTS", size_of::<kvm_vcpu_events>()),
            ("KVM_GET_DEBUGREGS", size_of::<kvm_debugregs>()),
            ("KVM_GET_XSAVE", size_of::<kvm_xsave>()),
            ("KVM_GET_XCRS", size_of::<kvm_xcrs>()),
            ("KVM_GET_IRQCHIP", size_of::<kvm_irqchip>()),
            ("KVM_GET_PIT2", size_of::<kvm_pit_state2>()),
            ("KVM_GET_CLOCK", size_of::<kvm_clock_data>()),
        ];
        for (name, want) in sized {
            assert_eq!(size(ioctl(name)), want, "{name}");
        }
    }
}
