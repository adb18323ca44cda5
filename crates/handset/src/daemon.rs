//! The handset daemon's core: the profile registry and the supervision of VMM processes.
//!
//! Lifecycle changes (create, start, stop, suspend, resume, switch, delete, crash handling)
//! are serialised by one async lock, so the API can be called concurrently. Each running
//! profile has a watcher task that notices its VMM's exit (tokio's child wait for processes
//! this daemon started, a pidfd for ones adopted from an earlier daemon).

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use vmm_api::jail::{jail_host_paths, JailPlan};
use vmm_api::{DiskConfig, NetConfig, Request, SerialConfig, VmConfig, VsockConfig};

use crate::api_types::{CreateProfile, DaemonInfo, ProfileInfo, ProfileState};
use crate::cgroup::Cgroups;
use crate::db::{Db, Event, Log, ProfileRow};
use crate::error::{Error, Result};
use crate::spec::{
    BackgroundMode, ProfileSpec, RestartPolicy, PROBE_KERNEL, RESTART_LIMIT, RESTART_WINDOW_SECS,
};
use crate::state_dir::{self, StateDir};
use crate::vmm_proc::{self, JailArgs, JailCgroup, Launch};

/// How long a VMM has to create its API socket after being started.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a VMM has to exit after `{"op":"stop"}`, and again after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(3);
/// Timeout of pause/resume/stop requests to a VMM.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
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
}

/// A VMM process the daemon watches.
struct RunningVm {
    pid: i32,
    /// Set before the daemon asks the VMM to end, so its exit is not treated as a crash.
    stopping: Arc<AtomicBool>,
    /// Becomes `Some(description)` when the process has exited.
    exited: watch::Receiver<Option<String>>,
}

/// The daemon state shared by the API handlers and the watcher tasks.
pub struct Handset {
    opts: Options,
    db: Mutex<Db>,
    ops: tokio::sync::Mutex<()>,
    running: Mutex<HashMap<String, RunningVm>>,
    restarts: Mutex<HashMap<String, VecDeque<Instant>>>,
    cgroups: Cgroups,
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Handset {
    /// Opens the state directory (creating it), the database and the cgroups.
    pub fn open(opts: Options) -> Result<Arc<Self>> {
        let dir = &opts.state_dir;
        std::fs::create_dir_all(dir.profiles()).map_err(Error::io(format!(
            "cannot create {}",
            dir.profiles().display()
        )))?;
        let db = Db::open(&dir.db())?;
        let cgroups = Cgroups::detect(&opts.cgroup_parent);
        Ok(Arc::new(Self {
            opts,
            db: Mutex::new(db),
            ops: tokio::sync::Mutex::new(()),
            running: Mutex::new(HashMap::new()),
            restarts: Mutex::new(HashMap::new()),
            cgroups,
        }))
    }

    /// The state directory.
    pub fn dir(&self) -> &StateDir {
        &self.opts.state_dir
    }

    fn db(&self) -> MutexGuard<'_, Db> {
        guard(&self.db)
    }

    /// Appends a lifecycle event (failures to record are logged, not fatal).
    fn event(&self, profile: &str, event: &str, detail: &str) {
        tracing::info!(profile, event, detail, "lifecycle");
        if let Err(e) = self.db().record(Log::Events, profile, event, detail) {
            tracing::error!("cannot record event {event} for {profile}: {e}");
        }
    }

    /// Appends an audit record.
    pub fn audit(&self, profile: &str, action: &str, detail: &str) {
        if let Err(e) = self.db().record(Log::Audit, profile, action, detail) {
            tracing::error!("cannot record audit {action} for {profile}: {e}");
        }
    }

    fn row(&self, name: &str) -> Result<ProfileRow> {
        self.db()
            .profile(name)?
            .ok_or_else(|| Error::NotFound(name.to_string()))
    }

    fn spec(&self, name: &str) -> Result<ProfileSpec> {
        let path = self.dir().spec(name);
        let text = std::fs::read_to_string(&path)
            .map_err(Error::io(format!("cannot read {}", path.display())))?;
        ProfileSpec::from_toml(&text)
    }

    fn set_state(
        &self,
        name: &str,
        state: ProfileState,
        pid: Option<i32>,
        detail: &str,
    ) -> Result<()> {
        self.db().set_state(name, state.as_str(), pid, detail)
    }

    fn info(&self, row: ProfileRow) -> Result<ProfileInfo> {
        let spec = self.spec(&row.name)?;
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
            serial_log: self.dir().serial_log(&row.name).display().to_string(),
            spec,
        })
    }

    /// Daemon facts for `GET /v1/handset`.
    pub fn daemon_info(&self) -> Result<DaemonInfo> {
        let rows = self.db().profiles()?;
        Ok(DaemonInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            state_dir: self.dir().root().display().to_string(),
            schema_version: self.db().version()?,
            cgroups: self.cgroups.info(),
            probe: self.opts.probe.as_ref().map(|p| p.display().to_string()),
            foreground: rows.iter().find(|r| r.foreground).map(|r| r.name.clone()),
            profiles: rows.len(),
            running: rows.iter().filter(|r| r.pid.is_some()).count(),
        })
    }

    /// All profiles.
    pub fn list(&self) -> Result<Vec<ProfileInfo>> {
        let rows = self.db().profiles()?;
        rows.into_iter().map(|r| self.info(r)).collect()
    }

    /// One profile.
    pub fn show(&self, name: &str) -> Result<ProfileInfo> {
        crate::spec::check_name("profile name", name)?;
        let row = self.row(name)?;
        self.info(row)
    }

    /// Lifecycle events (`profile` None: all), oldest first.
    pub fn events(&self, log: Log, profile: Option<&str>, limit: u32) -> Result<Vec<Event>> {
        if let Some(p) = profile {
            crate::spec::check_name("profile name", p)?;
        }
        self.db().records(log, profile, limit)
    }

    /// Creates a profile: spec file, sparse disks, registry row.
    pub async fn create(&self, req: CreateProfile) -> Result<ProfileInfo> {
        let spec = req.into_spec()?;
        let _ops = self.ops.lock().await;
        let name = spec.name.clone();
        if self.db().profile(&name)?.is_some() {
            return Err(Error::Conflict(format!("profile {name:?} already exists")));
        }
        let dir = self.dir().profile(&name);
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
            std::fs::create_dir_all(self.dir().disks(&name))
                .map_err(Error::io(format!("cannot create {}", dir.display())))?;
            std::fs::create_dir_all(self.dir().run(&name))
                .map_err(Error::io(format!("cannot create {}", dir.display())))?;
            for d in &spec.disks {
                state_dir::create_sparse(&self.dir().disk(&name, &d.name), d.size_mib)?;
            }
            state_dir::write_atomic(&self.dir().spec(&name), spec.to_toml()?.as_bytes())?;
            state_dir::sync_dir(&self.dir().profiles())?;
            self.db().insert_profile(&name)
        })();
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        self.event(&name, "created", &format!("kernel {}", spec.kernel));
        self.show(&name)
    }

    /// Deletes a stopped (or suspended, or failed) profile and all its files.
    pub async fn delete(&self, name: &str) -> Result<()> {
        crate::spec::check_name("profile name", name)?;
        let _ops = self.ops.lock().await;
        let row = self.row(name)?;
        if guard(&self.running).contains_key(name) {
            return Err(Error::Conflict(format!(
                "profile {name:?} is {}: stop it first",
                row.state
            )));
        }
        let _ = self.cgroups.remove(name);
        self.remove_jail_dir(name);
        let dir = self.dir().profile(name);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("cannot remove {}", dir.display()))(e)),
        }
        self.db().delete_profile(name)?;
        guard(&self.restarts).remove(name);
        self.event(name, "deleted", "");
        Ok(())
    }

    /// Starts a stopped or failed profile (a suspended one is resumed).
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<ProfileInfo> {
        crate::spec::check_name("profile name", name)?;
        let _ops = self.ops.lock().await;
        let row = self.row(name)?;
        match ProfileState::parse(&row.state) {
            ProfileState::Stopped | ProfileState::Failed => {}
            ProfileState::Suspended => {
                self.resume_locked(name).await?;
                return self.show(name);
            }
            s => {
                return Err(Error::Conflict(format!(
                    "profile {name:?} is already {}",
                    s.as_str()
                )))
            }
        }
        guard(&self.restarts).remove(name);
        self.start_locked(name).await?;
        self.show(name)
    }

    fn kernel_path(&self, spec: &ProfileSpec) -> Result<PathBuf> {
        if spec.kernel == PROBE_KERNEL {
            return self.opts.probe.clone().ok_or_else(|| {
                Error::BadRequest(
                    "kernel \"probe\": the probe guest is not installed (build it with \
                     guest/build-probe.sh or start the daemon with --probe PATH)"
                        .into(),
                )
            });
        }
        Ok(PathBuf::from(&spec.kernel))
    }

    /// The VM configuration for `spec`, all paths inside the profile's directory.
    fn vm_config(&self, spec: &ProfileSpec, cid: u32) -> Result<VmConfig> {
        let name = &spec.name;
        let mut cfg = VmConfig::new(self.kernel_path(spec)?);
        cfg.initrd = spec.initrd.clone();
        cfg.cmdline = spec.cmdline.clone();
        cfg.memory_mib = spec.memory_mib;
        cfg.vcpus = spec.vcpus;
        cfg.disks = spec
            .disks
            .iter()
            .map(|d| DiskConfig {
                path: self.dir().disk(name, &d.name),
                read_only: d.read_only,
            })
            .collect();
        cfg.net = spec
            .net
            .iter()
            .map(|tap| NetConfig {
                tap: tap.clone(),
                mac: None,
            })
            .collect();
        cfg.vsock = Some(VsockConfig {
            cid: u64::from(cid),
            socket: self.dir().vsock_socket(name),
        });
        cfg.rng = true;
        cfg.balloon = spec.balloon;
        cfg.mergeable = spec.mergeable;
        cfg.serial = SerialConfig::File(self.dir().serial_log(name));
        cfg.validate()
            .map_err(|e| Error::BadRequest(e.to_string()))?;
        Ok(cfg)
    }

    /// Where the jailed VMM of `name` sees the host path `host` (under its run directory),
    /// by the mapping the jailer uses (`vmm_api::jail`).
    fn jail_path(&self, name: &str, host: &Path) -> Result<PathBuf> {
        let spec = self.spec(name)?;
        let row = self.row(name)?;
        let cfg = self.vm_config(&spec, row.vsock_cid)?;
        let api = self.dir().api_socket(name);
        let plan = JailPlan::new(&jail_host_paths(&cfg, None, Some(&api)))
            .map_err(|e| Error::Internal(e.to_string()))?;
        plan.to_jail(host).ok_or_else(|| {
            Error::Internal(format!("{} is not visible in the jail", host.display()))
        })
    }

    /// Boots `name` (ops lock held).
    async fn start_locked(self: &Arc<Self>, name: &str) -> Result<()> {
        let spec = self.spec(name)?;
        let row = self.row(name)?;
        let cfg = self.vm_config(&spec, row.vsock_cid)?;
        if !cfg.kernel.is_file() {
            return Err(Error::BadRequest(format!(
                "kernel {} does not exist",
                cfg.kernel.display()
            )));
        }
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
        self.event(name, "started", "");
        Ok(())
    }

    /// Spawns the VMM for `launch`, puts it in its cgroup, waits for its API socket and
    /// registers it as running in the background (ops lock held).
    async fn launch(
        self: &Arc<Self>,
        name: &str,
        spec: &ProfileSpec,
        launch: &Launch,
    ) -> Result<()> {
        let api = self.dir().api_socket(name);
        let jail = match launch {
            _ if self.opts.jail => Some(JailArgs {
                id: name.to_string(),
                root: self.dir().jail_root(),
                // A v2 group is made, joined (clone3 into it) and removed by the jailer.
                cgroup: match &self.cgroups {
                    Cgroups::V2 { dir } => Some(JailCgroup {
                        dir: dir.join(name),
                        cpu_weight: spec.cpu.background,
                        memory_max_mib: spec.memory_max(),
                    }),
                    _ => None,
                },
            }),
            _ => None,
        };
        let jailer_cgroup = jail.as_ref().is_some_and(|j| j.cgroup.is_some());
        let args = vmm_proc::vmm_args(launch, &api, jail.as_ref());
        let log = self.dir().vmm_log(name);
        let mut child = vmm_proc::spawn(&self.opts.vmm_bin, &args, &log)?;
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| Error::Internal("the VMM exited at once".into()))?;
        let fail = |child: &mut tokio::process::Child, e: Error| {
            vmm_proc::kill_group(pid, libc::SIGKILL);
            let _ = child.start_kill();
            e
        };
        let entered = if jailer_cgroup {
            Ok(())
        } else {
            self.cgroups
                .enter(name, pid, spec.memory_max(), spec.cpu.background)
        };
        if let Err(e) = entered {
            let e = fail(&mut child, e);
            let _ = child.wait().await;
            self.cleanup_run(name);
            return Err(e);
        }
        // Wait until the API answers (the socket exists once the VM is built).
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.cleanup_run(name);
                return Err(Error::Vmm(format!(
                    "the VMM exited at start ({status}): {}",
                    vmm_proc::log_tail(&log, 400)
                )));
            }
            if tokio::net::UnixStream::connect(&api).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let e = fail(
                    &mut child,
                    Error::Vmm(format!("no API socket after {START_TIMEOUT:?}")),
                );
                let _ = child.wait().await;
                self.cleanup_run(name);
                return Err(e);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if !jailer_cgroup {
            // Processes the VMM forked before it was moved (the jailer's child) follow it.
            for p in vmm_proc::with_descendants(pid).into_iter().skip(1) {
                if let Err(e) = self.cgroups.add_pid(name, p) {
                    tracing::warn!("{name}: {e}");
                }
            }
        }
        let (tx, rx) = watch::channel(None);
        let stopping = Arc::new(AtomicBool::new(false));
        guard(&self.running).insert(
            name.to_string(),
            RunningVm {
                pid,
                stopping: stopping.clone(),
                exited: rx,
            },
        );
        self.set_state(name, ProfileState::Running, Some(pid), "")?;
        let me = Arc::clone(self);
        let owned = name.to_string();
        tokio::spawn(async move {
            let (desc, failed) = match child.wait().await {
                Ok(s) => (s.to_string(), !s.success()),
                Err(e) => (format!("wait failed: {e}"), true),
            };
            let _ = tx.send(Some(desc.clone()));
            if !stopping.load(Ordering::SeqCst) {
                exit_handler(me, owned, pid, desc, failed).await;
            }
        });
        self.place(name).await
    }

    /// Watches a VMM left running by an earlier daemon.
    fn adopt(self: &Arc<Self>, name: &str, pid: i32) -> Result<()> {
        let pidfd = vmm_proc::pidfd_open(pid)?;
        let (tx, rx) = watch::channel(None);
        let stopping = Arc::new(AtomicBool::new(false));
        guard(&self.running).insert(
            name.to_string(),
            RunningVm {
                pid,
                stopping: stopping.clone(),
                exited: rx,
            },
        );
        let me = Arc::clone(self);
        let owned = name.to_string();
        tokio::spawn(async move {
            let desc = match vmm_proc::wait_pidfd(pidfd).await {
                Ok(()) => "exited (adopted process: status unknown)".to_string(),
                Err(e) => format!("lost track: {e}"),
            };
            let _ = tx.send(Some(desc.clone()));
            if !stopping.load(Ordering::SeqCst) {
                exit_handler(me, owned, pid, desc, true).await;
            }
        });
        Ok(())
    }

    /// Handles a VMM exit nobody asked for: records it and restarts per policy.
    async fn on_unexpected_exit(self: &Arc<Self>, name: &str, pid: i32, desc: &str, failed: bool) {
        let _ops = self.ops.lock().await;
        let ours = guard(&self.running).get(name).is_some_and(|r| r.pid == pid);
        if !ours {
            return;
        }
        guard(&self.running).remove(name);
        self.cleanup_run(name);
        self.event(
            name,
            if failed { "crashed" } else { "exited" },
            &format!("pid {pid} {desc}"),
        );
        let policy = self
            .spec(name)
            .map(|s| s.restart)
            .unwrap_or(RestartPolicy::Never);
        let restart = match policy {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => failed,
            RestartPolicy::Always => true,
        };
        let outcome = if restart {
            self.restart_locked(name).await
        } else {
            Ok(false)
        };
        match outcome {
            Ok(true) => {}
            Ok(false) => {
                let (state, detail) = if restart {
                    (
                        ProfileState::Failed,
                        format!(
                            "restart limit ({RESTART_LIMIT} a minute) reached; last exit: {desc}"
                        ),
                    )
                } else {
                    (ProfileState::Stopped, format!("exited: {desc}"))
                };
                if restart {
                    self.event(name, "restart-limit", &detail);
                }
                let _ = self.set_state(name, state, None, &detail);
                let _ = self.place_after_exit(name).await;
            }
            Err(e) => {
                let detail = format!("restart failed: {e}");
                self.event(name, "restart-failed", &detail);
                let _ = self.set_state(name, ProfileState::Failed, None, &detail);
                let _ = self.place_after_exit(name).await;
            }
        }
    }

    /// Restarts `name` unless the restart limit is reached; `Ok(false)` if it is.
    async fn restart_locked(self: &Arc<Self>, name: &str) -> Result<bool> {
        {
            let mut all = guard(&self.restarts);
            let times = all.entry(name.to_string()).or_default();
            let window = Duration::from_secs(RESTART_WINDOW_SECS);
            while times.front().is_some_and(|t| t.elapsed() > window) {
                times.pop_front();
            }
            if times.len() >= RESTART_LIMIT {
                return Ok(false);
            }
            times.push_back(Instant::now());
        }
        self.event(name, "restarting", "");
        self.start_locked(name).await?;
        Ok(true)
    }

    /// Removes a profile's cgroup and run directory after its VMM is gone.
    fn cleanup_run(&self, name: &str) {
        if let Err(e) = self.cgroups.remove(name) {
            tracing::warn!("{name}: {e}");
        }
        for f in [self.dir().api_socket(name), self.dir().vsock_socket(name)] {
            let _ = std::fs::remove_file(f);
        }
        self.remove_jail_dir(name);
    }

    /// Removes a jail directory a killed jailer left behind, unless something is mounted
    /// under it (then the jailer reuses it at the next start).
    fn remove_jail_dir(&self, name: &str) {
        let dir = self.dir().jail_root().join(name);
        if !dir.exists() {
            return;
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let prefix = dir.to_string_lossy().into_owned();
        if mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .any(|m| m.starts_with(&prefix))
        {
            tracing::warn!("{} has mounts; left in place", dir.display());
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!("cannot remove {}: {e}", dir.display());
        }
    }

    /// Stops a running or paused profile (a suspended one loses its snapshot).
    pub async fn stop(self: &Arc<Self>, name: &str) -> Result<ProfileInfo> {
        crate::spec::check_name("profile name", name)?;
        let _ops = self.ops.lock().await;
        let row = self.row(name)?;
        match ProfileState::parse(&row.state) {
            ProfileState::Running | ProfileState::Paused => {
                let how = self.stop_vm(name).await?;
                self.set_state(name, ProfileState::Stopped, None, "")?;
                self.event(name, "stopped", &how);
                self.place_after_exit(name).await?;
            }
            ProfileState::Suspended => {
                let snap = self.dir().snapshot(name);
                let _ = std::fs::remove_dir_all(&snap);
                self.set_state(name, ProfileState::Stopped, None, "")?;
                self.event(name, "stopped", "suspended snapshot discarded");
            }
            s => {
                return Err(Error::Conflict(format!(
                    "profile {name:?} is {}, not running",
                    s.as_str()
                )))
            }
        }
        self.show(name)
    }

    /// Ends a profile's VMM: API stop, then SIGTERM, then SIGKILL; cleans up. Returns how.
    async fn stop_vm(&self, name: &str) -> Result<String> {
        let (pid, stopping, mut exited) = {
            let r = guard(&self.running);
            let vm = r
                .get(name)
                .ok_or_else(|| Error::Internal(format!("{name} has no VMM process")))?;
            (vm.pid, vm.stopping.clone(), vm.exited.clone())
        };
        stopping.store(true, Ordering::SeqCst);
        let api = self.dir().api_socket(name);
        let mut how = "api stop".to_string();
        if let Err(e) = vmm_proc::call(&api, &Request::Stop, CALL_TIMEOUT).await {
            tracing::warn!("{name}: {e}");
            how = format!("api stop failed ({e})");
        }
        if !wait_exit(&mut exited, STOP_TIMEOUT).await {
            vmm_proc::kill_group(pid, libc::SIGTERM);
            how.push_str(", SIGTERM");
            if !wait_exit(&mut exited, STOP_TIMEOUT).await {
                vmm_proc::kill_group(pid, libc::SIGKILL);
                how.push_str(", SIGKILL");
                if !wait_exit(&mut exited, STOP_TIMEOUT).await {
                    return Err(Error::Internal(format!(
                        "{name}: pid {pid} survives SIGKILL"
                    )));
                }
            }
        }
        guard(&self.running).remove(name);
        self.cleanup_run(name);
        Ok(how)
    }

    /// Snapshots a running profile into `profiles/<name>/snapshot/` and ends its VMM.
    pub async fn suspend(self: &Arc<Self>, name: &str) -> Result<ProfileInfo> {
        crate::spec::check_name("profile name", name)?;
        let _ops = self.ops.lock().await;
        let row = self.row(name)?;
        let state = ProfileState::parse(&row.state);
        if !matches!(state, ProfileState::Running | ProfileState::Paused) {
            return Err(Error::Conflict(format!(
                "profile {name:?} is {}, not running",
                state.as_str()
            )));
        }
        let snap = self.dir().snapshot(name);
        if snap.exists() {
            std::fs::remove_dir_all(&snap)
                .map_err(Error::io(format!("cannot remove {}", snap.display())))?;
        }
        let api = self.dir().api_socket(name);
        let pid = guard(&self.running).get(name).map_or(0, |r| r.pid);
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
        let info = vmm_proc::call(&api, &req, SNAPSHOT_TIMEOUT).await?;
        if let Some(staged) = staged {
            std::fs::rename(&staged, &snap).map_err(Error::io(format!(
                "cannot move the snapshot to {}",
                snap.display()
            )))?;
            state_dir::sync_dir(&self.dir().profile(name))?;
        }
        let how = self.stop_vm(name).await?;
        self.set_state(name, ProfileState::Suspended, None, "")?;
        self.event(
            name,
            "suspended",
            &format!("{info}; {} ms; {how}", t0.elapsed().as_millis()),
        );
        self.place_after_exit(name).await?;
        self.show(name)
    }

    /// Restores a suspended profile from its snapshot.
    pub async fn resume(self: &Arc<Self>, name: &str) -> Result<ProfileInfo> {
        crate::spec::check_name("profile name", name)?;
        let _ops = self.ops.lock().await;
        let row = self.row(name)?;
        match ProfileState::parse(&row.state) {
            ProfileState::Suspended => self.resume_locked(name).await?,
            ProfileState::Paused => {
                return Err(Error::Conflict(format!(
                    "profile {name:?} is paused in the background: switch to it"
                )))
            }
            s => {
                return Err(Error::Conflict(format!(
                    "profile {name:?} is {}, not suspended",
                    s.as_str()
                )))
            }
        }
        self.show(name)
    }

    async fn resume_locked(self: &Arc<Self>, name: &str) -> Result<()> {
        let spec = self.spec(name)?;
        let snap = self.dir().snapshot(name);
        if !snap.is_dir() {
            return Err(Error::Conflict(format!("profile {name:?} has no snapshot")));
        }
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
        self.launch(name, &spec, &launch).await?;
        // The restored VM has its memory; the snapshot would only go stale.
        if let Err(e) = std::fs::remove_dir_all(&snap) {
            tracing::warn!("cannot remove {}: {e}", snap.display());
        }
        self.event(name, "resumed", &format!("{} ms", t0.elapsed().as_millis()));
        Ok(())
    }

    /// Makes `name` the foreground profile.
    pub async fn switch(self: &Arc<Self>, name: &str) -> Result<ProfileInfo> {
        crate::spec::check_name("profile name", name)?;
        let _ops = self.ops.lock().await;
        let row = self.row(name)?;
        if !guard(&self.running).contains_key(name) {
            return Err(Error::Conflict(format!(
                "profile {name:?} is {}: start it first",
                row.state
            )));
        }
        let t0 = Instant::now();
        self.apply_foreground(Some(name)).await?;
        self.event(
            name,
            "foreground",
            &format!("{} us", t0.elapsed().as_micros()),
        );
        self.show(name)
    }

    /// Gives a newly running profile its place: foreground if there is none, else background.
    async fn place(&self, name: &str) -> Result<()> {
        let fg = self.current_foreground()?;
        match fg {
            Some(f) if f != name => self.apply_foreground(Some(&f)).await,
            _ => self.apply_foreground(Some(name)).await,
        }
    }

    /// After `name` stopped: if it was the foreground one, the first running profile takes over.
    async fn place_after_exit(&self, name: &str) -> Result<()> {
        let fg = self.current_foreground()?;
        if fg.as_deref().is_some_and(|f| f != name) {
            return Ok(());
        }
        let next = {
            let r = guard(&self.running);
            let mut names: Vec<&String> = r.keys().collect();
            names.sort();
            names.first().map(|s| s.to_string())
        };
        self.apply_foreground(next.as_deref()).await
    }

    /// The foreground profile if it is running.
    fn current_foreground(&self) -> Result<Option<String>> {
        let rows = self.db().profiles()?;
        let running = guard(&self.running);
        Ok(rows
            .into_iter()
            .find(|r| r.foreground && running.contains_key(&r.name))
            .map(|r| r.name))
    }

    /// Sets every running profile's CPU weight and paused state for foreground `fg`.
    async fn apply_foreground(&self, fg: Option<&str>) -> Result<()> {
        let names: Vec<String> = guard(&self.running).keys().cloned().collect();
        let mut first_err = None;
        for n in &names {
            let spec = match self.spec(n) {
                Ok(s) => s,
                Err(e) => {
                    first_err.get_or_insert(e);
                    continue;
                }
            };
            let is_fg = fg == Some(n.as_str());
            let weight = if is_fg {
                spec.cpu.foreground
            } else {
                spec.cpu.background
            };
            if let Err(e) = self.cgroups.set_weight(n, weight) {
                tracing::warn!("{n}: {e}");
                first_err.get_or_insert(e);
            }
            let state = self.db().profile(n)?.map(|r| ProfileState::parse(&r.state));
            let api = self.dir().api_socket(n);
            let pid = guard(&self.running).get(n).map(|r| r.pid);
            if is_fg && state == Some(ProfileState::Paused) {
                match vmm_proc::call(&api, &Request::Resume, CALL_TIMEOUT).await {
                    Ok(_) => {
                        self.set_state(n, ProfileState::Running, pid, "")?;
                        self.event(n, "unpaused", "foreground");
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            } else if !is_fg
                && spec.background == BackgroundMode::Suspend
                && state == Some(ProfileState::Running)
            {
                match vmm_proc::call(&api, &Request::Pause, CALL_TIMEOUT).await {
                    Ok(_) => {
                        self.set_state(n, ProfileState::Paused, pid, "background")?;
                        self.event(n, "paused", "background");
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        self.db().set_foreground(fg)?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// At daemon start: adopts VMMs still running from an earlier daemon, cleans up after
    /// the others (restarting them per policy).
    pub async fn recover(self: &Arc<Self>) -> Result<()> {
        let _ops = self.ops.lock().await;
        let rows = self.db().profiles()?;
        for row in &rows {
            self.kill_strays(&row.name, row.pid);
        }
        for row in rows {
            let state = ProfileState::parse(&row.state);
            if !matches!(state, ProfileState::Running | ProfileState::Paused) {
                continue;
            }
            let name = row.name.clone();
            let api = self.dir().api_socket(&name);
            let pid = row.pid.unwrap_or(0);
            if vmm_proc::is_our_vmm(pid, &self.opts.vmm_bin, &api) {
                match self.adopt(&name, pid) {
                    Ok(()) => {
                        self.event(&name, "adopted", &format!("pid {pid}"));
                        continue;
                    }
                    Err(e) => tracing::warn!("{name}: cannot adopt pid {pid}: {e}"),
                }
            }
            self.cleanup_run(&name);
            let desc = format!("pid {pid} gone while the daemon was down");
            self.event(&name, "lost", &desc);
            let restart = self
                .spec(&name)
                .map(|s| s.restart != RestartPolicy::Never)
                .unwrap_or(false);
            let restarted = if restart {
                self.restart_locked(&name).await.unwrap_or_else(|e| {
                    self.event(&name, "restart-failed", &e.to_string());
                    false
                })
            } else {
                false
            };
            if !restarted {
                self.set_state(&name, ProfileState::Stopped, None, &desc)?;
            }
        }
        let fg = self.current_foreground()?;
        match fg {
            Some(f) => self.apply_foreground(Some(&f)).await,
            None => self.place_after_exit("").await,
        }
    }

    /// Kills VMMs of `name` the registry does not know (e.g. started by a daemon that died
    /// before recording the pid); `known` (and its descendants) is spared.
    fn kill_strays(&self, name: &str, known: Option<i32>) {
        let api = self.dir().api_socket(name);
        let spared = known
            .filter(|&p| vmm_proc::is_our_vmm(p, &self.opts.vmm_bin, &api))
            .map(vmm_proc::with_descendants)
            .unwrap_or_default();
        for pid in vmm_proc::find_vmms(&self.opts.vmm_bin, &api) {
            if spared.contains(&pid) {
                continue;
            }
            vmm_proc::kill_group(pid, libc::SIGKILL);
            // SAFETY: kill(2) on a process just identified as a stray VMM of this profile.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            self.event(name, "stray-killed", &format!("pid {pid}"));
        }
    }

    /// At daemon exit: stops every running profile (they are not left running: a VMM without
    /// its supervisor would not be restarted or switched).
    pub async fn shutdown(self: &Arc<Self>) {
        let _ops = self.ops.lock().await;
        let names: Vec<String> = guard(&self.running).keys().cloned().collect();
        for n in names {
            match self.stop_vm(&n).await {
                Ok(how) => {
                    let _ = self.set_state(&n, ProfileState::Stopped, None, "daemon shut down");
                    self.event(&n, "stopped", &format!("daemon shutdown: {how}"));
                }
                Err(e) => tracing::error!("{n}: {e}"),
            }
        }
        let _ = self.db().set_foreground(None);
        if self.opts.cgroup_parent != crate::cgroup::DEFAULT_PARENT {
            self.cgroups.remove_parent();
        }
    }

    /// Runs `f` with the profiles `names` able to answer: any of them paused in the background
    /// is resumed for `f` and paused again afterwards (its state stays `paused`), with the
    /// lifecycle lock held meanwhile so no switch interleaves. Used by `channels` to reach a
    /// background profile's agent. Without paused profiles `f` runs without the lock.
    pub async fn with_unpaused<T>(
        &self,
        names: &[&str],
        f: impl std::future::Future<Output = T>,
    ) -> Result<T> {
        let paused = |n: &str| -> Result<bool> {
            Ok(self
                .db()
                .profile(n)?
                .is_some_and(|r| ProfileState::parse(&r.state) == ProfileState::Paused))
        };
        let mut any = false;
        for n in names {
            any |= paused(n)?;
        }
        if !any {
            return Ok(f.await);
        }
        let _ops = self.ops.lock().await;
        let mut resumed = Vec::new();
        for n in names {
            if paused(n)? {
                let api = self.dir().api_socket(n);
                if let Err(e) = vmm_proc::call(&api, &Request::Resume, CALL_TIMEOUT).await {
                    for r in resumed {
                        let api = self.dir().api_socket(r);
                        let _ = vmm_proc::call(&api, &Request::Pause, CALL_TIMEOUT).await;
                    }
                    return Err(e);
                }
                resumed.push(*n);
            }
        }
        let out = f.await;
        for n in resumed {
            let api = self.dir().api_socket(n);
            if let Err(e) = vmm_proc::call(&api, &Request::Pause, CALL_TIMEOUT).await {
                tracing::warn!("{n}: cannot pause again after a channel transfer: {e}");
            }
        }
        Ok(out)
    }

    /// The cgroup weight file of `name` (for tests and diagnostics).
    pub fn weight_file(&self, name: &str) -> Option<PathBuf> {
        self.cgroups.weight_file(name)
    }
}

/// Waits up to `t` for a watcher to report the exit; whether it did.
async fn wait_exit(rx: &mut watch::Receiver<Option<String>>, t: Duration) -> bool {
    tokio::time::timeout(t, rx.wait_for(|v| v.is_some()))
        .await
        .is_ok()
}

/// A boxed watcher continuation (boxing breaks the start -> watch -> restart -> start cycle
/// that would otherwise make the future type recursive).
type BoxFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

fn exit_handler(h: Arc<Handset>, name: String, pid: i32, desc: String, failed: bool) -> BoxFuture {
    Box::pin(async move { h.on_unexpected_exit(&name, pid, &desc, failed).await })
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
