//! Creating the KVM VM of an x86_64 guest: the TSS and identity-map pages, the in-kernel
//! irqchip (PIC, IOAPIC, LAPICs) and the PIT.

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};

use super::{kvm_err, Error};

/// Where KVM puts the three TSS pages it needs on Intel (just below the BIOS area at the top
/// of 4 GiB, in the MMIO hole above the LAPIC, so no RAM or device window is lost).
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;
/// Where KVM puts its identity-map page table (the page below the TSS).
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// The TSS of a firmware-booted VM: below the largest firmware ROM (16 MiB under 4 GiB, see
/// `firmware::ROM_MAX`), where QEMU puts it too, since a ROM over 256 KiB (OVMF) covers
/// [`KVM_TSS_ADDR`].
pub const FIRMWARE_KVM_TSS_ADDR: usize = 0xfeff_d000;
/// The identity-map page of a firmware-booted VM (the page below its TSS).
pub const FIRMWARE_KVM_IDENTITY_MAP_ADDR: u64 = 0xfeff_c000;

// Both placements sit between the LAPIC and the ROM area; a firmware VM's below the lowest ROM.
const _: () = {
    use super::layout::{LAPIC_SIZE, LAPIC_START};
    assert!(KVM_IDENTITY_MAP_ADDR >= LAPIC_START + LAPIC_SIZE);
    assert!(FIRMWARE_KVM_IDENTITY_MAP_ADDR >= LAPIC_START + LAPIC_SIZE);
    assert!(
        FIRMWARE_KVM_TSS_ADDR as u64 + 3 * 4096
            <= super::firmware::ROM_END - super::firmware::ROM_MAX
    );
};

/// Creates a VM on `kvm` with everything an x86_64 guest of this VMM needs ([`setup_vm`]).
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, Error> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    setup_vm(&vm, false)?;
    Ok(vm)
}

/// What the VM's platform keeps between [`setup_vm`] and the vCPUs' setup: nothing on x86_64
/// (KVM holds the irqchip and PIT).
#[derive(Debug, Default)]
pub struct Platform;

impl Platform {
    /// Called once every vCPU exists: nothing to finish on x86_64.
    pub fn vcpus_created(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// What a new vCPU needs before anything else is set, at boot or at restore: nothing on
/// x86_64 (aarch64 initialises it here).
pub fn prepare_vcpu(
    _platform: &Platform,
    _vcpu: &kvm_ioctls::VcpuFd,
    _id: u8,
) -> Result<(), Error> {
    Ok(())
}

/// Gives a new VM its TSS and identity-map addresses (higher up unless it `boots_firmware`,
/// whose ROM may reach down there), the in-kernel irqchip and the PIT (whose speaker port is
/// a dummy). Must run before any vCPU is created.
pub fn setup_vm(vm: &VmFd, boots_firmware: bool) -> Result<Platform, Error> {
    let (tss, identity_map) = if boots_firmware {
        (FIRMWARE_KVM_TSS_ADDR, FIRMWARE_KVM_IDENTITY_MAP_ADDR)
    } else {
        (KVM_TSS_ADDR, KVM_IDENTITY_MAP_ADDR)
    };
    vm.set_tss_address(tss)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(identity_map)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    Ok(Platform)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tss_and_identity_map_sit_in_the_mmio_hole_above_the_lapic() {
        use crate::layout::{LAPIC_SIZE, LAPIC_START, MMIO_HOLE_END};
        const TSS: u64 = KVM_TSS_ADDR as u64;
        const {
            assert!(KVM_IDENTITY_MAP_ADDR + 0x1000 == TSS);
            assert!(KVM_IDENTITY_MAP_ADDR >= LAPIC_START + LAPIC_SIZE);
            assert!(TSS + 3 * 0x1000 <= MMIO_HOLE_END);
            assert!(FIRMWARE_KVM_IDENTITY_MAP_ADDR + 0x1000 == FIRMWARE_KVM_TSS_ADDR as u64);
        }
    }

    #[test]
    fn a_vm_has_an_irqchip_and_a_pit() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("skipped: no /dev/kvm");
            return;
        };
        let vm = create_vm(&kvm).unwrap();
        // Both only answer when the irqchip and the PIT exist.
        let mut chip = kvm_bindings::kvm_irqchip {
            chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).unwrap();
        vm.get_pit2().unwrap();
    }
}
