//! One aarch64 vCPU's state as a snapshot carries it: every register KVM lists for the vCPU
//! (`KVM_GET_REG_LIST`: the core registers, the system registers, the firmware pseudo
//! registers such as the PSCI version, and the virtual timer's control, compare value and
//! counter) read through `KVM_GET_ONE_REG`, and its power state (`KVM_GET_MP_STATE`: a
//! secondary vCPU the guest has not started through PSCI is stopped).
//!
//! The virtual counter is restored as it was saved, so the guest sees no time pass while it
//! was saved (as QEMU does on arm64 by default). Unlike x86_64's kvmclock there is no way to
//! tell an arm64 guest it was paused, and a counter that jumps by the time away would set off
//! its soft-lockup watchdog; its wall clock lags by that time until it is set again.

use kvm_bindings::{kvm_mp_state, RegList, KVM_REG_SIZE_MASK, KVM_REG_SIZE_SHIFT};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::{kvm_err, Error, Platform};

/// Most registers a vCPU may list (the most `kvm-bindings` takes; KVM lists a few hundred).
const MAX_REGS: usize = 500;

/// Bytes of the register `id` (its size field: 1 << n bytes).
pub(super) fn reg_size(id: u64) -> usize {
    1usize << ((id & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT)
}

/// The ids of every register KVM has for `vcpu` (an initialised vCPU).
fn reg_ids(vcpu: &VcpuFd) -> Result<Vec<u64>, Error> {
    let mut list = RegList::new(MAX_REGS)
        .map_err(|e| Error::Vcpu(format!("cannot make a register list: {e:?}")))?;
    vcpu.get_reg_list(&mut list)
        .map_err(kvm_err("KVM_GET_REG_LIST"))?;
    Ok(list.as_slice().to_vec())
}

/// What saving a vCPU needs to know about the host and the VM: nothing on aarch64 (the
/// registers themselves say everything).
#[derive(Debug, Clone, Default)]
pub struct VcpuSaveContext;

impl VcpuSaveContext {
    /// The context of `vm` on `kvm`.
    pub fn new(_kvm: &Kvm, _vm: &VmFd) -> Self {
        VcpuSaveContext
    }

    /// aarch64 guests can be saved.
    pub fn check_snapshot_supported(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// The CPU a vCPU shows the guest. Its ID registers travel with the other system registers
/// in [`VcpuState`]; a host whose CPU differs refuses to take them back (KVM checks them).
#[derive(Debug, Clone, Default)]
pub struct CpuModel;

impl CpuModel {
    /// Reads the CPU model of a vCPU: nothing apart from its registers.
    pub fn read(_vcpu: &VcpuFd) -> Result<CpuModel, Error> {
        Ok(CpuModel)
    }
}

/// One register as KVM names it and its value (little endian, the register's size).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedReg {
    /// The `KVM_{GET,SET}_ONE_REG` id (it encodes the register's size).
    pub id: u64,
    /// The value's bytes.
    pub value: Vec<u8>,
}

/// One vCPU's saved state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u8,
    /// Every register KVM listed, in its order.
    pub regs: Vec<SavedReg>,
    /// `KVM_GET_MP_STATE` (running, stopped through PSCI, suspended).
    pub mp_state: u32,
}

/// Initialises a new vCPU `id` the way every vCPU of this VM is (`KVM_ARM_VCPU_INIT` with
/// PSCI 0.2; a secondary starts powered off): before its registers are set, at boot or at
/// restore.
pub fn prepare_vcpu(platform: &Platform, vcpu: &VcpuFd, id: u8) -> Result<(), Error> {
    vcpu.vcpu_init(&super::boot::vcpu_init(&platform.vcpu_target, id))
        .map_err(kvm_err("KVM_ARM_VCPU_INIT"))
}

impl VcpuState {
    /// Reads the state of vCPU `id`, which is out of KVM_RUN.
    pub fn save(
        id: u8,
        vcpu: &VcpuFd,
        _ctx: &VcpuSaveContext,
        _model: &CpuModel,
    ) -> Result<VcpuState, Error> {
        let mut regs = Vec::new();
        for reg in reg_ids(vcpu)? {
            let mut value = vec![0u8; reg_size(reg)];
            vcpu.get_one_reg(reg, &mut value).map_err(|source| {
                Error::Vcpu(format!("KVM_GET_ONE_REG {reg:#x} failed: {source}"))
            })?;
            regs.push(SavedReg { id: reg, value });
        }
        let mp_state = vcpu
            .get_mp_state()
            .map_err(kvm_err("KVM_GET_MP_STATE"))?
            .mp_state;
        Ok(VcpuState { id, regs, mp_state })
    }

    /// The CPU model the guest saw: part of the registers.
    pub fn cpu_model(&self) -> Option<CpuModel> {
        None
    }

    /// Nothing to do: the ID registers are restored with the others.
    pub fn restore_cpu_model(&self, _vcpu: &VcpuFd) -> Result<(), Error> {
        Ok(())
    }

    /// Writes the state into a new vCPU prepared by [`prepare_vcpu`]. Every saved register
    /// must be one this vCPU lists, with its size; a snapshot naming another is refused
    /// before anything is written.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), Error> {
        let known = reg_ids(vcpu)?;
        if let Some(bad) = self
            .regs
            .iter()
            .find(|r| !known.contains(&r.id) || r.value.len() != reg_size(r.id))
        {
            return Err(Error::Vcpu(format!(
                "the snapshot holds register {:#x} ({} bytes), which this host's KVM does not \
                 have for the vCPU",
                bad.id,
                bad.value.len()
            )));
        }
        for reg in &self.regs {
            vcpu.set_one_reg(reg.id, &reg.value).map_err(|source| {
                Error::Vcpu(format!("KVM_SET_ONE_REG {:#x} failed: {source}", reg.id))
            })?;
        }
        vcpu.set_mp_state(kvm_mp_state {
            mp_state: self.mp_state,
        })
        .map_err(kvm_err("KVM_SET_MP_STATE"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_sizes_come_from_the_id() {
        // PC (u64), a V register (u128), FPSR (u32), from arch/arm64/include/uapi/asm/kvm.h.
        assert_eq!(reg_size(0x6030_0000_0010_0040), 8);
        assert_eq!(reg_size(0x6040_0000_0010_0054), 16);
        assert_eq!(reg_size(0x6020_0000_0010_00d4), 4);
    }
}
