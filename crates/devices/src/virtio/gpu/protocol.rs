//! The virtio-gpu wire format (virtio 1.2, 5.7.6): command and response codes, the control
//! header, and [`decode`], which turns the bytes a driver wrote into a [`Command`] without
//! trusting any length or count in them.

/// Length of `virtio_gpu_ctrl_hdr`.
pub const HDR_LEN: usize = 24;
/// Length of one `virtio_gpu_mem_entry`.
pub const MEM_ENTRY_LEN: usize = 16;
/// Most backing entries one `RESOURCE_ATTACH_BACKING` may carry.
pub const MAX_BACKING_ENTRIES: usize = 16 << 10;
/// Longest request the device reads: an attach with the most entries.
pub const MAX_REQUEST_LEN: usize = HDR_LEN + 8 + MAX_BACKING_ENTRIES * MEM_ENTRY_LEN;
/// `VIRTIO_GPU_FLAG_FENCE`: the driver wants the fence id echoed once the command is done.
pub const FLAG_FENCE: u32 = 1;
/// Scanouts a `GET_DISPLAY_INFO` response describes (`VIRTIO_GPU_MAX_SCANOUTS`).
pub const MAX_SCANOUTS: usize = 16;

/// Command types.
pub mod cmd {
    pub const GET_DISPLAY_INFO: u32 = 0x0100;
    pub const RESOURCE_CREATE_2D: u32 = 0x0101;
    pub const RESOURCE_UNREF: u32 = 0x0102;
    pub const SET_SCANOUT: u32 = 0x0103;
    pub const RESOURCE_FLUSH: u32 = 0x0104;
    pub const TRANSFER_TO_HOST_2D: u32 = 0x0105;
    pub const RESOURCE_ATTACH_BACKING: u32 = 0x0106;
    pub const RESOURCE_DETACH_BACKING: u32 = 0x0107;
    pub const GET_EDID: u32 = 0x010a;
    pub const UPDATE_CURSOR: u32 = 0x0300;
    pub const MOVE_CURSOR: u32 = 0x0301;
}

/// Response types.
pub mod resp {
    pub const OK_NODATA: u32 = 0x1100;
    pub const OK_DISPLAY_INFO: u32 = 0x1101;
    pub const OK_EDID: u32 = 0x1104;
    pub const ERR_UNSPEC: u32 = 0x1200;
    pub const ERR_OUT_OF_MEMORY: u32 = 0x1201;
    pub const ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
    pub const ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
    pub const ERR_INVALID_PARAMETER: u32 = 0x1205;
}

/// `virtio_gpu_ctrl_hdr`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Command or response type.
    pub kind: u32,
    /// `FLAG_FENCE` and friends.
    pub flags: u32,
    /// Fence to signal (echoed in the response).
    pub fence_id: u64,
    /// 3D context (unused in 2D, echoed).
    pub ctx_id: u32,
    /// Fence ring index (echoed).
    pub ring_idx: u8,
}

/// A rectangle in pixels (`virtio_gpu_rect`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

impl Rect {
    /// A rectangle of `width` x `height` at the origin.
    pub fn sized(width: u32, height: u32) -> Rect {
        Rect {
            x: 0,
            y: 0,
            width,
            height,
        }
    }

    /// Whether it covers no pixel.
    pub fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }

    /// Whether it lies inside a `width` x `height` area (no overflow possible).
    pub fn fits_in(&self, width: u32, height: u32) -> bool {
        self.x.checked_add(self.width).is_some_and(|r| r <= width)
            && self.y.checked_add(self.height).is_some_and(|b| b <= height)
    }

    /// The part of `self` inside `other`, if any (both must be valid rectangles).
    pub fn intersect(&self, other: &Rect) -> Option<Rect> {
        let x0 = self.x.max(other.x);
        let y0 = self.y.max(other.y);
        let x1 = self
            .x
            .saturating_add(self.width)
            .min(other.x.saturating_add(other.width));
        let y1 = self
            .y
            .saturating_add(self.height)
            .min(other.y.saturating_add(other.height));
        (x1 > x0 && y1 > y0).then(|| Rect {
            x: x0,
            y: y0,
            width: x1 - x0,
            height: y1 - y0,
        })
    }

    /// The smallest rectangle covering both.
    pub fn union(&self, other: &Rect) -> Rect {
        let x0 = self.x.min(other.x);
        let y0 = self.y.min(other.y);
        let x1 = self
            .x
            .saturating_add(self.width)
            .max(other.x.saturating_add(other.width));
        let y1 = self
            .y
            .saturating_add(self.height)
            .max(other.y.saturating_add(other.height));
        Rect {
            x: x0,
            y: y0,
            width: x1 - x0,
            height: y1 - y0,
        }
    }
}

/// One guest-memory range of a resource's backing (`virtio_gpu_mem_entry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemEntry {
    pub addr: u64,
    pub len: u32,
}

/// Where the cursor is (`virtio_gpu_cursor_pos`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CursorPos {
    pub scanout_id: u32,
    pub x: u32,
    pub y: u32,
}

/// A decoded command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    GetDisplayInfo,
    GetEdid {
        scanout_id: u32,
    },
    ResourceCreate2d {
        resource_id: u32,
        format: u32,
        width: u32,
        height: u32,
    },
    ResourceUnref {
        resource_id: u32,
    },
    SetScanout {
        rect: Rect,
        scanout_id: u32,
        resource_id: u32,
    },
    ResourceFlush {
        rect: Rect,
        resource_id: u32,
    },
    TransferToHost2d {
        rect: Rect,
        offset: u64,
        resource_id: u32,
    },
    AttachBacking {
        resource_id: u32,
        entries: Vec<MemEntry>,
    },
    DetachBacking {
        resource_id: u32,
    },
    UpdateCursor {
        pos: CursorPos,
        resource_id: u32,
        hot_x: u32,
        hot_y: u32,
    },
    MoveCursor {
        pos: CursorPos,
    },
}

/// Why a request could not be decoded; each maps to an error response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than the command needs.
    #[error("request of {got} bytes, command needs {need}")]
    Short { need: usize, got: usize },
    /// A command type this device does not implement.
    #[error("unknown command {0:#x}")]
    Unknown(u32),
    /// An attach with no entries or more than [`MAX_BACKING_ENTRIES`].
    #[error("{0} backing entries")]
    BadEntryCount(u32),
}

impl DecodeError {
    /// The response type the driver gets for it.
    pub fn response(&self) -> u32 {
        match self {
            DecodeError::BadEntryCount(_) => resp::ERR_INVALID_PARAMETER,
            _ => resp::ERR_UNSPEC,
        }
    }
}

/// Little-endian field reader over a request that never reads past its end.
struct Fields<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Fields<'_> {
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        let need = self.pos.saturating_add(n);
        if need > self.bytes.len() {
            return Err(DecodeError::Short {
                need,
                got: self.bytes.len(),
            });
        }
        Ok(())
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.need(N)?;
        let mut out = [0u8; N];
        if let Some(src) = self.bytes.get(self.pos..self.pos + N) {
            out.copy_from_slice(src);
        }
        self.pos += N;
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.take::<4>().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.take::<8>().map(u64::from_le_bytes)
    }

    fn rect(&mut self) -> Result<Rect, DecodeError> {
        Ok(Rect {
            x: self.u32()?,
            y: self.u32()?,
            width: self.u32()?,
            height: self.u32()?,
        })
    }

    fn cursor_pos(&mut self) -> Result<CursorPos, DecodeError> {
        let pos = CursorPos {
            scanout_id: self.u32()?,
            x: self.u32()?,
            y: self.u32()?,
        };
        self.u32()?; // padding
        Ok(pos)
    }
}

/// Decodes the header at the start of `bytes`.
pub fn decode_header(bytes: &[u8]) -> Result<Header, DecodeError> {
    let mut f = Fields { bytes, pos: 0 };
    let kind = f.u32()?;
    let flags = f.u32()?;
    let fence_id = f.u64()?;
    let ctx_id = f.u32()?;
    let [ring_idx, ..] = f.take::<4>()?;
    Ok(Header {
        kind,
        flags,
        fence_id,
        ctx_id,
        ring_idx,
    })
}

/// Decodes a whole request (header and body).
pub fn decode(bytes: &[u8]) -> Result<(Header, Command), DecodeError> {
    let hdr = decode_header(bytes)?;
    let mut f = Fields {
        bytes,
        pos: HDR_LEN,
    };
    let command = match hdr.kind {
        cmd::GET_DISPLAY_INFO => Command::GetDisplayInfo,
        cmd::GET_EDID => Command::GetEdid {
            scanout_id: f.u32()?,
        },
        cmd::RESOURCE_CREATE_2D => Command::ResourceCreate2d {
            resource_id: f.u32()?,
            format: f.u32()?,
            width: f.u32()?,
            height: f.u32()?,
        },
        cmd::RESOURCE_UNREF => Command::ResourceUnref {
            resource_id: f.u32()?,
        },
        cmd::SET_SCANOUT => Command::SetScanout {
            rect: f.rect()?,
            scanout_id: f.u32()?,
            resource_id: f.u32()?,
        },
        cmd::RESOURCE_FLUSH => Command::ResourceFlush {
            rect: f.rect()?,
            resource_id: f.u32()?,
        },
        cmd::TRANSFER_TO_HOST_2D => Command::TransferToHost2d {
            rect: f.rect()?,
            offset: f.u64()?,
            resource_id: f.u32()?,
        },
        cmd::RESOURCE_ATTACH_BACKING => {
            let resource_id = f.u32()?;
            let count = f.u32()?;
            let n = usize::try_from(count)
                .ok()
                .filter(|&n| n > 0 && n <= MAX_BACKING_ENTRIES)
                .ok_or(DecodeError::BadEntryCount(count))?;
            f.need(n * MEM_ENTRY_LEN)?;
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                let addr = f.u64()?;
                let len = f.u32()?;
                f.u32()?; // padding
                entries.push(MemEntry { addr, len });
            }
            Command::AttachBacking {
                resource_id,
                entries,
            }
        }
        cmd::RESOURCE_DETACH_BACKING => Command::DetachBacking {
            resource_id: f.u32()?,
        },
        cmd::UPDATE_CURSOR => Command::UpdateCursor {
            pos: f.cursor_pos()?,
            resource_id: f.u32()?,
            hot_x: f.u32()?,
            hot_y: f.u32()?,
        },
        cmd::MOVE_CURSOR => Command::MoveCursor {
            pos: f.cursor_pos()?,
        },
        other => return Err(DecodeError::Unknown(other)),
    };
    Ok((hdr, command))
}

/// A response of type `kind` to the request with header `req`, followed by `body`. The fence
/// and context are echoed as the spec asks.
pub fn encode_response(req: &Header, kind: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HDR_LEN + body.len());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&(req.flags & FLAG_FENCE).to_le_bytes());
    let fenced = req.flags & FLAG_FENCE != 0;
    out.extend_from_slice(&(if fenced { req.fence_id } else { 0 }).to_le_bytes());
    out.extend_from_slice(&req.ctx_id.to_le_bytes());
    out.extend_from_slice(&[req.ring_idx, 0, 0, 0]);
    out.extend_from_slice(body);
    out
}

/// The body of `RESP_OK_DISPLAY_INFO` for one enabled scanout of `width` x `height`.
pub fn display_info_body(width: u32, height: u32) -> Vec<u8> {
    let mut out = vec![0u8; MAX_SCANOUTS * 24];
    let mode = [0, 0, width, height, 1, 0];
    for (chunk, v) in out.chunks_exact_mut(4).zip(mode) {
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    out
}
