//! `pv.mode=agent`: the in-guest side of the handset's cross-profile channels.
//!
//! Listens on vsock port [`PORT`] (or `pv.agent.port`) and answers newline-delimited JSON
//! requests, one response line per request (see PROTOCOL.md, "Agent mode"): a clipboard
//! (one MIME type and up to [`MAX_CLIPBOARD`] bytes) and an inbox of up to [`MAX_FILES`]
//! files of up to [`MAX_FILE`] bytes each, all in RAM. It serves until the VM is powered
//! off. Everything the host sends is validated; a bad request gets `{"ok":false,...}`.

use agent_proto::{answer, b64, Op, ProtoError, Request, Sink, MIME_MAX, NAME_MAX};

use crate::virtio::vsock::{Service, Vsock, MAX_CONNS};
use crate::{fail, mem, probe, pvh};

/// The agent's vsock port.
pub const PORT: u32 = agent_proto::PORT;
/// What the probe holds (all of it in its RAM arena).
const LIMITS: agent_proto::Limits = agent_proto::PROBE;
/// Largest clipboard content in bytes.
pub const MAX_CLIPBOARD: usize = LIMITS.max_clipboard;
/// Largest file in bytes.
pub const MAX_FILE: usize = LIMITS.max_file;
/// Files the inbox holds.
pub const MAX_FILES: usize = LIMITS.max_files;
/// Longest request or response line (a full file in base64 plus the JSON around it).
const LINE_CAP: usize = LIMITS.line_max();

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
    let port = u32::try_from(pvh::info().arg_u64("pv.agent.port", u64::from(PORT))).unwrap_or(PORT);
    let mut agent = Agent::new();
    probe!(
        "agent listening cid={} port={} max_clipboard={} max_file={} max_files={}",
        v.cid,
        port,
        MAX_CLIPBOARD,
        MAX_FILE,
        MAX_FILES
    );
    // With `pv.counter.ms` the agent also counts like counter mode (`PROBE counter N` about
    // every that many ms while no connection is open), so a profile shows it is alive.
    let tick_ms = pvh::info().arg_u64("pv.counter.ms", 0);
    let mut n: u64 = 0;
    loop {
        if tick_ms > 0 {
            probe!("counter {n}");
            n += 1;
        }
        let wait_ms = if tick_ms > 0 { tick_ms } else { u64::MAX };
        if let Err(e) = v.serve_service(port, wait_ms, Some(&mut agent)) {
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
        let line = mem::bytes(input, line_len);
        let mut out = Out {
            buf: mem::bytes(output + used as u64, LINE_CAP - used),
            len: 0,
            full: false,
        };
        let op = match Request::parse(line) {
            Ok(req) => {
                if let Err(e) = self.request(&req, &mut out) {
                    out.reset();
                    answer::error(&mut out, &e);
                }
                req.op
            }
            Err(e) => {
                answer::error(&mut out, &e);
                "?"
            }
        };
        out.push(b"\n");
        if out.full {
            out.reset();
            answer::error(&mut out, &"the answer does not fit the connection's buffer");
            out.push(b"\n");
        }
        let ok = out.buf.starts_with(b"{\"ok\":true");
        self.requests += 1;
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

    fn request(&mut self, r: &Request, out: &mut Out) -> Result<(), ProtoError> {
        match r.op()? {
            Op::Health => answer::health(out, "probe", &LIMITS),
            Op::ClipboardGet => {
                let mime = match self.mime.get(..self.mime_len) {
                    Some(m) if !m.is_empty() => core::str::from_utf8(m).unwrap_or("text/plain"),
                    _ => agent_proto::DEFAULT_MIME,
                };
                answer::clipboard(out, mime, mem::bytes(self.clip, self.clip_len));
            }
            Op::ClipboardSet => {
                let mime = r.mime_or_default()?;
                let data = r.data_b64("clipboard data", MAX_CLIPBOARD)?;
                let dst = mem::bytes(self.clip, MAX_CLIPBOARD);
                let n = b64::decode_into(data, dst, "clipboard data")?;
                self.clip_len = n;
                self.mime[..mime.len()].copy_from_slice(mime.as_bytes());
                self.mime_len = mime.len();
                answer::stored(out, None, n);
            }
            Op::FilePut => {
                let name = r.file_name()?;
                let data = r.data_b64("the file", MAX_FILE)?;
                // Validated in full before a slot is chosen or written.
                let n = b64::decoded_len(data)?;
                if n > MAX_FILE {
                    return Err(ProtoError::TooLarge {
                        what: "the file",
                        max: MAX_FILE,
                    });
                }
                let slot = match self.find(name.as_bytes()) {
                    Some(i) => i,
                    None => self
                        .files
                        .iter()
                        .position(|f| f.name_len == 0)
                        .ok_or(ProtoError::InboxFull { max: MAX_FILES })?,
                };
                let f = self.files.get_mut(slot).ok_or(ProtoError::NoSuchFile)?;
                f.len = b64::decode_into(data, mem::bytes(f.data, MAX_FILE), "the file")?;
                f.name[..name.len()].copy_from_slice(name.as_bytes());
                f.name_len = name.len();
                answer::stored(out, Some(name), n);
            }
            Op::FileGet => {
                let name = r.file_name()?;
                let f = self
                    .find(name.as_bytes())
                    .and_then(|i| self.files.get(i))
                    .ok_or(ProtoError::NoSuchFile)?;
                answer::file(out, name, mem::bytes(f.data, f.len));
            }
            Op::Twin => {
                // The probe has no programs to tell: it says so on its console.
                let name = r.file_name()?;
                probe!("agent twin of={name}");
                answer::twin(out, name);
            }
            Op::FileList => {
                let files = self.files.iter().filter(|f| f.name_len != 0).map(|f| {
                    let name = f.name.get(..f.name_len).unwrap_or_default();
                    (core::str::from_utf8(name).unwrap_or("?"), f.len as u64)
                });
                answer::file_list(out, files);
            }
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
                    answer::error(&mut out, &ProtoError::LineTooLong);
                    out.push(b"\n");
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

/// A response being written into a fixed buffer; `full` once something did not fit.
struct Out<'a> {
    buf: &'a mut [u8],
    len: usize,
    full: bool,
}

impl Out<'_> {
    /// Forgets what was written (to write an error instead).
    fn reset(&mut self) {
        self.len = 0;
        self.full = false;
    }
}

impl Sink for Out<'_> {
    fn push(&mut self, b: &[u8]) {
        match self.buf.get_mut(self.len..self.len + b.len()) {
            Some(dst) if !self.full => {
                dst.copy_from_slice(b);
                self.len += b.len();
            }
            _ => self.full = true,
        }
    }
}

/// Ops worth printing in a `PROBE agent req` line (not whatever a bad request sent).
fn valid_token(s: &[u8]) -> bool {
    !s.is_empty() && s.len() <= 32 && s.iter().all(|&b| b.is_ascii_lowercase() || b == b'_')
}
