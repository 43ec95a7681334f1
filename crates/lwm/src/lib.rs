//! `lwm`: the Large World Model engine — long-context LLaMA-architecture models with
//! blockwise attention, in Rust on candle. This crate only gathers the layers under one
//! name; each lives in its own crate and imports only the ones below it:
//!
//! - `lwm-core`: config, weights, tokenizer, quant, attention, kv, rope, model
//! - `lwm-engine`: generation, sampling, constraints, chat templates, prompt cache, ring
//! - `lwm-eval` (needle), `lwm-train` (training), `lwm-vision` (VQGAN, vision chat and
//!   generation) on top.

pub use lwm_core::{
    attention, attention_kernel, config, convert, cpu_pressure, error, kv, memory_plan, model,
    parallel, peak_rss_bytes, quant, rng, rope, set_threads, tokenizer, vision_model, weights,
    Error,
};
pub use lwm_engine::{
    chat_template, constrain, generate, model_source, prompt_cache, pull, ring, sampling,
};
pub use lwm_eval::{needle, ruler};
pub use lwm_train as train;
pub use lwm_vision::{vision_chat, vision_generate, vqgan};
