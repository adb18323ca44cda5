//! The host's view of a virtio-gpu device: the frame on its scanout and the areas the guest
//! flushed since the host last looked. The VMM hands a [`Display`] to whatever shows the
//! screen (a screenshot, a VNC server); waiting for a flush blocks on a condition variable,
//! so an idle guest costs nothing.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use super::protocol::Rect;
use super::state::{format, Cursor, GpuState, BYTES_PER_PIXEL};
use crate::virtio::control::{parse_request, ControlError, DeviceControl};

/// State shared by the device, its worker and its displays.
pub(crate) struct Shared {
    pub state: Mutex<GpuState>,
    /// Notified after every flush that reached the scanout.
    pub flushed: Condvar,
    /// Viewers woken after every flush that reached the scanout.
    pub watchers: Mutex<Vec<Weak<dyn FlushWatcher>>>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, GpuState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes every live watcher and forgets the dropped ones.
    pub fn wake_watchers(&self) {
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        watchers.retain(|w| match w.upgrade() {
            Some(w) => {
                w.flushed();
                true
            }
            None => false,
        });
    }
}

/// Something woken (on the device worker's thread) after each flush that reached the
/// scanout; it must only note the fact and return (a VNC client's writer waits on it).
pub trait FlushWatcher: Send + Sync {
    /// A flush reached the scanout.
    fn flushed(&self);
}

/// What changed on the scanout since a viewer's [`Damage::position`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Where the viewer is now: pass it to the next [`Display::damage_since`].
    pub position: (u64, u64),
    /// The flushed areas (scanout coordinates) since the given position; None when the
    /// viewer is too far behind or the device was reset or restored: it redraws everything.
    pub rects: Option<Vec<Rect>>,
}

/// A copy of what the scanout shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    /// Pixels as 8-bit red, green, blue triples, row by row.
    pub rgb: Vec<u8>,
}

impl Frame {
    /// The pixel at (`x`, `y`) as (red, green, blue).
    pub fn pixel(&self, x: u32, y: u32) -> Option<(u8, u8, u8)> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let i = (y as usize * self.width as usize + x as usize) * 3;
        match self.rgb.get(i..i + 3)? {
            &[r, g, b] => Some((r, g, b)),
            _ => None,
        }
    }

    /// The frame as a binary PPM (P6) image.
    pub fn to_ppm(&self) -> Vec<u8> {
        let mut out = format!("P6\n{} {}\n255\n", self.width, self.height).into_bytes();
        out.extend_from_slice(&self.rgb);
        out
    }
}

/// A handle on a virtio-gpu device's screen, usable from any thread.
#[derive(Clone)]
pub struct Display {
    pub(crate) shared: Arc<Shared>,
}

impl Display {
    /// The scanout's current frame, or None while the guest shows nothing.
    pub fn frame(&self) -> Option<Frame> {
        let st = self.shared.lock();
        let sc = st.scanout?;
        let res = st.resources.get(&sc.resource_id)?;
        let offs = format::rgb_offsets(res.format)?;
        let bpp = BYTES_PER_PIXEL as usize;
        let stride = res.width as usize * bpp;
        let (w, h) = (sc.rect.width as usize, sc.rect.height as usize);
        let mut rgb = Vec::with_capacity(w * h * 3);
        for row in 0..h {
            let start = (sc.rect.y as usize + row) * stride + sc.rect.x as usize * bpp;
            let line = res.pixels.get(start..start + w * bpp)?;
            for px in line.chunks_exact(bpp) {
                rgb.extend(offs.iter().map(|&o| px.get(o).copied().unwrap_or(0)));
            }
        }
        Some(Frame {
            width: sc.rect.width,
            height: sc.rect.height,
            rgb,
        })
    }

    /// The pixels of `rect` (scanout coordinates) as red, green, blue triples row by row,
    /// with the scanout's size; None while the guest shows nothing or if `rect` leaves it.
    pub fn read_rect(&self, rect: Rect) -> Option<(Vec<u8>, u32, u32)> {
        let st = self.shared.lock();
        let sc = st.scanout?;
        if !rect.fits_in(sc.rect.width, sc.rect.height) {
            return None;
        }
        let res = st.resources.get(&sc.resource_id)?;
        let offs = format::rgb_offsets(res.format)?;
        let bpp = BYTES_PER_PIXEL as usize;
        let stride = res.width as usize * bpp;
        let (w, h) = (rect.width as usize, rect.height as usize);
        let (x0, y0) = (
            sc.rect.x as usize + rect.x as usize,
            sc.rect.y as usize + rect.y as usize,
        );
        let mut rgb = Vec::with_capacity(w * h * 3);
        for row in 0..h {
            let start = (y0 + row) * stride + x0 * bpp;
            let line = res.pixels.get(start..start + w * bpp)?;
            for px in line.chunks_exact(bpp) {
                rgb.extend(offs.iter().map(|&o| px.get(o).copied().unwrap_or(0)));
            }
        }
        Some((rgb, sc.rect.width, sc.rect.height))
    }

    /// The scanout's size, or None while the guest shows nothing.
    pub fn scanout_size(&self) -> Option<(u32, u32)> {
        self.shared
            .lock()
            .scanout
            .map(|s| (s.rect.width, s.rect.height))
    }

    /// The areas flushed since `position` (from an earlier answer; `(0, 0)` at first, which
    /// is answered with a full redraw unless nothing was ever flushed).
    pub fn damage_since(&self, position: (u64, u64)) -> Damage {
        let st = self.shared.lock();
        let now = (st.generation, st.flushes);
        let (generation, seen) = position;
        let rects = if generation != st.generation || seen > st.flushes || seen < st.damage_floor {
            None
        } else {
            Some(
                st.damage_log
                    .iter()
                    .filter(|(n, _)| *n > seen)
                    .map(|(_, r)| *r)
                    .collect(),
            )
        };
        Damage {
            position: now,
            rects,
        }
    }

    /// Wakes `watcher` after every flush that reaches the scanout, until it is dropped.
    pub fn watch(&self, watcher: Weak<dyn FlushWatcher>) {
        self.shared
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(watcher);
    }

    /// Takes the areas flushed since the last call (scanout coordinates).
    pub fn take_damage(&self) -> Vec<Rect> {
        std::mem::take(&mut self.shared.lock().damage)
    }

    /// Flushes that reached the scanout so far.
    pub fn flushes(&self) -> u64 {
        self.shared.lock().flushes
    }

    /// Waits until more than `seen` flushes reached the scanout, or `timeout` passed; returns
    /// the flush count.
    pub fn wait_flush(&self, seen: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        while st.flushes <= seen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .shared
                .flushed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.flushes
    }

    /// The cursor as the guest last set it.
    pub fn cursor(&self) -> Cursor {
        self.shared.lock().cursor
    }

    /// The display mode the device offers (width, height).
    pub fn mode(&self) -> (u32, u32) {
        let c = self.shared.lock().config;
        (c.width, c.height)
    }
}

/// A control request to the gpu: `{"op":"info"}` or `{"op":"screenshot"}`.
#[derive(serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum GpuRequest {
    /// The display mode, what the scanout shows, resources and flushes.
    Info,
    /// The scanout's frame: `width`, `height`, `flushes` and `rgb` (base64 of red, green,
    /// blue bytes row by row).
    Screenshot,
}

impl DeviceControl for Display {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn control(&self, request: &serde_json::Value) -> Result<serde_json::Value, ControlError> {
        match parse_request::<GpuRequest>(request)? {
            GpuRequest::Info => {
                let st = self.shared.lock();
                let scanout = st.scanout.map(|s| {
                    serde_json::json!({
                        "resource_id": s.resource_id,
                        "width": s.rect.width,
                        "height": s.rect.height,
                    })
                });
                Ok(serde_json::json!({
                    "mode": [st.config.width, st.config.height],
                    "scanout": scanout,
                    "resources": st.resources.len(),
                    "host_bytes": st.host_bytes,
                    "max_host_bytes": st.config.max_host_bytes,
                    "flushes": st.flushes,
                }))
            }
            GpuRequest::Screenshot => {
                use base64::Engine as _;
                let flushes = self.flushes();
                let frame = self.frame().ok_or_else(|| {
                    ControlError::Refused("the guest shows nothing on the display yet".into())
                })?;
                Ok(serde_json::json!({
                    "width": frame.width,
                    "height": frame.height,
                    "flushes": flushes,
                    "rgb": base64::engine::general_purpose::STANDARD.encode(&frame.rgb),
                }))
            }
        }
    }
}
