//! The handset's side of the organisation's MDM (`handset --mdm URL --enroll TOKEN`,
//! docs/mdm.md): a background task of the daemon that enrolls once, keeps a long poll open,
//! acts on the commands the server signed for this device, answers each with a result
//! signed by the device key and sends compliance reports.
//!
//! - **Enrollment**: `<state-dir>/mdm/` holds the device key and the enrollment (0600, temp +
//!   fsync + rename, [`mdm::device::Enrollment`]); a later start loads them and needs no token.
//! - **Commands**: only those whose signature by the server key the device enrolled with
//!   verifies for this device are acted on; any other is refused, changes nothing and is
//!   audited here (`mdm-refused`). Each command is journalled before its first step
//!   ([`journal`]); what it may touch is the managed profiles only
//!   ([`crate::daemon::managed`]).
//! - **Offline**: the daemon works without the MDM; the task retries with backoff (1 s
//!   doubling to [`BACKOFF_MAX`]) and `GET /v1/handset` says how the link stands ([`MdmStatus`]).

pub mod journal;
pub mod lease;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mdm::device::{DeviceError, Enrollment};
use mdm::protocol::SignedCommand;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::daemon::managed::HashCache;
use crate::error::Error;
use crate::Handset;

/// The longest wait between two attempts to reach the MDM.
pub const BACKOFF_MAX: Duration = Duration::from_secs(16);
/// How long one poll asks the server to hold it open (the server may cap it lower).
pub const LONG_POLL_SECS: u64 = 25;
/// The directory of the enrollment and the journal, under the state directory.
pub const MDM_DIR: &str = "mdm";

/// How the daemon reaches its MDM (`handset --mdm`).
#[derive(Clone)]
pub struct MdmOptions {
    /// The server, `HOST:PORT` (HOST must be in its certificate).
    pub server: String,
    /// The single-use enrollment token, for a handset not enrolled yet.
    pub enroll_token: Option<Zeroizing<String>>,
    /// The server's CA certificate (PEM), trusted for the enrollment; afterwards the CA kept
    /// with the enrollment is used.
    pub ca_pem: Option<String>,
}

impl std::fmt::Debug for MdmOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MdmOptions")
            .field("server", &self.server)
            .field("enroll_token", &self.enroll_token.as_ref().map(|_| "..."))
            .finish_non_exhaustive()
    }
}

impl MdmOptions {
    /// Parses `--mdm`: `https://HOST:PORT` or `HOST:PORT`.
    pub fn server_from_url(url: &str) -> crate::Result<String> {
        let rest = url.strip_prefix("https://").unwrap_or(url);
        let rest = rest.trim_end_matches('/');
        let bad = || {
            Error::BadRequest(format!(
                "--mdm {url}: give https://HOST:PORT (HOST as in the server's certificate)"
            ))
        };
        if rest.contains('/') || rest.contains('@') || url.starts_with("http://") {
            return Err(bad());
        }
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(bad());
        }
        Ok(rest.to_string())
    }

    fn host(&self) -> &str {
        let host = self
            .server
            .rsplit_once(':')
            .map_or(self.server.as_str(), |(h, _)| h);
        host.trim_start_matches('[').trim_end_matches(']')
    }
}

/// Whether the handset in `state_dir` has enrolled with an MDM.
pub fn is_enrolled(state_dir: &crate::StateDir) -> bool {
    Enrollment::exists(&state_dir.root().join(MDM_DIR))
}

/// How the link to the MDM stands (`GET /v1/handset`, `profile status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MdmStatus {
    /// The server, `HOST:PORT`.
    pub server: String,
    /// This device's id at the server, once enrolled.
    pub device_id: Option<String>,
    /// `enrolling`, `connected`, `unreachable` (retrying with backoff) or `refused` (the
    /// server refused the enrollment: a new token is needed).
    pub state: String,
    /// The last failure, if the link is not connected.
    pub detail: Option<String>,
    /// When the server last answered (unix seconds).
    pub last_contact: Option<u64>,
    /// Commands acted on since the daemon started.
    pub commands_done: u64,
    /// Commands refused as not signed for this device by the enrolled server.
    pub commands_refused: u64,
}

/// A command's result as sent back (JSON, signed by the device key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    /// `done`, `refused` (nothing changed) or `failed`.
    pub status: String,
    /// Why it was refused or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The managed profiles it acted on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<String>,
    /// A policy: the version now in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_version: Option<u64>,
    /// A wipe: the receipt, sent once the crypto-erase is durable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<WipeReceipt>,
}

/// What a wipe erased, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WipeReceipt {
    /// Each wiped profile and whether its data key was destroyed (crypto-erase) before its
    /// files were deleted.
    pub erased: Vec<ErasedProfile>,
    /// When the wipe began (unix seconds).
    pub started_at: u64,
    /// When the last profile was erased (unix seconds).
    pub completed_at: u64,
}

/// One profile in a wipe receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasedProfile {
    pub profile: String,
    /// Its data key was overwritten and removed: its disks, and any copy, no longer open.
    pub crypto_erased: bool,
}

impl CommandResult {
    fn refused(reason: impl Into<String>) -> Self {
        CommandResult {
            status: "refused".into(),
            reason: Some(reason.into()),
            profiles: vec![],
            policy_version: None,
            receipt: None,
        }
    }

    fn done(profiles: Vec<String>) -> Self {
        CommandResult {
            status: "done".into(),
            reason: None,
            profiles,
            policy_version: None,
            receipt: None,
        }
    }

    fn text(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{\"status\":\"failed\"}".into())
    }
}

/// The link's state while the task runs.
struct Link {
    h: Arc<Handset>,
    opts: MdmOptions,
    dir: PathBuf,
    enrollment: Option<Enrollment>,
    /// Commands refused or whose result the server would not take: not polled for again.
    ignored: HashSet<i64>,
    hashes: HashCache,
    /// The last compliance report the server accepted.
    last_report: Option<serde_json::Value>,
}

enum Failure {
    /// Retry with backoff.
    Transient(String),
    /// The server refused the enrollment: stop trying.
    EnrollRefused(String),
}

fn transient(e: impl std::fmt::Display) -> Failure {
    Failure::Transient(e.to_string())
}

impl Link {
    fn set_status(&self, f: impl FnOnce(&mut MdmStatus)) {
        self.h.update_mdm_status(f);
    }

    async fn connect(&mut self) -> Result<(), Failure> {
        if self.enrollment.is_some() {
            return Ok(());
        }
        let addr = tokio::net::lookup_host(&self.opts.server)
            .await
            .map_err(|e| transient(format!("resolving {}: {e}", self.opts.server)))?
            .next()
            .ok_or_else(|| transient(format!("{}: no address", self.opts.server)))?;
        let host = self.opts.host().to_string();
        let e = if Enrollment::exists(&self.dir) {
            Enrollment::load(&self.dir, addr, &host).map_err(transient)?
        } else {
            let (Some(token), Some(ca)) = (&self.opts.enroll_token, &self.opts.ca_pem) else {
                return Err(Failure::EnrollRefused(
                    "not enrolled: start with --enroll TOKEN and --mdm-ca".into(),
                ));
            };
            state_dir_private(&self.dir).map_err(transient)?;
            match Enrollment::enroll_once(&self.dir, addr, &host, ca, token).await {
                Ok(e) => {
                    self.h.audit(
                        "-",
                        "mdm-enrolled",
                        &format!("{} as device {}", self.opts.server, e.enrolled.device_id),
                    );
                    e
                }
                Err(DeviceError::Refused(status, why)) if (400..500).contains(&status) => {
                    return Err(Failure::EnrollRefused(format!(
                        "the server refused the enrollment ({status}): {why}"
                    )))
                }
                Err(e) => return Err(transient(e)),
            }
        };
        let id = e.enrolled.device_id.clone();
        self.set_status(|s| s.device_id = Some(id));
        self.enrollment = Some(e);
        self.last_report = None;
        Ok(())
    }

    /// Sends the compliance report if it changed since the server last took one.
    async fn report_compliance(&mut self) -> Result<(), Failure> {
        let report = self.h.compliance(&self.hashes).map_err(transient)?;
        let value = serde_json::to_value(&report).map_err(transient)?;
        if self.last_report.as_ref() == Some(&value) {
            return Ok(());
        }
        let e = self
            .enrollment
            .as_ref()
            .ok_or_else(|| transient("not connected"))?;
        e.send_compliance(&value).await.map_err(transient)?;
        self.last_report = Some(value);
        Ok(())
    }

    /// Asks for a key lease as long as the longest a managed profile's policy wants, or a
    /// short one as the signed time of this contact when a policy has an offline limit
    /// ([`lease::wanted_secs`]).
    async fn renew_lease(&mut self) -> Result<(), Failure> {
        let dir = self.h.dir().clone();
        let managed = self.h.managed_profiles().map_err(transient)?;
        let Some(secs) = lease::wanted_secs(&dir, &managed) else {
            return Ok(());
        };
        let e = self
            .enrollment
            .as_ref()
            .ok_or_else(|| transient("not connected"))?;
        let l = e.lease(secs).await.map_err(transient)?;
        lease::store(&dir, &l).map_err(transient)
    }

    /// Delivers the results the journal holds (acting first on entries still under way).
    async fn deliver_journal(&mut self) -> Result<(), Failure> {
        for entry in journal::all(&self.dir).map_err(transient)? {
            let entry = match entry.result {
                Some(_) => entry,
                None => self.finish(entry).await.map_err(transient)?,
            };
            self.report(&entry).await?;
        }
        Ok(())
    }

    async fn report(&mut self, entry: &journal::Entry) -> Result<(), Failure> {
        let Some(result) = &entry.result else {
            return Ok(());
        };
        let e = self
            .enrollment
            .as_ref()
            .ok_or_else(|| transient("not connected"))?;
        match e.report(entry.id, result).await {
            Ok(()) => {}
            // The server does not know this command for us (or it is complete): the result
            // cannot be delivered; it stays in the local audit log.
            Err(DeviceError::Refused(status, why)) if (400..500).contains(&status) => {
                self.h.audit(
                    "-",
                    "mdm-result-refused",
                    &format!(
                        "command {}: the server refused its result ({status}): {why}",
                        entry.id
                    ),
                );
                self.ignored.insert(entry.id);
            }
            Err(err) => return Err(transient(err)),
        }
        journal::remove(&self.dir, entry.id).map_err(transient)
    }

    /// Journals `c` (before its first step), acts on it and journals its result.
    async fn act(&mut self, c: &SignedCommand) -> crate::Result<journal::Entry> {
        if let Some(entry) = journal::read(&self.dir, c.id)? {
            return match entry.result {
                Some(_) => Ok(entry),
                None => self.finish(entry).await,
            };
        }
        let targets = match c.kind.as_str() {
            "lock" | "unlock" | "wipe" => self.h.command_targets(&c.body),
            "policy" => Ok(vec![]),
            _ => Err("unknown command kind".to_string()),
        };
        let mut entry = journal::Entry {
            id: c.id,
            kind: c.kind.clone(),
            body: c.body.clone(),
            targets: targets.clone().unwrap_or_default(),
            encrypted: vec![],
            started_at: policy::unix_now(),
            result: None,
        };
        if let Err(why) = targets {
            entry.result = Some(CommandResult::refused(why).text());
            journal::write(&self.dir, &entry)?;
            return Ok(entry);
        }
        entry.encrypted = entry
            .targets
            .iter()
            .map(|t| self.h.encrypted_at_rest(t))
            .collect();
        journal::write(&self.dir, &entry)?;
        crate::fault::kill_point("mdm-journaled");
        self.finish(entry).await
    }

    /// Carries out a journalled command (again, after a restart: each step is idempotent)
    /// and journals its result.
    async fn finish(&mut self, mut entry: journal::Entry) -> crate::Result<journal::Entry> {
        let who = format!("mdm command {}", entry.id);
        let result = match entry.kind.as_str() {
            "policy" => self.act_policy(&entry.body, &who).await,
            "lock" | "unlock" => {
                let mut done = Vec::new();
                let mut failed = None;
                for t in &entry.targets {
                    let r = if entry.kind == "lock" {
                        self.h.mdm_lock(t).await
                    } else {
                        self.h.mdm_unlock(t).await
                    };
                    match r {
                        Ok(_) => {
                            self.h.audit(t, &format!("mdm-{}", entry.kind), &who);
                            done.push(t.clone());
                        }
                        Err(e) => failed = Some(e.to_string()),
                    }
                }
                match failed {
                    None => CommandResult::done(done),
                    Some(why) => CommandResult {
                        status: "failed".into(),
                        reason: Some(why),
                        ..CommandResult::done(done)
                    },
                }
            }
            "wipe" => self.act_wipe(&entry).await?,
            _ => CommandResult::refused("unknown command kind"),
        };
        crate::fault::kill_point("mdm-acted");
        if result.status == "done" {
            self.set_status(|s| s.commands_done += 1);
        }
        entry.result = Some(result.text());
        journal::write(&self.dir, &entry)?;
        Ok(entry)
    }

    async fn act_policy(&self, body: &str, who: &str) -> CommandResult {
        use base64::Engine as _;
        let Ok(envelope) = base64::engine::general_purpose::STANDARD.decode(body.trim()) else {
            return CommandResult::refused("the body is not base64");
        };
        match self.h.mdm_policy(&envelope, who).await {
            Ok(a) => CommandResult {
                policy_version: Some(a.version),
                ..CommandResult::done(vec![a.profile])
            },
            Err(e) => CommandResult::refused(e.to_string()),
        }
    }

    /// Wipes the journalled targets still there (the daemon's start finished any wipe cut
    /// short), then makes the receipt. An error leaves the entry under way, to finish later.
    async fn act_wipe(&self, entry: &journal::Entry) -> crate::Result<CommandResult> {
        let mut erased = Vec::new();
        for (i, t) in entry.targets.iter().enumerate() {
            let was_encrypted = entry.encrypted.get(i).copied().unwrap_or(false);
            let crypto_erased = if self.h.is_managed(t) {
                self.h.mdm_wipe(t).await?
            } else {
                // Gone already: wiped before a restart (its data key went first).
                was_encrypted
            };
            self.h
                .audit(t, "mdm-wipe", &format!("mdm command {}", entry.id));
            erased.push(ErasedProfile {
                profile: t.clone(),
                crypto_erased,
            });
        }
        Ok(CommandResult {
            receipt: Some(WipeReceipt {
                erased,
                started_at: entry.started_at,
                completed_at: policy::unix_now(),
            }),
            ..CommandResult::done(entry.targets.clone())
        })
    }

    /// One round: connect, deliver what the journal holds, report compliance, poll, act.
    async fn round(&mut self) -> Result<(), Failure> {
        self.connect().await?;
        self.deliver_journal().await?;
        self.report_compliance().await?;
        self.renew_lease().await?;
        let polled = {
            let e = self
                .enrollment
                .as_ref()
                .ok_or_else(|| transient("not connected"))?;
            e.poll(LONG_POLL_SECS).await.map_err(|err| match err {
                DeviceError::Refused(403, why) => {
                    transient(format!("the server refused this device (revoked?): {why}"))
                }
                other => transient(other),
            })?
        };
        self.set_status(|s| {
            s.state = "connected".into();
            s.detail = None;
            s.last_contact = Some(policy::unix_now());
        });
        for c in &polled.refused {
            if self.ignored.insert(c.id) {
                self.h.audit(
                    "-",
                    "mdm-refused",
                    &format!(
                        "command {} ({:?}): not signed for this device by the MDM server it \
                         enrolled with; not acted on",
                        c.id,
                        c.kind.chars().take(16).collect::<String>()
                    ),
                );
                self.set_status(|s| s.commands_refused += 1);
            }
        }
        let fresh: Vec<SignedCommand> = polled
            .commands
            .into_iter()
            .filter(|c| !self.ignored.contains(&c.id))
            .collect();
        if fresh.is_empty() && !polled.refused.is_empty() {
            // Only commands we will not act on: do not spin on them.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        for c in &fresh {
            let entry = self.act(c).await.map_err(transient)?;
            let status = entry
                .result
                .as_deref()
                .and_then(|r| serde_json::from_str::<CommandResult>(r).ok())
                .map_or_else(|| "failed".to_string(), |r| r.status);
            self.h.audit(
                "-",
                "mdm-command",
                &format!("command {} ({}): {status}", c.id, c.kind),
            );
            self.report(&entry).await?;
        }
        if !fresh.is_empty() {
            self.report_compliance().await?;
        }
        Ok(())
    }
}

fn state_dir_private(dir: &std::path::Path) -> crate::Result<()> {
    crate::state_dir::create_private_dir(dir)
}

/// Runs the link until `stop` turns true: enrolls (once), then polls, acts and reports,
/// retrying with backoff while the server cannot be reached.
pub async fn run(h: Arc<Handset>, opts: MdmOptions, mut stop: tokio::sync::watch::Receiver<bool>) {
    let dir = h.dir().root().join(MDM_DIR);
    h.update_mdm_status(|s| {
        s.server = opts.server.clone();
        s.state = "enrolling".into();
    });
    let mut link = Link {
        h: h.clone(),
        opts,
        dir,
        enrollment: None,
        ignored: HashSet::new(),
        hashes: HashCache::default(),
        last_report: None,
    };
    // Commands a killed daemon left under way are finished first, even offline (a wipe
    // must complete whether or not the server answers).
    if let Ok(entries) = journal::all(&link.dir) {
        for entry in entries.into_iter().filter(|e| e.result.is_none()) {
            let id = entry.id;
            if let Err(e) = link.finish(entry).await {
                tracing::error!("mdm command {id}: cannot finish it: {e}");
            }
        }
    }
    let mut backoff = Duration::from_secs(1);
    loop {
        let round = tokio::select! {
            r = link.round() => r,
            r = stop.wait_for(|s| *s) => { drop(r); return; }
        };
        let wait = match round {
            Ok(()) => {
                backoff = Duration::from_secs(1);
                continue;
            }
            Err(Failure::Transient(why)) => {
                tracing::warn!("mdm {}: {why}; retrying in {backoff:?}", link.opts.server);
                link.enrollment = None;
                link.set_status(|s| {
                    s.state = "unreachable".into();
                    s.detail = Some(why);
                });
                let w = backoff;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                w
            }
            Err(Failure::EnrollRefused(why)) => {
                tracing::error!("mdm {}: {why}", link.opts.server);
                h.audit("-", "mdm-enroll-refused", &why);
                link.set_status(|s| {
                    s.state = "refused".into();
                    s.detail = Some(why);
                });
                let _ = stop.wait_for(|s| *s).await;
                return;
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            r = stop.wait_for(|s| *s) => { drop(r); return; }
        }
    }
}
