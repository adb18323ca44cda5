//! The VMM processes: how one is launched, how it is asked to do things over its API socket,
//! and how a process found at daemon start is recognised as ours.

use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use vmm_api::{ApiRequest, ApiResponse, Request};

use crate::error::{Error, Result};

/// What to run in a profile's VMM process.
#[derive(Debug, Clone)]
pub enum Launch {
    /// Boot from the profile's `vm.toml`.
    Boot {
        /// The generated VM configuration.
        config: PathBuf,
    },
    /// Restore the snapshot in `dir`.
    Restore {
        /// The snapshot directory.
        dir: PathBuf,
        /// Serial log path (overrides the saved one).
        serial: PathBuf,
        /// vsock socket path (overrides the saved one).
        vsock: PathBuf,
        /// Disk image paths, in order (override the saved ones, so a profile moved to another
        /// state directory, e.g. by `pocketvisor import`, uses its own disks).
        disks: Vec<PathBuf>,
    },
    /// Receive the guest back from the cloud host it was offloaded to: unjailed,
    /// `pocketvisor cloud return`, which connects over TLS; jailed, `pocketvisor vmm
    /// --restore BASE --return-twin`, through the daemon's relay (`from` is then
    /// `unix:PATH`, and `key` and the disks are in the run directory).
    Return {
        /// The twin's name at the host (the profile's).
        twin: String,
        /// The cloud host, `HOST:PORT`, or the daemon's relay to it, `unix:PATH`.
        from: String,
        /// The copy kept at the offload, the return's base.
        base: PathBuf,
        /// This device's identity towards the host.
        tls: vmm_api::MigrationTls,
        /// The migration key file.
        key: PathBuf,
        /// Serial log path.
        serial: PathBuf,
        /// vsock socket path.
        vsock: PathBuf,
        /// Disk image paths, in order (as they were at the offload).
        disks: Vec<PathBuf>,
    },
}

/// How to jail a booting VMM (`pocketvisor vmm`).
#[derive(Debug, Clone)]
pub struct JailArgs {
    /// The jail's name (the profile name).
    pub id: String,
    /// Directory holding the jails (`<state-dir>/jail`).
    pub root: PathBuf,
    /// cgroup v2 group the jailer creates, joins and removes, if the daemon leaves that to it.
    pub cgroup: Option<JailCgroup>,
    /// The unprivileged uid (and equal gid) the jailed VMM becomes once its VM is built
    /// ([`jail_uid`]).
    pub uid: u32,
}

/// First uid (and gid) of the jailed VMMs: profile with vsock CID `c` runs as
/// `JAIL_UID_BASE + c`, a uid of its own that owns nothing on the host but its run directory.
pub const JAIL_UID_BASE: u32 = 0x7000_0000;
/// Largest vsock CID that has a jail uid (keeps the uids below 2^31).
pub const JAIL_MAX_CID: u32 = 0x0fff_ffff;

/// The uid (and gid) the jailed VMM of the profile with vsock CID `cid` runs as.
pub fn jail_uid(cid: u32) -> Result<u32> {
    if cid > JAIL_MAX_CID {
        return Err(Error::BadRequest(format!(
            "vsock CID {cid} is above {JAIL_MAX_CID}: the jailed VMM would have no uid of its \
             own; re-import the profile (a free CID is chosen)"
        )));
    }
    Ok(JAIL_UID_BASE + cid)
}

/// The cgroup settings handed to the jailer.
#[derive(Debug, Clone)]
pub struct JailCgroup {
    /// The group directory.
    pub dir: PathBuf,
    /// Initial `cpu.weight`.
    pub cpu_weight: u32,
    /// `memory.max` in MiB.
    pub memory_max_mib: u64,
}

/// The arguments of the VMM process (after the binary). This is the one place that knows
/// the command line: jailed, `pocketvisor vmm --config` to boot and `pocketvisor vmm --restore`
/// to resume; unjailed, `pocketvisor run` and `pocketvisor restore`. A profile with a
/// `screen` serves VNC on `vnc.sock` next to the API socket: the jailed VMM does so by
/// itself, an unjailed one is told with `--vnc unix:PATH`. With `disk_keys` the VMM reads its
/// encrypted disks' keys from stdin (`--disk-keys-stdin`, see [`spawn`]).
pub fn vmm_args(
    launch: &Launch,
    api_socket: &Path,
    screen: bool,
    disk_keys: bool,
    jail: Option<&JailArgs>,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    if let (
        Launch::Return {
            twin,
            from,
            base,
            tls,
            key,
            serial,
            vsock,
            disks,
        },
        None,
    ) = (launch, jail)
    {
        a.extend(["cloud".into(), "return".into(), twin.into()]);
        a.extend(["--from".into(), from.into(), "--base".into(), base.into()]);
        a.extend(["--key".into(), key.into()]);
        a.extend(["--tls-cert".into(), tls.cert.as_os_str().into()]);
        a.extend(["--tls-key".into(), tls.key.as_os_str().into()]);
        a.extend(["--tls-ca".into(), tls.ca.as_os_str().into()]);
        let mut s = OsString::from("file:");
        s.push(serial);
        a.extend(["--serial".into(), s, "--vsock-socket".into(), vsock.into()]);
        for d in disks {
            a.extend(["--disk".into(), d.into()]);
        }
        if screen {
            let mut vnc = OsString::from("unix:");
            vnc.push(api_socket.with_file_name(vmm_api::jail::VNC_SOCKET_NAME));
            a.extend(["--vnc".into(), vnc]);
        }
        a.extend(["--api-socket".into(), api_socket.into()]);
        return a;
    }
    match jail {
        Some(j) => {
            a.extend(["vmm".into()]);
            match launch {
                Launch::Boot { config } => a.extend(["--config".into(), config.into()]),
                Launch::Restore { dir, .. } => a.extend(["--restore".into(), dir.into()]),
                Launch::Return {
                    twin,
                    from,
                    base,
                    key,
                    ..
                } => {
                    a.extend(["--restore".into(), base.into()]);
                    a.extend(["--return-twin".into(), twin.into()]);
                    a.extend(["--return-from".into(), from.into()]);
                    a.extend(["--return-key".into(), key.into()]);
                }
            }
            a.extend(["--jail-id".into(), j.id.as_str().into()]);
            a.extend(["--jail-root".into(), j.root.as_os_str().into()]);
            let id = j.uid.to_string();
            a.extend(["--uid".into(), id.clone().into(), "--gid".into(), id.into()]);
            if let Some(cg) = &j.cgroup {
                a.extend(["--cgroup".into(), cg.dir.as_os_str().into()]);
                a.extend(["--cpu-weight".into(), cg.cpu_weight.to_string().into()]);
                a.extend([
                    "--memory-max".into(),
                    format!("{}M", cg.memory_max_mib).into(),
                ]);
            }
        }
        None => match launch {
            Launch::Boot { config } => a.extend(["run".into(), "--config".into(), config.into()]),
            Launch::Restore { dir, .. } => a.extend(["restore".into(), dir.into()]),
            Launch::Return { .. } => {} // its own command line, above
        },
    }
    if let Launch::Restore {
        serial,
        vsock,
        disks,
        ..
    }
    | Launch::Return {
        serial,
        vsock,
        disks,
        ..
    } = launch
    {
        let mut s = OsString::from("file:");
        s.push(serial);
        a.extend(["--serial".into(), s, "--vsock-socket".into(), vsock.into()]);
        for d in disks {
            a.extend(["--disk".into(), d.into()]);
        }
    }
    if disk_keys {
        a.push("--disk-keys-stdin".into());
    }
    if screen && jail.is_none() {
        let mut vnc = OsString::from("unix:");
        vnc.push(api_socket.with_file_name(vmm_api::jail::VNC_SOCKET_NAME));
        a.extend(["--vnc".into(), vnc]);
    }
    a.extend(["--api-socket".into(), api_socket.into()]);
    a
}

/// Makes the process `c` starts end (SIGTERM) when this daemon does, rather than serve on
/// without it (`PR_SET_PDEATHSIG`): the daemon's helpers (a twin's relay, a replication).
pub fn end_with_daemon(c: &mut tokio::process::Command) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent's.
    unsafe {
        c.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Starts `bin` with `args` in its own process group, output appended to `log`. `stdin`, if
/// given, is written to the process's stdin, which is then closed (the keys of encrypted
/// disks: never on a command line, in the environment or in a file); otherwise stdin is
/// /dev/null.
pub async fn spawn(
    bin: &Path,
    args: &[OsString],
    log: &Path,
    stdin: Option<&[u8]>,
) -> Result<tokio::process::Child> {
    let out = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(Error::io(format!("cannot open {}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(Error::io("cannot duplicate the log file"))?;
    let mut child = tokio::process::Command::new(bin)
        .args(args)
        .stdin(match stdin {
            Some(_) => Stdio::piped(),
            None => Stdio::null(),
        })
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(Error::io(format!("cannot start {}", bin.display())))?;
    if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A VMM that died before reading fails its start, reported by the caller's wait.
        if let Err(e) = pipe.write_all(bytes).await {
            tracing::warn!("cannot hand the VMM its disk keys: {e}");
        }
        drop(pipe);
    }
    Ok(child)
}

/// Sends one request to the VMM's API socket and returns its `info`.
pub async fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<String> {
    let op = req.op();
    let line = ApiRequest::from(req)
        .to_line()
        .map_err(|e| Error::Internal(format!("{op}: {e}")))?;
    let exchange = async {
        let mut s = UnixStream::connect(socket).await?;
        s.write_all(line.as_bytes()).await?;
        let mut answer = String::new();
        BufReader::new(&mut s).read_line(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| Error::Vmm(format!("{op}: no answer within {timeout:?}")))?
        .map_err(|e| Error::Vmm(format!("{op}: {e}")))?;
    ApiResponse::parse_line(&answer)
        .map_err(|e| Error::Vmm(format!("{op}: bad answer {answer:?}: {e}")))?
        .map_err(|e| Error::Vmm(format!("{op}: {e}")))
}

/// Whether `pid` is alive (not a zombie) and runs `bin`'s file name with `api_socket` in its
/// command line, i.e. is the VMM this daemon (or an earlier one) started for that profile.
pub fn is_our_vmm(pid: i32, bin: &Path, api_socket: &Path) -> bool {
    if pid <= 0 {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the last ')' (the command name may contain one).
    let state = stat.rsplit_once(')').map(|(_, r)| r.trim_start());
    if !matches!(state.and_then(|s| s.chars().next()), Some(c) if c != 'Z' && c != 'X') {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let want_name = bin.file_name().map(|n| n.as_encoded_bytes());
    let argv0_name = args
        .first()
        .map(|a| Path::new(std::ffi::OsStr::from_bytes(a)))
        .and_then(|p| p.file_name())
        .map(|n| n.as_encoded_bytes());
    let sock = api_socket.as_os_str().as_encoded_bytes();
    want_name.is_some() && argv0_name == want_name && args.contains(&sock)
}

/// Every live process that [`is_our_vmm`] for `api_socket`.
pub fn find_vmms(bin: &Path, api_socket: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|&pid| is_our_vmm(pid, bin, api_socket))
        .collect()
}

/// Whether `pid` runs `pocketvisor vmm` (the jailed form).
pub fn is_jailed(pid: i32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    cmdline.split(|&b| b == 0).nth(1) == Some(&b"vmm"[..])
}

/// A pidfd for `pid` (readable once the process has exited).
pub fn pidfd_open(pid: i32) -> Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(Error::io(format!("pidfd_open({pid})"))(
            std::io::Error::last_os_error(),
        ));
    }
    let fd = i32::try_from(fd).map_err(|_| Error::Internal("pidfd out of range".into()))?;
    // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits until the process behind `pidfd` exits.
pub async fn wait_pidfd(pidfd: OwnedFd) -> Result<()> {
    // SAFETY: the AsyncFd owns the OwnedFd, so the descriptor stays open and the same for
    // the AsyncFd's whole lifetime (OwnedFd::as_raw_fd always returns it).
    let afd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
    }
    .map_err(|e| Error::io("cannot watch pidfd")(e.into()))?;
    let _guard = afd
        .readable()
        .await
        .map_err(Error::io("cannot wait on pidfd"))?;
    Ok(())
}

/// Sends `sig` to the process group led by `pid`.
pub fn kill_group(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill(2) with a negative pid signals that process group; no memory involved.
        unsafe { libc::kill(-pid, sig) };
    }
}

/// Whether `pid` exists (zombies count as gone).
pub fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    match stat.rsplit_once(')') {
        Some((_, r)) => !r.trim_start().starts_with(['Z', 'X']),
        None => false,
    }
}

/// The last `max` bytes of a log file, on one line (for error messages).
pub fn log_tail(path: &Path, max: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    let tail = String::from_utf8_lossy(text.get(start..).unwrap_or_default());
    tail.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `pid` and its descendants (from `/proc/<pid>/task/*/children`).
pub fn with_descendants(pid: i32) -> Vec<i32> {
    let mut out = vec![pid];
    let mut i = 0;
    while let Some(&p) = out.get(i) {
        i += 1;
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            out.extend(
                kids.split_whitespace()
                    .filter_map(|k| k.parse::<i32>().ok()),
            );
        }
        if out.len() > 4096 {
            break;
        }
    }
    out
}

/// Resident set size of `pid` and its descendants in KiB.
pub fn rss_kib(pid: i32) -> Option<u64> {
    with_descendants(pid).into_iter().map(rss_one).sum()
}

fn rss_one(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_for_boot_and_restore() {
        let a = vmm_args(
            &Launch::Boot {
                config: "/s/vm.toml".into(),
            },
            Path::new("/s/api.sock"),
            false,
            false,
            None,
        );
        assert_eq!(
            a,
            [
                "run",
                "--config",
                "/s/vm.toml",
                "--api-socket",
                "/s/api.sock"
            ]
        );
        let screen = vmm_args(
            &Launch::Boot {
                config: "/s/vm.toml".into(),
            },
            Path::new("/s/api.sock"),
            true,
            false,
            None,
        );
        let want = "run --config /s/vm.toml --vnc unix:/s/vnc.sock --api-socket /s/api.sock";
        assert_eq!(screen, want.split_whitespace().collect::<Vec<_>>());
        let jail = JailArgs {
            id: "w".into(),
            root: "/s/jail".into(),
            cgroup: Some(JailCgroup {
                dir: "/cg/pv/w".into(),
                cpu_weight: 100,
                memory_max_mib: 256,
            }),
            uid: jail_uid(5).unwrap(),
        };
        let j = vmm_args(
            &Launch::Boot {
                config: "/s/vm.toml".into(),
            },
            Path::new("/s/api.sock"),
            true,
            false,
            Some(&jail),
        );
        let want = "vmm --config /s/vm.toml --jail-id w --jail-root /s/jail --uid 1879048197 \
                    --gid 1879048197 --cgroup /cg/pv/w --cpu-weight 100 --memory-max 256M \
                    --api-socket /s/api.sock";
        assert!(jail_uid(JAIL_MAX_CID + 1).is_err());
        assert_eq!(j, want.split_whitespace().collect::<Vec<_>>());
        let r = vmm_args(
            &Launch::Restore {
                dir: "/s/snap".into(),
                serial: "/s/serial.log".into(),
                vsock: "/s/v.sock".into(),
                disks: vec!["/s/d.img".into()],
            },
            Path::new("/s/api.sock"),
            false,
            false,
            None,
        );
        assert_eq!(r[0], "restore");
        assert!(r.contains(&OsString::from("file:/s/serial.log")));
        let d = r.iter().position(|x| x == "--disk").unwrap();
        assert_eq!(r[d + 1], "/s/d.img");
        let jr = vmm_args(
            &Launch::Restore {
                dir: "/s/snap".into(),
                serial: "/s/serial.log".into(),
                vsock: "/s/v.sock".into(),
                disks: vec!["/s/d.img".into()],
            },
            Path::new("/s/api.sock"),
            true,
            false,
            Some(&jail),
        );
        let want = "vmm --restore /s/snap --jail-id w --jail-root /s/jail --uid 1879048197 \
                    --gid 1879048197 --cgroup /cg/pv/w --cpu-weight 100 --memory-max 256M --serial file:/s/serial.log \
                    --vsock-socket /s/v.sock --disk /s/d.img --api-socket /s/api.sock";
        assert_eq!(jr, want.split_whitespace().collect::<Vec<_>>());
        // A jailed return: the kept copy restored, the twin received through the relay.
        let ret = vmm_args(
            &Launch::Return {
                twin: "w".into(),
                from: "unix:/s/cloud.sock".into(),
                base: "/s/kept".into(),
                tls: vmm_api::MigrationTls {
                    cert: "/c/cert.pem".into(),
                    key: "/c/key.pem".into(),
                    ca: "/c/ca.pem".into(),
                },
                key: "/s/cloud.key".into(),
                serial: "/s/serial.log".into(),
                vsock: "/s/v.sock".into(),
                disks: vec!["/s/return-0.img".into()],
            },
            Path::new("/s/api.sock"),
            false,
            false,
            Some(&jail),
        );
        let want = "vmm --restore /s/kept --return-twin w --return-from unix:/s/cloud.sock \
                    --return-key /s/cloud.key --jail-id w --jail-root /s/jail --uid 1879048197 \
                    --gid 1879048197 --cgroup /cg/pv/w --cpu-weight 100 --memory-max 256M \
                    --serial file:/s/serial.log --vsock-socket /s/v.sock --disk /s/return-0.img \
                    --api-socket /s/api.sock";
        assert_eq!(ret, want.split_whitespace().collect::<Vec<_>>());
        // An encrypted profile's VMM reads its keys from stdin, booted or restored.
        for launch in [
            Launch::Boot {
                config: "/s/vm.toml".into(),
            },
            Launch::Restore {
                dir: "/s/snap".into(),
                serial: "/s/serial.log".into(),
                vsock: "/s/v.sock".into(),
                disks: vec!["/s/d.img".into()],
            },
        ] {
            for jail in [None, Some(&jail)] {
                let a = vmm_args(&launch, Path::new("/s/api.sock"), false, true, jail);
                assert!(a.contains(&OsString::from("--disk-keys-stdin")), "{a:?}");
            }
        }
    }

    #[test]
    fn recognises_processes() {
        let me = std::process::id() as i32;
        assert!(alive(me));
        assert!(rss_kib(me).unwrap() > 0);
        // This test binary is not a VMM with that socket.
        let exe = std::env::current_exe().unwrap();
        assert!(!is_our_vmm(me, &exe, Path::new("/nonexistent/api.sock")));
        assert!(!is_our_vmm(-1, &exe, Path::new("/x")));
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30; true", "sh", "/tmp/pv-test/api.sock"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // Wait for the exec (until then the cmdline is this test's).
        // Up to 10 s: on a loaded 2-core machine the exec can take well over a second.
        for _ in 0..2000 {
            let c = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if c.windows(5).any(|w| w == b"sleep") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(is_our_vmm(
            pid,
            Path::new("/bin/sh"),
            Path::new("/tmp/pv-test/api.sock")
        ));
        assert!(!is_our_vmm(
            pid,
            Path::new("/bin/sh"),
            Path::new("/tmp/other.sock")
        ));
        assert!(!is_our_vmm(
            pid,
            Path::new("/bin/pocketvisor"),
            Path::new("/tmp/pv-test/api.sock")
        ));
        assert!(!is_jailed(pid));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!alive(pid));
    }
}
