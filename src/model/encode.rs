//! Writing a job's outputs: PNG for images, animated GIF (which every browser plays) for
//! video. Encoding is deterministic, so the same pixels give the same bytes.

use std::fs::{self, File};
use std::io::BufWriter;
use std::path::Path;

use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, Frame, ImageError, RgbImage, RgbaImage};

/// Writes `image-0.png`, `image-1.png`, … into `folder`; answers the file names.
pub fn write_pngs(folder: &Path, images: &[RgbImage]) -> Result<Vec<String>, ImageError> {
    fs::create_dir_all(folder)?;
    images
        .iter()
        .enumerate()
        .map(|(i, image)| {
            let name = format!("image-{i}.png");
            image.save_with_format(folder.join(&name), image::ImageFormat::Png)?;
            Ok(name)
        })
        .collect()
}

/// Writes the frames as `video.gif` at `fps` frames per second, looping; answers its name.
pub fn write_gif(folder: &Path, frames: &[RgbImage], fps: u32) -> Result<Vec<String>, ImageError> {
    fs::create_dir_all(folder)?;
    let name = "video.gif".to_owned();
    let mut encoder =
        GifEncoder::new_with_speed(BufWriter::new(File::create(folder.join(&name))?), 10);
    encoder.set_repeat(Repeat::Infinite)?;
    let delay = Delay::from_numer_denom_ms(1000, fps.max(1));
    encoder.encode_frames(frames.iter().map(|frame| {
        let rgba = RgbaImage::from_fn(frame.width(), frame.height(), |x, y| {
            let [r, g, b] = frame.get_pixel(x, y).0;
            image::Rgba([r, g, b, 255])
        });
        Frame::from_parts(rgba, 0, 0, delay)
    }))?;
    Ok(vec![name])
}

/// The content type of an output file, from its name.
pub fn content_type(name: &str) -> &'static str {
    if name.ends_with(".png") {
        "image/png"
    } else if name.ends_with(".gif") {
        "image/gif"
    } else {
        "application/octet-stream"
    }
}
