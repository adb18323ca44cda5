//! A minimal RFB 3.8 (VNC) client for the tests: security None, 32-bit BGRX pixels, Raw,
//! CopyRect and ZRLE decoding into an RGB copy of the screen. Written from RFC 6143 so the server is checked
//! against a reading of the protocol that is not its own code.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A minimal RFB 3.8 client on a raw socket: 32-bit little-endian BGRX pixels, Raw only.
pub struct RfbClient {
    /// The connection, for tests that write their own (hostile) messages.
    pub stream: TcpStream,
    /// The screen size from ServerInit.
    pub width: u16,
    /// The screen size from ServerInit.
    pub height: u16,
    /// The screen as RGB, updated by every Raw rectangle.
    pub frame: Vec<u8>,
    /// The ZRLE inflater (one zlib stream for the connection), when ZRLE was asked for.
    zrle: Option<flate2::Decompress>,
    /// Compressed bytes of the ZRLE rectangles read so far.
    pub zrle_bytes: usize,
    /// CopyRect rectangles read so far.
    pub copy_rects: usize,
}

impl RfbClient {
    /// Connects to 127.0.0.1:`port` asking for Raw.
    pub fn connect(port: u16) -> RfbClient {
        Self::connect_with(port, false)
    }

    /// Connects to 127.0.0.1:`port`, asking for ZRLE first when `zrle`.
    pub fn connect_with(port: u16, zrle: bool) -> RfbClient {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to VNC");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let mut version = [0u8; 12];
        stream.read_exact(&mut version).expect("server version");
        assert_eq!(&version, b"RFB 003.008\n");
        stream.write_all(b"RFB 003.008\n").expect("our version");
        let mut types = [0u8; 2];
        stream.read_exact(&mut types).expect("security types");
        assert_eq!(types, [1, 1], "one type: None");
        stream.write_all(&[1]).expect("choose None");
        let mut result = [0u8; 4];
        stream.read_exact(&mut result).expect("security result");
        assert_eq!(result, [0; 4]);
        stream.write_all(&[1]).expect("ClientInit (shared)");
        let mut init = [0u8; 24];
        stream.read_exact(&mut init).expect("ServerInit");
        let width = u16::from_be_bytes([init[0], init[1]]);
        let height = u16::from_be_bytes([init[2], init[3]]);
        assert_eq!(init[4], 32, "32 bits per pixel");
        let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]);
        let mut name = vec![0u8; name_len as usize];
        stream.read_exact(&mut name).expect("desktop name");
        // SetEncodings: (ZRLE,) CopyRect, Raw, DesktopSize.
        let mut encodings = if zrle {
            vec![2, 0, 0, 4, 0, 0, 0, 16]
        } else {
            vec![2, 0, 0, 3]
        };
        encodings.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x21]);
        stream.write_all(&encodings).expect("SetEncodings");
        RfbClient {
            stream,
            width,
            height,
            frame: vec![0; usize::from(width) * usize::from(height) * 3],
            zrle: zrle.then(|| flate2::Decompress::new(true)),
            zrle_bytes: 0,
            copy_rects: 0,
        }
    }

    /// A FramebufferUpdateRequest for the rectangle.
    pub fn request(&mut self, incremental: bool, x: u16, y: u16, w: u16, h: u16) {
        let mut m = vec![3, u8::from(incremental)];
        for v in [x, y, w, h] {
            m.extend_from_slice(&v.to_be_bytes());
        }
        self.stream.write_all(&m).expect("FramebufferUpdateRequest");
    }

    /// A KeyEvent (an X keysym, pressed or released).
    pub fn key(&mut self, keysym: u32, down: bool) {
        let mut m = vec![4, u8::from(down), 0, 0];
        m.extend_from_slice(&keysym.to_be_bytes());
        self.stream.write_all(&m).expect("KeyEvent");
    }

    /// A PointerEvent (button mask, position).
    pub fn pointer(&mut self, buttons: u8, x: u16, y: u16) {
        let mut m = vec![5, buttons];
        m.extend_from_slice(&x.to_be_bytes());
        m.extend_from_slice(&y.to_be_bytes());
        self.stream.write_all(&m).expect("PointerEvent");
    }

    /// Reads one FramebufferUpdate into the frame; returns its Raw rectangles.
    pub fn read_update(&mut self) -> Vec<(u16, u16, u16, u16)> {
        let mut head = [0u8; 4];
        self.stream.read_exact(&mut head).expect("update header");
        assert_eq!(head[0], 0, "a FramebufferUpdate");
        let n = u16::from_be_bytes([head[2], head[3]]);
        let mut rects = Vec::new();
        for _ in 0..n {
            let mut r = [0u8; 12];
            self.stream.read_exact(&mut r).expect("rectangle header");
            let be = |i: usize| u16::from_be_bytes([r[i], r[i + 1]]);
            let (x, y, w, h) = (be(0), be(2), be(4), be(6));
            let encoding = i32::from_be_bytes([r[8], r[9], r[10], r[11]]);
            assert!(
                x + w <= self.width && y + h <= self.height,
                "inside the screen"
            );
            if encoding == 1 {
                self.copy_rect(x, y, w, h);
                self.copy_rects += 1;
                rects.push((x, y, w, h));
                continue;
            }
            let px = match encoding {
                0 => {
                    let mut px = vec![0u8; usize::from(w) * usize::from(h) * 4];
                    self.stream.read_exact(&mut px).expect("pixels");
                    px
                }
                16 => self.read_zrle(usize::from(w), usize::from(h)),
                other => panic!("encoding {other}, neither Raw, CopyRect nor ZRLE"),
            };
            for row in 0..usize::from(h) {
                for col in 0..usize::from(w) {
                    let s = (row * usize::from(w) + col) * 4;
                    let d =
                        ((usize::from(y) + row) * usize::from(self.width) + usize::from(x) + col)
                            * 3;
                    self.frame[d..d + 3].copy_from_slice(&[px[s + 2], px[s + 1], px[s]]);
                }
            }
            rects.push((x, y, w, h));
        }
        rects
    }

    /// A CopyRect (RFC 6143 7.7.2): the rectangle at `x, y` gets the screen's pixels from the
    /// source position that follows, read as they were before the copy.
    fn copy_rect(&mut self, x: u16, y: u16, w: u16, h: u16) {
        let mut src = [0u8; 4];
        self.stream.read_exact(&mut src).expect("CopyRect source");
        let (sx, sy) = (
            usize::from(u16::from_be_bytes([src[0], src[1]])),
            usize::from(u16::from_be_bytes([src[2], src[3]])),
        );
        let (w, h, stride) = (usize::from(w), usize::from(h), usize::from(self.width));
        assert!(
            sx + w <= stride && sy + h <= usize::from(self.height),
            "CopyRect source inside the screen"
        );
        let rows: Vec<Vec<u8>> = (0..h)
            .map(|r| {
                self.frame[((sy + r) * stride + sx) * 3..((sy + r) * stride + sx + w) * 3].to_vec()
            })
            .collect();
        for (r, row) in rows.iter().enumerate() {
            let d = ((usize::from(y) + r) * stride + usize::from(x)) * 3;
            self.frame[d..d + w * 3].copy_from_slice(row);
        }
    }

    /// One ZRLE rectangle's pixels, as Raw's 4 bytes each (RFC 6143 7.7.6: 64x64 tiles of
    /// 3-byte CPIXELs, raw, solid, packed palette or run-length).
    fn read_zrle(&mut self, w: usize, h: usize) -> Vec<u8> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).expect("ZRLE length");
        let mut data = vec![0u8; u32::from_be_bytes(len) as usize];
        self.stream.read_exact(&mut data).expect("ZRLE data");
        self.zrle_bytes += data.len();
        let z = self.zrle.as_mut().expect("ZRLE only after asking for it");
        let mut plain = Vec::with_capacity(w * h * 4 + 4096);
        let before = z.total_out();
        z.decompress_vec(&data, &mut plain, flate2::FlushDecompress::Sync)
            .expect("inflate");
        assert_eq!(z.total_out() - before, plain.len() as u64);
        let mut at = 0;
        let mut take = |n: usize| {
            let s = plain[at..at + n].to_vec();
            at += n;
            s
        };
        let mut out = vec![0u8; w * h * 4];
        for ty in (0..h).step_by(64) {
            for tx in (0..w).step_by(64) {
                let (tw, th) = (64.min(w - tx), 64.min(h - ty));
                let sub = take(1)[0];
                let mut tile: Vec<Vec<u8>> = Vec::with_capacity(tw * th);
                match sub {
                    0 => (0..tw * th).for_each(|_| tile.push(take(3))),
                    1 => tile = vec![take(3); tw * th],
                    2..=16 => {
                        let palette: Vec<Vec<u8>> = (0..sub).map(|_| take(3)).collect();
                        let bits =
                            [0, 0, 1, 2, 2, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4][usize::from(sub)];
                        for _ in 0..th {
                            let row = take((tw * bits).div_ceil(8));
                            for x in 0..tw {
                                let b = x * bits;
                                let i = (row[b / 8] >> (8 - bits - b % 8)) & ((1 << bits) - 1);
                                tile.push(palette[usize::from(i)].clone());
                            }
                        }
                    }
                    128 | 130..=255 => {
                        let palette: Vec<Vec<u8>> =
                            (0..sub.saturating_sub(128)).map(|_| take(3)).collect();
                        while tile.len() < tw * th {
                            let (px, run) = if sub == 128 {
                                (take(3), true)
                            } else {
                                let i = take(1)[0];
                                (palette[usize::from(i & 0x7f)].clone(), i & 0x80 != 0)
                            };
                            let mut n = 1;
                            if run {
                                loop {
                                    let b = take(1)[0];
                                    n += usize::from(b);
                                    if b != 255 {
                                        break;
                                    }
                                }
                            }
                            (0..n).for_each(|_| tile.push(px.clone()));
                        }
                    }
                    other => panic!("ZRLE subencoding {other}"),
                }
                for (i, px) in tile.iter().enumerate() {
                    let d = ((ty + i / tw) * w + tx + i % tw) * 4;
                    out[d..d + 3].copy_from_slice(px);
                }
            }
        }
        assert_eq!(at, plain.len(), "the rectangle used all its tile data");
        out
    }

    /// A non-incremental update of the whole screen; the frame as RGB.
    pub fn full_frame(&mut self) -> Vec<u8> {
        let (w, h) = (self.width, self.height);
        self.request(false, 0, 0, w, h);
        let rects = self.read_update();
        assert_eq!(rects, [(0, 0, w, h)], "one full-screen rectangle");
        self.frame.clone()
    }

    /// Whether the server closes the connection (within the read timeout).
    pub fn closed_by_server(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}
