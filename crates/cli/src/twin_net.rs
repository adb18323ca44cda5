//! A twin's network at the cloud host (`cloud serve --twin-bridge BRIDGE`): each network
//! device of a twin gets a TAP of the host's own naming, which the twin's jailed VMM creates
//! in the host's network namespace before it enters its jail's (`vmm --tap`; not persistent:
//! it goes with the last descriptor, when the twin's VMM ends, however it ends) and this
//! module attaches to the operator's bridge and brings up before the guest arrives.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use cloud::store::DeviceId;

/// `SIOCBRADDIF` (linux/sockios.h): add the interface `ifr_ifindex` to the bridge `ifr_name`.
const SIOCBRADDIF: libc::Ioctl = 0x89a2;
/// `SIOCGIFFLAGS` and `SIOCSIFFLAGS` (linux/sockios.h), typed as this libc's ioctl takes them.
const SIOCGIFFLAGS: libc::Ioctl = 0x8913;
const SIOCSIFFLAGS: libc::Ioctl = 0x8914;
/// `IFF_UP` as `ifr_flags` (a short) holds it.
const IFF_UP: i16 = 1;
const _: () = assert!(IFF_UP as libc::c_int == libc::IFF_UP);

/// `struct ifreq` as SIOCBRADDIF (`ifr_ifindex`) and SIOC[GS]IFFLAGS (`ifr_flags`) use it:
/// the name, then a union the kernel reads as an int or a short, padded to its 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn named(name: &str) -> io::Result<IfReq> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['\0', '/']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is no interface name"),
            ));
        }
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(r)
    }
}

/// The TAP name of network device `index` of the twin `twin` of `device`: `pvt` and 12 hex
/// digits of a hash of the three (15 bytes, the kernel's most; never a name from the device).
pub fn tap_name(device: &DeviceId, twin: &str, index: usize) -> String {
    // FNV-1a 64 over the device's hex, the twin's name and the index, each ended by a 0.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let index = index.to_string();
    for part in [device.hex().as_str(), twin, index.as_str()] {
        for &b in part.as_bytes().iter().chain(&[0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("pvt{:012x}", h >> 16)
}

/// The index of the interface `name` in this network namespace, if it exists.
fn index_of(name: &str) -> io::Result<Option<libc::c_uint>> {
    IfReq::named(name)?;
    let c =
        std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a NUL-terminated string that lives across the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    Ok((i != 0).then_some(i))
}

/// Whether `name` is a bridge in this network namespace (as sysfs shows it).
fn is_bridge(name: &str) -> bool {
    std::path::Path::new("/sys/class/net")
        .join(name)
        .join("bridge")
        .is_dir()
}

/// Checks that the bridge `bridge` exists here and is a bridge.
pub fn check_bridge(bridge: &str) -> Result<(), String> {
    match index_of(bridge) {
        Err(e) => Err(format!("the twin bridge: {e}")),
        Ok(None) => Err(format!(
            "the twin bridge {bridge:?} does not exist on this host (create it: ip link add \
             {bridge} type bridge)"
        )),
        Ok(Some(_)) if !is_bridge(bridge) => {
            Err(format!("the twin bridge {bridge:?} is not a bridge"))
        }
        Ok(Some(_)) => Ok(()),
    }
}

/// Checks that no interface is named `tap` yet (the twin's VMM creates it).
pub fn check_free(tap: &str) -> Result<(), String> {
    match index_of(tap) {
        Ok(None) => Ok(()),
        Ok(Some(_)) => Err(format!(
            "an interface {tap:?} exists already on this host: the twin's TAP cannot be made"
        )),
        Err(e) => Err(format!("the twin's TAP: {e}")),
    }
}

/// A socket for the interface ioctls.
fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket takes no pointers; the result is checked before it is owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Attaches the interface `tap` to the bridge `bridge` and brings it up.
pub fn attach(tap: &str, bridge: &str) -> io::Result<()> {
    let index = index_of(tap)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no interface {tap:?}")))?;
    let sock = ioctl_socket()?;
    let mut req = IfReq::named(bridge)?;
    let index =
        libc::c_int::try_from(index).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    req.data[..4].copy_from_slice(&index.to_ne_bytes());
    // SAFETY: SIOCBRADDIF reads a `struct ifreq` (the bridge's name, the port's ifindex);
    // `req` has its layout and size and lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCBRADDIF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut req = IfReq::named(tap)?;
    // SAFETY: SIOCGIFFLAGS writes the flags (a short) into the `struct ifreq` `req`, which
    // has its layout and size and lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let flags = i16::from_ne_bytes([req.data[0], req.data[1]]);
    let up = flags | IFF_UP;
    req.data[..2].copy_from_slice(&up.to_ne_bytes());
    // SAFETY: SIOCSIFFLAGS reads the name and flags from `req`, as above.
    if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCSIFFLAGS, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_short_and_the_hosts_own() {
        let a = DeviceId::of_certificate(b"phone");
        let b = DeviceId::of_certificate(b"tablet");
        let n = tap_name(&a, "work", 0);
        assert!(n.len() <= 15 && n.starts_with("pvt"), "{n}");
        assert!(n[3..].bytes().all(|c| c.is_ascii_hexdigit()), "{n}");
        assert_eq!(n, tap_name(&a, "work", 0));
        for other in [
            tap_name(&a, "work", 1),
            tap_name(&a, "home", 0),
            tap_name(&b, "work", 0),
        ] {
            assert_ne!(n, other);
        }
        // A name made to look like an interface is still hashed.
        assert!(tap_name(&a, "eth0", 0).starts_with("pvt"));
    }

    #[test]
    fn bad_interface_names_are_refused_before_any_call() {
        for bad in ["", "a/b", "sixteen-bytes-xx", "a\0b"] {
            assert!(check_bridge(bad).is_err(), "{bad:?}");
            assert!(attach("pvt0", bad).is_err(), "{bad:?}");
        }
    }
}
