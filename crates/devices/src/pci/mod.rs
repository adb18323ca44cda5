//! The PCI host bridge: config space through ports 0xCF8/0xCFC and ECAM, BARs, MSI-X.
//!
//! - [`config`]: a type 0 config space with write masks, BARs and a capability list.
//! - [`msix`]: the MSI-X capability, vector table and pending-bit array.
//! - [`piix_pm`]: the power-management function firmware finds at 00:01.3.
//! - [`root`]: [`PciRoot`], bus 0 with the host bridge and up to 31 devices, and the bus
//!   adapters the VMM puts on its port and MMIO buses.
//!
//! A PCI device talks to the hypervisor only through [`VmHooks`] (ioeventfds and MSI routes),
//! so everything here is testable without KVM.

pub mod config;
pub mod msix;
pub mod piix_pm;
pub mod root;

#[cfg(any(test, feature = "fuzzing"))]
pub mod testing;

use vmm_sys_util::eventfd::EventFd;

pub use config::{BarKind, PciConfig, PciConfigParams};
pub use msix::{MsixConfig, MsixState};
pub use root::{PciConfigIo, PciConfigMmio, PciMmioWindow, PciRoot};

/// What PCI devices need from the hypervisor.
pub trait VmHooks: Send + Sync {
    /// KVM signals `fd` on any guest write to MMIO address `addr` (KVM ioeventfd, no datamatch).
    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> std::io::Result<()>;
    /// Undoes [`register_ioevent`](Self::register_ioevent).
    fn unregister_ioevent(&self, fd: &EventFd, addr: u64) -> std::io::Result<()>;
    /// Allocates a GSI (>= 24) with `fd` bound as its irqfd; writing `fd` injects that GSI's MSI.
    fn allocate_msi(&self, fd: &EventFd) -> std::io::Result<u32>;
    /// Routes `gsi` to the MSI (address, data) of the function whose requester id (bus << 8
    /// | device << 3 | function) is `devid`, or removes the route when `enabled` is false.
    /// (An arm64 GICv3 ITS translates by device id; x86_64 ignores it.)
    fn set_msi_route(
        &self,
        gsi: u32,
        address: u64,
        data: u32,
        devid: u32,
        enabled: bool,
    ) -> std::io::Result<()>;
    /// Maps `size` bytes of host memory at `host_addr` into the guest at `guest_addr` (a BAR
    /// backed by memory, like virtio shared memory), so guest accesses do not exit. Without
    /// it (the default refuses), accesses trap and the device serves them. The caller owns
    /// the host mapping and keeps it alive until it has called
    /// [`unmap_memory`](Self::unmap_memory).
    fn map_memory(&self, _guest_addr: u64, _host_addr: u64, _size: u64) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
    /// Undoes [`map_memory`](Self::map_memory) of the mapping at `guest_addr`.
    fn unmap_memory(&self, _guest_addr: u64, _size: u64) -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// A memory BAR of a device: where it currently is and how big it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciBar {
    /// BAR register index (0..6; a 64-bit BAR uses `index` and `index + 1`).
    pub index: usize,
    /// Guest physical address the BAR register currently holds.
    pub addr: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
    /// A 64-bit prefetchable BAR (allocated from the 64-bit window when there is one).
    pub prefetchable: bool,
}

/// A PCI function on bus 0.
///
/// Config accesses never cross a dword: `reg` is the dword index (0..64 for a 256-byte space,
/// larger values read as zero) and `offset` the byte offset of `data` in that dword.
pub trait PciDevice: Send {
    /// Reads config dword `reg`.
    fn config_read(&mut self, reg: usize) -> u32;
    /// Writes `data` at byte `offset` of config dword `reg`.
    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]);
    /// The memory BARs the device implements, with their current addresses (by default
    /// none: a config-space-only function such as a host bridge).
    fn bars(&self) -> Vec<PciBar> {
        Vec::new()
    }
    /// Programs BAR `index` to `addr` (the VMM's initial allocation).
    fn set_bar_addr(&mut self, _index: usize, _addr: u64) {}
    /// The guest reads `data.len()` bytes at `offset` into BAR `bar` (by default all ones,
    /// as from no device).
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    /// The guest writes `data` at `offset` into BAR `bar` (by default ignored).
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
    /// BAR `bar` was decoded at `old` and is now decoded at `new` (`None`: not decoded, e.g.
    /// memory space disabled in the command register). Devices move their ioeventfds here.
    fn bar_remapped(&mut self, _bar: usize, _old: Option<u64>, _new: Option<u64>) {}
    /// The function's requester id (bus << 8 | device << 3 | function), set when it is
    /// placed on the bus; its MSIs carry it.
    fn set_requester_id(&mut self, _id: u16) {}
}

/// Errors from building the PCI bus and its devices.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// All 31 device slots of bus 0 are taken.
    #[error("no free PCI slot on bus 0")]
    NoFreeSlot,
    /// The MMIO window has no room left for a BAR.
    #[error("PCI MMIO window exhausted allocating {size:#x} bytes")]
    MmioExhausted { size: u64 },
    /// A BAR index or size the config space cannot hold.
    #[error("invalid BAR {index} of size {size:#x}")]
    BadBar { index: usize, size: u64 },
    /// The capability list has no room for a capability.
    #[error("no room for a {len}-byte capability in config space")]
    CapabilitySpace { len: usize },
    /// More MSI-X vectors requested than supported.
    #[error("invalid MSI-X vector count {0}")]
    BadVectorCount(usize),
    /// The hypervisor refused an MSI or ioeventfd operation.
    #[error("hypervisor hook failed: {0}")]
    Hook(#[from] std::io::Error),
}

/// Reads a little-endian value of up to 8 bytes.
pub(crate) fn le_bytes_to_u64(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .enumerate()
        .fold(0, |acc, (i, b)| acc | (u64::from(*b) << (8 * i)))
}

/// Copies the bytes `[offset, offset + data.len())` of `src` (little-endian bytes) into `data`;
/// bytes past the end of `src` read as zero.
pub(crate) fn read_slice(src: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| src.get(o))
            .copied()
            .unwrap_or(0);
    }
}
