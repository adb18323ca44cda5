//! `pocketvisor migrate` (the source's side, through its API socket) and `pocketvisor receive`
//! (a VMM process that waits for a migrating VM and runs it).

use std::net::TcpListener;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use vmm::migration::MigrationTls;
use vmm::{Request, RestoreOverrides, SerialConfig};

use crate::api;

/// Live-migrate a running VM to a host waiting in `pocketvisor receive`.
#[derive(Args, Debug)]
#[command(after_help = "\
The VM must have been started with --api-socket. It keeps running while its memory is copied
and stands still only for the last copy (the downtime budget). The command returns once the
destination confirms the guest runs there; the source VMM then ends with status 0 (with
--clone it runs on: a cloud host then runs a copy with a vsock CID of its own). If anything
fails before that, the guest runs on at the source and the command fails (status 1). Disks go
with the guest: each is sent whole, then the chunks the guest wrote meanwhile, and replaces the
destination's disk (which must exist, the same size) only at the commit.

The connection is TLS 1.3 with both hosts' certificates: --tls-cert/--tls-key are this host's,
and the destination's certificate must chain to --tls-ca and name the host of --to. --plain
goes without TLS (messages still authenticated by the key, but guest memory crosses the link
unencrypted): for a link already private.

EXAMPLE:
  dest$ pocketvisor receive --listen 0.0.0.0:7000 --key /etc/pv/migration.key \\
          --tls-cert dest.pem --tls-key dest.key --tls-ca ca.pem --serial file:/tmp/s.log
  src$  pocketvisor migrate --api-socket /tmp/pv.sock --to dest:7000 --key /etc/pv/migration.key \\
          --tls-cert src.pem --tls-key src.key --tls-ca ca.pem")]
pub struct MigrateArgs {
    /// The source VMM's control socket.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// The destination, HOST:PORT (or, with --plain, unix:PATH: a relay on this host).
    #[arg(long, value_name = "HOST:PORT")]
    to: String,
    /// The migration key both hosts hold (64 hexadecimal digits).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// The longest the guest may stand still for the final copy, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = vmm::vmm_api::DEFAULT_DOWNTIME_MS)]
    downtime_ms: u64,
    /// At a cloud host (`pocketvisor cloud serve`, over TLS): become its twin NAME there.
    #[arg(long, value_name = "NAME", conflicts_with = "plain")]
    twin: Option<String>,
    /// With --twin: clone rather than move. The guest runs on here once its copy runs at
    /// the cloud host, which gives the copy a fresh identity (vsock CID).
    #[arg(long, requires = "twin", conflicts_with = "keep")]
    clone: bool,
    /// Keep a snapshot of the VM as it is at the switch in DIR (written before the commit;
    /// with the disks, which stay where they are, the copy a return starts from).
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
}

/// TLS for the migration connection, or explicitly none.
#[derive(Args, Debug)]
#[group(required = true, multiple = true)]
pub struct TlsArgs {
    /// This host's certificate chain (PEM, its own certificate first).
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"], conflicts_with = "plain")]
    tls_cert: Option<PathBuf>,
    /// This host's private key (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"], conflicts_with = "plain")]
    tls_key: Option<PathBuf>,
    /// The certificate authority the other host's certificate must chain to (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"], conflicts_with = "plain")]
    tls_ca: Option<PathBuf>,
    /// No TLS: the messages are still authenticated by the key, but not encrypted.
    #[arg(long)]
    plain: bool,
}

impl TlsArgs {
    /// The TLS files as absolute paths, or None for --plain.
    fn files(&self) -> Result<Option<MigrationTls>> {
        let (Some(cert), Some(key), Some(ca)) = (&self.tls_cert, &self.tls_key, &self.tls_ca)
        else {
            return Ok(None);
        };
        let abs = |p: &PathBuf| {
            std::path::absolute(p).with_context(|| format!("bad path {}", p.display()))
        };
        Ok(Some(MigrationTls {
            cert: abs(cert)?,
            key: abs(key)?,
            ca: abs(ca)?,
        }))
    }
}

/// Wait for one live migration and run the VM that arrives.
#[derive(Args, Debug)]
#[command(after_help = "\
Listens on --listen for one source (`pocketvisor migrate`), checks everything it sends as a
restore does, and runs the guest once the source has committed. Over TLS 1.3 (--tls-*) the
source must show a certificate that chains to --tls-ca; --plain goes without TLS. The configuration comes from
the source; host-side paths can be changed with the flags below. The source's disks are
copied into temporary files beside the destination's disk paths (which must exist, each the
size of the source's) and renamed over them only once the source has committed. If the
migration fails, nothing runs here, no disk changes and the command fails (status 1). Otherwise the exit status is the
guest's, as for `run`.")]
pub struct ReceiveArgs {
    /// Where to wait for the source, HOST:PORT (port 0: any free port; the address is printed).
    #[arg(long, value_name = "HOST:PORT")]
    listen: String,
    /// The migration key both hosts hold (64 hexadecimal digits).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Where the serial console goes: stdout, file:PATH or none [default: as at the source].
    #[arg(long, value_name = "WHERE", value_parser = crate::run::parse_serial)]
    serial: Option<SerialConfig>,
    /// Disk image paths replacing the source's, in order. Repeatable. Each must exist with the
    /// source disk's size; the source's disk replaces it (renamed into place at the commit).
    #[arg(long, value_name = "PATH")]
    disk: Vec<PathBuf>,
    /// TAP names replacing the source's, in order. Repeatable.
    #[arg(long, value_name = "NAME")]
    tap: Vec<String>,
    /// The vsock unix socket path.
    #[arg(long, value_name = "PATH")]
    vsock_socket: Option<PathBuf>,
    /// Serve the control API on this unix socket once the guest runs.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Start from the copy of this guest kept here (`migrate --keep DIR`), with the disks at
    /// the --disk paths as they were then: the source sends only the pages and disk chunks
    /// that differ from it (a return from the cloud host).
    #[arg(long, value_name = "DIR")]
    base: Option<PathBuf>,
    #[command(flatten)]
    tls: TlsArgs,
}

/// `pocketvisor migrate`.
pub fn migrate(a: MigrateArgs) -> Result<i32> {
    let key_file =
        std::path::absolute(&a.key).with_context(|| format!("bad key path {}", a.key.display()))?;
    // Checked here too, so a bad key is this command's error, not the VMM's.
    vmm::migration::wire::read_key(&key_file).map_err(anyhow::Error::msg)?;
    let info = api::call(
        &a.api_socket,
        &Request::Migrate {
            to: a.to,
            key_file,
            downtime_ms: a.downtime_ms,
            tls: a.tls.files()?,
            twin: a.twin,
            clone: a.clone,
            keep: a
                .keep
                .map(|k| {
                    std::path::absolute(&k).with_context(|| format!("bad path {}", k.display()))
                })
                .transpose()?,
        },
    )?;
    outln!("{info}");
    Ok(0)
}

/// `pocketvisor receive`.
pub fn receive(a: ReceiveArgs) -> Result<i32> {
    let key = vmm::migration::wire::read_key(&a.key).map_err(anyhow::Error::msg)?;
    let tls = a.tls.files()?;
    let listener =
        TcpListener::bind(&a.listen).with_context(|| format!("cannot listen on {}", a.listen))?;
    let addr = listener.local_addr().context("the listening address")?;
    // Scripts and tests read this line to learn the port: one write, so a
    // reader never sees half of it (eprintln! writes each piece separately).
    let line = format!("pocketvisor: waiting for a migration on {addr}\n");
    // A closed stderr is no reason to refuse the migration.
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    let (conn, peer) = listener.accept().context("accept the source")?;
    drop(listener);
    let overrides = RestoreOverrides {
        serial: a.serial,
        disks: a.disk,
        vsock_socket: a.vsock_socket,
        taps: a.tap,
        disk_keys: Vec::new(),
        vsock_cid: None,
        macs: Vec::new(),
    };
    let vm = vmm::migration::receive_onto(conn, &key, tls.as_ref(), &overrides, a.base.as_deref())
        .with_context(|| format!("the migration from {peer} failed; nothing runs here"))?;
    eprintln!("pocketvisor: migrated from {peer}; the guest runs here");
    crate::run::run_vm(vm, a.api_socket.as_deref())
}
