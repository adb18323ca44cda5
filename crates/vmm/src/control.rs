//! Requests to a running VM from other threads (the API socket): pause, resume, snapshot, stop,
//! balloon, stats.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use devices::bus::lock;

/// What a controller can ask of the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Stop the vCPUs and device workers (the VM keeps its state).
    Pause,
    /// Let a paused VM run again.
    Resume,
    /// Pause and write a snapshot into `dir`; resume afterwards if `resume`.
    Snapshot { dir: PathBuf, resume: bool },
    /// End the VM (`Vm::run` returns `Stopped`).
    Stop,
    /// Set the balloon's target size (memory taken from the guest) in MiB.
    Balloon { target_mib: u64 },
    /// Memory figures as JSON: guest RAM and the balloon's state and guest statistics.
    Stats,
}

type Pending = (Request, Sender<Result<String, String>>);

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
    pub fn call(&self, req: Request) -> Result<String, String> {
        let (tx, rx) = channel();
        lock(&self.pending).push((req, tx));
        self.event
            .write(1)
            .map_err(|e| format!("cannot signal the VM: {e}"))?;
        rx.recv()
            .unwrap_or_else(|_| Err("the VM is no longer running".into()))
    }

    /// Takes the pending requests.
    pub(crate) fn take(&self) -> Vec<Pending> {
        let _ = self.event.read();
        std::mem::take(&mut *lock(&self.pending))
    }
}
