//! `lwm-core`: what a Large World Model is and how it runs one token step — the config,
//! weights (GGUF, safetensors, JAX), tokenizers, quantized matmul kernels, the one
//! blockwise attention primitive and its SIMD kernels, the KV store (`kv`), RoPE, and the
//! transformer forward (`model`) behind an attention backend. No generation, templates,
//! grammars, plotting or images: those are the crates above (`lwm-engine`, `lwm-eval`,
//! `lwm-train`, `lwm-vision`).

pub mod attention;
pub mod attention_kernel;
pub mod config;
pub mod convert;
pub mod decoder;
pub mod error;
pub mod kv;
pub mod memory_plan;
pub mod model;
pub mod parallel;
pub mod quant;
pub mod rng;
pub mod rope;
pub mod tokenizer;
pub mod vision_model;
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

/// The first line of `/proc/pressure/cpu` (`some avg10=… avg60=…`), empty where the OS has
/// none: benchmarks print it so a busy machine shows in their figures.
pub fn cpu_pressure() -> String {
    std::fs::read_to_string("/proc/pressure/cpu")
        .ok()
        .and_then(|s| s.lines().next().map(String::from))
        .unwrap_or_default()
}
