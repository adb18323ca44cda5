//! The MDM server's store: one [`Store`] trait, with SQLite ([`SqliteStore`], the default, one
//! node) and PostgreSQL ([`PostgresStore`], a fleet) behind it.
//!
//! The trait speaks in whole operations (redeem a token, take a device's pending commands)
//! rather than rows, so each implementation makes every one atomic (one statement or one
//! transaction). Both apply the same numbered migrations, written once per dialect in
//! `migrations/sqlite/` and `migrations/postgres/` with the same tables and columns.
//! Times are Unix seconds supplied by the caller, which keeps expiry testable.

use sha2::{Digest, Sha256};

pub mod pg_scratch;
mod pg_store;
mod sqlite_store;

pub use pg_store::PostgresStore;
pub use sqlite_store::SqliteStore;

/// What a store operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The enrollment token is unknown, already used or expired (deliberately one error).
    #[error("enrollment token refused")]
    TokenRefused,
    /// No device with that id.
    #[error("unknown device {0}")]
    UnknownDevice(String),
    /// The command is not one of this device's pending commands.
    #[error("no pending command {0} for this device")]
    UnknownCommand(i64),
    /// A device id or certificate fingerprint is already enrolled, or a token already added.
    #[error("device already enrolled")]
    Duplicate,
    /// SQLite said no.
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    /// PostgreSQL said no, or the connection to it failed.
    #[error("postgresql: {0}")]
    Postgres(#[from] postgres::Error),
    /// The store's connection threads are gone (the store is shutting down).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The database is newer than this binary.
    #[error("database schema {found} is newer than this binary's {known}")]
    SchemaTooNew { found: i64, known: usize },
}

/// An enrolled device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Server-assigned id, also the certificate's common name.
    pub id: String,
    /// Hex SHA-256 of the device certificate (DER).
    pub cert_sha256: String,
    /// Unix seconds.
    pub enrolled_at: i64,
    /// A revoked device is refused on every device endpoint.
    pub revoked: bool,
    /// Hex ed25519 public key; it signs the device's command results.
    pub public_key: String,
}

/// A command queued for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub id: i64,
    /// `policy`, `lock`, `unlock`, `wipe`.
    pub kind: String,
    /// The command's body as sent to the device (JSON text).
    pub body: String,
    pub queued_at: i64,
}

/// One audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub time: i64,
    /// `admin` or `device:<id>`.
    pub actor: String,
    pub action: String,
    pub detail: String,
}

/// The SHA-256 of an enrollment token, as stored: the token itself is never kept.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Everything the MDM server keeps. Implementations must make each method atomic.
pub trait Store: Send + Sync {
    /// Keeps the hash of a new enrollment token valid until `expires_at`.
    fn add_token(&self, token: &str, expires_at: i64) -> Result<(), StoreError>;
    /// Uses up a token: succeeds once, before expiry; [`StoreError::TokenRefused`] otherwise.
    fn redeem_token(&self, token: &str, now: i64) -> Result<(), StoreError>;
    /// Records a newly enrolled device.
    fn add_device(&self, device: &Device) -> Result<(), StoreError>;
    /// The device whose certificate has this fingerprint, revoked or not.
    fn device_by_cert(&self, cert_sha256: &str) -> Result<Option<Device>, StoreError>;
    /// Every device, in enrollment order.
    fn devices(&self) -> Result<Vec<Device>, StoreError>;
    /// Marks a device revoked.
    fn revoke(&self, device_id: &str) -> Result<(), StoreError>;
    /// Queues a command for a device and returns its id.
    fn enqueue(&self, device_id: &str, kind: &str, body: &str, now: i64)
        -> Result<i64, StoreError>;
    /// The device's commands without a result, oldest first.
    fn pending(&self, device_id: &str) -> Result<Vec<Command>, StoreError>;
    /// Stores a device's result for one of its own pending commands.
    fn complete(
        &self,
        device_id: &str,
        command_id: i64,
        result: &str,
        now: i64,
    ) -> Result<(), StoreError>;
    /// Records a policy document pushed to a device.
    fn record_policy(
        &self,
        device_id: &str,
        version: u64,
        document: &str,
        now: i64,
    ) -> Result<(), StoreError>;
    /// Appends to the audit log.
    fn audit(&self, actor: &str, action: &str, detail: &str, now: i64) -> Result<(), StoreError>;
    /// The audit log, oldest first.
    fn audit_log(&self) -> Result<Vec<AuditEntry>, StoreError>;
    /// Keeps a device's compliance report.
    fn add_compliance(&self, device_id: &str, report: &str, now: i64) -> Result<(), StoreError>;
    /// The device's latest compliance report.
    fn latest_compliance(&self, device_id: &str) -> Result<Option<String>, StoreError>;
    /// From now on, for as long as the store lives, calls `wake` with a device's id whenever
    /// any server sharing this store (this one included) queues a command for the device or
    /// revokes it, so that a long poll held by another server returns at once. A store that
    /// only one server uses does nothing here (the default): the server wakes its own polls.
    fn watch_devices(&self, wake: DeviceWaker) -> Result<(), StoreError> {
        let _ = wake;
        Ok(())
    }
}

/// What [`Store::watch_devices`] calls with a device id.
pub type DeviceWaker = Box<dyn Fn(&str) + Send + Sync>;
