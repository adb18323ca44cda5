//! An RFB 3.8 (VNC) server for one VM's screen: the virtio-gpu scanout goes out as ZRLE
//! ([`zrle`], to clients that ask for it) or Raw rectangles of the areas the guest flushed (DesktopSize when the scanout's size changes),
//! with a scrolled area as a CopyRect and its new rows to clients that take CopyRect ([`copyrect`]),
//! and the client's keys and pointer come back as virtio-input events (a key on the
//! keyboard, the left button as one finger on the touch screen).
//!
//! [`proto`] is the wire format (the client-message parser is fuzzed, `fuzz/`), [`keysym`]
//! maps X keysyms to Linux key codes, [`server`] runs the sessions, and [`notice`] is a
//! host-drawn screen for viewers that may not see the guest. Security type None
//! only: the server listens on loopback or on a unix socket only its owner reaches.

#[cfg(feature = "server")]
pub mod copyrect;
pub mod keysym;
pub mod notice;
pub mod proto;
#[cfg(feature = "server")]
pub mod server;
pub mod zrle;

#[cfg(feature = "server")]
pub use server::{serve, Listener, Screen};
