//! virtio-gpu in 2D mode: the device Linux's `virtio_gpu` DRM driver drives, with a control
//! queue and a cursor queue and one scanout in a portrait phone mode (720x1280 by default).
//!
//! [`protocol`] decodes what the driver writes without trusting it, [`state`] carries out each
//! command against per-device limits (resource count and host bytes), and a [`Display`] gives
//! the host the scanout's frame and the damage the guest flushed. The device's resources,
//! scanout and cursor are saved in snapshots ([`snapshot`]).

pub mod display;
pub mod edid;
pub mod protocol;
mod snapshot;
pub mod state;
mod tiles;

use std::sync::{Arc, Condvar, Mutex};

use vmm_sys_util::epoll::Epoll;

use super::control::DeviceControl;
use super::worker::{DeviceWorker, Popped, VirtQueue, COMMON_FEATURES};
use super::{device_type, ActivateError, Activation, DeviceCounters, Interrupt, StateError};
use super::{VirtioBase, VirtioDevice};
use crate::GuestMem;
use display::Shared;
pub use display::{Damage, Display, FlushWatcher, Frame};
use protocol::{decode, encode_response, resp, HDR_LEN, MAX_REQUEST_LEN};
use state::{GpuState, Reply};

/// `VIRTIO_GPU_F_EDID`: the device answers `GET_EDID`.
pub const VIRTIO_GPU_F_EDID: u64 = 1 << 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Size of the config space (`events_read`, `events_clear`, `num_scanouts`, `num_capsets`).
const CONFIG_SIZE: usize = 16;

/// What a virtio-gpu device offers and how much host memory a guest may make it use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuConfig {
    /// Display width in pixels.
    pub width: u32,
    /// Display height in pixels.
    pub height: u32,
    /// Most resources alive at once.
    pub max_resources: u32,
    /// Most host bytes all resources may take together.
    pub max_host_bytes: u64,
}

impl Default for GpuConfig {
    /// A 720x1280 portrait phone screen; 64 MiB is room for a dozen full-screen buffers.
    fn default() -> Self {
        GpuConfig {
            width: 720,
            height: 1280,
            max_resources: 256,
            max_host_bytes: 64 << 20,
        }
    }
}

/// Why a [`GpuConfig`] was refused.
#[derive(Debug, thiserror::Error)]
pub enum GpuConfigError {
    /// A display dimension is zero or larger than an EDID timing can describe.
    #[error("display size {0}x{1} is out of range (1..=4095 each)")]
    BadSize(u32, u32),
    /// The memory limit cannot hold one full-screen frame.
    #[error("gpu memory limit {0} bytes cannot hold one {1}x{2} frame")]
    LimitTooSmall(u64, u32, u32),
}

/// A virtio-gpu (2D) device.
pub struct Gpu {
    base: VirtioBase,
    shared: Arc<Shared>,
}

impl Gpu {
    /// A new, inactive device with `config`.
    pub fn new(config: GpuConfig) -> Result<Gpu, GpuConfigError> {
        let (w, h) = (config.width, config.height);
        if !(1..=4095).contains(&w) || !(1..=4095).contains(&h) {
            return Err(GpuConfigError::BadSize(w, h));
        }
        let frame = u64::from(w) * u64::from(h) * u64::from(state::BYTES_PER_PIXEL);
        if config.max_host_bytes < frame || config.max_resources == 0 {
            return Err(GpuConfigError::LimitTooSmall(config.max_host_bytes, w, h));
        }
        Ok(Gpu {
            base: VirtioBase::new(
                device_type::GPU,
                &[QUEUE_SIZE, QUEUE_SIZE],
                COMMON_FEATURES | VIRTIO_GPU_F_EDID,
            ),
            shared: Arc::new(Shared {
                state: Mutex::new(GpuState::new(config)),
                flushed: Condvar::new(),
                watchers: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The host's handle on this device's screen.
    pub fn display(&self) -> Display {
        Display {
            shared: self.shared.clone(),
        }
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[8..12].copy_from_slice(&1u32.to_le_bytes()); // num_scanouts
        c
    }
}

impl VirtioDevice for Gpu {
    fn base(&self) -> &VirtioBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut VirtioBase {
        &mut self.base
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let c = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| c.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn start(&mut self, act: Activation) -> Result<Box<dyn DeviceWorker>, ActivateError> {
        let mut queues = act.queues.into_iter();
        let control = queues.next().ok_or(ActivateError::BadQueue(0))?;
        let cursor = queues.next().ok_or(ActivateError::BadQueue(1))?;
        Ok(Box::new(GpuWorker {
            mem: act.mem,
            interrupt: act.interrupt,
            counters: act.counters,
            queues: [control, cursor],
            shared: self.shared.clone(),
            request: Vec::new(),
        }))
    }

    fn on_reset(&mut self) {
        // A reset destroys every resource (virtio 1.2, 5.7.4).
        self.shared.lock().clear();
    }

    fn control(&self) -> Option<Arc<dyn DeviceControl>> {
        Some(Arc::new(self.display()))
    }

    fn save_state(&self) -> Vec<u8> {
        snapshot::encode(&self.shared.lock())
    }

    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        let mut st = self.shared.lock();
        let generation = st.generation.wrapping_add(1);
        *st = snapshot::decode(bytes, st.config)?;
        st.generation = generation;
        Ok(())
    }
}

struct GpuWorker {
    mem: GuestMem,
    interrupt: Arc<dyn Interrupt>,
    counters: Arc<DeviceCounters>,
    /// The control queue and the cursor queue.
    queues: [VirtQueue; 2],
    shared: Arc<Shared>,
    /// Reused buffer for the request being served.
    request: Vec<u8>,
}

impl DeviceWorker for GpuWorker {
    fn queue_kicked(&mut self, _epoll: &Epoll, queue: usize) {
        let GpuWorker {
            mem,
            interrupt,
            counters,
            queues,
            shared,
            request,
        } = self;
        let Some(vq) = queues.get_mut(queue) else {
            return;
        };
        let is_cursor = queue == 1;
        let flushes_before = shared.lock().flushes;
        vq.serve(mem, &**interrupt, |popped| match popped {
            Popped::Chain(chain) => {
                let n = chain.readable_len().min(MAX_REQUEST_LEN);
                request.resize(n, 0);
                let response = if chain.read_at(mem, 0, request).is_err() {
                    None
                } else {
                    Some(serve_request(mem, shared, request))
                };
                let Some((ok, response)) = response else {
                    counters.error();
                    return (chain.head, 0);
                };
                if ok {
                    counters.request(n as u64);
                } else {
                    counters.error();
                }
                // The cursor queue carries no responses.
                if is_cursor || chain.writable_len() == 0 {
                    return (chain.head, 0);
                }
                if chain.writable_len() < response.len()
                    || chain.write_at(mem, 0, &response).is_err()
                {
                    crate::guest_warn!("virtio-gpu: response buffer too small");
                    counters.error();
                    return (chain.head, 0);
                }
                (chain.head, u32::try_from(response.len()).unwrap_or(0))
            }
            Popped::Malformed { head, error } => {
                crate::guest_warn!("virtio-gpu: malformed request: {error}");
                counters.error();
                (head, 0)
            }
        });
        if shared.lock().flushes != flushes_before {
            shared.flushed.notify_all();
            shared.wake_watchers();
        }
    }
}

/// Decodes and carries out one request; returns whether it succeeded and the response bytes.
fn serve_request(mem: &GuestMem, shared: &Shared, request: &[u8]) -> (bool, Vec<u8>) {
    let (hdr, command) = match decode(request) {
        Ok(decoded) => decoded,
        Err(e) => {
            crate::guest_warn!("virtio-gpu: bad request: {e}");
            let hdr = protocol::decode_header(request).unwrap_or_default();
            return (false, encode_response(&hdr, e.response(), &[]));
        }
    };
    debug_assert!(request.len() >= HDR_LEN);
    match shared.lock().execute(mem, command) {
        Ok(Reply::NoData) => (true, encode_response(&hdr, resp::OK_NODATA, &[])),
        Ok(Reply::Data(kind, body)) => (true, encode_response(&hdr, kind, &body)),
        Err(code) => (false, encode_response(&hdr, code, &[])),
    }
}

#[cfg(test)]
mod tests;
