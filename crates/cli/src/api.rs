//! The VMM's control socket: one JSON request per line, one JSON answer per line.
//!
//! Requests: `{"op":"pause"}`, `{"op":"resume"}`, `{"op":"stop"}`,
//! `{"op":"snapshot","dir":"/path","resume":false}` (the VM stays paused unless `resume`),
//! `{"op":"balloon","target_mib":N}` (memory the balloon takes from the guest),
//! `{"op":"stats"}` (`info` is a JSON object: guest RAM, balloon state and guest statistics).
//! Answers: `{"ok":true,"info":"..."}` or `{"ok":false,"error":"..."}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use vmm::{Controller, Request};

/// A request line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiRequest {
    /// `pause`, `resume`, `snapshot`, `stop`, `balloon` or `stats`.
    pub op: String,
    /// Snapshot directory (`snapshot` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// Resume after the snapshot (`snapshot` only).
    #[serde(default)]
    pub resume: bool,
    /// The balloon's target size in MiB (`balloon` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_mib: Option<u64>,
}

/// An answer line.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiResponse {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Details on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<String>,
    /// The reason on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn to_request(r: ApiRequest) -> Result<Request, String> {
    match (r.op.as_str(), r.target_mib) {
        ("balloon", Some(target_mib)) if r.dir.is_none() => {
            return Ok(Request::Balloon { target_mib });
        }
        ("balloon", _) => return Err("balloon needs \"target_mib\" and nothing else".into()),
        (op, Some(_)) => return Err(format!("{op} takes no \"target_mib\"")),
        _ => {}
    }
    match (r.op.as_str(), r.dir) {
        ("pause", None) => Ok(Request::Pause),
        ("resume", None) => Ok(Request::Resume),
        ("stop", None) => Ok(Request::Stop),
        ("stats", None) => Ok(Request::Stats),
        ("snapshot", Some(dir)) if dir.is_absolute() => Ok(Request::Snapshot {
            dir,
            resume: r.resume,
        }),
        ("snapshot", _) => Err("snapshot needs \"dir\": an absolute path".into()),
        (op @ ("pause" | "resume" | "stop" | "stats"), Some(_)) => {
            Err(format!("{op} takes no \"dir\""))
        }
        (op, _) => Err(format!(
            "unknown op {op:?} (pause, resume, snapshot, stop, balloon, stats)"
        )),
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
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            bail!("{} exists and is not a socket", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))?;
    // Only the owner may control the VM.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot restrict {}", path.display()))?;
    }
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
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

fn serve_conn(stream: UnixStream, controller: &Controller) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    let reader = BufReader::new(stream);
    for line in reader.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let result = serde_json::from_str::<ApiRequest>(&line)
            .map_err(|e| format!("bad request: {e}"))
            .and_then(to_request)
            .and_then(|req| controller.call(req));
        let resp = match result {
            Ok(info) => ApiResponse {
                ok: true,
                info: Some(info),
                error: None,
            },
            Err(e) => ApiResponse {
                ok: false,
                info: None,
                error: Some(e),
            },
        };
        let mut text = serde_json::to_string(&resp).map_err(std::io::Error::other)?;
        text.push('\n');
        out.write_all(text.as_bytes())?;
    }
    Ok(())
}

/// Sends one request to the VMM at `socket` and returns its `info`, or its error as an error.
pub fn call(socket: &Path, req: &ApiRequest) -> Result<String> {
    let mut stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to the VMM at {}", socket.display()))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(&stream)
        .read_line(&mut answer)
        .context("no answer from the VMM")?;
    let resp: ApiResponse =
        serde_json::from_str(answer.trim()).context("bad answer from the VMM")?;
    if resp.ok {
        Ok(resp.info.unwrap_or_default())
    } else {
        bail!("{}", resp.error.unwrap_or_else(|| "unknown error".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Request, String> {
        to_request(serde_json::from_str(s).map_err(|e| e.to_string())?)
    }

    #[test]
    fn requests_parse_strictly() {
        assert_eq!(parse(r#"{"op":"pause"}"#), Ok(Request::Pause));
        assert_eq!(parse(r#"{"op":"stop"}"#), Ok(Request::Stop));
        assert_eq!(
            parse(r#"{"op":"snapshot","dir":"/tmp/s","resume":true}"#),
            Ok(Request::Snapshot {
                dir: "/tmp/s".into(),
                resume: true
            })
        );
        assert!(parse(r#"{"op":"snapshot"}"#).is_err());
        assert!(parse(r#"{"op":"snapshot","dir":"rel"}"#).is_err());
        assert!(parse(r#"{"op":"explode"}"#).is_err());
        assert!(parse(r#"{"op":"pause","extra":1}"#).is_err());
        assert_eq!(
            parse(r#"{"op":"balloon","target_mib":128}"#),
            Ok(Request::Balloon { target_mib: 128 })
        );
        assert_eq!(parse(r#"{"op":"stats"}"#), Ok(Request::Stats));
        assert!(parse(r#"{"op":"balloon"}"#).is_err());
        assert!(parse(r#"{"op":"balloon","target_mib":-1}"#).is_err());
        assert!(parse(r#"{"op":"balloon","target_mib":1,"dir":"/x"}"#).is_err());
        assert!(parse(r#"{"op":"pause","target_mib":1}"#).is_err());
        assert!(parse(r#"{"op":"stats","dir":"/x"}"#).is_err());
    }
}
