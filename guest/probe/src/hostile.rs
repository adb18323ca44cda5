//! Hostile mode: malformed requests and register writes against the block device, the
//! entropy device and PCI config space. After each case the probe reports what the
//! device did and re-initialises it; finally a normal read of sector 0 must work.
//! Only reads (VIRTIO_BLK_T_IN) are ever submitted: hostile mode never writes the disk.

use crate::pci::{self, Bdf};
use crate::port::mmio;
use crate::virtio::blk::{Blk, S_OK, T_IN};
use crate::virtio::pci::{common, VirtioPci, NO_VECTOR};
use crate::virtio::queue::{Queue, Wait, DESC_INDIRECT, DESC_NEXT, DESC_WRITE};
use crate::virtio::rng::Rng;
use crate::{fail, mem, probe};

/// A guest-physical address far beyond any RAM the probe runs with (512 GiB).
const BEYOND_RAM: u64 = 0x80_0000_0000;
/// A RAM page nobody uses, as the target of the huge-length descriptor.
const SACRIFICE: u64 = mem::ARENA_END - 4096;

/// What the device did with a hostile case.
#[derive(Clone, Copy)]
enum Outcome {
    /// Completed the request with an error status, or refused the register value.
    Error,
    /// Set DEVICE_NEEDS_RESET.
    Reset,
    /// Nothing observable (no completion, write had no effect).
    Ignored,
    /// Completed with success / kept the value written.
    Accepted,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Error => "error",
            Outcome::Reset => "reset",
            Outcome::Ignored => "ignored",
            Outcome::Accepted => "accepted",
        }
    }
}

/// Runs hostile mode.
pub fn run() {
    let mut blk = match Blk::open(0) {
        Ok(Some(b)) => b,
        Ok(None) => return fail("hostile", format_args!("no-blk-device")),
        Err(e) => return fail("hostile", format_args!("init {e}")),
    };
    let buf = mem::alloc(64 * 1024, 4096);

    blk_case(&mut blk, "desc-beyond-ram", |q, s| {
        read_chain(q, s, BEYOND_RAM, 512, DESC_WRITE);
    });
    blk_case(&mut blk, "desc-loop", |q, s| {
        q.write_desc(0, s, 16, DESC_NEXT, 0);
        q.publish(0);
    });
    blk_case(&mut blk, "hdr-writable", |q, s| {
        q.write_desc(0, s, 16, DESC_WRITE | DESC_NEXT, 1);
        q.write_desc(1, buf, 512, DESC_WRITE | DESC_NEXT, 2);
        q.write_desc(2, s + 16, 1, DESC_WRITE, 0);
        q.publish(0);
    });
    blk_case(&mut blk, "len-ffffffff", |q, s| {
        read_chain(q, s, SACRIFICE, 0xFFFF_FFFF, DESC_WRITE);
    });
    blk_case(&mut blk, "chain-too-long", |q, s| {
        let n = q.size;
        q.write_desc(0, s, 16, DESC_NEXT, 1);
        for i in 1..n {
            q.write_desc(i, buf, 512, DESC_WRITE | DESC_NEXT, (i + 1) % n);
        }
        q.publish(0);
    });
    blk_case(&mut blk, "avail-jump", |q, s| {
        read_chain(q, s, buf, 512, DESC_WRITE);
        let idx = mmio::read::<u16>(q.avail_addr() + 2);
        q.set_avail_idx_raw(idx.wrapping_add(5000));
    });
    blk_case(&mut blk, "indirect-bad-len", |q, s| {
        let table = buf + 32 * 1024;
        write_raw_desc(table, s, 16, DESC_NEXT, 1);
        write_raw_desc(table + 16, buf, 512, DESC_WRITE | DESC_NEXT, 2);
        write_raw_desc(table + 32, s + 16, 1, DESC_WRITE, 0);
        q.write_desc(0, table, 17, DESC_INDIRECT, 0);
        q.publish(0);
    });
    qsize_not_pow2(&mut blk);
    qselect_range(&mut blk);
    msix_vector_range(&mut blk);
    pci_cases(&mut blk);

    match Rng::open() {
        Ok(Some(mut rng)) => rng_cases(&mut rng, buf),
        Ok(None) => probe!("hostile rng skip no-device"),
        Err(e) => fail("hostile", format_args!("rng-init {e}")),
    }

    match blk.reinit().and_then(|_| blk.sector0_fnv()) {
        Ok(h) => probe!("hostile done ok sector0_fnv={h:016x}"),
        Err(e) => fail("hostile", format_args!("final-read {e}")),
    }
}

fn write_raw_desc(at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    mmio::write::<u64>(at, addr);
    mmio::write::<u32>(at + 8, len);
    mmio::write::<u16>(at + 12, flags);
    mmio::write::<u16>(at + 14, next);
}

/// Header (IN, sector 0) at `s`, one data descriptor, status at `s + 16`; published.
fn read_chain(q: &mut Queue, s: u64, data: u64, len: u32, data_flags: u16) {
    q.write_desc(0, s, 16, DESC_NEXT, 1);
    q.write_desc(1, data, len, data_flags | DESC_NEXT, 2);
    q.write_desc(2, s + 16, 1, DESC_WRITE, 0);
    q.publish(0);
}

/// Waits for the device's reaction to what was just kicked.
fn observe(dev: &VirtioPci, q: &mut Queue, status_at: Option<u64>) -> Outcome {
    let dl = crate::time::deadline_ms(1000);
    let w = loop {
        let w = q.wait_used(5);
        if w != Wait::Timeout || dev.needs_reset() || crate::time::expired(dl) {
            break w;
        }
    };
    if dev.needs_reset() {
        return Outcome::Reset;
    }
    match (w, status_at) {
        (Wait::Timeout, _) => Outcome::Ignored,
        (_, Some(s)) if mmio::read::<u8>(s) == S_OK => Outcome::Accepted,
        (_, Some(_)) => Outcome::Error,
        // No status byte (rng): an empty completion is a refusal.
        (_, None) => match q.pop_used() {
            Some((_, len)) if len > 0 => Outcome::Accepted,
            _ => Outcome::Error,
        },
    }
}

fn survived(blk: &mut Blk, name: &str, o: Outcome) {
    match blk.reinit() {
        Ok(()) => probe!("hostile blk-{name} survived status={}", o.name()),
        Err(e) => fail("hostile", format_args!("blk-{name} reinit {e}")),
    }
}

fn blk_case(blk: &mut Blk, name: &str, build: impl FnOnce(&mut Queue, u64)) {
    probe!("hostile blk-{name} sent");
    let s = blk.scratch;
    mmio::write::<u32>(s, T_IN);
    mmio::write::<u32>(s + 4, 0);
    mmio::write::<u64>(s + 8, 0);
    mmio::write::<u8>(s + 16, 0xFF);
    build(&mut blk.q, s);
    blk.q.kick();
    let o = observe(&blk.dev, &mut blk.q, Some(s + 16));
    survived(blk, name, o);
}

fn qsize_not_pow2(blk: &mut Blk) {
    probe!("hostile blk-qsize-not-pow2 sent");
    let d = &mut blk.dev;
    let o = match d.begin_init(0) {
        Err(e) => return fail("hostile", format_args!("blk-qsize-not-pow2 init {e}")),
        Ok(_) => {
            d.common_write::<u16>(common::QUEUE_SELECT, 0);
            d.common_write::<u16>(common::QUEUE_SIZE, 3);
            let kept = d.common_read::<u16>(common::QUEUE_SIZE) == 3;
            // Go on as if size 3 were fine and submit one read.
            let mut q = Queue::new(0, 3, 0, None);
            let notify = match d.setup_queue_raw(&q) {
                Some(n) => n,
                None => return fail("hostile", format_args!("blk-qsize-not-pow2 setup")),
            };
            q.set_notify(notify);
            d.driver_ok();
            let s = blk.scratch;
            mmio::write::<u32>(s, T_IN);
            mmio::write::<u64>(s + 8, 0);
            mmio::write::<u8>(s + 16, 0xFF);
            read_chain(&mut q, s, s + 512, 512, DESC_WRITE);
            q.kick();
            match observe(d, &mut q, Some(s + 16)) {
                Outcome::Accepted if !kept => Outcome::Error,
                o => o,
            }
        }
    };
    survived(blk, "qsize-not-pow2", o);
}

fn qselect_range(blk: &mut Blk) {
    probe!("hostile blk-qselect-range sent");
    let d = &blk.dev;
    let sel = d.num_queues().wrapping_add(7);
    d.common_write::<u16>(common::QUEUE_SELECT, sel);
    let size = d.common_read::<u16>(common::QUEUE_SIZE);
    d.common_write::<u16>(common::QUEUE_SIZE, 64);
    d.write_addr(common::QUEUE_DESC, BEYOND_RAM);
    d.common_write::<u16>(common::QUEUE_ENABLE, 1);
    d.common_write::<u16>(common::QUEUE_SELECT, 0xFFFF);
    let size2 = d.common_read::<u16>(common::QUEUE_SIZE);
    d.common_write::<u16>(common::QUEUE_SELECT, 0);
    let o = if d.needs_reset() {
        Outcome::Reset
    } else if size == 0 && size2 == 0 {
        Outcome::Ignored
    } else {
        Outcome::Accepted
    };
    // The live queue 0 must still work.
    if let Err(e) = blk.read(0, 512) {
        probe!("hostile blk-qselect-range note read-after {e}");
    }
    survived(blk, "qselect-range", o);
}

fn msix_vector_range(blk: &mut Blk) {
    probe!("hostile blk-msix-vector-range sent");
    let d = &blk.dev;
    let bad = d.msix_entries().saturating_add(100).max(0x7FF);
    d.common_write::<u16>(common::QUEUE_SELECT, 0);
    let before = d.common_read::<u16>(common::QUEUE_MSIX_VECTOR);
    d.common_write::<u16>(common::QUEUE_MSIX_VECTOR, bad);
    let q = d.common_read::<u16>(common::QUEUE_MSIX_VECTOR);
    d.common_write::<u16>(common::MSIX_CONFIG, bad);
    let c = d.common_read::<u16>(common::MSIX_CONFIG);
    let o = if d.needs_reset() {
        Outcome::Reset
    } else if q == bad || c == bad {
        Outcome::Accepted
    } else if q == NO_VECTOR && c == NO_VECTOR {
        Outcome::Error
    } else if q == before {
        Outcome::Ignored
    } else {
        Outcome::Error
    };
    // A request must still complete (by interrupt or polling).
    if let Err(e) = blk.read(0, 512) {
        probe!("hostile blk-msix-vector-range note read-after {e}");
    }
    survived(blk, "msix-vector-range", o);
}

fn pci_cases(blk: &mut Blk) {
    let b = blk.dev.bdf;

    probe!("hostile pci-vendor-write sent");
    let id = pci::read32(b, 0);
    pci::write32(b, 0, 0xDEAD_BEEF);
    let o = if pci::read32(b, 0) == id {
        Outcome::Ignored
    } else {
        Outcome::Accepted
    };
    probe!("hostile pci-vendor-write survived status={}", o.name());

    probe!("hostile pci-nodev-write sent");
    let empty = (1..32u8)
        .rev()
        .map(|dev| Bdf {
            bus: 0,
            dev,
            func: 0,
        })
        .find(|&n| pci::read32(n, 0) & 0xFFFF == 0xFFFF);
    let o = match empty {
        Some(n) => {
            pci::write32(n, 0x04, 0x0000_0007);
            pci::write32(n, 0x10, 0xFFFF_FFFF);
            pci::write32(n, 0x00, 0x1234_5678);
            if pci::read32(n, 0) == 0xFFFF_FFFF && pci::read32(n, 0x10) == 0xFFFF_FFFF {
                Outcome::Ignored
            } else {
                Outcome::Accepted
            }
        }
        None => Outcome::Ignored,
    };
    probe!("hostile pci-nodev-write survived status={}", o.name());

    probe!("hostile pci-bar-garbage sent");
    let bar = 0x10 + 4 * blk.dev.common_bar.min(5);
    let lo = pci::read32(b, bar);
    let is64 = (lo >> 1) & 3 == 2 && bar < 0x24;
    let hi = if is64 { pci::read32(b, bar + 4) } else { 0 };
    pci::write32(b, bar, 0x1234_5670);
    if is64 {
        pci::write32(b, bar + 4, 0xDEAD_BEEF);
    }
    let changed = pci::read32(b, bar) != lo || (is64 && pci::read32(b, bar + 4) != hi);
    pci::write32(b, bar, lo);
    if is64 {
        pci::write32(b, bar + 4, hi);
    }
    let restored = pci::read32(b, bar) == lo && (!is64 || pci::read32(b, bar + 4) == hi);
    if !restored {
        return fail("hostile", format_args!("pci-bar-garbage restore"));
    }
    let o = if changed {
        Outcome::Accepted
    } else {
        Outcome::Ignored
    };
    survived_pci(blk, "pci-bar-garbage", o);
}

fn survived_pci(blk: &mut Blk, name: &str, o: Outcome) {
    match blk.reinit() {
        Ok(()) => probe!("hostile {name} survived status={}", o.name()),
        Err(e) => fail("hostile", format_args!("{name} reinit {e}")),
    }
}

fn rng_cases(rng: &mut Rng, buf: u64) {
    type Build = fn(&mut Queue, u64);
    let cases: [(&str, Build); 3] = [
        ("desc-beyond-ram", |q, _| {
            q.write_desc(0, BEYOND_RAM, 64, DESC_WRITE, 0);
            q.publish(0);
        }),
        ("desc-loop", |q, b| {
            q.write_desc(0, b, 64, DESC_WRITE | DESC_NEXT, 0);
            q.publish(0);
        }),
        ("avail-jump", |q, b| {
            q.write_desc(0, b, 64, DESC_WRITE, 0);
            q.publish(0);
            let idx = mmio::read::<u16>(q.avail_addr() + 2);
            q.set_avail_idx_raw(idx.wrapping_add(5000));
        }),
    ];
    for (name, build) in cases {
        probe!("hostile rng-{name} sent");
        build(&mut rng.q, buf);
        rng.q.kick();
        let o = observe(&rng.dev, &mut rng.q, None);
        match rng.reinit() {
            Ok(()) => probe!("hostile rng-{name} survived status={}", o.name()),
            Err(e) => fail("hostile", format_args!("rng-{name} reinit {e}")),
        }
    }
    let mut b = [0u8; 32];
    if let Err(e) = rng.fill(&mut b) {
        fail("hostile", format_args!("rng-after {e}"));
    }
}
