//! The registry: the profiles as the database and the state directory hold them, and every
//! state change recorded through the [`lifecycle`] table.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use vmm_api::{DiskConfig, NetConfig, SerialConfig, VmConfig, VsockConfig};

use super::lifecycle::{self, Event, Step};
use crate::api_types::{ProfileInfo, ProfileState};
use crate::audit_key::AuditKey;
use crate::db::{Db, Log, ProfileRow};
use crate::error::{Error, Result};
use crate::spec::{legacy_asset_paths, LegacyAsset, ProfileSpec, PROBE_KERNEL};
use crate::state_dir::{self, StateDir};
use crate::vmm_proc;

/// The profiles: registry rows, spec files, disks, event and audit logs.
pub(super) struct Registry {
    dir: StateDir,
    probe: Option<PathBuf>,
    db: Mutex<Db>,
    audit_key: AuditKey,
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    /// Opens the state directory (creating it) and the database.
    pub(super) fn open(dir: StateDir, probe: Option<PathBuf>) -> Result<Self> {
        state_dir::create_private_dir(dir.root())?;
        state_dir::create_private_dir(&dir.profiles())?;
        state_dir::create_private_dir(&dir.assets())?;
        let db = Db::open(&dir.db())?;
        let audit_key = AuditKey::load_or_create(&dir.audit_key())?;
        Ok(Self {
            dir,
            probe,
            db: Mutex::new(db),
            audit_key,
        })
    }

    /// The state directory.
    pub(super) fn dir(&self) -> &StateDir {
        &self.dir
    }

    /// The probe guest, if installed.
    pub(super) fn probe(&self) -> Option<&PathBuf> {
        self.probe.as_ref()
    }

    /// The keyed digest of `data` for the audit log (see [`AuditKey`]).
    pub(super) fn audit_digest(&self, data: &[u8]) -> String {
        self.audit_key.digest(data)
    }

    /// The database.
    pub(super) fn db(&self) -> MutexGuard<'_, Db> {
        guard(&self.db)
    }

    /// Appends a lifecycle event (failures to record are logged, not fatal).
    pub(super) fn event(&self, profile: &str, event: &str, detail: &str) {
        tracing::info!(profile, event, detail, "lifecycle");
        if let Err(e) = self.db().record(Log::Events, profile, event, detail) {
            tracing::error!("cannot record event {event} for {profile}: {e}");
        }
    }

    /// Appends an audit record.
    pub(super) fn audit(&self, profile: &str, action: &str, detail: &str) {
        if let Err(e) = self.db().record(Log::Audit, profile, action, detail) {
            tracing::error!("cannot record audit {action} for {profile}: {e}");
        }
    }

    /// The registry row of `name`.
    pub(super) fn row(&self, name: &str) -> Result<ProfileRow> {
        self.db()
            .profile(name)?
            .ok_or_else(|| Error::NotFound(name.to_string()))
    }

    /// The state of `name`.
    pub(super) fn state(&self, name: &str) -> Result<ProfileState> {
        Ok(ProfileState::parse(&self.row(name)?.state))
    }

    /// The spec of `name`. One written before guest assets were confined (a host path as
    /// kernel or initrd) is refused with what to do about it.
    pub(super) fn spec(&self, name: &str) -> Result<ProfileSpec> {
        let text = self.spec_text(name)?;
        ProfileSpec::from_toml(&text).map_err(|e| match legacy_asset_paths(&text) {
            Some((_, assets)) => Error::BadRequest(self.legacy_message(name, &assets)),
            None => e,
        })
    }

    fn spec_text(&self, name: &str) -> Result<String> {
        let path = self.dir.spec(name);
        std::fs::read_to_string(&path).map_err(|e| {
            // An unknown profile is a 404, not a 500 "cannot read" of its missing spec file.
            if e.kind() == std::io::ErrorKind::NotFound {
                if let Err(unknown @ Error::NotFound(_)) = self.row(name) {
                    return unknown;
                }
            }
            Error::io(format!("cannot read {}", path.display()))(e)
        })
    }

    fn legacy_message(&self, name: &str, assets: &[LegacyAsset]) -> String {
        let each: Vec<String> = assets
            .iter()
            .map(|a| {
                format!(
                    "copy {} to {} ({} = {:?})",
                    a.path,
                    self.dir.asset(&a.file).display(),
                    a.field,
                    a.file
                )
            })
            .collect();
        format!(
            "{} names its {} by a host path, which specs no longer may (guest assets are file \
             names in {}): {}, then restart the handset daemon, which rewrites the spec; or \
             delete the profile",
            self.dir.spec(name).display(),
            assets
                .iter()
                .map(|a| a.field)
                .collect::<Vec<_>>()
                .join(" and "),
            self.dir.assets().display(),
            each.join("; ")
        )
    }

    /// Rewrites a spec from before guest assets were confined to name its assets by file
    /// name, once each is in the asset directory (never copying a host path there: the old
    /// spec may name any host file). Returns what it did, or None if nothing was to do.
    pub(super) fn migrate_legacy_spec(&self, name: &str) -> Result<Option<String>> {
        let text = self.spec_text(name)?;
        if ProfileSpec::from_toml(&text).is_ok() {
            return Ok(None);
        }
        let Some((migrated, assets)) = legacy_asset_paths(&text) else {
            return Ok(None);
        };
        if assets.iter().any(|a| !self.dir.asset(&a.file).is_file()) {
            return Err(Error::BadRequest(self.legacy_message(name, &assets)));
        }
        state_dir::write_atomic(&self.dir.spec(name), migrated.as_bytes())?;
        let what: Vec<String> = assets
            .iter()
            .map(|a| format!("{} {} -> {:?}", a.field, a.path, a.file))
            .collect();
        Ok(Some(what.join(", ")))
    }

    /// What `event` would do to `name` now; a refusal is a conflict.
    pub(super) fn check(&self, name: &str, event: Event) -> Result<Step> {
        let state = self.state(name)?;
        lifecycle::step(state, event).map_err(|r| Error::Conflict(r.message(name)))
    }

    /// Records `event` for `name`: its new state (by the lifecycle table), `pid` and `detail`.
    pub(super) fn apply(
        &self,
        name: &str,
        event: Event,
        pid: Option<i32>,
        detail: &str,
    ) -> Result<ProfileState> {
        let db = self.db();
        let row = db
            .profile(name)?
            .ok_or_else(|| Error::NotFound(name.to_string()))?;
        let step = lifecycle::step(ProfileState::parse(&row.state), event)
            .map_err(|r| Error::Conflict(r.message(name)))?;
        db.set_state(name, step.next.as_str(), pid, detail)?;
        Ok(step.next)
    }

    /// The API's view of a profile.
    pub(super) fn info(&self, mut row: ProfileRow) -> Result<ProfileInfo> {
        let spec = match self.spec(&row.name) {
            Ok(spec) => spec,
            Err(e) => {
                // Listed all the same (its spec as written), saying why it cannot start.
                let text = self.spec_text(&row.name)?;
                let Ok(raw) = toml::from_str::<ProfileSpec>(&text) else {
                    return Err(e);
                };
                row.detail = e.to_string();
                raw
            }
        };
        let state = ProfileState::parse(&row.state);
        let live = matches!(state, ProfileState::Running | ProfileState::Paused);
        let weight = if row.foreground {
            spec.cpu.foreground
        } else {
            spec.cpu.background
        };
        let cpu_weight = live.then_some(weight);
        let rss_kib = row.pid.filter(|_| live).and_then(vmm_proc::rss_kib);
        Ok(ProfileInfo {
            name: row.name.clone(),
            state,
            pid: row.pid,
            foreground: row.foreground,
            vsock_cid: row.vsock_cid,
            created_ms: row.created_ms,
            started_ms: row.started_ms,
            detail: row.detail,
            cpu_weight,
            rss_kib,
            serial_log: self.dir.serial_log(&row.name).display().to_string(),
            moved_to: self.moved_to(&row.name),
            offloaded_to: (state == ProfileState::Offloaded)
                .then(|| super::cloud::offloaded_to(&self.dir, &row.name))
                .flatten(),
            cloned_to: self.db().clone_host(&row.name).ok().flatten(),
            locked: crate::lock::is_locked(&self.dir, &row.name),
            agent: None,
            spec,
        })
    }

    /// The file an export moved `name` to, if it is marked as moved.
    pub(super) fn moved_to(&self, name: &str) -> Option<String> {
        crate::moved::moved_to(&self.dir, name)
    }

    /// Creates a profile's files (spec, sparse disks) and its row; on failure nothing is left.
    pub(super) fn create(&self, spec: &ProfileSpec) -> Result<()> {
        let name = &spec.name;
        if self.db().profile(name)?.is_some() {
            return Err(Error::Conflict(format!("profile {name:?} already exists")));
        }
        let dir = self.dir.profile(name);
        if crate::leftovers::import_in_progress(&self.dir, name) {
            return Err(Error::Conflict(format!(
                "profile {name:?} is being imported"
            )));
        }
        // A directory without a registry row is debris of an interrupted create: replace it.
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(Error::io(format!("cannot remove {}", dir.display())))?;
        }
        let made = (|| {
            // Only the daemon (root) may read a profile's disks and sockets.
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(Error::io(format!("cannot create {}", dir.display())))?;
            std::fs::create_dir_all(self.dir.disks(name))
                .map_err(Error::io(format!("cannot create {}", dir.display())))?;
            std::fs::create_dir_all(self.dir.run(name))
                .map_err(Error::io(format!("cannot create {}", dir.display())))?;
            let mut spec = spec.clone();
            // The data key first, stored wrapped before any disk holds data under it.
            let profile_key = spec
                .encrypt_at_rest
                .then(|| crate::disk_keys::create_profile_key(&self.dir, name))
                .transpose()?;
            for d in &mut spec.disks {
                let path = self.dir.disk(name, &d.name);
                let cipher = profile_key
                    .as_ref()
                    .map(|k| crate::disk_keys::disk_key(k, &d.name))
                    .transpose()?
                    .map(|k| crate::disk_crypt::SectorCipher::new(&k))
                    .transpose()?;
                match &d.image {
                    None => {
                        d.image_sha256 = None;
                        state_dir::create_sparse(&path, d.size_mib)?;
                    }
                    Some(image) => {
                        let copied = state_dir::create_from_image(
                            &path,
                            &self.dir.asset(image),
                            d.size_mib,
                            cipher.as_ref(),
                        )?;
                        d.size_mib = copied.size_mib;
                        d.image_sha256 = Some(copied.sha256);
                    }
                }
            }
            state_dir::write_atomic(&self.dir.spec(name), spec.to_toml()?.as_bytes())?;
            state_dir::sync_dir(&self.dir.profiles())?;
            self.db().insert_profile(name)
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(())
    }

    /// Removes a profile's files and its row.
    pub(super) fn remove(&self, name: &str) -> Result<()> {
        // All or nothing across a crash (crate::leftovers): the directory leaves the
        // profile's name in one rename, then the row goes, then the files; a daemon that
        // dies in between finishes the delete at its next start.
        let dir = self.dir.profile(name);
        let doomed = self.dir.deleting(name);
        if doomed.exists() {
            std::fs::remove_dir_all(&doomed)
                .map_err(Error::io(format!("cannot remove {}", doomed.display())))?;
        }
        match std::fs::rename(&dir, &doomed) {
            Ok(()) => state_dir::sync_dir(&self.dir.profiles())?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("cannot remove {}", dir.display()))(e)),
        }
        crate::fault::kill_point("delete-renamed");
        self.db().delete_profile(name)?;
        crate::fault::kill_point("delete-unregistered");
        if let Err(e) = std::fs::remove_dir_all(&doomed) {
            // The row is gone, so the profile is; the next daemon start removes the rest.
            tracing::warn!("cannot remove {}: {e}", doomed.display());
        }
        Ok(())
    }

    /// Checks that the guest assets `spec` names (a kernel other than the probe, an initrd)
    /// are regular files in the asset directory, so a spec naming a missing file, a directory
    /// or a FIFO is refused at create (400), not at its first start. Start checks again: an
    /// asset can change in between.
    pub(super) fn check_assets(&self, spec: &ProfileSpec) -> Result<()> {
        let assets = self.dir.assets();
        let check = |what: &str, file: &str| {
            state_dir::check_regular_file(what, &self.dir.asset(file)).map_err(|e| match e {
                Error::BadRequest(m) => Error::BadRequest(format!(
                    "{m} (guest assets are regular files in {})",
                    assets.display()
                )),
                other => other,
            })
        };
        match &spec.firmware {
            Some(firmware) => check("firmware", firmware)?,
            None if spec.kernel != PROBE_KERNEL => check("kernel", &spec.kernel)?,
            None => {}
        }
        if let Some(initrd) = &spec.initrd {
            check("initrd", &initrd.to_string_lossy())?;
        }
        for image in spec.disks.iter().filter_map(|d| d.image.as_deref()) {
            check("disk image", image)?;
        }
        Ok(())
    }

    fn kernel_path(&self, spec: &ProfileSpec) -> Result<PathBuf> {
        if spec.kernel == PROBE_KERNEL {
            return self.probe.clone().ok_or_else(|| {
                Error::BadRequest(
                    "kernel \"probe\": the probe guest is not installed (build it with \
                     guest/build-probe.sh or start the daemon with --probe PATH)"
                        .into(),
                )
            });
        }
        Ok(self.dir.asset(&spec.kernel))
    }

    /// Checks that every file `cfg` hands the VMM (kernel, initrd, disks) is a regular file,
    /// without opening anything that could block (a FIFO, a device): refused before a VMM
    /// is spawned.
    pub(super) fn check_guest_files(&self, cfg: &VmConfig) -> Result<()> {
        match &cfg.firmware {
            Some(firmware) => state_dir::check_regular_file("firmware", firmware)?,
            None => state_dir::check_regular_file("kernel", &cfg.kernel)?,
        }
        if let Some(initrd) = &cfg.initrd {
            state_dir::check_regular_file("initrd", initrd)?;
        }
        for d in &cfg.disks {
            state_dir::check_regular_file("disk", &d.path)?;
        }
        Ok(())
    }

    /// The VM configuration for `spec`, all paths inside the profile's directory.
    pub(super) fn vm_config(&self, spec: &ProfileSpec, cid: u32) -> Result<VmConfig> {
        let name = &spec.name;
        let mut cfg = match &spec.firmware {
            Some(firmware) => {
                let mut cfg = VmConfig::new(PathBuf::new());
                cfg.firmware = Some(self.dir.asset(firmware));
                cfg
            }
            None => VmConfig::new(self.kernel_path(spec)?),
        };
        cfg.initrd = spec
            .initrd
            .as_ref()
            .map(|i| self.dir.asset(&i.to_string_lossy()));
        cfg.cmdline = spec.cmdline.clone();
        cfg.memory_mib = spec.memory_mib;
        cfg.vcpus = spec.vcpus;
        cfg.disks = spec
            .disks
            .iter()
            .map(|d| DiskConfig {
                path: self.dir.disk(name, &d.name),
                read_only: d.read_only,
                encrypted: spec.encrypt_at_rest,
                key: None,
            })
            .collect();
        cfg.net = spec
            .net
            .iter()
            .map(|tap| NetConfig {
                tap: tap.clone(),
                mac: None,
                filter: None,
            })
            .collect();
        if !cfg.net.is_empty() {
            let filter = crate::org_policy::net_filter(&self.dir, name)?;
            for n in &mut cfg.net {
                n.filter = filter.clone();
            }
        }
        cfg.vsock = Some(VsockConfig {
            cid: u64::from(cid),
            socket: self.dir.vsock_socket(name),
        });
        cfg.rng = true;
        cfg.balloon = spec.balloon;
        if spec.screen {
            cfg.gpu = Some(vmm_api::config::GpuConfig {
                width: spec.display.width,
                height: spec.display.height,
                ..Default::default()
            });
            cfg.input = true;
        }
        cfg.mergeable = spec.mergeable;
        cfg.serial = SerialConfig::File(self.dir.serial_log(name));
        cfg.validate()
            .map_err(|e| Error::BadRequest(e.to_string()))?;
        Ok(cfg)
    }
}
