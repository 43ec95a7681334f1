//! What every chart of this crate shares: plotters draws into an RGB buffer with a
//! bundled font (no system fonts needed), `png` encodes it.

use anyhow::{anyhow, Context, Result};
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::Once;

const FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// Register the bundled font as "sans-serif" (once per process).
pub fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| anyhow!("the bundled chart font is not a valid TTF"));
    });
    result
}

/// Write `w x h` RGB8 pixels as a PNG file.
pub fn write_rgb_png(path: &Path, pixels: &[u8], w: u32, h: u32) -> Result<()> {
    let f =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(f), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc
        .write_header()
        .with_context(|| format!("cannot write {}", path.display()))?;
    writer
        .write_image_data(pixels)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writer.finish()?;
    Ok(())
}
