//! A profile with a screen: `pocketvisor profile screenshot` through the daemon captures what
//! the (jailed) profile's probe guest drew.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::{can_run_vms, wait_until, Daemon};
use handset::api_types::CreateProfile;
use handset::spec::ProfileSpec;

const RGB: [u8; 3] = [0x2a, 0x9d, 0x8f];

/// (width, height, pixels) of a binary PPM.
fn ppm(bytes: &[u8]) -> (usize, usize, Vec<u8>) {
    let head = String::from_utf8_lossy(&bytes[..bytes.len().min(32)]).into_owned();
    let mut f = head.split_ascii_whitespace();
    assert_eq!(f.next(), Some("P6"));
    let mut n = || -> usize { f.next().unwrap().parse().unwrap() };
    let (w, h, _) = (n(), n(), n());
    (w, h, bytes[bytes.len() - w * h * 3..].to_vec())
}

#[test]
fn profile_screenshot_captures_the_guest_screen() {
    if !can_run_vms("profile_screenshot_captures_the_guest_screen") {
        return;
    }
    let d = Daemon::start("screen");
    let spec = ProfileSpec::from_toml(
        "name = \"work\"\nkernel = \"probe\"\n\
         cmdline = \"pv.mode=screen pv.screen.rgb=2a9d8f pv.screen.ms=60000\"\n\
         memory_mib = 80\nscreen = true\ndisplay = { width = 180, height = 320 }\n",
    )
    .unwrap();
    let req = CreateProfile {
        spec: Some(spec),
        ..Default::default()
    };
    let _: handset::ProfileInfo = d.client().call("POST", "/v1/profiles", Some(&req)).unwrap();
    d.create_probe("plain", 64, "");
    let shot = d.dir.join("work.ppm");
    let shot_arg = shot.to_str().unwrap();

    // Not running yet: refused, nothing written.
    let early = d.cli(&["screenshot", "work", "-o", shot_arg]);
    assert!(!early.status.success());
    assert!(
        String::from_utf8_lossy(&early.stderr).contains("only a running profile"),
        "{}",
        String::from_utf8_lossy(&early.stderr)
    );
    assert!(!shot.exists());
    let plain = d.cli(&["screenshot", "plain", "-o", shot_arg]);
    assert!(String::from_utf8_lossy(&plain.stderr).contains("has no screen"));

    d.act("work", "start").unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || d
            .serial("work")
            .contains("PROBE screen frame n=1 why=full")),
        "the probe never drew: {}\n{}",
        d.serial("work"),
        d.log()
    );
    let out = d.cli(&["screenshot", "work", "-o", shot_arg]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (w, h, rgb) = ppm(&std::fs::read(&shot).unwrap());
    assert_eq!((w, h), (180, 320));
    let corner = ((h - 1) * w + (w - 1)) * 3;
    assert_eq!(rgb[corner..corner + 3], RGB, "the profile colour");
    // The header is the colour halved.
    assert_eq!(rgb[(w - 1) * 3..w * 3], RGB.map(|c| c >> 1));

    // Live over VNC: `profile view` prints a loopback address the daemon forwards to the
    // jailed VMM's VNC socket; the frame is the guest's and a key reaches the guest.
    let plain = d.cli(&["view", "plain"]);
    assert!(String::from_utf8_lossy(&plain.stderr).contains("has no screen"));
    let (addr, text) = view_address(&d, "work");
    assert!(addr.starts_with("127.0.0.1:"), "loopback only: {addr}");
    let again = d.cli(&["view", "work"]);
    assert_eq!(String::from_utf8_lossy(&again.stdout), text, "one address");
    let mut vnc = std::net::TcpStream::connect(&addr).unwrap();
    vnc.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let frame = rfb_full_frame(&mut vnc, w, h);
    assert_eq!(
        frame[corner..corner + 3],
        RGB,
        "the profile colour over VNC"
    );
    assert_eq!(frame, rgb, "the same frame as the screenshot");
    // KeyEvent 'a' down and up: KEY_A (30) in the guest.
    for down in [1u8, 0] {
        vnc.write_all(&[4, down, 0, 0, 0, 0, 0, b'a']).unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(30), || d
            .serial("work")
            .contains("PROBE input key code=30 value=0")),
        "the key did not reach the guest: {}",
        d.serial("work")
    );
    drop(vnc);

    // Across a suspend and resume the screen is the same guest's: the restored VMM serves its
    // display again through `profile view`, and keys reach the restored guest.
    d.act("work", "suspend").unwrap();
    let suspended = d.cli(&["view", "work"]);
    assert!(
        !suspended.status.success(),
        "a suspended profile has no live view"
    );
    d.act("work", "resume").unwrap();
    let (addr, _) = view_address(&d, "work");
    let mut vnc = std::net::TcpStream::connect(&addr).unwrap();
    vnc.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let frame = rfb_full_frame(&mut vnc, w, h);
    assert_eq!(
        frame[corner..corner + 3],
        RGB,
        "the restored screen's colour"
    );
    assert_eq!(
        frame[(w - 1) * 3..w * 3],
        RGB.map(|c| c >> 1),
        "the restored screen's header"
    );
    let presses = |serial: &str| serial.matches("PROBE input key code=30 value=0").count();
    let before = presses(&d.serial("work"));
    for down in [1u8, 0] {
        vnc.write_all(&[4, down, 0, 0, 0, 0, 0, b'a']).unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(30), || presses(&d.serial("work"))
            > before),
        "the key did not reach the restored guest: {}",
        d.serial("work")
    );
}

/// `profile view NAME`'s VNC address, and all it printed.
fn view_address(d: &Daemon, name: &str) -> (String, String) {
    let view = d.cli(&["view", name]);
    let text = String::from_utf8_lossy(&view.stdout).into_owned();
    assert!(
        view.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&view.stderr)
    );
    let addr = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix(&format!("{name}: vnc ")))
        .unwrap_or_else(|| panic!("no address: {text}"))
        .to_string();
    (addr, text)
}

/// An RFB 3.8 handshake (security None) and one full update in the server's 32-bit
/// little-endian format; the frame as RGB.
fn rfb_full_frame(s: &mut std::net::TcpStream, w: usize, h: usize) -> Vec<u8> {
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"RFB 003.008\n");
    s.write_all(b"RFB 003.008\n").unwrap();
    let mut types = [0u8; 2];
    s.read_exact(&mut types).unwrap();
    assert_eq!(types, [1, 1]);
    s.write_all(&[1]).unwrap();
    let mut result = [0u8; 4];
    s.read_exact(&mut result).unwrap();
    assert_eq!(result, [0; 4]);
    s.write_all(&[1]).unwrap();
    let mut init = [0u8; 24];
    s.read_exact(&mut init).unwrap();
    assert_eq!(
        (
            usize::from(u16::from_be_bytes([init[0], init[1]])),
            usize::from(u16::from_be_bytes([init[2], init[3]]))
        ),
        (w, h)
    );
    let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]);
    let mut name = vec![0u8; usize::try_from(name_len).unwrap()];
    s.read_exact(&mut name).unwrap();
    let (w16, h16) = (u16::try_from(w).unwrap(), u16::try_from(h).unwrap());
    let mut req = vec![3, 0, 0, 0, 0, 0];
    req.extend_from_slice(&w16.to_be_bytes());
    req.extend_from_slice(&h16.to_be_bytes());
    s.write_all(&req).unwrap();
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
