//! Helpers shared by the CLI test binaries: run the built `lwm`, find the default model.
#![allow(dead_code)] // each test binary uses its own subset

use std::process::{Command, Output};

/// Run the `lwm` binary under test with `args`, capturing its output.
pub fn lwm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lwm"))
        .args(args)
        .output()
        .expect("run lwm")
}

/// The default model's path (`LWM_DEFAULT_MODEL` or the cache), or `None` with a note so
/// the test can skip when it was never fetched.
pub fn default_model() -> Option<String> {
    if let Ok(p) = std::env::var("LWM_DEFAULT_MODEL") {
        return Some(p);
    }
    let p = lwm::model_source::default_model_path();
    if p.exists() {
        Some(p.display().to_string())
    } else {
        eprintln!("note: default model missing (run `lwm pull default`); skipping");
        None
    }
}

/// `lwm needle run` on a small grid of the default model (2 cells of 384 tokens, 12-token
/// answers) with dequantized weights, so one worker and any ring give the same answers.
pub fn needle_small_grid_args(model: &str, out: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "needle",
        "run",
        "-m",
        model,
        "--numerics",
        "exact",
        "--dequantize",
        "--context-lengths",
        "384",
        "--depths",
        "0,100",
        "--max-new-tokens",
        "12",
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(out.display().to_string());
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// (cell id, answer token ids) of a needle run directory, sorted by id.
pub fn needle_answers(dir: &std::path::Path) -> Vec<(String, Vec<u64>)> {
    let mut v: Vec<(String, Vec<u64>)> = std::fs::read_to_string(dir.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            let ids = r["response_ids"].as_array().unwrap();
            (
                r["id"].as_str().unwrap().to_string(),
                ids.iter().map(|t| t.as_u64().unwrap()).collect(),
            )
        })
        .collect();
    v.sort();
    v
}

#[path = "../../../lwm/tests/common/prompts.rs"]
mod prompts;
#[allow(unused_imports)] // each test binary uses its own subset
pub use prompts::records;
