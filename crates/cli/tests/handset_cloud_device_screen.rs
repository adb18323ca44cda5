//! The device screen (`profile view --device`, the handset's own screen) with an offloaded
//! profile in front (issue 13): a real cloud host (`pocketvisor cloud serve`) on loopback, the
//! probe drawing its home screen and reporting each frame's FNV-1a. The offload of the profile
//! in front keeps it there with its twin's frames under its bar; `profile switch` to it from
//! another profile shows the twin again, and the device's key and touch reach the twin's guest;
//! a switch to an offloaded profile without a screen is refused; after `profile return` the
//! device screen shows the frames of the guest run here again, and its input goes there.
//!
//! Skipped (with a SKIP line on stderr) where /dev/kvm is missing or the probe cannot be built.

mod cloud_common;
mod common;
mod portable_common;

use std::path::Path;
use std::time::{Duration, Instant};

use cloud_common::CloudHost;
use portable_common::{probe, run, Daemon, Scratch};

const WAIT: Duration = Duration::from_secs(90);
/// The profiles' display width.
const W: usize = 180;
/// The profiles' display height.
const H: usize = 320;
/// The rows of the status bar the host draws above it (`bar_rows(180)`).
const BAR: usize = 12;

/// The FNV-1a of every frame the probe reported in `text`, complete lines only (a log another
/// process writes may end in half a line).
fn frames_in(text: &[u8]) -> Vec<u64> {
    String::from_utf8_lossy(text)
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(e2e::probe::ProbeLine::parse)
        .filter(|p| p.starts_with(&["screen", "frame"]))
        .filter_map(|p| p.field("fnv").and_then(|h| u64::from_str_radix(h, 16).ok()))
        .collect()
}

/// The complete `PROBE input key` and `PROBE input touch` lines in `text`.
fn inputs_in(text: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(text)
        .split_inclusive('\n')
        .filter(|l| {
            l.ends_with('\n')
                && (l.contains("PROBE input key ") || l.contains("PROBE input touch "))
        })
        .map(|l| l.trim_end().to_string())
        .collect()
}

/// A serial log's bytes from `from` on (all of it if it is shorter: written anew).
fn since(path: &Path, from: usize) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap_or_default();
    if bytes.len() >= from {
        bytes[from..].to_vec()
    } else {
        bytes
    }
}

fn said(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `pocketvisor profile --state-dir DIR ARGS...`, successful or not.
fn profile(dir: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["profile", "--state-dir", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    run(&all, &[])
}

fn show(dir: &Path, name: &str) -> serde_json::Value {
    let out = profile(dir, &["show", name, "--json"]);
    assert!(out.status.success(), "profile show: {}", said(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// What the device screen shows: its status bar's colour (right of the name) and the FNV-1a
/// of the frame below the bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shown {
    bar: [u8; 3],
    fnv: u64,
}

/// The device screen's viewer, a client no one in the daemon wrote.
struct Device {
    viewer: e2e::rfb_client::RfbClient,
}

impl Device {
    fn connect(port: u16) -> Device {
        let viewer = e2e::rfb_client::RfbClient::connect(port);
        assert_eq!(
            (usize::from(viewer.width), usize::from(viewer.height)),
            (W, H + BAR),
            "the device screen is the display and the bar"
        );
        Device { viewer }
    }

    fn capture(&mut self) -> Shown {
        let rgb = self.viewer.full_frame();
        let at = (3 * W + W - 3) * 3;
        Shown {
            bar: [rgb[at], rgb[at + 1], rgb[at + 2]],
            fnv: e2e::host::fnv1a64(&rgb[BAR * W * 3..]),
        }
    }

    /// Captures until `ok` holds for what is shown; the last capture and whether it did.
    fn wait_for(&mut self, ok: impl Fn(Shown) -> bool) -> (Shown, bool) {
        let t0 = Instant::now();
        loop {
            let shown = self.capture();
            if ok(shown) {
                return (shown, true);
            }
            if t0.elapsed() > WAIT {
                return (shown, false);
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// A key ('a') and a touch at (50, 100) of the profile's screen (below the bar).
    fn key_and_touch(&mut self) {
        self.viewer.key(0x61, true);
        self.viewer.key(0x61, false);
        let y = u16::try_from(BAR + 100).unwrap();
        self.viewer.pointer(1, 50, y);
        std::thread::sleep(Duration::from_millis(50));
        self.viewer.pointer(0, 50, y);
    }
}

/// Whether `lines` hold the key and the press of [`Device::key_and_touch`].
fn got_key_and_touch(lines: &[String]) -> bool {
    lines.iter().any(|l| l.contains("PROBE input key code=30"))
        && lines
            .iter()
            .any(|l| l.contains("PROBE input touch x=50 y=100 down=1"))
}

fn create(daemon: &Daemon, s: &Scratch, name: &str, toml: &str) {
    let spec = s.path(&format!("{name}.toml"));
    std::fs::write(&spec, toml).unwrap();
    daemon.profile(&["create", "--file", spec.to_str().unwrap()]);
}

fn screen_spec(name: &str, rgb: &str) -> String {
    format!(
        "name = \"{name}\"\nkernel = \"probe\"\n\
         cmdline = \"pv.mode=screen pv.screen.hash=1 pv.screen.ms=500 pv.screen.rgb={rgb}\"\n\
         memory_mib = 64\nscreen = true\ndisplay = {{ width = {W}, height = {H} }}\n"
    )
}

#[test]
fn the_device_screen_shows_an_offloaded_profile_in_front_and_sends_it_the_devices_input() {
    let Some(probe) = probe("handset_cloud_device_screen") else {
        return;
    };
    let host = CloudHost::start("pv-hcloudtest", "devscreen");
    let s = Scratch::new("pv-hcloudtest", "devscreen-device");
    let dir = s.path("state");
    let daemon = Daemon::start_with(&dir, Some(&probe), &[], &["--no-jail"]);
    host.give_identity(&dir, "phone");
    create(&daemon, &s, "work", &screen_spec("work", "2060a0"));
    create(&daemon, &s, "personal", &screen_spec("personal", "e76f51"));
    create(
        &daemon,
        &s,
        "plain",
        "name = \"plain\"\nkernel = \"probe\"\ncmdline = \"pv.mode=counter\"\nmemory_mib = 64\n",
    );
    for name in ["work", "personal", "plain"] {
        daemon.profile(&["start", name]);
    }
    let serial = |name: &str| dir.join(format!("profiles/{name}/run/serial.log"));
    for name in ["work", "personal"] {
        assert!(
            common::wait_for(&serial(name), "PROBE screen frame n=1 ", WAIT),
            "{name} drew nothing: {}",
            common::read(&serial(name))
        );
    }
    assert_eq!(show(&dir, "work")["foreground"], true, "the first started");

    let view = daemon.profile(&["view", "--device"]);
    let port: u16 = view
        .strip_prefix("device: vnc 127.0.0.1:")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no loopback address: {view}"));
    let mut device = Device::connect(port);
    let local = |name: &str| frames_in(&std::fs::read(serial(name)).unwrap_or_default());
    let (shown, ok) = device.wait_for(|s| local("work").contains(&s.fnv));
    assert!(ok, "work's screen is not on the device: {shown:x?}");
    let work_bar = shown.bar;

    // The offload of the profile in front: it stays in front, its twin's frames under its bar.
    let out = profile(&dir, &["offload", "work", "--to", &host.addr]);
    assert!(out.status.success(), "offload failed: {}", said(&out));
    let work = show(&dir, "work");
    assert_eq!(work["state"], "offloaded");
    assert_eq!(work["foreground"], true, "{work}");
    let twin = host
        .twin_dirs()
        .into_iter()
        .find(|t| t.ends_with("/work"))
        .expect("work's twin at the host");
    let twin_log = host.state().join("twins").join(twin).join("serial.log");
    let twin_frames = || frames_in(&std::fs::read(&twin_log).unwrap_or_default());
    let (shown, ok) = device.wait_for(|s| s.bar == work_bar && twin_frames().contains(&s.fnv));
    assert!(
        ok,
        "after the offload of the profile in front, the device screen ({shown:x?}, work's bar \
         {work_bar:x?}) shows no frame the twin drew: {:x?}\n{}",
        twin_frames(),
        daemon.profile(&["events", "work"])
    );

    // Away to personal (here) and back to work (there) by `profile switch`.
    daemon.profile(&["switch", "personal"]);
    let (shown, ok) = device.wait_for(|s| local("personal").contains(&s.fnv));
    assert!(ok, "personal's screen is not on the device: {shown:x?}");
    let personal_bar = shown.bar;
    assert_ne!(personal_bar, work_bar, "each profile's bar is its own");
    let switched = daemon.profile(&["switch", "work"]);
    assert!(switched.contains("work is in the foreground"), "{switched}");
    let (shown, ok) = device.wait_for(|s| s.bar == work_bar && twin_frames().contains(&s.fnv));
    assert!(
        ok,
        "after the switch to offloaded work, the device screen ({shown:x?}) shows no frame \
         the twin drew: {:x?}",
        twin_frames()
    );

    // The device's key and touch reach the twin's guest, not personal's.
    device.key_and_touch();
    let twin_inputs = || inputs_in(&std::fs::read(&twin_log).unwrap_or_default());
    assert!(
        common::wait_until(|| got_key_and_touch(&twin_inputs()), WAIT),
        "the twin's guest did not get the device's key and touch: {:?}",
        twin_inputs()
    );
    let personal = inputs_in(&std::fs::read(serial("personal")).unwrap());
    assert!(
        personal.is_empty(),
        "personal, in the background, got input: {personal:?}"
    );

    // An offloaded profile without a screen has nothing to show here; another profile's
    // offload leaves work in front.
    let out = profile(&dir, &["offload", "plain", "--to", &host.addr]);
    assert!(
        out.status.success(),
        "offload of plain failed: {}",
        said(&out)
    );
    let out = profile(&dir, &["switch", "plain"]);
    assert!(!out.status.success(), "a switch to plain: {}", said(&out));
    assert!(
        said(&out).contains("offloaded and has no screen"),
        "{}",
        said(&out)
    );
    assert_eq!(show(&dir, "work")["foreground"], true);

    // Back from the cloud while in front: the device screen shows the guest run here, and
    // the device's input goes to it.
    let from = std::fs::read(serial("work")).map_or(0, |b| b.len());
    let out = profile(&dir, &["return", "work"]);
    assert!(out.status.success(), "return failed: {}", said(&out));
    let work = show(&dir, "work");
    assert_eq!(work["state"], "running");
    assert_eq!(work["foreground"], true, "{work}");
    let returned = || frames_in(&since(&serial("work"), from));
    let (shown, ok) = device.wait_for(|s| s.bar == work_bar && returned().contains(&s.fnv));
    assert!(
        ok,
        "after the return, the device screen ({shown:x?}) shows no frame the guest run here \
         drew: {:x?}\n{}",
        returned(),
        daemon.profile(&["events", "work"])
    );
    device.key_and_touch();
    let here = || inputs_in(&since(&serial("work"), from));
    assert!(
        common::wait_until(|| got_key_and_touch(&here()), WAIT),
        "the returned guest did not get the device's key and touch: {:?}",
        here()
    );
}
