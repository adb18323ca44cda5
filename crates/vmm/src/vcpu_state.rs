//! Saving and restoring one vCPU's architectural state (x86_64).

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// MSRs read per KVM_GET_MSRS call.
const MSR_CHUNK: usize = 64;

/// Everything KVM holds about one vCPU that a guest can observe.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u8,
    /// Multiprocessing state (runnable, halted, waiting for INIT/SIPI).
    pub mp_state: kvm_mp_state,
    /// General purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and extended state (the legacy 4 KiB KVM_GET_XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Model-specific registers as (index, value), in the order they are restored.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
}

fn err(what: &str) -> impl FnOnce(kvm_ioctls::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Reads the MSRs of `list` that KVM can read (unreadable ones are skipped).
fn get_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<(u32, u64)>, String> {
    let mut out = Vec::with_capacity(list.len());
    let mut start = 0;
    while start < list.len() {
        let end = (start + MSR_CHUNK).min(list.len());
        let entries: Vec<kvm_msr_entry> = list[start..end]
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSR list: {e:?}"))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(err("get MSRs"))?;
        out.extend(msrs.as_slice().iter().take(n).map(|e| (e.index, e.data)));
        // KVM stops at the first MSR it cannot read: skip that one.
        start += if n < end - start { n + 1 } else { n };
    }
    Ok(out)
}

impl VcpuState {
    /// Reads the state of a vCPU that is out of KVM_RUN with no I/O exit pending.
    pub fn save(id: u8, vcpu: &VcpuFd, msr_list: &[u32]) -> Result<VcpuState, String> {
        Ok(VcpuState {
            id,
            mp_state: vcpu.get_mp_state().map_err(err("get MP state"))?,
            regs: vcpu.get_regs().map_err(err("get registers"))?,
            sregs: vcpu.get_sregs().map_err(err("get special registers"))?,
            xsave: vcpu.get_xsave().map_err(err("get XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(err("get XCRs"))?,
            debugregs: vcpu.get_debug_regs().map_err(err("get debug registers"))?,
            lapic: vcpu.get_lapic().map_err(err("get LAPIC"))?,
            msrs: get_msrs(vcpu, msr_list)?,
            events: vcpu.get_vcpu_events().map_err(err("get vCPU events"))?,
        })
    }

    /// Writes the state into a new vCPU whose CPUID is already set, in the order KVM needs:
    /// MP state, registers, special registers, XSAVE, XCRs, debug registers, LAPIC, MSRs,
    /// events.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), String> {
        vcpu.set_mp_state(self.mp_state)
            .map_err(err("set MP state"))?;
        vcpu.set_regs(&self.regs).map_err(err("set registers"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(err("set special registers"))?;
        // SAFETY: `xsave` is a whole kvm_xsave read by KVM_GET_XSAVE (the legacy 4 KiB area),
        // which is what KVM_SET_XSAVE reads; no XSAVE2-sized buffer is involved.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(err("set XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(err("set XCRs"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(err("set debug registers"))?;
        vcpu.set_lapic(&self.lapic).map_err(err("set LAPIC"))?;
        for chunk in self.msrs.chunks(MSR_CHUNK) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSR list: {e:?}"))?;
            let n = vcpu.set_msrs(&msrs).map_err(err("set MSRs"))?;
            if n < chunk.len() {
                return Err(format!(
                    "KVM refused MSR {:#x} = {:#x}",
                    chunk[n].0, chunk[n].1
                ));
            }
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(err("set vCPU events"))?;
        Ok(())
    }
}
