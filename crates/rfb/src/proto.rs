//! The RFB 3.8 wire format (RFC 6143): the messages a client sends, decoded without trusting
//! a length, and the pieces of the messages the server sends.
//!
//! [`parse_client_message`] takes the bytes received so far and returns one message and its
//! length, `Ok(None)` when more bytes are needed, or an error that ends that client's
//! session (an unknown message type, a colour-map pixel format, an oversized cut text).

/// The version the server offers.
pub const SERVER_VERSION: &[u8; 12] = b"RFB 003.008\n";

/// Security type None (no authentication).
pub const SECURITY_NONE: u8 = 1;

/// Encodings this server sends.
pub mod encoding {
    /// Raw pixels.
    pub const RAW: i32 = 0;
    /// CopyRect: a rectangle copied from elsewhere on the client's screen (sent for scrolls).
    pub const COPY_RECT: i32 = 1;
    /// The DesktopSize pseudo-encoding: the client follows a change of the screen size.
    pub const DESKTOP_SIZE: i32 = -223;
}

/// Most bytes of one ClientCutText the server accepts; a longer one ends the session.
pub const MAX_CUT_TEXT: u32 = 256 * 1024;
/// Most encodings in one SetEncodings.
pub const MAX_ENCODINGS: u16 = 1024;

/// The protocol versions a client may answer with, as the server speaks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// 3.3: the server picks the security type.
    V3_3,
    /// 3.7: the client picks; no SecurityResult for None.
    V3_7,
    /// 3.8: the client picks; a SecurityResult follows.
    V3_8,
}

/// Why a client's bytes end its session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The client's version line is not `RFB xxx.yyy\n` of a version we speak.
    #[error("bad protocol version {0:?}")]
    BadVersion(String),
    /// The client picked a security type we did not offer.
    #[error("security type {0} was not offered")]
    BadSecurity(u8),
    /// A message type RFB 3.8 does not define for clients (or one we did not announce).
    #[error("unknown client message type {0}")]
    UnknownMessage(u8),
    /// A pixel format we cannot send (colour map, odd sizes).
    #[error("unsupported pixel format: {0}")]
    BadPixelFormat(&'static str),
    /// A ClientCutText longer than [`MAX_CUT_TEXT`].
    #[error("cut text of {0} bytes is too long")]
    CutTextTooLong(u32),
    /// A SetEncodings with more than [`MAX_ENCODINGS`] entries.
    #[error("{0} encodings is too many")]
    TooManyEncodings(u16),
}

/// Parses the client's 12-byte version line.
pub fn parse_version(line: &[u8; 12]) -> Result<Version, ProtoError> {
    let bad = || ProtoError::BadVersion(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let rest = text.strip_prefix("RFB ").ok_or_else(bad)?;
    let rest = rest.strip_suffix('\n').ok_or_else(bad)?;
    let (major, minor) = rest.split_once('.').ok_or_else(bad)?;
    if major.len() != 3 || minor.len() != 3 {
        return Err(bad());
    }
    let major: u32 = major.parse().map_err(|_| bad())?;
    let minor: u32 = minor.parse().map_err(|_| bad())?;
    // RFC 6143 7.1.1: an unknown minor above 8 is 3.8; 3.4-3.6 (and 3.889, Apple's) are 3.3.
    match (major, minor) {
        (3, 7) => Ok(Version::V3_7),
        (3, 8..=888) | (3, 890..) => Ok(Version::V3_8),
        (3, _) => Ok(Version::V3_3),
        _ => Err(bad()),
    }
}

/// How the client wants pixels (RFC 6143 7.4); only true colour is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelFormat {
    pub bits_per_pixel: u8,
    pub depth: u8,
    pub big_endian: bool,
    pub red_max: u16,
    pub green_max: u16,
    pub blue_max: u16,
    pub red_shift: u8,
    pub green_shift: u8,
    pub blue_shift: u8,
}

impl PixelFormat {
    /// The server's own format: 32 bits, depth 24, little-endian, 8 bits per colour.
    pub const NATIVE: PixelFormat = PixelFormat {
        bits_per_pixel: 32,
        depth: 24,
        big_endian: false,
        red_max: 255,
        green_max: 255,
        blue_max: 255,
        red_shift: 16,
        green_shift: 8,
        blue_shift: 0,
    };

    /// The 16 bytes of a PIXEL_FORMAT.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0] = self.bits_per_pixel;
        b[1] = self.depth;
        b[2] = u8::from(self.big_endian);
        b[3] = 1; // true colour
        b[4..6].copy_from_slice(&self.red_max.to_be_bytes());
        b[6..8].copy_from_slice(&self.green_max.to_be_bytes());
        b[8..10].copy_from_slice(&self.blue_max.to_be_bytes());
        b[10] = self.red_shift;
        b[11] = self.green_shift;
        b[12] = self.blue_shift;
        b
    }

    /// Decodes and checks a PIXEL_FORMAT from a client.
    pub fn from_bytes(b: &[u8; 16]) -> Result<PixelFormat, ProtoError> {
        let be16 = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let pf = PixelFormat {
            bits_per_pixel: b[0],
            depth: b[1],
            big_endian: b[2] != 0,
            red_max: be16(4),
            green_max: be16(6),
            blue_max: be16(8),
            red_shift: b[10],
            green_shift: b[11],
            blue_shift: b[12],
        };
        if b[3] == 0 {
            return Err(ProtoError::BadPixelFormat("colour maps are not supported"));
        }
        if !matches!(pf.bits_per_pixel, 8 | 16 | 32) {
            return Err(ProtoError::BadPixelFormat(
                "bits per pixel must be 8, 16 or 32",
            ));
        }
        let bits = u32::from(pf.bits_per_pixel);
        for (max, shift) in [
            (pf.red_max, pf.red_shift),
            (pf.green_max, pf.green_shift),
            (pf.blue_max, pf.blue_shift),
        ] {
            let width = 16 - max.leading_zeros();
            if max == 0 || u32::from(shift) + width > bits {
                return Err(ProtoError::BadPixelFormat(
                    "a colour does not fit the pixel",
                ));
            }
        }
        Ok(pf)
    }

    /// Bytes per pixel.
    pub fn bytes_per_pixel(&self) -> usize {
        usize::from(self.bits_per_pixel / 8)
    }

    /// Appends `rgb` (8-bit triples) in this format.
    pub fn encode(&self, rgb: &[u8], out: &mut Vec<u8>) {
        let scale = |v: u8, max: u16| (u32::from(v) * u32::from(max) + 127) / 255;
        out.reserve(rgb.len() / 3 * self.bytes_per_pixel());
        for px in rgb.chunks_exact(3) {
            let v = (scale(px[0], self.red_max) << self.red_shift)
                | (scale(px[1], self.green_max) << self.green_shift)
                | (scale(px[2], self.blue_max) << self.blue_shift);
            let bytes = if self.big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            };
            match (self.bits_per_pixel, self.big_endian) {
                (32, _) => out.extend_from_slice(&bytes),
                (16, false) => out.extend_from_slice(&bytes[..2]),
                (16, true) => out.extend_from_slice(&bytes[2..]),
                (_, false) => out.push(bytes[0]),
                (_, true) => out.push(bytes[3]),
            }
        }
    }
}

/// One message from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    /// Pixels from now on come in this format.
    SetPixelFormat(PixelFormat),
    /// The encodings the client takes, most preferred first.
    SetEncodings(Vec<i32>),
    /// Send (the changes of, if `incremental`) this area.
    UpdateRequest {
        incremental: bool,
        x: u16,
        y: u16,
        width: u16,
        height: u16,
    },
    /// A key (X keysym) went down or up.
    Key { down: bool, keysym: u32 },
    /// The pointer is at (`x`, `y`) with these buttons held (bit 0: left).
    Pointer { buttons: u8, x: u16, y: u16 },
    /// The client's clipboard changed (the text is dropped: guests get no host clipboard).
    CutText { len: u32 },
}

fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Decodes the first message in `buf`: the message and the bytes it took, `Ok(None)` if
/// `buf` holds only part of one, or why the client's session ends.
pub fn parse_client_message(buf: &[u8]) -> Result<Option<(ClientMessage, usize)>, ProtoError> {
    let Some(&kind) = buf.first() else {
        return Ok(None);
    };
    let need = |n: usize| buf.len() >= n;
    let msg = match kind {
        0 => {
            if !need(20) {
                return Ok(None);
            }
            let mut pf = [0u8; 16];
            pf.copy_from_slice(&buf[4..20]);
            (
                ClientMessage::SetPixelFormat(PixelFormat::from_bytes(&pf)?),
                20,
            )
        }
        2 => {
            if !need(4) {
                return Ok(None);
            }
            let n = be16(buf, 2);
            if n > MAX_ENCODINGS {
                return Err(ProtoError::TooManyEncodings(n));
            }
            let len = 4 + 4 * usize::from(n);
            if !need(len) {
                return Ok(None);
            }
            let list = buf[4..len]
                .chunks_exact(4)
                .map(|c| i32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (ClientMessage::SetEncodings(list), len)
        }
        3 => {
            if !need(10) {
                return Ok(None);
            }
            (
                ClientMessage::UpdateRequest {
                    incremental: buf[1] != 0,
                    x: be16(buf, 2),
                    y: be16(buf, 4),
                    width: be16(buf, 6),
                    height: be16(buf, 8),
                },
                10,
            )
        }
        4 => {
            if !need(8) {
                return Ok(None);
            }
            (
                ClientMessage::Key {
                    down: buf[1] != 0,
                    keysym: be32(buf, 4),
                },
                8,
            )
        }
        5 => {
            if !need(6) {
                return Ok(None);
            }
            (
                ClientMessage::Pointer {
                    buttons: buf[1],
                    x: be16(buf, 2),
                    y: be16(buf, 4),
                },
                6,
            )
        }
        6 => {
            if !need(8) {
                return Ok(None);
            }
            let len = be32(buf, 4);
            if len > MAX_CUT_TEXT {
                return Err(ProtoError::CutTextTooLong(len));
            }
            let total = 8 + len as usize;
            if !need(total) {
                return Ok(None);
            }
            (ClientMessage::CutText { len }, total)
        }
        other => return Err(ProtoError::UnknownMessage(other)),
    };
    Ok(Some(msg))
}

/// A FramebufferUpdate header announcing `rects` rectangles.
pub fn update_header(rects: u16, out: &mut Vec<u8>) {
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&rects.to_be_bytes());
}

/// A rectangle header: position, size and encoding.
pub fn rect_header(x: u16, y: u16, width: u16, height: u16, encoding: i32, out: &mut Vec<u8>) {
    for v in [x, y, width, height] {
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(&encoding.to_be_bytes());
}

/// The ServerInit message: the screen's size, our pixel format and the desktop's name.
pub fn server_init(width: u16, height: u16, name: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&width.to_be_bytes());
    out.extend_from_slice(&height.to_be_bytes());
    out.extend_from_slice(&PixelFormat::NATIVE.to_bytes());
    let name = name.as_bytes();
    let len = u32::try_from(name.len()).unwrap_or(0);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&name[..len as usize]);
}

#[cfg(test)]
mod tests;
