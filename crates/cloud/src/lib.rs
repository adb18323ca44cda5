//! The data-center side of pocketvisor (issue 13): the cloud host keeps the twins of many
//! devices. [`store`] records which device (named by its client certificate) owns which twin,
//! each device seeing only its own; [`delta`] says which chunks of memory or disk changed since
//! the copy a device kept, so that a return sends only those.
//!
//! `pocketvisor cloud serve` (crates/cli/src/cloud.rs) uses both: it names the device from
//! its certificate and receives a live migration into the twin's directory, through
//! `vmm::migration::receive_requested`. Not yet built: `profile offload` and
//! `profile return`; clone, replicate and recover are to be built on the same store (a twin
//! per copy) and the same manifests (a replica's checkpoint is a delta against the last one).

pub mod delta;
pub mod store;
