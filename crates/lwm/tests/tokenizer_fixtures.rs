//! llama.cpp tokenizer test vectors (test-tokenizer-0: add_special = false,
//! parse_special = false) and the default model's tokenizer.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use lwm::tokenizer::{GgufVocab, StreamDecoder, Tokenizer};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn load_gguf_tokenizer(path: &Path) -> Tokenizer {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let content = gguf_file::Content::read(&mut f).unwrap();
    let vocab = GgufVocab::from_gguf(&content).unwrap();
    Tokenizer::from_gguf_vocab(vocab).unwrap()
}

/// Cases of a `.inp` file: each case is followed by "\n__ggml_vocab_test__\n".
fn read_cases(name: &str) -> Vec<(String, Vec<u32>)> {
    let dir = fixture_dir();
    let inp = std::fs::read_to_string(dir.join(format!("{name}.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("{name}.out"))).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    assert!(
        inp.ends_with(sep),
        "{name}.inp does not end with a separator"
    );
    let texts: Vec<&str> = inp[..inp.len() - sep.len()].split(sep).collect();
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(
        texts.len(),
        ids.len(),
        "{name}: .inp and .out disagree on the case count"
    );
    texts.into_iter().map(String::from).zip(ids).collect()
}

/// Assert every case and report all mismatches at once; returns the number of cases.
fn check_vocab(name: &str) -> (Tokenizer, Vec<(String, Vec<u32>)>) {
    let tok = load_gguf_tokenizer(&fixture_dir().join(name));
    let cases = read_cases(name);
    let mut failures = Vec::new();
    for (text, expected) in &cases {
        let got = tok.encode(text, false, false).unwrap();
        if &got != expected {
            failures.push(format!(
                "  text {text:?}\n    expected {expected:?}\n    got      {got:?}"
            ));
        }
    }
    println!(
        "{name}: {}/{} cases match llama.cpp",
        cases.len() - failures.len(),
        cases.len()
    );
    assert!(
        failures.is_empty(),
        "{name}: {} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    (tok, cases)
}

#[test]
fn llama_spm_vocab_matches_llama_cpp() {
    let (tok, cases) = check_vocab("ggml-vocab-llama-spm.gguf");
    assert_eq!(tok.kind(), "spm");
    assert_eq!(cases.len(), 46);
    assert_eq!(
        tok.encode("Hello world", false, false).unwrap(),
        vec![15043, 3186]
    );
    assert_eq!(
        tok.encode("Hello world", true, false).unwrap(),
        vec![1, 15043, 3186]
    );
    assert!(tok.add_bos_by_default());
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    assert!(tok.is_end_of_generation(2) && !tok.is_end_of_generation(15043));

    // Round trip: decode drops the space prefix that encode added.
    let mut failures = Vec::new();
    for (text, _) in &cases {
        let ids = tok.encode(text, false, false).unwrap();
        let back = tok.decode(&ids, false);
        if &back != text {
            failures.push(format!("  {text:?} -> {back:?}"));
        }
        let with_bos = tok.encode(text, true, false).unwrap();
        assert_eq!(&tok.decode(&with_bos, true), text);
    }
    assert!(
        failures.is_empty(),
        "round trip failures:\n{}",
        failures.join("\n")
    );
}

#[test]
fn gpt2_vocab_matches_llama_cpp() {
    let (tok, cases) = check_vocab("ggml-vocab-gpt-2.gguf");
    assert_eq!(tok.kind(), "bpe");
    assert_eq!(cases.len(), 46);
    assert!(!tok.add_bos_by_default());
    let mut failures = Vec::new();
    for (text, ids) in &cases {
        let back = tok.decode(ids, false);
        if &back != text {
            failures.push(format!("  {text:?} -> {back:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "round trip failures:\n{}",
        failures.join("\n")
    );

    // <|endoftext|> is a control token: text unless parse_special.
    let eot = tok.token_to_id("<|endoftext|>").unwrap();
    assert_eq!(eot, 50256);
    assert_eq!(
        tok.encode("a<|endoftext|>", false, true).unwrap(),
        vec![64, eot]
    );
    assert_ne!(
        tok.encode("a<|endoftext|>", false, false).unwrap(),
        vec![64, eot]
    );
    assert!(tok.is_end_of_generation(eot));
    assert_eq!(tok.decode(&[64, eot], true), "a");
    assert_eq!(tok.decode(&[64, eot], false), "a<|endoftext|>");
}

#[test]
fn stream_decoder_reassembles_split_characters() {
    let tok = load_gguf_tokenizer(&fixture_dir().join("ggml-vocab-gpt-2.gguf"));
    for text in ["Hello 🦙 wörld! 你好", "ភ្ជាប់ ✅ 🚀 (normal)"] {
        let ids = tok.encode(text, false, false).unwrap();
        let mut dec = StreamDecoder::new(&tok);
        let mut out = String::new();
        for &id in &ids {
            let piece = dec.push(id);
            assert!(
                !piece.contains('\u{fffd}'),
                "partial character leaked: {piece:?}"
            );
            out.push_str(&piece);
        }
        out.push_str(&dec.flush());
        assert_eq!(out, text);
    }
    // An incomplete character is held back, then flushed lossily.
    let mut dec = StreamDecoder::new(tok.clone());
    let e_acute_first_byte = tok.token_to_id("\u{00c3}").unwrap(); // byte 0xC3
    assert_eq!(dec.push(e_acute_first_byte), "");
    assert_eq!(dec.flush(), "\u{fffd}");
}

fn default_model_path() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("LWM_DEFAULT_MODEL") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var("LWM_HOME")
        .map(PathBuf::from)
        .ok()
        .or_else(|| {
            std::env::var("HOME")
                .ok()
                .map(|h| PathBuf::from(h).join(".cache/lwm"))
        })?;
    Some(home.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

#[test]
fn smollm2_default_model() {
    let Some(path) = default_model_path().filter(|p| p.is_file()) else {
        eprintln!("note: default model not found (set LWM_DEFAULT_MODEL or LWM_HOME); skipping");
        return;
    };
    let tok = load_gguf_tokenizer(&path);
    assert_eq!(tok.kind(), "bpe");
    assert!(!tok.add_bos_by_default());
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    assert_eq!(tok.id_to_piece(1).as_deref(), Some("<|im_start|>"));
    assert!(tok.is_end_of_generation(2));
    assert!(tok.is_end_of_generation(0)); // <|endoftext|>
    assert!(!tok.is_end_of_generation(1));
    assert!(tok.is_special(1));

    assert_eq!(
        tok.encode("The capital of France is", false, false)
            .unwrap(),
        vec![504, 3575, 282, 4649, 314]
    );
    let chat = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let expected = vec![
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
        407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1,
        520, 9531, 198,
    ];
    let ids = tok.encode(chat, false, true).unwrap();
    assert_eq!(ids, expected);
    assert_eq!(tok.decode(&ids, false), chat);

    // Also loadable straight from the file.
    let tok2 = Tokenizer::from_file(&path).unwrap();
    assert_eq!(tok2.encode(chat, false, true).unwrap(), expected);
}
