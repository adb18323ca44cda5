//! MSI-X through the GICv3 ITS, as the probe drives it: LPIs enabled in this CPU's
//! redistributor (its configuration and pending tables in the probe's BSS), the ITS's device
//! and collection tables and command queue set up, then per device a MAPD (with an ITT), a
//! MAPTI of event 0 to a fresh LPI and an INV, each batch ended by a SYNC. A virtio function's
//! MSI-X entry 0 then points at GITS_TRANSLATER with data 0, so its completion arrives as that
//! LPI only if the VMM's MSI route carries the function's requester id as the device id.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

/// The ITS (pocketvisor's arm64 layout, as the device tree's `msic` node says).
const GITS_BASE: u64 = 0x0808_0000;
const GITS_CTLR: u64 = 0x0;
const GITS_CTLR_ENABLED: u32 = 1;
const GITS_CBASER: u64 = 0x80;
const GITS_CWRITER: u64 = 0x88;
const GITS_CREADR: u64 = 0x90;
const GITS_BASER: u64 = 0x100;
/// GITS_TRANSLATER, in the ITS's second 64 KiB frame: the address MSIs are written to.
pub const GITS_TRANSLATER: u64 = GITS_BASE + 0x1_0040;

/// GITS_BASER<n>.Type: the device table and the collection table.
const BASER_TYPE_DEVICE: u64 = 1;
const BASER_TYPE_COLLECTION: u64 = 4;
const BASER_VALID: u64 = 1 << 63;
/// Page_Size field value for 64 KiB pages.
const BASER_PAGE_64K: u64 = 2 << 8;
const CBASER_VALID: u64 = 1 << 63;

/// Redistributor registers (RD frame).
const GICR_CTLR: usize = 0x0;
const GICR_CTLR_ENABLE_LPIS: u32 = 1;
const GICR_TYPER: usize = 0x8;
const GICR_TYPER_PLPIS: u64 = 1;
const GICR_PROPBASER: usize = 0x70;
const GICR_PENDBASER: usize = 0x78;

/// The first LPI INTID.
pub const LPI_BASE: u32 = 8192;
/// INTID bits the configuration table covers (INTIDs below 2^14: 8192 LPIs).
const ID_BITS: u32 = 14;
const LPIS: usize = (1 << ID_BITS) - LPI_BASE as usize;
/// An LPI's configuration byte: priority 0xa0, enabled.
const LPI_CONFIG: u8 = 0xa0 | 1;
/// Devices the probe maps (one ITT slot each).
const MAX_DEVICES: usize = 4;
/// Event id bits each ITT covers (2 events of 8 bytes: one 256-byte-aligned slot).
const ITT_EVENT_BITS: u64 = 1;
/// The collection every LPI goes to (routed to this CPU).
const COLLECTION: u64 = 0;
/// Commands in the queue (one 4 KiB page of 32-byte commands).
const QUEUE_COMMANDS: usize = 128;
/// Spin bound for the command queue to drain (each read is an exit).
const SPIN_LIMIT: u32 = 1_000_000;

#[repr(C, align(65536))]
struct Page64K([u8; 0x1_0000]);

/// The command queue (GITS_CBASER): 64 KiB aligned, since KVM clears address bits 12-15 of
/// what the guest writes there (the architecture asks only for 4 KiB).
#[repr(C, align(65536))]
struct Queue([[u64; 4]; QUEUE_COMMANDS]);

#[repr(C, align(4096))]
struct Tables {
    /// LPI configuration (one byte per LPI), GICR_PROPBASER.
    config: [u8; LPIS],
    /// Interrupt translation tables, 256 bytes per device.
    itt: [[u8; 256]; MAX_DEVICES],
}

/// The pending table (GICR_PENDBASER, 64 KiB aligned), the device and collection tables
/// (GITS_BASER, one 64 KiB page each).
static mut PENDING: Page64K = Page64K([0; 0x1_0000]);
static mut DEVICE_TABLE: Page64K = Page64K([0; 0x1_0000]);
static mut COLLECTION_TABLE: Page64K = Page64K([0; 0x1_0000]);
static mut QUEUE: Queue = Queue([[0; 4]; QUEUE_COMMANDS]);
static mut TABLES: Tables = Tables {
    config: [0; LPIS],
    itt: [[0; 256]; MAX_DEVICES],
};

static READY: AtomicBool = AtomicBool::new(false);
/// The next command slot.
static WRITE_SLOT: AtomicUsize = AtomicUsize::new(0);
/// Devices mapped so far (each got LPI `LPI_BASE + index`).
static MAPPED: AtomicU32 = AtomicU32::new(0);
/// This CPU's processor number (GICR_TYPER), MAPC's and SYNC's target.
static PROCESSOR: AtomicU32 = AtomicU32::new(0);

/// Why MSI-X through the ITS could not be set up.
#[derive(Debug, Clone, Copy)]
pub enum ItsError {
    /// The GIC itself did not come up.
    Gic(crate::gic::GicError),
    /// The redistributor does not support physical LPIs.
    NoLpis,
    /// No GITS_BASER of the device or collection type.
    NoTable,
    /// GITS_CTLR.Enabled stayed 0.
    NotEnabled,
    /// The command queue did not drain.
    QueueStuck,
    /// More devices than the probe has ITT slots for.
    TooManyDevices,
}

impl core::fmt::Display for ItsError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ItsError::Gic(e) => write!(f, "its-gic-{e}"),
            ItsError::NoLpis => f.write_str("its-no-lpis"),
            ItsError::NoTable => f.write_str("its-no-table"),
            ItsError::NotEnabled => f.write_str("its-not-enabled"),
            ItsError::QueueStuck => f.write_str("its-queue-stuck"),
            ItsError::TooManyDevices => f.write_str("its-too-many-devices"),
        }
    }
}

fn reg32(addr: u64) -> *mut u32 {
    #[allow(clippy::cast_possible_truncation)]
    let addr = addr as usize;
    addr as *mut u32
}

fn read32(addr: u64) -> u32 {
    // SAFETY: callers pass ITS or redistributor register addresses of the platform (device
    // memory, MMU off).
    unsafe { core::ptr::read_volatile(reg32(addr)) }
}

fn write32(addr: u64, v: u32) {
    // SAFETY: as in `read32`.
    unsafe { core::ptr::write_volatile(reg32(addr), v) }
}

fn read64(addr: u64) -> u64 {
    u64::from(read32(addr)) | (u64::from(read32(addr + 4)) << 32)
}

/// Writes a 64-bit register as two halves, low first (both access sizes are allowed).
fn write64(addr: u64, v: u64) {
    let [lo, hi] = [v & 0xffff_ffff, v >> 32].map(|h| u32::try_from(h).unwrap_or(0));
    write32(addr, lo);
    write32(addr + 4, hi);
}

/// Brings up the GIC, LPIs at this CPU and the ITS (once); later calls return at once.
pub fn init() -> Result<(), ItsError> {
    if READY.load(Ordering::SeqCst) {
        return Ok(());
    }
    crate::gic::init_distributor()
        .and_then(|()| crate::gic::init_cpu())
        .map_err(ItsError::Gic)?;
    let rd = crate::gic::my_redistributor()
        .ok_or(ItsError::Gic(crate::gic::GicError::NoRedistributor))? as u64;
    let typer = read64(rd + GICR_TYPER as u64);
    if typer & GICR_TYPER_PLPIS == 0 {
        return Err(ItsError::NoLpis);
    }
    PROCESSOR.store(
        u32::try_from((typer >> 8) & 0xffff).unwrap_or(0),
        Ordering::SeqCst,
    );
    // SAFETY: only addresses of the statics are taken; the boot CPU alone runs this.
    let (config, commands, pending, devices, collections) = unsafe {
        (
            core::ptr::addr_of_mut!(TABLES.config) as u64,
            core::ptr::addr_of_mut!(QUEUE) as u64,
            core::ptr::addr_of_mut!(PENDING) as u64,
            core::ptr::addr_of_mut!(DEVICE_TABLE) as u64,
            core::ptr::addr_of_mut!(COLLECTION_TABLE) as u64,
        )
    };
    // LPIs: the configuration table (IDbits - 1 in the low bits) and the zeroed pending
    // table, then EnableLPIs (the tables cannot change after it).
    write64(rd + GICR_PROPBASER as u64, config | u64::from(ID_BITS - 1));
    write64(rd + GICR_PENDBASER as u64, pending);
    write32(
        rd + GICR_CTLR as u64,
        read32(rd + GICR_CTLR as u64) | GICR_CTLR_ENABLE_LPIS,
    );
    // The ITS: its tables (one 64 KiB page each), the command queue, then enabled.
    write32(GITS_BASE + GITS_CTLR, 0);
    let mut have = (false, false);
    for n in 0..8 {
        let reg = GITS_BASE + GITS_BASER + 8 * n;
        let table = match (read64(reg) >> 56) & 7 {
            BASER_TYPE_DEVICE => {
                have.0 = true;
                devices
            }
            BASER_TYPE_COLLECTION => {
                have.1 = true;
                collections
            }
            _ => continue,
        };
        write64(reg, BASER_VALID | BASER_PAGE_64K | table);
    }
    if have != (true, true) {
        return Err(ItsError::NoTable);
    }
    write64(GITS_BASE + GITS_CBASER, CBASER_VALID | commands);
    write64(GITS_BASE + GITS_CWRITER, 0);
    write32(GITS_BASE + GITS_CTLR, GITS_CTLR_ENABLED);
    if read32(GITS_BASE + GITS_CTLR) & GITS_CTLR_ENABLED == 0 {
        return Err(ItsError::NotEnabled);
    }
    let target = u64::from(PROCESSOR.load(Ordering::SeqCst));
    // MAPC: collection 0 to this CPU, valid.
    command([0x09, 0, (1 << 63) | (target << 16) | COLLECTION, 0]);
    sync()?;
    READY.store(true, Ordering::SeqCst);
    crate::irq::install_vectors();
    crate::irq::enable();
    Ok(())
}

/// Queues one command (not yet processed: [`sync`] writes GITS_CWRITER).
fn command(words: [u64; 4]) {
    let slot = WRITE_SLOT.load(Ordering::SeqCst);
    // SAFETY: `slot` is below QUEUE_COMMANDS (kept so below); the boot CPU alone writes.
    let at = unsafe { core::ptr::addr_of_mut!(QUEUE.0[slot]) };
    for (i, w) in words.iter().enumerate() {
        // SAFETY: `at` is one 32-byte command of the queue in guest RAM.
        unsafe { core::ptr::write_volatile(at.cast::<u64>().add(i), *w) };
    }
    WRITE_SLOT.store((slot + 1) % QUEUE_COMMANDS, Ordering::SeqCst);
}

/// Appends a SYNC to this CPU, moves GITS_CWRITER past it and waits until the ITS has read
/// every command (GITS_CREADR == GITS_CWRITER).
fn sync() -> Result<(), ItsError> {
    let target = u64::from(PROCESSOR.load(Ordering::SeqCst));
    command([0x05, 0, target << 16, 0]);
    let offset = (WRITE_SLOT.load(Ordering::SeqCst) * 32) as u64;
    // SAFETY: a barrier so the commands are in memory before the ITS is told of them.
    unsafe { core::arch::asm!("dsb sy") };
    write64(GITS_BASE + GITS_CWRITER, offset);
    let drained = (0..SPIN_LIMIT).any(|_| read64(GITS_BASE + GITS_CREADR) & !0x1f == offset);
    if drained {
        Ok(())
    } else {
        Err(ItsError::QueueStuck)
    }
}

/// Maps PCI requester id `devid`'s event 0 to a fresh LPI (MAPD with its own ITT, MAPTI to
/// collection 0, INV); the LPI's INTID.
pub fn map_device(devid: u32) -> Result<u32, ItsError> {
    init()?;
    let index = MAPPED.load(Ordering::SeqCst) as usize;
    if index >= MAX_DEVICES {
        return Err(ItsError::TooManyDevices);
    }
    let intid = LPI_BASE + u32::try_from(index).unwrap_or(0);
    // SAFETY: only addresses of the statics are taken, and one config byte written (the
    // boot CPU alone touches the tables; `index` is below MAX_DEVICES and LPIS).
    let itt = unsafe {
        core::ptr::write_volatile(core::ptr::addr_of_mut!(TABLES.config[index]), LPI_CONFIG);
        core::ptr::addr_of_mut!(TABLES.itt[index]) as u64
    };
    let dev = u64::from(devid) << 32;
    command([0x08 | dev, ITT_EVENT_BITS - 1, (1 << 63) | itt, 0]);
    command([0x0a | dev, u64::from(intid) << 32, COLLECTION, 0]);
    command([0x0c | dev, 0, 0, 0]);
    sync()?;
    MAPPED.store(u32::try_from(index + 1).unwrap_or(0), Ordering::SeqCst);
    Ok(intid)
}

/// After a function's MSI did not arrive: prints `info its-debug ...` with the ITS's
/// registers, the CPU interface's highest pending interrupt and the interrupt counters, then
/// has the ITS itself raise the function's event 0 (an INT command) and says whether that
/// LPI arrived (`int=lpi`) or not (`int=none`): a missing MSI with `int=lpi` is the VMM's
/// route, with `int=none` the ITS or LPI setup.
pub fn diagnose(devid: u32) {
    let hppir: u64;
    let daif: u64;
    // SAFETY: reading ICC_HPPIR1_EL1 and DAIF has no side effect.
    unsafe {
        core::arch::asm!("mrs {}, S3_0_C12_C12_2", out(reg) hppir);
        core::arch::asm!("mrs {}, daif", out(reg) daif);
    }
    if let Some(rd) = crate::gic::my_redistributor() {
        let rd = rd as u64;
        // SAFETY: reading the first LPI's configuration byte (guest RAM).
        let config0 = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(TABLES.config[0])) };
        crate::uart::line(format_args!(
            "info its-debug gicr_ctlr={:x} propbaser={:x} pendbaser={:x} gicr_typer={:x} \
             config0={config0:x} processor={}",
            read32(rd + GICR_CTLR as u64),
            read64(rd + GICR_PROPBASER as u64),
            read64(rd + GICR_PENDBASER as u64),
            read64(rd + GICR_TYPER as u64),
            PROCESSOR.load(Ordering::SeqCst),
        ));
    }
    crate::uart::line(format_args!(
        "info its-debug ctlr={:x} baser0={:x} baser1={:x} cbaser={:x} creadr={:x} cwriter={:x} \
         hppir={hppir:x} daif={daif:x} lpis={} last_lpi={} other_irqs={}",
        read32(GITS_BASE + GITS_CTLR),
        read64(GITS_BASE + GITS_BASER),
        read64(GITS_BASE + GITS_BASER + 8),
        read64(GITS_BASE + GITS_CBASER),
        read64(GITS_BASE + GITS_CREADR),
        read64(GITS_BASE + GITS_CWRITER),
        crate::irq::lpis(),
        crate::irq::last_lpi(),
        crate::irq::other_irqs(),
    ));
    let before = crate::irq::lpis();
    command([0x03 | (u64::from(devid) << 32), 0, 0, 0]);
    let synced = sync().is_ok();
    let deadline = crate::counter() + crate::counter_hz();
    while crate::irq::lpis() == before && crate::counter() < deadline {}
    crate::uart::line(format_args!(
        "info its-int synced={} int={}",
        u8::from(synced),
        if crate::irq::lpis() == before {
            "none"
        } else {
            "lpi"
        }
    ));
}
