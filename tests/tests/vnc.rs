//! The probe's home screen over VNC (`pocketvisor run --vnc`): a stock client no one here
//! wrote (`vncsnapshot`, TightVNC's RFB 3.3 viewer code) captures the frame the probe drew,
//! and an RFB 3.8 client on a raw socket gets exactly the probe's pixels (the probe's own
//! FNV-1a of its frame), incremental updates of only what the guest flushed, and its keys
//! and pointer reach the probe as `PROBE input` lines. Hostile clients (unknown message
//! types, a 4 GiB cut text, one that never reads) end only their own sessions.

use std::io::Write;
use std::time::Duration;

use e2e::probe::ProbeLine;
use e2e::rfb_client::RfbClient;
use e2e::{fnv1a64, require_kvm, RunningVm, TempDir, VmCommand};

/// A small display keeps the probe's full-frame hash cheap under kvm_pvm.
const W: u32 = 180;
const H: u32 = 320;
const RGB: u32 = 0x2a9d8f;

/// A screen coordinate as RFB's u16.
fn small(v: u32) -> u16 {
    u16::try_from(v).expect("a coordinate fits in u16")
}

fn rgb_bytes(v: u32) -> [u8; 3] {
    let b = v.to_be_bytes();
    [b[1], b[2], b[3]]
}

fn wait(vm: &mut RunningVm, what: &str, pred: impl FnMut(&str) -> bool) -> String {
    match vm.wait_for_line(Duration::from_secs(60), pred) {
        Some((_, line)) => line,
        None => panic!(
            "no {what}\nserial:\n{}\nstderr: {}",
            vm.drain(),
            vm.stderr_so_far()
        ),
    }
}

/// An RFB client of the probe's screen (ZRLE first when `zrle`), checking ServerInit's size.
fn connect(port: u16, zrle: bool) -> RfbClient {
    let client = RfbClient::connect_with(port, zrle);
    assert_eq!((u32::from(client.width), u32::from(client.height)), (W, H));
    client
}

/// Boots the probe's home screen with `--vnc 127.0.0.1:0`; returns the VM and the port.
fn boot_with_vnc(dir: &TempDir, tick_ms: u32) -> (RunningVm, u16) {
    boot_with_vnc_and(dir, tick_ms, "")
}

/// [`boot_with_vnc`] with `extra` on the probe's command line.
fn boot_with_vnc_and(dir: &TempDir, tick_ms: u32, extra: &str) -> (RunningVm, u16) {
    let api = dir.join("api.sock");
    let mut vm = VmCommand::probe(&format!(
        "pv.mode=screen pv.screen.rgb={RGB:06x} pv.screen.ms={tick_ms} pv.screen.hash=1 {extra}"
    ))
    .arg(&format!("--gpu={W}x{H}"))
    .arg("--input")
    .arg("--vnc=127.0.0.1:0")
    .arg("--api-socket")
    .arg(api.to_str().expect("utf-8 path"))
    .spawn();
    wait(&mut vm, "first full frame", |l| {
        l.starts_with("PROBE screen frame n=1 why=full")
    });
    let stderr = vm.stderr_so_far();
    let port = stderr
        .lines()
        .find_map(|l| l.strip_prefix("pocketvisor: VNC server on 127.0.0.1:"))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VNC address printed: {stderr}"));
    (vm, port)
}

/// The probe's `screen tile` lines as (x, y, w, h, rgb).
fn tiles(vm: &RunningVm) -> Vec<[u32; 5]> {
    vm.seen()
        .iter()
        .filter_map(|(_, l)| ProbeLine::parse(l))
        .filter(|p| p.starts_with(&["screen", "tile"]))
        .map(|p| {
            let n = |k| u32::try_from(p.field_u64(k).expect(k)).expect("u32");
            let rgb = u32::from_str_radix(p.expect_field("rgb"), 16).expect("hex");
            [n("x"), n("y"), n("w"), n("h"), rgb]
        })
        .collect()
}

/// Every `fnv` the probe reported for a frame so far.
fn reported_hashes(vm: &mut RunningVm) -> Vec<u64> {
    vm.drain();
    vm.seen()
        .iter()
        .filter_map(|(_, l)| ProbeLine::parse(l))
        .filter(|p| p.starts_with(&["screen", "frame"]))
        .filter_map(|p| p.field("fnv").and_then(|h| u64::from_str_radix(h, 16).ok()))
        .collect()
}

#[test]
fn vncsnapshot_captures_the_probes_home_screen() {
    let name = "vncsnapshot_captures_the_probes_home_screen";
    if !require_kvm(name) {
        return;
    }
    let Some(vncsnapshot) = e2e::host::which("vncsnapshot") else {
        e2e::host::skip(
            "vncsnapshot is not installed (apt-get install vncsnapshot)",
            name,
        );
        return;
    };
    let dir = TempDir::new();
    let (mut vm, port) = boot_with_vnc(&dir, 60_000);
    let shot = dir.join("shot.jpg");
    let out = std::process::Command::new(vncsnapshot)
        .args(["-quiet", "-allowblank", "-quality", "100"])
        .arg(format!("127.0.0.1::{port}"))
        .arg(&shot)
        .output()
        .expect("run vncsnapshot");
    assert!(
        out.status.success(),
        "vncsnapshot failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let file = std::fs::File::open(&shot).expect("open the capture");
    let mut decoder = jpeg_decoder::Decoder::new(std::io::BufReader::new(file));
    let pixels = decoder.decode().expect("a JPEG");
    let info = decoder.info().expect("JPEG info");
    assert_eq!((u32::from(info.width), u32::from(info.height)), (W, H));
    assert_eq!(info.pixel_format, jpeg_decoder::PixelFormat::RGB24);
    let pixel = |x: u32, y: u32| {
        let i = (y * W + x) as usize * 3;
        [pixels[i], pixels[i + 1], pixels[i + 2]]
    };
    // vncsnapshot writes JPEG only: flat areas come back within a few levels.
    let close = |got: [u8; 3], want: [u8; 3], what: &str| {
        let off = got
            .iter()
            .zip(want)
            .map(|(g, w)| g.abs_diff(w))
            .max()
            .unwrap_or(0);
        assert!(
            off <= 8,
            "{what}: captured {got:?}, the probe drew {want:?}"
        );
    };
    close(pixel(W - 2, H - 2), rgb_bytes(RGB), "background");
    let tiles = tiles(&vm);
    assert_eq!(tiles.len(), 6);
    for (i, t) in tiles.iter().enumerate() {
        close(
            pixel(t[0] + t[2] / 2, t[1] + t[3] / 2),
            rgb_bytes(t[4]),
            &format!("tile {i}"),
        );
    }
    // And the whole capture is close to the exact frame (a raw client's, checked below).
    let mut client = connect(port, false);
    let exact = client.full_frame();
    let mean = exact
        .iter()
        .zip(&pixels)
        .map(|(a, b)| u64::from(a.abs_diff(*b)))
        .sum::<u64>()
        / exact.len() as u64;
    assert!(mean <= 3, "mean difference {mean} per channel");
    assert!(
        reported_hashes(&mut vm).contains(&fnv1a64(&exact)),
        "the raw client's frame is one the probe drew"
    );
}

#[test]
fn vnc_clients_see_flushed_damage_and_drive_the_guest_and_hostile_ones_hurt_only_themselves() {
    let name =
        "vnc_clients_see_flushed_damage_and_drive_the_guest_and_hostile_ones_hurt_only_themselves";
    if !require_kvm(name) {
        return;
    }
    let dir = TempDir::new();
    let (mut vm, port) = boot_with_vnc(&dir, 1000);
    let mut client = connect(port, false);
    // The first full frame is, byte for byte, a frame the probe drew.
    let frame = client.full_frame();
    let mut hashes = reported_hashes(&mut vm);
    if !hashes.contains(&fnv1a64(&frame)) {
        wait(&mut vm, "another frame", |l| {
            l.starts_with("PROBE screen frame")
        });
        hashes = reported_hashes(&mut vm);
    }
    assert!(
        hashes.contains(&fnv1a64(&frame)),
        "VNC frame fnv {:016x} is none of the probe's {hashes:x?}",
        fnv1a64(&frame)
    );

    // Hostile clients, while the good one stays connected.
    for (what, bytes) in [
        ("unknown message type", vec![9u8, 0, 0, 0]),
        (
            "a 4 GiB cut text",
            vec![6, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, b'x'],
        ),
        ("a colour-map pixel format", {
            let mut m = vec![0u8, 0, 0, 0, 8, 8, 0, 0];
            m.extend_from_slice(&[0; 12]);
            m
        }),
    ] {
        let mut bad = connect(port, false);
        bad.stream.write_all(&bytes).expect("send");
        assert!(
            bad.closed_by_server(),
            "{what}: the server keeps the session"
        );
    }
    // One that asks for full frames (64 of 230 KB, more than the socket buffers hold) and
    // never reads them: its writer blocks, nobody else's does.
    let mut stalled = connect(port, false);
    for _ in 0..64 {
        stalled.request(false, 0, 0, small(W), small(H));
        std::thread::sleep(Duration::from_millis(20));
    }

    // An incremental request is answered at the next flush with only what it changed: the
    // probe's one-second tick redraws the counter, not the screen.
    client.request(true, 0, 0, small(W), small(H));
    let rects = client.read_update();
    assert!(!rects.is_empty());
    for (x, y, w, h) in &rects {
        assert!(
            u32::from(*w) * u32::from(*h) < W * H / 4,
            "an update of a tick is small: {x},{y} {w}x{h}"
        );
    }

    // A key typed through VNC reaches the guest ('a' is KEY_A, 30).
    client.key(u32::from('a'), true);
    client.key(u32::from('a'), false);
    wait(&mut vm, "key down echo", |l| {
        l == "PROBE input key code=30 value=1"
    });
    wait(&mut vm, "key up echo", |l| {
        l == "PROBE input key code=30 value=0"
    });
    // The left button is a finger on the touch screen.
    let t = tiles(&vm)[2];
    let (x, y) = (t[0] + t[2] / 2, t[1] + t[3] / 2);
    client.pointer(1, small(x), small(y));
    wait(&mut vm, "touch echo", |l| {
        l == format!("PROBE input touch x={x} y={y} down=1 tile=2")
    });
    client.pointer(0, small(x), small(y));
    wait(&mut vm, "lift echo", |l| {
        l.starts_with("PROBE input touch") && l.contains("down=0")
    });
    // The highlight the touch drew arrives as an incremental update covering the tile.
    let mut covered = false;
    for _ in 0..4 {
        client.request(true, 0, 0, small(W), small(H));
        covered = client.read_update().iter().any(|&(rx, ry, rw, rh)| {
            u32::from(rx) <= t[0]
                && u32::from(ry) <= t[1]
                && u32::from(rx + rw) >= t[0] + t[2]
                && u32::from(ry + rh) >= t[1] + t[3]
        });
        if covered {
            break;
        }
    }
    assert!(covered, "no update covered the touched tile");
    drop(stalled);
    assert!(
        !vm.seen().iter().any(|(_, l)| l.contains(" fail ")),
        "{}",
        vm.drain()
    );
}

#[test]
fn a_zrle_client_gets_the_same_frame_in_far_fewer_bytes() {
    let name = "a_zrle_client_gets_the_same_frame_in_far_fewer_bytes";
    if !require_kvm(name) {
        return;
    }
    let dir = TempDir::new();
    let (mut vm, port) = boot_with_vnc(&dir, 60_000);
    let mut raw = connect(port, false);
    let mut zrle = connect(port, true);
    let exact = raw.full_frame();
    let compressed = zrle.full_frame();
    assert_eq!(compressed, exact, "ZRLE decodes to the Raw client's frame");
    assert!(
        reported_hashes(&mut vm).contains(&fnv1a64(&compressed)),
        "the frame is one the probe drew"
    );
    let raw_bytes = (W * H * 4) as usize;
    assert!(
        zrle.zrle_bytes * 10 < raw_bytes,
        "ZRLE took {} bytes for a frame Raw sends in {raw_bytes}",
        zrle.zrle_bytes
    );
    e2e::host::loud(&format!(
        "vnc: the probe's {W}x{H} home screen: Raw {raw_bytes} bytes, ZRLE {} bytes",
        zrle.zrle_bytes
    ));
}

#[test]
fn a_scrolling_screen_reaches_a_copyrect_client_as_copies_and_new_rows() {
    let name = "a_scrolling_screen_reaches_a_copyrect_client_as_copies_and_new_rows";
    if !require_kvm(name) {
        return;
    }
    let dir = TempDir::new();
    // Every 100 ms the area under the header moves up 8 rows and a new stripe comes in.
    let (mut vm, port) = boot_with_vnc_and(&dir, 100, "pv.screen.scroll=8");
    let mut client = connect(port, false); // it takes CopyRect
    client.full_frame();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while client.copy_rects < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "no CopyRect for the scrolls: {} so far",
            client.copy_rects
        );
        client.request(true, 0, 0, small(W), small(H));
        client.read_update();
    }
    // The copies and new rows add up to exactly a frame the probe drew.
    let frame = client.frame.clone();
    let drawn = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        reported_hashes(&mut vm).contains(&fnv1a64(&frame))
    });
    assert!(
        drawn,
        "the client's frame (fnv {:016x}) after {} CopyRects is none the probe drew",
        fnv1a64(&frame),
        client.copy_rects
    );
}
