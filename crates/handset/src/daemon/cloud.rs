//! Offload and return (issue 13, docs/cloud.md): a running profile migrates live to a cloud
//! host (`pocketvisor cloud serve`), where it runs as this device's twin of the same name,
//! and comes back later onto the copy the device kept.
//!
//! - **Offload**: the profile's VMM is asked to migrate (`Request::Migrate` with `twin` and
//!   `keep`) over TLS with this device's identity (`<state>/cloud/`); it writes the guest as
//!   it is at the switch into `profiles/<name>/cloud-kept/` before the commit. Once the host
//!   runs the guest the VMM ends, the host is recorded in `profiles/<name>/offloaded` and
//!   the profile is `offloaded`. A failure before the commit leaves the guest running here
//!   and the profile `running`.
//! - **Return**: a VMM process `pocketvisor cloud return` asks the host for the twin, answers
//!   with the digests of the kept copy and the profile's disks (only what differs comes
//!   back) and runs the guest once it has it; its API socket appears only then. A failure
//!   before that leaves the profile `offloaded`, its files as they were and the twin running.
//!
//! A jailed VMM (the default) reaches the host through this daemon ([`super::cloud_relay`]):
//! its seccomp filter allows no TCP and its root holds none of the device's identity. Its
//! offload migrates to a unix socket in its run directory and writes the kept copy there,
//! which is taken into the profile once the host runs the guest ([`crate::run_files`]). Its
//! return is `pocketvisor vmm --restore KEPT --return-twin NAME`, which asks for the twin
//! through the same relay before its guest runs (before the seccomp filter, where a restore
//! reads its snapshot); the disks it receives replace hard links of the profile's disks in
//! the run directory, which are then moved over the profile's disks.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_api::{MigrationTls, Request};

use super::intent::Intent;
use super::lifecycle::Event;
use super::Handset;
use crate::api_types::{ProfileInfo, ProfileState};
use crate::error::{Error, Result};
use crate::state_dir::{self, StateDir};
use crate::vmm_proc::{self, Launch};

/// How long the daemon waits for its VMM's answer to an offload (the migration bounds each
/// of its own steps: this is only the outer limit).
const OFFLOAD_TIMEOUT: Duration = Duration::from_secs(240);

/// This device's identity towards cloud hosts: the files of `<state>/cloud/`.
pub(super) struct Identity {
    pub(super) tls: MigrationTls,
    pub(super) key: PathBuf,
}

impl Identity {
    /// `VMM_BIN cloud OP NAME --from HOST --listen LISTEN` with this identity: a relay of a
    /// twin's socket (`view`, `vsock`) that ends with the daemon (`PR_SET_PDEATHSIG`) and
    /// when its handle is dropped. The caller sets its stdout and stderr.
    pub(super) fn relay_command(
        &self,
        vmm_bin: &std::path::Path,
        op: &str,
        name: &str,
        from: &str,
        listen: impl AsRef<std::ffi::OsStr>,
    ) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(vmm_bin);
        c.args(["cloud", op, name, "--from", from, "--listen"])
            .arg(listen)
            .arg("--key")
            .arg(&self.key)
            .arg("--tls-cert")
            .arg(&self.tls.cert)
            .arg("--tls-key")
            .arg(&self.tls.key)
            .arg("--tls-ca")
            .arg(&self.tls.ca)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        vmm_proc::end_with_daemon(&mut c);
        c
    }
}

/// The files of `<state>/cloud/`, each a regular file (not a link); the private key and the
/// migration key readable by their owner only.
pub(super) fn identity(dir: &StateDir) -> Result<Identity> {
    let root = dir.cloud();
    let missing = || {
        Error::Conflict(format!(
            "this handset has no identity towards cloud hosts: put its certificate \
             (cert.pem), private key (key.pem, mode 0600), the hosts' authority (ca.pem) and \
             the migration key (migration.key, mode 0600) in {} (docs/cloud.md)",
            root.display()
        ))
    };
    match std::fs::symlink_metadata(&root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::Conflict(format!(
                "{} is not a directory",
                root.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing()),
        Err(e) => return Err(Error::io(format!("cannot read {}", root.display()))(e)),
    }
    let file = |name: &str, secret: bool| -> Result<PathBuf> {
        let p = root.join(name);
        let m = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing()),
            Err(e) => return Err(Error::io(format!("cannot read {}", p.display()))(e)),
        };
        if !m.is_file() {
            return Err(Error::Conflict(format!(
                "{} is not a regular file",
                p.display()
            )));
        }
        if secret && m.permissions().mode() & 0o077 != 0 {
            return Err(Error::Conflict(format!(
                "{} is readable by others than its owner: chmod 600 it",
                p.display()
            )));
        }
        Ok(p)
    };
    Ok(Identity {
        tls: MigrationTls {
            cert: file("cert.pem", false)?,
            key: file("key.pem", true)?,
            ca: file("ca.pem", false)?,
        },
        key: file("migration.key", true)?,
    })
}

/// Checks a cloud host's address: `HOST:PORT`, HOST a DNS name, an IPv4 address or an IPv6
/// address in brackets, PORT 1-65535.
pub fn check_cloud_host(to: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::BadRequest(format!(
            "cloud host {:?}: {why} (HOST:PORT)",
            to.chars().take(80).collect::<String>()
        )))
    };
    let Some((host, port)) = to.rsplit_once(':') else {
        return bad("no port");
    };
    if !matches!(port.parse::<u16>(), Ok(p) if p > 0) || port.starts_with('+') {
        return bad("bad port");
    }
    let ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        (1..=253).contains(&host.len())
            && !host.starts_with(['-', '.'])
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    };
    if !ok {
        return bad("bad host");
    }
    Ok(())
}

/// The relay's socket in a jailed profile's run directory.
const RELAY_SOCKET: &str = "cloud.sock";
/// The copy of the migration key a jailed VMM reads, in its run directory, while it migrates.
const RELAY_KEY: &str = "cloud.key";
/// Where a jailed VMM writes the copy kept at its offload, in its run directory.
const KEPT_STAGED: &str = "cloud-kept";

/// Disk `i` of a jailed profile's return, in its run directory: a hard link of the
/// profile's disk, which the returned disk replaces at the commit.
fn returning_disk(run: &std::path::Path, i: usize) -> PathBuf {
    run.join(format!("return-{i}.img"))
}

/// Files removed when this is dropped.
struct Removed(Vec<PathBuf>);

impl Drop for Removed {
    fn drop(&mut self) {
        for f in &self.0 {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Writes `bytes` to a new file at `path`, mode 0600, owned by `uid` (and its equal gid).
fn write_private(path: &std::path::Path, bytes: &[u8], uid: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            std::os::unix::fs::fchown(&f, Some(uid), Some(uid))
        });
    written.map_err(Error::io(format!("cannot write {}", path.display())))
}

/// A jailed VMM's migration relayed by the daemon (see [`super::cloud_relay`]).
struct JailRelay {
    /// The relay's socket, in the VMM's run directory (host path).
    socket: PathBuf,
    /// The migration key's copy, in the VMM's run directory (host path).
    key_file: PathBuf,
    task: tokio::task::JoinHandle<std::result::Result<(u64, u64), String>>,
    _files: Removed,
}

impl Drop for JailRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JailRelay {
    /// Once the VMM answered: the relay's outcome (it ends when both ends close; a host that
    /// keeps its end open after the switch is not waited for long).
    async fn finish(mut self) -> std::result::Result<(), String> {
        match tokio::time::timeout(Duration::from_secs(2), &mut self.task).await {
            Ok(Ok(Ok(_))) => Ok(()),
            Ok(Ok(Err(why))) => Err(why),
            Ok(Err(e)) => Err(format!("the relay's task: {e}")),
            Err(_) => {
                self.task.abort();
                Ok(())
            }
        }
    }
}

/// `profiles/<name>/offloaded`.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    /// The cloud host, `HOST:PORT`.
    to: String,
    /// When the offload finished, ms since the epoch.
    time_ms: i64,
}

/// The cloud host an offloaded profile runs at, from its marker.
pub(super) fn offloaded_to(dir: &StateDir, name: &str) -> Option<String> {
    let text = std::fs::read(dir.offload_marker(name)).ok()?;
    let m: Marker = serde_json::from_slice(&text).ok()?;
    check_cloud_host(&m.to).ok()?;
    Some(m.to)
}

/// The line `pocketvisor cloud return` prints once the guest came back, from its log.
fn returned_line(log: &std::path::Path) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    String::from_utf8_lossy(&text)
        .lines()
        .rev()
        .find(|l| l.starts_with("returned bytes_received="))
        .unwrap_or("returned")
        .to_string()
}

impl Handset {
    /// Migrates running profile `name` live to the cloud host `to`, where it runs on as this
    /// device's twin `name`; the profile is then `offloaded`. On failure before the switch
    /// it runs on here.
    pub async fn offload(self: &Arc<Self>, name: &str, to: &str) -> Result<ProfileInfo> {
        crate::spec::check_name("profile name", name)?;
        check_cloud_host(to)?;
        let _ops = self.ops.lock().await;
        self.settle_pending(name).await?;
        self.registry.check(name, Event::Offload)?;
        let id = identity(self.dir())?;
        let kept = self.dir().cloud_kept(name);
        if kept.exists() {
            std::fs::remove_dir_all(&kept)
                .map_err(Error::io(format!("cannot remove {}", kept.display())))?;
        }
        let t0 = Instant::now();
        self.begin_intent(name, Intent::Offload)?;
        let info = match self.migrate_to_cloud(name, to, &id, Some(&kept)).await {
            Ok(info) => info,
            Err(e) => {
                // Before the commit the VMM resumed the guest: it runs on here. (After it,
                // the VMM says "in doubt" and keeps the guest paused; so does the error.)
                let _ = std::fs::remove_dir_all(&kept);
                self.end_intent(name);
                let e = Error::Conflict(format!("the offload of {name:?} to {to} failed: {e}"));
                self.registry.event(name, "offload-failed", &e.to_string());
                return Err(e);
            }
        };
        crate::fault::hold_point("offload-migrated").await;
        // The guest runs at the host: where is recorded first, then the VMM here (which
        // ends by itself once its migration is done) is waited for.
        let marker = Marker {
            to: to.to_string(),
            time_ms: crate::db::now_ms(),
        };
        let text = serde_json::to_vec(&marker).map_err(|e| Error::Internal(e.to_string()))?;
        state_dir::write_atomic(&self.dir().offload_marker(name), &text)?;
        let how = self.stop_vm(name).await?;
        // A jailed VMM wrote the kept copy: checked again now that it cannot change it.
        if let Err(e) = crate::run_files::check_plain_dir(&kept) {
            let _ = std::fs::remove_dir_all(&kept);
            self.registry.event(
                name,
                "kept-copy-refused",
                &format!("{e}; a return is refused without it"),
            );
        }
        self.registry
            .apply(name, Event::Offloaded, None, &format!("offloaded to {to}"))?;
        self.end_intent(name);
        self.registry.event(
            name,
            "offloaded",
            &format!("to {to}: {info}; {} ms; {how}", t0.elapsed().as_millis()),
        );
        self.start_cloud_screen(name).await;
        // In front with a screen, it stays there: the device screen shows its twin (read
        // again at once). Otherwise the foreground goes on as after any VMM's end.
        if self.current_foreground()?.as_deref() == Some(name) {
            self.device_screen.nudge();
        } else {
            self.place_after_exit(name).await?;
        }
        self.show(name)
    }

    /// Starts a live copy of running profile `name` at the cloud host `to` (this device's
    /// twin `name` there, of kind clone, with a vsock CID of its own), while the original
    /// runs on here; the profile's state does not change. On failure nothing runs there.
    pub async fn clone_to(self: &Arc<Self>, name: &str, to: &str) -> Result<ProfileInfo> {
        crate::spec::check_name("profile name", name)?;
        check_cloud_host(to)?;
        let _ops = self.ops.lock().await;
        self.settle_pending(name).await?;
        let state = self.registry.state(name)?;
        if state != ProfileState::Running {
            return Err(Error::Conflict(format!(
                "profile {name:?} is {}, not running: only a running guest is cloned",
                state.as_str()
            )));
        }
        let id = identity(self.dir())?;
        let t0 = Instant::now();
        match self.migrate_to_cloud(name, to, &id, None).await {
            Ok(info) => {
                self.registry.event(
                    name,
                    "cloned",
                    &format!("to {to}: {info}; {} ms", t0.elapsed().as_millis()),
                );
                // Where files move to and from (`profile file from-clone`, `to-clone`).
                if let Err(e) = self.registry.db().set_clone_host(name, Some(to)) {
                    tracing::warn!("{name}: its clone's host is not recorded: {e}");
                    self.registry
                        .event(name, "clone-unrecorded", &format!("at {to}: {e}"));
                }
                // The twin's notice to its guest, through its agent (if it has one).
                self.notify_twin(name, to).await;
                self.show(name)
            }
            Err(e) => {
                let e = Error::Conflict(format!("the clone of {name:?} to {to} failed: {e}"));
                self.registry.event(name, "clone-failed", &e.to_string());
                Err(e)
            }
        }
    }

    /// Migrates running profile `name` live to the cloud host `to` with this device's
    /// identity `id`: an offload keeping its copy in `keep`, or a clone without. A jailed VMM
    /// migrates through this daemon's relay and writes the kept copy in its run directory,
    /// taken into `keep` once the host runs the guest. The VMM's answer.
    async fn migrate_to_cloud(
        &self,
        name: &str,
        to: &str,
        id: &Identity,
        keep: Option<&std::path::Path>,
    ) -> Result<String> {
        let pid = self.supervisor.pid(name).unwrap_or(0);
        if !vmm_proc::is_jailed(pid) {
            let req = Request::Migrate {
                to: to.to_string(),
                key_file: id.key.clone(),
                downtime_ms: vmm_api::DEFAULT_DOWNTIME_MS,
                tls: Some(id.tls.clone()),
                twin: Some(name.to_string()),
                keep: keep.map(std::path::Path::to_path_buf),
                clone: keep.is_none(),
            };
            return vmm_proc::call(&self.dir().api_socket(name), &req, OFFLOAD_TIMEOUT).await;
        }
        let relay = self.jail_relay(name, to, id)?;
        let staged = self.dir().run(name).join(KEPT_STAGED);
        if keep.is_some() && std::fs::symlink_metadata(&staged).is_ok() {
            std::fs::remove_dir_all(&staged)
                .map_err(Error::io(format!("cannot remove {}", staged.display())))?;
        }
        let req = Request::Migrate {
            to: format!("unix:{}", self.jail_path(name, &relay.socket)?.display()),
            key_file: self.jail_path(name, &relay.key_file)?,
            downtime_ms: vmm_api::DEFAULT_DOWNTIME_MS,
            tls: None,
            twin: Some(name.to_string()),
            keep: match keep {
                Some(_) => Some(self.jail_path(name, &staged)?),
                None => None,
            },
            clone: keep.is_none(),
        };
        let answer = vmm_proc::call(&self.dir().api_socket(name), &req, OFFLOAD_TIMEOUT).await;
        let answer = match (answer, relay.finish().await) {
            (Err(e), Err(why)) => Err(Error::Vmm(format!("{e} (the relay: {why})"))),
            (answer, _) => answer,
        };
        match (keep, &answer) {
            // The guest runs at the host: without the kept copy a return is refused, which
            // is said, but the offload stands.
            (Some(keep), Ok(_)) => {
                if let Err(e) = crate::run_files::take_dir(&staged, keep) {
                    tracing::warn!("{name}: its kept copy: {e}");
                    self.registry.event(
                        name,
                        "kept-copy-refused",
                        &format!("{e}; a return is refused without it"),
                    );
                }
            }
            (Some(_), Err(_)) => {
                let _ = std::fs::remove_dir_all(&staged);
            }
            (None, _) => {}
        }
        answer
    }

    /// Sets up the relay of jailed profile `name`'s migration to or from the cloud host
    /// `to`: a unix socket and a copy of the migration key in its run directory, both the
    /// VMM's own (host paths in the answer).
    fn jail_relay(&self, name: &str, to: &str, id: &Identity) -> Result<JailRelay> {
        let run = self.dir().run(name);
        let uid = vmm_proc::jail_uid(self.registry.row(name)?.vsock_cid)?;
        let socket = run.join(RELAY_SOCKET);
        let key = run.join(RELAY_KEY);
        let listener = super::cloud_relay::listen(&socket, &self.dir().profile(name), uid)?;
        let files = Removed(vec![socket.clone(), key.clone()]);
        let bytes = std::fs::read(&id.key)
            .map_err(Error::io(format!("cannot read {}", id.key.display())))?;
        write_private(&key, &bytes, uid)?;
        Ok(JailRelay {
            socket,
            key_file: key,
            task: super::cloud_relay::start(listener, to.to_string(), id.tls.clone()),
            _files: files,
        })
    }

    /// Brings offloaded profile `name` back from its cloud host onto the copy kept at the
    /// offload and runs it here. On failure it stays `offloaded` and the twin runs on.
    pub async fn give_back(self: &Arc<Self>, name: &str) -> Result<ProfileInfo> {
        crate::spec::check_name("profile name", name)?;
        let _ops = self.ops.lock().await;
        self.settle_pending(name).await?;
        self.registry.check(name, Event::Return)?;
        let Some(from) = offloaded_to(self.dir(), name) else {
            return Err(Error::Internal(format!(
                "profile {name:?} is offloaded but {} does not say where",
                self.dir().offload_marker(name).display()
            )));
        };
        let id = identity(self.dir())?;
        let kept = self.dir().cloud_kept(name);
        if crate::run_files::check_plain_dir(&kept).is_err()
            || !kept.join(vmm_api::snapshot_files::COMPLETE_FILE).is_file()
        {
            return Err(Error::Conflict(format!(
                "profile {name:?} has no complete copy kept at its offload ({})",
                kept.display()
            )));
        }
        let spec = self.registry.spec(name)?;
        let disks: Vec<PathBuf> = spec
            .disks
            .iter()
            .map(|d| self.dir().disk(name, &d.name))
            .collect();
        for d in &disks {
            state_dir::check_regular_file("disk", d)?;
        }
        let run = self.dir().run(name);
        std::fs::create_dir_all(&run)
            .map_err(Error::io(format!("cannot create {}", run.display())))?;
        let t0 = Instant::now();
        // The returning VMM serves the profile's screen socket again.
        self.stop_cloud_screen(name).await;
        self.begin_intent(name, Intent::Return)?;
        let returned = self.receive_back(name, &spec, &from, &id, &disks).await;
        if let Err(e) = returned {
            self.start_cloud_screen(name).await;
            self.end_intent(name);
            let e = Error::Conflict(format!(
                "the return of {name:?} from {from} failed; it stays offloaded and runs on \
                 there: {e}"
            ));
            self.registry.event(name, "return-failed", &e.to_string());
            return Err(e);
        }
        self.settle_return(name);
        self.end_intent(name);
        self.supervisor.forget_restarts(name);
        self.registry.event(
            name,
            "returned",
            &format!(
                "from {from}: {}; {} ms",
                returned_line(&self.dir().vmm_log(name)),
                t0.elapsed().as_millis()
            ),
        );
        self.show(name)
    }

    /// Once the guest of profile `name` runs here after its return: the disks a jailed VMM
    /// received are moved over the profile's ([`Handset::take_returned_disks`]), and the kept
    /// copy (the return's base) and the offload's marker go.
    fn settle_return(&self, name: &str) {
        match self.registry.spec(name) {
            Ok(spec) => {
                let disks: Vec<PathBuf> = spec
                    .disks
                    .iter()
                    .map(|d| self.dir().disk(name, &d.name))
                    .collect();
                self.take_returned_disks(name, &disks);
            }
            Err(e) => tracing::warn!("{name}: after its return: {e}"),
        }
        self.remove_relay_files(name);
        for r in [
            std::fs::remove_dir_all(self.dir().cloud_kept(name)),
            std::fs::remove_file(self.dir().offload_marker(name)),
        ] {
            if let Err(e) = r {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("{name}: after its return: {e}");
                }
            }
        }
        let _ = state_dir::sync_dir(&self.dir().profile(name));
    }

    /// Runs the VMM that receives offloaded profile `name` back from the cloud host `from`
    /// onto its kept copy and `disks`, and waits until the guest runs here. A jailed VMM
    /// reaches the host through this daemon's relay.
    async fn receive_back(
        self: &Arc<Self>,
        name: &str,
        spec: &crate::spec::ProfileSpec,
        from: &str,
        id: &Identity,
        disks: &[PathBuf],
    ) -> Result<()> {
        let mut launch = Launch::Return {
            twin: name.to_string(),
            from: from.to_string(),
            base: self.dir().cloud_kept(name),
            tls: id.tls.clone(),
            key: id.key.clone(),
            serial: self.dir().serial_log(name),
            vsock: self.dir().vsock_socket(name),
            disks: disks.to_vec(),
        };
        if !self.opts.jail {
            return self.launch(name, spec, &launch).await;
        }
        let run = self.dir().run(name);
        super::supervisor::give_run_dir(
            &run,
            vmm_proc::jail_uid(self.registry.row(name)?.vsock_cid)?,
        )?;
        self.remove_return_leftovers(name);
        let relay = self.jail_relay(name, from, id)?;
        let mut links = Removed(Vec::new());
        let mut linked = Vec::with_capacity(disks.len());
        for (i, d) in disks.iter().enumerate() {
            let link = returning_disk(&run, i);
            let _ = std::fs::remove_file(&link);
            std::fs::hard_link(d, &link).map_err(Error::io(format!(
                "cannot link {} to {}",
                d.display(),
                link.display()
            )))?;
            links.0.push(link.clone());
            linked.push(link);
        }
        if let Launch::Return {
            from, key, disks, ..
        } = &mut launch
        {
            *from = format!("unix:{}", relay.socket.display());
            key.clone_from(&relay.key_file);
            *disks = linked;
        }
        if let Err(e) = self.launch(name, spec, &launch).await {
            drop(relay);
            self.remove_return_leftovers(name);
            return Err(e);
        }
        crate::fault::hold_point("return-launched").await;
        if let Err(why) = relay.finish().await {
            tracing::warn!("{name}: the return's relay: {why}");
        }
        Ok(())
    }

    /// Moves the disks a jailed VMM received at a return (`run/return-<i>.img`) over the
    /// profile's `disks`, once its guest runs here; a disk not there (an unjailed return, or
    /// one already moved) is left as it is. The guest runs on whatever happens: a disk that
    /// cannot be taken (not a regular file, an I/O error) is said in an event.
    fn take_returned_disks(&self, name: &str, disks: &[PathBuf]) {
        let run = self.dir().run(name);
        for (i, d) in disks.iter().enumerate() {
            let from = returning_disk(&run, i);
            if std::fs::symlink_metadata(&from).is_err() {
                continue;
            }
            if let Err(e) = crate::run_files::take_file(&from, d) {
                tracing::warn!("{name}: its returned disk {i}: {e}");
                self.registry.event(
                    name,
                    "returned-disk-not-taken",
                    &format!(
                        "disk {i}: {e}; the guest runs on it from {}",
                        from.display()
                    ),
                );
            }
        }
    }

    /// Removes the relay's socket and key from `name`'s run directory (a daemon that died
    /// during a jailed migration left them).
    fn remove_relay_files(&self, name: &str) {
        let run = self.dir().run(name);
        let _ = std::fs::remove_file(run.join(RELAY_SOCKET));
        let _ = std::fs::remove_file(run.join(RELAY_KEY));
    }

    /// Removes what a jailed return that did not finish left in `name`'s run directory: the
    /// relay's socket and key, the links of the disks and the temporary files of the disks
    /// it was receiving (`.return-<i>.img.migrating-<pid>`: a jailed VMM is pid 1 of its
    /// namespace, so the receiver cannot tell a killed one's from its own).
    fn remove_return_leftovers(&self, name: &str) {
        let run = self.dir().run(name);
        self.remove_relay_files(name);
        let Ok(entries) = std::fs::read_dir(&run) else {
            return;
        };
        for e in entries.flatten() {
            let n = e.file_name();
            let Some(n) = n.to_str() else { continue };
            let n = n
                .strip_prefix('.')
                .and_then(|t| t.split_once(".migrating-"))
                .map_or(n, |(disk, _pid)| disk);
            let is_disk = n
                .strip_prefix("return-")
                .and_then(|n| n.strip_suffix(".img"))
                .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()));
            if is_disk {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// The VMM of a return an earlier daemon started for offloaded profile `name` (its
    /// intent `return`), if it still runs.
    pub(super) fn returning_vmm(&self, name: &str, state: &str) -> Option<i32> {
        if ProfileState::parse(state) != ProfileState::Offloaded {
            return None;
        }
        let intent = std::fs::read_to_string(self.dir().intent(name)).ok()?;
        if intent.trim() != "return" {
            return None;
        }
        let api = self.dir().api_socket(name);
        vmm_proc::find_vmms(&self.opts.vmm_bin, &api)
            .into_iter()
            .next()
    }

    /// At daemon start: the return an earlier daemon left under way. Its VMM answers on its
    /// API socket once the guest runs here: then it is adopted and the profile is running,
    /// as if that daemon had seen it. A VMM that is gone, or does not answer within a
    /// resume's time, did not bring the guest here: the profile stays offloaded (the twin
    /// runs on, unless that VMM died after its commit: the guest is then in doubt at the
    /// host, paused, as any migration's). Whether the profile was settled here.
    pub(super) async fn finish_return(self: &Arc<Self>, name: &str) -> Result<bool> {
        let row = self.registry.row(name)?;
        let Some(pid) = self.returning_vmm(name, &row.state) else {
            self.remove_return_leftovers(name);
            self.registry.event(
                name,
                "return-rolled-back",
                "its VMM was gone after a daemon restart; the profile stays offloaded",
            );
            return Ok(false);
        };
        let api = self.dir().api_socket(name);
        let deadline = Instant::now() + super::SNAPSHOT_TIMEOUT;
        while vmm_proc::call(&api, &Request::Stats, super::CALL_TIMEOUT)
            .await
            .is_err()
        {
            if !vmm_proc::alive(pid) || Instant::now() > deadline {
                vmm_proc::kill_group(pid, libc::SIGKILL);
                self.cleanup_run(name);
                self.remove_return_leftovers(name);
                self.registry.event(
                    name,
                    "return-rolled-back",
                    "its VMM did not run the guest after a daemon restart; the profile stays \
                     offloaded",
                );
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.enter_cgroup_again(name, pid)?;
        self.adopt(name, pid)?;
        self.registry.apply(
            name,
            Event::Launched,
            Some(pid),
            "return finished after a daemon restart",
        )?;
        self.settle_return(name);
        self.returned_after_restart(name, pid);
        Ok(true)
    }

    /// The event `returned` of a return the next daemon finished, VMM `pid`.
    fn returned_after_restart(&self, name: &str, pid: i32) {
        self.registry.event(
            name,
            "returned",
            &format!(
                "finished after a daemon restart: pid {pid}; {}",
                returned_line(&self.dir().vmm_log(name))
            ),
        );
    }

    /// At daemon start: a return whose guest ran here (the profile `running`) before the
    /// daemon that started it was done with it. The return is settled
    /// ([`Handset::settle_return`]: the disks it received are the guest's, even if its VMM
    /// has died since); a VMM that runs on is adopted as any running one, after this.
    pub(super) fn finish_returned(&self, name: &str) -> Result<()> {
        let row = self.registry.row(name)?;
        let api = self.dir().api_socket(name);
        self.settle_return(name);
        let Some(pid) = row
            .pid
            .filter(|&p| vmm_proc::is_our_vmm(p, &self.opts.vmm_bin, &api))
        else {
            return Ok(());
        };
        self.enter_cgroup_again(name, pid)?;
        self.returned_after_restart(name, pid);
        Ok(())
    }

    /// Puts the VMM `pid` of profile `name`, started by an earlier daemon, in this daemon's
    /// cgroup (that daemon may have had another parent).
    fn enter_cgroup_again(&self, name: &str, pid: i32) -> Result<()> {
        let spec = self.registry.spec(name)?;
        if let Err(e) = self
            .cgroups
            .enter(name, pid, spec.memory_max(), spec.cpu.background)
        {
            tracing::warn!("{name}: the returned VMM stays out of its cgroup: {e}");
        }
        Ok(())
    }

    /// At daemon start or before a step: an offload whose VMM is gone and whose marker was
    /// written finished (the guest runs at the host); records it. Whether it did.
    pub(super) fn finish_offload(&self, name: &str, state: ProfileState) -> Result<bool> {
        if !matches!(state, ProfileState::Running | ProfileState::Paused)
            || offloaded_to(self.dir(), name).is_none()
        {
            return Ok(false);
        }
        self.cleanup_run(name);
        self.registry.apply(
            name,
            Event::Offloaded,
            None,
            "offload finished after restart",
        )?;
        self.registry
            .event(name, "offloaded", "finished after a daemon restart");
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cloud_host_is_host_colon_port_and_nothing_else() {
        for ok in [
            "cloud.example:7000",
            "127.0.0.1:1",
            "[::1]:65535",
            "a-b.c:443",
        ] {
            assert!(check_cloud_host(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "cloud.example",
            "cloud.example:0",
            "cloud.example:65536",
            "cloud.example:+7",
            ":7000",
            "-x:7000",
            "a b:7000",
            "a/b:7000",
            "[nonsense]:7000",
            "https://cloud.example:7000",
            "a\n:7000",
        ] {
            assert!(check_cloud_host(bad).is_err(), "{bad:?}");
        }
    }
}
