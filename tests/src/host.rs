//! Host-side fixtures: temp dirs, disk images, hashes, skips and network namespaces.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

static UNIQUE: AtomicU32 = AtomicU32::new(0);

/// A name unique within this machine for this test process: `<prefix>-<pid>-<n>`.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

/// Prints the loud skip line tests use when the host cannot run them.
///
/// It goes straight to the process's stderr: libtest captures `eprintln!` of passing
/// tests, and a skip must be seen.
pub fn skip(reason: &str, test: &str) {
    loud(&format!("SKIP ({reason}): {test}"));
}

/// Writes one line to the real stderr, past libtest's output capture.
pub fn loud(line: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// Whether `/dev/kvm` exists; prints `SKIP (no /dev/kvm): <test>` when it does not.
pub fn require_kvm(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        true
    } else {
        skip("no /dev/kvm", test);
        false
    }
}

/// The full path of `program` on `$PATH`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// FNV-1a, 64 bit (the probe guest's `sector0_fnv`).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// `len` deterministic pseudo-random bytes from `seed` (xorshift64*).
pub fn pattern_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The 4096 bytes the probe guest writes at `sector` for `pv.blk.write=<sector>`:
/// `pocketvisor-probe-blk:<sector>\n` repeated, truncated to 4096.
pub fn probe_blk_pattern(sector: u64) -> Vec<u8> {
    let unit = format!("pocketvisor-probe-blk:{sector}\n");
    unit.bytes().cycle().take(4096).collect()
}

/// A directory under the system temp dir, removed (with its contents) on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `$TMPDIR/pvtest-<pid>-<n>`.
    pub fn new() -> TempDir {
        let path = std::env::temp_dir().join(unique_name("pvtest"));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Writes a disk image of `len` pseudo-random bytes (seeded by `seed`) and returns them.
    pub fn disk(&self, name: &str, len: usize, seed: u64) -> (PathBuf, Vec<u8>) {
        let path = self.join(name);
        let bytes = pattern_bytes(seed, len);
        std::fs::write(&path, &bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        (path, bytes)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn run_ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A network namespace `pvtest-<pid>-<n>`, deleted (with every interface in it) on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace and brings its loopback up. Namespaces left behind by test
    /// processes that no longer exist (killed before their guards ran) are deleted first.
    pub fn create() -> io::Result<NetNs> {
        sweep_stale_namespaces();
        let name = unique_name("pvtest");
        run_ip(&["netns", "add", &name])?;
        let ns = NetNs { name };
        run_ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Creates a persistent TAP device `tap` in the namespace and sets it up.
    pub fn add_tap(&self, tap: &str) -> io::Result<()> {
        run_ip(&[
            "netns", "exec", &self.name, "ip", "tuntap", "add", "dev", tap, "mode", "tap",
        ])?;
        // Keep the host's IPv6 chatter off the wire the test watches.
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.name, "sysctl", "-qw"])
            .arg(format!("net.ipv6.conf.{tap}.disable_ipv6=1"))
            .output();
        run_ip(&["-n", &self.name, "link", "set", tap, "up"])
    }

    /// Runs `f` on a new thread that has entered this namespace and returns its result.
    pub fn run_inside<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let ns_file = File::open(Path::new("/var/run/netns").join(&self.name))?;
        std::thread::spawn(move || {
            // SAFETY: setns(2) with a valid namespace fd; it changes only this thread,
            // which exists just to run `f`.
            let rc = unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))?
    }
}

/// Deletes `pvtest-<pid>-<n>` namespaces whose `<pid>` is not a running process.
fn sweep_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(pid) = name
            .strip_prefix("pvtest-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = run_ip(&["netns", "delete", &name]);
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = run_ip(&["netns", "delete", &self.name]);
    }
}

/// An `AF_PACKET` raw socket bound to one interface and one ethertype.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
    ethertype: u16,
}

impl PacketSocket {
    /// Opens a socket for `ethertype` frames on `ifname` (in the caller's network namespace).
    pub fn open(ifname: &str, ethertype: u16) -> io::Result<PacketSocket> {
        let cname = CString::new(ifname).map_err(io::Error::other)?;
        // SAFETY: if_nametoindex reads a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        let ifindex = i32::try_from(ifindex).map_err(io::Error::other)?;
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ethertype.to_be()),
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let addr = sockaddr_ll(ifindex, ethertype, [0; 6]);
        // SAFETY: bind(2) with a properly sized, initialized sockaddr_ll.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                sockaddr_ll_len(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PacketSocket {
            fd,
            ifindex,
            ethertype,
        })
    }

    /// Sends `payload` from `src` to `dst` with this socket's ethertype (padded to 60 bytes).
    pub fn send(&self, dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> io::Result<()> {
        let mut frame = Vec::with_capacity(64 + payload.len());
        frame.extend_from_slice(&dst);
        frame.extend_from_slice(&src);
        frame.extend_from_slice(&self.ethertype.to_be_bytes());
        frame.extend_from_slice(payload);
        if frame.len() < 60 {
            frame.resize(60, 0);
        }
        let addr = sockaddr_ll(self.ifindex, self.ethertype, dst);
        // SAFETY: sendto(2) with a valid buffer and a properly sized sockaddr_ll.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::addr_of!(addr).cast(),
                sockaddr_ll_len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one frame (with its Ethernet header), or `None` after `timeout`.
    pub fn recv(&self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: poll(2) on one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if rc == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; 65536];
        // SAFETY: recv(2) into a buffer we own, with its true length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(usize::try_from(n).unwrap_or(0));
        Ok(Some(buf))
    }
}

fn sockaddr_ll(ifindex: i32, ethertype: u16, dst: [u8; 6]) -> libc::sockaddr_ll {
    let mut addr = libc::sockaddr_ll {
        sll_family: u16::try_from(libc::AF_PACKET).expect("AF_PACKET fits sa_family_t"),
        sll_protocol: ethertype.to_be(),
        sll_ifindex: ifindex,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: [0; 8],
    };
    addr.sll_addr[..6].copy_from_slice(&dst);
    addr
}

fn sockaddr_ll_len() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(20)
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_known_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn blk_pattern_is_4096_bytes_of_the_repeated_unit() {
        let p = probe_blk_pattern(8);
        assert_eq!(p.len(), 4096);
        assert!(p.starts_with(b"pocketvisor-probe-blk:8\npocketvisor-probe-blk:8\n"));
        let unit = b"pocketvisor-probe-blk:8\n".len();
        assert_eq!(&p[unit..2 * unit], b"pocketvisor-probe-blk:8\n");
        assert_eq!(p[4095], b"pocketvisor-probe-blk:8\n"[4095 % unit]);
    }

    #[test]
    fn pattern_bytes_are_deterministic_and_seeded() {
        assert_eq!(pattern_bytes(7, 1000), pattern_bytes(7, 1000));
        assert_ne!(pattern_bytes(7, 64), pattern_bytes(8, 64));
        assert_eq!(pattern_bytes(7, 13).len(), 13);
    }

    #[test]
    fn tempdir_is_removed_on_drop() {
        let dir = TempDir::new();
        let path = dir.path().to_path_buf();
        std::fs::write(dir.join("x"), b"1").unwrap();
        assert!(path.exists());
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn mac_formatting() {
        assert_eq!(
            format_mac(&[0x52, 0x54, 0, 0x12, 0x34, 0xab]),
            "52:54:00:12:34:ab"
        );
    }
}
