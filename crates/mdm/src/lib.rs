//! The pocketvisor MDM server's library.
//!
//! - [`store`]: the [`Store`] trait (devices, enrollment tokens, command queues, pushed
//!   policies, audit, compliance) and its SQLite implementation.
//! - [`ca`]: the server's certificate authority, which issues a device certificate at
//!   enrollment.

pub mod ca;
pub mod store;

pub use ca::{Ca, CaError, EnrollRequest, IssuedCert};
pub use store::{AuditEntry, Command, Device, SqliteStore, Store, StoreError};
