//! A profile with a screen: `pocketvisor profile screenshot` through the daemon captures what
//! the (jailed) profile's probe guest drew.

mod common;

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
}
