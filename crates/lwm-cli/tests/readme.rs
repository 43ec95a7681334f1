//! Every fenced `sh` block of the README, run as written on the default model.
//!
//! Each block runs in `bash -e` with the `lwm` under test first on PATH, in an empty folder.
//! `cargo run [--release] -p lwm-cli -- ARGS` runs that same binary with ARGS (it is what
//! cargo would build); `cargo test` is this run itself and is only echoed. Hub pulls go to a
//! local HTTP server laid out as the hub (`HF_ENDPOINT`), serving the repo the README names
//! with the default model's real bytes (Q4_1) under the Q4_K_M file name the README picks; the default model comes
//! from the cache (`LWM_HOME` holds a link to it), so nothing here needs the network.

#[path = "../../lwm-engine/src/pull/test_server.rs"]
mod test_server;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use test_server::{serve_repo, HubFile, TestServer};

mod common;
use common::default_model;

/// The repo and file the README's pull example names.
const README_REPO: &str = "bartowski/SmolLM2-135M-Instruct-GGUF";
const README_FILE: &str = "SmolLM2-135M-Instruct-Q4_K_M.gguf";

/// The README's fenced blocks whose info string is `sh`, with the line each starts on.
fn sh_blocks(readme: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in readme.lines().enumerate() {
        let t = line.trim_start();
        match &mut current {
            None if t.starts_with("```") => {
                if t.trim_start_matches('`').trim() == "sh" {
                    current = Some((i + 1, String::new()));
                } else {
                    current = Some((0, String::new()));
                }
            }
            None => {}
            Some(_) if t.starts_with("```") => {
                let (at, text) = current.take().unwrap();
                if at > 0 {
                    blocks.push((at, text));
                }
            }
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    blocks
}

const PRELUDE: &str = r#"
cargo() {
  case "$1" in
    run) while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do shift; done; shift; lwm "$@" ;;
    test) echo "(cargo $*: this test run)" ;;
    *) echo "readme test: unexpected cargo $*" >&2; return 1 ;;
  esac
}
"#;

fn run_block(
    block: &str,
    dir: &Path,
    env: &[(&str, PathBuf)],
    limit: Duration,
) -> (bool, String, String) {
    let mut c = Command::new("bash");
    c.arg("-ec")
        .arg(format!("{PRELUDE}\n{block}"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    for v in ["HF_HUB_OFFLINE", "HF_TOKEN", "HF_HOME", "RUST_LOG"] {
        c.env_remove(v);
    }
    let child = c.spawn().expect("run bash");
    let pid = child.id();
    let start = Instant::now();
    let watchdog = std::thread::spawn(move || {
        while start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(200));
            if std::fs::metadata(format!("/proc/{pid}")).is_err() {
                return;
            }
        }
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    });
    let out = child.wait_with_output().expect("wait for bash");
    let _ = watchdog.join();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_readme_command_runs_on_the_default_model() {
    let Some(model) = default_model() else { return };
    let root = std::env::temp_dir().join(format!("lwm-readme-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (bin, home, hub, work) = (
        root.join("bin"),
        root.join("home"),
        root.join("hub"),
        root.join("work"),
    );
    for d in [&bin, &home.join("models"), &hub, &work] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_lwm"), bin.join("lwm")).unwrap();
    let default_name = Path::new(&model).file_name().unwrap();
    std::os::unix::fs::symlink(&model, home.join("models").join(default_name)).unwrap();

    let server = TestServer::start();
    let bytes = std::fs::read(&model).unwrap();
    serve_repo(
        &server,
        README_REPO,
        "5d1d2c1f0a9e",
        &[
            HubFile::new("README.md", b"# SmolLM2-135M-Instruct GGUF", false),
            HubFile::new(README_FILE, &bytes, true),
            HubFile::new("SmolLM2-135M-Instruct-Q8_0.gguf", b"not fetched", true),
        ],
    );
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let env = [
        ("PATH", PathBuf::from(path)),
        ("LWM_HOME", home.clone()),
        ("HF_HUB_CACHE", hub.clone()),
        ("HF_ENDPOINT", PathBuf::from(&server.url)),
        ("LWM_PYPI_URL", PathBuf::from(&server.url)),
    ];

    let readme =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    assert!(
        readme.len() <= 12 * 1024,
        "README is {} bytes",
        readme.len()
    );
    let blocks = sh_blocks(&readme);
    assert!(blocks.len() >= 5, "{} sh blocks", blocks.len());
    let mut failures = Vec::new();
    let mut outputs = String::new();
    let mut first_answer = None;
    for (line, block) in &blocks {
        let (ok, out, err) = run_block(block, &work, &env, Duration::from_secs(600));
        eprintln!("README line {line}: {}", if ok { "ok" } else { "FAILED" });
        if !ok {
            failures.push(format!(
                "README line {line}:\n{block}\nstdout:\n{out}\nstderr:\n{err}"
            ));
        }
        first_answer.get_or_insert_with(|| out.clone());
        outputs.push_str(&out);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n----\n"));
    // The main job (the first block) prints an answer; `lwm logits` on "The capital of
    // France is" ranks " Paris" (llama.cpp's top token); the pull example reached the hub.
    let answer = first_answer.unwrap_or_default();
    assert!(answer.trim().chars().any(char::is_alphabetic), "{answer:?}");
    assert!(outputs.contains("\" Paris\""), "{outputs}");
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.path.contains(README_FILE)),
        "the README's pull example never reached the hub"
    );
    let _ = std::fs::remove_dir_all(&root);
}
