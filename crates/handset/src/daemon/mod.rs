//! The handset daemon's core, in four parts:
//!
//! - [`lifecycle`]: the profile state machine, every transition in one table;
//! - `registry`: the profiles in the database and the state directory, each state change
//!   recorded through the lifecycle table;
//! - `supervisor`: the VMM processes, their watchers, crash restarts, adoption, stopping;
//! - `foreground`: switching, CPU weights, pausing `background = "pause"` profiles.
//!
//! Beside them, [`replicate`] runs each replicated profile's `cloud replicate` while it runs.
//!
//! [`Handset`] ties them together behind the API's operations. Lifecycle changes (create,
//! start, stop, suspend, resume, switch, delete, crash handling) are serialised by one async
//! lock, so the API can be called concurrently. Each running profile has a watcher task that
//! notices its VMM's exit (tokio's child wait for processes this daemon started, a pidfd for
//! ones adopted from an earlier daemon).

pub mod clone_files;
mod cloud;
mod cloud_relay;
mod cloud_screen;
pub mod device_screen;
mod foreground;
mod intent;
pub mod lifecycle;
mod lock;
pub mod managed;
pub mod pause;
mod registry;
pub mod replicate;
pub mod settings;
mod supervisor;
pub mod view;
pub mod wipe;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_api::jail::{jail_host_paths, JailPlan};
use vmm_api::Request;

use crate::api_types::{CreateProfile, DaemonInfo, ProfileInfo, ProfileState};
use crate::cgroup::Cgroups;
use crate::db::{Event as LogEvent, Log};
use crate::error::{Error, Result};
use crate::spec::RestartPolicy;
use crate::state_dir::{self, StateDir};
use crate::vmm_proc::{self, Launch};
use intent::Intent;
use lifecycle::{Action, Event};
use registry::Registry;
use supervisor::Supervisor;

/// How long a VMM has to create its API socket after being started.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a VMM has to exit after `{"op":"stop"}`, and again after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// Timeout of pause/resume/stop requests to a VMM.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the daemon checks that each running profile's policy still lets it run
/// (expiry, offline limit); one that may not is locked: suspended.
pub const POLICY_CHECK_EVERY: Duration = Duration::from_secs(5);
/// Timeout of taking a VMM's network refusals (short: it comes before a stop too).
const DROPS_TIMEOUT: Duration = Duration::from_secs(2);
/// Timeout of a snapshot request.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Daemon settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// The state directory.
    pub state_dir: StateDir,
    /// The `pocketvisor` binary that runs VMMs.
    pub vmm_bin: PathBuf,
    /// The probe guest (`kernel = "probe"`), if installed.
    pub probe: Option<PathBuf>,
    /// cgroup parent group name (one path component).
    pub cgroup_parent: String,
    /// Boot VMMs jailed (`pocketvisor vmm`) instead of `pocketvisor run`.
    pub jail: bool,
    /// Where the browser phone listens (none: no phone).
    pub phone: Option<crate::phone::PhoneConfig>,
    /// How often the frames the network policy refused are written to the audit log
    /// ([`crate::net_drops`]; default [`crate::net_drops::DEFAULT_EVERY`]).
    pub drop_audit_every: Duration,
    /// The organisation's MDM this handset enrolls with and obeys (none: not managed).
    pub mdm: Option<crate::mdm_link::MdmOptions>,
}

/// The daemon state shared by the API handlers and the watcher tasks.
pub struct Handset {
    opts: Options,
    registry: Registry,
    supervisor: Supervisor,
    ops: tokio::sync::Mutex<()>,
    cgroups: Cgroups,
    agents: crate::agents::AgentCache,
    consoles: crate::console::Attached,
    closing: std::sync::atomic::AtomicBool,
    views: view::Views,
    cloud_screens: cloud_screen::CloudScreens,
    device_screen: device_screen::DeviceScreen,
    replicas: replicate::Replicas,
    mdm_status: std::sync::Mutex<Option<crate::mdm_link::MdmStatus>>,
}

impl Handset {
    /// Opens the state directory (creating it), the database and the cgroups.
    pub fn open(opts: Options) -> Result<Arc<Self>> {
        let registry = Registry::open(opts.state_dir.clone(), opts.probe.clone())?;
        let cgroups = Cgroups::detect(&opts.cgroup_parent);
        Ok(Arc::new(Self {
            opts,
            registry,
            supervisor: Supervisor::default(),
            ops: tokio::sync::Mutex::new(()),
            cgroups,
            agents: crate::agents::AgentCache::default(),
            consoles: crate::console::Attached::default(),
            closing: std::sync::atomic::AtomicBool::new(false),
            views: view::Views::default(),
            cloud_screens: cloud_screen::CloudScreens::default(),
            device_screen: device_screen::DeviceScreen::default(),
            replicas: replicate::Replicas::default(),
            mdm_status: std::sync::Mutex::new(None),
        }))
    }

    /// Marks the daemon as stopping: open event streams end (so the API server's graceful
    /// shutdown does not wait for them forever).
    pub fn close_streams(&self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The profiles with a console attached.
    pub(crate) fn consoles(&self) -> &crate::console::Attached {
        &self.consoles
    }

    /// Whether [`Self::close_streams`] was called.
    pub fn closing(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The state directory.
    pub fn dir(&self) -> &StateDir {
        self.registry.dir()
    }

    /// The keyed digest of transferred `data` for the audit log (HMAC-SHA256 under the
    /// handset's `audit.key`: short contents cannot be recovered by guessing).
    pub fn audit_digest(&self, data: &[u8]) -> String {
        self.registry.audit_digest(data)
    }

    /// Appends an audit record.
    pub fn audit(&self, profile: &str, action: &str, detail: &str) {
        self.registry.audit(profile, action, detail);
    }

    /// Changes how the link to the MDM stands (made on first use).
    pub(crate) fn update_mdm_status(&self, f: impl FnOnce(&mut crate::mdm_link::MdmStatus)) {
        let mut st = self.mdm_status.lock().unwrap_or_else(|e| e.into_inner());
        let st = st.get_or_insert_with(|| crate::mdm_link::MdmStatus {
            server: String::new(),
            device_id: None,
            state: "enrolling".into(),
            detail: None,
            last_contact: None,
            commands_done: 0,
            commands_refused: 0,
        });
        f(st);
    }

    /// How the link to the MDM stands, if the handset has one.
    pub fn mdm_status(&self) -> Option<crate::mdm_link::MdmStatus> {
        self.mdm_status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The MDM this daemon was started with, if any.
    pub fn mdm_options(&self) -> Option<&crate::mdm_link::MdmOptions> {
        self.opts.mdm.as_ref()
    }

    /// Daemon facts for `GET /v1/handset`.
    pub fn daemon_info(&self) -> Result<DaemonInfo> {
        let rows = self.registry.db().profiles()?;
        Ok(DaemonInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            state_dir: self.dir().root().display().to_string(),
            schema_version: self.registry.db().version()?,
            cgroups: self.cgroups.info(),
            probe: self.registry.probe().map(|p| p.display().to_string()),
            foreground: rows.iter().find(|r| r.foreground).map(|r| r.name.clone()),
            profiles: rows.len(),
            running: rows.iter().filter(|r| r.pid.is_some()).count(),
            phone: self.phone_url(),
            mdm: self.mdm_status(),
        })
    }

    /// All profiles.
    pub fn list(&self) -> Result<Vec<ProfileInfo>> {
        let rows = self.registry.db().profiles()?;
        rows.into_iter().map(|r| self.registry.info(r)).collect()
    }

    /// All profiles, with the agent each running guest has ([`crate::agents`]).
    pub async fn list_with_agents(&self) -> Result<Vec<ProfileInfo>> {
        let mut list = self.list()?;
        self.agents.fill(self.dir(), &mut list).await;
        Ok(list)
    }

    /// One profile, with the agent its guest has.
    pub async fn show_with_agent(&self, name: &str) -> Result<ProfileInfo> {
        let mut p = [self.show(name)?];
        self.agents.fill(self.dir(), &mut p).await;
        let [p] = p;
        Ok(p)
    }

    /// One profile.
    pub fn show(&self, name: &str) -> Result<ProfileInfo> {
        crate::spec::check_name("profile name", name)?;
        let row = self.registry.row(name)?;
        self.registry.info(row)
    }

    /// The newest `limit` records of `log` (`profile` None: all profiles), oldest first; a
    /// deleted profile's too. A name checked, never a 404.
    pub fn history(&self, log: Log, profile: Option<&str>, limit: u32) -> Result<Vec<LogEvent>> {
        if let Some(p) = profile {
            crate::spec::check_name("profile name", p)?;
        }
        self.registry.db().records(log, profile, limit)
    }

    /// An existing profile's lifecycle events, oldest first (a deleted one is a 404 here,
    /// like every `/v1/profiles/NAME` route; its history stays in [`Self::history`]).
    pub fn profile_events(&self, name: &str, limit: u32) -> Result<Vec<LogEvent>> {
        crate::spec::check_name("profile name", name)?;
        if self.registry.db().profile(name)?.is_none() {
            return Err(Error::NotFound(name.to_string()));
        }
        self.registry.db().records(Log::Events, Some(name), limit)
    }

    /// Lifecycle events (`profile` None: all), oldest first; a profile that never had any
    /// (never created) is a 404.
    pub fn events(&self, log: Log, profile: Option<&str>, limit: u32) -> Result<Vec<LogEvent>> {
        if let Some(p) = profile {
            crate::spec::check_name("profile name", p)?;
        }
        let records = self.registry.db().records(log, profile, limit)?;
        // A deleted profile keeps its history; a name that never existed is a 404.
        if let Some(p) = profile {
            if records.is_empty() && self.registry.db().profile(p)?.is_none() {
                return Err(Error::NotFound(p.to_string()));
            }
        }
        Ok(records)
    }

    /// At most `limit` records after id `after`, oldest first (for following a log; the
    /// name was checked when the follow began).
    pub fn events_after(
        &self,
        log: Log,
        profile: Option<&str>,
        after: i64,
        limit: u32,
    ) -> Result<Vec<LogEvent>> {
        self.registry.db().records_after(log, profile, after, limit)
    }

    /// Creates a profile: spec file, sparse disks, registry row.
    pub async fn create(&self, req: CreateProfile) -> Result<ProfileInfo> {
        let asked = req
            .spec
            .as_ref()
            .map(|s| s.name.clone())
            .or(req.name.clone())
            .filter(|n| crate::spec::check_name("", n).is_ok())
            .unwrap_or_else(|| "-".into());
        // A template's own peers (personal -> work, host) may precede the profiles they name;
        // peers a client names must exist.
        let from_template = req.template.is_some();
        let spec = req
            .into_spec()
            .and_then(|spec| self.registry.check_assets(&spec).map(|()| spec))
            .and_then(|spec| {
                if from_template {
                    return Ok(spec);
                }
                crate::channels::check_peers(&spec, None, |p| self.registry.state(p).is_ok())
                    .map_err(Error::BadRequest)?;
                Ok(spec)
            })
            .inspect_err(|e| {
                self.registry
                    .audit(&asked, "create-refused", &e.to_string());
            })?;
        let _ops = self.ops.lock().await;
        self.registry.create(&spec)?;
        let name = &spec.name;
        let boots = match &spec.firmware {
            Some(firmware) => format!("firmware {firmware}"),
            None => format!("kernel {}", spec.kernel),
        };
        self.registry.event(name, "created", &boots);
        self.show(name)
    }

    /// Deletes a stopped (or failed) profile and all its files; a suspended one only with
    /// `force` (its saved guest would be lost).
    pub async fn delete(&self, name: &str, force: bool) -> Result<()> {
        crate::spec::check_name("profile name", name)?;
        let _ops = self.ops.lock().await;
        self.registry.check(name, Event::Delete)?;
        if !force && self.registry.row(name)?.state == ProfileState::Suspended.as_str() {
            return Err(Error::Conflict(format!(
                "profile {name:?} is suspended: deleting it discards {} and its disks; resume \
                 it, or delete with --force (API: ?force=true)",
                self.saved_guest(name)
            )));
        }
        if self.supervisor.is_live(name) {
            return Err(Error::Conflict(format!(
                "profile {name:?} is {}: stop it first",
                self.registry.row(name)?.state
            )));
        }
        let _ = self.cgroups.remove(name);
        self.remove_jail_dir(name);
        // Its replication setting goes with its row.
        self.forget_replication(name);
        self.registry.remove(name)?;
        self.supervisor.forget_restarts(name);
        self.registry.event(name, "deleted", "");
        Ok(())
    }

    /// Starts a stopped or failed profile (a suspended one is resumed); one marked as moved
    /// by an export only with `reclaim`.
    pub async fn start(self: &Arc<Self>, name: &str, reclaim: bool) -> Result<ProfileInfo> {
        crate::spec::check_name("profile name", name)?;
        let _ops = self.ops.lock().await;
        self.settle_pending(name).await?;
        let step = self.registry.check(name, Event::Start)?;
        self.check_moved(name, "start", reclaim)?;
        match step.action {
            Action::Restore => self.resume_locked(name).await?,
            _ => {
                self.supervisor.forget_restarts(name);
                self.start_locked(name).await?;
            }
        }
        self.show(name)
    }

    /// Boots `name` (ops lock held).
    async fn start_locked(self: &Arc<Self>, name: &str) -> Result<()> {
        // What the spec hands the VMM is checked first; a refusal is audited.
        let checked = (|| {
            let spec = self.registry.spec(name)?;
            let row = self.registry.row(name)?;
            let cfg = self.registry.vm_config(&spec, row.vsock_cid)?;
            self.registry.check_guest_files(&cfg)?;
            crate::lock::check_unlocked(self.dir(), name, "start")?;
            crate::org_policy::check_start(
                self.dir(),
                name,
                &spec,
                &cfg,
                crate::policy_clock::now(),
            )?;
            // An encrypted profile starts only with its data key (opened again at launch).
            crate::disk_keys::keys_for_vmm(self.dir(), &spec)?;
            Ok((spec, cfg))
        })();
        let (spec, cfg) =
            checked.inspect_err(|e: &Error| self.audit(name, "start-refused", &e.to_string()))?;
        let run = self.dir().run(name);
        std::fs::create_dir_all(&run)
            .map_err(Error::io(format!("cannot create {}", run.display())))?;
        // The last run's logs stay as *.prev (a crash's story survives the restart).
        for log in ["serial.log", "vmm.log"] {
            let _ = std::fs::rename(run.join(log), run.join(format!("{log}.prev")));
        }
        state_dir::clear_dir(&run, &["serial.log.prev", "vmm.log.prev"])?;
        let text = toml::to_string(&cfg).map_err(|e| Error::Internal(format!("vm.toml: {e}")))?;
        state_dir::write_atomic(&self.dir().vm_config(name), text.as_bytes())?;
        let launch = Launch::Boot {
            config: self.dir().vm_config(name),
        };
        self.launch(name, &spec, &launch).await?;
        self.registry.event(name, "started", "");
        Ok(())
    }

    /// Stops a running or paused profile; a suspended one only with `discard` (it loses its
    /// snapshot).
    pub async fn stop(self: &Arc<Self>, name: &str, discard: bool) -> Result<ProfileInfo> {
        crate::spec::check_name("profile name", name)?;
        let _ops = self.ops.lock().await;
        // A stop left unrecorded (the disk was full) is finished: nothing more to do.
        if self.settle_pending(name).await? == Some(ProfileState::Stopped) {
            return self.show(name);
        }
        match self.registry.check(name, Event::Stop)?.action {
            Action::DiscardSnapshot if !discard => {
                return Err(Error::Conflict(format!(
                    "profile {name:?} is suspended: stopping it discards {}; resume it, or \
                     stop with --discard (API: ?discard=true)",
                    self.saved_guest(name)
                )));
            }
            Action::DiscardSnapshot => {
                let snap = self.dir().snapshot(name);
                let _ = std::fs::remove_dir_all(&snap);
                self.registry
                    .apply(name, Event::SnapshotDiscarded, None, "")?;
                self.registry
                    .event(name, "stopped", "suspended snapshot discarded");
            }
            _ => {
                self.begin_intent(name, Intent::Stop)?;
                let how = self.stop_vm(name).await?;
                crate::fault::hold_point("stop-vmm-ended").await;
                self.registry.apply(name, Event::Stopped, None, "")?;
                self.end_intent(name);
                self.registry.event(name, "stopped", &how);
                self.place_after_exit(name).await?;
            }
        }
        self.show(name)
    }

    /// Refuses to run a profile an export moved away, unless `reclaim` (which removes the mark).
    fn check_moved(&self, name: &str, action: &str, reclaim: bool) -> Result<()> {
        let Some(file) = self.registry.moved_to(name) else {
            return Ok(());
        };
        if !reclaim {
            return Err(Error::Conflict(format!(
                "profile {name:?} was moved to {file} by an export: running it here too would \
                 run the guest twice; {action} with --reclaim (API: ?reclaim=true) to run this \
                 copy anyway"
            )));
        }
        crate::moved::remove(self.dir(), name)?;
        self.registry
            .event(name, "reclaimed", &format!("was moved to {file}"));
        Ok(())
    }

    /// What a suspended profile's snapshot holds, for refusals ("its saved guest (N MiB
    /// snapshot ...)").
    fn saved_guest(&self, name: &str) -> String {
        let snap = self.dir().snapshot(name);
        let bytes: u64 = std::fs::read_dir(&snap)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        format!(
            "its saved guest (the running state suspended to {}, {} MiB: memory, CPUs, devices)",
            snap.display(),
            bytes.div_ceil(1 << 20)
        )
    }

    /// Where the jailed VMM of `name` sees the host path `host` (under its run directory),
    /// by the mapping the jailer uses (`vmm_api::jail`).
    fn jail_path(&self, name: &str, host: &Path) -> Result<PathBuf> {
        let spec = self.registry.spec(name)?;
        let row = self.registry.row(name)?;
        let cfg = self.registry.vm_config(&spec, row.vsock_cid)?;
        let api = self.dir().api_socket(name);
        let plan = JailPlan::new(&jail_host_paths(&cfg, None, Some(&api)))
            .map_err(|e| Error::Internal(e.to_string()))?;
        plan.to_jail(host).ok_or_else(|| {
            Error::Internal(format!("{} is not visible in the jail", host.display()))
        })
    }

    /// The IT policy in force for profile `name`, with its screen rules.
    pub fn policy_status(&self, name: &str) -> Result<crate::org_policy::PolicyStatus> {
        crate::org_policy::status(self.dir(), name, crate::policy_clock::now())
    }

    /// Whether the host may capture and remotely show profile `name`'s screen (its IT
    /// policy's `[screen]`; everything allowed without one). The display asks this.
    pub fn screen_rules(&self, name: &str) -> Result<policy::ScreenPolicy> {
        crate::org_policy::screen(self.dir(), name)
    }

    /// What a running or paused profile's screen shows: the gpu's answer to `screenshot`
    /// (`width`, `height`, `flushes`, `rgb` as base64 of red, green, blue bytes row by row).
    pub async fn screenshot(&self, name: &str) -> Result<serde_json::Value> {
        crate::spec::check_name("profile name", name)?;
        self.registry.row(name)?;
        self.refuse_if_locked(name, "a screenshot")?;
        if !self.registry.spec(name)?.screen {
            return Err(Error::Conflict(format!(
                "profile {name} has no screen (screen = true in its spec)"
            )));
        }
        if !self.screen_rules(name)?.capture {
            return Err(Error::Denied(format!(
                "profile {name}'s IT policy forbids capturing its screen ([screen] capture = \
                 false)"
            )));
        }
        let state = self.registry.state(name)?;
        if !matches!(state, ProfileState::Running | ProfileState::Paused) {
            return Err(Error::Conflict(format!(
                "profile {name} is {}: only a running profile has a screen to capture",
                state.as_str()
            )));
        }
        let req = Request::Device {
            id: "gpu".into(),
            request: serde_json::json!({"op": "screenshot"}),
        };
        let info = vmm_proc::call(&self.dir().api_socket(name), &req, CALL_TIMEOUT).await?;
        serde_json::from_str(&info)
            .map_err(|e| Error::Internal(format!("{name}: the VMM's screenshot is not JSON: {e}")))
    }

    /// Makes the network section of profile `name`'s policy in force (none: no filter) the
    /// one its running or paused VMM enforces, replacing what it enforced (the flows the old
    /// rules allowed are forgotten, see docs/policy.md). Nothing to do for a profile that
    /// does not run or has no network device. Audited as `network-policy`.
    pub async fn push_net_filter(&self, name: &str) -> Result<()> {
        crate::spec::check_name("profile name", name)?;
        let state = self.registry.state(name)?;
        if !matches!(state, ProfileState::Running | ProfileState::Paused)
            || self.registry.spec(name)?.net.is_none()
        {
            return Ok(());
        }
        let pushed = async {
            let filter = crate::org_policy::net_filter(self.dir(), name)?;
            let req = Request::Device {
                id: "net0".into(),
                request: serde_json::json!({"op": "set_filter", "filter": filter}),
            };
            vmm_proc::call(&self.dir().api_socket(name), &req, CALL_TIMEOUT).await
        }
        .await;
        match &pushed {
            Ok(info) => self.audit(
                name,
                "network-policy",
                &format!("the running guest's network rules replaced: {info}"),
            ),
            Err(e) => self.audit(
                name,
                "network-policy",
                &format!("the running guest's network rules could not be replaced: {e}"),
            ),
        }
        pushed.map(drop)
    }

    /// How often refused frames reach the audit log.
    pub(crate) fn drop_audit_every(&self) -> Duration {
        self.opts.drop_audit_every.max(Duration::from_secs(1))
    }

    /// Writes the frames the network policy refused since the last time to the audit log,
    /// for every profile with a VMM ([`crate::net_drops`]).
    pub(crate) async fn audit_all_net_drops(&self) {
        for name in self.supervisor.names() {
            self.audit_net_drops(&name).await;
        }
    }

    /// Takes the refusals `name`'s VMM tallied per rule and records them: `network-drop` audit
    /// records, one `network-drops` event. Failures are logged (a VMM that just exited).
    async fn audit_net_drops(&self, name: &str) {
        if !self.registry.spec(name).is_ok_and(|s| s.net.is_some()) {
            return;
        }
        let req = Request::Device {
            id: "net0".into(),
            request: serde_json::json!({"op": "take_drops"}),
        };
        let taken = vmm_proc::call(&self.dir().api_socket(name), &req, DROPS_TIMEOUT)
            .await
            .and_then(|a| crate::net_drops::parse_answer(&a).map_err(Error::Vmm));
        let tallies = match taken {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!("{name}: cannot take the network policy's refusals: {e}");
                return;
            }
        };
        if let Some((lines, summary)) = crate::net_drops::records(&tallies, self.drop_audit_every())
        {
            for line in lines {
                self.audit(name, "network-drop", &line);
            }
            self.registry.event(name, "network-drops", &summary);
        }
    }

    /// Locks every running (or paused) profile whose policy no longer lets it run (expired,
    /// or not refreshed within its offline limit): it is suspended (its memory leaves the
    /// host's RAM for its snapshot), and its resume is refused until a newer policy is
    /// applied. Audited as `policy-lock`. A profile whose suspend fails is stopped.
    pub(crate) async fn enforce_policy_limits(self: &Arc<Self>) {
        let any_locked = self
            .supervisor
            .names()
            .iter()
            .any(|n| crate::lock::is_locked(self.dir(), n));
        if any_locked {
            let _ops = self.ops.lock().await;
            self.enforce_locks().await;
        }
        let now = crate::policy_clock::now();
        for name in self.supervisor.names() {
            if crate::org_policy::lock_reason(self.dir(), &name, now).is_none() {
                continue;
            }
            let _ops = self.ops.lock().await;
            // Checked again under the lock: a policy applied or a stop meanwhile wins.
            let Some(why) =
                crate::org_policy::lock_reason(self.dir(), &name, crate::policy_clock::now())
            else {
                continue;
            };
            if !self.supervisor.is_live(&name)
                || self
                    .registry
                    .check(&name, lifecycle::Event::Suspend)
                    .is_err()
            {
                continue;
            }
            let locked = match self.suspend_locked(&name, "policy lock").await {
                Ok(()) => Ok("suspended".to_string()),
                Err(e) => match self.stop_vm(&name).await {
                    Ok(how) => {
                        let _ = self
                            .registry
                            .apply(&name, Event::Stopped, None, "policy lock");
                        Ok(format!("stopped ({how}) as its suspend failed: {e}"))
                    }
                    Err(e2) => Err(format!("suspend failed: {e}; stop failed: {e2}")),
                },
            };
            match locked {
                Ok(how) => self.audit(&name, "policy-lock", &format!("{how}: {why}")),
                Err(e) => self.audit(&name, "policy-lock", &format!("could not lock: {e}: {why}")),
            }
            let _ = self.place_after_exit(&name).await;
        }
    }

    /// Snapshots a running profile into `profiles/<name>/snapshot/` and ends its VMM.
    pub async fn suspend(self: &Arc<Self>, name: &str) -> Result<ProfileInfo> {
        crate::spec::check_name("profile name", name)?;
        let _ops = self.ops.lock().await;
        if self.settle_pending(name).await? == Some(ProfileState::Suspended) {
            return self.show(name);
        }
        self.registry.check(name, Event::Suspend)?;
        self.suspend_locked(name, "").await?;
        self.place_after_exit(name).await?;
        self.show(name)
    }

    /// Snapshots `name` and ends its VMM (ops lock held, state checked); `why` is added to
    /// the `suspended` event.
    async fn suspend_locked(self: &Arc<Self>, name: &str, why: &str) -> Result<()> {
        let snap = self.dir().snapshot(name);
        if snap.exists() {
            std::fs::remove_dir_all(&snap)
                .map_err(Error::io(format!("cannot remove {}", snap.display())))?;
        }
        // The refusals of the interval so far, before the VMM ends.
        self.audit_net_drops(name).await;
        self.begin_intent(name, Intent::Suspend)?;
        let api = self.dir().api_socket(name);
        let pid = self.supervisor.pid(name).unwrap_or(0);
        // A jailed VMM sees only its own root: it writes the snapshot into run/, which the
        // jailer binds (as the directory of the serial log and sockets) where the shared jail
        // mapping says.
        let (vm_dir, staged) = if vmm_proc::is_jailed(pid) {
            let staged = self.dir().run(name).join("snapshot");
            if staged.exists() {
                std::fs::remove_dir_all(&staged)
                    .map_err(Error::io(format!("cannot remove {}", staged.display())))?;
            }
            (self.jail_path(name, &staged)?, Some(staged))
        } else {
            (snap.clone(), None)
        };
        let t0 = Instant::now();
        let req = Request::Snapshot {
            dir: vm_dir,
            resume: false,
        };
        let info = match vmm_proc::call(&api, &req, SNAPSHOT_TIMEOUT).await {
            Ok(info) => info,
            Err(e) => {
                // The VMM resumes a guest whose snapshot failed (a full disk): it runs on as
                // before; what the snapshot wrote goes.
                for d in [Some(&snap), staged.as_ref()].into_iter().flatten() {
                    let _ = std::fs::remove_dir_all(d);
                }
                self.end_intent(name);
                self.registry
                    .event(name, "suspend-failed", &format!("{e}; the guest runs on"));
                return Err(e);
            }
        };
        if let Some(staged) = staged {
            // Plain files only: the jailed VMM could have put a link to a host file there.
            crate::run_files::take_dir(&staged, &snap)?;
        }
        let how = self.stop_vm(name).await?;
        crate::fault::hold_point("suspend-vmm-ended").await;
        self.registry.apply(name, Event::Suspended, None, why)?;
        self.end_intent(name);
        let why = if why.is_empty() {
            String::new()
        } else {
            format!("{why}: ")
        };
        self.registry.event(
            name,
            "suspended",
            &format!("{why}{info}; {} ms; {how}", t0.elapsed().as_millis()),
        );
        Ok(())
    }

    /// Restores a suspended profile from its snapshot; one marked as moved by an export only
    /// with `reclaim`.
    pub async fn resume(self: &Arc<Self>, name: &str, reclaim: bool) -> Result<ProfileInfo> {
        crate::spec::check_name("profile name", name)?;
        let _ops = self.ops.lock().await;
        self.settle_pending(name).await?;
        if self.user_paused(name)? {
            return Err(Error::Conflict(format!(
                "profile {name:?} is paused in memory, not suspended: unpause it"
            )));
        }
        self.registry.check(name, Event::Resume)?;
        self.check_moved(name, "resume", reclaim)?;
        self.resume_locked(name).await?;
        self.show(name)
    }

    async fn resume_locked(self: &Arc<Self>, name: &str) -> Result<()> {
        let snap = self.dir().snapshot(name);
        if !snap.is_dir() {
            return Err(Error::Conflict(format!("profile {name:?} has no snapshot")));
        }
        // The spec and the disks it names are checked first; a refusal is audited.
        let checked = (|| {
            let spec = self.registry.spec(name)?;
            for d in &spec.disks {
                state_dir::check_regular_file("disk", &self.dir().disk(name, &d.name))?;
            }
            crate::lock::check_unlocked(self.dir(), name, "resume")?;
            crate::org_policy::check_resume_spec(
                self.dir(),
                name,
                &spec,
                crate::policy_clock::now(),
            )?;
            crate::disk_keys::keys_for_vmm(self.dir(), &spec)?;
            Ok(spec)
        })();
        let spec =
            checked.inspect_err(|e: &Error| self.audit(name, "resume-refused", &e.to_string()))?;
        let run = self.dir().run(name);
        std::fs::create_dir_all(&run)
            .map_err(Error::io(format!("cannot create {}", run.display())))?;
        let launch = Launch::Restore {
            dir: snap.clone(),
            serial: self.dir().serial_log(name),
            vsock: self.dir().vsock_socket(name),
            disks: spec
                .disks
                .iter()
                .map(|d| self.dir().disk(name, &d.name))
                .collect(),
        };
        let t0 = Instant::now();
        // The VMM checks every snapshot file (digests of state.bin, memory.bin, config.json)
        // before it builds the VM: a damaged snapshot fails here and stays on disk.
        self.begin_intent(name, Intent::Resume)?;
        if let Err(e) = self.launch(name, &spec, &launch).await {
            self.end_intent(name);
            return Err(e);
        }
        // The snapshot goes only once the restored VM answers: until then it is the guest.
        let api = self.dir().api_socket(name);
        match vmm_proc::call(&api, &Request::Stats, CALL_TIMEOUT).await {
            Ok(_) => {
                // The network rules are the policy in force now, not the snapshot's.
                if let Err(e) = self.push_net_filter(name).await {
                    tracing::error!("{name}: network rules not re-applied at resume: {e}");
                }
                if let Err(e) = std::fs::remove_dir_all(&snap) {
                    tracing::warn!("cannot remove {}: {e}", snap.display());
                }
                self.end_intent(name);
            }
            Err(e) => tracing::warn!(
                "{name}: the restored VMM does not answer ({e}); keeping {}",
                snap.display()
            ),
        }
        self.registry
            .event(name, "resumed", &format!("{} ms", t0.elapsed().as_millis()));
        Ok(())
    }

    /// At daemon start: adopts VMMs still running from an earlier daemon, cleans up after
    /// the others (restarting them per policy).
    pub async fn recover(self: &Arc<Self>) -> Result<()> {
        let _ops = self.ops.lock().await;
        // Deletes and imports an earlier process left half done are finished or rolled back.
        let finished = {
            let db = self.registry.db();
            if let Err(e) = crate::leftovers::sweep_imports(self.dir(), Some(&db)) {
                tracing::error!("cannot sweep interrupted imports: {e}");
            }
            crate::leftovers::finish_deletes(self.dir(), &db)?
        };
        // Temporary files of exports killed before their rename.
        match crate::exports::sweep(self.dir()) {
            Ok(removed) => {
                for f in removed {
                    tracing::info!("removed {} (left by a killed export)", f.display());
                }
            }
            Err(e) => tracing::error!("cannot sweep interrupted exports: {e}"),
        }
        for name in finished {
            self.registry
                .event(&name, "deleted", "finished after a daemon restart");
        }
        // A wipe cut short is finished before anything else looks at the profile (its VMM
        // had ended before the wipe's first step).
        self.finish_wipes();
        let rows = self.registry.db().profiles()?;
        for row in &rows {
            // A return's VMM that an earlier daemon started holds the guest (it may have
            // committed): spared here, settled with the profile's intent below.
            let known = row
                .pid
                .or_else(|| self.returning_vmm(&row.name, &row.state));
            self.kill_strays(&row.name, known);
            match self.registry.migrate_legacy_spec(&row.name) {
                Ok(Some(what)) => {
                    self.registry.event(&row.name, "spec-migrated", &what);
                    self.audit(&row.name, "spec-migrated", &what);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("{}: {e}", row.name),
            }
        }
        for row in rows {
            // A step an earlier daemon left half done is finished or rolled back first.
            let settled = match self.finish_intent(&row.name).await {
                Ok(settled) => settled,
                Err(e) => {
                    tracing::error!("{}: cannot settle its last step: {e}", row.name);
                    false
                }
            };
            let Ok(row) = self.registry.row(&row.name) else {
                continue;
            };
            let state = ProfileState::parse(&row.state);
            if state == ProfileState::Offloaded {
                self.start_cloud_screen(&row.name).await;
            }
            if settled {
                continue;
            }
            if !matches!(state, ProfileState::Running | ProfileState::Paused) {
                continue;
            }
            let name = row.name.clone();
            let api = self.dir().api_socket(&name);
            let pid = row.pid.unwrap_or(0);
            if vmm_proc::is_our_vmm(pid, &self.opts.vmm_bin, &api) {
                match self.adopt(&name, pid) {
                    Ok(()) => {
                        self.registry.event(&name, "adopted", &format!("pid {pid}"));
                        continue;
                    }
                    Err(e) => tracing::warn!("{name}: cannot adopt pid {pid}: {e}"),
                }
            }
            self.cleanup_run(&name);
            let desc = format!("pid {pid} gone while the daemon was down");
            self.registry.event(&name, "lost", &desc);
            let restart = self
                .registry
                .spec(&name)
                .map(|s| s.restart != RestartPolicy::Never)
                .unwrap_or(false);
            let restarted = if restart {
                self.restart_locked(&name).await.unwrap_or_else(|e| {
                    self.registry.event(&name, "restart-failed", &e.to_string());
                    false
                })
            } else {
                false
            };
            if !restarted {
                self.registry.apply(&name, Event::Lost, None, &desc)?;
            }
        }
        // A locked profile adopted running (its daemon died before it paused it) is paused.
        self.enforce_locks().await;
        self.autostart_locked().await?;
        let fg = self.current_foreground()?;
        match fg {
            Some(f) => self.apply_foreground(Some(&f)).await,
            None => self.place_after_exit("").await,
        }
    }

    /// At daemon start: starts (or resumes) the stopped and suspended profiles whose spec says
    /// `autostart = true`. One that cannot start is recorded (`autostart-failed`) and left.
    async fn autostart_locked(self: &Arc<Self>) -> Result<()> {
        // (The rows are read first: the database lock must not be held across the starts.)
        let rows = self.registry.db().profiles()?;
        for row in rows {
            let name = row.name;
            if !self.registry.spec(&name).is_ok_and(|s| s.autostart) {
                continue;
            }
            if let Some(file) = self.registry.moved_to(&name) {
                let why = format!("moved to {file} by an export: start it with --reclaim");
                self.registry.event(&name, "autostart-skipped", &why);
                continue;
            }
            let r = match ProfileState::parse(&row.state) {
                ProfileState::Stopped => self.start_locked(&name).await,
                ProfileState::Suspended => self.resume_locked(&name).await,
                _ => continue,
            };
            match r {
                Ok(()) => self.registry.event(&name, "autostarted", ""),
                Err(e) => self
                    .registry
                    .event(&name, "autostart-failed", &e.to_string()),
            }
        }
        Ok(())
    }

    /// At daemon exit: suspends every running profile whose spec says `on_shutdown =
    /// "suspend"` and stops the others, and those that cannot be suspended (none is left
    /// running: a VMM without its supervisor would not be restarted or switched).
    pub async fn shutdown(self: &Arc<Self>) {
        let _ops = self.ops.lock().await;
        self.halt_all_replications();
        for n in self.supervisor.names() {
            let suspend = self
                .registry
                .spec(&n)
                .is_ok_and(|s| s.on_shutdown == crate::spec::OnShutdown::Suspend);
            if suspend {
                match self.suspend_locked(&n, "daemon shutdown").await {
                    Ok(()) => continue,
                    Err(e) => {
                        tracing::error!("{n}: cannot suspend at shutdown, stopping it: {e}");
                        self.registry.event(&n, "suspend-failed", &e.to_string());
                    }
                }
            }
            match self.stop_vm(&n).await {
                Ok(how) => {
                    let _ = self
                        .registry
                        .apply(&n, Event::Stopped, None, "daemon shut down");
                    self.registry
                        .event(&n, "stopped", &format!("daemon shutdown: {how}"));
                }
                Err(e) => tracing::error!("{n}: {e}"),
            }
        }
        let _ = self.registry.db().set_foreground(None);
        // Only an empty group is removed (rmdir): the parent is this state directory's own.
        self.cgroups.remove_parent();
    }

    /// The cgroup weight file of `name` (for tests and diagnostics).
    pub fn weight_file(&self, name: &str) -> Option<PathBuf> {
        self.cgroups.weight_file(name)
    }
}

/// Finds the installed probe guest: `$exe_dir/probe.elf`, the source tree's
/// `guest/out/probe.elf` above a `target/<profile>/` binary, `/usr/share/pocketvisor/probe.elf`.
pub fn find_probe(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    let mut candidates = vec![dir.join("probe.elf")];
    for up in dir.ancestors().skip(1).take(3) {
        candidates.push(up.join("guest/out/probe.elf"));
    }
    candidates.push(PathBuf::from("/usr/share/pocketvisor/probe.elf"));
    candidates.into_iter().find(|p| p.is_file())
}
