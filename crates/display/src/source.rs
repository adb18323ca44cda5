//! Reads a profile's screen as an RFB client of its VNC socket (the jailed VMM's `run/vnc.sock`):
//! the daemon cannot reach the VMM's `Display` handle, which lives in the jailed process, but it
//! can reach that socket. The VMM is not trusted more than its guest: every size, rectangle and
//! length it sends is checked before anything is allocated or written.

use std::io::{Read, Write};

use rfb::proto::{encoding, PixelFormat, SECURITY_NONE};
use thiserror::Error;

use crate::{check_size, DisplayError, Frame};

/// Longest reason or desktop name read; a longer one ends the session.
const MAX_TEXT: u32 = 4096;
/// Longest server cut text skipped; a longer one ends the session.
const MAX_CUT_TEXT: u32 = 256 * 1024;

/// Why reading a profile's screen stopped.
#[derive(Debug, Error)]
pub enum SourceError {
    /// The socket failed or closed.
    #[error("the profile's screen socket: {0}")]
    Io(#[from] std::io::Error),
    /// The server broke the protocol or sent something out of bounds.
    #[error("the profile's screen server: {0}")]
    Protocol(&'static str),
    /// The server refused the session, with its reason.
    #[error("the profile's screen server refused the session: {0}")]
    Refused(String),
    /// The screen has a size the device screen does not take.
    #[error(transparent)]
    Size(#[from] DisplayError),
}

/// One RFB session reading a profile's screen into a frame.
pub struct RfbSource<S> {
    stream: S,
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

fn read_u8(s: &mut impl Read) -> std::io::Result<u8> {
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(b[0])
}

fn read_u16(s: &mut impl Read) -> std::io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(s: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// Reads a length-prefixed text of at most [`MAX_TEXT`] bytes.
fn read_text(s: &mut impl Read) -> Result<String, SourceError> {
    let len = read_u32(s)?;
    if len > MAX_TEXT {
        return Err(SourceError::Protocol("a text longer than 4096 bytes"));
    }
    let mut text = vec![0u8; len as usize];
    s.read_exact(&mut text)?;
    Ok(String::from_utf8_lossy(&text).into_owned())
}

impl<S: Read + Write> RfbSource<S> {
    /// Opens a session (RFB 3.8, security None) asking for 32-bit true colour, Raw and
    /// DesktopSize.
    pub fn connect(mut stream: S) -> Result<RfbSource<S>, SourceError> {
        let mut version = [0u8; 12];
        stream.read_exact(&mut version)?;
        if &version[..8] != b"RFB 003." {
            return Err(SourceError::Protocol("not an RFB server"));
        }
        stream.write_all(rfb::proto::SERVER_VERSION)?;
        let count = read_u8(&mut stream)?;
        if count == 0 {
            return Err(SourceError::Refused(read_text(&mut stream)?));
        }
        let mut types = vec![0u8; usize::from(count)];
        stream.read_exact(&mut types)?;
        if !types.contains(&SECURITY_NONE) {
            return Err(SourceError::Protocol("no security type None offered"));
        }
        stream.write_all(&[SECURITY_NONE])?;
        if read_u32(&mut stream)? != 0 {
            return Err(SourceError::Refused(read_text(&mut stream)?));
        }
        stream.write_all(&[1])?; // ClientInit: shared
        let width = usize::from(read_u16(&mut stream)?);
        let height = usize::from(read_u16(&mut stream)?);
        let mut format = [0u8; 16];
        stream.read_exact(&mut format)?;
        read_text(&mut stream)?;
        check_size(width, height)?;
        let mut msg = vec![0u8, 0, 0, 0];
        msg.extend_from_slice(&PixelFormat::NATIVE.to_bytes());
        msg.extend_from_slice(&[2, 0, 0, 2]);
        msg.extend_from_slice(&encoding::RAW.to_be_bytes());
        msg.extend_from_slice(&encoding::DESKTOP_SIZE.to_be_bytes());
        stream.write_all(&msg)?;
        Ok(RfbSource {
            stream,
            width,
            height,
            rgb: vec![0; width * height * 3],
        })
    }

    /// Asks for an update (of what changed if `incremental`, else all) and applies the next
    /// one the server sends.
    pub fn update(&mut self, incremental: bool) -> Result<(), SourceError> {
        let mut req = vec![3u8, u8::from(incremental), 0, 0, 0, 0];
        for side in [self.width, self.height] {
            let side = u16::try_from(side).map_err(|_| SourceError::Protocol("size"))?;
            req.extend_from_slice(&side.to_be_bytes());
        }
        self.stream.write_all(&req)?;
        loop {
            match read_u8(&mut self.stream)? {
                0 => return self.read_update(),
                1 => {
                    return Err(SourceError::Protocol(
                        "a colour map for a true-colour client",
                    ))
                }
                2 => {} // bell
                3 => {
                    let mut pad = [0u8; 3];
                    self.stream.read_exact(&mut pad)?;
                    let len = read_u32(&mut self.stream)?;
                    if len > MAX_CUT_TEXT {
                        return Err(SourceError::Protocol("cut text too long"));
                    }
                    std::io::copy(
                        &mut (&mut self.stream).take(u64::from(len)),
                        &mut std::io::sink(),
                    )?;
                }
                _ => return Err(SourceError::Protocol("an unknown server message")),
            }
        }
    }

    fn read_update(&mut self) -> Result<(), SourceError> {
        read_u8(&mut self.stream)?;
        let rects = read_u16(&mut self.stream)?;
        for _ in 0..rects {
            let x = usize::from(read_u16(&mut self.stream)?);
            let y = usize::from(read_u16(&mut self.stream)?);
            let w = usize::from(read_u16(&mut self.stream)?);
            let h = usize::from(read_u16(&mut self.stream)?);
            let mut enc = [0u8; 4];
            self.stream.read_exact(&mut enc)?;
            match i32::from_be_bytes(enc) {
                encoding::RAW => {
                    if x + w > self.width || y + h > self.height {
                        return Err(SourceError::Protocol("a rectangle outside the screen"));
                    }
                    let mut row = vec![0u8; w * 4];
                    for r in 0..h {
                        self.stream.read_exact(&mut row)?;
                        let at = ((y + r) * self.width + x) * 3;
                        for (dst, px) in self.rgb[at..at + w * 3]
                            .chunks_exact_mut(3)
                            .zip(row.chunks_exact(4))
                        {
                            // NATIVE: little-endian 0x00RRGGBB.
                            dst.copy_from_slice(&[px[2], px[1], px[0]]);
                        }
                    }
                }
                encoding::DESKTOP_SIZE => {
                    check_size(w, h)?;
                    (self.width, self.height) = (w, h);
                    self.rgb = vec![0; w * h * 3];
                }
                _ => return Err(SourceError::Protocol("an encoding that was not asked for")),
            }
        }
        Ok(())
    }

    /// Sends a key (an X keysym) going down or up, as a viewer's KeyEvent.
    pub fn key(&mut self, keysym: u32, down: bool) -> Result<(), SourceError> {
        let mut m = vec![4u8, u8::from(down), 0, 0];
        m.extend_from_slice(&keysym.to_be_bytes());
        self.stream.write_all(&m)?;
        Ok(())
    }

    /// Sends the pointer at (`x`, `y`) with `buttons` held (bit 0: left), as a viewer's
    /// PointerEvent.
    pub fn pointer(&mut self, buttons: u8, x: u16, y: u16) -> Result<(), SourceError> {
        let mut m = vec![5u8, buttons];
        m.extend_from_slice(&x.to_be_bytes());
        m.extend_from_slice(&y.to_be_bytes());
        self.stream.write_all(&m)?;
        Ok(())
    }

    /// The screen as the updates so far drew it.
    pub fn frame(&self) -> Frame {
        Frame {
            width: self.width,
            height: self.height,
            rgb: self.rgb.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rfb::notice::NoticeSession;
    use std::os::unix::net::UnixStream;

    /// Serves `session` on one end of a socket pair from a thread; returns the other end.
    fn serve(mut session: NoticeSession) -> UnixStream {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            theirs.write_all(NoticeSession::greeting()).unwrap();
            let mut buf = [0u8; 4096];
            loop {
                let n = match theirs.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                match session.receive(&buf[..n]) {
                    Ok(out) => {
                        if theirs.write_all(&out).is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        ours
    }

    #[test]
    fn a_full_update_reads_the_servers_frame() {
        let session = NoticeSession::new(90, 60, "work", &["Hello", "42"]);
        let expected = session.rgb().to_vec();
        let mut source = RfbSource::connect(serve(session)).unwrap();
        source.update(false).unwrap();
        let frame = source.frame();
        assert_eq!((frame.width(), frame.height()), (90, 60));
        assert_eq!(frame.rgb(), &expected[..]);
        assert!(frame.rgb().chunks(3).any(|p| p == rfb::notice::TEXT));
    }

    #[test]
    fn a_server_that_lies_about_a_rectangle_is_refused() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut out = rfb::proto::SERVER_VERSION.to_vec();
            out.extend_from_slice(&[1, SECURITY_NONE, 0, 0, 0, 0]);
            rfb::proto::server_init(4, 4, "x", &mut out);
            rfb::proto::update_header(1, &mut out);
            rfb::proto::rect_header(2, 2, 4, 4, encoding::RAW, &mut out);
            out.extend_from_slice(&[0xab; 64]);
            let _ = theirs.write_all(&out);
            let mut sink = Vec::new();
            let _ = theirs.read_to_end(&mut sink);
        });
        let mut source = RfbSource::connect(ours).unwrap();
        assert!(matches!(
            source.update(false),
            Err(SourceError::Protocol("a rectangle outside the screen"))
        ));
    }

    #[test]
    fn a_screen_too_large_is_refused_before_it_is_allocated() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut out = rfb::proto::SERVER_VERSION.to_vec();
            out.extend_from_slice(&[1, SECURITY_NONE, 0, 0, 0, 0]);
            rfb::proto::server_init(65535, 65535, "x", &mut out);
            let _ = theirs.write_all(&out);
            let mut sink = Vec::new();
            let _ = theirs.read_to_end(&mut sink);
        });
        assert!(matches!(
            RfbSource::connect(ours),
            Err(SourceError::Size(DisplayError::BadSize { .. }))
        ));
    }

    #[test]
    fn a_composed_device_screen_served_by_the_host_reads_back_bar_and_frame() {
        use crate::{Compositor, Foreground};
        let mut c = Compositor::new(60, 80, 10).unwrap();
        c.switch(Foreground {
            name: "work".into(),
            colour: [0x1f, 0x6f, 0xd0],
        });
        c.set_frame(Frame::new(60, 70, [1, 2, 3].repeat(60 * 70)).unwrap());
        let mut session = NoticeSession::new(60, 80, "device", &[]);
        assert!(session.show(c.compose().rgb()).is_empty());
        let mut source = RfbSource::connect(serve(session)).unwrap();
        source.update(false).unwrap();
        let frame = source.frame();
        assert_eq!(frame, c.compose());
        assert_eq!(frame.pixel(0, 0), Some([0x1f, 0x6f, 0xd0]));
        assert_eq!(frame.pixel(30, 50), Some([1, 2, 3]));
    }
}
