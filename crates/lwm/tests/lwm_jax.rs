//! LWM's JAX checkpoints (tux streaming msgpack) against logits the original JAX code computed
//! from the same files (fixtures/lwm-jax, see its README in /work/shared/fixtures/lwm-jax).

mod common;
use candle_core::Tensor;
use common::fixture;
use lwm::config::{ModelConfig, RopeLayout, RopeScaling};
use lwm::model::{ForwardOptions, Model};
use lwm::weights::jax::{JaxLayout, JaxWeights};
use std::path::PathBuf;

fn jax(rel: &str) -> PathBuf {
    fixture(&format!("lwm-jax/{rel}"))
}

fn npy(rel: &str) -> Vec<f32> {
    Tensor::read_npy(jax(rel))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn input_ids() -> Vec<u32> {
    Tensor::read_npy(jax("text/input_ids.npy"))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The tiny text model's config (text/text_model.json).
fn tiny_config(theta: f64) -> ModelConfig {
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
        vision_vocab_size: 0,
    }
}

fn load(file: &str, theta: f64) -> (Model, JaxLayout) {
    let cfg = tiny_config(theta);
    let w = JaxWeights::open(&jax(&format!("text/{file}")), &cfg).unwrap();
    let layout = w.layout;
    (
        Model::load(&w, cfg, ForwardOptions::default()).unwrap(),
        layout,
    )
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn greedy(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut cache = model.new_cache();
    let mut logits = model.forward(prompt, &mut cache, false).unwrap();
    let mut out = Vec::new();
    for _ in 0..n {
        let next = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0 as u32;
        out.push(next);
        logits = model.forward(&[next], &mut cache, false).unwrap();
    }
    out
}

// The fixture's independent NumPy port reproduces every logits file within 1e-5 and logits
// reach ~6.5, so 1e-4 absolute leaves room only for f32 summation-order noise.
const TOL: f32 = 1e-4;

#[test]
fn scanned_f32_checkpoint_matches_jax_logits_and_greedy_tokens() {
    let (model, layout) = load("params_scanned_f32.msgpack", 1e4);
    assert_eq!(layout, JaxLayout::Scanned);
    let ids = input_ids();
    let logits = model.forward(&ids, &mut model.new_cache(), true).unwrap();
    let d = max_diff(&logits, &npy("text/logits_f32.npy"));
    assert!(d < TOL, "max |diff| {d}");
    assert_eq!(
        greedy(&model, &ids, 8),
        [408, 281, 94, 436, 307, 241, 387, 306]
    );
}

#[test]
fn unscanned_f32_checkpoint_matches_jax_logits() {
    let (model, layout) = load("params_unscanned_f32.msgpack", 1e4);
    assert_eq!(layout, JaxLayout::Unscanned);
    let logits = model
        .forward(&input_ids(), &mut model.new_cache(), true)
        .unwrap();
    let d = max_diff(&logits, &npy("text/logits_f32.npy"));
    assert!(d < TOL, "max |diff| {d}");
}

#[test]
fn theta_50m_matches_jax_logits_and_greedy_tokens() {
    let (model, _) = load("params_scanned_f32.msgpack", 5e7);
    let ids = input_ids();
    let logits = model.forward(&ids, &mut model.new_cache(), true).unwrap();
    let d = max_diff(&logits, &npy("text/logits_f32_theta_alt.npy"));
    assert!(d < TOL, "max |diff| {d}");
    assert_eq!(
        greedy(&model, &ids, 8),
        [254, 53, 24, 26, 37, 489, 441, 441]
    );
}

/// The bf16 file's values widen to f32 exactly and the original computed in f32 from them,
/// so the bf16 reference needs no wider tolerance than f32: the same 1e-4 applies. (Against
/// the f32 reference the bf16 model differs by 0.117, which this test would catch.)
#[test]
fn bf16_checkpoint_matches_jax_logits_from_the_same_file() {
    let (model, _) = load("params_scanned_bf16.msgpack", 1e4);
    // The bf16 matrices stay bf16: `Linear::Half`, 2 bytes per weight.
    for l in model.linears() {
        let lwm::model::Linear::Half(m) = l else {
            panic!("not half: {l:?}")
        };
        assert_eq!(m.kind, lwm::quant::half::HalfKind::Bf16);
        assert_eq!(l.storage_bytes(), 2 * m.rows * m.cols);
    }
    let ids = input_ids();
    let logits = model.forward(&ids, &mut model.new_cache(), true).unwrap();
    let d = max_diff(&logits, &npy("text/logits_bf16params.npy"));
    assert!(d < TOL, "max |diff| {d}");
    assert!(max_diff(&logits, &npy("text/logits_f32.npy")) > 1e-2);
    assert_eq!(
        greedy(&model, &ids, 8),
        [408, 281, 94, 436, 307, 241, 387, 306]
    );
}

#[test]
fn config_inferred_from_a_config_json_next_to_the_params() {
    let dir = std::env::temp_dir().join(format!("lwm-jax-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(jax("text/params_scanned_f32.msgpack"), dir.join("params")).unwrap();
    let e = lwm::weights::jax::load_config(&dir.join("params"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("head count") && e.contains("config.json"), "{e}");
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type":"llama","vocab_size":512,"hidden_size":64,"intermediate_size":160,
            "num_hidden_layers":2,"num_attention_heads":4,"max_position_embeddings":256,"rms_norm_eps":1e-6}"#,
    )
    .unwrap();
    let cfg = lwm::weights::jax::load_config(&dir.join("params")).unwrap();
    assert_eq!(cfg, tiny_config(1e4));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_tree_that_does_not_match_the_config_is_named() {
    let path = jax("text/params_scanned_f32.msgpack");
    let mut three = tiny_config(1e4);
    three.num_hidden_layers = 3;
    let e = format!("{:#}", JaxWeights::open(&path, &three).err().unwrap());
    assert!(
        e.contains("does not match") && e.contains("scan_decoder") && e.contains("[3, 64, 64]"),
        "{e}"
    );
    let mut wide = tiny_config(1e4);
    wide.intermediate_size = 128;
    let e = format!("{:#}", JaxWeights::open(&path, &wide).err().unwrap());
    assert!(e.contains("does not match") && e.contains("w1"), "{e}");
    // Unscanned file, one layer fewer in the config: layer 1 is surplus.
    let mut one = tiny_config(1e4);
    one.num_hidden_layers = 1;
    let e = format!(
        "{:#}",
        JaxWeights::open(&jax("text/params_unscanned_f32.msgpack"), &one)
            .err()
            .unwrap()
    );
    assert!(e.contains("layer 1") && e.contains("1 layers"), "{e}");
    // A text config for the vision checkpoint: vte is not part of it.
    let e = format!(
        "{:#}",
        JaxWeights::open(
            &jax("vision/vl_params_scanned_bf16.msgpack"),
            &tiny_config(5e7)
        )
        .err()
        .unwrap()
    );
    assert!(e.contains("vte") && e.contains("vision"), "{e}");
}

#[test]
fn a_truncated_stream_is_reported_as_truncated() {
    let bytes = std::fs::read(jax("text/params_scanned_bf16.msgpack")).unwrap();
    let dir = std::env::temp_dir();
    for cut in [bytes.len() - 1, bytes.len() / 2, 3] {
        let p = dir.join(format!("lwm-trunc-{}-{cut}.msgpack", std::process::id()));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = format!(
            "{:#}",
            JaxWeights::open(&p, &tiny_config(1e4)).err().unwrap()
        );
        assert!(
            e.contains("truncated") && e.contains("incomplete"),
            "cut {cut}: {e}"
        );
        let _ = std::fs::remove_file(&p);
    }
    let p = dir.join(format!("lwm-garbage-{}.msgpack", std::process::id()));
    std::fs::write(&p, b"PK\x03\x04 not msgpack at all").unwrap();
    let e = format!(
        "{:#}",
        JaxWeights::open(&p, &tiny_config(1e4)).err().unwrap()
    );
    assert!(e.contains("record 0"), "{e}");
    let _ = std::fs::remove_file(&p);
}

/// flax's chunked form (arrays over 1 GiB in real files), written by the real flax code with
/// its limit lowered to 4 KiB (scripts/make_chunked_jax_fixture.py): 9 of 12 records chunked.
#[test]
fn chunked_arrays_load_to_the_same_logits() {
    let (model, _) = load("params_scanned_f32_chunked.msgpack", 1e4);
    let logits = model
        .forward(&input_ids(), &mut model.new_cache(), true)
        .unwrap();
    let d = max_diff(&logits, &npy("text/logits_f32.npy"));
    assert!(d < TOL, "max |diff| {d}");
}
