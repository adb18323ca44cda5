//! The VMM's seccomp filter: an allowlist of the syscalls it makes once the VM is built;
//! anything else kills the whole process (SIGSYS).
//!
//! Two filters are stacked (the kernel applies the strictest answer):
//! 1. `clone3` returns `ENOSYS`, so glibc's `pthread_create` falls back to `clone(2)`, whose
//!    flags a filter can see (`clone3` passes them in memory);
//! 2. the allowlist, whose mismatch action is `KillProcess`, with argument checks where an
//!    argument decides what a call can do: `ioctl` only with the KVM and socket requests the
//!    running VMM uses, `clone` only for threads, `socket` only for unix sockets, `mmap` and
//!    `mprotect` never executable, `prctl` only to name threads, `tgkill` only within this
//!    process.
//!
//! The lists are per architecture: [`COMMON_SYSCALLS`] and [`COMMON_IOCTLS`] hold what every
//! architecture has, `x86_64.rs` and `aarch64.rs` what only one has (aarch64 has no `open`,
//! `poll`, `mkdir`, `rename`, ...; the KVM state ioctls of a snapshot differ), selected by
//! `cfg(target_arch)`. docs/jail.md lists every syscall with the reason it is needed.

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "aarch64")]
use aarch64 as arch_lists;
#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
use x86_64 as arch_lists;

pub use arch_lists::{ARCH_IOCTLS, ARCH_SYSCALLS};

pub mod threads;

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use crate::{Error, Result};

/// `_IOC(dir, type, nr, size)` from asm-generic/ioctl.h (x86_64 and arm64 share it).
pub(crate) const fn ioc(dir: u64, ty: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (ty << 8) | nr
}
pub(crate) const NONE: u64 = 0;
pub(crate) const W: u64 = 1;
pub(crate) const R: u64 = 2;
pub(crate) const KVMIO: u64 = 0xAE;
/// `FIONBIO` from asm-generic/ioctls.h (libc types it `c_ulong` on glibc, `c_int` on musl).
const FIONBIO: u64 = 0x5421;
/// `FIOCLEX` from asm-generic/ioctls.h.
const FIOCLEX: u64 = 0x5451;

/// The ioctl requests the VMM makes after the VM is built on every architecture, with the
/// reason ([`ARCH_IOCTLS`] adds this architecture's).
pub const COMMON_IOCTLS: &[(u64, &str)] = &[
    (ioc(NONE, KVMIO, 0x80, 0), "KVM_RUN: run a vCPU"),
    (
        ioc(W, KVMIO, 0x6a, 8),
        "KVM_SET_GSI_ROUTING: the guest programs MSI-X",
    ),
    (ioc(W, KVMIO, 0x76, 32), "KVM_IRQFD: a device is activated"),
    (
        ioc(W, KVMIO, 0x79, 64),
        "KVM_IOEVENTFD: queue notifications of an activated device",
    ),
    (
        ioc(W, KVMIO, 0x46, 32),
        "KVM_SET_USER_MEMORY_REGION: device memory BARs mapped and moved, dirty logging on and off",
    ),
    (
        ioc(W, KVMIO, 0x42, 16),
        "KVM_GET_DIRTY_LOG: the pages the guest wrote, for a live snapshot",
    ),
    (FIONBIO, "FIONBIO: std makes sockets non-blocking with it"),
    (
        FIOCLEX,
        "FIOCLEX: std marks descriptors close-on-exec with it",
    ),
];

/// Every ioctl request the allowlist lets through: the common ones and this architecture's.
pub fn ioctls() -> impl Iterator<Item = &'static (u64, &'static str)> {
    COMMON_IOCTLS.iter().chain(ARCH_IOCTLS)
}

/// Every syscall the allowlist lets through without argument checks: the common ones and
/// this architecture's.
pub fn syscalls() -> impl Iterator<Item = &'static (i64, &'static str)> {
    COMMON_SYSCALLS.iter().chain(ARCH_SYSCALLS)
}

/// Syscalls every architecture has, allowed without argument checks, with the reason (also
/// in docs/jail.md); [`ARCH_SYSCALLS`] adds this architecture's.
pub const COMMON_SYSCALLS: &[(i64, &str)] = &[
    (libc::SYS_read, "device workers, eventfds, sockets, the tap"),
    (libc::SYS_write, "serial output, eventfds, sockets, the tap"),
    (libc::SYS_readv, "tap and block I/O"),
    (libc::SYS_writev, "tap and block I/O, stderr"),
    (libc::SYS_pread64, "block device reads"),
    (libc::SYS_pwrite64, "block device writes, snapshots"),
    (libc::SYS_preadv, "block device reads"),
    (libc::SYS_pwritev, "block device writes"),
    (libc::SYS_lseek, "block device, snapshot files"),
    (libc::SYS_fsync, "virtio-blk flush, snapshots"),
    (libc::SYS_fdatasync, "virtio-blk flush"),
    (libc::SYS_close, "sockets and snapshot files"),
    (
        libc::SYS_fcntl,
        "std: F_DUPFD_CLOEXEC when workers clone descriptors, O_NONBLOCK",
    ),
    (
        libc::SYS_openat,
        "snapshot files (the jail's own directories only)",
    ),
    (libc::SYS_fstat, "std metadata()"),
    (
        libc::SYS_newfstatat,
        "std metadata(), snapshot files, stale sockets",
    ),
    (libc::SYS_statx, "std metadata()"),
    (
        libc::SYS_getdents64,
        "snapshot: removing a temporary directory",
    ),
    (libc::SYS_mkdirat, "snapshot directories"),
    (libc::SYS_unlinkat, "as unlink"),
    (libc::SYS_renameat, "snapshot: atomic replace"),
    (libc::SYS_renameat2, "snapshot: atomic replace"),
    (libc::SYS_ftruncate, "snapshot memory file size"),
    (libc::SYS_fchmodat, "as chmod"),
    (libc::SYS_fchmod, "as chmod"),
    (libc::SYS_ppoll, "the VMM's main loop"),
    (libc::SYS_epoll_create1, "device workers"),
    (libc::SYS_epoll_ctl, "device workers"),
    (libc::SYS_epoll_pwait, "device workers"),
    (libc::SYS_eventfd2, "device workers, API channel"),
    (libc::SYS_bind, "API socket, vsock host socket"),
    (libc::SYS_listen, "API socket, vsock host socket"),
    (libc::SYS_accept4, "API socket, vsock host socket"),
    (
        libc::SYS_connect,
        "vsock: guest connections to <socket>_<port>",
    ),
    (libc::SYS_recvfrom, "unix sockets"),
    (libc::SYS_sendto, "unix sockets"),
    (libc::SYS_recvmsg, "unix sockets"),
    (libc::SYS_sendmsg, "unix sockets"),
    (libc::SYS_shutdown, "unix sockets"),
    (libc::SYS_getsockopt, "std: SO_ERROR after a connect"),
    (libc::SYS_munmap, "thread stacks, buffers"),
    (
        libc::SYS_madvise,
        "the allocator returns memory, thread exit",
    ),
    (libc::SYS_mremap, "the allocator grows buffers"),
    (libc::SYS_brk, "the allocator"),
    (libc::SYS_set_robust_list, "new threads (glibc)"),
    (libc::SYS_rseq, "new threads (glibc)"),
    (
        libc::SYS_clone3,
        "new threads; answered ENOSYS by the first filter",
    ),
    (libc::SYS_futex, "locks, thread joins"),
    (libc::SYS_sched_getaffinity, "new threads (glibc, std)"),
    (libc::SYS_sched_yield, "spin loops"),
    (libc::SYS_gettid, "std thread ids"),
    (libc::SYS_getpid, "tgkill target"),
    (libc::SYS_exit, "thread exit"),
    (libc::SYS_exit_group, "process exit"),
    (libc::SYS_restart_syscall, "syscalls interrupted by signals"),
    (libc::SYS_rt_sigaction, "stop and vCPU-kick signal handlers"),
    (libc::SYS_rt_sigprocmask, "new threads, signal handling"),
    (libc::SYS_rt_sigreturn, "return from signal handlers"),
    (
        libc::SYS_sigaltstack,
        "std: per-thread stack overflow handler",
    ),
    (libc::SYS_clock_gettime, "time (when the vDSO is not used)"),
    (libc::SYS_gettimeofday, "time (when the vDSO is not used)"),
    (libc::SYS_clock_nanosleep, "sleeps in pause/stop loops"),
    (libc::SYS_nanosleep, "sleeps in pause/stop loops"),
    (libc::SYS_getrandom, "virtio-rng, hash maps"),
    (libc::SYS_prlimit64, "new threads (glibc stack size)"),
];

fn cond(arg: u8, len: Len, op: Op, value: u64) -> Result<SeccompCondition> {
    SeccompCondition::new(arg, len, op, value).map_err(|e| Error::Seccomp(e.to_string()))
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule> {
    SeccompRule::new(conds).map_err(|e| Error::Seccomp(e.to_string()))
}

fn arch() -> Result<TargetArch> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| Error::Seccomp(e.to_string()))
}

/// The allowlist for a VMM whose process id (as it sees itself) is `pid`.
pub fn allowlist(pid: libc::pid_t) -> Result<BpfProgram> {
    compile(
        allowlist_rules(pid)?,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
    )
}

/// Every syscall the process allowlist lets through (some only with certain arguments).
pub fn allowlisted_syscalls() -> Vec<i64> {
    allowlist_rules(1)
        .map(|rules| rules.into_keys().collect())
        .unwrap_or_default()
}

fn allowlist_rules(pid: libc::pid_t) -> Result<BTreeMap<i64, Vec<SeccompRule>>> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        syscalls().map(|&(nr, _)| (nr, Vec::new())).collect();
    let mut ioctl = Vec::new();
    for &(req, _) in ioctls() {
        ioctl.push(rule(vec![cond(1, Len::Dword, Op::Eq, req)?])?);
    }
    rules.insert(libc::SYS_ioctl, ioctl);
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![rule(vec![cond(
            0,
            Len::Qword,
            Op::MaskedEq(thread),
            thread,
        )?])?],
    );
    rules.insert(
        libc::SYS_socket,
        vec![rule(vec![cond(
            0,
            Len::Dword,
            Op::Eq,
            libc::AF_UNIX as u64,
        )?])?],
    );
    // Socket timeouts only (std's set_read_timeout/set_write_timeout): the VNC server drops
    // a client that stalls its handshake or stops reading.
    let sol_socket = libc::SOL_SOCKET as u64;
    rules.insert(
        libc::SYS_setsockopt,
        [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO]
            .into_iter()
            .map(|opt| {
                rule(vec![
                    cond(1, Len::Dword, Op::Eq, sol_socket)?,
                    cond(2, Len::Dword, Op::Eq, opt as u64)?,
                ])
            })
            .collect::<Result<Vec<_>>>()?,
    );
    let exec = libc::PROT_EXEC as u64;
    for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
        rules.insert(
            nr,
            vec![rule(vec![cond(2, Len::Dword, Op::MaskedEq(exec), 0)?])?],
        );
    }
    rules.insert(
        libc::SYS_prctl,
        vec![rule(vec![cond(
            0,
            Len::Dword,
            Op::Eq,
            libc::PR_SET_NAME as u64,
        )?])?],
    );
    // Each thread narrows itself further (threads.rs): adding a filter to the calling thread
    // only (no TSYNC, no other flag) can only take permissions away.
    rules.insert(
        libc::SYS_seccomp,
        vec![rule(vec![
            cond(
                0,
                Len::Dword,
                Op::Eq,
                u64::from(libc::SECCOMP_SET_MODE_FILTER),
            )?,
            cond(1, Len::Dword, Op::Eq, 0)?,
        ])?],
    );
    // A VMM whose guest has moved to another (perhaps on this host) lowers its own main
    // thread to the lowest priority for its teardown (`vmm::vm`), and nothing else.
    rules.insert(
        libc::SYS_setpriority,
        vec![rule(vec![
            cond(0, Len::Dword, Op::Eq, libc::PRIO_PROCESS as u64)?,
            cond(1, Len::Dword, Op::Eq, 0)?,
            cond(2, Len::Dword, Op::Eq, 19)?,
        ])?],
    );
    rules.insert(
        libc::SYS_tgkill,
        vec![rule(vec![cond(0, Len::Dword, Op::Eq, pid as u64)?])?],
    );
    Ok(rules)
}

/// The filter that answers `clone3` with ENOSYS and lets everything else through.
pub fn clone3_enosys() -> Result<BpfProgram> {
    let rules = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
    compile(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram> {
    let filter = SeccompFilter::new(rules, mismatch, matched, arch()?)
        .map_err(|e| Error::Seccomp(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| Error::Seccomp(e.to_string()))
}

/// Installs both filters on every thread of the process (TSYNC); threads created later
/// inherit them. Sets `no_new_privs` (required to install a filter without CAP_SYS_ADMIN).
pub fn install() -> Result<()> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let allow = allowlist(pid)?;
    let enosys = clone3_enosys()?;
    // The allowlist goes last: installing a filter takes prctl and seccomp, which it refuses.
    seccompiler::apply_filter_all_threads(&enosys).map_err(|e| Error::Seccomp(e.to_string()))?;
    seccompiler::apply_filter_all_threads(&allow).map_err(|e| Error::Seccomp(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request of the ioctl whose reason starts with `name:`.
    pub(super) fn ioctl(name: &str) -> u64 {
        ioctls()
            .find(|(_, d)| d.split(':').next() == Some(name))
            .unwrap_or_else(|| panic!("{name} missing"))
            .0
    }

    /// The argument size an ioctl request encodes.
    pub(super) fn size(req: u64) -> usize {
        usize::try_from((req >> 16) & 0x3fff).unwrap()
    }

    #[test]
    // libc types FIONBIO and FIOCLEX `c_ulong` on glibc (a useless conversion) and `c_int` on
    // musl (a needed one).
    #[allow(clippy::useless_conversion)]
    fn common_ioctl_numbers_and_sizes_match_the_kernel() {
        use kvm_bindings::*;
        use std::mem::size_of;
        assert_eq!(ioctl("KVM_RUN"), 0xae80);
        assert_eq!(ioctl("KVM_SET_GSI_ROUTING"), 0x4008_ae6a);
        assert_eq!(ioctl("KVM_IRQFD"), 0x4020_ae76);
        assert_eq!(ioctl("KVM_IOEVENTFD"), 0x4040_ae79);
        assert_eq!(ioctl("KVM_SET_USER_MEMORY_REGION"), 0x4020_ae46);
        assert_eq!(ioctl("KVM_GET_DIRTY_LOG"), 0x4010_ae42);
        assert_eq!(ioctl("FIONBIO"), u64::try_from(libc::FIONBIO).unwrap());
        assert_eq!(ioctl("FIOCLEX"), u64::try_from(libc::FIOCLEX).unwrap());
        let sized = [
            ("KVM_SET_GSI_ROUTING", size_of::<kvm_irq_routing>()),
            ("KVM_IRQFD", size_of::<kvm_irqfd>()),
            ("KVM_IOEVENTFD", size_of::<kvm_ioeventfd>()),
            (
                "KVM_SET_USER_MEMORY_REGION",
                size_of::<kvm_userspace_memory_region>(),
            ),
            ("KVM_GET_DIRTY_LOG", size_of::<kvm_dirty_log>()),
        ];
        for (name, want) in sized {
            assert_eq!(size(ioctl(name)), want, "{name}");
        }
    }

    #[test]
    fn no_syscall_or_ioctl_is_listed_twice() {
        let mut nrs: Vec<i64> = syscalls().map(|&(nr, _)| nr).collect();
        let all = nrs.len();
        nrs.sort_unstable();
        nrs.dedup();
        assert_eq!(nrs.len(), all);
        let mut reqs: Vec<u64> = ioctls().map(|&(req, _)| req).collect();
        let all = reqs.len();
        reqs.sort_unstable();
        reqs.dedup();
        assert_eq!(reqs.len(), all);
    }

    #[test]
    fn filters_compile() {
        let allow = allowlist(1).unwrap();
        assert!(allow.len() > syscalls().count());
        assert!(!clone3_enosys().unwrap().is_empty());
    }
}
