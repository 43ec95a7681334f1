//! The vision-language model (vte / vision_head chosen by the vision mask) against the
//! original's logits for the same bf16 checkpoint (fixtures/lwm-jax/vision).

mod common;
use candle_core::Tensor;
use common::fixture;
use lwm::config::{ModelConfig, RopeLayout, RopeScaling};
use lwm::model::{ForwardOptions, Model, SeqInput};
use lwm::vision_model::{frame_tokens, Heads, END_OF_FRAME, END_OF_VISION};
use lwm::weights::jax::JaxWeights;

fn vl(rel: &str) -> std::path::PathBuf {
    fixture(&format!("lwm-jax/vision/{rel}"))
}

fn npy(rel: &str) -> Vec<f32> {
    Tensor::read_npy(vl(rel))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn config() -> ModelConfig {
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
        theta: 5e7,
        rope_layout: RopeLayout::Interleaved,
        rope_scaling: RopeScaling::None,
        max_sequence_length: 256,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        vision_vocab_size: 8448,
    }
}

fn model() -> Model {
    model_with_context(256)
}

/// The fixture model with a longer RoPE context (nothing else depends on it).
fn model_with_context(max_sequence_length: usize) -> Model {
    let path = vl("vl_params_scanned_bf16.msgpack");
    let cfg = ModelConfig {
        max_sequence_length,
        ..config()
    };
    Model::load(
        &JaxWeights::open(&path, &cfg).unwrap(),
        cfg,
        ForwardOptions::default(),
    )
    .unwrap()
}

fn inputs() -> (Vec<u32>, Vec<bool>) {
    let ids: Vec<u32> = Tensor::read_npy(vl("vl_input_ids.npy"))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(candle_core::DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap();
    // `|b1` npy: one byte per entry after the header.
    let raw = std::fs::read(vl("vl_vision_mask.npy")).unwrap();
    let mask: Vec<bool> = raw[raw.len() - ids.len()..]
        .iter()
        .map(|&b| b != 0)
        .collect();
    (ids, mask)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0 as u32
}

#[test]
fn both_heads_match_the_original_at_every_position() {
    let m = model();
    let (ids, mask) = inputs();
    assert_eq!(mask.iter().filter(|&&v| v).count(), 17);
    let out = m
        .forward_mixed(&ids, &mask, &mut m.new_cache(), Heads::Both, true)
        .unwrap();
    // bf16 weights widen to f32 exactly and the original computed in f32: f32 tolerance.
    let dv = max_diff(&out.vision, &npy("vl_vision_logits.npy"));
    let dt = max_diff(&out.text, &npy("vl_text_logits.npy"));
    assert!(dv < 1e-4 && dt < 1e-4, "vision {dv}, text {dt}");
}

/// Single-token decode steps embed with vte (sample_mode vision) or wte (text).
#[test]
fn greedy_decoding_in_vision_and_text_mode_matches() {
    let m = model();
    let (ids, mask) = inputs();
    for (heads, want) in [
        (Heads::Vision, [46u32, 2962, 2828, 346]),
        (Heads::Text, [407, 412, 399, 106]),
    ] {
        let mut cache = m.new_cache();
        let pick = |o: lwm::vision_model::MixedLogits| {
            argmax(if heads == Heads::Vision {
                &o.vision
            } else {
                &o.text
            })
        };
        let mut next = pick(
            m.forward_mixed(&ids, &mask, &mut cache, heads, false)
                .unwrap(),
        );
        let mut got = vec![next];
        for _ in 1..4 {
            let o = m
                .forward_mixed(&[next], &[heads == Heads::Vision], &mut cache, heads, false)
                .unwrap();
            next = pick(o);
            got.push(next);
        }
        assert_eq!(got, want, "{heads:?}");
    }
}

#[test]
fn frame_layout_and_bad_ids() {
    let f = vec![vec![5u32; 256], vec![7u32; 256]];
    let t = frame_tokens(&f);
    assert_eq!(t.len(), 2 * 257);
    assert_eq!(t[256], END_OF_FRAME);
    assert_eq!(t[513], END_OF_VISION);
    let m = model();
    let e = m
        .forward_mixed(
            &[1, 9000],
            &[false, true],
            &mut m.new_cache(),
            Heads::Both,
            false,
        )
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("vision id 9000"), "{e}");
    let e = m
        .forward_mixed(&[600], &[false], &mut m.new_cache(), Heads::Both, false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("text id 600"), "{e}");
}

/// The vision chat prompt with the real LLaMA vocabulary: `<vision>`/`</vision>` are plain
/// text split by SentencePiece, ids from the fact sheet (checked there with llama-tokenizer-js).
#[test]
fn vision_chat_prompt_layout_with_the_llama_vocabulary() {
    let tok = lwm::tokenizer::Tokenizer::from_file(&fixture("tokenizer/ggml-vocab-llama-spm.gguf"))
        .unwrap();
    let frames = vec![vec![3u32; 256], vec![4u32; 256]];
    let (ids, mask) = lwm::vision_chat::chat_prompt(&tok, "What is shown?", &frames).unwrap();
    let head = tok
        .encode(
            "You are a helpful assistant. USER: What is shown?\n",
            false,
            false,
        )
        .unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(&ids[1..1 + head.len()], &head[..]);
    let v = 1 + head.len();
    assert_eq!(&ids[v..v + 3], &[529, 4924, 29958]);
    assert_eq!(ids[v + 3 + 256], END_OF_FRAME);
    assert_eq!(ids[v + 3 + 513], END_OF_VISION);
    assert_eq!(
        &ids[v + 3 + 514..],
        &[1533, 4924, 29958, 29871, 319, 1799, 9047, 13566, 29901]
    );
    let masked: Vec<usize> = (0..ids.len()).filter(|&i| mask[i]).collect();
    assert_eq!(masked.len(), 514);
    assert_eq!((masked[0], *masked.last().unwrap()), (v + 3, v + 3 + 513));
    // The generation prompts: conditional ends in `ASSISTANT: <vision>`, unconditional `<s><vision>`.
    assert_eq!(
        lwm::vision_generate::unconditional_prompt(&tok).unwrap(),
        [1, 529, 4924, 29958]
    );
    let c = lwm::vision_generate::conditional_prompt(&tok, "a cat", false).unwrap();
    assert_eq!(&c[c.len() - 3..], &[529, 4924, 29958]);
}

/// CFG generation on the fixture model: frames of 256 codebook ids, end-of-frame forced.
/// With guidance 1 and temperature 0 the guided logits are the conditional ones, so the
/// first code is the conditional vision head's argmax over the codebook ids.
#[test]
fn cfg_generation_yields_whole_frames_of_codebook_ids() {
    use lwm::vision_generate::{generate_codes, PhaseParams, VisionGenRequest};
    let m = model_with_context(1024);
    let greedy = PhaseParams {
        temperature: 0.0,
        top_k: 0,
        guidance: 1.0,
    };
    let req = VisionGenRequest {
        cond_ids: vec![1, 331, 209, 464],
        uncond_ids: vec![1, 7],
        n_frames: 2,
        codebook: 8192,
        image: greedy,
        video: PhaseParams {
            guidance: 3.0,
            ..greedy
        },
        seed: 0,
    };
    let mut seen = Vec::new();
    let frames = generate_codes(&m, &req, &mut |d| {
        seen.push(d);
        true
    })
    .unwrap();
    // Progress after every token, end-of-frame included.
    assert_eq!(seen, (1..=2 * 257).collect::<Vec<_>>());
    assert_eq!(frames.len(), 2);
    assert!(frames
        .iter()
        .all(|f| f.len() == 256 && f.iter().all(|&c| c < 8192)));
    let cond = m
        .forward_mixed(
            &req.cond_ids,
            &[false; 4],
            &mut m.new_cache(),
            Heads::Vision,
            false,
        )
        .unwrap()
        .vision;
    assert_eq!(frames[0][0], argmax(&cond[..8192]));
    // Guidance runs both rows in one batched forward: each row's logits are, bit for bit,
    // what it gives alone.
    let (mut c, mut u) = (m.new_cache(), m.new_cache());
    let both = m
        .forward_mixed_batch(
            &mut [
                SeqInput {
                    ids: &req.cond_ids,
                    cache: &mut c,
                    all_logits: false,
                    vision: Some(&[false; 4]),
                },
                SeqInput {
                    ids: &req.uncond_ids,
                    cache: &mut u,
                    all_logits: false,
                    vision: Some(&[false; 2]),
                },
            ],
            Heads::Vision,
        )
        .unwrap();
    let uncond = m
        .forward_mixed(
            &req.uncond_ids,
            &[false; 2],
            &mut m.new_cache(),
            Heads::Vision,
            false,
        )
        .unwrap()
        .vision;
    assert_eq!(both[0].vision, cond);
    assert_eq!(both[1].vision, uncond);
    assert_eq!((c.len(), u.len()), (4, 2));
    // Stopped inside the second frame: only the whole first frame comes back.
    let part = generate_codes(&m, &req, &mut |done| done < 300).unwrap();
    assert_eq!(part, frames[..1]);
    // A smaller VQGAN codebook bounds what is sampled, so every code decodes.
    let small = VisionGenRequest {
        n_frames: 1,
        codebook: 512,
        ..req.clone()
    };
    let small = generate_codes(&m, &small, &mut |_| true).unwrap();
    assert!(small[0].iter().all(|&c| c < 512));
    // A sequence longer than the model's context is refused up front.
    let long = VisionGenRequest { n_frames: 4, ..req };
    let e = generate_codes(&m, &long, &mut |_| true)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("max sequence length"), "{e}");
}
