//! What a llama.cpp user expects of the command line: tokenizer-only commands, GGUF
//! metadata, a default chat template, `--json`, completions, chat commands, log levels.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

mod common;
use common::{default_model, lwm};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../lwm/tests/fixtures")
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lwm-habits-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// llama.cpp's vocab-only test file tokenizes without any model (none is fetched: LWM_HOME
/// points at an empty folder), and gives llama.cpp's ids (`.inp` / `.out` pairs).
#[test]
fn tokenize_runs_on_a_vocab_only_file_with_llama_cpp_ids() {
    let vocab = fixtures().join("tokenizer/ggml-vocab-llama-spm.gguf");
    let inp = std::fs::read_to_string(vocab.with_extension("gguf.inp")).unwrap();
    let out = std::fs::read_to_string(vocab.with_extension("gguf.out")).unwrap();
    let cases: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let expect: Vec<&str> = out.lines().collect();
    let home = temp_dir("vocab-home");
    let mut checked = 0;
    for (text, ids) in cases.iter().zip(&expect).take(12) {
        if text.is_empty() {
            continue;
        }
        for how in [
            ["--model", vocab.to_str().unwrap()],
            ["--tokenizer", vocab.to_str().unwrap()],
        ] {
            let o = Command::new(env!("CARGO_BIN_EXE_lwm"))
                .env("LWM_HOME", &home)
                .args([
                    "tokenize", how[0], how[1], "--no-bos", "--json", "--prompt", text,
                ])
                .output()
                .unwrap();
            assert!(o.status.success(), "{text:?}: {}", stderr(&o));
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            let want: Vec<u64> = ids.split_whitespace().map(|t| t.parse().unwrap()).collect();
            assert_eq!(v["ids"], serde_json::json!(want), "{text:?} via {}", how[0]);
            checked += 1;
        }
    }
    assert!(checked >= 16, "{checked}");
    assert!(
        std::fs::read_dir(&home).unwrap().next().is_none(),
        "a model was fetched"
    );
}

#[test]
fn info_reads_a_vocab_only_file_and_dumps_metadata() {
    let vocab = fixtures().join("tokenizer/ggml-vocab-llama-spm.gguf");
    let o = lwm(&["info", "--model", vocab.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("vocab only"), "{text}");
    assert!(text.contains("32000 tokens"), "{text}");
    assert!(text.contains("tokenizer.ggml.model = \"llama\""), "{text}");

    let Some(model) = default_model() else { return };
    let o = lwm(&["info", "--model", &model, "--metadata", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["metadata"]["llama.block_count"], 30);
    assert_eq!(v["metadata"]["tokenizer.ggml.tokens"]["len"], 49152);
    let tensors = v["tensors"].as_array().unwrap();
    // 30 layers x 9 tensors + token_embd + output_norm (the head is tied).
    assert_eq!(tensors.len(), 30 * 9 + 2);
    let embd = tensors
        .iter()
        .find(|t| t["name"] == "token_embd.weight")
        .unwrap();
    assert_eq!(embd["shape"], serde_json::json!([49152, 576]));
}

/// The default model with its `tokenizer.chat_template` key renamed in place (same length,
/// so every offset stays): a real model file without a chat template.
fn model_without_template(dir: &std::path::Path) -> Option<PathBuf> {
    let model = default_model()?;
    let mut bytes = std::fs::read(model).unwrap();
    let key = b"tokenizer.chat_template";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap();
    bytes[at + key.len() - 1] = b'X';
    let p = dir.join("no-template.gguf");
    std::fs::write(&p, bytes).unwrap();
    Some(p)
}

/// A model without a chat template chats through the stated default (ChatML) with a
/// warning; `--chat-template FILE` replaces it.
#[test]
fn a_model_without_a_template_gets_the_default_and_a_warning() {
    let dir = temp_dir("template");
    let Some(tiny) = model_without_template(&dir) else {
        return;
    };
    let tiny = tiny.to_str().unwrap();
    // The rendered prompt of a one-word chat (on stderr), with `extra` flags.
    let prompt_of = |extra: &[&str]| {
        let mut args = vec!["chat", "--model", tiny, "--message", "hi", "-n", "3"];
        args.extend(["--temp", "0", "--show-prompt"]);
        args.extend(extra);
        let o = lwm(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        stderr(&o)
    };
    let err = prompt_of(&[]);
    assert!(err.contains("no chat template"), "{err}");
    assert!(
        err.contains("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
        "{err}"
    );
    let t = dir.join("t.jinja");
    std::fs::write(
        &t,
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant]",
    )
    .unwrap();
    let err = prompt_of(&["--chat-template", t.to_str().unwrap()]);
    assert!(!err.contains("no chat template"), "{err}");
    assert!(err.contains("[user] hi\n[assistant]"), "{err}");
    let o = lwm(&[
        "chat",
        "--model",
        tiny,
        "--message",
        "hi",
        "--chat-template",
        "nope",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("neither a file nor a Jinja template"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--json` prints one object whose text equals the streamed text of the same greedy run.
#[test]
fn generate_json_matches_the_streamed_text() {
    let Some(model) = default_model() else { return };
    let args = [
        "generate",
        "--model",
        &model,
        "-p",
        "The capital of France is",
        "-n",
        "12",
        "--temp",
        "0",
    ];
    let plain = lwm(&args);
    assert!(plain.status.success(), "{}", stderr(&plain));
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let o = lwm(&with_json);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let streamed = String::from_utf8_lossy(&plain.stdout);
    assert_eq!(v["text"].as_str().unwrap(), streamed.trim_end_matches('\n'));
    assert_eq!(v["completion_tokens"], 12);
    assert_eq!(v["finish_reason"], "length");
    assert_eq!(v["prompt_tokens"], 5);
}

/// Piped chat: /save writes the conversation, /clear forgets it, /load brings it back, an
/// unknown command is named and the chat goes on; each answer is one JSON line.
#[test]
fn chat_commands_save_clear_and_load_the_conversation() {
    let Some(model) = default_model() else { return };
    let dir = temp_dir("chat");
    let saved = dir.join("conv.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lwm"))
        .args([
            "chat",
            "--model",
            &model,
            "-n",
            "6",
            "--temp",
            "0",
            "--json",
            "--system",
            "Be brief.",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let script = format!(
        "What is 2+2?\n/save {0}\n/clear\n/bogus\n/load {0}\nAnd 3+3?\n\n",
        saved.display()
    );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("unknown command /bogus"), "{err}");
    assert!(err.contains("loaded 3 messages"), "{err}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let conv: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    assert_eq!(conv[0]["role"], "system");
    assert_eq!(conv[1]["content"], "What is 2+2?");
    assert_eq!(conv[2]["role"], "assistant");
    // The second answer was asked after /load: its prompt holds the first exchange, so it
    // is longer than the first prompt by that exchange.
    assert!(lines[1]["prompt_tokens"].as_u64() > lines[0]["prompt_tokens"].as_u64());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn completions_and_log_levels() {
    for shell in ["bash", "zsh", "fish"] {
        let o = lwm(&["completions", shell]);
        assert!(o.status.success(), "{}", stderr(&o));
        let s = String::from_utf8_lossy(&o.stdout);
        assert!(s.contains("generate") && s.contains("ctx-size"), "{shell}");
    }
    let o = lwm(&["completions", "tcsh"]);
    assert_eq!(o.status.code(), Some(2));
    // A model without a template warns at the default level and is quiet at `error`.
    let dir = temp_dir("levels");
    let Some(tiny) = model_without_template(&dir) else {
        return;
    };
    let args = |level: &str| {
        Command::new(env!("CARGO_BIN_EXE_lwm"))
            .env_remove("RUST_LOG")
            .args([
                "chat",
                "--model",
                tiny.to_str().unwrap(),
                "--message",
                "hi",
                "-n",
                "1",
            ])
            .args(["--log-level", level])
            .output()
            .unwrap()
    };
    assert!(stderr(&args("warn")).contains("no chat template"));
    assert!(!stderr(&args("error")).contains("no chat template"));
    let _ = std::fs::remove_dir_all(&dir);
}
