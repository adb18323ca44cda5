//! Shared code of the bench binaries (`bench`, `snapshot_portable`, `handset`).

pub mod portable;
pub mod rawexit;
pub mod util;
