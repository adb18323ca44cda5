//! virtio-input: a keyboard or an absolute multi-touch screen (ABS_MT slots), with the config
//! space Linux's `virtio_input` driver reads (name, serial, ids, property, event and axis
//! bits) and an [`InputHandle`] through which the host injects events. Events wait in a
//! bounded queue until the driver posts buffers on the event queue; the status queue (LEDs)
//! is read and dropped. Snapshots carry the config selector and the undelivered events
//! ([`snapshot`]).

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::control::{parse_request, ControlError, DeviceControl};
use super::worker::{add_fd, DeviceWorker, Popped, VirtQueue, BACKEND_TOKEN_BASE, COMMON_FEATURES};
use super::{device_type, ActivateError, Activation, DeviceCounters, Interrupt, StateError};
use super::{VirtioBase, VirtioDevice};
use crate::GuestMem;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 64;
/// Most events waiting for the driver; more are refused.
pub const MAX_PENDING: usize = 4096;
/// Size of the config space (`select`, `subsel`, `size`, reserved, 128-byte union).
const CONFIG_SIZE: usize = 136;
const WAKE_TOKEN: u64 = BACKEND_TOKEN_BASE;

/// Linux event types and codes the devices use.
pub mod ev {
    pub const SYN: u16 = 0x00;
    pub const KEY: u16 = 0x01;
    pub const ABS: u16 = 0x03;
    pub const SYN_REPORT: u16 = 0;
    pub const BTN_TOUCH: u16 = 0x14a;
    pub const ABS_X: u16 = 0x00;
    pub const ABS_Y: u16 = 0x01;
    pub const ABS_MT_SLOT: u16 = 0x2f;
    pub const ABS_MT_POSITION_X: u16 = 0x35;
    pub const ABS_MT_POSITION_Y: u16 = 0x36;
    pub const ABS_MT_TRACKING_ID: u16 = 0x39;
    pub const INPUT_PROP_DIRECT: u16 = 0x01;
}

/// Config-space selectors (`virtio_input_config_select`).
mod select {
    pub const ID_NAME: u8 = 0x01;
    pub const ID_SERIAL: u8 = 0x02;
    pub const ID_DEVIDS: u8 = 0x03;
    pub const PROP_BITS: u8 = 0x10;
    pub const EV_BITS: u8 = 0x11;
    pub const ABS_INFO: u8 = 0x12;
}

/// One input event as the driver receives it (`virtio_input_event`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputEvent {
    pub kind: u16,
    pub code: u16,
    pub value: u32,
}

impl InputEvent {
    /// A `SYN_REPORT`, ending one batch of events.
    pub fn sync() -> Self {
        InputEvent {
            kind: ev::SYN,
            code: ev::SYN_REPORT,
            value: 0,
        }
    }

    fn bytes(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[..2].copy_from_slice(&self.kind.to_le_bytes());
        b[2..4].copy_from_slice(&self.code.to_le_bytes());
        b[4..].copy_from_slice(&self.value.to_le_bytes());
        b
    }
}

/// Which input device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// A keyboard (key codes 1..=255).
    Keyboard,
    /// A multi-touch screen of `width` x `height` with `slots` touch slots.
    Touch { width: u32, height: u32, slots: u32 },
}

/// The host refused to queue events.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The driver is not taking events fast enough (or not at all).
    #[error("input queue full: the guest is not reading its events")]
    Full,
    /// A touch outside the screen or a slot the device does not have.
    #[error("touch at ({x}, {y}) in slot {slot} is outside the device")]
    OutOfRange { slot: u32, x: u32, y: u32 },
}

struct Shared {
    pending: Mutex<VecDeque<InputEvent>>,
    wake: EventFd,
}

/// The host's handle for injecting events into one input device, from any thread.
#[derive(Clone)]
pub struct InputHandle {
    shared: Arc<Shared>,
    kind: InputKind,
}

impl InputHandle {
    /// Queues `events` (all or none) for the driver.
    pub fn send(&self, events: &[InputEvent]) -> Result<(), InputError> {
        let mut q = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if q.len() + events.len() > MAX_PENDING {
            return Err(InputError::Full);
        }
        q.extend(events.iter().copied());
        drop(q);
        if let Err(e) = self.shared.wake.write(1) {
            tracing::error!("cannot wake the virtio-input worker: {e}");
        }
        Ok(())
    }

    /// A key press (`down`) or release, then a sync.
    pub fn key(&self, code: u16, down: bool) -> Result<(), InputError> {
        let key = InputEvent {
            kind: ev::KEY,
            code,
            value: u32::from(down),
        };
        self.send(&[key, InputEvent::sync()])
    }

    /// Finger `slot` touches or moves to (`x`, `y`), then a sync.
    pub fn touch(&self, slot: u32, x: u32, y: u32) -> Result<(), InputError> {
        let InputKind::Touch {
            width,
            height,
            slots,
        } = self.kind
        else {
            return Err(InputError::OutOfRange { slot, x, y });
        };
        if slot >= slots || x >= width || y >= height {
            return Err(InputError::OutOfRange { slot, x, y });
        }
        let abs = |code, value| InputEvent {
            kind: ev::ABS,
            code,
            value,
        };
        self.send(&[
            abs(ev::ABS_MT_SLOT, slot),
            abs(ev::ABS_MT_TRACKING_ID, slot),
            abs(ev::ABS_MT_POSITION_X, x),
            abs(ev::ABS_MT_POSITION_Y, y),
            InputEvent {
                kind: ev::KEY,
                code: ev::BTN_TOUCH,
                value: 1,
            },
            abs(ev::ABS_X, x),
            abs(ev::ABS_Y, y),
            InputEvent::sync(),
        ])
    }

    /// Finger `slot` lifts (tracking id -1), then a sync.
    pub fn release(&self, slot: u32) -> Result<(), InputError> {
        let abs = |code, value| InputEvent {
            kind: ev::ABS,
            code,
            value,
        };
        self.send(&[
            abs(ev::ABS_MT_SLOT, slot),
            abs(ev::ABS_MT_TRACKING_ID, u32::MAX),
            InputEvent {
                kind: ev::KEY,
                code: ev::BTN_TOUCH,
                value: 0,
            },
            InputEvent::sync(),
        ])
    }
}

/// A control request to an input device: a key, a touch or a lift.
#[derive(serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum InputRequest {
    /// `{"op":"key","code":30,"down":true}`.
    Key { code: u16, down: bool },
    /// `{"op":"touch","slot":0,"x":10,"y":20}`.
    Touch { slot: u32, x: u32, y: u32 },
    /// `{"op":"release","slot":0}`.
    Release { slot: u32 },
}

impl DeviceControl for InputHandle {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn control(&self, request: &serde_json::Value) -> Result<serde_json::Value, ControlError> {
        let sent = match parse_request::<InputRequest>(request)? {
            InputRequest::Key { code, down } => self.key(code, down),
            InputRequest::Touch { slot, x, y } => self.touch(slot, x, y),
            InputRequest::Release { slot } => self.release(slot),
        };
        sent.map_err(|e| ControlError::Refused(e.to_string()))?;
        Ok(serde_json::json!({}))
    }
}

/// A virtio-input device.
pub struct Input {
    base: VirtioBase,
    kind: InputKind,
    shared: Arc<Shared>,
    select: u8,
    subsel: u8,
}

impl Input {
    /// A new, inactive device of `kind`.
    pub fn new(kind: InputKind) -> std::io::Result<Input> {
        Ok(Input {
            base: VirtioBase::new(
                device_type::INPUT,
                &[QUEUE_SIZE, QUEUE_SIZE],
                COMMON_FEATURES,
            ),
            kind,
            shared: Arc::new(Shared {
                pending: Mutex::new(VecDeque::new()),
                wake: EventFd::new(EFD_NONBLOCK)?,
            }),
            select: 0,
            subsel: 0,
        })
    }

    /// The host's injection handle.
    pub fn handle(&self) -> InputHandle {
        InputHandle {
            shared: self.shared.clone(),
            kind: self.kind,
        }
    }

    /// The union's bytes for the current `select`/`subsel` (empty: nothing there).
    fn selected(&self) -> Vec<u8> {
        let touch = matches!(self.kind, InputKind::Touch { .. });
        match (self.select, self.subsel) {
            (select::ID_NAME, 0) => match self.kind {
                InputKind::Keyboard => b"pocketvisor keyboard".to_vec(),
                InputKind::Touch { .. } => b"pocketvisor touchscreen".to_vec(),
            },
            (select::ID_SERIAL, 0) => b"pv-0001".to_vec(),
            (select::ID_DEVIDS, 0) => {
                let product: u16 = if touch { 2 } else { 1 };
                [0x06u16, 0x0627, product, 1]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect()
            }
            (select::PROP_BITS, 0) if touch => bitmap(&[ev::INPUT_PROP_DIRECT]),
            (select::EV_BITS, t) => match (u16::from(t), self.kind) {
                (ev::KEY, InputKind::Keyboard) => bitmap(&(1..=255).collect::<Vec<_>>()),
                (ev::KEY, InputKind::Touch { .. }) => bitmap(&[ev::BTN_TOUCH]),
                (ev::ABS, InputKind::Touch { .. }) => bitmap(&[
                    ev::ABS_X,
                    ev::ABS_Y,
                    ev::ABS_MT_SLOT,
                    ev::ABS_MT_POSITION_X,
                    ev::ABS_MT_POSITION_Y,
                    ev::ABS_MT_TRACKING_ID,
                ]),
                _ => Vec::new(),
            },
            (select::ABS_INFO, axis) => {
                let InputKind::Touch {
                    width,
                    height,
                    slots,
                } = self.kind
                else {
                    return Vec::new();
                };
                let max = match u16::from(axis) {
                    ev::ABS_X | ev::ABS_MT_POSITION_X => width.saturating_sub(1),
                    ev::ABS_Y | ev::ABS_MT_POSITION_Y => height.saturating_sub(1),
                    ev::ABS_MT_SLOT | ev::ABS_MT_TRACKING_ID => slots.saturating_sub(1),
                    _ => return Vec::new(),
                };
                [0u32, max, 0, 0, 0]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect()
            }
            _ => Vec::new(),
        }
    }
}

/// A bitmap (as the config space holds it) with `bits` set, trimmed after the last byte set.
fn bitmap(bits: &[u16]) -> Vec<u8> {
    let mut map = vec![0u8; 128];
    for &b in bits {
        if let Some(byte) = map.get_mut(usize::from(b / 8)) {
            *byte |= 1 << (b % 8);
        }
    }
    let len = map.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    map.truncate(len);
    map
}

impl VirtioDevice for Input {
    fn base(&self) -> &VirtioBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut VirtioBase {
        &mut self.base
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SIZE];
        let union = self.selected();
        config[0] = self.select;
        config[1] = self.subsel;
        config[2] = u8::try_from(union.len()).unwrap_or(128);
        for (dst, src) in config[8..].iter_mut().zip(&union) {
            *dst = *src;
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                Some(0) => self.select = b,
                Some(1) => self.subsel = b,
                _ => {}
            }
        }
    }

    fn start(&mut self, act: Activation) -> Result<Box<dyn DeviceWorker>, ActivateError> {
        let mut queues = act.queues.into_iter();
        let events = queues.next().ok_or(ActivateError::BadQueue(0))?;
        let status = queues.next().ok_or(ActivateError::BadQueue(1))?;
        Ok(Box::new(InputWorker {
            mem: act.mem,
            interrupt: act.interrupt,
            counters: act.counters,
            events,
            status,
            shared: self.shared.clone(),
        }))
    }

    fn control(&self) -> Option<Arc<dyn DeviceControl>> {
        Some(Arc::new(self.handle()))
    }

    fn save_state(&self) -> Vec<u8> {
        let pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        snapshot::encode(self.kind, self.select, self.subsel, &pending)
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), StateError> {
        let saved = snapshot::decode(self.kind, state)?;
        self.select = saved.select;
        self.subsel = saved.subsel;
        *self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = saved.pending;
        Ok(())
    }

    fn restored(&mut self) {
        // Events restored from the snapshot go out as soon as the driver has buffers.
        let waiting = !self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        if waiting {
            if let Err(e) = self.shared.wake.write(1) {
                tracing::error!("cannot wake the virtio-input worker: {e}");
            }
        }
    }

    fn on_reset(&mut self) {
        self.select = 0;
        self.subsel = 0;
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

struct InputWorker {
    mem: GuestMem,
    interrupt: Arc<dyn Interrupt>,
    counters: Arc<DeviceCounters>,
    events: VirtQueue,
    status: VirtQueue,
    shared: Arc<Shared>,
}

impl InputWorker {
    /// Hands pending events to the driver, one per buffer, while it has buffers.
    fn deliver(&mut self) {
        let InputWorker {
            mem,
            interrupt,
            counters,
            events,
            shared,
            ..
        } = self;
        let mut pending = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(event) = pending.front().copied() {
            let Some(popped) = events.pop(mem, &**interrupt) else {
                break;
            };
            let (head, used) = match popped {
                Popped::Chain(chain) => {
                    if chain.write_at(mem, 0, &event.bytes()).is_ok() {
                        pending.pop_front();
                        counters.request(8);
                        (chain.head, 8)
                    } else {
                        counters.error();
                        (chain.head, 0)
                    }
                }
                Popped::Malformed { head, error } => {
                    crate::guest_warn!("virtio-input: malformed event buffer: {error}");
                    counters.error();
                    (head, 0)
                }
            };
            if !events.complete(mem, &**interrupt, head, used) {
                break;
            }
        }
        drop(pending);
        events.notify(mem, &**interrupt);
    }
}

impl DeviceWorker for InputWorker {
    fn register(&mut self, epoll: &Epoll) -> std::io::Result<()> {
        add_fd(
            epoll,
            self.shared.wake.as_raw_fd(),
            WAKE_TOKEN,
            EventSet::IN,
        )
    }

    fn queue_kicked(&mut self, _epoll: &Epoll, queue: usize) {
        if queue == 0 {
            self.deliver();
        } else {
            // LED and other status updates: read and dropped.
            let InputWorker {
                mem,
                interrupt,
                status,
                ..
            } = self;
            status.serve(mem, &**interrupt, |popped| match popped {
                Popped::Chain(chain) => (chain.head, 0),
                Popped::Malformed { head, .. } => (head, 0),
            });
        }
    }

    fn backend_event(&mut self, _epoll: &Epoll, _token: u64, _events: EventSet) {
        // Drain the counter; a spurious wake-up (EAGAIN) is harmless.
        let _ = self.shared.wake.read();
        self.deliver();
    }
}

mod snapshot;
#[cfg(test)]
mod tests;
