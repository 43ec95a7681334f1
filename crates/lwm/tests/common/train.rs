//! The tiny training setups the training tests share: a scratch model config and its
//! synthetic retrieval records, a tiny LLaMA for gradient checks, a fresh work directory.

use lwm::train::config::TrainConfig;
use std::path::{Path, PathBuf};

/// A fresh, empty directory under the temp dir, unique to this process.
pub fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lwm-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Synthetic retrieval records: a number hidden in filler, asked for at the end.
pub fn write_data(dir: &Path, n: usize) -> PathBuf {
    let mut rng = lwm::rng::XorShift::new(17);
    let mut text = String::new();
    for _ in 0..n {
        let key = rng.next_u64() % 10_000;
        let filler = "grass. ".repeat(1 + (rng.next_u64() % 3) as usize);
        text.push_str(&serde_json::json!({"prompt": format!("{filler}the key is {key}. {filler}what is the key?"), "answer": format!(" {key}")}).to_string());
        text.push('\n');
    }
    let p = dir.join("train.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

/// The tiny config (2 layers, hidden 32, GQA 4/2, 6 steps of 2×2 rows of 96) with `extra`
/// lines appended to its `[train]` table.
pub fn config(dir: &Path, extra: &str) -> TrainConfig {
    let data = write_data(dir, 40);
    let text = format!(
        r#"
[model]
init = "scratch"
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
seed = 3
[data]
files = ["{}"]
fields = "[prompt],answer"
[optim]
lr = 3e-3
warmup_steps = 2
decay_steps = 20
[train]
seq_len = 96
batch_size = 2
grad_accum = 2
steps = 6
query_chunk = 32
key_chunk = 16
out_dir = "{}"
{extra}
"#,
        data.display(),
        dir.join("out").display()
    );
    TrainConfig::from_toml(&text, "test.toml").unwrap()
}

/// A tiny LLaMA (2 layers, hidden 32, GQA 4/2, head 8, vocabulary 50) for gradient checks.
pub fn tiny_llama() -> lwm::config::ModelConfig {
    lwm::config::ModelConfig {
        architecture: "llama".into(),
        vocab_size: 50,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-6,
        theta: 10_000.0,
        rope_layout: lwm::config::RopeLayout::RotateHalf,
        rope_scaling: lwm::config::RopeScaling::None,
        max_sequence_length: 64,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        vision_vocab_size: 0,
    }
}
