//! virtio-vsock with a Firecracker-style unix socket backend.
//!
//! The device listens on a unix socket. A host process connects and writes `CONNECT <port>\n`;
//! the device opens a stream to the guest's `port` from a fresh host port and, once the guest
//! accepts, answers `OK <host port>\n` and shuttles bytes both ways. A guest connecting to CID 2
//! port `P` is connected to the unix socket `<path>_<P>`. Queues: rx 0, tx 1, event 2 (unused).

mod conn;
mod muxer;
pub mod packet;

use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::worker::{DeviceWorker, COMMON_FEATURES};
use super::{device_type, ActivateError, Activation, VirtioBase, VirtioDevice};
use muxer::Muxer;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// Why a vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved (0, 1, 2) or does not fit in 32 bits.
    #[error("invalid guest CID {0} (must be 3..=0xFFFF_FFFE)")]
    BadCid(u64),
    /// The unix socket could not be created.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A virtio socket device.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: Arc<UnixListener>,
    base: VirtioBase,
    /// Restored from a snapshot: the driver's connections are gone; say so on activation.
    reset_on_activate: bool,
}

impl Vsock {
    /// A device for guest CID `guest_cid` whose host side listens on `uds_path` (a stale
    /// socket file there is removed first).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Vsock, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&guest_cid) {
            return Err(VsockError::BadCid(guest_cid));
        }
        let listen_err = |source| VsockError::Listen {
            path: uds_path.to_path_buf(),
            source,
        };
        match std::fs::remove_file(uds_path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(listen_err(e)),
            _ => {}
        }
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        Ok(Vsock {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener: Arc::new(listener),
            base: VirtioBase::new(device_type::VSOCK, &[QUEUE_SIZE; 3], COMMON_FEATURES),
            reset_on_activate: false,
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The host-side unix socket path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }
}

impl VirtioDevice for Vsock {
    fn base(&self) -> &VirtioBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut VirtioBase {
        &mut self.base
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::pci::read_slice(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn start(&mut self, act: Activation) -> Result<Box<dyn DeviceWorker>, ActivateError> {
        let mut muxer = Muxer::new(
            act.mem,
            act.interrupt,
            act.counters,
            act.queues,
            self.guest_cid,
            self.uds_path.clone(),
            self.listener.clone(),
        )
        .ok_or(ActivateError::BadQueue(0))?;
        if std::mem::take(&mut self.reset_on_activate) {
            muxer.owe_transport_reset();
        }
        Ok(Box::new(muxer))
    }

    fn restored(&mut self) {
        self.reset_on_activate = true;
    }

    fn config_may_change_at_restore(&self) -> bool {
        // The transport reset after a restore makes the driver read the guest CID again.
        true
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.base.stop_worker();
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

#[cfg(test)]
mod tests;
