//! One narrower filter per thread kind, stacked on the process allowlist (the kernel applies
//! the strictest answer): each thread of a kind installs, as its first act, a filter that
//! kills the process on the syscalls of the allowlist that the kind never makes. A device
//! worker cannot run a vCPU or start a thread; a vCPU cannot touch a socket, do block I/O,
//! wait on epoll, start a thread or open, rename or remove a file; the API threads (which
//! parse what a client sends) can make no KVM ioctl, open no socket and touch no file; the
//! serial log's thread can only append to and rotate its file.
//!
//! Filters are inherited by the threads a thread creates, so device workers are not created
//! by the vCPU that activates their device: `devices::threads::spawn` hands them to a
//! spawner thread that has only the process filter, and each worker adds its own. Workers a
//! restore started before the filters existed add theirs when the hook is set.
//!
//! A filter is added with `seccomp(SECCOMP_SET_MODE_FILTER, 0, ...)` on the calling thread
//! only (no TSYNC); the process allowlist lets exactly that form through, and a filter can
//! only take permissions away.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op};

use super::{compile, cond, rule, FIOCLEX, FIONBIO, KVMIO, NONE};
use crate::{Error, Result};

/// The kinds of VMM threads that get their own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs one vCPU (`KVM_RUN`, port and MMIO exits, device configuration).
    Vcpu,
    /// Serves one device's queues (block and tap I/O, vsock streams).
    DeviceWorker,
    /// Accepts API connections and parses their requests (handled by the VM's thread).
    Api,
    /// The VNC server: accepts viewers, parses what they send, sends the screen.
    Display,
    /// Writes and rotates the serial console's log file (`vmm::serial_log::LogWriter`).
    LogWriter,
}

/// `KVM_RUN`.
const KVM_RUN: u64 = super::ioc(NONE, KVMIO, 0x80, 0);

/// Why a thread kind may make a syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Made by the kind in the traced run (`crates/cli/tests/jail.rs`
    /// `each_thread_kind_makes_only_the_syscalls_its_filter_allows` fails if it no longer is).
    Traced,
    /// On a path the traced run does not always reach: why the kind needs it.
    Rare(&'static str),
}

const ALLOCATOR: Need = Need::Rare(
    "glibc's allocator: a new arena, a heap grown or trimmed, a large buffer (which thread \
     does it depends on the run)",
);
const SIGNAL: Need = Need::Rare(
    "the stop signal's handler (SIGTERM, SIGINT) runs on whichever thread the kernel picks",
);
const CLOCK: Need = Need::Rare("std's clocks, when the host's clock source has no vDSO");
const CONTENDED: Need = Need::Rare("std's channels and locks yield under contention");
const THREAD_EXIT: Need = Need::Rare(
    "thread exit (std drops its signal stack, glibc frees the stack): the traced run may end \
     first",
);

/// What every kind may need on a rare path: the allocator, a signal, a clock, contention.
fn everyone_rare() -> Vec<(i64, Need)> {
    vec![
        (libc::SYS_mmap, ALLOCATOR),
        (libc::SYS_munmap, ALLOCATOR),
        (libc::SYS_madvise, ALLOCATOR),
        (libc::SYS_mprotect, ALLOCATOR),
        (libc::SYS_mremap, ALLOCATOR),
        (libc::SYS_brk, ALLOCATOR),
        (libc::SYS_sched_getaffinity, ALLOCATOR),
        // glibc's allocator counts the CPUs (`/sys/devices/system/cpu/online`) when a thread
        // first needs an arena of its own.
        (libc::SYS_openat, ALLOCATOR),
        (libc::SYS_read, ALLOCATOR),
        (libc::SYS_close, ALLOCATOR),
        (libc::SYS_rt_sigreturn, SIGNAL),
        (libc::SYS_restart_syscall, SIGNAL),
        (libc::SYS_clock_gettime, CLOCK),
        (libc::SYS_gettimeofday, CLOCK),
        (libc::SYS_sched_yield, CONTENDED),
        (libc::SYS_exit, THREAD_EXIT),
        (libc::SYS_rt_sigprocmask, THREAD_EXIT),
        (libc::SYS_sigaltstack, THREAD_EXIT),
    ]
}

/// The syscalls (of the process allowlist) `kind` may make, with why: each was made by the
/// kind in the traced run ([`Need::Traced`]) or is on a rare path with its reason. Every
/// other syscall of the process allowlist kills the process when a thread of the kind makes
/// it ([`denied`]).
pub fn allowed(kind: ThreadKind) -> Vec<(i64, Need)> {
    use Need::Traced;
    let traced = |calls: &[i64]| calls.iter().map(|&nr| (nr, Traced)).collect::<Vec<_>>();
    let mut v = match kind {
        ThreadKind::Vcpu => {
            let mut v = traced(&[
                // KVM_RUN and the KVM ioctls of device activation, MSI-X routing, BARs.
                libc::SYS_ioctl,
                libc::SYS_read,
                libc::SYS_write,
                libc::SYS_fcntl,
                libc::SYS_futex,
                // A device activated: its queue events and the worker's epoll.
                libc::SYS_eventfd2,
                libc::SYS_epoll_create1,
                libc::SYS_epoll_ctl,
                libc::SYS_getrandom,
                libc::SYS_munmap,
                libc::SYS_madvise,
                // The kick signal that takes a vCPU out of KVM_RUN.
                libc::SYS_rt_sigreturn,
                libc::SYS_exit,
                libc::SYS_rt_sigprocmask,
                libc::SYS_sigaltstack,
            ]);
            v.push((
                libc::SYS_restart_syscall,
                Need::Rare("a wait interrupted by the kick signal"),
            ));
            v
        }
        ThreadKind::DeviceWorker => {
            let mut v = traced(&[
                // Queue events, the tap's non-blocking mode (FIONBIO), never KVM_RUN.
                libc::SYS_ioctl,
                libc::SYS_read,
                libc::SYS_write,
                libc::SYS_close,
                libc::SYS_fcntl,
                libc::SYS_futex,
                libc::SYS_epoll_ctl,
                libc::SYS_pread64,
                libc::SYS_fdatasync,
                libc::SYS_accept4,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_getrandom,
                libc::SYS_munmap,
                libc::SYS_madvise,
                libc::SYS_exit,
                libc::SYS_rt_sigprocmask,
                libc::SYS_sigaltstack,
            ]);
            #[cfg(target_arch = "x86_64")]
            v.push((libc::SYS_epoll_wait, Traced));
            #[cfg(not(target_arch = "x86_64"))]
            v.push((
                libc::SYS_epoll_pwait,
                Need::Rare("a worker's epoll wait (the only form aarch64 has)"),
            ));
            const NET: Need = Need::Rare("virtio-net: frames to and from the tap");
            const BLK: Need = Need::Rare(
                "virtio-blk writes and vectored reads (the traced probe only reads its disk)",
            );
            const VSOCK_OUT: Need = Need::Rare(
                "vsock: a guest connecting to a host port (`<socket>_<port>`, tests/tests/vsock.rs)",
            );
            v.extend([
                (libc::SYS_readv, NET),
                (libc::SYS_writev, NET),
                (libc::SYS_pwrite64, BLK),
                (libc::SYS_pwritev, BLK),
                (libc::SYS_preadv, BLK),
                (libc::SYS_fsync, BLK),
                (libc::SYS_socket, VSOCK_OUT),
                (libc::SYS_connect, VSOCK_OUT),
                (libc::SYS_getsockopt, VSOCK_OUT),
                (
                    libc::SYS_shutdown,
                    Need::Rare("vsock: a stream the guest closed for writing"),
                ),
            ]);
            v
        }
        ThreadKind::Api => {
            // The accept thread starts one thread per connection, under this filter.
            let mut v = traced(&[
                libc::SYS_accept4,
                libc::SYS_recvfrom,
                libc::SYS_sendto,
                libc::SYS_write,
                libc::SYS_fcntl,
                libc::SYS_futex,
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_mmap,
                libc::SYS_mprotect,
                libc::SYS_rt_sigprocmask,
                libc::SYS_set_robust_list,
                libc::SYS_rseq,
                libc::SYS_prctl,
                libc::SYS_seccomp,
                libc::SYS_sigaltstack,
                // std's thread start (its id, the stack guard).
                libc::SYS_gettid,
                libc::SYS_sched_getaffinity,
            ]);
            v.push((
                libc::SYS_close,
                Need::Rare("a connection the client closed"),
            ));
            v
        }
        // The accept thread starts a reader and a writer per viewer, under this filter.
        ThreadKind::Display => traced(&[
            // Socket timeouts only (the process allowlist checks the option).
            libc::SYS_setsockopt,
            // A viewer's reader ends the session both ways when the viewer goes.
            libc::SYS_shutdown,
            libc::SYS_accept4,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_write,
            libc::SYS_fcntl,
            libc::SYS_futex,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_mmap,
            libc::SYS_mprotect,
            libc::SYS_rt_sigprocmask,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
            libc::SYS_prctl,
            libc::SYS_seccomp,
            libc::SYS_sigaltstack,
            // std's thread start (its id, the stack guard).
            libc::SYS_gettid,
            libc::SYS_sched_getaffinity,
        ]),
        ThreadKind::LogWriter => {
            let mut v = traced(&[
                libc::SYS_write,
                libc::SYS_futex,
                libc::SYS_close,
                libc::SYS_fcntl,
                libc::SYS_munmap,
                libc::SYS_madvise,
                libc::SYS_exit,
                libc::SYS_rt_sigprocmask,
                libc::SYS_sigaltstack,
            ]);
            const ROTATE: Need = Need::Rare(
                "rotation at 4 MiB: the log renamed to `.1`, a new one opened \
                 (crates/vmm serial_log tests)",
            );
            v.extend([
                (libc::SYS_openat, ROTATE),
                (libc::SYS_renameat, ROTATE),
                (libc::SYS_renameat2, ROTATE),
            ]);
            #[cfg(target_arch = "x86_64")]
            v.push((libc::SYS_rename, ROTATE));
            v
        }
    };
    for (nr, need) in everyone_rare() {
        if !v.iter().any(|&(n, _)| n == nr) {
            v.push((nr, need));
        }
    }
    v
}

/// Syscalls of the process allowlist that `kind` does not need ([`allowed`]), with the
/// reason: its filter kills the process on them.
pub fn denied(kind: ThreadKind) -> Vec<(i64, &'static str)> {
    let allowed: Vec<i64> = allowed(kind).into_iter().map(|(nr, _)| nr).collect();
    let why = match kind {
        ThreadKind::Vcpu => "not in the vCPU threads' allowlist",
        ThreadKind::DeviceWorker => "not in the device workers' allowlist",
        ThreadKind::Api => "not in the API threads' allowlist",
        ThreadKind::Display => "not in the VNC threads' allowlist",
        ThreadKind::LogWriter => "not in the serial log thread's allowlist",
    };
    super::allowlisted_syscalls()
        .into_iter()
        .filter(|nr| !allowed.contains(nr))
        .map(|nr| (nr, why))
        .collect()
}

/// The filter of `kind`: kills the process on [`denied`] syscalls, and on `ioctl` requests
/// the kind never makes (the API: any but FIONBIO and FIOCLEX; a device worker: `KVM_RUN`);
/// lets everything else through to the process allowlist.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = denied(kind)
        .into_iter()
        .map(|(nr, _)| (nr, Vec::new()))
        .collect();
    // Argument checks narrow a call the kind may make; a denied call stays denied whole.
    let mut narrow = |nr: i64, deny_when: Vec<seccompiler::SeccompRule>| {
        rules.entry(nr).or_insert(deny_when);
    };
    let only_fionbio_fioclex = || -> Result<Vec<seccompiler::SeccompRule>> {
        Ok(vec![rule(vec![
            cond(1, Len::Dword, Op::Ne, FIONBIO)?,
            cond(1, Len::Dword, Op::Ne, FIOCLEX)?,
        ])?])
    };
    // Files are opened read-only (glibc reads /proc and /sys files); nothing opened for
    // writing or created.
    let read_only = || -> Result<Vec<seccompiler::SeccompRule>> {
        let write = |bits: u64| -> Result<seccompiler::SeccompRule> {
            rule(vec![cond(2, Len::Dword, Op::MaskedEq(bits), bits)?])
        };
        Ok(vec![
            write(libc::O_WRONLY as u64)?,
            write(libc::O_RDWR as u64)?,
            write(libc::O_CREAT as u64)?,
        ])
    };
    match kind {
        ThreadKind::Api | ThreadKind::Display => {
            narrow(libc::SYS_ioctl, only_fionbio_fioclex()?);
            narrow(libc::SYS_openat, read_only()?);
        }
        ThreadKind::LogWriter => {
            // Rotation creates the new log file.
            narrow(libc::SYS_ioctl, only_fionbio_fioclex()?);
        }
        ThreadKind::DeviceWorker => {
            narrow(
                libc::SYS_ioctl,
                vec![rule(vec![cond(1, Len::Dword, Op::Eq, KVM_RUN)?])?],
            );
            narrow(libc::SYS_openat, read_only()?);
        }
        ThreadKind::Vcpu => {
            narrow(libc::SYS_openat, read_only()?);
        }
    }
    compile(rules, SeccompAction::Allow, SeccompAction::KillProcess)
}

/// Installs the filter of `kind` on the calling thread only. Call it first thing in a new
/// thread (the thread must not have made any syscall the filter refuses since).
pub fn install_thread(kind: ThreadKind) -> Result<()> {
    let prog = filter(kind)?;
    apply_to_this_thread(&prog)
}

/// `seccomp(SECCOMP_SET_MODE_FILTER, 0, prog)`: the calling thread only.
fn apply_to_this_thread(prog: &BpfProgram) -> Result<()> {
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len()).map_err(|_| Error::Seccomp("filter too long".into()))?,
        filter: prog.as_ptr().cast_mut().cast(),
    };
    // SAFETY: seccomp(2) reads `fprog` and the instructions it points to, both alive for the
    // call; no_new_privs is set by the process before any thread filter is installed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const libc::sock_fprog,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(Error::Seccomp(format!(
            "install a thread filter: {}",
            std::io::Error::last_os_error()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `probe` in a forked child that installed `kind`'s filter; returns the signal
    /// that killed the child (0 if it exited).
    fn killed_by(kind: ThreadKind, probe: fn() -> i64) -> i32 {
        let prog = filter(kind).unwrap();
        // SAFETY: fork(2); the child only makes raw syscalls (no allocation) and _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: prctl with integer arguments.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            if apply_to_this_thread(&prog).is_err() {
                // SAFETY: _exit ends the child without running the parent's destructors.
                unsafe { libc::_exit(2) };
            }
            probe();
            // The child's only thread ends (exit, not exit_group: no kind needs that).
            // SAFETY: exit(2) ends the calling thread; it runs no destructors.
            unsafe { libc::syscall(libc::SYS_exit, 0) };
            unreachable!("exit(2) returned");
        }
        let mut status = 0;
        // SAFETY: waitpid on our own child with a valid status pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        if libc::WIFSIGNALED(status) {
            libc::WTERMSIG(status)
        } else {
            assert_eq!(libc::WEXITSTATUS(status), 0, "the child could not filter");
            0
        }
    }

    fn unix_socket() -> i64 {
        // SAFETY: socket(2) with integer arguments; the descriptor is left to _exit.
        i64::from(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) })
    }

    // The request is `c_ulong` on glibc (a conversion that cannot fail) and `c_int` on musl.
    #[allow(clippy::unnecessary_fallible_conversions, clippy::useless_conversion)]
    fn kvm_run_on_a_bad_fd() -> i64 {
        let request = KVM_RUN.try_into().expect("KVM_RUN fits the request type");
        // SAFETY: ioctl on an invalid descriptor: EBADF unless a filter stops it first.
        i64::from(unsafe { libc::ioctl(-1, request, 0) })
    }

    fn open_a_file() -> i64 {
        // SAFETY: openat with a NUL-terminated path; the descriptor is left to _exit.
        i64::from(unsafe { libc::openat(libc::AT_FDCWD, c"/".as_ptr(), libc::O_RDONLY) })
    }

    fn create_a_file() -> i64 {
        // SAFETY: openat with a NUL-terminated path; the descriptor is left to _exit.
        i64::from(unsafe {
            libc::openat(
                libc::AT_FDCWD,
                c"/tmp/pv-display-filter-test".as_ptr(),
                libc::O_WRONLY | libc::O_CREAT,
                0o600,
            )
        })
    }

    /// What the serial log's rotation does: append to the log, rename it to `.1`, open a
    /// new one (files under /tmp, left to the test's end).
    fn rotate_a_log() -> i64 {
        let (log, old) = (c"/tmp/pv-log-filter-test", c"/tmp/pv-log-filter-test.1");
        let append = libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_CLOEXEC;
        // SAFETY: openat, write, rename and close with NUL-terminated paths and a live
        // buffer; each descriptor is closed before the next step.
        unsafe {
            let fd = libc::openat(libc::AT_FDCWD, log.as_ptr(), append, 0o600);
            if fd < 0 || libc::write(fd, b"x".as_ptr().cast(), 1) != 1 {
                return -1;
            }
            libc::close(fd);
            if libc::rename(log.as_ptr(), old.as_ptr()) != 0 {
                return -1;
            }
            let fd = libc::openat(libc::AT_FDCWD, log.as_ptr(), append, 0o600);
            if fd < 0 {
                return -1;
            }
            libc::close(fd);
        }
        0
    }

    #[test]
    fn only_the_serial_log_thread_may_rotate_a_file() {
        assert_eq!(killed_by(ThreadKind::LogWriter, rotate_a_log), 0);
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::DeviceWorker,
            ThreadKind::Api,
            ThreadKind::Display,
        ] {
            assert_eq!(killed_by(kind, rotate_a_log), libc::SIGSYS, "{kind:?}");
        }
        let _ = std::fs::remove_file("/tmp/pv-log-filter-test");
        let _ = std::fs::remove_file("/tmp/pv-log-filter-test.1");
    }

    #[test]
    fn the_vnc_server_reads_files_but_writes_none_and_opens_no_socket() {
        let sys = libc::SIGSYS;
        assert_eq!(killed_by(ThreadKind::Display, open_a_file), 0);
        assert_eq!(killed_by(ThreadKind::Display, create_a_file), sys);
        assert_eq!(killed_by(ThreadKind::Display, unix_socket), sys);
        assert_eq!(killed_by(ThreadKind::Display, kvm_run_on_a_bad_fd), sys);
    }

    fn pread_a_bad_fd() -> i64 {
        let mut b = [0u8; 1];
        // SAFETY: pread into a live buffer on an invalid descriptor: EBADF unless a filter
        // stops it first.
        let r = unsafe { libc::pread(-1, b.as_mut_ptr().cast(), 1, 0) };
        i64::try_from(r).unwrap_or(-1)
    }

    fn clone_a_thread() -> i64 {
        // CLONE_THREAD without CLONE_SIGHAND: the kernel answers EINVAL before creating
        // anything, unless a filter stops the call first (the process allowlist lets a
        // CLONE_THREAD clone through).
        let flags = libc::CLONE_THREAD;
        // SAFETY: clone(2) with flags the kernel refuses; no thread or process is created.
        unsafe { libc::syscall(libc::SYS_clone, flags, 0, 0, 0, 0) }
    }

    fn bind_a_bad_fd() -> i64 {
        // SAFETY: bind on an invalid descriptor: EBADF unless a filter stops it first.
        i64::from(unsafe { libc::bind(-1, std::ptr::null(), 0) })
    }

    #[test]
    fn a_syscall_allowed_to_one_kind_is_refused_to_another() {
        let sys = libc::SIGSYS;
        // socket: device workers (vsock streams) yes, vCPU and API no.
        assert_eq!(killed_by(ThreadKind::DeviceWorker, unix_socket), 0);
        assert_eq!(killed_by(ThreadKind::Vcpu, unix_socket), sys);
        assert_eq!(killed_by(ThreadKind::Api, unix_socket), sys);
        // pread64 (the disk): device workers yes, vCPU no.
        assert_eq!(killed_by(ThreadKind::DeviceWorker, pread_a_bad_fd), 0);
        assert_eq!(killed_by(ThreadKind::Vcpu, pread_a_bad_fd), sys);
        // A new thread: the API (one per connection) yes, vCPU and device worker no.
        assert_eq!(killed_by(ThreadKind::Api, clone_a_thread), 0);
        assert_eq!(killed_by(ThreadKind::Vcpu, clone_a_thread), sys);
        assert_eq!(killed_by(ThreadKind::DeviceWorker, clone_a_thread), sys);
        // bind: only the main thread (API and vsock listeners are bound before the threads).
        for kind in [ThreadKind::Vcpu, ThreadKind::DeviceWorker, ThreadKind::Api] {
            assert_eq!(killed_by(kind, bind_a_bad_fd), sys, "{kind:?}");
        }
        // KVM_RUN: vCPU yes, device worker and API no.
        assert_eq!(killed_by(ThreadKind::Vcpu, kvm_run_on_a_bad_fd), 0);
        assert_eq!(
            killed_by(ThreadKind::DeviceWorker, kvm_run_on_a_bad_fd),
            sys
        );
        assert_eq!(killed_by(ThreadKind::Api, kvm_run_on_a_bad_fd), sys);
        // Creating a file: the serial log's thread (rotation) yes, every other kind no;
        // opening one read-only (glibc's allocator counting CPUs): every kind.
        assert_eq!(killed_by(ThreadKind::LogWriter, create_a_file), 0);
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::DeviceWorker,
            ThreadKind::Api,
            ThreadKind::Display,
        ] {
            assert_eq!(killed_by(kind, create_a_file), sys, "{kind:?}");
            assert_eq!(killed_by(kind, open_a_file), 0, "{kind:?}");
        }
        // The serial log's thread: no socket, disk, KVM, thread or listener.
        for call in [
            unix_socket as fn() -> i64,
            pread_a_bad_fd,
            kvm_run_on_a_bad_fd,
            clone_a_thread,
            bind_a_bad_fd,
        ] {
            assert_eq!(killed_by(ThreadKind::LogWriter, call), sys);
        }
    }

    #[test]
    fn every_allowed_syscall_is_in_the_process_allowlist_once() {
        let process = super::super::allowlisted_syscalls();
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::DeviceWorker,
            ThreadKind::Api,
            ThreadKind::Display,
            ThreadKind::LogWriter,
        ] {
            let allowed = allowed(kind);
            for (i, (nr, need)) in allowed.iter().enumerate() {
                assert!(
                    process.contains(nr),
                    "{kind:?}: {nr} ({need:?}) is not allowed anyway"
                );
                assert!(
                    !allowed[..i].iter().any(|(n, _)| n == nr),
                    "{kind:?}: {nr} listed twice"
                );
            }
            assert_eq!(
                denied(kind).len() + allowed.len(),
                process.len(),
                "{kind:?}"
            );
        }
    }
}
