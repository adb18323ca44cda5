//! The cloud host as a device uses it: `pocketvisor cloud serve` on loopback, the probe guest
//! (counter mode, with a disk) in `pocketvisor run --api-socket`, and `pocketvisor migrate
//! --twin NAME` to offload it there. The twin counts on from where the device left it, in
//! the device's own directory at the host, its disk byte-identical; a second device gets a
//! twin of its own under the same name; refusals (a bad name, a twin that already runs, a
//! request the host does not serve, a frame out of place) say why and leave the guest
//! running at the device.
//!
//! Loopback is enough here: what these tests check is the host's admission and naming, not
//! the link (the slow-link test in migrate.rs covers the link).
//!
//! Skipped (with a SKIP line on stderr) where /dev/kvm is missing or the probe cannot be built.

mod cloud_common;
mod common;

use std::fs::File;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cloud_common::{assert_disk_after_writes, authority, blk_counters, issue, tls_args, twin_dirs};
use common::{bin, counters, read, wait_exit, wait_for, wait_until, Scratch, Vmm};
use vmm::migration::wire::{Channel, Kind, Role};
use vmm::migration::{tls, MigrationTls};

const SCRATCH: &str = "pv-cloudtest";
const WAIT: Duration = Duration::from_secs(30);
const DISK_BYTES: usize = 4 << 20;
/// The disk of a guest that goes and returns: larger than what it rewrites in 60 s of work
/// (3,000 blocks of 4 KiB), so a return has unchanged data to leave out, as a phone's would.
const RETURN_DISK_BYTES: usize = 32 << 20;

fn tls_files(dir: &Path, who: &str) -> MigrationTls {
    let f = |suffix: &str| dir.join(format!("{who}{suffix}"));
    MigrationTls {
        cert: f(".pem"),
        key: f(".key"),
        ca: f("-ca.pem"),
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn last(path: &Path) -> u64 {
    counters(&read(path)).last().copied().unwrap_or(0)
}

/// A cloud host on loopback with two devices' certificates (`phone`, `tablet`).
struct Host {
    dir: Scratch,
    serve: Vmm,
    addr: String,
    key: PathBuf,
    env: Vec<(String, String)>,
    /// The network namespace its processes (and the devices' commands) run in, if not this one.
    netns: Option<String>,
    /// More flags of its `cloud serve`.
    flags: Vec<String>,
}

impl Drop for Host {
    fn drop(&mut self) {
        // Twins outlive `cloud serve`.
        common::kill_twins(&self.state());
    }
}

impl Host {
    fn state(&self) -> PathBuf {
        self.dir.path("state")
    }

    /// A `pocketvisor` command in the host's network namespace.
    fn command(&self) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, bin()]);
                c
            }
            None => Command::new(bin()),
        }
    }

    /// The twin directories of every device, as `<device>/<name>`.
    fn twin_dirs(&self) -> Vec<String> {
        twin_dirs(&self.state())
    }

    /// A counting probe with a disk (`<name>.img`), its API socket `<name>.sock`.
    fn device_vm(&self, name: &str) -> Vmm {
        self.device_vm_mode(name, "counter", DISK_BYTES)
    }

    /// [`Host::device_vm`] in probe mode `mode` (`counter`, or `blk-counter`, which also
    /// writes its disk), with a disk of `disk_bytes`.
    fn device_vm_mode(&self, name: &str, mode: &str, disk_bytes: usize) -> Vmm {
        let probe = common::probe(true).expect("the probe was there a moment ago");
        std::fs::write(
            self.dir.path(&format!("{name}.img")),
            device_image(name, disk_bytes),
        )
        .unwrap();
        let serial = format!(
            "file:{}",
            self.dir.path(&format!("{name}.serial")).display()
        );
        let vm = Vmm(Command::new(bin())
            .args(["run", "--kernel", probe.to_str().unwrap()])
            .arg("--cmdline")
            .arg(format!("pv.mode={mode} pv.counter.ms=20"))
            .args(["--memory", "64M"])
            .args(["--serial", &serial, "--api-socket"])
            .arg(self.dir.path(&format!("{name}.sock")))
            .arg("--disk")
            .arg(self.dir.path(&format!("{name}.img")))
            .stdout(Stdio::null())
            .stderr(File::create(self.dir.path(&format!("{name}.stderr"))).unwrap())
            .spawn()
            .expect("start the device's VM"));
        assert!(
            wait_for(
                &self.dir.path(&format!("{name}.serial")),
                &format!("PROBE {mode} 3\n"),
                WAIT
            ),
            "the device's guest does not count: {}\n{}",
            read(&self.dir.path(&format!("{name}.stderr"))),
            read(&self.dir.path(&format!("{name}.serial")))
        );
        vm
    }

    /// `pocketvisor migrate --twin twin` of the VM `vm` with the certificate `who`.
    fn offload(&self, vm: &str, who: &str, twin: &str) -> Output {
        self.offload_with(vm, who, twin, &[])
    }

    /// [`Host::offload`] with more flags.
    fn offload_with(&self, vm: &str, who: &str, twin: &str, more: &[&str]) -> Output {
        self.command()
            .args(["migrate", "--api-socket"])
            .arg(self.dir.path(&format!("{vm}.sock")))
            .args(more)
            .args(["--to", &self.addr, "--twin", twin, "--key"])
            .arg(&self.key)
            .args(tls_args(&self.dir.0, who))
            .output()
            .expect("run pocketvisor migrate")
    }

    /// Offloads the phone's VM (`phone`, started by [`Host::device_vm_mode`]) as its twin
    /// `work`, the device keeping a copy of the guest as it was at the switch in `kept`, and
    /// waits for the device's VMM to end.
    fn offload_keeping(&self, phone: &mut Vmm) -> Kept {
        let dir = self.dir.path("kept");
        let out = self.offload_with("phone", "phone", "work", &["--keep", dir.to_str().unwrap()]);
        let said = text(&out);
        assert!(out.status.success(), "{said}");
        assert_eq!(
            wait_exit(phone, WAIT),
            Some(0),
            "the device's VMM did not end"
        );
        let twins = self.twin_dirs();
        assert_eq!(twins.len(), 1, "{twins:?}");
        Kept {
            dir,
            twin: self.state().join("twins").join(&twins[0]),
            said,
        }
    }

    /// `pocketvisor cloud return NAME` to this host as the device `who`, with more flags.
    fn cloud_return(&self, who: &str, name: &str, more: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(["cloud", "return", name, "--from", &self.addr, "--key"])
            .arg(&self.key)
            .args(tls_args(&self.dir.0, who))
            .args(more);
        c
    }

    /// Kills `cloud serve` (SIGKILL) and starts it again on the same state, at a new address.
    fn restart(&mut self) {
        let _ = self.serve.0.kill();
        let _ = self.serve.0.wait();
        let (serve, addr) = serve(&self.dir, &self.key, &self.env, &self.place());
        self.serve = serve;
        self.addr = addr;
    }

    /// `cloud return work` as the phone, onto the copy it kept in `kept` and its disk
    /// `phone.img`, with more flags.
    fn return_onto(&self, kept: &Path, more: &[&str]) -> Command {
        let mut c = self.cloud_return("phone", "work", &["--base", kept.to_str().unwrap()]);
        c.arg("--disk").arg(self.dir.path("phone.img")).args(more);
        c
    }

    /// Starts [`Host::return_onto`] `kept` as the phone's VMM back home (`home.serial`,
    /// `home.sock`); the VMM, and the files its stdout and stderr go to.
    fn return_home(&self, kept: &Path) -> (Vmm, PathBuf, PathBuf) {
        let stdout = self.dir.path("home.stdout");
        let stderr = self.dir.path("home.stderr");
        let home = Vmm(self
            .return_onto(
                kept,
                &[
                    "--serial",
                    &format!("file:{}", self.dir.path("home.serial").display()),
                    "--api-socket",
                    self.dir.path("home.sock").to_str().unwrap(),
                ],
            )
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap());
        (home, stdout, stderr)
    }

    /// Runs the probe with `cmdline` and the device flags `devices` as the phone (`phone.serial`,
    /// `phone.sock`), waits for its line `ready` and offloads it as the twin `work`; the phone's
    /// VMM has ended when this returns.
    fn offload_probe(&self, cmdline: &str, devices: &[&str], ready: &str) {
        let probe = common::probe(true).expect("the probe was there a moment ago");
        let serial = self.dir.path("phone.serial");
        let mut phone = Vmm(Command::new(bin())
            .args([
                "run",
                "--kernel",
                probe.to_str().unwrap(),
                "--cmdline",
                cmdline,
            ])
            .args(["--memory", "64M"])
            .args(devices)
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .arg("--api-socket")
            .arg(self.dir.path("phone.sock"))
            .stdout(Stdio::null())
            .stderr(File::create(self.dir.path("phone.stderr")).unwrap())
            .spawn()
            .expect("start the device's VM"));
        assert!(
            wait_for(&serial, ready, WAIT),
            "the device's guest never said {ready:?}: {}\n{}",
            read(&self.dir.path("phone.stderr")),
            read(&serial)
        );
        let out = self.offload("phone", "phone", "work");
        assert!(out.status.success(), "offload failed: {}", text(&out));
        assert_eq!(wait_exit(&mut phone, WAIT), Some(0));
    }

    /// `pocketvisor cloud VERB NAME --listen LISTEN` (`view` or `vsock`) as the device `who`;
    /// the process and its stderr file.
    fn relay_twin(&self, verb: &str, who: &str, name: &str, listen: &str) -> (Vmm, PathBuf) {
        let stderr = self.dir.path(&format!("{verb}-{who}-{name}.stderr"));
        let vmm = Vmm(Command::new(bin())
            .args(["cloud", verb, name, "--from", &self.addr, "--key"])
            .arg(&self.key)
            .args(tls_args(&self.dir.0, who))
            .args(["--listen", listen])
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("start pocketvisor cloud view or vsock"));
        (vmm, stderr)
    }

    /// A raw authenticated channel to the host, as the device `who`.
    fn channel(&self, who: &str) -> Channel<tls::Transport> {
        let tcp = TcpStream::connect(&self.addr).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        let t = tls::client(tcp, &self.addr, &tls_files(&self.dir.0, who)).unwrap();
        let key = vmm::migration::wire::read_key(&self.key).unwrap();
        Channel::handshake(t, &key, Role::Source).unwrap()
    }
}

/// What [`Host::offload_keeping`] left.
struct Kept {
    /// The copy the device kept.
    dir: PathBuf,
    /// The twin's directory at the host.
    twin: PathBuf,
    /// What `migrate` said.
    said: String,
}

/// The disk image a device VM `name` starts with: half data, half zeros.
fn device_image(name: &str, bytes: usize) -> Vec<u8> {
    let mut image: Vec<u8> = (0..bytes / 2)
        .map(|i| u8::try_from((i * 7 + name.len()) % 251).unwrap())
        .collect();
    image.resize(bytes, 0);
    image
}

/// The file in a host's scratch directory holding its PostgreSQL URL, if it has one.
const STORE_URL: &str = "store-url";

/// Where a host runs and with which more flags.
#[derive(Default)]
struct Place {
    netns: Option<String>,
    flags: Vec<String>,
}

impl Host {
    fn place(&self) -> Place {
        Place {
            netns: self.netns.clone(),
            flags: self.flags.clone(),
        }
    }
}

/// A cloud host, or None where KVM or the probe is missing.
fn host(name: &str) -> Option<Host> {
    host_with_env(name, &[])
}

/// [`host`], its processes (the twins' among them) started with `env` set.
fn host_with_env(name: &str, env: &[(&str, &str)]) -> Option<Host> {
    host_at(name, env, None, Place::default())
}

/// [`host`] keeping its twin registry in PostgreSQL, or None (skipped, said loudly; a failure
/// under CI) where PostgreSQL is not installed.
fn host_on_postgres(name: &str) -> Option<Host> {
    common::probe(true)?;
    let url = mdm::store::pg_scratch::database_for_test(name)?;
    host_at(name, &[], Some(&url), Place::default())
}

/// [`host_with_env`], the registry in the PostgreSQL database at `store` if given (its URL in
/// `store-url` in the scratch directory, which every start of the host is given).
fn host_at(name: &str, env: &[(&str, &str)], store: Option<&str>, at: Place) -> Option<Host> {
    common::probe(true)?;
    let dir = Scratch::new(SCRATCH, name);
    if let Some(url) = store {
        std::fs::write(dir.path(STORE_URL), url).unwrap();
    }
    let ca = authority();
    issue(&dir.0, "cloud", "127.0.0.1", &ca);
    issue(&dir.0, "phone", "phone.example", &ca);
    issue(&dir.0, "tablet", "tablet.example", &ca);
    // The phone as the destination of a return: its certificate names the address.
    issue(&dir.0, "phone-home", "127.0.0.1", &ca);
    let key = dir.path("cloud.mkey");
    std::fs::write(&key, "5a".repeat(32) + "\n").unwrap();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let (serve, addr) = serve(&dir, &key, &env, &at);
    Some(Host {
        dir,
        serve,
        addr,
        key,
        env,
        netns: at.netns,
        flags: at.flags,
    })
}

/// Starts `cloud serve` on the state in `dir` (its stderr appended to `serve.stderr`), with the
/// registry in PostgreSQL where `store-url` says so; returns it and the address it listens on.
fn serve(dir: &Scratch, key: &Path, env: &[(String, String)], at: &Place) -> (Vmm, String) {
    let store = dir.path(STORE_URL);
    let mut more = if store.exists() {
        vec!["--store-file".to_string(), store.display().to_string()]
    } else {
        Vec::new()
    };
    more.extend(at.flags.iter().cloned());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    cloud_common::serve_in(at.netns.as_deref(), &dir.0, key, &more, &env)
}

#[test]
fn an_offloaded_guest_counts_on_in_its_twin_with_its_disk_and_each_device_has_its_own() {
    let Some(h) = host("offload") else {
        return;
    };
    let mut phone = h.device_vm("phone");
    let out = h.offload("phone", "phone", "work");
    assert!(out.status.success(), "offload failed: {}", text(&out));
    assert!(text(&out).contains("migrated rounds="), "{}", text(&out));
    assert_eq!(
        wait_exit(&mut phone, WAIT),
        Some(0),
        "the device's VMM did not end"
    );
    let at_device = last(&h.dir.path("phone.serial"));
    let twins = h.twin_dirs();
    assert_eq!(twins.len(), 1, "{twins:?}");
    assert!(twins[0].ends_with("/work"), "{twins:?}");
    let twin = h.state().join("twins").join(&twins[0]);
    let log = twin.join("serial.log");
    assert!(
        wait_until(|| last(&log) > at_device + 3, WAIT),
        "the twin does not count on from {at_device}: {}\n{}",
        read(&log),
        read(&h.dir.path("serve.stderr"))
    );
    // It counts on from where it was: its memory came along, it did not boot again.
    let first_there = counters(&read(&log))[0];
    assert!(
        first_there + 5 > at_device && first_there <= at_device + 5,
        "the twin started at {first_there}, the device stopped at {at_device}"
    );
    assert!(
        std::fs::read(twin.join("disk0.img")).unwrap()
            == std::fs::read(h.dir.path("phone.img")).unwrap(),
        "the twin's disk is not the device's"
    );
    assert!(twin.join("api.sock").exists(), "the twin has no API socket");
    cloud_common::the_twin_runs_jailed(&read(&h.dir.path("serve.stderr")));

    // The same name from the same device while its twin runs: refused, the guest runs on.
    let _phone2 = h.device_vm("phone2");
    let out = h.offload("phone2", "phone", "work");
    assert!(!out.status.success(), "a second twin \"work\" was taken");
    assert!(
        text(&out).contains("already runs here") && text(&out).contains("runs on here"),
        "{}",
        text(&out)
    );
    let now = last(&h.dir.path("phone2.serial"));
    assert!(
        wait_until(|| last(&h.dir.path("phone2.serial")) > now + 3, WAIT),
        "the refused device's guest stopped counting"
    );

    // Another device: a bad name is refused in words; "work" is a twin of its own.
    let mut tablet = h.device_vm("tablet");
    let out = h.offload("tablet", "tablet", "Work/../x");
    assert!(!out.status.success());
    assert!(text(&out).contains("bad twin name"), "{}", text(&out));
    let out = h.offload("tablet", "tablet", "work");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(wait_exit(&mut tablet, WAIT), Some(0));
    let twins = h.twin_dirs();
    assert_eq!(twins.len(), 2, "{twins:?}");
    let (a, b) = (&twins[0], &twins[1]);
    assert!(
        a.ends_with("/work") && b.ends_with("/work") && a != b,
        "{twins:?}"
    );
    // The phone's twin still counts: the tablet's offload did not touch it.
    let now = last(&log);
    assert!(
        wait_until(|| last(&log) > now + 3, WAIT),
        "the phone's twin stopped"
    );
}

#[test]
fn the_device_keeps_a_copy_of_the_guest_as_it_was_at_the_switch() {
    let Some(h) = host("keep") else {
        return;
    };
    let mut phone = h.device_vm("phone");
    let kept = h.offload_keeping(&mut phone);
    let kept_ms = kept
        .said
        .split("kept_ms=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(kept_ms.is_some(), "no kept_ms in {}", kept.said);
    assert!(
        kept.dir.join("COMPLETE").exists(),
        "the kept copy is not complete"
    );
    let twin_log = kept.twin.join("serial.log");
    assert!(wait_until(|| !counters(&read(&twin_log)).is_empty(), WAIT));
    let twin_first = counters(&read(&twin_log))[0];
    // The kept copy, restored beside the twin (on a copy of the device's disk), starts where
    // the twin started: both are the guest as it was at the switch.
    std::fs::copy(h.dir.path("phone.img"), h.dir.path("restored.img")).unwrap();
    let restored_log = h.dir.path("restored.serial");
    let _restored = Vmm(Command::new(bin())
        .arg("restore")
        .arg(&kept.dir)
        .arg("--serial")
        .arg(format!("file:{}", restored_log.display()))
        .arg("--disk")
        .arg(h.dir.path("restored.img"))
        .stdout(Stdio::null())
        .stderr(File::create(h.dir.path("restored.stderr")).unwrap())
        .spawn()
        .unwrap());
    assert!(
        wait_until(|| counters(&read(&restored_log)).len() >= 3, WAIT),
        "the kept copy does not run: {}",
        read(&h.dir.path("restored.stderr"))
    );
    let restored_first = counters(&read(&restored_log))[0];
    assert!(
        restored_first.abs_diff(twin_first) <= 1,
        "the kept copy starts at {restored_first}, the twin started at {twin_first}"
    );
}

/// The FNV-1a of every frame the probe in screen mode reported in the serial log at `path`.
fn reported_frames(path: &Path) -> Vec<u64> {
    read(path)
        .lines()
        .filter_map(e2e::probe::ProbeLine::parse)
        .filter(|p| p.starts_with(&["screen", "frame"]))
        .filter_map(|p| p.field("fnv").and_then(|h| u64::from_str_radix(h, 16).ok()))
        .collect()
}

/// A twin's screen on the device: a probe offloaded with a display draws on at the host, and
/// `cloud view` shows it to a VNC viewer on the device, a frame the probe drew there, with the
/// viewer's keys reaching the twin's guest. Another device's certificate is refused (`no twin
/// named`, as for a return), and so is a twin offloaded without a display.
#[test]
fn a_twins_screen_is_shown_on_the_device_and_its_keys_reach_the_twin() {
    let Some(h) = host("view") else {
        return;
    };
    let serial = h.dir.path("phone.serial");
    h.offload_probe(
        "pv.mode=screen pv.screen.hash=1 pv.screen.rgb=2060a0",
        &["--gpu=320x240", "--input"],
        "PROBE screen frame n=1",
    );
    let twins = h.twin_dirs();
    let log = h.state().join("twins").join(&twins[0]).join("serial.log");

    let view = |who: &str, name: &str| h.relay_twin("view", who, name, "127.0.0.1:0");
    let (_viewing, stderr) = view("phone", "work");
    let port = || -> Option<u16> {
        let text = read(&stderr);
        let rest = text.split("(VNC)").next()?.rsplit_once("127.0.0.1:")?.1;
        rest.trim().parse().ok()
    };
    assert!(
        wait_until(|| port().is_some(), WAIT),
        "cloud view printed no address: {}\n{}",
        read(&stderr),
        read(&h.dir.path("serve.stderr"))
    );
    let mut viewer = e2e::rfb_client::RfbClient::connect(port().unwrap());
    let frame = viewer.full_frame();
    let drawn = e2e::host::fnv1a64(&frame);
    // Drawn at the host, or (before the twin's first tick) the device's last frame.
    let drawn_by_guest = || [reported_frames(&serial), reported_frames(&log)].concat();
    assert!(
        wait_until(|| drawn_by_guest().contains(&drawn), WAIT),
        "the viewer's frame (fnv {drawn:016x}) is none the guest drew: {:x?}",
        drawn_by_guest()
    );
    // A key from the viewer on the device reaches the guest at the host.
    viewer.key(0x61, true);
    viewer.key(0x61, false);
    assert!(
        wait_for(&log, "PROBE input key", WAIT),
        "the twin's guest saw no key: {}",
        read(&log)
    );

    // The tablet cannot view the phone's twin: to it there is no such twin.
    let (mut tablet, stderr) = view("tablet", "work");
    assert_eq!(wait_exit(&mut tablet, WAIT), Some(1), "{}", read(&stderr));
    assert!(read(&stderr).contains("no twin named"), "{}", read(&stderr));

    // A twin without a display has no screen to show.
    let mut plain = h.device_vm("plain");
    let out = h.offload("plain", "phone", "plain");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(wait_exit(&mut plain, WAIT), Some(0));
    let (mut headless, stderr) = view("phone", "plain");
    assert_eq!(wait_exit(&mut headless, WAIT), Some(1), "{}", read(&stderr));
    assert!(read(&stderr).contains("has no screen"), "{}", read(&stderr));
}

/// A twin's vsock device from the device: `cloud vsock` serves a unix socket that reaches the
/// twin's guest as the twin VMM's own vsock socket would, so `pocketvisor vsock` through it
/// gets the probe's echo back from the host, every byte; another device is refused, and so is
/// a twin without a vsock device.
#[test]
fn a_twins_vsock_device_is_reached_from_the_device_through_the_cloud_host() {
    let Some(h) = host("vsock") else {
        return;
    };
    let vsock = format!("cid=3,socket={}", h.dir.path("phone.vsock").display());
    // From here only the twin's guest can answer: the device's VMM has ended.
    h.offload_probe(
        "pv.tests=vsock pv.vsock.port=1234 pv.vsock.wait=120000",
        &["--vsock", &vsock],
        "PROBE vsock listening",
    );

    let serve = |who: &str, name: &str| {
        let socket = h.dir.path(&format!("{who}-{name}.vsock"));
        let (vmm, stderr) = h.relay_twin("vsock", who, name, socket.to_str().unwrap());
        (vmm, socket, stderr)
    };
    let (_relay, socket, stderr) = serve("phone", "work");
    assert!(
        wait_until(|| read(&stderr).contains("on unix:"), WAIT),
        "cloud vsock does not serve: {}\n{}",
        read(&stderr),
        read(&h.dir.path("serve.stderr"))
    );
    let input: Vec<u8> = b"from the phone to its twin\n"
        .iter()
        .copied()
        .chain((0..20000u32).map(|i| (i % 251) as u8))
        .collect();
    let mut echo = Command::new(bin())
        .args(["vsock", "--vsock-socket"])
        .arg(&socket)
        .args(["--port", "1234"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut echo.stdin.take().unwrap(), &input).unwrap();
    let out = echo.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        out.stdout == input,
        "the twin's echo differs: {} bytes back; {}",
        out.stdout.len(),
        read(&h.dir.path("serve.stderr"))
    );

    // The tablet has no twin "work"; a twin without vsock has no vsock device to reach.
    let (mut tablet, _, stderr) = serve("tablet", "work");
    assert_eq!(wait_exit(&mut tablet, WAIT), Some(1), "{}", read(&stderr));
    assert!(read(&stderr).contains("no twin named"), "{}", read(&stderr));
    let mut plain = h.device_vm("plain");
    let out = h.offload("plain", "phone", "plain");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(wait_exit(&mut plain, WAIT), Some(0));
    let (mut headless, _, stderr) = serve("phone", "plain");
    assert_eq!(wait_exit(&mut headless, WAIT), Some(1), "{}", read(&stderr));
    assert!(
        read(&stderr).contains("has no vsock device"),
        "{}",
        read(&stderr)
    );
}

fn figure(said: &str, key: &str) -> u64 {
    said.split(&format!(" {key}="))
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {said}"))
}

/// Seconds of work in the cloud before the return (the issue's measure is 60).
fn work_secs() -> u64 {
    std::env::var("PV_CLOUD_WORK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
}

/// Lets the twin (its serial log `twin_log`) work in the cloud for [`work_secs`] seconds, and
/// on until it wrote more than 10 blocks after `at_switch` (at load 10 a guest may write far
/// fewer than its 50 a second; at most [`WAIT`] more). Returns its counters.
fn work_in_the_cloud(twin_log: &Path, at_switch: u64) -> Vec<u64> {
    std::thread::sleep(Duration::from_secs(work_secs()));
    let worked = || blk_counters(&read(twin_log));
    assert!(
        wait_until(
            || worked().last().is_some_and(|&n| n > at_switch + 10),
            WAIT
        ),
        "the twin did not work: {:?} after {at_switch}",
        worked()
    );
    worked()
}

#[test]
fn a_return_sends_only_what_changed_and_the_guest_counts_on_with_its_disk() {
    let Some(h) = host("return") else {
        return;
    };
    let mut phone = h.device_vm_mode("phone", "blk-counter", RETURN_DISK_BYTES);
    let Kept {
        dir: kept,
        twin,
        said,
    } = h.offload_keeping(&mut phone);
    let offload_bytes = figure(&said, "bytes");
    let at_switch = *blk_counters(&read(&h.dir.path("phone.serial")))
        .last()
        .unwrap();
    let twin_log = twin.join("serial.log");

    // Work in the cloud: the twin writes its disk every 20 ms.
    let secs = work_secs();
    work_in_the_cloud(&twin_log, at_switch);

    // The phone asks for its profile back, starting from the copy it kept; the twin's VMM
    // (jailed: it reaches nothing but the host's proxy) migrates to it through the host.
    let (mut home, stdout, stderr) = h.return_home(&kept);
    assert!(
        wait_for(&stdout, "returned bytes_received=", WAIT),
        "return: {}\n{}",
        read(&stderr),
        read(&h.dir.path("serve.stderr"))
    );
    // The twin's side of the migration, as the host said it.
    let returned_line = || {
        read(&h.dir.path("serve.stderr"))
            .lines()
            .find(|l| l.contains("returned to"))
            .map(String::from)
    };
    assert!(
        wait_until(|| returned_line().is_some(), WAIT),
        "{}",
        read(&h.dir.path("serve.stderr"))
    );
    let said = returned_line().unwrap();
    let (return_bytes, skipped) = (figure(&said, "bytes"), figure(&said, "base_skipped"));
    // The phone's digests go the other way: the return costs both.
    let digests = figure(&said, "base_received");
    assert!(skipped > 0, "nothing was left out: {said}");
    assert!(
        return_bytes + digests < offload_bytes,
        "the return ({return_bytes} B, and {digests} B of digests back) is not smaller than a \
         full move ({offload_bytes} B)"
    );

    // The counter never goes back: the phone goes on from the twin's last, not the kept copy.
    let home_log = h.dir.path("home.serial");
    assert!(
        wait_until(|| blk_counters(&read(&home_log)).len() >= 3, WAIT),
        "the phone does not run the returned guest: {}",
        read(&stderr)
    );
    let twin_last = *blk_counters(&read(&twin_log)).last().unwrap();
    let _ = writeln_measure(
        secs,
        twin_last - at_switch,
        offload_bytes,
        return_bytes,
        digests,
        skipped,
    );
    let first_home = blk_counters(&read(&home_log))[0];
    assert!(
        first_home > twin_last && first_home <= twin_last + 2 && first_home > at_switch + 10,
        "the phone went on at {first_home}; the twin stopped at {twin_last}, the switch was at \
         {at_switch}"
    );

    // The disk: every write of the guest, at the phone, in the cloud and back, byte for byte.
    let paused = Command::new(bin())
        .args(["pause", "--api-socket"])
        .arg(h.dir.path("home.sock"))
        .output()
        .unwrap();
    assert!(paused.status.success(), "{}", text(&paused));
    let home_last = *blk_counters(&read(&home_log)).last().unwrap();
    assert_disk_after_writes(
        &std::fs::read(h.dir.path("phone.img")).unwrap(),
        &device_image("phone", RETURN_DISK_BYTES),
        home_last,
        "the phone's disk",
    );
    drop(home.0.kill());
}

#[test]
fn a_twin_returns_through_the_cloud_host_onto_the_kept_copy_and_only_to_its_own_device() {
    use std::io::Write;
    let Some(h) = host("serve-return") else {
        return;
    };
    let mut phone = h.device_vm_mode("phone", "blk-counter", RETURN_DISK_BYTES);
    let Kept {
        dir: kept,
        twin,
        said,
    } = h.offload_keeping(&mut phone);
    let offload_bytes = figure(&said, "bytes");
    let at_switch = *blk_counters(&read(&h.dir.path("phone.serial")))
        .last()
        .unwrap();
    let twin_log = twin.join("serial.log");
    let secs = work_secs();
    let worked = work_in_the_cloud(&twin_log, at_switch);
    assert!(
        worked
            .first()
            .is_some_and(|&n| n > at_switch && n <= at_switch + 2),
        "the twin went on at {:?}; the phone stopped at {at_switch}",
        worked.first()
    );

    // Another device asks for the phone's twin: no such twin, and the twin works on.
    let out = h
        .cloud_return("tablet", "work", &[])
        .output()
        .expect("run cloud return");
    assert!(!out.status.success(), "the tablet got the phone's twin");
    assert!(
        text(&out).contains("no twin named \"work\"") && text(&out).contains("nothing runs here"),
        "{}",
        text(&out)
    );
    let blk_last = |p: &Path| blk_counters(&read(p)).last().copied().unwrap_or(0);
    let now = blk_last(&twin_log);
    assert!(
        wait_until(|| blk_last(&twin_log) > now + 3, WAIT),
        "the twin stopped after the tablet's request"
    );

    // A device that is accepted and then sends junk where its hello is due: the twin's
    // migration refuses it, the connection ends, and the twin works on.
    let mut ch = h.channel("phone");
    ch.send(Kind::Request, b"return work").unwrap();
    ch.flush().unwrap();
    assert_eq!(ch.recv().unwrap().kind, Kind::Accept);
    let mut junk = ch.into_stream();
    junk.write_all(&[0x55; 4096]).unwrap();
    junk.flush().unwrap();
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut junk, &mut rest);
    drop(junk);
    assert!(
        wait_until(
            || read(&h.dir.path("serve.stderr")).contains("bad magic"),
            WAIT
        ),
        "the host did not say the twin refused the junk: {}",
        read(&h.dir.path("serve.stderr"))
    );
    let now = blk_last(&twin_log);
    assert!(
        wait_until(|| blk_last(&twin_log) > now + 3, WAIT),
        "the twin stopped after a device sent junk: {}",
        read(&h.dir.path("serve.stderr"))
    );

    // The phone asks for it back and dies (kill -9) while the twin's pages arrive: nothing
    // runs at the phone, its disk is as it was, and the twin works on at the host.
    let kept_disk = std::fs::read(h.dir.path("phone.img")).unwrap();
    let out = h
        .return_onto(&kept, &[])
        .env("POCKETVISOR_KILL_AT", "receive-round")
        .output()
        .unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(9),
        "the device was not killed mid-return: {}",
        text(&out)
    );
    assert!(
        std::fs::read(h.dir.path("phone.img")).unwrap() == kept_disk,
        "a return killed half-way changed the phone's disk"
    );
    let now = blk_last(&twin_log);
    assert!(
        wait_until(|| blk_last(&twin_log) > now + 3, WAIT),
        "the twin stopped after the device died mid-return: {}",
        read(&h.dir.path("serve.stderr"))
    );

    // The phone asks for it back, onto the copy it kept.
    let (mut home, stdout, stderr) = h.return_home(&kept);
    assert!(
        wait_until(|| read(&stdout).contains("returned bytes_received="), WAIT),
        "the return did not arrive: {}{}\n{}",
        read(&stdout),
        read(&stderr),
        read(&h.dir.path("serve.stderr"))
    );
    let said = format!(" {}", read(&stdout));
    let (received, sent) = (figure(&said, "bytes_received"), figure(&said, "bytes_sent"));
    assert!(
        received + sent < offload_bytes,
        "the return ({received} B in, {sent} B out) is not smaller than a full move \
         ({offload_bytes} B)"
    );

    // The twin has stopped there and is recorded as returned: a second return is refused.
    assert!(
        wait_until(
            || read(&h.dir.path("serve.stderr")).contains("returned to"),
            WAIT
        ),
        "{}",
        read(&h.dir.path("serve.stderr"))
    );
    let twin_last = *blk_counters(&read(&twin_log)).last().unwrap();
    let percent = 100.0 * (1.0 - (received + sent) as f64 / offload_bytes as f64);
    // Straight to stderr: the test harness would swallow eprintln's line.
    let _ = writeln!(
        std::io::stderr().lock(),
        "MEASURE cloud-serve-return work_s={secs} blocks_written_in_cloud={} \
         full_move_bytes={offload_bytes} return_bytes_received={received} \
         return_bytes_sent={sent} saving_percent={percent:.1}",
        twin_last - at_switch
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        *blk_counters(&read(&twin_log)).last().unwrap(),
        twin_last,
        "the twin still counts"
    );
    let out = h.cloud_return("phone", "work", &[]).output().unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("it was returned"), "{}", text(&out));

    // The counter never goes back: the phone goes on from the twin's last.
    let home_log = h.dir.path("home.serial");
    assert!(
        wait_until(|| blk_counters(&read(&home_log)).len() >= 3, WAIT),
        "the phone does not run the returned guest: {}",
        read(&stderr)
    );
    let at_home = blk_counters(&read(&home_log));
    assert!(
        at_home[0] > twin_last && at_home[0] <= twin_last + 2,
        "the phone went on at {}; the twin stopped at {twin_last}",
        at_home[0]
    );
    assert!(
        at_home.windows(2).all(|w| w[1] == w[0] + 1),
        "the counter skipped or went back: {at_home:?}"
    );

    // The disk: every write of the guest, at the phone, in the cloud and back, and nothing
    // else, byte for byte; the twin's disk is every write up to its last.
    let paused = Command::new(bin())
        .args(["pause", "--api-socket"])
        .arg(h.dir.path("home.sock"))
        .output()
        .unwrap();
    assert!(paused.status.success(), "{}", text(&paused));
    let home_last = *blk_counters(&read(&home_log)).last().unwrap();
    let initial = device_image("phone", RETURN_DISK_BYTES);
    assert_disk_after_writes(
        &std::fs::read(h.dir.path("phone.img")).unwrap(),
        &initial,
        home_last,
        "the phone's disk",
    );
    assert_disk_after_writes(
        &std::fs::read(twin.join("disk0.img")).unwrap(),
        &initial,
        twin_last,
        "the twin's disk",
    );
    drop(home.0.kill());
}

/// The cloud host killed (kill -9) while a twin runs: the twin runs on (it is in a process
/// group of its own, its pid in its lock), and the host started again on the same state gives
/// it back to its device, whose guest counts on from the twin's count.
#[test]
fn a_twin_outlives_its_host_killed_and_the_host_started_again_gives_it_back() {
    if let Some(mut h) = host("restart") {
        a_twin_outlives_its_host_killed_and_the_host_started_again_gives_it_back_on(&mut h);
        assert!(h.state().join("twins.db").is_file());
    }
}

/// The same with the twin registry in PostgreSQL (`cloud serve --store-file`), as a fleet of
/// hosts keeps it: the host started again finds the twin there.
#[test]
fn a_twin_outlives_its_host_killed_with_the_registry_in_postgresql() {
    if let Some(mut h) = host_on_postgres("restart_pg") {
        a_twin_outlives_its_host_killed_and_the_host_started_again_gives_it_back_on(&mut h);
        assert!(
            !h.state().join("twins.db").exists(),
            "the host kept its registry in SQLite"
        );
    }
}

/// A registry that is not a PostgreSQL URL, or a missing file, is `serve`'s error before it
/// listens (SQLite, the default, takes no --store-file).
#[test]
fn serve_refuses_a_store_file_without_a_postgresql_url() {
    let dir = Scratch::new(SCRATCH, "store-file");
    let ca = authority();
    issue(&dir.0, "cloud", "127.0.0.1", &ca);
    std::fs::write(dir.path("k"), "5a".repeat(32)).unwrap();
    std::fs::write(dir.path("url"), "sqlite:///tmp/x.db\n").unwrap();
    for (file, said) in [
        ("url", "holds no postgresql:// URL"),
        ("none", "--store-file"),
    ] {
        let out = Command::new(bin())
            .args(["cloud", "serve", "--listen", "127.0.0.1:0", "--state"])
            .arg(dir.path("state"))
            .arg("--key")
            .arg(dir.path("k"))
            .args(tls_args(&dir.0, "cloud"))
            .arg("--store-file")
            .arg(dir.path(file))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{}", text(&out));
        assert!(text(&out).contains(said), "{}", text(&out));
        assert!(!text(&out).contains("listening"), "{}", text(&out));
    }
}

fn a_twin_outlives_its_host_killed_and_the_host_started_again_gives_it_back_on(h: &mut Host) {
    let mut phone = h.device_vm("phone");
    let Kept {
        dir: kept, twin, ..
    } = h.offload_keeping(&mut phone);
    let log = twin.join("serial.log");
    assert!(wait_until(|| last(&log) > 3, WAIT), "{}", read(&log));
    let pid = read(&twin.join("twin.lock"));
    assert!(
        pid.trim().parse::<u32>().is_ok(),
        "no pid in twin.lock: {pid:?}"
    );

    h.restart();
    let now = last(&log);
    assert!(
        wait_until(|| last(&log) > now + 5, WAIT),
        "the twin stopped with its host: {}",
        read(&h.dir.path("serve.stderr"))
    );

    let stdout = h.dir.path("home.stdout");
    let home_log = h.dir.path("home.serial");
    let _home = Vmm(h
        .return_onto(
            &kept,
            &["--serial", &format!("file:{}", home_log.display())],
        )
        .stdout(File::create(&stdout).unwrap())
        .stderr(File::create(h.dir.path("home.stderr")).unwrap())
        .spawn()
        .unwrap());
    assert!(
        wait_until(|| read(&stdout).contains("returned bytes_received="), WAIT),
        "the new host did not give the twin back: {}\n{}",
        read(&h.dir.path("home.stderr")),
        read(&h.dir.path("serve.stderr"))
    );
    assert!(
        wait_until(|| !counters(&read(&home_log)).is_empty(), WAIT),
        "the returned guest does not count: {}",
        read(&h.dir.path("home.stderr"))
    );
    let twin_last = last(&log);
    let first_home = counters(&read(&home_log))[0];
    assert!(
        first_home + 5 >= twin_last,
        "the guest went back: the twin reached {twin_last}, the device starts at {first_home}"
    );
}

#[test]
fn a_twin_killed_mid_return_changes_nothing_at_the_device_and_the_next_offload_takes_its_place() {
    // The twins' VMMs die (kill -9) after the first round of any migration out of them.
    let Some(h) = host_with_env("twin-killed", &[("POCKETVISOR_KILL_AT", "migrate-round")]) else {
        return;
    };
    let mut phone = h.device_vm("phone");
    let Kept {
        dir: kept, twin, ..
    } = h.offload_keeping(&mut phone);
    let log = twin.join("serial.log");
    assert!(
        wait_until(|| last(&log) > 3, WAIT),
        "the twin does not count"
    );

    let kept_disk = std::fs::read(h.dir.path("phone.img")).unwrap();
    let phone_img = h.dir.path("phone.img");
    let home = || {
        let args = [
            "--base",
            kept.to_str().unwrap(),
            "--disk",
            phone_img.to_str().unwrap(),
        ];
        let out = h.cloud_return("phone", "work", &args).output().unwrap();
        assert!(!out.status.success(), "a return from a dead twin ran");
        text(&out)
    };
    let said = home();
    assert!(said.contains("nothing runs here"), "{said}");
    assert!(
        std::fs::read(h.dir.path("phone.img")).unwrap() == kept_disk,
        "the failed return changed the phone's disk"
    );
    // The twin is gone; asking again says so in words.
    let stopped = last(&log);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(last(&log), stopped, "the twin still counts");
    let said = home();
    assert!(said.contains("stopped without returning"), "{said}");

    // The device offloads again under the same name: the dead twin's place is taken.
    let mut phone2 = h.device_vm("phone2");
    let out = h.offload("phone2", "phone", "work");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(wait_exit(&mut phone2, WAIT), Some(0));
    let at_device = last(&h.dir.path("phone2.serial"));
    assert!(
        wait_until(|| last(&log) > at_device + 3, WAIT),
        "the new twin does not count on from {at_device}: {}",
        read(&h.dir.path("serve.stderr"))
    );
    assert!(
        read(&h.dir.path("serve.stderr")).contains("left running by a process that is gone"),
        "{}",
        read(&h.dir.path("serve.stderr"))
    );
    assert_eq!(h.twin_dirs().len(), 1, "{:?}", h.twin_dirs());
}

#[test]
fn the_host_killed_while_it_relays_a_return_leaves_the_twin_running_and_the_device_as_it_was() {
    // The host's relaying process dies (kill -9) once 64 KiB of the twin's migration went to
    // the device (the guest writes its disk in the cloud, so the return is larger than that).
    let Some(h) = host_with_env("relay-killed", &[("POCKETVISOR_KILL_AT", "relay-rounds")]) else {
        return;
    };
    let mut phone = h.device_vm_mode("phone", "blk-counter", RETURN_DISK_BYTES);
    let Kept {
        dir: kept, twin, ..
    } = h.offload_keeping(&mut phone);
    let at_switch = *blk_counters(&read(&h.dir.path("phone.serial")))
        .last()
        .unwrap();
    let log = twin.join("serial.log");
    let blk_last = |p: &Path| blk_counters(&read(p)).last().copied().unwrap_or(0);
    assert!(
        wait_until(|| blk_last(&log) > at_switch + 20, WAIT),
        "the twin does not write its disk"
    );
    let kept_disk = std::fs::read(h.dir.path("phone.img")).unwrap();
    let stderr = h.dir.path("home.stderr");
    let mut home = Vmm(h
        .return_onto(&kept, &[])
        .stdout(Stdio::null())
        .stderr(File::create(&stderr).unwrap())
        .spawn()
        .unwrap());
    assert_eq!(
        wait_exit(&mut home, WAIT),
        Some(1),
        "the return did not fail: {}",
        read(&stderr)
    );
    assert!(
        read(&stderr).contains("nothing runs here"),
        "{}",
        read(&stderr)
    );
    assert!(
        read(&h.dir.path("serve.stderr")).contains("signal: 9"),
        "the relay was not killed: {}",
        read(&h.dir.path("serve.stderr"))
    );
    assert!(
        std::fs::read(h.dir.path("phone.img")).unwrap() == kept_disk,
        "the failed return changed the phone's disk"
    );
    // The guest is in exactly one place: the twin, writing on.
    let now = blk_last(&log);
    assert!(
        wait_until(|| blk_last(&log) > now + 3, WAIT),
        "the twin stopped when its relay died: {}",
        read(&h.dir.path("serve.stderr"))
    );
}

/// The issue's measure: a return against a full move of the same guest (the offload).
fn writeln_measure(
    secs: u64,
    blocks: u64,
    full: u64,
    ret: u64,
    digests: u64,
    skipped: u64,
) -> std::io::Result<()> {
    use std::io::Write;
    // Both ways count: the return's bytes and the digests the device sent for it.
    let percent = 100.0 * (1.0 - (ret + digests) as f64 / full as f64);
    writeln!(
        std::io::stderr().lock(),
        "MEASURE cloud-return work_s={secs} blocks_written_in_cloud={blocks} \
         full_move_bytes={full} return_bytes={ret} \
         digest_bytes_back={digests} base_skipped_bytes={skipped} saving_percent={percent:.1}"
    )
}

/// Sends `frames` on a fresh channel as `phone` and returns the host's answer (its reason).
fn answer_to(h: &Host, frames: &[(Kind, &[u8])]) -> String {
    let mut ch = h.channel("phone");
    for (kind, payload) in frames {
        ch.send(*kind, payload).unwrap();
    }
    ch.flush().unwrap();
    let f = ch.recv().expect("the host answers before it closes");
    assert_eq!(f.kind, Kind::Abort, "the host did not refuse");
    String::from_utf8_lossy(&f.payload).into_owned()
}

#[test]
fn a_request_the_host_does_not_serve_or_a_frame_out_of_place_is_refused_in_words() {
    let Some(h) = host("requests") else {
        return;
    };
    let why = answer_to(&h, &[(Kind::Request, b"frobnicate work")]);
    assert!(why.contains("unknown request"), "{why}");
    let why = answer_to(&h, &[(Kind::Request, "offload ".repeat(40).as_bytes())]);
    assert!(why.contains("a request of 320 bytes"), "{why}");
    let why = answer_to(&h, &[(Kind::Request, b"offload w\x07rk")]);
    assert!(why.contains("control characters"), "{why}");
    // A setup where the request is due.
    let why = answer_to(&h, &[(Kind::Setup, b"{}")]);
    assert!(
        why.contains("Setup frame arrived where Request was due"),
        "{why}"
    );
    // A request naming nothing the host would make: refused before any setup is read.
    let why = answer_to(&h, &[(Kind::Request, b"offload ../../etc")]);
    assert!(why.contains("bad twin name"), "{why}");
    assert_eq!(
        h.twin_dirs(),
        Vec::<String>::new(),
        "a refused request left a twin"
    );
}

/// Whether a process runs a jail under the host's state directory (a twin's VMM, or its
/// jailed VM: both name `--jail-root <state>/jail` on their command line).
fn a_twin_vmm_runs(h: &Host) -> bool {
    let jail_root = h.state().join("jail");
    let needle = jail_root.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").unwrap().any(|e| {
        let Ok(e) = e else { return false };
        std::fs::read(e.path().join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
    })
}

#[test]
fn a_twin_whose_jailed_vmm_dies_mid_offload_is_not_kept_and_the_guest_runs_on_at_the_device() {
    // The twins' VMMs die (kill -9) once they acknowledged a round of pages.
    let Some(h) = host_with_env("vmm-killed", &[("POCKETVISOR_KILL_AT", "receive-round")]) else {
        return;
    };
    let _phone = h.device_vm("phone");
    let out = h.offload("phone", "phone", "work");
    assert!(!out.status.success(), "the offload went through");
    // The host says its side (the jailed VMM) is what failed.
    assert!(
        text(&out).contains("the destination") && text(&out).contains("runs on here"),
        "{}",
        text(&out)
    );
    let serial = h.dir.path("phone.serial");
    let now = last(&serial);
    assert!(
        wait_until(|| last(&serial) > now + 3, WAIT),
        "the device's guest stopped"
    );
    assert!(
        wait_until(|| !a_twin_vmm_runs(&h), WAIT),
        "a twin VMM runs on"
    );
    assert!(h.twin_dirs().is_empty(), "{:?}", h.twin_dirs());
}

#[test]
fn a_twins_connection_process_killed_takes_its_jailed_vm_with_it() {
    let Some(h) = host("twin-process-killed") else {
        return;
    };
    let mut phone = h.device_vm("phone");
    let out = h.offload("phone", "phone", "work");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(wait_exit(&mut phone, WAIT), Some(0));
    let twin = h.state().join("twins").join(&h.twin_dirs()[0]);
    let log = twin.join("serial.log");
    assert!(wait_until(|| last(&log) > 3, WAIT), "{}", read(&log));
    assert!(a_twin_vmm_runs(&h));
    // kill -9 of the process that holds the twin (its pid is in its lock): its VMM and the
    // jailed VM die with it, nothing runs on unwatched.
    let pid: i32 = read(&twin.join("twin.lock")).trim().parse().unwrap();
    // SAFETY: kill(2) with integer arguments, to the twin's process this test's host started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    assert!(
        wait_until(|| !a_twin_vmm_runs(&h), WAIT),
        "the twin's VM outlived its connection's process"
    );
    let out = h.cloud_return("phone", "work", &[]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("stopped without returning"),
        "{}",
        text(&out)
    );
}

/// The answer of the network device `net0` of the VMM on `api` to `{"op":"filter"}`.
fn net_filter(api: &Path) -> serde_json::Value {
    use std::io::{BufRead, Write};
    // A twin's directory is too long a path for a unix socket's address: reach it through a
    // descriptor of the directory.
    let dir = File::open(api.parent().unwrap()).unwrap();
    let short = format!(
        "/proc/self/fd/{}/{}",
        std::os::fd::AsRawFd::as_raw_fd(&dir),
        api.file_name().unwrap().to_str().unwrap()
    );
    let mut s = std::os::unix::net::UnixStream::connect(short).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let line = serde_json::json!({"op": "device", "id": "net0", "request": {"op": "filter"}});
    writeln!(s, "{line}").unwrap();
    let mut answer = String::new();
    std::io::BufReader::new(s).read_line(&mut answer).unwrap();
    let answer: serde_json::Value =
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("bad answer {answer:?}: {e}"));
    assert_eq!(answer["ok"], true, "{answer}");
    serde_json::from_str(answer["info"].as_str().unwrap()).unwrap()
}

/// A network namespace of a test's own, its loopback up, deleted when dropped (with every
/// link in it).
struct Netns(String);

impl Netns {
    /// `pv-<tag>-<pid>`, or None (skipped, said) where `ip netns` cannot make one (not root,
    /// no `ip`).
    fn new(tag: &str) -> Option<Netns> {
        let name = format!("pv-{tag}-{}", std::process::id());
        let made = Command::new("ip")
            .args(["netns", "add", &name])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !made {
            eprintln!("SKIP: cannot make a network namespace (needs root and ip)");
            return None;
        }
        let ns = Netns(name);
        ns.ip(&["link", "set", "lo", "up"]);
        Some(ns)
    }

    /// `ip -n NS ARGS`, which must succeed.
    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .expect("run ip");
        assert!(out.status.success(), "ip {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The names of the interfaces attached to the bridge `bridge`.
    fn ports_of(&self, bridge: &str) -> Vec<String> {
        self.ip(&["-o", "link", "show", "master", bridge])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    /// Whether the interface `name` exists.
    fn has(&self, name: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.0, "link", "show", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

/// The twin's VM (the one the host started last) runs jailed (`the_twin_runs_jailed`) in a
/// network namespace of its own, not the host's `ns`, where no interface but `lo` is (the
/// host's TAP not among them), and holds the host's TAP `tap` open: the TAP is on the host's
/// bridge while the VM sees nothing of the host's network.
fn the_twin_is_jailed_on_the_hosts_tap(serve_stderr: &str, ns: &Netns, tap: &str) {
    use std::os::unix::fs::MetadataExt;
    // Its directory holds its serial log (the phone with a NIC has no disk).
    let pid = cloud_common::the_twin_runs_jailed_with(serve_stderr, &["serial.log"]);
    let inode = |p: &str| std::fs::metadata(p).unwrap().ino();
    assert_ne!(
        inode(&format!("/proc/{pid}/ns/net")),
        inode(&format!("/run/netns/{}", ns.0)),
        "the twin's VM is in the host's network namespace"
    );
    let dev = read(Path::new(&format!("/proc/{pid}/net/dev")));
    let links: Vec<&str> = dev
        .lines()
        .filter_map(|l| Some(l.split_once(':')?.0.trim()))
        .collect();
    assert_eq!(links, ["lo"], "the twin's VM sees interfaces: {dev}");
    // The tun driver names the TAP a descriptor is attached to in its fdinfo (`iff:`).
    let holds = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
        .any(|info| {
            info.lines()
                .any(|l| l.strip_prefix("iff:").map(str::trim) == Some(tap))
        });
    assert!(holds, "the twin's VM does not hold the TAP {tap}");
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

impl Host {
    /// The counting probe as the phone in the host's namespace, with a network device on the
    /// TAP `tap` (which its VMM creates) with the MAC `mac` and a network policy (deny but
    /// 10.0.0.1, as a signed IT policy would give); waits until it counts.
    fn phone_with_nic(&self, tap: &str, mac: &str) -> Vmm {
        let probe = common::probe(true).expect("the probe was there a moment ago");
        let serial = self.dir.path("phone.serial");
        let net = self.dir.path("net.toml");
        std::fs::write(
            &net,
            format!(
                "[[net]]\ntap = \"{tap}\"\nmac = \"{mac}\"\n[net.filter]\ndefault = \"deny\"\n\
                 rules = [{{ action = \"allow\", cidr = \"10.0.0.1/32\" }}]\n"
            ),
        )
        .unwrap();
        let phone = Vmm(self
            .command()
            .args(["run", "--config", net.to_str().unwrap()])
            .args(["--kernel", probe.to_str().unwrap()])
            .args(["--cmdline", "pv.mode=counter pv.counter.ms=20"])
            .args(["--memory", "64M"])
            .arg("--serial")
            .arg(format!("file:{}", serial.display()))
            .arg("--api-socket")
            .arg(self.dir.path("phone.sock"))
            .stdout(Stdio::null())
            .stderr(File::create(self.dir.path("phone.stderr")).unwrap())
            .spawn()
            .expect("start the device's VM"));
        assert!(
            wait_for(&serial, "PROBE counter 3\n", WAIT),
            "the device's guest does not count: {}\n{}",
            read(&self.dir.path("phone.stderr")),
            read(&serial)
        );
        phone
    }
}

#[test]
fn a_clone_with_a_network_device_gets_a_tap_on_the_hosts_bridge_and_a_mac_of_its_own() {
    if common::probe(true).is_none() {
        return;
    }
    let Some(ns) = Netns::new("twinnet") else {
        return;
    };
    const BRIDGE: &str = "pvtwinbr";
    const ORIGINAL_MAC: &str = "02:00:00:00:00:01";
    // A host whose bridge is missing says so at once.
    let place = |flags: &[&str]| Place {
        netns: Some(ns.0.clone()),
        flags: flags.iter().map(|f| f.to_string()).collect(),
    };
    let dir = Scratch::new(SCRATCH, "twinnet-nobridge");
    std::fs::write(dir.path("cloud.mkey"), "5a".repeat(32) + "\n").unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0, bin(), "cloud", "serve", "--listen"])
        .args(["127.0.0.1:0", "--state"])
        .arg(dir.path("state"))
        .args(["--twin-bridge", BRIDGE, "--key"])
        .arg(dir.path("cloud.mkey"))
        .args(tls_args(&dir.0, "cloud"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "served without its bridge");
    assert!(
        text(&out).contains(&format!("the twin bridge {BRIDGE:?} does not exist")),
        "{}",
        text(&out)
    );
    ns.ip(&["link", "add", BRIDGE, "type", "bridge"]);
    ns.ip(&["link", "set", BRIDGE, "up"]);

    let h = host_at("twinnet", &[], None, place(&["--twin-bridge", BRIDGE])).unwrap();
    let mut phone = h.phone_with_nic("pvphone0", ORIGINAL_MAC);
    let out = h.offload_with("phone", "phone", "work", &["--clone"]);
    assert!(out.status.success(), "clone failed: {}", text(&out));
    let twins = h.twin_dirs();
    assert_eq!(twins.len(), 1, "{twins:?}");
    let twin_log = h.state().join("twins").join(&twins[0]).join("serial.log");

    // The clone's TAP, of the host's naming, is on the bridge; the phone's is not.
    let serve_said = || read(&h.dir.path("serve.stderr"));
    assert!(
        wait_until(|| !ns.ports_of(BRIDGE).is_empty(), WAIT),
        "no TAP joined the bridge: {}",
        serve_said()
    );
    let ports = ns.ports_of(BRIDGE);
    assert_eq!(ports.len(), 1, "{ports:?}");
    let tap = &ports[0];
    assert!(
        tap.starts_with("pvt") && tap.len() == 15,
        "the twin's TAP {tap:?} is not of the host's naming"
    );
    assert!(
        serve_said().contains(&format!("TAP {tap} is on the bridge {BRIDGE}")),
        "{}",
        serve_said()
    );
    let link = ns.ip(&["-d", "link", "show", tap]);
    assert!(
        link.contains("tun type tap") && link.contains(",UP"),
        "the twin's TAP is not a TAP, or is down: {link}"
    );
    the_twin_is_jailed_on_the_hosts_tap(&serve_said(), &ns, tap);

    // The clone's guest counts on and saw a MAC of its own, which the host said.
    assert!(
        wait_until(
            || counters(&read(&twin_log)).len() > 10 && read(&twin_log).contains("PROBE twin mac="),
            WAIT
        ),
        "the clone does not count on, or saw no new MAC: {}\n{}",
        read(&twin_log),
        serve_said()
    );
    let log = read(&twin_log);
    let seen: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("PROBE twin mac="))
        .collect();
    assert_eq!(seen.len(), 1, "{log}");
    let mac = seen[0];
    assert_ne!(mac, ORIGINAL_MAC, "the clone kept the original's MAC");
    let first = u8::from_str_radix(&mac[..2], 16).unwrap();
    assert_eq!(
        first & 3,
        2,
        "{mac} is not a locally administered unicast MAC"
    );
    assert!(
        serve_said().contains(&format!(
            "has the MAC {mac} (the original's is {ORIGINAL_MAC})"
        )),
        "{}",
        serve_said()
    );
    // The device's network policy is in force at the clone (it travels in the configuration).
    let filter = net_filter(&twin_log.with_file_name("api.sock"));
    assert_eq!(filter["installed"], true, "{filter}");
    // The original runs on with its own.
    let phone_serial = h.dir.path("phone.serial");
    let at = last(&phone_serial);
    assert!(
        wait_until(|| last(&phone_serial) > at + 5, WAIT),
        "the original stopped"
    );
    assert!(!read(&phone_serial).contains("PROBE twin"));

    // The TAP goes with the twin.
    common::kill_twins(&h.state());
    assert!(
        wait_until(|| !ns.has(tap), WAIT),
        "the twin's TAP {tap} outlived it"
    );

    // A host without --twin-bridge refuses the NIC in words, and the guest runs on.
    let plain = host_at("twinnet-plain", &[], None, place(&[])).unwrap();
    let out = plain
        .command()
        .args(["migrate", "--api-socket"])
        .arg(h.dir.path("phone.sock"))
        .args(["--clone", "--to", &plain.addr, "--twin", "work", "--key"])
        .arg(&plain.key)
        .args(tls_args(&plain.dir.0, "phone"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "a host without a bridge took a NIC");
    assert!(text(&out).contains("--twin-bridge"), "{}", text(&out));
    assert!(plain.twin_dirs().is_empty(), "{:?}", plain.twin_dirs());
    let at = last(&phone_serial);
    assert!(
        wait_until(|| last(&phone_serial) > at + 5, WAIT),
        "the guest stopped after the refusal"
    );
    assert_eq!(phone.0.try_wait().unwrap(), None);
}

#[test]
fn an_offloaded_twin_keeps_its_mac_on_the_hosts_bridge_and_comes_back_on_the_devices_tap() {
    if common::probe(true).is_none() {
        return;
    }
    let Some(ns) = Netns::new("twinback") else {
        return;
    };
    const BRIDGE: &str = "pvtwinbr";
    ns.ip(&["link", "add", BRIDGE, "type", "bridge"]);
    ns.ip(&["link", "set", BRIDGE, "up"]);
    let at = Place {
        netns: Some(ns.0.clone()),
        flags: vec!["--twin-bridge".into(), BRIDGE.into()],
    };
    let h = host_at("twinback", &[], None, at).unwrap();
    let mut phone = h.phone_with_nic("pvphone0", "02:00:00:00:00:02");
    let kept = h.dir.path("kept");
    let out = h.offload_with(
        "phone",
        "phone",
        "work",
        &["--keep", kept.to_str().unwrap()],
    );
    assert!(out.status.success(), "offload failed: {}", text(&out));
    assert_eq!(wait_exit(&mut phone, WAIT), Some(0));
    let twins = h.twin_dirs();
    let twin_log = h.state().join("twins").join(&twins[0]).join("serial.log");
    assert!(
        wait_until(|| ns.ports_of(BRIDGE).len() == 1, WAIT),
        "{}",
        read(&h.dir.path("serve.stderr"))
    );
    let tap = ns.ports_of(BRIDGE).remove(0);
    the_twin_is_jailed_on_the_hosts_tap(&read(&h.dir.path("serve.stderr")), &ns, &tap);
    // The phone's TAP went with its VMM; the twin is the same guest, with the same MAC.
    assert!(wait_until(|| !ns.has("pvphone0"), WAIT));
    assert!(
        wait_until(|| counters(&read(&twin_log)).len() > 5, WAIT),
        "the twin does not count on: {}",
        read(&twin_log)
    );
    assert!(
        !read(&twin_log).contains("PROBE twin"),
        "{}",
        read(&twin_log)
    );

    // Back at the device, on a TAP of the device's; the twin's goes with the twin.
    let home_log = h.dir.path("home.serial");
    let _home = Vmm(h
        .command()
        .args(["cloud", "return", "work", "--from", &h.addr, "--key"])
        .arg(&h.key)
        .args(tls_args(&h.dir.0, "phone"))
        .arg("--base")
        .arg(&kept)
        .args(["--tap", "pvphone1", "--serial"])
        .arg(format!("file:{}", home_log.display()))
        .arg("--api-socket")
        .arg(h.dir.path("home.sock"))
        .stdout(Stdio::null())
        .stderr(File::create(h.dir.path("home.stderr")).unwrap())
        .spawn()
        .unwrap());
    assert!(
        wait_until(|| counters(&read(&home_log)).len() >= 3, WAIT),
        "the phone does not run the returned guest: {}",
        read(&h.dir.path("home.stderr"))
    );
    assert!(
        ns.has("pvphone1"),
        "the returned guest is not on the device's TAP"
    );
    assert!(
        wait_until(|| !ns.has(&tap), WAIT),
        "the twin's TAP {tap} outlived its return"
    );
    assert_eq!(net_filter(&h.dir.path("home.sock"))["installed"], true);
    assert!(
        !read(&home_log).contains("PROBE twin"),
        "{}",
        read(&home_log)
    );
}
