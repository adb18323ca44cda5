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

/// Syscalls (of the process allowlist) `kind` never makes, with the reason. Derived from a
/// trace of each kind (`crates/cli/tests/jail.rs`
/// `each_thread_kind_makes_only_the_syscalls_its_filter_allows` prints what each made) and
/// the code paths the trace does not reach.
pub fn denied(kind: ThreadKind) -> Vec<(i64, &'static str)> {
    const NO_SOCKETS: &str = "a vCPU touches no socket (vsock streams are the workers')";
    const NO_BLOCK_IO: &str = "a vCPU does no block I/O (the workers do)";
    const NO_THREADS: &str = "device workers are started by the spawner thread";
    const NO_FILES: &str =
        "a vCPU opens, renames and removes no file (the serial log has its own thread)";
    const LOG_ONLY: &str = "the log thread only appends to and rotates its file";
    // Only x86_64 adds its legacy syscalls below.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut v: Vec<(i64, &'static str)> = match kind {
        ThreadKind::Vcpu => vec![
            (libc::SYS_socket, NO_SOCKETS),
            (libc::SYS_bind, NO_SOCKETS),
            (libc::SYS_listen, NO_SOCKETS),
            (libc::SYS_accept4, NO_SOCKETS),
            (libc::SYS_connect, NO_SOCKETS),
            (libc::SYS_recvfrom, NO_SOCKETS),
            (libc::SYS_sendto, NO_SOCKETS),
            (libc::SYS_recvmsg, NO_SOCKETS),
            (libc::SYS_sendmsg, NO_SOCKETS),
            (libc::SYS_shutdown, NO_SOCKETS),
            (libc::SYS_getsockopt, NO_SOCKETS),
            (libc::SYS_setsockopt, NO_SOCKETS),
            (libc::SYS_pread64, NO_BLOCK_IO),
            (libc::SYS_preadv, NO_BLOCK_IO),
            (libc::SYS_pwrite64, NO_BLOCK_IO),
            (libc::SYS_pwritev, NO_BLOCK_IO),
            (libc::SYS_fdatasync, NO_BLOCK_IO),
            (
                libc::SYS_epoll_pwait,
                "a vCPU waits in KVM_RUN, not on epoll",
            ),
            (libc::SYS_clone, NO_THREADS),
            (libc::SYS_clone3, NO_THREADS),
            (libc::SYS_mkdirat, "a vCPU makes no directory"),
            (libc::SYS_fchmodat, "a vCPU changes no mode"),
            (libc::SYS_fchmod, "a vCPU changes no mode"),
            (libc::SYS_getdents64, "a vCPU lists no directory"),
            (libc::SYS_ftruncate, "a vCPU truncates nothing"),
            (libc::SYS_openat, NO_FILES),
            (libc::SYS_renameat, NO_FILES),
            (libc::SYS_renameat2, NO_FILES),
            (libc::SYS_unlinkat, NO_FILES),
        ],
        ThreadKind::DeviceWorker => vec![
            (libc::SYS_bind, "a worker binds no socket"),
            (libc::SYS_listen, "a worker listens on no socket"),
            (libc::SYS_clone, "a worker starts no thread"),
            (libc::SYS_clone3, "a worker starts no thread"),
            (libc::SYS_mkdirat, "a worker makes no directory"),
            (libc::SYS_fchmodat, "a worker changes no mode"),
            (libc::SYS_fchmod, "a worker changes no mode"),
            (libc::SYS_renameat, "a worker renames nothing"),
            (libc::SYS_renameat2, "a worker renames nothing"),
            (libc::SYS_getdents64, "a worker lists no directory"),
            (libc::SYS_ftruncate, "a worker truncates nothing"),
        ],
        ThreadKind::Display => vec![
            (libc::SYS_socket, "the VNC server got its listener"),
            (libc::SYS_bind, "the VNC server got its listener"),
            (libc::SYS_listen, "the VNC server got its listener"),
            (libc::SYS_connect, "the VNC server connects nowhere"),
            (libc::SYS_mkdirat, "the VNC server makes no directory"),
            (libc::SYS_unlinkat, "the VNC server removes nothing"),
            (libc::SYS_renameat, "the VNC server renames nothing"),
            (libc::SYS_renameat2, "the VNC server renames nothing"),
            (libc::SYS_fchmodat, "the VNC server changes no mode"),
            (libc::SYS_fchmod, "the VNC server changes no mode"),
            (libc::SYS_pwrite64, "the VNC server writes no file"),
            (libc::SYS_pwritev, "the VNC server writes no file"),
            (libc::SYS_fsync, "the VNC server writes no file"),
            (libc::SYS_fdatasync, "the VNC server writes no file"),
            (libc::SYS_getdents64, "the VNC server lists no directory"),
            (libc::SYS_ftruncate, "the VNC server truncates nothing"),
        ],
        ThreadKind::Api => vec![
            (libc::SYS_socket, "the API thread got its listener"),
            (libc::SYS_bind, "the API thread got its listener"),
            (libc::SYS_listen, "the API thread got its listener"),
            (libc::SYS_connect, "the API connects nowhere"),
            (
                libc::SYS_openat,
                "the API opens no file (snapshots are written by the VM thread)",
            ),
            (libc::SYS_mkdirat, "the API makes no directory"),
            (libc::SYS_unlinkat, "the API removes nothing"),
            (libc::SYS_renameat, "the API renames nothing"),
            (libc::SYS_renameat2, "the API renames nothing"),
            (libc::SYS_fchmodat, "the API changes no mode"),
            (libc::SYS_fchmod, "the API changes no mode"),
            (libc::SYS_pwrite64, "the API writes no file"),
            (libc::SYS_pwritev, "the API writes no file"),
            (libc::SYS_fsync, "the API writes no file"),
            (libc::SYS_fdatasync, "the API writes no file"),
            (libc::SYS_epoll_pwait, "the API blocks in accept and read"),
            (libc::SYS_getdents64, "the API lists no directory"),
            (libc::SYS_ftruncate, "the API truncates nothing"),
        ],
        ThreadKind::LogWriter => [
            libc::SYS_socket,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_accept4,
            libc::SYS_connect,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_shutdown,
            libc::SYS_getsockopt,
            libc::SYS_pread64,
            libc::SYS_preadv,
            libc::SYS_pwrite64,
            libc::SYS_pwritev,
            libc::SYS_fdatasync,
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_pwait,
            libc::SYS_eventfd2,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_mkdirat,
            libc::SYS_fchmodat,
            libc::SYS_fchmod,
            libc::SYS_getdents64,
            libc::SYS_ftruncate,
            libc::SYS_unlinkat,
        ]
        .into_iter()
        .map(|nr| (nr, LOG_ONLY))
        .collect(),
    };
    #[cfg(target_arch = "x86_64")]
    v.extend(match kind {
        ThreadKind::Vcpu => vec![
            (libc::SYS_mkdir, "a vCPU makes no directory"),
            (libc::SYS_chmod, "a vCPU changes no mode"),
            (
                libc::SYS_epoll_wait,
                "a vCPU waits in KVM_RUN, not on epoll",
            ),
            (libc::SYS_poll, "a vCPU waits in KVM_RUN, not in poll"),
            (libc::SYS_rename, NO_FILES),
            (libc::SYS_unlink, NO_FILES),
        ],
        ThreadKind::DeviceWorker => vec![
            (libc::SYS_mkdir, "a worker makes no directory"),
            (libc::SYS_chmod, "a worker changes no mode"),
            (libc::SYS_rename, "a worker renames nothing"),
        ],
        ThreadKind::Display => vec![
            (libc::SYS_mkdir, "the VNC server makes no directory"),
            (libc::SYS_unlink, "the VNC server removes nothing"),
            (libc::SYS_rename, "the VNC server renames nothing"),
            (libc::SYS_chmod, "the VNC server changes no mode"),
        ],
        ThreadKind::Api => vec![
            (libc::SYS_mkdir, "the API makes no directory"),
            (libc::SYS_unlink, "the API removes nothing"),
            (libc::SYS_rename, "the API renames nothing"),
            (libc::SYS_chmod, "the API changes no mode"),
            (libc::SYS_epoll_wait, "the API blocks in accept and read"),
        ],
        ThreadKind::LogWriter => [
            libc::SYS_mkdir,
            libc::SYS_unlink,
            libc::SYS_chmod,
            libc::SYS_poll,
            libc::SYS_epoll_wait,
        ]
        .into_iter()
        .map(|nr| (nr, LOG_ONLY))
        .collect(),
    });
    v
}

/// The filter of `kind`: kills the process on [`denied`] syscalls, and on `ioctl` requests
/// the kind never makes (the API: any but FIONBIO and FIOCLEX; a device worker: `KVM_RUN`);
/// lets everything else through to the process allowlist.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram> {
    let mut rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = denied(kind)
        .into_iter()
        .map(|(nr, _)| (nr, Vec::new()))
        .collect();
    match kind {
        ThreadKind::Api | ThreadKind::LogWriter => {
            rules.insert(
                libc::SYS_ioctl,
                vec![rule(vec![
                    cond(1, Len::Dword, Op::Ne, FIONBIO)?,
                    cond(1, Len::Dword, Op::Ne, FIOCLEX)?,
                ])?],
            );
        }
        ThreadKind::Display => {
            rules.insert(
                libc::SYS_ioctl,
                vec![rule(vec![
                    cond(1, Len::Dword, Op::Ne, FIONBIO)?,
                    cond(1, Len::Dword, Op::Ne, FIOCLEX)?,
                ])?],
            );
            // glibc opens /proc and /sys files read-only (malloc arenas of a new thread);
            // nothing is opened for writing or created.
            let write = |bits: u64| -> Result<seccompiler::SeccompRule> {
                rule(vec![cond(2, Len::Dword, Op::MaskedEq(bits), bits)?])
            };
            rules.insert(
                libc::SYS_openat,
                vec![
                    write(libc::O_WRONLY as u64)?,
                    write(libc::O_RDWR as u64)?,
                    write(libc::O_CREAT as u64)?,
                ],
            );
        }
        ThreadKind::DeviceWorker => {
            rules.insert(
                libc::SYS_ioctl,
                vec![rule(vec![cond(1, Len::Dword, Op::Eq, KVM_RUN)?])?],
            );
        }
        ThreadKind::Vcpu => {}
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
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
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
        // openat: the serial log's thread (rotation) and workers yes, vCPU and API no.
        assert_eq!(killed_by(ThreadKind::LogWriter, open_a_file), 0);
        assert_eq!(killed_by(ThreadKind::DeviceWorker, open_a_file), 0);
        assert_eq!(killed_by(ThreadKind::Vcpu, open_a_file), sys);
        assert_eq!(killed_by(ThreadKind::Api, open_a_file), sys);
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
    fn every_denied_syscall_is_in_the_process_allowlist() {
        let allowed: Vec<i64> = super::super::syscalls().map(|&(nr, _)| nr).collect();
        for kind in [
            ThreadKind::Vcpu,
            ThreadKind::DeviceWorker,
            ThreadKind::Api,
            ThreadKind::Display,
            ThreadKind::LogWriter,
        ] {
            for (nr, why) in denied(kind) {
                let extra = [
                    libc::SYS_socket,
                    libc::SYS_ioctl,
                    libc::SYS_clone,
                    libc::SYS_setsockopt,
                ];
                assert!(
                    allowed.contains(&nr) || extra.contains(&nr),
                    "{kind:?}: {nr} ({why}) is not allowed anyway"
                );
            }
        }
    }
}
