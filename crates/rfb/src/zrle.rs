//! The ZRLE encoding (RFC 6143 7.7.6): a rectangle as 64x64 tiles, each solid, a packed
//! palette of up to 16 colours, or raw, in compact pixels (CPIXELs), all through one zlib
//! stream per session that lives as long as the connection (the client's inflater keeps its
//! window across rectangles).

use flate2::{Compress, Compression, FlushCompress, Status};

use crate::proto::{self, PixelFormat};

/// The ZRLE encoding number.
pub const ZRLE: i32 = 16;
/// Tile side.
const TILE: usize = 64;
/// Subencodings used.
const RAW: u8 = 0;
const SOLID: u8 = 1;
/// Most colours in a packed-palette tile.
const MAX_PALETTE: usize = 16;

/// One session's ZRLE encoder (its zlib stream).
pub struct ZrleEncoder {
    zlib: Compress,
}

impl Default for ZrleEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ZrleEncoder {
    /// A new stream (one per client connection).
    pub fn new() -> Self {
        ZrleEncoder {
            zlib: Compress::new(Compression::new(6), true),
        }
    }

    /// Appends one ZRLE rectangle at (`x`, `y`), `width` x `height`, of `rgb` (8-bit
    /// triples, row by row) in the client's `format`: its header, the compressed length and
    /// the compressed tiles.
    pub fn rect(
        &mut self,
        (x, y, width, height): (u16, u16, u16, u16),
        rgb: &[u8],
        format: &PixelFormat,
        out: &mut Vec<u8>,
    ) {
        let (w, h) = (usize::from(width), usize::from(height));
        let plain = tiles(rgb, w, h, format);
        proto::rect_header(x, y, width, height, ZRLE, out);
        let len_at = out.len();
        out.extend_from_slice(&[0; 4]);
        let start = out.len();
        self.deflate(&plain, out);
        let len = u32::try_from(out.len() - start).unwrap_or(u32::MAX);
        out[len_at..start].copy_from_slice(&len.to_be_bytes());
    }

    /// Compresses `input` onto `out` and flushes (Z_SYNC_FLUSH), so the client can decode
    /// the rectangle without the next one.
    fn deflate(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        loop {
            out.reserve(input.len() / 2 + 1024);
            let before_in = self.zlib.total_in();
            let status = self
                .zlib
                .compress_vec(input, out, FlushCompress::Sync)
                .unwrap_or(Status::StreamEnd);
            let used = usize::try_from(self.zlib.total_in() - before_in).unwrap_or(input.len());
            input = &input[used.min(input.len())..];
            // Done once all input is in and the flush fitted (spare room left over).
            if input.is_empty() && out.len() < out.capacity() || status == Status::StreamEnd {
                return;
            }
        }
    }
}

/// How many bytes of a pixel a CPIXEL keeps, and from where: a 32-bit true-colour pixel
/// whose colours fit in three of its bytes drops the fourth; any other keeps all.
fn cpixel_range(format: &PixelFormat) -> std::ops::Range<usize> {
    let bpp = format.bytes_per_pixel();
    if format.bits_per_pixel != 32 || format.depth > 24 {
        return 0..bpp;
    }
    let top = [
        (format.red_max, format.red_shift),
        (format.green_max, format.green_shift),
        (format.blue_max, format.blue_shift),
    ]
    .iter()
    .map(|&(max, shift)| u32::from(shift) + (16 - max.leading_zeros()))
    .max()
    .unwrap_or(32);
    let bottom = [format.red_shift, format.green_shift, format.blue_shift]
        .into_iter()
        .min()
        .unwrap_or(0);
    // The low three bytes are bytes 0..3 of a little-endian pixel, 1..4 of a big-endian one.
    match (top <= 24, bottom >= 8, format.big_endian) {
        (true, _, false) => 0..3,
        (true, _, true) => 1..4,
        (false, true, false) => 1..4,
        (false, true, true) => 0..3,
        _ => 0..4,
    }
}

/// The uncompressed tile data of a `w` x `h` area of `rgb`.
fn tiles(rgb: &[u8], w: usize, h: usize, format: &PixelFormat) -> Vec<u8> {
    let bpp = format.bytes_per_pixel();
    let keep = cpixel_range(format);
    let mut pixels = Vec::with_capacity(w * h * bpp);
    format.encode(rgb, &mut pixels);
    let mut out = Vec::with_capacity(pixels.len() / 2);
    let mut tile: Vec<&[u8]> = Vec::with_capacity(TILE * TILE);
    for ty in (0..h).step_by(TILE) {
        for tx in (0..w).step_by(TILE) {
            let (tw, th) = (TILE.min(w - tx), TILE.min(h - ty));
            tile.clear();
            for y in ty..ty + th {
                for x in tx..tx + tw {
                    let at = (y * w + x) * bpp;
                    tile.push(&pixels[at + keep.start..at + keep.end]);
                }
            }
            encode_tile(&tile, tw, &mut out);
        }
    }
    out
}

/// One tile (`width` CPIXELs a row): solid, packed palette or raw, whichever fits.
fn encode_tile(tile: &[&[u8]], width: usize, out: &mut Vec<u8>) {
    let mut palette: Vec<&[u8]> = Vec::new();
    for px in tile {
        if !palette.contains(px) {
            if palette.len() == MAX_PALETTE {
                out.push(RAW);
                tile.iter().for_each(|p| out.extend_from_slice(p));
                return;
            }
            palette.push(px);
        }
    }
    if palette.len() == 1 {
        out.push(SOLID);
        out.extend_from_slice(palette[0]);
        return;
    }
    // Packed palette: 1, 2 or 4 bits an index, most significant first, rows padded.
    let bits = match palette.len() {
        2 => 1,
        3..=4 => 2,
        _ => 4,
    };
    out.push(u8::try_from(palette.len()).unwrap_or(0));
    palette.iter().for_each(|p| out.extend_from_slice(p));
    for row in tile.chunks(width) {
        let (mut byte, mut used) = (0u8, 0);
        for px in row {
            let position = palette.iter().position(|p| p == px).unwrap_or(0);
            let index = u8::try_from(position).unwrap_or(0);
            byte |= index << (8 - bits - used);
            used += bits;
            if used == 8 {
                out.push(byte);
                (byte, used) = (0, 0);
            }
        }
        if used > 0 {
            out.push(byte);
        }
    }
}

#[cfg(test)]
// Test pictures and sizes of a few hundred pixels: the casts cannot truncate.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    /// An independent reading of ZRLE: inflates with the session's stream and rebuilds the
    /// pixels (as the client's format's bytes) of a `w` x `h` rectangle.
    fn decode(z: &mut Decompress, data: &[u8], w: usize, h: usize, cpixel: usize) -> Vec<Vec<u8>> {
        let len = u32::from_be_bytes(data[12..16].try_into().unwrap()) as usize;
        assert_eq!(i32::from_be_bytes(data[8..12].try_into().unwrap()), ZRLE);
        assert_eq!(data.len(), 16 + len, "the length covers the rest");
        let mut plain = Vec::with_capacity(w * h * 8);
        z.decompress_vec(&data[16..], &mut plain, FlushDecompress::Sync)
            .unwrap();
        let mut pixels = vec![Vec::new(); w * h];
        let mut at = 0;
        let mut take = |n: usize| {
            let s = plain[at..at + n].to_vec();
            at += n;
            s
        };
        for ty in (0..h).step_by(TILE) {
            for tx in (0..w).step_by(TILE) {
                let (tw, th) = (TILE.min(w - tx), TILE.min(h - ty));
                let sub = take(1)[0];
                let put = |pixels: &mut Vec<Vec<u8>>, i: usize, p: Vec<u8>| {
                    pixels[(ty + i / tw) * w + tx + i % tw] = p;
                };
                match sub {
                    0 => (0..tw * th).for_each(|i| put(&mut pixels, i, take(cpixel))),
                    1 => {
                        let p = take(cpixel);
                        (0..tw * th).for_each(|i| put(&mut pixels, i, p.clone()));
                    }
                    2..=16 => {
                        let pal: Vec<Vec<u8>> = (0..sub).map(|_| take(cpixel)).collect();
                        let bits = match sub {
                            2 => 1,
                            3 | 4 => 2,
                            _ => 4,
                        };
                        let row_bytes = (tw * bits).div_ceil(8);
                        for y in 0..th {
                            let row = take(row_bytes);
                            for x in 0..tw {
                                let bit = x * bits;
                                let v = (row[bit / 8] >> (8 - bits - bit % 8)) & ((1 << bits) - 1);
                                put(&mut pixels, y * tw + x, pal[usize::from(v)].clone());
                            }
                        }
                    }
                    other => panic!("subencoding {other} is not one this encoder sends"),
                }
            }
        }
        assert_eq!(at, plain.len(), "no bytes left over");
        pixels
    }

    /// A 150 x 70 picture: a solid area, a two-colour stripe area, and noise.
    fn picture(w: usize, h: usize, seed: u32) -> Vec<u8> {
        let mut rgb = Vec::with_capacity(w * h * 3);
        let mut n = seed;
        for y in 0..h {
            for x in 0..w {
                n = n.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let px = if x < 64 {
                    [10, 20, 30]
                } else if x < 128 {
                    if y % 3 == 0 {
                        [255, 255, 255]
                    } else {
                        [0, 0, 128]
                    }
                } else {
                    [(n >> 16) as u8, (n >> 8) as u8, n as u8]
                };
                rgb.extend_from_slice(&px);
            }
        }
        rgb
    }

    fn check(format: PixelFormat, cpixel: usize) {
        let (w, h) = (150, 70);
        let mut enc = ZrleEncoder::new();
        let mut z = Decompress::new(true);
        for seed in [1, 2] {
            let rgb = picture(w, h, seed);
            let mut out = Vec::new();
            enc.rect((5, 6, w as u16, h as u16), &rgb, &format, &mut out);
            assert_eq!(&out[..8], &[0, 5, 0, 6, 0, 150, 0, 70]);
            let got = decode(&mut z, &out, w, h, cpixel);
            let mut want = Vec::new();
            format.encode(&rgb, &mut want);
            let bpp = format.bytes_per_pixel();
            let keep = cpixel_range(&format);
            for (i, px) in got.iter().enumerate() {
                assert_eq!(
                    px[..],
                    want[i * bpp + keep.start..i * bpp + keep.end],
                    "pixel {i}"
                );
            }
        }
    }

    #[test]
    fn native_pixels_round_trip_through_an_independent_decoder_across_rectangles() {
        check(PixelFormat::NATIVE, 3);
    }

    #[test]
    fn a_16_bit_client_gets_whole_pixels() {
        let mut pf = PixelFormat::NATIVE;
        (pf.bits_per_pixel, pf.depth) = (16, 16);
        (pf.red_max, pf.green_max, pf.blue_max) = (31, 63, 31);
        (pf.red_shift, pf.green_shift, pf.blue_shift) = (11, 5, 0);
        check(pf, 2);
    }

    #[test]
    fn a_big_endian_client_with_colours_in_the_high_bytes_gets_those() {
        let mut pf = PixelFormat::NATIVE;
        pf.big_endian = true;
        (pf.red_shift, pf.green_shift, pf.blue_shift) = (24, 16, 8);
        assert_eq!(cpixel_range(&pf), 0..3);
        check(pf, 3);
    }

    #[test]
    fn a_flat_screen_is_far_smaller_than_raw() {
        let (w, h) = (720usize, 1280usize);
        let rgb = [0x2a, 0x9d, 0x8f].repeat(w * h);
        let mut out = Vec::new();
        ZrleEncoder::new().rect(
            (0, 0, w as u16, h as u16),
            &rgb,
            &PixelFormat::NATIVE,
            &mut out,
        );
        assert!(
            out.len() < w * h * 4 / 500,
            "{} bytes for a flat 720x1280",
            out.len()
        );
    }
}
