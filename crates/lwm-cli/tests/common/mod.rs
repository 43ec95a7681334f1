//! Helpers shared by the CLI test binaries: run the built `lwm`, find the default model.
#![allow(dead_code)] // each test binary uses its own subset

use std::process::{Command, Output};

/// Run the `lwm` binary under test with `args`, capturing its output.
pub fn lwm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lwm"))
        .args(args)
        .output()
        .expect("run lwm")
}

/// The default model's path (`LWM_DEFAULT_MODEL` or the cache), or `None` with a note so
/// the test can skip when it was never fetched.
pub fn default_model() -> Option<String> {
    if let Ok(p) = std::env::var("LWM_DEFAULT_MODEL") {
        return Some(p);
    }
    let p = lwm::model_source::default_model_path();
    if p.exists() {
        Some(p.display().to_string())
    } else {
        eprintln!("note: default model missing (run `lwm pull default`); skipping");
        None
    }
}

/// `lwm needle run` on a small grid of the default model (2 cells of 384 tokens, 12-token
/// answers) with dequantized weights, so one worker and any ring give the same answers.
pub fn needle_small_grid_args(model: &str, out: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "needle",
        "run",
        "-m",
        model,
        "--numerics",
        "exact",
        "--dequantize",
        "--context-lengths",
        "384",
        "--depths",
        "0,100",
        "--max-new-tokens",
        "12",
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(out.display().to_string());
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// (cell id, answer token ids) of a needle run directory, sorted by id.
pub fn needle_answers(dir: &std::path::Path) -> Vec<(String, Vec<u64>)> {
    let mut v: Vec<(String, Vec<u64>)> = std::fs::read_to_string(dir.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            let ids = r["response_ids"].as_array().unwrap();
            (
                r["id"].as_str().unwrap().to_string(),
                ids.iter().map(|t| t.as_u64().unwrap()).collect(),
            )
        })
        .collect();
    v.sort();
    v
}

#[path = "../../../lwm/tests/common/prompts.rs"]
mod prompts;
#[allow(unused_imports)] // each test binary uses its own subset
pub use prompts::records;

/// A running `lwm serve`, killed when dropped (the test passed or not).
pub struct Server(pub std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `lwm serve --model MODEL` on a free loopback port with `extra` flags; returns the
/// server and its base URL (`http://127.0.0.1:PORT`). Its log goes to the test's stderr.
pub fn start_server(model: &str, extra: &[&str]) -> (Server, String) {
    start_server_env(model, extra, &[])
}

/// `start_server` with extra environment variables for the server process.
pub fn start_server_env(model: &str, extra: &[&str], env: &[(&str, &str)]) -> (Server, String) {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
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
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lwm serve");
    let stderr = child.stderr.take().expect("piped stderr");
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
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("server did not report its address within 120 s");
    (server, url)
}

/// One HTTP/1.1 request over a plain socket (`body` as JSON when given); returns (status,
/// body).
pub fn http(url: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let host = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(host).expect("connect to the server");
    s.set_read_timeout(Some(std::time::Duration::from_secs(300)))
        .unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// POST `body` (JSON) to `url` + `path`; returns (status, body).
pub fn post(url: &str, path: &str, body: &str) -> (u16, String) {
    http(url, "POST", path, Some(body))
}

/// A tiny training job's data (`dir/data.jsonl`: 60 key/answer records).
pub fn tiny_train_data(dir: &std::path::Path) {
    let mut data = String::new();
    for i in 0..60u64 {
        let key = (i * 7919) % 1000;
        let filler = "sand. ".repeat(1 + (i % 3) as usize);
        data.push_str(&format!(
            "{{\"prompt\": \"{filler}the key is {key}. {filler}key?\", \"answer\": \" {key}\"}}\n"
        ));
    }
    std::fs::write(dir.join("data.jsonl"), data).unwrap();
}

/// Its config (a 2-layer model of width 32, sequences of 96 split evenly by 2 and 3
/// workers), writing to `out` (relative to the config's directory); `save_every` 0 saves
/// only at the end.
pub fn tiny_train_config(out: &str, steps: u64, save_every: u64) -> String {
    format!(
        "[model]\nhidden_size = 32\nintermediate_size = 64\nnum_hidden_layers = 2\n\
         num_attention_heads = 4\nnum_key_value_heads = 2\n[data]\nfiles = [\"data.jsonl\"]\n\
         fields = \"[prompt],answer\"\n[optim]\nlr = 3e-3\nwarmup_steps = 1\n[train]\n\
         seq_len = 96\nbatch_size = 2\ngrad_accum = 2\nsteps = {steps}\nsave_every = {save_every}\n\
         query_chunk = 16\nkey_chunk = 16\nout_dir = \"{out}\"\n"
    )
}

/// `lwm logits` on a ~2000-token prompt (several ring key blocks per worker), top-20 as JSON.
pub fn long_logits_args(model: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["logits", "-m", model, "--json", "--top", "20", "-t", "1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(["-p".to_string(), records(110)]);
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A command's stdout, after checking that it succeeded.
pub fn ok_stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "lwm failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}
