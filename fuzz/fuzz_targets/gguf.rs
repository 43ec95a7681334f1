#![no_main]
//! The GGUF reader on arbitrary bytes: metadata and tensor table (candle's reader under
//! `read_content`), the `GgufFile::open` checks, the model config, `lwm info`'s listings,
//! a tensor load, and the tokenizer built from the metadata.
use libfuzzer_sys::fuzz_target;
use lwm_core::tokenizer::{GgufVocab, Tokenizer};
use lwm_core::weights::gguf::{metadata_json, read_content, tensor_table, GgufFile};
use lwm_core::weights::WeightSource;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let path = common::scratch().join("model.gguf");
    std::fs::write(&path, data).unwrap();
    if let Ok((content, _, _)) = read_content(&path) {
        let _ = metadata_json(&content, 4);
        let _ = tensor_table(&content);
        if let Ok(v) = GgufVocab::from_gguf(&content) {
            if let Ok(t) = Tokenizer::from_gguf_vocab(v) {
                if let Ok(ids) = t.encode("Hello world, <s> 12345 ü\n", true, true) {
                    let _ = t.decode(&ids, false);
                }
            }
        }
    }
    if let Ok(f) = GgufFile::open(&path) {
        let _ = f.config();
        let _ = f.quantization_summary();
        if let Some(name) = f.names().first() {
            let _ = f.load(name);
        }
    }
});
