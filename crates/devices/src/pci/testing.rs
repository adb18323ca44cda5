//! A fake hypervisor for unit tests: records every hook call and keeps the registered eventfds so
//! tests can see interrupts and play KVM's part for ioeventfds.

use std::collections::HashMap;
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

use super::VmHooks;
use crate::bus::lock;

/// One recorded hook call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookCall {
    RegisterIoevent(u64),
    UnregisterIoevent(u64),
    AllocateMsi(u32),
    SetMsiRoute {
        gsi: u32,
        address: u64,
        data: u32,
        devid: u32,
        enabled: bool,
    },
    MapMemory {
        guest: u64,
        host: u64,
        size: u64,
    },
    UnmapMemory {
        guest: u64,
        size: u64,
    },
}

/// Records calls; GSIs are handed out from 24 up.
#[derive(Default)]
pub struct FakeHooks {
    calls: Mutex<Vec<HookCall>>,
    irqfds: Mutex<HashMap<u32, EventFd>>,
    ioevents: Mutex<HashMap<u64, EventFd>>,
}

impl FakeHooks {
    /// All calls so far.
    pub fn calls(&self) -> Vec<HookCall> {
        lock(&self.calls).clone()
    }

    /// The `set_msi_route` calls so far.
    pub fn routes(&self) -> Vec<HookCall> {
        self.calls()
            .into_iter()
            .filter(|c| matches!(c, HookCall::SetMsiRoute { .. }))
            .collect()
    }

    /// Forgets the recorded calls.
    pub fn clear(&self) {
        lock(&self.calls).clear();
    }

    /// How many times `gsi` was injected since the last call (drains its irqfd).
    pub fn irq_count(&self, gsi: u32) -> u64 {
        lock(&self.irqfds)
            .get(&gsi)
            .and_then(|fd| fd.read().ok())
            .unwrap_or(0)
    }

    /// Addresses with an ioeventfd registered.
    pub fn ioevent_addrs(&self) -> Vec<u64> {
        let mut v: Vec<u64> = lock(&self.ioevents).keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Plays KVM: a guest write to `addr` signals the ioeventfd there. False if none.
    pub fn guest_write(&self, addr: u64) -> bool {
        lock(&self.ioevents)
            .get(&addr)
            .is_some_and(|fd| fd.write(1).is_ok())
    }
}

impl VmHooks for FakeHooks {
    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> std::io::Result<()> {
        lock(&self.calls).push(HookCall::RegisterIoevent(addr));
        let mut map = lock(&self.ioevents);
        if map.contains_key(&addr) {
            return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
        }
        map.insert(addr, fd.try_clone()?);
        Ok(())
    }

    fn unregister_ioevent(&self, _fd: &EventFd, addr: u64) -> std::io::Result<()> {
        lock(&self.calls).push(HookCall::UnregisterIoevent(addr));
        lock(&self.ioevents)
            .remove(&addr)
            .map(|_| ())
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT))
    }

    fn allocate_msi(&self, fd: &EventFd) -> std::io::Result<u32> {
        let mut fds = lock(&self.irqfds);
        let gsi = 24 + u32::try_from(fds.len()).expect("fewer than 2^32 MSIs");
        fds.insert(gsi, fd.try_clone()?);
        lock(&self.calls).push(HookCall::AllocateMsi(gsi));
        Ok(gsi)
    }

    fn set_msi_route(
        &self,
        gsi: u32,
        address: u64,
        data: u32,
        devid: u32,
        enabled: bool,
    ) -> std::io::Result<()> {
        lock(&self.calls).push(HookCall::SetMsiRoute {
            gsi,
            address,
            data,
            devid,
            enabled,
        });
        Ok(())
    }

    fn map_memory(&self, guest: u64, host: u64, size: u64) -> std::io::Result<()> {
        lock(&self.calls).push(HookCall::MapMemory { guest, host, size });
        Ok(())
    }

    fn unmap_memory(&self, guest: u64, size: u64) -> std::io::Result<()> {
        lock(&self.calls).push(HookCall::UnmapMemory { guest, size });
        Ok(())
    }
}
