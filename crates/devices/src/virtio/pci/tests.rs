// Test data: hand-built guest-side values and small constants, narrowed on purpose.
#![allow(clippy::cast_possible_truncation)]

use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::bus::BusDevice;
use crate::pci::msix::{MSG_CTL_ENABLE, MSG_CTL_FUNCTION_MASK};
use crate::pci::testing::{FakeHooks, HookCall};
use crate::pci::{PciConfigIo, PciMmioWindow, PciRoot};
use crate::virtio::worker::DeviceWorker;
use crate::virtio::{Activation, Interrupt, VirtioBase};

/// One activated queue: (index, size, desc, avail, used, event_idx).
type QueueSeen = (u16, u16, u64, u64, u64, bool);

/// What the fake device saw.
#[derive(Default)]
struct Record {
    acked: Option<u64>,
    /// The queues of each activation.
    activations: Vec<Vec<QueueSeen>>,
    resets: usize,
    config_writes: Vec<(u64, Vec<u8>)>,
    interrupt: Option<Arc<dyn Interrupt>>,
    kicks: Vec<EventFd>,
}

struct FakeDevice {
    rec: Arc<Mutex<Record>>,
    dtype: u32,
    sizes: Vec<u16>,
    features: u64,
    fail_activate: bool,
    base: VirtioBase,
}

/// Overrides every provided method, to record what the transport asks of a device.
impl VirtioDevice for FakeDevice {
    fn base(&self) -> &VirtioBase {
        &self.base
    }
    fn base_mut(&mut self) -> &mut VirtioBase {
        &mut self.base
    }
    fn start(&mut self, _: Activation) -> Result<Box<dyn DeviceWorker>, ActivateError> {
        unreachable!("activate is overridden")
    }
    fn device_type(&self) -> u32 {
        self.dtype
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        self.sizes.clone()
    }
    fn device_features(&self) -> u64 {
        self.features
    }
    fn ack_features(&mut self, features: u64) {
        lock(&self.rec).acked = Some(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (offset as u8).wrapping_add(i as u8) ^ 0x5a;
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        lock(&self.rec).config_writes.push((offset, data.to_vec()));
    }
    fn activate(
        &mut self,
        _mem: GuestMem,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        if self.fail_activate {
            return Err(ActivateError::Backend(std::io::Error::other("no backend")));
        }
        let mut rec = lock(&self.rec);
        rec.activations.push(
            queues
                .iter()
                .map(|q| {
                    (
                        q.index,
                        q.queue.size(),
                        q.queue.desc_table(),
                        q.queue.avail_ring(),
                        q.queue.used_ring(),
                        q.queue.event_idx_enabled(),
                    )
                })
                .collect(),
        );
        rec.kicks = queues.into_iter().map(|q| q.kick).collect();
        rec.interrupt = Some(interrupt);
        Ok(())
    }
    fn reset(&mut self) {
        let mut rec = lock(&self.rec);
        rec.resets += 1;
        rec.interrupt = None;
        rec.kicks.clear();
    }
}

const FEATURES: u64 = VIRTIO_F_VERSION_1 | (1 << 29) | (1 << 5);

struct H {
    dev: VirtioPciDevice,
    hooks: Arc<FakeHooks>,
    rec: Arc<Mutex<Record>>,
}

fn mem() -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
}

fn fake(dtype: u32, sizes: &[u16], fail_activate: bool) -> (Box<FakeDevice>, Arc<Mutex<Record>>) {
    let rec = Arc::new(Mutex::new(Record::default()));
    let dev = Box::new(FakeDevice {
        rec: rec.clone(),
        dtype,
        sizes: sizes.to_vec(),
        features: FEATURES,
        fail_activate,
        base: VirtioBase::new(dtype, sizes, FEATURES),
    });
    (dev, rec)
}

fn harness_with(dtype: u32, sizes: &[u16], fail_activate: bool) -> H {
    let (device, rec) = fake(dtype, sizes, fail_activate);
    let hooks = Arc::new(FakeHooks::default());
    let dev = VirtioPciDevice::new(device, mem(), hooks.clone()).unwrap();
    H { dev, hooks, rec }
}

fn harness() -> H {
    harness_with(device_type::BLOCK, &[256, 128], false)
}

impl H {
    fn r(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.bar_read(0, off, &mut b[..len]);
        u64::from_le_bytes(b)
    }
    fn w(&mut self, off: u64, len: usize, v: u64) {
        self.dev.bar_write(0, off, &v.to_le_bytes()[..len]);
    }
    fn status(&mut self) -> u8 {
        self.r(0x14, 1) as u8
    }
    fn set_features(&mut self, f: u64) {
        self.w(0x08, 4, 0);
        self.w(0x0c, 4, f & 0xffff_ffff);
        self.w(0x08, 4, 1);
        self.w(0x0c, 4, f >> 32);
    }
    fn setup_queue(&mut self, q: u16, size: u16, desc: u64, avail: u64, used: u64) {
        self.w(0x16, 2, q.into());
        self.w(0x18, 2, size.into());
        self.w(0x20, 4, desc & 0xffff_ffff);
        self.w(0x24, 4, desc >> 32);
        self.w(0x28, 8, avail);
        self.w(0x30, 4, used);
        self.w(0x34, 4, 0);
        self.w(0x1c, 2, 1);
    }
    /// The standard init sequence up to FEATURES_OK.
    fn negotiate(&mut self) {
        self.w(0x14, 1, 0);
        self.w(0x14, 1, 1);
        self.w(0x14, 1, 3);
        self.set_features(VIRTIO_F_VERSION_1 | (1 << 29));
        self.w(0x14, 1, 0xb);
        assert_eq!(self.status(), 0xb);
    }
    fn cfg_write32(&mut self, reg: usize, v: u32) {
        self.dev.config_write(reg, 0, &v.to_le_bytes());
    }
    /// Programs MSI-X vector `v` and enables MSI-X.
    fn msix_program(&mut self, v: u64, addr: u64, data: u32) {
        let base = MSIX_TABLE_OFFSET + 16 * v;
        self.w(base, 4, addr & 0xffff_ffff);
        self.w(base + 4, 4, addr >> 32);
        self.w(base + 8, 4, data.into());
        self.w(base + 12, 4, 0);
    }
    fn msix_control(&mut self, ctl: u16) {
        let cap = self.dev.msix_cap;
        self.dev.config_write(cap / 4, 2, &ctl.to_le_bytes());
    }
}

/// Walks the capability list: (offset, id) pairs.
fn caps(dev: &mut VirtioPciDevice) -> Vec<(usize, u8)> {
    let mut out = Vec::new();
    let mut p = (dev.config_read(0x34 / 4) & 0xff) as usize;
    while p != 0 && out.len() < 64 {
        let d = dev.config_read(p / 4);
        out.push((p, d as u8));
        p = ((d >> 8) & 0xff) as usize;
    }
    out
}

fn cfg_byte(dev: &mut VirtioPciDevice, off: usize) -> u8 {
    (dev.config_read(off / 4) >> (8 * (off % 4))) as u8
}

fn cfg_u32(dev: &mut VirtioPciDevice, off: usize) -> u32 {
    (0..4).fold(0, |acc, i| {
        acc | u32::from(cfg_byte(dev, off + i)) << (8 * i)
    })
}

#[test]
fn identity_and_capabilities() {
    let mut h = harness();
    assert_eq!(h.dev.config_read(0), 0x1042_1af4);
    assert_eq!(h.dev.config_read(2), 0x0180_0001);
    assert_eq!(h.dev.config_read(11), 0x0040_1af4);
    // Vendor ID is read-only.
    h.cfg_write32(0, 0);
    assert_eq!(h.dev.config_read(0), 0x1042_1af4);
    // No INTx pin.
    assert_eq!(h.dev.config_read(15) >> 8 & 0xff, 0);

    let list = caps(&mut h.dev);
    let msix = list.iter().find(|c| c.1 == 0x11).unwrap().0;
    let ctl = cfg_u32(&mut h.dev, msix) >> 16;
    assert_eq!(ctl & 0x7ff, 2, "3 vectors for 2 queues");
    assert_eq!(cfg_u32(&mut h.dev, msix + 4), MSIX_TABLE_OFFSET as u32);
    assert_eq!(cfg_u32(&mut h.dev, msix + 8), MSIX_PBA_OFFSET as u32);

    let mut seen = Vec::new();
    for &(off, id) in &list {
        if id != 0x09 {
            continue;
        }
        let kind = cfg_byte(&mut h.dev, off + 3);
        assert_eq!(cfg_byte(&mut h.dev, off + 4), 0, "BAR 0");
        let offset = cfg_u32(&mut h.dev, off + 8);
        let len = cfg_u32(&mut h.dev, off + 12);
        seen.push((kind, offset, len));
        if kind == 2 {
            assert_eq!(cfg_byte(&mut h.dev, off + 2), 20);
            assert_eq!(cfg_u32(&mut h.dev, off + 16), 4);
        } else if kind == 5 {
            assert_eq!(cfg_byte(&mut h.dev, off + 2), 20);
        } else {
            assert_eq!(cfg_byte(&mut h.dev, off + 2), 16);
        }
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        vec![
            (1, 0, 0x38),
            (2, 0x3000, 8),
            (3, 0x1000, 4),
            (4, 0x2000, 0x1000),
            (5, 0, 0),
        ]
    );
}

#[test]
fn class_codes_and_device_ids() {
    let mut net = harness_with(device_type::NET, &[256, 256], false);
    assert_eq!(net.dev.config_read(0) >> 16, 0x1041);
    assert_eq!(net.dev.config_read(2) >> 8, 0x02_00_00);
    let mut vsock = harness_with(device_type::VSOCK, &[128, 128, 128], false);
    assert_eq!(vsock.dev.config_read(0) >> 16, 0x1053);
    assert_eq!(vsock.dev.config_read(2) >> 8, 0xff_00_00);
    let mut gpu = harness_with(device_type::GPU, &[256, 256], false);
    assert_eq!(gpu.dev.config_read(0) >> 16, 0x1050);
    assert_eq!(
        gpu.dev.config_read(2) >> 8,
        0x03_80_00,
        "display controller"
    );
    let mut input = harness_with(device_type::INPUT, &[64, 64], false);
    assert_eq!(input.dev.config_read(0) >> 16, 0x1052);
    assert_eq!(input.dev.config_read(2) >> 8, 0x09_80_00, "input device");
}

#[test]
fn bad_device_shapes_are_rejected() {
    let hooks: Arc<dyn VmHooks> = Arc::new(FakeHooks::default());
    let (d, _) = fake(device_type::RNG, &[], false);
    assert!(matches!(
        VirtioPciDevice::new(d, mem(), hooks.clone()),
        Err(VirtioPciError::QueueCount(0))
    ));
    let (d, _) = fake(device_type::RNG, &[100], false);
    assert!(matches!(
        VirtioPciDevice::new(d, mem(), hooks.clone()),
        Err(VirtioPciError::QueueSize { .. })
    ));
    let (d, _) = fake(device_type::RNG, &[8; MAX_QUEUES + 1], false);
    assert!(VirtioPciDevice::new(d, mem(), hooks.clone()).is_err());
    let (d, _) = fake(0x1_0000, &[8], false);
    assert!(VirtioPciDevice::new(d, mem(), hooks).is_err());
}

#[test]
fn bar_sizing_reads_size_mask_in_both_halves() {
    let mut h = harness();
    h.dev.set_bar_addr(0, 0xc000_0000);
    assert_eq!(h.dev.config_read(4), 0xc000_0004);
    h.cfg_write32(4, 0xffff_ffff);
    h.cfg_write32(5, 0xffff_ffff);
    assert_eq!(h.dev.config_read(4), 0xffff_c004);
    assert_eq!(h.dev.config_read(5), 0xffff_ffff);
    // Other BARs are unimplemented.
    for reg in 6..10 {
        h.cfg_write32(reg, 0xffff_ffff);
        assert_eq!(h.dev.config_read(reg), 0);
    }
}

#[test]
fn bar_relocation_moves_dispatch_and_ioeventfds() {
    let (device, rec) = fake(device_type::BLOCK, &[256, 128], false);
    let hooks = Arc::new(FakeHooks::default());
    let dev = VirtioPciDevice::new(device, mem(), hooks.clone()).unwrap();
    let root = Arc::new(Mutex::new(PciRoot::new(0xc000_0000, 0x100_0000)));
    let slot = lock(&root).add_device(Arc::new(Mutex::new(dev))).unwrap();
    assert_eq!(slot, 1);
    let mut io = PciConfigIo::new(root.clone());
    let mut win = PciMmioWindow::new(root.clone());
    let cfg = |io: &mut PciConfigIo, reg: u32, v: u32| {
        io.write(0, &(0x8000_0800u32 | reg).to_le_bytes());
        io.write(4, &v.to_le_bytes());
    };
    assert!(hooks.ioevent_addrs().is_empty());
    // Enabling memory decoding registers the notify ioeventfds at the allocated BAR.
    cfg(&mut io, 0x04, 0x6);
    assert_eq!(hooks.ioevent_addrs(), vec![0xc000_3000, 0xc000_3004]);
    let mut b = [0u8; 2];
    win.read(0x12, &mut b);
    assert_eq!(u16::from_le_bytes(b), 2, "num_queues through the window");

    // Move the BAR.
    cfg(&mut io, 0x10, 0xc010_0000);
    assert_eq!(hooks.ioevent_addrs(), vec![0xc010_3000, 0xc010_3004]);
    let calls = hooks.calls();
    assert!(calls.contains(&HookCall::UnregisterIoevent(0xc000_3004)));
    assert!(calls.contains(&HookCall::RegisterIoevent(0xc010_3004)));
    win.read(0x12, &mut b);
    assert_eq!(b, [0xff, 0xff], "old address no longer decoded");
    win.read(0x10_0012, &mut b);
    assert_eq!(u16::from_le_bytes(b), 2);

    // Bring the device up through the window and check the ioeventfd reaches the device.
    let w = |win: &mut PciMmioWindow, off: u64, len: usize, v: u64| {
        win.write(0x10_0000 + off, &v.to_le_bytes()[..len]);
    };
    w(&mut win, 0x14, 1, 3);
    w(&mut win, 0x08, 4, 1);
    w(&mut win, 0x0c, 4, 1);
    w(&mut win, 0x14, 1, 0xb);
    w(&mut win, 0x16, 2, 1);
    w(&mut win, 0x20, 8, 0x1000);
    w(&mut win, 0x28, 8, 0x2000);
    w(&mut win, 0x30, 8, 0x3000);
    w(&mut win, 0x1c, 2, 1);
    w(&mut win, 0x14, 1, 0xf);
    assert_eq!(lock(&rec).activations.len(), 1);
    assert!(hooks.guest_write(0xc010_3004));
    assert_eq!(lock(&rec).kicks[0].read().unwrap(), 1);
    assert!(!hooks.guest_write(0xc000_3004));

    // Disabling memory decoding unregisters them; dropping the device too.
    cfg(&mut io, 0x04, 0);
    assert!(hooks.ioevent_addrs().is_empty());
    cfg(&mut io, 0x04, 0x2);
    assert_eq!(hooks.ioevent_addrs().len(), 2);
    drop((io, win));
    drop(root);
    assert!(hooks.ioevent_addrs().is_empty());
    assert_eq!(lock(&rec).resets, 1, "dropping an active device resets it");
}

#[test]
fn feature_negotiation() {
    let mut h = harness();
    // VERSION_1 is always offered.
    h.w(0x00, 4, 1);
    assert_eq!(h.r(0x04, 4), FEATURES >> 32);
    h.w(0x00, 4, 0);
    assert_eq!(h.r(0x04, 4), FEATURES & 0xffff_ffff);
    h.w(0x00, 4, 2);
    assert_eq!(h.r(0x04, 4), 0);

    h.w(0x14, 1, 3);
    // Bit 6 is not offered.
    h.set_features(VIRTIO_F_VERSION_1 | (1 << 6));
    h.w(0x14, 1, 0xb);
    assert_eq!(h.status() & status::FEATURES_OK, 0);
    assert_eq!(lock(&h.rec).acked, None);
    // Without VERSION_1: refused too.
    h.set_features(1 << 5);
    h.w(0x14, 1, 0xb);
    assert_eq!(h.status() & status::FEATURES_OK, 0);
    // An acceptable set is taken.
    h.set_features(VIRTIO_F_VERSION_1 | (1 << 5));
    h.w(0x08, 4, 0);
    assert_eq!(h.r(0x0c, 4), 1 << 5);
    h.w(0x14, 1, 0xb);
    assert_eq!(h.status(), 0xb);
    assert_eq!(lock(&h.rec).acked, Some(VIRTIO_F_VERSION_1 | (1 << 5)));
    // Features are frozen after FEATURES_OK.
    h.w(0x0c, 4, 0xffff_ffff);
    assert_eq!(h.r(0x0c, 4), 1 << 5);
}

#[test]
fn full_init_activates_with_queue_addresses() {
    let mut h = harness();
    assert_eq!(h.r(0x12, 2), 2);
    h.negotiate();
    h.w(0x16, 2, 0);
    assert_eq!(h.r(0x18, 2), 256, "size defaults to max");
    assert_eq!(h.r(0x1e, 2), 0);
    h.w(0x16, 2, 1);
    assert_eq!(h.r(0x1e, 2), 1);
    h.setup_queue(0, 64, 0x1_0000, 0x1_1000, 0x1_2000);
    h.setup_queue(1, 32, 0x2_0000, 0x2_1000, 0x2_2000);
    assert_eq!(h.r(0x20, 8), 0x2_0000);
    assert_eq!(h.r(0x28, 4), 0x2_1000);
    h.w(0x14, 1, 0xf);
    assert_eq!(h.status(), 0xf);
    let rec = lock(&h.rec);
    assert_eq!(
        rec.activations,
        vec![vec![
            (0, 64, 0x1_0000, 0x1_1000, 0x1_2000, true),
            (1, 32, 0x2_0000, 0x2_1000, 0x2_2000, true),
        ]]
    );
}

#[test]
fn only_enabled_queues_are_handed_over() {
    let mut h = harness();
    h.negotiate();
    h.setup_queue(1, 16, 0x1_0000, 0x1_1000, 0x1_2000);
    h.w(0x14, 1, 0xf);
    assert_eq!(lock(&h.rec).activations[0].len(), 1);
    assert_eq!(lock(&h.rec).activations[0][0].0, 1);
}

#[test]
fn writes_after_driver_ok_are_ignored() {
    let mut h = harness();
    h.negotiate();
    h.setup_queue(0, 64, 0x1_0000, 0x1_1000, 0x1_2000);
    h.w(0x14, 1, 0xf);
    h.w(0x16, 2, 0);
    h.w(0x18, 2, 16);
    h.w(0x20, 4, 0x5000);
    assert_eq!(h.r(0x18, 2), 64);
    assert_eq!(h.r(0x20, 8), 0x1_0000);
    // A second DRIVER_OK write does not re-activate.
    h.w(0x14, 1, 0xf);
    assert_eq!(lock(&h.rec).activations.len(), 1);
}

#[test]
fn invalid_queue_or_backend_failure_needs_reset() {
    // Rings outside guest memory.
    let mut h = harness();
    let config_gsi = 24 + 2;
    h.msix_control(MSG_CTL_ENABLE);
    h.msix_program(2, 0xfee0_0000, 0x41);
    h.negotiate();
    h.w(0x10, 2, 2);
    h.setup_queue(0, 64, 0x1_0000, 0x1_1000, 0xfff_0000);
    h.w(0x14, 1, 0xf);
    assert_ne!(h.status() & status::DEVICE_NEEDS_RESET, 0);
    assert!(lock(&h.rec).activations.is_empty());
    assert_eq!(h.hooks.irq_count(config_gsi), 1, "config interrupt");
    assert_eq!(h.r(ISR_OFFSET, 1), 2);
    // Further status writes keep NEEDS_RESET until reset.
    h.w(0x14, 1, 0x8f);
    assert_ne!(h.status() & status::DEVICE_NEEDS_RESET, 0);
    h.w(0x14, 1, 0);
    assert_eq!(h.status(), 0);

    // The backend refuses.
    let mut h = harness_with(device_type::RNG, &[64], true);
    h.negotiate();
    h.setup_queue(0, 64, 0x1_0000, 0x1_1000, 0x1_2000);
    h.w(0x14, 1, 0xf);
    assert_eq!(h.status(), 0x4f);

    // DRIVER_OK without FEATURES_OK.
    let mut h = harness();
    h.w(0x14, 1, 0x7);
    assert_ne!(h.status() & status::DEVICE_NEEDS_RESET, 0);
    assert!(lock(&h.rec).activations.is_empty());
}

#[test]
fn reset_returns_everything_to_initial_state() {
    let mut h = harness();
    h.negotiate();
    h.w(0x10, 2, 2);
    h.w(0x16, 2, 1);
    h.w(0x1a, 2, 1);
    assert_eq!(h.r(0x10, 2), 2);
    assert_eq!(h.r(0x1a, 2), 1);
    h.setup_queue(0, 64, 0x1_0000, 0x1_1000, 0x1_2000);
    h.w(0x14, 1, 0xf);
    lock(&h.rec).kicks.clear();
    h.w(NOTIFY_OFFSET, 2, 0);
    let resets = lock(&h.rec).resets;
    h.w(0x14, 1, 0);
    assert_eq!(lock(&h.rec).resets, resets + 1);
    assert_eq!(h.status(), 0);
    assert_eq!(h.r(0x10, 2), u64::from(NO_VECTOR));
    assert_eq!(h.r(0x16, 2), 0);
    assert_eq!(h.r(0x18, 2), 256);
    assert_eq!(h.r(0x1c, 2), 0);
    assert_eq!(h.r(0x20, 8), 0);
    h.w(0x16, 2, 1);
    assert_eq!(h.r(0x1a, 2), u64::from(NO_VECTOR));
    h.w(0x08, 4, 0);
    assert_eq!(h.r(0x0c, 4), 0);
    // Stale notifications were drained.
    assert!(h.dev.kicks[0].read().is_err());
    // The device can be brought up again.
    h.negotiate();
    h.setup_queue(0, 64, 0x1_0000, 0x1_1000, 0x1_2000);
    h.w(0x14, 1, 0xf);
    assert_eq!(lock(&h.rec).activations.len(), 2);
}

#[test]
fn queue_size_must_be_power_of_two_within_max() {
    let mut h = harness();
    h.w(0x16, 2, 1);
    for bad in [0u64, 100, 256, 129] {
        h.w(0x18, 2, bad);
        assert_eq!(h.r(0x18, 2), 128, "size {bad} ignored");
    }
    h.w(0x18, 2, 8);
    assert_eq!(h.r(0x18, 2), 8);
    // Wrong-width writes are ignored.
    h.w(0x18, 4, 16);
    h.w(0x19, 1, 0);
    assert_eq!(h.r(0x18, 2), 8);
}

#[test]
fn queue_select_out_of_range() {
    let mut h = harness();
    h.w(0x16, 2, 7);
    assert_eq!(h.r(0x16, 2), 7);
    for off in [0x18u64, 0x1a, 0x1c, 0x1e] {
        assert_eq!(h.r(off, 2), 0, "field {off:#x}");
    }
    assert_eq!(h.r(0x20, 8), 0);
    h.w(0x18, 2, 16);
    h.w(0x1c, 2, 1);
    h.w(0x20, 8, 0x1000);
    h.w(0x1a, 2, 0);
    assert_eq!(h.r(0x18, 2), 0);
    assert_eq!(h.r(0x20, 8), 0);
    for q in 0..2 {
        h.w(0x16, 2, q);
        assert_eq!(h.r(0x1c, 2), 0);
        assert_eq!(h.r(0x20, 8), 0);
    }
}

#[test]
fn msix_vector_validation() {
    let mut h = harness();
    h.w(0x10, 2, 2);
    assert_eq!(h.r(0x10, 2), 2);
    h.w(0x10, 2, 3);
    assert_eq!(h.r(0x10, 2), u64::from(NO_VECTOR));
    h.w(0x16, 2, 0);
    h.w(0x1a, 2, 1);
    assert_eq!(h.r(0x1a, 2), 1);
    h.w(0x1a, 2, 0x800);
    assert_eq!(h.r(0x1a, 2), u64::from(NO_VECTOR));
}

#[test]
fn msix_table_programming_routes_gsis() {
    let mut h = harness();
    let gsis: Vec<u32> = h
        .hooks
        .calls()
        .iter()
        .filter_map(|c| match c {
            HookCall::AllocateMsi(g) => Some(*g),
            _ => None,
        })
        .collect();
    assert_eq!(gsis.len(), 3);
    h.hooks.clear();
    h.msix_control(MSG_CTL_ENABLE | MSG_CTL_FUNCTION_MASK);
    h.msix_program(1, 0xfee0_2000, 0x4055);
    assert!(h.hooks.routes().is_empty(), "function masked: no route yet");
    h.msix_control(MSG_CTL_ENABLE);
    assert_eq!(
        h.hooks.routes(),
        vec![HookCall::SetMsiRoute {
            gsi: gsis[1],
            address: 0xfee0_2000,
            data: 0x4055,
            devid: 0,
            enabled: true
        }]
    );
    // Table reads back through the BAR; control register in config space too.
    assert_eq!(h.r(MSIX_TABLE_OFFSET + 16, 8), 0xfee0_2000);
    assert_eq!(h.r(MSIX_TABLE_OFFSET + 24, 4), 0x4055);
    let cap = h.dev.msix_cap;
    assert_eq!(h.dev.config_read(cap / 4) >> 16, 0x8002);
    // Disabling MSI-X removes the route.
    h.msix_control(0);
    assert!(matches!(
        h.hooks.routes().last(),
        Some(HookCall::SetMsiRoute { enabled: false, gsi, .. }) if *gsi == gsis[1]
    ));
    // Placed on a bus, the function routes its live vectors again with its requester id
    // (an arm64 GICv3 ITS translates by it), and later routes carry it too.
    h.msix_control(MSG_CTL_ENABLE);
    h.hooks.clear();
    h.dev.set_requester_id(3 << 3);
    h.msix_program(2, 0xfee0_3000, 0x4056);
    let route = |gsi, address, data| HookCall::SetMsiRoute {
        gsi,
        address,
        data,
        devid: 0x18,
        enabled: true,
    };
    assert_eq!(
        h.hooks.routes(),
        vec![
            route(gsis[1], 0xfee0_2000, 0x4055),
            route(gsis[2], 0xfee0_3000, 0x4056)
        ]
    );
}

#[test]
fn interrupts_deliver_pend_and_set_isr() {
    let mut h = harness();
    h.msix_control(MSG_CTL_ENABLE);
    h.msix_program(0, 0xfee0_0000, 0x30);
    h.msix_program(2, 0xfee0_0000, 0x32);
    h.w(0x10, 2, 2);
    h.w(0x16, 2, 1);
    h.w(0x1a, 2, 0);
    let irq = h.dev.interrupt();
    let (q_gsi, cfg_gsi) = (24, 26);

    irq.signal_queue(1);
    assert_eq!(h.hooks.irq_count(q_gsi), 1);
    assert_eq!(h.r(ISR_OFFSET, 1), 1);
    assert_eq!(h.r(ISR_OFFSET, 1), 0, "reading clears the ISR");
    let gen = h.r(0x15, 1);
    irq.signal_config();
    assert_eq!(h.hooks.irq_count(cfg_gsi), 1);
    assert_ne!(h.r(0x15, 1), gen, "config generation moves");
    assert_eq!(h.r(ISR_OFFSET, 4), 2);

    // Queue 0 has no vector: only the ISR bit.
    irq.signal_queue(0);
    assert_eq!(h.hooks.irq_count(q_gsi), 0);
    assert_eq!(h.r(ISR_OFFSET, 1), 1);
    // Out-of-range queue: nothing.
    irq.signal_queue(9);
    assert_eq!(h.r(ISR_OFFSET, 1), 0);

    // Masked vector: pending bit, delivered on unmask.
    h.w(MSIX_TABLE_OFFSET + 12, 4, 1);
    irq.signal_queue(1);
    assert_eq!(h.hooks.irq_count(q_gsi), 0);
    assert_eq!(h.r(MSIX_PBA_OFFSET, 8), 1);
    h.w(MSIX_TABLE_OFFSET + 12, 4, 0);
    assert_eq!(h.hooks.irq_count(q_gsi), 1);
    assert_eq!(h.r(MSIX_PBA_OFFSET, 8), 0);
    // PBA is read-only.
    h.w(MSIX_PBA_OFFSET, 8, u64::MAX);
    assert_eq!(h.r(MSIX_PBA_OFFSET, 8), 0);

    // device_error sets NEEDS_RESET and signals config.
    irq.device_error();
    assert_ne!(h.status() & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(h.hooks.irq_count(cfg_gsi), 1);
}

#[test]
fn notify_write_signals_kick() {
    let mut h = harness();
    h.w(NOTIFY_OFFSET + 4, 2, 1);
    assert_eq!(h.dev.kicks[1].read().unwrap(), 1);
    assert!(h.dev.kicks[0].read().is_err());
    // Misaligned or past the last queue: ignored.
    h.w(NOTIFY_OFFSET + 2, 2, 0);
    h.w(NOTIFY_OFFSET + 8, 2, 0);
    assert!(h.dev.kicks[0].read().is_err());
    assert!(h.dev.kicks[1].read().is_err());
    // Reading the notify area gives zero.
    assert_eq!(h.r(NOTIFY_OFFSET, 4), 0);
}

#[test]
fn device_config_is_forwarded() {
    let mut h = harness();
    assert_eq!(h.r(DEVICE_CFG_OFFSET + 3, 1), 3 ^ 0x5a);
    h.w(DEVICE_CFG_OFFSET + 8, 4, 0xaabb_ccdd);
    assert_eq!(
        lock(&h.rec).config_writes,
        vec![(8, vec![0xdd, 0xcc, 0xbb, 0xaa])]
    );
    // Other BARs and unused areas read zero.
    let mut b = [0xffu8; 4];
    h.dev.bar_read(2, 0, &mut b);
    assert_eq!(b, [0; 4]);
    assert_eq!(h.r(0x100, 4), 0);
}

#[test]
fn garbage_accesses_never_panic() {
    let mut h = harness();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..50_000u32 {
        let r = next();
        let len = [1usize, 2, 4, 8, 3, 0][(r % 6) as usize];
        let val = next().to_le_bytes();
        let mut buf = [0u8; 8];
        let off = next();
        match (r >> 8) % 8 {
            0 => {
                let reg = (off % 80) as usize;
                let o = (off >> 8) % 4;
                h.dev.config_write(reg, o, &val[..len.min(4)]);
                h.dev.config_read(reg);
            }
            1 => {
                // Aim at the common config often, with status values that bring it up.
                let o = off % 0x40;
                h.dev.bar_write(0, o, &val[..len]);
                h.dev.bar_read(0, o, &mut buf[..len]);
            }
            2 => h.w(0x14, 1, [0, 1, 3, 0xb, 0xf, 0x4f, 0x80][(off % 7) as usize]),
            3 => h.dev.bar_read(0, off % 0x4010, &mut buf[..len]),
            4 => h.dev.bar_write(0, off % 0x4010, &val[..len]),
            5 => h.dev.bar_write(0, off, &val[..len]),
            6 => {
                let irq = h.dev.interrupt();
                irq.signal_queue((off % 4) as u16);
                if i % 7 == 0 {
                    irq.device_error();
                }
            }
            _ => h.dev.bar_read((off % 7) as usize, off, &mut buf[..len]),
        }
    }
    // Still a working device afterwards.
    h.w(0x14, 1, 0);
    h.negotiate();
    h.setup_queue(0, 64, 0x1_0000, 0x1_1000, 0x1_2000);
    h.w(0x14, 1, 0xf);
    assert_eq!(h.status(), 0xf);
}

#[test]
fn pci_cfg_capability_accesses_bar0() {
    let mut h = harness();
    let cap = caps(&mut h.dev)
        .into_iter()
        .find(|&(off, id)| id == 0x09 && cfg_byte(&mut h.dev, off + 3) == 5)
        .unwrap()
        .0;
    let data_reg = (cap + 16) / 4;
    // num_queues (2 bytes at common 0x12).
    h.cfg_write32((cap + 8) / 4, 0x12);
    h.cfg_write32((cap + 12) / 4, 2);
    assert_eq!(h.dev.config_read(data_reg) & 0xffff, 2);
    // device_status through the window.
    h.cfg_write32((cap + 8) / 4, 0x14);
    h.cfg_write32((cap + 12) / 4, 1);
    h.cfg_write32(data_reg, 3);
    assert_eq!(h.status(), 3);
    assert_eq!(h.dev.config_read(data_reg) & 0xff, 3);
    // Misaligned, oversized or another BAR: no access.
    h.cfg_write32((cap + 8) / 4, 0x13);
    h.cfg_write32((cap + 12) / 4, 2);
    h.cfg_write32(data_reg, 0);
    h.cfg_write32((cap + 8) / 4, 0x14);
    h.cfg_write32((cap + 12) / 4, 8);
    h.cfg_write32(data_reg, 0);
    h.dev.config_write(cap / 4 + 1, 0, &[1]);
    h.cfg_write32((cap + 12) / 4, 1);
    h.cfg_write32(data_reg, 0);
    assert_eq!(h.status(), 3);
}

#[test]
fn garbage_through_the_root_keeps_ioeventfds_consistent() {
    let (device, _rec) = fake(device_type::NET, &[64, 64, 16], false);
    let hooks = Arc::new(FakeHooks::default());
    let dev = VirtioPciDevice::new(device, mem(), hooks.clone()).unwrap();
    let root = Arc::new(Mutex::new(PciRoot::new(0xc000_0000, 0x10_0000)));
    lock(&root).add_device(Arc::new(Mutex::new(dev))).unwrap();
    let mut ecam = crate::pci::PciConfigMmio::new(root.clone());
    let mut win = PciMmioWindow::new(root.clone());
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..30_000 {
        let r = next();
        let len = [1usize, 2, 4, 8][(r % 4) as usize];
        let val = next().to_le_bytes();
        let off = next();
        let mut buf = [0u8; 8];
        match (r >> 8) % 6 {
            // The command register and BARs of slot 1, with plausible values.
            0 => {
                let reg = [0x04u64, 0x10, 0x14][(off % 3) as usize];
                let v: u32 = match off >> 60 {
                    0..=3 => 0xc000_0000 | ((off >> 8) as u32 & 0xf_c000),
                    4..=5 => 0xffff_ffff,
                    6..=11 => (off >> 16) as u32 & 0x7,
                    _ => 0,
                };
                ecam.write(1 << 15 | reg, &v.to_le_bytes());
            }
            1 => ecam.write(1 << 15 | (off & 0xfff), &val[..len]),
            2 => ecam.read(off % 0x10_0000, &mut buf[..len]),
            3 => win.write(off % 0x10_0000, &val[..len]),
            4 => win.read(off % 0x10_0000, &mut buf[..len]),
            _ => {
                // Bring the device up so notifications and MSI-X have something to do.
                win.write((off % 0x4000) & !3, &val[..4]);
            }
        }
        // Invariant: ioeventfds are exactly the notify addresses of the decoded BAR.
        let cmd = lock(&root).config_read(0, 1, 0, 1);
        let lo = u64::from(lock(&root).config_read(0, 1, 0, 4) & !0xf);
        let hi = u64::from(lock(&root).config_read(0, 1, 0, 5));
        let bar = hi << 32 | lo;
        let decoded =
            cmd & 2 != 0 && bar >= 0xc000_0000 && bar.saturating_add(BAR0_SIZE) <= 0xc010_0000;
        let want: Vec<u64> = if decoded {
            (0..3).map(|q| bar + NOTIFY_OFFSET + 4 * q).collect()
        } else {
            Vec::new()
        };
        assert_eq!(hooks.ioevent_addrs(), want);
    }
}

/// A harness driven to DRIVER_OK with both queues set up, MSI-X enabled and vector 0 on
/// queue 0; the used index of queue 0 is `used` in guest memory.
fn running(used: u16) -> H {
    use vm_memory::Bytes;
    let mut h = harness();
    h.negotiate();
    h.setup_queue(0, 16, 0x1000, 0x2000, 0x3000);
    h.setup_queue(1, 8, 0x4000, 0x5000, 0x6000);
    h.msix_program(0, 0xfee0_0000, 0x41);
    h.msix_control(MSG_CTL_ENABLE);
    h.w(0x16, 2, 0);
    h.w(0x1a, 2, 0);
    h.w(0x10, 2, 2);
    h.dev
        .mem
        .write_obj(used, GuestAddress(0x3002))
        .expect("used idx");
    h.w(0x14, 1, 0xf);
    assert_eq!(h.status(), 0xf);
    h
}

#[test]
fn state_round_trips_into_a_new_function() {
    use vm_memory::Bytes;
    let mut src = running(7);
    src.dev.pause();
    let state = src.dev.save_state();
    assert!(state.activated);
    assert_eq!(
        (state.queues[0].next_avail, state.queues[0].next_used),
        (7, 7)
    );
    assert_eq!(state.queues[1].size, 8);
    assert_eq!(state.config_vector, 2);
    assert_eq!(state.queue_vectors, vec![0, NO_VECTOR]);

    let mut dst = harness();
    // The new function shares nothing but guest memory contents.
    dst.dev.mem.write_obj(7u16, GuestAddress(0x3002)).unwrap();
    dst.dev.restore_state(&state).unwrap();
    assert_eq!(dst.dev.save_state(), state);
    assert_eq!(dst.status(), 0xf);
    let rec = lock(&dst.rec);
    assert_eq!(rec.acked, Some(VIRTIO_F_VERSION_1 | (1 << 29)));
    assert_eq!(
        rec.activations,
        vec![vec![
            (0, 16, 0x1000, 0x2000, 0x3000, true),
            (1, 8, 0x4000, 0x5000, 0x6000, true)
        ]]
    );
    drop(rec);
    // MSI-X routes were programmed afresh for the restored table.
    assert!(dst.hooks.routes().iter().any(|c| matches!(
        c,
        HookCall::SetMsiRoute {
            address: 0xfee0_0000,
            data: 0x41,
            enabled: true,
            ..
        }
    )));
}

#[test]
fn mismatched_states_are_refused() {
    use vm_memory::Bytes;
    let src = running(3);
    let good = src.dev.save_state();
    let fresh = || {
        let h = harness();
        h.dev.mem.write_obj(3u16, GuestAddress(0x3002)).unwrap();
        h
    };

    let mut s = good.clone();
    s.device_type = device_type::NET;
    assert!(fresh().dev.restore_state(&s).is_err());
    let mut s = good.clone();
    s.queues.pop();
    assert!(fresh().dev.restore_state(&s).is_err());
    let mut s = good.clone();
    s.config[0] ^= 1; // Vendor ID is read-only.
    assert!(fresh().dev.restore_state(&s).is_err());
    let mut s = good.clone();
    s.queue_vectors[0] = 40;
    assert!(fresh().dev.restore_state(&s).is_err());
    let mut s = good.clone();
    s.queues[0].size = 1024;
    assert!(fresh().dev.restore_state(&s).is_err());
    let mut s = good.clone();
    s.driver_features |= 1 << 40;
    assert!(fresh().dev.restore_state(&s).is_err());
    let mut s = good.clone();
    s.device_state = vec![1];
    assert!(fresh().dev.restore_state(&s).is_err());
    let mut s = good.clone();
    s.device_config[3] ^= 1;
    assert!(fresh().dev.restore_state(&s).is_err());
    let mut s = good.clone();
    s.msix.entries.pop();
    assert!(fresh().dev.restore_state(&s).is_err());
    // The used ring in memory must agree with the saved position.
    assert!(harness().dev.restore_state(&good).is_err());
    assert!(fresh().dev.restore_state(&good).is_ok());
}
