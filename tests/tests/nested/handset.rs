//! The handset with Linux profiles, in L1: the daemon (`pocketvisor handset`, its VMMs jailed
//! as a user runs them) drives two Debian Linux guests made from the `work` and `personal`
//! templates; the checks talk to it through the `pocketvisor profile` commands a user types
//! and to the guests' agents (`guest/agent`) through the profiles' vsock sockets.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use e2e::linux::unexpected_kernel_warnings;
use e2e::TempDir;
use serde_json::Value;

use super::{agent_call, base64, check, linux_dir, LINUX_TIMEOUT};

/// The guests' command line: the agent, and an uptime line every 2 s while it serves.
const LINUX_AGENT_CMDLINE: &str = "console=ttyS0 quiet pv.agent=1 pv.heartbeat=2";

/// A `pocketvisor handset` daemon on its own state directory, with the Linux guest's kernel
/// and initramfs copied into its asset directory. Dropping it stops its profiles and ends it.
struct Handset {
    dir: TempDir,
    daemon: Option<Child>,
}

impl Handset {
    /// Starts a daemon on a new state directory and waits until it answers.
    fn start() -> Handset {
        let dir = TempDir::new();
        let assets = dir.join("state/assets");
        std::fs::create_dir_all(&assets).expect("create the asset directory");
        for asset in ["vmlinux", "initramfs.cpio.gz"] {
            let from = linux_dir().join(asset);
            std::fs::copy(&from, assets.join(asset)).unwrap_or_else(|e| {
                panic!("copy {}: {e} (run guest/build-linux.sh)", from.display())
            });
        }
        let mut handset = Handset { dir, daemon: None };
        handset.spawn_daemon();
        handset
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn spawn_daemon(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .expect("open the daemon log");
        let child = Command::new(e2e::pocketvisor_bin())
            .arg("handset")
            .arg("--state-dir")
            .arg(self.state_dir())
            .env("POCKETVISOR_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start pocketvisor handset");
        self.daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.cli(&["status"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "the daemon did not answer within 60 s\n{}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// `pocketvisor profile --state-dir DIR ARGS...`.
    fn cli(&self, args: &[&str]) -> Output {
        Command::new(e2e::pocketvisor_bin())
            .arg("profile")
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(args)
            .output()
            .expect("run pocketvisor profile")
    }

    /// Runs a `profile` command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "pocketvisor profile {args:?} failed ({}): {}{}\n--- daemon log ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.daemon_log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `profile show NAME --json`.
    fn show(&self, name: &str) -> Value {
        let text = self.ok(&["show", name, "--json"]);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("profile show: {e}: {text}"))
    }

    /// Creates profile `name` from `template` with the Linux guest running its agent.
    fn create_linux(&self, name: &str, template: &str) {
        self.ok(&[
            "create",
            name,
            "--template",
            template,
            "--kernel",
            "vmlinux",
            "--initrd",
            "initramfs.cpio.gz",
            "--cmdline",
            LINUX_AGENT_CMDLINE,
        ]);
    }

    fn vsock(&self, name: &str) -> PathBuf {
        self.state_dir()
            .join(format!("profiles/{name}/run/vsock.sock"))
    }

    fn serial(&self, name: &str) -> String {
        let path = self
            .state_dir()
            .join(format!("profiles/{name}/run/serial.log"));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// One request to profile `name`'s agent; the answer as JSON.
    fn agent(&self, name: &str, request: &str) -> Value {
        let answer = agent_call(&self.vsock(name), request)
            .unwrap_or_else(|e| panic!("{name}'s agent: {e}\n{}", self.serial(name)));
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{name}'s agent: {e}: {answer}"))
    }

    /// Waits until profile `name`'s agent answers `health` (it starts a moment after boot).
    fn wait_for_agent(&self, name: &str) {
        let deadline = Instant::now() + LINUX_TIMEOUT;
        loop {
            match agent_call(&self.vsock(name), r#"{"op":"health"}"#) {
                Ok(answer) if answer.contains(r#""agent":"linux""#) => return,
                Ok(answer) => panic!("{name}'s agent answered {answer}"),
                Err(e) if Instant::now() > deadline => panic!(
                    "{name}'s Linux agent did not answer within {LINUX_TIMEOUT:?}: {e}\n{}",
                    self.serial(name)
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    /// The uptime of profile `name`'s newest heartbeat line after the first `skip` of them,
    /// waiting up to `timeout` for one.
    fn heartbeat_after(&self, name: &str, skip: usize, timeout: Duration) -> (usize, f64) {
        let deadline = Instant::now() + timeout;
        loop {
            let serial = self.serial(name);
            let beats = heartbeats(&serial);
            // More lines than before; or fewer, if the log was started anew.
            if beats.len() > skip || (beats.len() < skip && !beats.is_empty()) {
                return (beats.len(), *beats.last().expect("a heartbeat"));
            }
            assert!(
                Instant::now() < deadline,
                "no new heartbeat from {name} within {timeout:?}\n{serial}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Asks profile `name`'s guest to power off (a `pv-poweroff` file in its agent's inbox)
    /// and waits until its VMM has exited; asserts the guest's kernel log is clean.
    fn power_off(&self, name: &str) {
        let stop = self.agent(
            name,
            r#"{"op":"file_put","name":"pv-poweroff","data_b64":""}"#,
        );
        assert_eq!(stop["ok"], true, "{stop}");
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.show(name)["state"] != "stopped" {
            assert!(
                Instant::now() < deadline,
                "{name} did not power off: {}\n{}",
                self.show(name),
                self.serial(name)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let serial = self.serial(name);
        assert!(serial.contains("LINUX done"), "{serial}");
        let bad = unexpected_kernel_warnings(serial.lines());
        assert!(bad.is_empty(), "{name}'s kernel logged {bad:?}\n{serial}");
    }
}

impl Drop for Handset {
    fn drop(&mut self) {
        let Some(mut daemon) = self.daemon.take() else {
            return;
        };
        // Stop the guests (a clean daemon stop would suspend the templates' profiles to disk).
        for name in ["work", "personal"] {
            let _ = self.cli(&["stop", name]);
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(
                i32::try_from(daemon.id()).expect("pid fits i32"),
                libc::SIGTERM,
            )
        };
        let _ = daemon.wait();
    }
}

/// The uptimes of the `LINUX heartbeat uptime=..` lines in `serial`.
fn heartbeats(serial: &str) -> Vec<f64> {
    serial
        .lines()
        .filter_map(|l| l.split("LINUX heartbeat uptime=").nth(1))
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

/// `clipboard_set` of `text` in profile `name`'s guest (as the user copies there).
fn copy_in_guest(handset: &Handset, name: &str, text: &str) {
    let set = handset.agent(
        name,
        &format!(
            r#"{{"op":"clipboard_set","mime":"text/plain","data_b64":"{}"}}"#,
            base64(text.as_bytes())
        ),
    );
    assert_eq!(set["ok"], true, "{set}");
}

/// The guest clipboard's base64 content.
fn clipboard_in_guest(handset: &Handset, name: &str) -> String {
    let get = handset.agent(name, r#"{"op":"clipboard_get"}"#);
    assert_eq!(get["ok"], true, "{get}");
    get["data_b64"].as_str().expect("data_b64").to_string()
}

fn is_foreground(handset: &Handset, name: &str) -> bool {
    handset.show(name)["foreground"] == true
}

#[test]
fn handset_two_linux_profiles_switch_copy_suspend_resume() {
    check(
        "handset::handset_two_linux_profiles_switch_copy_suspend_resume",
        || {
            let handset = Handset::start();
            handset.create_linux("work", "work");
            handset.create_linux("personal", "personal");
            let spec = &handset.show("work")["spec"];
            assert_eq!(
                (&spec["kernel"], &spec["initrd"], &spec["cmdline"]),
                (
                    &Value::from("vmlinux"),
                    &Value::from("initramfs.cpio.gz"),
                    &Value::from(LINUX_AGENT_CMDLINE)
                ),
                "{spec}"
            );
            let started = Instant::now();
            handset.ok(&["start", "work"]);
            handset.ok(&["start", "personal"]);
            handset.wait_for_agent("work");
            handset.wait_for_agent("personal");
            e2e::host::loud(&format!(
                "handset: two Linux profiles started, agents answering after {:.1?}",
                started.elapsed()
            ));
            for name in ["work", "personal"] {
                let info = handset.show(name);
                assert_eq!(info["state"], "running", "{info}");
                assert!(
                    handset.serial(name).contains("LINUX ready"),
                    "{}",
                    handset.serial(name)
                );
            }

            // Switch: one foreground profile at a time.
            handset.ok(&["switch", "work"]);
            assert!(is_foreground(&handset, "work") && !is_foreground(&handset, "personal"));
            handset.ok(&["switch", "personal"]);
            assert!(is_foreground(&handset, "personal") && !is_foreground(&handset, "work"));

            // The clipboard, copied in personal, goes to work through both real agents; the
            // templates' policy refuses work -> personal and leaves personal's clipboard alone.
            let text = "copied in the personal Linux guest \u{2192} pasted in work";
            copy_in_guest(&handset, "personal", text);
            handset.ok(&["clipboard", "copy", "--from", "personal", "--to", "work"]);
            assert_eq!(
                clipboard_in_guest(&handset, "work"),
                base64(text.as_bytes()),
                "work's clipboard after the copy"
            );
            copy_in_guest(&handset, "work", "work secret");
            let refused = handset.cli(&["clipboard", "copy", "--from", "work", "--to", "personal"]);
            assert!(
                !refused.status.success()
                    && String::from_utf8_lossy(&refused.stderr).contains("denied by policy"),
                "work -> personal was not refused: {refused:?}"
            );
            assert_eq!(
                clipboard_in_guest(&handset, "personal"),
                base64(text.as_bytes())
            );

            // Suspend work to disk and resume it: the same guest goes on (its uptime continues,
            // the file and clipboard its agent held are still there).
            let note: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
            let put = handset.agent(
                "work",
                &format!(
                    r#"{{"op":"file_put","name":"before-suspend.bin","data_b64":"{}"}}"#,
                    base64(&note)
                ),
            );
            assert_eq!(put["ok"], true, "{put}");
            let (beats, before) = handset.heartbeat_after("work", 0, Duration::from_secs(30));
            let suspended_at = Instant::now();
            handset.ok(&["suspend", "work"]);
            assert_eq!(handset.show("work")["state"], "suspended");
            assert_eq!(
                handset.show("personal")["state"],
                "running",
                "personal stopped when work was suspended"
            );
            handset.ok(&["resume", "work"]);
            let resumed = handset.show("work");
            assert_eq!(resumed["state"], "running", "{resumed}");
            let (_, after) = handset.heartbeat_after("work", beats, Duration::from_secs(60));
            let away = suspended_at.elapsed().as_secs_f64();
            e2e::host::loud(&format!(
            "handset: work suspended and resumed in {away:.1} s; its uptime went {before} -> {after}"
        ));
            assert!(
                after > before && after < before + away + 10.0,
                "the resumed guest's uptime is {after} s, before the suspend it was {before} s \
             ({away:.1} s ago): not the same guest going on\n{}",
                handset.serial("work")
            );
            let back = handset.agent("work", r#"{"op":"file_get","name":"before-suspend.bin"}"#);
            assert_eq!(
                back["data_b64"].as_str(),
                Some(base64(&note).as_str()),
                "the file written before the suspend: {back}"
            );
            assert_eq!(clipboard_in_guest(&handset, "work"), base64(b"work secret"));
            // And the channels work with the resumed guest.
            handset.ok(&["clipboard", "copy", "--from", "personal", "--to", "work"]);
            assert_eq!(
                clipboard_in_guest(&handset, "work"),
                base64(text.as_bytes())
            );

            handset.power_off("work");
            handset.power_off("personal");
            assert_no_vmm_left(&handset.state_dir());
        },
    );
}

/// No `pocketvisor vmm` of this state directory is left running.
fn assert_no_vmm_left(state: &Path) {
    let state = state.to_string_lossy().into_owned();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|e| {
            let cmdline = std::fs::read(e.ok()?.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (cmdline.contains(" vmm ") && cmdline.contains(&state)).then_some(cmdline)
        })
        .collect();
    assert!(left.is_empty(), "VMMs left running: {left:?}");
}

/// Runs `pocketvisor ARGS...` (not a `profile` command); asserts it succeeds, returns stdout.
fn pocketvisor(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(e2e::pocketvisor_bin())
        .args(args)
        .output()
        .expect("run pocketvisor");
    assert!(
        out.status.success(),
        "pocketvisor {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn handset_linux_profile_exported_suspended_resumes_in_a_second_state_dir() {
    check(
        "handset::handset_linux_profile_exported_suspended_resumes_in_a_second_state_dir",
        || {
            let here = Handset::start();
            here.create_linux("work", "work");
            here.ok(&["start", "work"]);
            here.wait_for_agent("work");
            let note: Vec<u8> = (0..=255u8).rev().cycle().take(20_000).collect();
            let put = here.agent(
                "work",
                &format!(
                    r#"{{"op":"file_put","name":"travels.bin","data_b64":"{}"}}"#,
                    base64(&note)
                ),
            );
            assert_eq!(put["ok"], true, "{put}");
            let (_, before) = here.heartbeat_after("work", 0, Duration::from_secs(30));
            here.ok(&["suspend", "work"]);
            e2e::host::loud("export check: work suspended; exporting");

            // Export to a recipient key (an X25519 identity: no passphrase derivation).
            let keys = TempDir::new();
            let identity = keys.join("identity");
            let public = pocketvisor(&["keygen".as_ref(), "-o".as_ref(), identity.as_os_str()]);
            let public = public
                .split_whitespace()
                .find(|w| w.starts_with("pvp-public-"))
                .unwrap_or_else(|| panic!("no public key in {public:?}"))
                .to_string();
            let file = keys.join("work.pvp");
            let exported = Instant::now();
            pocketvisor(&[
                "export".as_ref(),
                "work".as_ref(),
                "--state-dir".as_ref(),
                here.state_dir().as_os_str(),
                "-o".as_ref(),
                file.as_os_str(),
                "--recipient".as_ref(),
                public.as_ref(),
                "--json".as_ref(),
            ]);
            let export_time = exported.elapsed();
            e2e::host::loud(&format!(
                "export check: exported in {export_time:.1?}; importing"
            ));
            // The profile moved: it does not run here again.
            let again = here.cli(&["resume", "work"]);
            assert!(
                !again.status.success(),
                "the exported profile resumed at its old place too"
            );

            let there = Handset::start();
            let imported = Instant::now();
            pocketvisor(&[
                "import".as_ref(),
                file.as_os_str(),
                "--state-dir".as_ref(),
                there.state_dir().as_os_str(),
                "--identity".as_ref(),
                identity.as_os_str(),
                "--json".as_ref(),
            ]);
            let import_time = imported.elapsed();
            e2e::host::loud(&format!(
                "export check: imported in {import_time:.1?}; resuming"
            ));
            assert_eq!(there.show("work")["state"], "suspended");
            there.ok(&["resume", "work"]);
            let (_, after) = there.heartbeat_after("work", 0, Duration::from_secs(60));
            e2e::host::loud(&format!(
                "handset: Linux profile exported in {export_time:.1?} ({} MiB file), imported \
                 in {import_time:.1?}; its uptime went {before} -> {after}",
                std::fs::metadata(&file).map_or(0, |m| m.len() >> 20)
            ));
            assert!(
                after > before,
                "the guest resumed in the second state directory has uptime {after} s, {before} s \
                 before the export: not the same guest going on\n{}",
                there.serial("work")
            );
            let back = there.agent("work", r#"{"op":"file_get","name":"travels.bin"}"#);
            assert_eq!(
                back["data_b64"].as_str(),
                Some(base64(&note).as_str()),
                "the file the guest held before the export: {back}"
            );
            there.power_off("work");
            assert_no_vmm_left(&there.state_dir());
            assert_no_vmm_left(&here.state_dir());
        },
    );
}
