//! Requests: `{"op":"<op>"[,"mime":..][,"name":..][,"data_b64":..]}`, a flat JSON object
//! whose values are strings without escapes (nothing the protocol carries needs one).

use crate::{b64, valid_file_name, valid_mime, ProtoError, Sink, DEFAULT_MIME};

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The agent's kind and [`crate::Limits`].
    Health,
    /// The clipboard's MIME type and content.
    ClipboardGet,
    /// Replace the clipboard (`mime`, default [`DEFAULT_MIME`], and `data_b64`).
    ClipboardSet,
    /// Store `data_b64` in the inbox as `name`.
    FilePut,
    /// The content of inbox file `name`.
    FileGet,
    /// The inbox's names and sizes.
    FileList,
    /// The guest is now a twin (a clone at a cloud host) of the profile `name`: the agent
    /// tells the guest's programs.
    Twin,
}

impl Op {
    /// Every op.
    pub const ALL: [Op; 7] = [
        Op::Health,
        Op::ClipboardGet,
        Op::ClipboardSet,
        Op::FilePut,
        Op::FileGet,
        Op::FileList,
        Op::Twin,
    ];

    /// The wire name (`clipboard_get`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            Op::Health => "health",
            Op::ClipboardGet => "clipboard_get",
            Op::ClipboardSet => "clipboard_set",
            Op::FilePut => "file_put",
            Op::FileGet => "file_get",
            Op::FileList => "file_list",
            Op::Twin => "twin",
        }
    }

    /// The op named `s`.
    pub fn from_name(s: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.as_str() == s)
    }
}

/// One request, borrowing the line it was parsed from. Fields are only parsed as strings
/// here; the accessors validate them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Request<'a> {
    /// The `op` field, as sent (see [`Request::op`]).
    pub op: &'a str,
    /// `mime` (clipboard_set).
    pub mime: Option<&'a str>,
    /// `name` (file_put, file_get; twin: the original profile's name).
    pub name: Option<&'a str>,
    /// `data_b64` (clipboard_set, file_put).
    pub data_b64: Option<&'a str>,
}

impl<'a> Request<'a> {
    /// A request for `op` with no other fields.
    pub fn new(op: Op) -> Request<'static> {
        Request {
            op: op.as_str(),
            ..Request::default()
        }
    }

    /// Parses one line (without its newline; a trailing `\r` is ignored as whitespace).
    pub fn parse(line: &'a [u8]) -> Result<Request<'a>, ProtoError> {
        let mut p = Scanner { s: line, i: 0 };
        let mut r = Request::default();
        let mut have_op = false;
        p.ws();
        p.expect(b'{')?;
        p.ws();
        if p.peek() == Some(b'}') {
            return Err(ProtoError::MissingOp);
        }
        loop {
            p.ws();
            let key = p.string()?;
            p.ws();
            p.expect(b':')?;
            p.ws();
            let value = p.string()?;
            let slot = match key {
                "op" => {
                    if have_op {
                        return Err(ProtoError::DuplicateField);
                    }
                    have_op = true;
                    r.op = value;
                    None
                }
                "mime" => Some(&mut r.mime),
                "name" => Some(&mut r.name),
                "data_b64" => Some(&mut r.data_b64),
                _ => return Err(ProtoError::UnknownField),
            };
            if let Some(slot) = slot {
                if slot.replace(value).is_some() {
                    return Err(ProtoError::DuplicateField);
                }
            }
            p.ws();
            match p.next() {
                Some(b',') => continue,
                Some(b'}') => break,
                _ => return Err(ProtoError::Syntax("expected , or }")),
            }
        }
        p.ws();
        if p.peek().is_some() {
            return Err(ProtoError::Syntax("text after the object"));
        }
        if !have_op {
            return Err(ProtoError::MissingOp);
        }
        Ok(r)
    }

    /// The op, or [`ProtoError::UnknownOp`].
    pub fn op(&self) -> Result<Op, ProtoError> {
        Op::from_name(self.op).ok_or(ProtoError::UnknownOp)
    }

    /// The `name`, checked by [`valid_file_name`].
    pub fn file_name(&self) -> Result<&'a str, ProtoError> {
        let n = self.name.ok_or(ProtoError::MissingName)?;
        if valid_file_name(n) {
            Ok(n)
        } else {
            Err(ProtoError::BadName)
        }
    }

    /// The `mime` ([`DEFAULT_MIME`] when absent), checked by [`valid_mime`].
    pub fn mime_or_default(&self) -> Result<&'a str, ProtoError> {
        let m = self.mime.unwrap_or(DEFAULT_MIME);
        if valid_mime(m) {
            Ok(m)
        } else {
            Err(ProtoError::BadMime)
        }
    }

    /// The `data_b64`, refused before decoding when it encodes more than `max` bytes (or is
    /// absent); `what` names the data in the error.
    pub fn data_b64(&self, what: &'static str, max: usize) -> Result<&'a str, ProtoError> {
        let s = self.data_b64.ok_or(ProtoError::MissingData)?;
        if s.len() > b64::encoded_len(max) {
            return Err(ProtoError::TooLarge { what, max });
        }
        Ok(s)
    }

    /// Writes the request as one JSON object (no newline). Values must not hold `"`, `\` or
    /// control characters (names, MIME types and base64 never do once validated).
    pub fn write_to<S: Sink + ?Sized>(&self, out: &mut S) -> Result<(), ProtoError> {
        let fields = [
            ("op", Some(self.op)),
            ("mime", self.mime),
            ("name", self.name),
            ("data_b64", self.data_b64),
        ];
        if fields
            .iter()
            .any(|(_, v)| v.is_some_and(|v| v.bytes().any(|c| c == b'"' || c == b'\\' || c < 0x20)))
        {
            return Err(ProtoError::Unencodable);
        }
        let mut sep = b"{" as &[u8];
        for (key, value) in fields {
            if let Some(value) = value {
                out.push(sep);
                out.push(b"\"");
                out.push(key.as_bytes());
                out.push(b"\":\"");
                out.push(value.as_bytes());
                out.push(b"\"");
                sep = b",";
            }
        }
        out.push(b"}");
        Ok(())
    }

    /// The request as a line, newline included.
    #[cfg(feature = "alloc")]
    pub fn to_line(&self) -> Result<alloc::vec::Vec<u8>, ProtoError> {
        let mut v = alloc::vec::Vec::with_capacity(
            32 + self.data_b64.map_or(0, str::len) + self.name.map_or(0, str::len),
        );
        self.write_to(&mut v)?;
        v.push(b'\n');
        Ok(v)
    }
}

/// A cursor over a request line.
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

    fn expect(&mut self, c: u8) -> Result<(), ProtoError> {
        if self.next() == Some(c) {
            Ok(())
        } else {
            Err(ProtoError::Syntax("not a JSON object of strings"))
        }
    }

    /// A string without escapes or control characters, as UTF-8.
    fn string(&mut self) -> Result<&'a str, ProtoError> {
        self.expect(b'"')?;
        let start = self.i;
        loop {
            match self.next() {
                Some(b'"') => break,
                Some(b'\\') => return Err(ProtoError::Syntax("escapes are not supported")),
                Some(c) if c < 0x20 => {
                    return Err(ProtoError::Syntax("control character in a string"))
                }
                Some(_) => {}
                None => return Err(ProtoError::Syntax("unterminated string")),
            }
        }
        let bytes = self
            .s
            .get(start..self.i - 1)
            .ok_or(ProtoError::Syntax("bad string"))?;
        core::str::from_utf8(bytes).map_err(|_| ProtoError::Syntax("a string is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_the_host_sends() {
        let r = Request::parse(br#"{"op":"file_put","name":"a.txt","data_b64":"aGk="}"#).unwrap();
        assert_eq!(r.op(), Ok(Op::FilePut));
        assert_eq!(r.file_name(), Ok("a.txt"));
        assert_eq!(r.data_b64("the file", 2), Ok("aGk="));
        assert_eq!(
            r.data_b64("the file", 0),
            Err(ProtoError::TooLarge {
                what: "the file",
                max: 0
            })
        );
        let r = Request::parse(b" { \"op\" : \"clipboard_set\" , \"data_b64\":\"\" }\r").unwrap();
        assert_eq!(r.op(), Ok(Op::ClipboardSet));
        assert_eq!(r.mime_or_default(), Ok(DEFAULT_MIME));
        assert_eq!(r.name, None);
        for op in Op::ALL {
            assert_eq!(Op::from_name(op.as_str()), Some(op));
        }
    }

    #[test]
    fn refuses_hostile_lines() {
        let cases: [(&[u8], ProtoError); 12] = [
            (
                b"not json",
                ProtoError::Syntax("not a JSON object of strings"),
            ),
            (b"{}", ProtoError::MissingOp),
            (b"[1,2]", ProtoError::Syntax("not a JSON object of strings")),
            (
                b"{\"op\":7}",
                ProtoError::Syntax("not a JSON object of strings"),
            ),
            (
                b"{\"op\":\"health\",\"extra\":\"x\"}",
                ProtoError::UnknownField,
            ),
            (
                b"{\"op\":\"health\",\"op\":\"file_list\"}",
                ProtoError::DuplicateField,
            ),
            (
                b"{\"name\":\"a\",\"name\":\"b\",\"op\":\"x\"}",
                ProtoError::DuplicateField,
            ),
            (b"{\"name\":\"a\"}", ProtoError::MissingOp),
            (
                b"{\"op\":\"clipboard_set\",\"data_b64\":\"a\\u0041==\"}",
                ProtoError::Syntax("escapes are not supported"),
            ),
            (
                b"{\"op\":\"health\"} trailing",
                ProtoError::Syntax("text after the object"),
            ),
            (b"{\"op\":\"health\"", ProtoError::Syntax("expected , or }")),
            (
                b"{\"op\":\"he\xffalth\"}",
                ProtoError::Syntax("a string is not UTF-8"),
            ),
        ];
        for (line, want) in cases {
            assert_eq!(
                Request::parse(line),
                Err(want),
                "{:?}",
                core::str::from_utf8(line)
            );
        }
        let r = Request::parse(b"{\"op\":\"rm\",\"name\":\"../x\",\"mime\":\"a b\"}").unwrap();
        assert_eq!(r.op(), Err(ProtoError::UnknownOp));
        assert_eq!(r.file_name(), Err(ProtoError::BadName));
        assert_eq!(r.mime_or_default(), Err(ProtoError::BadMime));
        assert_eq!(r.data_b64("x", 1), Err(ProtoError::MissingData));
        assert_eq!(Request::default().file_name(), Err(ProtoError::MissingName));
    }

    #[cfg(feature = "alloc")]
    #[test]
    fn written_requests_parse_back() {
        let r = Request {
            name: Some("notes.txt"),
            data_b64: Some("aGk="),
            ..Request::new(Op::FilePut)
        };
        let line = r.to_line().unwrap();
        assert_eq!(
            line,
            b"{\"op\":\"file_put\",\"name\":\"notes.txt\",\"data_b64\":\"aGk=\"}\n"
        );
        assert_eq!(Request::parse(&line[..line.len() - 1]), Ok(r));
        let bad = Request {
            name: Some("a\"b"),
            ..Request::new(Op::FileGet)
        };
        assert_eq!(bad.to_line(), Err(ProtoError::Unencodable));
    }
}
