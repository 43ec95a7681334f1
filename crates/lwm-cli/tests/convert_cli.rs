//! `lwm convert` from the command line: JAX -> HF -> JAX gives back the original file.

use std::path::PathBuf;
use std::process::Command;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../lwm/tests/fixtures/lwm-jax")
        .join(rel)
}

fn lwm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lwm"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn convert_round_trip_and_bad_input() {
    let d = std::env::temp_dir().join(format!("lwm-cli-convert-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("jax")).unwrap();
    let src = fixture("text/params_unscanned_f32.msgpack");
    std::fs::copy(&src, d.join("jax/params")).unwrap();
    std::fs::write(
        d.join("jax/config.json"),
        r#"{"model_type":"llama","vocab_size":512,"hidden_size":64,"intermediate_size":160,
            "num_hidden_layers":2,"num_attention_heads":4,"max_position_embeddings":256}"#,
    )
    .unwrap();
    let (jax, hf, back) = (d.join("jax"), d.join("hf"), d.join("back"));
    let o = lwm(&[
        "convert",
        jax.to_str().unwrap(),
        "--out",
        hf.to_str().unwrap(),
        "--preset",
        "lwm-text-chat-1m",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["rope_theta"], 5e7);
    let o = lwm(&[
        "convert",
        hf.to_str().unwrap(),
        "--out",
        back.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&src).unwrap());
    // A truncated params file: one clear error, nothing written.
    let bytes = std::fs::read(&src).unwrap();
    std::fs::write(d.join("jax/params"), &bytes[..bytes.len() / 3]).unwrap();
    let out2 = d.join("hf2");
    let o = lwm(&[
        "convert",
        jax.to_str().unwrap(),
        "--out",
        out2.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("truncated"), "{err}");
    assert!(!out2.exists());
    let _ = std::fs::remove_dir_all(&d);
}
