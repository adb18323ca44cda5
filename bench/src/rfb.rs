//! A minimal RFB 3.8 viewer for the benchmarks: the handshake with security None, Raw or
//! ZRLE asked for, whole-screen update requests, and updates read to their end with their
//! size counted and chosen pixels of Raw rectangles picked out (a viewer that watches a
//! stamp or a colour). The same client reads pocketvisor and QEMU.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Result};

/// One pixel a viewer watches, with its colour as the last Raw rectangle over it showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watched {
    pub x: u16,
    pub y: u16,
    pub rgb: Option<[u8; 3]>,
}

impl Watched {
    pub fn at(x: u16, y: u16) -> Watched {
        Watched { x, y, rgb: None }
    }
}

/// An RFB client past the handshake.
pub struct Viewer {
    pub s: TcpStream,
    pub width: u16,
    pub height: u16,
    big_endian: bool,
    shifts: [u8; 3],
}

impl Viewer {
    /// Connects to `127.0.0.1:port` and asks for Raw, or ZRLE then Raw.
    pub fn connect(port: u16, zrle: bool) -> Result<Viewer> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_nodelay(true)?;
        let mut version = [0u8; 12];
        s.read_exact(&mut version)?;
        s.write_all(b"RFB 003.008\n")?;
        let mut n = [0u8; 1];
        s.read_exact(&mut n)?;
        let mut types = vec![0u8; usize::from(n[0])];
        s.read_exact(&mut types)?;
        if !types.contains(&1) {
            bail!("the server offers no security type None: {types:?}");
        }
        s.write_all(&[1])?;
        let mut result = [0u8; 4];
        s.read_exact(&mut result)?;
        s.write_all(&[1])?;
        let mut init = [0u8; 24];
        s.read_exact(&mut init)?;
        let (width, height) = (
            u16::from_be_bytes([init[0], init[1]]),
            u16::from_be_bytes([init[2], init[3]]),
        );
        // Pixel format at init[4..20]: bpp, depth, big-endian, true-colour, maxima, shifts.
        if init[4] != 32 || init[7] == 0 {
            bail!(
                "the server's pixels are not 32-bit true colour: {:?}",
                &init[4..20]
            );
        }
        let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]);
        let mut name = vec![0u8; usize::try_from(name_len)?];
        s.read_exact(&mut name)?;
        let mut enc = vec![2, 0, 0, if zrle { 2 } else { 1 }];
        if zrle {
            enc.extend_from_slice(&16i32.to_be_bytes());
        }
        enc.extend_from_slice(&0i32.to_be_bytes());
        s.write_all(&enc)?;
        Ok(Viewer {
            s,
            width,
            height,
            big_endian: init[6] != 0,
            shifts: [init[14], init[15], init[16]],
        })
    }

    /// Asks for an update of the whole screen.
    pub fn request(&mut self, incremental: bool) -> Result<()> {
        let mut m = vec![3, u8::from(incremental), 0, 0, 0, 0];
        m.extend_from_slice(&self.width.to_be_bytes());
        m.extend_from_slice(&self.height.to_be_bytes());
        self.s.write_all(&m)?;
        Ok(())
    }

    fn rgb(&self, px: &[u8]) -> [u8; 3] {
        let b = [px[0], px[1], px[2], px[3]];
        let v = if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        };
        self.shifts.map(|s| ((v >> s) & 0xff).to_le_bytes()[0])
    }

    /// Reads server messages up to and including one FramebufferUpdate; returns its size in
    /// bytes. The `watched` pixels that a Raw rectangle of it covers take their new colour.
    pub fn read_update(&mut self, watched: &mut [Watched]) -> Result<u64> {
        loop {
            let mut kind = [0u8; 1];
            self.s.read_exact(&mut kind)?;
            match kind[0] {
                0 => break,
                2 => continue, // Bell
                3 => {
                    let mut head = [0u8; 7];
                    self.s.read_exact(&mut head)?;
                    let len = u32::from_be_bytes([head[3], head[4], head[5], head[6]]);
                    skip(&mut self.s, u64::from(len))?;
                }
                other => bail!("server message {other}"),
            }
        }
        let mut head = [0u8; 3];
        self.s.read_exact(&mut head)?;
        let rects = u16::from_be_bytes([head[1], head[2]]);
        let mut total = 4u64;
        for _ in 0..rects {
            let mut r = [0u8; 12];
            self.s.read_exact(&mut r)?;
            let [x, y, w, h] = [0, 2, 4, 6].map(|i| u16::from_be_bytes([r[i], r[i + 1]]));
            let encoding = i32::from_be_bytes([r[8], r[9], r[10], r[11]]);
            let body = match encoding {
                0 => u64::from(w) * u64::from(h) * 4,
                16 => {
                    let mut len = [0u8; 4];
                    self.s.read_exact(&mut len)?;
                    total += 4;
                    u64::from(u32::from_be_bytes(len))
                }
                -223 => 0,
                other => bail!("encoding {other} was not asked for"),
            };
            total += 12 + body;
            let inside = |p: &Watched| {
                (x..x.saturating_add(w)).contains(&p.x) && (y..y.saturating_add(h)).contains(&p.y)
            };
            if encoding != 0 || !watched.iter().any(inside) {
                skip(&mut self.s, body)?;
                continue;
            }
            let mut pixels = vec![0u8; usize::try_from(body)?];
            self.s.read_exact(&mut pixels)?;
            for p in watched.iter_mut().filter(|p| inside(p)) {
                let i = (usize::from(p.y - y) * usize::from(w) + usize::from(p.x - x)) * 4;
                p.rgb = Some(self.rgb(&pixels[i..i + 4]));
            }
        }
        Ok(total)
    }
}

fn skip(s: &mut TcpStream, n: u64) -> Result<()> {
    std::io::copy(&mut Read::by_ref(s).take(n), &mut std::io::sink())?;
    Ok(())
}
