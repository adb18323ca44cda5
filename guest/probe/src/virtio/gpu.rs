//! virtio-gpu (2D) driver: one B8G8R8X8 resource the size of the first scanout, backed by a
//! contiguous framebuffer in the probe's arena; [`Gpu::present`] transfers and flushes one
//! damaged rectangle.

use super::pci::VirtioPci;
use super::queue::{Buf, Queue, Wait};
use crate::mem;
use crate::port::mmio;

/// Virtio type of GPU devices.
pub const TYPE: u16 = 16;

mod cmd {
    pub const GET_DISPLAY_INFO: u32 = 0x0100;
    pub const RESOURCE_CREATE_2D: u32 = 0x0101;
    pub const SET_SCANOUT: u32 = 0x0103;
    pub const RESOURCE_FLUSH: u32 = 0x0104;
    pub const TRANSFER_TO_HOST_2D: u32 = 0x0105;
    pub const RESOURCE_ATTACH_BACKING: u32 = 0x0106;
    pub const OK_NODATA: u32 = 0x1100;
    pub const OK_DISPLAY_INFO: u32 = 0x1101;
}

/// `VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM`: a pixel is the little-endian u32 `0x00RRGGBB`.
const FORMAT_B8G8R8X8: u32 = 2;
/// The one resource the probe creates.
const RESOURCE_ID: u32 = 1;
const HDR_LEN: u64 = 24;

/// A rectangle in scanout pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rect {
    /// Left edge.
    pub x: u32,
    /// Top edge.
    pub y: u32,
    /// Width.
    pub w: u32,
    /// Height.
    pub h: u32,
}

impl Rect {
    /// Whether (`px`, `py`) lies inside.
    pub fn contains(&self, px: u32, py: u32) -> bool {
        px >= self.x && py >= self.y && px - self.x < self.w && py - self.y < self.h
    }
}

/// An initialised GPU showing the probe's framebuffer on scanout 0.
pub struct Gpu {
    /// Transport (kept for the device's lifetime).
    _dev: VirtioPci,
    ctrl: Queue,
    req: u64,
    resp: u64,
    /// Scanout width in pixels.
    pub width: u32,
    /// Scanout height in pixels.
    pub height: u32,
    fb: u64,
    /// Flushes sent.
    pub flushes: u64,
}

impl Gpu {
    /// Finds the first GPU, reads its mode, creates and attaches the framebuffer and sets the
    /// scanout. `Ok(None)` when there is no GPU.
    pub fn open() -> Result<Option<Gpu>, &'static str> {
        let Some(f) = super::pci::find(TYPE, 0) else {
            return Ok(None);
        };
        let mut dev = VirtioPci::new(&f)?;
        dev.begin_init(0)?;
        let ctrl = dev.setup_queue(0, 16)?;
        // The cursor queue stays unused but must exist for some devices to accept DRIVER_OK.
        let _cursor = dev.setup_queue(1, 16)?;
        dev.driver_ok();
        let mut g = Gpu {
            _dev: dev,
            ctrl,
            req: mem::page(),
            resp: mem::page(),
            width: 0,
            height: 0,
            fb: 0,
            flushes: 0,
        };
        let (w, h) = g.display_info()?;
        if w == 0 || h == 0 || w > 4096 || h > 4096 {
            return Err("bad-display-size");
        }
        g.width = w;
        g.height = h;
        let bytes = u64::from(w) * u64::from(h) * 4;
        g.fb = mem::alloc(bytes, 4096);
        g.command(&[cmd::RESOURCE_CREATE_2D, RESOURCE_ID, FORMAT_B8G8R8X8, w, h])?;
        let (lo, hi) = split(g.fb);
        let len = crate::bits::lo32(bytes);
        g.command(&[cmd::RESOURCE_ATTACH_BACKING, RESOURCE_ID, 1, lo, hi, len, 0])?;
        g.command(&[cmd::SET_SCANOUT, 0, 0, w, h, 0, RESOURCE_ID])?;
        Ok(Some(g))
    }

    /// The framebuffer as pixels `0x00RRGGBB`, row by row.
    pub fn pixels(&mut self) -> &mut [u32] {
        let n = self.width as usize * self.height as usize;
        // SAFETY: `fb` is a 4 KiB aligned arena allocation of width*height*4 bytes that only
        // this driver hands out, and the returned borrow is tied to `&mut self`.
        unsafe { core::slice::from_raw_parts_mut(self.fb as *mut u32, n) }
    }

    /// Copies `r` of the framebuffer to the host resource and flushes it to the scanout.
    pub fn present(&mut self, r: Rect) -> Result<(), &'static str> {
        let offset = (u64::from(r.y) * u64::from(self.width) + u64::from(r.x)) * 4;
        let (lo, hi) = split(offset);
        self.command(&[
            cmd::TRANSFER_TO_HOST_2D,
            r.x,
            r.y,
            r.w,
            r.h,
            lo,
            hi,
            RESOURCE_ID,
            0,
        ])?;
        self.command(&[cmd::RESOURCE_FLUSH, r.x, r.y, r.w, r.h, RESOURCE_ID, 0])?;
        self.flushes += 1;
        Ok(())
    }

    /// `GET_DISPLAY_INFO`: the size of scanout 0.
    fn display_info(&mut self) -> Result<(u32, u32), &'static str> {
        let resp_len = HDR_LEN + 16 * 24;
        let ty = self.submit(&[cmd::GET_DISPLAY_INFO], resp_len)?;
        if ty != cmd::OK_DISPLAY_INFO {
            return Err("display-info-refused");
        }
        let pmode = self.resp + HDR_LEN;
        Ok((mmio::read::<u32>(pmode + 8), mmio::read::<u32>(pmode + 12)))
    }

    /// Sends a command whose body is `words` (the first is the command type) and expects
    /// `OK_NODATA`.
    fn command(&mut self, words: &[u32]) -> Result<(), &'static str> {
        match self.submit(words, HDR_LEN)? {
            cmd::OK_NODATA => Ok(()),
            _ => Err("command-refused"),
        }
    }

    /// Writes a request (header, then `words[1..]`), waits for the answer, returns its type.
    fn submit(&mut self, words: &[u32], resp_len: u64) -> Result<u32, &'static str> {
        let Some((&ty, body)) = words.split_first() else {
            return Err("empty-command");
        };
        mem::bytes(self.req, 4096)[..crate::bits::usize_from(HDR_LEN)].fill(0);
        mmio::write::<u32>(self.req, ty);
        let mut off = HDR_LEN;
        for &w in body {
            mmio::write::<u32>(self.req + off, w);
            off += 4;
        }
        mmio::write::<u32>(self.resp, 0);
        self.ctrl
            .push(&[
                Buf {
                    addr: self.req,
                    len: crate::bits::lo32(off),
                    write: false,
                },
                Buf {
                    addr: self.resp,
                    len: crate::bits::lo32(resp_len),
                    write: true,
                },
            ])
            .ok_or("queue-full")?;
        self.ctrl.kick();
        if self.ctrl.wait_used(3000) == Wait::Timeout {
            return Err("timeout");
        }
        self.ctrl.pop_used().ok_or("no-used")?;
        Ok(mmio::read::<u32>(self.resp))
    }
}

fn split(v: u64) -> (u32, u32) {
    (crate::bits::lo32(v), crate::bits::lo32(v >> 32))
}
