//! The device's own snapshot state: resources (with their host pixels and backing), scanout
//! and cursor, in a versioned little-endian format that [`decode`] checks against the
//! device's limits before anything is replaced.

use std::collections::BTreeMap;

use super::protocol::{MemEntry, Rect};
use super::state::{format, Cursor, GpuState, Resource, Scanout, BYTES_PER_PIXEL, MAX_DIMENSION};
use super::GpuConfig;
use crate::virtio::StateError;

/// Format version written by [`encode`].
const VERSION: u8 = 1;

/// Serializes `s` (a paused device's state).
pub(crate) fn encode(s: &GpuState) -> Vec<u8> {
    let mut v = vec![VERSION];
    let u32s = |v: &mut Vec<u8>, xs: &[u32]| {
        for x in xs {
            v.extend_from_slice(&x.to_le_bytes());
        }
    };
    match s.scanout {
        Some(Scanout { resource_id, rect }) => u32s(
            &mut v,
            &[resource_id, rect.x, rect.y, rect.width, rect.height],
        ),
        None => u32s(&mut v, &[0, 0, 0, 0, 0]),
    }
    let c = s.cursor;
    u32s(&mut v, &[c.resource_id, c.hot_x, c.hot_y, c.x, c.y]);
    u32s(
        &mut v,
        &[u32::try_from(s.resources.len()).unwrap_or(u32::MAX)],
    );
    for (&id, r) in &s.resources {
        let n = u32::try_from(r.backing.len()).unwrap_or(u32::MAX);
        u32s(&mut v, &[id, r.format, r.width, r.height, n]);
        for e in &r.backing {
            v.extend_from_slice(&e.addr.to_le_bytes());
            v.extend_from_slice(&e.len.to_le_bytes());
        }
        v.extend_from_slice(&r.pixels);
    }
    v
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes(&mut self, n: usize) -> Result<&[u8], StateError> {
        if n > self.0.len() {
            return Err(StateError::Invalid("gpu state is truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, StateError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, StateError> {
        let lo = u64::from(self.u32()?);
        let hi = u64::from(self.u32()?);
        Ok(lo | hi << 32)
    }
}

/// Parses `bytes` into the state of a device configured with `config`, refusing anything
/// the device itself would not have accepted from a driver.
pub(crate) fn decode(bytes: &[u8], config: GpuConfig) -> Result<GpuState, StateError> {
    let (&version, rest) = bytes
        .split_first()
        .ok_or(StateError::Invalid("empty gpu state"))?;
    if version != VERSION {
        return Err(StateError::Version(version));
    }
    let mut r = Reader(rest);
    let mut s = GpuState::new(config);
    let [sid, sx, sy, sw, sh] = [r.u32()?, r.u32()?, r.u32()?, r.u32()?, r.u32()?];
    let scanout = (sid != 0).then_some(Scanout {
        resource_id: sid,
        rect: Rect {
            x: sx,
            y: sy,
            width: sw,
            height: sh,
        },
    });
    s.cursor = Cursor {
        resource_id: r.u32()?,
        hot_x: r.u32()?,
        hot_y: r.u32()?,
        x: r.u32()?,
        y: r.u32()?,
    };
    let count = r.u32()?;
    if count > config.max_resources {
        return Err(StateError::Invalid("more gpu resources than the limit"));
    }
    let mut resources = BTreeMap::new();
    let mut host_bytes = 0u64;
    for _ in 0..count {
        let [id, fmt, width, height, entries] = [r.u32()?, r.u32()?, r.u32()?, r.u32()?, r.u32()?];
        let dims_ok = (1..=MAX_DIMENSION).contains(&width) && (1..=MAX_DIMENSION).contains(&height);
        if id == 0 || format::rgb_offsets(fmt).is_none() || !dims_ok {
            return Err(StateError::Invalid("bad gpu resource"));
        }
        if entries as usize > super::protocol::MAX_BACKING_ENTRIES {
            return Err(StateError::Invalid("too many gpu backing entries"));
        }
        let mut backing = Vec::with_capacity(entries as usize);
        for _ in 0..entries {
            backing.push(MemEntry {
                addr: r.u64()?,
                len: r.u32()?,
            });
        }
        let len = u64::from(width) * u64::from(height) * u64::from(BYTES_PER_PIXEL);
        host_bytes += len;
        if host_bytes > config.max_host_bytes {
            return Err(StateError::Invalid("gpu resources over the memory limit"));
        }
        let len = usize::try_from(len).map_err(|_| StateError::Invalid("bad gpu resource"))?;
        let pixels = r.bytes(len)?.to_vec();
        let res = Resource::new(fmt, width, height, pixels, backing);
        if resources.insert(id, res).is_some() {
            return Err(StateError::Invalid("duplicate gpu resource"));
        }
    }
    if !r.0.is_empty() {
        return Err(StateError::Length {
            got: bytes.len(),
            expected: bytes.len() - r.0.len(),
        });
    }
    if let Some(sc) = scanout {
        let res = resources
            .get(&sc.resource_id)
            .ok_or(StateError::Invalid("gpu scanout shows no resource"))?;
        if sc.rect.is_empty() || !sc.rect.fits_in(res.width, res.height) {
            return Err(StateError::Invalid("gpu scanout outside its resource"));
        }
        // The host sees the whole frame again after a restore.
        s.damage.push(Rect::sized(sc.rect.width, sc.rect.height));
    }
    if s.cursor.resource_id != 0 && !resources.contains_key(&s.cursor.resource_id) {
        return Err(StateError::Invalid("gpu cursor shows no resource"));
    }
    s.scanout = scanout;
    s.resources = resources;
    s.host_bytes = host_bytes;
    Ok(s)
}
