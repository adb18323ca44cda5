//! virtio-balloon (virtio 1.1 section 5.5): the host asks the guest to give memory back.
//!
//! - Inflate queue: arrays of 32-bit page frame numbers (4 KiB pages) the guest no longer uses;
//!   each page inside guest RAM is dropped from the host with `MADV_DONTNEED` (guest RAM is
//!   private memory, so the host frees it and the guest reads zeros on its next touch).
//! - Deflate queue: pages the guest takes back; nothing to do, they come back on touch.
//! - Stats queue (`VIRTIO_BALLOON_F_STATS_VQ`): the guest's memory statistics. The device keeps
//!   the driver's buffer and returns it when it wants fresh numbers ([`BalloonHandle::request_stats`]).
//! - Reporting queue (`VIRTIO_BALLOON_F_PAGE_REPORTING`): free page reporting; each buffer is a
//!   range of free guest memory, dropped from the host the same way (rounded inward to pages).
//!
//! Queue numbering follows the Linux driver (and QEMU): only queues whose feature was negotiated
//! exist and they are numbered consecutively, so the reporting queue is index 3 with the stats
//! queue and 2 without it. The spec's fixed numbering would put it at 4; the device never offers
//! free page hinting and declares only as many queues as its offered features can create
//! (`num_queues` 4), so a driver using fixed numbers finds no queue 4 and must fall back to the
//! consecutive ones too. Indices are mapped by the negotiated features at activation.
//!
//! The target size (`num_pages`) is set through a [`BalloonHandle`]; the driver writes how many
//! pages it holds (`actual`). No host access happens outside validated guest RAM ranges.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use self::worker::BalloonWorker;
use super::control::{parse_request, ControlError, DeviceControl};
use super::worker::{prepare_queues, DeviceWorker, VirtQueue, BACKEND_TOKEN_BASE, COMMON_FEATURES};
use super::{
    device_type, ActivateError, Activation, ActiveQueue, Interrupt, StateError, VirtioBase,
    VirtioDevice,
};
use crate::bus::lock;
use crate::GuestMem;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The balloon's page size: PFNs and `num_pages`/`actual` count 4 KiB pages.
pub const PAGE_SIZE: u64 = 4096;
/// Balloon pages per MiB.
const PAGES_PER_MIB: u64 = (1 << 20) / PAGE_SIZE;

/// `VIRTIO_BALLOON_F_STATS_VQ`: a statistics queue exists.
pub const VIRTIO_BALLOON_F_STATS_VQ: u64 = 1 << 1;
/// `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`: the guest deflates the balloon when it runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// `VIRTIO_BALLOON_F_FREE_PAGE_HINT` (never offered; it shifts queue numbers if negotiated).
pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u64 = 1 << 3;
/// `VIRTIO_BALLOON_F_PAGE_REPORTING`: a free page reporting queue exists.
pub const VIRTIO_BALLOON_F_PAGE_REPORTING: u64 = 1 << 5;

/// Config space: `num_pages` (le32) then `actual` (le32).
const CONFIG_SIZE: usize = 8;
const ACTUAL_OFFSET: u64 = 4;
/// Most PFNs handled per inflate/deflate buffer (Linux sends at most 256).
pub const MAX_PFNS_PER_CHAIN: usize = 1 << 16;
/// Most statistics entries kept from one report.
pub const MAX_STATS: usize = 64;
/// Size of one `virtio_balloon_stat` (le16 tag, le64 value, packed).
const STAT_SIZE: usize = 10;
/// PFNs read from guest memory at a time.
const PFN_CHUNK: usize = 1024;
/// Format of [`VirtioDevice::save_state`]: version, then the config space.
const STATE_VERSION: u8 = 1;
/// Longest a `stats` control request may wait for the driver.
pub const MAX_STATS_WAIT: Duration = Duration::from_secs(5);
/// Epoll token of the stats refresh eventfd.
const REFRESH_TOKEN: u64 = BACKEND_TOKEN_BASE;

/// Why a balloon request was refused.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// The target is larger than the guest's RAM.
    #[error("balloon target {target_mib} MiB is more than the guest's {ram_mib} MiB of RAM")]
    TooLarge {
        /// The requested target.
        target_mib: u64,
        /// The guest's RAM.
        ram_mib: u64,
    },
}

/// What the device offers the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Offer `VIRTIO_BALLOON_F_STATS_VQ`.
    pub stats: bool,
    /// Offer `VIRTIO_BALLOON_F_PAGE_REPORTING`.
    pub free_page_reporting: bool,
    /// Offer `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`.
    pub deflate_on_oom: bool,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        BalloonConfig {
            stats: true,
            free_page_reporting: true,
            deflate_on_oom: true,
        }
    }
}

/// What a queue is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRole {
    /// Pages the guest gives back.
    Inflate,
    /// Pages the guest takes back.
    Deflate,
    /// Memory statistics.
    Stats,
    /// Free page hinting (never offered, so never served).
    FreePageHint,
    /// Free page reporting.
    Reporting,
}

/// The role of queue `index` when `features` were negotiated: queues whose feature was not
/// negotiated do not exist, and the others are numbered consecutively (as Linux does).
pub fn queue_role(index: u16, features: u64) -> Option<QueueRole> {
    let optional = [
        (VIRTIO_BALLOON_F_STATS_VQ, QueueRole::Stats),
        (VIRTIO_BALLOON_F_FREE_PAGE_HINT, QueueRole::FreePageHint),
        (VIRTIO_BALLOON_F_PAGE_REPORTING, QueueRole::Reporting),
    ];
    [QueueRole::Inflate, QueueRole::Deflate]
        .into_iter()
        .chain(
            optional
                .into_iter()
                .filter(|&(bit, _)| features & bit != 0)
                .map(|(_, role)| role),
        )
        .nth(usize::from(index))
}

/// Name of a `virtio_balloon_stat` tag.
fn stat_name(tag: u16) -> String {
    const NAMES: [&str; 16] = [
        "swap_in",
        "swap_out",
        "major_faults",
        "minor_faults",
        "free_memory",
        "total_memory",
        "available_memory",
        "disk_caches",
        "hugetlb_allocations",
        "hugetlb_failures",
        "oom_kills",
        "alloc_stalls",
        "async_scans",
        "direct_scans",
        "async_reclaims",
        "direct_reclaims",
    ];
    NAMES
        .get(usize::from(tag))
        .map_or_else(|| format!("tag_{tag}"), |n| (*n).to_string())
}

/// Parses packed `virtio_balloon_stat` entries (trailing partial entry ignored).
pub fn parse_stats(raw: &[u8]) -> BTreeMap<String, u64> {
    raw.chunks_exact(STAT_SIZE)
        .take(MAX_STATS)
        .map(|e| {
            let (tag, val) = e.split_at(2);
            let tag = u16::from_le_bytes([tag[0], tag[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(val);
            (stat_name(tag), u64::from_le_bytes(v))
        })
        .collect()
}

/// The balloon's state, for the API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BalloonInfo {
    /// The target balloon size (`num_pages`) in MiB.
    pub target_mib: u64,
    /// The target in 4 KiB pages.
    pub target_pages: u32,
    /// Pages the driver says the balloon holds (`actual`).
    pub actual_pages: u32,
    /// `actual` in MiB (rounded down).
    pub actual_mib: u64,
    /// Pages dropped from the host through the inflate queue.
    pub inflated_pages: u64,
    /// Pages the guest took back through the deflate queue.
    pub deflated_pages: u64,
    /// Bytes dropped from the host through free page reporting.
    pub reported_bytes: u64,
    /// Pages or ranges refused because they were not inside guest RAM.
    pub rejected: u64,
    /// How many statistics reports the guest sent.
    pub stats_updates: u64,
    /// The guest's last statistics (tag name to value; memory figures in bytes).
    pub guest_stats: BTreeMap<String, u64>,
}

/// State shared by the device, its worker and the handle.
struct Shared {
    max_pages: u32,
    num_pages: AtomicU32,
    actual: AtomicU32,
    interrupt: Mutex<Option<Arc<dyn Interrupt>>>,
    stats: Mutex<BTreeMap<String, u64>>,
    /// Signalled (with `stats` locked) when `stats_updates` grows.
    stats_changed: Condvar,
    stats_updates: AtomicU64,
    /// The worker holds the driver's stats buffer (so a refresh can be asked for).
    stats_buffer_held: AtomicBool,
    inflated_pages: AtomicU64,
    deflated_pages: AtomicU64,
    reported_bytes: AtomicU64,
    rejected: AtomicU64,
    refresh: EventFd,
}

/// Controls a balloon from the VMM: target size, statistics.
#[derive(Clone)]
pub struct BalloonHandle {
    shared: Arc<Shared>,
}

impl BalloonHandle {
    /// Sets the balloon's target size to `mib` MiB and tells the driver (config change).
    pub fn set_target_mib(&self, mib: u64) -> Result<(), BalloonError> {
        let s = &self.shared;
        let too_large = || BalloonError::TooLarge {
            target_mib: mib,
            ram_mib: u64::from(s.max_pages) / PAGES_PER_MIB,
        };
        let pages = mib.checked_mul(PAGES_PER_MIB).ok_or_else(too_large)?;
        if pages > u64::from(s.max_pages) {
            return Err(too_large());
        }
        let pages = u32::try_from(pages).map_err(|_| too_large())?;
        s.num_pages.store(pages, Ordering::Release);
        if let Some(irq) = lock(&s.interrupt).as_ref() {
            irq.signal_config();
        }
        Ok(())
    }

    /// Asks the driver for fresh statistics (it answers asynchronously; see [`info`]).
    ///
    /// [`info`]: Self::info
    pub fn request_stats(&self) {
        if let Err(e) = self.shared.refresh.write(1) {
            tracing::warn!("virtio-balloon: cannot request statistics: {e}");
        }
    }

    /// Asks the driver for fresh statistics and waits up to `timeout` for them. Returns false
    /// at once when the driver has no statistics buffer out (no driver, or no stats queue),
    /// and after `timeout` when it does not answer; [`info`] has the last ones either way.
    ///
    /// [`info`]: Self::info
    pub fn refresh_stats(&self, timeout: Duration) -> bool {
        let s = &self.shared;
        if !s.stats_buffer_held.load(Ordering::Acquire) {
            return false;
        }
        let deadline = Instant::now() + timeout;
        let mut guard = lock(&s.stats);
        let before = s.stats_updates.load(Ordering::Acquire);
        self.request_stats();
        while s.stats_updates.load(Ordering::Acquire) == before {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            guard = s
                .stats_changed
                .wait_timeout(guard, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// The balloon's current state.
    pub fn info(&self) -> BalloonInfo {
        let s = &self.shared;
        let target = s.num_pages.load(Ordering::Acquire);
        let actual = s.actual.load(Ordering::Acquire);
        BalloonInfo {
            target_mib: u64::from(target) / PAGES_PER_MIB,
            target_pages: target,
            actual_pages: actual,
            actual_mib: u64::from(actual) / PAGES_PER_MIB,
            inflated_pages: s.inflated_pages.load(Ordering::Relaxed),
            deflated_pages: s.deflated_pages.load(Ordering::Relaxed),
            reported_bytes: s.reported_bytes.load(Ordering::Relaxed),
            rejected: s.rejected.load(Ordering::Relaxed),
            stats_updates: s.stats_updates.load(Ordering::Acquire),
            guest_stats: lock(&s.stats).clone(),
        }
    }
}

/// The control requests a balloon takes (see [`DeviceControl`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum BalloonRequest {
    /// `{"op":"set_target","target_mib":N}`: see [`BalloonHandle::set_target_mib`].
    SetTarget {
        /// Memory the balloon should take from the guest.
        target_mib: u64,
    },
    /// `{"op":"stats","wait_ms":N}`: the [`BalloonInfo`], after waiting up to `wait_ms`
    /// (at most [`MAX_STATS_WAIT`]) for fresh statistics from the driver.
    Stats {
        /// How long to wait for the driver (0: answer with the last statistics at once).
        #[serde(default)]
        wait_ms: u64,
    },
}

impl DeviceControl for BalloonHandle {
    fn control(&self, request: &serde_json::Value) -> Result<serde_json::Value, ControlError> {
        let info = match parse_request(request)? {
            BalloonRequest::SetTarget { target_mib } => {
                self.set_target_mib(target_mib)
                    .map_err(|e| ControlError::Refused(e.to_string()))?;
                return Ok(serde_json::json!({ "target_mib": target_mib }));
            }
            BalloonRequest::Stats { wait_ms } => {
                let wait = Duration::from_millis(wait_ms).min(MAX_STATS_WAIT);
                if !wait.is_zero() {
                    self.refresh_stats(wait);
                }
                self.info()
            }
        };
        serde_json::to_value(info).map_err(|e| ControlError::Refused(e.to_string()))
    }
}

/// A virtio memory balloon device.
pub struct Balloon {
    shared: Arc<Shared>,
    base: VirtioBase,
    /// Re-activated from a snapshot: the target was not carried over, tell the driver.
    restored: bool,
}

impl Balloon {
    /// A new, inactive balloon for a guest with `ram_bytes` of RAM, with an empty target.
    pub fn new(ram_bytes: u64, cfg: BalloonConfig) -> io::Result<Balloon> {
        let max_pages = u32::try_from(ram_bytes / PAGE_SIZE).unwrap_or(u32::MAX);
        let shared = Arc::new(Shared {
            max_pages,
            num_pages: AtomicU32::new(0),
            actual: AtomicU32::new(0),
            interrupt: Mutex::new(None),
            stats: Mutex::new(BTreeMap::new()),
            stats_changed: Condvar::new(),
            stats_updates: AtomicU64::new(0),
            stats_buffer_held: AtomicBool::new(false),
            inflated_pages: AtomicU64::new(0),
            deflated_pages: AtomicU64::new(0),
            reported_bytes: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            refresh: EventFd::new(EFD_NONBLOCK)?,
        });
        // inflate, deflate, stats, reporting: the most the offered features can create.
        let num_queues = 2 + usize::from(cfg.stats) + usize::from(cfg.free_page_reporting);
        let mut features = COMMON_FEATURES;
        if cfg.stats {
            features |= VIRTIO_BALLOON_F_STATS_VQ;
        }
        if cfg.free_page_reporting {
            features |= VIRTIO_BALLOON_F_PAGE_REPORTING;
        }
        if cfg.deflate_on_oom {
            features |= VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        Ok(Balloon {
            shared,
            base: VirtioBase::new(
                device_type::BALLOON,
                &vec![QUEUE_SIZE; num_queues],
                features,
            ),
            restored: false,
        })
    }

    /// A handle to control this balloon from other threads.
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle {
            shared: self.shared.clone(),
        }
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        let num = self.shared.num_pages.load(Ordering::Acquire).to_le_bytes();
        let actual = self.shared.actual.load(Ordering::Acquire).to_le_bytes();
        b[..4].copy_from_slice(&num);
        b[4..].copy_from_slice(&actual);
        b
    }
}

impl VirtioDevice for Balloon {
    fn base(&self) -> &VirtioBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut VirtioBase {
        &mut self.base
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::pci::read_slice(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` is driver-writable; `num_pages` belongs to the device.
        let mut actual = self.shared.actual.load(Ordering::Acquire).to_le_bytes();
        let mut changed = false;
        for (i, &b) in data.iter().enumerate() {
            let at = u64::try_from(i)
                .ok()
                .and_then(|i| offset.checked_add(i))
                .and_then(|o| o.checked_sub(ACTUAL_OFFSET))
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| actual.get_mut(o));
            if let Some(byte) = at {
                *byte = b;
                changed = true;
            }
        }
        if changed {
            self.shared
                .actual
                .store(u32::from_le_bytes(actual), Ordering::Release);
        }
    }

    /// Which queues exist depends on the features, so each is prepared on its own (as queue
    /// 0) and gets its real index back for notifications.
    fn prepare_queues(
        &self,
        mem: &GuestMem,
        queues: Vec<ActiveQueue>,
    ) -> Result<(Vec<VirtQueue>, Vec<EventFd>), ActivateError> {
        let acked = self.base.acked_features();
        let mut vqs = Vec::with_capacity(queues.len());
        let mut kicks = Vec::with_capacity(queues.len());
        for aq in queues {
            let index = aq.index;
            if matches!(
                queue_role(index, acked),
                Some(QueueRole::FreePageHint) | None
            ) {
                return Err(ActivateError::BadQueue(index));
            }
            let one = ActiveQueue { index: 0, ..aq };
            let (mut vq, mut kick) = prepare_queues(mem, vec![one], acked, 1)
                .map_err(|_| ActivateError::BadQueue(index))?;
            let (Some(mut vq), Some(kick)) = (vq.pop(), kick.pop()) else {
                return Err(ActivateError::BadQueue(index));
            };
            vq.index = index;
            vqs.push(vq);
            kicks.push(kick);
        }
        Ok((vqs, kicks))
    }

    fn start(&mut self, act: Activation) -> Result<Box<dyn DeviceWorker>, ActivateError> {
        let mut queues = Vec::with_capacity(act.queues.len());
        for vq in act.queues {
            let role = queue_role(vq.index, act.acked_features)
                .ok_or(ActivateError::BadQueue(vq.index))?;
            queues.push((role, vq));
        }
        for needed in [QueueRole::Inflate, QueueRole::Deflate] {
            if !queues.iter().any(|(role, _)| *role == needed) {
                return Err(ActivateError::BadQueue(needed as u16));
            }
        }
        *lock(&self.shared.interrupt) = Some(act.interrupt.clone());
        let worker = BalloonWorker::new(
            act.mem,
            act.interrupt.clone(),
            act.counters,
            queues,
            self.shared.clone(),
            self.shared.refresh.try_clone()?,
        );
        if std::mem::take(&mut self.restored) {
            act.interrupt.signal_config();
        }
        Ok(Box::new(worker))
    }

    fn on_reset(&mut self) {
        *lock(&self.shared.interrupt) = None;
        self.shared
            .stats_buffer_held
            .store(false, Ordering::Release);
        // A new driver starts with an empty balloon; the host's target stays.
        self.shared.actual.store(0, Ordering::Release);
    }

    fn restored(&mut self) {
        // Whatever the target is now (the snapshot's if its state was restored, else the
        // configuration's), the driver re-reads it.
        self.restored = true;
    }

    fn control(&self) -> Option<Arc<dyn DeviceControl>> {
        Some(Arc::new(self.handle()))
    }

    fn save_state(&self) -> Vec<u8> {
        let mut v = vec![STATE_VERSION];
        v.extend_from_slice(&self.config_bytes());
        v
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), StateError> {
        let bytes: [u8; 1 + CONFIG_SIZE] = state.try_into().map_err(|_| StateError::Length {
            got: state.len(),
            expected: 1 + CONFIG_SIZE,
        })?;
        let [version, n0, n1, n2, n3, a0, a1, a2, a3] = bytes;
        if version != STATE_VERSION {
            return Err(StateError::Version(version));
        }
        let num_pages = u32::from_le_bytes([n0, n1, n2, n3]);
        if num_pages > self.shared.max_pages {
            return Err(StateError::Invalid(
                "balloon target larger than the guest's RAM",
            ));
        }
        self.shared.num_pages.store(num_pages, Ordering::Release);
        self.shared
            .actual
            .store(u32::from_le_bytes([a0, a1, a2, a3]), Ordering::Release);
        Ok(())
    }
}

mod worker;

#[cfg(test)]
mod tests;
