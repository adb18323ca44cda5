//! `pocketvisor export`, `import` and `keygen`: a handset profile as one portable, encrypted
//! `.pvp` file (the format is `crates/vault`).
//!
//! What goes in the file (see [`layout`]): `profile.toml`, every disk image (holes kept sparse)
//! and, for a suspended profile, its snapshot directory. The manifest's `config` is a
//! [`layout::ProfileConfig`] (format tag, the state, the vsock CID and the spec); its `policy` is
//! the spec's channel policy.

pub mod export;
pub mod import;
pub mod keygen;
pub(crate) mod layout;
mod progress;
pub(crate) mod secret;

pub use export::ExportArgs;
pub use import::ImportArgs;
pub use keygen::KeygenArgs;
