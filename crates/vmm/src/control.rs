//! Requests to a running VM from other threads (the API socket): pause, resume, snapshot, stop,
//! stats, requests to one device by id. The requests themselves are defined in `vmm-api`.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use devices::bus::lock;

use crate::device_manager::DeviceRequestError;
pub use vmm_api::control::Request;

type Pending = (Request, Sender<Result<String, RequestError>>);

/// Why the VM did not carry out a control request.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The request could not be handed to the VM's thread.
    #[error("cannot signal the VM: {0}")]
    Signal(#[source] std::io::Error),
    /// The VM ended before it answered.
    #[error("the VM is no longer running")]
    Ended,
    /// A vCPU stopped while the VM was being paused.
    #[error("a vCPU has stopped; the VM is ending")]
    VcpuStopped,
    /// The vCPUs did not leave the guest in time.
    #[error("vCPUs did not stop within 5 s")]
    PauseTimeout,
    /// The snapshot stream's receiver could not be reached.
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The receiver's socket.
        path: std::path::PathBuf,
        /// Why not.
        #[source]
        source: std::io::Error,
    },
    /// Writing or sending the snapshot failed.
    #[error(transparent)]
    Snapshot(crate::Error),
    /// The migration failed or was refused (the error says where the guest runs).
    #[error(transparent)]
    Migration(crate::Error),
    /// The device request did not reach the device, or the device refused it.
    #[error(transparent)]
    Device(#[from] DeviceRequestError),
    /// The serial port refused the request.
    #[error(transparent)]
    Serial(#[from] devices::legacy::SerialControlError),
}

/// The channel between request senders and the thread running the VM.
pub struct Controller {
    pending: Mutex<Vec<Pending>>,
    /// Readable while requests are pending (the VM's run loop polls it).
    pub(crate) event: EventFd,
}

impl Controller {
    /// A controller to pass to [`crate::Vm::run_with_control`].
    pub fn new() -> std::io::Result<Arc<Controller>> {
        Ok(Arc::new(Controller {
            pending: Mutex::new(Vec::new()),
            event: EventFd::new(EFD_NONBLOCK)?,
        }))
    }

    /// Sends `req` and waits for the VM's answer: `Ok(details)` or `Err(reason)`.
    pub fn call(&self, req: Request) -> Result<String, RequestError> {
        let (tx, rx) = channel();
        lock(&self.pending).push((req, tx));
        self.event.write(1).map_err(RequestError::Signal)?;
        rx.recv().unwrap_or(Err(RequestError::Ended))
    }

    /// Takes the pending requests.
    pub(crate) fn take(&self) -> Vec<Pending> {
        let _ = self.event.read();
        std::mem::take(&mut *lock(&self.pending))
    }
}
