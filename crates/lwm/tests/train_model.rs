//! The trainable LLaMA against the inference engine on the tiny random LLaMA fixture
//! (itself checked against llama.cpp in tiny_llama.rs), and its gradients against finite
//! differences.

mod common;
use common::fixture;
use lwm::model::{ForwardOptions, Model};
use lwm::train::loss::{lwm_loss, Targets};
use lwm::train::model::{BatchInput, TrainModel};
use lwm::weights::gguf::GgufFile;
use lwm::weights::hf::{load_hf_config, HfWeights};
use lwm::weights::WeightSource;

fn input_ids() -> Vec<u32> {
    serde_json::from_str(&std::fs::read_to_string(fixture("tiny-llama/input_ids.json")).unwrap())
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn compare(src: &dyn WeightSource, cfg: lwm::config::ModelConfig) {
    let ids = input_ids();
    let model = Model::load(src, cfg.clone(), ForwardOptions::default()).unwrap();
    let mut cache = model.new_cache();
    let want = model.forward(&ids, &mut cache, true).unwrap();
    let train = TrainModel::load(src, cfg).unwrap();
    let n = ids.len();
    let got: Vec<f32> = train
        .forward(&BatchInput::plain(1, n, ids))
        .unwrap()
        .text
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let d = max_diff(&got, &want);
    assert!(d < 1e-4, "training logits vs inference: max |diff| {d}");
}

#[test]
fn training_forward_matches_inference_hf_rotate_half() {
    let dir = fixture("tiny-llama/hf");
    compare(
        &HfWeights::open(&dir).unwrap(),
        load_hf_config(&dir).unwrap(),
    );
}

#[test]
fn training_forward_matches_inference_gguf_interleaved() {
    let file = GgufFile::open(&fixture("tiny-llama/tiny-llama-f32.gguf")).unwrap();
    let cfg = file.config().unwrap();
    compare(&file, cfg);
}

#[test]
fn gradients_match_finite_differences() {
    let dir = fixture("tiny-llama/hf");
    let model = TrainModel::load(
        &HfWeights::open(&dir).unwrap(),
        load_hf_config(&dir).unwrap(),
    )
    .unwrap();
    let ids: Vec<u32> = input_ids().into_iter().take(12).collect();
    let n = ids.len() - 1;
    let input = BatchInput::plain(1, n, ids[..n].to_vec());
    let targets = Targets {
        tokens: ids[1..].to_vec(),
        loss_mask: vec![1.0; n],
        vision_mask: None,
    };
    let loss_of = |m: &TrainModel| -> candle_core::Tensor {
        let logits = m.forward(&input).unwrap();
        lwm_loss(&logits.text, None, &targets).unwrap()
    };
    let grads = loss_of(&model).backward().unwrap();
    for name in [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.norm.weight",
        "model.embed_tokens.weight",
    ] {
        let var = &model.params()[name];
        let g: Vec<f32> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        // The entry with the largest gradient: finite differences are clearly above noise.
        let (i, &gi) = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        let eps = 1e-2f32;
        let at = |delta: f32| -> f32 {
            let mut w = base.clone();
            w[i] += delta;
            var.set(
                &candle_core::Tensor::from_vec(w, var.shape(), &candle_core::Device::Cpu).unwrap(),
            )
            .unwrap();
            loss_of(&model).to_scalar::<f32>().unwrap()
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        at(0.0);
        assert!(
            (fd - gi).abs() < 2e-2 * gi.abs().max(1e-2),
            "{name}[{i}]: autograd {gi} vs finite difference {fd}"
        );
    }
}
