//! Replicas (issue 13, docs/cloud.md "Replicate and recover"): `pocketvisor cloud replicate`
//! on the device takes a checkpoint of the running VM every period (the VMM's `checkpoint`
//! op), seals it for the profile's recovery keys (the vault's format: the cloud host stores
//! ciphertext it cannot read) and sends it to the cloud host as `replicate NAME CHAIN SEQ`;
//! `pocketvisor cloud recover` fetches the chain (`recover NAME`), opens each checkpoint
//! with the recovery identity and rebuilds a snapshot and disks that `restore` runs. The
//! cloud host's side of both is here too ([`store_checkpoint`], [`send_chain`]).

use std::fs::File;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use cloud::replica::{valid_chain, ReplicaStore, MAX_CHECKPOINT};
use cloud::store::{valid_name, DeviceId, StoreError, TwinKind, TwinStore};
use vmm::migration::checkpoints::{expect_stored, recv_file, send_file, stored};
use vmm::migration::wire::Kind;
use vmm::migration::{MigrationTls, Requested};
use vmm::replica::{Recovery, FILES};
use vmm::Request;

/// The `format` in a sealed checkpoint's manifest.
const FORMAT: &str = "pocketvisor-replica/1";

/// A profile's spec, carried in the checkpoints `profile replicate` seals.
const SPEC_ENTRY: &str = "profile.toml";

/// The most checkpoints a chain may have for a recovery to fetch it.
const MAX_CHAIN: u64 = 1 << 20;

/// The lock of a replica twin's directory while a checkpoint is stored.
const REPLICA_LOCK: &str = "replica.lock";

/// A request `replicate NAME CHAIN SEQ`'s parts after the name, checked.
pub fn parse_replicate(rest: &str) -> Result<(String, u64), String> {
    let mut parts = rest.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(chain), Some(seq), None) if valid_chain(chain) => match seq.parse::<u64>() {
            Ok(n) if n > 0 && seq == n.to_string() => Ok((chain.to_string(), n)),
            _ => Err(format!("a bad checkpoint number {seq:?}")),
        },
        _ => Err("replicate takes NAME CHAIN SEQ (CHAIN: 32 hexadecimal digits)".into()),
    }
}

fn refuse(requested: Requested, peer: &str, why: String) -> Result<i32> {
    requested.refuse(&vmm::Error::Migration(why.clone()));
    Err(anyhow::anyhow!(
        "the request from {peer} was refused: {why}"
    ))
}

/// The cloud host's side of `replicate NAME CHAIN SEQ`: stores the sealed checkpoint in the
/// device's replica twin `name` (created by the first), atomically, in `replicas`, and says
/// so.
pub fn store_checkpoint(
    store: &TwinStore,
    replicas: &ReplicaStore,
    mut requested: Requested,
    device: DeviceId,
    name: &str,
    (chain, seq): (String, u64),
    peer: &str,
) -> Result<i32> {
    let twin = match store.get(&device, name) {
        Ok(t) if t.kind == TwinKind::Replica => t,
        Ok(_) => {
            return refuse(
                requested,
                peer,
                format!("the twin {name:?} is an offloaded profile, not a replica"),
            )
        }
        Err(StoreError::NotFound(_)) => match store.create_kind(&device, name, TwinKind::Replica) {
            Ok(t) => t,
            Err(e) => return refuse(requested, peer, e.to_string()),
        },
        Err(e) => return refuse(requested, peer, e.to_string()),
    };
    let _lock = match crate::cloud::lock_file(&twin.dir.join(REPLICA_LOCK)) {
        Ok(Some(l)) => l,
        Ok(None) => {
            return refuse(
                requested,
                peer,
                format!("a checkpoint of the replica {name:?} is being stored"),
            )
        }
        Err(e) => return refuse(requested, peer, format!("the replica's lock: {e}")),
    };
    let replica = match replicas.replica(&device, name, &twin.dir) {
        Ok(r) => r,
        Err(e) => return refuse(requested, peer, e.to_string()),
    };
    let mut incoming = match replica.begin(&chain, seq) {
        Ok(i) => i,
        Err(e) => return refuse(requested, peer, e.to_string()),
    };
    let ch = requested.channel();
    let received = ch
        .send(Kind::Accept, &[])
        .and_then(|()| ch.flush())
        .map_err(vmm::Error::from)
        .and_then(|()| {
            recv_file(ch, &mut incoming, MAX_CHECKPOINT, |_| {
                if seq > 1 {
                    vmm::migration::kill_point("replica-store");
                }
            })
        });
    let (got, bytes) = match received {
        Ok(r) => r,
        Err(e) => {
            vmm::migration::checkpoints::abort(ch, &e.to_string());
            bail!("the checkpoint {seq} of {name:?} from {peer} was not stored: {e}")
        }
    };
    if got != seq {
        vmm::migration::checkpoints::abort(ch, "the checkpoint ended with another number");
        bail!("the checkpoint {seq} of {name:?} from {peer} ended as {got}; not stored");
    }
    if let Err(e) = incoming.commit() {
        vmm::migration::checkpoints::abort(ch, &format!("cannot store the checkpoint: {e}"));
        bail!("the checkpoint {seq} of {name:?} from {peer} was not stored: {e}");
    }
    stored(ch, seq).context("tell the device")?;
    let line = format!(
        "pocketvisor: cloud: stored checkpoint {seq} of the replica {name:?} of device {} \
         ({bytes} bytes, chain {chain})\n",
        device.hex()
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    Ok(0)
}

/// The cloud host's side of `recover NAME`: sends the device the stored chain of its
/// replica twin `name` from `replicas`, oldest first (`Accept` carries the chain id and the
/// count).
pub fn send_chain(
    store: &TwinStore,
    replicas: &ReplicaStore,
    mut requested: Requested,
    device: DeviceId,
    name: &str,
    peer: &str,
) -> Result<i32> {
    let twin = match store.get(&device, name) {
        Ok(t) if t.kind == TwinKind::Replica => t,
        Ok(_) => {
            return refuse(
                requested,
                peer,
                format!("the twin {name:?} is an offloaded profile, not a replica"),
            )
        }
        // Another device's replica is not found either.
        Err(e) => return refuse(requested, peer, e.to_string()),
    };
    // Opened first: a new chain stored meanwhile does not change what is sent.
    let opened = replicas
        .replica(&device, name, &twin.dir)
        .and_then(|r| r.open_chain());
    let (chain, files) = match opened {
        Ok(Some(c)) => c,
        Ok(None) => {
            return refuse(
                requested,
                peer,
                format!("no checkpoint of {name:?} is stored"),
            )
        }
        Err(e) => return refuse(requested, peer, format!("reading the replica: {e}")),
    };
    let count = files.len();
    let mut accept = chain.as_bytes().to_vec();
    accept.extend_from_slice(&(files.len() as u64).to_le_bytes());
    let ch = requested.channel();
    ch.send(Kind::Accept, &accept)
        .context("answer the device")?;
    let mut bytes = 0;
    for (i, mut f) in files.into_iter().enumerate() {
        bytes += send_file(ch, &mut f, i as u64 + 1)
            .with_context(|| format!("send the replica of {name:?} to {peer}"))?;
    }
    let line = format!(
        "pocketvisor: cloud: sent the replica {name:?} of device {} to {peer}: {} checkpoints, \
         {bytes} bytes\n",
        device.hex(),
        count
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
    Ok(0)
}

/// What the device side of both commands shares: the cloud host and this device's identity.
#[derive(Args, Debug)]
struct CloudConn {
    /// The migration key this device shares with the host (64 hexadecimal digits).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// This device's certificate chain (PEM): it names the device at the host.
    #[arg(long, value_name = "FILE")]
    tls_cert: PathBuf,
    /// This device's private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: PathBuf,
    /// The authority the host's certificate must chain to (PEM).
    #[arg(long, value_name = "FILE")]
    tls_ca: PathBuf,
}

impl CloudConn {
    fn open(&self) -> Result<([u8; 32], MigrationTls)> {
        let key = vmm::migration::wire::read_key(&self.key).map_err(anyhow::Error::msg)?;
        Ok((
            key,
            MigrationTls {
                cert: self.tls_cert.clone(),
                key: self.tls_key.clone(),
                ca: self.tls_ca.clone(),
            },
        ))
    }
}

/// `cloud replicate`.
#[derive(Args, Debug)]
#[command(after_help = "\
Every --every, asks the VMM (--api-socket) for a checkpoint: the first holds every non-zero
page and disk chunk, each later one what changed since the one before (the guest is paused
only for the last changes and its state). Each is sealed on this device for the --recipient
keys (`pocketvisor keygen`; the vault's format, as `export`), its plaintext removed, and sent
to the cloud host (--to, TLS with this device's certificate), which stores it atomically in
the replica NAME: a checkpoint that does not arrive whole is not stored, and the one before
stays recoverable. Every --full-every checkpoints a new chain starts with a full one, and the
host drops the old chain once that one is stored. One that could not be sent is sent again first, before the next is taken.
Prints one line per stored checkpoint. Ends after --count checkpoints, or with an error when
the VMM stops answering. A jailed VMM writes its checkpoints where its jail shows it
--vmm-dir (--vmm-sees); they are read from there without following links (the handset
daemon's replication passes both).

EXAMPLE:
  pocketvisor keygen -o recovery.key > recovery.pub
  pocketvisor cloud replicate work --api-socket /tmp/pv.sock --to cloud.example:7000 \\
      --every 30s --recipient \"$(cat recovery.pub)\" --work /var/lib/pv/work.replica \\
      --key cloud.mkey --tls-cert device.pem --tls-key device.key --tls-ca cloud-ca.pem")]
pub struct ReplicateArgs {
    /// The replica's name at the cloud host (the profile's name).
    name: String,
    /// The running VM's control socket.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// The cloud host, HOST:PORT (its certificate must name HOST).
    #[arg(long, value_name = "HOST:PORT")]
    to: String,
    /// The period: a number and a unit, ms, s or m (e.g. 30s).
    #[arg(long, value_name = "PERIOD", value_parser = parse_period, default_value = "30s")]
    every: Duration,
    /// A key that can open the checkpoints (`pvp-public-...`); repeatable, at least one.
    #[arg(long, value_name = "KEY", required = true)]
    recipient: Vec<String>,
    /// A directory of this device for checkpoints on their way (created, this user only).
    #[arg(long, value_name = "DIR")]
    work: PathBuf,
    /// Stop after this many stored checkpoints.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Start a new chain (a full checkpoint) after this many: bounds what a recovery fetches
    /// and applies, and what the host keeps (it drops the old chain once the new one's first
    /// checkpoint is stored).
    #[arg(long, value_name = "N", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    full_every: u64,
    #[command(flatten)]
    conn: CloudConn,
    /// A handset profile's spec (TOML), sealed into every checkpoint (the handset daemon's
    /// replication: `profile recover` makes the profile from it).
    #[arg(long, value_name = "FILE")]
    spec: Option<PathBuf>,
    /// A jailed VMM's directory for its checkpoints on this host (in its run directory,
    /// created and handed to the run directory's owner); the checkpoints are read from it
    /// without following links. Default: --work.
    #[arg(long, value_name = "DIR", requires = "vmm_sees")]
    vmm_dir: Option<PathBuf>,
    /// Where the jailed VMM sees --vmm-dir (an absolute path in its jail).
    #[arg(long, value_name = "PATH", requires = "vmm_dir")]
    vmm_sees: Option<PathBuf>,
}

/// Parses `500ms`, `30s`, `2m`.
fn parse_period(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: a number and ms, s or m"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        _ => return Err(format!("{s:?}: a number and ms, s or m")),
    };
    if d < Duration::from_millis(100) {
        return Err(format!("{s:?}: at least 100ms"));
    }
    Ok(d)
}

/// A new chain id: 16 random bytes as hex.
fn new_chain() -> Result<String> {
    let mut b = [0u8; 16];
    std::io::Read::read_exact(&mut File::open("/dev/urandom")?, &mut b).context("random bytes")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// A checkpoint sealed and waiting to be stored.
struct Pending {
    file: PathBuf,
    seq: u64,
    /// The VMM's figures, for the line printed once it is stored.
    stats: String,
}

/// `profile replicate`.
#[derive(Args, Debug)]
#[command(after_help = "\
Asks the handset daemon to replicate the profile: while it runs (also after a daemon
restart), the daemon takes a checkpoint of its VMM every --every (a jailed VMM writes it into
its run directory, where the daemon reads it back without following links), seals it for the
--recipient keys and stores it at the cloud host as the replica NAME, with this device's
identity towards cloud hosts (<state-dir>/cloud/: cert.pem, key.pem, ca.pem, migration.key,
as `profile offload`). Each result is a profile event (`replicated seq=N bytes=..
pause_ms=..`, or `replicate-failed` and why): `profile events NAME`. Stop, suspend, offload
and delete end the checkpoints; start and resume take them up again (a new chain). The
setting stays until `--stop`; `profile show` shows it. A new device gets the VM back with
`pocketvisor profile recover NAME` (or `cloud recover`) with the same identity and the
--recipient's secret key. `cloud replicate` runs the same loop in the foreground (--count).

EXAMPLE:
  pocketvisor profile replicate work --to cloud.example:7000 --every 30s \\
      --recipient \"$(cat recovery.pub)\"
  pocketvisor profile replicate work --stop")]
pub struct ProfileReplicateArgs {
    /// Profile name (and the replica's name at the cloud host).
    name: String,
    /// The cloud host, HOST:PORT (its certificate must name HOST).
    #[arg(long, value_name = "HOST:PORT", required_unless_present = "stop")]
    to: Option<String>,
    /// The period: whole seconds or minutes (e.g. 30s, 2m).
    #[arg(long, value_name = "PERIOD", value_parser = parse_period, default_value = "30s")]
    every: Duration,
    /// A key that can open the checkpoints (`pvp-public-...`); repeatable, at least one.
    #[arg(long, value_name = "KEY", required_unless_present = "stop")]
    recipient: Vec<String>,
    /// Start a new chain (a full checkpoint) after this many.
    #[arg(long, value_name = "N", default_value_t = 120, value_parser = clap::value_parser!(u32).range(1..))]
    full_every: u32,
    /// End the profile's replication (and forget its setting).
    #[arg(long, conflicts_with_all = ["to", "recipient"])]
    stop: bool,
}

/// `profile replicate`: sets or ends the profile's replication in the daemon `c`.
pub fn profile_replicate(
    c: &handset::client::Client,
    json: bool,
    a: ProfileReplicateArgs,
) -> Result<()> {
    handset::spec::check_name("profile name", &a.name)?;
    let path = format!("/v1/profiles/{}/replicate", a.name);
    if a.stop {
        let _: serde_json::Value = c.call("DELETE", &path, None::<&()>)?;
        if json {
            outln!(
                "{}",
                serde_json::json!({"name": a.name, "replication": "stopped"})
            );
        } else {
            outln!("{}: replication stopped", a.name);
        }
        return Ok(());
    }
    if a.every.subsec_nanos() != 0 {
        bail!("--every {:?}: the daemon takes whole seconds", a.every);
    }
    let req = handset::api_types::ReplicateRequest {
        to: a.to.context("--to")?,
        every_s: u32::try_from(a.every.as_secs()).context("--every")?,
        recipients: a.recipient,
        full_every: Some(a.full_every),
    };
    let st: handset::api_types::ReplicationStatus = c.call("POST", &path, Some(&req))?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        outln!("{}: {}", a.name, describe_replication(&st));
    }
    Ok(())
}

/// One line for `profile show` and `profile replicate`: the setting and how it goes.
pub fn describe_replication(st: &handset::api_types::ReplicationStatus) -> String {
    let Some(s) = &st.setting else {
        return "-".into();
    };
    format!(
        "to {} every {}s ({}; last: {})",
        s.to,
        s.every_s,
        if st.active {
            "checkpointing"
        } else {
            "idle: the profile does not run, or a retry is due"
        },
        st.last.as_deref().unwrap_or("-")
    )
}

/// The handset's identity towards cloud hosts: the files of `<state>/cloud/` (the ones
/// `profile offload` uses).
fn handset_conn(dir: &handset::StateDir) -> Result<CloudConn> {
    let cloud = dir.cloud();
    let file = |name: &str| -> Result<PathBuf> {
        let p = cloud.join(name);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_file() => Ok(p),
            _ => bail!(
                "this handset has no identity towards cloud hosts: {} is missing or not a \
                 regular file (cert.pem, key.pem, ca.pem and migration.key go in {}: \
                 docs/cloud.md)",
                p.display(),
                cloud.display()
            ),
        }
    };
    Ok(CloudConn {
        key: file("migration.key")?,
        tls_cert: file("cert.pem")?,
        tls_key: file("key.pem")?,
        tls_ca: file("ca.pem")?,
    })
}

/// `profile recover`.
#[derive(Args, Debug)]
#[command(after_help = "\
Fetches the replica NAME that `profile replicate` kept at the cloud host (--from), with this
device's identity towards cloud hosts (<state-dir>/cloud/: the certificate that replicated
it) and the secret key of one of the replica's --recipient keys (--identity), checks every
checkpoint as `cloud recover` does, and adds the VM as the last checkpoint left it to this
handset as the suspended profile NAME, through the checks and registration of `import`
(NAME must be free). `profile resume NAME` then runs it on.

EXAMPLE:
  pocketvisor profile recover work --from cloud.example:7000 --identity recovery.key
  pocketvisor profile resume work")]
pub struct ProfileRecoverArgs {
    /// Profile name (the replica's name at the cloud host).
    name: String,
    /// The cloud host, HOST:PORT (its certificate must name HOST).
    #[arg(long, value_name = "HOST:PORT")]
    from: String,
    /// The identity file (`pocketvisor keygen`) that opens the checkpoints.
    #[arg(long, value_name = "FILE")]
    identity: PathBuf,
}

/// Removes a directory (and what is in it) when dropped.
struct RemovedDir(PathBuf);

impl Drop for RemovedDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `profile recover`: rebuilds the profile in a scratch state directory, seals it as a
/// portable profile file for a one-time key and imports that, so the recovered profile passes
/// every check an imported one does.
pub fn profile_recover(dir: &handset::StateDir, a: ProfileRecoverArgs) -> Result<i32> {
    use crate::portable::layout;
    handset::spec::check_name("profile name", &a.name)?;
    if dir.profile(&a.name).exists() {
        bail!(
            "profile {:?} already exists in {}",
            a.name,
            dir.root().display()
        );
    }
    let conn = handset_conn(dir)?;
    let (key, tls) = conn.open()?;
    let unlock = vault::Unlock::Identity(crate::portable::secret::read_identity(&a.identity)?);
    std::fs::create_dir_all(dir.root())
        .with_context(|| format!("cannot create {}", dir.root().display()))?;
    // What a killed recovery left.
    sweep_dead(dir.root(), ".recover-");
    let scratch = dir.root().join(format!(".recover-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&scratch)
        .with_context(|| format!("cannot create {}", scratch.display()))?;
    let _scratch = RemovedDir(scratch.clone());
    let staging = handset::StateDir::new(&scratch)?;
    let disks = staging.profile(&a.name).join(layout::DISKS_DIR);
    std::fs::create_dir_all(&disks)?;
    let snapshot = staging.snapshot(&a.name);
    let spec_path = staging.spec(&a.name);
    let (count, bytes, chain) = fetch_and_rebuild(
        &a.from,
        &key,
        &tls,
        &a.name,
        &unlock,
        Recovery::numbered(&snapshot, &disks)?,
        &snapshot,
        Some(&spec_path),
    )?;
    let spec = handset::ProfileSpec::from_toml(&std::fs::read_to_string(&spec_path)?)
        .context("the replica's profile spec is invalid")?;
    if spec.name != a.name {
        bail!(
            "the replica holds profile {:?}, not {:?}",
            spec.name,
            a.name
        );
    }
    for (i, d) in spec.disks.iter().enumerate() {
        std::fs::rename(
            disks.join(format!("disk{i}.img")),
            staging.disk(&a.name, &d.name),
        )
        .with_context(|| format!("the replica has no disk {:?}", d.name))?;
    }
    let saved = vmm::snapshot::inspect(&snapshot).context("the recovered snapshot")?;
    let config = layout::ProfileConfig {
        format: layout::CONFIG_FORMAT.into(),
        state: layout::SavedState::Suspended,
        vsock_cid: saved
            .vsock
            .as_ref()
            .map(|v| u32::try_from(v.cid))
            .transpose()?
            .unwrap_or(0),
        exported_by: format!("recovered from {} (chain {chain})", a.from),
        spec: spec.clone(),
        data_key: None,
    };
    let entries = layout::entries(&staging, &a.name, &spec, false, true)?;
    let (secret, public) = vault::generate_identity();
    let key_file = scratch.join("once.key");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_file)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, vault::encode_secret(&secret).as_bytes())
        })
        .context("the one-time key")?;
    let file = scratch.join("recovered.pvp");
    vault::export_with(
        &file,
        vault::Manifest::new(
            &a.name,
            serde_json::to_value(&config)?,
            Some(serde_json::to_value(&spec.channels)?),
        ),
        &entries,
        &[vault::KeySpec::Recipient(public)],
        &vault::ExportOptions::default(),
        &mut |_| {},
    )
    .context("sealing the recovered profile")?;
    let exe = std::env::current_exe().context("this program's path")?;
    let status = std::process::Command::new(exe)
        .arg("import")
        .arg(&file)
        .arg("--state-dir")
        .arg(dir.root())
        .arg("--identity")
        .arg(&key_file)
        .stdout(std::process::Stdio::null())
        .status()
        .context("run import")?;
    if !status.success() {
        bail!("the recovered profile {:?} was not imported", a.name);
    }
    outln!(
        "{}: recovered (suspended) checkpoints={count} bytes={bytes} chain={chain}",
        a.name
    );
    Ok(0)
}

/// `cloud replicate`: the device's loop.
pub fn replicate(a: ReplicateArgs) -> Result<i32> {
    if !valid_name(&a.name) {
        bail!("{}", StoreError::BadName(a.name));
    }
    let (key, tls) = a.conn.open()?;
    let keys = a
        .recipient
        .iter()
        .map(|r| vault::decode_public(r.trim()).map(vault::KeySpec::Recipient))
        .collect::<Result<Vec<_>, _>>()
        .context("--recipient")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&a.work)
        .with_context(|| format!("cannot create {}", a.work.display()))?;
    let work = std::path::absolute(&a.work).context("the work directory")?;
    // The VMM's checkpoints: in the work directory, or a jailed VMM's own directory. What an
    // earlier run left (checkpoints, sealed or not) belongs to a chain this one does not
    // continue: opening sweeps it.
    let vmm_dir = match (&a.vmm_dir, &a.vmm_sees) {
        (Some(host), Some(seen)) => {
            if !seen.is_absolute() {
                bail!("--vmm-sees {} is not an absolute path", seen.display());
            }
            let d = crate::replica_dir::VmmDir::open(host, seen, true)?;
            crate::replica_dir::VmmDir::open(&work, &work, false)?;
            d
        }
        _ => crate::replica_dir::VmmDir::open(&work, &work, false)?,
    };
    let mut chain = new_chain()?;
    let mut seq = 1u64;
    let mut pending: Option<Pending> = None;
    let mut stored_count = 0u64;
    loop {
        let started = Instant::now();
        if pending.is_none() {
            if seq > a.full_every {
                chain = new_chain()?;
                seq = 1;
            }
            let plain = format!("{}{seq}", crate::replica_dir::PREFIX);
            let answer = crate::api::call(
                &a.api_socket,
                &Request::Checkpoint {
                    dir: vmm_dir.vmm_path(&plain),
                    full: seq == 1,
                },
            );
            let answer = match answer {
                Ok(a) => stats_fields(&a),
                Err(e) => {
                    vmm_dir.remove(plain.as_ref());
                    return Err(e.context("the VMM's checkpoint"));
                }
            };
            // The VMM starts over with a full one when its logs were taken (a migration).
            if answer.contains("full=true") && seq != 1 {
                chain = new_chain()?;
                seq = 1;
            }
            let file = work.join(format!("ckpt-{seq}.pvr"));
            let sealed = vmm_dir.open_checkpoint(&plain).and_then(|opened| {
                seal(
                    &opened,
                    a.spec.as_deref(),
                    &file,
                    &a.name,
                    &chain,
                    seq,
                    &answer,
                    &keys,
                )
            });
            vmm_dir.remove(plain.as_ref());
            sealed?;
            pending = Some(Pending {
                file,
                seq,
                stats: answer,
            });
        }
        if let Some(p) = pending.take() {
            match upload(&a.to, &key, &tls, &a.name, &chain, &p) {
                Ok(sealed_bytes) => {
                    outln!(
                        "stored seq={} chain={chain} sealed_bytes={sealed_bytes} {}",
                        p.seq,
                        p.stats.strip_prefix("checkpoint ").unwrap_or(&p.stats)
                    );
                    let _ = std::fs::remove_file(&p.file);
                    seq = p.seq + 1;
                    stored_count += 1;
                    if a.count.is_some_and(|n| stored_count >= n) {
                        return Ok(0);
                    }
                }
                Err(e) if format!("{e:#}").contains("does not follow the stored chain") => {
                    eprintln!("pocketvisor: replicate: {e:#}; starting a new chain");
                    let _ = std::fs::remove_file(&p.file);
                    chain = new_chain()?;
                    seq = 1;
                }
                Err(e) => {
                    eprintln!(
                        "pocketvisor: replicate: checkpoint {} not stored ({e:#}); it is sent \
                         again first",
                        p.seq
                    );
                    pending = Some(p);
                }
            }
        }
        if let Some(rest) = a.every.checked_sub(started.elapsed()) {
            std::thread::sleep(rest);
        }
    }
}

/// The VMM's answer to a checkpoint (`checkpoint full=.. pages=..`) cut to the figures it
/// should hold, `key=value` each a number or a boolean: a hostile VMM's answer puts no other
/// text (no line break) into the lines printed.
fn stats_fields(answer: &str) -> String {
    const KEYS: [&str; 6] = [
        "full",
        "pages",
        "disk_chunks",
        "bytes",
        "pause_us",
        "total_ms",
    ];
    let kept: Vec<&str> = answer
        .split(' ')
        .filter(|t| {
            t.split_once('=').is_some_and(|(k, v)| {
                KEYS.contains(&k)
                    && !v.is_empty()
                    && v.len() <= 20
                    && (v.bytes().all(|b| b.is_ascii_digit()) || v == "true" || v == "false")
            })
        })
        .collect();
    format!("checkpoint {}", kept.join(" "))
}

/// Seals the checkpoint `plain` (and the profile spec `spec`) into `out` for `keys`.
#[allow(clippy::too_many_arguments)]
fn seal(
    plain: &crate::replica_dir::Opened,
    spec: Option<&Path>,
    out: &Path,
    name: &str,
    chain: &str,
    seq: u64,
    stats: &str,
    keys: &[vault::KeySpec],
) -> Result<()> {
    let manifest = vault::Manifest::new(
        name,
        serde_json::json!({
            "format": FORMAT,
            "chain": chain,
            "seq": seq,
            "full": stats.contains("full=true"),
        }),
        None,
    );
    let mut entries: Vec<vault::EntrySource> = FILES
        .iter()
        .enumerate()
        .map(|(i, f)| vault::EntrySource {
            name: (*f).to_string(),
            kind: vault::EntryKind::Other,
            path: plain.path(i),
        })
        .collect();
    if let Some(path) = spec {
        entries.push(vault::EntrySource {
            name: SPEC_ENTRY.to_string(),
            kind: vault::EntryKind::Other,
            path: path.to_path_buf(),
        });
    }
    vault::export_with(
        out,
        manifest,
        &entries,
        keys,
        &vault::ExportOptions::default(),
        &mut |_| {},
    )
    .with_context(|| format!("sealing checkpoint {seq}"))?;
    Ok(())
}

/// Sends the sealed checkpoint `p` to the host; returns its size.
fn upload(
    to: &str,
    key: &[u8; 32],
    tls: &MigrationTls,
    name: &str,
    chain: &str,
    p: &Pending,
) -> Result<u64> {
    let mut ch =
        vmm::migration::open_request(to, key, tls, &format!("replicate {name} {chain} {}", p.seq))?;
    vmm::migration::expect_accept(&mut ch)?;
    let mut f = File::open(&p.file).with_context(|| format!("cannot read {}", p.file.display()))?;
    let bytes = send_file(&mut ch, &mut f, p.seq)?;
    expect_stored(&mut ch, p.seq)?;
    Ok(bytes)
}

/// `cloud recover`.
#[derive(Args, Debug)]
#[command(after_help = "\
Fetches the replica NAME's checkpoints from the cloud host (--from, TLS with this device's
certificate: the one that replicated it), opens each with --identity (the secret key of one of
the replica's --recipient keys), checks that they are one chain in order (a full checkpoint,
then each change after it; a damaged, reordered or foreign checkpoint is refused) and writes
the VM as the last checkpoint left it: a snapshot directory -o DIR and its disk images
(--disk, one per disk, in order), none of which may exist. Nothing is written under those
names unless everything checked. Then `pocketvisor restore DIR --disk PATH..` runs it.

EXAMPLE:
  pocketvisor cloud recover work --from cloud.example:7000 --identity recovery.key \\
      -o /var/lib/pv/work.snap --disk /var/lib/pv/work.img --key cloud.mkey \\
      --tls-cert device.pem --tls-key device.key --tls-ca cloud-ca.pem
  pocketvisor restore /var/lib/pv/work.snap --disk /var/lib/pv/work.img")]
pub struct RecoverArgs {
    /// The replica's name at the cloud host.
    name: String,
    /// The cloud host, HOST:PORT (its certificate must name HOST).
    #[arg(long, value_name = "HOST:PORT")]
    from: String,
    /// The identity file (`pocketvisor keygen`) that opens the checkpoints.
    #[arg(long, value_name = "FILE")]
    identity: PathBuf,
    /// The snapshot directory to write (must not exist).
    #[arg(short, long, value_name = "DIR")]
    output: PathBuf,
    /// The disk images to write, in the VM's order (must not exist). Repeatable.
    #[arg(long, value_name = "PATH")]
    disk: Vec<PathBuf>,
    #[command(flatten)]
    conn: CloudConn,
}

/// `cloud recover`: the device's side.
pub fn recover(a: RecoverArgs) -> Result<i32> {
    if !valid_name(&a.name) {
        bail!("{}", StoreError::BadName(a.name));
    }
    let (key, tls) = a.conn.open()?;
    let unlock = vault::Unlock::Identity(crate::portable::secret::read_identity(&a.identity)?);
    // What a killed recovery to the same paths left.
    for p in std::iter::once(&a.output).chain(&a.disk) {
        if let (Some(parent), Some(name)) = (p.parent(), p.file_name()) {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            let name = name.to_string_lossy();
            sweep_dead(parent, &format!(".{name}.recovering-"));
            sweep_dead(parent, &format!(".{name}.fetch-"));
        }
    }
    let recovery = Recovery::new(&a.output, &a.disk)?;
    let out = std::path::absolute(&a.output).context("the output directory")?;
    let (count, bytes, chain) =
        fetch_and_rebuild(&a.from, &key, &tls, &a.name, &unlock, recovery, &out, None)?;
    outln!("recovered checkpoints={count} bytes={bytes} chain={chain}");
    Ok(0)
}

/// Fetches the replica `name`'s chain from `from`, opens and checks every checkpoint and
/// applies it to `recovery`, which it finishes; the last checkpoint's profile spec goes to
/// `spec` if given (an error if it has none). Returns the count, the bytes fetched and the
/// chain.
#[allow(clippy::too_many_arguments)]
fn fetch_and_rebuild(
    from: &str,
    key: &[u8; 32],
    tls: &MigrationTls,
    name: &str,
    unlock: &vault::Unlock,
    mut recovery: Recovery,
    out: &Path,
    spec: Option<&Path>,
) -> Result<(u64, u64, String)> {
    let fetch = FetchDir::create(out)?;
    let mut ch = vmm::migration::open_request(from, key, tls, &format!("recover {name}"))?;
    let accept = vmm::migration::expect_accept(&mut ch)
        .with_context(|| format!("the recovery of {name:?} from {from} was refused"))?;
    let (chain, count) = match accept.split_at_checked(32) {
        Some((c, n)) if n.len() == 8 => (
            String::from_utf8(c.to_vec())
                .ok()
                .filter(|c| valid_chain(c)),
            u64::from_le_bytes(n.try_into()?),
        ),
        _ => (None, 0),
    };
    let chain = chain
        .filter(|_| (1..=MAX_CHAIN).contains(&count))
        .context("the host's answer is malformed")?;
    let mut bytes = 0;
    for i in 1..=count {
        let sealed = fetch.0.join(format!("{i}.pvr"));
        let mut f =
            File::create(&sealed).with_context(|| format!("cannot create {}", sealed.display()))?;
        let (seq, n) = recv_file(&mut ch, &mut f, MAX_CHECKPOINT, |_| {})?;
        drop(f);
        if seq != i {
            bail!("the host sent checkpoint {seq} where {i} was due; nothing was written");
        }
        bytes += n;
        let opened = fetch.0.join(format!("{i}"));
        let manifest = vault::import_with(
            &sealed,
            unlock,
            &opened,
            &vault::ImportOptions::default(),
            &mut |_| {},
        )
        .with_context(|| {
            format!("checkpoint {i} of {name:?} does not open; nothing was written")
        })?;
        check_manifest(&manifest, name, &chain, i)?;
        recovery
            .apply(&opened)
            .with_context(|| format!("checkpoint {i}; nothing was written"))?;
        if let Some(to) = spec {
            let from = opened.join(SPEC_ENTRY);
            if i == count {
                std::fs::rename(&from, to).with_context(|| {
                    format!("the replica {name:?} carries no profile spec (replicated with `cloud replicate`, not `profile replicate`)")
                })?;
            }
        }
        let _ = std::fs::remove_dir_all(&opened);
        let _ = std::fs::remove_file(&sealed);
    }
    recovery.finish().context("writing the recovered VM")?;
    Ok((count, bytes, chain))
}

/// Whether a checkpoint's manifest is checkpoint `seq` of `chain` of the replica `name`,
/// holding exactly a checkpoint's files.
fn check_manifest(m: &vault::Manifest, name: &str, chain: &str, seq: u64) -> Result<()> {
    let c = &m.config;
    if m.name != name
        || c.get("format").and_then(|v| v.as_str()) != Some(FORMAT)
        || c.get("chain").and_then(|v| v.as_str()) != Some(chain)
        || c.get("seq").and_then(serde_json::Value::as_u64) != Some(seq)
    {
        bail!(
            "checkpoint {seq} is not checkpoint {seq} of the chain {chain} of {name:?} (it says \
             {:?}, {}); nothing was written",
            m.name,
            c
        );
    }
    let mut names: Vec<&str> = m
        .entries
        .iter()
        .map(|e| e.name.as_str())
        .filter(|n| *n != SPEC_ENTRY)
        .collect();
    names.sort_unstable();
    let mut want = FILES.to_vec();
    want.sort_unstable();
    if names != want || m.entries.len() > FILES.len() + 1 {
        bail!("checkpoint {seq} holds {names:?}, not a checkpoint's files; nothing was written");
    }
    Ok(())
}

/// Removes the entries of `dir` named `PREFIX<pid>` whose process is gone (what a killed
/// recovery left: its temporary snapshot, disks and fetched files).
fn sweep_dead(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|p| p.parse::<libc::pid_t>().ok())
            .filter(|&p| p > 0)
        else {
            continue;
        };
        // SAFETY: kill(2) with signal 0 only checks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let p = e.path();
            let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
        }
    }
}

/// A hidden directory beside the output for the fetched files, removed when dropped.
struct FetchDir(PathBuf);

impl FetchDir {
    fn create(out: &Path) -> Result<FetchDir> {
        let name = out
            .file_name()
            .context("the output names no directory")?
            .to_string_lossy()
            .into_owned();
        let dir = out.with_file_name(format!(".{name}.fetch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(FetchDir(dir))
    }
}

impl Drop for FetchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_a_dead_process_left_is_swept() {
        let d = std::env::temp_dir().join(format!("pv-sweep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        // A pid that cannot be running: above the kernel's limit.
        let dead = d.join(".recover-2147483646");
        let mine = d.join(format!(".recover-{}", std::process::id()));
        std::fs::create_dir_all(dead.join("snapshot")).unwrap();
        std::fs::create_dir_all(&mine).unwrap();
        std::fs::write(d.join(".w.img.recovering-2147483646"), b"x").unwrap();
        std::fs::write(d.join(".recover-notapid"), b"x").unwrap();
        sweep_dead(&d, ".recover-");
        sweep_dead(&d, ".w.img.recovering-");
        assert!(!dead.exists());
        assert!(!d.join(".w.img.recovering-2147483646").exists());
        assert!(mine.exists() && d.join(".recover-notapid").exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn replicate_requests_and_periods_are_parsed_strictly() {
        let chain = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            parse_replicate(&format!("{chain} 7")),
            Ok((chain.into(), 7))
        );
        for bad in [
            format!("{chain} 0"),
            format!("{chain} 07"),
            format!("{chain} -1"),
            format!("{chain} 1 2"),
            chain.to_string(),
            "nothex0123456789abcdef0123456789 1".to_string(),
            "1".to_string(),
        ] {
            assert!(parse_replicate(&bad).is_err(), "{bad}");
        }
        assert_eq!(parse_period("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_period("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_period("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "s", "30", "10ms", "1h", "-1s"] {
            assert!(parse_period(bad).is_err(), "{bad}");
        }
    }
}
