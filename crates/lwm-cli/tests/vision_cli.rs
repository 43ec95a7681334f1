//! `lwm vision-chat` / `vision-generate` bad input: one clear error, nothing written.

use std::path::PathBuf;
use std::process::Command;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../lwm/tests/fixtures/lwm-jax")
        .join(rel)
}

fn lwm(args: &[&str]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_lwm"))
        .args(args)
        .env("LWM_FFMPEG", "/nonexistent/ffmpeg")
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn vision_bad_inputs_fail_clearly() {
    let d = std::env::temp_dir().join(format!("lwm-vision-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("empty")).unwrap();
    std::fs::write(d.join("bad.png"), b"not an image").unwrap();
    std::fs::write(d.join("clip.mp4"), b"\x00\x00\x00\x18ftypmp42").unwrap();
    let model = format!(
        "params::{}",
        fixture("vision/vl_params_scanned_bf16.msgpack").display()
    );
    let q = ["--question", "what?", "--model", &model];
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let cases = [
        ("--image", p("bad.png"), "not a PNG or JPEG"),
        ("--video", p("empty"), "zero frames"),
        ("--video", p("clip.mp4"), "needs ffmpeg"),
        ("--image", p("missing.png"), "cannot read image"),
    ];
    for (flag, val, want) in cases {
        let mut args = vec!["vision-chat", flag, val.as_str()];
        args.extend_from_slice(&q);
        let (ok, err) = lwm(&args);
        assert!(!ok && err.contains(want), "{flag} {val:?}: {err}");
        assert_eq!(err.matches("error:").count(), 1, "{err}");
    }
    let out = d.join("x.webp");
    let (ok, err) = lwm(&[
        "vision-generate",
        "--model",
        &model,
        "--prompt",
        "a cat",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains(".png, .gif or .mp4"), "{err}");
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&d);
}
