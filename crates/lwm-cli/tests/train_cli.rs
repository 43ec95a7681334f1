//! `lwm train` end to end: a tiny byte-level model trains from a TOML config, its checkpoint
//! runs in the inference commands as is (config.json + safetensors + tokenizer.json), and bad
//! configs end in one clear error.

use std::path::PathBuf;

mod common;
use common::lwm;

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lwm-train-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const CONFIG: &str = r#"
[model]
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 1
num_attention_heads = 2
[data]
files = ["data.jsonl"]
fields = "[prompt],answer"
on_error = "skip"
[optim]
lr = 1e-3
[train]
seq_len = 64
steps = 2
out_dir = "out"
"#;

#[test]
fn train_then_run_the_checkpoint_with_lwm() {
    let d = temp_dir("ok");
    let lines = [
        r#"{"prompt": "the key is 42. key?", "answer": " 42"}"#,
        "{broken",
        r#"{"prompt": "the key is 7. key?", "answer": " 7"}"#,
    ];
    std::fs::write(d.join("data.jsonl"), lines.join("\n")).unwrap();
    std::fs::write(d.join("train.toml"), CONFIG).unwrap();
    let cfg = d.join("train.toml");
    let out = lwm(&["train", "--config", cfg.to_str().unwrap(), "--quiet"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("done: 2 updates"), "{stderr}");
    assert!(
        stderr.contains("data.jsonl:2"),
        "the skipped line is reported: {stderr}"
    );
    let ckpt = d.join("out/checkpoints/stage0-step00000002");
    assert!(ckpt.join("model.safetensors").is_file());
    // The checkpoint's tokenizer is the byte tokenizer training used: ids = byte + 3.
    let tok = lwm(&[
        "tokenize",
        "-m",
        ckpt.to_str().unwrap(),
        "-p",
        "ab",
        "--no-bos",
    ]);
    assert!(
        tok.status.success(),
        "{}",
        String::from_utf8_lossy(&tok.stderr)
    );
    assert!(
        String::from_utf8_lossy(&tok.stdout).contains("100"),
        "{}",
        String::from_utf8_lossy(&tok.stdout)
    );
    assert!(String::from_utf8_lossy(&tok.stdout).contains("101"));
    let logits = lwm(&["logits", "-m", ckpt.to_str().unwrap(), "-p", "the key is"]);
    assert!(
        logits.status.success(),
        "{}",
        String::from_utf8_lossy(&logits.stderr)
    );
    // Resume continues past the end: one more update with --steps 3.
    let more = lwm(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--quiet",
        "--resume",
        "--steps",
        "3",
    ]);
    let stderr = String::from_utf8_lossy(&more.stderr);
    assert!(
        more.status.success() && stderr.contains("done: 3 updates"),
        "{stderr}"
    );
}

#[test]
fn bad_config_and_missing_data_are_clear_errors() {
    let d = temp_dir("bad");
    std::fs::write(
        d.join("train.toml"),
        CONFIG.replace("hidden_size", "hiden_size"),
    )
    .unwrap();
    let out = lwm(&["train", "--config", d.join("train.toml").to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("hiden_size") && !stderr.contains("panicked"),
        "{stderr}"
    );

    std::fs::write(d.join("train.toml"), CONFIG).unwrap();
    let out = lwm(&["train", "--config", d.join("train.toml").to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("data.jsonl does not exist"), "{stderr}");

    let out = lwm(&[
        "train",
        "--config",
        d.join("train.toml").to_str().unwrap(),
        "--resume",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no checkpoint"));
}
