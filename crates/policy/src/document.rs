//! The policy document (TOML; every field is described in `docs/policy.md`).
//!
//! Unknown fields are refused, so a policy written for a newer pocketvisor with rules this
//! one cannot enforce is refused rather than half applied.

use serde::{Deserialize, Serialize};

use crate::net::{Cidr, PortRange};
use crate::version::Version;
use crate::{PolicyError, Result};

/// Most network rules one policy may hold.
pub const MAX_NET_RULES: usize = 10_000;
/// Most entries in one list of hashes or profile names.
pub const MAX_LIST: usize = 1_000;

/// One profile's policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Monotonic version (1 or more): a handset refuses one not newer than what is in force.
    pub version: u64,
    /// When the organisation issued it (unix seconds).
    pub issued_at: u64,
    /// When it stops being valid (unix seconds); none: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// The profile it governs (`[a-z0-9-]{1,32}`).
    pub profile: String,
    /// What the profile's network device lets through.
    #[serde(default)]
    pub network: NetworkPolicy,
    /// How the profile's data is stored.
    #[serde(default)]
    pub storage: StoragePolicy,
    /// Cross-profile clipboard and file transfer.
    #[serde(default)]
    pub channels: ChannelRules,
    /// Screen capture and remote viewing.
    #[serde(default)]
    pub screen: ScreenPolicy,
    /// What the profile may boot.
    #[serde(default)]
    pub boot: BootPolicy,
    /// Running without reaching the management server.
    #[serde(default)]
    pub offline: OfflinePolicy,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Let it through.
    #[default]
    Allow,
    /// Drop it.
    Deny,
}

/// A rule's transport protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Any protocol.
    #[default]
    Any,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP and ICMPv6 (NDP excepted: it is always handled, see `docs/policy.md`).
    Icmp,
}

/// The network section: a default and ordered rules (the first that matches decides).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    /// What happens to traffic no rule matches.
    #[serde(default)]
    pub default: Action,
    /// Rules, in order.
    #[serde(default)]
    pub rules: Vec<NetRule>,
}

/// One network rule: matches connections the guest opens to a remote address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetRule {
    /// What to do with a match.
    pub action: Action,
    /// Remote address block; none: any address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr: Option<Cidr>,
    /// Transport protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// Remote ports (TCP or UDP rules only); none: any port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortRange>,
}

/// The storage section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoragePolicy {
    /// Disks and snapshot memory encrypted at rest (not enforced yet: see `docs/policy.md`).
    #[serde(default)]
    pub encrypt_at_rest: bool,
}

/// The channels section: the same lists as a profile spec's `channels`, which a policy in
/// force replaces for its profile.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelRules {
    /// Profiles this one may send clipboard data to.
    #[serde(default)]
    pub clipboard_to: Vec<String>,
    /// Profiles this one may send files to.
    #[serde(default)]
    pub files_to: Vec<String>,
    /// Profiles this one accepts clipboard data from; none: any that may send to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clipboard_from: Option<Vec<String>>,
    /// Profiles this one accepts files from; none: any that may send to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_from: Option<Vec<String>>,
}

/// The screen section (read by the display).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScreenPolicy {
    /// Whether the host may capture the profile's screen (screenshots, recording).
    #[serde(default = "yes")]
    pub capture: bool,
    /// Whether the profile's screen may be viewed remotely.
    #[serde(default = "yes")]
    pub remote_view: bool,
}

impl Default for ScreenPolicy {
    fn default() -> Self {
        Self {
            capture: true,
            remote_view: true,
        }
    }
}

fn yes() -> bool {
    true
}

/// The boot section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootPolicy {
    /// SHA-256 (64 lower-case hex digits) of the kernels the profile may boot; empty: any.
    #[serde(default)]
    pub kernels: Vec<String>,
    /// SHA-256 of the initrds it may boot with; empty: any.
    #[serde(default)]
    pub initrds: Vec<String>,
    /// The oldest pocketvisor that may run the profile (`MAJOR.MINOR.PATCH`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_pocketvisor: Option<String>,
}

/// The offline section (enforced with the management server, not yet: see `docs/policy.md`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfflinePolicy {
    /// The longest the profile may run without reaching the management server, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_offline_secs: Option<u64>,
}

impl Policy {
    /// Parses and checks a document (call only on bytes whose signature verified).
    pub fn parse(body: &[u8]) -> Result<Self> {
        let text = std::str::from_utf8(body)
            .map_err(|_| PolicyError::Document("the policy is not UTF-8 text".into()))?;
        let policy: Policy =
            toml::from_str(text).map_err(|e| PolicyError::Document(one_line(&e.to_string())))?;
        policy.validate()?;
        Ok(policy)
    }

    /// Checks every value the types do not.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(PolicyError::Document(m));
        if self.version == 0 {
            return bad("version must be 1 or more".into());
        }
        if let Some(exp) = self.expires_at {
            if exp <= self.issued_at {
                return bad(format!(
                    "expires_at {exp} is not after issued_at {}",
                    self.issued_at
                ));
            }
        }
        check_name("profile", &self.profile)?;
        if self.network.rules.len() > MAX_NET_RULES {
            return bad(format!("more than {MAX_NET_RULES} network rules"));
        }
        for (i, rule) in self.network.rules.iter().enumerate() {
            if rule.ports.is_some() && !matches!(rule.protocol, Protocol::Tcp | Protocol::Udp) {
                return bad(format!(
                    "network.rules[{i}]: ports need protocol = \"tcp\" or \"udp\""
                ));
            }
        }
        let c = &self.channels;
        for (what, list) in [
            ("channels.clipboard_to", Some(&c.clipboard_to)),
            ("channels.files_to", Some(&c.files_to)),
            ("channels.clipboard_from", c.clipboard_from.as_ref()),
            ("channels.files_from", c.files_from.as_ref()),
        ] {
            for name in list.into_iter().flatten() {
                check_name(what, name)?;
            }
            if list.is_some_and(|l| l.len() > MAX_LIST) {
                return bad(format!("{what}: more than {MAX_LIST} entries"));
            }
        }
        for (what, list) in [
            ("boot.kernels", &self.boot.kernels),
            ("boot.initrds", &self.boot.initrds),
        ] {
            if list.len() > MAX_LIST {
                return bad(format!("{what}: more than {MAX_LIST} entries"));
            }
            for h in list {
                if h.len() != 64 || !h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                    return bad(format!(
                        "{what}: {h:?} is not a SHA-256 (64 lower-case hex digits)"
                    ));
                }
            }
        }
        if let Some(v) = &self.boot.min_pocketvisor {
            v.parse::<Version>()
                .map_err(|e| PolicyError::Document(format!("boot.min_pocketvisor: {e}")))?;
        }
        if self.offline.max_offline_secs == Some(0) {
            return bad("offline.max_offline_secs must be 1 or more".into());
        }
        Ok(())
    }

    /// Whether the policy has expired at `now` (unix seconds).
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires_at.is_some_and(|exp| now >= exp)
    }

    /// Whether a guest with this kernel and initrd (their SHA-256, lower-case hex) may boot
    /// on pocketvisor `build`; the error says which rule refused it.
    pub fn check_boot(
        &self,
        kernel_sha256: &str,
        initrd_sha256: Option<&str>,
        build: Version,
    ) -> Result<(), String> {
        if let Some(min) = &self.boot.min_pocketvisor {
            let min: Version = min.parse()?;
            if build < min {
                return Err(format!(
                    "policy version {} requires pocketvisor {min} or newer; this is {build}",
                    self.version
                ));
            }
        }
        let b = &self.boot;
        if !b.kernels.is_empty() && !b.kernels.iter().any(|h| h == kernel_sha256) {
            return Err(format!(
                "the kernel (SHA-256 {kernel_sha256}) is not in policy version {}'s \
                 boot.kernels",
                self.version
            ));
        }
        if let Some(initrd) = initrd_sha256 {
            if !b.initrds.is_empty() && !b.initrds.iter().any(|h| h == initrd) {
                return Err(format!(
                    "the initrd (SHA-256 {initrd}) is not in policy version {}'s boot.initrds",
                    self.version
                ));
            }
        }
        Ok(())
    }
}

/// A profile name: `[a-z0-9-]{1,32}`, not beginning with `-`.
fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = (1..=32).contains(&name.len())
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(PolicyError::Document(format!(
            "{what}: {name:?} is not a profile name ([a-z0-9-]{{1,32}}, not beginning with -)"
        )))
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
version = 7
issued_at = 1764800000
expires_at = 1767400000
profile = "work"

[network]
default = "deny"
rules = [
  { action = "allow", cidr = "10.0.0.0/8", protocol = "tcp", ports = "443" },
  { action = "allow", cidr = "2001:db8::/32" },
  { action = "deny", protocol = "udp", ports = "5000-6000" },
]

[storage]
encrypt_at_rest = true

[channels]
clipboard_from = ["personal"]
files_from = []

[screen]
capture = false

[boot]
kernels = ["aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"]
min_pocketvisor = "0.1.0"

[offline]
max_offline_secs = 86400
"#;

    #[test]
    fn a_full_policy_parses_with_every_section() {
        let p = Policy::parse(FULL.as_bytes()).unwrap();
        assert_eq!(p.version, 7);
        assert_eq!(p.network.default, Action::Deny);
        assert_eq!(p.network.rules.len(), 3);
        assert_eq!(p.network.rules[0].ports.unwrap().first, 443);
        assert!(p.storage.encrypt_at_rest);
        assert_eq!(p.channels.clipboard_from, Some(vec!["personal".into()]));
        assert!(p.channels.clipboard_to.is_empty());
        assert!(!p.screen.capture && p.screen.remote_view);
        assert_eq!(p.offline.max_offline_secs, Some(86400));
        assert!(!p.is_expired(1767399999) && p.is_expired(1767400000));
    }

    #[test]
    fn invalid_documents_are_refused_with_the_reason() {
        let base = "version = 1\nissued_at = 10\nprofile = \"work\"\n";
        let cases = [
            (
                "version = 0\nissued_at = 10\nprofile = \"work\"\n",
                "version",
            ),
            (
                "version = 1\nissued_at = 10\nexpires_at = 10\nprofile = \"w\"\n",
                "expires_at",
            ),
            (
                "version = 1\nissued_at = 10\nprofile = \"../x\"\n",
                "profile",
            ),
            (&format!("{base}surprise = 1\n"), "unknown field"),
            (&format!("{base}[boot]\nkernels = [\"abc\"]\n"), "SHA-256"),
            (
                &format!("{base}[boot]\nmin_pocketvisor = \"1\"\n"),
                "min_pocketvisor",
            ),
            (
                &format!("{base}[channels]\nfiles_to = [\"A\"]\n"),
                "files_to",
            ),
            (
                &format!("{base}[[network.rules]]\naction = \"allow\"\nports = \"80\"\n"),
                "ports need",
            ),
            (
                &format!("{base}[[network.rules]]\naction = \"allow\"\ncidr = \"10.0.0.1/8\"\n"),
                "beyond",
            ),
        ];
        for (doc, needle) in cases {
            let err = Policy::parse(doc.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(needle), "{doc:?}: {err}");
        }
    }

    #[test]
    fn boot_allows_only_listed_kernels_and_new_enough_builds() {
        let p = Policy::parse(FULL.as_bytes()).unwrap();
        let good = "a".repeat(64);
        let other = "b".repeat(64);
        assert!(p.check_boot(&good, None, Version(0, 1, 0)).is_ok());
        assert!(p.check_boot(&good, Some(&other), Version(0, 1, 0)).is_ok());
        let err = p.check_boot(&other, None, Version(0, 1, 0)).unwrap_err();
        assert!(err.contains("boot.kernels"), "{err}");
        let err = p.check_boot(&good, None, Version(0, 0, 9)).unwrap_err();
        assert!(err.contains("requires pocketvisor 0.1.0"), "{err}");
        let mut pinned = p.clone();
        pinned.boot.initrds = vec![good.clone()];
        assert!(pinned
            .check_boot(&good, Some(&good), Version(0, 1, 0))
            .is_ok());
        assert!(pinned
            .check_boot(&good, Some(&other), Version(0, 1, 0))
            .is_err());
    }
}
