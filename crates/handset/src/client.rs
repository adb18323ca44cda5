//! A small blocking HTTP/1.1 client for the daemon's unix socket (used by the CLI and tests).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api_types::ErrorBody;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nobody listens on the socket.
    #[error("the handset daemon is not running (no {0}); start it with `pocketvisor handset --state-dir DIR`")]
    NotRunning(PathBuf),
    /// The socket could not be used.
    #[error("talking to the handset daemon at {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The daemon answered with an error status.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The daemon's message.
        message: String,
    },
    /// The answer could not be understood.
    #[error("bad answer from the handset daemon: {0}")]
    BadAnswer(String),
    /// The daemon took longer than the client waits (it may still finish the request).
    #[error(
        "the handset daemon at {path} did not answer within {secs} s; it may still be working on \
         the request (see `pocketvisor profile list`); wait longer with \
         {TIMEOUT_ENV}=SECONDS"
    )]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// How long the client waited.
        secs: u64,
    },
}

/// The environment variable that sets how long a client waits for an answer, in seconds.
pub const TIMEOUT_ENV: &str = "POCKETVISOR_CLIENT_TIMEOUT";
/// How long a client waits for an answer when [`TIMEOUT_ENV`] does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a stream (server-sent events; the daemon sends a comment every 15 s) may stay
/// silent before the client gives up, when [`TIMEOUT_ENV`] does not say.
pub const DEFAULT_STREAM_SILENCE: Duration = Duration::from_secs(60);

/// The wait [`TIMEOUT_ENV`] asks for (whole seconds, at least 1), if it says.
fn env_timeout() -> Option<Duration> {
    std::env::var(TIMEOUT_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map(Duration::from_secs)
}

/// The wait [`TIMEOUT_ENV`] asks for, else [`DEFAULT_TIMEOUT`].
fn timeout_from_env() -> Duration {
    env_timeout().unwrap_or(DEFAULT_TIMEOUT)
}

/// A raw HTTP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// A client for one daemon socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client for the daemon listening on `socket`, waiting for each answer as long as
    /// [`TIMEOUT_ENV`] says (default [`DEFAULT_TIMEOUT`]).
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
            timeout: timeout_from_env(),
        }
    }

    /// The same client, waiting `timeout` for each answer.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The error for a failed read or write: a timeout says so in words (a socket timeout
    /// surfaces as EAGAIN, "Resource temporarily unavailable").
    fn io_error(&self, source: std::io::Error) -> ClientError {
        match source.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ClientError::Timeout {
                path: self.socket.clone(),
                secs: self.timeout.as_secs(),
            },
            _ => ClientError::Io {
                path: self.socket.clone(),
                source,
            },
        }
    }

    /// Sends one request; returns the status and body whatever the status.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Answer, ClientError> {
        let io = |source| self.io_error(source);
        let mut s = UnixStream::connect(&self.socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning(self.socket.clone())
            }
            _ => ClientError::Io {
                path: self.socket.clone(),
                source: e,
            },
        })?;
        s.set_read_timeout(Some(self.timeout)).map_err(io)?;
        let body = body.unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: handset\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str("\r\n");
        let mut msg = req.into_bytes();
        msg.extend_from_slice(body);
        s.write_all(&msg).map_err(io)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).map_err(io)?;
        parse_response(&raw).map_err(ClientError::BadAnswer)
    }

    /// Asks `GET path` to switch to `protocol` (`Connection: Upgrade`); on `101 Switching
    /// Protocols` returns the connection, now a byte stream each way, with the bytes that
    /// came after the answer's head. Any other answer is an error with the daemon's message.
    pub fn upgrade(
        &self,
        path: &str,
        protocol: &str,
    ) -> Result<(UnixStream, Vec<u8>), ClientError> {
        let io = |source| self.io_error(source);
        let mut s = UnixStream::connect(&self.socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning(self.socket.clone())
            }
            _ => ClientError::Io {
                path: self.socket.clone(),
                source: e,
            },
        })?;
        s.set_read_timeout(Some(self.timeout)).map_err(io)?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: handset\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n\r\n"
        );
        s.write_all(req.as_bytes()).map_err(io)?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 4096];
        let end = loop {
            if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            if raw.len() > 64 * 1024 {
                return Err(ClientError::BadAnswer("an answer head over 64 KiB".into()));
            }
            let n = s.read(&mut buf).map_err(io)?;
            if n == 0 {
                return Err(ClientError::BadAnswer(
                    "the daemon closed the connection".into(),
                ));
            }
            raw.extend_from_slice(buf.get(..n).unwrap_or_default());
        };
        let head = String::from_utf8_lossy(raw.get(..end).unwrap_or_default()).into_owned();
        let status: Option<u16> = head.split_whitespace().nth(1).and_then(|v| v.parse().ok());
        if status == Some(101) {
            s.set_read_timeout(None).map_err(io)?;
            let rest = raw.get(end + 4..).unwrap_or_default().to_vec();
            return Ok((s, rest));
        }
        // An error answer: read its body (Content-Length) and report its message.
        let length = head
            .split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse::<usize>().ok())
            .unwrap_or(0)
            .min(1 << 20);
        while raw.len() < end + 4 + length {
            let n = s.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(buf.get(..n).unwrap_or_default());
        }
        let a = parse_response(&raw).map_err(ClientError::BadAnswer)?;
        let message = serde_json::from_slice::<ErrorBody>(&a.body)
            .map(|b| b.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&a.body).into_owned());
        Err(ClientError::Api {
            status: a.status,
            message,
        })
    }

    /// Sends a request with an optional JSON body and decodes a JSON answer; error statuses
    /// become [`ClientError::Api`] with the daemon's message.
    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let data = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        let a = self.raw(method, path, data.as_deref())?;
        if !(200..300).contains(&a.status) {
            let message = serde_json::from_slice::<ErrorBody>(&a.body)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&a.body).into_owned());
            return Err(ClientError::Api {
                status: a.status,
                message,
            });
        }
        let body = if a.body.is_empty() {
            &b"null"[..]
        } else {
            &a.body
        };
        serde_json::from_slice(body).map_err(|e| ClientError::BadAnswer(e.to_string()))
    }
}

/// The longest line [`Client::stream_lines`] accepts.
const STREAM_LINE_MAX: usize = 1 << 20;

impl Client {
    /// `GET path` of a streaming answer (server-sent events): hands each line of the body
    /// (without its line end) to `on_line` until it returns false or the daemon ends the
    /// stream. An error status is [`ClientError::Api`] with the daemon's message; a daemon
    /// silent for [`DEFAULT_STREAM_SILENCE`] (it sends a comment every 15 s), or as long as
    /// [`TIMEOUT_ENV`] says when set, is [`ClientError::Timeout`].
    pub fn stream_lines(
        &self,
        path: &str,
        mut on_line: impl FnMut(&str) -> bool,
    ) -> Result<(), ClientError> {
        use std::io::BufRead;
        let silence = env_timeout().unwrap_or(DEFAULT_STREAM_SILENCE);
        let io = |source| match self.io_error(source) {
            ClientError::Timeout { path, .. } => ClientError::Timeout {
                path,
                secs: silence.as_secs(),
            },
            other => other,
        };
        let bad = |what: &str| ClientError::BadAnswer(what.to_string());
        let mut s = UnixStream::connect(&self.socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning(self.socket.clone())
            }
            _ => ClientError::Io {
                path: self.socket.clone(),
                source: e,
            },
        })?;
        s.set_read_timeout(Some(silence)).map_err(io)?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: handset\r\nConnection: close\r\nAccept: text/event-stream\r\n\r\n"
        );
        s.write_all(req.as_bytes()).map_err(io)?;
        let mut r = std::io::BufReader::new(s);
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let before = head.len();
            (&mut r)
                .take(8192)
                .read_until(b'\n', &mut head)
                .map_err(io)?;
            if head.len() == before || head.len() > 65536 {
                return Err(bad("the stream ended inside the headers"));
            }
        }
        let status: u16 = std::str::from_utf8(&head)
            .ok()
            .and_then(|h| h.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad("bad status line"))?;
        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let chunked = text.contains("transfer-encoding: chunked");
        if status != 200 {
            let mut rest = Vec::new();
            r.take(1 << 20).read_to_end(&mut rest).map_err(io)?;
            head.extend_from_slice(&rest);
            let a = parse_response(&head).map_err(ClientError::BadAnswer)?;
            let message = serde_json::from_slice::<ErrorBody>(&a.body)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&a.body).into_owned());
            return Err(ClientError::Api { status, message });
        }
        let mut pending: Vec<u8> = Vec::new();
        let mut deliver = |bytes: &[u8], pending: &mut Vec<u8>| -> Result<bool, ClientError> {
            pending.extend_from_slice(bytes);
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                let line = String::from_utf8_lossy(&line);
                if !on_line(line.trim_end_matches(['\n', '\r'])) {
                    return Ok(false);
                }
            }
            if pending.len() > STREAM_LINE_MAX {
                return Err(bad("a streamed line is longer than 1 MiB"));
            }
            Ok(true)
        };
        loop {
            let mut chunk = Vec::new();
            if chunked {
                let mut size_line = Vec::new();
                (&mut r)
                    .take(64)
                    .read_until(b'\n', &mut size_line)
                    .map_err(io)?;
                let size_text =
                    std::str::from_utf8(&size_line).map_err(|_| bad("bad chunk size"))?;
                let size =
                    usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| bad("bad chunk size"))?;
                if size == 0 {
                    return Ok(());
                }
                if size > STREAM_LINE_MAX {
                    return Err(bad("a chunk is larger than 1 MiB"));
                }
                chunk.resize(size + 2, 0);
                r.read_exact(&mut chunk).map_err(io)?;
                chunk.truncate(size);
            } else {
                (&mut r)
                    .take(65536)
                    .read_until(b'\n', &mut chunk)
                    .map_err(io)?;
                if chunk.is_empty() {
                    return Ok(());
                }
            }
            if !deliver(&chunk, &mut pending)? {
                return Ok(());
            }
        }
    }
}

/// Splits a complete HTTP/1.1 response into status and (de-chunked) body.
pub fn parse_response(raw: &[u8]) -> Result<Answer, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(raw.get(..end).unwrap_or_default())
        .map_err(|_| "headers are not UTF-8")?;
    let body = raw.get(end + 4..).unwrap_or_default();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or("bad status line")?;
    let mut chunked = false;
    let mut length = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let v = v.trim();
            if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k.eq_ignore_ascii_case("content-length") {
                length = v.parse::<usize>().ok();
            }
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else {
        match length {
            Some(n) => body
                .get(..n)
                .ok_or("body shorter than Content-Length")?
                .to_vec(),
            None => body.to_vec(),
        }
    };
    Ok(Answer { status, body })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let nl = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("bad chunk header")?;
        let size_text = std::str::from_utf8(data.get(..nl).unwrap_or_default())
            .map_err(|_| "bad chunk size")?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| "bad chunk size")?;
        data = data.get(nl + 2..).unwrap_or_default();
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(data.get(..size).ok_or("truncated chunk")?);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_daemon_that_does_not_answer_in_time_is_a_timeout_in_words() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("h.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let c = Client::new(&socket).with_timeout(Duration::from_millis(200));
        let e = c.raw("GET", "/v1/handset", None).unwrap_err();
        assert!(matches!(e, ClientError::Timeout { secs: 0, .. }), "{e:?}");
        assert!(e.to_string().contains("did not answer within"), "{e}");
        assert!(e.to_string().contains(TIMEOUT_ENV), "{e}");
    }

    #[test]
    fn parses_plain_and_chunked() {
        let a = parse_response(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((a.status, a.body.as_slice()), (201, &b"{}"[..]));
        let c = parse_response(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(c.body, b"abcde");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn missing_daemon_says_how_to_start_it() {
        let e = Client::new(Path::new("/nonexistent/handset.sock"))
            .raw("GET", "/v1/handset", None)
            .unwrap_err();
        assert!(e.to_string().contains("pocketvisor handset"), "{e}");
    }
}
