//! Host files as pocketvisor opens and replaces them, shared by the VMM's devices, the handset
//! daemon and the policy store so each rule exists once:
//! - [`open_regular`]: a path named by a spec, a config or an import must be a regular file; a
//!   FIFO or a device is refused without waiting on it.
//! - [`write_atomic`] and [`sync_dir`]: a write that replaces state goes to a temporary file, is
//!   fsynced, renamed over the old one and the directory fsynced, so a crash at any point leaves
//!   the old contents or the new, never a mix.
//!
//! Errors are `std::io::Error`s; each caller wraps them in its own error type with its context.

mod atomic;
mod regular_file;

pub use atomic::{sync_dir, write_atomic};
pub use regular_file::open_regular;
