//! `lwm serve` against the official `openai` Python client (tests/openai/client_check.py):
//! chat, completions, streaming, logprobs, json_schema, a dropped stream, sampling extras,
//! logit_bias, n, tools, uniqueItems, /tokenize, /detokenize, /props, the API key, CORS, and
//! every kind of bad input (4xx in OpenAI's error shape, server still serving after each).
//! Skips with a note when python3 or the `openai` package is missing (CI installs it).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

mod common;
use common::{default_model, post, start_server, start_server_env};

fn python_with_openai() -> Option<String> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    match Command::new(&python).args(["-c", "import openai"]).output() {
        Ok(o) if o.status.success() => Some(python),
        Ok(o) => {
            eprintln!(
                "note: skipping: `{python} -c 'import openai'` failed ({}); pip install openai",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        Err(e) => {
            eprintln!("note: skipping: cannot run {python}: {e}");
            None
        }
    }
}

#[test]
fn openai_client_against_lwm_serve() {
    let Some(model) = default_model() else { return };
    let Some(python) = python_with_openai() else {
        return;
    };
    // The key comes from the environment (keeps it out of `ps`); the flags are the same.
    let key = "sk-lwm-test";
    let origin = "http://allowed.test";
    let (_server, url) = start_server_env(
        &model,
        &[
            "--max-body-bytes",
            "65536",
            "--max-tokens-limit",
            "512",
            "--max-n",
            "8",
            "--cors-origin",
            origin,
        ],
        &[("LWM_API_KEY", key)],
    );
    let model_id = PathBuf::from(&model)
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai/client_check.py");
    let t0 = Instant::now();
    let out = Command::new(python)
        .arg(script)
        .args([
            &url,
            &model_id,
            key,
            env!("CARGO_BIN_EXE_lwm"),
            &model,
            origin,
        ])
        .output()
        .expect("run the client script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && stdout.contains("all checks passed"),
        "client checks failed after {:.0} s:\n{stdout}\n{}",
        t0.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn serve_rejects_a_bad_model_cleanly() {
    let out = Command::new(env!("CARGO_BIN_EXE_lwm"))
        .args(["serve", "--model", "/no/such/model.gguf", "--port", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error:") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

/// The scheduler checks each request against the memory plan (the same check `lwm
/// generate` makes) before its cache grows: a request whose context cannot fit gets 503
/// `insufficient_memory` with the plan's figures, streamed or not, and the server keeps
/// serving the requests that fit.
#[test]
fn a_request_beyond_memory_is_refused_by_type_and_the_server_keeps_serving_like_lwm_generate() {
    let Some(model) = default_model() else { return };
    // 2^27 positions of this model's f16 KV (30 layers x 3 heads x 64 x 2 x 2 bytes) need
    // about 2.8 TiB, more than any test machine has.
    let big = (1usize << 27).to_string();
    let (_server, url) = start_server(
        &model,
        &["--max-sequence-length", &big, "--max-tokens-limit", &big],
    );
    let huge = format!(
        r#"{{"prompt": "The capital of France is", "max_tokens": {}}}"#,
        (1usize << 27) - 100
    );
    for body in [
        huge.clone(),
        huge.replace("{\"prompt\"", "{\"stream\": true, \"prompt\""),
    ] {
        let (status, reply) = post(&url, "/v1/completions", &body);
        assert_eq!(status, 503, "{reply}");
        let v: serde_json::Value = serde_json::from_str(&reply).expect("an error object");
        assert_eq!(v["error"]["code"], "insufficient_memory", "{reply}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("not enough memory"), "{msg}");
    }
    // One generation loop: the server's greedy answer is `lwm generate`'s, token for token.
    let (status, reply) = post(
        &url,
        "/v1/completions",
        r#"{"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}"#,
    );
    assert_eq!(status, 200, "{reply}");
    let v: serde_json::Value = serde_json::from_str(&reply).unwrap();
    let served = v["choices"][0]["text"].as_str().unwrap().to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_lwm"))
        .args(["generate", "-m", &model, "--temperature", "0", "-n", "16"])
        .args(["-p", "The capital of France is"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = String::from_utf8_lossy(&out.stdout);
    assert!(!served.is_empty());
    assert_eq!(generated.strip_suffix('\n').unwrap_or(&generated), served);
}

/// The value of an unlabelled Prometheus sample in /metrics.
fn metric(url: &str, name: &str) -> u64 {
    let (status, text) = common::http(url, "GET", "/metrics", None);
    assert_eq!(status, 200, "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

/// (KV bytes held, KV bytes reserved) once the engine is idle: it publishes its gauges at
/// the end of a step, just after the last answer went out, so wait for them to settle.
fn idle_kv_bytes(url: &str) -> (u64, u64) {
    let t0 = Instant::now();
    loop {
        let held = metric(url, "lwm_kv_cache_bytes");
        let reserved = metric(url, "lwm_kv_cache_reserved_bytes");
        let settled = metric(url, "lwm_active_requests") == 0 && reserved == held;
        if settled || t0.elapsed().as_secs() > 10 {
            return (held, reserved);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Found by the soak (docs/bench/soak-2026-12-07.md): a reused KV cache kept the room an
/// earlier, longer request had reserved (truncating a cache kept its capacity, and idle
/// caches kept their request's reservation), so once long prompts had passed through, every
/// cache in circulation held a long prompt's worth of memory and RSS climbed for minutes.
/// Now an idle cache holds its rows only, and a request's cache holds what it needs.
#[test]
fn reused_caches_do_not_keep_an_earlier_longer_reservation() {
    let Some(model) = default_model() else { return };
    let (_server, url) = start_server(&model, &[]);
    let chat = |content: &str, max_tokens: usize| {
        let body = serde_json::json!({"messages": [{"role": "user", "content": content}],
                                      "max_tokens": max_tokens, "temperature": 0});
        let (status, reply) = post(&url, "/v1/chat/completions", &body.to_string());
        assert_eq!(status, 200, "{reply}");
    };
    // A long document with a long reservation, then short chats: each takes the idle
    // cache (they share the chat template's prefix) and gives it back.
    let doc = "The harbour committee met to review the accounts. ".repeat(250);
    chat(&format!("{doc}\nSummarise."), 200);
    let (_, after_long) = idle_kv_bytes(&url);
    assert!(after_long > 0);
    for topic in ["bees", "trains", "the sea"] {
        chat(&format!("One word about {topic}."), 4);
        // Idle: every cache is in the pool and holds its rows only.
        let (held, reserved) = idle_kv_bytes(&url);
        assert_eq!(reserved, held, "idle caches keep unwritten room");
        assert!(
            reserved * 4 < after_long,
            "a short chat's cache holds {reserved} bytes, the long one's {after_long}"
        );
    }
    // And the memory a released long cache held goes back to the OS (glibc kept it in its
    // arenas: RSS stayed at the high-water mark), round after round.
    let rss = || metric(&url, "lwm_resident_memory_bytes");
    for round in 0..2 {
        chat(&format!("Meeting {round}.\n{doc}\nSummarise."), 8);
        let (_, long) = idle_kv_bytes(&url);
        let held = rss();
        chat("One word about bees.", 4);
        let (_, short) = idle_kv_bytes(&url);
        let released = rss();
        assert!(
            released + (long - short) / 2 < held,
            "round {round}: RSS {released} once a {long}-byte cache was released, {held} while held"
        );
    }
}

/// SIGTERM (how systemd, Docker and Kubernetes stop a service) is a graceful shutdown, as
/// Ctrl-C is: the request in flight is answered in full, then the server exits 0. Before,
/// only Ctrl-C was handled and SIGTERM killed the process mid-answer.
#[cfg(unix)]
#[test]
fn sigterm_lets_the_request_in_flight_finish_then_exits_zero() {
    let Some(model) = default_model() else {
        return;
    };
    let (mut server, url) = start_server(&model, &[]);
    let pid = server.0.id().to_string();
    let body = r#"{"messages":[{"role":"user","content":"Count from one to fifty in words."}],
        "max_tokens":300,"temperature":0,"ignore_eos":true}"#;
    let asker = {
        let url = url.clone();
        std::thread::spawn(move || post(&url, "/v1/chat/completions", body))
    };
    // Wait until the request is being generated (the scheduler holds it), then signal.
    let t0 = Instant::now();
    while common::http(&url, "GET", "/metrics", None)
        .1
        .lines()
        .all(|l| !l.starts_with("lwm_active_requests 1"))
    {
        assert!(
            t0.elapsed().as_secs() < 60,
            "the request never became active"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let kill = Command::new("kill").args(["-TERM", &pid]).status();
    if !kill.is_ok_and(|s| s.success()) {
        eprintln!("note: no `kill` to send SIGTERM with; skipping");
        return;
    }
    let (status, answer) = asker.join().unwrap();
    assert_eq!(status, 200, "{answer}");
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 300, "{answer}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{answer}");
    let t1 = Instant::now();
    let code = loop {
        if let Some(s) = server.0.try_wait().unwrap() {
            break s.code();
        }
        assert!(
            t1.elapsed().as_secs() < 20,
            "the server did not exit after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(code, Some(0));
}
