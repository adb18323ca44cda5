//! The device screen: a stock VNC client (`vncsnapshot`) captures what the handset shows, the
//! foreground profile's probe screen under a status bar only the host draws in that profile's
//! colour; after `profile switch` the bar and the screen below it are the other profile's.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{can_run_vms, loud, Daemon};
use handset::api_types::CreateProfile;
use handset::spec::ProfileSpec;

const WORK_RGB: [u8; 3] = [0x2a, 0x9d, 0x8f];
const PERSONAL_RGB: [u8; 3] = [0xe7, 0x6f, 0x51];
/// `display`'s bar for a 180-pixel-wide screen: 12 rows.
const BAR: usize = 12;

fn create(d: &Daemon, name: &str, rgb: &str) {
    let spec = ProfileSpec::from_toml(&format!(
        "name = \"{name}\"\nkernel = \"probe\"\n\
         cmdline = \"pv.mode=screen pv.screen.rgb={rgb} pv.screen.ms=60000\"\n\
         memory_mib = 80\nscreen = true\ndisplay = {{ width = 180, height = 320 }}\n"
    ))
    .unwrap();
    let req = CreateProfile {
        spec: Some(spec),
        ..Default::default()
    };
    let _: handset::ProfileInfo = d.client().call("POST", "/v1/profiles", Some(&req)).unwrap();
}

/// (width, height, RGB pixels) of one vncsnapshot capture (JPEG).
fn capture(vncsnapshot: &Path, addr: &str, dir: &Path) -> (usize, usize, Vec<u8>) {
    let shot = dir.join("device.jpg");
    let _ = std::fs::remove_file(&shot);
    let port = addr.rsplit(':').next().unwrap();
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
    let info = decoder.info().unwrap();
    (usize::from(info.width), usize::from(info.height), pixels)
}

/// Within JPEG's error of a flat area.
fn close(got: [u8; 3], want: [u8; 3]) -> bool {
    got.iter().zip(want).all(|(g, w)| g.abs_diff(w) <= 10)
}

/// Captures until the bar (right of the name) is `bar` and the screen below it is the
/// probe's `rgb` (a minute at most); returns the last capture's failures otherwise.
fn wait_for(vncsnapshot: &Path, addr: &str, dir: &Path, bar: [u8; 3], rgb: [u8; 3]) -> String {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < Duration::from_secs(90) {
        let (w, h, px) = capture(vncsnapshot, addr, dir);
        assert_eq!((w, h), (180, 320 + BAR));
        let pixel = |x: usize, y: usize| {
            let i = (y * w + x) * 3;
            [px[i], px[i + 1], px[i + 2]]
        };
        let mut wrong = Vec::new();
        // The bar, away from the name (drawn from the left) and from the bar's lower edge.
        for x in (60..w - 2).step_by(7) {
            for y in 1..BAR - 3 {
                if !close(pixel(x, y), bar) {
                    wrong.push(format!("bar ({x},{y}) {:?}", pixel(x, y)));
                }
            }
        }
        // The probe's background: the bottom right corner of its screen, below the bar.
        if !close(pixel(w - 3, h - 3), rgb) {
            wrong.push(format!("probe corner {:?}", pixel(w - 3, h - 3)));
        }
        if wrong.is_empty() {
            return String::new();
        }
        last = wrong[..wrong.len().min(5)].join(", ");
        std::thread::sleep(Duration::from_millis(500));
    }
    last
}

#[test]
fn a_stock_client_sees_the_foreground_under_the_hosts_bar_and_follows_a_switch() {
    let name = "a_stock_client_sees_the_foreground_under_the_hosts_bar_and_follows_a_switch";
    if !can_run_vms(name) {
        return;
    }
    let Some(vncsnapshot) = ["/usr/bin/vncsnapshot", "/usr/local/bin/vncsnapshot"]
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
    else {
        loud(&format!("SKIP {name}: vncsnapshot is not installed"));
        return;
    };
    let d = Daemon::start("device");
    create(&d, "work", "2a9d8f");
    create(&d, "personal", "e76f51");
    let early = d.cli(&["view", "--device"]);
    assert!(!early.status.success(), "nothing in the foreground yet");
    d.act("work", "start").unwrap();
    d.act("personal", "start").unwrap();
    let view = d.cli(&["view", "--device"]);
    let text = String::from_utf8_lossy(&view.stdout).into_owned();
    assert!(
        view.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&view.stderr)
    );
    let addr = text
        .split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no address: {text}"))
        .to_string();
    assert!(addr.starts_with("127.0.0.1:"), "loopback only: {text}");
    assert!(text.contains("(180x332)"), "{text}");

    let work = wait_for(
        vncsnapshot,
        &addr,
        &d.dir,
        display::profile_colour("work"),
        WORK_RGB,
    );
    assert!(work.is_empty(), "work in front: {work}\n{}", d.log());

    // The frame after a switch, as a viewer waiting with an incremental request sees it: the
    // bar in personal's colour, then personal's screen below it.
    let (w, h) = (180usize, 320 + BAR);
    let mut timed = rfb_connect(&addr);
    timed.write_all(&update_request(false, w, h)).unwrap();
    read_frame(&mut timed, w, h);
    let personal_bar = display::profile_colour("personal");
    let started = Instant::now();
    d.act("personal", "switch").unwrap();
    let switched = started.elapsed();
    let (mut bar_at, mut screen_at) = (None, None);
    while screen_at.is_none() && started.elapsed() < Duration::from_secs(30) {
        timed.write_all(&update_request(true, w, h)).unwrap();
        let rgb = read_frame(&mut timed, w, h);
        let px = |x: usize, y: usize| -> [u8; 3] {
            let i = (y * w + x) * 3;
            [rgb[i], rgb[i + 1], rgb[i + 2]]
        };
        if px(w - 3, 3) == personal_bar {
            bar_at.get_or_insert(started.elapsed());
            if px(w - 3, h - 3) == PERSONAL_RGB {
                screen_at = Some(started.elapsed());
            }
        }
    }
    loud(&format!(
        "MEASURE device screen after `profile switch` (API call {switched:?}): personal's bar \
         after {bar_at:?}, its screen after {screen_at:?}"
    ));
    assert!(
        screen_at.is_some(),
        "personal's screen never came to the device screen"
    );
    drop(timed);

    let personal = wait_for(
        vncsnapshot,
        &addr,
        &d.dir,
        display::profile_colour("personal"),
        PERSONAL_RGB,
    );
    assert!(
        personal.is_empty(),
        "personal in front: {personal}\n{}",
        d.log()
    );

    // Input from a device viewer reaches the profile in front (personal), the pointer moved up
    // by the bar's rows; a press on the bar reaches no guest.
    let mut viewer = rfb_connect(&addr);
    for down in [1u8, 0] {
        viewer.write_all(&[4, down, 0, 0, 0, 0, 0, b'a']).unwrap();
    }
    let pointer = |buttons: u8, x: u16, y: u16| {
        let mut m = vec![5u8, buttons];
        m.extend_from_slice(&x.to_be_bytes());
        m.extend_from_slice(&y.to_be_bytes());
        m
    };
    let bar = u16::try_from(BAR).unwrap();
    for m in [
        pointer(1, 40, 3),
        pointer(0, 40, 3),
        pointer(1, 50, bar + 100),
        pointer(0, 50, bar + 100),
    ] {
        viewer.write_all(&m).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let touches = |serial: &str| -> Vec<String> {
        serial
            .lines()
            .filter(|l| l.contains("PROBE input touch") && l.contains("down=1"))
            .map(str::to_string)
            .collect()
    };
    assert!(
        common::wait_until(Duration::from_secs(30), || {
            let serial = d.serial("personal");
            serial.contains("PROBE input key code=30 value=0") && !touches(&serial).is_empty()
        }),
        "the key and the touch did not reach personal: {}\n{}",
        d.serial("personal"),
        d.log()
    );
    let first = touches(&d.serial("personal")).remove(0);
    assert!(
        first.contains("x=50 y=100 "),
        "the first touch personal saw is the one below the bar: {first}"
    );
    assert!(
        !d.serial("work").contains("PROBE input key")
            && !d.serial("work").contains("PROBE input touch"),
        "work, in the background, got input: {}",
        d.serial("work")
    );
}

/// A FramebufferUpdateRequest for the whole `w` x `h` screen.
fn update_request(incremental: bool, w: usize, h: usize) -> Vec<u8> {
    let mut m = vec![3u8, u8::from(incremental), 0, 0, 0, 0];
    m.extend_from_slice(&u16::try_from(w).unwrap().to_be_bytes());
    m.extend_from_slice(&u16::try_from(h).unwrap().to_be_bytes());
    m
}

/// One FramebufferUpdate of the whole screen in one Raw rectangle (the device screen's
/// server sends no other), as RGB.
fn read_frame(s: &mut std::net::TcpStream, w: usize, h: usize) -> Vec<u8> {
    let mut head = [0u8; 16];
    s.read_exact(&mut head).unwrap();
    assert_eq!(head[..4], [0, 0, 0, 1], "one rectangle");
    assert_eq!(head[12..16], [0, 0, 0, 0], "Raw");
    let mut px = vec![0u8; w * h * 4];
    s.read_exact(&mut px).unwrap();
    px.chunks_exact(4)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect()
}

/// An RFB 3.8 session (security None) with the device screen, past ServerInit.
fn rfb_connect(addr: &str) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut version = [0u8; 12];
    s.read_exact(&mut version).unwrap();
    s.write_all(b"RFB 003.008\n").unwrap();
    let mut types = [0u8; 2];
    s.read_exact(&mut types).unwrap();
    s.write_all(&[1]).unwrap();
    let mut result = [0u8; 4];
    s.read_exact(&mut result).unwrap();
    assert_eq!(result, [0; 4]);
    s.write_all(&[1]).unwrap();
    let mut init = [0u8; 24];
    s.read_exact(&mut init).unwrap();
    let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]);
    let mut name = vec![0u8; usize::try_from(name_len).unwrap()];
    s.read_exact(&mut name).unwrap();
    s
}
