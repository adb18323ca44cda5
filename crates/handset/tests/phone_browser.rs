//! The browser phone in a browser nobody here wrote: Debian's headless `chromium`, driven by
//! `playwright-core` from npm (`tests/phone_browser.js`, Node.js at test time only). The
//! page shows the foreground profile's screen (its pixels are the probe's colours) under the
//! host's status bar; a click on the switcher shows the other profile within one second; a
//! tap on a tile and a key reach the guest (PROBE lines in its serial log).
//!
//! Skipped loudly where KVM, `chromium` ($PV_CHROMIUM, else /usr/bin/chromium) or `node` is
//! missing; playwright-core is installed once into `guest/out/playwright-VERSION/` (a failed
//! install fails the test).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{can_run_vms, loud, wait_until, Daemon};
use handset::api_types::CreateProfile;
use handset::spec::ProfileSpec;

const PLAYWRIGHT: &str = "1.56.1";
const WORK: [u8; 3] = [0x2a, 0x9d, 0x8f];
const PERSONAL: [u8; 3] = [0xe7, 0x6f, 0x51];
/// The browser's run, bounded.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(120);

fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PV_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/chromium".into());
    path.is_file().then_some(path)
}

fn has_node() -> bool {
    Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `node_modules` with playwright-core, installed from npm on first use.
fn playwright_modules() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../guest/out")
        .join(format!("playwright-{PLAYWRIGHT}"));
    let modules = root.join("node_modules");
    if modules.join("playwright-core/package.json").is_file() {
        return modules;
    }
    std::fs::create_dir_all(&root).unwrap();
    let status = Command::new("timeout")
        .arg("300")
        .arg("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--no-save",
            "--prefix",
        ])
        .arg(&root)
        .arg(format!("playwright-core@{PLAYWRIGHT}"))
        .status()
        .expect("npm (Debian's npm package) runs");
    assert!(
        status.success() && modules.join("playwright-core/package.json").is_file(),
        "npm could not install playwright-core@{PLAYWRIGHT} into {} (it needs the npm \
         registry): {status}",
        root.display()
    );
    modules
}

fn screened(d: &Daemon, name: &str, rgb: &str) {
    let spec = ProfileSpec::from_toml(&format!(
        "name = \"{name}\"\nkernel = \"probe\"\n\
         cmdline = \"pv.mode=screen pv.screen.rgb={rgb} pv.screen.ms=1000\"\n\
         memory_mib = 80\nscreen = true\ndisplay = {{ width = 180, height = 320 }}\n"
    ))
    .unwrap();
    let req = CreateProfile {
        spec: Some(spec),
        ..Default::default()
    };
    let _: handset::ProfileInfo = d.client().call("POST", "/v1/profiles", Some(&req)).unwrap();
    d.act(name, "start").unwrap();
}

/// The first tile's centre in framebuffer pixels, from the probe's `screen tile` line.
fn first_tile(serial: &str) -> Option<(u32, u32)> {
    let line = serial.lines().find(|l| l.contains("screen tile i=0 "))?;
    let field = |k: &str| -> Option<u32> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
    };
    Some((
        field("x=")? + field("w=")? / 2,
        field("y=")? + field("h=")? / 2,
    ))
}

fn rgb(v: &serde_json::Value) -> [u8; 3] {
    let a: Vec<u8> = serde_json::from_value(v.clone()).unwrap();
    [a[0], a[1], a[2]]
}

fn close(a: [u8; 3], b: [u8; 3]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.abs_diff(y) <= 2)
}

/// `rgb(R, G, B)` (a computed CSS colour).
fn css_rgb(text: &str) -> [u8; 3] {
    let inner = text
        .trim()
        .strip_prefix("rgb(")
        .and_then(|t| t.strip_suffix(')'))
        .unwrap_or_else(|| panic!("not rgb(): {text}"));
    let v: Vec<u8> = inner
        .split(',')
        .map(|c| c.trim().parse().unwrap())
        .collect();
    [v[0], v[1], v[2]]
}

/// Runs the driver script, killed after [`BROWSER_TIMEOUT`]; its JSON.
fn drive(modules: &Path, chromium: &Path, url: &str, other: &str, tile: (u32, u32)) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/phone_browser.js");
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let err_file = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new("node")
        .arg(&script)
        .args([url, chromium.to_str().unwrap(), other])
        .args([tile.0.to_string(), tile.1.to_string()])
        .env("NODE_PATH", modules)
        .stdout(out_file.reopen().unwrap())
        .stderr(err_file.reopen().unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + BROWSER_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the browser did not finish within {BROWSER_TIMEOUT:?}: {}",
                std::fs::read_to_string(err_file.path()).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = std::fs::read_to_string(out_file.path()).unwrap();
    let err = std::fs::read_to_string(err_file.path()).unwrap();
    assert!(
        status.success(),
        "the browser script failed: {status}\n{out}\n{err}"
    );
    out
}

#[test]
fn chromium_shows_switches_and_touches_the_profiles() {
    if !can_run_vms("chromium_shows_switches_and_touches_the_profiles") {
        return;
    }
    let Some(chromium) = chromium() else {
        loud("SKIP (no chromium: apt-get install chromium, or set PV_CHROMIUM): chromium_shows_switches_and_touches_the_profiles");
        return;
    };
    if !has_node() {
        loud("SKIP (no node: apt-get install nodejs npm): chromium_shows_switches_and_touches_the_profiles");
        return;
    }
    let modules = playwright_modules();
    let d = Daemon::start("phone-browser");
    screened(&d, "work", "2a9d8f");
    screened(&d, "personal", "e76f51");
    for name in ["work", "personal"] {
        assert!(
            wait_until(Duration::from_secs(60), || d
                .serial(name)
                .contains("PROBE screen frame n=1 why=full")),
            "{name} never drew: {}\n{}",
            d.serial(name),
            d.log()
        );
    }
    d.act("work", "switch").unwrap();
    let tile = first_tile(&d.serial("personal")).expect("the probe lists its tiles");

    // `profile view` prints the page's address with the token.
    let view = d.cli(&["view", "work"]);
    let text = String::from_utf8_lossy(&view.stdout).into_owned();
    let url = text
        .lines()
        .find_map(|l| l.strip_prefix("work: phone "))
        .unwrap_or_else(|| panic!("no phone address: {text}"))
        .to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "loopback: {url}");
    assert!(url.contains("/phone?token="), "{url}");

    let started = Instant::now();
    let out = drive(&modules, &chromium, &url, "personal", tile);
    eprintln!("MEASURE browser run {:?}: {out}", started.elapsed());
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();

    assert!(
        !r["address"].as_str().unwrap().contains("token"),
        "the token left the address bar: {}",
        r["address"]
    );
    assert_eq!(r["first"], "work", "the foreground profile is shown first");
    let before = &r["before"];
    assert_eq!(before["fb"], serde_json::json!([180, 320]));
    assert!(
        close(rgb(&before["corner"]), WORK),
        "work's colour on screen: {before}"
    );
    assert!(
        close(rgb(&before["header"]), WORK.map(|c| c >> 1)),
        "work's header: {before}"
    );
    assert_eq!(before["status"], "work", "the host's status bar names work");
    assert!(
        close(
            rgb(&before["bar_pixel"]),
            css_rgb(before["bar_css"].as_str().unwrap())
        ),
        "the status bar is drawn in work's colour: {before}"
    );
    let badges = before["badges"].as_array().unwrap();
    assert!(
        badges.contains(&serde_json::json!(["work", "running"]))
            && badges.contains(&serde_json::json!(["personal", "running"])),
        "each profile's state badge: {badges:?}"
    );

    let switch_ms = r["switch_ms"].as_u64().unwrap();
    eprintln!("MEASURE switch click to the other profile's first frame: {switch_ms} ms");
    assert!(switch_ms < 1000, "the other profile after {switch_ms} ms");
    let after = &r["after"];
    assert!(
        close(rgb(&after["corner"]), PERSONAL),
        "personal's colour after the switch: {after}"
    );
    assert_eq!(after["status"], "personal");
    assert_ne!(
        after["bar_css"], before["bar_css"],
        "each profile its colour"
    );
    assert!(
        d.show("personal").foreground,
        "the switch reached the daemon"
    );

    let touch = format!("PROBE input touch x={} y={} down=1 tile=0", tile.0, tile.1);
    assert!(
        wait_until(Duration::from_secs(20), || d
            .serial("personal")
            .contains(&touch)),
        "the tap did not reach personal ({touch}): {}",
        d.serial("personal")
    );
    assert!(
        wait_until(Duration::from_secs(20), || d
            .serial("personal")
            .contains("PROBE input key code=30 value=0")),
        "the key did not reach personal: {}",
        d.serial("personal")
    );
    assert!(
        !d.serial("work").contains("PROBE input touch"),
        "the tap went to work, which was not in view"
    );
}
