//! The handset's device screen: the foreground profile's frame under a status bar that only the
//! host draws.
//!
//! The top [`Compositor::bar_rows`] rows are the status bar: the foreground profile's colour with
//! its name in the built-in font ([`rfb::notice::draw_text`]). The profile's frame is placed
//! below the bar and cut to the area left, so no guest pixel is ever drawn over the bar and a
//! guest cannot imitate another profile's bar. A [`Compositor::switch`] drops the previous
//! profile's frame: until the new foreground's first frame arrives the area below the bar is
//! black, never the old profile's pixels under the new profile's bar.
//!
//! The compositor is sans-IO: the caller hands it frames (RGB triples, row by row) and sends the
//! composed frame wherever the device screen goes.

use thiserror::Error;

pub mod source;

pub use source::{RfbSource, SourceError};

/// The largest device screen or profile frame side accepted, in pixels.
pub const MAX_SIDE: usize = 8192;

/// Colour of the area below the bar that no frame covers.
pub const EMPTY: [u8; 3] = [0, 0, 0];

/// Why a frame or a screen was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DisplayError {
    /// A side is zero or above [`MAX_SIDE`].
    #[error("a {width}x{height} screen is outside 1x1..{MAX_SIDE}x{MAX_SIDE}")]
    BadSize { width: usize, height: usize },
    /// The pixel buffer is not width x height RGB triples.
    #[error("a {width}x{height} frame needs {needed} bytes, got {got}")]
    BadLength {
        width: usize,
        height: usize,
        needed: usize,
        got: usize,
    },
    /// The bar leaves no room for the profile's frame.
    #[error("a status bar of {bar_rows} rows leaves nothing of a {height}-row screen")]
    BarTooTall { bar_rows: usize, height: usize },
}

fn check_size(width: usize, height: usize) -> Result<(), DisplayError> {
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return Err(DisplayError::BadSize { width, height });
    }
    Ok(())
}

/// A frame: `width` x `height` RGB triples, row by row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

impl Frame {
    /// A frame from its pixels; refused if the size or the buffer's length is wrong.
    pub fn new(width: usize, height: usize, rgb: Vec<u8>) -> Result<Frame, DisplayError> {
        check_size(width, height)?;
        let needed = width * height * 3;
        if rgb.len() != needed {
            return Err(DisplayError::BadLength {
                width,
                height,
                needed,
                got: rgb.len(),
            });
        }
        Ok(Frame { width, height, rgb })
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// The pixels as RGB triples, row by row.
    pub fn rgb(&self) -> &[u8] {
        &self.rgb
    }

    /// The pixel at (`x`, `y`), or `None` outside the frame.
    pub fn pixel(&self, x: usize, y: usize) -> Option<[u8; 3]> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let at = (y * self.width + x) * 3;
        Some([self.rgb[at], self.rgb[at + 1], self.rgb[at + 2]])
    }
}

/// The profile in the foreground, as its bar shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Foreground {
    /// The profile's name, drawn in the bar.
    pub name: String,
    /// The profile's colour, the bar's background.
    pub colour: [u8; 3],
}

/// Builds the device screen from the foreground profile's frame and the host's status bar.
#[derive(Debug)]
pub struct Compositor {
    width: usize,
    height: usize,
    bar_rows: usize,
    foreground: Option<Foreground>,
    frame: Option<Frame>,
}

impl Compositor {
    /// A `width` x `height` device screen whose top `bar_rows` rows are the status bar.
    pub fn new(width: usize, height: usize, bar_rows: usize) -> Result<Compositor, DisplayError> {
        check_size(width, height)?;
        if bar_rows == 0 || bar_rows >= height {
            return Err(DisplayError::BarTooTall { bar_rows, height });
        }
        Ok(Compositor {
            width,
            height,
            bar_rows,
            foreground: None,
            frame: None,
        })
    }

    /// Rows the status bar takes at the top.
    pub fn bar_rows(&self) -> usize {
        self.bar_rows
    }

    /// The profile in the foreground, if any.
    pub fn foreground(&self) -> Option<&Foreground> {
        self.foreground.as_ref()
    }

    /// Brings `profile` to the foreground; the previous profile's frame is dropped.
    pub fn switch(&mut self, profile: Foreground) {
        if self.foreground.as_ref() != Some(&profile) {
            self.frame = None;
        }
        self.foreground = Some(profile);
    }

    /// The foreground profile's latest frame (ignored while no profile is in the foreground).
    pub fn set_frame(&mut self, frame: Frame) {
        if self.foreground.is_some() {
            self.frame = Some(frame);
        }
    }

    /// Drops the foreground profile's frame (a source that went bad, a locked profile): the
    /// area below the bar is [`EMPTY`] until the next [`Compositor::set_frame`]; whether there
    /// was one.
    pub fn clear_frame(&mut self) -> bool {
        self.frame.take().is_some()
    }

    /// Where a device-screen point is in the foreground profile's frame: `None` on the bar
    /// (the host's) or outside the frame, so a touch there reaches no guest.
    pub fn to_frame(&self, x: usize, y: usize) -> Option<(usize, usize)> {
        let frame = self.frame.as_ref()?;
        let fy = y.checked_sub(self.bar_rows)?;
        (x < self.width && y < self.height && x < frame.width && fy < frame.height)
            .then_some((x, fy))
    }

    /// The device screen as it is now.
    pub fn compose(&self) -> Frame {
        let (w, h) = (self.width, self.height);
        let mut rgb = EMPTY.repeat(w * h);
        if let Some(frame) = &self.frame {
            let cols = frame.width.min(w);
            let rows = frame.height.min(h - self.bar_rows);
            for row in 0..rows {
                let src = row * frame.width * 3;
                let dst = ((self.bar_rows + row) * w) * 3;
                rgb[dst..dst + cols * 3].copy_from_slice(&frame.rgb[src..src + cols * 3]);
            }
        }
        self.draw_bar(&mut rgb);
        Frame {
            width: w,
            height: h,
            rgb,
        }
    }

    /// The bar: the foreground's colour (black with none) and its name in black or white,
    /// whichever reads better on it.
    fn draw_bar(&self, rgb: &mut [u8]) {
        let colour = self.foreground.as_ref().map_or(EMPTY, |f| f.colour);
        rgb[..self.bar_rows * self.width * 3]
            .copy_from_slice(&colour.repeat(self.bar_rows * self.width));
        let Some(fg) = &self.foreground else {
            return;
        };
        let text = text_colour(colour);
        let scale = (self.bar_rows * 6 / 10 / 7).max(1);
        let (_, text_h) = rfb::notice::text_size(&fg.name, scale);
        let top = self.bar_rows.saturating_sub(text_h) / 2;
        // Only the bar's rows are drawn on: a name too tall for the bar is cut, never spills.
        let bar = &mut rgb[..self.bar_rows * self.width * 3];
        rfb::notice::draw_text(
            bar,
            self.width,
            self.bar_rows / 2,
            top,
            scale,
            &fg.name,
            text,
        );
    }
}

/// A profile's bar colour from its name, the browser phone's `colourOf` (`phone.js`): the
/// name's hash picks a hue, drawn at 65% saturation and 45% lightness, so the device screen and
/// the page show a profile in one colour.
pub fn profile_colour(name: &str) -> [u8; 3] {
    let hash = name
        .chars()
        .fold(0u32, |h, c| h.wrapping_mul(31).wrapping_add(u32::from(c)));
    let degrees = hash % 360;
    let hue = f64::from(degrees) / 60.0;
    let (s, l) = (0.65, 0.45);
    let chroma = (1.0 - (2.0 * l - 1.0f64).abs()) * s;
    let x = chroma * (1.0 - (hue % 2.0 - 1.0).abs());
    let (r, g, b) = match degrees / 60 {
        0 => (chroma, x, 0.0),
        1 => (x, chroma, 0.0),
        2 => (0.0, chroma, x),
        3 => (0.0, x, chroma),
        4 => (x, 0.0, chroma),
        _ => (chroma, 0.0, x),
    };
    let m = l - chroma / 2.0;
    [r, g, b].map(|v| {
        let v = ((v + m) * 255.0).round().clamp(0.0, 255.0);
        // Clamped to 0..=255 just above: the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation)]
        let byte = v as u8;
        byte
    })
}

/// Black on a light colour, white on a dark one.
pub fn text_colour(background: [u8; 3]) -> [u8; 3] {
    let [r, g, b] = background.map(u32::from);
    if r * 299 + g * 587 + b * 114 > 128_000 {
        [0, 0, 0]
    } else {
        [0xff, 0xff, 0xff]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORK: [u8; 3] = [0x1f, 0x6f, 0xd0];
    const PERSONAL: [u8; 3] = [0xe0, 0x90, 0x20];

    fn profile(name: &str, colour: [u8; 3]) -> Foreground {
        Foreground {
            name: name.into(),
            colour,
        }
    }

    fn solid(width: usize, height: usize, colour: [u8; 3]) -> Frame {
        Frame::new(width, height, colour.repeat(width * height)).unwrap()
    }

    fn bar_colours(screen: &Frame, bar_rows: usize) -> Vec<[u8; 3]> {
        let mut seen = Vec::new();
        for y in 0..bar_rows {
            for x in 0..screen.width() {
                let p = screen.pixel(x, y).unwrap();
                if !seen.contains(&p) {
                    seen.push(p);
                }
            }
        }
        seen
    }

    #[test]
    fn the_bar_is_the_foreground_colour_with_its_name_and_the_frame_is_below_it() {
        let mut c = Compositor::new(180, 344, 24).unwrap();
        c.switch(profile("work", WORK));
        let guest = [0x12, 0x34, 0x56];
        c.set_frame(solid(180, 320, guest));
        let screen = c.compose();
        assert_eq!((screen.width(), screen.height()), (180, 344));
        let colours = bar_colours(&screen, 24);
        assert!(colours.contains(&WORK), "bar is work's colour: {colours:?}");
        assert!(
            colours.contains(&text_colour(WORK)),
            "bar holds the name's pixels: {colours:?}"
        );
        assert_eq!(colours.len(), 2, "the bar is its colour and the name only");
        for y in 24..344 {
            for x in 0..180 {
                assert_eq!(screen.pixel(x, y), Some(guest), "({x}, {y})");
            }
        }
    }

    #[test]
    fn a_guest_frame_never_reaches_the_bar_whatever_its_size() {
        let mut c = Compositor::new(100, 100, 20).unwrap();
        c.switch(profile("work", WORK));
        // A frame as large as the whole screen, painted in personal's colour: it is cut at the
        // bottom, not drawn over the bar.
        c.set_frame(solid(300, 300, PERSONAL));
        let screen = c.compose();
        assert!(!bar_colours(&screen, 20).contains(&PERSONAL));
        assert_eq!(screen.pixel(99, 99), Some(PERSONAL));
        assert_eq!(screen.pixel(0, 20), Some(PERSONAL));
    }

    #[test]
    fn a_smaller_frame_leaves_the_rest_empty() {
        let mut c = Compositor::new(100, 100, 20).unwrap();
        c.switch(profile("work", WORK));
        c.set_frame(solid(50, 40, PERSONAL));
        let screen = c.compose();
        assert_eq!(screen.pixel(49, 59), Some(PERSONAL));
        assert_eq!(screen.pixel(50, 59), Some(EMPTY));
        assert_eq!(screen.pixel(49, 60), Some(EMPTY));
    }

    #[test]
    fn a_switch_shows_the_new_bar_and_none_of_the_old_profiles_pixels() {
        let mut c = Compositor::new(120, 200, 20).unwrap();
        let work_pixels = [0x01, 0x02, 0x03];
        c.switch(profile("work", WORK));
        c.set_frame(solid(120, 180, work_pixels));
        c.switch(profile("personal", PERSONAL));
        let screen = c.compose();
        assert!(bar_colours(&screen, 20).contains(&PERSONAL));
        assert!(!bar_colours(&screen, 20).contains(&WORK));
        assert!(
            !screen.rgb().chunks(3).any(|p| p == work_pixels),
            "work's frame is gone once personal is in front"
        );
        let personal_pixels = [0x04, 0x05, 0x06];
        c.set_frame(solid(120, 180, personal_pixels));
        assert_eq!(c.compose().pixel(60, 100), Some(personal_pixels));
        // Switching to the profile already in front keeps its frame.
        c.switch(profile("personal", PERSONAL));
        assert_eq!(c.compose().pixel(60, 100), Some(personal_pixels));
    }

    #[test]
    fn a_cleared_frame_leaves_the_bar_over_an_empty_screen_until_the_next_one() {
        let mut c = Compositor::new(120, 200, 20).unwrap();
        c.switch(profile("work", WORK));
        assert!(!c.clear_frame(), "no frame yet");
        c.set_frame(solid(120, 180, PERSONAL));
        assert!(c.clear_frame());
        let screen = c.compose();
        assert!(bar_colours(&screen, 20).contains(&WORK));
        assert!(screen.rgb()[120 * 20 * 3..].chunks(3).all(|p| p == EMPTY));
        c.set_frame(solid(120, 180, PERSONAL));
        assert_eq!(c.compose().pixel(60, 100), Some(PERSONAL));
    }

    #[test]
    fn the_name_differs_between_profiles_of_one_colour() {
        let mut c = Compositor::new(160, 60, 24).unwrap();
        c.switch(profile("work", WORK));
        let work = c.compose();
        c.switch(profile("bank", WORK));
        let bank = c.compose();
        assert_ne!(
            work.rgb(),
            bank.rgb(),
            "the name is drawn, not only the colour"
        );
    }

    #[test]
    fn touches_on_the_bar_reach_no_guest() {
        let mut c = Compositor::new(100, 100, 20).unwrap();
        assert_eq!(c.to_frame(5, 50), None, "no foreground, no frame");
        c.switch(profile("work", WORK));
        c.set_frame(solid(80, 60, WORK));
        assert_eq!(c.to_frame(5, 19), None);
        assert_eq!(c.to_frame(5, 20), Some((5, 0)));
        assert_eq!(c.to_frame(79, 79), Some((79, 59)));
        assert_eq!(c.to_frame(80, 50), None);
        assert_eq!(c.to_frame(5, 80), None);
    }

    #[test]
    fn bad_frames_and_screens_are_refused() {
        assert!(matches!(
            Frame::new(2, 2, vec![0; 11]),
            Err(DisplayError::BadLength { needed: 12, .. })
        ));
        assert!(Frame::new(0, 2, vec![]).is_err());
        assert!(Frame::new(MAX_SIDE + 1, 1, vec![0; (MAX_SIDE + 1) * 3]).is_err());
        assert!(Compositor::new(100, 20, 20).is_err());
        assert!(Compositor::new(100, 20, 0).is_err());
        assert!(Compositor::new(0, 20, 5).is_err());
    }

    #[test]
    fn profile_colours_are_the_browser_phones() {
        // Expected values from Python's colorsys.hls_to_rgb with phone.js's hash.
        assert_eq!(profile_colour("work"), [189, 43, 40]);
        assert_eq!(profile_colour("personal"), [100, 40, 189]);
    }

    #[test]
    fn a_frame_before_any_foreground_is_dropped() {
        let mut c = Compositor::new(10, 10, 2).unwrap();
        c.set_frame(solid(10, 8, PERSONAL));
        c.switch(profile("work", WORK));
        assert!(!c.compose().rgb().chunks(3).any(|p| p == PERSONAL));
    }
}
