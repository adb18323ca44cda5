//! `pocketvisor cloud serve`: the cloud host (issue 13, docs/cloud.md). One TLS listener for
//! every device; each connection is handed to its own process (`cloud twin`, hidden), which
//! names the device by its client certificate and reads its request. `offload NAME`: it
//! creates or reuses that device's twin in the store and carries the live migration on to the
//! twin's jailed VMM (`crate::twin_vmm`), which receives it and runs the guest in the twin's
//! directory, its API socket there. `return NAME`: it asks the twin's VMM (through that API
//! socket) to migrate to a unix socket of its own in the twin's directory and carries that
//! migration on to the device over the device's connection (`vmm::migration::proxy`). `view NAME`: it relays the twin's screen (its VMM's VNC server on `vnc.sock` in
//! the twin's directory) to the device.
//!
//! `replicate NAME CHAIN SEQ` and `recover NAME` (a replica's sealed checkpoints) are served
//! by `crate::replica`.
//!
//! `pocketvisor cloud return` is the device's side of a return, `pocketvisor cloud view` of a
//! view.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use cloud::replica::ReplicaStore;
use cloud::store::{valid_name, DeviceId, StoreError, TwinState, TwinStore};
use vmm::migration::tls::Transport;
use vmm::migration::wire::{Channel, Role, KEY_LEN};
use vmm::migration::{Arrival, MigrationTls, Requested};
use vmm::{Request, RestoreOverrides, SerialConfig};

use crate::twin_vmm::{TwinSpec, TwinVmm, TWIN_DIR_IN_JAIL};

/// The data-center side: host the twins of many devices.
#[derive(Args, Debug)]
pub struct CloudArgs {
    #[command(subcommand)]
    cmd: CloudCmd,
}

#[derive(Subcommand, Debug)]
enum CloudCmd {
    /// Host twins: wait for devices' offloads and returns; each twin runs in its own process.
    Serve(ServeArgs),
    /// One device's connection (started by `serve` with the connection on stdin).
    #[command(hide = true)]
    Twin(HostArgs),
    /// On the device: bring a twin back from the cloud host and run it here.
    Return(ReturnArgs),
    /// On the device: show a twin's screen to VNC viewers here, relayed from the cloud host.
    View(ViewArgs),
    /// On the device: a unix socket here that reaches a twin's vsock device (as a VMM's own
    /// vsock socket does), relayed from the cloud host.
    Vsock(VsockArgs),
    /// On the device: keep a replica of a running VM at the cloud host, one encrypted
    /// checkpoint every period.
    Replicate(crate::replica::ReplicateArgs),
    /// On a device: fetch a replica's last checkpoint and write it as a snapshot and disks.
    Recover(crate::replica::RecoverArgs),
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
    /// Keep the twin registry in PostgreSQL, for a fleet of hosts over one database: FILE
    /// holds its URL (`postgresql://USER@HOST/DB`, or `postgresql://USER@/DB?host=/run/postgresql`
    /// for a unix socket; not encrypted), which keeps a password out of the process list.
    /// Default: SQLite in DIR/twins.db. The twins' directories stay in DIR.
    #[arg(long, value_name = "FILE")]
    store_file: Option<PathBuf>,
    /// Keep replicas' checkpoints in an object store, under `<device>/<NAME>/` (through the
    /// object_store crate): `file:///ABS/DIR` is its local-file backend under DIR, which
    /// exists (a volume a fleet of hosts shares; S3 needs a build with object_store's `aws`
    /// feature: docs/deploy.md). Default: files in each replica twin's directory.
    #[arg(long, value_name = "URL")]
    replica_store: Option<String>,
    /// Where the twins' jails are made (`DIR/twin-<pid>/root`, an empty tree of mount points
    /// while a twin runs) [default: DIR/jail of --state].
    #[arg(long, value_name = "DIR")]
    jail_root: Option<PathBuf>,
    /// The unprivileged user id, and group id, the twins' VMMs run as once built (no user of
    /// this host should have it).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_TWIN_UID,
          value_parser = clap::value_parser!(u32).range(1..i64::from(u32::MAX)))]
    twin_uid: u32,
    /// Give twins with network devices a network: each device's TAP (named by this host,
    /// `pvt` and 12 hex digits) is attached to BRIDGE, an existing bridge of this host, and
    /// goes when the twin ends. Without it a twin with a network device is refused.
    #[arg(long, value_name = "BRIDGE")]
    twin_bridge: Option<String>,
}

/// The user (and group) id of the twins' VMMs unless --twin-uid says otherwise: above the
/// ids a distribution gives users, below the handset's jailed VMMs' (`0x7000_0000` + CID).
const DEFAULT_TWIN_UID: u32 = 0x6000_0000;

/// `cloud serve`.
#[derive(Args, Debug)]
#[command(after_help = "\
Listens on --listen for devices migrating a profile here (`pocketvisor migrate --twin NAME`)
and asking for one back (`pocketvisor cloud return NAME`). TLS 1.3 is not optional: a device
must show a certificate that chains to --tls-ca, and is named by it (the SHA-256 of the
certificate): it sees only its own twins, and another device's twin is `no twin named ...`
exactly as a missing one. Each connection runs in its own process, in a process group of its
own: a twin outlives this command (killed, restarted), and started again on the same --state it
serves the twins that still run (each one's pid is in its twin.lock); the twin's disks (created
sparse, the source's size), serial log (serial.log), vsock socket and API socket (api.sock)
are in DIR/twins/<device>/<NAME>/. A refused offload (bad name, a twin of that name already
running, a network device without --twin-bridge, an encrypted disk) says why to the device,
whose guest runs on there. Each twin's VM runs jailed (`pocketvisor vmm --receive-from`:
namespaces, a root holding /dev/kvm and the twin's directory only, seccomp, the user and group
--twin-uid; its jail under --jail-root): the connection's process, which keeps this host's
keys and store, checks each frame of the device's and sends it on to that VMM under a fresh
key of its own, and the VMM checks everything a receive does. Run it as root.
With --twin-bridge BRIDGE (a bridge this host's operator made; `serve` refuses to start
without it), each network device of a twin is on a TAP this host names (`pvt` and 12 hex
digits of a hash of the device, the twin and the device's index), which the twin's VMM opens
in this host's network namespace before it enters its jail's, attached to BRIDGE and brought
up before the guest runs, and gone when the twin's VMM ends; the device's network policy (in
the migrated configuration) stays in force. A return asks the twin's VMM to migrate to a unix
socket (relay.sock, mode 0600) of the connection's process in the twin's directory, which
carries it to the device the same way; the twin runs on here until the guest runs at the
device, and is then recorded as returned. One return of a twin at a time.
A twin with a display serves its screen (its VMM's VNC server on vnc.sock in its directory),
which a device's `cloud view NAME` gets relayed, keys and pointer included.
`clone NAME` (`migrate --twin NAME --clone`) receives a live copy whose original runs on at the
device: the twin (kind clone) gets a fresh vsock CID and a fresh MAC for each network device
(random, locally administered), and does not return.
A device's `cloud replicate NAME` stores sealed checkpoints (which this host cannot read) in
its replica twin NAME, each atomically (`<chain>-<seq>.pvr`, `current`), in the twin's
directory or, with --replica-store, as objects `<device>/<NAME>/...`; `cloud recover NAME`
fetches them.

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
        CloudCmd::Return(r) => give_back_here(r),
        CloudCmd::View(v) => serve_twin_socket(v.host, v.name, TwinSocket::Screen, &v.listen),
        CloudCmd::Vsock(v) => serve_twin_socket(
            v.host,
            v.name,
            TwinSocket::Vsock,
            &crate::vnc::VncAddr::Unix(v.listen),
        ),
        CloudCmd::Replicate(r) => crate::replica::replicate(r),
        CloudCmd::Recover(r) => crate::replica::recover(r),
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
            store_file: self.store_file.as_ref().map(abs).transpose()?,
            replica_store: self.replica_store.clone(),
            jail_root: Some(match &self.jail_root {
                Some(dir) => abs(dir)?,
                None => abs(&self.state)?.join("jail"),
            }),
            twin_uid: self.twin_uid,
            twin_bridge: self.twin_bridge.clone(),
        })
    }

    /// Where the twins' jails are made.
    fn jail_root(&self) -> PathBuf {
        self.jail_root
            .clone()
            .unwrap_or_else(|| self.state.join("jail"))
    }

    /// Where replicas' checkpoints are kept: --replica-store's object store, else files in
    /// the twins' directories.
    fn replicas(&self) -> Result<ReplicaStore> {
        match &self.replica_store {
            Some(url) => ReplicaStore::from_url(url).context("--replica-store"),
            None => Ok(ReplicaStore::TwinDirs),
        }
    }

    /// The twin store: PostgreSQL when --store-file names one, else SQLite in the state dir.
    fn store(&self) -> Result<TwinStore> {
        let Some(file) = &self.store_file else {
            return TwinStore::open(&self.state).context("open the twin store");
        };
        let url = std::fs::read_to_string(file)
            .with_context(|| format!("--store-file {}", file.display()))?;
        let url = url.trim();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            anyhow::bail!(
                "--store-file {} holds no postgresql:// URL (SQLite, the default, needs none)",
                file.display()
            );
        }
        TwinStore::connect(url, &self.state).context("connect to the PostgreSQL twin store")
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
    host.store()?;
    host.replicas()?;
    if let Some(bridge) = &host.twin_bridge {
        crate::twin_net::check_bridge(bridge).map_err(anyhow::Error::msg)?;
    }
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
        .args(
            host.store_file
                .iter()
                .flat_map(|f| [OsStr::new("--store-file"), f.as_os_str()]),
        )
        .args(
            host.replica_store
                .iter()
                .flat_map(|u| ["--replica-store", u.as_str()]),
        )
        .arg("--jail-root")
        .arg(host.jail_root())
        .arg("--twin-uid")
        .arg(host.twin_uid.to_string())
        .args(
            host.twin_bridge
                .iter()
                .flat_map(|b| ["--twin-bridge", b.as_str()]),
        )
        .stdin(Stdio::from(OwnedFd::from(conn)))
        .stdout(Stdio::null());
    // A process group of its own: a twin outlives the host process (killed, restarted,
    // upgraded) and the signals sent to its group (a terminal's Ctrl-C); a host started
    // again finds it by its lock. It ends when it is returned or killed (its pid is in its
    // `twin.lock`).
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    c.spawn().context("start the connection's process")
}

/// What a device asks of the host.
#[derive(Debug, PartialEq, Eq)]
enum Ask {
    /// Receive the profile `NAME` and run it as this device's twin.
    Offload(String),
    /// Receive a live copy of the profile `NAME` (which runs on at the device) and run it
    /// with a fresh identity as this device's twin.
    Clone(String),
    /// Send the twin `NAME` back to the device (which starts from the copy it kept).
    Return(String),
    /// Relay the screen (`view`) or the vsock socket (`vsock`) of the twin `NAME` to the
    /// device.
    Relay(TwinSocket, String),
    /// Store checkpoint SEQ of chain CHAIN of the replica `NAME`.
    Replicate(String, (String, u64)),
    /// Send the device the stored chain of the replica `NAME`.
    Recover(String),
}

/// Parses a request frame; errors say what was wrong in words the device shows.
fn parse_request(request: &str) -> Result<Ask, String> {
    let (verb, name) = request.split_once(' ').unwrap_or((request, ""));
    if verb == "replicate" {
        let (name, rest) = name.split_once(' ').unwrap_or((name, ""));
        if !valid_name(name) {
            return Err(StoreError::BadName(name.to_string()).to_string());
        }
        return Ok(Ask::Replicate(
            name.to_string(),
            crate::replica::parse_replicate(rest)?,
        ));
    }
    let ask = match verb {
        "offload" => Ask::Offload,
        "clone" => Ask::Clone,
        "return" => Ask::Return,
        "view" => |name| Ask::Relay(TwinSocket::Screen, name),
        "vsock" => |name| Ask::Relay(TwinSocket::Vsock, name),
        "recover" => Ask::Recover,
        _ => {
            return Err(format!(
                "unknown request {request:?}: this host serves `offload NAME`, `clone NAME`, \
                 `return NAME`, `view NAME`, `vsock NAME`, `replicate NAME CHAIN SEQ` and \
                 `recover NAME`"
            ))
        }
    };
    if !valid_name(name) {
        return Err(StoreError::BadName(name.to_string()).to_string());
    }
    Ok(ask(name.to_string()))
}

/// Why a twin with a network device is refused by a host without --twin-bridge.
const NO_TWIN_NETWORK: &str = "the twin has a network device, and this host gives twins no \
                               network (its `cloud serve` has no --twin-bridge)";

/// Refuses what the cloud host does not give a twin: a network without `bridge` (the host's
/// --twin-bridge), keys of the device.
fn check_config(config: &vmm::VmConfig, bridge: Option<&str>) -> Result<(), String> {
    if !config.net.is_empty() {
        let Some(bridge) = bridge else {
            return Err(NO_TWIN_NETWORK.into());
        };
        crate::twin_net::check_bridge(bridge)?;
    }
    if config.disks.iter().any(|d| d.encrypted) {
        return Err("the twin has an encrypted disk, whose key stays on the device".into());
    }
    Ok(())
}

/// Creates (or resizes) disk `i` of a twin in the working directory (the twin's), sparse,
/// owned by the twin user `uid`: the migration replaces it whole, keeping that owner. A
/// link or anything but a regular file there is refused, never followed or waited on.
fn twin_disk(i: usize, size: u64, uid: u32) -> std::io::Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .mode(0o600)
        .open(format!("disk{i}.img"))?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other(format!(
            "disk{i}.img is not a regular file"
        )));
    }
    std::os::unix::fs::fchown(&f, Some(uid), Some(uid))?;
    f.set_len(size)
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
    let store = h.store()?;
    let requested = vmm::migration::accept_request(conn, &key, &h.tls())
        .with_context(|| format!("the connection from {peer} was refused"))?;
    let device = DeviceId::of_certificate(requested.certificate());
    match parse_request(requested.request()) {
        Ok(Ask::Offload(name)) => offload(h, &store, requested, device, &name, &peer, false),
        Ok(Ask::Clone(name)) => offload(h, &store, requested, device, &name, &peer, true),
        Ok(Ask::Return(name)) => give_back(h, &key, &store, requested, device, &name, &peer),
        Ok(Ask::Relay(socket, name)) => {
            relay_twin_socket(&store, requested, device, &name, &peer, socket)
        }
        Ok(Ask::Replicate(name, at)) => match h.replicas() {
            Ok(replicas) => crate::replica::store_checkpoint(
                &store, &replicas, requested, device, &name, at, &peer,
            ),
            Err(e) => refuse(
                requested,
                &format!("the request from {peer}"),
                format!("{e:#}"),
            ),
        },
        Ok(Ask::Recover(name)) => match h.replicas() {
            Ok(replicas) => {
                crate::replica::send_chain(&store, &replicas, requested, device, &name, &peer)
            }
            Err(e) => refuse(
                requested,
                &format!("the request from {peer}"),
                format!("{e:#}"),
            ),
        },
        Err(why) => refuse(requested, &format!("the request from {peer}"), why),
    }
}

/// Tells the device why `what` (its request, in words: `the return of "work" to PEER`) is
/// refused, and says the same as this process's error.
fn refuse(requested: Requested, what: &str, why: String) -> Result<i32> {
    requested.refuse(&migration_error(&why));
    Err(anyhow::anyhow!("{what} was refused: {why}"))
}

/// An offload (or with `clone` a clone): receives the device's VM into its twin `name` and
/// runs it here, in a jailed VMM of its own ([`crate::twin_vmm`]): this process checks what
/// the device announces, prepares the twin (store, lock, directory, disks, TAPs) and carries
/// the migration on to that VMM ([`Requested::forward`]), which checks everything a receive
/// does. Each network device is on a TAP of the host's naming on the host's --twin-bridge.
/// A clone gets a fresh vsock CID, which its restored vsock device tells the guest with a
/// transport reset, and a fresh MAC for each network device, which its config space holds
/// (a driver reads it at its probe: the probe guest watches it).
fn offload(
    h: &HostArgs,
    store: &TwinStore,
    requested: Requested,
    device: DeviceId,
    name: &str,
    peer: &str,
    clone: bool,
) -> Result<i32> {
    let kind = if clone {
        cloud::store::TwinKind::Clone
    } else {
        cloud::store::TwinKind::Offload
    };
    // The clone's vsock CID, once chosen: (the original's, the clone's).
    let mut cids = None;
    // Whether this connection created the twin, so a failure can undo it.
    let mut created = false;
    // The twin's lock, held while this process serves it.
    let mut held = None;
    // The twin's VMM, once started: ended (and so the guest) if anything fails.
    let mut vmm: Option<TwinVmm> = None;
    // The twin's TAPs, named by this host, once chosen.
    let mut taps = Vec::new();
    // The clone's MAC addresses, once chosen: (the original's, the clone's).
    let mut macs = Vec::new();
    let forwarded = requested.forward(|arrival: &Arrival| {
        check_config(arrival.config, h.twin_bridge.as_deref()).map_err(migration_error)?;
        let twin = match store.get(&device, name) {
            Ok(t) => t,
            Err(StoreError::NotFound(_)) => {
                let t = store
                    .create_kind(&device, name, kind)
                    .map_err(migration_error)?;
                created = true;
                t
            }
            Err(e) => return Err(migration_error(e)),
        };
        // Whether a process runs it is its lock, not its row: a twin whose process was
        // killed is taken over.
        match hold(&twin.dir) {
            Ok(Some(lock)) => {
                // For whoever has to stop it: the twins outlive the host process.
                let _ = write_pid(&lock);
                held = Some(lock)
            }
            Ok(None) => {
                return Err(migration_error(format!(
                    "the twin {name:?} already runs here"
                )))
            }
            Err(e) => return Err(migration_error(format!("the twin's lock: {e}"))),
        }
        if twin.kind == cloud::store::TwinKind::Replica {
            return Err(migration_error(format!(
                "the twin {name:?} is a replica; offload under another name"
            )));
        }
        if twin.kind != kind {
            store
                .set_kind(&device, name, kind)
                .map_err(migration_error)?;
        }
        let vsock_cid = match (&arrival.config.vsock, clone) {
            (Some(v), true) => {
                let fresh = fresh_cid(v.cid).map_err(migration_error)?;
                cids = Some((v.cid, fresh));
                Some(fresh)
            }
            _ => None,
        };
        taps = (0..arrival.config.net.len())
            .map(|i| crate::twin_net::tap_name(&device, name, i))
            .collect();
        for tap in &taps {
            crate::twin_net::check_free(tap).map_err(migration_error)?;
        }
        if clone {
            macs = arrival
                .config
                .net
                .iter()
                .map(|n| {
                    let was = n
                        .mac
                        .as_deref()
                        .and_then(|m| vmm::config::parse_mac(m).ok());
                    fresh_mac(was).map(|now| (was, now))
                })
                .collect::<Result<_, _>>()
                .map_err(migration_error)?;
        }
        if twin.state == TwinState::Running && !created {
            eprintln!(
                "pocketvisor: cloud: the twin {name:?} of device {} was left running by a \
                 process that is gone; this offload replaces it",
                device.hex()
            );
        }
        // Unix socket paths are short (108 bytes) and a twin's directory is long: this
        // process serves one twin, so it works in that directory and names its sockets
        // relative to it.
        std::env::set_current_dir(&twin.dir)
            .map_err(|e| migration_error(format!("the twin's directory: {e}")))?;
        for (i, &size) in arrival.disk_sizes.iter().enumerate() {
            twin_disk(i, size, h.twin_uid)
                .map_err(|e| migration_error(format!("the twin's disks: {e}")))?;
        }
        crate::twin_vmm::give_dir(&twin.dir, h.twin_uid)
            .map_err(|e| migration_error(format!("the twin's directory: {e}")))?;
        // The VMM's way in: a socket and a fresh key of this connection's, for root only
        // (the VMM connects before it drops its privileges), gone once it is connected.
        let listener = crate::twin_vmm::listen_private(RECEIVE_SOCKET, None)
            .map_err(|e| migration_error(format!("the twin's socket: {e}")))?;
        let _socket = RemovedOnDrop(RECEIVE_SOCKET);
        let key = crate::twin_vmm::fresh_key().map_err(migration_error)?;
        crate::twin_vmm::write_key(RECEIVE_KEY, &key, None).map_err(migration_error)?;
        let _key = RemovedOnDrop(RECEIVE_KEY);
        let clone_macs: Vec<[u8; 6]> = macs.iter().map(|&(_, now)| now).collect();
        let spec = TwinSpec {
            receive: (RECEIVE_SOCKET, RECEIVE_KEY),
            disks: arrival.disk_sizes.len(),
            vsock_socket: arrival.config.vsock.as_ref().map(|_| TWIN_VSOCK_SOCKET),
            vsock_cid,
            api_socket: TWIN_API_SOCKET,
            taps: &taps,
            macs: &clone_macs,
            jail_root: h.jail_root(),
            uid: h.twin_uid,
        };
        let started = vmm.insert(TwinVmm::start(&spec).map_err(migration_error)?);
        let channel = started.connect(&listener, &key).map_err(migration_error)?;
        // The VMM opened its TAPs in this host's namespace before its jail's (`vmm --tap`),
        // so before it connected: they join the bridge now, before the guest arrives. One
        // that cannot join refuses the offload (the device's guest runs on there).
        if let Some(bridge) = &h.twin_bridge {
            for tap in &taps {
                crate::twin_net::attach(tap, bridge).map_err(|e| {
                    migration_error(format!(
                        "the twin's TAP {tap} could not join the bridge {bridge}: {e}"
                    ))
                })?;
            }
        }
        Ok(channel)
    });
    if let Err(e) = forwarded {
        // Told to give up by the proxy, it ends by itself; killed if it does not.
        drop(vmm);
        if created {
            let _ = store.remove(&device, name);
        }
        return Err(anyhow::Error::new(e)
            .context(format!("the offload from {peer} failed; nothing runs here")));
    }
    let Some(mut vmm) = vmm else {
        anyhow::bail!("the offload from {peer} ended without a VMM");
    };
    store
        .set_state(&device, name, TwinState::Running)
        .context("record the twin as running")?;
    if let Some(bridge) = &h.twin_bridge {
        for tap in &taps {
            eprintln!(
                "pocketvisor: cloud: the twin {name:?}'s TAP {tap} is on the bridge {bridge}"
            );
        }
    }
    for (i, (was, now)) in macs.iter().enumerate() {
        eprintln!(
            "pocketvisor: cloud: the clone {name:?}'s network device {i} has the MAC {} (the \
             original's is {})",
            vmm::config::format_mac(now),
            was.as_ref()
                .map_or_else(|| "unknown".into(), vmm::config::format_mac)
        );
    }
    match cids {
        Some((was, now)) => eprintln!(
            "pocketvisor: cloud: the clone {name:?} of device {} runs here (from {peer}) with \
             vsock CID {now} (the original's is {was}); its jailed VMM is pid {}",
            device.hex(),
            vmm.pid()
        ),
        None => eprintln!(
            "pocketvisor: cloud: the {} {name:?} of device {} runs here (from {peer}); its \
             jailed VMM is pid {}",
            if clone { "clone" } else { "twin" },
            device.hex(),
            vmm.pid()
        ),
    }
    let status = vmm.wait().context("wait for the twin's VMM")?;
    if status > 128 {
        // Killed (or its jail's filter killed it): the twin did not return. Its row stays as
        // it is, so the device is told it stopped without returning, as when this process
        // dies; its directory keeps its last disks.
        eprintln!(
            "pocketvisor: cloud: the VMM of the twin {name:?} of device {} died (status \
             {status}); the twin stopped without returning",
            device.hex()
        );
    } else {
        // The guest ended or went home: the twin no longer runs here.
        let _ = store.set_state(&device, name, TwinState::Returned);
    }
    drop(held);
    Ok(status)
}

/// The twin VMM's API socket, named relative to its directory.
const TWIN_API_SOCKET: &str = "api.sock";

/// The socket an offload's VMM receives from (this process's proxy), in the twin's directory.
const RECEIVE_SOCKET: &str = "receive.sock";

/// The key file of that connection.
const RECEIVE_KEY: &str = "receive.key";

/// The key file of a return's connection from the twin's VMM (which reads it unprivileged).
const RETURN_KEY: &str = "return.key";

/// The largest vsock CID a clone is given (the handset's jailed VMMs map CIDs to uids below
/// 2^31: a clone that returns home as a profile one day keeps fitting).
const MAX_CLONE_CID: u64 = 0x0fff_ffff;

/// A random vsock CID for a clone, in 3..=[`MAX_CLONE_CID`] and not `original`.
fn fresh_cid(original: u64) -> Result<u64, String> {
    loop {
        let mut b = [0u8; 8];
        // SAFETY: getrandom writes at most `b.len()` bytes into `b`, which lives across the call.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if usize::try_from(n).ok() != Some(b.len()) {
            return Err(format!(
                "no random CID for the clone: {}",
                std::io::Error::last_os_error()
            ));
        }
        let cid = 3 + u64::from_le_bytes(b) % (MAX_CLONE_CID - 2);
        if cid != original {
            return Ok(cid);
        }
    }
}

/// A random locally administered unicast MAC for a clone, not `original`.
fn fresh_mac(original: Option<[u8; 6]>) -> Result<[u8; 6], String> {
    loop {
        let mac = devices::virtio::net::random_mac()
            .map_err(|e| format!("no random MAC for the clone: {e}"))?;
        if Some(mac) != original {
            return Ok(mac);
        }
    }
}

/// The lock file of a twin's directory: held (`flock`) by the process that serves the twin,
/// for as long as it lives; the kernel lets go of it when that process ends, however it ends.
const TWIN_LOCK: &str = "twin.lock";

/// The lock a return holds while it relays a twin, so that two do not race for it.
const RETURN_LOCK: &str = "return.lock";

/// Takes the lock of the twin in `dir`: None if a live process holds it.
fn hold(dir: &Path) -> std::io::Result<Option<std::fs::File>> {
    lock_file(&dir.join(TWIN_LOCK))
}

/// Writes this process's id into the lock file it holds.
fn write_pid(lock: &std::fs::File) -> std::io::Result<()> {
    lock.set_len(0)?;
    std::os::unix::fs::FileExt::write_all_at(
        lock,
        format!("{}\n", std::process::id()).as_bytes(),
        0,
    )
}

/// Takes the `flock` of the file at `path` (created if missing): None if a live process
/// holds it. A twin's directory is its VMM's (the twin user's): a link or anything but a
/// regular file put there is refused, never followed or waited on.
pub(crate) fn lock_file(path: &Path) -> std::io::Result<Option<std::fs::File>> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .mode(0o600)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } == 0
    {
        return Ok(Some(f));
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::WouldBlock {
        Ok(None)
    } else {
        Err(e)
    }
}

/// The relay's socket in the twin's directory (named relative to it, as `api.sock`).
const RELAY_SOCKET: &str = "relay.sock";

/// A file removed when this is dropped.
struct RemovedOnDrop(&'static str);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// This device's twin `name` if it runs here, its process alive; this process then works in
/// the twin's directory (its sockets are named relative to it, see `offload`). The error is
/// the device's refusal, in words.
fn live_twin(
    store: &TwinStore,
    device: &DeviceId,
    name: &str,
) -> Result<cloud::store::Twin, String> {
    let twin = match store.get(device, name) {
        Ok(t) if t.state == TwinState::Running => t,
        Ok(_) => {
            return Err(format!(
                "the twin {name:?} does not run here (it was returned)"
            ))
        }
        // Another device's twin is not found either.
        Err(e) => return Err(e.to_string()),
    };
    // A live twin's process holds its lock: one that does not is gone (killed), and its VMM
    // with it.
    match hold(&twin.dir) {
        Ok(None) => {}
        Ok(Some(_)) => {
            return Err(format!(
                "the twin {name:?} stopped without returning (its process is gone); offload it \
                 again"
            ))
        }
        Err(e) => return Err(format!("the twin's lock: {e}")),
    }
    std::env::set_current_dir(&twin.dir).map_err(|e| format!("the twin's directory: {e}"))?;
    Ok(twin)
}

/// A socket of a twin's VMM that the cloud host relays to its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TwinSocket {
    /// Its screen: the VNC server on `vnc.sock` (`view NAME`, `cloud view`).
    Screen,
    /// Its vsock device's socket, `vsock.sock` (`vsock NAME`, `cloud vsock`): the device says
    /// `CONNECT PORT` through it as to a local VMM, and reaches that port of the twin's guest
    /// (its agent's, for the file channel).
    Vsock,
}

impl TwinSocket {
    /// The request's verb.
    fn verb(self) -> &'static str {
        match self {
            TwinSocket::Screen => "view",
            TwinSocket::Vsock => "vsock",
        }
    }

    /// The socket's name in the twin's directory.
    fn file(self) -> &'static str {
        match self {
            TwinSocket::Screen => vmm::vmm_api::jail::VNC_SOCKET_NAME,
            TwinSocket::Vsock => TWIN_VSOCK_SOCKET,
        }
    }

    /// What the twin lacks when the socket is not there.
    fn missing(self) -> &'static str {
        match self {
            TwinSocket::Screen => "has no screen (its VM has no display)",
            TwinSocket::Vsock => "has no vsock device",
        }
    }
}

/// The twin VMM's vsock socket, named relative to its directory.
const TWIN_VSOCK_SOCKET: &str = "vsock.sock";

/// A view or a vsock connection: relays that socket of the twin's VMM to the device until
/// either end closes.
fn relay_twin_socket(
    store: &TwinStore,
    requested: Requested,
    device: DeviceId,
    name: &str,
    peer: &str,
    socket: TwinSocket,
) -> Result<i32> {
    let what = format!("the {} of {name:?} by {peer}", socket.verb());
    let refuse = |requested, why| refuse(requested, &what, why);
    if let Err(why) = live_twin(store, &device, name) {
        return refuse(requested, why);
    }
    let local = match std::os::unix::net::UnixStream::connect(socket.file()) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return refuse(requested, format!("the twin {name:?} {}", socket.missing()))
        }
        Err(e) => return refuse(requested, format!("the twin's {}: {e}", socket.file())),
    };
    let relayed = requested
        .accept()
        .and_then(|conn| vmm::migration::relay(conn, local))
        .with_context(|| what.clone())?;
    let line = format!(
        "pocketvisor: cloud: {what} (device {}) ended: {} bytes to the device, {} from it\n",
        device.hex(),
        relayed.to_tls,
        relayed.to_local
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    Ok(0)
}

/// How long a return waits for the twin's VMM to connect to the relay.
const TWIN_CONNECT_WAIT: Duration = Duration::from_secs(30);

/// A return: the twin's jailed VMM migrates to a unix socket of this process under a fresh
/// key, and this process carries the migration on to the device under the device's `key`
/// ([`vmm::migration::proxy`]); the twin's process ends once the guest runs at the device.
fn give_back(
    h: &HostArgs,
    key: &[u8; KEY_LEN],
    store: &TwinStore,
    requested: Requested,
    device: DeviceId,
    name: &str,
    peer: &str,
) -> Result<i32> {
    let what = format!("the return of {name:?} to {peer}");
    let refuse = |requested, why| refuse(requested, &what, why);
    let twin = match live_twin(store, &device, name) {
        Ok(t) => t,
        Err(why) => return refuse(requested, why),
    };
    if twin.kind == cloud::store::TwinKind::Clone {
        return refuse(
            requested,
            format!(
                "the twin {name:?} is a clone: its original runs on the device, and a clone \
                 does not return over it"
            ),
        );
    }
    let _returning = match lock_file(&twin.dir.join(RETURN_LOCK)) {
        Ok(Some(lock)) => lock,
        Ok(None) => {
            return refuse(
                requested,
                format!("a return of the twin {name:?} is under way"),
            )
        }
        Err(e) => return refuse(requested, format!("the twin's lock: {e}")),
    };
    // A unix socket in the twin's directory, for the twin's VMM only (it runs as the twin
    // user), and a fresh key of this return's for it: the host's own key stays here.
    let listener = match crate::twin_vmm::listen_private(RELAY_SOCKET, Some(h.twin_uid)) {
        Ok(l) => l,
        Err(e) => return refuse(requested, format!("the relay's socket: {e}")),
    };
    // Gone when this function returns, however it returns.
    let _socket = RemovedOnDrop(RELAY_SOCKET);
    let local_key = match crate::twin_vmm::fresh_key()
        .and_then(|k| crate::twin_vmm::write_key(RETURN_KEY, &k, Some(h.twin_uid)).map(|()| k))
    {
        Ok(k) => k,
        Err(e) => return refuse(requested, e),
    };
    let _key = RemovedOnDrop(RETURN_KEY);
    // The VMM names them as its jail shows the twin's directory.
    let to = format!(
        "{}{TWIN_DIR_IN_JAIL}/{RELAY_SOCKET}",
        vmm::migration::LOCAL_PREFIX
    );
    let ask = Request::Migrate {
        to,
        key_file: Path::new(TWIN_DIR_IN_JAIL).join(RETURN_KEY),
        downtime_ms: vmm::vmm_api::DEFAULT_DOWNTIME_MS,
        tls: None,
        twin: None,
        keep: None,
        clone: false,
    };
    let migration = std::thread::spawn(move || crate::api::call(Path::new(TWIN_API_SOCKET), &ask));
    let deadline = Instant::now() + TWIN_CONNECT_WAIT;
    let local = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return refuse(requested, format!("the relay's socket: {e}")),
        }
        if migration.is_finished() {
            let why = match migration.join() {
                Ok(Err(e)) => format!("the twin's VMM: {e:#}"),
                _ => "the twin's VMM answered without migrating".to_string(),
            };
            return refuse(requested, why);
        }
        if Instant::now() > deadline {
            // Its VMM may still connect: nothing listens then, and its guest runs on.
            return refuse(
                requested,
                "the twin's VMM did not start its migration".into(),
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(listener);
    let io = Some(vmm::migration::IO_TIMEOUT);
    let from_twin = local
        .set_nonblocking(false)
        .and_then(|()| local.set_read_timeout(io))
        .and_then(|()| local.set_write_timeout(io))
        .map_err(|e| e.to_string())
        .and_then(|()| {
            Channel::handshake(Transport::Local(local), &local_key, Role::Destination)
                .map_err(|e| e.to_string())
        });
    let mut from_twin = match from_twin {
        Ok(ch) => ch,
        // Its VMM's migration fails with the connection: its guest runs on.
        Err(e) => return refuse(requested, format!("the twin's connection: {e}")),
    };
    let relayed = requested.accept().and_then(|device_conn| {
        let mut to_device = Channel::handshake(device_conn, key, Role::Source)?;
        vmm::migration::proxy(&mut from_twin, &mut to_device, None, Some("relay-rounds"))
    });
    drop(from_twin);
    let answer = migration
        .join()
        .map_err(|_| anyhow::anyhow!("the API call's thread panicked"))?;
    match answer {
        Ok(stats) => {
            // The twin's process records it too when its VMM ends; this is the same fact.
            let _ = store.set_state(&device, name, TwinState::Returned);
            let line = format!(
                "pocketvisor: cloud: the twin {name:?} of device {} returned to {peer}: {stats}{}\n",
                device.hex(),
                relayed.map_or_else(
                    |e| format!(" (the proxy: {e})"),
                    |r| format!(
                        " frames_to_device={} frames_to_twin={}",
                        r.to_destination, r.to_source
                    )
                )
            );
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
            Ok(0)
        }
        Err(e) => {
            let proxy = relayed
                .err()
                .map_or_else(String::new, |r| format!(" (the proxy: {r})"));
            Err(e.context(format!(
                "the return of {name:?} to {peer} failed{proxy}; the twin runs on here"
            )))
        }
    }
}

/// `cloud return`.
#[derive(Args, Debug)]
#[command(after_help = "\
Connects to the cloud host (--from, over TLS 1.3 with this device's certificate: the one it
offloaded with, which names the device there), asks for its twin NAME back and receives the
twin's live migration, which the host relays from the twin's VMM. With --base DIR (the
snapshot `migrate --keep DIR` kept at the offload, the disks at the --disk paths as they were
then) only the pages and disk chunks that differ from that copy travel. The twin runs at the
host until the guest runs here; if anything fails before, nothing runs here, no disk changes,
the twin runs on and the command fails (status 1). Otherwise it prints `returned
bytes_received=N bytes_sent=N` and runs the guest: the exit status is the guest's, as for
`run`. Another device's twin is `no twin named ...`, as a missing one.

EXAMPLE:
  pocketvisor migrate --api-socket /tmp/pv.sock --to cloud.example:7000 --twin work \\
      --keep /var/lib/pv/work.kept --key cloud.mkey --tls-cert device.pem \\
      --tls-key device.key --tls-ca cloud-ca.pem
  # later, the twin comes back onto the kept copy and the disk as it was
  pocketvisor cloud return work --from cloud.example:7000 --base /var/lib/pv/work.kept \\
      --disk work.img --key cloud.mkey --tls-cert device.pem --tls-key device.key \\
      --tls-ca cloud-ca.pem --api-socket /tmp/pv.sock")]
struct ReturnArgs {
    /// The twin's name at the cloud host.
    name: String,
    #[command(flatten)]
    host: CloudHost,
    /// The copy of this guest kept at the offload (`migrate --keep DIR`).
    #[arg(long, value_name = "DIR")]
    base: Option<PathBuf>,
    /// Where the serial console goes: stdout, file:PATH or none [default: as at the twin].
    #[arg(long, value_name = "WHERE", value_parser = crate::run::parse_serial)]
    serial: Option<SerialConfig>,
    /// Disk image paths here, in order (each must exist with the twin's disk's size; with
    /// --base, as it was at the offload). Repeatable. The twin's disk replaces it at the commit.
    #[arg(long, value_name = "PATH")]
    disk: Vec<PathBuf>,
    /// TAP names here for the twin's network devices, in order (at the host they were on the
    /// host's own TAPs, whose names mean nothing here). Repeatable.
    #[arg(long, value_name = "NAME")]
    tap: Vec<String>,
    /// The vsock unix socket path.
    #[arg(long, value_name = "PATH")]
    vsock_socket: Option<PathBuf>,
    /// Serve the control API on this unix socket once the guest runs.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Serve the guest's screen (a twin with a display) over VNC once it runs here: a loopback
    /// HOST:PORT or unix:PATH, as `run --vnc`.
    #[arg(long, value_name = "HOST:PORT|unix:PATH", value_parser = crate::vnc::parse_vnc)]
    vnc: Option<crate::vnc::VncAddr>,
}

/// How a device reaches its cloud host.
#[derive(Args, Debug)]
struct CloudHost {
    /// The cloud host, HOST:PORT (its certificate must name HOST).
    #[arg(long, value_name = "HOST:PORT")]
    from: String,
    /// The migration key this device shares with the host (64 hexadecimal digits).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// This device's certificate chain (PEM): the one it offloaded with.
    #[arg(long, value_name = "FILE")]
    tls_cert: PathBuf,
    /// This device's private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: PathBuf,
    /// The authority the host's certificate must chain to (PEM).
    #[arg(long, value_name = "FILE")]
    tls_ca: PathBuf,
}

impl CloudHost {
    /// The key and TLS files, read and checked; `name` checked to be a twin's name.
    fn open(&self, name: &str) -> Result<([u8; vmm::migration::wire::KEY_LEN], MigrationTls)> {
        let key = vmm::migration::wire::read_key(&self.key).map_err(anyhow::Error::msg)?;
        if !valid_name(name) {
            anyhow::bail!("{}", StoreError::BadName(name.to_string()));
        }
        let tls = MigrationTls {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: self.tls_ca.clone(),
        };
        Ok((key, tls))
    }
}

/// `cloud return`: the device's side.
fn give_back_here(a: ReturnArgs) -> Result<i32> {
    let (key, tls) = a.host.open(&a.name)?;
    let overrides = RestoreOverrides {
        serial: a.serial,
        disks: a.disk,
        vsock_socket: a.vsock_socket,
        taps: a.tap,
        disk_keys: Vec::new(),
        vsock_cid: None,
        macs: Vec::new(),
    };
    let returned = vmm::migration::receive_returned(
        &a.host.from,
        &key,
        Some(&tls),
        &format!("return {}", a.name),
        &overrides,
        a.base.as_deref(),
    )
    .with_context(|| {
        format!(
            "the return of {:?} from {} failed; nothing runs here",
            a.name, a.host.from
        )
    })?;
    outln!(
        "returned bytes_received={} bytes_sent={}",
        returned.bytes_received,
        returned.bytes_sent
    );
    eprintln!(
        "pocketvisor: the twin {:?} came back from {}; the guest runs here",
        a.name, a.host.from
    );
    // The guest runs here already: a screen that cannot be served is said, not a reason to
    // stop it.
    let _screen = a.vnc.and_then(|addr| {
        crate::vnc::start(&returned.vm, &addr)
            .map_err(|e| {
                eprintln!("pocketvisor: the returned guest runs without its screen: {e:#}")
            })
            .ok()
    });
    crate::run::run_vm(returned.vm, a.api_socket.as_deref())
}

/// `cloud view`.
#[derive(Args, Debug)]
#[command(after_help = "\
Shows the screen of the twin NAME, which runs at the cloud host, to VNC viewers on this device:
each viewer that connects to --listen gets a connection of its own to the host (TLS 1.3 with
this device's certificate, the one it offloaded with), which relays the twin's VNC server
(RFB 3.8, keys and pointer included) both ways, unchanged. The twin must have been offloaded
with a display (`run --gpu`, and `--input` for keys and touch). The first connection is made
at once: a twin that is not there, not this device's, or has no screen is this command's error
(status 1). It then serves until stopped (Ctrl-C).

EXAMPLE:
  pocketvisor cloud view work --from cloud.example:7000 --listen 127.0.0.1:5901 \\
      --key cloud.mkey --tls-cert device.pem --tls-key device.key --tls-ca cloud-ca.pem
  vncviewer 127.0.0.1::5901")]
struct ViewArgs {
    /// The twin's name at the cloud host.
    name: String,
    #[command(flatten)]
    host: CloudHost,
    /// Where viewers connect: a loopback HOST:PORT (port 0: any free port; the address is
    /// printed) or unix:PATH. The relay adds no password: keep it to this device.
    #[arg(long, value_name = "HOST:PORT|unix:PATH", value_parser = crate::vnc::parse_vnc)]
    listen: crate::vnc::VncAddr,
}

/// `cloud vsock`.
#[derive(Args, Debug)]
#[command(after_help = "\
Serves a unix socket on this device that reaches the vsock device of the twin NAME, which runs
at the cloud host, as the twin VMM's own vsock socket would: a client says `CONNECT PORT` and
talks to that port of the twin's guest (`pocketvisor vsock --vsock-socket PATH --port N`, or the
handset's file channel to the guest's agent on port 1025). Each connection gets its own TLS
connection to the host (this device's certificate, the one it offloaded with), which relays it
both ways, unchanged. The first connection is made at once: a twin that is not there, not this
device's, or has no vsock device is this command's error (status 1). It then serves until
stopped (Ctrl-C).

EXAMPLE:
  pocketvisor cloud vsock work --from cloud.example:7000 --listen /run/pv/work-twin.vsock \\
      --key cloud.mkey --tls-cert device.pem --tls-key device.key --tls-ca cloud-ca.pem
  echo hello | pocketvisor vsock --vsock-socket /run/pv/work-twin.vsock --port 1234")]
struct VsockArgs {
    /// The twin's name at the cloud host.
    name: String,
    #[command(flatten)]
    host: CloudHost,
    /// The unix socket to serve (made for this user only).
    #[arg(long, value_name = "PATH")]
    listen: PathBuf,
}

/// `cloud view` and `cloud vsock`: the device's side. Serves `listen`, each client relayed to
/// `socket` of the twin `name` over a connection of its own to the host.
fn serve_twin_socket(
    host: CloudHost,
    name: String,
    socket: TwinSocket,
    listen: &crate::vnc::VncAddr,
) -> Result<i32> {
    let (key, tls) = host.open(&name)?;
    let twin = std::sync::Arc::new(Relayed {
        from: host.from,
        name,
        socket,
        key,
        tls,
    });
    // Once now, so that a twin without that socket is this command's error.
    twin.ask()?.shutdown(std::net::Shutdown::Both);
    let said = |at: &str| {
        let what = match socket {
            TwinSocket::Screen => "screen",
            TwinSocket::Vsock => "vsock device",
        };
        let line = format!(
            "pocketvisor: the {what} of the twin {:?} on {at}\n",
            twin.name
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    };
    match listen {
        crate::vnc::VncAddr::Tcp(addr) => {
            let l = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
            said(&format!(
                "{} (VNC)",
                l.local_addr().context("the listening address")?
            ));
            for client in l.incoming() {
                twin.serve_in_thread(client);
            }
        }
        crate::vnc::VncAddr::Unix(path) => {
            crate::api::remove_stale_socket(path)?;
            let l = std::os::unix::net::UnixListener::bind(path)
                .with_context(|| format!("cannot listen on {}", path.display()))?;
            crate::api::owner_only(path)?;
            said(&format!("unix:{}", path.display()));
            for client in l.incoming() {
                twin.serve_in_thread(client);
            }
        }
    }
    Ok(0)
}

/// A socket of a twin served on this device.
struct Relayed {
    from: String,
    name: String,
    socket: TwinSocket,
    key: [u8; vmm::migration::wire::KEY_LEN],
    tls: MigrationTls,
}

impl Relayed {
    /// A connection to the host that carries the twin's socket.
    fn ask(&self) -> Result<vmm::migration::tls::Transport> {
        let request = format!("{} {}", self.socket.verb(), self.name);
        vmm::migration::ask(&self.from, &self.key, &self.tls, &request).with_context(|| {
            format!(
                "the {} of {:?} at {}",
                self.socket.verb(),
                self.name,
                self.from
            )
        })
    }

    /// Relays one client to the twin's socket, in a thread of its own.
    fn serve_in_thread<L>(self: &std::sync::Arc<Self>, client: std::io::Result<L>)
    where
        L: vmm::migration::LocalEnd + Send + 'static,
        for<'a> &'a L: std::io::Read + std::io::Write,
    {
        let client = match client {
            Ok(c) => c,
            Err(e) => return eprintln!("pocketvisor: accept a client: {e}"),
        };
        let twin = std::sync::Arc::clone(self);
        std::thread::spawn(move || {
            let relayed = twin
                .ask()
                .and_then(|remote| vmm::migration::relay(remote, client).map_err(Into::into));
            if let Err(e) = relayed {
                eprintln!("pocketvisor: a client of {:?}: {e:#}", twin.name);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clone_cid_is_fresh_and_in_range() {
        for original in [3, 4, 1000, MAX_CLONE_CID] {
            for _ in 0..100 {
                let c = fresh_cid(original).unwrap();
                assert!((3..=MAX_CLONE_CID).contains(&c) && c != original, "{c}");
            }
        }
    }

    #[test]
    fn a_clone_mac_is_fresh_unicast_and_locally_administered() {
        let original = [0x02, 0, 0, 0, 0, 1];
        for _ in 0..100 {
            let m = fresh_mac(Some(original)).unwrap();
            assert_ne!(m, original);
            assert_eq!(m[0] & 0x03, 0x02, "{m:02x?}");
        }
    }

    #[test]
    fn a_network_device_needs_the_hosts_twin_bridge() {
        let mut c: vmm::VmConfig = toml::from_str("kernel = \"k\"").unwrap();
        assert_eq!(check_config(&c, None), Ok(()));
        c.net.push(vmm::config::NetConfig {
            tap: "tap0".into(),
            mac: None,
            filter: None,
        });
        let why = check_config(&c, None).unwrap_err();
        assert!(why.contains("--twin-bridge"), "{why}");
        let why = check_config(&c, Some("pv-no-such-br")).unwrap_err();
        assert!(why.contains("does not exist"), "{why}");
    }

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
        assert_eq!(parse_request("return work"), Ok(Ask::Return("work".into())));
        assert_eq!(
            parse_request("view work"),
            Ok(Ask::Relay(TwinSocket::Screen, "work".into()))
        );
        assert_eq!(
            parse_request("vsock work"),
            Ok(Ask::Relay(TwinSocket::Vsock, "work".into()))
        );
        assert_eq!(parse_request("clone work"), Ok(Ask::Clone("work".into())));
        assert!(parse_request("clone ../x").is_err());
        assert!(parse_request("return ../x")
            .unwrap_err()
            .contains("bad twin name"));
        assert!(parse_request("frobnicate work")
            .unwrap_err()
            .contains("unknown request"));
        assert!(parse_request("").is_err());
    }
}
