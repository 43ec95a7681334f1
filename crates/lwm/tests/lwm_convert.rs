//! `lwm convert`: JAX checkpoint -> HF safetensors (rotate-half q/k) -> JAX, on the original's
//! fixture checkpoints (fixtures/lwm-jax).

mod common;
use candle_core::Tensor;
use common::fixture;
use lwm::config::{ModelConfig, RopeLayout, RopeScaling};
use lwm::convert::{hf_to_jax, jax_to_hf, DEFAULT_CHUNK_BYTES};
use lwm::model::{ForwardOptions, Model};
use lwm::weights::hf::{load_hf_config, HfWeights};
use std::path::PathBuf;

fn jax(rel: &str) -> PathBuf {
    fixture(&format!("lwm-jax/{rel}"))
}

fn tiny_config(theta: f64, vision: usize) -> ModelConfig {
    ModelConfig {
        architecture: "llama".into(),
        vocab_size: 512,
        hidden_size: 64,
        intermediate_size: 160,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 4,
        head_dim: 16,
        rms_norm_eps: 1e-6,
        theta,
        rope_layout: RopeLayout::Interleaved,
        rope_scaling: RopeScaling::None,
        max_sequence_length: 256,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        vision_vocab_size: vision,
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lwm-convert-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn npy(rel: &str) -> Vec<f32> {
    Tensor::read_npy(jax(rel))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn converted_safetensors_give_the_jax_logits_under_rotate_half() {
    for (file, theta, reference) in [
        (
            "text/params_scanned_f32.msgpack",
            1e4,
            "text/logits_f32.npy",
        ),
        (
            "text/params_scanned_bf16.msgpack",
            1e4,
            "text/logits_bf16params.npy",
        ),
        (
            "text/params_unscanned_f32.msgpack",
            5e7,
            "text/logits_f32_theta_alt.npy",
        ),
    ] {
        let dir = tmp("hf");
        jax_to_hf(&jax(file), &tiny_config(theta, 0), &dir).unwrap();
        let cfg = load_hf_config(&dir).unwrap();
        assert_eq!(cfg.rope_layout, RopeLayout::RotateHalf);
        assert_eq!(cfg.theta, theta);
        let model = Model::load(
            &HfWeights::open(&dir).unwrap(),
            cfg,
            ForwardOptions::default(),
        )
        .unwrap();
        let ids: Vec<u32> = Tensor::read_npy(jax("text/input_ids.npy"))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::U32)
            .unwrap()
            .to_vec1()
            .unwrap();
        let logits = model.forward(&ids, &mut model.new_cache(), true).unwrap();
        let d = logits
            .iter()
            .zip(npy(reference))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(d < 1e-4, "{file}: max |diff| {d}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn jax_to_hf_to_jax_is_byte_exact() {
    let cases = [
        ("text/params_scanned_f32.msgpack", 0, DEFAULT_CHUNK_BYTES),
        ("text/params_unscanned_f32.msgpack", 0, DEFAULT_CHUNK_BYTES),
        ("text/params_scanned_bf16.msgpack", 0, DEFAULT_CHUNK_BYTES),
        (
            "vision/vl_params_scanned_bf16.msgpack",
            8448,
            DEFAULT_CHUNK_BYTES,
        ),
        // Written by flax with its chunk limit at 4 KiB: the chunked form round-trips too.
        ("text/params_scanned_f32_chunked.msgpack", 0, 4096),
    ];
    for (file, vision, chunk) in cases {
        let dir = tmp("rt");
        jax_to_hf(&jax(file), &tiny_config(1e4, vision), &dir).unwrap();
        let back = dir.join("params");
        hf_to_jax(&dir, &back, None, chunk).unwrap();
        let a = std::fs::read(jax(file)).unwrap();
        let b = std::fs::read(&back).unwrap();
        assert_eq!(a.len(), b.len(), "{file}: length");
        assert!(a == b, "{file}: bytes differ");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn a_mismatched_config_writes_nothing() {
    let dir = tmp("bad");
    let mut cfg = tiny_config(1e4, 0);
    cfg.num_attention_heads = 8;
    cfg.num_key_value_heads = 8;
    cfg.head_dim = 8;
    // Same shapes (8 heads × 8 = 64): the tree matches, so this converts; a wrong layer count does not.
    cfg.num_hidden_layers = 4;
    let e = format!(
        "{:#}",
        jax_to_hf(&jax("text/params_scanned_f32.msgpack"), &cfg, &dir).unwrap_err()
    );
    assert!(e.contains("does not match"), "{e}");
    assert!(!dir.join("model.safetensors").exists() && !dir.join("config.json").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
