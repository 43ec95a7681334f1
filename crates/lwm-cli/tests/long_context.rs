//! Long-context features end to end: KV cache types in the memory plan, refusal of a run
//! that cannot fit, and bad KV type names.

mod common;
use common::{default_model, lwm};

fn info(model: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["info", "--model", model, "--json"];
    args.extend_from_slice(extra);
    let out = lwm(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn info_plans_kv_bytes_per_type() {
    let Some(model) = default_model() else { return };
    // GGUF defaults to llama.cpp's f16 cache.
    let v = info(&model, &["--context", "8192"]);
    assert_eq!(v["memory"]["kv_type"], "f16");
    assert_eq!(
        v["memory"]["kv_cache_bytes"].as_u64().unwrap(),
        2 * 30 * 3 * 64 * 2 * 8192
    );
    // q8_0: 34-byte blocks of 32 values (two per 64-wide head row), 131072 tokens.
    let v = info(&model, &["--context", "131072", "--kv-type", "q8_0"]);
    assert_eq!(v["memory"]["kv_type"], "q8_0");
    assert_eq!(
        v["memory"]["kv_cache_bytes"].as_u64().unwrap(),
        2 * 30 * 3 * 68 * 131072
    );
    // Keys and values may differ.
    let v = info(
        &model,
        &[
            "--context",
            "1024",
            "--kv-type-k",
            "q4_0",
            "--kv-type-v",
            "bf16",
        ],
    );
    assert_eq!(v["memory"]["kv_type"], "q4_0,bf16");
    assert_eq!(
        v["memory"]["kv_cache_bytes"].as_u64().unwrap(),
        30 * 3 * (36 + 128) * 1024
    );
    let total = v["memory"]["weights_bytes"].as_u64().unwrap()
        + v["memory"]["kv_cache_bytes"].as_u64().unwrap()
        + v["memory"]["activation_bytes"].as_u64().unwrap()
        + v["memory"]["scratch_bytes"].as_u64().unwrap();
    assert_eq!(v["memory"]["total_bytes"].as_u64().unwrap(), total);
}

#[test]
fn a_context_that_cannot_fit_is_refused_with_the_numbers() {
    let Some(model) = default_model() else { return };
    // 10^9 tokens of f16 KV (23 KB each) is ~21 TiB: no machine running this has it.
    let out = lwm(&[
        "generate",
        "--model",
        &model,
        "-p",
        "Hello",
        "--max-sequence-length",
        "1000000000",
        "-n",
        "999999990",
        "--ignore-eos",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for needle in [
        "not enough memory",
        "tokens of context",
        "KV cache (f16",
        "TiB",
        "available",
    ] {
        assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
    }
    assert!(out.stdout.is_empty(), "generated before refusing");
}

#[test]
fn unknown_kv_type_is_one_clear_error() {
    let Some(model) = default_model() else { return };
    let out = lwm(&["info", "--model", &model, "--kv-type", "q3_k"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("unknown KV cache type 'q3_k'") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[test]
fn a_bad_prompt_cache_file_is_ignored_with_a_warning_and_replaced() {
    let Some(model) = default_model() else { return };
    let dir = std::env::temp_dir().join(format!("lwm-cli-pc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("p.kvc");
    std::fs::write(
        &file,
        b"garbage that is not a cache file at all, long enough",
    )
    .unwrap();
    let run = || {
        lwm(&[
            "generate",
            "--model",
            &model,
            "-p",
            "The capital of France is",
            "-n",
            "2",
            "--temperature",
            "0",
            "--prompt-cache",
            file.to_str().unwrap(),
        ])
    };
    let out = run();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: ignoring the prompt cache") && stderr.contains("magic"),
        "{stderr}"
    );
    assert!(stderr.contains("reused 0 of"), "{stderr}");
    // Replaced by a valid file: the same prompt now reuses all but its last token.
    let out = run();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("warning"),
        "{stderr}"
    );
    assert!(stderr.contains("prefilled 1\n"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
