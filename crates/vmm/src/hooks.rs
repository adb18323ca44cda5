//! The KVM side of device interrupts and notifications: GSI routing for MSI-X, irqfds and
//! ioeventfds. The architecture supplies the irqchip routes of its legacy interrupts and the
//! shape of an MSI route; the table, the GSI allocation and the eventfds are generic.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_irq_routing_entry, KvmIrqRouting};
use kvm_ioctls::{NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use devices::bus::lock;
use devices::pci::VmHooks;

/// The MSI routes currently programmed, and the next free GSI.
struct Routes {
    next_gsi: u32,
    msi: BTreeMap<u32, (u64, u32)>,
}

/// Implements [`VmHooks`] on a KVM VM.
pub struct KvmHooks {
    vm: Arc<VmFd>,
    /// The architecture's irqchip routes, part of every table programmed.
    legacy: Vec<kvm_irq_routing_entry>,
    routes: Mutex<Routes>,
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
            }),
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
                .map(|(&gsi, &(address, data))| arch::msi_route(gsi, address, data)),
        );
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| io::Error::other(format!("routing table: {e:?}")))?;
        self.vm.set_gsi_routing(&table).map_err(io::Error::from)
    }

    /// Installs the default routes (before any device asks for MSI).
    pub fn install_default_routes(&self) -> io::Result<()> {
        self.apply(&lock(&self.routes))
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

    fn set_msi_route(&self, gsi: u32, address: u64, data: u32, enabled: bool) -> io::Result<()> {
        let mut routes = lock(&self.routes);
        let changed = if enabled {
            routes.msi.insert(gsi, (address, data)) != Some((address, data))
        } else {
            routes.msi.remove(&gsi).is_some()
        };
        if changed {
            self.apply(&routes)?;
        }
        Ok(())
    }
}
