//! A cloud twin's jailed VMM (docs/cloud.md, docs/jail.md): `cloud twin`, the twin's
//! connection process, keeps the host's identity (TLS key, migration key, twin store) and
//! starts the VM in `pocketvisor vmm --receive-from`, jailed as the handset's VMMs are and
//! running as the unprivileged twin user. The two meet over unix sockets in the twin's
//! directory, each migration under a fresh key of its own in a file there (mode 0600,
//! removed once used): the VMM sees that directory (as [`TWIN_DIR_IN_JAIL`]) and nothing
//! else of the host.
//!
//! The twin's directory belongs to the twin user (its VMM binds its sockets and rotates its
//! serial log there once unprivileged); the connection process opens nothing there that
//! follows a link the VMM could have planted.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm::migration::tls::Transport;
use vmm::migration::wire::{Channel, Role, KEY_LEN};

/// The twin's directory as its jailed VMM sees it: every path the VMM is given is in that
/// directory, so it is the jail's first (and only) run directory.
pub(crate) const TWIN_DIR_IN_JAIL: &str = "/run/0";

/// How long a starting VMM may take to build its jail and connect.
const START_WAIT: Duration = Duration::from_secs(30);

/// How long a VMM told to give up (or whose proxy went away) may take to end by itself
/// before it is killed: its reads wait at most the migration's I/O timeout.
const END_WAIT: Duration = Duration::from_secs(20);

/// What a twin's VMM is started with; paths are named relative to the twin's directory,
/// the working directory of the connection's process.
pub(crate) struct TwinSpec<'a> {
    /// The proxy's socket and the key file of the receive.
    pub(crate) receive: (&'a str, &'a str),
    /// The number of disks (`disk<i>.img`).
    pub(crate) disks: usize,
    /// The vsock socket, if the VM has a vsock device.
    pub(crate) vsock_socket: Option<&'a str>,
    /// A clone's fresh vsock CID.
    pub(crate) vsock_cid: Option<u64>,
    /// The API socket.
    pub(crate) api_socket: &'a str,
    /// The host's TAP of each network device, in order (the VMM opens them before its jail).
    pub(crate) taps: &'a [String],
    /// A clone's fresh MAC of each network device, in order (none: the received ones).
    pub(crate) macs: &'a [[u8; 6]],
    /// Where the jail is made.
    pub(crate) jail_root: PathBuf,
    /// The user and group id it runs as once built.
    pub(crate) uid: u32,
}

impl TwinSpec<'_> {
    /// The arguments of `pocketvisor` that start this VMM.
    pub(crate) fn args(&self) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = Vec::new();
        let mut push = |k: &str, v: &std::ffi::OsStr| {
            a.push(k.into());
            a.push(v.into());
        };
        push(
            "--receive-from",
            format!("{}{}", vmm::migration::LOCAL_PREFIX, self.receive.0).as_ref(),
        );
        push("--receive-key", self.receive.1.as_ref());
        for i in 0..self.disks {
            push("--disk", format!("disk{i}.img").as_ref());
        }
        push("--serial", "file:serial.log".as_ref());
        if let Some(v) = self.vsock_socket {
            push("--vsock-socket", v.as_ref());
        }
        if let Some(cid) = self.vsock_cid {
            push("--vsock-cid", cid.to_string().as_ref());
        }
        for t in self.taps {
            push("--tap", t.as_ref());
        }
        for m in self.macs {
            push("--mac", vmm::config::format_mac(m).as_ref());
        }
        push("--api-socket", self.api_socket.as_ref());
        // Unique while this process lives (it serves one twin).
        push("--jail-id", format!("twin-{}", std::process::id()).as_ref());
        push("--jail-root", self.jail_root.as_os_str());
        push("--uid", self.uid.to_string().as_ref());
        push("--gid", self.uid.to_string().as_ref());
        let mut out = vec!["vmm".into()];
        out.extend(a);
        out
    }
}

/// A started twin VMM: ended (asked, then killed) when dropped unless it ended already.
pub(crate) struct TwinVmm {
    child: Child,
}

impl TwinVmm {
    /// Starts the VMM of `spec` (this program's `vmm`): its standard error is this
    /// process's, and it is killed if this process dies (so is the jailed VM with it).
    pub(crate) fn start(spec: &TwinSpec) -> Result<TwinVmm, String> {
        let exe = std::env::current_exe().map_err(|e| format!("this program's path: {e}"))?;
        let mut c = Command::new(exe);
        c.args(spec.args())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let parent = std::process::id();
        // SAFETY: prctl and getppid are async-signal-safe and touch no memory of the parent's.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut c, move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent died before the line above: nothing would kill this one.
                if u32::try_from(libc::getppid()).ok() != Some(parent) {
                    return Err(std::io::Error::other("the connection's process is gone"));
                }
                Ok(())
            });
        }
        let child = c
            .spawn()
            .map_err(|e| format!("cannot start the twin's VMM: {e}"))?;
        Ok(TwinVmm { child })
    }

    /// The VMM's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (up to [`START_WAIT`]) for the VMM to connect to `listener` and makes the
    /// migration's channel to it under `key`, this end the source.
    pub(crate) fn connect(
        &mut self,
        listener: &UnixListener,
        key: &[u8; KEY_LEN],
    ) -> Result<Channel<Transport>, String> {
        let stream = accept_within(listener, START_WAIT, || match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("the twin's VMM ended before it received: {status}")),
            Err(e) => Err(format!("the twin's VMM: {e}")),
        })?;
        Channel::handshake(Transport::Local(stream), key, Role::Source)
            .map_err(|e| format!("the twin's VMM: {e}"))
    }

    /// Waits for the VMM to end; its status as a shell gives it.
    pub(crate) fn wait(&mut self) -> std::io::Result<i32> {
        let status = self.child.wait()?;
        Ok(std::os::unix::process::ExitStatusExt::signal(&status)
            .map_or_else(|| status.code().unwrap_or(1), |sig| 128 + sig))
    }
}

impl Drop for TwinVmm {
    fn drop(&mut self) {
        let deadline = Instant::now() + END_WAIT;
        while matches!(self.child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                // Its jailed child dies with it (PR_SET_PDEATHSIG).
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.wait();
    }
}

/// Accepts one connection on the non-blocking `listener` within `wait`, as long as `alive`
/// says the peer may still come; the connection blocks, with the migration's I/O timeouts.
pub(crate) fn accept_within(
    listener: &UnixListener,
    wait: Duration,
    mut alive: impl FnMut() -> Result<(), String>,
) -> Result<UnixStream, String> {
    let deadline = Instant::now() + wait;
    let s = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("the twin's socket: {e}")),
        }
        alive()?;
        if Instant::now() > deadline {
            return Err(format!(
                "the twin's VMM did not connect within {} s",
                wait.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let io = Some(vmm::migration::IO_TIMEOUT);
    s.set_nonblocking(false)
        .and_then(|()| s.set_read_timeout(io))
        .and_then(|()| s.set_write_timeout(io))
        .map_err(|e| format!("the twin's connection: {e}"))?;
    Ok(s)
}

/// A fresh random migration key.
pub(crate) fn fresh_key() -> Result<[u8; KEY_LEN], String> {
    let mut k = [0u8; KEY_LEN];
    // SAFETY: getrandom writes at most `k.len()` bytes into `k`, which lives across the call.
    let n = unsafe { libc::getrandom(k.as_mut_ptr().cast(), k.len(), 0) };
    if usize::try_from(n).ok() != Some(k.len()) {
        return Err(format!(
            "no random key: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(k)
}

/// Writes `key` (64 hexadecimal digits) to a new file `name` (one left over is replaced,
/// never followed), mode 0600, owned by `owner` (user and group) when given.
pub(crate) fn write_key(name: &str, key: &[u8; KEY_LEN], owner: Option<u32>) -> Result<(), String> {
    let said = |e: std::io::Error| format!("the key file {name}: {e}");
    remove_if_there(Path::new(name)).map_err(said)?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o600)
        .open(name)
        .map_err(said)?;
    if let Some(id) = owner {
        std::os::unix::fs::fchown(&f, Some(id), Some(id)).map_err(said)?;
    }
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    f.write_all(hex.as_bytes()).map_err(said)
}

/// Listens on the unix socket `name` (one left over is replaced), mode 0600, owned by
/// `owner` (user and group) when given, without blocking. The mode and owner are set on the
/// socket itself: a link put in its place in between is refused, never followed.
pub(crate) fn listen_private(name: &str, owner: Option<u32>) -> std::io::Result<UnixListener> {
    remove_if_there(Path::new(name))?;
    let l = UnixListener::bind(name)?;
    let c = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated path that outlives the call; no other memory is passed.
    if unsafe { libc::fchmodat(libc::AT_FDCWD, c.as_ptr(), 0o600, libc::AT_SYMLINK_NOFOLLOW) } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    if let Some(id) = owner {
        std::os::unix::fs::lchown(name, Some(id), Some(id))?;
    }
    l.set_nonblocking(true)?;
    Ok(l)
}

fn remove_if_there(p: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Gives the twin's directory `dir` to the twin user `uid` (user and group), mode 0700:
/// its VMM binds its sockets there and rotates its serial log once unprivileged.
pub(crate) fn give_dir(dir: &Path, uid: u32) -> std::io::Result<()> {
    let d = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)?;
    std::os::unix::fs::fchown(&d, Some(uid), Some(uid))?;
    d.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_twin_vmm_is_jailed_as_the_twin_user_with_its_files_in_its_directory() {
        let spec = TwinSpec {
            receive: ("receive.sock", "receive.key"),
            disks: 2,
            vsock_socket: Some("vsock.sock"),
            vsock_cid: Some(4242),
            api_socket: "api.sock",
            taps: &["pvt0123456789ab".into()],
            macs: &[[6, 1, 2, 3, 4, 5]],
            jail_root: "/state/jail".into(),
            uid: 77,
        };
        let args: Vec<String> = spec
            .args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = args.join(" ");
        assert!(line.starts_with("vmm --receive-from unix:receive.sock --receive-key receive.key"));
        assert!(line.contains("--disk disk0.img --disk disk1.img --serial file:serial.log"));
        assert!(line.contains(
            "--vsock-socket vsock.sock --vsock-cid 4242 --tap pvt0123456789ab \
             --mac 06:01:02:03:04:05 --api-socket api.sock"
        ));
        assert!(
            line.contains("--jail-root /state/jail --uid 77 --gid 77"),
            "{line}"
        );
        // No path outside the twin's directory but the jail's, no key of the host.
        for a in &args {
            assert!(!a.starts_with('/') || a == "/state/jail", "{a}");
        }
    }

    #[test]
    fn key_files_and_sockets_replace_what_is_there_and_follow_no_link() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("pv-twinvmm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("target");
        std::fs::write(&target, "keep").unwrap();
        let mode = std::fs::metadata(&target).unwrap().mode();
        std::os::unix::fs::symlink(&target, dir.join("k.key")).unwrap();
        std::os::unix::fs::symlink(&target, dir.join("s.sock")).unwrap();
        let name = |f: &str| dir.join(f).display().to_string();
        write_key(&name("k.key"), &[0xab; KEY_LEN], None).unwrap();
        let text = std::fs::read_to_string(dir.join("k.key")).unwrap();
        assert_eq!(text, "ab".repeat(KEY_LEN));
        assert_eq!(
            vmm::migration::wire::read_key(&dir.join("k.key")).unwrap(),
            [0xab; KEY_LEN]
        );
        let meta = std::fs::symlink_metadata(dir.join("k.key")).unwrap();
        assert!(meta.is_file() && meta.mode() & 0o777 == 0o600);
        let _l = listen_private(&name("s.sock"), None).unwrap();
        let meta = std::fs::symlink_metadata(dir.join("s.sock")).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        assert_eq!(std::fs::metadata(&target).unwrap().mode(), mode);
        let _ = std::fs::remove_dir_all(dir);
    }
}
