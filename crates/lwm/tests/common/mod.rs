//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

mod prompts;
pub mod train;
#[allow(unused_imports)] // each test binary uses its own subset
pub use prompts::records;

/// The default model (SmolLM2-135M-Instruct Q4_1): `$LWM_DEFAULT_MODEL`, else the cache
/// `lwm pull default` fills. CI always fetches it first; a bare `cargo test` without it
/// skips these tests with a note instead of failing.
pub fn default_model() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("LWM_DEFAULT_MODEL") {
        return Some(PathBuf::from(p));
    }
    let p = lwm::model_source::default_model_path();
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "note: default model not found at {} (run `lwm pull default`); skipping",
            p.display()
        );
        None
    }
}

pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

pub fn reference_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("smollm2-reference.json")).unwrap())
        .unwrap()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    idx.sort_by(|a, b| b.1.total_cmp(&a.1));
    idx.truncate(k);
    idx
}
