// Test data: hand-built guest-side values and small constants, narrowed on purpose.
#![allow(clippy::cast_possible_truncation)]

use std::sync::atomic::AtomicUsize;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::*;
use crate::virtio::chain::{DESC_F_NEXT, DESC_F_WRITE};
use crate::virtio::worker::testing::*;
use crate::virtio::worker::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

const ALL: u64 = VIRTIO_BALLOON_F_STATS_VQ | VIRTIO_BALLOON_F_PAGE_REPORTING;
/// Where the tests put PFN arrays, stats buffers and the like.
const BUF: u64 = 0x8000;

/// An interrupt that also counts configuration changes.
#[derive(Default)]
struct CfgInterrupt {
    inner: FakeInterrupt,
    configs: AtomicUsize,
}

impl CfgInterrupt {
    fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }
    fn configs(&self) -> usize {
        self.configs.load(Ordering::SeqCst)
    }
}

impl Interrupt for CfgInterrupt {
    fn signal_queue(&self, queue: u16) {
        self.inner.signal_queue(queue);
    }
    fn signal_config(&self) {
        self.configs.fetch_add(1, Ordering::SeqCst);
    }
    fn device_error(&self) {
        self.inner.device_error();
    }
}

/// A balloon activated with `features` (plus the common ones) on `n` hand-built queues at
/// 0x1000, 0x2000, ...
struct Setup {
    dev: Balloon,
    irq: Arc<CfgInterrupt>,
    tqs: Vec<TestQueue>,
    kicks: Vec<EventFd>,
}

fn setup(mem: &GuestMem, features: u64, n: usize) -> Setup {
    let ram: u64 = mem.iter().map(|r| r.len()).sum();
    let mut dev = Balloon::new(ram, BalloonConfig::default()).unwrap();
    dev.ack_features(COMMON_FEATURES | features);
    let tqs: Vec<TestQueue> = (0..n)
        .map(|i| TestQueue::new(0x1000 * (i as u64 + 1), 16))
        .collect();
    let (queues, kicks) = active_queues(&tqs);
    let irq = CfgInterrupt::new();
    dev.activate(mem.clone(), irq.clone(), queues).unwrap();
    Setup {
        dev,
        irq,
        tqs,
        kicks,
    }
}

impl Setup {
    /// Makes the chain available on queue `q` (descriptor slot `slot`), kicks, waits for it.
    fn send(&self, mem: &GuestMem, q: usize, slot: u16, bufs: &[(u64, u32, u16)]) {
        let tq = self.tqs[q];
        let before = tq.used_idx(mem);
        tq.add_chain(mem, slot, bufs);
        self.kicks[q].write(1).unwrap();
        assert!(wait_until(|| tq.used_idx(mem) == before.wrapping_add(1)));
    }
}

fn write_pfns(mem: &GuestMem, at: u64, pfns: &[u32]) -> u32 {
    let raw: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write_slice(&raw, GuestAddress(at)).unwrap();
    raw.len() as u32
}

fn fill(mem: &GuestMem, at: u64, len: usize, byte: u8) {
    mem.write_slice(&vec![byte; len], GuestAddress(at)).unwrap();
}

fn read(mem: &GuestMem, at: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(at)).unwrap();
    v
}

#[test]
fn queue_numbering_follows_negotiated_features() {
    use QueueRole::*;
    let roles = |f: u64| (0..5).map(|i| queue_role(i, f)).collect::<Vec<_>>();
    assert_eq!(
        roles(ALL),
        [
            Some(Inflate),
            Some(Deflate),
            Some(Stats),
            Some(Reporting),
            None
        ]
    );
    assert_eq!(
        roles(VIRTIO_BALLOON_F_PAGE_REPORTING),
        [Some(Inflate), Some(Deflate), Some(Reporting), None, None]
    );
    assert_eq!(
        roles(VIRTIO_BALLOON_F_STATS_VQ),
        [Some(Inflate), Some(Deflate), Some(Stats), None, None]
    );
    assert_eq!(roles(0), [Some(Inflate), Some(Deflate), None, None, None]);
    assert_eq!(
        queue_role(3, VIRTIO_BALLOON_F_FREE_PAGE_HINT | ALL),
        Some(FreePageHint)
    );
    assert_eq!(
        queue_role(4, VIRTIO_BALLOON_F_FREE_PAGE_HINT | ALL),
        Some(Reporting)
    );
}

#[test]
fn features_and_queue_count() {
    let dev = Balloon::new(1 << 30, BalloonConfig::default()).unwrap();
    let f = dev.device_features();
    assert_eq!(f & ALL, ALL);
    assert_ne!(f & VIRTIO_BALLOON_F_DEFLATE_ON_OOM, 0);
    assert_eq!(f & VIRTIO_BALLOON_F_FREE_PAGE_HINT, 0);
    assert_eq!(dev.queue_max_sizes().len(), 4);
    let bare = BalloonConfig {
        stats: false,
        free_page_reporting: false,
        deflate_on_oom: false,
    };
    let dev = Balloon::new(1 << 30, bare).unwrap();
    assert_eq!(dev.device_features(), COMMON_FEATURES);
    assert_eq!(dev.queue_max_sizes().len(), 2);
    let mut dev = dev;
    dev.ack_features(u64::MAX);
    assert_eq!(
        dev.base.acked_features(),
        COMMON_FEATURES,
        "only offered features are kept"
    );
}

#[test]
fn activation_maps_queues_by_features() {
    let mem = test_mem();
    // Without the stats feature, queue 2 is the reporting queue.
    let s = setup(&mem, VIRTIO_BALLOON_F_PAGE_REPORTING, 3);
    fill(&mem, 0x20000, 0x2000, 0xaa);
    s.send(&mem, 2, 0, &[(0x20000, 0x2000, DESC_F_WRITE)]);
    assert_eq!(read(&mem, 0x20000, 0x2000), vec![0u8; 0x2000]);
    assert_eq!(s.dev.handle().info().reported_bytes, 0x2000);

    // A queue beyond what the features create, or a missing inflate queue, is refused.
    let mut dev = Balloon::new(1 << 20, BalloonConfig::default()).unwrap();
    dev.ack_features(COMMON_FEATURES);
    let tqs: Vec<TestQueue> = (1..=3).map(|i| TestQueue::new(0x1000 * i, 16)).collect();
    let (queues, _k) = active_queues(&tqs);
    let irq = CfgInterrupt::new();
    assert!(matches!(
        dev.activate(mem.clone(), irq.clone(), queues),
        Err(ActivateError::BadQueue(2))
    ));
    let (mut queues, _k) = active_queues(&tqs[..2]);
    queues.remove(0);
    assert!(matches!(
        dev.activate(mem.clone(), irq, queues),
        Err(ActivateError::BadQueue(_))
    ));
}

#[test]
fn inflate_drops_pages_in_ram_and_ignores_the_rest() {
    // Two regions with a hole: [0, 1 MiB) and [2 MiB, 3 MiB).
    let mem =
        GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(2 << 20), 1 << 20)])
            .unwrap();
    let s = setup(&mem, ALL, 4);
    fill(&mem, 0x40000, 0x4000, 0x5a);
    fill(&mem, 0x20_0000, 0x10_0000, 0x77);
    // Pages 0x40, 0x41 (contiguous), 0x43 in the first region, 0x2ff (last of the second), then
    // PFNs in the hole, past the end and at the top of the PFN space.
    let pfns = [0x40, 0x41, 0x43, 0x2ff, 0x100, 0x1ff, 0x300, u32::MAX];
    let len = write_pfns(&mem, BUF, &pfns);
    s.send(&mem, 0, 0, &[(BUF, len, 0)]);
    assert_eq!(s.tqs[0].used_elem(&mem, 0), (0, 0));
    assert_eq!(read(&mem, 0x40000, 0x2000), vec![0u8; 0x2000]);
    assert_eq!(read(&mem, 0x42000, 0x1000), vec![0x5a; 0x1000], "0x42 kept");
    assert_eq!(read(&mem, 0x43000, 0x1000), vec![0u8; 0x1000]);
    assert_eq!(read(&mem, 0x2f_f000, 0x1000), vec![0u8; 0x1000]);
    assert_eq!(
        read(&mem, 0x20_0000, 0xf_f000),
        vec![0x77; 0xf_f000],
        "the rest of the second region is untouched"
    );
    let info = s.dev.handle().info();
    assert_eq!(info.inflated_pages, 4);
    assert_eq!(info.rejected, 4);
    assert!(s.irq.inner.signals_for(0) >= 1);

    // Deflate only counts; the pages read as zero until the guest writes them.
    let len = write_pfns(&mem, BUF, &[0x40, 0x41]);
    s.send(&mem, 1, 0, &[(BUF, len, 0)]);
    assert_eq!(s.dev.handle().info().deflated_pages, 2);
    assert_eq!(read(&mem, 0x40000, 0x1000), vec![0u8; 0x1000]);
    assert_eq!(s.irq.inner.errors(), 0);
}

#[test]
fn inflate_split_across_descriptors_and_odd_lengths() {
    let mem = test_mem();
    let s = setup(&mem, ALL, 4);
    fill(&mem, 0x50000, 0x3000, 0x11);
    // PFN 0x50 in the first descriptor, PFN 0x52 straddling two descriptors, 3 trailing bytes.
    let mut raw = Vec::new();
    raw.extend_from_slice(&0x50u32.to_le_bytes());
    raw.extend_from_slice(&0x52u32.to_le_bytes());
    raw.extend_from_slice(&[1, 2, 3]);
    mem.write_slice(&raw[..6], GuestAddress(BUF)).unwrap();
    mem.write_slice(&raw[6..], GuestAddress(BUF + 0x100))
        .unwrap();
    s.send(&mem, 0, 0, &[(BUF, 6, 0), (BUF + 0x100, 5, 0)]);
    assert_eq!(read(&mem, 0x50000, 0x1000), vec![0u8; 0x1000]);
    assert_eq!(read(&mem, 0x51000, 0x1000), vec![0x11; 0x1000]);
    assert_eq!(read(&mem, 0x52000, 0x1000), vec![0u8; 0x1000]);
    assert_eq!(s.dev.handle().info().inflated_pages, 2);
}

#[test]
fn free_page_reports_are_rounded_inward_and_checked() {
    let mem =
        GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 20), 1 << 20)])
            .unwrap();
    let s = setup(&mem, ALL, 4);
    fill(&mem, 0x60000, 0x4000, 0x33);
    fill(&mem, 0xf_e000, 0x4000, 0x44);
    // [0x60800, 0x63800) rounds inward to [0x61000, 0x63000).
    s.send(&mem, 3, 0, &[(0x60800, 0x3000, DESC_F_WRITE)]);
    assert_eq!(read(&mem, 0x60000, 0x1000), vec![0x33; 0x1000]);
    assert_eq!(read(&mem, 0x61000, 0x2000), vec![0u8; 0x2000]);
    assert_eq!(read(&mem, 0x63000, 0x1000), vec![0x33; 0x1000]);
    // A range across two regions is refused even though both sides are RAM.
    s.send(&mem, 3, 1, &[(0xf_e000, 0x4000, DESC_F_WRITE)]);
    assert_eq!(read(&mem, 0xf_e000, 0x4000), vec![0x44; 0x4000]);
    // A range running past the end of RAM is a malformed chain, returned untouched.
    fill(&mem, 0x1f_f000, 0x1000, 0x55);
    s.send(&mem, 3, 2, &[(0x1f_f000, 0x2000, DESC_F_WRITE)]);
    assert_eq!(read(&mem, 0x1f_f000, 0x1000), vec![0x55; 0x1000]);
    // Smaller than a page after rounding: nothing to do.
    fill(&mem, 0x70000, 0x1000, 0x66);
    s.send(&mem, 3, 3, &[(0x70010, 0xfe0, DESC_F_WRITE)]);
    assert_eq!(read(&mem, 0x70000, 0x1000), vec![0x66; 0x1000]);
    let info = s.dev.handle().info();
    assert_eq!(info.reported_bytes, 0x2000);
    assert_eq!(info.rejected, 2);
    assert_eq!(s.tqs[3].used_idx(&mem), 4);
    assert_eq!(s.irq.inner.errors(), 0);
}

#[test]
fn config_space_and_target() {
    let mut dev = Balloon::new(64 << 20, BalloonConfig::default()).unwrap();
    let h = dev.handle();
    let cfg = |dev: &Balloon, off: u64, n: usize| {
        let mut b = vec![0xffu8; n];
        dev.read_config(off, &mut b);
        b
    };
    assert_eq!(cfg(&dev, 0, 8), vec![0; 8]);
    h.set_target_mib(16).unwrap();
    assert_eq!(cfg(&dev, 0, 4), (16u32 * 256).to_le_bytes());
    // Partial and out-of-range reads.
    assert_eq!(cfg(&dev, 1, 1), vec![0x10]);
    assert_eq!(cfg(&dev, 6, 4), vec![0, 0, 0, 0]);
    assert_eq!(cfg(&dev, u64::MAX, 2), vec![0, 0]);
    // The driver writes `actual`, byte-wise or whole; writes to num_pages are ignored.
    dev.write_config(4, &1000u32.to_le_bytes());
    dev.write_config(0, &[9, 9, 9, 9]);
    assert_eq!(cfg(&dev, 0, 8)[..4], (4096u32).to_le_bytes());
    assert_eq!(cfg(&dev, 4, 4), 1000u32.to_le_bytes());
    dev.write_config(7, &[1, 2, 3]);
    assert_eq!(cfg(&dev, 4, 4), [0xe8, 0x03, 0, 1]);
    dev.write_config(u64::MAX, &[1, 2]);
    let info = h.info();
    assert_eq!((info.target_mib, info.target_pages), (16, 4096));
    assert_eq!(info.actual_pages, 0x0100_03e8);
    // The target cannot exceed RAM.
    assert!(matches!(
        h.set_target_mib(65),
        Err(BalloonError::TooLarge {
            target_mib: 65,
            ram_mib: 64
        })
    ));
    assert!(h.set_target_mib(u64::MAX).is_err());
    assert_eq!(h.info().target_mib, 16);

    // Once active, a new target is a configuration change; reset forgets `actual` only.
    let mem = test_mem();
    dev.ack_features(dev.device_features());
    let tqs: Vec<TestQueue> = (1..=4).map(|i| TestQueue::new(0x1000 * i, 16)).collect();
    let (queues, _kicks) = active_queues(&tqs);
    let irq = CfgInterrupt::new();
    dev.activate(mem, irq.clone(), queues).unwrap();
    assert_eq!(irq.configs(), 0);
    h.set_target_mib(32).unwrap();
    assert_eq!(irq.configs(), 1);
    assert_eq!(cfg(&dev, 0, 4), (32u32 * 256).to_le_bytes());
    dev.reset();
    h.set_target_mib(8).unwrap();
    assert_eq!(irq.configs(), 1, "no interrupt after reset");
    assert_eq!(h.info().actual_pages, 0);
    assert_eq!(h.info().target_mib, 8);
}

#[test]
fn restored_device_tells_the_driver_to_reread_the_target() {
    let mem = test_mem();
    let mut dev = Balloon::new(1 << 20, BalloonConfig::default()).unwrap();
    dev.ack_features(dev.device_features());
    dev.restored();
    let tqs: Vec<TestQueue> = (1..=4).map(|i| TestQueue::new(0x1000 * i, 16)).collect();
    let (queues, _kicks) = active_queues(&tqs);
    let irq = CfgInterrupt::new();
    dev.activate(mem, irq.clone(), queues).unwrap();
    assert_eq!(irq.configs(), 1);
}

#[test]
fn device_state_round_trips() {
    let mut a = Balloon::new(64 << 20, BalloonConfig::default()).unwrap();
    a.handle().set_target_mib(10).unwrap();
    a.write_config(4, &77u32.to_le_bytes());
    let saved = a.save_state();
    let mut b = Balloon::new(64 << 20, BalloonConfig::default()).unwrap();
    b.restore_state(&saved).unwrap();
    let info = b.handle().info();
    assert_eq!((info.target_pages, info.actual_pages), (2560, 77));
    let (mut x, mut y) = ([0u8; 8], [0u8; 8]);
    a.read_config(0, &mut x);
    b.read_config(0, &mut y);
    assert_eq!(x, y);
    // Damaged or unfitting state is refused and changes nothing.
    let mut c = Balloon::new(8 << 20, BalloonConfig::default()).unwrap();
    assert!(c.restore_state(&saved).is_err(), "target > RAM");
    assert!(c.restore_state(&saved[..5]).is_err());
    let mut bad = saved.clone();
    bad[0] = 9;
    assert!(c.restore_state(&bad).is_err());
    assert_eq!(c.handle().info(), BalloonInfo::default());
}

#[test]
fn snapshot_through_the_transport_keeps_target_and_actual() {
    use crate::pci::testing::FakeHooks;
    use crate::virtio::pci::VirtioPciDevice;
    let mem = test_mem();
    let wrap = |b: Balloon| {
        VirtioPciDevice::new(Box::new(b), mem.clone(), Arc::new(FakeHooks::default())).unwrap()
    };
    let mut a = Balloon::new(64 << 20, BalloonConfig::default()).unwrap();
    a.handle().set_target_mib(16).unwrap();
    a.write_config(4, &100u32.to_le_bytes());
    let state = wrap(a).save_state();

    let b = Balloon::new(64 << 20, BalloonConfig::default()).unwrap();
    let h = b.handle();
    wrap(b).restore_state(&state).unwrap();
    assert_eq!((h.info().target_mib, h.info().actual_pages), (16, 100));
    // A balloon for less RAM than the saved target cannot take the state.
    let small = Balloon::new(8 << 20, BalloonConfig::default()).unwrap();
    assert!(wrap(small).restore_state(&state).is_err());
}

fn stats_buf(entries: &[(u16, u64)]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|(t, v)| t.to_le_bytes().into_iter().chain(v.to_le_bytes()))
        .collect()
}

#[test]
fn stats_are_kept_and_refreshed_on_request() {
    assert_eq!(
        parse_stats(&stats_buf(&[(4, 123), (5, 1 << 30), (99, 7)])),
        BTreeMap::from([
            ("free_memory".to_string(), 123),
            ("total_memory".to_string(), 1 << 30),
            ("tag_99".to_string(), 7),
        ])
    );
    // A trailing partial entry is ignored; the count is capped.
    let mut raw = stats_buf(&[(0, 1)]);
    raw.extend_from_slice(&[1, 2, 3]);
    assert_eq!(parse_stats(&raw).len(), 1);
    let many: Vec<(u16, u64)> = (0..200).map(|i| (i, 1)).collect();
    assert_eq!(parse_stats(&stats_buf(&many)).len(), MAX_STATS);

    let mem = test_mem();
    let s = setup(&mem, ALL, 4);
    let h = s.dev.handle();
    let raw = stats_buf(&[(4, 1000), (6, 2000)]);
    mem.write_slice(&raw, GuestAddress(BUF)).unwrap();
    s.tqs[2].add_chain(&mem, 0, &[(BUF, raw.len() as u32, 0)]);
    s.kicks[2].write(1).unwrap();
    assert!(wait_until(|| h.info().stats_updates == 1));
    let info = h.info();
    assert_eq!(info.guest_stats.get("free_memory"), Some(&1000));
    assert_eq!(info.guest_stats.get("available_memory"), Some(&2000));
    // The device keeps the buffer until it wants new numbers.
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(s.tqs[2].used_idx(&mem), 0);
    h.request_stats();
    assert!(wait_until(|| s.tqs[2].used_idx(&mem) == 1));
    assert_eq!(s.tqs[2].used_elem(&mem, 0), (0, 0));
    assert!(wait_until(|| s.irq.inner.signals_for(2) >= 1));
    // The driver answers with a new buffer.
    let raw = stats_buf(&[(4, 500)]);
    mem.write_slice(&raw, GuestAddress(BUF + 0x100)).unwrap();
    s.tqs[2].add_chain(&mem, 1, &[(BUF + 0x100, raw.len() as u32, 0)]);
    s.kicks[2].write(1).unwrap();
    assert!(wait_until(|| h.info().stats_updates == 2));
    assert_eq!(
        h.info().guest_stats,
        BTreeMap::from([("free_memory".to_string(), 500)])
    );
    // refresh_stats waits for the driver's answer (played by a thread here).
    let tq = s.tqs[2];
    let kick = s.kicks[2].try_clone().unwrap();
    let driver_mem = mem.clone();
    let driver = std::thread::spawn(move || {
        assert!(wait_until(|| tq.used_idx(&driver_mem) == 2));
        let raw = stats_buf(&[(4, 4242)]);
        driver_mem
            .write_slice(&raw, GuestAddress(BUF + 0x200))
            .unwrap();
        tq.add_chain(&driver_mem, 3, &[(BUF + 0x200, raw.len() as u32, 0)]);
        kick.write(1).unwrap();
    });
    assert!(h.refresh_stats(std::time::Duration::from_secs(5)));
    driver.join().unwrap();
    assert_eq!(h.info().guest_stats.get("free_memory"), Some(&4242));
    assert_eq!(h.info().stats_updates, 3);
    // With the buffer given back and no answer, there is nothing to wait for.
    h.request_stats();
    assert!(wait_until(|| s.tqs[2].used_idx(&mem) == 3));
    let t0 = std::time::Instant::now();
    assert!(!h.refresh_stats(std::time::Duration::from_secs(5)));
    assert!(t0.elapsed() < std::time::Duration::from_secs(1));
    // A second buffer while one is held: the older one goes back.
    s.tqs[2].add_chain(&mem, 4, &[(BUF + 0x100, raw.len() as u32, 0)]);
    s.kicks[2].write(1).unwrap();
    assert!(wait_until(|| h.info().stats_updates == 4));
    s.tqs[2].add_chain(&mem, 5, &[(BUF + 0x100, raw.len() as u32, 0)]);
    s.kicks[2].write(1).unwrap();
    assert!(wait_until(|| s.tqs[2].used_idx(&mem) == 4));
    assert_eq!(s.tqs[2].used_elem(&mem, 3), (4, 0));
}

#[test]
fn pause_and_resume_hold_off_processing() {
    let mem = test_mem();
    let mut s = setup(&mem, ALL, 4);
    s.dev.pause();
    fill(&mem, 0x30000, 0x1000, 0x99);
    let len = write_pfns(&mem, BUF, &[0x30]);
    s.tqs[0].add_chain(&mem, 0, &[(BUF, len, 0)]);
    s.kicks[0].write(1).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert_eq!(s.tqs[0].used_idx(&mem), 0);
    assert_eq!(read(&mem, 0x30000, 4), vec![0x99; 4]);
    s.dev.resume();
    assert!(wait_until(|| s.tqs[0].used_idx(&mem) == 1));
    assert_eq!(read(&mem, 0x30000, 0x1000), vec![0u8; 0x1000]);
}

/// Guest RAM carved out of one host mapping with guard areas around and between the regions:
/// host [guard | RAM 0..1 MiB | guard | RAM 2..3 MiB | guard], 1 MiB each.
struct GuardedMem {
    base: *mut u8,
    mem: Option<GuestMem>,
}

const MIB: usize = 1 << 20;
const GUARD: u8 = 0xee;

impl GuardedMem {
    fn new() -> GuardedMem {
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                5 * MIB,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let base = base.cast::<u8>();
        // SAFETY: the mapping is 5 MiB long and ours.
        unsafe { std::ptr::write_bytes(base, GUARD, 5 * MIB) };
        let region = |off: usize, gpa: u64| {
            // SAFETY: [base + off, base + off + 1 MiB) is inside our mapping, which outlives
            // the region (dropped in `Drop` before the munmap).
            let r = unsafe {
                vm_memory::MmapRegion::build_raw(
                    base.add(off),
                    MIB,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                )
            }
            .unwrap();
            vm_memory::GuestRegionMmap::new(r, GuestAddress(gpa)).unwrap()
        };
        let mem = GuestMem::from_regions(vec![region(MIB, 0), region(3 * MIB, 2 << 20)]).unwrap();
        fill(&mem, 0, MIB, 0);
        fill(&mem, 2 << 20, MIB, 0);
        GuardedMem {
            base,
            mem: Some(mem),
        }
    }

    fn guards_intact(&self) -> bool {
        [0, 2 * MIB, 4 * MIB].iter().all(|&off| {
            // SAFETY: each guard is a 1 MiB part of our live mapping that nothing else writes.
            let g = unsafe { std::slice::from_raw_parts(self.base.add(off), MIB) };
            g.iter().all(|&b| b == GUARD)
        })
    }
}

impl Drop for GuardedMem {
    fn drop(&mut self) {
        self.mem = None;
        // SAFETY: the mapping is ours and no region refers to it any more.
        unsafe { libc::munmap(self.base.cast(), 5 * MIB) };
    }
}

#[test]
fn hostile_descriptors_never_panic_or_escape_ram() {
    let guarded = GuardedMem::new();
    let mem = guarded.mem.clone().unwrap();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    // Addresses around the region edges, where off-by-one errors would hit a guard.
    let edges = [0u64, 1 << 20, 2 << 20, 3 << 20];
    let mut processed = 0;
    for _ in 0..20 {
        let s = setup(&mem, ALL, 4);
        for _ in 0..50 {
            let q = rng.below(4) as usize;
            let tq = s.tqs[q];
            for slot in 0..tq.size {
                let edge = edges[rng.below(4) as usize];
                let addr = match rng.below(4) {
                    0 => rng.next(),
                    1 => (edge + rng.below(0x4000)).saturating_sub(0x2000),
                    2 => BUF + rng.below(0x100),
                    _ => u64::MAX - rng.below(0x1000),
                };
                let flags = (rng.below(8) as u16) & (DESC_F_NEXT | DESC_F_WRITE | 4);
                let len = match rng.below(3) {
                    0 => rng.next() as u32 >> rng.below(32),
                    1 => 0x1000 * rng.below(4) as u32 + rng.below(3) as u32,
                    _ => rng.below(0x100) as u32,
                };
                tq.desc(&mem, slot, addr, len, flags, rng.below(20) as u16);
            }
            // PFNs for the inflate buffers that point at BUF, mostly next to region edges.
            let pfns: Vec<u32> = (0..64)
                .map(|_| match rng.below(2) {
                    0 => rng.next() as u32 >> rng.below(32),
                    _ => ((edges[rng.below(4) as usize] >> 12) as u32 + 2)
                        .wrapping_sub(rng.below(4) as u32),
                })
                .collect();
            write_pfns(&mem, BUF, &pfns);
            tq.publish(&mem, rng.below(20) as u16);
            if rng.below(10) == 0 {
                tq.set_avail_idx(&mem, rng.next() as u16);
            }
            s.kicks[q].write(1).unwrap();
            if rng.below(8) == 0 {
                s.dev.handle().request_stats();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        processed += s.tqs.iter().map(|t| t.used_idx(&mem)).sum::<u16>() as usize;
        let mut dev = s.dev;
        dev.reset();
        fill(&mem, 0, 0x10000, 0);
    }
    assert!(processed > 0, "the fuzz loop reached the device");
    assert!(
        guarded.guards_intact(),
        "host memory outside guest RAM changed"
    );

    // The device still works after all that.
    let s = setup(&mem, ALL, 4);
    fill(&mem, 0x40000, 0x1000, 0x42);
    let len = write_pfns(&mem, BUF, &[0x40]);
    s.send(&mem, 0, 0, &[(BUF, len, 0)]);
    assert_eq!(read(&mem, 0x40000, 0x1000), vec![0u8; 0x1000]);
}

/// Resident bytes of the mapping holding `addr` (it may have been merged with neighbours),
/// from /proc/self/smaps.
fn mapping_rss(addr: usize) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut in_mapping = false;
    for line in smaps.lines() {
        let range = line.split_once(' ').map(|(r, _)| r).unwrap_or("");
        let bounds = range.split_once('-').and_then(|(lo, hi)| {
            Some((
                usize::from_str_radix(lo, 16).ok()?,
                usize::from_str_radix(hi, 16).ok()?,
            ))
        });
        if let Some((lo, hi)) = bounds {
            in_mapping = (lo..hi).contains(&addr);
        } else if in_mapping {
            if let Some(kb) = line.strip_prefix("Rss:") {
                let kb: u64 = kb.trim().trim_end_matches("kB").trim().parse().unwrap();
                return kb << 10;
            }
        }
    }
    panic!("no mapping holds {addr:#x} in smaps");
}

/// Resident bytes of exactly `[addr, addr + len)`, from mincore(2).
fn resident_bytes(addr: usize, len: usize) -> u64 {
    let pages = len.div_ceil(4096);
    let mut vec = vec![0u8; pages];
    // SAFETY: `[addr, addr + len)` is a live mapping of ours and `vec` has one byte per page.
    let r = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore: {}", io::Error::last_os_error());
    vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * 4096
}

#[test]
fn free_page_reporting_returns_memory_to_the_host() {
    const SIZE: usize = 64 << 20;
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), SIZE)]).unwrap();
    let host = mem
        .find_region(GuestAddress(0))
        .unwrap()
        .get_host_address(MemoryRegionAddress(0))
        .unwrap() as usize;
    // Touch every page.
    let chunk = vec![0xa5u8; 1 << 20];
    for mib in 0..(SIZE >> 20) {
        mem.write_slice(&chunk, GuestAddress((mib as u64) << 20))
            .unwrap();
    }
    // The rings live in the first pages: a driver starts them zeroed.
    fill(&mem, 0, 0x10000, 0);
    let before = mapping_rss(host);
    let before_exact = resident_bytes(host, SIZE);
    assert_eq!(before_exact, SIZE as u64);
    assert!(before >= SIZE as u64, "rss {before}");

    // Report [32 MiB, 64 MiB) as 16 ranges of 2 MiB in one chain (Linux reports 2 MiB blocks).
    let s = setup(&mem, ALL, 4);
    let bufs: Vec<(u64, u32, u16)> = (0..16)
        .map(|i| ((32 << 20) + (i << 21), 2 << 20, DESC_F_WRITE))
        .collect();
    s.send(&mem, 3, 0, &bufs);
    let after = mapping_rss(host);
    let freed = before.saturating_sub(after);
    // Other tests' threads may share the merged mapping: allow them a little noise.
    assert!(
        ((30 << 20)..=(34 << 20)).contains(&freed),
        "rss {before} -> {after}: freed {freed}"
    );
    assert_eq!(resident_bytes(host, 32 << 20), 32 << 20);
    assert_eq!(resident_bytes(host + (32 << 20), 32 << 20), 0);
    assert_eq!(s.dev.handle().info().reported_bytes, 32 << 20);
    assert_eq!(read(&mem, (48 << 20) + 123, 16), vec![0u8; 16]);
    assert_eq!(read(&mem, (16 << 20) + 123, 16), vec![0xa5; 16]);
}

#[test]
fn indirect_and_event_idx_features_are_honoured() {
    let mem = test_mem();
    let s = setup(
        &mem,
        ALL | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX,
        4,
    );
    fill(&mem, 0x45000, 0x1000, 0x12);
    let len = write_pfns(&mem, BUF, &[0x45]);
    // An indirect table at 0x7000 with one descriptor.
    write_desc(&mem, GuestAddress(0x7000), 0, BUF, len, 0, 0);
    s.send(&mem, 0, 0, &[(0x7000, 16, 4)]);
    assert_eq!(read(&mem, 0x45000, 0x1000), vec![0u8; 0x1000]);
}

#[test]
fn control_requests_set_the_target_and_report_state() {
    let dev = Balloon::new(64 << 20, BalloonConfig::default()).unwrap();
    let ctl = dev.control().expect("the balloon takes control requests");
    let ask = |v: serde_json::Value| ctl.control(&v);
    assert_eq!(
        ask(serde_json::json!({"op": "set_target", "target_mib": 16})).unwrap(),
        serde_json::json!({"target_mib": 16})
    );
    let info = ask(serde_json::json!({"op": "stats"})).unwrap();
    assert_eq!(info["target_mib"], 16);
    assert_eq!(info["target_pages"], 4096);
    // No driver holds a stats buffer: a wait returns at once with the last figures.
    let t0 = std::time::Instant::now();
    assert_eq!(
        ask(serde_json::json!({"op": "stats", "wait_ms": 3000})).unwrap()["target_mib"],
        16
    );
    assert!(t0.elapsed() < std::time::Duration::from_secs(1));
    // Too large a target is refused and changes nothing; malformed requests are bad requests.
    assert!(matches!(
        ask(serde_json::json!({"op": "set_target", "target_mib": 65})),
        Err(ControlError::Refused(m)) if m.contains("65 MiB")
    ));
    for bad in [
        serde_json::json!({"op": "explode"}),
        serde_json::json!({"op": "set_target"}),
        serde_json::json!({"op": "set_target", "target_mib": -1}),
        serde_json::json!({"op": "stats", "extra": 1}),
        serde_json::json!("stats"),
    ] {
        assert!(
            matches!(ask(bad.clone()), Err(ControlError::BadRequest(_))),
            "{bad} was not refused as malformed"
        );
    }
    assert_eq!(dev.handle().info().target_mib, 16);
    // Devices without requests hand out no control.
    assert!(crate::virtio::rng::Rng::new().control().is_none());
}
