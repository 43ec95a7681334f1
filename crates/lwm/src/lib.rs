//! `lwm`: the Large World Model engine — long-context LLaMA-architecture models with
//! blockwise attention, in Rust on candle.
//!
//! Layers (imports only go downward): `config` and `weights` describe a model, `tokenizer`
//! and `chat_template` turn text into ids, `attention` holds the one blockwise primitive,
//! `model` runs the transformer over its `kv` store, `sampling` and `generate` produce text.

pub mod attention;
pub mod attention_kernel;
pub mod chat_template;
pub mod config;
pub mod constrain;
pub mod convert;
pub mod error;
pub mod generate;
pub mod kv;
pub mod memory_plan;
pub mod model;
pub mod model_source;
pub mod needle;
pub mod parallel;
pub mod prompt_cache;
pub mod quant;
pub mod ring;
pub mod rng;
pub mod rope;
pub mod sampling;
pub mod tokenizer;
pub mod train;
pub mod vision_chat;
pub mod vision_generate;
pub mod vision_model;
pub mod vqgan;
pub mod weights;

pub use error::Error;

/// Use `n` worker threads for every parallel kernel (rayon and candle's GEMM); 0 keeps the
/// default (all cores). Call once, before loading a model.
pub fn set_threads(n: usize) {
    if n == 0 {
        return;
    }
    // candle reads RAYON_NUM_THREADS for its GEMM; rayon's global pool is ours.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
}

/// Peak resident set size of this process in bytes (`VmHWM`), if the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
