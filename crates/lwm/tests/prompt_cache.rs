//! Prompt-cache files on the default model: ten questions about one document cost one
//! prefill (counted in prefilled tokens), answers equal the uncached ones, and damaged or
//! mismatched files are refused with a reason and never used.

mod common;
use common::*;
use lwm::chat_template::ChatMessage;
use lwm::generate::{Engine, GenerateRequest};
use lwm::sampling::SamplingParams;

fn document() -> String {
    let places = [
        "harbor wall",
        "clock tower",
        "salt marsh",
        "copper mine",
        "mill school",
    ];
    let acts = ["rebuilt", "measured", "mapped", "restored", "recorded"];
    (0..40)
        .map(|i| {
            format!(
                "In year {}, the council {} the {}.",
                1700 + i,
                acts[i * 7 % 5],
                places[i * 3 % 5]
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn request(engine: &Engine, question: &str) -> GenerateRequest {
    let messages = vec![ChatMessage::user(format!("{}\n\n{question}", document()))];
    let (_, ids) = engine.chat_prompt(&messages).unwrap();
    GenerateRequest::new(ids, 4, SamplingParams::greedy())
}

#[test]
fn ten_questions_about_one_document_cost_one_prefill() {
    let Some(path) = default_model() else { return };
    let engine = Engine::load(path.to_str().unwrap(), &Default::default()).unwrap();
    let dir = std::env::temp_dir().join(format!("lwm-prompt-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("doc.kvc");
    let mut prefilled = Vec::new();
    let mut answers = Vec::new();
    for i in 0..10 {
        let req = request(
            &engine,
            &format!("What did the council do in year {}?", 1703 + 3 * i),
        );
        // A fresh process each time: the only state carried over is the file.
        let (mut cache, why) = engine.open_prompt_cache(&file);
        assert_eq!(why, None, "question {i}: cache file refused");
        let out = engine
            .generate_with_cache(&req, &mut cache, &mut |_| true)
            .unwrap();
        engine
            .save_prompt_cache(&file, &cache, out.prompt_tokens)
            .unwrap();
        prefilled.push(out.prompt_tokens - out.reused_tokens);
        answers.push((req, out.text));
    }
    let doc_tokens = engine.tokenize(&document()).unwrap().len();
    assert!(doc_tokens > 400, "{doc_tokens}");
    assert!(prefilled[0] > doc_tokens, "{prefilled:?}");
    for (i, &p) in prefilled.iter().enumerate().skip(1) {
        // Only the question and the template's tail: ~20 tokens.
        assert!(p < 30, "question {i} prefilled {p} tokens: {prefilled:?}");
    }
    let total: usize = prefilled.iter().sum();
    assert!(
        total < prefilled[0] + 10 * 30,
        "ten questions prefilled {total} tokens: {prefilled:?}"
    );
    // Cached answers equal answers computed from scratch.
    for (req, text) in [&answers[1], &answers[9]] {
        let fresh = engine.generate(req, &mut |_| true).unwrap();
        assert_eq!(&fresh.text, text);
    }

    // Damaged or mismatched files: refused with a reason, an empty cache instead.
    let good = std::fs::read(&file).unwrap();
    let refused = |engine: &Engine, needle: &str| {
        let (cache, why) = engine.open_prompt_cache(&file);
        let why = why.expect("file must be refused");
        assert!(why.contains(needle), "{why}");
        assert!(cache.is_empty());
    };
    let mut flipped = good.clone();
    flipped[good.len() / 3] ^= 1;
    std::fs::write(&file, &flipped).unwrap();
    refused(&engine, "checksum");
    std::fs::write(&file, &good[..good.len() / 2]).unwrap();
    refused(&engine, "checksum");
    std::fs::write(&file, b"not a cache").unwrap();
    refused(&engine, "magic");
    std::fs::write(&file, &good).unwrap();
    let mut other = Engine::load(path.to_str().unwrap(), &Default::default()).unwrap();
    other
        .model
        .set_kv_types(lwm::kv::KvTypes::parse("q8_0").unwrap())
        .unwrap();
    refused(&other, "this run uses q8_0");
    let mut other = Engine::load(path.to_str().unwrap(), &Default::default()).unwrap();
    other.model.config.theta *= 2.0;
    refused(&other, "different model");
    // The file itself is still good for the engine that made it.
    assert_eq!(engine.open_prompt_cache(&file).1, None);
    std::fs::remove_dir_all(&dir).unwrap();
}
