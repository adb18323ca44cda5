//! `GET /v1/profiles/{name}/console`: the guest's serial console, interactive, through the
//! daemon (like `virsh console`).
//!
//! The client asks to switch protocols (`Connection: Upgrade`, `Upgrade:
//! pocketvisor-console`); the daemon answers `101 Switching Protocols` and the connection
//! becomes a raw byte stream each way. Daemon to client: the tail of the profile's
//! `serial.log` (`?history=BYTES`, default [`HISTORY_DEFAULT`], from the start of a line),
//! then the guest's output as it is written. Client to daemon: bytes typed into the guest's
//! 16550 (the VMM's `serial` device request); what the port's bounded queue cannot take is
//! sent again for up to [`INPUT_PATIENCE`], then dropped. The session ends when the client
//! closes its side, when the VMM ends or is replaced (crash restart, suspend), or when the
//! daemon stops. One client at a time: a second is refused (409) while one is attached.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::connect_info::ConnectInfo;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::api::{ApiError, Peer};
use crate::api_types::ProfileState;
use crate::daemon::Handset;
use crate::error::Error;

/// The `Upgrade` protocol name.
pub const PROTOCOL: &str = "pocketvisor-console";
/// Bytes of `serial.log` sent first when `?history=` is not given.
pub const HISTORY_DEFAULT: u64 = 4096;
/// The largest `?history=`.
pub const HISTORY_MAX: u64 = 1 << 20;
/// How long input the guest's port cannot take yet is offered again before it is dropped.
pub const INPUT_PATIENCE: Duration = Duration::from_secs(5);
/// How often the log is read for new output while it is quiet.
const OUTPUT_POLL: Duration = Duration::from_millis(30);
/// How often the profile's state is checked during a session.
const STATE_POLL: Duration = Duration::from_millis(300);
/// The most bytes read from the log or the client at once.
const CHUNK: usize = 4096;

/// `?history=` of the console route.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleQuery {
    /// Bytes of the serial log's tail to send first (0 to [`HISTORY_MAX`]).
    pub history: Option<u64>,
}

/// The profiles that have a console attached: one client at a time.
#[derive(Debug, Default)]
pub struct Attached(Mutex<HashSet<String>>);

/// A profile's console, held by one session; released when dropped.
pub struct Claim {
    h: Arc<Handset>,
    name: String,
}

impl Attached {
    fn names(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Claim {
    fn take(h: &Arc<Handset>, name: &str) -> Result<Claim, Error> {
        if !h.consoles().names().insert(name.to_string()) {
            return Err(Error::Conflict(format!(
                "profile {name} already has a console attached (one at a time); detach that \
                 one first (Ctrl-] in it)"
            )));
        }
        Ok(Claim {
            h: h.clone(),
            name: name.to_string(),
        })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.h.consoles().names().remove(&self.name);
    }
}

/// Whether the request asks to switch to the console protocol.
fn wants_console(headers: &HeaderMap) -> bool {
    let has = |name: header::HeaderName, want: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(want)))
        })
    };
    has(header::CONNECTION, "upgrade") && has(header::UPGRADE, PROTOCOL)
}

/// The handler: checks the query, the profile, the upgrade request and that no other console
/// is attached, then answers 101 and serves the session on its own task.
pub async fn attach(
    State(h): State<Arc<Handset>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    UrlPath(name): UrlPath<String>,
    q: Result<Query<ConsoleQuery>, QueryRejection>,
    mut req: Request,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::from(Error::BadRequest(e.body_text())))?;
    let history = q.history.unwrap_or(HISTORY_DEFAULT);
    if history > HISTORY_MAX {
        return Err(Error::BadRequest(format!(
            "history {history} is above the maximum {HISTORY_MAX}"
        ))
        .into());
    }
    let checked =
        check(&h, &name, req.headers()).and_then(|pid| Ok((pid, Claim::take(&h, &name)?)));
    let (pid, claim) = crate::api::audited(&h, peer, &name, "console", checked)?;
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return Err(Error::Internal("this connection cannot switch protocols".into()).into());
    };
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let io = hyper_util::rt::TokioIo::new(upgraded);
                let why = session(&claim, pid, history, io).await;
                tracing::info!("{}: console detached: {why}", claim.name);
            }
            Err(e) => tracing::warn!("{}: console upgrade failed: {e}", claim.name),
        }
    });
    Ok((
        StatusCode::SWITCHING_PROTOCOLS,
        [(header::CONNECTION, "upgrade"), (header::UPGRADE, PROTOCOL)],
    )
        .into_response())
}

/// The profile's VMM pid if it has a console to attach to and the request asks to.
fn check(h: &Handset, name: &str, headers: &HeaderMap) -> Result<Option<i32>, Error> {
    let info = h.show(name)?;
    h.refuse_if_locked(name, "the console")?;
    if !wants_console(headers) {
        return Err(Error::UpgradeRequired(format!(
            "the console is a byte stream: ask with `Connection: Upgrade` and `Upgrade: \
             {PROTOCOL}` (pocketvisor profile console {name} does)"
        )));
    }
    if !matches!(info.state, ProfileState::Running | ProfileState::Paused) {
        return Err(Error::Conflict(format!(
            "profile {name} is {}: only a running or paused profile has a console (start it \
             with `pocketvisor profile start {name}`)",
            info.state.as_str()
        )));
    }
    Ok(info.pid)
}

/// Whether the profile still runs the VMM the session attached to.
fn same_vmm(h: &Handset, name: &str, pid: Option<i32>) -> bool {
    h.show(name).is_ok_and(|i| {
        matches!(i.state, ProfileState::Running | ProfileState::Paused) && i.pid == pid
    })
}

/// Serves one session until it ends; says why it ended.
async fn session<S: AsyncRead + AsyncWrite + Send + 'static>(
    claim: &Claim,
    pid: Option<i32>,
    history: u64,
    io: S,
) -> String {
    let (h, name) = (&claim.h, claim.name.as_str());
    let (mut from_client, mut to_client) = tokio::io::split(io);
    let log = h.dir().serial_log(name);
    let api = h.dir().api_socket(name);
    let why = {
        // The tail starts before any input is sent: the guest's answer to it is never missed.
        let mut tail = LogTail::new(&log, history);
        if let Err(e) = tail.start() {
            return format!("cannot read {}: {e}", log.display());
        }
        let output = pump_output(h, name, pid, tail, &mut to_client);
        let input = pump_input(&api, &mut from_client);
        tokio::pin!(output, input);
        let mut input_open = true;
        let why = loop {
            tokio::select! {
                why = &mut output => break why,
                why = &mut input, if input_open => match why {
                    Ended::ClientGone => break "the client left".to_string(),
                    Ended::Vmm(e) => {
                        // Output goes on until the VMM is seen gone.
                        tracing::info!("{name}: console input: {e}");
                        input_open = false;
                    }
                },
            }
        };
        why
    };
    let _ = to_client.shutdown().await;
    why
}

/// Sends the log's tail, then its new bytes as they come, until the VMM is gone, the client
/// stops reading or the daemon stops.
async fn pump_output<W: AsyncWrite + Unpin>(
    h: &Handset,
    name: &str,
    pid: Option<i32>,
    mut tail: LogTail,
    to_client: &mut W,
) -> String {
    let log = tail.path.clone();
    let mut checked = Instant::now();
    let mut gone = false;
    loop {
        let chunk = match tail.read_new() {
            Ok(c) => c,
            Err(e) => return format!("cannot read {}: {e}", log.display()),
        };
        if !chunk.is_empty() {
            if to_client.write_all(&chunk).await.is_err() || to_client.flush().await.is_err() {
                return "the client stopped reading".into();
            }
            continue;
        }
        if gone {
            return "the VMM ended".into();
        }
        if h.closing() {
            return "the daemon is stopping".into();
        }
        if checked.elapsed() >= STATE_POLL {
            checked = Instant::now();
            if crate::lock::is_locked(h.dir(), name) {
                return "the profile was locked".into();
            }
            // One more read after the VMM is seen gone: its last words are in the log.
            gone = !same_vmm(h, name, pid);
            if gone {
                continue;
            }
        }
        tokio::time::sleep(OUTPUT_POLL).await;
    }
}

/// How the input side ended.
enum Ended {
    /// The client closed its side.
    ClientGone,
    /// The VMM could not be reached or refused.
    Vmm(String),
}

/// Forwards the client's bytes to the guest's serial port until the client closes.
async fn pump_input<R: AsyncRead + Unpin>(api: &Path, from_client: &mut R) -> Ended {
    let mut vmm: Option<VmmInput> = None;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match from_client.read(&mut buf).await {
            Ok(0) | Err(_) => return Ended::ClientGone,
            Ok(n) => n,
        };
        if vmm.is_none() {
            match VmmInput::connect(api).await {
                Ok(v) => vmm = Some(v),
                Err(e) => return Ended::Vmm(format!("{}: {e}", api.display())),
            }
        }
        let Some(conn) = vmm.as_mut() else {
            continue;
        };
        if let Err(e) = conn.send(&buf[..n]).await {
            return Ended::Vmm(e);
        }
    }
}

/// One connection to the VMM's API socket, for `serial` input requests.
struct VmmInput {
    stream: BufReader<UnixStream>,
}

impl VmmInput {
    async fn connect(api: &Path) -> std::io::Result<Self> {
        Ok(Self {
            stream: BufReader::new(UnixStream::connect(api).await?),
        })
    }

    /// Types `bytes`, offering what the port could not take again for [`INPUT_PATIENCE`].
    async fn send(&mut self, mut bytes: &[u8]) -> Result<(), String> {
        let since = Instant::now();
        while !bytes.is_empty() {
            let accepted = self.request(bytes).await?.min(bytes.len());
            bytes = &bytes[accepted..];
            if bytes.is_empty() {
                break;
            }
            if since.elapsed() >= INPUT_PATIENCE {
                tracing::warn!(
                    "console input: the guest did not read {} bytes within {INPUT_PATIENCE:?}; \
                     dropped",
                    bytes.len()
                );
                break;
            }
            tokio::time::sleep(OUTPUT_POLL).await;
        }
        Ok(())
    }

    /// One `input` request; how many bytes the port took.
    async fn request(&mut self, bytes: &[u8]) -> Result<usize, String> {
        let req = vmm_api::control::serial_input(bytes);
        let line = vmm_api::ApiRequest::from(&req)
            .to_line()
            .map_err(|e| e.to_string())?;
        self.stream
            .get_mut()
            .write_all(line.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = String::new();
        self.stream
            .read_line(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        let info = vmm_api::ApiResponse::parse_line(&answer)
            .map_err(|e| format!("bad answer {answer:?}: {e}"))??;
        let outcome: serde_json::Value =
            serde_json::from_str(&info).map_err(|e| format!("bad answer {info:?}: {e}"))?;
        outcome["accepted"]
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| format!("bad answer {info:?}"))
    }
}

/// Follows a serial log that the VMM rotates (`serial.log` renamed to `serial.log.1` and
/// started anew): reads the old file to its end, then the new one from its start.
struct LogTail {
    path: PathBuf,
    /// The history to send, until the log has first been looked for.
    history: Option<u64>,
    file: Option<(File, u64)>,
}

impl LogTail {
    fn new(path: &Path, history: u64) -> Self {
        Self {
            path: path.to_path_buf(),
            history: Some(history),
            file: None,
        }
    }

    /// Opens the log at the history's start, if it exists yet (else the first
    /// [`Self::read_new`] that finds it does).
    fn start(&mut self) -> std::io::Result<()> {
        match (&self.file, self.history.take()) {
            (Some(_), _) => Ok(()),
            (None, Some(history)) => self.open_tail(history),
            // Created after the session began: all of it is new.
            (None, None) => self.open_from(0),
        }
    }

    /// The bytes written since the last call (at most [`CHUNK`]); empty if none.
    fn read_new(&mut self) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; CHUNK];
        if let Some((file, ino)) = &mut self.file {
            let n = file.read(&mut buf)?;
            if n > 0 {
                buf.truncate(n);
                return Ok(buf);
            }
            // At the end: a new file under the name means the old one was rotated away.
            match std::fs::metadata(&self.path) {
                Ok(m) if m.ino() != *ino => self.file = None,
                _ => return Ok(Vec::new()),
            }
            return self.open_from(0).map(|()| Vec::new());
        }
        self.start()?;
        Ok(Vec::new())
    }

    /// Opens the log (if it exists yet) `history` bytes before its end, at a line start.
    fn open_tail(&mut self, history: u64) -> std::io::Result<()> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        let start = meta.len().saturating_sub(history);
        let mut file = file;
        file.seek(SeekFrom::Start(start))?;
        if start > 0 {
            skip_partial_line(&mut file, start)?;
        }
        self.file = Some((file, meta.ino()));
        Ok(())
    }

    fn open_from(&mut self, at: u64) -> std::io::Result<()> {
        match File::open(&self.path) {
            Ok(mut f) => {
                f.seek(SeekFrom::Start(at))?;
                let ino = f.metadata()?.ino();
                self.file = Some((f, ino));
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Moves `file` (at offset `at` > 0) past the rest of a line cut by the history's start,
/// unless that leaves nothing to show.
fn skip_partial_line(file: &mut File, at: u64) -> std::io::Result<()> {
    let mut rest = Vec::new();
    file.by_ref().take(CHUNK as u64).read_to_end(&mut rest)?;
    let skip = rest
        .iter()
        .position(|&b| b == b'\n')
        .map_or(0, |i| i as u64 + 1);
    file.seek(SeekFrom::Start(at + skip))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn drain(t: &mut LogTail) -> Vec<u8> {
        let mut all = Vec::new();
        for _ in 0..4 {
            loop {
                let c = t.read_new().unwrap();
                if c.is_empty() {
                    break;
                }
                all.extend(c);
            }
        }
        all
    }

    #[test]
    fn the_tail_starts_at_a_line_and_follows_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("serial.log");
        let mut t = LogTail::new(&log, 10);
        assert!(drain(&mut t).is_empty(), "no log yet is no output");
        std::fs::write(&log, b"boot\n").unwrap();
        assert_eq!(
            drain(&mut t),
            b"boot\n",
            "a log created later is new output"
        );
        std::fs::write(&log, b"first line\nsecond\nthi").unwrap();
        let mut t = LogTail::new(&log, 10);
        // 10 bytes back is inside "second": the history starts at the next line.
        assert_eq!(drain(&mut t), b"thi");
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"rd\n").unwrap();
        assert_eq!(drain(&mut t), b"rd\n");
        f.write_all(b"before rotation\n").unwrap();
        std::fs::rename(&log, dir.path().join("serial.log.1")).unwrap();
        std::fs::write(&log, b"after rotation\n").unwrap();
        assert_eq!(drain(&mut t), b"before rotation\nafter rotation\n");
        let mut none = LogTail::new(&log, 0);
        assert!(
            drain(&mut none).is_empty(),
            "history 0 sends only new output"
        );
    }

    #[test]
    fn only_an_upgrade_to_the_console_protocol_is_accepted() {
        let mut h = HeaderMap::new();
        assert!(!wants_console(&h));
        h.insert(header::CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        assert!(!wants_console(&h));
        h.insert(header::UPGRADE, PROTOCOL.parse().unwrap());
        assert!(wants_console(&h));
    }
}
