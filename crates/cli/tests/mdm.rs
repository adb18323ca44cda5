//! `pocketvisor mdm`: the server as a process, driven by the admin commands, with a device
//! enrolled through the library's client; on the default SQLite store and on PostgreSQL
//! (`mdm serve --store postgresql://...`, a scratch cluster: skipped loudly when PostgreSQL is
//! not installed, a failure then under `CI`).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mdm::client::{Client, DeviceKey};
use mdm::protocol::{Enrolled, SignedCommand};

const BIN: &str = env!("CARGO_BIN_EXE_pocketvisor");

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn admin(
    dir: &Path,
    port: u16,
    token_file: &str,
    args: &[&str],
) -> (bool, serde_json::Value, String) {
    let out = Command::new(BIN)
        .args(["mdm", "--server", &format!("localhost:{port}"), "--ca"])
        .arg(dir.join("state/ca.pem"))
        .arg("--token-file")
        .arg(dir.join(token_file))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or_default();
    (
        out.status.success(),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn serve_enroll_lock_devices_and_audit_from_the_command_line_on_sqlite() {
    serve_enroll_lock_devices_and_audit(&[]);
}

#[test]
fn serve_enroll_lock_devices_and_audit_from_the_command_line_on_postgres() {
    let Some(url) = mdm::store::pg_scratch::database_for_test("cli_serve") else {
        return;
    };
    serve_enroll_lock_devices_and_audit(&["--store", &url, "--store-connections", "2"]);
}

/// The whole flow against a server started with `store_args` added to `mdm serve`.
fn serve_enroll_lock_devices_and_audit(store_args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("admin.token"),
        "correct-horse-battery-staple\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("wrong.token"),
        "not-the-admin-token-at-all\n",
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args([
            "mdm",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--name",
            "localhost",
            "--state-dir",
        ])
        .arg(dir.path().join("state"))
        .arg("--admin-token-file")
        .arg(dir.path().join("admin.token"))
        .args(store_args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _server = Server(child);
    let addr: std::net::SocketAddr = line
        .split_whitespace()
        .nth(3)
        .unwrap()
        .trim_end_matches(';')
        .parse()
        .unwrap();
    let port = addr.port();

    let (ok, _, err) = admin(dir.path(), port, "wrong.token", &["devices"]);
    assert!(!ok && err.contains("401"), "{err}");
    let (ok, tok, err) = admin(
        dir.path(),
        port,
        "admin.token",
        &["enroll-token", "--ttl", "600"],
    );
    assert!(ok, "{err}");
    let token = tok["token"].as_str().unwrap().to_owned();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let ca_pem = std::fs::read_to_string(dir.path().join("state/ca.pem")).unwrap();
    let key = DeviceKey::generate().unwrap();
    let anon = Client::new(addr, "localhost", &ca_pem, None, Duration::from_secs(60)).unwrap();
    let body = serde_json::to_vec(&key.enroll_body(&token)).unwrap();
    let r = rt
        .block_on(anon.request("POST", "/v1/enroll", None, Some(&body)))
        .unwrap();
    assert_eq!(r.status, 200);
    let e: Enrolled = serde_json::from_slice(&r.body).unwrap();

    let (ok, _, err) = admin(dir.path(), port, "admin.token", &["lock", &e.device_id]);
    assert!(ok, "{err}");
    let (ok, list, _) = admin(dir.path(), port, "admin.token", &["devices"]);
    assert!(ok);
    assert_eq!(list[0]["id"], e.device_id.as_str());

    let device = Client::new(
        addr,
        "localhost",
        &ca_pem,
        Some((&e.cert_pem, &key)),
        Duration::from_secs(60),
    )
    .unwrap();
    let r = rt
        .block_on(device.request("GET", "/v1/device/commands", None, None))
        .unwrap();
    let cmds: Vec<SignedCommand> = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(cmds.len(), 1);
    assert_eq!(cmds[0].kind, "lock");
    assert!(cmds[0].verify(&e.command_key, &e.device_id));

    let (ok, log, _) = admin(dir.path(), port, "admin.token", &["audit"]);
    assert!(ok);
    let actions: Vec<_> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(actions, ["enroll-token", "enroll", "lock"]);
    // The CA key stays private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("state/ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // The state went to the store asked for: SQLite's file only without --store.
    assert_eq!(
        dir.path().join("state/mdm.db").exists(),
        store_args.is_empty()
    );
}

/// `--store` takes only a PostgreSQL URL (SQLite is the default) and `--store-file` an existing
/// file: anything else stops `mdm serve` before it listens, saying why.
#[test]
fn serve_refuses_a_store_that_is_not_postgresql() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("admin.token"),
        "correct-horse-battery-staple\n",
    )
    .unwrap();
    let serve = |store: &[&str]| {
        Command::new(BIN)
            .args(["mdm", "serve", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(dir.path().join("state"))
            .arg("--admin-token-file")
            .arg(dir.path().join("admin.token"))
            .args(store)
            .output()
            .unwrap()
    };
    let out = serve(&["--store", "sqlite:///tmp/x.db"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("postgresql://"), "{err}");
    let out = serve(&["--store-file", "/nonexistent/store-url"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--store-file"), "{err}");
    let out = serve(&["--store-connections", "0"]);
    assert!(!out.status.success());
    assert!(!dir.path().join("state/mdm.db").exists());
}
