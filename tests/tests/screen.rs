//! The probe's home screen on the virtio-gpu display: a screenshot taken through the API
//! socket holds exactly the frame the probe drew, and touches and keys injected through the
//! API reach the probe's virtio-input driver (and a touched tile lights up on the screen).
//! The same probe build draws on QEMU's virtio-gpu-pci and reads its virtio keyboard.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use e2e::probe::ProbeLine;
use e2e::qemu::{Machine, QemuCommand};
use e2e::{fnv1a64, require_kvm, RunningVm, TempDir, VmCommand};

/// A small display keeps the probe's full-frame hash cheap under kvm_pvm.
const W: u32 = 180;
const H: u32 = 320;
const RGB: u32 = 0x2a9d8f;
const WHITE: [u8; 3] = [255, 255, 255];

/// A decoded PNG screenshot.
struct Image {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

impl Image {
    fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }
}

fn rgb_bytes(v: u32) -> [u8; 3] {
    let b = v.to_be_bytes();
    [b[1], b[2], b[3]]
}

/// `pocketvisor screenshot` into `path`, decoded.
fn screenshot(api: &Path, path: &Path) -> Image {
    let out = std::process::Command::new(e2e::pocketvisor_bin())
        .arg("screenshot")
        .arg("--api-socket")
        .arg(api)
        .arg("-o")
        .arg(path)
        .output()
        .expect("run pocketvisor screenshot");
    assert!(
        out.status.success(),
        "screenshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = std::fs::File::open(path).expect("open the screenshot");
    let mut reader = png::Decoder::new(BufReader::new(file))
        .read_info()
        .expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("sized")];
    let info = reader.next_frame(&mut buf).expect("a frame");
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    Image {
        width: info.width,
        height: info.height,
        rgb: buf,
    }
}

/// One request on the VMM's API socket; the answer must be ok.
fn api_call(api: &Path, request: serde_json::Value) {
    let mut s = UnixStream::connect(api).expect("connect to the API socket");
    s.write_all(format!("{request}\n").as_bytes())
        .expect("send the request");
    let mut answer = String::new();
    BufReader::new(&s)
        .read_line(&mut answer)
        .expect("read the answer");
    assert!(answer.contains("\"ok\":true"), "{request} -> {answer}");
}

fn device(api: &Path, id: &str, request: serde_json::Value) {
    api_call(
        api,
        serde_json::json!({"op": "device", "id": id, "request": request}),
    );
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

#[test]
fn probe_home_screen_screenshot_matches_and_input_reaches_the_guest() {
    if !require_kvm("probe_home_screen_screenshot_matches_and_input_reaches_the_guest") {
        return;
    }
    let dir = TempDir::new();
    let api = dir.join("api.sock");
    let mut vm = VmCommand::probe(&format!(
        "pv.mode=screen pv.screen.rgb={RGB:06x} pv.screen.ms=1000 pv.screen.hash=1"
    ))
    .arg(&format!("--gpu={W}x{H}"))
    .arg("--input")
    .arg("--api-socket")
    .arg(api.to_str().expect("utf-8 path"))
    .spawn();
    wait(&mut vm, "first full frame", |l| {
        l.starts_with("PROBE screen frame n=1 why=full")
    });
    let seen: Vec<ProbeLine> = vm
        .seen()
        .iter()
        .filter_map(|(_, l)| ProbeLine::parse(l))
        .collect();
    let ready = seen
        .iter()
        .find(|p| p.starts_with(&["screen", "ready"]))
        .expect("a ready line");
    assert_eq!(ready.field_u64("w"), Some(u64::from(W)));
    assert_eq!(ready.field_u64("h"), Some(u64::from(H)));
    let header = u32::from_str_radix(ready.expect_field("header"), 16).expect("hex");
    let pointers: Vec<_> = seen
        .iter()
        .filter(|p| p.starts_with(&["input", "device"]))
        .map(|p| p.expect_field("pointer").to_string())
        .collect();
    assert_eq!(pointers, ["0", "1"], "a keyboard and a touch screen");
    // (x, y, w, h, rgb) of each tile.
    let tiles: Vec<[u32; 5]> = seen
        .iter()
        .filter(|p| p.starts_with(&["screen", "tile"]))
        .map(|p| {
            let n = |k| u32::try_from(p.field_u64(k).expect(k)).expect("u32");
            let rgb = u32::from_str_radix(p.expect_field("rgb"), 16).expect("hex");
            [n("x"), n("y"), n("w"), n("h"), rgb]
        })
        .collect();
    assert_eq!(tiles.len(), 6);

    let shot = screenshot(&api, &dir.join("home.png"));
    assert_eq!((shot.width, shot.height), (W, H));
    assert_eq!(shot.pixel(W - 1, H - 1), rgb_bytes(RGB), "background");
    assert_eq!(shot.pixel(W - 1, 1), rgb_bytes(header), "header");
    for t in &tiles {
        assert_eq!(
            shot.pixel(t[0] + t[2] / 2, t[1] + t[3] / 2),
            rgb_bytes(t[4])
        );
    }
    // The whole frame is one the probe drew (it may have ticked since the first one).
    let shot_hash = fnv1a64(&shot.rgb);
    let mut hashes = reported_hashes(&mut vm);
    if !hashes.contains(&shot_hash) {
        wait(&mut vm, "another frame", |l| {
            l.starts_with("PROBE screen frame")
        });
        hashes = reported_hashes(&mut vm);
    }
    assert!(
        hashes.contains(&shot_hash),
        "screenshot fnv {shot_hash:016x} is none of the probe's frames {hashes:x?}"
    );
    let ticked = vm.wait_for_line(Duration::from_secs(30), |l| {
        l.starts_with("PROBE screen frame") && l.contains("why=tick")
    });
    let ticked = ticked.expect("the counter ticks").1;
    assert!(
        ticked.contains(" rect=0,0,"),
        "a tick flushes only the counter: {ticked}"
    );
    assert!(!ticked.contains(&format!("rect=0,0,{W},{H}")), "{ticked}");
    // Idle costs nothing: between ticks the probe sleeps on a one-shot TSC-deadline timer,
    // one timer interrupt per tick instead of a 1 ms periodic tick's thousand.
    wait(&mut vm, "a second tick", |l| {
        l.starts_with("PROBE screen tick n=2 ")
    });
    let lines: Vec<ProbeLine> = vm
        .seen()
        .iter()
        .filter_map(|(_, l)| ProbeLine::parse(l))
        .collect();
    let timer = lines
        .iter()
        .find(|p| p.starts_with(&["screen"]) && p.field("timer").is_some())
        .and_then(|p| p.field("timer"))
        .expect("a screen timer= line");
    let host_has_it = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
        c.split_ascii_whitespace()
            .any(|f| f == "tsc_deadline_timer")
    });
    assert!(
        timer == "tsc-deadline" || !host_has_it,
        "the host CPU has a TSC-deadline timer but the probe sleeps on {timer}"
    );
    if timer == "tsc-deadline" {
        let wakeups: Vec<u64> = lines
            .iter()
            .filter(|p| p.starts_with(&["screen", "tick"]) && p.field_u64("n") != Some(1))
            .filter_map(|p| p.field_u64("timer_irqs"))
            .collect();
        assert!(
            !wakeups.is_empty() && wakeups.iter().all(|&n| n <= 2),
            "timer interrupts per 1 s tick: {wakeups:?}"
        );
    } else {
        e2e::host::loud("the CPU has no TSC-deadline timer: the probe ticks periodically");
    }

    // A touch in the middle of tile 2 reaches the guest and lights the tile up.
    let t = tiles[2];
    let (x, y) = (t[0] + t[2] / 2, t[1] + t[3] / 2);
    device(
        &api,
        "touch",
        serde_json::json!({"op": "touch", "slot": 0, "x": x, "y": y}),
    );
    wait(&mut vm, "touch echo", |l| {
        l == format!("PROBE input touch x={x} y={y} down=1 tile=2")
    });
    let lit = wait(&mut vm, "highlight frame", |l| {
        l.starts_with("PROBE screen frame") && l.contains("why=highlight")
    });
    assert!(
        lit.contains(&format!("rect={},{},{},{}", t[0], t[1], t[2], t[3])),
        "only the tile is flushed: {lit}"
    );
    device(
        &api,
        "touch",
        serde_json::json!({"op": "release", "slot": 0}),
    );
    wait(&mut vm, "lift echo", |l| {
        l.starts_with("PROBE input touch") && l.contains("down=0")
    });
    let shot = screenshot(&api, &dir.join("touched.png"));
    assert_eq!(shot.pixel(x, y), WHITE, "the touched tile is highlighted");
    let other = tiles[3];
    assert_eq!(
        shot.pixel(other[0] + 1, other[1] + 1),
        rgb_bytes(other[4]),
        "the others are not"
    );

    // A key press and release (KEY_A is 30).
    device(
        &api,
        "keyboard",
        serde_json::json!({"op": "key", "code": 30, "down": true}),
    );
    device(
        &api,
        "keyboard",
        serde_json::json!({"op": "key", "code": 30, "down": false}),
    );
    wait(&mut vm, "key down echo", |l| {
        l == "PROBE input key code=30 value=1"
    });
    wait(&mut vm, "key up echo", |l| {
        l == "PROBE input key code=30 value=0"
    });
    assert!(
        !vm.seen().iter().any(|(_, l)| l.contains(" fail ")),
        "{}",
        vm.drain()
    );
}

/// One HMP command on QEMU's monitor socket; waits for the next prompt.
fn hmp(monitor: &mut UnixStream, command: &str) {
    monitor
        .write_all(format!("{command}\n").as_bytes())
        .expect("write to the QEMU monitor");
    read_prompt(monitor);
}

/// Reads until the monitor prints `(qemu) `.
fn read_prompt(monitor: &mut UnixStream) -> String {
    use std::io::Read;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.ends_with(b"(qemu) ") {
        match monitor.read(&mut buf) {
            Ok(0) => panic!("the QEMU monitor closed"),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) => panic!("QEMU monitor: {e}"),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// The pixels of a binary PPM (P6, maxval 255).
fn ppm_pixels(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(64)]).into_owned();
    let mut fields = text.split_ascii_whitespace();
    assert_eq!(fields.next(), Some("P6"), "a binary PPM");
    let mut num = || -> u32 { fields.next().expect("a field").parse().expect("a number") };
    let (w, h, max) = (num(), num(), num());
    assert_eq!(max, 255);
    let pixels = bytes[bytes.len() - (w * h * 3) as usize..].to_vec();
    (w, h, pixels)
}

/// Our probe's drivers against devices someone else wrote: QEMU's virtio-gpu-pci and
/// virtio-keyboard-pci/virtio-tablet-pci. QEMU's own screendump must hold a frame the probe
/// drew, and a key QEMU's monitor sends must reach the probe.
#[test]
fn probe_home_screen_draws_on_qemu_too() {
    let name = "probe_home_screen_draws_on_qemu_too";
    if !require_kvm(name) {
        return;
    }
    let Some(qemu) = QemuCommand::find_binary() else {
        e2e::skip("qemu-system-x86_64 is not installed", name);
        return;
    };
    let dir = TempDir::new();
    let monitor_path = dir.join("monitor.sock");
    let mut cmd = QemuCommand::new(
        &qemu,
        Machine::Pc,
        &e2e::probe_elf(),
        &format!("pv.mode=screen pv.screen.rgb={RGB:06x} pv.screen.ms=1000 pv.screen.hash=1"),
    );
    cmd.extra = [
        "-device",
        &format!("virtio-gpu-pci,xres={W},yres={H}"),
        "-device",
        "virtio-keyboard-pci",
        "-device",
        "virtio-tablet-pci",
        "-monitor",
        &format!("unix:{},server=on,wait=off", monitor_path.display()),
    ]
    .map(String::from)
    .to_vec();
    let mut vm = RunningVm::spawn(cmd.command(), e2e::vm::default_timeout());
    wait(&mut vm, "first full frame", |l| {
        l.starts_with("PROBE screen frame n=1 why=full")
    });
    let devices: Vec<String> = vm
        .seen()
        .iter()
        .filter(|(_, l)| l.starts_with("PROBE input device"))
        .map(|(_, l)| l.clone())
        .collect();
    assert_eq!(devices.len(), 2, "QEMU's keyboard and tablet: {devices:?}");
    assert!(devices[1].contains("pointer=1"), "{devices:?}");

    let mut monitor = UnixStream::connect(&monitor_path).expect("connect to the QEMU monitor");
    monitor
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    read_prompt(&mut monitor);
    let shot = dir.join("qemu.ppm");
    hmp(&mut monitor, &format!("screendump {}", shot.display()));
    let (w, h, rgb) = ppm_pixels(&std::fs::read(&shot).expect("QEMU wrote the screendump"));
    assert_eq!((w, h), (W, H));
    let corner = (((H - 1) * W + (W - 1)) * 3) as usize;
    assert_eq!(rgb[corner..corner + 3], rgb_bytes(RGB), "background");
    let shot_hash = fnv1a64(&rgb);
    let mut hashes = reported_hashes(&mut vm);
    if !hashes.contains(&shot_hash) {
        wait(&mut vm, "another frame", |l| {
            l.starts_with("PROBE screen frame")
        });
        hashes = reported_hashes(&mut vm);
    }
    assert!(
        hashes.contains(&shot_hash),
        "QEMU's screendump fnv {shot_hash:016x} is none of the probe's frames {hashes:x?}"
    );

    hmp(&mut monitor, "sendkey a");
    wait(&mut vm, "key echo", |l| {
        l == "PROBE input key code=30 value=1"
    });
}

/// A snapshot carries the display and the input devices: the restored VMM shows the frame
/// the guest drew before, and touches reach the restored guest.
#[test]
fn restored_home_screen_shows_the_same_frame_and_takes_touches() {
    if !require_kvm("restored_home_screen_shows_the_same_frame_and_takes_touches") {
        return;
    }
    let dir = TempDir::new();
    let api = dir.join("api.sock");
    let snap = dir.join("snap");
    let mut src = VmCommand::probe(&format!(
        "pv.mode=screen pv.screen.rgb={RGB:06x} pv.screen.ms=60000 pv.screen.hash=1"
    ))
    .arg(&format!("--gpu={W}x{H}"))
    .arg("--input")
    .arg("--api-socket")
    .arg(api.to_str().expect("utf-8 path"))
    .spawn();
    wait(&mut src, "first full frame", |l| {
        l.starts_with("PROBE screen frame n=1 why=full")
    });
    let before = screenshot(&api, &dir.join("before.png"));
    let out = std::process::Command::new(e2e::pocketvisor_bin())
        .args(["snapshot", "--api-socket"])
        .arg(&api)
        .arg("-o")
        .arg(&snap)
        .arg("--stop")
        .output()
        .expect("run pocketvisor snapshot");
    assert!(
        out.status.success(),
        "snapshot failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let src = src.wait_for(Duration::from_secs(60));
    assert_eq!(src.code(), Some(0), "{}", src.describe());

    let api2 = dir.join("api2.sock");
    let mut cmd = std::process::Command::new(e2e::pocketvisor_bin());
    cmd.arg("restore").arg(&snap).arg("--api-socket").arg(&api2);
    let mut dst = RunningVm::spawn(cmd, e2e::vm::default_timeout());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !api2.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = screenshot(&api2, &dir.join("after.png"));
    assert_eq!((after.width, after.height), (W, H));
    assert!(
        after.rgb == before.rgb,
        "the restored display shows the frame from before the snapshot"
    );
    device(
        &api2,
        "touch",
        serde_json::json!({"op": "touch", "slot": 0, "x": 1, "y": H - 1}),
    );
    wait(&mut dst, "touch echo after restore", |l| {
        l == format!("PROBE input touch x=1 y={} down=1 tile=none", H - 1)
    });
}
