//! The virtio-pci transport (virtio 1.1, 4.1), modern only.
//!
//! One 64-bit memory BAR 0 of [`BAR0_SIZE`] bytes holds every structure:
//!
//! | offset   | what                                                       |
//! |----------|------------------------------------------------------------|
//! | `0x0000` | common configuration                                       |
//! | `0x1000` | ISR status (reading clears it)                             |
//! | `0x2000` | device-specific configuration                              |
//! | `0x3000` | notifications: queue `q` at `0x3000 + 4 * q`               |
//! | `0x3800` | MSI-X table (one vector per queue plus one for config)     |
//! | `0x3c00` | MSI-X pending-bit array                                    |
//!
//! Each queue's notification address is a KVM ioeventfd while the BAR is decoded; a write that
//! still reaches [`PciDevice::bar_write`] signals the same eventfd.
//!
//! A device with [shared memory](crate::virtio::SharedMemory) also has BAR [`SHM_BAR`], 64-bit
//! and prefetchable, the size of its host mapping, with one `VIRTIO_PCI_CAP_SHARED_MEMORY_CFG`
//! capability per region. While the BAR is decoded the host mapping is mapped into the guest
//! there ([`VmHooks::map_memory`]); accesses that still trap are served from the mapping.

mod common;
mod interrupt;
mod state;

#[cfg(test)]
mod e2e_tests;
#[cfg(test)]
mod lifecycle_tests;
#[cfg(test)]
mod shm_tests;
#[cfg(test)]
mod tests;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::lock;
use crate::narrow::low_u32;
use crate::pci::config::{split_u64, BarKind, PciConfig, PciConfigParams};
use crate::pci::msix::{MsixConfig, MSIX_CAP_ID};
use crate::pci::{PciBar, PciDevice, PciError, VmHooks};
use crate::virtio::{
    device_type, ActivateError, ActiveQueue, ShmRegion, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::GuestMem;

pub use common::{status, COMMON_CFG_LEN};
use common::{CommonRegs, QueueConfig};
pub use interrupt::{VirtioInterrupt, NO_VECTOR};
pub use state::{QueueState, RestoreError, VirtioPciState};

/// Size of BAR 0.
pub const BAR0_SIZE: u64 = 0x4000;
/// The BAR of a device's shared memory (64-bit prefetchable; registers 2 and 3).
pub const SHM_BAR: usize = 2;
/// Offset of the common configuration in BAR 0.
pub const COMMON_OFFSET: u64 = 0x0000;
/// Offset of the ISR status in BAR 0.
pub const ISR_OFFSET: u64 = 0x1000;
/// Offset of the device-specific configuration in BAR 0.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Offset of the notification area in BAR 0.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between the notification addresses of consecutive queues.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Offset of the MSI-X table in BAR 0.
pub const MSIX_TABLE_OFFSET: u64 = 0x3800;
/// Offset of the MSI-X PBA in BAR 0.
pub const MSIX_PBA_OFFSET: u64 = 0x3c00;
/// Most queues a device can have here (the MSI-X table must fit below the PBA).
pub const MAX_QUEUES: usize = ((MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) / 16) as usize - 1;

const REGION_LEN: u64 = 0x1000;
const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
const VIRTIO_SUBSYSTEM_ID: u16 = 0x40;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Vendor-specific capability ID used by virtio_pci_cap.
const CAP_VENDOR: u8 = 0x09;

/// virtio_pci_cap cfg_type values.
mod cfg_type {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
    pub const PCI_CFG: u8 = 5;
    pub const SHARED_MEMORY: u8 = 8;
}

/// Errors building a virtio-pci function.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// Config space, BAR or MSI-X setup failed.
    #[error(transparent)]
    Pci(#[from] PciError),
    /// Creating an eventfd failed.
    #[error("eventfd: {0}")]
    EventFd(#[from] std::io::Error),
    /// The device has no queues or more than [`MAX_QUEUES`].
    #[error("unsupported number of queues: {0}")]
    QueueCount(usize),
    /// A queue maximum size that is not a power of two in 1..=32768.
    #[error("queue {index} has invalid maximum size {size}")]
    QueueSize { index: usize, size: u16 },
    /// A device type whose PCI device ID would overflow.
    #[error("unsupported virtio device type {0}")]
    DeviceType(u32),
}

/// A virtio device behind the modern virtio-pci transport.
pub struct VirtioPciDevice {
    config: PciConfig,
    /// Offset of the MSI-X capability in config space.
    msix_cap: usize,
    /// Offset of the VIRTIO_PCI_CAP_PCI_CFG capability in config space.
    pci_cfg_cap: usize,
    device: Box<dyn VirtioDevice>,
    mem: GuestMem,
    hooks: Arc<dyn VmHooks>,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<QueueConfig>,
    /// The eventfd each queue is notified through.
    kicks: Vec<EventFd>,
    common: CommonRegs,
    /// Features offered to the driver (the device's, plus VIRTIO_F_VERSION_1).
    offered_features: u64,
    activated: bool,
    /// Where BAR 0 is decoded, if it is (the ioeventfds are registered there).
    bar0_mapped: Option<u64>,
    /// Where the shared-memory BAR is mapped into the guest, if it is.
    shm_mapped: Option<u64>,
}

impl VirtioPciDevice {
    /// Wraps `device`; allocates one MSI vector (GSI plus irqfd) per queue plus one for config.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMem,
        hooks: Arc<dyn VmHooks>,
    ) -> Result<Self, VirtioPciError> {
        let max_sizes = device.queue_max_sizes();
        if max_sizes.is_empty() || max_sizes.len() > MAX_QUEUES {
            return Err(VirtioPciError::QueueCount(max_sizes.len()));
        }
        for (index, &size) in max_sizes.iter().enumerate() {
            if !size.is_power_of_two() || size > 32768 {
                return Err(VirtioPciError::QueueSize { index, size });
            }
        }
        let dtype = device.device_type();
        let device_id = u16::try_from(dtype)
            .ok()
            .and_then(|t| VIRTIO_PCI_DEVICE_BASE.checked_add(t))
            .ok_or(VirtioPciError::DeviceType(dtype))?;
        let class_code = match dtype {
            device_type::NET => 0x02_00_00,
            device_type::BLOCK => 0x01_80_00,
            // Display controller, other (as QEMU's virtio-gpu-pci): not VGA compatible.
            device_type::GPU => 0x03_80_00,
            // Input device, other.
            device_type::INPUT => 0x09_80_00,
            _ => 0xff_00_00,
        };
        let mut config = PciConfig::new(PciConfigParams {
            vendor_id: VIRTIO_PCI_VENDOR,
            device_id,
            revision: 1,
            class_code,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR,
            subsystem_id: VIRTIO_SUBSYSTEM_ID,
        });
        config.add_bar(0, BAR0_SIZE, BarKind::Mem64)?;

        let num_queues = max_sizes.len();
        let msix = MsixConfig::new(num_queues + 1, hooks.clone())?;
        let msix_cap = config.add_capability(
            MSIX_CAP_ID,
            &msix.capability_body(0, low_u32(MSIX_TABLE_OFFSET), low_u32(MSIX_PBA_OFFSET)),
        )?;
        config.set_write_mask(msix_cap + 2, &MsixConfig::capability_write_mask());
        let caps = [
            (cfg_type::COMMON, COMMON_OFFSET, COMMON_CFG_LEN),
            (cfg_type::ISR, ISR_OFFSET, 4),
            (cfg_type::DEVICE, DEVICE_CFG_OFFSET, REGION_LEN),
        ];
        for (kind, offset, len) in caps {
            config.add_capability(CAP_VENDOR, &virtio_cap(kind, offset, len, None))?;
        }
        if let Some(shm) = device.shared_memory() {
            config.add_bar(SHM_BAR, shm.size(), BarKind::Mem64Prefetchable)?;
            for r in shm.regions() {
                config.add_capability(CAP_VENDOR, &shm_cap(r))?;
            }
        }
        let notify_len = num_queues as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
        config.add_capability(
            CAP_VENDOR,
            &virtio_cap(
                cfg_type::NOTIFY,
                NOTIFY_OFFSET,
                notify_len,
                Some(NOTIFY_OFF_MULTIPLIER),
            ),
        )?;
        // VIRTIO_PCI_CAP_PCI_CFG: a window into BAR 0 through config space. Its bar, offset and
        // length fields and the data dword are writable.
        let pci_cfg_cap =
            config.add_capability(CAP_VENDOR, &virtio_cap(cfg_type::PCI_CFG, 0, 0, Some(0)))?;
        config.set_write_mask(pci_cfg_cap + 4, &[0xff]);
        config.set_write_mask(pci_cfg_cap + 8, &[0xff; 12]);

        let kicks = (0..num_queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        let offered_features = device.device_features() | VIRTIO_F_VERSION_1;
        Ok(VirtioPciDevice {
            config,
            msix_cap,
            pci_cfg_cap,
            device,
            mem,
            hooks,
            interrupt: Arc::new(VirtioInterrupt::new(num_queues, msix)),
            queues: max_sizes.into_iter().map(QueueConfig::new).collect(),
            kicks,
            common: CommonRegs::default(),
            offered_features,
            activated: false,
            bar0_mapped: None,
            shm_mapped: None,
        })
    }

    /// The interrupt the device signals through (also handy for the VMM's diagnostics).
    pub fn interrupt(&self) -> Arc<VirtioInterrupt> {
        self.interrupt.clone()
    }

    /// The device status register as the driver sees it.
    pub fn device_status(&self) -> u8 {
        self.interrupt.status.load(Ordering::Acquire)
    }

    /// Builds the ready queues and starts the device.
    fn activate(&mut self) -> Result<(), ActivateError> {
        self.activate_at(&[])
    }

    /// Builds the ready queues, each at its (next_avail, next_used) position in `positions`
    /// (0 for queues not listed), and starts the device.
    fn activate_at(&mut self, positions: &[(u16, u16)]) -> Result<(), ActivateError> {
        if self.activated {
            return Ok(());
        }
        let event_idx = self.common.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut active = Vec::new();
        for (index, (qc, kick)) in (0u16..).zip(self.queues.iter().zip(&self.kicks)) {
            if !qc.enabled {
                continue;
            }
            let i = usize::from(index);
            let bad = |_| ActivateError::BadQueue(index);
            let mut queue = Queue::new(qc.max_size).map_err(bad)?;
            queue.try_set_size(qc.size).map_err(bad)?;
            queue
                .try_set_desc_table_address(GuestAddress(qc.desc))
                .map_err(bad)?;
            queue
                .try_set_avail_ring_address(GuestAddress(qc.driver))
                .map_err(bad)?;
            queue
                .try_set_used_ring_address(GuestAddress(qc.device))
                .map_err(bad)?;
            queue.set_event_idx(event_idx);
            if let Some(&(avail, used)) = positions.get(i) {
                queue.set_next_avail(avail);
                queue.set_next_used(used);
            }
            queue.set_ready(true);
            if !queue.is_valid(&self.mem) {
                return Err(ActivateError::BadQueue(index));
            }
            active.push(ActiveQueue {
                index,
                queue,
                kick: kick.try_clone()?,
            });
        }
        let interrupt: Arc<dyn crate::virtio::Interrupt> = self.interrupt.clone();
        self.device.activate(self.mem.clone(), interrupt, active)?;
        self.activated = true;
        Ok(())
    }

    /// Moves the queue ioeventfds from the old BAR 0 address to the new one.
    fn move_ioevents(&mut self, new: Option<u64>) {
        if let Some(old) = self.bar0_mapped {
            for (q, kick) in self.kicks.iter().enumerate() {
                if let Err(e) = self.hooks.unregister_ioevent(kick, notify_addr(old, q)) {
                    crate::guest_warn!("virtio-pci: unregistering queue {q} ioeventfd: {e}");
                }
            }
        }
        if let Some(base) = new {
            for (q, kick) in self.kicks.iter().enumerate() {
                if let Err(e) = self.hooks.register_ioevent(kick, notify_addr(base, q)) {
                    crate::guest_warn!("virtio-pci: registering queue {q} ioeventfd: {e}");
                }
            }
        }
        self.bar0_mapped = new;
    }

    /// Moves the guest mapping of the shared memory from the old BAR address to `new`.
    fn move_shm(&mut self, new: Option<u64>) {
        let Some(shm) = self.device.shared_memory() else {
            return;
        };
        let (host, size) = (shm.host_addr(), shm.size());
        if let Some(old) = self.shm_mapped.take() {
            if let Err(e) = self.hooks.unmap_memory(old, size) {
                crate::guest_warn!("virtio-pci: unmapping shared memory at {old:#x}: {e}");
            }
        }
        if let Some(base) = new {
            match self.hooks.map_memory(base, host, size) {
                Ok(()) => self.shm_mapped = Some(base),
                // Guest accesses then trap and are served by `bar_read`/`bar_write`.
                Err(e) => crate::guest_debug!("virtio-pci: shared memory not mapped: {e}"),
            }
        }
    }

    /// What the device counted so far.
    pub fn counters(&self) -> crate::virtio::CounterValues {
        self.device.counters()
    }

    /// Config dword of the VIRTIO_PCI_CAP_PCI_CFG data field.
    fn pci_cfg_data_reg(&self) -> usize {
        (self.pci_cfg_cap + 16) / 4
    }

    /// The BAR 0 access the VIRTIO_PCI_CAP_PCI_CFG fields describe: (offset, length), if valid
    /// (BAR 0, length 1, 2 or 4, offset aligned to it and inside the BAR).
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let mut b = [0u8; 12];
        self.config.read_bytes(self.pci_cfg_cap + 4, &mut b[..1]);
        let bar = b[0];
        self.config.read_bytes(self.pci_cfg_cap + 8, &mut b[4..12]);
        let offset = u64::from(u32::from_le_bytes([b[4], b[5], b[6], b[7]]));
        let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize;
        (bar == 0
            && matches!(len, 1 | 2 | 4)
            && offset.is_multiple_of(len as u64)
            && offset + len as u64 <= BAR0_SIZE)
            .then_some((offset, len))
    }

    /// The message control word of the MSI-X capability.
    fn msix_control(&self) -> u16 {
        let mut b = [0u8; 2];
        self.config.read_bytes(self.msix_cap + 2, &mut b);
        u16::from_le_bytes(b)
    }
}

/// Address of queue `q`'s notification register when BAR 0 is at `bar`.
fn notify_addr(bar: u64, q: usize) -> u64 {
    bar.wrapping_add(NOTIFY_OFFSET + q as u64 * u64::from(NOTIFY_OFF_MULTIPLIER))
}

/// The body of a virtio_pci_cap64 (after the ID/next bytes) for a shared-memory region:
/// cap_len 24, cfg_type 8, BAR, shmid, then the offset and length split in 32-bit halves.
fn shm_cap(r: &ShmRegion) -> Vec<u8> {
    let (off_lo, off_hi) = split_u64(r.offset);
    let (len_lo, len_hi) = split_u64(r.len);
    // SHM_BAR is 2.
    let mut b = vec![24, cfg_type::SHARED_MEMORY, 2, r.id, 0, 0];
    for v in [off_lo, len_lo, off_hi, len_hi] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

/// The body of a virtio_pci_cap (after the ID/next bytes) for BAR 0, whose offsets and lengths
/// all fit in 32 bits.
fn virtio_cap(kind: u8, offset: u64, length: u64, notify_mult: Option<u32>) -> Vec<u8> {
    let cap_len: u8 = if notify_mult.is_some() { 20 } else { 16 };
    let mut b = vec![cap_len, kind, 0, 0, 0, 0];
    b.extend_from_slice(&split_u64(offset).0.to_le_bytes());
    b.extend_from_slice(&split_u64(length).0.to_le_bytes());
    if let Some(m) = notify_mult {
        b.extend_from_slice(&m.to_le_bytes());
    }
    b
}

/// Whether `[offset, offset + len)` lies inside `[start, start + size)`.
fn within(offset: u64, len: usize, start: u64, size: u64) -> bool {
    offset >= start
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= start + size)
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, reg: usize) -> u32 {
        if reg == self.pci_cfg_data_reg() {
            if let Some((offset, len)) = self.pci_cfg_window() {
                let mut b = [0u8; 4];
                self.bar_read(0, offset, &mut b[..len]);
                self.config.put(self.pci_cfg_cap + 16, &b);
            }
        }
        self.config.read(reg)
    }

    fn config_write(&mut self, reg: usize, offset: u64, data: &[u8]) {
        self.config.write(reg, offset, data);
        if reg == (self.msix_cap + 2) / 4 || reg == self.msix_cap / 4 {
            let ctl = self.msix_control();
            lock(&self.interrupt.msix).set_message_control(ctl);
        }
        if reg == self.pci_cfg_data_reg() {
            if let Some((offset, len)) = self.pci_cfg_window() {
                let b = self.config.read(reg).to_le_bytes();
                self.bar_write(0, offset, &b[..len]);
            }
        }
    }

    fn bars(&self) -> Vec<PciBar> {
        self.config.bars()
    }

    fn set_bar_addr(&mut self, index: usize, addr: u64) {
        self.config.set_bar_addr(index, addr);
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar == SHM_BAR {
            if let Some(shm) = self.device.shared_memory() {
                shm.read(offset, data);
            }
            return;
        }
        if bar != 0 || data.is_empty() {
            return;
        }
        if within(offset, data.len(), COMMON_OFFSET, REGION_LEN) {
            self.common_read(offset - COMMON_OFFSET, data);
        } else if within(offset, data.len(), ISR_OFFSET, REGION_LEN) {
            if offset == ISR_OFFSET {
                data[0] = self.interrupt.take_isr();
            }
        } else if within(offset, data.len(), DEVICE_CFG_OFFSET, REGION_LEN) {
            self.device.read_config(offset - DEVICE_CFG_OFFSET, data);
        } else if within(
            offset,
            data.len(),
            MSIX_TABLE_OFFSET,
            MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET,
        ) {
            lock(&self.interrupt.msix).table_read(offset - MSIX_TABLE_OFFSET, data);
        } else if within(
            offset,
            data.len(),
            MSIX_PBA_OFFSET,
            BAR0_SIZE - MSIX_PBA_OFFSET,
        ) {
            lock(&self.interrupt.msix).pba_read(offset - MSIX_PBA_OFFSET, data);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == SHM_BAR {
            if let Some(shm) = self.device.shared_memory() {
                shm.write(offset, data);
            }
            return;
        }
        if bar != 0 || data.is_empty() {
            return;
        }
        if within(offset, data.len(), COMMON_OFFSET, REGION_LEN) {
            self.common_write(offset - COMMON_OFFSET, data);
        } else if within(offset, data.len(), DEVICE_CFG_OFFSET, REGION_LEN) {
            self.device.write_config(offset - DEVICE_CFG_OFFSET, data);
        } else if within(
            offset,
            data.len(),
            NOTIFY_OFFSET,
            MSIX_TABLE_OFFSET - NOTIFY_OFFSET,
        ) {
            let rel = offset - NOTIFY_OFFSET;
            let mult = u64::from(NOTIFY_OFF_MULTIPLIER);
            if rel.is_multiple_of(mult) {
                if let Some(kick) = usize::try_from(rel / mult)
                    .ok()
                    .and_then(|q| self.kicks.get(q))
                {
                    if let Err(e) = kick.write(1) {
                        crate::guest_warn!("virtio-pci: queue notification failed: {e}");
                    }
                }
            }
        } else if within(
            offset,
            data.len(),
            MSIX_TABLE_OFFSET,
            MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET,
        ) {
            lock(&self.interrupt.msix).table_write(offset - MSIX_TABLE_OFFSET, data);
        }
    }

    fn bar_remapped(&mut self, bar: usize, _old: Option<u64>, new: Option<u64>) {
        match bar {
            0 => self.move_ioevents(new),
            SHM_BAR => self.move_shm(new),
            _ => {}
        }
    }

    fn set_requester_id(&mut self, id: u16) {
        lock(&self.interrupt.msix).set_requester_id(id);
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        self.move_ioevents(None);
        self.move_shm(None);
        if self.activated {
            self.device.reset();
        }
    }
}
