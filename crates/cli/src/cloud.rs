//! `pocketvisor cloud serve`: the cloud host (issue 13, docs/cloud.md). One TLS listener for
//! every device; each connection is handed to its own process (`cloud twin`, hidden), which
//! names the device by its client certificate, reads its request (`offload NAME`), creates
//! or reuses that device's twin in the store, receives the live migration into the twin's
//! directory and runs the guest there, its API socket in that directory.

use std::fs::OpenOptions;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use cloud::store::{valid_name, DeviceId, StoreError, TwinState, TwinStore};
use vmm::migration::{Arrival, MigrationTls};
use vmm::{RestoreOverrides, SerialConfig};

/// The data-center side: host the twins of many devices.
#[derive(Args, Debug)]
pub struct CloudArgs {
    #[command(subcommand)]
    cmd: CloudCmd,
}

#[derive(Subcommand, Debug)]
enum CloudCmd {
    /// Host twins: wait for devices' offloads and run each twin in its own process.
    Serve(ServeArgs),
    /// One device's connection (started by `serve` with the connection on stdin).
    #[command(hide = true)]
    Twin(HostArgs),
}

/// What `serve` and each connection's process share.
#[derive(Args, Debug, Clone)]
struct HostArgs {
    /// The state directory: `twins.db` and `twins/<device>/<name>/` (created if missing).
    #[arg(long, value_name = "DIR")]
    state: PathBuf,
    /// This host's certificate chain (PEM, its own certificate first).
    #[arg(long, value_name = "FILE")]
    tls_cert: PathBuf,
    /// This host's private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: PathBuf,
    /// The authority devices' certificates must chain to (PEM).
    #[arg(long, value_name = "FILE")]
    tls_ca: PathBuf,
    /// The migration key devices hold (64 hexadecimal digits).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
}

/// `cloud serve`.
#[derive(Args, Debug)]
#[command(after_help = "\
Listens on --listen for devices migrating a profile here (`pocketvisor migrate --twin NAME`,
later `profile offload`). TLS 1.3 is not optional: a device must show a certificate that
chains to --tls-ca, and is named by it (the SHA-256 of the certificate): it sees only its own
twins, and another device's twin is `no twin named ...` exactly as a missing one. Each
connection runs in its own process; the twin's disks (created sparse, the source's size),
serial log (serial.log), vsock socket and API socket (api.sock) are in
DIR/twins/<device>/<NAME>/. A refused offload (bad name, a twin of that name already
running, a network or display device the host does not give twins) says why to the device,
whose guest runs on there.

EXAMPLE:
  pocketvisor cloud serve --state /var/lib/pv-cloud --listen 0.0.0.0:7000 --key cloud.mkey \\
      --tls-cert cloud.pem --tls-key cloud.key --tls-ca devices-ca.pem
  device$ pocketvisor migrate --api-socket /run/pv.sock --to cloud.example:7000 --twin work \\
      --key cloud.mkey --tls-cert device.pem --tls-key device.key --tls-ca cloud-ca.pem")]
struct ServeArgs {
    /// Where to listen, HOST:PORT (port 0: any free port; the address is printed).
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,
    #[command(flatten)]
    host: HostArgs,
}

/// `pocketvisor cloud ...`.
pub fn main(a: CloudArgs) -> Result<i32> {
    match a.cmd {
        CloudCmd::Serve(s) => serve(s),
        CloudCmd::Twin(h) => twin(&h),
    }
}

impl HostArgs {
    fn absolute(&self) -> Result<HostArgs> {
        let abs = |p: &PathBuf| {
            std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))
        };
        Ok(HostArgs {
            state: abs(&self.state)?,
            tls_cert: abs(&self.tls_cert)?,
            tls_key: abs(&self.tls_key)?,
            tls_ca: abs(&self.tls_ca)?,
            key: abs(&self.key)?,
        })
    }

    fn tls(&self) -> MigrationTls {
        MigrationTls {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.tls_ca.clone(),
        }
    }
}

fn serve(a: ServeArgs) -> Result<i32> {
    let host = a.host.absolute()?;
    // Checked once here, so a bad key or store is this command's error, not every device's.
    vmm::migration::wire::read_key(&host.key).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&host.state)
        .with_context(|| format!("cannot create {}", host.state.display()))?;
    TwinStore::open(&host.state).context("open the twin store")?;
    let listener =
        TcpListener::bind(&a.listen).with_context(|| format!("cannot listen on {}", a.listen))?;
    let addr = listener.local_addr().context("the listening address")?;
    // One write, so a reader (scripts, tests) never sees half of the line.
    let line = format!("pocketvisor: cloud host listening on {addr}\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    let exe = std::env::current_exe().context("this program's path")?;
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                eprintln!("pocketvisor: cloud: accept: {e}");
                continue;
            }
        };
        let peer = conn
            .peer_addr()
            .map_or_else(|_| "?".to_string(), |p| p.to_string());
        match spawn_twin(&exe, &host, conn) {
            Ok(mut child) => {
                // Reaped by a thread of its own, so no twin is left a zombie.
                std::thread::spawn(move || {
                    if let Ok(status) = child.wait() {
                        eprintln!("pocketvisor: cloud: the connection from {peer} ended: {status}");
                    }
                });
            }
            Err(e) => eprintln!("pocketvisor: cloud: cannot serve {peer}: {e:#}"),
        }
    }
    Ok(0)
}

/// Starts `cloud twin` with the connection `conn` as its standard input.
fn spawn_twin(exe: &Path, host: &HostArgs, conn: TcpStream) -> Result<std::process::Child> {
    let mut c = Command::new(exe);
    c.args(["cloud", "twin", "--state"])
        .arg(&host.state)
        .arg("--tls-cert")
        .arg(&host.tls_cert)
        .arg("--tls-key")
        .arg(&host.tls_key)
        .arg("--tls-ca")
        .arg(&host.tls_ca)
        .arg("--key")
        .arg(&host.key)
        .stdin(Stdio::from(OwnedFd::from(conn)))
        .stdout(Stdio::null());
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent's; a twin ends
    // with the host process that started it rather than outliving it unmanaged.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.spawn().context("start the connection's process")
}

/// What a device asks of the host.
#[derive(Debug, PartialEq, Eq)]
enum Ask {
    /// Receive the profile `NAME` and run it as this device's twin.
    Offload(String),
}

/// Parses a request frame; errors say what was wrong in words the device shows.
fn parse_request(request: &str) -> Result<Ask, String> {
    match request.split_once(' ') {
        Some(("offload", name)) if valid_name(name) => Ok(Ask::Offload(name.to_string())),
        Some(("offload", name)) => Err(StoreError::BadName(name.to_string()).to_string()),
        _ => Err(format!(
            "unknown request {request:?}: this host serves `offload NAME`"
        )),
    }
}

/// Refuses what the cloud host does not give a twin: host devices and keys of the device.
fn check_config(config: &vmm::VmConfig) -> Result<(), String> {
    if !config.net.is_empty() {
        return Err("the twin has a network device: this host gives twins no network yet".into());
    }
    if config.gpu.is_some() || config.input {
        return Err("the twin has a display or input device: this host runs twins headless".into());
    }
    if config.disks.iter().any(|d| d.encrypted) {
        return Err("the twin has an encrypted disk, whose key stays on the device".into());
    }
    Ok(())
}

/// Creates (or resizes) disk `i` of a twin in `dir`, sparse: the migration replaces it whole.
fn twin_disk(dir: &Path, i: usize, size: u64) -> std::io::Result<PathBuf> {
    let path = dir.join(format!("disk{i}.img"));
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&path)?;
    f.set_len(size)?;
    Ok(path)
}

fn migration_error(why: impl std::fmt::Display) -> vmm::Error {
    vmm::Error::Migration(why.to_string())
}

/// `cloud twin`: serves the one connection on standard input.
fn twin(h: &HostArgs) -> Result<i32> {
    let key = vmm::migration::wire::read_key(&h.key).map_err(anyhow::Error::msg)?;
    // SAFETY: fd 0 is the connection `serve` handed over; this process owns it from here on
    // and nothing else in it uses standard input.
    let conn = TcpStream::from(unsafe { OwnedFd::from_raw_fd(0) });
    let peer = conn
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |p| p.to_string());
    let store = TwinStore::open(&h.state).context("open the twin store")?;
    // Whether this connection created the twin, so a failure can undo it.
    let created = std::cell::Cell::new(None);
    let received = vmm::migration::receive_requested(
        conn,
        &key,
        &h.tls(),
        |certificate, request| {
            let device = DeviceId::of_certificate(certificate);
            let Ask::Offload(name) = parse_request(request).map_err(migration_error)?;
            Ok((device, name))
        },
        |(device, name), arrival: &Arrival| {
            check_config(arrival.config).map_err(migration_error)?;
            let twin = match store.get(device, name) {
                Ok(t) if t.state == TwinState::Running => {
                    return Err(migration_error(format!(
                        "the twin {name:?} already runs here"
                    )));
                }
                Ok(t) => t,
                Err(StoreError::NotFound(_)) => {
                    let t = store.create(device, name).map_err(migration_error)?;
                    created.set(Some((*device, name.clone())));
                    t
                }
                Err(e) => return Err(migration_error(e)),
            };
            // Unix socket paths are short (108 bytes) and a twin's directory is long: this
            // process serves one twin, so it works in that directory and names its sockets
            // relative to it.
            std::env::set_current_dir(&twin.dir)
                .map_err(|e| migration_error(format!("the twin's directory: {e}")))?;
            let disks = arrival
                .disk_sizes
                .iter()
                .enumerate()
                .map(|(i, &size)| twin_disk(&twin.dir, i, size))
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(|e| migration_error(format!("the twin's disks: {e}")))?;
            Ok(RestoreOverrides {
                serial: Some(SerialConfig::File(twin.dir.join("serial.log"))),
                disks,
                vsock_socket: arrival
                    .config
                    .vsock
                    .as_ref()
                    .map(|_| PathBuf::from("vsock.sock")),
                taps: Vec::new(),
                disk_keys: Vec::new(),
            })
        },
    );
    let (vm, (device, name)) = match received {
        Ok(r) => r,
        Err(e) => {
            if let Some((device, name)) = created.take() {
                let _ = store.remove(&device, &name);
            }
            return Err(anyhow::Error::new(e)
                .context(format!("the offload from {peer} failed; nothing runs here")));
        }
    };
    store
        .set_state(&device, &name, TwinState::Running)
        .context("record the twin as running")?;
    eprintln!(
        "pocketvisor: cloud: the twin {name:?} of device {} runs here (from {peer})",
        device.hex()
    );
    let status = crate::run::run_vm(vm, Some(Path::new("api.sock")));
    // Whatever ended it, the twin no longer runs here; its directory keeps its last disks.
    let _ = store.set_state(&device, &name, TwinState::Returned);
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_parsed_strictly() {
        assert_eq!(
            parse_request("offload work"),
            Ok(Ask::Offload("work".into()))
        );
        for bad in [
            "offload",
            "offload ",
            "offload ../x",
            "offload Work",
            "offload a b",
        ] {
            assert!(parse_request(bad).is_err(), "{bad}");
        }
        assert!(parse_request("return work")
            .unwrap_err()
            .contains("unknown request"));
        assert!(parse_request("").is_err());
    }
}
