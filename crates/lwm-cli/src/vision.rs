//! `lwm vision-chat`: ask about an image or a video with an LWM vision-language checkpoint.

use crate::ModelArgs;
use anyhow::{bail, Context, Result};
use clap::Args;
use lwm::generate::GenerateRequest;
use lwm::sampling::SamplingParams;
use lwm::vision_chat::{chat_prompt_parts, video_frames};
use lwm::vision_model::{frame_tokens, Heads, END_OF_FRAME};
use lwm::vqgan::preprocess::{load_image, process_frame};
use lwm::vqgan::Vqgan;
use std::path::PathBuf;
use std::sync::atomic::Ordering;

#[derive(Args)]
pub struct VisionChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A PNG or JPEG image.
    #[arg(long, conflicts_with = "video")]
    pub image: Option<PathBuf>,
    /// A video file (decoded with ffmpeg) or a directory of PNG/JPEG frames.
    #[arg(long)]
    pub video: Option<PathBuf>,
    /// The question about the image or video.
    #[arg(long)]
    pub question: String,
    /// Frames sampled uniformly from a video (the original's max_n_frames).
    #[arg(long, default_value_t = 8)]
    pub max_frames: usize,
    /// Resample a video file to this frame rate before sampling frames.
    #[arg(long)]
    pub fps: Option<f64>,
    /// VQGAN weights (the original's pickle); default: `vqgan` next to the params file.
    #[arg(long)]
    pub vqgan: Option<PathBuf>,
    /// Sampling temperature (the original's default 0.2; 0 = greedy).
    #[arg(long, default_value_t = 0.2)]
    pub temperature: f32,
    /// Top-k (HF generate's implicit 50).
    #[arg(long, default_value_t = 50)]
    pub top_k: usize,
    /// Tokens to generate at most (also --max-new-tokens, the original's name).
    #[arg(
        short = 'n',
        long = "max-tokens",
        visible_alias = "n-predict",
        alias = "max-new-tokens",
        default_value_t = 128
    )]
    pub max_new_tokens: usize,
    /// Random seed of the sampler.
    #[arg(short = 's', long, default_value_t = 0)]
    pub seed: u64,
    /// Frame size fed to the VQGAN (256 for LWM's).
    #[arg(long, default_value_t = 256)]
    pub frame_size: usize,
}

pub fn run(a: VisionChatArgs) -> Result<()> {
    if a.max_frames == 0 {
        bail!("--max-frames must be at least 1");
    }
    let frames = match (&a.image, &a.video) {
        (Some(img), None) => vec![load_image(img)?],
        (None, Some(v)) => video_frames(v, a.fps, a.max_frames)?,
        _ => bail!("give --image FILE or --video FILE|DIR"),
    };
    let engine = a.model.load()?;
    if !engine.model.has_vision() {
        bail!(
            "{}: not a vision-language checkpoint (no vte / vision_head)",
            a.model.model
        );
    }
    let vqgan_path = match &a.vqgan {
        Some(p) => p.clone(),
        None => lwm::vqgan::beside(engine.location.path()).context("give --vqgan FILE")?,
    };
    let vqgan = Vqgan::open(&vqgan_path)?;
    let s = a.frame_size;
    if s == 0 || !s.is_multiple_of(vqgan.factor) {
        bail!(
            "--frame-size {s} is not a multiple of the VQGAN's factor {}",
            vqgan.factor
        );
    }
    // The prompt is [text head] frames [text tail]; its length is known before any frame is
    // encoded, so the memory plan is checked (and the cache reserved) up front. Then each
    // frame's tokens go into the cache as soon as it is encoded: the prompt streams in
    // frame by frame, and what was prefilled stays when a later frame fails or Ctrl-C stops.
    let (head, tail) = chat_prompt_parts(&engine.tokenizer, &a.question)?;
    let frame_len = (s / vqgan.factor).pow(2) + 1;
    let n_vision = frames.len() * frame_len;
    let mut ids = head.clone();
    ids.resize(head.len() + n_vision, 0);
    ids.extend(&tail);
    let mut mask = vec![false; head.len()];
    mask.resize(head.len() + n_vision, true);
    mask.resize(ids.len(), false);
    let mut req = GenerateRequest::new(
        ids,
        a.max_new_tokens,
        SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            seed: a.seed,
            ..SamplingParams::default()
        },
    );
    req.prefill_chunk = a.model.prefill_chunk;
    let model = &engine.model;
    let mut cache = model.new_cache();
    engine.prepare_cache(&req, &mut cache, 0)?;
    let stop = crate::interrupt_flag();
    let bar = indicatif::ProgressBar::new(frames.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "frames {bar:30} {pos}/{len} encoded and prefilled, {msg} [{elapsed}<{eta}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let chunk = a.model.prefill_chunk.max(1);
    let prefill = |ids: &[u32], vision: bool, cache: &mut lwm::kv::KvCache| -> Result<()> {
        for piece in ids.chunks(chunk) {
            if stop.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            model.forward_mixed(piece, &vec![vision; piece.len()], cache, Heads::Text, false)?;
        }
        Ok(())
    };
    bar.set_message(format!("{} tokens", cache.len()));
    // Frames go through the VQGAN and then the model one after the other, each phase on every
    // core. Encoding frame k+1 on a thread of its own while frame k is prefilled was measured
    // 4 % slower on 2 cores (docs/bench/vqgan-2026-12-07.md): both phases already keep the
    // cores busy, and with one thread pool the second caller runs on one thread, which on
    // more cores would make the VQGAN the bottleneck.
    let (mut encode_s, mut prefill_s) = (0f64, 0f64);
    let t = std::time::Instant::now();
    prefill(&head, false, &mut cache)?;
    prefill_s += t.elapsed().as_secs_f64();
    for (k, f) in frames.iter().enumerate() {
        if stop.load(Ordering::SeqCst) {
            bar.abandon();
            bail!("interrupted");
        }
        let t = std::time::Instant::now();
        let codes = vqgan.encode(&process_frame(f, s), 1, s, s)?;
        encode_s += t.elapsed().as_secs_f64();
        let mut toks = frame_tokens(std::slice::from_ref(&codes));
        if k + 1 < frames.len() {
            // frame_tokens ends a lone frame with end-of-vision; inner frames end with
            // end-of-frame.
            *toks.last_mut().expect("a frame has tokens") = END_OF_FRAME;
        }
        let at = head.len() + k * frame_len;
        req.prompt_ids[at..at + frame_len].copy_from_slice(&toks);
        let t = std::time::Instant::now();
        if let Err(e) = prefill(&toks, true, &mut cache) {
            bar.abandon();
            return Err(e);
        }
        prefill_s += t.elapsed().as_secs_f64();
        bar.set_message(format!("{} tokens", cache.len()));
        bar.inc(1);
    }
    bar.finish_and_clear();
    tracing::info!(
        "{} frames: VQGAN encode {encode_s:.1} s ({:.2} s/frame), prefill of {} tokens {prefill_s:.1} s ({:.1} tok/s)",
        frames.len(),
        encode_s / frames.len() as f64,
        cache.len(),
        cache.len() as f64 / prefill_s.max(1e-9)
    );
    // The one generation loop over the rest (the text tail, then the answer, all text).
    let reused = cache.len();
    let mut forward = |step_ids: &[u32]| model.forward(step_ids, &mut cache, false);
    req.vision_mask = Some(mask);
    engine.generate_on(
        &req,
        reused,
        &mut forward,
        &mut crate::stream_to_stdout(stop, false),
    )?;
    println!();
    Ok(())
}

#[derive(Args)]
pub struct VisionGenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// What to draw: "Generate an image of {prompt}" (or "a video of").
    #[arg(long)]
    pub prompt: String,
    /// Output file: .png (one frame), .gif, or .mp4 (feature `mp4`).
    #[arg(long)]
    pub output: PathBuf,
    /// Frames to generate (1 = an image).
    #[arg(long, default_value_t = 1)]
    pub n_frames: usize,
    /// VQGAN weights; default: `vqgan` next to the params file.
    #[arg(long)]
    pub vqgan: Option<PathBuf>,
    /// First frame (image): temperature, top-k, guidance scale (defaults: the original's scripts).
    #[arg(long, default_value_t = 1.0)]
    pub temperature_image: f32,
    /// Top-k of the first frame.
    #[arg(long, default_value_t = 8192)]
    pub top_k_image: usize,
    /// Guidance scale of the first frame.
    #[arg(long, default_value_t = 5.0)]
    pub cfg_scale_image: f32,
    /// Later frames (video).
    #[arg(long, default_value_t = 1.0)]
    pub temperature_video: f32,
    /// Top-k of later frames.
    #[arg(long, default_value_t = 1000)]
    pub top_k_video: usize,
    /// Guidance scale of later frames.
    #[arg(long, default_value_t = 1.0)]
    pub cfg_scale_video: f32,
    /// The original's default seed.
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
}

pub fn run_generate(a: VisionGenerateArgs) -> Result<()> {
    use lwm::vision_generate::{
        conditional_prompt, decode_frames, generate_codes, unconditional_prompt, write_frames,
        PhaseParams, VisionGenRequest,
    };
    use lwm::vision_model::FRAME_TOKENS;
    let ext = a
        .output
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if !matches!(ext.as_str(), "png" | "gif" | "mp4") {
        bail!("--output must end in .png, .gif or .mp4");
    }
    if ext == "png" && a.n_frames != 1 {
        bail!(
            "a .png holds one frame; use .gif for --n-frames {}",
            a.n_frames
        );
    }
    let engine = a.model.load()?;
    let vqgan_path = match &a.vqgan {
        Some(p) => p.clone(),
        None => lwm::vqgan::beside(engine.location.path()).context("give --vqgan FILE")?,
    };
    let vqgan = Vqgan::open(&vqgan_path)?;
    let req = VisionGenRequest {
        cond_ids: conditional_prompt(&engine.tokenizer, &a.prompt, a.n_frames > 1)?,
        uncond_ids: unconditional_prompt(&engine.tokenizer)?,
        n_frames: a.n_frames,
        codebook: vqgan.num_codes(),
        image: PhaseParams {
            temperature: a.temperature_image,
            top_k: a.top_k_image,
            guidance: a.cfg_scale_image,
        },
        video: PhaseParams {
            temperature: a.temperature_video,
            top_k: a.top_k_video,
            guidance: a.cfg_scale_video,
        },
        seed: a.seed,
    };
    let stop = crate::interrupt_flag();
    let bar = indicatif::ProgressBar::new((a.n_frames * FRAME_TOKENS) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "generating {bar:30} frame {msg}, {pos}/{len} tokens [{elapsed}<{eta}]",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let frames = generate_codes(&engine.model, &req, &mut |done| {
        bar.set_position(done as u64);
        bar.set_message(format!(
            "{}/{}",
            (done / FRAME_TOKENS + 1).min(a.n_frames),
            a.n_frames
        ));
        !stop.load(Ordering::SeqCst)
    })?;
    bar.finish_and_clear();
    if frames.is_empty() {
        bail!("interrupted before the first frame");
    }
    if frames.len() < a.n_frames {
        eprintln!(
            "interrupted: writing the {} whole frames generated",
            frames.len()
        );
    }
    let (rgb, size) = decode_frames(&vqgan, &frames)?;
    write_frames(&a.output, &rgb, size)?;
    println!("{}", a.output.display());
    Ok(())
}
