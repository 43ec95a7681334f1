//! `lwm eval ruler|report|compare` end to end on the default model: a small run writes its
//! directory and resumes, a ring gives one worker's answers, runs compare in one table,
//! and bad input ends in one clear error line.

use std::path::{Path, PathBuf};
use std::process::Output;

mod common;
use common::{default_model, lwm};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lwm-ruler-cli-{}-{name}", std::process::id()));
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

fn ruler(model: &str, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "eval",
        "ruler",
        "-m",
        model,
        "--lengths",
        "512",
        "--tasks",
        "niah_single_1,niah_multikey_2",
        "--samples",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    lwm(&args)
}

fn preds(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_to_string(dir.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let r: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                r["id"].as_str().unwrap().to_string(),
                r["pred"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_small_run_resumes_runs_on_a_ring_and_compares() {
    let Some(model) = default_model() else { return };
    let dir = temp_dir("run");
    let one = dir.join("one");
    let o = ruler(&model, &one, &["--dequantize"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("niah_single_1") && table.contains("effective length"),
        "{table}"
    );
    for f in [
        "params.json",
        "samples.jsonl",
        "results.jsonl",
        "summary.json",
    ] {
        assert!(one.join(f).is_file(), "{f}");
    }
    let png = std::fs::read(one.join("scores.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(preds(&one).len(), 2);
    // Run again: everything is done, nothing is recomputed.
    let again = ruler(&model, &one, &["--dequantize"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("this run: 0 samples"));
    // Another KV type in the same directory is refused with the stored settings.
    assert_error(
        &ruler(&model, &one, &["--dequantize", "--kv-type", "q8_0"]),
        &["holds a run with other settings", "--kv-type"],
    );
    // On a ring of two workers: the answers of one.
    let ring = dir.join("ring");
    let o = ruler(&model, &ring, &["--dequantize", "--mesh-dim", "1,1,1,2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(preds(&ring), preds(&one));
    // A KV policy is one process's: the ring refuses it.
    assert_error(
        &ruler(
            &model,
            &dir.join("ring-policy"),
            &["--kv-policy", "sinks:4,window:64", "--mesh-dim", "1,1,1,2"],
        ),
        &["not supported on the ring"],
    );
    // A compressed policy runs, and the comparison puts both runs in one table.
    let sinks = dir.join("sinks");
    let o = ruler(
        &model,
        &sinks,
        &["--dequantize", "--kv-policy", "sinks:4,window:64"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cmp = lwm(&[
        "eval",
        "compare",
        one.to_str().unwrap(),
        sinks.to_str().unwrap(),
    ]);
    assert!(cmp.status.success());
    let cmp = String::from_utf8_lossy(&cmp.stdout);
    assert!(
        cmp.contains("| kv f16 / full |") && cmp.contains("| kv f16 / sinks:4,window:64 |"),
        "{cmp}"
    );
    // The KV bytes a policy keeps: 68 rows at most, against every row of the full run.
    let kv = |d: &Path| -> f64 {
        let s: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("summary.json")).unwrap())
                .unwrap();
        s["lengths"][0]["mean_kv_bytes"].as_f64().unwrap()
    };
    assert!(
        kv(&sinks) * 4.0 < kv(&one),
        "{} vs {}",
        kv(&sinks),
        kv(&one)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_ruler_input_gives_one_clear_error() {
    let dir = temp_dir("bad");
    assert_error(
        &lwm(&["eval", "report", dir.join("nope").to_str().unwrap()]),
        &["is not a directory"],
    );
    assert_error(
        &lwm(&["eval", "report", dir.to_str().unwrap()]),
        &["not a RULER run directory"],
    );
    let out = dir.join("run");
    let out_s = out.to_str().unwrap();
    assert_error(
        &lwm(&["eval", "ruler", "--tasks", "niah_single_7", "--out", out_s]),
        &["unknown task 'niah_single_7'"],
    );
    assert_error(
        &lwm(&["eval", "ruler", "--lengths", "1024,x", "--out", out_s]),
        &["--lengths", "'x'"],
    );
    let bad_policy = lwm(&["eval", "ruler", "--kv-policy", "sinks:4", "--out", out_s]);
    assert_eq!(bad_policy.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_policy.stderr).contains("need sinks:N,window:W"));
    let Some(model) = default_model() else { return };
    // Too short for the task's answer budget, or beyond memory: refused before any work.
    assert_error(
        &lwm(&[
            "eval",
            "ruler",
            "-m",
            &model,
            "--tasks",
            "niah_single_1",
            "--lengths",
            "160",
            "--samples",
            "1",
            "--out",
            out_s,
        ]),
        &["niah_single_1 at length 160", "use a longer length"],
    );
    assert_error(
        &lwm(&[
            "eval",
            "ruler",
            "-m",
            &model,
            "--tasks",
            "vt",
            "--lengths",
            "400000000",
            "--out",
            out_s,
        ]),
        &["length 400000000 does not fit"],
    );
    // A results file corrupted in the middle: the line is named, nothing changes.
    let run = dir.join("corrupt");
    let o = ruler(&model, &run, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let results = run.join("results.jsonl");
    let text = std::fs::read_to_string(&results).unwrap();
    let broken = format!("{{\"id\": 3\n{text}");
    std::fs::write(&results, &broken).unwrap();
    assert_error(
        &ruler(&model, &run, &[]),
        &["results.jsonl line 1 is not a valid result"],
    );
    assert_eq!(std::fs::read_to_string(&results).unwrap(), broken);
    // RULER files: a line without 'outputs' is named.
    let f = dir.join("task.jsonl");
    std::fs::write(&f, "{\"index\": 0, \"input\": \"hi\"}\n").unwrap();
    assert_error(
        &lwm(&[
            "eval",
            "ruler",
            "-m",
            &model,
            "--input",
            f.to_str().unwrap(),
            "--out",
            out_s,
        ]),
        &["task.jsonl line 1 has no 'outputs' list"],
    );
    let _ = std::fs::remove_dir_all(&dir);
}
