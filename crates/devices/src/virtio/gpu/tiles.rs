//! Which parts of a resource changed since they were last flushed, in tiles of
//! [`TILE`]x[`TILE`] pixels: a transfer marks the tiles whose pixels it changed, a flush takes
//! the marked tiles inside its rectangle as its damage. A guest that redraws a large area to
//! change a few digits (a ticking counter) then costs a viewer only the tiles that differ.
//! Damage still comes from the guest's flushes: nothing outside a flushed rectangle is ever
//! looked at, and a flush with no change in it damages nothing.

use super::protocol::Rect;

/// The side of a tile, in pixels.
pub const TILE: u32 = 16;
/// More rectangles than this from one flush are sent as their bounding box.
const MAX_RECTS: usize = 16;

/// One bit per tile of a `width` x `height` resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedTiles {
    width: u32,
    height: u32,
    cols: u32,
    bits: Vec<u64>,
}

impl ChangedTiles {
    /// Every tile marked (a new or restored resource: its first flush shows all of it).
    pub fn all(width: u32, height: u32) -> Self {
        let cols = width.div_ceil(TILE);
        let rows = height.div_ceil(TILE);
        let n = cols as usize * rows as usize;
        let mut bits = vec![u64::MAX; n.div_ceil(64)];
        if !n.is_multiple_of(64) {
            if let Some(last) = bits.last_mut() {
                *last = (1u64 << (n % 64)) - 1;
            }
        }
        ChangedTiles {
            width,
            height,
            cols,
            bits,
        }
    }

    fn index(&self, col: u32, row: u32) -> usize {
        row as usize * self.cols as usize + col as usize
    }

    fn get(&self, col: u32, row: u32) -> bool {
        let i = self.index(col, row);
        self.bits
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn set(&mut self, col: u32, row: u32, on: bool) {
        let i = self.index(col, row);
        if let Some(w) = self.bits.get_mut(i / 64) {
            if on {
                *w |= 1 << (i % 64);
            } else {
                *w &= !(1 << (i % 64));
            }
        }
    }

    /// Marks the tile holding pixel (`x`, `y`).
    pub fn mark(&mut self, x: u32, y: u32) {
        if x < self.width && y < self.height {
            self.set(x / TILE, y / TILE, true);
        }
    }

    /// The changed parts of `rect` (inside the resource) as few rectangles, each clipped to
    /// `rect`; tiles wholly inside `rect` are unmarked, those it only overlaps stay marked
    /// for the flush that covers the rest of them.
    pub fn take(&mut self, rect: Rect) -> Vec<Rect> {
        let Some(rect) = rect.intersect(&Rect::sized(self.width, self.height)) else {
            return Vec::new();
        };
        if rect.is_empty() {
            return Vec::new();
        }
        let (x_end, y_end) = (rect.x + rect.width, rect.y + rect.height);
        let (c0, c1) = (rect.x / TILE, (x_end - 1) / TILE);
        let (r0, r1) = (rect.y / TILE, (y_end - 1) / TILE);
        // Runs of marked tiles per tile row; a run equal to one in the row above extends it.
        let mut open: Vec<(u32, u32, Rect)> = Vec::new();
        let mut out = Vec::new();
        for row in r0..=r1 {
            let top = (row * TILE).max(rect.y);
            let bottom = ((row + 1) * TILE).min(y_end);
            let mut runs = Vec::new();
            let mut col = c0;
            while col <= c1 {
                if !self.get(col, row) {
                    col += 1;
                    continue;
                }
                let start = col;
                while col <= c1 && self.get(col, row) {
                    col += 1;
                }
                runs.push((start, col - 1));
            }
            let mut next = Vec::with_capacity(runs.len());
            for (a, b) in runs {
                let left = (a * TILE).max(rect.x);
                let right = ((b + 1) * TILE).min(x_end);
                match open.iter().position(|(oa, ob, _)| (*oa, *ob) == (a, b)) {
                    Some(i) => {
                        let (_, _, mut r) = open.swap_remove(i);
                        r.height = bottom - r.y;
                        next.push((a, b, r));
                    }
                    None => next.push((
                        a,
                        b,
                        Rect {
                            x: left,
                            y: top,
                            width: right - left,
                            height: bottom - top,
                        },
                    )),
                }
            }
            out.extend(open.drain(..).map(|(_, _, r)| r));
            open = next;
        }
        out.extend(open.into_iter().map(|(_, _, r)| r));
        // Unmark the tiles the flush covered whole.
        for row in r0..=r1 {
            let whole_row = row * TILE >= rect.y && ((row + 1) * TILE).min(self.height) <= y_end;
            for col in c0..=c1 {
                let whole_col = col * TILE >= rect.x && ((col + 1) * TILE).min(self.width) <= x_end;
                if whole_row && whole_col {
                    self.set(col, row, false);
                }
            }
        }
        if out.len() > MAX_RECTS {
            let all = out[1..].iter().fold(out[0], |acc, r| acc.union(r));
            out = vec![all];
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(x: u32, y: u32, width: u32, height: u32) -> Rect {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    #[test]
    fn a_new_resource_is_changed_everywhere_once() {
        let mut t = ChangedTiles::all(100, 40);
        assert_eq!(t.take(r(0, 0, 100, 40)), vec![r(0, 0, 100, 40)]);
        assert_eq!(t.take(r(0, 0, 100, 40)), vec![]);
    }

    #[test]
    fn a_flush_damages_only_the_changed_tiles_inside_it() {
        let mut t = ChangedTiles::all(160, 160);
        t.take(r(0, 0, 160, 160));
        // Two digits of a counter: tiles (1,1)-(1,2) and (5,1)-(5,2).
        for (x, y) in [(20, 20), (20, 40), (85, 17), (90, 47)] {
            t.mark(x, y);
        }
        let got = t.take(r(0, 16, 160, 32));
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got.contains(&r(16, 16, 16, 32)), "{got:?}");
        assert!(got.contains(&r(80, 16, 16, 32)), "{got:?}");
        assert_eq!(t.take(r(0, 0, 160, 160)), vec![]);
    }

    #[test]
    fn a_tile_the_flush_only_overlaps_stays_marked_for_the_rest_of_it() {
        let mut t = ChangedTiles::all(64, 64);
        t.take(r(0, 0, 64, 64));
        t.mark(10, 10);
        t.mark(12, 12);
        // The flush covers the left half of tile (0,0): that half is damaged, the tile stays.
        assert_eq!(t.take(r(0, 0, 8, 16)), vec![r(0, 0, 8, 16)]);
        assert_eq!(t.take(r(8, 0, 8, 16)), vec![r(8, 0, 8, 16)]);
        // Unmarked once a flush covered it whole.
        assert_eq!(t.take(r(0, 0, 16, 16)), vec![r(0, 0, 16, 16)]);
        assert_eq!(t.take(r(0, 0, 64, 64)), vec![]);
    }

    #[test]
    fn edge_tiles_of_an_odd_size_resource_count_as_whole() {
        let mut t = ChangedTiles::all(20, 20);
        assert_eq!(t.take(r(0, 0, 20, 20)), vec![r(0, 0, 20, 20)]);
        t.mark(19, 19);
        assert_eq!(t.take(r(0, 0, 20, 20)), vec![r(16, 16, 4, 4)]);
        assert_eq!(t.take(r(0, 0, 20, 20)), vec![]);
        // Marks and flushes outside the resource change nothing.
        t.mark(20, 0);
        assert_eq!(t.take(r(0, 0, 100, 100)), vec![]);
        assert_eq!(t.take(r(500, 500, 10, 10)), vec![]);
    }

    #[test]
    fn scattered_changes_become_one_bounding_box() {
        let mut t = ChangedTiles::all(1024, 16);
        t.take(r(0, 0, 1024, 16));
        for i in 0..32 {
            t.mark(i * 32, 0);
        }
        assert_eq!(t.take(r(0, 0, 1024, 16)), vec![r(0, 0, 1008, 16)]);
    }
}
