//! The fork into a new pid namespace: the child becomes its pid 1 and runs the VMM; the
//! parent stays outside, forwards SIGTERM/SIGINT (and SIGHUP as SIGTERM) to it and reports how it ended.

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::{check, check_long, sys, Error, Result};

/// Which side of the fork this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// The jailed child, pid 1 of its namespace.
    Child,
    /// The parent, with the child's pid as the parent sees it.
    Parent(libc::pid_t),
}

/// How the child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    /// It exited with this status.
    Exited(i32),
    /// A signal killed it (SIGSYS: the seccomp filter).
    Killed(i32),
}

impl ChildExit {
    /// The shell convention: the status, or 128 + the signal.
    pub fn code(self) -> i32 {
        match self {
            ChildExit::Exited(c) => c,
            ChildExit::Killed(s) => 128 + s,
        }
    }
}

/// `struct clone_args` of clone3(2), as far as version 2 (with `cgroup`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_INTO_CGROUP` from linux/sched.h.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Forks a child that is pid 1 of a new pid namespace and gets SIGKILL if the parent dies.
///
/// With `cgroup` (a descriptor of a cgroup v2 directory) the child is created directly in
/// that group with `clone3(CLONE_INTO_CGROUP)`, which is about 9 ms cheaper than moving it
/// there afterwards; the second value says whether that happened (on kernels without it the
/// caller must move the child itself). Call while single-threaded. The child then runs on a
/// copy of the parent's memory like after fork(2), except that glibc's cached thread id of
/// the main thread is stale: nothing may `pthread_kill` the child's main thread.
pub fn fork_into_pid_namespace(cgroup: Option<libc::c_int>) -> Result<(Forked, bool)> {
    if let Some(fd) = cgroup.and_then(|fd| u64::try_from(fd).ok()) {
        let mut args = CloneArgs {
            flags: libc::CLONE_NEWPID as u64 | CLONE_INTO_CGROUP,
            exit_signal: libc::SIGCHLD as u64,
            cgroup: fd,
            ..Default::default()
        };
        // SAFETY: clone3 reads `args` (of the size passed); without CLONE_VM and with no
        // stack the child continues on a copy-on-write copy of this single-threaded process.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &mut args as *mut CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        match pid {
            0 => return child_setup().map(|f| (f, true)),
            -1 => {
                let e = io::Error::last_os_error();
                let unsupported = matches!(
                    e.raw_os_error(),
                    Some(libc::ENOSYS | libc::E2BIG | libc::EINVAL)
                );
                if !unsupported {
                    return Err(sys("clone3 into the cgroup")(e));
                }
                tracing::info!("clone3(CLONE_INTO_CGROUP) unavailable ({e}); forking");
            }
            pid => {
                let pid = libc::pid_t::try_from(pid).map_err(|_| {
                    Error::Invalid(format!("clone3 returned an impossible pid {pid}"))
                })?;
                return Ok((Forked::Parent(pid), true));
            }
        }
    }
    // SAFETY: unshare only changes the namespace of this process's future children.
    let r = unsafe { libc::unshare(libc::CLONE_NEWPID) };
    check(r, "unshare the pid namespace")?;
    // SAFETY: the caller is single-threaded, so the child is a consistent copy.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(sys("fork")(io::Error::last_os_error())),
        0 => child_setup().map(|f| (f, false)),
        pid => Ok((Forked::Parent(pid), false)),
    }
}

fn child_setup() -> Result<Forked> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    check(r, "set the parent-death signal")?;
    Ok(Forked::Child)
}

/// Closes every descriptor from 3 up except those in `keep`, so nothing the parent (or
/// whoever started it) had open, such as a directory outside the jail, reaches the child.
pub fn close_fds_except(keep: &[libc::c_int]) -> Result<()> {
    let mut keep: Vec<libc::c_uint> = keep
        .iter()
        .filter_map(|&fd| libc::c_uint::try_from(fd).ok())
        .filter(|&fd| fd > 2)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from: libc::c_uint = 3;
    for fd in keep.into_iter().chain([libc::c_uint::MAX]) {
        if fd > from {
            // SAFETY: close_range on descriptors this process owns; nothing else in this
            // single-threaded process uses them (the caller keeps the ones it needs).
            let r = unsafe { libc::syscall(libc::SYS_close_range, from, fd - 1, 0) };
            check_long(r, "close inherited descriptors")?;
        }
        from = fd.saturating_add(1);
    }
    Ok(())
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::SeqCst);
    // The child's VMM stops on SIGTERM and SIGINT; a hang-up asks for the same.
    let sig = if sig == libc::SIGHUP {
        libc::SIGTERM
    } else {
        sig
    };
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// The signals the parent passes on to the child (SIGHUP as SIGTERM).
pub const FORWARDED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// In the parent: forwards [`FORWARDED`] signals to `child` until it ends; returns how.
pub fn wait_forwarding_signals(child: libc::pid_t) -> Result<ChildExit> {
    CHILD.store(child, Ordering::SeqCst);
    for sig in FORWARDED {
        // SAFETY: the handler only does async-signal-safe work (an atomic load and kill).
        unsafe { libc::signal(sig, forward as *const () as libc::sighandler_t) };
    }
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes the status into a live c_int.
        let r = unsafe { libc::waitpid(child, &mut status, 0) };
        if r == child {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(sys("wait for the jailed vmm")(e));
        }
    }
    CHILD.store(0, Ordering::SeqCst);
    if libc::WIFSIGNALED(status) {
        Ok(ChildExit::Killed(libc::WTERMSIG(status)))
    } else {
        Ok(ChildExit::Exited(libc::WEXITSTATUS(status)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        assert_eq!(ChildExit::Exited(3).code(), 3);
        assert_eq!(ChildExit::Killed(libc::SIGSYS).code(), 159);
    }
}
