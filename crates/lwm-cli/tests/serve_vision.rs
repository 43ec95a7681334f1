//! Images through the OpenAI API (`image_url` content parts) on the tiny LWM vision-language
//! fixture (the original's random-init `FlaxVideoLLaMAForCausalLM`, params as the released
//! layout: `params`, `config.json`, the tokenizer and `vqgan` in one directory): the API's
//! greedy answer equals `lwm vision-chat`'s for the same image and question, from a data:
//! URL and from an allowed local file; bad images are 400s naming the part, and the server
//! keeps serving.

mod common;
use base64::Engine as _;
use common::{http, lwm, post, start_server};
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../lwm/tests/fixtures")
        .join(rel)
}

/// A byte-fallback BPE `tokenizer.json` of 259 tokens (`<unk>`, `<s>`, `</s>`, the 256
/// bytes): every text becomes ids below the fixture model's 512-token vocabulary.
fn byte_tokenizer() -> String {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
    }
    for b in 0..=255u32 {
        vocab.insert(format!("<0x{b:02X}>"), (3 + b).into());
    }
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    serde_json::json!({
        "version": "1.0",
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u{2581}"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
            "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": []}
    })
    .to_string()
}

/// The fixture model laid out as a released LWM vision checkpoint, plus a media directory;
/// `ctx` positions (its RoPE has no other use for the length).
fn model_dir(tag: &str, ctx: usize) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lwm-serve-vision-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("media")).unwrap();
    std::fs::copy(
        fixture("lwm-jax/vision/vl_params_scanned_bf16.msgpack"),
        d.join("params"),
    )
    .unwrap();
    std::fs::copy(fixture("lwm-jax/vqgan/vqgan_params.pkl"), d.join("vqgan")).unwrap();
    std::fs::copy(
        fixture("lwm-jax/vqgan/vq_input.png"),
        d.join("media/frame.png"),
    )
    .unwrap();
    std::fs::write(d.join("tokenizer.json"), byte_tokenizer()).unwrap();
    // A three-frame "video": a directory of frames, taken in name order.
    std::fs::create_dir_all(d.join("media/video")).unwrap();
    for (i, f) in [
        "vq_input.png",
        "preproc_nonsquare_input.png",
        "vq_input.png",
    ]
    .iter()
    .enumerate()
    {
        std::fs::copy(
            fixture(&format!("lwm-jax/vqgan/{f}")),
            d.join(format!("media/video/frame_{i}.png")),
        )
        .unwrap();
    }
    // vl_model.json's config (the shapes do not show the head count).
    std::fs::write(
        d.join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
            "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 4, "max_position_embeddings": CTX, "rms_norm_eps": 1e-6,
            "rope_theta": 50000000, "bos_token_id": 1, "eos_token_id": 2}"#
            .replace("CTX", &ctx.to_string()),
    )
    .unwrap();
    d
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A PNG whose header says `w × h` pixels, with a few bytes of pixel data that are never
/// decoded (a decoder would need gigabytes for a real one).
fn png_header_only(w: u32, h: u32) -> Vec<u8> {
    let chunk = |png: &mut Vec<u8>, kind: &[u8], data: &[u8]| {
        let body: Vec<u8> = kind.iter().chain(data).copied().collect();
        png.extend((data.len() as u32).to_be_bytes());
        png.extend(&body);
        png.extend(crc32(&body).to_be_bytes());
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &[0x78, 0x9c, 0x03, 0x00]);
    chunk(&mut png, b"IEND", &[]);
    png
}

fn data_url(mime: &str, bytes: &[u8]) -> String {
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// `lwm vision-chat`'s greedy 8-token answer about `--image FILE` or `--video DIR`.
fn vision_chat(model: &str, input: &str, path: &Path, question: &str) -> String {
    let out = lwm(&[
        "vision-chat",
        "--model",
        model,
        "--frame-size",
        "64",
        input,
        path.to_str().unwrap(),
        "--question",
        question,
        "--temperature",
        "0",
        "-n",
        "8",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}

fn ask(url: &str, image_url: &str, question: &str) -> (u16, serde_json::Value) {
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": question},
            {"type": "image_url", "image_url": {"url": image_url}}]}],
        "max_tokens": 8,
        "temperature": 0,
    });
    let (status, reply) = post(url, "/v1/chat/completions", &body.to_string());
    (
        status,
        serde_json::from_str(&reply).unwrap_or_else(|_| panic!("not JSON: {reply}")),
    )
}

#[test]
fn images_through_the_api_answer_as_vision_chat_and_bad_ones_are_400() {
    let d = model_dir("chat", 256);
    let model = format!("params::{}", d.join("params").display());
    let image = d.join("media/frame.png");
    let question = "What is in the image?";

    let want = vision_chat(&model, "--image", &image, question);
    assert!(!want.is_empty(), "vision-chat answered nothing");

    let media = d.join("media");
    let (_server, url) = start_server(
        &model,
        &[
            "--frame-size",
            "64",
            "--allowed-media-path",
            media.to_str().unwrap(),
        ],
    );
    let png = std::fs::read(&image).unwrap();
    let answer = |status: u16, v: &serde_json::Value| {
        assert_eq!(status, 200, "{v}");
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .trim_end()
            .to_string()
    };
    let (status, v) = ask(&url, &data_url("image/png", &png), question);
    assert_eq!(answer(status, &v), want, "data: URL vs lwm vision-chat");
    // The prompt is the CLI's: BOS, the question, <vision>, 16 codes + end of vision,
    // </vision>, " ASSISTANT:".
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 17, "{v}");
    let file_url = format!("file://{}", image.display());
    let (status, v) = ask(&url, &file_url, question);
    assert_eq!(answer(status, &v), want, "file:// URL vs lwm vision-chat");

    // A video: the CLI streams its frames into the cache one by one; the API takes them as
    // images in order. Same prompt, same answer.
    let video = media.join("video");
    let want_video = vision_chat(&model, "--video", &video, "What happens?");
    let parts: Vec<serde_json::Value> = std::iter::once(
        serde_json::json!({"type": "text", "text": "What happens?"}),
    )
    .chain((0..3).map(|i| {
        let f = std::fs::read(video.join(format!("frame_{i}.png"))).unwrap();
        serde_json::json!({"type": "image_url", "image_url": {"url": data_url("image/png", &f)}})
    }))
    .collect();
    let body = serde_json::json!({"messages": [{"role": "user", "content": parts}],
        "max_tokens": 8, "temperature": 0});
    let (status, reply) = post(&url, "/v1/chat/completions", &body.to_string());
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(
        answer(status, &v),
        want_video,
        "3 images vs lwm vision-chat --video"
    );
    // BOS, question, <vision>, 3 × (16 codes + a marker), </vision>, " ASSISTANT:".
    assert!(
        v["usage"]["prompt_tokens"].as_u64().unwrap() > 3 * 17,
        "{v}"
    );

    let outside = std::env::temp_dir().join(format!("lwm-outside-{}.png", std::process::id()));
    std::fs::write(&outside, &png).unwrap();
    let link = media.join("escape.png");
    let _ = std::os::unix::fs::symlink(&outside, &link);
    let bad: [(String, &str); 7] = [
        (
            data_url("text/plain", b"hello"),
            "not an image/png or image/jpeg",
        ),
        (
            data_url("image/png", b"not a png at all"),
            "not a PNG or JPEG",
        ),
        (
            data_url("image/png", &png_header_only(9000, 16)),
            "9000×16 pixels",
        ),
        (
            format!("file://{}", outside.display()),
            "outside the allowed media directory",
        ),
        (
            format!("file://{}", link.display()),
            "outside the allowed media directory",
        ),
        ("https://example.com/cat.png".into(), "not fetched"),
        ("data:image/png;base64,@@@".into(), "base64"),
    ];
    for (image_url, want_msg) in &bad {
        let (status, v) = ask(&url, image_url, question);
        assert_eq!(status, 400, "{image_url:.60}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(want_msg), "{image_url:.60}: {msg}");
        assert_eq!(
            v["error"]["param"], "messages[0].content[1].image_url",
            "{v}"
        );
    }
    // Two user messages with an image: LWM's vision chat is one turn.
    let body = serde_json::json!({"messages": [
        {"role": "user", "content": "hi"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url("image/png", &png)}}]}],
        "max_tokens": 2});
    let (status, reply) = post(&url, "/v1/chat/completions", &body.to_string());
    assert!(
        status == 400 && reply.contains("one user message"),
        "{reply}"
    );
    // Still serving.
    let (status, v) = ask(&url, &data_url("image/png", &png), question);
    assert_eq!(answer(status, &v), want);
    assert_eq!(http(&url, "GET", "/health", None).0, 200);
    let _ = std::fs::remove_file(&outside);
    let _ = std::fs::remove_dir_all(&d);
}

/// A text-only model refuses images with a 400 naming the part.
#[test]
fn a_text_model_refuses_images() {
    let Some(model) = common::default_model() else {
        return;
    };
    let (_server, url) = start_server(&model, &[]);
    let png = std::fs::read(fixture("lwm-jax/vqgan/vq_input.png")).unwrap();
    let (status, v) = ask(&url, &data_url("image/png", &png), "What is this?");
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not take images"),
        "{v}"
    );
    let (status, reply) = post(&url, "/v1/images/generations", r#"{"prompt": "a cat"}"#);
    assert!(
        status == 400 && reply.contains("does not generate images"),
        "{reply}"
    );
}

/// `lwm vision-generate --output x.png`'s PNG for a prompt and seed.
fn vision_generate(model: &str, out: &Path, prompt: &str, seed: u64) -> Vec<u8> {
    let o = lwm(&[
        "vision-generate",
        "--model",
        model,
        "--prompt",
        prompt,
        "--output",
        out.to_str().unwrap(),
        "--seed",
        &seed.to_string(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(out).unwrap()
}

fn b64(v: &serde_json::Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().expect("a b64_json string"))
        .unwrap()
}

/// `POST /v1/images/generations` draws what `lwm vision-generate` draws (same prompt, same
/// seed: the same PNG bytes; image i of `n` takes seed + i), through raw HTTP and through the
/// official `openai` client; unsupported fields and sizes are 400s naming them.
#[test]
fn image_generation_through_the_api_equals_vision_generate() {
    // The fixture's 256 positions cannot hold a prompt and a frame's 257 tokens.
    let d = model_dir("gen", 1024);
    let model = format!("params::{}", d.join("params").display());
    let want7 = vision_generate(&model, &d.join("seed7.png"), "a red cat", 7);
    let want8 = vision_generate(&model, &d.join("seed8.png"), "a red cat", 8);
    assert_ne!(want7, want8);
    assert!(want7.starts_with(b"\x89PNG"));

    let (_server, url) = start_server(&model, &["--served-model-name", "lwm-vl"]);
    let body = r#"{"model": "lwm-vl", "prompt": "a red cat", "n": 2, "seed": 7,
        "size": "256x256", "response_format": "b64_json"}"#;
    let (status, reply) = post(&url, "/v1/images/generations", body);
    assert_eq!(status, 200, "{reply}");
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(b64(&v["data"][0]["b64_json"]), want7, "image 0 vs --seed 7");
    assert_eq!(b64(&v["data"][1]["b64_json"]), want8, "image 1 vs --seed 8");
    assert_eq!(v["size"], "256x256");
    assert_eq!(v["usage"]["output_tokens"], 2 * 257, "{}", v["usage"]);

    let bad = [
        (
            r#"{"prompt": "a cat", "size": "1024x1024"}"#,
            "size",
            "256x256",
        ),
        (
            r#"{"prompt": "a cat", "response_format": "url"}"#,
            "response_format",
            "b64_json",
        ),
        (
            r#"{"prompt": "a cat", "quality": "hd"}"#,
            "quality",
            "not supported",
        ),
        (r#"{"prompt": ""}"#, "prompt", "empty"),
        (r#"{"n": 1}"#, "prompt", "required"),
        (r#"{"prompt": "a cat", "n": 0}"#, "n", "between 1"),
        (
            r#"{"prompt": "a cat", "output_format": "webp"}"#,
            "output_format",
            "png",
        ),
        (r#"{"prompt": "a cat", "seed": "x"}"#, "seed", "integer"),
    ];
    for (body, param, want) in bad {
        let (status, reply) = post(&url, "/v1/images/generations", body);
        assert_eq!(status, 400, "{body}: {reply}");
        let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(v["error"]["param"], param, "{body}: {reply}");
        assert!(reply.contains(want), "{body}: {reply}");
    }
    // A prompt that leaves no room for the image's 257 tokens.
    let long = serde_json::json!({"prompt": "a cat ".repeat(200)}).to_string();
    let (status, reply) = post(&url, "/v1/images/generations", &long);
    assert!(
        status == 400 && reply.contains("context_length_exceeded"),
        "{reply}"
    );

    // The official client (skipped with a note where python3 has no `openai`).
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let script = r#"
import base64, sys, openai
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="none", max_retries=0)
r = c.images.generate(model="lwm-vl", prompt="a red cat", size="256x256",
                      response_format="b64_json", extra_body={"seed": 7})
sys.stdout.buffer.write(base64.b64decode(r.data[0].b64_json))
try:
    c.images.generate(model="lwm-vl", prompt="a red cat", style="vivid")
    sys.exit("style was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "style", e.body
"#;
    match std::process::Command::new(&python)
        .args(["-c", script, &url])
        .output()
    {
        Ok(o) if String::from_utf8_lossy(&o.stderr).contains("No module named 'openai'") => {
            eprintln!("note: skipping the openai client check: pip install openai")
        }
        Ok(o) => {
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            assert_eq!(o.stdout, want7, "openai client's image vs --seed 7");
        }
        Err(e) => eprintln!("note: skipping the openai client check: {e}"),
    }
    assert_eq!(http(&url, "GET", "/health", None).0, 200);
    let _ = std::fs::remove_dir_all(&d);
}
