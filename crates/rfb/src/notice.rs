//! A screen the host draws instead of a guest's: a blank frame with a short notice, served as
//! a complete RFB 3.8 session to a viewer that may not see the guest (a remote viewer of a
//! profile whose IT policy forbids remote viewing). No guest pixel is ever in it, and the
//! viewer's keys, pointer and clipboard go nowhere.
//!
//! [`NoticeSession`] is sans-IO: the caller sends [`NoticeSession::greeting`], feeds each
//! chunk the viewer sends to [`NoticeSession::receive`] and sends back what it returns, over
//! whatever carries the bytes (the browser phone's websocket). [`NoticeSession::show`] replaces
//! the frame with another the host drew (the handset's device screen, `crates/display`).

use crate::proto::{self, ClientMessage, PixelFormat, ProtoError, Version};

/// The notice's background (dark grey) and text (white) colours, as RGB.
pub const BACKGROUND: [u8; 3] = [0x20, 0x20, 0x20];
/// The notice text's colour.
pub const TEXT: [u8; 3] = [0xff, 0xff, 0xff];

/// Glyph size of the built-in font, and the gap after each glyph and line.
const GLYPH_W: usize = 5;
const GLYPH_H: usize = 7;
const GAP: usize = 1;

/// Where a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Version,
    SecurityChoice(Version),
    ClientInit,
    Messages,
}

/// One viewer's session with the notice screen.
pub struct NoticeSession {
    stage: Stage,
    pending: Vec<u8>,
    width: u16,
    height: u16,
    name: String,
    rgb: Vec<u8>,
    format: PixelFormat,
    sent: bool,
    /// An incremental update request is waiting for the frame to change.
    waiting: bool,
    /// Keys and pointer events kept for [`Self::take_input`] (None: dropped, as a notice
    /// screen's viewer reaches no guest).
    input: Option<Vec<ClientMessage>>,
}

/// Input events a session keeps between two [`NoticeSession::take_input`] calls, at most;
/// more are dropped.
const MAX_INPUT: usize = 256;

impl NoticeSession {
    /// A `width` x `height` screen named `name` (at least 1x1) showing `lines` of text.
    pub fn new(width: u16, height: u16, name: &str, lines: &[&str]) -> Self {
        let (width, height) = (width.max(1), height.max(1));
        NoticeSession {
            stage: Stage::Version,
            pending: Vec::new(),
            width,
            height,
            name: name.to_string(),
            rgb: draw(usize::from(width), usize::from(height), lines),
            format: PixelFormat::NATIVE,
            sent: false,
            waiting: false,
            input: None,
        }
    }

    /// Keeps the viewer's key and pointer events for [`Self::take_input`] (a host-composed
    /// screen whose input goes on to a guest) instead of dropping them.
    pub fn keep_input(mut self) -> Self {
        self.input = Some(Vec::new());
        self
    }

    /// The key and pointer events received since the last call (only with
    /// [`Self::keep_input`]; at most 256, later ones dropped).
    pub fn take_input(&mut self) -> Vec<ClientMessage> {
        self.input.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// What the server says first: its protocol version.
    pub fn greeting() -> &'static [u8] {
        proto::SERVER_VERSION
    }

    /// The frame as RGB triples, row by row (what every viewer of this session sees).
    pub fn rgb(&self) -> &[u8] {
        &self.rgb
    }

    /// Replaces the frame with `rgb` (RGB triples, row by row, the session's size; another
    /// length is ignored). Returns the update to send now if the viewer is waiting for one;
    /// otherwise its next update request gets the new frame.
    pub fn show(&mut self, rgb: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        if rgb.len() != self.rgb.len() || rgb == self.rgb.as_slice() {
            return out;
        }
        self.rgb.copy_from_slice(rgb);
        self.sent = false;
        if self.waiting {
            self.waiting = false;
            self.send_frame(&mut out);
        }
        out
    }

    fn send_frame(&mut self, out: &mut Vec<u8>) {
        proto::update_header(1, out);
        proto::rect_header(0, 0, self.width, self.height, proto::encoding::RAW, out);
        self.format.encode(&self.rgb, out);
        self.sent = true;
    }

    /// Takes bytes the viewer sent; returns the bytes to send back, or why the session ends.
    pub fn receive(&mut self, data: &[u8]) -> Result<Vec<u8>, ProtoError> {
        self.pending.extend_from_slice(data);
        let mut out = Vec::new();
        loop {
            let used = match self.stage {
                Stage::Version => {
                    let Some(line) = self.pending.first_chunk::<12>() else {
                        break;
                    };
                    let version = proto::parse_version(line)?;
                    if version == Version::V3_3 {
                        out.extend_from_slice(&u32::from(proto::SECURITY_NONE).to_be_bytes());
                        self.stage = Stage::ClientInit;
                    } else {
                        out.extend_from_slice(&[1, proto::SECURITY_NONE]);
                        self.stage = Stage::SecurityChoice(version);
                    }
                    12
                }
                Stage::SecurityChoice(version) => {
                    let Some(&chosen) = self.pending.first() else {
                        break;
                    };
                    if chosen != proto::SECURITY_NONE {
                        return Err(ProtoError::BadSecurity(chosen));
                    }
                    if version == Version::V3_8 {
                        out.extend_from_slice(&0u32.to_be_bytes());
                    }
                    self.stage = Stage::ClientInit;
                    1
                }
                Stage::ClientInit => {
                    if self.pending.is_empty() {
                        break;
                    }
                    proto::server_init(self.width, self.height, &self.name, &mut out);
                    self.stage = Stage::Messages;
                    1
                }
                Stage::Messages => {
                    let Some((msg, len)) = proto::parse_client_message(&self.pending)? else {
                        break;
                    };
                    self.handle(msg, &mut out);
                    len
                }
            };
            self.pending.drain(..used);
        }
        Ok(out)
    }

    /// Carries out one message: a pixel format is kept, an update request is answered with
    /// the whole frame (an incremental one only once per frame, or when [`Self::show`] changes
    /// it), and input is dropped unless [`Self::keep_input`] asked for it.
    fn handle(&mut self, msg: ClientMessage, out: &mut Vec<u8>) {
        match msg {
            ClientMessage::SetPixelFormat(format) => self.format = format,
            ClientMessage::UpdateRequest { incremental, .. } if !incremental || !self.sent => {
                self.waiting = false;
                self.send_frame(out);
            }
            ClientMessage::UpdateRequest { .. } => self.waiting = true,
            ClientMessage::Key { .. } | ClientMessage::Pointer { .. } => {
                if let Some(kept) = self.input.as_mut().filter(|k| k.len() < MAX_INPUT) {
                    kept.push(msg);
                }
            }
            ClientMessage::SetEncodings(_) | ClientMessage::CutText { .. } => {}
        }
    }
}

/// The frame: the background with `lines` centred in the built-in font, as large as fits.
fn draw(width: usize, height: usize, lines: &[&str]) -> Vec<u8> {
    let mut rgb = BACKGROUND.repeat(width * height);
    let longest = lines.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    if longest == 0 {
        return rgb;
    }
    let text_w = longest * (GLYPH_W + GAP);
    let text_h = lines.len() * (GLYPH_H + 2 * GAP);
    // Most of the width, at most 8x; 1x if even that does not fit (then it is cut).
    let scale = (width * 8 / 10 / text_w)
        .min(height * 8 / 10 / text_h)
        .clamp(1, 8);
    let top = height.saturating_sub(text_h * scale) / 2;
    for (row, line) in lines.iter().enumerate() {
        let chars = line.chars().count();
        let left = width.saturating_sub(chars * (GLYPH_W + GAP) * scale) / 2;
        let y0 = top + row * (GLYPH_H + 2 * GAP) * scale;
        draw_text(&mut rgb, width, left, y0, scale, line, TEXT);
    }
    rgb
}

/// Width and height in pixels of `text` drawn by [`draw_text`] at `scale`.
pub fn text_size(text: &str, scale: usize) -> (usize, usize) {
    (
        text.chars().count() * (GLYPH_W + GAP) * scale,
        GLYPH_H * scale,
    )
}

/// Draws `text` in the built-in 5x7 font, each font pixel `scale` x `scale`, with its top left
/// at (`x`, `y`) into `rgb` (RGB triples, `width` pixels a row) in `colour`; whatever falls
/// outside the buffer is cut.
pub fn draw_text(
    rgb: &mut [u8],
    width: usize,
    x: usize,
    y: usize,
    scale: usize,
    text: &str,
    colour: [u8; 3],
) {
    let height = (rgb.len() / 3).checked_div(width).unwrap_or(0);
    for (col, c) in text.chars().enumerate() {
        let x0 = x + col * (GLYPH_W + GAP) * scale;
        for (gy, bits) in glyph(c).iter().enumerate() {
            for gx in 0..GLYPH_W {
                if bits & (1 << (GLYPH_W - 1 - gx)) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let (px, py) = (x0 + gx * scale + dx, y + gy * scale + dy);
                        if px < width && py < height {
                            let at = (py * width + px) * 3;
                            rgb[at..at + 3].copy_from_slice(&colour);
                        }
                    }
                }
            }
        }
    }
}

/// A 5x7 glyph (one byte a row, the low five bits left to right); letters in either case
/// are drawn as capitals, characters outside the font as blanks.
fn glyph(c: char) -> [u8; GLYPH_H] {
    match c.to_ascii_uppercase() {
        'A' => [14, 17, 17, 31, 17, 17, 17],
        'B' => [30, 17, 17, 30, 17, 17, 30],
        'C' => [14, 17, 16, 16, 16, 17, 14],
        'D' => [30, 17, 17, 17, 17, 17, 30],
        'E' => [31, 16, 16, 30, 16, 16, 31],
        'F' => [31, 16, 16, 30, 16, 16, 16],
        'G' => [14, 17, 16, 23, 17, 17, 15],
        'H' => [17, 17, 17, 31, 17, 17, 17],
        'I' => [14, 4, 4, 4, 4, 4, 14],
        'J' => [7, 2, 2, 2, 2, 18, 12],
        'K' => [17, 18, 20, 24, 20, 18, 17],
        'L' => [16, 16, 16, 16, 16, 16, 31],
        'M' => [17, 27, 21, 21, 17, 17, 17],
        'N' => [17, 17, 25, 21, 19, 17, 17],
        'O' => [14, 17, 17, 17, 17, 17, 14],
        'P' => [30, 17, 17, 30, 16, 16, 16],
        'Q' => [14, 17, 17, 17, 21, 18, 13],
        'R' => [30, 17, 17, 30, 20, 18, 17],
        'S' => [15, 16, 16, 14, 1, 1, 30],
        'T' => [31, 4, 4, 4, 4, 4, 4],
        'U' => [17, 17, 17, 17, 17, 17, 14],
        'V' => [17, 17, 17, 17, 17, 10, 4],
        'W' => [17, 17, 17, 21, 21, 21, 10],
        'X' => [17, 17, 10, 4, 10, 17, 17],
        'Y' => [17, 17, 10, 4, 4, 4, 4],
        'Z' => [31, 1, 2, 4, 8, 16, 31],
        '0' => [14, 17, 19, 21, 25, 17, 14],
        '1' => [4, 12, 4, 4, 4, 4, 14],
        '2' => [14, 17, 1, 2, 4, 8, 31],
        '3' => [31, 2, 4, 2, 1, 17, 14],
        '4' => [2, 6, 10, 18, 31, 2, 2],
        '5' => [31, 16, 30, 1, 1, 17, 14],
        '6' => [6, 8, 16, 30, 17, 17, 14],
        '7' => [31, 1, 2, 4, 8, 8, 8],
        '8' => [14, 17, 17, 14, 17, 17, 14],
        '9' => [14, 17, 17, 15, 1, 2, 12],
        '-' => [0, 0, 0, 31, 0, 0, 0],
        '.' => [0, 0, 0, 0, 0, 12, 12],
        ':' => [0, 12, 12, 0, 12, 12, 0],
        '(' => [2, 4, 8, 8, 8, 4, 2],
        ')' => [8, 4, 2, 2, 2, 4, 8],
        _ => [0; GLYPH_H],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the 3.8 handshake; returns the session and the ServerInit bytes.
    fn handshake(width: u16, height: u16) -> (NoticeSession, Vec<u8>) {
        let mut s = NoticeSession::new(width, height, "work", &["NOT SHOWN", "HERE"]);
        assert_eq!(NoticeSession::greeting(), b"RFB 003.008\n");
        assert_eq!(
            s.receive(b"RFB 003.008\n").unwrap(),
            [1, proto::SECURITY_NONE]
        );
        assert_eq!(s.receive(&[proto::SECURITY_NONE]).unwrap(), [0, 0, 0, 0]);
        let init = s.receive(&[1]).unwrap();
        (s, init)
    }

    fn request(incremental: bool, w: u16, h: u16) -> Vec<u8> {
        let mut m = vec![3, u8::from(incremental), 0, 0, 0, 0];
        m.extend_from_slice(&w.to_be_bytes());
        m.extend_from_slice(&h.to_be_bytes());
        m
    }

    #[test]
    fn a_viewer_gets_the_screen_size_and_name() {
        let (_, init) = handshake(320, 200);
        assert_eq!(&init[..4], &[1, 64, 0, 200]);
        assert_eq!(&init[4..20], &PixelFormat::NATIVE.to_bytes());
        assert_eq!(&init[20..24], &4u32.to_be_bytes());
        assert_eq!(&init[24..], b"work");
    }

    #[test]
    fn the_frame_is_the_background_with_the_notice_and_nothing_else() {
        let (mut s, _) = handshake(320, 200);
        let update = s.receive(&request(false, 320, 200)).unwrap();
        // Header (4), one rectangle header (12), 320 x 200 pixels of 4 bytes.
        assert_eq!(update.len(), 4 + 12 + 320 * 200 * 4);
        assert_eq!(&update[..4], &[0, 0, 0, 1]);
        assert_eq!(&update[12..16], &proto::encoding::RAW.to_be_bytes());
        let (mut text, mut background) = (0, 0);
        for px in update[16..].chunks_exact(4) {
            // NATIVE is little-endian BGRX.
            match [px[2], px[1], px[0]] {
                TEXT => text += 1,
                BACKGROUND => background += 1,
                other => panic!("a pixel that is neither background nor text: {other:?}"),
            }
        }
        assert!(
            text > 500,
            "the notice is drawn large enough to read ({text} pixels)"
        );
        assert!(background > text, "{background} background pixels");
    }

    #[test]
    fn a_frame_shown_later_reaches_a_waiting_viewer_once() {
        let (mut s, _) = handshake(4, 2);
        assert!(!s.receive(&request(true, 4, 2)).unwrap().is_empty());
        // Nothing new: the incremental request waits.
        assert!(s.receive(&request(true, 4, 2)).unwrap().is_empty());
        let red = [0xff, 0, 0].repeat(8);
        let update = s.show(&red);
        assert_eq!(
            update.len(),
            4 + 12 + 8 * 4,
            "the waiting request is answered"
        );
        assert!(update[16..].chunks_exact(4).all(|p| p[..3] == [0, 0, 0xff]));
        assert!(
            s.show(&red).is_empty(),
            "the same frame again sends nothing"
        );
        assert!(
            s.show(&[0; 5]).is_empty(),
            "a frame of another size is ignored"
        );
        assert!(s.receive(&request(true, 4, 2)).unwrap().is_empty());
        // Shown while no request waits: the next request gets it.
        let (mut s, _) = handshake(4, 2);
        assert!(!s.receive(&request(false, 4, 2)).unwrap().is_empty());
        assert!(s.show(&red).is_empty());
        assert_eq!(
            s.receive(&request(true, 4, 2)).unwrap().len(),
            4 + 12 + 8 * 4
        );
    }

    #[test]
    fn kept_input_is_taken_once_and_bounded() {
        let (mut s, _) = handshake(64, 48);
        let key = [4u8, 1, 0, 0, 0, 0, 0, b'a'];
        let pointer = [5u8, 1, 0, 10, 0, 20];
        s.receive(&[key.as_slice(), &pointer].concat()).unwrap();
        assert!(s.take_input().is_empty(), "dropped without keep_input");

        let (s, _) = handshake(64, 48);
        let mut s = s.keep_input();
        s.receive(&[key.as_slice(), &pointer].concat()).unwrap();
        assert_eq!(
            s.take_input(),
            [
                ClientMessage::Key {
                    down: true,
                    keysym: u32::from(b'a')
                },
                ClientMessage::Pointer {
                    buttons: 1,
                    x: 10,
                    y: 20
                }
            ]
        );
        assert!(s.take_input().is_empty(), "taken once");
        s.receive(&key.repeat(1000)).unwrap();
        assert_eq!(s.take_input().len(), MAX_INPUT);
    }

    #[test]
    fn an_incremental_request_after_the_frame_gets_nothing_and_input_goes_nowhere() {
        let (mut s, _) = handshake(64, 48);
        assert!(
            !s.receive(&request(true, 64, 48)).unwrap().is_empty(),
            "the first frame"
        );
        assert!(s.receive(&request(true, 64, 48)).unwrap().is_empty());
        // A key, a click and a clipboard: no answer, no change.
        let mut input = vec![4, 1, 0, 0, 0, 0, 0, 0x61];
        input.extend_from_slice(&[5, 1, 0, 10, 0, 10]);
        input.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 2, b'h', b'i']);
        assert!(s.receive(&input).unwrap().is_empty());
        // A full request still gets the same frame.
        let again = s.receive(&request(false, 64, 48)).unwrap();
        assert_eq!(again.len(), 4 + 12 + 64 * 48 * 4);
    }

    #[test]
    fn messages_split_anywhere_are_put_together() {
        let mut s = NoticeSession::new(8, 8, "p", &["X"]);
        let mut all = b"RFB 003.008\n".to_vec();
        all.push(proto::SECURITY_NONE);
        all.push(1);
        all.extend_from_slice(&request(false, 8, 8));
        let mut out = Vec::new();
        for byte in &all {
            out.extend(s.receive(std::slice::from_ref(byte)).unwrap());
        }
        // Security types (2), result (4), ServerInit (24 + 1), update (16 + 256).
        assert_eq!(out.len(), 2 + 4 + 25 + 16 + 8 * 8 * 4);
    }

    #[test]
    fn a_client_pixel_format_is_followed() {
        let (mut s, _) = handshake(16, 16);
        let mut pf = PixelFormat::NATIVE;
        pf.bits_per_pixel = 16;
        pf.depth = 16;
        pf.red_max = 31;
        pf.green_max = 63;
        pf.blue_max = 31;
        pf.red_shift = 11;
        pf.green_shift = 5;
        pf.blue_shift = 0;
        let mut msg = vec![0, 0, 0, 0];
        msg.extend_from_slice(&pf.to_bytes());
        assert!(s.receive(&msg).unwrap().is_empty());
        let update = s.receive(&request(false, 16, 16)).unwrap();
        assert_eq!(update.len(), 16 + 16 * 16 * 2);
    }

    #[test]
    fn bad_input_ends_the_session_with_an_error() {
        let mut s = NoticeSession::new(8, 8, "p", &[]);
        assert!(s.receive(b"HTTP/1.1 200").is_err());
        let mut s = NoticeSession::new(8, 8, "p", &[]);
        s.receive(b"RFB 003.008\n").unwrap();
        assert!(
            s.receive(&[2]).is_err(),
            "VNC authentication is not offered"
        );
        let (mut s, _) = handshake(8, 8);
        assert!(s.receive(&[200]).is_err(), "an unknown message type");
    }

    #[test]
    fn version_3_3_skips_the_security_choice() {
        let mut s = NoticeSession::new(8, 8, "p", &[]);
        assert_eq!(s.receive(b"RFB 003.003\n").unwrap(), 1u32.to_be_bytes());
        assert_eq!(s.receive(&[0]).unwrap().len(), 24 + 1);
    }
}
