#![no_main]
//! The JAX msgpack param stream: `[n: u16 LE][config.json: n bytes, none if 0][params:
//! the rest]`. Record scan, the config (the file next to the params, else derived from the
//! shapes), and the streaming loader against that config.
use libfuzzer_sys::fuzz_target;
use lwm_core::weights::jax::{load_config, scan_records, JaxWeights};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (config, params) = data[2..].split_at(n);
    let dir = common::fresh_dir();
    if n > 0 {
        std::fs::write(dir.join("config.json"), config).unwrap();
    }
    let path = dir.join("params");
    std::fs::write(&path, params).unwrap();
    if scan_records(&path).is_err() {
        return;
    }
    if let Ok(config) = load_config(&path) {
        let _ = JaxWeights::open(&path, &config);
    }
});
