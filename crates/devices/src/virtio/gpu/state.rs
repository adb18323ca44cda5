//! What the virtio-gpu device holds between commands: its 2D resources (host copies of the
//! guest's pixels and their backing in guest memory), the scanout, the cursor and the damage
//! the guest flushed, with every command checked against the device's limits before it
//! changes anything.

use std::collections::{BTreeMap, VecDeque};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::edid::{edid_block, EDID_AREA};
use super::protocol::{display_info_body, resp, Command, CursorPos, MemEntry, Rect};
use super::tiles::{ChangedTiles, TILE};
use super::GpuConfig;
use crate::GuestMem;

/// Bytes per pixel of every supported format.
pub const BYTES_PER_PIXEL: u32 = 4;
/// Largest width or height of a resource.
pub const MAX_DIMENSION: u32 = 16384;
/// Damage rectangles kept before they are merged into their bounding box.
const MAX_DAMAGE_RECTS: usize = 64;
/// Flushed areas kept for viewers; one further behind sees the whole frame again.
const MAX_DAMAGE_LOG: usize = 256;

/// Pixel formats (`virtio_gpu_formats`), all 32 bits per pixel.
pub mod format {
    pub const B8G8R8A8: u32 = 1;
    pub const B8G8R8X8: u32 = 2;
    pub const A8R8G8B8: u32 = 3;
    pub const X8R8G8B8: u32 = 4;
    pub const R8G8B8A8: u32 = 67;
    pub const X8B8G8R8: u32 = 68;
    pub const A8B8G8R8: u32 = 121;
    pub const R8G8B8X8: u32 = 134;

    /// Byte positions of red, green and blue in a pixel of format `f`, if supported.
    pub fn rgb_offsets(f: u32) -> Option<[usize; 3]> {
        match f {
            B8G8R8A8 | B8G8R8X8 => Some([2, 1, 0]),
            A8R8G8B8 | X8R8G8B8 => Some([1, 2, 3]),
            R8G8B8A8 | R8G8B8X8 => Some([0, 1, 2]),
            X8B8G8R8 | A8B8G8R8 => Some([3, 2, 1]),
            _ => None,
        }
    }
}

/// A 2D resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resource {
    pub format: u32,
    pub width: u32,
    pub height: u32,
    /// The host copy, `width * height * 4` bytes, row by row.
    pub pixels: Vec<u8>,
    /// The guest pages the driver attached, in order.
    pub backing: Vec<MemEntry>,
    /// The tiles transfers changed since a flush last covered them.
    pub changed: ChangedTiles,
}

impl Resource {
    /// A resource whose every tile counts as changed (new, or restored from a snapshot).
    pub fn new(
        format: u32,
        width: u32,
        height: u32,
        pixels: Vec<u8>,
        backing: Vec<MemEntry>,
    ) -> Self {
        Resource {
            format,
            width,
            height,
            pixels,
            backing,
            changed: ChangedTiles::all(width, height),
        }
    }

    fn stride(&self) -> usize {
        // width <= MAX_DIMENSION, so this cannot overflow.
        self.width as usize * BYTES_PER_PIXEL as usize
    }
}

/// The cursor as the driver last set it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    /// The cursor image's resource (0: no cursor).
    pub resource_id: u32,
    /// Hot spot inside the image.
    pub hot_x: u32,
    pub hot_y: u32,
    /// Position on the scanout.
    pub x: u32,
    pub y: u32,
}

/// The resource shown on the (only) scanout and the part of it shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Scanout {
    pub resource_id: u32,
    pub rect: Rect,
}

/// Everything the device keeps; shared by the device, its worker and its displays.
#[derive(Debug)]
pub(crate) struct GpuState {
    pub config: GpuConfig,
    pub resources: BTreeMap<u32, Resource>,
    /// Bytes of host memory the resources take.
    pub host_bytes: u64,
    pub scanout: Option<Scanout>,
    pub cursor: Cursor,
    /// Flushed areas of the scanout (scanout coordinates) not yet taken by the host.
    pub damage: Vec<Rect>,
    /// Flushes that reached the scanout so far.
    pub flushes: u64,
    /// The last flushed areas with the flush count each made, oldest first, for viewers that
    /// each keep their own place ([`super::Display::damage_since`]).
    pub damage_log: VecDeque<(u64, Rect)>,
    /// The last flush whose areas (some or all) left the log: a viewer that saw less redraws
    /// everything.
    pub damage_floor: u64,
    /// Bumped by every reset and restore, so a viewer's flush count from before one is
    /// never taken for a count of the new state.
    pub generation: u64,
    /// A transfer's row, read aside before it is compared with the host copy: one buffer per
    /// device, reused by every transfer, at most a row of the widest resource
    /// (`MAX_DIMENSION * BYTES_PER_PIXEL`, 64 KiB).
    line: Vec<u8>,
}

/// A successful command's answer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    /// `OK_NODATA`.
    NoData,
    /// A response type with a body.
    Data(u32, Vec<u8>),
}

/// A failed command's response type (`ERR_*`).
pub(crate) type ErrorCode = u32;

impl GpuState {
    pub fn new(config: GpuConfig) -> Self {
        GpuState {
            config,
            resources: BTreeMap::new(),
            host_bytes: 0,
            scanout: None,
            cursor: Cursor::default(),
            damage: Vec::new(),
            flushes: 0,
            damage_log: VecDeque::new(),
            damage_floor: 0,
            generation: 0,
            line: Vec::new(),
        }
    }

    /// Forgets every resource, the scanout and the cursor (device reset).
    pub fn clear(&mut self) {
        let generation = self.generation.wrapping_add(1);
        *self = GpuState::new(self.config);
        self.generation = generation;
    }

    /// Carries out `cmd`, reading backing from `mem`. An error changes nothing.
    pub fn execute(&mut self, mem: &GuestMem, cmd: Command) -> Result<Reply, ErrorCode> {
        match cmd {
            Command::GetDisplayInfo => Ok(Reply::Data(
                resp::OK_DISPLAY_INFO,
                display_info_body(self.config.width, self.config.height),
            )),
            Command::GetEdid { scanout_id } => {
                check_scanout(scanout_id)?;
                let w = u16::try_from(self.config.width).unwrap_or(u16::MAX);
                let h = u16::try_from(self.config.height).unwrap_or(u16::MAX);
                let block = edid_block(w, h);
                let mut body = Vec::with_capacity(8 + EDID_AREA);
                body.extend_from_slice(&128u32.to_le_bytes());
                body.extend_from_slice(&[0; 4]);
                body.extend_from_slice(&block);
                body.resize(8 + EDID_AREA, 0);
                Ok(Reply::Data(resp::OK_EDID, body))
            }
            Command::ResourceCreate2d {
                resource_id,
                format,
                width,
                height,
            } => self.create_2d(resource_id, format, width, height),
            Command::ResourceUnref { resource_id } => {
                let res = self
                    .resources
                    .remove(&resource_id)
                    .ok_or(resp::ERR_INVALID_RESOURCE_ID)?;
                self.host_bytes = self.host_bytes.saturating_sub(res.pixels.len() as u64);
                if self.scanout.is_some_and(|s| s.resource_id == resource_id) {
                    self.scanout = None;
                }
                if self.cursor.resource_id == resource_id {
                    self.cursor.resource_id = 0;
                }
                Ok(Reply::NoData)
            }
            Command::AttachBacking {
                resource_id,
                entries,
            } => {
                let res = self
                    .resources
                    .get_mut(&resource_id)
                    .ok_or(resp::ERR_INVALID_RESOURCE_ID)?;
                if !res.backing.is_empty() {
                    return Err(resp::ERR_UNSPEC);
                }
                let in_ram = |e: &MemEntry| {
                    e.len > 0 && mem.check_range(GuestAddress(e.addr), e.len as usize)
                };
                if !entries.iter().all(in_ram) {
                    return Err(resp::ERR_INVALID_PARAMETER);
                }
                res.backing = entries;
                Ok(Reply::NoData)
            }
            Command::DetachBacking { resource_id } => {
                let res = self
                    .resources
                    .get_mut(&resource_id)
                    .ok_or(resp::ERR_INVALID_RESOURCE_ID)?;
                if res.backing.is_empty() {
                    return Err(resp::ERR_UNSPEC);
                }
                res.backing.clear();
                Ok(Reply::NoData)
            }
            Command::SetScanout {
                rect,
                scanout_id,
                resource_id,
            } => {
                check_scanout(scanout_id)?;
                if resource_id == 0 {
                    self.scanout = None;
                    return Ok(Reply::NoData);
                }
                let res = self
                    .resources
                    .get(&resource_id)
                    .ok_or(resp::ERR_INVALID_RESOURCE_ID)?;
                if rect.is_empty() || !rect.fits_in(res.width, res.height) {
                    return Err(resp::ERR_INVALID_PARAMETER);
                }
                self.scanout = Some(Scanout { resource_id, rect });
                self.add_damage(&[Rect::sized(rect.width, rect.height)]);
                Ok(Reply::NoData)
            }
            Command::TransferToHost2d {
                rect,
                offset,
                resource_id,
            } => self.transfer(mem, rect, offset, resource_id),
            Command::ResourceFlush { rect, resource_id } => {
                let res = self
                    .resources
                    .get_mut(&resource_id)
                    .ok_or(resp::ERR_INVALID_RESOURCE_ID)?;
                if !rect.fits_in(res.width, res.height) {
                    return Err(resp::ERR_INVALID_PARAMETER);
                }
                if let Some(s) = self.scanout.filter(|s| s.resource_id == resource_id) {
                    if let Some(hit) = rect.intersect(&s.rect) {
                        let changed: Vec<Rect> = res
                            .changed
                            .take(hit)
                            .into_iter()
                            .map(|r| Rect {
                                x: r.x - s.rect.x,
                                y: r.y - s.rect.y,
                                ..r
                            })
                            .collect();
                        self.add_damage(&changed);
                    }
                }
                Ok(Reply::NoData)
            }
            Command::UpdateCursor {
                pos,
                resource_id,
                hot_x,
                hot_y,
            } => {
                check_scanout(pos.scanout_id)?;
                if resource_id != 0 {
                    let res = self
                        .resources
                        .get(&resource_id)
                        .ok_or(resp::ERR_INVALID_RESOURCE_ID)?;
                    if hot_x >= res.width || hot_y >= res.height {
                        return Err(resp::ERR_INVALID_PARAMETER);
                    }
                }
                self.cursor = Cursor {
                    resource_id,
                    hot_x,
                    hot_y,
                    x: pos.x,
                    y: pos.y,
                };
                Ok(Reply::NoData)
            }
            Command::MoveCursor {
                pos: CursorPos { scanout_id, x, y },
            } => {
                check_scanout(scanout_id)?;
                self.cursor.x = x;
                self.cursor.y = y;
                Ok(Reply::NoData)
            }
        }
    }

    fn create_2d(
        &mut self,
        resource_id: u32,
        fmt: u32,
        width: u32,
        height: u32,
    ) -> Result<Reply, ErrorCode> {
        if resource_id == 0 || self.resources.contains_key(&resource_id) {
            return Err(resp::ERR_INVALID_RESOURCE_ID);
        }
        let dims_ok = (1..=MAX_DIMENSION).contains(&width) && (1..=MAX_DIMENSION).contains(&height);
        if format::rgb_offsets(fmt).is_none() || !dims_ok {
            return Err(resp::ERR_INVALID_PARAMETER);
        }
        let bytes = u64::from(width) * u64::from(height) * u64::from(BYTES_PER_PIXEL);
        let over_count = self.resources.len() >= self.config.max_resources as usize;
        let over_bytes = self.host_bytes.saturating_add(bytes) > self.config.max_host_bytes;
        if over_count || over_bytes {
            return Err(resp::ERR_OUT_OF_MEMORY);
        }
        let len = usize::try_from(bytes).map_err(|_| resp::ERR_OUT_OF_MEMORY)?;
        let mut pixels = Vec::new();
        pixels
            .try_reserve_exact(len)
            .map_err(|_| resp::ERR_OUT_OF_MEMORY)?;
        pixels.resize(len, 0);
        self.resources.insert(
            resource_id,
            Resource::new(fmt, width, height, pixels, Vec::new()),
        );
        self.host_bytes += bytes;
        Ok(Reply::NoData)
    }

    /// Copies `rect` of the resource from its backing: row `r` of the rectangle starts at
    /// `offset + r * stride` in the backing (as Linux and QEMU lay it out).
    fn transfer(
        &mut self,
        mem: &GuestMem,
        rect: Rect,
        offset: u64,
        resource_id: u32,
    ) -> Result<Reply, ErrorCode> {
        let res = self
            .resources
            .get_mut(&resource_id)
            .ok_or(resp::ERR_INVALID_RESOURCE_ID)?;
        if res.backing.is_empty() {
            return Err(resp::ERR_UNSPEC);
        }
        if !rect.fits_in(res.width, res.height) {
            return Err(resp::ERR_INVALID_PARAMETER);
        }
        let stride = res.stride();
        let bpp = BYTES_PER_PIXEL as usize;
        let row_len = rect.width as usize * bpp;
        let backing = Backing::new(&res.backing);
        // Check the whole transfer first, so a bad one changes nothing.
        let last_row_end = u64::from(rect.height.saturating_sub(1))
            .checked_mul(stride as u64)
            .and_then(|v| v.checked_add(offset))
            .and_then(|v| v.checked_add(row_len as u64));
        if rect.height > 0 && last_row_end.is_none_or(|end| end > backing.total) {
            return Err(resp::ERR_INVALID_PARAMETER);
        }
        // Each row is read aside and compared with the host copy, tile by tile, so the
        // flush that follows damages only the tiles whose pixels changed. `row_len` is at
        // most a resource's row (checked above), so the buffer stays within its bound.
        let line = &mut self.line;
        line.resize(row_len, 0);
        for row in 0..rect.height {
            let src = offset + u64::from(row) * stride as u64;
            let dst = (rect.y + row) as usize * stride + rect.x as usize * bpp;
            let Some(out) = res.pixels.get_mut(dst..dst + row_len) else {
                return Err(resp::ERR_INVALID_PARAMETER);
            };
            if !backing.read(mem, src, line) {
                return Err(resp::ERR_UNSPEC);
            }
            if out == line.as_slice() {
                continue;
            }
            // Tile by tile: [x, next tile boundary) in pixels.
            let mut x = rect.x;
            while x < rect.x + rect.width {
                let end = ((x / TILE + 1) * TILE).min(rect.x + rect.width);
                let a = (x - rect.x) as usize * bpp;
                let b = (end - rect.x) as usize * bpp;
                if out[a..b] != line[a..b] {
                    res.changed.mark(x, rect.y + row);
                }
                x = end;
            }
            out.copy_from_slice(line);
        }
        Ok(Reply::NoData)
    }

    /// Counts a flush that reached the scanout and records what it changed (maybe nothing).
    fn add_damage(&mut self, rects: &[Rect]) {
        self.flushes += 1;
        for &rect in rects {
            if self.damage_log.len() >= MAX_DAMAGE_LOG {
                if let Some((n, _)) = self.damage_log.pop_front() {
                    self.damage_floor = n;
                }
            }
            self.damage_log.push_back((self.flushes, rect));
            if self.damage.len() >= MAX_DAMAGE_RECTS {
                let all = self.damage.iter().fold(rect, |acc, r| acc.union(r));
                self.damage = vec![all];
            } else {
                self.damage.push(rect);
            }
        }
    }
}

fn check_scanout(scanout_id: u32) -> Result<(), ErrorCode> {
    if scanout_id == 0 {
        Ok(())
    } else {
        Err(resp::ERR_INVALID_SCANOUT_ID)
    }
}

/// A resource's backing as one byte range, gathered from its entries.
struct Backing<'a> {
    entries: &'a [MemEntry],
    /// Offset in the backing where each entry starts.
    starts: Vec<u64>,
    total: u64,
}

impl<'a> Backing<'a> {
    fn new(entries: &'a [MemEntry]) -> Self {
        let mut starts = Vec::with_capacity(entries.len());
        let mut total = 0u64;
        for e in entries {
            starts.push(total);
            total += u64::from(e.len);
        }
        Backing {
            entries,
            starts,
            total,
        }
    }

    /// Fills `out` from backing offset `at`; false if it leaves the backing or guest RAM.
    fn read(&self, mem: &GuestMem, mut at: u64, out: &mut [u8]) -> bool {
        let mut done = 0;
        while done < out.len() {
            let i = self.starts.partition_point(|&s| s <= at).saturating_sub(1);
            let (Some(e), Some(&start)) = (self.entries.get(i), self.starts.get(i)) else {
                return false;
            };
            let inner = at - start;
            if inner >= u64::from(e.len) {
                return false;
            }
            let avail = usize::try_from(u64::from(e.len) - inner).unwrap_or(usize::MAX);
            let n = avail.min(out.len() - done);
            let Some(dst) = out.get_mut(done..done + n) else {
                return false;
            };
            let Some(addr) = e.addr.checked_add(inner) else {
                return false;
            };
            if mem.read_slice(dst, GuestAddress(addr)).is_err() {
                return false;
            }
            done += n;
            at += n as u64;
        }
        true
    }
}
