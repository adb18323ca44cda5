//! Device models for pocketvisor guests.
//!
//! Everything here sits on the boundary with the guest: every value a guest writes (port and MMIO
//! accesses, PCI config writes, descriptor chains) is validated, and a bad value gets an error
//! status or a device reset, never a panic or an access outside guest memory.
//!
//! - [`bus`]: address-range dispatch of port I/O and MMIO accesses to devices.
//! - [`legacy`]: 16550 serial, i8042 reset, the power-off and debug-exit ports.
//! - [`pci`]: the PCI host bridge (0xCF8/0xCFC and ECAM), BARs, MSI-X.
//! - [`virtio`]: the virtio 1.x device contract, the virtio-pci transport, and the block, net,
//!   vsock, rng and balloon devices.
//!
//! Saved state uses one vocabulary: a `*State` type, `save_state()` and `restore_state(&state)`
//! (serial, MSI-X, the virtio-pci transport, and each virtio device's own bytes).

pub mod bus;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod legacy;
mod narrow;
pub mod pci;
pub mod ratelimit;
pub mod threads;
pub mod virtio;

/// Guest memory as every device sees it. Each region carries a dirty bitmap (one bit per
/// 4 KiB page): every write through `vm-memory` (device writes included) marks its pages, so
/// the VMM can tell which pages changed since it last looked (live migration).
pub type GuestMem = vm_memory::GuestMemoryMmap<DirtyBitmap>;

/// The dirty bitmap of one guest memory region.
pub type DirtyBitmap = vm_memory::bitmap::AtomicBitmap;
