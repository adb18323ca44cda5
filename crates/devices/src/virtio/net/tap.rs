//! A TAP interface opened through /dev/net/tun, with the 12-byte virtio-net header.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Mutex, PoisonError};

use super::{NetBackend, NetError, VNET_HDR_LEN};

/// `struct ifreq` as far as TUNSETIFF uses it: name and flags, padded to the kernel's size.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP device (non-blocking, no packet info, with virtio-net headers).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// `ifr_flags` of the TUNSETIFF request: a TAP without packet info, with vnet headers
/// (0x5002, which fits the C short).
#[allow(clippy::cast_possible_truncation)] // The constant's value is checked below.
const TAP_FLAGS: libc::c_short = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as _;
const _: () =
    assert!(TAP_FLAGS as libc::c_int == libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);

/// TAPs opened ahead of the VM ([`Tap::open_ahead`]), each taken by the first
/// [`Tap::open`] of its name.
static AHEAD: Mutex<Vec<Tap>> = Mutex::new(Vec::new());

impl Tap {
    /// Opens the TAP `name` now, in this process's network namespace, for the VM built later
    /// in this process (or a child forked from it) to use whatever namespace it is in by
    /// then: a jailed VMM opens a host TAP before it enters its jail's empty namespace. The
    /// first [`Tap::open`] of `name` takes it. Returns its descriptor (for the caller to
    /// keep open across a fork).
    pub fn open_ahead(name: &str) -> Result<RawFd, NetError> {
        let tap = Tap::open_here(name)?;
        let fd = tap.as_raw_fd();
        AHEAD
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(tap);
        Ok(fd)
    }

    /// Closes every TAP opened ahead and not taken (a parent whose forked child took them).
    pub fn forget_ahead() {
        AHEAD.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// The TAP interface `name`: the one opened ahead of that name if there is one (see
    /// [`Tap::open_ahead`]), else attached to now, created if it does not exist (needs
    /// CAP_NET_ADMIN). A name containing `%d` lets the kernel pick the number.
    pub fn open(name: &str) -> Result<Tap, NetError> {
        let mut ahead = AHEAD.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = ahead.iter().position(|t| t.name == name) {
            return Ok(ahead.swap_remove(i));
        }
        drop(ahead);
        Tap::open_here(name)
    }

    /// Attaches to the TAP interface `name` in this network namespace, creating it if it
    /// does not exist.
    fn open_here(name: &str) -> Result<Tap, NetError> {
        let bad_name = || NetError::BadName(name.to_string());
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(bad_name());
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(NetError::OpenTun)?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: TAP_FLAGS,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` has its layout and size
        // (16-byte name, flags, padding to 40 bytes) and lives across the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if ret < 0 {
            return Err(NetError::SetIff(
                name.to_string(),
                io::Error::last_os_error(),
            ));
        }
        let hdr_len = libc::c_int::try_from(VNET_HDR_LEN)
            .map_err(|_| NetError::SetVnetHdr(io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which points to `hdr_len`.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if ret < 0 {
            return Err(NetError::SetVnetHdr(io::Error::last_os_error()));
        }
        let end = req
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(req.name.len());
        let name = String::from_utf8_lossy(&req.name[..end]).into_owned();
        Ok(Tap { file, name })
    }

    /// The interface name the kernel gave the TAP.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }
}
