//! The VM-wide KVM state of an x86_64 guest a snapshot carries: both PICs, the IOAPIC, the
//! PIT and the kvmclock.
//!
//! The kvmclock is saved with the host's wall-clock time, and a restore moves it on by the
//! time the snapshot spent saved, so the guest's clocks (monotonic and wall) are right after a
//! restore instead of lagging by that time. The vCPUs' restore tells the guest it was paused
//! (`KVM_KVMCLOCK_CTRL`), so its lockup and RCU-stall detectors do not report the jump.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::{kvm_err, Error, Platform};

/// VM-wide KVM state (the field names are the snapshot's `vm-state` section format).
#[derive(Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// The kvmclock.
    pub clock: kvm_clock_data,
    /// The host's wall-clock time when `clock` was read, in nanoseconds since the Unix epoch
    /// (absent in snapshots from before it was saved: those restore the clock as it was).
    #[serde(default)]
    pub saved_at_unix_ns: Option<u64>,
}

/// The host's wall-clock time in nanoseconds since the Unix epoch (0 before 1970).
fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The kvmclock value to restore: `saved`, moved on by the wall-clock time from `saved_at` to
/// `now` (never back: a snapshot from a host whose clock was ahead restores as saved).
fn clock_after(saved: u64, saved_at: Option<u64>, now: u64) -> u64 {
    saved_at.map_or(saved, |at| saved.saturating_add(now.saturating_sub(at)))
}

fn get_irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, Error> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
    Ok(c)
}

impl VmState {
    /// Reads the state of a VM whose vCPUs are all out of KVM_RUN (the platform and vCPU
    /// count matter on aarch64 only).
    pub fn save(vm: &VmFd, _platform: &Platform, _nr_vcpus: u8) -> Result<VmState, Error> {
        Ok(VmState {
            pic_master: get_irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
            saved_at_unix_ns: Some(unix_now_ns()),
        })
    }

    /// Writes the state into a new VM built by [`create_vm`](super::create_vm), before its
    /// vCPUs are restored. The chip ids come from the snapshot: one naming a chip that does
    /// not exist is refused by KVM, not trusted.
    pub fn restore(&self, vm: &VmFd) -> Result<(), Error> {
        let chips = [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC),
        ];
        if let Some((chip, want)) = chips.iter().find(|(c, want)| c.chip_id != *want) {
            return Err(Error::BadVmState(format!(
                "irqchip {want} is saved with chip id {}",
                chip.chip_id
            )));
        }
        vm.set_pit2(&self.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        for (chip, _) in chips {
            vm.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        let mut clock = self.clock;
        // Only KVM_CLOCK_REALTIME may be passed back, and it depends on the host's clocksource;
        // the time away is added here instead, the same on every host.
        clock.flags = 0;
        clock.clock = clock_after(clock.clock, self.saved_at_unix_ns, unix_now_ns());
        vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))
    }

    /// What the restore does once every vCPU exists: nothing on x86_64 ([`restore`](Self::restore)
    /// set the irqchips before the vCPUs).
    pub fn restore_irqchip(&self, _platform: &Platform, _nr_vcpus: u8) -> Result<(), Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_moves_on_by_the_time_saved_and_never_back() {
        assert_eq!(clock_after(100, None, 5_000), 100);
        assert_eq!(clock_after(100, Some(1_000), 5_000), 4_100);
        assert_eq!(clock_after(100, Some(9_000), 5_000), 100);
        assert_eq!(clock_after(u64::MAX - 1, Some(0), 5_000), u64::MAX);
    }

    #[test]
    fn a_snapshot_without_the_save_time_still_reads() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skipped: no /dev/kvm");
            return;
        };
        let a = super::super::create_vm(&kvm).unwrap();
        let mut json = serde_json::to_value(VmState::save(&a, &Platform, 1).unwrap()).unwrap();
        json.as_object_mut().unwrap().remove("saved_at_unix_ns");
        let old: VmState = serde_json::from_value(json).unwrap();
        assert_eq!(old.saved_at_unix_ns, None);
    }

    #[test]
    fn state_round_trips_through_json_into_a_new_vm() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("skipped: no /dev/kvm");
            return;
        };
        let a = super::super::create_vm(&kvm).unwrap();
        let mut pit = a.get_pit2().unwrap();
        pit.channels[0].count = 0x1234;
        a.set_pit2(&pit).unwrap();
        let saved = VmState::save(&a, &Platform, 1).unwrap();
        let json = serde_json::to_vec(&saved).unwrap();
        let back: VmState = serde_json::from_slice(&json).unwrap();
        let b = super::super::create_vm(&kvm).unwrap();
        back.restore(&b).unwrap();
        assert_eq!(b.get_pit2().unwrap().channels[0].count, 0x1234);

        // The clock moved on by the time between the save and the restore.
        let before = saved.clock.clock;
        let mut later: VmState = serde_json::from_slice(&json).unwrap();
        later.saved_at_unix_ns = later.saved_at_unix_ns.map(|at| at - 3_000_000_000);
        let c = super::super::create_vm(&kvm).unwrap();
        later.restore(&c).unwrap();
        let moved = c.get_clock().unwrap().clock - before;
        assert!(
            (3_000_000_000..60_000_000_000).contains(&moved),
            "the restored kvmclock moved by {moved} ns, not the 3 s it spent saved"
        );

        let mut swapped: VmState = serde_json::from_slice(&json).unwrap();
        swapped.ioapic.chip_id = KVM_IRQCHIP_PIC_MASTER;
        assert!(matches!(swapped.restore(&b), Err(Error::BadVmState(_))));
    }
}
