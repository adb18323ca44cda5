//! virtio-blk driver and the `blk` selftest part.

use super::pci::VirtioPci;
use super::queue::{Buf, Queue, Wait};
use crate::{fail, mem, probe, pvh};

/// Virtio type of block devices.
pub const TYPE: u16 = 2;
/// VIRTIO_BLK_F_RO.
pub const F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_FLUSH.
pub const F_FLUSH: u64 = 1 << 9;

/// Request types.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush.
pub const T_FLUSH: u32 = 4;
/// Get device id (20 bytes).
pub const T_GET_ID: u32 = 8;

/// Status: success.
pub const S_OK: u8 = 0;
/// Status: I/O error.
pub const S_IOERR: u8 = 1;
/// Status: unsupported.
pub const S_UNSUPP: u8 = 2;

/// An initialised block device with one request queue.
pub struct Blk {
    /// Transport.
    pub dev: VirtioPci,
    /// Request queue 0.
    pub q: Queue,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Read-only.
    pub ro: bool,
    /// Scratch: 16-byte header at +0, status byte at +16, data from +512.
    pub scratch: u64,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX when offered (blk-bench; off for the selftest
    /// and hostile mode, whose raw ring writes bypass the driver's indices).
    pub want_event_idx: bool,
}

/// Size of the data part of the scratch buffer.
pub const SCRATCH_DATA: u64 = 64 * 1024;

impl Blk {
    /// Finds the `nth` block device and initialises it.
    pub fn open(nth: usize) -> Result<Option<Blk>, &'static str> {
        let Some(f) = super::pci::find(TYPE, nth) else {
            return Ok(None);
        };
        let dev = VirtioPci::new(&f)?;
        let scratch = mem::alloc(512 + SCRATCH_DATA, 4096);
        let mut b = Blk {
            q: Queue::new(0, 1, 0, None),
            dev,
            capacity: 0,
            ro: false,
            scratch,
            want_event_idx: false,
        };
        b.reinit()?;
        Ok(Some(b))
    }

    /// Like [`Blk::open`], negotiating VIRTIO_RING_F_EVENT_IDX if the device offers it.
    pub fn open_event_idx(nth: usize) -> Result<Option<Blk>, &'static str> {
        let Some(mut b) = Blk::open(nth)? else {
            return Ok(None);
        };
        b.want_event_idx = true;
        b.reinit()?;
        Ok(Some(b))
    }

    /// Whether VIRTIO_RING_F_EVENT_IDX is in use.
    pub fn event_idx(&self) -> bool {
        self.dev.features & super::pci::F_EVENT_IDX != 0
    }

    /// Resets and re-initialises the device (also used after hostile cases).
    pub fn reinit(&mut self) -> Result<(), &'static str> {
        let mut wanted = F_RO | F_FLUSH | super::pci::F_INDIRECT_DESC;
        if self.want_event_idx {
            wanted |= super::pci::F_EVENT_IDX;
        }
        let feats = self.dev.begin_init(wanted)?;
        self.q = self.dev.setup_queue(0, 128)?;
        if feats & super::pci::F_EVENT_IDX != 0 {
            self.q.enable_event_idx();
        }
        self.dev.driver_ok();
        self.capacity = self.dev.config::<u64>(0);
        self.ro = feats & F_RO != 0;
        Ok(())
    }

    /// Whether FLUSH was negotiated.
    pub fn has_flush(&self) -> bool {
        self.dev.features & F_FLUSH != 0
    }

    /// Issues one request and waits for it. `data` is device-readable for OUT, writable
    /// otherwise. Returns the status byte.
    pub fn request(
        &mut self,
        typ: u32,
        sector: u64,
        data: Option<(u64, u32)>,
    ) -> Result<u8, &'static str> {
        let hdr = self.scratch;
        crate::port::mmio::write::<u32>(hdr, typ);
        crate::port::mmio::write::<u32>(hdr + 4, 0);
        crate::port::mmio::write::<u64>(hdr + 8, sector);
        crate::port::mmio::write::<u8>(hdr + 16, 0xFF);
        let h = Buf {
            addr: hdr,
            len: 16,
            write: false,
        };
        let s = Buf {
            addr: hdr + 16,
            len: 1,
            write: true,
        };
        let head = match data {
            Some((addr, len)) => {
                let d = Buf {
                    addr,
                    len,
                    write: typ != T_OUT,
                };
                self.q.push(&[h, d, s])
            }
            None => self.q.push(&[h, s]),
        }
        .ok_or("queue-full")?;
        self.q.kick();
        match self.q.wait_used(5000) {
            Wait::Timeout => return Err("timeout"),
            Wait::Irq | Wait::Polled => {}
        }
        match self.q.pop_used() {
            Some((id, _)) if id == head => Ok(crate::port::mmio::read::<u8>(hdr + 16)),
            Some(_) => Err("wrong-used-id"),
            None => Err("no-used"),
        }
    }

    /// Reads `len` bytes at `sector` into the scratch data area; returns its address.
    pub fn read(&mut self, sector: u64, len: u32) -> Result<u64, &'static str> {
        let data = self.scratch + 512;
        match self.request(T_IN, sector, Some((data, len)))? {
            S_OK => Ok(data),
            _ => Err("read-status"),
        }
    }

    /// FNV-1a of sector 0.
    pub fn sector0_fnv(&mut self) -> Result<u64, &'static str> {
        let a = self.read(0, 512)?;
        Ok(super::fnv1a(mem::bytes(a, 512)))
    }
}

/// The write pattern for `pv.blk.write=<sector>`.
pub fn pattern(sector: u64, out: &mut [u8]) {
    let mut tag = [0u8; 48];
    let mut n = 0;
    for &b in b"pocketvisor-probe-blk:" {
        tag[n] = b;
        n += 1;
    }
    let mut digits = [0u8; 20];
    let mut d = 0;
    let mut v = sector;
    loop {
        digits[d] = b'0' + (v % 10) as u8;
        d += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    while d > 0 {
        d -= 1;
        tag[n] = digits[d];
        n += 1;
    }
    tag[n] = b'\n';
    n += 1;
    for (i, o) in out.iter_mut().enumerate() {
        *o = tag[i % n];
    }
}

/// The `blk` selftest part.
pub fn selftest() {
    let mut blk = match Blk::open(0) {
        Ok(Some(b)) => b,
        Ok(None) => return probe!("blk skip no-device"),
        Err(e) => return fail("blk", format_args!("init {e}")),
    };
    if let Err(e) = run(&mut blk) {
        fail("blk", format_args!("{e}"));
    }
    probe!(
        "blk irq={} hits={} polled={}",
        blk.q.irq_mode(),
        blk.q.irq_hits,
        blk.q.polled
    );
}

fn run(blk: &mut Blk) -> Result<(), &'static str> {
    let fnv = blk.sector0_fnv()?;
    // GET_ID: a 20-byte serial, NUL padded.
    let id_buf = blk.scratch + 512;
    mem::bytes(id_buf, 20).fill(0);
    let mut id = [0u8; 20];
    let mut id_len = 0;
    if blk.request(T_GET_ID, 0, Some((id_buf, 20)))? == S_OK {
        for &c in mem::bytes(id_buf, 20).iter() {
            if c == 0 {
                break;
            }
            id[id_len] = if (0x20..0x7F).contains(&c) && c != b'"' {
                c
            } else {
                b'?'
            };
            id_len += 1;
        }
    }
    let id = core::str::from_utf8(&id[..id_len]).unwrap_or("");
    if blk.has_flush() {
        let st = blk.request(T_FLUSH, 0, None)?;
        if st != S_OK && !blk.ro {
            return Err("flush-status");
        }
    }
    let mut wrote = None;
    if let Some(sector) = pvh::info().arg("pv.blk.write").and_then(pvh::parse_u64) {
        if sector.saturating_add(8) > blk.capacity {
            return Err("write-beyond-capacity");
        }
        let data = blk.scratch + 512;
        pattern(sector, mem::bytes(data, 4096));
        let st = blk.request(T_OUT, sector, Some((data, 4096)))?;
        if blk.ro {
            if st == S_IOERR || st == S_UNSUPP {
                probe!("blk ro-refused ok");
            } else {
                return Err("ro-write-accepted");
            }
        } else {
            if st != S_OK {
                return Err("write-status");
            }
            if blk.has_flush() && blk.request(T_FLUSH, 0, None)? != S_OK {
                return Err("flush-after-write");
            }
            mem::bytes(data, 4096).fill(0);
            blk.read(sector, 4096)?;
            let mut expect = [0u8; 4096];
            pattern(sector, &mut expect);
            if mem::bytes(data, 4096) != &expect[..] {
                return Err("readback-mismatch");
            }
            wrote = Some(sector);
        }
    }
    match wrote {
        Some(s) => probe!(
            "blk ok capacity={} ro={} sector0_fnv={:016x} id=\"{}\" wrote={}",
            blk.capacity,
            blk.ro as u8,
            fnv,
            id,
            s
        ),
        None => probe!(
            "blk ok capacity={} ro={} sector0_fnv={:016x} id=\"{}\"",
            blk.capacity,
            blk.ro as u8,
            fnv,
            id
        ),
    }
    Ok(())
}

/// `pv.mode=blk-counter`: every `ms` milliseconds writes 4 KiB of [`pattern`]`(n)` at sector
/// `8 * n` (wrapping at the disk's end) and, once the device completed it, prints
/// `PROBE blk-counter <n>`: a guest writing its disk all the time, for live migration.
pub fn counter(ms: u64) -> ! {
    let mut blk = match Blk::open(0) {
        Ok(Some(b)) => b,
        Ok(None) => {
            fail("blk-counter", format_args!("no-device"));
            crate::power::fail_exit(1)
        }
        Err(e) => {
            fail("blk-counter", format_args!("init {e}"));
            crate::power::fail_exit(1)
        }
    };
    let slots = blk.capacity / 8;
    if slots == 0 || blk.ro {
        fail(
            "blk-counter",
            format_args!("needs a writable disk of 4 KiB or more"),
        );
        crate::power::fail_exit(1)
    }
    let period = ms.max(1) * crate::time::tsc_khz();
    let mut next = crate::port::rdtsc();
    let data = blk.scratch + 512;
    let mut n: u64 = 0;
    let mut twin = super::TwinWatch::open();
    loop {
        twin.check();
        pattern(n, mem::bytes(data, 4096));
        match blk.request(T_OUT, (n % slots) * 8, Some((data, 4096))) {
            Ok(S_OK) => probe!("blk-counter {n}"),
            Ok(_) => fail("blk-counter", format_args!("write-status at {n}")),
            Err(e) => fail("blk-counter", format_args!("{e} at {n}")),
        }
        n += 1;
        next += period;
        while crate::port::rdtsc() < next {
            crate::interrupts::wait();
        }
    }
}
