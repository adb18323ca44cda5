//! [`ScratchCluster`]: a throwaway PostgreSQL cluster for tests and benches.
//!
//! `initdb` and `pg_ctl` (Debian's `postgresql` package puts them in
//! `/usr/lib/postgresql/<version>/bin`) make a cluster in a fresh temp directory that listens
//! only on a unix socket in that directory, with trust authentication for its one role. PostgreSQL
//! refuses to run as root, so under root the cluster belongs to the `postgres` user (or `nobody`)
//! through `runuser`. Dropping the guard stops the server and deletes the directory; a small
//! watcher process does the same when this process ends without dropping it (a cluster kept in
//! a `static` for a whole test binary, or a test run killed).
//!
//! [`database_for_test`] is the policy the test suites share: one cluster per test binary, a
//! fresh database per test, and a loud skip when PostgreSQL is not installed (a failure when
//! `CI` is set, since CI must run the PostgreSQL tests).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// Why a scratch cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum ScratchError {
    /// PostgreSQL's server programs are not installed: callers may skip, saying so.
    #[error("PostgreSQL is not installed ({0}); install Debian's `postgresql` package")]
    NotInstalled(String),
    /// They are installed but a step failed.
    #[error("{0}")]
    Failed(String),
}

/// A running throwaway cluster; stopped and deleted on drop.
pub struct ScratchCluster {
    dir: PathBuf,
    bin: PathBuf,
    run_as: Option<String>,
}

/// The role and database the store connects to.
const ROLE: &str = "pocketvisor";

impl ScratchCluster {
    /// Makes and starts a cluster in a new directory under the system temp dir, with fsync
    /// off: its data is thrown away, and tests need not wait for the disk.
    pub fn start() -> Result<Self, ScratchError> {
        Self::start_with(false)
    }

    /// [`ScratchCluster::start`] with fsync on, as a production server runs: each commit
    /// waits for the disk, like SQLite's (for benches that compare the two).
    pub fn start_durable() -> Result<Self, ScratchError> {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Result<Self, ScratchError> {
        let bin = server_bin_dir()?;
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pv-pg-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        // A leftover of a killed run with the same pid is ours to replace.
        let _ = std::fs::remove_dir_all(&dir);
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(|e| ScratchError::Failed(format!("creating {}: {e}", dir.display())))?;
        }
        // From here on the guard owns the directory, so any failure below cleans it up.
        let mut cluster = Self {
            dir,
            bin,
            run_as: None,
        };
        if is_root() {
            let user = cluster_user()?;
            let (uid, gid) = (id_of(&user, "-u")?, id_of(&user, "-g")?);
            std::os::unix::fs::chown(&cluster.dir, Some(uid), Some(gid))
                .map_err(|e| ScratchError::Failed(format!("chown to {user}: {e}")))?;
            cluster.run_as = Some(user);
        }
        let data = cluster.dir.join("data");
        cluster.run(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-U".as_ref(),
                ROLE.as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C".as_ref(),
                "--no-sync".as_ref(),
            ],
        )?;
        // No TCP listener at all.
        let options = format!(
            "-k {} -c listen_addresses= -c max_connections=200{}",
            cluster.dir.display(),
            if durable { "" } else { " -F" }
        );
        let log = cluster.dir.join("server.log");
        cluster.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                options.as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "120".as_ref(),
                "start".as_ref(),
            ],
        )?;
        cluster.watch_owner()?;
        Ok(cluster)
    }

    /// Starts a watcher that, once this process is gone, stops the server (SIGQUIT to the
    /// postmaster: PostgreSQL's immediate shutdown) and deletes the directory. [`Drop`] does
    /// the same earlier; the watcher covers a cluster that is never dropped.
    fn watch_owner(&self) -> Result<(), ScratchError> {
        const WATCH: &str = r#"
            while kill -0 "$0" 2>/dev/null; do sleep 1; done
            pid=$(head -n 1 "$1/data/postmaster.pid" 2>/dev/null) && kill -QUIT "$pid" 2>/dev/null
            while [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
            rm -rf "$1"
        "#;
        Command::new("sh")
            .arg("-c")
            .arg(WATCH)
            .arg(std::process::id().to_string())
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(drop)
            .map_err(|e| ScratchError::Failed(format!("starting the cluster's watcher: {e}")))
    }

    /// Creates an empty database named `name` (letters, digits and `_`, at most 63 bytes) and
    /// returns its URL.
    pub fn create_database(&self, name: &str) -> Result<String, ScratchError> {
        let valid = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(ScratchError::Failed(format!("bad database name {name:?}")));
        }
        let url = self.url();
        // On a thread of its own: the sync client runs a runtime, which may not start inside a
        // caller's (an async test).
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let mut admin =
                        postgres::Client::connect(&url, postgres::NoTls).map_err(|e| {
                            ScratchError::Failed(format!("connecting to the cluster: {e}"))
                        })?;
                    // The name was checked above: an identifier cannot be a statement parameter.
                    admin
                        .batch_execute(&format!("CREATE DATABASE {name}"))
                        .map_err(|e| ScratchError::Failed(format!("CREATE DATABASE {name}: {e}")))
                })
                .join()
                .unwrap_or_else(|_| Err(ScratchError::Failed("CREATE DATABASE panicked".into())))
        })?;
        Ok(self.url_of(name))
    }

    /// The URL of the cluster's `postgres` database over its unix socket.
    pub fn url(&self) -> String {
        self.url_of("postgres")
    }

    fn url_of(&self, database: &str) -> String {
        format!(
            "postgresql://{ROLE}@/{database}?host={}",
            self.dir.display()
        )
    }

    /// The cluster's directory (data files, socket and server log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs one of the server programs, as the cluster's user when we are root.
    fn run(&self, program: &str, args: &[&OsStr]) -> Result<(), ScratchError> {
        let path = self.bin.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&path);
                c
            }
            None => Command::new(&path),
        };
        let out = cmd
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| ScratchError::Failed(format!("running {}: {e}", path.display())))?;
        if out.status.success() {
            Ok(())
        } else {
            let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
            Err(ScratchError::Failed(format!(
                "{program} failed ({}): {}{}\n{log}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )))
        }
    }
}

impl Drop for ScratchCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        if data.join("postmaster.pid").exists() {
            let _ = self.run(
                "pg_ctl",
                &[
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-m".as_ref(),
                    "immediate".as_ref(),
                    "-w".as_ref(),
                    "stop".as_ref(),
                ],
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The directory holding `initdb` and `pg_ctl`: Debian's versioned directories first (newest
/// version first; they are not on `PATH`), then `PATH` for other systems.
fn server_bin_dir() -> Result<PathBuf, ScratchError> {
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .collect();
    debian.sort_by_key(|d| std::cmp::Reverse(d.0));
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    debian
        .into_iter()
        .map(|(_, p)| p)
        .chain(on_path)
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
        .ok_or_else(|| {
            ScratchError::NotInstalled(
                "no initdb and pg_ctl in /usr/lib/postgresql/*/bin or on PATH".into(),
            )
        })
}

/// A fresh database on the cluster this process shares among its tests, named after `test`;
/// `None` when PostgreSQL is not installed, after saying loudly on stderr that the PostgreSQL
/// half of the suite is skipped.
///
/// # Panics
/// When PostgreSQL is not installed and `CI` is set (CI must run these tests), or when it is
/// installed but the cluster or the database cannot be made.
pub fn database_for_test(test: &str) -> Option<String> {
    static SHARED: OnceLock<Result<ScratchCluster, ScratchError>> = OnceLock::new();
    static SAID: std::sync::Once = std::sync::Once::new();
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let cluster = match SHARED.get_or_init(ScratchCluster::start) {
        Ok(c) => c,
        Err(ScratchError::NotInstalled(why)) => {
            if std::env::var_os("CI").is_some() {
                panic!("CI is set, so the PostgreSQL tests must run, but {why}");
            }
            SAID.call_once(|| {
                use std::io::Write;
                // Straight to the stderr descriptor: the test harness captures eprintln!.
                let _ = writeln!(
                    std::io::stderr(),
                    "\n!!!!!!!! SKIPPING the PostgreSQL store tests: {why}; install Debian's \
                     `postgresql` package (scripts/deps.sh) to run them !!!!!!!!\n"
                );
            });
            return None;
        }
        Err(e) => panic!("the PostgreSQL scratch cluster did not start: {e}"),
    };
    let stem: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(48)
        .collect();
    let name = format!("t_{stem}_{}", SEQ.fetch_add(1, Ordering::Relaxed));
    match cluster.create_database(&name) {
        Ok(url) => Some(url),
        Err(e) => panic!("{e}"),
    }
}

fn is_root() -> bool {
    // The owner of our own /proc entry is our effective uid, without unsafe code.
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// The unprivileged user that runs the cluster when we are root.
fn cluster_user() -> Result<String, ScratchError> {
    ["postgres", "nobody"]
        .into_iter()
        .find(|u| id_of(u, "-u").is_ok())
        .map(str::to_owned)
        .ok_or_else(|| {
            ScratchError::Failed("running as root, and no postgres or nobody user".into())
        })
}

/// `id -u USER` or `id -g USER`.
fn id_of(user: &str, which: &str) -> Result<u32, ScratchError> {
    let out = Command::new("id")
        .args([which, user])
        .stderr(Stdio::null())
        .output()
        .map_err(|e| ScratchError::Failed(format!("running id: {e}")))?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| ScratchError::Failed(format!("no user {user}")))
}
