//! The default model (SmolLM2-135M-Instruct Q4_1) against llama.cpp's reference
//! (../shared/fixtures/smollm2-reference.json, copied to tests/fixtures).

mod common;
use common::*;
use lwm::chat_template::ChatMessage;
use lwm::generate::{Engine, GenerateRequest, LoadOptions};
use lwm::model::Numerics;
use lwm::sampling::SamplingParams;

fn engine(numerics: Option<Numerics>) -> Option<Engine> {
    let path = default_model()?;
    let opts = LoadOptions {
        numerics,
        ..Default::default()
    };
    Some(Engine::load(path.to_str().unwrap(), &opts).unwrap())
}

fn reference_top10() -> Vec<(u32, f32)> {
    reference_json()["top10"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap() as f32))
        .collect()
}

#[test]
fn top10_logits_match_llama_cpp() {
    // GGUF files default to llama.cpp's arithmetic: same ids in the same order, logits
    // equal to the reference's print precision (1e-5).
    let Some(engine) = engine(None) else { return };
    let r = reference_json();
    let ids = engine.tokenize(r["prompt"].as_str().unwrap()).unwrap();
    assert_eq!(ids, common::ids(&r["prompt_token_ids"]));
    let mut cache = engine.model.new_cache();
    let logits = engine.model.forward(&ids, &mut cache, false).unwrap();
    let ours = top_k(&logits, 10);
    for (i, (id, l)) in reference_top10().iter().enumerate() {
        assert_eq!(
            ours[i].0,
            *id,
            "rank {i}: ours {:?}, llama.cpp {:?}",
            ours[i],
            (id, l)
        );
        let got = logits[*id as usize];
        assert!((got - l).abs() < 1e-4, "token {id}: {got} vs llama.cpp {l}");
    }
}

#[test]
fn exact_numerics_stay_within_quantization_noise_of_llama_cpp() {
    // f32 attention/KV and LWM's RoPE table: the same ten tokens, each logit within 0.3.
    let Some(engine) = engine(Some(Numerics::Exact)) else {
        return;
    };
    let ids = common::ids(&reference_json()["prompt_token_ids"]);
    let mut cache = engine.model.new_cache();
    let logits = engine.model.forward(&ids, &mut cache, false).unwrap();
    let ours: Vec<u32> = top_k(&logits, 10).iter().map(|p| p.0).collect();
    for (id, l) in reference_top10() {
        assert!(
            ours.contains(&id),
            "token {id} missing from our top-10 {ours:?}"
        );
        assert!(
            (logits[id as usize] - l).abs() < 0.3,
            "token {id}: {} vs {l}",
            logits[id as usize]
        );
    }
}

#[test]
fn greedy_chat_answer_equals_llama_cpp() {
    let Some(engine) = engine(None) else { return };
    let r = reference_json();
    let messages: Vec<ChatMessage> = serde_json::from_value(r["chat_messages"].clone()).unwrap();
    let (text, ids) = engine.chat_prompt(&messages).unwrap();
    assert_eq!(text, r["chat_prompt_used"].as_str().unwrap());
    assert_eq!(ids, common::ids(&r["chat_prompt_token_ids"]));
    let want = common::ids(&r["greedy_token_ids"]);
    let mut streamed = String::new();
    let req = GenerateRequest::new(ids, want.len(), SamplingParams::greedy());
    let out = engine
        .generate(&req, &mut |t| {
            streamed.push_str(t);
            true
        })
        .unwrap();
    assert_eq!(out.ids, want);
    assert_eq!(out.text, r["greedy_text"].as_str().unwrap());
    assert_eq!(streamed, out.text);
}

#[test]
fn chunked_prefill_gives_the_same_continuation() {
    let Some(engine) = engine(None) else { return };
    let ids = common::ids(&reference_json()["chat_prompt_token_ids"]);
    let mut a = GenerateRequest::new(ids.clone(), 12, SamplingParams::greedy());
    let whole = engine.generate(&a, &mut |_| true).unwrap();
    a.prefill_chunk = 5;
    let chunked = engine.generate(&a, &mut |_| true).unwrap();
    assert_eq!(whole.ids, chunked.ids);
}

#[test]
fn stop_strings_and_cache_reuse() {
    let Some(engine) = engine(None) else { return };
    let r = reference_json();
    let ids = common::ids(&r["chat_prompt_token_ids"]);
    let mut req = GenerateRequest::new(ids.clone(), 32, SamplingParams::greedy());
    req.stop = vec!["Marseillaise".into()];
    let out = engine.generate(&req, &mut |_| true).unwrap();
    assert_eq!(out.text, "L'Étoile, la ");
    assert_eq!(out.finish_reason.as_str(), "stop");
    // A second request sharing the prompt reuses the cached prefix.
    let mut cache = engine.model.new_cache();
    let first = engine
        .generate_with_cache(&req, &mut cache, &mut |_| true)
        .unwrap();
    assert_eq!(first.reused_tokens, 0);
    let second = engine
        .generate_with_cache(&req, &mut cache, &mut |_| true)
        .unwrap();
    assert_eq!(second.reused_tokens, ids.len() - 1);
    assert_eq!(second.text, first.text);
    // A different question after the same system prompt: only the shared tokens are
    // reused, and the answer equals a fresh run's.
    let (_, other) = engine
        .chat_prompt(&[ChatMessage::user("What is the capital of Italy?")])
        .unwrap();
    let shared = ids.iter().zip(&other).take_while(|(a, b)| a == b).count();
    assert!(shared > 10 && shared < ids.len() - 1);
    let mut req2 = GenerateRequest::new(other, 16, SamplingParams::greedy());
    req2.stop = req.stop.clone();
    let reused = engine
        .generate_with_cache(&req2, &mut cache, &mut |_| true)
        .unwrap();
    assert_eq!(reused.reused_tokens, shared);
    let fresh = engine.generate(&req2, &mut |_| true).unwrap();
    assert_eq!(reused.ids, fresh.ids);
}
