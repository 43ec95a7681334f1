//! `lwm needle` end to end: a run past the (overridden) trained length is run and marked,
//! the report re-renders, and bad input ends in one clear error line.

use std::path::PathBuf;
use std::process::Output;

mod common;
use common::{default_model, lwm, needle_answers, needle_small_grid_args};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lwm-needle-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn assert_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}: {stderr}");
    }
}

#[test]
fn run_beyond_trained_length_is_marked_and_report_rerenders() {
    let Some(model) = default_model() else { return };
    let dir = temp_dir("beyond");
    let out = dir.join("run");
    let out_s = out.to_str().unwrap();
    // Pretend the model was trained for 512 tokens: 640 runs, marked.
    let run = lwm(&[
        "needle",
        "run",
        "-m",
        &model,
        "--max-sequence-length",
        "512",
        "--context-lengths",
        "640",
        "--depths",
        "100",
        "--max-new-tokens",
        "8",
        "--out",
        out_s,
    ]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("beyond the model's trained context (512"),
        "{stderr}"
    );
    let table = String::from_utf8_lossy(&run.stdout).to_string();
    assert!(table.contains("640*"), "{table}");
    let line = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let r: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(r["beyond_trained_length"], true);
    assert_eq!(r["prompt_tokens"], 632);

    // Running again finds everything done and computes nothing.
    let again = lwm(&[
        "needle",
        "run",
        "-m",
        &model,
        "--max-sequence-length",
        "512",
        "--context-lengths",
        "640",
        "--depths",
        "100",
        "--max-new-tokens",
        "8",
        "--out",
        out_s,
    ]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("1 of 1 cells already done"));
    assert_eq!(
        std::fs::read_to_string(out.join("results.jsonl")).unwrap(),
        line
    );

    // The report re-renders from the directory alone.
    std::fs::remove_file(out.join("heatmap.png")).unwrap();
    let rep = lwm(&["needle", "report", out_s]);
    assert!(rep.status.success());
    assert_eq!(String::from_utf8_lossy(&rep.stdout), table);
    assert!(out.join("heatmap.png").exists());

    // Other flags against the same directory are refused, nothing changed.
    let other = lwm(&[
        "needle",
        "run",
        "-m",
        &model,
        "--context-lengths",
        "1024",
        "--out",
        out_s,
    ]);
    assert_error(&other, &["other parameters", "new --out"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--mesh-dim 1,1,1,2` runs every prompt on a ring of two workers and gives the same
/// answers as one worker (dequantized weights: logits agree within 1e-4, see
/// lwm/tests/ring_attention.rs).
#[test]
fn needle_on_a_ring_gives_the_answers_of_one_worker() {
    let Some(model) = default_model() else { return };
    let dir = temp_dir("ring");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(name);
        let args = needle_small_grid_args(&model, &out, extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = lwm(&refs);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        needle_answers(&out)
    };
    let one = run("one", &[]);
    assert_eq!(one.len(), 2);
    assert_eq!(run("ring", &["--mesh-dim", "1,1,1,2"]), one);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_needle_input_gives_one_clear_error() {
    let dir = temp_dir("bad");
    assert_error(
        &lwm(&["needle", "report", dir.join("nope").to_str().unwrap()]),
        &["is not a directory"],
    );
    assert_error(
        &lwm(&["needle", "report", dir.to_str().unwrap()]),
        &["not a needle run directory"],
    );
    assert_error(
        &lwm(&[
            "needle",
            "create",
            "--depths",
            "0,x",
            "--out",
            "/tmp/x.jsonl",
        ]),
        &["--depths", "'x'"],
    );
    let Some(model) = default_model() else { return };
    let out = dir.join("set.jsonl");
    let out_s = out.to_str().unwrap();
    assert_error(
        &lwm(&[
            "needle",
            "create",
            "-m",
            &model,
            "--haystack",
            "/nonexistent/book.txt",
            "--out",
            out_s,
        ]),
        &["haystack /nonexistent/book.txt does not exist"],
    );
    let small = dir.join("small.txt");
    std::fs::write(&small, "A short story. It ends here. ".repeat(30)).unwrap();
    assert_error(
        &lwm(&[
            "needle",
            "create",
            "-m",
            &model,
            "--haystack",
            small.to_str().unwrap(),
            "--context-lengths",
            "4096",
            "--out",
            out_s,
        ]),
        &["small.txt", "give a longer --haystack"],
    );
    // A set from `create` runs only with flags that match it... or with --set.
    let created = lwm(&[
        "needle",
        "create",
        "-m",
        &model,
        "--context-lengths",
        "512",
        "--depths",
        "50",
        "--out",
        out_s,
    ]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    std::fs::write(dir.join("corrupt.jsonl"), "{\"needle_set\": 1}\n").unwrap();
    assert_error(
        &lwm(&[
            "needle",
            "run",
            "-m",
            &model,
            "--set",
            dir.join("corrupt.jsonl").to_str().unwrap(),
            "--out",
            dir.join("r").to_str().unwrap(),
        ]),
        &["line 1 is not a needle-set header"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}
