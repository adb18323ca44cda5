//! virtio-rng driver and the `rng` selftest part.

use super::pci::VirtioPci;
use super::queue::{Buf, Queue, Wait};
use crate::{fail, mem, probe};

/// Virtio type of entropy devices.
pub const TYPE: u16 = 4;

/// An initialised entropy device.
pub struct Rng {
    /// Transport.
    pub dev: VirtioPci,
    /// Request queue 0.
    pub q: Queue,
    /// 4 KiB buffer.
    pub buf: u64,
}

impl Rng {
    /// Finds and initialises the first entropy device.
    pub fn open() -> Result<Option<Rng>, &'static str> {
        let Some(f) = super::pci::find(TYPE, 0) else {
            return Ok(None);
        };
        let dev = VirtioPci::new(&f)?;
        let mut r = Rng {
            dev,
            q: Queue::new(0, 1, 0, None),
            buf: mem::alloc(4096, 4096),
        };
        r.reinit()?;
        Ok(Some(r))
    }

    /// Resets and re-initialises the device.
    pub fn reinit(&mut self) -> Result<(), &'static str> {
        self.dev.begin_init(0)?;
        self.q = self.dev.setup_queue(0, 64)?;
        self.dev.driver_ok();
        Ok(())
    }

    /// Fills `out` with device entropy.
    pub fn fill(&mut self, out: &mut [u8]) -> Result<(), &'static str> {
        let mut got = 0;
        let mut rounds = 0;
        while got < out.len() {
            rounds += 1;
            if rounds > 64 {
                return Err("short-reads");
            }
            let want = crate::bits::lo32((out.len() - got).min(4096) as u64);
            self.q
                .push(&[Buf {
                    addr: self.buf,
                    len: want,
                    write: true,
                }])
                .ok_or("queue-full")?;
            self.q.kick();
            if self.q.wait_used(3000) == Wait::Timeout {
                return Err("timeout");
            }
            let (_, len) = self.q.pop_used().ok_or("no-used")?;
            let len = (len as usize).min(want as usize);
            out[got..got + len].copy_from_slice(&mem::bytes(self.buf, len)[..len]);
            got += len;
        }
        Ok(())
    }
}

/// The `rng` selftest part.
pub fn selftest() {
    let mut rng = match Rng::open() {
        Ok(Some(r)) => r,
        Ok(None) => return probe!("rng skip no-device"),
        Err(e) => return fail("rng", format_args!("init {e}")),
    };
    let mut b = [0u8; 32];
    if let Err(e) = rng.fill(&mut b) {
        return fail("rng", format_args!("{e}"));
    }
    if b.iter().all(|&x| x == b[0]) {
        return fail("rng", format_args!("constant-bytes"));
    }
    let mut hex = [0u8; 64];
    for (i, x) in b.iter().enumerate() {
        hex[2 * i] = b"0123456789abcdef"[(x >> 4) as usize];
        hex[2 * i + 1] = b"0123456789abcdef"[(x & 15) as usize];
    }
    probe!("rng ok bytes={}", core::str::from_utf8(&hex).unwrap_or(""));
    probe!(
        "rng irq={} hits={} polled={}",
        rng.q.irq_mode(),
        rng.q.irq_hits,
        rng.q.polled
    );
}
