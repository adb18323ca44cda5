//! Helpers for the handset-and-MDM tests: a real `pocketvisor mdm serve` and a real
//! `pocketvisor handset --mdm ...`, each a subprocess over a temporary directory.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_pocketvisor");
pub const ADMIN_TOKEN: &str = "correct-horse-battery-staple";

/// Polls `f` every 100 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The store a test's `mdm serve` keeps its state in.
pub enum Store {
    /// SQLite in the server's state directory (the default).
    Sqlite,
    /// A PostgreSQL database, by URL.
    Postgres(String),
}

impl Store {
    /// A fresh database on the test binary's scratch cluster, or `None` (skip, said loudly;
    /// a failure under `CI`) without PostgreSQL.
    pub fn postgres(test: &str) -> Option<Store> {
        mdm::store::pg_scratch::database_for_test(test).map(Store::Postgres)
    }

    /// Makes every server started on `dir` (a restart too) use this store: PostgreSQL's URL
    /// goes to `dir/store-url`, which [`Server::start`] passes as `--store-file`.
    pub fn keep_in(&self, dir: &Path) {
        if let Store::Postgres(url) = self {
            std::fs::write(dir.join(STORE_URL_FILE), url).unwrap();
        }
    }
}

/// Where [`Store::keep_in`] leaves a PostgreSQL URL for the server.
pub const STORE_URL_FILE: &str = "store-url";

/// `on_both_stores!(NAME)` for `fn NAME(store: Store)`: the tests `NAME::sqlite` and
/// `NAME::postgres`.
#[macro_export]
macro_rules! on_both_stores {
    ($name:ident) => {
        mod $name {
            #[test]
            fn sqlite() {
                super::$name($crate::mdm_common::Store::Sqlite)
            }
            #[test]
            fn postgres() {
                let Some(store) = $crate::mdm_common::Store::postgres(stringify!($name)) else {
                    return;
                };
                super::$name(store)
            }
        }
    };
}

/// A `pocketvisor mdm serve` process (killed when dropped).
pub struct Server {
    pub dir: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl Server {
    /// Starts a server with its state in `dir/state` (and in the PostgreSQL database named
    /// by `dir/store-url` if there is one, [`Store::keep_in`]), on `port` (0: any), long polls
    /// held at most `long_poll` s, every request recorded in `dir/requests.jsonl`.
    pub fn start(dir: &Path, port: u16, long_poll: u64) -> Server {
        std::fs::write(dir.join("admin.token"), format!("{ADMIN_TOKEN}\n")).unwrap();
        let store_url = dir.join(STORE_URL_FILE);
        let store_args: Vec<std::ffi::OsString> = if store_url.exists() {
            vec!["--store-file".into(), store_url.into()]
        } else {
            Vec::new()
        };
        let mut child = Command::new(BIN)
            .args(["mdm", "serve", "--name", "localhost", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--long-poll")
            .arg(long_poll.to_string())
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--admin-token-file")
            .arg(dir.join("admin.token"))
            .arg("--request-log")
            .arg(dir.join("requests.jsonl"))
            .args(store_args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr: std::net::SocketAddr = line
            .split_whitespace()
            .nth(3)
            .unwrap_or_else(|| panic!("server said {line:?}"))
            .trim_end_matches(';')
            .parse()
            .unwrap();
        Server {
            dir: dir.to_path_buf(),
            port: addr.port(),
            child: Some(child),
        }
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("state/ca.pem")
    }

    /// Kills the server (SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs an admin command; its JSON answer (null if none) or the failure's stderr.
    pub fn admin(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let out = Command::new(BIN)
            .args([
                "mdm",
                "--server",
                &format!("localhost:{}", self.port),
                "--ca",
            ])
            .arg(self.ca())
            .arg("--token-file")
            .arg(self.dir.join("admin.token"))
            .args(args)
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(text(&out));
        }
        Ok(serde_json::from_slice(&out.stdout).unwrap_or_default())
    }

    pub fn token(&self) -> String {
        let t = self.admin(&["enroll-token", "--ttl", "600"]).unwrap();
        t["token"].as_str().unwrap().to_owned()
    }

    /// The server's audit log: (actor, action, detail).
    pub fn audit(&self) -> Vec<(String, String, String)> {
        let log = self.admin(&["audit"]).unwrap();
        log.as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let f = |k: &str| a[k].as_str().unwrap_or_default().to_owned();
                (f("actor"), f("action"), f("detail"))
            })
            .collect()
    }

    /// The latest compliance report of `device`.
    pub fn compliance(&self, device: &str) -> Option<serde_json::Value> {
        let list = self.admin(&["devices"]).ok()?;
        list.as_array()?
            .iter()
            .find(|d| d["id"] == device)
            .map(|d| d["compliance"].clone())
            .filter(|c| !c.is_null())
    }

    /// Queues `kind` (with `args`) for `device`; the command's id.
    pub fn queue(&self, kind: &str, device: &str, args: &[&str]) -> i64 {
        let mut a = vec![kind, device];
        a.extend_from_slice(args);
        let r = self.admin(&a).unwrap();
        r["id"].as_i64().unwrap()
    }

    /// Every request the server received (`--request-log`), as JSON: complete lines only
    /// (the server may be writing the last one).
    pub fn requests(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("requests.jsonl"))
            .unwrap_or_default()
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The result (parsed) the device sent for command `id`, once it did.
    pub fn result(&self, id: i64) -> Option<serde_json::Value> {
        self.requests().into_iter().find_map(|r| {
            if r["path"] != "/v1/device/results" {
                return None;
            }
            let body: serde_json::Value = serde_json::from_str(r["body"].as_str()?).ok()?;
            (body["command_id"] == id)
                .then(|| serde_json::from_str(body["result"].as_str()?).ok())?
        })
    }

    /// Waits for the result of command `id`, which the server must have accepted (its audit
    /// says `result` for it: the device key's signature verified).
    pub fn wait_result(&self, id: i64) -> serde_json::Value {
        let accepted = wait_until(Duration::from_secs(90), || {
            self.audit()
                .iter()
                .any(|(_, action, detail)| action == "result" && *detail == id.to_string())
        });
        assert!(accepted, "no result accepted for command {id}");
        self.result(id).expect("the result's request is logged")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

static DAEMONS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A `pocketvisor handset` daemon (killed when dropped).
pub struct Handset {
    pub dir: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    cgroup: String,
}

impl Handset {
    /// A daemon on state directory `dir` with `args` (after --state-dir).
    pub fn start(dir: &Path, args: &[String]) -> Handset {
        let mut h = Handset {
            dir: dir.to_path_buf(),
            args: args.to_vec(),
            env: vec![],
            child: None,
            // One per daemon: daemons sharing a parent remove it under each other.
            cgroup: format!(
                "pvtest-mdm-{}-{}",
                std::process::id(),
                DAEMONS.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            ),
        };
        h.spawn();
        h
    }

    pub fn spawn(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))
            .unwrap();
        let child = Command::new(BIN)
            .args(["handset", "--http", "off", "--no-jail", "--state-dir"])
            .arg(&self.dir)
            .args(["--cgroup-parent", &self.cgroup])
            .args(&self.args)
            .env("POCKETVISOR_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let up = wait_until(Duration::from_secs(30), || self.info().is_some());
        assert!(up, "the daemon did not answer: {}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }

    /// Whether the daemon process has exited.
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().unwrap().is_some())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    pub fn client(&self) -> handset::client::Client {
        handset::client::Client::new(&self.dir.join("handset.sock"))
    }

    pub fn info(&self) -> Option<handset::DaemonInfo> {
        self.client().call("GET", "/v1/handset", None::<&()>).ok()
    }

    /// The link's state (`connected`, `unreachable`, ...).
    pub fn mdm_state(&self) -> Option<String> {
        self.info().and_then(|i| i.mdm).map(|m| m.state)
    }

    /// `pocketvisor profile --state-dir DIR ARGS...`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("profile")
            .arg("--state-dir")
            .arg(&self.dir)
            .args(args)
            .output()
            .unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "profile {args:?}: {}", text(&out));
        text(&out)
    }

    /// The daemon's audit records with `action`: their details.
    pub fn audit(&self, action: &str) -> Vec<String> {
        let list: Vec<handset::Event> = self
            .client()
            .call("GET", "/v1/audit?limit=1000", None::<&()>)
            .unwrap();
        list.into_iter()
            .filter(|e| e.event == action)
            .map(|e| e.detail)
            .collect()
    }
}

impl Drop for Handset {
    fn drop(&mut self) {
        self.terminate();
    }
}
