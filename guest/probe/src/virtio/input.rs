//! virtio-input driver: keeps the event queue full of 8-byte buffers and turns what comes
//! back into key presses and touches. A pointer device (one with absolute axes) reports the
//! first contact's position (`ABS_X`/`ABS_Y`, which both our touch screen and QEMU's tablet
//! send) scaled to the display, at every `SYN_REPORT`.

use super::pci::VirtioPci;
use super::queue::{Buf, Queue};
use crate::mem;
use crate::port::mmio;

/// Virtio type of input devices.
pub const TYPE: u16 = 18;
/// Most input devices the probe drives.
pub const MAX_DEVICES: usize = 4;
const BUFFERS: usize = 64;

const EV_SYN: u16 = 0x00;
const EV_KEY: u16 = 0x01;
const EV_ABS: u16 = 0x03;
const SYN_REPORT: u16 = 0;
const BTN_LEFT: u16 = 0x110;
const BTN_TOUCH: u16 = 0x14a;
const ABS_X: u16 = 0x00;
const ABS_Y: u16 = 0x01;

const SELECT_ID_NAME: u8 = 0x01;
const SELECT_EV_BITS: u8 = 0x11;
const SELECT_ABS_INFO: u8 = 0x12;

/// What a device reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A key went down (`value` 1), up (0) or repeated (2).
    Key {
        /// Linux key code.
        code: u16,
        /// Press state.
        value: u32,
    },
    /// The first contact at (`x`, `y`) in display pixels; `down` false once lifted.
    Touch {
        /// Column.
        x: u32,
        /// Row.
        y: u32,
        /// Whether the contact touches the screen.
        down: bool,
    },
}

/// One axis's range from the config space.
#[derive(Clone, Copy)]
struct Axis {
    min: u32,
    max: u32,
}

impl Axis {
    /// `v` scaled from the axis range to `0..pixels`.
    fn scale(&self, v: u32, pixels: u32) -> u32 {
        let span = u64::from(self.max.saturating_sub(self.min)).max(1);
        let off = u64::from(
            v.saturating_sub(self.min)
                .min(self.max.saturating_sub(self.min)),
        );
        let px = off * u64::from(pixels.saturating_sub(1)) / span;
        u32::try_from(px).unwrap_or(u32::MAX)
    }
}

/// An initialised input device.
pub struct Input {
    /// Transport.
    pub dev: VirtioPci,
    eventq: Queue,
    bufs: u64,
    /// Buffer address of each descriptor head in flight.
    addr_of: [u64; BUFFERS],
    /// Device name from the config space.
    name: [u8; 32],
    name_len: usize,
    axes: Option<(Axis, Axis)>,
    x: u32,
    y: u32,
    down: bool,
    dirty: bool,
}

impl Input {
    /// Initialises the `nth` input device; `Ok(None)` when there is none.
    pub fn open(nth: usize) -> Result<Option<Input>, &'static str> {
        let Some(f) = super::pci::find(TYPE, nth) else {
            return Ok(None);
        };
        let mut dev = VirtioPci::new(&f)?;
        dev.begin_init(0)?;
        let eventq = dev.setup_queue(0, 64)?;
        let _status = dev.setup_queue(1, 8)?;
        dev.driver_ok();
        let mut d = Input {
            dev,
            eventq,
            bufs: mem::alloc(8 * BUFFERS as u64, 4096),
            addr_of: [0; BUFFERS],
            name: [0; 32],
            name_len: 0,
            axes: None,
            x: 0,
            y: 0,
            down: false,
            dirty: false,
        };
        d.read_config();
        for i in 0..BUFFERS.min(usize::from(d.eventq.size)) {
            d.post(d.bufs + 8 * i as u64);
        }
        d.eventq.kick();
        Ok(Some(d))
    }

    /// The device's name (as its config space gives it).
    pub fn name(&self) -> &str {
        core::str::from_utf8(&self.name[..self.name_len]).unwrap_or("?")
    }

    /// Whether the device has absolute axes (a touch screen or tablet).
    pub fn is_pointer(&self) -> bool {
        self.axes.is_some()
    }

    /// The interrupt vector of the event queue, if routed.
    pub fn vector(&self) -> Option<u8> {
        self.eventq.vector
    }

    fn select(&self, select: u8, subsel: u8) -> usize {
        self.dev.config_write::<u8>(0, select);
        self.dev.config_write::<u8>(1, subsel);
        usize::from(self.dev.config::<u8>(2))
    }

    fn read_config(&mut self) {
        let n = self.select(SELECT_ID_NAME, 0).min(self.name.len());
        for i in 0..n {
            let c = self.dev.config::<u8>(8 + i as u64);
            self.name[i] = if c.is_ascii_graphic() { c } else { b'_' };
        }
        self.name_len = n;
        if self.select(SELECT_EV_BITS, crate::bits::lo8(u32::from(EV_ABS))) == 0 {
            return;
        }
        let axis = |code: u16| {
            (self.select(SELECT_ABS_INFO, crate::bits::lo8(u32::from(code))) >= 8).then(|| Axis {
                min: self.dev.config::<u32>(8),
                max: self.dev.config::<u32>(12),
            })
        };
        if let (Some(x), Some(y)) = (axis(ABS_X), axis(ABS_Y)) {
            self.axes = Some((x, y));
        }
    }

    fn post(&mut self, addr: u64) {
        let buf = Buf {
            addr,
            len: 8,
            write: true,
        };
        if let Some(head) = self.eventq.push(&[buf]) {
            if let Some(slot) = self.addr_of.get_mut(usize::from(head)) {
                *slot = addr;
            }
        }
    }

    /// Takes the next complete event (a key, or a touch at a `SYN_REPORT`), reposting the
    /// buffers it consumed. `width`/`height` are the display's, for scaling touches.
    pub fn next(&mut self, width: u32, height: u32) -> Option<Event> {
        let mut reposted = false;
        let mut out = None;
        while out.is_none() {
            let Some((head, len)) = self.eventq.pop_used() else {
                break;
            };
            let Some(&addr) = self.addr_of.get(usize::from(head)) else {
                continue; // a head we never posted: a broken device
            };
            if addr != 0 && len >= 8 {
                let kind = mmio::read::<u16>(addr);
                let code = mmio::read::<u16>(addr + 2);
                let value = mmio::read::<u32>(addr + 4);
                out = self.decode(kind, code, value, width, height);
            }
            if addr != 0 {
                self.post(addr);
                reposted = true;
            }
        }
        if reposted {
            self.eventq.kick();
        }
        out
    }

    fn decode(&mut self, kind: u16, code: u16, value: u32, w: u32, h: u32) -> Option<Event> {
        match (kind, code) {
            (EV_KEY, BTN_TOUCH | BTN_LEFT) if self.is_pointer() => {
                self.down = value != 0;
                self.dirty = true;
                None
            }
            (EV_KEY, _) => Some(Event::Key { code, value }),
            (EV_ABS, ABS_X) => {
                self.x = self.axes.map_or(value, |(ax, _)| ax.scale(value, w));
                self.dirty = true;
                None
            }
            (EV_ABS, ABS_Y) => {
                self.y = self.axes.map_or(value, |(_, ay)| ay.scale(value, h));
                self.dirty = true;
                None
            }
            (EV_SYN, SYN_REPORT) if self.dirty => {
                self.dirty = false;
                Some(Event::Touch {
                    x: self.x,
                    y: self.y,
                    down: self.down,
                })
            }
            _ => None,
        }
    }
}
