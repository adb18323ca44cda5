//! The pocketvisor MDM server's library.
//!
//! - [`store`]: the [`Store`] trait (devices, enrollment tokens, command queues, pushed
//!   policies, audit, compliance), its SQLite (default) and PostgreSQL (fleet)
//!   implementations, and a throwaway PostgreSQL cluster for tests and benches.
//! - [`ca`]: the server's certificate authority, which issues a device certificate at
//!   enrollment.
//! - [`client`]: HTTPS requests as a device or the admin CLI makes them.
//! - [`device`]: a device's enrollment kept on disk and its verified view of commands.
//! - [`protocol`]: the JSON bodies and the signed forms of commands and results.
//! - [`request_log`]: `mdm serve --request-log`, every request recorded as a JSON line.
//! - [`server`]: `pocketvisor mdm serve`, axum over rustls (device certificates, admin token).
//! - [`sim`]: simulated devices for the load test and the MDM bench.

pub mod ca;
pub mod client;
pub mod device;
pub mod protocol;
pub mod request_log;
pub mod server;
pub mod sim;
pub mod store;

pub use ca::{Ca, CaError, EnrollRequest, IssuedCert};
pub use store::{AuditEntry, Command, Device, PostgresStore, SqliteStore, Store, StoreError};
