//! Requests to a running VM from other threads (the API socket): pause, resume, snapshot, stop,
//! stats, requests to one device by id. The requests themselves are defined in `vmm-api`.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use devices::bus::lock;

pub use vmm_api::control::Request;

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
