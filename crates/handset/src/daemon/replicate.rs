//! Replication run by the daemon (issue 13, docs/cloud.md "The handset"): a profile's setting
//! (`POST /v1/profiles/NAME/replicate`, kept in the database's `replication` table) makes the
//! daemon run `pocketvisor cloud replicate` with the device's identity for as long as the
//! profile runs, also after a daemon restart. That child takes a checkpoint every period
//! through the VMM's API socket (a jailed VMM writes it into `run/replica/`, named by its jail
//! path; the child reads it back without following links), seals it for the recipients and
//! stores it at the cloud host. Each of its results becomes a profile event (`replicated`,
//! `replicate-failed`). Every lifecycle step that ends or replaces the VMM (stop, suspend,
//! offload, return, resume, wipe) ends the child first ([`Handset::halt_replication`]); a
//! reconciling loop starts it again once the profile runs.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio::task::JoinHandle;

use super::Handset;
use crate::api_types::{ProfileState, ReplicateRequest, ReplicationStatus};
use crate::db::Replication;
use crate::error::{Error, Result};
use crate::vmm_proc;

/// How often the daemon checks that each replicated profile's replication runs.
const RECONCILE_EVERY: Duration = Duration::from_millis(500);
/// The shortest wait before a replication that ended is started again.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// The longest line of the child's output kept (the rest of the line is dropped).
const MAX_LINE: usize = 2048;
/// The most recipients a replication may have.
const MAX_RECIPIENTS: usize = 16;
/// The longest period, in seconds (a day).
const MAX_EVERY_S: u32 = 86_400;
/// The most checkpoints of a chain, the default and the limit.
const FULL_EVERY_DEFAULT: u32 = 120;
const MAX_FULL_EVERY: u32 = 100_000;

/// The replications running now, by profile, and the last result of each.
#[derive(Default)]
pub(super) struct Replicas {
    running: Mutex<HashMap<String, Worker>>,
    last: Mutex<HashMap<String, String>>,
}

/// One profile's `cloud replicate` child, owned by its task; ended when dropped.
struct Worker {
    task: JoinHandle<()>,
    /// Whether the child runs (its task waits a while after it ended).
    alive: Arc<AtomicBool>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        // The task owns the child (kill_on_drop): aborting it ends the child.
        self.task.abort();
    }
}

fn guard<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Checks a request and makes it the setting to keep.
fn check(req: ReplicateRequest) -> Result<Replication> {
    super::cloud::check_cloud_host(&req.to)?;
    if !(1..=MAX_EVERY_S).contains(&req.every_s) {
        return Err(Error::BadRequest(format!(
            "every_s {} is not a period of 1 to {MAX_EVERY_S} seconds",
            req.every_s
        )));
    }
    if req.recipients.is_empty() || req.recipients.len() > MAX_RECIPIENTS {
        return Err(Error::BadRequest(format!(
            "{} recipients: give 1 to {MAX_RECIPIENTS} keys that open the checkpoints \
             (pvp-public-..., `pocketvisor keygen`)",
            req.recipients.len()
        )));
    }
    for r in &req.recipients {
        let hex = r.strip_prefix("pvp-public-").unwrap_or("");
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            let shown: String = format!("{r:?}").chars().take(80).collect();
            return Err(Error::BadRequest(format!(
                "recipient {shown} is not a public key (pvp-public- and 64 hexadecimal \
                 digits, `pocketvisor keygen`)"
            )));
        }
    }
    let full_every = req.full_every.unwrap_or(FULL_EVERY_DEFAULT);
    if !(1..=MAX_FULL_EVERY).contains(&full_every) {
        return Err(Error::BadRequest(format!(
            "full_every {full_every} is not 1 to {MAX_FULL_EVERY}"
        )));
    }
    Ok(Replication {
        to: req.to,
        every_s: req.every_s,
        recipients: req.recipients,
        full_every,
    })
}

/// The event a line of the child's stdout makes (`stored seq=N chain=C sealed_bytes=B
/// checkpoint figures`): `seq=N bytes=B pause_ms=P full=F chain=C`.
fn stored_event(line: &str) -> Option<String> {
    let rest = line.strip_prefix("stored ")?;
    let field = |k: &str| {
        rest.split(' ')
            .find_map(|t| t.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
    };
    let seq: u64 = field("seq")?.parse().ok()?;
    let bytes: u64 = field("sealed_bytes")?.parse().ok()?;
    let pause_us: u64 = field("pause_us").and_then(|v| v.parse().ok()).unwrap_or(0);
    let full = field("full") == Some("true");
    let chain =
        field("chain").filter(|c| c.len() == 32 && c.bytes().all(|b| b.is_ascii_hexdigit()))?;
    Some(format!(
        "seq={seq} bytes={bytes} pause_ms={} full={full} chain={chain}",
        pause_us.div_ceil(1000)
    ))
}

/// The next line of `r` (at most [`MAX_LINE`] bytes of it, lossy UTF-8), or None at the end.
async fn next_line<R: AsyncBufRead + Unpin>(r: &mut R) -> Option<String> {
    let mut line = Vec::new();
    loop {
        let buf = match r.fill_buf().await {
            Ok(b) => b,
            Err(_) => return None,
        };
        if buf.is_empty() {
            return (!line.is_empty()).then(|| String::from_utf8_lossy(&line).into_owned());
        }
        let (take, end) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        let room = MAX_LINE.saturating_sub(line.len());
        line.extend_from_slice(&buf[..take.min(room)]);
        r.consume(take + usize::from(end));
        if end {
            return Some(String::from_utf8_lossy(&line).into_owned());
        }
    }
}

impl Handset {
    /// Sets profile `name`'s replication (replacing one it had); it runs while the profile
    /// runs.
    pub async fn set_replication(
        self: &Arc<Self>,
        name: &str,
        req: ReplicateRequest,
    ) -> Result<ReplicationStatus> {
        crate::spec::check_name("profile name", name)?;
        self.registry.row(name)?;
        let setting = check(req)?;
        // A governed profile would come back without its IT policy.
        if self.dir().policy(name).exists() {
            return Err(Error::Conflict(format!(
                "profile {name:?} is governed by an IT policy, which a replica does not carry \
                 yet: it is not replicated (docs/cloud.md)"
            )));
        }
        if self.registry.spec(name)?.encrypt_at_rest {
            return Err(Error::Conflict(format!(
                "profile {name:?} is encrypted at rest: its VMM does not take checkpoints of a \
                 VM with an encrypted disk yet (docs/cloud.md)"
            )));
        }
        super::cloud::identity(self.dir())?;
        {
            let _ops = self.ops.lock().await;
            self.registry.db().set_replication(name, &setting)?;
            // The next checkpoint follows the new setting (a new chain).
            self.halt_replication(name);
        }
        self.registry.event(
            name,
            "replication-set",
            &format!(
                "to {} every {}s, {} recipient(s), a full checkpoint every {}",
                setting.to,
                setting.every_s,
                setting.recipients.len(),
                setting.full_every
            ),
        );
        self.reconcile_replication().await;
        self.replication(name)
    }

    /// Ends profile `name`'s replication and removes its setting.
    pub async fn stop_replication(&self, name: &str) -> Result<()> {
        crate::spec::check_name("profile name", name)?;
        self.registry.row(name)?;
        let _ops = self.ops.lock().await;
        if !self.registry.db().remove_replication(name)? {
            return Err(Error::Conflict(format!(
                "profile {name:?} is not replicated"
            )));
        }
        self.forget_replication(name);
        self.registry.event(name, "replication-stopped", "");
        Ok(())
    }

    /// Profile `name`'s replication setting and how it goes.
    pub fn replication(&self, name: &str) -> Result<ReplicationStatus> {
        crate::spec::check_name("profile name", name)?;
        self.registry.row(name)?;
        let setting = self
            .registry
            .db()
            .replications()?
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r);
        Ok(ReplicationStatus {
            active: guard(&self.replicas.running)
                .get(name)
                .is_some_and(|w| w.alive.load(Ordering::Relaxed)),
            last: guard(&self.replicas.last).get(name).cloned(),
            setting,
        })
    }

    /// Ends profile `name`'s running replication, if any (before a lifecycle step ends or
    /// replaces its VMM; the reconciling loop starts it again once the profile runs).
    pub(super) fn halt_replication(&self, name: &str) {
        let gone = guard(&self.replicas.running).remove(name);
        drop(gone);
    }

    /// Ends profile `name`'s replication and forgets its last result (the profile goes).
    pub(super) fn forget_replication(&self, name: &str) {
        self.halt_replication(name);
        guard(&self.replicas.last).remove(name);
    }

    /// Ends every running replication (daemon shutdown).
    pub(super) fn halt_all_replications(&self) {
        let all = std::mem::take(&mut *guard(&self.replicas.running));
        drop(all);
    }

    /// Starts the replication of each replicated profile that runs and has none (one that
    /// ended is started again after its retry wait), ends those of profiles that do not run.
    /// Skipped while a lifecycle step holds the ops lock.
    async fn reconcile_replication(self: &Arc<Self>) {
        let Ok(_ops) = self.ops.try_lock() else {
            return;
        };
        let settings = match self.registry.db().replications() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot read the replications: {e}");
                return;
            }
        };
        let runs = |name: &str| {
            self.supervisor.is_live(name)
                && matches!(
                    self.registry.state(name),
                    Ok(ProfileState::Running | ProfileState::Paused)
                )
                && !self.dir().intent(name).exists()
        };
        let stale: Vec<String> = guard(&self.replicas.running)
            .keys()
            .filter(|n| !settings.iter().any(|(s, _)| s == *n) || !runs(n))
            .cloned()
            .collect();
        for n in stale {
            self.halt_replication(&n);
        }
        for (name, setting) in settings {
            if !runs(&name) {
                continue;
            }
            let idle = guard(&self.replicas.running)
                .get(&name)
                .is_none_or(|w| w.task.is_finished());
            if !idle {
                continue;
            }
            let alive = Arc::new(AtomicBool::new(true));
            match self.spawn_replication(&name, &setting, alive.clone()) {
                Ok(task) => {
                    guard(&self.replicas.running).insert(name, Worker { task, alive });
                }
                Err(e) => {
                    let why = format!("cannot start: {e}");
                    guard(&self.replicas.last).insert(name.clone(), format!("failed: {why}"));
                    self.registry.event(&name, "replicate-failed", &why);
                    // Tried again after the retry wait, not every tick.
                    let task = tokio::spawn(tokio::time::sleep(RETRY_AFTER));
                    alive.store(false, Ordering::Relaxed);
                    guard(&self.replicas.running).insert(name, Worker { task, alive });
                }
            }
        }
    }

    /// Starts `pocketvisor cloud replicate` for `name` and the task that records what it
    /// says (ops lock held, the profile running).
    fn spawn_replication(
        self: &Arc<Self>,
        name: &str,
        r: &Replication,
        alive: Arc<AtomicBool>,
    ) -> Result<JoinHandle<()>> {
        let id = super::cloud::identity(self.dir())?;
        let dir = self.dir();
        let mut c = tokio::process::Command::new(&self.opts.vmm_bin);
        c.args(["cloud", "replicate", name, "--api-socket"])
            .arg(dir.api_socket(name))
            .arg("--to")
            .arg(&r.to)
            .arg("--every")
            .arg(format!("{}s", r.every_s))
            .arg("--full-every")
            .arg(r.full_every.to_string())
            .arg("--work")
            .arg(dir.profile(name).join("replica"))
            .arg("--spec")
            .arg(dir.spec(name))
            .arg("--key")
            .arg(&id.key)
            .arg("--tls-cert")
            .arg(&id.tls.cert)
            .arg("--tls-key")
            .arg(&id.tls.key)
            .arg("--tls-ca")
            .arg(&id.tls.ca);
        for k in &r.recipients {
            c.arg("--recipient").arg(k);
        }
        let pid = self.supervisor.pid(name).unwrap_or(0);
        if vmm_proc::is_jailed(pid) {
            // The jailed VMM writes into its run directory, which it sees elsewhere.
            let host = dir.run(name).join("replica");
            c.arg("--vmm-dir")
                .arg(&host)
                .arg("--vmm-sees")
                .arg(self.jail_path(name, &host)?);
        }
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // It ends with the daemon rather than checkpointing a VMM without it.
        vmm_proc::end_with_daemon(&mut c);
        let mut child = c.spawn().map_err(Error::io(format!(
            "cannot run {}",
            self.opts.vmm_bin.display()
        )))?;
        let out = child.stdout.take();
        let err = child.stderr.take();
        let me = Arc::clone(self);
        let name = name.to_string();
        let retry = RETRY_AFTER.max(Duration::from_secs(u64::from(r.every_s)));
        Ok(tokio::spawn(async move {
            let mut out = out.map(BufReader::new);
            let mut err = err.map(BufReader::new);
            let mut last_err = String::new();
            while out.is_some() || err.is_some() {
                tokio::select! {
                    l = async { next_line(out.as_mut().unwrap()).await }, if out.is_some() => {
                        match l {
                            Some(l) => me.replica_line(&name, &l),
                            None => out = None,
                        }
                    }
                    l = async { next_line(err.as_mut().unwrap()).await }, if err.is_some() => {
                        match l {
                            Some(l) => {
                                let l = l.trim().to_string();
                                if let Some(why) = l.strip_prefix("pocketvisor: replicate: ") {
                                    me.replica_failed(&name, why);
                                } else if !l.is_empty() {
                                    last_err = l;
                                }
                            }
                            None => err = None,
                        }
                    }
                }
            }
            let status = child
                .wait()
                .await
                .map_or_else(|e| e.to_string(), |s| s.to_string());
            alive.store(false, Ordering::Relaxed);
            let last = last_err.strip_prefix("pocketvisor: ").unwrap_or(&last_err);
            me.replica_failed(
                &name,
                &format!(
                    "the replication ended ({status}): {last}; started again in {}s",
                    retry.as_secs()
                ),
            );
            tokio::time::sleep(retry).await;
        }))
    }

    /// Records a line the replication printed on its stdout.
    fn replica_line(&self, name: &str, line: &str) {
        if let Some(detail) = stored_event(line) {
            guard(&self.replicas.last).insert(name.into(), format!("replicated {detail}"));
            self.registry.event(name, "replicated", &detail);
        }
    }

    /// Records a checkpoint that failed and why.
    fn replica_failed(&self, name: &str, why: &str) {
        let why: String = why.chars().take(MAX_LINE).collect();
        guard(&self.replicas.last).insert(name.into(), format!("failed: {why}"));
        self.registry.event(name, "replicate-failed", &why);
    }
}

/// The daemon's reconciling loop, until `stop` says the daemon stops.
pub async fn run(h: Arc<Handset>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        let stopped = tokio::select! {
            _ = tokio::time::sleep(RECONCILE_EVERY) => false,
            r = stop.wait_for(|s| *s) => { drop(r); true }
        };
        if stopped {
            h.halt_all_replications();
            return;
        }
        h.reconcile_replication().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> ReplicateRequest {
        ReplicateRequest {
            to: "cloud.example:7000".into(),
            every_s: 30,
            recipients: vec![format!("pvp-public-{}", "ab".repeat(32))],
            full_every: None,
        }
    }

    #[test]
    fn requests_are_checked_in_words() {
        assert_eq!(check(req()).unwrap().full_every, FULL_EVERY_DEFAULT);
        let bad = |f: &dyn Fn(&mut ReplicateRequest), says: &str| {
            let mut r = req();
            f(&mut r);
            match check(r) {
                Err(Error::BadRequest(m)) => assert!(m.contains(says), "{m}"),
                other => panic!("{other:?}"),
            }
        };
        bad(&|r| r.to = "nohost".into(), "");
        bad(&|r| r.to = "a b:7".into(), "");
        bad(&|r| r.every_s = 0, "every_s 0");
        bad(&|r| r.every_s = MAX_EVERY_S + 1, "every_s");
        bad(&|r| r.recipients.clear(), "0 recipients");
        bad(
            &|r| r.recipients = vec!["pvp-public-zz".into()],
            "not a public key",
        );
        bad(&|r| r.recipients[0].push('0'), "not a public key");
        bad(&|r| r.full_every = Some(0), "full_every 0");
    }

    #[test]
    fn stored_lines_become_events_and_nothing_else_does() {
        let chain = "0123456789abcdef0123456789abcdef";
        let line = format!(
            "stored seq=3 chain={chain} sealed_bytes=4096 full=false pages=2 disk_chunks=1 \
             bytes=9000 pause_us=1500 total_ms=20"
        );
        assert_eq!(
            stored_event(&line).unwrap(),
            format!("seq=3 bytes=4096 pause_ms=2 full=false chain={chain}")
        );
        assert!(stored_event("stored seq=x chain=00 sealed_bytes=1").is_none());
        assert!(stored_event("hello").is_none());
    }

    #[tokio::test]
    async fn long_lines_are_cut_and_the_rest_read_on() {
        let text = format!("{}\nnext\nlast", "x".repeat(3 * MAX_LINE));
        let mut r = BufReader::with_capacity(64, text.as_bytes());
        assert_eq!(next_line(&mut r).await.unwrap().len(), MAX_LINE);
        assert_eq!(next_line(&mut r).await.unwrap(), "next");
        assert_eq!(next_line(&mut r).await.unwrap(), "last");
        assert_eq!(next_line(&mut r).await, None);
    }
}
