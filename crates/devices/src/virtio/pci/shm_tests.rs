//! The shared-memory BAR and capabilities, with a test device that has two regions.

use std::sync::{Arc, Mutex};

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::Epoll;

use super::*;
use crate::bus::BusDevice;
use crate::pci::testing::{FakeHooks, HookCall};
use crate::pci::{PciConfigMmio, PciMmioWindow, PciRoot};
use crate::virtio::worker::DeviceWorker;
use crate::virtio::{Activation, SharedMemory, VirtioBase};

const LOW: u64 = 0xc000_0000;
const HIGH: u64 = 0x110_0000_0000;
const SHM_SIZE: u64 = 0x10_0000;

/// A device whose only feature is its shared memory.
struct ShmDevice {
    base: VirtioBase,
    shm: SharedMemory,
}

struct Idle;

impl DeviceWorker for Idle {
    fn queue_kicked(&mut self, _: &Epoll, _: usize) {}
}

impl VirtioDevice for ShmDevice {
    fn base(&self) -> &VirtioBase {
        &self.base
    }
    fn base_mut(&mut self) -> &mut VirtioBase {
        &mut self.base
    }
    fn start(&mut self, _: Activation) -> Result<Box<dyn DeviceWorker>, ActivateError> {
        Ok(Box::new(Idle))
    }
    fn shared_memory(&self) -> Option<&SharedMemory> {
        Some(&self.shm)
    }
}

fn shm_device() -> (Box<ShmDevice>, u64) {
    let regions = vec![
        ShmRegion {
            id: 1,
            offset: 0,
            len: 0x8_0000,
        },
        ShmRegion {
            id: 7,
            offset: 0x8_0000,
            len: 0x4_0000,
        },
    ];
    let shm = SharedMemory::new(SHM_SIZE, regions).unwrap();
    let host = shm.host_addr();
    let dev = ShmDevice {
        base: VirtioBase::new(device_type::GPU, &[64], 0),
        shm,
    };
    (Box::new(dev), host)
}

fn cfg_read(ecam: &mut PciConfigMmio, slot: u64, off: u64) -> u32 {
    let mut b = [0u8; 4];
    ecam.read(slot << 15 | off, &mut b);
    u32::from_le_bytes(b)
}

fn cfg_write(ecam: &mut PciConfigMmio, slot: u64, off: u64, v: u32) {
    ecam.write(slot << 15 | off, &v.to_le_bytes());
}

#[test]
fn shared_memory_bar_capabilities_and_mapping() {
    let mem: GuestMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let hooks = Arc::new(FakeHooks::default());
    let (device, host) = shm_device();
    let dev = VirtioPciDevice::new(device, mem, hooks.clone()).unwrap();
    let root = Arc::new(Mutex::new(
        PciRoot::new(LOW, 0x1000_0000).with_mmio64(HIGH, 0x10_0000_0000),
    ));
    let slot = u64::from(lock(&root).add_device(Arc::new(Mutex::new(dev))).unwrap());
    let mut ecam = PciConfigMmio::new(root.clone());

    // BAR 0 stays below 4 GiB; BAR 2 is 64-bit prefetchable in the high window.
    assert_eq!(cfg_read(&mut ecam, slot, 0x10), 0xc000_0004);
    assert_eq!(cfg_read(&mut ecam, slot, 0x18), 0x0000_000c);
    assert_eq!(cfg_read(&mut ecam, slot, 0x1c), 0x110);
    // Sizing BAR 2 reports the mapping's size.
    cfg_write(&mut ecam, slot, 0x18, 0xffff_ffff);
    cfg_write(&mut ecam, slot, 0x1c, 0xffff_ffff);
    assert_eq!(cfg_read(&mut ecam, slot, 0x18), 0xfff0_000c);
    assert_eq!(cfg_read(&mut ecam, slot, 0x1c), 0xffff_ffff);
    cfg_write(&mut ecam, slot, 0x18, 0);
    cfg_write(&mut ecam, slot, 0x1c, 0x110);

    // One VIRTIO_PCI_CAP_SHARED_MEMORY_CFG (virtio_pci_cap64) per region.
    let mut shm_caps = Vec::new();
    let mut p = u64::from(cfg_read(&mut ecam, slot, 0x34) & 0xff);
    while p != 0 {
        let head = cfg_read(&mut ecam, slot, p);
        let [id, next, cap_len, cfg_type] = head.to_le_bytes();
        if id == 0x09 && cfg_type == 8 {
            let [bar, shmid, _, _] = cfg_read(&mut ecam, slot, p + 4).to_le_bytes();
            let off = u64::from(cfg_read(&mut ecam, slot, p + 8))
                | u64::from(cfg_read(&mut ecam, slot, p + 16)) << 32;
            let len = u64::from(cfg_read(&mut ecam, slot, p + 12))
                | u64::from(cfg_read(&mut ecam, slot, p + 20)) << 32;
            shm_caps.push((cap_len, bar, shmid, off, len));
        }
        p = u64::from(next);
    }
    assert_eq!(
        shm_caps,
        [(24, 2, 1, 0, 0x8_0000), (24, 2, 7, 0x8_0000, 0x4_0000)]
    );

    // Memory decoding on: the host mapping is mapped at the BAR.
    hooks.clear();
    cfg_write(&mut ecam, slot, 0x04, 0x2);
    let map_calls = |hooks: &FakeHooks| -> Vec<HookCall> {
        hooks
            .calls()
            .into_iter()
            .filter(|c| matches!(c, HookCall::MapMemory { .. } | HookCall::UnmapMemory { .. }))
            .collect()
    };
    assert_eq!(
        map_calls(&hooks),
        [HookCall::MapMemory {
            guest: HIGH,
            host,
            size: SHM_SIZE
        }]
    );
    // Accesses that trap anyway are served from the same memory.
    let mut high = PciMmioWindow::high(root.clone());
    high.write(0x8_0010, &[1, 2, 3, 4]);
    let mut b = [0u8; 4];
    high.read(0x8_0010, &mut b);
    assert_eq!(b, [1, 2, 3, 4]);
    high.read(SHM_SIZE - 2, &mut b[..2]);
    assert_eq!(b[..2], [0, 0]);

    // The guest moves the BAR: unmapped at the old address, mapped at the new one.
    hooks.clear();
    cfg_write(&mut ecam, slot, 0x18, 0x0010_0000);
    assert_eq!(
        map_calls(&hooks),
        [
            HookCall::UnmapMemory {
                guest: HIGH,
                size: SHM_SIZE
            },
            HookCall::MapMemory {
                guest: HIGH + 0x10_0000,
                host,
                size: SHM_SIZE
            }
        ]
    );
    high.read(0x18_0010, &mut b);
    assert_eq!(b, [1, 2, 3, 4], "same memory at the new address");
    // Decoding off: unmapped.
    hooks.clear();
    cfg_write(&mut ecam, slot, 0x04, 0);
    assert_eq!(
        map_calls(&hooks),
        [HookCall::UnmapMemory {
            guest: HIGH + 0x10_0000,
            size: SHM_SIZE
        }]
    );
}

#[test]
fn devices_without_shared_memory_have_no_bar_2() {
    let mem: GuestMem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let hooks = Arc::new(FakeHooks::default());
    let dev = VirtioPciDevice::new(Box::new(crate::virtio::rng::Rng::new()), mem, hooks).unwrap();
    assert_eq!(dev.bars().len(), 1);
    assert_eq!(dev.bars()[0].index, 0);
}
