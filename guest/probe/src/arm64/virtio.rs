//! Virtio over PCI on arm64 and the `rng` and `blk` tests: a function driven through the
//! modern virtio-pci transport over ECAM, one split virtqueue of 8 entries in the probe's
//! BSS, and completion taken as an interrupt: the function's MSI-X entry 0 points at the
//! ITS's GITS_TRANSLATER with event 0, which `its` maps to an LPI for the function's
//! requester id (`irq=msix` in the tests' lines).
//!
//! With the MMU off every access is non-cacheable; that is coherent with the VMM's view of
//! guest RAM under the emulated L1 this runs in, not necessarily on hardware.

use crate::fdt::PciHost;
use crate::pci::{self, Function};

const VENDOR_VIRTIO: u32 = 0x1af4;
const DEVICE_RNG: u32 = 0x1044;
const DEVICE_BLK: u32 = 0x1042;
const CFG_DEVICE: u8 = 4;
const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CAP_MSIX: u8 = 0x11;
/// MSI-X Message Control (upper half of the capability's first dword): enable, function mask.
const MSIX_ENABLE: u32 = 1 << 31;
const MSIX_FUNCTION_MASK: u32 = 1 << 30;

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
const CONFIG_MSIX_VECTOR: u64 = 0x10;
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
/// Bytes the rng test asks for.
const WANT_LEN: u32 = 32;
const WANT: usize = WANT_LEN as usize;
/// The buffer's size (one 4 KiB block request).
const BUF_LEN: u32 = 4096;
const BUF: usize = BUF_LEN as usize;
/// VIRTQ_DESC_F_NEXT.
const DESC_NEXT: u16 = 1;
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
    /// A block request's header (16 bytes) and status byte.
    header: [u64; 3],
    buf: [u8; BUF],
}

static mut RING: Ring = Ring {
    desc: [0; 2 * QSIZE as usize],
    avail: [0; 3 + QSIZE as usize],
    _pad: [0; 1],
    used: [0; 1 + 2 * QSIZE as usize + 1],
    header: [0; 3],
    buf: [0; BUF],
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
    let result = Device::open(host, &f).and_then(|mut dev| {
        let got = dev.submit(&[(dev.buf, WANT_LEN, true)])?;
        let (hits, lpi) = (dev.hits, dev.lpi);
        if got as usize != WANT {
            return Err("short-read");
        }
        let mut out = [0u8; WANT];
        for (i, b) in out.iter_mut().enumerate() {
            *b = mmio_read::<u8>(dev.buf + i as u64);
        }
        Ok((out, hits, lpi))
    });
    match result {
        Ok((bytes, hits, lpi)) => {
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
            crate::uart::line(format_args!("rng irq=msix hits={hits} polled=0 lpi={lpi}"));
            true
        }
        Err(why) => {
            crate::uart::line(format_args!("rng fail {why}"));
            false
        }
    }
}

/// A virtio-pci function set up with queue 0, its completions taken as LPIs.
struct Device {
    common: u64,
    device_cfg: Option<u64>,
    doorbell: u64,
    desc: u64,
    avail: u64,
    used: u64,
    header: u64,
    buf: u64,
    /// The device's feature bits 0-31.
    features_lo: u32,
    /// Requests made so far (the avail index).
    made: u16,
    /// The LPI the function's MSI-X entry 0 is translated to.
    lpi: u32,
    /// Completions taken as that LPI.
    hits: u32,
    /// The function's requester id (its ITS device id).
    devid: u32,
}

impl Device {
    /// Resets `f`, points its MSI-X entry 0 at the ITS (event 0 of its requester id, mapped
    /// to a fresh LPI), negotiates VERSION_1 alone and enables queue 0 with 8 entries on
    /// vector 0.
    fn open(host: &PciHost, f: &Function) -> Result<Device, &'static str> {
        f.enable();
        let mut common = None;
        let mut notify = None;
        let mut device_cfg = None;
        let mut msix = None;
        for (id, cap) in f.caps() {
            if id == CAP_MSIX {
                msix = Some(cap);
            }
            if id != CAP_VENDOR {
                continue;
            }
            match f.read8(cap + 3) {
                CFG_COMMON => common = cap_window(host, f, cap),
                CFG_NOTIFY => {
                    notify = cap_window(host, f, cap).map(|(a, _)| (a, f.read32(cap + 16)));
                }
                CFG_DEVICE => device_cfg = cap_window(host, f, cap).map(|(a, _)| a),
                _ => {}
            }
        }
        let (common, common_len) = common.ok_or("no-common-cfg")?;
        if common_len < 0x38 {
            return Err("short-common-cfg");
        }
        let (notify, notify_mul) = notify.ok_or("no-notify-cfg")?;
        mmio_write::<u8>(common + DEVICE_STATUS, 0);
        let lpi = route_msix(host, f, msix.ok_or("no-msix")?)?;
        mmio_write::<u8>(common + DEVICE_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        mmio_write::<u32>(common + DEVICE_FEATURE_SELECT, 0);
        let features_lo = mmio_read::<u32>(common + DEVICE_FEATURE);
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
        if mmio_read::<u16>(common + QUEUE_SIZE) < QSIZE {
            return Err("queue-too-small");
        }
        let ring = core::ptr::addr_of_mut!(RING);
        // SAFETY: only the boot CPU's tests touch RING, one device at a time, and only
        // through raw field addresses.
        let (desc, avail, used, header, buf) = unsafe {
            (
                core::ptr::addr_of_mut!((*ring).desc) as u64,
                core::ptr::addr_of_mut!((*ring).avail) as u64,
                core::ptr::addr_of_mut!((*ring).used) as u64,
                core::ptr::addr_of_mut!((*ring).header) as u64,
                core::ptr::addr_of_mut!((*ring).buf) as u64,
            )
        };
        // A fresh ring: the indices start at 0.
        mmio_write::<u16>(avail + 2, 0);
        mmio_write::<u16>(used + 2, 0);
        mmio_write::<u16>(common + QUEUE_SIZE, QSIZE);
        mmio_write::<u16>(common + CONFIG_MSIX_VECTOR, NO_VECTOR);
        mmio_write::<u16>(common + QUEUE_MSIX_VECTOR, 0);
        if mmio_read::<u16>(common + QUEUE_MSIX_VECTOR) != 0 {
            return Err("msix-vector-refused");
        }
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
        Ok(Device {
            common,
            device_cfg,
            doorbell: notify + notify_off * u64::from(notify_mul),
            desc,
            avail,
            used,
            header,
            buf,
            features_lo,
            made: 0,
            lpi,
            hits: 0,
            devid: f.requester_id(),
        })
    }

    /// Posts one chain of (address, length, device-writable) buffers (at most the queue's
    /// size), rings the doorbell and waits for the function's LPI, then reads the used ring;
    /// the length the device wrote.
    fn submit(&mut self, chain: &[(u64, u32, bool)]) -> Result<u32, &'static str> {
        if chain.is_empty() || chain.len() > usize::from(QSIZE) {
            return Err("bad-chain");
        }
        for (i, &(addr, len, writable)) in chain.iter().enumerate() {
            let d = self.desc + 16 * i as u64;
            let mut flags = if writable { DESC_WRITE } else { 0 };
            let mut next = 0u16;
            if i + 1 < chain.len() {
                flags |= DESC_NEXT;
                next = u16::try_from(i + 1).unwrap_or(0);
            }
            mmio_write::<u64>(d, addr);
            mmio_write::<u32>(d + 8, len);
            mmio_write::<u16>(d + 12, flags);
            mmio_write::<u16>(d + 14, next);
        }
        let slot = u64::from(self.made % QSIZE);
        mmio_write::<u16>(self.avail + 4 + 2 * slot, 0);
        self.made = self.made.wrapping_add(1);
        // SAFETY: a barrier so the descriptors and ring entry are visible before the index.
        unsafe { core::arch::asm!("dsb sy") };
        mmio_write::<u16>(self.avail + 2, self.made);
        // SAFETY: a barrier so the index is visible before the doorbell.
        unsafe { core::arch::asm!("dsb sy") };
        let before = crate::irq::lpis();
        mmio_write::<u16>(self.doorbell, 0);
        let deadline = crate::counter() + WAIT_S * crate::counter_hz();
        while crate::irq::lpis() == before {
            if crate::counter() >= deadline {
                if mmio_read::<u16>(self.used + 2) != self.made {
                    return Err("timeout");
                }
                crate::its::diagnose(self.devid);
                return Err("no-lpi");
            }
        }
        if crate::irq::last_lpi() != u64::from(self.lpi) {
            return Err("wrong-lpi");
        }
        self.hits += 1;
        if mmio_read::<u16>(self.used + 2) != self.made {
            return Err("lpi-before-completion");
        }
        // SAFETY: as above: the index before the entry.
        unsafe { core::arch::asm!("dsb sy") };
        let entry = self.used + 4 + 8 * u64::from((self.made.wrapping_sub(1)) % QSIZE);
        if mmio_read::<u32>(entry) != 0 {
            return Err("bad-used-id");
        }
        Ok(mmio_read::<u32>(entry + 4))
    }
}

/// Maps `f`'s requester id in the ITS, points MSI-X entry 0 at GITS_TRANSLATER with event 0,
/// unmasked, and enables MSI-X with the function unmasked; the LPI it becomes.
fn route_msix(host: &PciHost, f: &Function, cap: u16) -> Result<u32, &'static str> {
    let table = f.read32(cap + 4);
    let bar = u16::try_from(table & 7).unwrap_or(7);
    let (base, _) = f.bar(bar).ok_or("msix-bar")?;
    let entry = base
        .checked_add(u64::from(table & !7))
        .filter(|&a| host.in_windows(a, 16))
        .ok_or("msix-table-outside-ranges")?;
    let lpi = crate::its::map_device(f.requester_id()).map_err(|e| {
        crate::uart::line(format_args!("info its-error={e}"));
        "its"
    })?;
    let [lo, hi] = [
        crate::its::GITS_TRANSLATER & 0xffff_ffff,
        crate::its::GITS_TRANSLATER >> 32,
    ]
    .map(|h| u32::try_from(h).unwrap_or(0));
    mmio_write::<u32>(entry, lo);
    mmio_write::<u32>(entry + 4, hi);
    mmio_write::<u32>(entry + 8, 0);
    mmio_write::<u32>(entry + 12, 0);
    let control = f.read32(cap);
    f.write32(cap, (control | MSIX_ENABLE) & !MSIX_FUNCTION_MASK);
    Ok(lpi)
}

impl Drop for Device {
    fn drop(&mut self) {
        mmio_write::<u8>(self.common + DEVICE_STATUS, 0);
    }
}

const BLK_T_IN: u32 = 0;
const BLK_T_OUT: u32 = 1;
const BLK_S_OK: u8 = 0;
/// VIRTIO_BLK_F_RO.
const BLK_F_RO: u32 = 1 << 5;

/// One block request over the buffer's first `len` bytes; the status byte.
fn blk_request(dev: &mut Device, kind: u32, sector: u64, len: u32) -> Result<u8, &'static str> {
    mmio_write::<u32>(dev.header, kind);
    mmio_write::<u32>(dev.header + 4, 0);
    mmio_write::<u64>(dev.header + 8, sector);
    mmio_write::<u8>(dev.header + 16, 0xff);
    let chain = [
        (dev.header, 16, false),
        (dev.buf, len, kind == BLK_T_IN),
        (dev.header + 16, 1, true),
    ];
    dev.submit(&chain)?;
    Ok(mmio_read::<u8>(dev.header + 16))
}

/// The x86 probe's write pattern: `pocketvisor-probe-blk:<sector>\n` repeated.
fn pattern_byte(sector: u64, i: usize) -> u8 {
    let mut line = [0u8; 48];
    let prefix = b"pocketvisor-probe-blk:";
    line[..prefix.len()].copy_from_slice(prefix);
    let mut n = prefix.len();
    let mut digits = [0u8; 20];
    let mut d = 0;
    let mut v = sector;
    loop {
        digits[d] = b'0' + (v % 10).to_le_bytes()[0];
        d += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for k in (0..d).rev() {
        line[n] = digits[k];
        n += 1;
    }
    line[n] = b'\n';
    n += 1;
    line[i % n]
}

/// The `blk` test: `blk ok capacity=<sectors> ro=<0|1> sector0_fnv=<hex16> id="" [wrote=<s>]`
/// (no GET_ID on arm64 yet: `id` is empty) and `blk irq=poll hits=0 polled=<n>`; with
/// `pv.blk.write=<sector>` 4096 bytes of the x86 pattern are written there and read back.
/// `blk skip no-device`, or `blk fail <why>`; false when it failed.
pub fn blk_selftest(host: &PciHost, write_sector: Option<u64>) -> bool {
    let mut found = None;
    pci::for_each_function(host, |f, id| {
        if found.is_none() && id == (DEVICE_BLK << 16) | VENDOR_VIRTIO {
            found = Some(f);
        }
    });
    let Some(f) = found else {
        crate::uart::line(format_args!("blk skip no-device"));
        return true;
    };
    let result = Device::open(host, &f).and_then(|mut dev| {
        let cfg = dev.device_cfg.ok_or("no-device-cfg")?;
        let capacity = mmio_read::<u32>(cfg) as u64 | (u64::from(mmio_read::<u32>(cfg + 4)) << 32);
        let ro = dev.features_lo & BLK_F_RO != 0;
        if blk_request(&mut dev, BLK_T_IN, 0, 512)? != BLK_S_OK {
            return Err("read-status");
        }
        let mut fnv: u64 = 0xcbf2_9ce4_8422_2325;
        for i in 0..512u64 {
            fnv ^= u64::from(mmio_read::<u8>(dev.buf + i));
            fnv = fnv.wrapping_mul(0x0100_0000_01b3);
        }
        let mut wrote = None;
        if let Some(sector) = write_sector {
            if sector.saturating_add(8) > capacity {
                return Err("write-beyond-capacity");
            }
            for i in 0..BUF {
                mmio_write::<u8>(dev.buf + i as u64, pattern_byte(sector, i));
            }
            let st = blk_request(&mut dev, BLK_T_OUT, sector, BUF_LEN)?;
            if ro {
                if st == BLK_S_OK {
                    return Err("ro-write-accepted");
                }
                crate::uart::line(format_args!("blk ro-refused ok"));
            } else {
                if st != BLK_S_OK {
                    return Err("write-status");
                }
                for i in 0..BUF {
                    mmio_write::<u8>(dev.buf + i as u64, 0);
                }
                if blk_request(&mut dev, BLK_T_IN, sector, BUF_LEN)? != BLK_S_OK {
                    return Err("read-status");
                }
                if (0..BUF).any(|i| mmio_read::<u8>(dev.buf + i as u64) != pattern_byte(sector, i))
                {
                    return Err("readback-mismatch");
                }
                wrote = Some(sector);
            }
        }
        Ok((capacity, ro, fnv, wrote, dev.hits, dev.lpi))
    });
    match result {
        Ok((capacity, ro, fnv, wrote, hits, lpi)) => {
            let ro = u8::from(ro);
            match wrote {
                Some(s) => crate::uart::line(format_args!(
                    "blk ok capacity={capacity} ro={ro} sector0_fnv={fnv:016x} id=\"\" wrote={s}"
                )),
                None => crate::uart::line(format_args!(
                    "blk ok capacity={capacity} ro={ro} sector0_fnv={fnv:016x} id=\"\""
                )),
            }
            crate::uart::line(format_args!("blk irq=msix hits={hits} polled=0 lpi={lpi}"));
            true
        }
        Err(why) => {
            crate::uart::line(format_args!("blk fail {why}"));
            false
        }
    }
}
