#![no_main]
//! Tokenizer loading from bytes: the first byte picks the file name (`tokenizer.json`,
//! `tokenizer.model`, `vocab.gguf`: `Tokenizer::from_file` chooses by name and content),
//! the rest is the file; then a short encode / decode when it loads. The SentencePiece
//! model proto is also parsed directly.
use libfuzzer_sys::fuzz_target;
use lwm_core::tokenizer::{SentencePieceModel, Tokenizer};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let name = match sel % 3 {
        0 => "tokenizer.json",
        1 => "tokenizer.model",
        _ => "vocab.gguf",
    };
    if sel % 3 == 1 {
        if let Ok(m) = SentencePieceModel::parse(rest) {
            let _ = Tokenizer::from_sentencepiece(&m);
        }
    }
    let dir = common::fresh_dir();
    let path = dir.join(name);
    std::fs::write(&path, rest).unwrap();
    if let Ok(t) = Tokenizer::from_file(&path) {
        let _ = t.vocab_size();
        if let Ok(ids) = t.encode("Hello world, <s> 12345 ü\n", true, true) {
            let _ = t.decode(&ids, false);
            let _ = t.decode(&ids, true);
        }
        let _ = t.decode(&[0, 1, 2, 3, 1000, u32::MAX], false);
    }
});
