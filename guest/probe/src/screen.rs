//! `pv.mode=screen`: a phone home screen on the virtio-gpu display, driven by virtio-input.
//!
//! The screen is the profile colour (`pv.screen.rgb=RRGGBB`) with a darker header holding a
//! counter that ticks every `pv.screen.ms` milliseconds (1000) and six tiles below it. Only
//! what changes is redrawn and flushed: the counter's rectangle at a tick, two tiles when the
//! highlighted one changes. Key and touch events are echoed as `PROBE input ...` lines; a
//! touch highlights the tile under it. After `pv.screen.ticks` ticks (0: never) the probe
//! powers off. With `pv.screen.hash=1` every `PROBE screen frame` line carries the FNV-1a
//! of the whole frame as red, green, blue bytes row by row (what a host screenshot holds).
//! With `pv.screen.stamp=1` (the display bench's latency) each tick also writes the counter's
//! low 32 bits as a stamp, bit i white or black at pixel (i, 0), and prints `PROBE stamp N`
//! right before it transfers and flushes that tick.

use crate::virtio::gpu::{Gpu, Rect};
use crate::virtio::input::{Event, Input, MAX_DEVICES};
use crate::{fail, interrupts, probe, pvh, time};

/// Tile colours, in tile order (row by row, two per row).
const TILES: [u32; 6] = [0xe6194b, 0x3cb44b, 0xffe119, 0x4363d8, 0xf58231, 0x911eb4];
/// A highlighted tile is drawn in this colour.
const HIGHLIGHT: u32 = 0xffffff;
const DIGIT_FG: u32 = 0xffffff;
const DIGITS: u32 = 6;

/// 3x5 digit glyphs, row-major, most significant bit first.
const FONT: [u16; 10] = [
    0b111_101_101_101_111,
    0b010_110_010_010_111,
    0b111_001_111_100_111,
    0b111_001_111_001_111,
    0b101_101_111_001_001,
    0b111_100_111_001_111,
    0b111_100_111_101_111,
    0b111_001_001_001_001,
    0b111_101_111_101_111,
    0b111_101_111_001_111,
];

/// Where everything is on a `width` x `height` display.
/// Square mode (`pv.screen.anim=square`): the moving square's side and colour.
const SQUARE: u32 = 200;
const SQUARE_RGB: u32 = 0xf4_a2_61;

struct Layout {
    header: Rect,
    counter: Rect,
    scale: u32,
    tiles: [Rect; 6],
}

impl Layout {
    fn new(width: u32, height: u32) -> Layout {
        let hb = (height / 8).max(8);
        let scale = (hb / 8).max(1);
        let header = Rect {
            x: 0,
            y: 0,
            w: width,
            h: hb.min(height),
        };
        let counter = Rect {
            x: 0,
            y: 0,
            w: (scale * (2 + 4 * DIGITS)).min(width),
            h: header.h,
        };
        let g = (width / 16).max(1);
        let tw = width.saturating_sub(3 * g) / 2;
        let th = tw.min(height.saturating_sub(hb + 4 * g) / 3);
        let tiles = core::array::from_fn(|i| {
            let i = crate::bits::lo32(i as u64);
            let (col, row) = (i % 2, i / 2);
            Rect {
                x: g + col * (tw + g),
                y: hb + g + row * (th + g),
                w: tw,
                h: th,
            }
        });
        Layout {
            header,
            counter,
            scale,
            tiles,
        }
    }

    fn tile_at(&self, x: u32, y: u32) -> Option<usize> {
        self.tiles.iter().position(|t| t.contains(x, y))
    }
}

/// The home screen's state.
struct Home {
    gpu: Gpu,
    layout: Layout,
    rgb: u32,
    counter: u64,
    highlighted: Option<usize>,
    hash: bool,
    stamp: bool,
}

impl Home {
    fn fill(&mut self, r: Rect, rgb: u32) {
        let w = self.gpu.width as usize;
        let px = self.gpu.pixels();
        for row in r.y..r.y + r.h {
            let start = row as usize * w + r.x as usize;
            if let Some(line) = px.get_mut(start..start + r.w as usize) {
                line.fill(rgb);
            }
        }
    }

    fn header_rgb(&self) -> u32 {
        (self.rgb >> 1) & 0x7f7f7f
    }

    fn draw_counter(&mut self) {
        let (c, s) = (self.layout.counter, self.layout.scale);
        self.fill(c, self.header_rgb());
        let top = c.h.saturating_sub(5 * s) / 2;
        let mut n = self.counter;
        for i in (0..DIGITS).rev() {
            let glyph = FONT[crate::bits::usize_from(n % 10)];
            n /= 10;
            let left = s * (1 + 4 * i);
            for bit in 0..15u32 {
                if glyph & (1 << (14 - bit)) != 0 {
                    let cell = Rect {
                        x: left + s * (bit % 3),
                        y: top + s * (bit / 3),
                        w: s,
                        h: s,
                    };
                    self.fill(cell, DIGIT_FG);
                }
            }
        }
        if self.stamp && c.w >= 32 {
            for bit in 0..32u32 {
                let on = (self.counter >> bit) & 1 != 0;
                let px = Rect {
                    x: c.x + bit,
                    y: c.y,
                    w: 1,
                    h: 1,
                };
                self.fill(px, if on { 0xffffff } else { 0 });
            }
        }
    }

    fn draw_tile(&mut self, i: usize) {
        let rgb = if self.highlighted == Some(i) {
            HIGHLIGHT
        } else {
            TILES[i]
        };
        self.fill(self.layout.tiles[i], rgb);
    }

    fn draw_all(&mut self) {
        let full = Rect {
            x: 0,
            y: 0,
            w: self.gpu.width,
            h: self.gpu.height,
        };
        self.fill(full, self.rgb);
        self.fill(self.layout.header, self.header_rgb());
        self.draw_counter();
        for i in 0..TILES.len() {
            self.draw_tile(i);
        }
    }

    /// Presents `r` and reports the frame.
    fn present(&mut self, r: Rect, why: &str) -> bool {
        if let Err(e) = self.gpu.present(r) {
            fail("screen", format_args!("present {e}"));
            return false;
        }
        if self.hash {
            let h = self.frame_hash();
            probe!(
                "screen frame n={} why={why} counter={} rect={},{},{},{} fnv={h:016x}",
                self.gpu.flushes,
                self.counter,
                r.x,
                r.y,
                r.w,
                r.h
            );
        } else {
            probe!(
                "screen frame n={} why={why} counter={} rect={},{},{},{}",
                self.gpu.flushes,
                self.counter,
                r.x,
                r.y,
                r.w,
                r.h
            );
        }
        true
    }

    /// Scroll mode: everything below the header moves up `rows` rows and the rows it leaves
    /// get a new stripe (its colour and a bar's place from the counter), as a text console
    /// scrolls; returns the area that changed.
    fn scroll(&mut self, rows: u32) -> Rect {
        let (w, h) = (self.gpu.width, self.gpu.height);
        let top = self.layout.header.h.min(h);
        let area = Rect {
            x: 0,
            y: top,
            w,
            h: h - top,
        };
        let rows = rows.min(area.h);
        let wu = w as usize;
        let (from, to) = ((top + rows) as usize * wu, top as usize * wu);
        let end = h as usize * wu;
        self.gpu.pixels().copy_within(from..end, to);
        let n = self.counter;
        let stripe = crate::bits::lo32(n.wrapping_mul(0x9e37_79b9) & 0xff_ffff) | 0x10_1010;
        let fresh = Rect {
            x: 0,
            y: h - rows,
            w,
            h: rows,
        };
        self.fill(fresh, stripe);
        let bar_x = crate::bits::lo32(n.wrapping_mul(37) % u64::from(w.max(1)));
        let bar = Rect {
            x: bar_x,
            y: h - rows,
            w: (w / 10).max(1).min(w - bar_x),
            h: rows,
        };
        self.fill(bar, DIGIT_FG);
        area
    }

    /// Square mode: where the 200x200 square stands at tick `n` (it wanders under the
    /// header, bouncing off the edges).
    fn square_at(&self, n: u64) -> Rect {
        let (w, h) = (self.gpu.width, self.gpu.height);
        let top = self.layout.header.h.min(h);
        let side = SQUARE.min(w).min(h - top);
        let span = |room: u32, step: u64| -> u32 {
            let room = u64::from(room.max(1));
            let p = (n * step) % (2 * room);
            crate::bits::lo32(if p < room { p } else { 2 * room - p })
        };
        Rect {
            x: span(w - side, 7),
            y: top + span(h - top - side, 5),
            w: side,
            h: side,
        }
    }

    /// Square mode: moves the square from tick `n - 1`'s place to tick `n`'s; returns the
    /// area that changed (both places).
    fn move_square(&mut self, n: u64) -> Rect {
        let (old, new) = (self.square_at(n.saturating_sub(1)), self.square_at(n));
        self.fill(old, self.rgb);
        self.fill(new, SQUARE_RGB);
        let (x, y) = (old.x.min(new.x), old.y.min(new.y));
        Rect {
            x,
            y,
            w: (old.x + old.w).max(new.x + new.w) - x,
            h: (old.y + old.h).max(new.y + new.h) - y,
        }
    }

    fn frame_hash(&mut self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &p in self.gpu.pixels().iter() {
            for shift in [16, 8, 0] {
                h ^= u64::from((p >> shift) & 0xff);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }

    fn touch(&mut self, x: u32, y: u32, down: bool) -> bool {
        let tile = self.layout.tile_at(x, y);
        match tile {
            Some(t) => probe!("input touch x={x} y={y} down={} tile={t}", u8::from(down)),
            None => probe!("input touch x={x} y={y} down={} tile=none", u8::from(down)),
        }
        if !down || tile.is_none() || tile == self.highlighted {
            return true;
        }
        let old = core::mem::replace(&mut self.highlighted, tile);
        if let Some(o) = old {
            self.draw_tile(o);
            if !self.present(self.layout.tiles[o], "unhighlight") {
                return false;
            }
        }
        let Some(t) = tile else { return true };
        self.draw_tile(t);
        self.present(self.layout.tiles[t], "highlight")
    }
}

fn parse_rgb(s: &str) -> Option<u32> {
    let v = u32::from_str_radix(s.trim_start_matches('#'), 16).ok()?;
    (s.trim_start_matches('#').len() == 6).then_some(v)
}

/// Runs the home screen until `pv.screen.ticks` ticks passed (forever if 0).
pub fn run() {
    let boot = pvh::info();
    let rgb = match boot.arg("pv.screen.rgb") {
        None => 0x3366cc,
        Some(s) => match parse_rgb(s) {
            Some(v) => v,
            None => return fail("screen", format_args!("bad-rgb {s}")),
        },
    };
    let period_ms = boot.arg_u64("pv.screen.ms", 1000).max(1);
    let max_ticks = boot.arg_u64("pv.screen.ticks", 0);
    let scroll_rows = crate::bits::lo32(boot.arg_u64("pv.screen.scroll", 0).min(4096));
    let square = boot.arg("pv.screen.anim") == Some("square");
    let gpu = match Gpu::open() {
        Ok(Some(g)) => g,
        Ok(None) => return probe!("screen skip no-gpu"),
        Err(e) => return fail("screen", format_args!("gpu {e}")),
    };
    let mut inputs: [Option<Input>; MAX_DEVICES] = [const { None }; MAX_DEVICES];
    for (i, slot) in inputs.iter_mut().enumerate() {
        match Input::open(i) {
            Ok(Some(d)) => {
                probe!(
                    "input device i={i} name={} pointer={} irq={}",
                    d.name(),
                    u8::from(d.is_pointer()),
                    if d.vector().is_some() { "msix" } else { "poll" }
                );
                *slot = Some(d);
            }
            Ok(None) => break,
            Err(e) => return fail("input", format_args!("device {i} {e}")),
        }
    }
    let layout = Layout::new(gpu.width, gpu.height);
    let mut home = Home {
        gpu,
        layout,
        rgb,
        counter: 0,
        highlighted: None,
        hash: boot.arg_u64("pv.screen.hash", 0) != 0,
        stamp: boot.arg_u64("pv.screen.stamp", 0) != 0,
    };
    probe!(
        "screen ready w={} h={} rgb={rgb:06x} header={:06x} name={}",
        home.gpu.width,
        home.gpu.height,
        home.header_rgb(),
        boot.arg("pv.screen.name").unwrap_or("probe")
    );
    for (i, t) in home.layout.tiles.iter().enumerate() {
        probe!(
            "screen tile i={i} x={} y={} w={} h={} rgb={:06x}",
            t.x,
            t.y,
            t.w,
            t.h,
            TILES[i]
        );
    }
    home.draw_all();
    let full = Rect {
        x: 0,
        y: 0,
        w: home.gpu.width,
        h: home.gpu.height,
    };
    if !home.present(full, "full") {
        return;
    }
    // Sleep until the next tick or an input interrupt, not on the 1 ms tick.
    let one_shot = boot.arg_u64("pv.screen.oneshot", 1) != 0 && interrupts::one_shot_timer();
    probe!(
        "screen timer={}",
        if one_shot { "tsc-deadline" } else { "periodic" }
    );
    let mut next_tick = time::deadline_ms(period_ms);
    let mut timer_irqs = interrupts::irq_count(interrupts::TIMER_VECTOR);
    loop {
        let (w, h) = (home.gpu.width, home.gpu.height);
        for dev in inputs.iter_mut().flatten() {
            while let Some(ev) = dev.next(w, h) {
                let ok = match ev {
                    Event::Key { code, value } => {
                        probe!("input key code={code} value={value}");
                        true
                    }
                    Event::Touch { x, y, down } => home.touch(x, y, down),
                };
                if !ok {
                    return;
                }
            }
        }
        if time::expired(next_tick) {
            home.counter += 1;
            let irqs = interrupts::irq_count(interrupts::TIMER_VECTOR);
            probe!(
                "screen tick n={} timer_irqs={}",
                home.counter,
                irqs.wrapping_sub(timer_irqs)
            );
            timer_irqs = irqs;
            if square {
                let area = home.move_square(home.counter);
                if !home.present(area, "square") {
                    return;
                }
            } else {
                home.draw_counter();
                if home.stamp {
                    probe!("stamp {}", home.counter);
                }
                if !home.present(home.layout.counter, "tick") {
                    return;
                }
            }
            if scroll_rows != 0 {
                let area = home.scroll(scroll_rows);
                if !home.present(area, "scroll") {
                    return;
                }
            }
            if max_ticks != 0 && home.counter >= max_ticks {
                probe!(
                    "screen ok ticks={} flushes={}",
                    home.counter,
                    home.gpu.flushes
                );
                return;
            }
            next_tick = next_tick.saturating_add(period_ms * time::tsc_khz());
        }
        if one_shot {
            interrupts::set_deadline(next_tick);
        }
        interrupts::wait();
    }
}
