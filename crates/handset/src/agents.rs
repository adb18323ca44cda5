//! Which profiles have an in-guest agent answering (`list`/`show`'s `agent`).
//!
//! The answer is the agent's own `health` (its kind and protocol version), asked over the
//! profile's vsock socket within [`HEALTH_TIMEOUT`] and remembered per VMM process: a
//! restarted VMM is asked again, a profile whose agent did not answer is asked again after
//! [`RETRY_AFTER`]. A paused guest cannot answer: it shows what its VMM said before.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::api_types::{ProfileInfo, ProfileState};
use crate::state_dir::StateDir;

/// How long `list`/`show` wait for an agent's `health` answer.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);
/// How long "no agent answered" is believed before asking again.
pub const RETRY_AFTER: Duration = Duration::from_secs(10);

/// An agent that answered `health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The agent's kind (`probe`, `linux`; `unknown` if it named itself with anything else
    /// than 1-16 of a-z, 0-9 and -).
    pub kind: String,
    /// The agent protocol version it speaks.
    pub version: u32,
}

impl AgentStatus {
    /// From a guest's `health` answer (guest-controlled: the kind is checked).
    fn from_health(kind: Option<&str>, version: Option<u32>) -> Self {
        let plain = |k: &&str| {
            (1..=16).contains(&k.len())
                && k.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        AgentStatus {
            kind: kind.filter(plain).unwrap_or("unknown").to_string(),
            version: version.unwrap_or(0),
        }
    }
}

struct Seen {
    pid: i32,
    status: Option<AgentStatus>,
    at: Instant,
}

/// The last `health` answer of each profile's agent, keyed to the VMM it came from.
#[derive(Default)]
pub struct AgentCache {
    seen: Mutex<HashMap<String, Seen>>,
}

impl AgentCache {
    fn lookup(&self, name: &str, pid: i32) -> Option<(Option<AgentStatus>, Instant)> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(name)
            .filter(|s| s.pid == pid)
            .map(|s| (s.status.clone(), s.at))
    }

    fn remember(&self, name: &str, pid: i32, status: Option<AgentStatus>) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let at = Instant::now();
        seen.insert(name.to_string(), Seen { pid, status, at });
    }

    /// Fills in `agent` of each profile in `list` with a VMM, asking the running ones'
    /// agents concurrently when nothing recent is known.
    pub async fn fill(&self, dir: &StateDir, list: &mut [ProfileInfo]) {
        let mut asks = tokio::task::JoinSet::new();
        for (i, p) in list.iter_mut().enumerate() {
            let Some(pid) = p.pid else { continue };
            let known = self.lookup(&p.name, pid);
            let fresh = match &known {
                Some((Some(_), _)) => true,
                Some((None, at)) => at.elapsed() < RETRY_AFTER,
                None => false,
            };
            if fresh || p.state != ProfileState::Running {
                p.agent = known.and_then(|(s, _)| s);
                continue;
            }
            let (name, vsock) = (p.name.clone(), dir.vsock_socket(&p.name));
            asks.spawn(async move {
                let answer = crate::channels::health(&name, &vsock, HEALTH_TIMEOUT).await;
                let status = answer
                    .ok()
                    .map(|a| AgentStatus::from_health(a.agent.as_deref(), a.version));
                (i, pid, status)
            });
        }
        while let Some(done) = asks.join_next().await {
            let Ok((i, pid, status)) = done else { continue };
            if let Some(p) = list.get_mut(i) {
                self.remember(&p.name, pid, status.clone());
                p.agent = status;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_named_kind_is_checked() {
        let ok = AgentStatus::from_health(Some("probe"), Some(1));
        assert_eq!((ok.kind.as_str(), ok.version), ("probe", 1));
        for bad in ["", "\u{1b}[2J", "x".repeat(17).as_str(), "Linux"] {
            assert_eq!(AgentStatus::from_health(Some(bad), Some(1)).kind, "unknown");
        }
        assert_eq!(AgentStatus::from_health(None, None).version, 0);
    }

    #[test]
    fn answers_are_remembered_per_vmm_process() {
        let c = AgentCache::default();
        let s = AgentStatus::from_health(Some("linux"), Some(1));
        c.remember("work", 10, Some(s.clone()));
        assert_eq!(c.lookup("work", 10).unwrap().0, Some(s));
        assert!(c.lookup("work", 11).is_none(), "a new VMM is asked again");
        assert!(c.lookup("personal", 10).is_none());
    }
}
