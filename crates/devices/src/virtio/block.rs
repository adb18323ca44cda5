//! virtio-blk over a raw disk image file.
//!
//! Requests: IN (read), OUT (write; refused on a read-only disk), FLUSH (`fdatasync` of the
//! image before completion) and GET_ID; anything else is answered UNSUPP. A request is read as
//! byte streams: the 16-byte header from the start of the device-readable part, the status byte
//! as the last device-writable byte, and the data in between, whatever the descriptor layout.
//! An encrypted disk ([`Block::with_encryption`]) is en- and decrypted sector by sector in the
//! bounce buffer ([`crypt`]): guest memory and the host file never share a buffer.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmm_sys_util::epoll::Epoll;

use super::chain::Chain;
use super::control::{parse_request, ControlError, DeviceControl};
use super::worker::{DeviceWorker, Popped, VirtQueue, COMMON_FEATURES};
use super::{
    device_type, ActivateError, Activation, DeviceCounters, Interrupt, VirtioBase, VirtioDevice,
};
use crate::GuestMem;
use crypt::{DiskKey, SectorCipher};

pub mod crypt;
pub mod dirty;
pub use dirty::DirtyChunks;

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Queue size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest data transfer accepted in one request.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// Length of the GET_ID string.
pub const ID_LEN: usize = 20;

/// `VIRTIO_BLK_F_SEG_MAX`.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
/// `VIRTIO_BLK_F_RO`.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// `VIRTIO_BLK_F_BLK_SIZE`.
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
/// `VIRTIO_BLK_F_FLUSH`.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

/// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Status values.
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

const HEADER_LEN: usize = 16;
/// `blk_size` in the config space: the sector size.
const BLK_SIZE: u32 = 512;
const _: () = assert!(BLK_SIZE as u64 == SECTOR_SIZE);
/// Size of the config space we expose (up to and including `blk_size`).
const CONFIG_LEN: usize = 24;

/// Why a block device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened or inspected.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The image size is not a whole number of sectors.
    #[error("disk image {path} is {size} bytes, not a multiple of 512")]
    Size { path: PathBuf, size: u64 },
    /// The serial id is longer than 20 bytes.
    #[error("block device id {0:?} is longer than 20 bytes")]
    IdTooLong(String),
}

/// A virtio block device backed by a raw image file.
pub struct Block {
    file: Arc<File>,
    path: PathBuf,
    read_only: bool,
    capacity_bytes: u64,
    id: [u8; ID_LEN],
    dirty: Arc<DirtyChunks>,
    cipher: Option<Arc<SectorCipher>>,
    base: VirtioBase,
}

impl Block {
    /// Opens the raw image at `path` (read-only or read-write). `id` is the GET_ID string; by
    /// default it is derived from the file's device and inode numbers.
    pub fn new(path: &Path, read_only: bool, id: Option<String>) -> Result<Block, BlockError> {
        let open_err = |source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        };
        // A FIFO would block here, /dev/zero would pass for an empty disk: regular files only.
        let file = hostfs::open_regular(path, !read_only).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let size = meta.len();
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::Size {
                path: path.to_path_buf(),
                size,
            });
        }
        let id_string = match id {
            Some(id) if id.len() > ID_LEN => return Err(BlockError::IdTooLong(id)),
            Some(id) => id,
            None => format!("{:x}{:x}", meta.dev(), meta.ino()),
        };
        let mut id = [0u8; ID_LEN];
        let n = id_string.len().min(ID_LEN);
        id[..n].copy_from_slice(&id_string.as_bytes()[..n]);
        let ro = if read_only { VIRTIO_BLK_F_RO } else { 0 };
        let features = COMMON_FEATURES
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | ro;
        Ok(Block {
            file: Arc::new(file),
            path: path.to_path_buf(),
            read_only,
            capacity_bytes: size,
            id,
            dirty: Arc::new(DirtyChunks::new(size)),
            cipher: None,
            base: VirtioBase::new(device_type::BLOCK, &[QUEUE_SIZE], features),
        })
    }

    /// Makes the image an encrypted one: AES-256-XTS under `key` (see [`crypt`]).
    pub fn with_encryption(mut self, key: &DiskKey) -> Block {
        self.cipher = Some(Arc::new(SectorCipher::new(key)));
        self
    }

    /// Whether the image is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.cipher.is_some()
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the guest may only read the disk.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The chunks of the image the guest wrote since live migration last took them (shared
    /// with the worker, which marks a chunk once a write to it has reached the image).
    pub fn dirty_chunks(&self) -> Arc<DirtyChunks> {
        self.dirty.clone()
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_bytes / SECTOR_SIZE
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&self.capacity_sectors().to_le_bytes());
        // size_max (8..12) is not offered; seg_max leaves room for header and status.
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c[20..24].copy_from_slice(&BLK_SIZE.to_le_bytes());
        c
    }

    fn new_worker(&self, act: Activation) -> Result<BlockWorker, ActivateError> {
        let queue = act
            .queues
            .into_iter()
            .next()
            .ok_or(ActivateError::BadQueue(0))?;
        Ok(BlockWorker {
            mem: act.mem.clone(),
            interrupt: act.interrupt,
            queue,
            io: BlockIo {
                mem: act.mem,
                counters: act.counters,
                file: self.file.clone(),
                read_only: self.read_only,
                capacity_bytes: self.capacity_bytes,
                id: self.id,
                dirty: self.dirty.clone(),
                cipher: self.cipher.clone(),
                buf: Vec::new(),
            },
        })
    }
}

impl VirtioDevice for Block {
    fn base(&self) -> &VirtioBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut VirtioBase {
        &mut self.base
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::pci::read_slice(&self.config(), offset, data);
    }

    fn control(&self) -> Option<Arc<dyn DeviceControl>> {
        Some(Arc::new(DiskHandle(self.dirty.clone())))
    }

    fn start(&mut self, act: Activation) -> Result<Box<dyn DeviceWorker>, ActivateError> {
        Ok(Box::new(self.new_worker(act)?))
    }
}

/// The host's handle on a block device: the chunks the guest wrote (for live migration).
/// Control request `{"op":"dirty_chunks"}` answers `{"chunks":N,"chunk_size":B}`, the
/// number marked now, without clearing them.
#[derive(Clone)]
pub struct DiskHandle(pub Arc<DirtyChunks>);

#[derive(serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum DiskRequest {
    DirtyChunks,
}

impl DeviceControl for DiskHandle {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn control(&self, request: &serde_json::Value) -> Result<serde_json::Value, ControlError> {
        match parse_request::<DiskRequest>(request)? {
            DiskRequest::DirtyChunks => Ok(serde_json::json!({
                "chunks": self.0.count(),
                "chunk_size": dirty::CHUNK_SIZE,
            })),
        }
    }
}

/// The block device's queue processing, run on its worker thread.
struct BlockWorker {
    /// Guest memory for the queue (the same as `io.mem`).
    mem: GuestMem,
    interrupt: Arc<dyn Interrupt>,
    queue: VirtQueue,
    io: BlockIo,
}

/// What executing requests needs: the image and the guest memory.
struct BlockIo {
    mem: GuestMem,
    counters: Arc<DeviceCounters>,
    file: Arc<File>,
    read_only: bool,
    capacity_bytes: u64,
    id: [u8; ID_LEN],
    dirty: Arc<DirtyChunks>,
    /// Set for an encrypted image.
    cipher: Option<Arc<SectorCipher>>,
    buf: Vec<u8>,
}

impl DeviceWorker for BlockWorker {
    fn queue_kicked(&mut self, _epoll: &Epoll, _queue: usize) {
        self.process_queue();
    }
}

impl BlockWorker {
    /// Handles every available request, then notifies the driver if needed.
    fn process_queue(&mut self) {
        let io = &mut self.io;
        self.queue
            .serve(&self.mem, &*self.interrupt, |popped| match popped {
                Popped::Chain(chain) => (chain.head, io.handle(&chain)),
                Popped::Malformed { head, error } => {
                    crate::guest_warn!("virtio-blk: malformed request: {error}");
                    io.counters.error();
                    (head, 0)
                }
            });
    }
}

impl BlockIo {
    /// Executes one request and writes its status; returns the used length.
    fn handle(&mut self, chain: &Chain) -> u32 {
        let Some(status_at) = chain.writable_len().checked_sub(1) else {
            crate::guest_warn!("virtio-blk: request without a status byte");
            return 0;
        };
        let (status, written) = match self.execute(chain, status_at) {
            Ok(moved) => {
                self.counters.request(moved.bytes as u64);
                (VIRTIO_BLK_S_OK, moved.written)
            }
            Err(status) => {
                self.counters.error();
                (status, 0)
            }
        };
        if chain.write_at(&self.mem, status_at, &[status]).is_err() {
            return 0;
        }
        // written <= status_at < writable_len <= u32::MAX.
        u32::try_from(written + 1).unwrap_or(0)
    }

    /// Executes the request; `data_w` is the number of device-writable bytes before the status.
    /// Returns what the request moved, or an error status.
    fn execute(&mut self, chain: &Chain, data_w: usize) -> Result<Moved, u8> {
        let mut header = [0u8; HEADER_LEN];
        chain
            .read_at(&self.mem, 0, &mut header)
            .map_err(|_| VIRTIO_BLK_S_IOERR)?;
        let (kind, sector) = parse_header(&header);
        let data_r = chain.readable_len().saturating_sub(HEADER_LEN);
        match kind {
            VIRTIO_BLK_T_IN => {
                if data_r != 0 {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let offset = self.check_range(sector, data_w)?;
                let buf = sized(&mut self.buf, data_w);
                self.file
                    .read_exact_at(buf, offset)
                    .map_err(|_| VIRTIO_BLK_S_IOERR)?;
                if let Some(cipher) = &self.cipher {
                    cipher
                        .decrypt(buf, sector)
                        .map_err(|_| VIRTIO_BLK_S_IOERR)?;
                }
                chain
                    .write_at(&self.mem, 0, buf)
                    .map_err(|_| VIRTIO_BLK_S_IOERR)?;
                Ok(Moved {
                    written: data_w,
                    bytes: data_w,
                })
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only || data_w != 0 {
                    return Err(VIRTIO_BLK_S_IOERR);
                }
                let offset = self.check_range(sector, data_r)?;
                let buf = sized(&mut self.buf, data_r);
                chain
                    .read_at(&self.mem, HEADER_LEN, buf)
                    .map_err(|_| VIRTIO_BLK_S_IOERR)?;
                if let Some(cipher) = &self.cipher {
                    cipher
                        .encrypt(buf, sector)
                        .map_err(|_| VIRTIO_BLK_S_IOERR)?;
                }
                // Marked even when the write fails part-way: some of it may have landed.
                let wrote = self.file.write_all_at(buf, offset);
                self.dirty.mark(offset, data_r as u64);
                wrote.map_err(|_| VIRTIO_BLK_S_IOERR)?;
                Ok(Moved {
                    written: 0,
                    bytes: data_r,
                })
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.read_only {
                    self.file.sync_data().map_err(|_| VIRTIO_BLK_S_IOERR)?;
                }
                Ok(Moved::default())
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = data_w.min(ID_LEN);
                chain
                    .write_at(&self.mem, 0, &self.id[..n])
                    .map_err(|_| VIRTIO_BLK_S_IOERR)?;
                Ok(Moved {
                    written: n,
                    bytes: 0,
                })
            }
            _ => Err(VIRTIO_BLK_S_UNSUPP),
        }
    }

    /// Checks that `len` bytes from `sector` are whole sectors inside the disk and within the
    /// per-request cap; returns the byte offset.
    fn check_range(&self, sector: u64, len: usize) -> Result<u64, u8> {
        if len > MAX_REQUEST_BYTES || !(len as u64).is_multiple_of(SECTOR_SIZE) {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or(VIRTIO_BLK_S_IOERR)?;
        let end = offset.checked_add(len as u64).ok_or(VIRTIO_BLK_S_IOERR)?;
        if end > self.capacity_bytes {
            return Err(VIRTIO_BLK_S_IOERR);
        }
        Ok(offset)
    }
}

/// What a request moved.
#[derive(Default)]
struct Moved {
    /// Bytes written to the driver's buffers before the status byte.
    written: usize,
    /// Bytes read from or written to the disk.
    bytes: usize,
}

/// The bounce buffer `buf`, sized to `len` (<= MAX_REQUEST_BYTES, checked by the caller).
fn sized(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    buf.resize(len, 0);
    buf.as_mut_slice()
}

fn parse_header(h: &[u8; HEADER_LEN]) -> (u32, u64) {
    let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
    (kind, sector)
}

#[cfg(test)]
mod tests;
