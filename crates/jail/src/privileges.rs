//! Dropping privileges: every capability (bounding, ambient, effective, permitted,
//! inheritable), optionally root itself (uid/gid), `no_new_privs`, and core dumps.
//!
//! Capabilities are per thread: call [`drop_all`] while the process has a single thread, so
//! every thread created later inherits the empty sets.

use crate::{check, check_long, Error, Result};

/// `_LINUX_CAPABILITY_VERSION_3`.
const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The uid and gid to become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Drops every capability from all sets, switches to `ids` if given (no supplementary
/// groups), sets `no_new_privs` and forbids core dumps ([`forbid_core_dumps`]).
pub fn drop_all(ids: Option<Ids>) -> Result<()> {
    // The bounding set first: that needs CAP_SETPCAP, which goes with the rest below.
    let mut cap = 0;
    loop {
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            // EINVAL: past the last capability this kernel knows.
            if e.raw_os_error() == Some(libc::EINVAL) && cap > 0 {
                break;
            }
            return Err(crate::sys(format!(
                "drop capability {cap} from the bounding set"
            ))(e));
        }
        cap += 1;
        if cap > 128 {
            return Err(Error::Invalid(
                "the kernel reports over 128 capabilities".into(),
            ));
        }
    }
    // SAFETY: prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    check(r, "clear ambient capabilities")?;
    if let Some(Ids { uid, gid }) = ids {
        // A change of uid clears the parent-death signal: note it to set it again after.
        let mut death_signal: libc::c_int = 0;
        // SAFETY: PR_GET_PDEATHSIG writes one int through the live pointer.
        let r = unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut death_signal, 0, 0, 0) };
        check(r, "read the parent-death signal")?;
        // SAFETY: setgroups with an empty list (the pointer is not read).
        let r = unsafe { libc::setgroups(0, std::ptr::null()) };
        check(r, "drop supplementary groups")?;
        // SAFETY: integer arguments only.
        let r = unsafe { libc::setresgid(gid, gid, gid) };
        check(r, format!("set gid {gid}"))?;
        // SAFETY: integer arguments only.
        let r = unsafe { libc::setresuid(uid, uid, uid) };
        check(r, format!("set uid {uid}"))?;
        if death_signal != 0 {
            // SAFETY: prctl with integer arguments only.
            let r = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, death_signal, 0, 0, 0) };
            check(r, "set the parent-death signal again")?;
        }
    }
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads a v3 header and two data structs, which both point to.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    check_long(r, "clear capabilities")?;
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check(r, "set no_new_privs")?;
    forbid_core_dumps()
}

/// No core dump (it would hold the guest's RAM) and no ptrace or /proc access by other
/// processes of the same uid: `RLIMIT_CORE` 0 and not dumpable.
pub fn forbid_core_dumps() -> Result<()> {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads a live rlimit struct.
    let r = unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
    check(r, "set RLIMIT_CORE")?;
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    check(r, "clear the dumpable flag")?;
    Ok(())
}
