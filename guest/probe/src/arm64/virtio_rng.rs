//! The `rng` test on arm64: the virtio-rng function (1af4:1044) driven through the modern
//! virtio-pci transport over ECAM, one split virtqueue of 8 entries in the probe's BSS, and
//! completion noticed by polling the used ring (no MSI-X through the ITS yet).
//!
//! With the MMU off every access is non-cacheable; that is coherent with the VMM's view of
//! guest RAM under the emulated L1 this runs in, not necessarily on hardware.

use crate::fdt::PciHost;
use crate::pci::{self, Function};

const VENDOR_VIRTIO: u32 = 0x1af4;
const DEVICE_RNG: u32 = 0x1044;
const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;

const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;

// Common configuration offsets (virtio 1.1, 4.1.4.3).
const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
const NO_VECTOR: u16 = 0xffff;

/// Entries of the probe's queue.
const QSIZE: u16 = 8;
/// Bytes asked for.
const WANT: usize = 32;
/// VIRTQ_DESC_F_WRITE.
const DESC_WRITE: u16 = 2;
/// How long a request may take, in seconds of the counter.
const WAIT_S: u64 = 3;

/// The queue's rings and the buffer, in the probe's BSS (guest RAM).
#[repr(C, align(4096))]
struct Ring {
    desc: [u64; 2 * QSIZE as usize],
    avail: [u16; 3 + QSIZE as usize],
    _pad: [u16; 1],
    used: [u32; 1 + 2 * QSIZE as usize + 1],
    buf: [u8; WANT],
}

static mut RING: Ring = Ring {
    desc: [0; 2 * QSIZE as usize],
    avail: [0; 3 + QSIZE as usize],
    _pad: [0; 1],
    used: [0; 1 + 2 * QSIZE as usize + 1],
    buf: [0; WANT],
};

fn mmio_read<T: Copy>(addr: u64) -> T {
    #[allow(clippy::cast_possible_truncation)]
    let addr = addr as usize;
    // SAFETY: callers pass addresses inside a BAR window the device's capability named, which
    // the pci test checked against the device tree's ranges; device memory, MMU off.
    unsafe { core::ptr::read_volatile(addr as *const T) }
}

fn mmio_write<T: Copy>(addr: u64, v: T) {
    #[allow(clippy::cast_possible_truncation)]
    let addr = addr as usize;
    // SAFETY: as in `mmio_read`.
    unsafe { core::ptr::write_volatile(addr as *mut T, v) }
}

/// The address a capability's (bar, offset) names, if the BAR is assigned inside the
/// bridge's windows, with the capability's length.
fn cap_window(host: &PciHost, f: &Function, cap: u16) -> Option<(u64, u32)> {
    let bar = u16::from(f.read8(cap + 4));
    let off = u64::from(f.read32(cap + 8));
    let len = f.read32(cap + 12);
    let (base, _) = f.bar(bar)?;
    let addr = base.checked_add(off)?;
    host.in_windows(addr, u64::from(len)).then_some((addr, len))
}

/// The `rng` test: `rng ok bytes=<hex64>` and `rng irq=poll hits=0 polled=<n>`, `rng skip
/// no-device`, or `rng fail <why>`; false when it failed.
pub fn selftest(host: &PciHost) -> bool {
    let mut found = None;
    pci::for_each_function(host, |f, id| {
        if found.is_none() && id == (DEVICE_RNG << 16) | VENDOR_VIRTIO {
            found = Some(f);
        }
    });
    let Some(f) = found else {
        crate::uart::line(format_args!("rng skip no-device"));
        return true;
    };
    match read_random(host, &f) {
        Ok(bytes) => {
            if bytes.iter().all(|&b| b == bytes[0]) {
                crate::uart::line(format_args!("rng fail constant-bytes"));
                return false;
            }
            let mut hex = [0u8; 2 * WANT];
            for (i, b) in bytes.iter().enumerate() {
                hex[2 * i] = b"0123456789abcdef"[usize::from(b >> 4)];
                hex[2 * i + 1] = b"0123456789abcdef"[usize::from(b & 15)];
            }
            let hex = core::str::from_utf8(&hex).unwrap_or("");
            crate::uart::line(format_args!("rng ok bytes={hex}"));
            crate::uart::line(format_args!("rng irq=poll hits=0 polled=1"));
            true
        }
        Err(why) => {
            crate::uart::line(format_args!("rng fail {why}"));
            false
        }
    }
}

fn read_random(host: &PciHost, f: &Function) -> Result<[u8; WANT], &'static str> {
    f.enable();
    let mut common = None;
    let mut notify = None;
    for (id, cap) in f.caps() {
        if id != CAP_VENDOR {
            continue;
        }
        match f.read8(cap + 3) {
            CFG_COMMON => common = cap_window(host, f, cap),
            CFG_NOTIFY => {
                notify = cap_window(host, f, cap).map(|(a, _)| (a, f.read32(cap + 16)));
            }
            _ => {}
        }
    }
    let (common, common_len) = common.ok_or("no-common-cfg")?;
    if common_len < 0x38 {
        return Err("short-common-cfg");
    }
    let (notify, notify_mul) = notify.ok_or("no-notify-cfg")?;
    mmio_write::<u8>(common + DEVICE_STATUS, 0);
    mmio_write::<u8>(common + DEVICE_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    mmio_write::<u32>(common + DEVICE_FEATURE_SELECT, 1);
    if mmio_read::<u32>(common + DEVICE_FEATURE) & 1 == 0 {
        return Err("no-version-1");
    }
    mmio_write::<u32>(common + DRIVER_FEATURE_SELECT, 0);
    mmio_write::<u32>(common + DRIVER_FEATURE, 0);
    mmio_write::<u32>(common + DRIVER_FEATURE_SELECT, 1);
    mmio_write::<u32>(common + DRIVER_FEATURE, 1);
    let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    mmio_write::<u8>(common + DEVICE_STATUS, s);
    if mmio_read::<u8>(common + DEVICE_STATUS) & STATUS_FEATURES_OK == 0 {
        return Err("features-refused");
    }
    mmio_write::<u16>(common + QUEUE_SELECT, 0);
    let max = mmio_read::<u16>(common + QUEUE_SIZE);
    if max < QSIZE {
        return Err("queue-too-small");
    }
    let ring = core::ptr::addr_of_mut!(RING);
    // SAFETY: only this function touches RING, on the boot CPU; raw field addresses only.
    let (desc, avail, used, buf) = unsafe {
        (
            core::ptr::addr_of_mut!((*ring).desc) as u64,
            core::ptr::addr_of_mut!((*ring).avail) as u64,
            core::ptr::addr_of_mut!((*ring).used) as u64,
            core::ptr::addr_of_mut!((*ring).buf) as u64,
        )
    };
    mmio_write::<u16>(common + QUEUE_SIZE, QSIZE);
    mmio_write::<u16>(common + QUEUE_MSIX_VECTOR, NO_VECTOR);
    for (reg, addr) in [
        (QUEUE_DESC, desc),
        (QUEUE_DRIVER, avail),
        (QUEUE_DEVICE, used),
    ] {
        let [lo, hi] = [addr & 0xffff_ffff, addr >> 32].map(|h| u32::try_from(h).unwrap_or(0));
        mmio_write::<u32>(common + reg, lo);
        mmio_write::<u32>(common + reg + 4, hi);
    }
    let notify_off = u64::from(mmio_read::<u16>(common + QUEUE_NOTIFY_OFF));
    mmio_write::<u16>(common + QUEUE_ENABLE, 1);
    mmio_write::<u8>(common + DEVICE_STATUS, s | STATUS_DRIVER_OK);
    // One device-writable descriptor over the buffer, made available as entry 0.
    mmio_write::<u64>(desc, buf);
    mmio_write::<u64>(desc + 8, WANT as u64 | (u64::from(DESC_WRITE) << 32));
    mmio_write::<u16>(avail + 4, 0);
    // SAFETY: a barrier so the descriptor and ring entry are visible before the index.
    unsafe { core::arch::asm!("dsb sy") };
    mmio_write::<u16>(avail + 2, 1);
    // SAFETY: a barrier so the index is visible before the doorbell.
    unsafe { core::arch::asm!("dsb sy") };
    let doorbell = notify + notify_off * u64::from(notify_mul);
    mmio_write::<u16>(doorbell, 0);
    let deadline = crate::counter() + WAIT_S * crate::counter_hz();
    while mmio_read::<u16>(used + 2) == 0 {
        if crate::counter() >= deadline {
            return Err("timeout");
        }
    }
    // SAFETY: as above: the index before the entry.
    unsafe { core::arch::asm!("dsb sy") };
    let len = mmio_read::<u32>(used + 8);
    if len as usize != WANT {
        mmio_write::<u8>(common + DEVICE_STATUS, 0);
        return Err("short-read");
    }
    let mut out = [0u8; WANT];
    for (i, b) in out.iter_mut().enumerate() {
        *b = mmio_read::<u8>(buf + i as u64);
    }
    mmio_write::<u8>(common + DEVICE_STATUS, 0);
    Ok(out)
}
