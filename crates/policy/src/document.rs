//! The policy document (TOML; every field is described in `docs/policy.md`).
//!
//! Unknown fields are refused, so a policy written for a newer pocketvisor with rules this
//! one cannot enforce is refused rather than half applied.

use serde::{Deserialize, Serialize};

use crate::net::{Cidr, PortRange};
use crate::version::Version;
use crate::{PolicyError, Result};

/// Most trusted resolvers.
const MAX_DNS_SERVERS: usize = 16;

/// A DNS name or `*.NAME`: labels of a-z, 0-9, `-`, `_` (any case; 1-63 each, 253 in all).
fn valid_dns_pattern(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    let s = s.strip_prefix("*.").unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

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
    /// The resolvers whose answers teach the addresses of the names in `name` rules (the
    /// VMM reads the guest's DNS over UDP port 53 with them; docs/policy.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<std::net::IpAddr>,
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
    /// Remote DNS name (`host.corp.example`, or `*.corp.example` for every name below it),
    /// instead of `cidr`: the addresses a `dns_servers` resolver answered for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
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
    /// The profile's disks encrypted at rest: a profile created without `encrypt_at_rest` may
    /// not start or resume (see `docs/policy.md`; snapshot memory is not encrypted yet).
    #[serde(default)]
    pub encrypt_at_rest: bool,
    /// A key lease: the profile's data key is unwrapped only while the handset holds a lease
    /// its MDM signed, asked for this long (`"90s"`, `"30m"`, `"8h"`, `"7d"`; at most 30 days)
    /// and renewed at every contact. Past the lease, offline, the profile is suspended (its
    /// key leaves memory) and does not start or resume until a fresh lease arrives. Needs
    /// `encrypt_at_rest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
}

/// The longest key lease a policy may ask for.
pub const MAX_LEASE_SECS: u64 = 30 * 86_400;

/// Seconds in a duration written `<n>s`, `<n>m`, `<n>h` or `<n>d`.
pub fn parse_duration(text: &str) -> Option<u64> {
    let unit = match text.chars().last()? {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return None,
    };
    let digits = &text[..text.len() - 1];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(unit)
}

impl StoragePolicy {
    /// The key lease's length in seconds, if the policy asks for one (validated).
    pub fn lease_secs(&self) -> Option<u64> {
        self.lease.as_deref().and_then(parse_duration)
    }
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
    /// SHA-256 of the firmware ROMs it may boot instead of a kernel; empty: any, unless
    /// `kernels` is pinned (then a firmware boot, which runs whatever kernel its disk holds,
    /// is refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub firmware: Vec<String>,
    /// SHA-256 of the whole disk images its disks may be made from (as the handset recorded
    /// them when it copied the image at create); empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk_images: Vec<String>,
    /// The oldest pocketvisor that may run the profile (`MAJOR.MINOR.PATCH`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_pocketvisor: Option<String>,
}

/// The offline section: the longest a governed profile may run without reaching the management
/// server (the daemon locks it `max_offline_secs` after the later of the policy's `issued_at`
/// and the MDM's last signed word to the device; see `docs/policy.md`).
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
        if let Some(lease) = &self.storage.lease {
            match parse_duration(lease) {
                Some(secs) if (1..=MAX_LEASE_SECS).contains(&secs) => {}
                _ => {
                    return bad(format!(
                        "storage.lease {lease:?}: give 1s to 30d as <n>s, <n>m, <n>h or <n>d"
                    ))
                }
            }
            if !self.storage.encrypt_at_rest {
                return bad("storage.lease needs storage.encrypt_at_rest = true".into());
            }
        }
        if self.network.rules.len() > MAX_NET_RULES {
            return bad(format!("more than {MAX_NET_RULES} network rules"));
        }
        for (i, rule) in self.network.rules.iter().enumerate() {
            if rule.ports.is_some() && !matches!(rule.protocol, Protocol::Tcp | Protocol::Udp) {
                return bad(format!(
                    "network.rules[{i}]: ports need protocol = \"tcp\" or \"udp\""
                ));
            }
            if let Some(name) = &rule.name {
                if rule.cidr.is_some() {
                    return bad(format!("network.rules[{i}]: a rule has a cidr or a name"));
                }
                if !valid_dns_pattern(name) {
                    return bad(format!(
                        "network.rules[{i}]: name {name:?} is not a DNS name or *.NAME \
                         (labels of a-z, 0-9, - and _)"
                    ));
                }
                if self.network.dns_servers.is_empty() {
                    return bad(format!(
                        "network.rules[{i}]: a name rule needs network.dns_servers (the \
                         resolvers whose answers are believed)"
                    ));
                }
            }
        }
        if self.network.dns_servers.len() > MAX_DNS_SERVERS {
            return bad(format!("more than {MAX_DNS_SERVERS} network.dns_servers"));
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
            ("boot.firmware", &self.boot.firmware),
            ("boot.disk_images", &self.boot.disk_images),
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

    /// When the offline limit ends (unix seconds): `max_offline_secs` after the later of the
    /// signed `issued_at` and `last_contact`, the signed time the management server last
    /// spoke to the device (none for a device without one).
    pub fn offline_deadline(&self, last_contact: Option<u64>) -> Option<u64> {
        let from = self.issued_at.max(last_contact.unwrap_or(0));
        self.offline
            .max_offline_secs
            .map(|n| from.saturating_add(n))
    }

    /// Whether the device was out of touch longer than the offline limit at `now`.
    pub fn is_offline_too_long(&self, now: u64, last_contact: Option<u64>) -> bool {
        self.offline_deadline(last_contact)
            .is_some_and(|d| now >= d)
    }

    /// Whether a guest booting `images` may boot on pocketvisor `build`; the error says which
    /// rule refused it.
    pub fn check_boot(&self, images: &BootImages<'_>, build: Version) -> Result<(), String> {
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
        let v = self.version;
        let listed =
            |list: &[String], hash: &str| list.is_empty() || list.iter().any(|h| h == hash);
        if let Some(kernel) = images.kernel {
            if !listed(&b.kernels, kernel) {
                return Err(format!(
                    "the kernel (SHA-256 {kernel}) is not in policy version {v}'s boot.kernels"
                ));
            }
        }
        if let Some(initrd) = images.initrd {
            if !listed(&b.initrds, initrd) {
                return Err(format!(
                    "the initrd (SHA-256 {initrd}) is not in policy version {v}'s boot.initrds"
                ));
            }
        }
        if let Some(firmware) = images.firmware {
            if b.firmware.is_empty() && !b.kernels.is_empty() {
                return Err(format!(
                    "policy version {v} pins the kernels (boot.kernels) and lists no firmware \
                     (boot.firmware): a firmware boot runs whatever kernel its disk holds"
                ));
            }
            if !listed(&b.firmware, firmware) {
                return Err(format!(
                    "the firmware (SHA-256 {firmware}) is not in policy version {v}'s boot.firmware"
                ));
            }
        }
        for image in images.disk_images {
            if !listed(&b.disk_images, image) {
                return Err(format!(
                    "a disk made from an image with SHA-256 {image} is not allowed by policy \
                     version {v}'s boot.disk_images"
                ));
            }
        }
        Ok(())
    }
}

/// What a guest boots, by SHA-256 (64 lower-case hex digits), for [`Policy::check_boot`].
#[derive(Debug, Clone, Copy, Default)]
pub struct BootImages<'a> {
    /// The kernel, when one boots.
    pub kernel: Option<&'a str>,
    /// The initrd, when there is one.
    pub initrd: Option<&'a str>,
    /// The firmware ROM, when firmware boots instead of a kernel.
    pub firmware: Option<&'a str>,
    /// The whole disk images the guest's disks were made from.
    pub disk_images: &'a [&'a str],
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
            (
                &format!(
                    "{base}[[network.rules]]\naction = \"allow\"\nname = \"*.corp.example\"\n"
                ),
                "needs network.dns_servers",
            ),
            (
                &format!(
                    "{base}[network]\ndns_servers = [\"10.0.0.53\"]\n[[network.rules]]\n\
                     action = \"allow\"\nname = \"a.*.example\"\n"
                ),
                "not a DNS name",
            ),
            (
                &format!(
                    "{base}[network]\ndns_servers = [\"10.0.0.53\"]\n[[network.rules]]\n\
                     action = \"allow\"\nname = \"x.example\"\ncidr = \"10.0.0.0/8\"\n"
                ),
                "a cidr or a name",
            ),
            (
                &format!("{base}[network]\ndns_servers = [\"resolver\"]\n"),
                "dns_servers",
            ),
        ];
        for (doc, needle) in cases {
            let err = Policy::parse(doc.as_bytes()).unwrap_err().to_string();
            assert!(err.contains(needle), "{doc:?}: {err}");
        }
    }

    #[test]
    fn the_offline_limit_runs_from_the_issue_time_or_the_last_contact_whichever_is_later() {
        let doc =
            "version = 1\nissued_at = 1000\nprofile = \"work\"\n[offline]\nmax_offline_secs = 60\n";
        let p = Policy::parse(doc.as_bytes()).unwrap();
        assert_eq!(p.offline_deadline(None), Some(1060));
        assert!(!p.is_offline_too_long(1059, None));
        assert!(p.is_offline_too_long(1060, None));
        // A contact after the issue moves the limit; an older one (a replayed word) does not.
        assert_eq!(p.offline_deadline(Some(5000)), Some(5060));
        assert!(!p.is_offline_too_long(5059, Some(5000)));
        assert!(p.is_offline_too_long(5060, Some(5000)));
        assert_eq!(p.offline_deadline(Some(10)), Some(1060));
        let none = Policy::parse(b"version = 1\nissued_at = 1000\nprofile = \"work\"\n").unwrap();
        assert!(!none.is_offline_too_long(u64::MAX, None));
    }

    #[test]
    fn name_rules_go_with_trusted_resolvers() {
        let doc = "version = 1\nissued_at = 10\nprofile = \"work\"\n[network]\n\
                   default = \"deny\"\ndns_servers = [\"10.0.0.53\", \"fd00::53\"]\nrules = [\n\
                   { action = \"allow\", protocol = \"udp\", cidr = \"10.0.0.53/32\", ports = \"53\" },\n\
                   { action = \"allow\", name = \"*.Corp.example\", protocol = \"tcp\", ports = \"443\" },\n]\n";
        let p = Policy::parse(doc.as_bytes()).unwrap();
        assert_eq!(p.network.dns_servers.len(), 2);
        assert_eq!(p.network.rules[1].name.as_deref(), Some("*.Corp.example"));
        assert_eq!(p.network.rules[1].cidr, None);
    }

    #[test]
    fn boot_allows_only_listed_kernels_and_new_enough_builds() {
        let p = Policy::parse(FULL.as_bytes()).unwrap();
        let good = "a".repeat(64);
        let other = "b".repeat(64);
        let v = Version(0, 1, 0);
        assert!(p.check_boot(&kernel(&good, None), v).is_ok());
        assert!(p.check_boot(&kernel(&good, Some(&other)), v).is_ok());
        let err = p.check_boot(&kernel(&other, None), v).unwrap_err();
        assert!(err.contains("boot.kernels"), "{err}");
        let err = p
            .check_boot(&kernel(&good, None), Version(0, 0, 9))
            .unwrap_err();
        assert!(err.contains("requires pocketvisor 0.1.0"), "{err}");
        let mut pinned = p.clone();
        pinned.boot.initrds = vec![good.clone()];
        assert!(pinned.check_boot(&kernel(&good, Some(&good)), v).is_ok());
        assert!(pinned.check_boot(&kernel(&good, Some(&other)), v).is_err());
    }

    fn kernel<'a>(kernel: &'a str, initrd: Option<&'a str>) -> BootImages<'a> {
        BootImages {
            kernel: Some(kernel),
            initrd,
            ..BootImages::default()
        }
    }

    fn firmware_boot<'a>(firmware: &'a str, disk_images: &'a [&'a str]) -> BootImages<'a> {
        BootImages {
            firmware: Some(firmware),
            disk_images,
            ..BootImages::default()
        }
    }

    #[test]
    fn firmware_and_disk_images_are_checked_like_kernels() {
        let (good, other) = ("a".repeat(64), "b".repeat(64));
        let (good, other) = (good.as_str(), other.as_str());
        let (images, others) = ([good], [good, other]);
        let v = Version(0, 1, 0);
        // Nothing pinned: any firmware, any image.
        let mut p = Policy::parse(FULL.as_bytes()).unwrap();
        p.boot.kernels.clear();
        assert!(p.check_boot(&firmware_boot(other, &others), v).is_ok());
        // Kernels pinned, no firmware listed: a firmware boot would escape the pin.
        p.boot.kernels = vec![good.to_string()];
        let err = p.check_boot(&firmware_boot(good, &[]), v).unwrap_err();
        assert!(err.contains("boot.firmware"), "{err}");
        // Firmware listed: only that one.
        p.boot.firmware = vec![good.to_string()];
        assert!(p.check_boot(&firmware_boot(good, &others), v).is_ok());
        let err = p.check_boot(&firmware_boot(other, &[]), v).unwrap_err();
        assert!(
            err.contains("boot.firmware") && err.contains(other),
            "{err}"
        );
        // Disk images listed: every disk made from an image must come from a listed one.
        p.boot.disk_images = vec![good.to_string()];
        assert!(p.check_boot(&firmware_boot(good, &images), v).is_ok());
        let err = p.check_boot(&firmware_boot(good, &others), v).unwrap_err();
        assert!(
            err.contains("boot.disk_images") && err.contains(other),
            "{err}"
        );
        // The lists are hashes, checked when the document is parsed.
        let bad = FULL.replace("[boot]", "[boot]\nfirmware = [\"AB\"]");
        let err = Policy::parse(bad.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("boot.firmware"), "{err}");
    }

    #[test]
    fn a_lease_is_a_bounded_duration_and_needs_encryption() {
        assert_eq!(parse_duration("90s"), Some(90));
        assert_eq!(parse_duration("8h"), Some(28_800));
        assert_eq!(parse_duration("2d"), Some(172_800));
        for bad in ["", "h", "5", "-5m", "5 m", "1.5h", "5w"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        let doc = |storage: &str| {
            format!("version = 1\nissued_at = 1000\nprofile = \"work\"\n[storage]\n{storage}")
        };
        let p: Policy = toml::from_str(&doc("encrypt_at_rest = true\nlease = \"8h\"\n")).unwrap();
        p.validate().unwrap();
        assert_eq!(p.storage.lease_secs(), Some(28_800));
        for bad in [
            "lease = \"8h\"\n",
            "encrypt_at_rest = true\nlease = \"31d\"\n",
            "encrypt_at_rest = true\nlease = \"0s\"\n",
        ] {
            let p: Policy = toml::from_str(&doc(bad)).unwrap();
            assert!(p.validate().is_err(), "{bad}");
        }
    }
}
