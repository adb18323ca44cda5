//! virtio-net over a TAP interface.
//!
//! Queues: rx 0, tx 1. No offloads and no mergeable rx buffers: every frame travels with the
//! 12-byte `virtio_net_hdr_v1` in front, which is also the TAP's vnet header. Headers from the
//! guest are replaced by a zeroed one before reaching the host (nothing was negotiated that
//! would give them meaning). The backend is behind [`NetBackend`] so the queue logic is testable
//! with a socket pair.
//!
//! A device may carry a network policy ([`Filter`], set with [`Net::with_filter`], replaced
//! while the guest runs through [`FilterHandle::replace`]): every frame both ways is checked
//! before it is sent to the backend or written into the guest's buffer; a refused frame is
//! dropped, counted, and reported in the log at most every 10 s. Its counts answer the
//! control request `{"op":"filter"}`; `{"op":"take_drops"}` hands the refusals tallied per
//! rule since the last one to the host's audit log. Without a policy a frame costs one
//! atomic load.

mod filter;
mod tap;

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use vmm_sys_util::epoll::{Epoll, EventSet};

pub use filter::{
    Direction, DropTally, Filter, FilterStats, IpNet, NamePattern, Proto, Rule, Verdict,
};
pub use tap::Tap;

use super::control::{ControlError, DeviceControl};
use super::worker::{add_fd, DeviceWorker, Popped, VirtQueue, BACKEND_TOKEN_BASE, COMMON_FEATURES};
use super::{
    device_type, ActivateError, Activation, DeviceCounters, Interrupt, VirtioBase, VirtioDevice,
};
use crate::GuestMem;

/// Length of `virtio_net_hdr_v1` (with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Largest Ethernet frame carried (64 KiB payload plus the Ethernet header).
pub const MAX_FRAME_LEN: usize = 65550;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// `VIRTIO_NET_F_MAC`.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_STATUS`.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// `VIRTIO_NET_S_LINK_UP`.
const VIRTIO_NET_S_LINK_UP: u16 = 1;

const RX: usize = 0;
const TX: usize = 1;
const BACKEND_TOKEN: u64 = BACKEND_TOKEN_BASE;

/// Why a network device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The interface name is empty, too long or contains NUL.
    #[error("invalid tap interface name {0:?}")]
    BadName(String),
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    /// TUNSETIFF failed (no permission to create the tap, or it is busy or not a tap).
    #[error("cannot attach to tap {0:?}: {1}")]
    SetIff(String, #[source] io::Error),
    /// TUNSETVNETHDRSZ failed.
    #[error("cannot set the tap's vnet header size: {0}")]
    SetVnetHdr(#[source] io::Error),
    /// No random bytes for a MAC address.
    #[error("cannot generate a MAC address: {0}")]
    Random(#[source] io::Error),
}

/// Where frames go: one `recv`/`send` is one frame with its 12-byte vnet header, and the fd
/// is non-blocking.
pub trait NetBackend: AsRawFd + Send + Sync + 'static {
    /// Receives one frame (header included) into `buf`.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one frame (header included).
    fn send(&self, buf: &[u8]) -> io::Result<usize>;
}

/// A virtio network device.
pub struct Net {
    backend: Arc<dyn NetBackend>,
    mac: [u8; 6],
    base: VirtioBase,
    filter: FilterHandle,
}

/// The filter, even if a thread panicked holding it (its state stays consistent).
fn lock(f: &Mutex<Option<Filter>>) -> MutexGuard<'_, Option<Filter>> {
    f.lock().unwrap_or_else(|p| p.into_inner())
}

/// A device's network policy, shared by its worker and the host, which may replace it while
/// the guest runs (a policy pushed to a running profile).
#[derive(Clone, Default)]
pub struct FilterHandle(Arc<FilterSlot>);

#[derive(Default)]
struct FilterSlot {
    /// Whether `filter` holds one: checked first, so an unfiltered frame takes no lock.
    installed: AtomicBool,
    filter: Mutex<Option<Filter>>,
    /// Refusals of a policy removed (replaced by none) not yet taken.
    left: Mutex<Vec<DropTally>>,
}

impl FilterHandle {
    /// Makes `filter` the policy (none: every frame passes), carrying the counts over. The
    /// flows the old policy allowed are forgotten: a connection the new rules allow goes on
    /// once its next frame is checked under them, one they refuse stops at once. Returns
    /// how many flows were forgotten.
    pub fn replace(&self, filter: Option<Filter>) -> usize {
        let mut slot = lock(&self.0.filter);
        let old = slot.take();
        let forgotten = old.as_ref().map_or(0, Filter::flow_count);
        *slot = match (filter, old) {
            (Some(new), Some(mut old)) => Some(new.with_counts_of(&mut old)),
            (None, Some(mut old)) => {
                let mut left = self.0.left.lock().unwrap_or_else(|p| p.into_inner());
                let room = filter::MAX_CARRIED_TALLIES.saturating_sub(left.len());
                left.extend(
                    old.take_drops_of_retired(", removed")
                        .into_iter()
                        .take(room),
                );
                None
            }
            (new, None) => new,
        };
        self.0.installed.store(slot.is_some(), Ordering::Release);
        forgotten
    }

    /// The frames refused since the last call, per rule (see [`Filter::take_drops`]), those
    /// of policies replaced or removed since included; the tallies start again from zero.
    pub fn take_drops(&self) -> Vec<DropTally> {
        let mut out = std::mem::take(&mut *self.0.left.lock().unwrap_or_else(|p| p.into_inner()));
        if let Some(f) = lock(&self.0.filter).as_mut() {
            out.extend(f.take_drops());
        }
        out
    }

    /// Whether a policy is installed.
    pub fn installed(&self) -> bool {
        self.0.installed.load(Ordering::Acquire)
    }
}

/// Opens the TAP `name` in this network namespace now, for a VM built later in this process
/// or a child forked from it (a jailed VMM's host TAP, opened before it enters its jail's
/// namespace): [`Net::new_tap`] of that name takes it. Returns its descriptor.
pub fn open_tap_ahead(name: &str) -> Result<std::os::fd::RawFd, NetError> {
    Tap::open_ahead(name)
}

/// Closes the TAPs [`open_tap_ahead`] opened that no device took.
pub fn forget_taps_ahead() {
    Tap::forget_ahead();
}

impl Net {
    /// A device on the TAP interface `name` (the one [`open_tap_ahead`] opened, or opened
    /// now, created if missing), with `mac` or a random locally administered address.
    pub fn new_tap(name: &str, mac: Option<[u8; 6]>) -> Result<Net, NetError> {
        let tap = Tap::open(name)?;
        Net::with_backend(Arc::new(tap), mac)
    }

    /// A device on any [`NetBackend`].
    pub fn with_backend(
        backend: Arc<dyn NetBackend>,
        mac: Option<[u8; 6]>,
    ) -> Result<Net, NetError> {
        let mac = match mac {
            Some(mac) => mac,
            None => random_mac().map_err(NetError::Random)?,
        };
        Ok(Net {
            backend,
            mac,
            base: VirtioBase::new(
                device_type::NET,
                &[QUEUE_SIZE, QUEUE_SIZE],
                COMMON_FEATURES | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS,
            ),
            filter: FilterHandle::default(),
        })
    }

    /// The device with a network policy checked on every frame both ways.
    pub fn with_filter(self, filter: Filter) -> Net {
        self.filter.replace(Some(filter));
        self
    }

    /// The handle that replaces the device's network policy while it runs.
    pub fn filter_handle(&self) -> FilterHandle {
        self.filter.clone()
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }
}

/// A random unicast, locally administered MAC address.
pub fn random_mac() -> io::Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    super::rng::fill_random(&mut mac)?;
    // Unicast, locally administered.
    mac[0] = (mac[0] & 0xFE) | 0x02;
    Ok(mac)
}

impl VirtioDevice for Net {
    fn base(&self) -> &VirtioBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut VirtioBase {
        &mut self.base
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        crate::pci::read_slice(&config, offset, data);
    }

    fn control(&self) -> Option<Arc<dyn DeviceControl>> {
        Some(Arc::new(FilterControl(self.filter.clone())))
    }

    fn config_may_change_at_restore(&self) -> bool {
        // A clone's fresh MAC (its config is the MAC and the constant link status, so the
        // MAC is all that can differ). Nothing makes a driver read it again: Linux keeps the
        // address it read at its probe until the next one; the probe guest watches it.
        true
    }

    fn start(&mut self, act: Activation) -> Result<Box<dyn DeviceWorker>, ActivateError> {
        let mut queues = act.queues.into_iter();
        let rx = queues.next().ok_or(ActivateError::BadQueue(0))?;
        let tx = queues.next().ok_or(ActivateError::BadQueue(1))?;
        Ok(Box::new(NetWorker {
            mem: act.mem,
            interrupt: act.interrupt,
            counters: act.counters,
            rx,
            tx,
            backend: self.backend.clone(),
            frame: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
            pending: None,
            readable: true,
            filter: self.filter.clone(),
        }))
    }
}

/// Answers `{"op":"filter"}` with the policy's counts (frames allowed and dropped each way,
/// flows remembered, the last refused frame; `installed` false and zeros without a policy),
/// and `{"op":"take_drops"}` with `{"drops":[{"rule","out","in","last"}]}`, the refusals per
/// rule since the last such request ([`FilterHandle::take_drops`]). Its typed handle ([`DeviceControl::as_any`]) is the [`FilterHandle`].
struct FilterControl(FilterHandle);

impl DeviceControl for FilterControl {
    fn control(&self, request: &serde_json::Value) -> Result<serde_json::Value, ControlError> {
        if *request == serde_json::json!({ "op": "take_drops" }) {
            let drops: Vec<serde_json::Value> = self
                .0
                .take_drops()
                .into_iter()
                .map(|t| serde_json::json!({"rule": t.rule, "out": t.out, "in": t.inn, "last": t.last}))
                .collect();
            return Ok(serde_json::json!({ "drops": drops }));
        }
        if *request != serde_json::json!({ "op": "filter" }) {
            return Err(ControlError::BadRequest(
                "this device takes {\"op\":\"filter\"}, {\"op\":\"take_drops\"}, \
                 {\"op\":\"set_filter\",\"filter\":...} (and counters)"
                    .into(),
            ));
        }
        let slot = lock(&self.0 .0.filter);
        let (s, flows, last) = match slot.as_ref() {
            Some(f) => (f.stats(), f.flow_count(), f.last_dropped()),
            None => (FilterStats::default(), 0, None),
        };
        Ok(serde_json::json!({
            "installed": slot.is_some(),
            "out_allowed": s.out_allowed,
            "out_dropped": s.out_dropped,
            "in_allowed": s.in_allowed,
            "in_dropped": s.in_dropped,
            "flows": flows,
            "last_dropped": last,
        }))
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(&self.0)
    }
}

/// Checks `frame` (vnet header first) against `filter`; false: drop it. Reports refusals in
/// the log, rate limited.
fn allowed(filter: &FilterHandle, frame: &[u8], dir: Direction) -> bool {
    if !filter.installed() {
        return true;
    }
    let now = Instant::now();
    let mut slot = lock(&filter.0.filter);
    let Some(f) = slot.as_mut() else {
        return true;
    };
    let verdict = f.check(frame.get(VNET_HDR_LEN..).unwrap_or_default(), dir, now);
    if verdict == Verdict::Deny {
        if let Some(report) = f.report_due(now) {
            tracing::warn!("virtio-net: {report}");
        }
    }
    verdict == Verdict::Allow
}

struct NetWorker {
    mem: GuestMem,
    interrupt: Arc<dyn Interrupt>,
    counters: Arc<DeviceCounters>,
    rx: VirtQueue,
    tx: VirtQueue,
    backend: Arc<dyn NetBackend>,
    /// Receive buffer for one frame from the backend.
    frame: Vec<u8>,
    /// Length of a received frame waiting for an rx buffer.
    pending: Option<usize>,
    /// The backend may have frames to read (edge-triggered: cleared only on EAGAIN).
    readable: bool,
    /// The network policy, if any.
    filter: FilterHandle,
}

impl DeviceWorker for NetWorker {
    fn register(&mut self, epoll: &Epoll) -> io::Result<()> {
        add_fd(
            epoll,
            self.backend.as_raw_fd(),
            BACKEND_TOKEN,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )
    }

    fn queue_kicked(&mut self, _epoll: &Epoll, queue: usize) {
        match queue {
            RX => self.process_rx(),
            TX => self.process_tx(),
            _ => {}
        }
    }

    fn backend_event(&mut self, _epoll: &Epoll, token: u64, _events: EventSet) {
        if token == BACKEND_TOKEN {
            self.readable = true;
            self.process_rx();
        }
    }
}

impl NetWorker {
    /// Moves frames from the backend into rx buffers until either runs out. A frame without
    /// a buffer waits in `pending` (and the backend is not read) until the driver adds one.
    fn process_rx(&mut self) {
        let interrupt = self.interrupt.clone();
        loop {
            let len = match self.pending {
                Some(len) => len,
                None => {
                    if !self.readable {
                        break;
                    }
                    match self.backend.recv(&mut self.frame) {
                        Ok(len) => len,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            if e.kind() != io::ErrorKind::WouldBlock {
                                crate::guest_warn!("virtio-net: backend read failed: {e}");
                            }
                            self.readable = false;
                            break;
                        }
                    }
                }
            };
            let Some(frame) = self
                .frame
                .get_mut(..len)
                .filter(|f| f.len() >= VNET_HDR_LEN)
            else {
                self.pending = None;
                continue;
            };
            if self.pending.is_none() && !allowed(&self.filter, frame, Direction::In) {
                continue;
            }
            self.pending = Some(len);
            let chain = match self.rx.pop(&self.mem, &*interrupt) {
                None => break,
                Some(Popped::Malformed { head, error }) => {
                    crate::guest_warn!("virtio-net: malformed rx buffer: {error}");
                    self.counters.error();
                    if !self.rx.complete(&self.mem, &*interrupt, head, 0) {
                        break;
                    }
                    continue;
                }
                Some(Popped::Chain(chain)) => chain,
            };
            if chain.writable_len() < len {
                // Too big for the buffer: drop the frame, keep the buffer for the next one.
                crate::guest_debug!("virtio-net: dropping {len}-byte frame, rx buffer too small");
                self.rx.undo_pop();
                self.pending = None;
                continue;
            }
            // Without negotiated offloads the header must be all zero (the tap may set
            // DATA_VALID), and num_buffers is 1 without mergeable buffers.
            frame[..10].fill(0);
            frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            let written = chain.write_at(&self.mem, 0, frame).is_ok();
            self.pending = None;
            // len <= VNET_HDR_LEN + MAX_FRAME_LEN fits in u32.
            let used_len = if written {
                u32::try_from(len).unwrap_or(0)
            } else {
                0
            };
            if written {
                self.counters.request(u64::from(used_len));
            } else {
                self.counters.error();
            }
            if !self
                .rx
                .complete(&self.mem, &*interrupt, chain.head, used_len)
            {
                break;
            }
        }
        self.rx.notify(&self.mem, &*interrupt);
    }

    /// Sends every frame the driver queued for transmission.
    fn process_tx(&mut self) {
        let NetWorker {
            mem,
            interrupt,
            counters,
            tx,
            backend,
            filter,
            ..
        } = self;
        let mut buf = Vec::new();
        tx.serve(mem, &**interrupt, |popped| match popped {
            Popped::Chain(chain) => {
                let len = chain.readable_len();
                if chain.writable_len() != 0
                    || !(VNET_HDR_LEN..=VNET_HDR_LEN + MAX_FRAME_LEN).contains(&len)
                {
                    crate::guest_debug!("virtio-net: dropping malformed tx chain of {len} bytes");
                    counters.error();
                    return (chain.head, 0);
                }
                buf.clear();
                buf.resize(len, 0);
                if chain.read_at(mem, 0, &mut buf).is_ok() {
                    // Nothing negotiated gives the header meaning: send a zeroed one.
                    buf[..VNET_HDR_LEN].fill(0);
                    if !allowed(filter, &buf, Direction::Out) {
                        return (chain.head, 0);
                    }
                    match backend.send(&buf) {
                        Ok(_) => counters.request(len as u64),
                        Err(e) => {
                            crate::guest_debug!("virtio-net: dropping tx frame: {e}");
                            counters.error();
                        }
                    }
                }
                (chain.head, 0)
            }
            Popped::Malformed { head, error } => {
                crate::guest_warn!("virtio-net: malformed tx chain: {error}");
                counters.error();
                (head, 0)
            }
        });
    }
}

#[cfg(test)]
mod tests;
