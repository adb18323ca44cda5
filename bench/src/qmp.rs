//! A minimal QMP client for the benches that run QEMU side by side (`snapshot_memory`,
//! `migrate_live`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A minimal QMP client: one command at a time, events skipped.
pub struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Qmp {
    /// Connects to the QMP socket at `path` and leaves capabilities negotiation.
    pub fn connect(path: &Path) -> Result<Qmp> {
        let w = UnixStream::connect(path).with_context(|| format!("connect {}", path.display()))?;
        w.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut q = Qmp {
            r: BufReader::new(w.try_clone()?),
            w,
        };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting)?;
        q.exec(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(q)
    }

    /// Connects once the socket exists (QEMU creates it early in its start-up).
    pub fn connect_within(path: &Path, timeout: Duration) -> Result<Qmp> {
        let t0 = Instant::now();
        loop {
            match Qmp::connect(path) {
                Ok(q) => return Ok(q),
                Err(e) if t0.elapsed() > timeout => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_micros(200)),
            }
        }
    }

    /// Sends a command; its `return` value (as text), or its error.
    pub fn exec(&mut self, cmd: &str) -> Result<String> {
        self.w.write_all(cmd.as_bytes())?;
        self.w.write_all(b"\n")?;
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                bail!("QMP closed during {cmd}");
            }
            if line.contains("\"return\"") {
                return Ok(line);
            }
            if line.contains("\"error\"") {
                bail!("QMP {cmd}: {}", line.trim());
            }
        }
    }

    /// Polls `query-migrate` every 0.2 ms until its status is `want` (fails on `failed`).
    pub fn wait_migration(&mut self, want: &str, timeout: Duration) -> Result<()> {
        let t0 = Instant::now();
        loop {
            let r = self.exec(r#"{"execute":"query-migrate"}"#)?;
            if r.contains(&format!("\"status\": \"{want}\"")) {
                return Ok(());
            }
            if r.contains("\"status\": \"failed\"") {
                bail!("migration failed: {}", r.trim());
            }
            if t0.elapsed() > timeout {
                bail!("migration not {want} after {timeout:?}: {}", r.trim());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}
