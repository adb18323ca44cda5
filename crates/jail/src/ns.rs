//! Namespaces for the jailed child: mount, network, IPC and UTS (the pid namespace is made
//! by [`crate::supervise::fork_into_pid_namespace`]).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::{check, sys, Result};

/// Which network namespace the VMM runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net<'a> {
    /// A new, empty one (only `lo`, down); taps the VM asks for are created in it.
    New,
    /// An existing one, e.g. `/var/run/netns/NAME` from `ip netns add NAME`, where the
    /// daemon has prepared the VM's tap.
    Join(&'a Path),
}

/// Enters new mount, IPC and UTS namespaces and the chosen network namespace, and sets the
/// host name to `hostname`.
pub fn enter(net: Net<'_>, hostname: &str) -> Result<()> {
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    let join = match net {
        Net::New => {
            flags |= libc::CLONE_NEWNET;
            None
        }
        Net::Join(p) => {
            Some(File::open(p).map_err(sys(format!("open network namespace {}", p.display())))?)
        }
    };
    // SAFETY: unshare only changes this process's namespaces.
    let r = unsafe { libc::unshare(flags) };
    check(r, "unshare namespaces")?;
    if let (Some(f), Net::Join(p)) = (join, net) {
        // SAFETY: setns with a descriptor we own, asking for a network namespace.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        check(r, format!("join network namespace {}", p.display()))?;
    }
    // SAFETY: the pointer and length describe the bytes of `hostname`.
    let r = unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) };
    check(r, "set the host name")?;
    Ok(())
}
