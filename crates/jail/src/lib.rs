//! Jailing one pocketvisor VMM process, the way Firecracker's jailer does it.
//!
//! The pieces, in the order `pocketvisor vmm` uses them:
//! - [`id::validate`]: the jail id names directories and cgroups, so it is checked first;
//! - [`fsroot::JailRoot`]: `<jail-root>/<id>/root`, the mount points of everything the VM
//!   needs, bind mounts and `pivot_root` into it (in the child), removal (in the parent);
//! - [`cgroup::Cgroup`]: a cgroup v2 group with `cpu.weight`, `memory.max` and friends;
//! - [`supervise`]: the fork into a new pid namespace, the parent forwarding signals and
//!   the exit status;
//! - [`ns::enter`]: new mount, network (or a named one), IPC and UTS namespaces;
//! - [`privileges::drop_all`]: capabilities, uid/gid, `no_new_privs`;
//! - [`seccomp`]: the syscall allowlist installed before the guest runs.

pub mod cgroup;
pub mod fsroot;
pub mod id;
pub mod ns;
pub mod privileges;
pub mod seccomp;
pub mod supervise;

use std::io;

/// What can go wrong while building a jail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The jail id is not `[a-z0-9-]{1,64}`.
    #[error("bad jail id {0:?}: use 1 to 64 characters from a-z, 0-9 and '-'")]
    BadId(String),
    /// A system call or file operation failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The OS error.
        source: io::Error,
    },
    /// An argument or the host setup cannot work.
    #[error("{0}")]
    Invalid(String),
    /// Building or installing the seccomp filter failed.
    #[error("seccomp: {0}")]
    Seccomp(String),
}

/// Result with the jail [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Maps an `io::Error` to [`Error::Sys`] with a description.
pub(crate) fn sys(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Sys { what, source }
}

/// Turns a libc return value of -1 into [`Error::Sys`] with `errno`.
pub(crate) fn check(ret: libc::c_int, what: impl Into<String>) -> Result<libc::c_int> {
    if ret == -1 {
        Err(sys(what)(io::Error::last_os_error()))
    } else {
        Ok(ret)
    }
}

/// [`check`] for raw `syscall(2)` returns, which are `c_long`.
pub(crate) fn check_long(ret: libc::c_long, what: impl Into<String>) -> Result<libc::c_long> {
    if ret == -1 {
        Err(sys(what)(io::Error::last_os_error()))
    } else {
        Ok(ret)
    }
}

/// A path as a C string (paths with NUL bytes cannot name files).
pub(crate) fn cpath(p: &std::path::Path) -> Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid(format!("path {} contains a NUL byte", p.display())))
}
