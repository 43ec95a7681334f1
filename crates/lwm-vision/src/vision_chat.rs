//! Vision chat inputs: frames from an image, a directory of frames or a video file (through
//! ffmpeg), sampled as the original does, and LWM's vision chat prompt layout (Init
//! semantics, the layout the models were trained with):
//!
//! `[BOS] sp("You are a helpful assistant. USER: {question}\n") sp("<vision>")`
//! `frames (256 codes + 8192 each, the last ending in 8193) sp("</vision>") sp(" ASSISTANT:")`
//!
//! with the vision mask true exactly on the frame tokens.

use crate::vqgan::preprocess::{decode_image, load_image};
use anyhow::{bail, Context, Result};
use image::RgbImage;
use lwm_core::tokenizer::Tokenizer;
use lwm_core::vision_model::frame_tokens;
use std::path::{Path, PathBuf};

/// `np.linspace(0, n-1, k).astype(int)` when there are more than `k` frames, else all.
pub fn sample_indices(n: usize, k: usize) -> Vec<usize> {
    if n <= k || k == 0 {
        return (0..n).collect();
    }
    if k == 1 {
        return vec![0];
    }
    // numpy: step = (stop - start) / (num - 1); y = arange(num) * step; y[-1] = stop
    let step = (n - 1) as f64 / (k - 1) as f64;
    (0..k)
        .map(|i| {
            if i + 1 == k {
                n - 1
            } else {
                (i as f64 * step) as usize
            }
        })
        .collect()
}

fn is_frame_file(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

/// Frame files of a directory, sorted by name.
fn frame_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read frame directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_frame_file(p))
        .collect();
    files.sort();
    Ok(files)
}

/// Decode a video file to PNG frames in `out` with ffmpeg (at `fps` when given).
fn ffmpeg_extract(video: &Path, fps: Option<f64>, out: &Path) -> Result<()> {
    let ffmpeg = std::env::var("LWM_FFMPEG").unwrap_or_else(|_| "ffmpeg".into());
    let mut cmd = std::process::Command::new(&ffmpeg);
    cmd.args(["-v", "error", "-nostdin", "-i"]).arg(video);
    if let Some(f) = fps {
        cmd.args(["-vf", &format!("fps={f}")]);
    }
    cmd.arg(out.join("frame_%06d.png"));
    let output = match cmd.output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "decoding video files needs ffmpeg, which is not installed (not on PATH); install it (e.g. apt-get install ffmpeg) or pass a directory of PNG/JPEG frames"
        ),
        Err(e) => bail!("cannot run {ffmpeg}: {e}"),
    };
    if !output.status.success() {
        bail!(
            "ffmpeg cannot decode {}: {}",
            video.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Frames of a video (a directory of frames or a video file), at most `max_frames`, sampled
/// uniformly. `fps` resamples a video file's frame rate first (ffmpeg's fps filter).
pub fn video_frames(path: &Path, fps: Option<f64>, max_frames: usize) -> Result<Vec<RgbImage>> {
    if let Some(f) = fps {
        if !(f.is_finite() && f > 0.0) {
            bail!("--fps must be a positive number, got {f}");
        }
    }
    let tmp;
    let files = if path.is_dir() {
        frame_files(path)?
    } else if path.is_file() {
        tmp = std::env::temp_dir().join(format!(
            "lwm-frames-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&tmp)?;
        let r = ffmpeg_extract(path, fps, &tmp).and_then(|_| frame_files(&tmp));
        let files = match r {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        let picked = sample_indices(files.len(), max_frames);
        let frames: Result<Vec<RgbImage>> = picked.iter().map(|&i| load_image(&files[i])).collect();
        let _ = std::fs::remove_dir_all(&tmp);
        let frames = frames?;
        if frames.is_empty() {
            bail!("{}: the video has zero frames", path.display());
        }
        return Ok(frames);
    } else {
        bail!("video {} not found", path.display());
    };
    if files.is_empty() {
        bail!(
            "{}: the video has zero frames (no .png/.jpg files in the directory)",
            path.display()
        );
    }
    sample_indices(files.len(), max_frames)
        .iter()
        .map(|&i| load_image(&files[i]))
        .collect()
}

/// One image from PNG/JPEG bytes (for callers holding the data already).
pub fn image_from_bytes(bytes: &[u8]) -> Result<RgbImage> {
    decode_image(bytes)
}

/// The system/user preamble of LWM's vision chat.
pub fn question_text(question: &str) -> String {
    format!("You are a helpful assistant. USER: {question}\n")
}

/// The text around the frames of a vision chat prompt: `[BOS] question <vision>` before
/// them and `</vision> ASSISTANT:` after (all text ids).
pub fn chat_prompt_parts(tok: &Tokenizer, question: &str) -> Result<(Vec<u32>, Vec<u32>)> {
    let bos = tok.bos_id().context("the tokenizer has no BOS token")?;
    let sp = |s: &str| tok.encode(s, false, false);
    let mut head = vec![bos];
    head.extend(sp(&question_text(question))?);
    head.extend(sp("<vision>")?);
    let tail: Vec<u32> = sp("</vision>")?
        .into_iter()
        .chain(sp(" ASSISTANT:")?)
        .collect();
    Ok((head, tail))
}

/// Token ids and vision mask of a vision chat prompt over encoded frames (each a list of
/// codes).
pub fn chat_prompt(
    tok: &Tokenizer,
    question: &str,
    frames: &[Vec<u32>],
) -> Result<(Vec<u32>, Vec<bool>)> {
    let (mut ids, tail) = chat_prompt_parts(tok, question)?;
    let mut mask = vec![false; ids.len()];
    let vision = frame_tokens(frames);
    mask.resize(mask.len() + vision.len(), true);
    ids.extend(vision);
    mask.resize(mask.len() + tail.len(), false);
    ids.extend(tail);
    Ok((ids, mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_sampled_like_numpy_linspace() {
        // np.linspace(0, 99, 8).astype(int)
        assert_eq!(sample_indices(100, 8), [0, 14, 28, 42, 56, 70, 84, 99]);
        assert_eq!(sample_indices(5, 8), [0, 1, 2, 3, 4]);
        // np.linspace(0, 9, 4).astype(int) = [0, 3, 6, 9]
        assert_eq!(sample_indices(10, 4), [0, 3, 6, 9]);
    }
}
