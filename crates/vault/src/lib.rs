//! The portable, encrypted pocketvisor profile file (`.pvp`).
//!
//! A `.pvp` file holds a profile's manifest (name, config, policy), its disks (holes kept
//! sparse) and, optionally, its snapshot. It is a stream:
//!
//! 1. a header (magic, format version, cipher, chunk size, random salt, key slots wrapping the
//!    random file key, and an HMAC over all of it), see [`header`] for the layout;
//! 2. chunks of zstd-compressed plaintext sealed with XChaCha20-Poly1305, each bound to the
//!    header, its index and whether it is the last one, so that reordering, splicing,
//!    truncation and flipped bytes are all detected.
//!
//! The plaintext is a `u32` length, the JSON [`Manifest`], then every entry's data extents in
//! manifest order.
//!
//! Chunks are compressed and sealed (or opened and decompressed) on a few worker threads, with
//! at most a few chunks in flight. [`export`] writes a file atomically; [`import`] verifies the whole file into a temporary
//! directory before renaming it into place; [`inspect`] reads just the manifest.

mod error;
mod export;
pub mod header;
mod import;
mod keys;
mod manifest;
mod pipeline;
mod sparse;
mod stream;
mod util;

pub use error::{Result, VaultError};
pub use export::{
    export, export_sealed, export_with, seal_keys, temp_path, EntrySource, ExportOptions,
    ExportStats, SealedKeys,
};
pub use header::{FORMAT_VERSION, MAGIC};
pub use import::{
    import, import_with, inspect, inspect_with, verify, verify_stream, verify_with, ImportOptions,
};
pub use keys::{
    decode_public, decode_secret, encode_public, encode_secret, generate_identity, KdfParams,
    KeySpec, Passphrase, ReadLimits, Unlock,
};
pub use manifest::{EntryInfo, EntryKind, Extent, KeyInfo, Manifest};
pub use x25519_dalek::{PublicKey, StaticSecret};

/// Progress of an export or import, reported often (at least once per MiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// What is being done.
    pub phase: Phase,
    /// Bytes processed so far.
    pub bytes_done: u64,
    /// Bytes to process in total.
    pub bytes_total: u64,
}

/// The steps of an export or import, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Deriving the key that wraps or unwraps the file key: with a passphrase this is a full
    /// argon2id run (about half a second with the default parameters), before any data moves.
    /// Reported once, with `bytes_done` 0.
    DerivingKey,
    /// Moving data: `bytes_done` grows to `bytes_total`.
    Data,
}

/// Worker threads an export or import uses by default: one per core, at most 4.
pub fn default_threads() -> usize {
    pipeline::default_threads()
}
