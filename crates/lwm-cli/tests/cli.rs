//! The `lwm` binary end to end: good runs on the default model, and bad input that must end
//! in one clear `error:` line and a non-zero exit, never a panic.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{default_model, lwm};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../lwm/tests/fixtures")
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lwm-cli-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Assert a clean failure: exit status 1, an `error:` line containing every `needles`, no panic.
fn assert_clean_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1, stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(stderr.contains("error:"), "no error line: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}: {stderr}");
    }
    assert!(
        out.stdout.is_empty(),
        "partial output on stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

#[test]
fn truncated_gguf_is_named_and_refused() {
    let src = std::fs::read(fixtures().join("tiny-llama/tiny-llama-f32.gguf")).unwrap();
    let dir = temp_dir("truncated");
    let path = dir.join("cut.gguf");
    std::fs::write(&path, &src[..src.len() * 2 / 3]).unwrap();
    let out = lwm(&["info", "--model", path.to_str().unwrap()]);
    assert_clean_error(&out, &["cut.gguf", "truncated"]);
    // A file cut inside the header is refused too.
    std::fs::write(&path, &src[..100]).unwrap();
    assert_clean_error(
        &lwm(&["info", "--model", path.to_str().unwrap()]),
        &["cut.gguf"],
    );
}

#[test]
fn unknown_quantization_type_is_refused() {
    // A minimal GGUF v3: one metadata entry and one tensor whose type id (99) does not exist.
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // metadata
    let key = b"general.architecture";
    b.extend_from_slice(&(key.len() as u64).to_le_bytes());
    b.extend_from_slice(key);
    b.extend_from_slice(&8u32.to_le_bytes()); // string
    b.extend_from_slice(&5u64.to_le_bytes());
    b.extend_from_slice(b"llama");
    let name = b"token_embd.weight";
    b.extend_from_slice(&(name.len() as u64).to_le_bytes());
    b.extend_from_slice(name);
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&32u64.to_le_bytes());
    b.extend_from_slice(&4u64.to_le_bytes());
    b.extend_from_slice(&99u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.resize(b.len() + 1024, 0);
    let dir = temp_dir("unknown-quant");
    let path = dir.join("weird.gguf");
    std::fs::write(&path, &b).unwrap();
    assert_clean_error(
        &lwm(&["info", "--model", path.to_str().unwrap()]),
        &["weird.gguf", "99"],
    );
}

#[test]
fn missing_model_and_unknown_preset() {
    assert_clean_error(
        &lwm(&["info", "--model", "/nonexistent/model.gguf"]),
        &["not found"],
    );
    let tiny = fixtures().join("tiny-llama/tiny-llama-f32.gguf");
    let out = lwm(&[
        "info",
        "--model",
        tiny.to_str().unwrap(),
        "--preset",
        "lwm-text-2m",
    ]);
    // The tiny GGUF has no vocabulary, so whichever is checked first must be named clearly.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("lwm-text-2m") || stderr.contains("tokenizer"),
        "{stderr}"
    );
}

#[test]
fn hf_directory_with_wrong_shapes_or_missing_tensors() {
    let src = fixtures().join("tiny-llama/hf");
    let spm = fixtures().join("tokenizer/ggml-vocab-gpt-2.gguf");
    // Config claims 3 layers, the weights have 2.
    let dir = temp_dir("missing-layer");
    copy_dir(&src, &dir);
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["num_hidden_layers"] = 3.into();
    std::fs::write(dir.join("config.json"), v.to_string()).unwrap();
    let out = lwm(&[
        "info",
        "--model",
        dir.to_str().unwrap(),
        "--tokenizer",
        spm.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The gpt-2 vocabulary (50257) is larger than the model's 256: refused before anything else.
    assert!(
        stderr.contains("50257") && stderr.contains("256"),
        "{stderr}"
    );

    // With a matching (hand-made) tokenizer.json the missing layer is reported.
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null, "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": (0..200).map(|i| (format!("t{i}"), serde_json::Value::from(i))).collect::<serde_json::Map<String, serde_json::Value>>(), "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    assert_clean_error(
        &lwm(&["info", "--model", dir.to_str().unwrap()]),
        &["model.layers.2"],
    );

    // Config says hidden 32 but the tensors are 64 wide.
    let dir2 = temp_dir("wrong-shape");
    copy_dir(&dir, &dir2);
    v["num_hidden_layers"] = 2.into();
    v["hidden_size"] = 32.into();
    std::fs::write(dir2.join("config.json"), v.to_string()).unwrap();
    assert_clean_error(
        &lwm(&["info", "--model", dir2.to_str().unwrap()]),
        &["shape", "expected"],
    );

    // Malformed config.json.
    std::fs::write(dir2.join("config.json"), "{ not json").unwrap();
    assert_clean_error(
        &lwm(&["info", "--model", dir2.to_str().unwrap()]),
        &["config.json"],
    );
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let Some(model) = default_model() else { return };
    let out = lwm(&[
        "generate",
        "--model",
        &model,
        "--max-sequence-length",
        "8",
        "--prompt",
        "one two three four five six seven eight nine ten eleven twelve",
        "-n",
        "4",
    ]);
    assert_clean_error(&out, &["context"]);
}

#[test]
fn logits_json_top10_matches_llama_cpp_ids() {
    let Some(model) = default_model() else { return };
    let out = lwm(&[
        "logits",
        "--model",
        &model,
        "--prompt",
        "The capital of France is",
        "--top",
        "10",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("smollm2-reference.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(v["prompt_token_ids"], reference["prompt_token_ids"]);
    let top = v["top"].as_array().unwrap();
    assert_eq!(top.len(), 10);
    assert_eq!(top[0]["id"], 7042);
    assert_eq!(top[0]["piece"], " Paris");
}

#[test]
fn tokenize_json_matches_llama_cpp() {
    let Some(model) = default_model() else { return };
    let out = lwm(&[
        "tokenize",
        "--model",
        &model,
        "--prompt",
        "The capital of France is",
        "--json",
    ]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ids"], serde_json::json!([504, 3575, 282, 4649, 314]));
}

#[test]
fn info_reports_the_default_model() {
    let Some(model) = default_model() else { return };
    let out = lwm(&[
        "info",
        "--model",
        &model,
        "--context",
        "8192",
        "--kv-type",
        "f32",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["config"]["num_hidden_layers"], 30);
    assert_eq!(v["config"]["num_key_value_heads"], 3);
    // SmolLM2-135M: 134.5M parameters with the tied head.
    let p = v["parameters"].as_u64().unwrap();
    assert!((134_000_000..135_000_000).contains(&p), "{p}");
    // KV at 8192 tokens, f32: 2 · 30 layers · 3 heads · 64 · 4 bytes · 8192.
    assert_eq!(
        v["memory"]["kv_cache_bytes"].as_f64().unwrap(),
        (2 * 30 * 3 * 64 * 4 * 8192) as f64
    );
}
