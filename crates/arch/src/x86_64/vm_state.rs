//! The VM-wide KVM state of an x86_64 guest a snapshot carries: both PICs, the IOAPIC, the
//! PIT and the kvmclock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::{kvm_err, Error};

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
    /// Reads the state of a VM whose vCPUs are all out of KVM_RUN.
    pub fn save(vm: &VmFd) -> Result<VmState, Error> {
        Ok(VmState {
            pic_master: get_irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
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
        // Only KVM_CLOCK_REALTIME may be passed back, and we want the saved value as is.
        clock.flags = 0;
        vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let saved = VmState::save(&a).unwrap();
        let json = serde_json::to_vec(&saved).unwrap();
        let back: VmState = serde_json::from_slice(&json).unwrap();
        let b = super::super::create_vm(&kvm).unwrap();
        back.restore(&b).unwrap();
        assert_eq!(b.get_pit2().unwrap().channels[0].count, 0x1234);

        let mut swapped: VmState = serde_json::from_slice(&json).unwrap();
        swapped.ioapic.chip_id = KVM_IRQCHIP_PIC_MASTER;
        assert!(matches!(swapped.restore(&b), Err(Error::BadVmState(_))));
    }
}
