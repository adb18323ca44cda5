//! Answers: one JSON object per request, `{"ok":true,...}` or `{"ok":false,"error":".."}`.
//! The agents write them with the functions here (into any [`Sink`], no allocator needed);
//! the host reads them as an [`Answer`] (feature `serde`).

use core::fmt::{self, Write};

use crate::{b64, Limits, VERSION};

/// Where an answer or request is written: the probe's fixed buffers, a `Vec<u8>`.
pub trait Sink {
    /// Appends `bytes` (a sink that is full remembers it and drops the rest).
    fn push(&mut self, bytes: &[u8]);
}

#[cfg(feature = "alloc")]
impl Sink for alloc::vec::Vec<u8> {
    fn push(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// `core::fmt` output into a [`Sink`], for numbers.
struct Fmt<'s, S: ?Sized>(&'s mut S);

impl<S: Sink + ?Sized> Write for Fmt<'_, S> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.push(s.as_bytes());
        Ok(())
    }
}

/// `core::fmt` output into a [`Sink`] as the inside of a JSON string.
struct Escaped<'s, S: ?Sized>(&'s mut S);

impl<S: Sink + ?Sized> Write for Escaped<'_, S> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for part in s.split_inclusive(|c: char| c == '"' || c == '\\' || c.is_control()) {
            let mut chars = part.chars();
            match chars.next_back() {
                Some(c) if c == '"' || c == '\\' => {
                    self.0.push(chars.as_str().as_bytes());
                    self.0.push(&[b'\\', c as u8]);
                }
                Some(c) if c.is_control() => {
                    self.0.push(chars.as_str().as_bytes());
                    let mut u = Fmt(&mut *self.0);
                    write!(u, "\\u{:04x}", u32::from(c))?;
                }
                _ => self.0.push(part.as_bytes()),
            }
        }
        Ok(())
    }
}

/// `{"ok":true,"agent":"<agent>","version":1,"max_clipboard":..,"max_file":..,"max_files":..}`.
pub fn health<S: Sink + ?Sized>(out: &mut S, agent: &str, limits: &Limits) {
    out.push(b"{\"ok\":true,\"agent\":\"");
    let _ = Escaped(&mut *out).write_str(agent);
    let _ = write!(
        Fmt(out),
        "\",\"version\":{VERSION},\"max_clipboard\":{},\"max_file\":{},\"max_files\":{}}}",
        limits.max_clipboard,
        limits.max_file,
        limits.max_files
    );
}

/// `{"ok":true,"mime":"<mime>","data_b64":"<data>"}` (`mime` already validated).
pub fn clipboard<S: Sink + ?Sized>(out: &mut S, mime: &str, data: &[u8]) {
    out.push(b"{\"ok\":true,\"mime\":\"");
    let _ = Escaped(&mut *out).write_str(mime);
    out.push(b"\",\"data_b64\":\"");
    b64::encode_to(data, out);
    out.push(b"\"}");
}

/// `{"ok":true,"name":"<name>","data_b64":"<data>"}` (`name` already validated).
pub fn file<S: Sink + ?Sized>(out: &mut S, name: &str, data: &[u8]) {
    out.push(b"{\"ok\":true,\"name\":\"");
    let _ = Escaped(&mut *out).write_str(name);
    out.push(b"\",\"data_b64\":\"");
    b64::encode_to(data, out);
    out.push(b"\"}");
}

/// What `clipboard_set` (`name` = None) and `file_put` answer: `{"ok":true[,"name":..],"bytes":n}`.
pub fn stored<S: Sink + ?Sized>(out: &mut S, name: Option<&str>, bytes: usize) {
    out.push(b"{\"ok\":true,");
    if let Some(name) = name {
        out.push(b"\"name\":\"");
        let _ = Escaped(&mut *out).write_str(name);
        out.push(b"\",");
    }
    let _ = write!(Fmt(out), "\"bytes\":{bytes}}}");
}

/// What `twin` answers: `{"ok":true,"twin_of":"<name>"}`.
pub fn twin<S: Sink + ?Sized>(out: &mut S, name: &str) {
    out.push(b"{\"ok\":true,\"twin_of\":\"");
    let _ = Escaped(&mut *out).write_str(name);
    out.push(b"\"}");
}

/// `{"ok":true,"files":[{"name":..,"bytes":..},...]}`.
pub fn file_list<'n, S, I>(out: &mut S, files: I)
where
    S: Sink + ?Sized,
    I: IntoIterator<Item = (&'n str, u64)>,
{
    out.push(b"{\"ok\":true,\"files\":[");
    for (i, (name, bytes)) in files.into_iter().enumerate() {
        out.push(if i == 0 {
            b"{\"name\":\""
        } else {
            b",{\"name\":\""
        });
        let _ = Escaped(&mut *out).write_str(name);
        let _ = write!(Fmt(&mut *out), "\",\"bytes\":{bytes}}}");
    }
    out.push(b"]}");
}

/// `{"ok":false,"error":"<why>"}`, `why` escaped as JSON needs.
pub fn error<S: Sink + ?Sized>(out: &mut S, why: &dyn fmt::Display) {
    out.push(b"{\"ok\":false,\"error\":\"");
    let _ = write!(Escaped(&mut *out), "{why}");
    out.push(b"\"}");
}

/// An inbox entry in a `file_list` answer.
#[cfg(feature = "serde")]
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct FileEntry {
    /// The file name.
    pub name: alloc::string::String,
    /// Its size.
    pub bytes: u64,
}

/// Any answer, as the host reads it: `ok` and the fields the ops may carry. Fields are
/// as the agent sent them (unchecked): validate before use.
#[cfg(feature = "serde")]
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct Answer {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Why not.
    #[serde(default)]
    pub error: Option<alloc::string::String>,
    /// `health`: the agent's kind (`linux`, `probe`).
    #[serde(default)]
    pub agent: Option<alloc::string::String>,
    /// `health`: the protocol version.
    #[serde(default)]
    pub version: Option<u32>,
    /// `health`: the agent's clipboard limit.
    #[serde(default)]
    pub max_clipboard: Option<u64>,
    /// `health`: the agent's file size limit.
    #[serde(default)]
    pub max_file: Option<u64>,
    /// `health`: how many files the inbox holds.
    #[serde(default)]
    pub max_files: Option<u64>,
    /// `clipboard_get`: the MIME type.
    #[serde(default)]
    pub mime: Option<alloc::string::String>,
    /// `file_put`, `file_get`: the file name.
    #[serde(default)]
    pub name: Option<alloc::string::String>,
    /// `clipboard_get`, `file_get`: the data.
    #[serde(default)]
    pub data_b64: Option<alloc::string::String>,
    /// `clipboard_set`, `file_put`: bytes stored.
    #[serde(default)]
    pub bytes: Option<u64>,
    /// `file_list`: the inbox.
    #[serde(default)]
    pub files: Option<alloc::vec::Vec<FileEntry>>,
    /// `twin`: the original profile the guest is now a twin of.
    #[serde(default)]
    pub twin_of: Option<alloc::string::String>,
}

#[cfg(all(test, feature = "serde"))]
mod tests {
    use alloc::vec::Vec;

    use super::*;
    use crate::{ProtoError, LINUX, PROBE};

    fn answer(write: impl FnOnce(&mut Vec<u8>)) -> (Vec<u8>, Answer) {
        let mut v = Vec::new();
        write(&mut v);
        let a = serde_json::from_slice(&v).unwrap_or_else(|e| {
            panic!("{e}: {}", core::str::from_utf8(&v).unwrap_or("(not UTF-8)"))
        });
        (v, a)
    }

    #[test]
    fn a_twin_notice_is_acknowledged_with_its_name() {
        let (raw, a) = answer(|v| twin(v, "work"));
        assert_eq!(raw, b"{\"ok\":true,\"twin_of\":\"work\"}");
        assert_eq!((a.ok, a.twin_of.as_deref()), (true, Some("work")));
        let r = crate::Request::parse(b"{\"op\":\"twin\",\"name\":\"work\"}").unwrap();
        assert_eq!((r.op(), r.file_name()), (Ok(crate::Op::Twin), Ok("work")));
        let r = crate::Request::parse(b"{\"op\":\"twin\",\"name\":\"../x\"}").unwrap();
        assert_eq!(r.file_name(), Err(ProtoError::BadName));
    }

    #[test]
    fn answers_are_json_the_host_reads() {
        let (_, h) = answer(|v| health(v, "probe", &PROBE));
        assert!(h.ok);
        assert_eq!(h.agent.as_deref(), Some("probe"));
        assert_eq!(h.version, Some(VERSION));
        assert_eq!(
            (h.max_clipboard, h.max_file, h.max_files),
            (Some(65536), Some(1 << 20), Some(4))
        );
        let (_, h) = answer(|v| health(v, "linux", &LINUX));
        assert_eq!(h.max_files, Some(1024));
        let (raw, c) = answer(|v| clipboard(v, "text/html", b"<b>hi</b>"));
        assert_eq!(
            raw,
            b"{\"ok\":true,\"mime\":\"text/html\",\"data_b64\":\"PGI+aGk8L2I+\"}"
        );
        assert_eq!(
            b64::decode(c.data_b64.as_deref().unwrap()).unwrap(),
            b"<b>hi</b>"
        );
        let (_, f) = answer(|v| file(v, "r.bin", &[0, 1, 2, 255]));
        assert_eq!(f.name.as_deref(), Some("r.bin"));
        assert_eq!(f.data_b64.as_deref(), Some("AAEC/w=="));
        let (raw, s) = answer(|v| stored(v, None, 9));
        assert_eq!(raw, b"{\"ok\":true,\"bytes\":9}");
        assert_eq!(s.bytes, Some(9));
        let (raw, _) = answer(|v| stored(v, Some("a"), 2));
        assert_eq!(raw, b"{\"ok\":true,\"name\":\"a\",\"bytes\":2}");
        let (raw, l) = answer(|v| file_list(v, [("a", 1), ("b.txt", 5000)]));
        assert_eq!(
            raw,
            b"{\"ok\":true,\"files\":[{\"name\":\"a\",\"bytes\":1},{\"name\":\"b.txt\",\"bytes\":5000}]}"
        );
        assert_eq!(l.files.unwrap().len(), 2);
        let (raw, _) = answer(|v| file_list(v, []));
        assert_eq!(raw, b"{\"ok\":true,\"files\":[]}");
    }

    #[test]
    fn errors_are_escaped() {
        let (raw, e) = answer(|v| error(v, &ProtoError::InboxFull { max: 4 }));
        assert_eq!(
            raw,
            b"{\"ok\":false,\"error\":\"the inbox is full (4 files)\"}"
        );
        assert!(!e.ok);
        let nasty = "a \"quoted\" \\ path\nwith\ttabs \u{7f} é";
        let (_, e) = answer(|v| error(v, &nasty));
        assert_eq!(e.error.as_deref(), Some(nasty));
    }
}
