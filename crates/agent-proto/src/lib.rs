//! The guest agent protocol shared by the handset (host), the Linux agent (`guest/agent`)
//! and the probe guest's agent mode (`guest/probe/src/agent.rs`).
//!
//! The host connects to vsock port [`PORT`] and sends one request per line, a flat JSON
//! object of strings ([`Request`]); the agent answers each with one JSON line whose `ok`
//! says whether it succeeded (written by the [`answer`] functions, read by the host as an
//! [`Answer`] with the `serde` feature). Binary data travels as standard padded base64
//! ([`b64`]). `guest/probe/PROTOCOL.md` ("Agent mode") describes the ops.
//!
//! The crate is `no_std` and needs no allocator: the probe has none. The `alloc` feature adds
//! owned helpers; `serde` adds `Answer`. Everything parsed is validated here, so each side
//! applies the same rules to what the other sends.

#![no_std]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod answer;
pub mod b64;
mod error;
mod limits;
mod names;
mod request;

#[cfg(feature = "serde")]
pub use answer::Answer;
pub use answer::Sink;
pub use error::ProtoError;
pub use limits::{Limits, ENVELOPE_MAX, LINUX, PROBE};
pub use names::{valid_file_name, valid_mime, DEFAULT_MIME, MIME_MAX, NAME_MAX};
pub use request::{Op, Request};

/// The agents' vsock port.
pub const PORT: u32 = 1025;
/// Protocol version, reported by `health`.
pub const VERSION: u32 = 1;
