//! The KVM side of device interrupts, notifications and memory BARs: GSI routing for MSI-X,
//! irqfds, ioeventfds, and KVM memory slots for device memory mapped into the guest (virtio
//! shared memory). The architecture supplies the irqchip routes of its legacy interrupts and
//! the shape of an MSI route; the table, the GSI allocation, the eventfds and the slots are
//! generic.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_irq_routing_entry, kvm_userspace_memory_region, KvmIrqRouting};
use kvm_ioctls::{NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use devices::bus::lock;
use devices::pci::VmHooks;

/// The MSI routes currently programmed, and the next free GSI.
struct Routes {
    next_gsi: u32,
    /// GSI -> (address, data, device id).
    msi: BTreeMap<u32, (u64, u32, u32)>,
    /// Route changes are kept here and programmed together later (a restore puts back every
    /// vector of every device; each KVM_SET_GSI_ROUTING waits for a grace period).
    deferred: bool,
}

/// The first KVM memory slot for device memory; guest RAM uses the slots below (one per
/// RAM region, a handful).
pub(crate) const FIRST_DEVICE_SLOT: u32 = 32;
/// How many device memory mappings may exist at once.
pub(crate) const DEVICE_SLOTS: u32 = 64;

/// A device memory mapping: its slot and size, by guest address.
type DeviceMaps = BTreeMap<u64, (u32, u64)>;

/// Implements [`VmHooks`] on a KVM VM.
pub struct KvmHooks {
    vm: Arc<VmFd>,
    /// The architecture's irqchip routes, part of every table programmed.
    legacy: Vec<kvm_irq_routing_entry>,
    routes: Mutex<Routes>,
    /// Device memory mapped into the guest.
    maps: Mutex<DeviceMaps>,
}

impl KvmHooks {
    /// Hooks on `vm`, whose MSI GSIs start at `first_msi_gsi`.
    pub fn new(vm: Arc<VmFd>, first_msi_gsi: u32) -> Self {
        Self {
            vm,
            legacy: arch::legacy_irq_routes(),
            routes: Mutex::new(Routes {
                next_gsi: first_msi_gsi.max(arch::IRQCHIP_PINS),
                msi: BTreeMap::new(),
                deferred: false,
            }),
            maps: Mutex::new(BTreeMap::new()),
        }
    }

    /// Programs KVM with the irqchip routes every legacy IRQ needs plus the MSI routes.
    fn apply(&self, routes: &Routes) -> io::Result<()> {
        let mut entries = Vec::with_capacity(self.legacy.len() + routes.msi.len());
        entries.extend_from_slice(&self.legacy);
        entries.extend(
            routes
                .msi
                .iter()
                .map(|(&gsi, &(address, data, devid))| arch::msi_route(gsi, address, data, devid)),
        );
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| io::Error::other(format!("routing table: {e:?}")))?;
        self.vm.set_gsi_routing(&table).map_err(io::Error::from)
    }

    /// Installs the default routes (before any device asks for MSI).
    pub fn install_default_routes(&self) -> io::Result<()> {
        self.apply(&lock(&self.routes))
    }

    /// From now until [`apply_deferred`](Self::apply_deferred), MSI route changes are only
    /// recorded.
    pub fn defer_routes(&self) {
        lock(&self.routes).deferred = true;
    }

    /// Programs the legacy routes and every recorded MSI route in one table, and applies
    /// changes as they come again.
    pub fn apply_deferred(&self) -> io::Result<()> {
        let mut routes = lock(&self.routes);
        routes.deferred = false;
        self.apply(&routes)
    }
}

impl VmHooks for KvmHooks {
    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        self.vm
            .register_ioevent(fd, &kvm_ioctls::IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(io::Error::from)
    }

    fn unregister_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        self.vm
            .unregister_ioevent(fd, &kvm_ioctls::IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(io::Error::from)
    }

    fn allocate_msi(&self, fd: &EventFd) -> io::Result<u32> {
        let mut routes = lock(&self.routes);
        let gsi = routes.next_gsi;
        routes.next_gsi = gsi
            .checked_add(1)
            .ok_or_else(|| io::Error::other("out of GSIs"))?;
        self.vm.register_irqfd(fd, gsi).map_err(io::Error::from)?;
        Ok(gsi)
    }

    fn set_msi_route(
        &self,
        gsi: u32,
        address: u64,
        data: u32,
        devid: u32,
        enabled: bool,
    ) -> io::Result<()> {
        let mut routes = lock(&self.routes);
        let route = (address, data, devid);
        let changed = if enabled {
            routes.msi.insert(gsi, route) != Some(route)
        } else {
            routes.msi.remove(&gsi).is_some()
        };
        if changed && !routes.deferred {
            self.apply(&routes)?;
        }
        Ok(())
    }

    /// A KVM slot of its own for the device memory at `host_addr`; KVM refuses a range that
    /// overlaps guest RAM or another mapping, or is not page aligned.
    fn map_memory(&self, guest_addr: u64, host_addr: u64, size: u64) -> io::Result<()> {
        let mut maps = lock(&self.maps);
        if maps.contains_key(&guest_addr) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("device memory is already mapped at {guest_addr:#x}"),
            ));
        }
        let slot = (FIRST_DEVICE_SLOT..FIRST_DEVICE_SLOT + DEVICE_SLOTS)
            .find(|s| !maps.values().any(|(used, _)| used == s))
            .ok_or_else(|| io::Error::other("no free memory slot for device memory"))?;
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
            flags: 0,
        };
        // SAFETY: `VmHooks::map_memory`'s contract: `host_addr` is a mapping of `size` bytes
        // owned by the device, which unmaps it (`unmap_memory`) before freeing it. KVM checks
        // the guest range against the other slots and the alignment.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(io::Error::from)?;
        maps.insert(guest_addr, (slot, size));
        Ok(())
    }

    fn unmap_memory(&self, guest_addr: u64, size: u64) -> io::Result<()> {
        let mut maps = lock(&self.maps);
        let Some(&(slot, mapped)) = maps.get(&guest_addr) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no device memory is mapped at {guest_addr:#x}"),
            ));
        };
        if mapped != size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the mapping at {guest_addr:#x} is {mapped:#x} bytes, not {size:#x}"),
            ));
        }
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: guest_addr,
            memory_size: 0,
            userspace_addr: 0,
            flags: 0,
        };
        // SAFETY: a zero-sized region deletes the slot; KVM stops using the host memory.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(io::Error::from)?;
        maps.remove(&guest_addr);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use kvm_ioctls::Kvm;
    use vm_memory::MmapRegion;

    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn device_memory_gets_its_own_slot_and_overlaps_are_refused() {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!(
                "SKIP (no /dev/kvm): device_memory_gets_its_own_slot_and_overlaps_are_refused"
            );
            return;
        }
        let vm = Arc::new(Kvm::new().unwrap().create_vm().unwrap());
        let ram = MmapRegion::<()>::new(0x10_0000).unwrap();
        let ram_slot = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: 0x10_0000,
            userspace_addr: ram.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: `ram` outlives `vm` in this test.
        unsafe { vm.set_user_memory_region(ram_slot) }.unwrap();
        let hooks = KvmHooks::new(vm.clone(), 24);
        let shm = MmapRegion::<()>::new(0x1_0000).unwrap();
        let host = shm.as_ptr() as u64;

        hooks.map_memory(GIB, host, 0x1_0000).unwrap();
        let e = hooks.map_memory(GIB, host, 0x1_0000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        // Over guest RAM, or straddling the first mapping: KVM refuses the slot.
        assert!(hooks.map_memory(0x8_0000, host, 0x1_0000).is_err());
        assert!(hooks.map_memory(GIB + 0x8000, host, 0x1_0000).is_err());
        // Not page aligned.
        assert!(hooks.map_memory(2 * GIB + 0x10, host, 0x1_0000).is_err());
        // A second, disjoint mapping takes the next slot.
        hooks.map_memory(2 * GIB, host, 0x1_0000).unwrap();
        assert_eq!(
            lock(&hooks.maps).values().map(|m| m.0).collect::<Vec<_>>(),
            [FIRST_DEVICE_SLOT, FIRST_DEVICE_SLOT + 1]
        );

        let e = hooks.unmap_memory(GIB, 0x2_0000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        hooks.unmap_memory(GIB, 0x1_0000).unwrap();
        let e = hooks.unmap_memory(GIB, 0x1_0000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        // The freed slot is used again, and the range is free again in KVM.
        hooks.map_memory(GIB + 0x8000, host, 0x1_0000).unwrap();
        assert_eq!(lock(&hooks.maps)[&(GIB + 0x8000)].0, FIRST_DEVICE_SLOT);
        hooks.unmap_memory(GIB + 0x8000, 0x1_0000).unwrap();
        hooks.unmap_memory(2 * GIB, 0x1_0000).unwrap();
        drop(hooks);
        drop(vm);
        drop(shm);
        drop(ram);
    }
}
