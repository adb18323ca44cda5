//! The VMM's control socket: one JSON request per line, one JSON answer per line (the wire
//! format is `vmm_api::control`'s).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use vmm::vmm_api::{ApiRequest, ApiResponse};
use vmm::{Controller, Request};

/// Requests taken from the socket whose answer is not written yet.
static ANSWERING: AtomicUsize = AtomicUsize::new(0);

/// Waits (up to `limit`) until every request taken from the socket has its answer written:
/// the process may end right after the VM does (a migration), and the client that asked
/// must still hear the outcome.
pub fn wait_for_answers(limit: Duration) {
    let until = Instant::now() + limit;
    while ANSWERING.load(Ordering::Acquire) > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Removes the socket file when the VM ends.
pub struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Listens on `path` (a stale socket there is replaced) and serves requests on a thread.
pub fn serve(path: &Path, controller: Arc<Controller>) -> Result<SocketGuard> {
    remove_stale_socket(path)?;
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    owner_only(path)?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            devices::threads::started(devices::threads::ThreadKind::Api);
            for conn in listener.incoming() {
                match conn {
                    // One thread per connection: a client that stays connected (or never
                    // sends its line) does not hold up the others.
                    Ok(stream) => {
                        let controller = controller.clone();
                        let spawned =
                            std::thread::Builder::new()
                                .name("api-conn".into())
                                .spawn(move || {
                                    devices::threads::started(devices::threads::ThreadKind::Api);
                                    if let Err(e) = serve_conn(stream, &controller) {
                                        tracing::debug!("api connection: {e}");
                                    }
                                });
                        if let Err(e) = spawned {
                            tracing::warn!("api: cannot serve a connection: {e}");
                        }
                    }
                    Err(e) => tracing::warn!("api socket accept failed: {e}"),
                }
            }
        })
        .context("cannot start the API thread")?;
    Ok(SocketGuard(path.to_path_buf()))
}

/// Removes a stale socket at `path`; refuses to remove anything else.
pub fn remove_stale_socket(path: &Path) -> Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            bail!("{} exists and is not a socket", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))?;
    }
    Ok(())
}

/// Only the owner may connect to the socket at `path`.
pub fn owner_only(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))
}

fn serve_conn(stream: UnixStream, controller: &Controller) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    let reader = BufReader::new(stream);
    for line in reader.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        ANSWERING.fetch_add(1, Ordering::AcqRel);
        let result = ApiRequest::parse_line(&line)
            .map_err(|e| e.to_string())
            .and_then(|req| controller.call(req).map_err(|e| e.to_string()));
        let written = out.write_all(ApiResponse::from_result(result).to_line().as_bytes());
        ANSWERING.fetch_sub(1, Ordering::AcqRel);
        written?;
    }
    Ok(())
}

/// Sends one request to the VMM at `socket` and returns its `info`, or its error as an error.
pub fn call(socket: &Path, req: &Request) -> Result<String> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to the VMM at {}", socket.display()))?;
    stream.write_all(ApiRequest::from(req).to_line()?.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .context("no answer from the VMM")?;
    ApiResponse::parse_line(&answer)
        .context("bad answer from the VMM")?
        .map_err(anyhow::Error::msg)
}
