//! Image and video generation with an LWM vision-language model (the original's
//! `generate_vision` / `_sample_vision`), decoded with the VQGAN.
//!
//! Classifier-free guidance runs the conditional prompt and the unconditional one (`<s><vision>`)
//! side by side (the original's doubled batch: here two KV caches in one batched forward) and
//! samples from `uncond + scale · (cond − uncond)` of the vision head, restricted to the
//! VQGAN's codebook ids (0..8191 for LWM's). Every 257th token is forced to end-of-frame (8192), and the sampled
//! token is fed to both rows. The first frame (the image) and later frames (video) have their
//! own temperature, top-k and guidance scale. Unlike the original, sampling code 2 does not
//! stop generation (its text-eos check was applied to vision ids).

use anyhow::{bail, Context, Result};
use lwm_core::model::{Model, SeqInput};
use lwm_core::tokenizer::Tokenizer;
use lwm_core::vision_model::{Heads, END_OF_FRAME, FRAME_CODES, FRAME_TOKENS};
use lwm_engine::sampling::{Sampler, SamplingParams};

/// Sampling of one phase (first frame or later frames).
#[derive(Debug, Clone, Copy)]
pub struct PhaseParams {
    pub temperature: f32,
    pub top_k: usize,
    pub guidance: f32,
}

#[derive(Debug, Clone)]
pub struct VisionGenRequest {
    /// Conditional and unconditional prompt ids (`conditional_prompt`, `unconditional_prompt`).
    pub cond_ids: Vec<u32>,
    pub uncond_ids: Vec<u32>,
    pub n_frames: usize,
    /// Codes sampled: 0..codebook, the VQGAN's codebook size (`Vqgan::num_codes`; LWM's is
    /// `CODEBOOK_IDS`), so every sampled code decodes.
    pub codebook: usize,
    pub image: PhaseParams,
    pub video: PhaseParams,
    pub seed: u64,
}

/// Conditional prompt ids (Init tokenizer semantics: one BOS from the template's `<s>`).
pub fn conditional_prompt(tok: &Tokenizer, prompt: &str, video: bool) -> Result<Vec<u32>> {
    let bos = tok.bos_id().context("the tokenizer has no BOS token")?;
    let what = if video { "a video" } else { "an image" };
    let text = format!(
        "You are a helpful assistant. USER: Generate {what} of {prompt} ASSISTANT: <vision>"
    );
    let mut ids = vec![bos];
    ids.extend(tok.encode(&text, false, false)?);
    Ok(ids)
}

/// Unconditional prompt `<s><vision>`.
pub fn unconditional_prompt(tok: &Tokenizer) -> Result<Vec<u32>> {
    let bos = tok.bos_id().context("the tokenizer has no BOS token")?;
    let mut ids = vec![bos];
    ids.extend(tok.encode("<vision>", false, false)?);
    Ok(ids)
}

/// Vision ids that are codebook entries in LWM's vision vocabulary (8192 codes, then the
/// frame markers); sampling never leaves the VQGAN's codebook (`VisionGenRequest::codebook`).
pub const CODEBOOK_IDS: usize = 8192;

/// `uncond + scale · (cond − uncond)` over the first `codebook` ids only.
pub fn guide(cond: &[f32], uncond: &[f32], scale: f32, codebook: usize) -> Vec<f32> {
    cond[..codebook]
        .iter()
        .zip(&uncond[..codebook])
        .map(|(c, u)| u + scale * (c - u))
        .collect()
}

/// Generate `n_frames` frames of 256 codes each. `on_token(done)` after each token (257 a
/// frame, end-of-frame included), so a caller can show progress and stop within a token;
/// return false from it to stop early (the whole frames so far are returned).
pub fn generate_codes(
    model: &Model,
    req: &VisionGenRequest,
    on_token: &mut dyn FnMut(usize) -> bool,
) -> Result<Vec<Vec<u32>>> {
    if req.n_frames == 0 {
        bail!("--n-frames must be at least 1");
    }
    if model.config.vision_vocab_size < 8194 {
        bail!("the model has no vision vocabulary (not an LWM vision-language checkpoint)");
    }
    if req.codebook == 0 || req.codebook > CODEBOOK_IDS {
        bail!(
            "a VQGAN codebook of {} codes does not fit LWM's vision vocabulary (1..={CODEBOOK_IDS})",
            req.codebook
        );
    }
    let (cond_ids, uncond_ids) = (&req.cond_ids, &req.uncond_ids);
    let total = cond_ids.len() + req.n_frames * FRAME_TOKENS;
    if total > model.config.max_sequence_length {
        bail!(
            "{} frames need {total} positions, beyond the model's max sequence length {}",
            req.n_frames,
            model.config.max_sequence_length
        );
    }
    let mut cond_cache = model.new_cache();
    let mut uncond_cache = model.new_cache();
    // Both rows of the guidance in one forward per step (the original's doubled batch): the
    // weights are read once for the two, and each row's logits are what it gives alone.
    let mut step_both = |cond_in: (&[u32], &[bool]), uncond_in: (&[u32], &[bool])| {
        let mut out = model.forward_mixed_batch(
            &mut [
                SeqInput {
                    ids: cond_in.0,
                    cache: &mut cond_cache,
                    all_logits: false,
                    vision: Some(cond_in.1),
                },
                SeqInput {
                    ids: uncond_in.0,
                    cache: &mut uncond_cache,
                    all_logits: false,
                    vision: Some(uncond_in.1),
                },
            ],
            Heads::Vision,
        )?;
        let uncond = out.pop().context("no unconditional logits")?.vision;
        let cond = out.pop().context("no conditional logits")?.vision;
        anyhow::Ok((cond, uncond))
    };
    let (mut cond, mut uncond) = step_both(
        (cond_ids, &vec![false; cond_ids.len()]),
        (uncond_ids, &vec![false; uncond_ids.len()]),
    )?;
    let sampler_for = |p: &PhaseParams, seed: u64| {
        Sampler::new(SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            seed,
            ..SamplingParams::default()
        })
    };
    let mut image_sampler = sampler_for(&req.image, req.seed)?;
    let mut video_sampler = sampler_for(&req.video, req.seed.wrapping_add(1))?;
    let mut frames = Vec::new();
    let mut current = Vec::with_capacity(FRAME_CODES);
    for step in 0..req.n_frames * FRAME_TOKENS {
        let first = frames.is_empty();
        let token = if (step + 1) % FRAME_TOKENS == 0 {
            END_OF_FRAME
        } else {
            let phase = if first { &req.image } else { &req.video };
            let guided = guide(&cond, &uncond, phase.guidance, req.codebook);
            let sampler = if first {
                &mut image_sampler
            } else {
                &mut video_sampler
            };
            sampler.sample(&guided, &[])
        };
        if token == END_OF_FRAME {
            frames.push(std::mem::take(&mut current));
        } else {
            current.push(token);
        }
        if !on_token(step + 1) || frames.len() == req.n_frames {
            break;
        }
        (cond, uncond) = step_both((&[token], &[true]), (&[token], &[true]))?;
    }
    Ok(frames)
}

/// Decode generated frames with the VQGAN: 8-bit RGB frames and their side in pixels.
pub fn decode_frames(
    vqgan: &crate::vqgan::Vqgan,
    frames: &[Vec<u32>],
) -> Result<(Vec<Vec<u8>>, usize)> {
    let grid = (FRAME_CODES as f64).sqrt() as usize;
    let codes: Vec<u32> = frames.iter().flatten().copied().collect();
    let decoded = vqgan.decode(&codes, frames.len(), grid, grid)?;
    let size = grid * vqgan.factor;
    Ok((frames_to_rgb(&decoded, frames.len(), size), size))
}

/// One RGB frame as PNG bytes (what `--output x.png` writes and the images API returns).
pub fn png_bytes(frame: &[u8], size: usize) -> Result<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::write_buffer_with_format(
        &mut out,
        frame,
        size as u32,
        size as u32,
        image::ExtendedColorType::Rgb8,
        image::ImageFormat::Png,
    )?;
    Ok(out.into_inner())
}

/// Frames (NHWC in [-1, 1], `size × size`) as 8-bit RGB, `uint8((x + 1)·127.5)` truncated.
pub fn frames_to_rgb(decoded: &[f32], n: usize, size: usize) -> Vec<Vec<u8>> {
    decoded
        .chunks_exact(size * size * 3)
        .take(n)
        .map(|f| f.iter().map(|&x| crate::vqgan::to_u8(x)).collect())
        .collect()
}

/// Write frames to `path`: `.png` (one frame), `.gif` (4 fps, looping, as the original's
/// videos), or `.mp4` (feature `mp4`, through ffmpeg). Written to a temporary name first, so a
/// failure leaves nothing behind.
pub fn write_frames(path: &std::path::Path, frames: &[Vec<u8>], size: usize) -> Result<()> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    let tmp = path.with_extension(format!("partial.{ext}"));
    let result = match ext.as_str() {
        "png" => {
            if frames.len() != 1 {
                bail!(
                    "a .png holds one frame; use .gif (or .mp4) for {} frames",
                    frames.len()
                );
            }
            png_bytes(&frames[0], size).and_then(|b| Ok(std::fs::write(&tmp, b)?))
        }
        "gif" => write_gif(&tmp, frames, size),
        "mp4" => write_mp4(&tmp, frames, size),
        _ => bail!("output {} must end in .png, .gif or .mp4", path.display()),
    };
    match result {
        Ok(()) => Ok(std::fs::rename(&tmp, path)?),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e.context(format!("writing {}", path.display())))
        }
    }
}

fn write_gif(path: &std::path::Path, frames: &[Vec<u8>], size: usize) -> Result<()> {
    let file = std::fs::File::create(path)?;
    let mut enc = gif::Encoder::new(std::io::BufWriter::new(file), size as u16, size as u16, &[])?;
    enc.set_repeat(gif::Repeat::Infinite)?;
    for f in frames {
        let mut frame = gif::Frame::from_rgb_speed(size as u16, size as u16, f, 10);
        frame.delay = 25; // 1/100 s units: 4 fps
        enc.write_frame(&frame)?;
    }
    Ok(())
}

#[cfg(feature = "mp4")]
fn write_mp4(path: &std::path::Path, frames: &[Vec<u8>], size: usize) -> Result<()> {
    use std::io::Write;
    let ffmpeg = std::env::var("LWM_FFMPEG").unwrap_or_else(|_| "ffmpeg".into());
    let mut child = std::process::Command::new(&ffmpeg)
        .args([
            "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s",
        ])
        .arg(format!("{size}x{size}"))
        .args(["-r", "4", "-i", "-", "-pix_fmt", "yuv420p", "-f", "mp4"])
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("MP4 output needs ffmpeg on PATH ({ffmpeg}: {e})"))?;
    {
        let stdin = child.stdin.as_mut().context("ffmpeg stdin")?;
        for f in frames {
            stdin.write_all(f)?;
        }
    }
    drop(child.stdin.take());
    let status = child.wait()?;
    if !status.success() {
        bail!("ffmpeg failed to write the MP4 ({status})");
    }
    Ok(())
}

#[cfg(not(feature = "mp4"))]
fn write_mp4(_: &std::path::Path, _: &[Vec<u8>], _: usize) -> Result<()> {
    bail!("MP4 output is behind the `mp4` cargo feature (build with --features mp4; it uses ffmpeg); use .gif")
}
