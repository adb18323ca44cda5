//! Saving and restoring one vCPU's architectural state (x86_64), and the CPU model (CPUID,
//! TSC frequency) a guest saw.

use std::sync::Arc;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::{kvm_err, Error};

/// MSRs read per KVM_GET_MSRS call.
const MSR_CHUNK: usize = 64;

/// What saving a vCPU needs to know about the host and the VM, read once when the VM is
/// built (before any sandbox filter is installed). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct VcpuSaveContext {
    /// The MSRs KVM reports for this host (what a snapshot saves).
    msr_list: Arc<Vec<u32>>,
    /// Bytes of XSAVE state KVM holds per vCPU of this VM (KVM_CAP_XSAVE2; 0 if unknown).
    xsave_size: usize,
}

impl VcpuSaveContext {
    /// Reads the MSR list of `kvm` and the XSAVE size of `vm`. A host that cannot list its
    /// MSRs gets snapshots without MSRs (and a warning), not a failed VM.
    pub fn new(kvm: &Kvm, vm: &VmFd) -> Self {
        let msr_list = kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_else(|e| {
                tracing::warn!("KVM_GET_MSR_INDEX_LIST failed ({e}); snapshots will lack MSRs");
                Vec::new()
            });
        let xsave_size =
            usize::try_from(vm.check_extension_int(kvm_ioctls::Cap::Xsave2)).unwrap_or(0);
        Self {
            msr_list: Arc::new(msr_list),
            xsave_size,
        }
    }

    /// Refuses a snapshot whose vCPU state would not fit what [`VcpuState`] carries.
    pub fn check_snapshot_supported(&self) -> Result<(), Error> {
        let legacy_xsave = std::mem::size_of::<kvm_xsave>();
        if self.xsave_size > legacy_xsave {
            // KVM_GET_XSAVE would silently cut the state (AMX tiles) off.
            return Err(Error::XsaveTooLarge {
                size: self.xsave_size,
                supported: legacy_xsave,
            });
        }
        Ok(())
    }
}

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
    /// The CPUID the guest saw (restored as is, after checking this host has the features).
    #[serde(default)]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The guest's TSC frequency, if KVM reports it.
    #[serde(default)]
    pub tsc_khz: Option<u32>,
}

/// The CPU a vCPU shows the guest: read once when the vCPU is built (before any sandbox
/// filter is installed), kept for snapshots.
#[derive(Debug, Clone, Default)]
pub struct CpuModel {
    /// The CPUID entries set on the vCPU.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The TSC frequency, if KVM reports it.
    pub tsc_khz: Option<u32>,
}

impl CpuModel {
    /// Reads the CPU model of a vCPU whose CPUID is set.
    pub fn read(vcpu: &VcpuFd) -> Result<CpuModel, Error> {
        Ok(CpuModel {
            cpuid: vcpu
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(kvm_err("KVM_GET_CPUID2"))?
                .as_slice()
                .to_vec(),
            tsc_khz: vcpu.get_tsc_khz().ok(),
        })
    }
}

/// CPUID feature registers a restore checks: (leaf, subleaf, register 0..4 = eax..edx, bits
/// that are not features but state, like OSXSAVE and OSPKE, which follow CR4).
const FEATURE_REGS: &[(u32, u32, usize, u32)] = &[
    (1, 0, 2, 1 << 27),
    (1, 0, 3, 0),
    (7, 0, 1, 0),
    (7, 0, 2, 1 << 4),
    (7, 0, 3, 0),
    (0xd, 0, 0, 0),
    (0xd, 1, 0, 0),
    (0x8000_0001, 0, 2, 0),
    (0x8000_0001, 0, 3, 0),
];

fn cpuid_reg(entries: &[kvm_cpuid_entry2], leaf: u32, sub: u32, reg: usize) -> u32 {
    entries
        .iter()
        .find(|e| e.function == leaf && e.index == sub)
        .map_or(0, |e| [e.eax, e.ebx, e.ecx, e.edx][reg])
}

/// The CPU features in `saved` (what the guest saw) that `host` (what this host would give a
/// new guest) lacks, one description per register.
pub fn missing_features(saved: &[kvm_cpuid_entry2], host: &[kvm_cpuid_entry2]) -> Vec<String> {
    FEATURE_REGS
        .iter()
        .filter_map(|&(leaf, sub, reg, exempt)| {
            let missing =
                cpuid_reg(saved, leaf, sub, reg) & !cpuid_reg(host, leaf, sub, reg) & !exempt;
            (missing != 0).then(|| {
                let name = ["eax", "ebx", "ecx", "edx"][reg];
                format!("leaf {leaf:#x}.{sub} {name} bits {missing:#x}")
            })
        })
        .collect()
}

/// Reads the MSRs of `list` that KVM can read (unreadable ones are skipped).
fn get_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<(u32, u64)>, Error> {
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
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| Error::MsrList(format!("{e:?}")))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice().iter().take(n).map(|e| (e.index, e.data)));
        // KVM stops at the first MSR it cannot read: skip that one.
        start += if n < end - start { n + 1 } else { n };
    }
    Ok(out)
}

impl VcpuState {
    /// Reads the state of a vCPU that is out of KVM_RUN with no I/O exit pending; `model` is
    /// what [`CpuModel::read`] returned when the vCPU was built.
    pub fn save(
        id: u8,
        vcpu: &VcpuFd,
        ctx: &VcpuSaveContext,
        model: &CpuModel,
    ) -> Result<VcpuState, Error> {
        Ok(VcpuState {
            id,
            mp_state: vcpu.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?,
            regs: vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
            xsave: vcpu.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?,
            debugregs: vcpu
                .get_debug_regs()
                .map_err(kvm_err("KVM_GET_DEBUGREGS"))?,
            lapic: vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?,
            msrs: get_msrs(vcpu, &ctx.msr_list)?,
            events: vcpu
                .get_vcpu_events()
                .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
            cpuid: model.cpuid.clone(),
            tsc_khz: model.tsc_khz,
        })
    }

    /// The CPU model the guest saw; `None` for a snapshot that predates saving it (then the
    /// vCPU keeps what this host gives a new guest).
    pub fn cpu_model(&self) -> Option<CpuModel> {
        (!self.cpuid.is_empty()).then(|| CpuModel {
            cpuid: self.cpuid.clone(),
            tsc_khz: self.tsc_khz,
        })
    }

    /// Gives a new vCPU, whose CPUID is already what this host offers a new guest, the CPUID
    /// and TSC frequency the guest saw, refusing if the host lacks a feature the guest saw.
    pub fn restore_cpu_model(&self, vcpu: &VcpuFd) -> Result<(), Error> {
        if !self.cpuid.is_empty() {
            let host = vcpu
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(kvm_err("KVM_GET_CPUID2"))?;
            let missing = missing_features(&self.cpuid, host.as_slice());
            if !missing.is_empty() {
                return Err(Error::MissingCpuFeatures(missing.join(", ")));
            }
            let cpuid =
                CpuId::from_entries(&self.cpuid).map_err(|e| Error::Cpuid(format!("{e:?}")))?;
            vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        }
        if let (Some(want), Ok(have)) = (self.tsc_khz, vcpu.get_tsc_khz()) {
            if want.abs_diff(have) > want / 10_000 {
                if let Err(e) = vcpu.set_tsc_khz(want) {
                    tracing::warn!(
                        "guest TSC was {want} kHz, this host gives {have} kHz and cannot scale \
                         ({e}); guest time will drift"
                    );
                }
            }
        }
        Ok(())
    }

    /// Writes the state into a new vCPU whose CPU model is set, in the order KVM needs:
    /// MP state, registers, special registers, XSAVE, XCRs, debug registers, LAPIC, MSRs,
    /// events.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), Error> {
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        // SAFETY: `xsave` is a whole kvm_xsave read by KVM_GET_XSAVE (the legacy 4 KiB area),
        // which is what KVM_SET_XSAVE reads; no XSAVE2-sized buffer is involved.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(kvm_err("KVM_SET_LAPIC"))?;
        for chunk in self.msrs.chunks(MSR_CHUNK) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs =
                Msrs::from_entries(&entries).map_err(|e| Error::MsrList(format!("{e:?}")))?;
            let n = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
            if let Some(&(index, value)) = chunk.get(n) {
                return Err(Error::MsrValueRejected { index, value });
            }
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        // The restored kvmclock has moved on by the time spent saved: flag the guest as
        // paused by the host (PVCLOCK_GUEST_STOPPED) so its soft-lockup and RCU-stall
        // detectors do not report the jump. KVM refuses it (EINVAL) when the guest never
        // enabled kvmclock; then there is nobody to tell.
        let _ = vcpu.kvmclock_ctrl();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    #[test]
    fn missing_features_names_leaf_register_and_bits() {
        let host = vec![
            leaf(1, 0, [0, 0, 0x0000_0201, 0xff]),
            leaf(7, 0, [0, 0x10, 0, 0]),
        ];
        // Same or fewer features: fine; OSXSAVE (state, not a feature) is ignored.
        let same = vec![
            leaf(1, 0, [9, 9, 0x0800_0001, 0x0f]),
            leaf(7, 0, [0, 0x10, 0, 0]),
        ];
        assert!(missing_features(&same, &host).is_empty());
        let more = vec![
            leaf(1, 0, [0, 0, 0x1000_0200, 0xff]),
            leaf(7, 0, [0, 0x30, 0, 0]),
        ];
        assert_eq!(
            missing_features(&more, &host),
            vec!["leaf 0x1.0 ecx bits 0x10000000", "leaf 0x7.0 ebx bits 0x20"]
        );
        // A leaf the host does not have at all counts as all-zero.
        let ext = vec![leaf(0x8000_0001, 0, [0, 0, 0, 1 << 29])];
        assert_eq!(
            missing_features(&ext, &host),
            vec!["leaf 0x80000001.0 edx bits 0x20000000"]
        );
    }
}
