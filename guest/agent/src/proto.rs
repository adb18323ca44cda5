//! The agent protocol: one JSON request line in, one JSON answer line out (the same as the
//! probe's agent mode, `guest/probe/PROTOCOL.md`, "Agent mode").
//!
//! Everything the host sends is checked: unknown fields and ops, bad base64, sizes over the
//! limits, file names other than 1-128 of `[A-Za-z0-9._-]` (not starting with `.`, no `..`).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};

/// Protocol version.
pub const VERSION: u32 = 1;
/// Largest clipboard content in bytes.
pub const MAX_CLIPBOARD: usize = 1 << 20;
/// Largest file in bytes.
pub const MAX_FILE: usize = 64 << 20;
/// Files the inbox holds.
pub const MAX_FILES: usize = 1024;
/// Longest file name.
pub const NAME_MAX: usize = 128;
/// Longest request line (a full file in base64 plus the JSON around it).
pub const LINE_MAX: usize = MAX_FILE.div_ceil(3) * 4 + 4096;

/// One request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    op: String,
    #[serde(default)]
    mime: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    data_b64: Option<String>,
}

/// Where the agent keeps things: `<dir>/clipboard` (+ `clipboard.mime`) and `<dir>/inbox/`.
/// The clipboard is a plain file so that guest programs can copy (write it) and paste
/// (read it) without a desktop.
#[derive(Debug, Clone)]
pub struct Agent {
    dir: PathBuf,
}

type Answer = Result<Value, String>;

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
    pub fn handle_line(&self, line: &[u8]) -> String {
        let answer = serde_json::from_slice::<Request>(line)
            .map_err(|e| format!("bad request: {e}"))
            .and_then(|r| self.handle(&r));
        match answer {
            Ok(mut v) => {
                v["ok"] = Value::Bool(true);
                v.to_string()
            }
            Err(e) => json!({"ok": false, "error": e}).to_string(),
        }
    }

    fn handle(&self, r: &Request) -> Answer {
        match r.op.as_str() {
            "health" => Ok(json!({
                "agent": "linux",
                "version": VERSION,
                "max_clipboard": MAX_CLIPBOARD,
                "max_file": MAX_FILE,
                "max_files": MAX_FILES,
            })),
            "clipboard_get" => {
                let data = read_limited(&self.dir.join("clipboard"), MAX_CLIPBOARD)
                    .or_else(|e| match e {
                        ReadError::Missing => Ok(Vec::new()),
                        e => Err(e),
                    })
                    .map_err(|e| format!("clipboard: {e}"))?;
                let mime = std::fs::read_to_string(self.dir.join("clipboard.mime"))
                    .ok()
                    .map(|m| m.trim().to_string())
                    .filter(|m| valid_mime(m))
                    .unwrap_or_else(|| "text/plain".into());
                Ok(json!({"mime": mime, "data_b64": b64_encode(&data)}))
            }
            "clipboard_set" => {
                let mime = r.mime.as_deref().unwrap_or("text/plain");
                if !valid_mime(mime) {
                    return Err("bad mime type".into());
                }
                let data = decode(r, MAX_CLIPBOARD, "clipboard data")?;
                self.write_atomic(&self.dir, "clipboard", &data)?;
                self.write_atomic(&self.dir, "clipboard.mime", mime.as_bytes())?;
                Ok(json!({"bytes": data.len()}))
            }
            "file_put" => {
                let name = checked_name(r)?;
                let data = decode(r, MAX_FILE, "the file")?;
                let inbox = self.inbox();
                let exists = inbox.join(name).exists();
                if !exists && self.list()?.len() >= MAX_FILES {
                    return Err(format!("the inbox is full ({MAX_FILES} files)"));
                }
                self.write_atomic(&inbox, name, &data)?;
                Ok(json!({"name": name, "bytes": data.len()}))
            }
            "file_get" => {
                let name = checked_name(r)?;
                let data =
                    read_limited(&self.inbox().join(name), MAX_FILE).map_err(|e| match e {
                        ReadError::Missing => "no such file".to_string(),
                        e => format!("{name}: {e}"),
                    })?;
                Ok(json!({"name": name, "data_b64": b64_encode(&data)}))
            }
            "file_list" => {
                let files: Vec<Value> = self
                    .list()?
                    .into_iter()
                    .map(|(name, bytes)| json!({"name": name, "bytes": bytes}))
                    .collect();
                Ok(json!({ "files": files }))
            }
            _ => Err("unknown op".into()),
        }
    }

    /// The inbox's regular files with valid names, by name.
    fn list(&self) -> Result<Vec<(String, u64)>, String> {
        let rd = match std::fs::read_dir(self.inbox()) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(format!("inbox: {e}")),
        };
        let mut out = vec![];
        for e in rd.flatten() {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if valid_name(&name) && meta.is_file() {
                out.push((name, meta.len()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Replaces `dir/name` with `data` (temporary file, fsync, rename).
    fn write_atomic(&self, dir: &Path, name: &str, data: &[u8]) -> Result<(), String> {
        let err = |e: std::io::Error| format!("cannot store {name}: {e}");
        std::fs::create_dir_all(dir).map_err(err)?;
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut f = File::create(&tmp).map_err(err)?;
        f.write_all(data).and_then(|_| f.sync_all()).map_err(err)?;
        std::fs::rename(&tmp, dir.join(name)).map_err(err)
    }
}

fn checked_name(r: &Request) -> Result<&str, String> {
    let name = r.name.as_deref().ok_or("name is missing")?;
    if valid_name(name) {
        Ok(name)
    } else {
        Err("bad file name".into())
    }
}

fn decode(r: &Request, max: usize, what: &str) -> Result<Vec<u8>, String> {
    let s = r.data_b64.as_deref().ok_or("data_b64 is missing")?;
    if s.len() > max.div_ceil(3) * 4 {
        return Err(format!("{what} is larger than {max} bytes"));
    }
    let data = b64_decode(s).ok_or("data_b64 is not valid base64")?;
    if data.len() > max {
        return Err(format!("{what} is larger than {max} bytes"));
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

/// File names: 1..=128 of `[A-Za-z0-9._-]`, not starting with `.`, without `..`.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= NAME_MAX
        && !n.starts_with('.')
        && !n.contains("..")
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// MIME types: 1..=64 of `[A-Za-z0-9/+.;=-]`.
pub fn valid_mime(m: &str) -> bool {
    !m.is_empty()
        && m.len() <= 64
        && m.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'/' | b'+' | b'.' | b';' | b'=' | b'-')
        })
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard padded base64.
pub fn b64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let mut v = 0u32;
        for i in 0..3 {
            v = v << 8 | u32::from(chunk.get(i).copied().unwrap_or(0));
        }
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[(v >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard padded base64; `None` if it is not valid.
pub fn b64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if !s.len().is_multiple_of(4) {
        return None;
    }
    let pad = s.iter().rev().take_while(|&&c| c == b'=').count();
    if pad > 2 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let body = s.len() - pad;
    for (qi, q) in s.chunks(4).enumerate() {
        let mut v = 0u32;
        for (i, &c) in q.iter().enumerate() {
            let d = if qi * 4 + i >= body {
                0
            } else {
                match c {
                    b'A'..=b'Z' => c - b'A',
                    b'a'..=b'z' => c - b'a' + 26,
                    b'0'..=b'9' => c - b'0' + 52,
                    b'+' => 62,
                    b'/' => 63,
                    _ => return None,
                }
            };
            v = v << 6 | u32::from(d);
        }
        out.extend_from_slice(&[(v >> 16) as u8, (v >> 8) as u8, v as u8]);
    }
    out.truncate(s.len() / 4 * 3 - pad);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(a: &Agent, req: Value) -> Value {
        serde_json::from_str(&a.handle_line(req.to_string().as_bytes())).unwrap()
    }

    fn tmp() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let d = std::env::temp_dir().join(format!("pv-agent-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn health_and_clipboard_round_trip() {
        let d = tmp();
        let a = Agent::new(&d);
        let h = call(&a, json!({"op": "health"}));
        assert_eq!(h["ok"], true);
        assert_eq!(h["agent"], "linux");
        assert_eq!(h["max_clipboard"], MAX_CLIPBOARD);
        // Empty before anything was copied.
        let g = call(&a, json!({"op": "clipboard_get"}));
        assert_eq!(g, json!({"ok": true, "mime": "text/plain", "data_b64": ""}));
        let s = call(
            &a,
            json!({"op": "clipboard_set", "mime": "text/html", "data_b64": b64_encode(b"<b>hi</b>")}),
        );
        assert_eq!(s, json!({"ok": true, "bytes": 9}));
        let g = call(&a, json!({"op": "clipboard_get"}));
        assert_eq!(g["mime"], "text/html");
        assert_eq!(
            b64_decode(g["data_b64"].as_str().unwrap()).unwrap(),
            b"<b>hi</b>"
        );
        // A guest program "copies" by writing the file.
        std::fs::write(d.join("clipboard"), b"from the guest").unwrap();
        let g = call(&a, json!({"op": "clipboard_get"}));
        assert_eq!(
            b64_decode(g["data_b64"].as_str().unwrap()).unwrap(),
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
            json!({"op": "file_put", "name": "r.bin", "data_b64": b64_encode(&data)}),
        );
        assert_eq!(p, json!({"ok": true, "name": "r.bin", "bytes": 5000}));
        assert_eq!(std::fs::read(d.join("inbox/r.bin")).unwrap(), data);
        let g = call(&a, json!({"op": "file_get", "name": "r.bin"}));
        assert_eq!(b64_decode(g["data_b64"].as_str().unwrap()).unwrap(), data);
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
            json!({"op": "clipboard_set", "data_b64": b64_encode(&vec![0u8; MAX_CLIPBOARD + 1])}),
            json!({"op": "rm", "name": "x"}),
            json!({"op": "health", "extra": 1}),
        ];
        for req in bad {
            let r = call(&a, req.clone());
            assert_eq!(r["ok"], false, "{req} -> {r}");
            assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
        for line in [&b"not json"[..], b"", b"[1,2]", b"{\"op\":7}"] {
            let r: Value = serde_json::from_str(&a.handle_line(line)).unwrap();
            assert_eq!(r["ok"], false);
        }
        // Nothing was written outside (or inside) the state directory.
        assert!(!d.join("inbox").exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(b64_encode(b""), "");
        assert_eq!(b64_encode(b"f"), "Zg==");
        assert_eq!(b64_encode(b"fo"), "Zm8=");
        assert_eq!(b64_encode(b"foobar"), "Zm9vYmFy");
        for n in 0..20usize {
            let v: Vec<u8> = (0..n as u8).map(|b| b.wrapping_mul(91)).collect();
            assert_eq!(b64_decode(&b64_encode(&v)).unwrap(), v);
        }
        for bad in ["Z", "Zg=", "Z===", "Zg=a", "====", "Zm9v YmFy"] {
            assert!(b64_decode(bad).is_none(), "{bad}");
        }
        assert!(valid_name("a.b-c_d"));
        assert!(!valid_name("a..b"));
    }
}
