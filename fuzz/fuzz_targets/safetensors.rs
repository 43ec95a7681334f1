#![no_main]
//! A Hugging Face model directory from arbitrary bytes: `[n: u16 LE][config.json: n bytes]
//! [model.safetensors: the rest]`. Reads the config, opens the weights (safetensors
//! header) and loads the tensors.
use libfuzzer_sys::fuzz_target;
use lwm_core::weights::hf::{load_hf_config, HfWeights};
use lwm_core::weights::WeightSource;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (config, st) = data[2..].split_at(n);
    let dir = common::fresh_dir();
    std::fs::write(dir.join("config.json"), config).unwrap();
    std::fs::write(dir.join("model.safetensors"), st).unwrap();
    let _ = load_hf_config(&dir);
    if let Ok(w) = HfWeights::open(&dir) {
        for name in w.names().iter().take(4) {
            let _ = w.shape(name);
            let _ = w.stored_dtype(name);
            let _ = w.load(name);
        }
    }
});
