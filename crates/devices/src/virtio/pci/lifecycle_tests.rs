//! Every device through a whole life behind the transport, crosvm-style: activated by a driver,
//! serves a request, is paused and saved, is rebuilt in a "new process" (a new device and
//! transport over the same guest memory) and restored from the saved state (through its serde
//! form), resumes and serves another request at the right queue positions.
// Test data: hand-built guest-side values and small constants, narrowed on purpose.
#![allow(clippy::cast_possible_truncation)]

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::pci::testing::FakeHooks;
use crate::virtio::balloon::{Balloon, BalloonConfig};
use crate::virtio::block::Block;
use crate::virtio::chain::DESC_F_WRITE;
use crate::virtio::net::{Net, NetBackend};
use crate::virtio::rng::Rng;
use crate::virtio::vsock::packet::{Header, HDR_LEN, HOST_CID, OP_REQUEST, OP_RESPONSE};
use crate::virtio::vsock::Vsock;
use crate::virtio::worker::testing::{test_mem, wait_until, TestQueue};

const QSIZE: u16 = 16;

/// A guest driver of one device.
struct Guest {
    dev: VirtioPciDevice,
    mem: GuestMem,
    queues: Vec<TestQueue>,
}

impl Guest {
    fn w(&mut self, off: u64, len: usize, v: u64) {
        self.dev.bar_write(0, off, &v.to_le_bytes()[..len]);
    }

    fn status(&mut self) -> u8 {
        let mut b = [0u8];
        self.dev.bar_read(0, 0x14, &mut b);
        b[0]
    }

    /// Runs the driver's init sequence: all offered features, every queue, DRIVER_OK.
    fn bring_up(device: Box<dyn VirtioDevice>, mem: &GuestMem) -> Guest {
        let hooks = Arc::new(FakeHooks::default());
        let dev = VirtioPciDevice::new(device, mem.clone(), hooks).unwrap();
        let nq = dev.queues.len();
        let features = dev.offered_features;
        let mut g = Guest {
            dev,
            mem: mem.clone(),
            queues: Vec::new(),
        };
        for s in [0, 1, 3] {
            g.w(0x14, 1, s);
        }
        for (select, half) in [(0, features & 0xffff_ffff), (1, features >> 32)] {
            g.w(0x08, 4, select);
            g.w(0x0c, 4, half);
        }
        g.w(0x14, 1, 0xb);
        assert_eq!(g.status(), 0xb, "features accepted");
        for q in 0..nq {
            let tq = TestQueue::new(0x1000 * (q as u64 + 1), QSIZE);
            g.w(0x16, 2, q as u64);
            g.w(0x18, 2, u64::from(QSIZE));
            g.w(0x20, 8, tq.desc.0);
            g.w(0x28, 8, tq.avail.0);
            g.w(0x30, 8, tq.used.0);
            g.w(0x1c, 2, 1);
            g.queues.push(tq);
        }
        g.w(0x14, 1, 0xf);
        assert_eq!(g.status(), 0xf, "device live");
        g
    }

    /// Notifies queue `q` through the BAR, as a trapped MMIO write would.
    fn kick(&mut self, q: usize) {
        self.w(NOTIFY_OFFSET + 4 * q as u64, 2, 0);
    }

    /// Makes chain `bufs` (in descriptor slots from `first`) available on queue `q`.
    fn add(&self, q: usize, first: u16, bufs: &[(u64, u32, u16)]) {
        self.queues[q].add_chain(&self.mem, first, bufs);
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.queues[q].used_idx(&self.mem)
    }

    fn wait_used(&self, q: usize, n: u16) {
        assert!(
            wait_until(|| self.used_idx(q) == n),
            "queue {q}: used index {} instead of {n}",
            self.used_idx(q)
        );
    }

    /// Pauses, saves, drops the device (its worker stops, its host resources go), builds a
    /// new one with `rebuild` and restores it from the saved state, then resumes it.
    fn save_and_restore(mut self, rebuild: impl FnOnce() -> Box<dyn VirtioDevice>) -> Guest {
        self.dev.pause();
        let saved = self.dev.save_state();
        let text = serde_json::to_string(&saved).unwrap();
        let saved: VirtioPciState = serde_json::from_str(&text).unwrap();
        let Guest { dev, mem, queues } = self;
        drop(dev);
        let hooks = Arc::new(FakeHooks::default());
        let mut dev = VirtioPciDevice::new(rebuild(), mem.clone(), hooks).unwrap();
        dev.restore_state(&saved).unwrap();
        dev.resume();
        let mut g = Guest { dev, mem, queues };
        assert_eq!(g.status(), 0xf, "restored live");
        g
    }

    /// While paused, a request made available and kicked is left alone.
    fn assert_paused_ignores(&mut self, q: usize) {
        let before = self.used_idx(q);
        self.kick(q);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(self.used_idx(q), before, "a paused device served a request");
    }
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("pv-lifecycle-{}-{name}", std::process::id()))
}

#[test]
fn rng_survives_pause_save_restore_resume() {
    let mem = test_mem();
    let mut g = Guest::bring_up(Box::new(Rng::new()), &mem);
    g.add(0, 0, &[(0x40000, 64, DESC_F_WRITE)]);
    g.kick(0);
    g.wait_used(0, 1);
    assert_eq!(g.queues[0].used_elem(&mem, 0), (0, 64));
    assert_eq!(g.dev.counters().requests, 1);
    assert_eq!(g.dev.counters().bytes, 64);

    // A request made while paused is served only by the restored device.
    g.dev.pause();
    g.add(0, 1, &[(0x50000, 32, DESC_F_WRITE)]);
    g.assert_paused_ignores(0);
    let mut g = g.save_and_restore(|| Box::new(Rng::new()));
    g.kick(0);
    g.wait_used(0, 2);
    assert_eq!(g.queues[0].used_elem(&mem, 1), (1, 32));
    let mut b = [0u8; 32];
    mem.read_slice(&mut b, GuestAddress(0x50000)).unwrap();
    assert_ne!(b, [0; 32]);
    assert_eq!(
        g.dev.counters().requests,
        1,
        "counters are per device instance"
    );
}

#[test]
fn block_survives_pause_save_restore_resume() {
    let path = temp_path("disk");
    let mut image = vec![0u8; 8 * 512];
    for (i, sector) in image.chunks_mut(512).enumerate() {
        sector.fill(0x10 + i as u8);
    }
    std::fs::write(&path, &image).unwrap();
    let mem = test_mem();
    let read_sector = |g: &Guest, first: u16, sector: u64, at: u64| {
        let mut hdr = [0u8; 16];
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(at)).unwrap();
        g.add(
            0,
            first,
            &[
                (at, 16, 0),
                (at + 0x1000, 512, DESC_F_WRITE),
                (at + 0x2000, 1, DESC_F_WRITE),
            ],
        );
    };
    let check = |sector: u8, at: u64| {
        let mut data = [0u8; 512];
        mem.read_slice(&mut data, GuestAddress(at + 0x1000))
            .unwrap();
        assert_eq!(data, [0x10 + sector; 512]);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(at + 0x2000)).unwrap(), 0);
    };
    let mut g = Guest::bring_up(Box::new(Block::new(&path, false, None).unwrap()), &mem);
    read_sector(&g, 0, 3, 0x40000);
    g.kick(0);
    g.wait_used(0, 1);
    check(3, 0x40000);
    assert_eq!(g.queues[0].used_elem(&mem, 0), (0, 513));
    assert_eq!(g.dev.counters().bytes, 512);

    g.dev.pause();
    read_sector(&g, 3, 6, 0x50000);
    g.assert_paused_ignores(0);
    let mut g = g.save_and_restore(|| Box::new(Block::new(&path, false, None).unwrap()));
    g.kick(0);
    g.wait_used(0, 2);
    check(6, 0x50000);
    assert_eq!(g.queues[0].used_elem(&mem, 1), (3, 513));
    drop(g);
    std::fs::remove_file(&path).unwrap();
}

/// A datagram socket as the net backend: one datagram is one frame.
struct Dgram(UnixDatagram);

impl AsRawFd for Dgram {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for Dgram {
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.recv(buf)
    }
    fn send(&self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.send(buf)
    }
}

#[test]
fn net_survives_pause_save_restore_resume() {
    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 9];
    let (ours, peer) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let backend: Arc<dyn NetBackend> = Arc::new(Dgram(ours));
    let net = |b: &Arc<dyn NetBackend>| Box::new(Net::with_backend(b.clone(), Some(MAC)).unwrap());
    let mem = test_mem();
    let mut g = Guest::bring_up(net(&backend), &mem);

    // tx: a 12-byte header and a 60-byte frame reach the host.
    mem.write_slice(&[0xab; 72], GuestAddress(0x40000)).unwrap();
    g.add(1, 0, &[(0x40000, 72, 0)]);
    g.kick(1);
    g.wait_used(1, 1);
    let mut frame = [0u8; 128];
    assert_eq!(peer.recv(&mut frame).unwrap(), 72);
    assert_eq!(frame[..12], [0; 12], "header zeroed");
    assert_eq!(frame[12..72], [0xab; 60]);

    // An rx buffer the driver gave before the snapshot is used by the restored device.
    g.add(0, 0, &[(0x50000, 2048, DESC_F_WRITE)]);
    g.kick(0);
    g.dev.pause();
    let g = g.save_and_restore(|| net(&backend));
    let mut sent = vec![0u8; 12];
    sent.extend_from_slice(&[0xcd; 60]);
    peer.send(&sent).unwrap();
    g.wait_used(0, 1);
    assert_eq!(g.queues[0].used_elem(&mem, 0), (0, 72));
    let mut got = [0u8; 60];
    mem.read_slice(&mut got, GuestAddress(0x50000 + 12))
        .unwrap();
    assert_eq!(got, [0xcd; 60]);
    assert_eq!(g.dev.counters().requests, 1);
}

#[test]
fn a_net_device_restored_with_a_clones_mac_shows_it_in_a_new_config_generation() {
    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 9];
    const CLONE: [u8; 6] = [6, 1, 2, 3, 4, 5];
    let (ours, _peer) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let backend: Arc<dyn NetBackend> = Arc::new(Dgram(ours));
    let mem = test_mem();
    let mut g = Guest::bring_up(
        Box::new(Net::with_backend(backend.clone(), Some(MAC)).unwrap()),
        &mem,
    );
    let mac_and_generation = |g: &mut Guest| {
        let mut mac = [0u8; 6];
        g.dev.bar_read(0, DEVICE_CFG_OFFSET, &mut mac);
        let mut generation = [0u8];
        g.dev.bar_read(0, 0x15, &mut generation);
        (mac, generation[0])
    };
    let (mac, before) = mac_and_generation(&mut g);
    assert_eq!(mac, MAC);
    let mut g = g.save_and_restore(|| Box::new(Net::with_backend(backend, Some(CLONE)).unwrap()));
    let (mac, after) = mac_and_generation(&mut g);
    assert_eq!(mac, CLONE);
    assert_ne!(after, before, "the changed config is not a new generation");
}

#[test]
fn vsock_survives_pause_save_restore_resume() {
    let uds = temp_path("vsock");
    let mem = test_mem();
    let vsock = |uds: &PathBuf| Box::new(Vsock::new(3, uds).unwrap());
    let listen = |port: u32| {
        let mut p = uds.clone().into_os_string();
        p.push(format!("_{port}"));
        let _ = std::fs::remove_file(&p);
        (UnixListener::bind(&p).unwrap(), PathBuf::from(p))
    };
    // The guest connects to host port `port`; the answer comes in rx buffer `rx_at`.
    let connect = |g: &mut Guest, slot: u16, port: u32, rx_at: u64| {
        let hdr = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000 + port,
            dst_port: port,
            kind: 1,
            op: OP_REQUEST,
            buf_alloc: 4096,
            ..Header::default()
        };
        let tx_at = rx_at + 0x1000;
        mem.write_slice(&hdr.to_bytes(), GuestAddress(tx_at))
            .unwrap();
        g.add(0, slot, &[(rx_at, 256, DESC_F_WRITE)]);
        g.add(1, slot, &[(tx_at, HDR_LEN as u32, 0)]);
        g.kick(0);
        g.kick(1);
    };
    let answer = |at: u64| {
        let mut raw = [0u8; HDR_LEN];
        mem.read_slice(&mut raw, GuestAddress(at)).unwrap();
        Header::from_bytes(&raw)
    };

    let mut g = Guest::bring_up(vsock(&uds), &mem);
    let (l1, p1) = listen(5001);
    connect(&mut g, 0, 5001, 0x40000);
    g.wait_used(0, 1);
    assert_eq!(answer(0x40000).op, OP_RESPONSE);
    let (mut s1, _) = l1.accept().unwrap();
    // An event buffer for the transport reset the restored device owes the driver.
    g.add(2, 0, &[(0x60000, 8, DESC_F_WRITE)]);
    g.kick(2);

    g.dev.pause();
    let mut g = g.save_and_restore(|| vsock(&uds));
    // The old connection is gone (its host end sees EOF), and the driver is told.
    s1.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    assert_eq!(s1.read(&mut b).unwrap(), 0);
    g.wait_used(2, 1);
    assert_eq!(mem.read_obj::<u32>(GuestAddress(0x60000)).unwrap(), 0);
    // A new connection works.
    let (l2, p2) = listen(5002);
    connect(&mut g, 1, 5002, 0x50000);
    g.wait_used(0, 2);
    assert_eq!(answer(0x50000).op, OP_RESPONSE);
    assert_eq!(answer(0x50000).src_port, 5002);
    let (mut s2, _) = l2.accept().unwrap();
    s2.write_all(b"x").unwrap();
    drop(g);
    for p in [p1, p2] {
        let _ = std::fs::remove_file(p);
    }
}

#[test]
fn balloon_survives_pause_save_restore_resume() {
    let mem = test_mem();
    let cfg = BalloonConfig {
        stats: false,
        free_page_reporting: false,
        deflate_on_oom: true,
    };
    let first = Balloon::new(1 << 20, cfg).unwrap();
    let handle = first.handle();
    handle.set_target_mib(1).unwrap();
    let mut g = Guest::bring_up(Box::new(first), &mem);
    // The driver inflates one page and says so in `actual`.
    let inflate = |g: &Guest, slot: u16, pfn: u32, at: u64| {
        mem.write_obj(pfn, GuestAddress(at)).unwrap();
        g.add(0, slot, &[(at, 4, 0)]);
    };
    inflate(&g, 0, 0x80, 0x40000);
    g.kick(0);
    g.wait_used(0, 1);
    assert_eq!(handle.info().inflated_pages, 1);
    g.dev
        .bar_write(0, DEVICE_CFG_OFFSET + 4, &1u32.to_le_bytes());
    assert_eq!(g.dev.counters().bytes, 4096);

    g.dev.pause();
    inflate(&g, 1, 0x81, 0x40100);
    g.assert_paused_ignores(0);
    let mut second = None;
    let mut g = g.save_and_restore(|| {
        let b = Balloon::new(1 << 20, cfg).unwrap();
        second = Some(b.handle());
        Box::new(b)
    });
    let handle = second.unwrap();
    // Target and `actual` came back with the device's own state.
    let info = handle.info();
    assert_eq!((info.target_pages, info.actual_pages), (256, 1));
    g.kick(0);
    g.wait_used(0, 2);
    assert_eq!(
        handle.info().inflated_pages,
        1,
        "the page inflated after the restore"
    );
}

#[test]
fn gpu_survives_pause_save_restore_resume() {
    use crate::virtio::gpu::protocol::{cmd, resp};
    use crate::virtio::gpu::{Gpu, GpuConfig};
    let mem = test_mem();
    let mut g = Guest::bring_up(Box::new(Gpu::new(GpuConfig::default()).unwrap()), &mem);
    let request = |kind: u32, fields: &[u32]| {
        let mut v = kind.to_le_bytes().to_vec();
        v.resize(24, 0);
        v.extend(fields.iter().flat_map(|f| f.to_le_bytes()));
        v
    };
    let mut slot = 0u16;
    let mut send = |g: &Guest, bytes: Vec<u8>| {
        let at = 0x40000 + u64::from(slot) * 0x1000;
        mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        g.add(
            0,
            slot * 2,
            &[(at, bytes.len() as u32, 0), (at + 0x800, 64, DESC_F_WRITE)],
        );
        slot += 1;
        at + 0x800
    };
    // A 4x4 XRGB resource backed at 0x60000, blue everywhere, shown and transferred.
    for px in 0..16u64 {
        mem.write_slice(&[0xff, 0, 0, 0xff], GuestAddress(0x60000 + 4 * px))
            .unwrap();
    }
    let mut attach = request(cmd::RESOURCE_ATTACH_BACKING, &[1, 1]);
    attach.extend(0x60000u64.to_le_bytes());
    attach.extend(64u32.to_le_bytes());
    attach.extend([0; 4]);
    let mut transfer = request(cmd::TRANSFER_TO_HOST_2D, &[0, 0, 4, 4]);
    transfer.extend([0; 8]);
    transfer.extend(1u32.to_le_bytes());
    transfer.extend([0; 4]);
    let replies: Vec<u64> = vec![
        send(&g, request(cmd::RESOURCE_CREATE_2D, &[1, 2, 4, 4])),
        send(&g, attach),
        send(&g, request(cmd::SET_SCANOUT, &[0, 0, 4, 4, 0, 1])),
        send(&g, transfer),
    ];
    g.kick(0);
    g.wait_used(0, 4);
    for at in replies {
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(at)).unwrap(),
            resp::OK_NODATA
        );
    }

    // A flush made while paused is served only by the restored device.
    g.dev.pause();
    let flushed = send(&g, request(cmd::RESOURCE_FLUSH, &[1, 1, 2, 2, 1, 0]));
    g.assert_paused_ignores(0);
    let mut display = None;
    let mut g = g.save_and_restore(|| {
        let gpu = Gpu::new(GpuConfig::default()).unwrap();
        display = Some(gpu.display());
        Box::new(gpu)
    });
    let display = display.unwrap();
    // The restored device shows the frame it had, without the guest transferring again.
    let frame = display.frame().unwrap();
    assert_eq!((frame.width, frame.height), (4, 4));
    assert_eq!(frame.pixel(2, 3), Some((0, 0, 0xff)));
    display.take_damage();
    let seen = display.flushes();
    g.kick(0);
    g.wait_used(0, 5);
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(flushed)).unwrap(),
        resp::OK_NODATA
    );
    assert!(display.wait_flush(seen, Duration::from_secs(5)) > seen);
    let damage = display.take_damage();
    assert_eq!((damage[0].x, damage[0].y, damage[0].width), (1, 1, 2));
}
