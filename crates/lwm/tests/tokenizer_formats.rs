//! Tokenizer file formats: SentencePiece `tokenizer.model` (hand-built and a real one
//! checked against Python sentencepiece) and Hugging Face `tokenizer.json`.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use lwm::tokenizer::{
    GgufVocab, SentencePieceModel, SpModelType, SpPiece, StreamDecoder, Tokenizer,
};
use serde_json::{json, Value};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lwm-tokenizer-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn read_cases(name: &str) -> Vec<(String, Vec<u32>)> {
    let dir = fixture_dir();
    let inp = std::fs::read_to_string(dir.join(format!("{name}.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("{name}.out"))).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    let texts = inp[..inp.len() - sep.len()].split(sep);
    let ids = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect());
    texts.map(String::from).zip(ids).collect()
}

// ---------------------------------------------------------------------------------------
// tokenizer.model
// ---------------------------------------------------------------------------------------

fn piece(p: &str, score: f32, kind: i32) -> SpPiece {
    SpPiece {
        piece: p.to_string(),
        score,
        kind,
    }
}

/// A tiny LLaMA-like model: <unk> <s> </s>, 256 byte pieces, then a few normal pieces.
fn tiny_model() -> SentencePieceModel {
    let mut pieces = vec![
        piece("<unk>", 0.0, 2),
        piece("<s>", 0.0, 3),
        piece("</s>", 0.0, 3),
    ];
    for b in 0..=255u8 {
        pieces.push(piece(&format!("<0x{b:02X}>"), 0.0, 6));
    }
    for (i, p) in [
        "▁", "h", "i", "▁h", "▁hi", "e", "▁he", "l", "ll", "o", "llo", "<x>",
    ]
    .iter()
    .enumerate()
    {
        let kind = if *p == "<x>" { 4 } else { 1 };
        pieces.push(piece(p, -(i as f32), kind));
    }
    SentencePieceModel {
        pieces,
        model_type: SpModelType::Bpe,
        byte_fallback: true,
        unk_id: 0,
        bos_id: 1,
        eos_id: 2,
        pad_id: -1,
        normalizer_name: Some("identity".into()),
        add_dummy_prefix: true,
        remove_extra_whitespaces: false,
        escape_whitespaces: true,
    }
}

#[test]
fn handmade_tokenizer_model() {
    let dir = scratch("handmade-model");
    let path = dir.join("tokenizer.model");
    std::fs::write(&path, tiny_model().to_bytes()).unwrap();
    let tok = Tokenizer::from_file(&path).unwrap();
    assert_eq!(tok.kind(), "spm");
    assert_eq!(tok.vocab_size(), 3 + 256 + 12);
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    assert!(tok.add_bos_by_default());

    let id = |p: &str| tok.token_to_id(p).unwrap();
    assert_eq!(tok.encode("hi", false, false).unwrap(), vec![id("▁hi")]);
    assert_eq!(tok.encode("hi", true, false).unwrap(), vec![1, id("▁hi")]);
    // "▁hello": ▁h (-3) merges first, then ▁he (-6), ll (-8), llo (-10).
    assert_eq!(
        tok.encode("hello", false, false).unwrap(),
        vec![id("▁he"), id("llo")]
    );
    // Byte fallback for characters outside the vocabulary.
    assert_eq!(
        tok.encode("hi\n", false, false).unwrap(),
        vec![id("▁hi"), id("<0x0A>")]
    );
    // User-defined pieces are always split out; the space prefix only goes at the start.
    assert_eq!(
        tok.encode("hi<x>hi", false, false).unwrap(),
        vec![id("▁hi"), id("<x>"), id("h"), id("i")]
    );
    let ids = tok.encode("hi hello\n", true, false).unwrap();
    assert_eq!(tok.decode(&ids, true), "hi hello\n");
    assert_eq!(tok.token_bytes(id("▁hi")), b" hi");
    assert_eq!(tok.token_bytes(id("<0x0A>")), b"\n");
    assert_eq!(tok.id_to_piece(id("▁he")).as_deref(), Some("▁he"));

    // Unsupported model types and corrupt files are errors, not panics.
    let mut unigram = tiny_model();
    unigram.model_type = SpModelType::Unigram;
    let e = Tokenizer::from_sentencepiece(&unigram)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Unigram"), "{e}");
    let bytes = tiny_model().to_bytes();
    let bad = dir.join("broken.model");
    std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap();
    let e = format!("{:#}", Tokenizer::from_file(&bad).unwrap_err());
    assert!(e.contains("sentencepiece"), "{e}");
    std::fs::write(&bad, b"\x08\x96\x01garbage-that-is-not-protobuf").unwrap();
    assert!(Tokenizer::from_file(&bad).is_err());
    assert!(Tokenizer::from_file(&dir.join("missing.model")).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sentencepiece_model_matches_python_sentencepiece() {
    let dir = fixture_dir();
    let tok = Tokenizer::from_file(&dir.join("spm-tiny.model")).unwrap();
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("spm-tiny.json")).unwrap()).unwrap();
    assert_eq!(tok.kind(), "spm");
    assert_eq!(
        tok.vocab_size() as u64,
        expected["vocab_size"].as_u64().unwrap()
    );
    assert_eq!(tok.bos_id().map(u64::from), expected["bos_id"].as_u64());
    assert_eq!(tok.eos_id().map(u64::from), expected["eos_id"].as_u64());

    let cases = expected["cases"].as_array().unwrap();
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text, false, false).unwrap();
        if got != want {
            failures.push(format!(
                "  text {text:?}\n    sentencepiece {want:?}\n    ours          {got:?}"
            ));
        }
    }
    println!(
        "spm-tiny.model: {}/{} cases match Python sentencepiece",
        cases.len() - failures.len(),
        cases.len()
    );
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// tokenizer.json
// ---------------------------------------------------------------------------------------

/// Save a GPT-2 `tokenizer.json` built with the `tokenizers` crate from the GGUF vocab.
fn gpt2_tokenizer_json(path: &Path) {
    let mut f = std::fs::File::open(fixture_dir().join("ggml-vocab-gpt-2.gguf")).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let v = GgufVocab::from_gguf(&content).unwrap();
    let vocab: tokenizers::models::bpe::Vocab = v
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges: Vec<(String, String)> = v
        .merges
        .unwrap()
        .iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').unwrap();
            (a.to_string(), b.to_string())
        })
        .collect();
    let bpe = tokenizers::models::bpe::BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .unwrap();
    let mut t = tokenizers::Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(
        tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, true, true),
    ));
    t.with_decoder(Some(
        tokenizers::pre_tokenizers::byte_level::ByteLevel::default(),
    ));
    t.add_special_tokens([tokenizers::AddedToken::from("<|endoftext|>", true)])
        .unwrap();
    t.save(path, false).unwrap();
}

#[test]
fn gpt2_tokenizer_json_matches_llama_cpp_vectors() {
    let dir = scratch("gpt2-json");
    let path = dir.join("tokenizer.json");
    gpt2_tokenizer_json(&path);
    let tok = Tokenizer::from_file(&path).unwrap();
    assert_eq!(tok.kind(), "tokenizer.json");
    assert_eq!(tok.vocab_size(), 50257);

    let cases = read_cases("ggml-vocab-gpt-2.gguf");
    let mut failures = Vec::new();
    for (text, want) in &cases {
        let got = tok.encode(text, false, false).unwrap();
        if &got != want {
            failures.push(format!("  {text:?}\n    want {want:?}\n    got  {got:?}"));
        }
        assert_eq!(&tok.decode(want, false), text);
    }
    println!(
        "gpt-2 tokenizer.json: {}/{} llama.cpp cases match",
        cases.len() - failures.len(),
        cases.len()
    );
    assert!(failures.is_empty(), "mismatches:\n{}", failures.join("\n"));

    let eot = tok.token_to_id("<|endoftext|>").unwrap();
    assert_eq!(eot, 50256);
    assert!(tok.is_special(eot));
    assert!(tok.is_end_of_generation(eot));
    assert_eq!(
        tok.encode("a<|endoftext|>", false, true).unwrap(),
        vec![64, eot]
    );
    assert_ne!(
        tok.encode("a<|endoftext|>", false, false).unwrap(),
        vec![64, eot]
    );
    assert_eq!(tok.decode(&[64, eot], true), "a");
    assert_eq!(
        tok.token_bytes(tok.token_to_id("Ġhello").unwrap()),
        b" hello"
    );

    // Streaming gives the same text back.
    let text = "Streaming 🦙 works, ünïcödé too.";
    let mut dec = StreamDecoder::new(&tok);
    let mut out = String::new();
    for id in tok.encode(text, false, false).unwrap() {
        out.push_str(&dec.push(id));
    }
    out.push_str(&dec.flush());
    assert_eq!(out, text);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A llama-style tokenizer.json: Metaspace-like normalizer, BPE with byte fallback and a
/// BOS-adding template.
fn llama_style_json() -> Value {
    let mut vocab = serde_json::Map::new();
    let mut next = 0u32;
    let mut add = |vocab: &mut serde_json::Map<String, Value>, t: &str| {
        vocab.insert(t.to_string(), json!(next));
        next += 1;
    };
    for t in ["<unk>", "<s>", "</s>"] {
        add(&mut vocab, t);
    }
    for b in 0..=255u8 {
        add(&mut vocab, &format!("<0x{b:02X}>"));
    }
    for t in ["▁", "h", "i", "▁h", "▁hi"] {
        add(&mut vocab, t);
    }
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
        ]},
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab,
            "merges": ["▁ h", "▁h i"]
        }
    })
}

#[test]
fn llama_style_tokenizer_json() {
    let dir = scratch("llama-json");
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, serde_json::to_vec(&llama_style_json()).unwrap()).unwrap();
    let tok = Tokenizer::from_file(&path).unwrap();
    let id = |p: &str| tok.token_to_id(p).unwrap();
    assert_eq!(tok.kind(), "tokenizer.json");
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    assert!(
        tok.add_bos_by_default(),
        "BOS template in the post-processor"
    );
    assert_eq!(tok.encode("hi", false, false).unwrap(), vec![id("▁hi")]);
    assert_eq!(tok.encode("hi", true, false).unwrap(), vec![1, id("▁hi")]);
    assert_eq!(
        tok.encode("hi\n", false, false).unwrap(),
        vec![id("▁hi"), id("<0x0A>")]
    );
    assert_eq!(
        tok.encode("hi</s>", false, true).unwrap(),
        vec![id("▁hi"), 2]
    );
    assert!(!tok.encode("hi</s>", false, false).unwrap().contains(&2));
    assert_eq!(tok.decode(&[1, id("▁hi"), id("<0x0A>"), 2], true), "hi\n");
    assert_eq!(tok.decode(&[id("▁hi"), 9999], true), "hi");
    assert_eq!(tok.token_bytes(id("▁hi")), b" hi");
    assert_eq!(tok.token_bytes(id("<0x0A>")), b"\n");
    assert_eq!(tok.token_bytes(1), b"<s>");
    assert!(tok.is_end_of_generation(2) && !tok.is_end_of_generation(1));
    assert!(tok.is_special(1) && !tok.is_special(id("▁hi")));

    // tokenizer_config.json next to it wins over the template.
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"add_bos_token": false, "bos_token": "<s>", "eos_token": {"content": "</s>"}}"#,
    )
    .unwrap();
    let tok = Tokenizer::from_file(&path).unwrap();
    assert!(!tok.add_bos_by_default());
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));

    // Broken JSON is an error.
    std::fs::write(&path, b"{\"model\": ").unwrap();
    assert!(Tokenizer::from_file(&path).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
