//! The supervisor: the VMM processes of live profiles, their watchers, crash handling with
//! restarts within a budget, adoption of VMMs left by an earlier daemon, and stopping.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use vmm_api::Request;

use super::lifecycle::Event;
use super::{Handset, CALL_TIMEOUT, SNAPSHOT_TIMEOUT, START_TIMEOUT, STOP_TIMEOUT};
use crate::cgroup::Cgroups;
use crate::error::{Error, Result};
use crate::spec::{ProfileSpec, RestartPolicy, RESTART_LIMIT, RESTART_WINDOW_SECS};
use crate::vmm_proc::{self, JailArgs, JailCgroup, Launch};

/// A VMM process the daemon watches.
struct RunningVm {
    pid: i32,
    /// Set before the daemon asks the VMM to end, so its exit is not treated as a crash.
    stopping: Arc<AtomicBool>,
    /// Becomes `Some(description)` when the process has exited.
    exited: watch::Receiver<Option<String>>,
}

/// Restarts allowed in a sliding window.
#[derive(Debug, Default)]
pub(super) struct RestartBudget {
    times: VecDeque<Instant>,
}

impl RestartBudget {
    /// Takes one restart at `now` if fewer than `limit` were taken within `window`.
    pub(super) fn take(&mut self, now: Instant, limit: usize, window: Duration) -> bool {
        while self
            .times
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) > window)
        {
            self.times.pop_front();
        }
        if self.times.len() >= limit {
            return false;
        }
        self.times.push_back(now);
        true
    }
}

/// The table of live VMM processes and restart budgets.
#[derive(Default)]
pub(super) struct Supervisor {
    running: Mutex<HashMap<String, RunningVm>>,
    restarts: Mutex<HashMap<String, RestartBudget>>,
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Supervisor {
    /// Whether `name` has a VMM process.
    pub(super) fn is_live(&self, name: &str) -> bool {
        guard(&self.running).contains_key(name)
    }

    /// The VMM process of `name`.
    pub(super) fn pid(&self, name: &str) -> Option<i32> {
        guard(&self.running).get(name).map(|r| r.pid)
    }

    /// The profiles with a VMM process, by name.
    pub(super) fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = guard(&self.running).keys().cloned().collect();
        names.sort();
        names
    }

    /// Registers the VMM `pid` of `name`; returns its stop flag and exit sender.
    fn insert(&self, name: &str, pid: i32) -> (Arc<AtomicBool>, watch::Sender<Option<String>>) {
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
        (stopping, tx)
    }

    /// Forgets the VMM of `name` if it is `pid`; whether it was.
    fn remove_if(&self, name: &str, pid: i32) -> bool {
        let mut r = guard(&self.running);
        if r.get(name).is_some_and(|v| v.pid == pid) {
            r.remove(name);
            true
        } else {
            false
        }
    }

    /// Forgets the restarts of `name` (a start or delete asked for by the user).
    pub(super) fn forget_restarts(&self, name: &str) {
        guard(&self.restarts).remove(name);
    }

    fn take_restart(&self, name: &str) -> bool {
        guard(&self.restarts)
            .entry(name.to_string())
            .or_default()
            .take(
                Instant::now(),
                RESTART_LIMIT,
                Duration::from_secs(RESTART_WINDOW_SECS),
            )
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

impl Handset {
    /// Spawns the VMM for `launch`, puts it in its cgroup, waits for its API socket and
    /// registers it as running in the background (ops lock held).
    pub(super) async fn launch(
        self: &Arc<Self>,
        name: &str,
        spec: &ProfileSpec,
        launch: &Launch,
    ) -> Result<()> {
        check_host_memory(name, spec.memory_mib)?;
        let dir = self.registry.dir();
        let api = dir.api_socket(name);
        let uid = match self.opts.jail {
            true => {
                let uid = vmm_proc::jail_uid(self.registry.row(name)?.vsock_cid)?;
                give_run_dir(&dir.run(name), uid)?;
                uid
            }
            false => 0,
        };
        let jail = self.opts.jail.then(|| JailArgs {
            id: name.to_string(),
            uid,
            root: dir.jail_root(),
            // A v2 group is made, joined (clone3 into it) and removed by the jailer.
            cgroup: match &self.cgroups {
                Cgroups::V2 { dir } => Some(JailCgroup {
                    dir: dir.join(name),
                    cpu_weight: spec.cpu.background,
                    memory_max_mib: spec.memory_max(),
                }),
                _ => None,
            },
        });
        let jailer_cgroup = jail.as_ref().is_some_and(|j| j.cgroup.is_some());
        // An encrypted profile's disk keys, unwrapped for this launch only.
        let keys = crate::disk_keys::keys_for_vmm(dir, spec)?;
        let args = vmm_proc::vmm_args(launch, &api, spec.screen, keys.is_some(), jail.as_ref());
        let log = dir.vmm_log(name);
        let mut child = vmm_proc::spawn(
            &self.opts.vmm_bin,
            &args,
            &log,
            keys.as_deref().map(|k| &k[..]),
        )
        .await?;
        drop(keys);
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
        // A restore reads the whole saved guest before its API answers: give it as long as
        // the snapshot that wrote it had (a boot only builds the VM); a return's API answers
        // once the guest it received runs.
        let wait = match launch {
            Launch::Boot { .. } => START_TIMEOUT,
            Launch::Restore { .. } | Launch::Return { .. } => SNAPSHOT_TIMEOUT,
        };
        let deadline = Instant::now() + wait;
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
                    Error::Vmm(format!("no API socket after {wait:?}")),
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
        let (stopping, tx) = self.supervisor.insert(name, pid);
        self.registry.apply(name, Event::Launched, Some(pid), "")?;
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
    pub(super) fn adopt(self: &Arc<Self>, name: &str, pid: i32) -> Result<()> {
        let pidfd = vmm_proc::pidfd_open(pid)?;
        let (stopping, tx) = self.supervisor.insert(name, pid);
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
        if !self.supervisor.remove_if(name, pid) {
            return;
        }
        self.cleanup_run(name);
        self.registry.event(
            name,
            if failed { "crashed" } else { "exited" },
            &format!("pid {pid} {desc}"),
        );
        let policy = self
            .registry
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
        let (event, detail) = match outcome {
            Ok(true) => return,
            Ok(false) if restart => {
                let detail =
                    format!("restart limit ({RESTART_LIMIT} a minute) reached; last exit: {desc}");
                self.registry.event(name, "restart-limit", &detail);
                (Event::GaveUp, detail)
            }
            Ok(false) => (Event::Exited, format!("exited: {desc}")),
            Err(e) => {
                let detail = format!("restart failed: {e}");
                self.registry.event(name, "restart-failed", &detail);
                (Event::GaveUp, detail)
            }
        };
        if let Err(e) = self.registry.apply(name, event, None, &detail) {
            tracing::error!("{name}: {e}");
        }
        let _ = self.place_after_exit(name).await;
    }

    /// Restarts `name` unless the restart limit is reached; `Ok(false)` if it is.
    pub(super) async fn restart_locked(self: &Arc<Self>, name: &str) -> Result<bool> {
        if !self.supervisor.take_restart(name) {
            return Ok(false);
        }
        self.registry.event(name, "restarting", "");
        self.start_locked(name).await?;
        Ok(true)
    }

    /// Removes a profile's cgroup and run directory after its VMM is gone.
    pub(super) fn cleanup_run(&self, name: &str) {
        if let Err(e) = self.cgroups.remove(name) {
            tracing::warn!("{name}: {e}");
        }
        let dir = self.registry.dir();
        for f in [dir.api_socket(name), dir.vsock_socket(name)] {
            let _ = std::fs::remove_file(f);
        }
        self.remove_jail_dir(name);
    }

    /// Removes a jail directory a killed jailer left behind, unless something is mounted
    /// under it (then the jailer reuses it at the next start).
    pub(super) fn remove_jail_dir(&self, name: &str) {
        let dir = self.registry.dir().jail_root().join(name);
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

    /// Ends a profile's VMM: API stop, then SIGTERM, then SIGKILL; cleans up. Returns how.
    pub(super) async fn stop_vm(&self, name: &str) -> Result<String> {
        self.halt_replication(name);
        let (pid, stopping, mut exited) = {
            let r = guard(&self.supervisor.running);
            match r.get(name) {
                Some(vm) => (vm.pid, vm.stopping.clone(), vm.exited.clone()),
                // Already gone (an earlier stop ended it but could not record that, e.g. on
                // a full disk): nothing to end, so a retried stop goes through.
                None => {
                    drop(r);
                    self.kill_strays(name, None);
                    self.cleanup_run(name);
                    return Ok("no VMM process left".into());
                }
            }
        };
        // The refusals of the interval so far, before the VMM ends.
        self.audit_net_drops(name).await;
        stopping.store(true, Ordering::SeqCst);
        let api = self.registry.dir().api_socket(name);
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
        self.supervisor.remove_if(name, pid);
        self.cleanup_run(name);
        Ok(how)
    }

    /// Kills VMMs of `name` the registry does not know (e.g. started by a daemon that died
    /// before recording the pid); `known` (and its descendants) is spared.
    pub(super) fn kill_strays(&self, name: &str, known: Option<i32>) {
        let api = self.registry.dir().api_socket(name);
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
            self.registry
                .event(name, "stray-killed", &format!("pid {pid}"));
        }
    }
}

/// Makes `run` (the one host directory the jailed VMM writes: sockets, serial log rotation,
/// staged snapshots) owned by the VMM's own `uid` (and gid), mode 0700.
pub(super) fn give_run_dir(run: &Path, uid: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(run, Some(uid), Some(uid))
        .map_err(Error::io(format!("cannot chown {}", run.display())))?;
    std::fs::set_permissions(run, std::fs::Permissions::from_mode(0o700))
        .map_err(Error::io(format!("cannot chmod {}", run.display())))
}

/// The host's RAM in MiB (`MemTotal` of /proc/meminfo), if it can be read.
fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib >> 10)
}

/// Refuses (409, before a VMM is spawned) a guest larger than the host's RAM: the VMM would
/// refuse it too, as a failed start.
fn check_host_memory(name: &str, memory_mib: u64) -> Result<()> {
    match host_memory_mib() {
        Some(host) if memory_mib > host => Err(Error::Conflict(format!(
            "profile {name} needs {memory_mib} MiB of memory and this host has {host} MiB: \
             lower it with `pocketvisor profile set {name} memory_mib=N`"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_are_limited_within_the_window_only() {
        let mut b = RestartBudget::default();
        let t0 = Instant::now();
        let window = Duration::from_secs(60);
        assert!(b.take(t0, 3, window));
        assert!(b.take(t0 + Duration::from_secs(1), 3, window));
        assert!(b.take(t0 + Duration::from_secs(2), 3, window));
        assert!(!b.take(t0 + Duration::from_secs(3), 3, window));
        // Once the first has left the window, one more is allowed, and only one.
        assert!(b.take(t0 + Duration::from_secs(61), 3, window));
        assert!(!b.take(t0 + Duration::from_secs(61), 3, window));
    }
}
