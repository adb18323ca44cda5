//! The vGICv3's and its ITS's state as a snapshot carries it (Documentation/virt/kvm/devices/
//! arm-vgic-v3.rst and arm-vgic-its.rst): the distributor's registers for the SPIs, each
//! vCPU's redistributor (its LPI tables' addresses and the SGI/PPI registers) and CPU
//! interface system registers, the SPIs' line levels, and the ITS's registers. The LPIs'
//! pending bits and the ITS's tables (devices, collections, translations) live in guest RAM:
//! saving flushes them there first (`KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES`,
//! `KVM_DEV_ARM_ITS_SAVE_TABLES`), so the RAM a snapshot writes afterwards holds them, and a
//! restore reads them back (`KVM_DEV_ARM_ITS_RESTORE_TABLES`).
//!
//! Restoring follows the kernel's order: distributor, redistributors (the LPI table
//! addresses before LPIs are enabled), CPU interfaces (`ICC_SRE_EL1` and `ICC_CTLR_EL1`
//! first), line levels, then the ITS (`GITS_IIDR` and `GITS_CBASER`, the other registers, its
//! tables, `GITS_CTLR` last). Values come from the snapshot, so KVM checks each write: one it
//! refuses fails the restore with the register's name.

use kvm_bindings::{
    kvm_device_attr, KVM_DEV_ARM_ITS_RESTORE_TABLES, KVM_DEV_ARM_ITS_SAVE_TABLES,
    KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_GRP_DIST_REGS,
    KVM_DEV_ARM_VGIC_GRP_ITS_REGS, KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO,
    KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT,
    KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES, KVM_DEV_ARM_VGIC_V3_MPIDR_SHIFT,
    VGIC_LEVEL_INFO_LINE_LEVEL,
};
use kvm_ioctls::DeviceFd;
use serde::{Deserialize, Serialize};

use super::fdt::mpidr_of;
use super::layout::GIC_NR_IRQS;
use super::{Error, Platform};

/// A 32-bit register at `offset` and its value.
pub type Reg32 = (u32, u32);
/// A 64-bit register (an ITS register, a CPU interface register by its encoding) and its value.
pub type Reg64 = (u64, u64);

/// The vGIC and ITS state (the field names are the snapshot's format).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GicState {
    /// Distributor registers, in restore order (clear-enable/pending/active registers are
    /// written as all ones before their set registers, from the set registers' values).
    pub dist: Vec<Reg32>,
    /// Per vCPU, in vCPU order.
    pub vcpus: Vec<GicCpuState>,
    /// The SPIs' line levels, 32 lines per word from INTID 32.
    pub spi_levels: Vec<u32>,
    /// ITS registers (`GITS_*` offset, value).
    pub its: Vec<Reg32As64>,
}

/// An ITS register (offset, value: KVM reads and writes them as 64 bits).
pub type Reg32As64 = (u32, u64);

/// One vCPU's redistributor and CPU interface.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GicCpuState {
    /// Redistributor registers (offset from its first frame, value), in restore order.
    pub redist: Vec<Reg32>,
    /// CPU interface system registers (encoding, value), in restore order.
    pub icc: Vec<Reg64>,
}

// Distributor register offsets (GICv3 architecture specification).
const GICD_CTLR: u32 = 0x0000;
const GICD_IGROUPR: u32 = 0x0080;
const GICD_ISENABLER: u32 = 0x0100;
const GICD_ICENABLER: u32 = 0x0180;
const GICD_ISPENDR: u32 = 0x0200;
const GICD_ICPENDR: u32 = 0x0280;
const GICD_ISACTIVER: u32 = 0x0300;
const GICD_ICACTIVER: u32 = 0x0380;
const GICD_IPRIORITYR: u32 = 0x0400;
const GICD_ICFGR: u32 = 0x0C00;
const GICD_IROUTER: u32 = 0x6000;

// Redistributor: the control frame, then the SGI frame 64 KiB on.
const GICR_CTLR: u32 = 0x0000;
const GICR_PROPBASER: u32 = 0x0070;
const GICR_PENDBASER: u32 = 0x0078;
const GICR_SGI: u32 = 0x1_0000;
const GICR_IGROUPR0: u32 = GICR_SGI + 0x0080;
const GICR_ISENABLER0: u32 = GICR_SGI + 0x0100;
const GICR_ICENABLER0: u32 = GICR_SGI + 0x0180;
const GICR_ISPENDR0: u32 = GICR_SGI + 0x0200;
const GICR_ICPENDR0: u32 = GICR_SGI + 0x0280;
const GICR_ISACTIVER0: u32 = GICR_SGI + 0x0300;
const GICR_ICACTIVER0: u32 = GICR_SGI + 0x0380;
const GICR_IPRIORITYR0: u32 = GICR_SGI + 0x0400;
const GICR_ICFGR0: u32 = GICR_SGI + 0x0C00;

// ITS registers.
const GITS_CTLR: u32 = 0x0000;
const GITS_IIDR: u32 = 0x0004;
const GITS_CBASER: u32 = 0x0080;
const GITS_CWRITER: u32 = 0x0088;
const GITS_CREADR: u32 = 0x0090;
const GITS_BASER: u32 = 0x0100;
/// GITS_BASER<n>: KVM's ITS has a device table and a collection table (eight registers
/// exist; the others read as zero).
const GITS_BASER_COUNT: u32 = 8;

/// The `KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS` encoding of a system register (op0, op1, CRn, CRm,
/// op2), as in the kernel's `ARM64_SYS_REG`.
const fn sysreg(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2
}
const ICC_PMR_EL1: u64 = sysreg(3, 0, 4, 6, 0);
const ICC_BPR0_EL1: u64 = sysreg(3, 0, 12, 8, 3);
const ICC_AP0R0_EL1: u64 = sysreg(3, 0, 12, 8, 4);
const ICC_AP1R0_EL1: u64 = sysreg(3, 0, 12, 9, 0);
const ICC_BPR1_EL1: u64 = sysreg(3, 0, 12, 12, 3);
const ICC_CTLR_EL1: u64 = sysreg(3, 0, 12, 12, 4);
const ICC_SRE_EL1: u64 = sysreg(3, 0, 12, 12, 5);
const ICC_IGRPEN0_EL1: u64 = sysreg(3, 0, 12, 12, 6);
const ICC_IGRPEN1_EL1: u64 = sysreg(3, 0, 12, 12, 7);

/// The first SPI (INTIDs below are each vCPU's SGIs and PPIs, in its redistributor).
const FIRST_SPI: u32 = 32;

/// Reads a device attribute into a `T` (a `u32` or `u64`, as the group defines).
fn get<T: Default + Copy>(dev: &DeviceFd, group: u32, attr: u64, what: &str) -> Result<T, Error> {
    let mut value = T::default();
    let mut a = kvm_device_attr {
        group,
        attr,
        addr: std::ptr::addr_of_mut!(value) as u64,
        flags: 0,
    };
    // SAFETY: `addr` points at `value`, a live `T` of the size the kernel writes for this
    // group (32 bits for distributor, redistributor and level registers, 64 for CPU interface
    // and ITS registers: the callers pick `T` by group).
    unsafe { dev.get_device_attr(&mut a) }
        .map_err(|e| Error::Gic(format!("cannot read {what} ({attr:#x}): {e}")))?;
    Ok(value)
}

/// Writes a device attribute from `value` (see [`get`]).
fn set<T: Copy>(dev: &DeviceFd, group: u32, attr: u64, value: T, what: &str) -> Result<(), Error> {
    let a = kvm_device_attr {
        group,
        attr,
        addr: std::ptr::addr_of!(value) as u64,
        flags: 0,
    };
    dev.set_device_attr(&a)
        .map_err(|e| Error::Gic(format!("cannot write {what} ({attr:#x}): {e}")))
}

/// A control-group operation without a value (SAVE/RESTORE tables).
fn ctrl(dev: &DeviceFd, op: u32, what: &str) -> Result<(), Error> {
    let a = kvm_device_attr {
        group: KVM_DEV_ARM_VGIC_GRP_CTRL,
        attr: u64::from(op),
        addr: 0,
        flags: 0,
    };
    dev.set_device_attr(&a)
        .map_err(|e| Error::Gic(format!("{what} failed: {e}")))
}

/// The attribute's affinity field for vCPU `id`'s redistributor or CPU interface.
fn mpidr_attr(id: u8) -> u64 {
    u64::from(mpidr_of(id)) << KVM_DEV_ARM_VGIC_V3_MPIDR_SHIFT
}

/// Words of a register with `bits` bits per interrupt for the SPIs.
fn spi_words(base: u32, bits: u32) -> impl Iterator<Item = u32> {
    let per_word = 32 / bits;
    (FIRST_SPI / per_word..GIC_NR_IRQS / per_word).map(move |w| base + 4 * w)
}

/// The distributor's registers to save, as (offset to read, offset a restore clears with
/// all ones first, if any).
fn dist_layout() -> Vec<(u32, Option<u32>)> {
    let mut regs = vec![(GICD_CTLR, None)];
    regs.extend(spi_words(GICD_IGROUPR, 1).map(|o| (o, None)));
    regs.extend(spi_words(GICD_ICFGR, 2).map(|o| (o, None)));
    regs.extend(spi_words(GICD_IPRIORITYR, 8).map(|o| (o, None)));
    // IROUTER: 64 bits per SPI, as two 32-bit halves.
    for irq in FIRST_SPI..GIC_NR_IRQS {
        let o = GICD_IROUTER + 8 * irq;
        regs.extend([(o, None), (o + 4, None)]);
    }
    for (set, clear) in [
        (GICD_ISPENDR, GICD_ICPENDR),
        (GICD_ISACTIVER, GICD_ICACTIVER),
        (GICD_ISENABLER, GICD_ICENABLER),
    ] {
        regs.extend(spi_words(set, 1).map(|o| (o, Some(o - set + clear))));
    }
    regs
}

/// A redistributor's registers to save, as [`dist_layout`]: the LPI tables' addresses before
/// `GICR_CTLR` (LPIs cannot be enabled without them, nor the addresses changed after).
fn redist_layout() -> Vec<(u32, Option<u32>)> {
    let mut regs = vec![
        (GICR_PROPBASER, None),
        (GICR_PROPBASER + 4, None),
        (GICR_PENDBASER, None),
        (GICR_PENDBASER + 4, None),
        (GICR_CTLR, None),
        (GICR_IGROUPR0, None),
        (GICR_ICFGR0, None),
        (GICR_ICFGR0 + 4, None),
    ];
    regs.extend((0..8).map(|w| (GICR_IPRIORITYR0 + 4 * w, None)));
    regs.extend([
        (GICR_ISPENDR0, Some(GICR_ICPENDR0)),
        (GICR_ISACTIVER0, Some(GICR_ICACTIVER0)),
        (GICR_ISENABLER0, Some(GICR_ICENABLER0)),
    ]);
    regs
}

/// The ITS registers to save, in restore order (`GITS_CTLR` is restored last, after the
/// tables, and separately).
fn its_layout() -> Vec<u32> {
    let mut regs = vec![GITS_IIDR, GITS_CBASER, GITS_CWRITER, GITS_CREADR];
    regs.extend((0..GITS_BASER_COUNT).map(|n| GITS_BASER + 8 * n));
    regs
}

/// How many ICC_AP{0,1}R<n>_EL1 registers the CPU interface has: from ICC_CTLR_EL1's PRIbits
/// (5 priority bits: 1, 6: 2, 7: 4).
fn apr_count(icc_ctlr: u64) -> u64 {
    let pri_bits = ((icc_ctlr >> 8) & 0x7) + 1;
    1 << pri_bits.clamp(5, 7).saturating_sub(5)
}

impl GicState {
    /// Reads the vGIC of a VM with `nr_vcpus` vCPUs, all out of KVM_RUN, after flushing the
    /// LPI pending bits and the ITS tables into guest RAM (so save RAM after this).
    pub fn save(platform: &Platform, nr_vcpus: u8) -> Result<GicState, Error> {
        let (gic, its) = (&platform.gic, &platform.its);
        ctrl(
            gic,
            KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES,
            "saving the LPI pending tables",
        )?;
        ctrl(its, KVM_DEV_ARM_ITS_SAVE_TABLES, "saving the ITS tables")?;

        let mut dist = Vec::new();
        for (offset, clear) in dist_layout() {
            let v: u32 = get(
                gic,
                KVM_DEV_ARM_VGIC_GRP_DIST_REGS,
                offset.into(),
                "a distributor register",
            )?;
            if let Some(c) = clear {
                dist.push((c, u32::MAX));
            }
            dist.push((offset, v));
        }
        let mut vcpus = Vec::with_capacity(nr_vcpus.into());
        for id in 0..nr_vcpus {
            let mpidr = mpidr_attr(id);
            let mut redist = Vec::new();
            for (offset, clear) in redist_layout() {
                let v: u32 = get(
                    gic,
                    KVM_DEV_ARM_VGIC_GRP_REDIST_REGS,
                    mpidr | u64::from(offset),
                    "a redistributor register",
                )?;
                if let Some(c) = clear {
                    redist.push((c, u32::MAX));
                }
                redist.push((offset, v));
            }
            let icc_get = |reg: u64| -> Result<u64, Error> {
                get(
                    gic,
                    KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
                    mpidr | reg,
                    "a CPU interface register",
                )
            };
            let ctlr = icc_get(ICC_CTLR_EL1)?;
            let mut icc = vec![(ICC_SRE_EL1, icc_get(ICC_SRE_EL1)?), (ICC_CTLR_EL1, ctlr)];
            for reg in [ICC_PMR_EL1, ICC_BPR0_EL1, ICC_BPR1_EL1] {
                icc.push((reg, icc_get(reg)?));
            }
            for n in 0..apr_count(ctlr) {
                for base in [ICC_AP0R0_EL1, ICC_AP1R0_EL1] {
                    icc.push((base + n, icc_get(base + n)?));
                }
            }
            for reg in [ICC_IGRPEN0_EL1, ICC_IGRPEN1_EL1] {
                icc.push((reg, icc_get(reg)?));
            }
            vcpus.push(GicCpuState { redist, icc });
        }
        let spi_levels = (FIRST_SPI / 32..GIC_NR_IRQS / 32)
            .map(|w| {
                get(
                    gic,
                    KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO,
                    level_attr(w * 32),
                    "the line levels",
                )
            })
            .collect::<Result<Vec<u32>, Error>>()?;
        let mut its_regs = Vec::new();
        for offset in its_layout().into_iter().chain([GITS_CTLR]) {
            let v: u64 = get(
                its,
                KVM_DEV_ARM_VGIC_GRP_ITS_REGS,
                offset.into(),
                "an ITS register",
            )?;
            its_regs.push((offset, v));
        }
        Ok(GicState {
            dist,
            vcpus,
            spi_levels,
            its: its_regs,
        })
    }

    /// Writes the state into the vGIC of a new VM whose vCPUs all exist and whose vGIC is
    /// initialised, with guest RAM in place (the ITS reads its tables from it), before any
    /// vCPU runs. A state for another number of vCPUs, or naming a register this module does
    /// not save, is refused before anything is written.
    pub fn restore(&self, platform: &Platform, nr_vcpus: u8) -> Result<(), Error> {
        self.check(nr_vcpus)?;
        let (gic, its) = (&platform.gic, &platform.its);
        for &(offset, v) in &self.dist {
            set(
                gic,
                KVM_DEV_ARM_VGIC_GRP_DIST_REGS,
                offset.into(),
                v,
                "a distributor register",
            )?;
        }
        for (id, cpu) in (0..nr_vcpus).zip(&self.vcpus) {
            let mpidr = mpidr_attr(id);
            for &(offset, v) in &cpu.redist {
                set(
                    gic,
                    KVM_DEV_ARM_VGIC_GRP_REDIST_REGS,
                    mpidr | u64::from(offset),
                    v,
                    "a redistributor register",
                )?;
            }
            for &(reg, v) in &cpu.icc {
                set(
                    gic,
                    KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
                    mpidr | reg,
                    v,
                    "a CPU interface register",
                )?;
            }
        }
        for (w, &levels) in (FIRST_SPI / 32..).zip(&self.spi_levels) {
            set(
                gic,
                KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO,
                level_attr(w * 32),
                levels,
                "the line levels",
            )?;
        }
        let mut ctlr = 0;
        for &(offset, v) in &self.its {
            if offset == GITS_CTLR {
                ctlr = v;
                continue;
            }
            set(
                its,
                KVM_DEV_ARM_VGIC_GRP_ITS_REGS,
                offset.into(),
                v,
                "an ITS register",
            )?;
        }
        ctrl(
            its,
            KVM_DEV_ARM_ITS_RESTORE_TABLES,
            "restoring the ITS tables",
        )?;
        set(
            its,
            KVM_DEV_ARM_VGIC_GRP_ITS_REGS,
            GITS_CTLR.into(),
            ctlr,
            "GITS_CTLR",
        )
    }

    /// Refuses a state that is not shaped as [`save`](Self::save) writes it for `nr_vcpus`
    /// vCPUs: its registers must be the ones this module saves, in its order.
    fn check(&self, nr_vcpus: u8) -> Result<(), Error> {
        let bad = |what: &str| Err(Error::Gic(format!("the snapshot's vGIC state {what}")));
        let written = |layout: Vec<(u32, Option<u32>)>| -> Vec<u32> {
            layout
                .into_iter()
                .flat_map(|(o, c)| c.into_iter().chain([o]))
                .collect()
        };
        if !self.dist.iter().map(|r| r.0).eq(written(dist_layout())) {
            return bad("has other distributor registers than this pocketvisor saves");
        }
        if self.vcpus.len() != usize::from(nr_vcpus) {
            return bad(&format!(
                "is for {} vCPUs, the configuration has {nr_vcpus}",
                self.vcpus.len()
            ));
        }
        let redist = written(redist_layout());
        let icc_known = |reg: u64| {
            [
                ICC_SRE_EL1,
                ICC_CTLR_EL1,
                ICC_PMR_EL1,
                ICC_BPR0_EL1,
                ICC_BPR1_EL1,
                ICC_IGRPEN0_EL1,
                ICC_IGRPEN1_EL1,
            ]
            .contains(&reg)
                || (ICC_AP0R0_EL1..ICC_AP0R0_EL1 + 4).contains(&reg)
                || (ICC_AP1R0_EL1..ICC_AP1R0_EL1 + 4).contains(&reg)
        };
        for cpu in &self.vcpus {
            if !cpu.redist.iter().map(|r| r.0).eq(redist.iter().copied()) {
                return bad("has other redistributor registers than this pocketvisor saves");
            }
            if cpu.icc.len() > 16 || !cpu.icc.iter().all(|r| icc_known(r.0)) {
                return bad("has unknown CPU interface registers");
            }
        }
        if self.spi_levels.len() != spi_words(0, 1).count() {
            return bad("has the wrong number of line levels");
        }
        let its: Vec<u32> = its_layout().into_iter().chain([GITS_CTLR]).collect();
        if !self.its.iter().map(|r| r.0).eq(its) {
            return bad("has other ITS registers than this pocketvisor saves");
        }
        Ok(())
    }
}

/// The `KVM_DEV_ARM_VGIC_GRP_LEVEL_INFO` attribute of the 32 lines from `intid`.
fn level_attr(intid: u32) -> u64 {
    u64::from(VGIC_LEVEL_INFO_LINE_LEVEL << KVM_DEV_ARM_VGIC_LINE_LEVEL_INFO_SHIFT | intid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_match_the_kernel_abi() {
        // ICC_CTLR_EL1 is S3_0_C12_C12_4; ICC_PMR_EL1 S3_0_C4_C6_0.
        assert_eq!(ICC_CTLR_EL1, 0xc664);
        assert_eq!(ICC_PMR_EL1, 0xc230);
        // vCPU 17: Aff1 = 1, Aff0 = 1.
        assert_eq!(mpidr_attr(17), 0x0000_0101_0000_0000);
        assert_eq!(level_attr(64), 64);
        assert_eq!(apr_count(4 << 8), 1);
        assert_eq!(apr_count(6 << 8), 4);
    }

    #[test]
    fn layouts_cover_the_spis_once() {
        let dist = dist_layout();
        // IGROUPR, ICFGR, IPRIORITYR words for 96 SPIs, IROUTER halves, three set registers.
        assert_eq!(dist.len(), 1 + 3 + 6 + 24 + 192 + 9);
        assert_eq!(spi_words(GICD_ICFGR, 2).next(), Some(GICD_ICFGR + 8));
        assert!(its_layout().iter().all(|&o| o != GITS_CTLR));
    }
}
