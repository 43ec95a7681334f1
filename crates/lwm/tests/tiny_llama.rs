//! A tiny random LLaMA (GQA, untied head) against llama.cpp's logits for the same weights
//! (fixture made by scripts/make_tiny_llama.py; llama.cpp F32, f32 KV cache).

mod common;
use candle_core::Tensor;
use common::fixture;
use lwm::attention::Chunking;
use lwm::config::RopeLayout;
use lwm::model::{ForwardOptions, Model};
use lwm::weights::gguf::GgufFile;
use lwm::weights::hf::{load_hf_config, HfWeights};

fn input_ids() -> Vec<u32> {
    serde_json::from_str(&std::fs::read_to_string(fixture("tiny-llama/input_ids.json")).unwrap())
        .unwrap()
}

fn reference(name: &str) -> Vec<f32> {
    Tensor::read_npy(fixture(&format!("tiny-llama/{name}")))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn hf_model(theta: Option<f64>, opts: ForwardOptions) -> Model {
    let dir = fixture("tiny-llama/hf");
    let mut cfg = load_hf_config(&dir).unwrap();
    assert_eq!(cfg.rope_layout, RopeLayout::RotateHalf);
    if let Some(t) = theta {
        cfg.theta = t;
    }
    Model::load(&HfWeights::open(&dir).unwrap(), cfg, opts).unwrap()
}

fn all_logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    let mut cache = model.new_cache();
    model.forward(ids, &mut cache, true).unwrap()
}

#[test]
fn hf_safetensors_matches_llama_cpp_at_every_position() {
    let ids = input_ids();
    let d = max_diff(
        &all_logits(&hf_model(None, ForwardOptions::default()), &ids),
        &reference("logits.npy"),
    );
    assert!(d < 1e-4, "max |diff| {d}");
}

#[test]
fn theta_override_matches_llama_cpp_theta_5e5() {
    let ids = input_ids();
    let model = hf_model(Some(5e5), ForwardOptions::default());
    let d = max_diff(&all_logits(&model, &ids), &reference("logits_theta5e5.npy"));
    assert!(d < 1e-4, "max |diff| {d}");
    // And theta matters: the theta-1e4 reference is far away.
    assert!(max_diff(&all_logits(&model, &ids), &reference("logits.npy")) > 0.1);
}

#[test]
fn gguf_f32_with_interleaved_rope_matches_llama_cpp() {
    let ids = input_ids();
    let file = GgufFile::open(&fixture("tiny-llama/tiny-llama-f32.gguf")).unwrap();
    let cfg = file.config().unwrap();
    assert_eq!(cfg.rope_layout, RopeLayout::Interleaved);
    let model = Model::load(&file, cfg, ForwardOptions::default()).unwrap();
    let d = max_diff(&all_logits(&model, &ids), &reference("logits.npy"));
    assert!(d < 1e-4, "max |diff| {d}");
}

#[test]
fn results_do_not_depend_on_chunk_sizes() {
    let ids = input_ids();
    let reference = reference("logits.npy");
    for (q, k, mlp) in [
        (1, 1, 1),
        (3, 5, 7),
        (8, 4, 16),
        (48, 48, 48),
        (1024, 1024, 1024),
    ] {
        let opts = ForwardOptions {
            chunking: Chunking {
                query_chunk: q,
                key_chunk: k,
            },
            mlp_chunk: mlp,
            ..Default::default()
        };
        let d = max_diff(&all_logits(&hf_model(None, opts), &ids), &reference);
        assert!(d < 1e-4, "chunks q{q} k{k} mlp{mlp}: max |diff| {d}");
    }
}

#[test]
fn incremental_decode_equals_one_batch() {
    // Prefill a prefix, then feed the rest one token at a time through the KV cache.
    let ids = input_ids();
    let model = hf_model(None, ForwardOptions::default());
    let reference = reference("logits.npy");
    let vocab = model.config.vocab_size;
    let mut cache = model.new_cache();
    let split = 17;
    let first = model.forward(&ids[..split], &mut cache, true).unwrap();
    assert!(max_diff(&first, &reference[..split * vocab]) < 1e-4);
    for (i, &t) in ids.iter().enumerate().skip(split) {
        let row = model.forward(&[t], &mut cache, false).unwrap();
        let d = max_diff(&row, &reference[i * vocab..(i + 1) * vocab]);
        assert!(d < 1e-4, "position {i}: {d}");
    }
    assert_eq!(cache.len(), ids.len());
}

#[test]
fn gguf_f16_and_q8_0_stay_close_to_llama_cpp() {
    // llama.cpp also quantizes activations inside these products, so only a loose bound.
    for (file, logits, tol) in [
        ("tiny-llama-f16.gguf", "logits_f16.npy", 0.05),
        ("tiny-llama-q8_0.gguf", "logits_q8_0.npy", 0.6),
    ] {
        let f = GgufFile::open(&fixture(&format!("tiny-llama/{file}"))).unwrap();
        let cfg = f.config().unwrap();
        let model = Model::load(&f, cfg, ForwardOptions::default()).unwrap();
        let d = max_diff(&all_logits(&model, &input_ids()), &reference(logits));
        assert!(d < tol, "{file}: max |diff| {d}");
    }
}
