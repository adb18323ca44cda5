//! The transport driven like a guest driver would, over ECAM and the MMIO window, with a real
//! device model (virtio-rng) and its worker thread.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::bus::BusDevice;
use crate::pci::testing::FakeHooks;
use crate::pci::{PciConfigMmio, PciMmioWindow, PciRoot};
use crate::virtio::rng::Rng;

const WINDOW: u64 = 0xc000_0000;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const BUF: u64 = 0x8000;

struct Driver {
    ecam: PciConfigMmio,
    win: PciMmioWindow,
    slot: u64,
}

impl Driver {
    fn cfg_read(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.ecam.read(self.slot << 15 | off, &mut b);
        u32::from_le_bytes(b)
    }
    fn cfg_write(&mut self, off: u64, data: &[u8]) {
        self.ecam.write(self.slot << 15 | off, data);
    }
    fn bar(&mut self) -> u64 {
        let lo = u64::from(self.cfg_read(0x10) & !0xf);
        let hi = u64::from(self.cfg_read(0x14));
        hi << 32 | lo
    }
    fn w(&mut self, off: u64, len: usize, v: u64) {
        let at = self.bar() + off - WINDOW;
        self.win.write(at, &v.to_le_bytes()[..len]);
    }
    fn r(&mut self, off: u64, len: usize) -> u64 {
        let at = self.bar() + off - WINDOW;
        let mut b = [0u8; 8];
        self.win.read(at, &mut b[..len]);
        u64::from_le_bytes(b)
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn rng_request_round_trip_over_msix() {
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let hooks = Arc::new(FakeHooks::default());
    let dev = VirtioPciDevice::new(Box::new(Rng::new()), mem.clone(), hooks.clone()).unwrap();
    let root = Arc::new(Mutex::new(PciRoot::new(WINDOW, 0x1000_0000)));
    let slot = lock(&root).add_device(Arc::new(Mutex::new(dev))).unwrap();
    let mut d = Driver {
        ecam: PciConfigMmio::new(root.clone()),
        win: PciMmioWindow::new(root.clone()),
        slot: slot.into(),
    };
    assert_eq!(d.cfg_read(0), 0x1044_1af4);

    // Enable memory decoding and bus mastering, then MSI-X.
    d.cfg_write(0x04, &[0x06, 0]);
    let mut cap = (d.cfg_read(0x34) & 0xff) as u64;
    while d.cfg_read(cap) & 0xff != 0x11 {
        cap = u64::from((d.cfg_read(cap) >> 8) & 0xff);
        assert_ne!(cap, 0, "no MSI-X capability");
    }
    d.cfg_write(cap + 3, &[0x80]);
    // Vector 1 for queue 0.
    let entry = MSIX_TABLE_OFFSET + 16;
    d.w(entry, 4, 0xfee0_0000);
    d.w(entry + 4, 4, 0);
    d.w(entry + 8, 4, 0x31);
    d.w(entry + 12, 4, 0);

    // Driver init.
    d.w(0x14, 1, 0);
    d.w(0x14, 1, 1);
    d.w(0x14, 1, 3);
    d.w(0x08, 4, 1);
    d.w(0x0c, 4, 1);
    d.w(0x14, 1, 0xb);
    assert_eq!(d.r(0x14, 1), 0xb);
    d.w(0x16, 2, 0);
    d.w(0x18, 2, 8);
    d.w(0x1a, 2, 1);
    assert_eq!(d.r(0x1a, 2), 1);
    d.w(0x20, 8, DESC);
    d.w(0x28, 8, AVAIL);
    d.w(0x30, 8, USED);
    d.w(0x1c, 2, 1);
    d.w(0x14, 1, 0xf);
    assert_eq!(d.r(0x14, 1), 0xf);

    // One 64-byte device-writable buffer.
    mem.write_obj(BUF, GuestAddress(DESC)).unwrap();
    mem.write_obj(64u32, GuestAddress(DESC + 8)).unwrap();
    mem.write_obj(2u16, GuestAddress(DESC + 12)).unwrap();
    mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
    // Kick through the ioeventfd, as KVM would.
    let notify = d.bar() + NOTIFY_OFFSET;
    assert!(hooks.guest_write(notify));

    let gsi = 25;
    let mut irqs = 0;
    wait_for("the used-buffer interrupt", || {
        irqs += hooks.irq_count(gsi);
        irqs > 0
    });
    assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 1);
    assert_eq!(mem.read_obj::<u32>(GuestAddress(USED + 4)).unwrap(), 0);
    assert_eq!(mem.read_obj::<u32>(GuestAddress(USED + 8)).unwrap(), 64);
    let mut buf = [0u8; 64];
    mem.read_slice(&mut buf, GuestAddress(BUF)).unwrap();
    assert_ne!(buf, [0; 64], "random bytes were written");
    assert_eq!(d.r(ISR_OFFSET, 1) & 1, 1);

    // A second request, kicked by a plain MMIO write this time.
    mem.write_obj(0u16, GuestAddress(AVAIL + 6)).unwrap();
    mem.write_obj(2u16, GuestAddress(AVAIL + 2)).unwrap();
    d.w(NOTIFY_OFFSET, 2, 0);
    wait_for("the second used entry", || {
        mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap() == 2
    });

    // Reset stops the device; it can be brought up again.
    d.w(0x14, 1, 0);
    assert_eq!(d.r(0x14, 1), 0);
    assert_eq!(d.r(0x1c, 2), 0);
}
