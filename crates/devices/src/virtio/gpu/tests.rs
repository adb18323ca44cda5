//! The device behind hand-built queues: a driver's whole 2D flow, hostile commands (each
//! answered with an error and changing nothing), the cursor queue, reset and snapshots.
// Test data: hand-built guest-side values and small constants, narrowed on purpose.
#![allow(clippy::cast_possible_truncation)]

use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::protocol::{cmd, resp, FLAG_FENCE, HDR_LEN};
use super::state::format;
use super::*;
use crate::virtio::chain::DESC_F_WRITE;
use crate::virtio::worker::testing::*;

const REQ: u64 = 0x10000;
const RESP: u64 = 0x12000;
const BACK_A: u64 = 0x40000;
const BACK_B: u64 = 0x60000;
/// The test resource: 16x16 pixels, backed by two ranges of 600 and 424 bytes.
const W: u32 = 16;
const H: u32 = 16;

/// A driver of one activated device.
struct Driver {
    gpu: Gpu,
    mem: GuestMem,
    queues: [TestQueue; 2],
    kicks: Vec<vmm_sys_util::eventfd::EventFd>,
    irq: Arc<FakeInterrupt>,
    sent: [u16; 2],
}

impl Driver {
    fn new(config: GpuConfig) -> Driver {
        let mem = test_mem();
        let queues = [TestQueue::new(0x1000, 16), TestQueue::new(0x5000, 16)];
        let irq = FakeInterrupt::new();
        let mut gpu = Gpu::new(config).unwrap();
        gpu.ack_features(gpu.device_features());
        let (active, kicks) = active_queues(&queues);
        gpu.activate(mem.clone(), irq.clone(), active).unwrap();
        Driver {
            gpu,
            mem,
            queues,
            kicks,
            irq,
            sent: [0; 2],
        }
    }

    /// Sends `req` on queue `q` with a response buffer of `resp_len` bytes; returns the used
    /// length and the response bytes.
    fn send_on(&mut self, q: usize, req: &[u8], resp_len: u32) -> (u32, Vec<u8>) {
        self.mem.write_slice(req, GuestAddress(REQ)).unwrap();
        self.mem
            .write_slice(&vec![0xee; resp_len as usize], GuestAddress(RESP))
            .unwrap();
        let slot = (self.sent[q] * 2) % 16;
        let mut bufs = vec![(REQ, req.len() as u32, 0)];
        if resp_len > 0 {
            bufs.push((RESP, resp_len, DESC_F_WRITE));
        }
        self.queues[q].add_chain(&self.mem, slot, &bufs);
        self.sent[q] += 1;
        self.kicks[q].write(1).unwrap();
        let n = self.sent[q];
        assert!(wait_until(|| self.queues[q].used_idx(&self.mem) == n));
        let (head, used) = self.queues[q].used_elem(&self.mem, n - 1);
        assert_eq!(head, u32::from(slot));
        let mut out = vec![0u8; used as usize];
        self.mem.read_slice(&mut out, GuestAddress(RESP)).unwrap();
        (used, out)
    }

    /// Sends a control command and returns the response type.
    fn send(&mut self, req: &[u8]) -> u32 {
        let (used, out) = self.send_on(0, req, 2048);
        assert!(used as usize >= HDR_LEN, "a response header");
        u32::from_le_bytes(out[..4].try_into().unwrap())
    }
}

/// A request: header of type `kind`, then `fields`.
fn req(kind: u32, fields: &[u32]) -> Vec<u8> {
    let mut v = kind.to_le_bytes().to_vec();
    v.resize(HDR_LEN, 0);
    for f in fields {
        v.extend_from_slice(&f.to_le_bytes());
    }
    v
}

fn attach(resource_id: u32, entries: &[(u64, u32)]) -> Vec<u8> {
    let mut v = req(
        cmd::RESOURCE_ATTACH_BACKING,
        &[resource_id, entries.len() as u32],
    );
    for &(addr, len) in entries {
        v.extend_from_slice(&addr.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&[0; 4]);
    }
    v
}

fn transfer(rect: [u32; 4], offset: u64, resource_id: u32) -> Vec<u8> {
    let mut v = req(cmd::TRANSFER_TO_HOST_2D, &rect);
    v.extend_from_slice(&offset.to_le_bytes());
    v.extend_from_slice(&resource_id.to_le_bytes());
    v.extend_from_slice(&[0; 4]);
    v
}

/// Writes pixel (x, y) of the test resource's backing as B8G8R8X8 (r, g, b).
fn put_pixel(mem: &GuestMem, x: u32, y: u32, (r, g, b): (u8, u8, u8)) {
    let off = u64::from((y * W + x) * 4);
    let bytes = [b, g, r, 0xff];
    for (i, byte) in bytes.iter().enumerate() {
        let o = off + i as u64;
        let addr = if o < 600 {
            BACK_A + o
        } else {
            BACK_B + o - 600
        };
        mem.write_obj(*byte, GuestAddress(addr)).unwrap();
    }
}

/// Creates resource 1 (16x16 B8G8R8X8), attaches its split backing and shows it.
fn set_up_scanout(d: &mut Driver) {
    let create = req(cmd::RESOURCE_CREATE_2D, &[1, format::B8G8R8X8, W, H]);
    assert_eq!(d.send(&create), resp::OK_NODATA);
    assert_eq!(
        d.send(&attach(1, &[(BACK_A, 600), (BACK_B, 424)])),
        resp::OK_NODATA
    );
    let scanout = req(cmd::SET_SCANOUT, &[0, 0, W, H, 0, 1]);
    assert_eq!(d.send(&scanout), resp::OK_NODATA);
}

#[test]
fn a_driver_draws_and_the_host_sees_the_frame_and_damage() {
    let mut d = Driver::new(GpuConfig::default());
    let display = d.gpu.display();
    assert!(
        display.frame().is_none(),
        "nothing shown before SET_SCANOUT"
    );

    // Display info: one enabled 720x1280 scanout.
    let (used, info) = d.send_on(0, &req(cmd::GET_DISPLAY_INFO, &[]), 2048);
    assert_eq!(used as usize, HDR_LEN + 16 * 24);
    let word = |i: usize| u32::from_le_bytes(info[HDR_LEN + 4 * i..][..4].try_into().unwrap());
    assert_eq!(word(0), 0);
    assert_eq!((word(2), word(3), word(4)), (720, 1280, 1));
    assert_eq!(word(6 + 4), 0, "second scanout disabled");
    // EDID: a valid block naming the portrait mode.
    let (used, edid) = d.send_on(0, &req(cmd::GET_EDID, &[0, 0]), 2048);
    assert_eq!(used as usize, HDR_LEN + 8 + 1024);
    assert_eq!(
        u32::from_le_bytes(edid[..4].try_into().unwrap()),
        resp::OK_EDID
    );
    assert_eq!(&edid[HDR_LEN..HDR_LEN + 4], &128u32.to_le_bytes());
    let block = &edid[HDR_LEN + 8..HDR_LEN + 8 + 128];
    assert_eq!(block[56], (720 & 0xff) as u8);
    assert_eq!(block[59], (1280 & 0xff) as u8);

    set_up_scanout(&mut d);
    display.take_damage();
    let flushes = display.flushes();
    put_pixel(&d.mem, 0, 0, (255, 0, 0));
    put_pixel(&d.mem, 5, 9, (0, 255, 0)); // row 9 spans both backing entries
    put_pixel(&d.mem, 15, 15, (0, 0, 255));
    // Transfer all but the last row, then the last row on its own (offset = y * stride).
    assert_eq!(d.send(&transfer([0, 0, W, H - 1], 0, 1)), resp::OK_NODATA);
    assert_eq!(
        d.send(&transfer([8, 15, 8, 1], u64::from(15 * W * 4 + 8 * 4), 1)),
        resp::OK_NODATA
    );
    // A fenced flush of a 4x4 corner: the fence comes back.
    let mut flush = req(cmd::RESOURCE_FLUSH, &[12, 12, 4, 4, 1, 0]);
    flush[4..8].copy_from_slice(&FLAG_FENCE.to_le_bytes());
    flush[8..16].copy_from_slice(&77u64.to_le_bytes());
    let (_, out) = d.send_on(0, &flush, 64);
    assert_eq!(
        u32::from_le_bytes(out[..4].try_into().unwrap()),
        resp::OK_NODATA
    );
    assert_eq!(
        u32::from_le_bytes(out[4..8].try_into().unwrap()),
        FLAG_FENCE
    );
    assert_eq!(u64::from_le_bytes(out[8..16].try_into().unwrap()), 77);

    assert!(display.wait_flush(flushes, Duration::from_secs(5)) > flushes);
    assert_eq!(
        display.take_damage(),
        vec![protocol::Rect {
            x: 12,
            y: 12,
            width: 4,
            height: 4
        }]
    );
    assert!(display.take_damage().is_empty(), "damage is taken once");
    let frame = display.frame().unwrap();
    assert_eq!((frame.width, frame.height), (W, H));
    assert_eq!(frame.pixel(0, 0), Some((255, 0, 0)));
    assert_eq!(frame.pixel(5, 9), Some((0, 255, 0)));
    assert_eq!(frame.pixel(15, 15), Some((0, 0, 255)));
    assert_eq!(frame.pixel(1, 1), Some((0, 0, 0)));
    assert!(frame.to_ppm().starts_with(b"P6\n16 16\n255\n"));
    assert_eq!(d.gpu.counters().errors, 0);

    // The 4x4 flush covered only part of the 16x16 tile: a flush of the whole resource
    // damages the tile; redrawing the same pixels damages nothing (the flush still counts);
    // one changed pixel damages its tile again.
    let whole = req(cmd::RESOURCE_FLUSH, &[0, 0, W, H, 1, 0]);
    assert_eq!(d.send(&whole), resp::OK_NODATA);
    assert_eq!(display.take_damage(), vec![protocol::Rect::sized(W, H)]);
    let flushes = display.flushes();
    assert_eq!(d.send(&transfer([0, 0, W, H], 0, 1)), resp::OK_NODATA);
    assert_eq!(d.send(&whole), resp::OK_NODATA);
    assert_eq!(display.flushes(), flushes + 1);
    assert!(display.take_damage().is_empty(), "nothing changed");
    put_pixel(&d.mem, 3, 3, (1, 2, 3));
    assert_eq!(d.send(&transfer([0, 0, W, H], 0, 1)), resp::OK_NODATA);
    assert_eq!(d.send(&whole), resp::OK_NODATA);
    assert_eq!(display.take_damage(), vec![protocol::Rect::sized(W, H)]);
    put_pixel(&d.mem, 3, 3, (0, 0, 0));
    assert_eq!(d.send(&transfer([0, 0, W, H], 0, 1)), resp::OK_NODATA);
    assert_eq!(d.send(&whole), resp::OK_NODATA);
    display.take_damage();
    let info = d
        .gpu
        .control()
        .unwrap()
        .control(&serde_json::json!({"op": "info"}))
        .unwrap();
    assert_eq!(info["mode"], serde_json::json!([720, 1280]));
    assert_eq!(info["scanout"]["width"], 16);
    assert_eq!(info["host_bytes"], 16 * 16 * 4);
    let shot = d
        .gpu
        .control()
        .unwrap()
        .control(&serde_json::json!({"op": "screenshot"}))
        .unwrap();
    assert_eq!(
        (shot["width"].as_u64(), shot["height"].as_u64()),
        (Some(16), Some(16))
    );
    let rgb = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(shot["rgb"].as_str().unwrap())
            .unwrap()
    };
    assert_eq!(rgb, frame.rgb, "the screenshot is the scanout's frame");
    assert!(d
        .gpu
        .control()
        .unwrap()
        .control(&serde_json::json!({"op": "nope"}))
        .is_err());

    // Unref of the shown resource blanks the screen and frees its memory.
    assert_eq!(d.send(&req(cmd::RESOURCE_UNREF, &[1, 0])), resp::OK_NODATA);
    assert!(display.frame().is_none());
    assert!(
        d.gpu
            .control()
            .unwrap()
            .control(&serde_json::json!({"op": "screenshot"}))
            .is_err(),
        "no screenshot of a blank display"
    );
    assert_eq!(d.gpu.shared.lock().host_bytes, 0);
    assert_eq!(d.irq.errors(), 0);
}

#[test]
fn hostile_commands_get_errors_and_change_nothing() {
    let config = GpuConfig {
        max_resources: 3,
        max_host_bytes: 720 * 1280 * 4 + 4096,
        ..GpuConfig::default()
    };
    let mut d = Driver::new(config);
    set_up_scanout(&mut d);
    let before = format!("{:?}", d.gpu.shared.lock());
    let create = |id, f, w, h| req(cmd::RESOURCE_CREATE_2D, &[id, f, w, h]);
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        ("unknown command", req(0x0199, &[]), resp::ERR_UNSPEC),
        ("3D command", req(0x0200, &[]), resp::ERR_UNSPEC),
        (
            "short create",
            req(cmd::RESOURCE_CREATE_2D, &[2, 2]),
            resp::ERR_UNSPEC,
        ),
        ("header only", vec![0; 8], resp::ERR_UNSPEC),
        (
            "resource id 0",
            create(0, 2, 4, 4),
            resp::ERR_INVALID_RESOURCE_ID,
        ),
        (
            "existing id",
            create(1, 2, 4, 4),
            resp::ERR_INVALID_RESOURCE_ID,
        ),
        (
            "bad format",
            create(2, 99, 4, 4),
            resp::ERR_INVALID_PARAMETER,
        ),
        (
            "zero width",
            create(2, 2, 0, 4),
            resp::ERR_INVALID_PARAMETER,
        ),
        (
            "huge",
            create(2, 2, u32::MAX, u32::MAX),
            resp::ERR_INVALID_PARAMETER,
        ),
        (
            "over memory limit",
            create(2, 2, 16384, 16384),
            resp::ERR_OUT_OF_MEMORY,
        ),
        (
            "attach to unknown",
            attach(9, &[(BACK_A, 64)]),
            resp::ERR_INVALID_RESOURCE_ID,
        ),
        ("attach twice", attach(1, &[(BACK_A, 64)]), resp::ERR_UNSPEC),
        (
            "attach no entries",
            attach(1, &[]),
            resp::ERR_INVALID_PARAMETER,
        ),
        (
            "attach count lies",
            req(cmd::RESOURCE_ATTACH_BACKING, &[1, u32::MAX]),
            resp::ERR_INVALID_PARAMETER,
        ),
        (
            "attach count > bytes",
            req(cmd::RESOURCE_ATTACH_BACKING, &[1, 4]),
            resp::ERR_UNSPEC,
        ),
        (
            "scanout 1",
            req(cmd::SET_SCANOUT, &[0, 0, 4, 4, 1, 1]),
            resp::ERR_INVALID_SCANOUT_ID,
        ),
        (
            "scanout unknown",
            req(cmd::SET_SCANOUT, &[0, 0, 4, 4, 0, 9]),
            resp::ERR_INVALID_RESOURCE_ID,
        ),
        (
            "scanout overflow",
            req(cmd::SET_SCANOUT, &[u32::MAX, 0, 2, 2, 0, 1]),
            resp::ERR_INVALID_PARAMETER,
        ),
        (
            "scanout empty",
            req(cmd::SET_SCANOUT, &[0, 0, 0, 4, 0, 1]),
            resp::ERR_INVALID_PARAMETER,
        ),
        (
            "flush overflow",
            req(cmd::RESOURCE_FLUSH, &[1, 1, u32::MAX, 1, 1, 0]),
            resp::ERR_INVALID_PARAMETER,
        ),
        (
            "flush unknown",
            req(cmd::RESOURCE_FLUSH, &[0, 0, 1, 1, 7, 0]),
            resp::ERR_INVALID_RESOURCE_ID,
        ),
        (
            "transfer outside",
            transfer([8, 8, 9, 1], 0, 1),
            resp::ERR_INVALID_PARAMETER,
        ),
        (
            "transfer past backing",
            transfer([0, 0, W, H], 4, 1),
            resp::ERR_INVALID_PARAMETER,
        ),
        (
            "transfer offset wraps",
            transfer([0, 0, W, 2], u64::MAX - 8, 1),
            resp::ERR_INVALID_PARAMETER,
        ),
        (
            "unref unknown",
            req(cmd::RESOURCE_UNREF, &[5, 0]),
            resp::ERR_INVALID_RESOURCE_ID,
        ),
        (
            "detach unknown",
            req(cmd::RESOURCE_DETACH_BACKING, &[5, 0]),
            resp::ERR_INVALID_RESOURCE_ID,
        ),
        (
            "edid scanout 3",
            req(cmd::GET_EDID, &[3, 0]),
            resp::ERR_INVALID_SCANOUT_ID,
        ),
    ];
    let n = cases.len() as u64;
    for (what, request, want) in cases {
        assert_eq!(d.send(&request), want, "{what}");
    }
    assert_eq!(
        format!("{:?}", d.gpu.shared.lock()),
        before,
        "state changed"
    );
    assert_eq!(d.gpu.counters().errors, n);

    // Backing outside guest RAM, or wrapping around the address space.
    assert_eq!(d.send(&create(2, 2, 4, 4)), resp::OK_NODATA);
    for bad in [(0xF_FF00, 0x200), (u64::MAX - 8, 64), (BACK_A, 0)] {
        assert_eq!(
            d.send(&attach(2, &[bad])),
            resp::ERR_INVALID_PARAMETER,
            "{bad:?}"
        );
    }
    // Transfer without backing.
    assert_eq!(d.send(&transfer([0, 0, 4, 4], 0, 2)), resp::ERR_UNSPEC);
    // Resource count limit (3), then detach twice.
    assert_eq!(d.send(&create(3, 2, 1, 1)), resp::OK_NODATA);
    assert_eq!(d.send(&create(4, 2, 1, 1)), resp::ERR_OUT_OF_MEMORY);
    assert_eq!(
        d.send(&req(cmd::RESOURCE_DETACH_BACKING, &[1, 0])),
        resp::OK_NODATA
    );
    assert_eq!(
        d.send(&req(cmd::RESOURCE_DETACH_BACKING, &[1, 0])),
        resp::ERR_UNSPEC
    );

    // A response buffer too small for the answer: completed empty, counted.
    let errors = d.gpu.counters().errors;
    let (used, _) = d.send_on(0, &req(cmd::GET_DISPLAY_INFO, &[]), 32);
    assert_eq!(used, 0);
    assert_eq!(d.gpu.counters().errors, errors + 1);
    // A request with no response buffer at all.
    let (used, _) = d.send_on(0, &req(cmd::GET_DISPLAY_INFO, &[]), 0);
    assert_eq!(used, 0);
    // Still serving; the queue never broke.
    assert_eq!(
        d.send(&req(cmd::GET_DISPLAY_INFO, &[])),
        resp::OK_DISPLAY_INFO
    );
    assert_eq!(d.irq.errors(), 0);
}

#[test]
fn cursor_queue_moves_the_cursor() {
    let mut d = Driver::new(GpuConfig::default());
    let create = req(cmd::RESOURCE_CREATE_2D, &[7, format::B8G8R8A8, 64, 64]);
    assert_eq!(d.send(&create), resp::OK_NODATA);
    let display = d.gpu.display();
    let update = req(cmd::UPDATE_CURSOR, &[0, 100, 200, 0, 7, 3, 4, 0]);
    let (used, _) = d.send_on(1, &update, 64);
    assert_eq!(used, 0, "the cursor queue carries no responses");
    let c = display.cursor();
    assert_eq!(
        (c.resource_id, c.hot_x, c.hot_y, c.x, c.y),
        (7, 3, 4, 100, 200)
    );
    d.send_on(1, &req(cmd::MOVE_CURSOR, &[0, 5, 6, 0]), 0);
    assert_eq!((display.cursor().x, display.cursor().y), (5, 6));
    // Hostile: unknown cursor image, hot spot outside it, another scanout.
    for bad in [
        req(cmd::UPDATE_CURSOR, &[0, 1, 1, 0, 99, 0, 0, 0]),
        req(cmd::UPDATE_CURSOR, &[0, 1, 1, 0, 7, 64, 0, 0]),
        req(cmd::MOVE_CURSOR, &[2, 1, 1, 0]),
    ] {
        d.send_on(1, &bad, 0);
    }
    assert_eq!((display.cursor().x, display.cursor().y), (5, 6));
    assert_eq!(d.gpu.counters().errors, 3);
}

#[test]
fn reset_forgets_resources_and_snapshots_carry_them() {
    let mut d = Driver::new(GpuConfig::default());
    set_up_scanout(&mut d);
    put_pixel(&d.mem, 3, 3, (10, 20, 30));
    assert_eq!(d.send(&transfer([0, 0, W, H], 0, 1)), resp::OK_NODATA);
    d.gpu.pause();
    let saved = d.gpu.save_state();

    // A new device restores the resources, backing, pixels and scanout.
    let mut other = Gpu::new(GpuConfig::default()).unwrap();
    other.restore_state(&saved).unwrap();
    let frame = other.display().frame().unwrap();
    assert_eq!(frame.pixel(3, 3), Some((10, 20, 30)));
    assert_eq!(
        other.display().take_damage(),
        vec![protocol::Rect::sized(W, H)]
    );
    assert_eq!(other.save_state(), saved);

    // Corrupt or foreign state is refused and leaves the device as it was.
    let mut fresh = Gpu::new(GpuConfig::default()).unwrap();
    let empty = fresh.save_state();
    let mut bad_version = saved.clone();
    bad_version[0] = 9;
    let mut trailing = saved.clone();
    trailing.push(0);
    let mut huge = saved.clone();
    huge[53..57].copy_from_slice(&u32::MAX.to_le_bytes()); // first resource's width
    for bad in [
        &saved[..saved.len() - 1],
        &bad_version,
        &trailing,
        &huge,
        &[][..],
    ] {
        assert!(fresh.restore_state(bad).is_err());
        assert_eq!(fresh.save_state(), empty);
    }
    let small = GpuConfig {
        max_resources: 1,
        max_host_bytes: 720 * 1280 * 4,
        width: 720,
        height: 1280,
    };
    let mut tight = Gpu::new(GpuConfig {
        max_host_bytes: 1000,
        ..small
    });
    assert!(tight.is_err(), "a limit below one frame is refused");
    tight = Gpu::new(small);
    assert!(tight.unwrap().restore_state(&saved).is_ok());

    // Reset destroys every resource.
    d.gpu.resume();
    d.gpu.reset();
    assert!(d.gpu.display().frame().is_none());
    assert_eq!(d.gpu.save_state(), empty);
}

/// Counts the flushes it was woken for.
struct CountingWatcher(std::sync::atomic::AtomicU32);

impl super::FlushWatcher for CountingWatcher {
    fn flushed(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn each_viewer_gets_the_damage_since_its_own_last_look_and_is_woken_by_flushes() {
    let mut d = Driver::new(GpuConfig::default());
    let display = d.gpu.display();
    let watcher = std::sync::Arc::new(CountingWatcher(Default::default()));
    let weak: std::sync::Arc<dyn super::FlushWatcher> = watcher.clone();
    display.watch(std::sync::Arc::downgrade(&weak));
    // Before anything was flushed a viewer at the start sees nothing to do.
    let start = display.damage_since((0, 0));
    assert_eq!(start.rects, Some(vec![]));
    set_up_scanout(&mut d);
    put_pixel(&d.mem, 2, 3, (1, 2, 3));
    assert_eq!(d.send(&transfer([0, 0, W, H], 0, 1)), resp::OK_NODATA);
    let rect = |x, y, width, height| protocol::Rect {
        x,
        y,
        width,
        height,
    };
    let flush = |d: &mut Driver, r: [u32; 4]| {
        let f = req(cmd::RESOURCE_FLUSH, &[r[0], r[1], r[2], r[3], 1, 0]);
        assert_eq!(d.send(&f), resp::OK_NODATA);
    };
    // SET_SCANOUT shows the whole resource.
    let start = display.damage_since(start.position);
    assert_eq!(start.rects, Some(vec![rect(0, 0, W, H)]));
    flush(&mut d, [0, 0, 4, 4]);
    let a = display.damage_since(start.position);
    assert_eq!(a.rects, Some(vec![rect(0, 0, 4, 4)]));
    flush(&mut d, [8, 8, 2, 2]);
    // Viewer A sees only the second flush; viewer B, still at the start, sees both.
    assert_eq!(
        display.damage_since(a.position).rects,
        Some(vec![rect(8, 8, 2, 2)])
    );
    assert_eq!(
        display.damage_since(start.position).rects,
        Some(vec![rect(0, 0, 4, 4), rect(8, 8, 2, 2)])
    );
    assert!(wait_until(|| watcher
        .0
        .load(std::sync::atomic::Ordering::SeqCst)
        == 3));
    // A viewer that never looked, or looked before a reset, redraws everything.
    assert_eq!(display.damage_since((u64::MAX, 0)).rects, None);
    let before_reset = display.damage_since(start.position).position;
    // The device's own reset step (the test's worker keeps running).
    d.gpu.on_reset();
    set_up_scanout(&mut d);
    assert_eq!(d.send(&transfer([0, 0, W, H], 0, 1)), resp::OK_NODATA);
    flush(&mut d, [0, 0, 1, 1]);
    flush(&mut d, [0, 0, 1, 1]);
    assert_eq!(display.damage_since(before_reset).rects, None);
    // One far behind (more flushes than the log keeps) redraws everything too.
    let behind = display.damage_since((before_reset.0 + 1, 0)).position;
    for _ in 0..300 {
        flush(&mut d, [1, 1, 1, 1]);
    }
    assert_eq!(display.damage_since(behind).rects, None);
    // Pixels of a part of the scanout, and refusal of a part outside it.
    let (rgb, w, h) = display.read_rect(rect(2, 3, 2, 1)).unwrap();
    assert_eq!((w, h), (W, H));
    assert_eq!(rgb, [1, 2, 3, 0, 0, 0]);
    assert!(display.read_rect(rect(W - 1, 0, 2, 1)).is_none());
    drop(weak);
    drop(watcher);
    flush(&mut d, [0, 0, 1, 1]);
}
