//! The VMM's interface, shared by the CLI, the VMM process and the handset daemon without
//! pulling in KVM:
//!
//! - [`config`]: [`VmConfig`] and its parts, with [`VmConfig::validate`] and the [`limits`]
//!   it checks against.
//! - [`control`]: the control [`Request`]s and the API socket's wire format
//!   ([`ApiRequest`], [`ApiResponse`], [`MemoryStats`]).
//! - [`snapshot_files`]: the names of the files in a snapshot directory.
//! - [`jail`]: the host paths a configuration needs and where they appear inside a jail.

#![warn(missing_docs)]

pub mod config;
pub mod control;
pub mod jail;
pub mod limits;
pub mod snapshot_files;

pub use config::{
    parse_mac, ConfigError, DiskConfig, NetConfig, SerialConfig, VmConfig, VsockConfig,
};
pub use control::{
    ApiRequest, ApiResponse, MemoryStats, MigrationTls, Request, RequestError, DEFAULT_DOWNTIME_MS,
};
pub use jail::{HostPath, JailBind, JailPathError, JailPlan, PathKind, PathRole};
