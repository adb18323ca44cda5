//! `pocketvisor screenshot`: the frame a VM's virtio-gpu display shows, written as PNG or PPM.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use clap::Args;
use vmm::Request;

use crate::api;

/// Capture the display of a running VM through its API socket.
#[derive(Args, Debug)]
#[command(after_help = "\
The VM must have been started with --gpu and --api-socket. The image holds what the guest
last transferred to the resource on its scanout. The format follows the file name: .png
(8-bit RGB) or .ppm (binary P6).

EXAMPLE:
  pocketvisor run --kernel guest/out/probe.elf --cmdline pv.mode=screen --gpu --input \\
      --api-socket /tmp/pv.sock &
  pocketvisor screenshot --api-socket /tmp/pv.sock -o /tmp/shot.png")]
pub struct ScreenshotArgs {
    /// The VMM's control socket.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// Where the image goes (.png or .ppm); an existing file is replaced.
    #[arg(short, long, value_name = "FILE")]
    output: PathBuf,
}

/// One captured frame.
pub struct Shot {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Red, green, blue bytes row by row.
    pub rgb: Vec<u8>,
}

/// The image formats a screenshot can be written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// PNG, 8-bit RGB.
    Png,
    /// Binary PPM (P6).
    Ppm,
}

impl ImageFormat {
    /// The format a file name asks for.
    pub fn for_path(path: &Path) -> Result<ImageFormat> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("png") => Ok(ImageFormat::Png),
            Some("ppm") => Ok(ImageFormat::Ppm),
            _ => bail!(
                "cannot tell the image format of {}: name it .png or .ppm",
                path.display()
            ),
        }
    }
}

impl Shot {
    /// Decodes the gpu's answer to `{"op":"screenshot"}`.
    pub fn from_answer(answer: &str) -> Result<Shot> {
        let v: serde_json::Value =
            serde_json::from_str(answer).context("the screenshot answer is not JSON")?;
        Shot::from_value(&v)
    }

    /// Decodes the gpu's answer (or the handset's, which is the same) as JSON.
    pub fn from_value(v: &serde_json::Value) -> Result<Shot> {
        let dim = |k: &str| {
            v[k].as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .with_context(|| format!("the screenshot answer has no {k}"))
        };
        let (width, height) = (dim("width")?, dim("height")?);
        let rgb = base64::engine::general_purpose::STANDARD
            .decode(
                v["rgb"]
                    .as_str()
                    .context("the screenshot answer has no rgb")?,
            )
            .context("the screenshot's pixels are not base64")?;
        let want = u64::from(width) * u64::from(height) * 3;
        if u64::try_from(rgb.len()).ok() != Some(want) {
            bail!(
                "the screenshot holds {} bytes, not {want} for {width}x{height}",
                rgb.len()
            );
        }
        Ok(Shot { width, height, rgb })
    }

    /// The image encoded as `format`.
    pub fn encode(&self, format: ImageFormat) -> Result<Vec<u8>> {
        match format {
            ImageFormat::Ppm => {
                let mut out = format!("P6\n{} {}\n255\n", self.width, self.height).into_bytes();
                out.extend_from_slice(&self.rgb);
                Ok(out)
            }
            ImageFormat::Png => {
                let mut out = Vec::new();
                let mut enc = png::Encoder::new(&mut out, self.width, self.height);
                enc.set_color(png::ColorType::Rgb);
                enc.set_depth(png::BitDepth::Eight);
                let mut w = enc.write_header().context("cannot encode the PNG")?;
                w.write_image_data(&self.rgb)
                    .context("cannot encode the PNG")?;
                w.finish().context("cannot encode the PNG")?;
                Ok(out)
            }
        }
    }

    /// Writes the image to `path` (format from its name): temp file, fsync, rename.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.encode(ImageFormat::for_path(path)?)?;
        write_replacing(path, &bytes)
    }
}

/// Replaces `path` with `bytes` through a temporary file beside it, fsynced, then renamed.
fn write_replacing(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The gpu's screenshot request.
pub fn request() -> Request {
    Request::Device {
        id: "gpu".into(),
        request: serde_json::json!({"op": "screenshot"}),
    }
}

/// `pocketvisor screenshot`.
pub fn main(a: ScreenshotArgs) -> Result<i32> {
    // Refuse a bad file name before asking the VMM for megabytes.
    ImageFormat::for_path(&a.output)?;
    let answer = api::call(&a.api_socket, &request())?;
    let shot = Shot::from_answer(&answer)?;
    shot.save(&a.output)?;
    outln!(
        "screenshot {}x{} written to {}",
        shot.width,
        shot.height,
        a.output.display()
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shot() -> Shot {
        Shot {
            width: 2,
            height: 1,
            rgb: vec![255, 0, 0, 0, 0, 255],
        }
    }

    #[test]
    fn formats_follow_the_file_name() {
        assert_eq!(
            ImageFormat::for_path(Path::new("a/shot.PNG")).unwrap(),
            ImageFormat::Png
        );
        assert_eq!(
            ImageFormat::for_path(Path::new("shot.ppm")).unwrap(),
            ImageFormat::Ppm
        );
        assert!(ImageFormat::for_path(Path::new("shot.jpg")).is_err());
        assert!(ImageFormat::for_path(Path::new("shot")).is_err());
    }

    #[test]
    fn png_round_trips_the_pixels() {
        let bytes = shot().encode(ImageFormat::Png).unwrap();
        let mut reader = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (2, 1));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(&buf[..info.buffer_size()], &shot().rgb[..]);
    }

    #[test]
    fn answers_with_the_wrong_size_are_refused() {
        let good = r#"{"width":2,"height":1,"rgb":"/wAAAAD/"}"#;
        assert_eq!(Shot::from_answer(good).unwrap().rgb, shot().rgb);
        for bad in [
            r#"{"width":3,"height":1,"rgb":"/wAAAAD/"}"#,
            r#"{"width":2,"rgb":"/wAAAAD/"}"#,
            r#"{"width":2,"height":1,"rgb":"!!"}"#,
            "not json",
        ] {
            assert!(Shot::from_answer(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn save_replaces_the_file_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("pv-shot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.ppm");
        std::fs::write(&path, b"old").unwrap();
        shot().save(&path).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            shot().encode(ImageFormat::Ppm).unwrap()
        );
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
