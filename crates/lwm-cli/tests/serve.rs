//! `lwm serve` against the official `openai` Python client (tests/openai/client_check.py):
//! chat, completions, streaming, logprobs, json_schema, a dropped stream, and every kind of
//! bad input (4xx in OpenAI's error shape, server still serving after each).
//! Skips with a note when python3 or the `openai` package is missing (CI installs it).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::default_model;

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

/// Kills the server when the test ends, passed or not.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `lwm serve` on a free port; returns the server and its base URL.
fn start_server(model: &str, extra: &[&str]) -> (Server, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_lwm"))
        .args([
            "serve",
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lwm serve");
    let stderr = child.stderr.take().unwrap();
    let server = Server(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[server] {line}");
            if let Some(url) = line.split("listening on ").nth(1) {
                let _ = tx.send(url.trim().to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("server did not report its address within 120 s");
    (server, url)
}

#[test]
fn openai_client_against_lwm_serve() {
    let Some(model) = default_model() else { return };
    let Some(python) = python_with_openai() else {
        return;
    };
    let (_server, url) = start_server(
        &model,
        &["--max-body-bytes", "65536", "--max-tokens-limit", "512"],
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
        .args([&url, &model_id])
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
