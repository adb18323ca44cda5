//! CopyRect where it pays: vertical scrolling. A text console scrolling on virtio-gpu (Linux
//! fbcon) flushes its whole area with every row moved up; a client that announced CopyRect
//! then gets one CopyRect (the rows it already has, moved) and the newly exposed rows, instead
//! of the whole area again.
//!
//! The server keeps, per such client, the frame the client holds ([`ClientFrame`]: one RGB
//! frame of the screen's size, updated with everything sent). A damaged rectangle is compared
//! with it row by row through row hashes: a few rows of the new content that differ from their
//! neighbours name candidate shifts (where the same row was before), each candidate is checked
//! on every row of the overlap by hash and then byte for byte. No per-pixel search over all
//! shifts; nothing is sent as a copy that is not exactly the client's own pixels.

use std::collections::HashMap;

use devices::virtio::gpu::protocol::Rect;

/// Rectangles lower than this are sent as they are (a copy saves too little).
const MIN_ROWS: u32 = 8;
/// Rows of the new content that propose shifts, and shifts tried at most.
const SAMPLES: usize = 8;
const MAX_CANDIDATES: usize = 16;

/// A vertical scroll found in a damaged rectangle: copy `copy` from the client's own rows
/// starting at `src_y` (same columns), then send `exposed` (the rows that are new).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scroll {
    pub copy: Rect,
    pub src_y: u32,
    pub exposed: Rect,
}

/// The screen as one client has it (RGB, 3 bytes a pixel).
#[derive(Debug, Clone)]
pub struct ClientFrame {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
    /// Every pixel has been sent at least once (before that, no copy is made from it).
    complete: bool,
}

impl ClientFrame {
    /// A frame of `width` x `height` the client has nothing of yet.
    pub fn new(width: u32, height: u32) -> ClientFrame {
        ClientFrame {
            width,
            height,
            rgb: vec![0; width as usize * height as usize * 3],
            complete: false,
        }
    }

    /// The frame's size.
    pub fn size(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    fn row(&self, x: u32, y: u32, width: u32) -> &[u8] {
        let start = (y as usize * self.width as usize + x as usize) * 3;
        &self.rgb[start..start + width as usize * 3]
    }

    /// Records that the client got `rgb` (row by row) for `r`; ignored unless `r` lies
    /// inside the frame and `rgb` is exactly its size.
    pub fn apply(&mut self, r: Rect, rgb: &[u8]) {
        if !r.fits_in(self.width, self.height)
            || rgb.len() != r.width as usize * r.height as usize * 3
        {
            return;
        }
        let line = r.width as usize * 3;
        for (i, src) in rgb.chunks_exact(line).enumerate() {
            let start = ((r.y as usize + i) * self.width as usize + r.x as usize) * 3;
            self.rgb[start..start + line].copy_from_slice(src);
        }
        if r.x == 0 && r.y == 0 && r.width == self.width && r.height == self.height {
            self.complete = true;
        }
    }

    /// Records a CopyRect the client carries out: `dst` gets the rows from `src_y` down.
    pub fn apply_copy(&mut self, dst: Rect, src_y: u32) {
        let src = Rect { y: src_y, ..dst };
        if !dst.fits_in(self.width, self.height) || !src.fits_in(self.width, self.height) {
            return;
        }
        let rows: Vec<u8> = (0..dst.height)
            .flat_map(|i| self.row(dst.x, src_y + i, dst.width).to_vec())
            .collect();
        self.apply(dst, &rows);
    }

    /// Whether the new content `rgb` of `r` is the client's content of `r` moved up or down
    /// by whole rows (with at least half of its rows moved), and how.
    pub fn find_scroll(&self, r: Rect, rgb: &[u8]) -> Option<Scroll> {
        if !self.complete
            || r.height < MIN_ROWS
            || r.width == 0
            || !r.fits_in(self.width, self.height)
            || rgb.len() != r.width as usize * r.height as usize * 3
        {
            return None;
        }
        let line = r.width as usize * 3;
        let h = r.height as usize;
        let new_rows: Vec<&[u8]> = rgb.chunks_exact(line).collect();
        let old_rows: Vec<&[u8]> = (0..r.height)
            .map(|i| self.row(r.x, r.y + i, r.width))
            .collect();
        let new_hash: Vec<u64> = new_rows.iter().map(|row| hash(row)).collect();
        let old_hash: Vec<u64> = old_rows.iter().map(|row| hash(row)).collect();
        if new_hash == old_hash {
            return None;
        }
        let mut where_old: HashMap<u64, Vec<usize>> = HashMap::new();
        for (j, &hsh) in old_hash.iter().enumerate() {
            let at = where_old.entry(hsh).or_default();
            if at.len() < 4 {
                at.push(j);
            }
        }
        // Shifts proposed by distinctive new rows (unlike the row above: not a blank run).
        let mut candidates: Vec<isize> = Vec::new();
        let samples = (1..h)
            .filter(|&i| new_hash[i] != new_hash[i - 1])
            .take(SAMPLES);
        for i in samples {
            for &j in where_old
                .get(&new_hash[i])
                .map(Vec::as_slice)
                .unwrap_or(&[])
            {
                let k = j as isize - i as isize;
                if k != 0 && !candidates.contains(&k) && candidates.len() < MAX_CANDIDATES {
                    candidates.push(k);
                }
            }
        }
        // The smallest shift whose overlap matches on every row, and then byte for byte.
        candidates.sort_by_key(|k| k.unsigned_abs());
        let k = candidates.into_iter().find(|&k| {
            let m = k.unsigned_abs();
            if m * 2 > h {
                return false;
            }
            let pairs = || (0..h - m).map(move |i| if k > 0 { (i, i + m) } else { (i + m, i) });
            pairs().all(|(n, o)| new_hash[n] == old_hash[o])
                && pairs().all(|(n, o)| new_rows[n] == old_rows[o])
        })?;
        let m = u32::try_from(k.unsigned_abs()).ok()?;
        let moved = r.height - m;
        Some(if k > 0 {
            // Up: new row y shows old row y + m; the bottom m rows are new.
            Scroll {
                copy: Rect { height: moved, ..r },
                src_y: r.y + m,
                exposed: Rect {
                    y: r.y + moved,
                    height: m,
                    ..r
                },
            }
        } else {
            // Down: new row y + m shows old row y; the top m rows are new.
            Scroll {
                copy: Rect {
                    y: r.y + m,
                    height: moved,
                    ..r
                },
                src_y: r.y,
                exposed: Rect { height: m, ..r },
            }
        })
    }
}

/// The rows `rows` of a rectangle's RGB (`width` pixels a row).
pub fn rows_of(rgb: &[u8], width: u32, first: u32, count: u32) -> &[u8] {
    let line = width as usize * 3;
    &rgb[first as usize * line..(first + count) as usize * line]
}

/// FNV-1a over a row (a cheap hash: every candidate is checked byte for byte after).
fn hash(row: &[u8]) -> u64 {
    row.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A screen of text-like rows: each line its own pattern (no period), every 7th blank.
    fn screen(w: u32, h: u32, first_line: u32) -> Vec<u8> {
        let mut v = Vec::with_capacity((w * h * 3) as usize);
        for y in 0..h {
            let line = y + first_line;
            for x in 0..w {
                let mix = line.wrapping_mul(2_654_435_761) ^ x.wrapping_mul(40_503);
                let on = !line.is_multiple_of(7) && (mix >> 7) % 5 < 2;
                v.extend_from_slice(if on { &[200, 200, 200] } else { &[0, 0, 16] });
            }
        }
        v
    }

    fn full(w: u32, h: u32) -> Rect {
        Rect::sized(w, h)
    }

    /// What a client holds after taking `s` and the exposed rows of `new`.
    fn replay(frame: &ClientFrame, s: Scroll, r: Rect, new: &[u8]) -> ClientFrame {
        let mut c = frame.clone();
        c.apply_copy(s.copy, s.src_y);
        let exposed = rows_of(new, r.width, s.exposed.y - r.y, s.exposed.height);
        c.apply(s.exposed, exposed);
        c
    }

    #[test]
    fn a_scroll_up_becomes_a_copy_and_the_new_rows() {
        let (w, h) = (64, 48);
        let mut f = ClientFrame::new(w, h);
        f.apply(full(w, h), &screen(w, h, 0));
        let new = screen(w, h, 3); // three rows up
        let s = f.find_scroll(full(w, h), &new).expect("a scroll");
        assert_eq!(s.src_y, 3);
        assert_eq!(
            s.copy,
            Rect {
                height: 45,
                ..full(w, h)
            }
        );
        assert_eq!(
            s.exposed,
            Rect {
                y: 45,
                height: 3,
                ..full(w, h)
            }
        );
        let mut want = ClientFrame::new(w, h);
        want.apply(full(w, h), &new);
        assert_eq!(replay(&f, s, full(w, h), &new).rgb, want.rgb);
    }

    #[test]
    fn a_scroll_down_inside_a_rectangle_too() {
        let (w, h) = (40, 60);
        let mut f = ClientFrame::new(w, h);
        f.apply(full(w, h), &screen(w, h, 10));
        // Rows 20..50 of the screen move down by 2 within that band.
        let r = Rect {
            x: 0,
            y: 20,
            width: w,
            height: 30,
        };
        let mut new = screen(w, 2, 500); // two new rows on top
        new.extend_from_slice(rows_of(&screen(w, h, 10), w, 20, 28));
        let s = f.find_scroll(r, &new).expect("a scroll");
        assert_eq!((s.src_y, s.copy.y, s.copy.height), (20, 22, 28));
        assert_eq!(s.exposed, Rect { height: 2, ..r });
        let got = replay(&f, s, r, &new);
        let mut want = f.clone();
        want.apply(r, &new);
        assert_eq!(got.rgb, want.rgb);
    }

    #[test]
    fn changes_that_are_not_a_scroll_are_not_taken_for_one() {
        let (w, h) = (64, 48);
        let mut f = ClientFrame::new(w, h);
        let old = screen(w, h, 0);
        f.apply(full(w, h), &old);
        // Same content: nothing to copy.
        assert_eq!(f.find_scroll(full(w, h), &old), None);
        // A shift of three rows but one pixel in the moved part differs.
        let mut new = screen(w, h, 3);
        new[10 * w as usize * 3 + 5] ^= 1;
        assert_eq!(f.find_scroll(full(w, h), &new), None);
        // Unrelated content.
        let other: Vec<u8> = (0..w * h * 3).map(|i| (i * 31 % 251) as u8).collect();
        assert_eq!(f.find_scroll(full(w, h), &other), None);
        // More than half the rows new.
        assert_eq!(f.find_scroll(full(w, h), &screen(w, h, 30)), None);
    }

    #[test]
    fn no_copy_before_the_client_has_the_whole_screen_or_out_of_bounds() {
        let (w, h) = (64, 48);
        let mut f = ClientFrame::new(w, h);
        f.apply(
            Rect {
                height: 47,
                ..full(w, h)
            },
            &screen(w, 47, 0),
        );
        assert_eq!(f.find_scroll(full(w, h), &screen(w, h, 3)), None);
        f.apply(full(w, h), &screen(w, h, 0));
        let past = Rect {
            y: 10,
            ..full(w, h)
        };
        assert_eq!(f.find_scroll(past, &screen(w, h, 3)), None);
        // A wrongly sized buffer or rectangle changes nothing.
        let before = f.rgb.clone();
        f.apply(past, &screen(w, h, 3));
        f.apply(full(w, h), &[1, 2, 3]);
        f.apply_copy(
            Rect {
                y: 40,
                ..full(w, 20)
            },
            0,
        );
        assert_eq!(f.rgb, before);
    }

    #[test]
    fn a_one_row_scroll_of_a_phone_screen_costs_one_row() {
        let (w, h) = (720, 1280);
        let mut f = ClientFrame::new(w, h);
        f.apply(full(w, h), &screen(w, h, 0));
        let s = f
            .find_scroll(full(w, h), &screen(w, h, 1))
            .expect("a scroll");
        // 32-bit pixels on the wire: CopyRect is a header and a source position.
        let raw = 16 + (w * h * 4) as usize;
        let copy = 16 + 4 + 16 + (s.exposed.width * s.exposed.height * 4) as usize;
        eprintln!(
            "MEASURE one-row scroll of 720x1280: Raw {raw} bytes, CopyRect + Raw row {copy} bytes"
        );
        assert_eq!(s.exposed.height, 1);
        assert!(copy * 1000 < raw);
    }
}
