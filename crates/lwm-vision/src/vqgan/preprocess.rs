//! The original's frame preprocessing (`vision_chat.Sampler._process_frame`): RGB, resize the
//! shorter side to `size` (the longer to `int(size·long/short)`) with a bicubic filter (PIL's
//! default for `Image.resize`), centre crop `size × size` (PIL rounds the box half-to-even),
//! then `value / 127.5 − 1`.

use anyhow::{bail, Context, Result};
use image::imageops::FilterType;
use image::RgbImage;
use std::path::Path;

/// Decode a PNG or JPEG file to RGB.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
    decode_image(&bytes).with_context(|| format!("{}", path.display()))
}

/// Decode PNG or JPEG bytes to RGB.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage> {
    decode_image_within(bytes, u32::MAX)
}

/// `decode_image`, refusing an image wider or taller than `max_side` from its header,
/// before decoding (a small PNG can inflate to gigabytes): for bytes from the network.
pub fn decode_image_within(bytes: &[u8], max_side: u32) -> Result<RgbImage> {
    let format = image::guess_format(bytes)
        .ok()
        .filter(|f| matches!(f, image::ImageFormat::Png | image::ImageFormat::Jpeg))
        .context("not a PNG or JPEG image")?;
    if max_side < u32::MAX {
        let (w, h) = image::ImageReader::with_format(std::io::Cursor::new(bytes), format)
            .into_dimensions()
            .context("the image cannot be decoded")?;
        if w > max_side || h > max_side {
            bail!("the image is {w}×{h} pixels; at most {max_side} a side is accepted");
        }
    }
    let img = image::load_from_memory_with_format(bytes, format)
        .context("the image cannot be decoded")?;
    if img.width() == 0 || img.height() == 0 {
        bail!("the image is empty");
    }
    Ok(img.to_rgb8())
}

/// Python's `round` (half to even) of `n / 2`.
fn half_round_even(n: usize) -> usize {
    let f = n / 2;
    if n.is_multiple_of(2) || f.is_multiple_of(2) {
        f
    } else {
        f + 1
    }
}

/// `_process_frame(img, size)`: (size, size, 3) row-major in [-1, 1].
pub fn process_frame(img: &RgbImage, size: usize) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (nw, nh) = if w < h {
        (size, size * h / w)
    } else {
        (size * w / h, size)
    };
    let resized = if (nw, nh) == (w, h) {
        img.clone()
    } else {
        image::imageops::resize(img, nw as u32, nh as u32, FilterType::CatmullRom)
    };
    let left = half_round_even(nw - size);
    let top = half_round_even(nh - size);
    let mut out = Vec::with_capacity(size * size * 3);
    for y in 0..size {
        for x in 0..size {
            let p = resized.get_pixel((left + x) as u32, (top + y) as u32);
            out.extend(p.0.iter().map(|&v| v as f32 / 127.5 - 1.0));
        }
    }
    out
}
