//! `POST /v1/images/generations` (OpenAI's images API) for LWM vision-language models: the
//! prompt becomes LWM's "Generate an image of ..." conversation, 256 VQGAN codes are sampled
//! with classifier-free guidance (`lwm_vision::vision_generate`, the path of `lwm
//! vision-generate`) and decoded to a PNG, returned inline as `b64_json`. The same prompt and
//! seed give the bytes `lwm vision-generate --output x.png` writes.
//!
//! One image is generated at a time (each code a two-row forward, off the batched chat
//! scheduler); up to `--max-queue` further requests wait their turn (more are 429s), and a
//! client that goes away stops its generation within one token.

use crate::openai::{integer, number, opt, seed, string, ApiError};
use crate::{read_json, unix_now, Shared};
use axum::body::Body;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use lwm_core::vision_model::{FRAME_CODES, FRAME_TOKENS};
use lwm_vision::vision_generate::{
    conditional_prompt, decode_frames, generate_codes, png_bytes, unconditional_prompt,
    PhaseParams, VisionGenRequest,
};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// The fields this endpoint takes. `user` is accepted and has no effect; `seed`,
/// `temperature`, `top_k` and `cfg_scale` are lwm's extras (the first frame's sampling of
/// `lwm vision-generate`). Anything else (`quality`, `style`, `background`, ...) is a 400
/// naming it.
const FIELDS: &[&str] = &[
    "prompt",
    "model",
    "n",
    "size",
    "response_format",
    "output_format",
    "user",
    "seed",
    "temperature",
    "top_k",
    "cfg_scale",
];

/// The original's sampling of a first frame (its `--temperature_image`, `--top_k_image`,
/// `--cfg_scale_image` defaults, also `lwm vision-generate`'s).
const DEFAULT_IMAGE: PhaseParams = PhaseParams {
    temperature: 1.0,
    top_k: 8192,
    guidance: 5.0,
};
const DEFAULT_SEED: u64 = 1234;

/// Sets the flag when the request's future is dropped (the client went away).
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Counts a request among those waiting for their turn until dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

pub async fn generations(st: Shared, body: Body) -> Response {
    match generate(&st, body).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn generate(st: &Shared, body: Body) -> Result<Value, ApiError> {
    let obj = read_json(st, body).await?;
    if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::bad(
            k,
            format!("'{k}' is not supported by lwm's image generation"),
        ));
    }
    if let Some(m) = string(&obj, "model")? {
        if m != st.model_id {
            return Err(ApiError::model_not_found(m, &st.model_id));
        }
    }
    let Some(vision) = st.vision.clone() else {
        let why = if st.engine.model.has_vision() {
            "this server has no VQGAN to draw images: start lwm serve with --vqgan FILE"
        } else {
            "the model does not generate images (not an LWM vision-language checkpoint)"
        };
        return Err(ApiError::bad("model", why));
    };
    let prompt = match string(&obj, "prompt")? {
        None => return Err(ApiError::bad("prompt", "'prompt' is required")),
        Some(p) if p.trim().is_empty() => return Err(ApiError::bad("prompt", "'prompt' is empty")),
        Some(p) => p.to_string(),
    };
    let n = integer(&obj, "n")?.unwrap_or(1) as usize;
    if n == 0 || n > st.max_n {
        return Err(ApiError::bad(
            "n",
            format!(
                "'n' is {n} but must be between 1 and {} (--max-n)",
                st.max_n
            ),
        ));
    }
    // A generated frame is the VQGAN's grid of codes times its downsampling factor.
    let side = (FRAME_CODES as f64).sqrt() as usize * vision.vqgan().factor;
    let size = format!("{side}x{side}");
    match opt(&obj, "size") {
        None => {}
        Some(Value::String(s)) if *s == size || s == "auto" => {}
        Some(v) => {
            return Err(ApiError::bad(
                "size",
                format!("this model draws {size} images; 'size' {v} is not available"),
            ))
        }
    }
    match opt(&obj, "response_format").map(|v| v.as_str()) {
        None | Some(Some("b64_json")) => {}
        Some(Some("url")) => {
            return Err(ApiError::bad(
                "response_format",
                "lwm serve keeps no image files to link to: use response_format \"b64_json\"",
            ))
        }
        Some(_) => {
            return Err(ApiError::bad(
                "response_format",
                "'response_format' must be \"b64_json\"",
            ))
        }
    }
    match opt(&obj, "output_format").map(|v| v.as_str()) {
        None | Some(Some("png")) => {}
        Some(_) => {
            return Err(ApiError::bad(
                "output_format",
                "'output_format' must be \"png\"",
            ))
        }
    }
    string(&obj, "user")?;
    let seed = seed(&obj)?.unwrap_or(DEFAULT_SEED);
    let phase = PhaseParams {
        temperature: number(&obj, "temperature", 0.0, 100.0)?
            .map_or(DEFAULT_IMAGE.temperature, |t| t as f32),
        top_k: integer(&obj, "top_k")?.map_or(DEFAULT_IMAGE.top_k, |k| k as usize),
        guidance: number(&obj, "cfg_scale", 0.0, 100.0)?
            .map_or(DEFAULT_IMAGE.guidance, |g| g as f32),
    };
    let tok = &st.engine.tokenizer;
    let bad_prompt = |e: anyhow::Error| ApiError::bad("prompt", format!("{e:#}"));
    let cond_ids = conditional_prompt(tok, &prompt, false).map_err(bad_prompt)?;
    let uncond_ids = unconditional_prompt(tok).map_err(bad_prompt)?;
    let ctx = st.engine.model.config.max_sequence_length;
    if cond_ids.len() + FRAME_TOKENS > ctx {
        return Err(ApiError::bad(
            "prompt",
            format!(
                "the prompt is {} tokens; with an image's {FRAME_TOKENS} it is over the model's context of {ctx}",
                cond_ids.len()
            ),
        )
        .code("context_length_exceeded"));
    }
    // One generation at a time; at most --max-queue requests wait for their turn (as chat
    // requests do), and one that is dropped while waiting just leaves the queue.
    let ahead = st.image_waiting.fetch_add(1, Ordering::SeqCst);
    let waiting = Waiting(&st.image_waiting);
    if ahead >= st.max_queue && st.image_jobs.available_permits() == 0 {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "an image is being generated and {ahead} more requests wait (--max-queue {}); try again later",
                st.max_queue
            ),
        ));
    }
    let _turn = st.image_jobs.acquire().await.map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "shutting down",
        )
    })?;
    drop(waiting);
    let cancel = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(cancel.clone());
    let engine = st.engine.clone();
    let input_tokens = cond_ids.len() + uncond_ids.len();
    let started = std::time::Instant::now();
    let images = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<String>> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let req = VisionGenRequest {
                cond_ids: cond_ids.clone(),
                uncond_ids: uncond_ids.clone(),
                n_frames: 1,
                codebook: vision.vqgan().num_codes(),
                image: phase,
                video: phase,
                // Image i draws with seed + i, as a chat request's choices do.
                seed: seed.wrapping_add(i as u64),
            };
            let frames =
                generate_codes(&engine.model, &req, &mut |_| !cancel.load(Ordering::SeqCst))?;
            if frames.is_empty() {
                anyhow::bail!("cancelled");
            }
            let (rgb, size) = decode_frames(vision.vqgan(), &frames)?;
            let png = png_bytes(&rgb[0], size)?;
            out.push(base64::engine::general_purpose::STANDARD.encode(png));
        }
        Ok(out)
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("{e}"),
        )
    })?
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("image generation failed: {e:#}"),
        )
    })?;
    tracing::info!(
        "images: {n} × {size} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(json!({
        "created": unix_now(),
        "data": images.into_iter().map(|b| json!({"b64_json": b})).collect::<Vec<_>>(),
        "size": size,
        "output_format": "png",
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": n * FRAME_TOKENS,
            "total_tokens": input_tokens + n * FRAME_TOKENS,
        },
    }))
}
