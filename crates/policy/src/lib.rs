//! Signed IT policy documents for pocketvisor profiles.
//!
//! An organisation writes a policy (TOML, schema in `docs/policy.md`) for one profile of a
//! handset, signs it with its ed25519 key ([`keys`]) into an envelope ([`envelope`]), and the
//! handset, which trusts that organisation's public key, verifies the signature over the exact
//! bytes **before** parsing anything, then checks the document ([`document`]), its expiry and
//! that its version is newer than the one in force ([`store`]: no rollback). The decisions the
//! VMM and the daemon enforce (which kernels may boot, which channels are open, ...) are
//! methods of [`Policy`]; the guest never sees or touches any of it.

pub mod document;
pub mod envelope;
pub mod keys;
pub mod net;
pub mod store;
pub mod version;

pub use document::{
    Action, BootImages, BootPolicy, ChannelRules, NetRule, NetworkPolicy, OfflinePolicy, Policy,
    Protocol, ScreenPolicy, StoragePolicy,
};
pub use envelope::{sign, verify, Verified};
pub use keys::{OrgPublicKey, OrgSecretKey};
pub use store::{apply, read_in_force, Applied};

/// Why a policy, key or envelope was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The envelope is malformed or its signature does not verify under the trusted key
    /// (unsigned, tampered, or signed by another key).
    #[error("policy signature: {0}")]
    Signature(String),
    /// The signed document is not a valid policy.
    #[error("policy document: {0}")]
    Document(String),
    /// The policy is past its expiry time.
    #[error("policy version {version} expired at {expires_at} (unix time; now {now})")]
    Expired {
        /// Its version.
        version: u64,
        /// Its expiry (unix seconds).
        expires_at: u64,
        /// The time of the check (unix seconds).
        now: u64,
    },
    /// The policy is not newer than the one in force (a rollback, or a replay).
    #[error(
        "policy version {offered} refused: version {in_force} is in force and versions only \
         go up (no rollback)"
    )]
    Rollback {
        /// The offered version.
        offered: u64,
        /// The version in force.
        in_force: u64,
    },
    /// A key file is malformed.
    #[error("key: {0}")]
    Key(String),
    /// A file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
}

impl PolicyError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PolicyError {
        let what = what.into();
        move |source| PolicyError::Io { what, source }
    }
}

/// The crate's result type.
pub type Result<T, E = PolicyError> = std::result::Result<T, E>;

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
