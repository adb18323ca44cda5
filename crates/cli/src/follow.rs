//! `profile logs` and `profile events --follow`: printing a log file or the daemon's event
//! list, and following them as they grow.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

/// How often a followed file or event list is polled.
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

/// Polls `fetch` (which returns the newest records, oldest first) every [`POLL`], calling
/// `print` with the records newer than the last one printed (`last_id`), until killed.
pub fn events<T>(
    mut last_id: i64,
    id: impl Fn(&T) -> i64,
    mut fetch: impl FnMut() -> Result<Vec<T>>,
    mut print: impl FnMut(&[T]),
) -> Result<()> {
    loop {
        std::thread::sleep(POLL);
        let list = fetch()?;
        let new: Vec<T> = list.into_iter().filter(|e| id(e) > last_id).collect();
        if let Some(e) = new.last() {
            last_id = id(e);
            print(&new);
        }
        if crate::stdout::gone() {
            return Ok(());
        }
    }
}
