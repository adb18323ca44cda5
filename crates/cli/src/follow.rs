//! `profile logs` and `profile events --follow`: printing a log file and following it as it
//! grows, and following the daemon's event stream.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

/// How often a followed file is polled.
const POLL: Duration = Duration::from_millis(200);

/// Copies `path` to stdout; with `follow`, keeps copying what is appended, across the file
/// being replaced (a restart starts a new log) or truncated, until the process is killed.
pub fn cat(path: &Path, follow: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let open = || std::fs::File::open(path);
    let mut file = match open() {
        Ok(f) => Some(f),
        Err(e) if follow && e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(e).with_context(|| format!("cannot read {}", path.display()));
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(f) = file.as_mut() {
            loop {
                let n = f
                    .read(&mut buf)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                if n == 0 {
                    break;
                }
                if out.write_all(buf.get(..n).unwrap_or_default()).is_err() {
                    return Ok(()); // The reader went away (`| head`).
                }
            }
            let _ = out.flush();
        }
        if !follow {
            return Ok(());
        }
        std::thread::sleep(POLL);
        // A new file under the name (a restart) or a truncated one is read from its start.
        let now = std::fs::metadata(path).ok();
        match (file.as_mut(), now) {
            (None, Some(_)) => file = open().ok(),
            (Some(f), Some(m)) => {
                let same = f.metadata().is_ok_and(|o| o.ino() == m.ino());
                let pos = f.stream_position().unwrap_or(0);
                if !same {
                    file = open().ok();
                } else if m.len() < pos {
                    f.seek(SeekFrom::Start(0))?;
                }
            }
            _ => {}
        }
    }
}

/// Follows the daemon's event stream (`GET /v1/events/stream`, server-sent events) after
/// event `after` (of `profile`, or all), calling `print` with each event, until the daemon
/// ends the stream or stdout goes away.
pub fn events(
    c: &handset::client::Client,
    profile: Option<&str>,
    after: i64,
    mut print: impl FnMut(&handset::Event),
) -> Result<()> {
    let mut path = format!("/v1/events/stream?after={after}");
    if let Some(p) = profile {
        // A valid name needs no escaping in a query; anything else is refused here.
        handset::spec::check_name("profile name", p)?;
        path.push_str(&format!("&profile={p}"));
    }
    let mut bad = None;
    c.stream_lines(&path, |line| {
        // Only `data:` lines carry an event; `id:`, `event:` and `:` comments are framing.
        if let Some(data) = line.strip_prefix("data:") {
            match serde_json::from_str::<handset::Event>(data.trim_start()) {
                Ok(e) => print(&e),
                Err(e) => {
                    bad = Some(e);
                    return false;
                }
            }
        }
        !crate::stdout::gone()
    })?;
    if let Some(e) = bad {
        anyhow::bail!("the daemon's event stream sent a bad event: {e}");
    }
    if !crate::stdout::gone() {
        anyhow::bail!("the daemon ended the event stream (did it stop?)");
    }
    Ok(())
}
