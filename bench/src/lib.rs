//! Shared code of the bench binaries (`bench`, `snapshot_portable`, `handset`, `snapshot_memory`, `migrate_live`).

pub mod cloud;
pub mod compare;
pub mod portable;
pub mod qmp;
pub mod rawexit;
pub mod rfb;
pub mod serial_tap;
pub mod util;
