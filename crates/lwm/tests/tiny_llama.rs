//! A tiny random LLaMA (GQA, untied head) against llama.cpp's logits for the same weights
//! (fixture made by scripts/make_tiny_llama.py; llama.cpp F32, f32 KV cache).

mod common;
use candle_core::Tensor;
use common::fixture;
use lwm::attention::Chunking;
use lwm::config::RopeLayout;
use lwm::model::{ForwardOptions, Linear, Model, Numerics};
use lwm::weights::gguf::GgufFile;
use lwm::weights::hf::{load_hf_config, HfWeights};
use lwm::weights::WeightSource;

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

/// Every matrix of a model is `Linear::Half` at 2 bytes per weight.
fn assert_all_half(model: &Model) {
    for l in model.linears() {
        assert!(matches!(l, Linear::Half(_)), "{l:?}");
        let Linear::Half(m) = l else { unreachable!() };
        assert_eq!(l.storage_bytes(), 2 * m.rows * m.cols);
    }
}

/// The f16 GGUF keeps its matrices at 2 bytes per weight, under both numerics: `Ggml`
/// (llama.cpp's f16 dots: activations rounded to f16) and `Exact` (f32 activations), each
/// against llama.cpp's logits for that file; and the two differ only by that rounding.
#[test]
fn gguf_f16_runs_half_kernels_under_both_numerics() {
    let f = GgufFile::open(&fixture("tiny-llama/tiny-llama-f16.gguf")).unwrap();
    let cfg = f.config().unwrap();
    let reference = reference("logits_f16.npy");
    let mut out = Vec::new();
    for numerics in [Numerics::Ggml, Numerics::Exact] {
        let opts = ForwardOptions {
            numerics,
            ..Default::default()
        };
        let model = Model::load(&f, cfg.clone(), opts).unwrap();
        assert_all_half(&model);
        let logits = all_logits(&model, &input_ids());
        let d = max_diff(&logits, &reference);
        eprintln!("{numerics:?}: max |diff| to llama.cpp {d}");
        assert!(d < 0.05, "{numerics:?}: max |diff| {d}");
        out.push(logits);
    }
    let d = max_diff(&out[0], &out[1]);
    assert!(d > 0.0 && d < 0.05, "ggml vs exact: {d}");
}

/// Write the tiny-llama HF fixture's tensors as one bf16 safetensors file in `dir`.
fn write_bf16_safetensors(dir: &std::path::Path) {
    let src = HfWeights::open(&fixture("tiny-llama/hf")).unwrap();
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for name in src.names() {
        let t = src.load(&name).unwrap().to_dense().unwrap();
        let dims = t.dims().to_vec();
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let start = data.len();
        for x in v {
            data.extend_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes());
        }
        header.insert(
            name,
            serde_json::json!({"dtype": "BF16", "shape": dims, "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    bytes.extend(data);
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    std::fs::copy(
        fixture("tiny-llama/hf/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
}

/// A bf16 safetensors model loads at 2 bytes per weight (`Linear::Half`, no f32 copy) and
/// gives the logits of the same weights widened to f32 (`--dequantize`, what loading did
/// before) within float reordering, and llama.cpp's f32 logits within the bf16 rounding of
/// the weights.
#[test]
fn hf_bf16_safetensors_stay_half_and_match_the_widened_model() {
    let dir = std::env::temp_dir().join(format!("lwm-bf16-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_bf16_safetensors(&dir);
    let cfg = load_hf_config(&dir).unwrap();
    let w = HfWeights::open(&dir).unwrap();
    let half = Model::load(&w, cfg.clone(), ForwardOptions::default()).unwrap();
    assert_all_half(&half);
    let mut widened = Model::load(&w, cfg.clone(), ForwardOptions::default()).unwrap();
    widened.dequantize_weights().unwrap();
    assert!(widened
        .linears()
        .iter()
        .all(|l| matches!(l, Linear::Dense(_))));
    // The memory planner's weight bytes: matrices M at 2 bytes (4 widened), norms N alike,
    // so 2·half − widened = N.
    let norms = cfg.num_hidden_layers * 8 * cfg.hidden_size;
    assert_eq!(2 * half.weight_bytes() - widened.weight_bytes(), norms);
    let ids = input_ids();
    let a = all_logits(&half, &ids);
    let b = all_logits(&widened, &ids);
    let d = max_diff(&a, &b);
    assert!(d < 1e-4, "half vs widened: max |diff| {d}");
    let d_ref = max_diff(&a, &reference("logits.npy"));
    eprintln!("bf16 vs llama.cpp f32: {d_ref}, half vs widened: {d}");
    assert!(d_ref < 0.5, "bf16 vs f32 reference: {d_ref}");
    std::fs::remove_dir_all(&dir).ok();
}
