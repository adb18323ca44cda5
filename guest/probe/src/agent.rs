//! `pv.mode=agent`: the in-guest side of the handset's cross-profile channels.
//!
//! Listens on vsock port [`PORT`] (or `pv.agent.port`) and answers newline-delimited JSON
//! requests, one response line per request (see PROTOCOL.md, "Agent mode"): a clipboard
//! (one MIME type and up to [`MAX_CLIPBOARD`] bytes) and an inbox of up to [`MAX_FILES`]
//! files of up to [`MAX_FILE`] bytes each, all in RAM. It serves until the VM is powered
//! off. Everything the host sends is validated; a bad request gets `{"ok":false,...}`.

use core::fmt::Write;

use crate::virtio::vsock::{Service, Vsock, MAX_CONNS};
use crate::{fail, mem, probe, pvh};

/// The agent's vsock port.
pub const PORT: u32 = 1025;
/// Largest clipboard content in bytes.
pub const MAX_CLIPBOARD: usize = 64 * 1024;
/// Largest file in bytes.
pub const MAX_FILE: usize = 1 << 20;
/// Files the inbox holds.
pub const MAX_FILES: usize = 4;
/// Longest file name.
const NAME_MAX: usize = 128;
/// Longest MIME type.
const MIME_MAX: usize = 64;
/// Longest request or response line (a full file in base64 plus the JSON around it).
const LINE_CAP: usize = b64_len(MAX_FILE) + 1024;

/// Length of the padded base64 encoding of `n` bytes.
const fn b64_len(n: usize) -> usize {
    n.div_ceil(3) * 4
}

/// One inbox file.
struct File {
    name: [u8; NAME_MAX],
    /// 0: the slot is free.
    name_len: usize,
    data: u64,
    len: usize,
}

/// Per-connection line buffers.
struct Conn {
    input: u64,
    in_len: usize,
    /// The current line overflowed [`LINE_CAP`]: dropped up to its newline.
    overflow: bool,
    output: u64,
    out_start: usize,
    out_len: usize,
}

/// The agent's state.
pub struct Agent {
    clip: u64,
    clip_len: usize,
    mime: [u8; MIME_MAX],
    mime_len: usize,
    files: [File; MAX_FILES],
    conns: [Conn; MAX_CONNS],
    /// Requests answered.
    pub requests: u64,
}

/// A parsed request: the string fields the protocol knows.
#[derive(Default)]
struct Request<'a> {
    op: &'a [u8],
    mime: Option<&'a [u8]>,
    name: Option<&'a [u8]>,
    data_b64: Option<&'a [u8]>,
}

/// Runs the agent: never returns.
pub fn run() -> ! {
    let mut v = match Vsock::open() {
        Ok(Some(v)) => v,
        Ok(None) => {
            probe!("agent skip no-device");
            crate::finish()
        }
        Err(e) => {
            fail("agent", format_args!("init {e}"));
            crate::finish()
        }
    };
    let port = pvh::info().arg_u64("pv.agent.port", PORT as u64) as u32;
    let mut agent = Agent::new();
    probe!(
        "agent listening cid={} port={} max_clipboard={} max_file={} max_files={}",
        v.cid,
        port,
        MAX_CLIPBOARD,
        MAX_FILE,
        MAX_FILES
    );
    loop {
        if let Err(e) = v.serve_service(port, u64::MAX, Some(&mut agent)) {
            // A transmit timeout drops nothing but the packet: keep serving.
            probe!("agent note {e}");
        }
    }
}

impl Agent {
    /// Allocates the clipboard, the inbox and the connection buffers.
    pub fn new() -> Agent {
        Agent {
            clip: mem::alloc(MAX_CLIPBOARD as u64, 4096),
            clip_len: 0,
            mime: [0; MIME_MAX],
            mime_len: 0,
            files: core::array::from_fn(|_| File {
                name: [0; NAME_MAX],
                name_len: 0,
                data: mem::alloc_uninit(MAX_FILE as u64, 4096),
                len: 0,
            }),
            conns: core::array::from_fn(|_| Conn {
                input: mem::alloc_uninit(LINE_CAP as u64, 4096),
                in_len: 0,
                overflow: false,
                output: mem::alloc_uninit(LINE_CAP as u64, 4096),
                out_start: 0,
                out_len: 0,
            }),
            requests: 0,
        }
    }

    /// Handles one complete line of connection `conn`, appending the answer to its output.
    fn line(&mut self, conn: usize, line_len: usize) {
        let t0 = crate::port::rdtsc();
        let Some(c) = self.conns.get(conn) else {
            return;
        };
        let (input, output, used) = (c.input, c.output, c.out_len);
        let mut line = mem::bytes(input, line_len);
        if let Some((b'\r', rest)) = line.split_last() {
            line = mem::bytes(input, rest.len());
        }
        let mut out = Out {
            buf: mem::bytes(output + used as u64, LINE_CAP - used),
            len: 0,
            full: false,
        };
        let op = match parse(line) {
            Ok(req) => {
                let op = req.op;
                if let Err(e) = self.request(&req, &mut out) {
                    out.len = 0;
                    out.full = false;
                    error(&mut out, e);
                }
                op
            }
            Err(e) => {
                error(&mut out, e);
                b"?"
            }
        };
        if out.full {
            out.len = 0;
            out.full = false;
            error(&mut out, "the answer does not fit the connection's buffer");
        }
        let ok = out.buf.starts_with(b"{\"ok\":true");
        self.requests += 1;
        let op = core::str::from_utf8(op).unwrap_or("?");
        let op = if valid_token(op.as_bytes()) { op } else { "?" };
        probe!(
            "agent req op={} ok={} bytes={} us={}",
            op,
            ok as u8,
            line_len,
            crate::time::tsc_to_us(crate::port::rdtsc() - t0)
        );
        let n = out.len;
        if let Some(c) = self.conns.get_mut(conn) {
            c.out_len += n;
        }
    }

    fn request(&mut self, r: &Request, out: &mut Out) -> Result<(), &'static str> {
        match r.op {
            b"health" => {
                let _ = writeln!(
                    out,
                    "{{\"ok\":true,\"agent\":\"probe\",\"version\":1,\"max_clipboard\":{},\
                     \"max_file\":{},\"max_files\":{}}}",
                    MAX_CLIPBOARD, MAX_FILE, MAX_FILES
                );
            }
            b"clipboard_get" => {
                let mime = match self.mime.get(..self.mime_len) {
                    Some(m) if !m.is_empty() => m,
                    _ => b"text/plain",
                };
                out.push(b"{\"ok\":true,\"mime\":\"");
                out.push(mime);
                out.push(b"\",\"data_b64\":\"");
                out.push_b64(mem::bytes(self.clip, self.clip_len));
                out.push(b"\"}\n");
            }
            b"clipboard_set" => {
                let mime = r.mime.unwrap_or(b"text/plain");
                if mime.is_empty() || mime.len() > MIME_MAX || !mime.iter().all(|&b| mime_byte(b)) {
                    return Err("bad mime type");
                }
                let data = r.data_b64.ok_or("data_b64 is missing")?;
                if data.len() > b64_len(MAX_CLIPBOARD) {
                    return Err("clipboard data is larger than the probe's 65536 bytes");
                }
                let n = b64_decoded_len(data).ok_or("data_b64 is not valid base64")?;
                if n > MAX_CLIPBOARD {
                    return Err("clipboard data is larger than the probe's 65536 bytes");
                }
                b64_decode(data, mem::bytes(self.clip, n));
                self.clip_len = n;
                self.mime[..mime.len()].copy_from_slice(mime);
                self.mime_len = mime.len();
                let _ = writeln!(out, "{{\"ok\":true,\"bytes\":{n}}}");
            }
            b"file_put" => {
                let name = r.name.ok_or("name is missing")?;
                if !valid_name(name) {
                    return Err("bad file name");
                }
                let data = r.data_b64.ok_or("data_b64 is missing")?;
                if data.len() > b64_len(MAX_FILE) {
                    return Err("the file is larger than the probe's 1048576 bytes");
                }
                let n = b64_decoded_len(data).ok_or("data_b64 is not valid base64")?;
                if n > MAX_FILE {
                    return Err("the file is larger than the probe's 1048576 bytes");
                }
                let slot = match self.find(name) {
                    Some(i) => i,
                    None => self
                        .files
                        .iter()
                        .position(|f| f.name_len == 0)
                        .ok_or("the probe's inbox is full (4 files)")?,
                };
                let f = self.files.get_mut(slot).ok_or("no slot")?;
                b64_decode(data, mem::bytes(f.data, n));
                f.len = n;
                f.name[..name.len()].copy_from_slice(name);
                f.name_len = name.len();
                out.push(b"{\"ok\":true,\"name\":\"");
                out.push(name);
                let _ = writeln!(out, "\",\"bytes\":{n}}}");
            }
            b"file_get" => {
                let name = r.name.ok_or("name is missing")?;
                if !valid_name(name) {
                    return Err("bad file name");
                }
                let f = self
                    .find(name)
                    .and_then(|i| self.files.get(i))
                    .ok_or("no such file")?;
                out.push(b"{\"ok\":true,\"name\":\"");
                out.push(name);
                out.push(b"\",\"data_b64\":\"");
                out.push_b64(mem::bytes(f.data, f.len));
                out.push(b"\"}\n");
            }
            b"file_list" => {
                out.push(b"{\"ok\":true,\"files\":[");
                let mut first = true;
                for f in self.files.iter().filter(|f| f.name_len != 0) {
                    if !first {
                        out.push(b",");
                    }
                    first = false;
                    out.push(b"{\"name\":\"");
                    out.push(&f.name[..f.name_len]);
                    let _ = write!(out, "\",\"bytes\":{}}}", f.len);
                }
                out.push(b"]}\n");
            }
            _ => return Err("unknown op"),
        }
        Ok(())
    }

    fn find(&self, name: &[u8]) -> Option<usize> {
        self.files
            .iter()
            .position(|f| f.name_len != 0 && f.name.get(..f.name_len) == Some(name))
    }
}

impl Service for Agent {
    fn opened(&mut self, conn: usize) {
        if let Some(c) = self.conns.get_mut(conn) {
            c.in_len = 0;
            c.overflow = false;
            c.out_start = 0;
            c.out_len = 0;
        }
    }

    fn received(&mut self, conn: usize, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            let Some(c) = self.conns.get_mut(conn) else {
                return false;
            };
            let (chunk, newline) = match data.iter().position(|&b| b == b'\n') {
                Some(p) => (&data[..p], true),
                None => (data, false),
            };
            data = data
                .get(chunk.len() + newline as usize..)
                .unwrap_or_default();
            if !c.overflow {
                if c.in_len + chunk.len() <= LINE_CAP {
                    mem::bytes(c.input + c.in_len as u64, chunk.len()).copy_from_slice(chunk);
                    c.in_len += chunk.len();
                } else {
                    c.overflow = true;
                }
            }
            if newline {
                let (len, overflow) = (c.in_len, c.overflow);
                c.in_len = 0;
                c.overflow = false;
                if c.out_len == c.out_start {
                    c.out_start = 0;
                    c.out_len = 0;
                }
                if LINE_CAP - c.out_len < 256 {
                    // The host sends requests without reading answers: give up on it.
                    return false;
                }
                if overflow {
                    let mut out = Out {
                        buf: mem::bytes(c.output + c.out_len as u64, LINE_CAP - c.out_len),
                        len: 0,
                        full: false,
                    };
                    error(&mut out, "the request line is too long");
                    c.out_len += out.len;
                } else {
                    self.line(conn, len);
                }
            }
        }
        true
    }

    fn take_output(&mut self, conn: usize, out: &mut [u8]) -> usize {
        let Some(c) = self.conns.get_mut(conn) else {
            return 0;
        };
        let n = (c.out_len - c.out_start).min(out.len());
        out[..n].copy_from_slice(mem::bytes(c.output + c.out_start as u64, n));
        c.out_start += n;
        if c.out_start == c.out_len {
            c.out_start = 0;
            c.out_len = 0;
        }
        n
    }
}

/// Writes `{"ok":false,"error":"<e>"}\n` (`e` is one of our own messages: no quotes).
fn error(out: &mut Out, e: &str) {
    out.push(b"{\"ok\":false,\"error\":\"");
    out.push(e.as_bytes());
    out.push(b"\"}\n");
}

/// A response being written into a fixed buffer; `full` once something did not fit.
struct Out<'a> {
    buf: &'a mut [u8],
    len: usize,
    full: bool,
}

impl Out<'_> {
    fn push(&mut self, b: &[u8]) {
        match self.buf.get_mut(self.len..self.len + b.len()) {
            Some(dst) if !self.full => {
                dst.copy_from_slice(b);
                self.len += b.len();
            }
            _ => self.full = true,
        }
    }

    fn push_b64(&mut self, data: &[u8]) {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let v = (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize;
            let mut q = [
                ALPHABET[v >> 18 & 63],
                ALPHABET[v >> 12 & 63],
                ALPHABET[v >> 6 & 63],
                ALPHABET[v & 63],
            ];
            if chunk.len() < 3 {
                q[3] = b'=';
            }
            if chunk.len() < 2 {
                q[2] = b'=';
            }
            self.push(&q);
        }
    }
}

impl Write for Out<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

fn b64_value(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// The decoded length of padded standard base64 `s`, or `None` if it is not valid.
fn b64_decoded_len(s: &[u8]) -> Option<usize> {
    if !s.len().is_multiple_of(4) {
        return None;
    }
    let pad = s.iter().rev().take_while(|&&c| c == b'=').count();
    if pad > 2 {
        return None;
    }
    let body = s.get(..s.len() - pad)?;
    if !body.iter().all(|&c| b64_value(c).is_some()) {
        return None;
    }
    Some(s.len() / 4 * 3 - pad)
}

/// Decodes `s` (checked by [`b64_decoded_len`]) into `dst` (exactly that long).
fn b64_decode(s: &[u8], dst: &mut [u8]) {
    let mut o = 0;
    for q in s.chunks(4) {
        let mut v: u32 = 0;
        for &c in q {
            v = v << 6 | b64_value(c).unwrap_or(0) as u32;
        }
        for byte in [(v >> 16) as u8, (v >> 8) as u8, v as u8] {
            if let Some(d) = dst.get_mut(o) {
                *d = byte;
            }
            o += 1;
        }
    }
}

/// File names: 1..=128 of `[A-Za-z0-9._-]`, not starting with `.`, no `..`.
fn valid_name(n: &[u8]) -> bool {
    !n.is_empty()
        && n.len() <= NAME_MAX
        && n[0] != b'.'
        && !n.windows(2).any(|w| w == b"..")
        && n.iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn mime_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'/' | b'+' | b'.' | b'-' | b';' | b'=')
}

fn valid_token(s: &[u8]) -> bool {
    !s.is_empty() && s.len() <= 32 && s.iter().all(|&b| b.is_ascii_lowercase() || b == b'_')
}

/// Parses one request: a flat JSON object whose values are strings without escapes.
fn parse(s: &[u8]) -> Result<Request<'_>, &'static str> {
    let mut p = Scanner { s, i: 0 };
    let mut r = Request::default();
    let mut have_op = false;
    p.ws();
    p.expect(b'{')?;
    p.ws();
    if p.peek() == Some(b'}') {
        return Err("op is missing");
    }
    loop {
        p.ws();
        let key = p.string()?;
        p.ws();
        p.expect(b':')?;
        p.ws();
        let value = p.string()?;
        match key {
            b"op" => {
                r.op = value;
                have_op = true;
            }
            b"mime" => r.mime = Some(value),
            b"name" => r.name = Some(value),
            b"data_b64" => r.data_b64 = Some(value),
            _ => return Err("unknown field"),
        }
        p.ws();
        match p.next() {
            Some(b',') => continue,
            Some(b'}') => break,
            _ => return Err("expected , or }"),
        }
    }
    p.ws();
    if p.peek().is_some() {
        return Err("text after the object");
    }
    if !have_op {
        return Err("op is missing");
    }
    Ok(r)
}

struct Scanner<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek();
        self.i += 1;
        c
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.i += 1;
        }
    }

    fn expect(&mut self, c: u8) -> Result<(), &'static str> {
        if self.next() == Some(c) {
            Ok(())
        } else {
            Err("not a JSON object of strings")
        }
    }

    /// A string without escapes or control characters.
    fn string(&mut self) -> Result<&'a [u8], &'static str> {
        self.expect(b'"')?;
        let start = self.i;
        loop {
            match self.next() {
                Some(b'"') => return self.s.get(start..self.i - 1).ok_or("bad string"),
                Some(b'\\') => return Err("escapes are not supported"),
                Some(c) if c < 0x20 => return Err("control character in a string"),
                Some(_) => {}
                None => return Err("unterminated string"),
            }
        }
    }
}
