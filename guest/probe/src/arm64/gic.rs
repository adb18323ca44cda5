//! The GICv3 as the probe drives it: the distributor and this CPU's redistributor brought up,
//! the CPU interface through its system registers, an SGI to itself and the virtual timer's
//! PPI taken as interrupts (see `irq.rs` for the vectors that acknowledge and EOI them).

/// The distributor (pocketvisor's arm64 layout, as the device tree's GIC node says).
const GICD_BASE: usize = 0x0800_0000;
/// The first redistributor; one 128 KiB frame (RD then SGI) per vCPU follows it.
const GICR_BASE: usize = 0x0A00_0000;
const GICR_FRAME: usize = 0x2_0000;
/// Most redistributor frames walked looking for this CPU's (the platform's vCPU limit).
const GICR_MAX_FRAMES: usize = 254;

const GICD_CTLR: usize = 0x0;
/// Register write pending: the distributor is still applying a CTLR write.
const GICD_CTLR_RWP: u32 = 1 << 31;
/// Affinity routing and non-secure group 1 enabled (KVM's vGIC has one security state).
const GICD_CTLR_ARE_G1: u32 = (1 << 4) | (1 << 1);

const GICR_TYPER: usize = 0x8;
const GICR_TYPER_LAST: u64 = 1 << 4;
const GICR_WAKER: usize = 0x14;
const GICR_WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
const GICR_WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;
/// Offsets in the SGI frame (the second 64 KiB of a redistributor).
const GICR_SGI: usize = 0x1_0000;
const GICR_IGROUPR0: usize = GICR_SGI + 0x80;
const GICR_ISENABLER0: usize = GICR_SGI + 0x100;
const GICR_IPRIORITYR: usize = GICR_SGI + 0x400;

/// The virtual timer's PPI (INTID 27: PPI 11, as the device tree's timer node says).
pub const VTIMER_INTID: u32 = 27;
/// The SGI the probe sends itself.
pub const TEST_SGI: u32 = 0;
/// Priority given to the probe's interrupts (any value below the mask lets them through).
const PRIORITY: u8 = 0xa0;
/// Spin bound for the GIC's busy bits (reads of an emulated register: each is an exit).
const SPIN_LIMIT: u32 = 1_000_000;

/// Why the GIC could not be brought up.
#[derive(Debug, Clone, Copy)]
pub enum GicError {
    /// The distributor's RWP bit never cleared.
    DistributorBusy,
    /// No redistributor frame's affinity matches this CPU's MPIDR.
    NoRedistributor,
    /// The redistributor's children never woke.
    RedistributorAsleep,
    /// ICC_SRE_EL1.SRE stayed 0: no system-register CPU interface.
    NoSystemRegisters,
}

impl core::fmt::Display for GicError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            GicError::DistributorBusy => "distributor-busy",
            GicError::NoRedistributor => "no-redistributor",
            GicError::RedistributorAsleep => "redistributor-asleep",
            GicError::NoSystemRegisters => "no-sysreg-interface",
        })
    }
}

fn read32(addr: usize) -> u32 {
    // SAFETY: callers pass GIC register addresses of the platform (device memory, MMU off).
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn write32(addr: usize, v: u32) {
    // SAFETY: as in `read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

fn read64(addr: usize) -> u64 {
    // Two 32-bit halves: the registers allow either access size, and the MMU is off.
    u64::from(read32(addr)) | (u64::from(read32(addr + 4)) << 32)
}

fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    (0..SPIN_LIMIT).any(|_| done())
}

/// This CPU's affinity as GICR_TYPER states it (Aff3.Aff2.Aff1.Aff0).
fn my_affinity() -> u32 {
    let mpidr = crate::mpidr();
    let low = mpidr & 0xff_ffff;
    let aff3 = (mpidr >> 32) & 0xff;
    u32::try_from(low | (aff3 << 24)).unwrap_or(0)
}

/// The base of this CPU's redistributor frame.
pub fn my_redistributor() -> Option<usize> {
    let me = my_affinity();
    for i in 0..GICR_MAX_FRAMES {
        let base = GICR_BASE + i * GICR_FRAME;
        let typer = read64(base + GICR_TYPER);
        if (typer >> 32) as u32 == me {
            return Some(base);
        }
        if typer & GICR_TYPER_LAST != 0 {
            break;
        }
    }
    None
}

/// Brings up the distributor (once, on the boot CPU).
pub fn init_distributor() -> Result<(), GicError> {
    write32(GICD_BASE + GICD_CTLR, 0);
    if !wait_until(|| read32(GICD_BASE + GICD_CTLR) & GICD_CTLR_RWP == 0) {
        return Err(GicError::DistributorBusy);
    }
    write32(GICD_BASE + GICD_CTLR, GICD_CTLR_ARE_G1);
    if !wait_until(|| read32(GICD_BASE + GICD_CTLR) & GICD_CTLR_RWP == 0) {
        return Err(GicError::DistributorBusy);
    }
    Ok(())
}

/// Wakes this CPU's redistributor, puts its SGIs and PPIs in group 1, enables the test SGI
/// and the virtual timer's PPI, and enables the CPU interface's group 1.
pub fn init_cpu() -> Result<(), GicError> {
    let rd = my_redistributor().ok_or(GicError::NoRedistributor)?;
    let waker = read32(rd + GICR_WAKER);
    write32(rd + GICR_WAKER, waker & !GICR_WAKER_PROCESSOR_SLEEP);
    if !wait_until(|| read32(rd + GICR_WAKER) & GICR_WAKER_CHILDREN_ASLEEP == 0) {
        return Err(GicError::RedistributorAsleep);
    }
    write32(rd + GICR_IGROUPR0, u32::MAX);
    for intid in [TEST_SGI, VTIMER_INTID] {
        let reg = rd + GICR_IPRIORITYR + (intid as usize & !3);
        let shift = (intid % 4) * 8;
        let v = (read32(reg) & !(0xff << shift)) | (u32::from(PRIORITY) << shift);
        write32(reg, v);
    }
    write32(rd + GICR_ISENABLER0, (1 << TEST_SGI) | (1 << VTIMER_INTID));
    // SAFETY: the GICv3 CPU interface's system registers (ICC_SRE_EL1, ICC_PMR_EL1,
    // ICC_BPR1_EL1, ICC_IGRPEN1_EL1) at EL1; they change only interrupt delivery.
    let sre = unsafe {
        let sre: u64;
        core::arch::asm!(
            "mrs {t}, S3_0_C12_C12_5",
            "orr {t}, {t}, #1",
            "msr S3_0_C12_C12_5, {t}",
            "isb",
            "mrs {t}, S3_0_C12_C12_5",
            t = out(reg) sre,
        );
        sre
    };
    if sre & 1 == 0 {
        return Err(GicError::NoSystemRegisters);
    }
    // SAFETY: as above.
    unsafe {
        core::arch::asm!(
            "msr S3_0_C4_C6_0, {pmr}",
            "msr S3_0_C12_C12_3, xzr",
            "msr S3_0_C12_C12_7, {one}",
            "isb",
            pmr = in(reg) 0xffu64,
            one = in(reg) 1u64,
        )
    };
    Ok(())
}

/// Sends SGI `intid` to this CPU alone (ICC_SGI1R_EL1 with this CPU's affinity).
pub fn send_sgi_to_self(intid: u32) {
    let mpidr = crate::mpidr();
    let aff0 = mpidr & 0xf;
    let aff1 = (mpidr >> 8) & 0xff;
    let aff2 = (mpidr >> 16) & 0xff;
    let aff3 = (mpidr >> 32) & 0xff;
    // The target list holds Aff0 values 0-15 of the cluster Aff3.Aff2.Aff1.
    let v = (1u64 << aff0)
        | (aff1 << 16)
        | (u64::from(intid & 0xf) << 24)
        | (aff2 << 32)
        | (aff3 << 48);
    // SAFETY: writing ICC_SGI1R_EL1 only raises a software interrupt.
    unsafe { core::arch::asm!("msr S3_0_C12_C11_5, {}", "isb", in(reg) v) };
}
