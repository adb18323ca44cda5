//! The host's view of a virtio-gpu device: the frame on its scanout and the areas the guest
//! flushed since the host last looked. The VMM hands a [`Display`] to whatever shows the
//! screen (a screenshot, a VNC server); waiting for a flush blocks on a condition variable,
//! so an idle guest costs nothing.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::protocol::Rect;
use super::state::{format, Cursor, GpuState, BYTES_PER_PIXEL};
use crate::virtio::control::{parse_request, ControlError, DeviceControl};

/// State shared by the device, its worker and its displays.
pub(crate) struct Shared {
    pub state: Mutex<GpuState>,
    /// Notified after every flush that reached the scanout.
    pub flushed: Condvar,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, GpuState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
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
