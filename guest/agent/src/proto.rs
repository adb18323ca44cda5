//! The agent protocol: one JSON request line in, one JSON answer line out (the same as the
//! probe's agent mode, `guest/probe/PROTOCOL.md`, "Agent mode").
//!
//! Requests, answers, limits and their validation (unknown fields and ops, bad base64, sizes
//! over the limits, file names other than 1-128 of `[A-Za-z0-9._-]`, not starting with `.`,
//! no `..`) are the shared `agent-proto` crate's; this module keeps the state on disk.

use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use agent_proto::{answer, b64, Op, ProtoError, Request};

/// What this agent holds.
pub const LIMITS: agent_proto::Limits = agent_proto::LINUX;
/// Longest request line (a full file in base64 plus the JSON around it).
pub const LINE_MAX: usize = LIMITS.line_max();

/// Why a request failed: the protocol's reasons, or the guest's file system.
#[derive(Debug)]
enum Failure {
    Proto(ProtoError),
    Store(String),
}

impl From<ProtoError> for Failure {
    fn from(e: ProtoError) -> Failure {
        Failure::Proto(e)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Proto(e) => e.fmt(f),
            Failure::Store(e) => f.write_str(e),
        }
    }
}

/// Where the agent keeps things: `<dir>/clipboard` (+ `clipboard.mime`) and `<dir>/inbox/`.
/// The clipboard is a plain file so that guest programs can copy (write it) and paste
/// (read it) without a desktop.
#[derive(Debug, Clone)]
pub struct Agent {
    dir: PathBuf,
}

impl Agent {
    /// An agent over the state directory `dir` (created on demand).
    pub fn new(dir: &Path) -> Agent {
        Agent {
            dir: dir.to_path_buf(),
        }
    }

    /// The inbox directory.
    pub fn inbox(&self) -> PathBuf {
        self.dir.join("inbox")
    }

    /// Answers one request line (without its newline); the answer has no newline.
    pub fn handle_line(&self, line: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let result = Request::parse(line)
            .map_err(Failure::from)
            .and_then(|r| self.handle(&r, &mut out));
        if let Err(e) = result {
            out.clear();
            answer::error(&mut out, &e);
        }
        out
    }

    /// An answer to an overlong line.
    pub fn line_too_long() -> Vec<u8> {
        let mut out = Vec::new();
        answer::error(&mut out, &ProtoError::LineTooLong);
        out
    }

    fn handle(&self, r: &Request, out: &mut Vec<u8>) -> Result<(), Failure> {
        match r.op()? {
            Op::Health => answer::health(out, "linux", &LIMITS),
            Op::ClipboardGet => {
                let data = read_limited(&self.dir.join("clipboard"), LIMITS.max_clipboard)
                    .or_else(|e| match e {
                        ReadError::Missing => Ok(Vec::new()),
                        e => Err(e),
                    })
                    .map_err(|e| Failure::Store(format!("clipboard: {e}")))?;
                let mime = std::fs::read_to_string(self.dir.join("clipboard.mime"))
                    .ok()
                    .map(|m| m.trim().to_string())
                    .filter(|m| agent_proto::valid_mime(m))
                    .unwrap_or_else(|| agent_proto::DEFAULT_MIME.into());
                answer::clipboard(out, &mime, &data);
            }
            Op::ClipboardSet => {
                let mime = r.mime_or_default()?;
                let data = decode(r, LIMITS.max_clipboard, "clipboard data")?;
                self.write_atomic(&self.dir, "clipboard", &data)?;
                self.write_atomic(&self.dir, "clipboard.mime", mime.as_bytes())?;
                answer::stored(out, None, data.len());
            }
            Op::FilePut => {
                let name = r.file_name()?;
                let data = decode(r, LIMITS.max_file, "the file")?;
                let inbox = self.inbox();
                let exists = inbox.join(name).exists();
                if !exists && self.list()?.len() >= LIMITS.max_files {
                    return Err(ProtoError::InboxFull {
                        max: LIMITS.max_files,
                    }
                    .into());
                }
                self.write_atomic(&inbox, name, &data)?;
                answer::stored(out, Some(name), data.len());
            }
            Op::FileGet => {
                let name = r.file_name()?;
                let data = read_limited(&self.inbox().join(name), LIMITS.max_file).map_err(
                    |e| match e {
                        ReadError::Missing => Failure::Proto(ProtoError::NoSuchFile),
                        e => Failure::Store(format!("{name}: {e}")),
                    },
                )?;
                answer::file(out, name, &data);
            }
            Op::Twin => {
                // Where the guest's programs read it: `<dir>/twin`, the original's name.
                let name = r.file_name()?;
                self.write_atomic(&self.dir, "twin", format!("{name}\n").as_bytes())?;
                answer::twin(out, name);
            }
            Op::FileList => {
                let files = self.list()?;
                answer::file_list(out, files.iter().map(|(n, b)| (n.as_str(), *b)));
            }
        }
        Ok(())
    }

    /// The inbox's regular files with valid names, by name.
    fn list(&self) -> Result<Vec<(String, u64)>, Failure> {
        let rd = match std::fs::read_dir(self.inbox()) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(Failure::Store(format!("inbox: {e}"))),
        };
        let mut out = vec![];
        for e in rd.flatten() {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if agent_proto::valid_file_name(&name) && meta.is_file() {
                out.push((name, meta.len()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Replaces `dir/name` with `data` (temporary file, fsync, rename).
    fn write_atomic(&self, dir: &Path, name: &str, data: &[u8]) -> Result<(), Failure> {
        let err = |e: std::io::Error| Failure::Store(format!("cannot store {name}: {e}"));
        std::fs::create_dir_all(dir).map_err(err)?;
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut f = File::create(&tmp).map_err(err)?;
        f.write_all(data).and_then(|_| f.sync_all()).map_err(err)?;
        std::fs::rename(&tmp, dir.join(name)).map_err(err)
    }
}

/// The request's data, at most `max` bytes once decoded.
fn decode(r: &Request, max: usize, what: &'static str) -> Result<Vec<u8>, ProtoError> {
    let data = b64::decode(r.data_b64(what, max)?)?;
    if data.len() > max {
        return Err(ProtoError::TooLarge { what, max });
    }
    Ok(data)
}

#[derive(Debug)]
enum ReadError {
    Missing,
    TooLarge(usize),
    Io(std::io::Error),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::Missing => write!(f, "missing"),
            ReadError::TooLarge(max) => write!(f, "larger than {max} bytes"),
            ReadError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Reads a regular file (not through a symlink) of at most `max` bytes.
fn read_limited(path: &Path, max: usize) -> Result<Vec<u8>, ReadError> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ReadError::Missing,
            _ => ReadError::Io(e),
        })?;
    let meta = f.metadata().map_err(ReadError::Io)?;
    if !meta.is_file() {
        return Err(ReadError::Missing);
    }
    let mut data = Vec::new();
    f.take(max as u64 + 1)
        .read_to_end(&mut data)
        .map_err(ReadError::Io)?;
    if data.len() > max {
        return Err(ReadError::TooLarge(max));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn call(a: &Agent, req: Value) -> Value {
        serde_json::from_slice(&a.handle_line(req.to_string().as_bytes())).unwrap()
    }

    fn tmp() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let d = std::env::temp_dir().join(format!("pv-agent-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_twin_notice_is_written_where_programs_read_it() {
        let d = tmp();
        let a = Agent::new(&d);
        let t = call(&a, json!({"op": "twin", "name": "work"}));
        assert_eq!(t, json!({"ok": true, "twin_of": "work"}));
        assert_eq!(std::fs::read_to_string(d.join("twin")).unwrap(), "work\n");
        // A name that is no plain name is refused and changes nothing.
        let bad = call(&a, json!({"op": "twin", "name": "../etc/passwd"}));
        assert_eq!(bad["ok"], false, "{bad}");
        assert_eq!(std::fs::read_to_string(d.join("twin")).unwrap(), "work\n");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn health_and_clipboard_round_trip() {
        let d = tmp();
        let a = Agent::new(&d);
        let h = call(&a, json!({"op": "health"}));
        assert_eq!(h["ok"], true);
        assert_eq!(h["agent"], "linux");
        assert_eq!(h["max_clipboard"], LIMITS.max_clipboard);
        // Empty before anything was copied.
        let g = call(&a, json!({"op": "clipboard_get"}));
        assert_eq!(g, json!({"ok": true, "mime": "text/plain", "data_b64": ""}));
        let s = call(
            &a,
            json!({"op": "clipboard_set", "mime": "text/html", "data_b64": b64::encode(b"<b>hi</b>")}),
        );
        assert_eq!(s, json!({"ok": true, "bytes": 9}));
        let g = call(&a, json!({"op": "clipboard_get"}));
        assert_eq!(g["mime"], "text/html");
        assert_eq!(
            b64::decode(g["data_b64"].as_str().unwrap()).unwrap(),
            b"<b>hi</b>"
        );
        // A guest program "copies" by writing the file.
        std::fs::write(d.join("clipboard"), b"from the guest").unwrap();
        let g = call(&a, json!({"op": "clipboard_get"}));
        assert_eq!(
            b64::decode(g["data_b64"].as_str().unwrap()).unwrap(),
            b"from the guest"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn files_are_stored_listed_and_read_back() {
        let d = tmp();
        let a = Agent::new(&d);
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
        let p = call(
            &a,
            json!({"op": "file_put", "name": "r.bin", "data_b64": b64::encode(&data)}),
        );
        assert_eq!(p, json!({"ok": true, "name": "r.bin", "bytes": 5000}));
        assert_eq!(std::fs::read(d.join("inbox/r.bin")).unwrap(), data);
        let g = call(&a, json!({"op": "file_get", "name": "r.bin"}));
        assert_eq!(b64::decode(g["data_b64"].as_str().unwrap()).unwrap(), data);
        let l = call(&a, json!({"op": "file_list"}));
        assert_eq!(
            l,
            json!({"ok": true, "files": [{"name": "r.bin", "bytes": 5000}]})
        );
        let missing = call(&a, json!({"op": "file_get", "name": "nope"}));
        assert_eq!(missing, json!({"ok": false, "error": "no such file"}));
        // A symlink planted in the inbox is neither listed nor followed.
        std::os::unix::fs::symlink("/etc/passwd", d.join("inbox/link")).unwrap();
        assert_eq!(
            call(&a, json!({"op": "file_list"}))["files"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            call(&a, json!({"op": "file_get", "name": "link"}))["ok"],
            false
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn hostile_requests_are_refused() {
        let d = tmp();
        let a = Agent::new(&d);
        let bad = [
            json!({"op": "file_put", "name": "../x", "data_b64": "aGk="}),
            json!({"op": "file_put", "name": "a/b", "data_b64": "aGk="}),
            json!({"op": "file_put", "name": ".hidden", "data_b64": "aGk="}),
            json!({"op": "file_put", "name": "x", "data_b64": "a!k="}),
            json!({"op": "file_put", "name": "x"}),
            json!({"op": "file_get", "name": "/etc/passwd"}),
            json!({"op": "clipboard_set", "mime": "text plain", "data_b64": ""}),
            json!({"op": "clipboard_set", "data_b64": b64::encode(&vec![0u8; LIMITS.max_clipboard + 1])}),
            json!({"op": "rm", "name": "x"}),
            json!({"op": "health", "extra": 1}),
        ];
        for req in bad {
            let r = call(&a, req.clone());
            assert_eq!(r["ok"], false, "{req} -> {r}");
            assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
        for line in [&b"not json"[..], b"", b"[1,2]", b"{\"op\":7}"] {
            let r: Value = serde_json::from_slice(&a.handle_line(line)).unwrap();
            assert_eq!(r["ok"], false);
        }
        // Nothing was written outside (or inside) the state directory.
        assert!(!d.join("inbox").exists());
        let _ = std::fs::remove_dir_all(&d);
    }
}
