//! The data-center side of pocketvisor (issue 13): the cloud host keeps the twins of many
//! devices. [`store`] records which device (named by its client certificate) owns which twin,
//! each device seeing only its own.
//!
//! `pocketvisor cloud serve` (crates/cli/src/cloud.rs) uses it: it names the device from its
//! certificate and, for `offload NAME`, carries a live migration on to the twin's jailed VMM,
//! which receives it in the twin's directory (`vmm::migration::accept_request`,
//! `Requested::forward`); for `return NAME` it carries the twin's migration back to the device, which starts from the copy it kept and is sent only
//! the pages and disk chunks that differ from it (`vmm::migration`'s `Base`). A replica twin
//! (kind `replica`) keeps a device's sealed checkpoints ([`replica`]: in its directory or an
//! object store) for `recover NAME`.
//! Not yet built: the handset's `profile offload` and `profile return`; clone.

pub mod replica;
pub mod store;
