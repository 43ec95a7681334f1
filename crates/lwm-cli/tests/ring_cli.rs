//! `--mesh-dim` end to end: the ring over threads (and, with `--features mpi`, over MPI
//! processes started by mpirun) prints what one worker prints, and bad meshes or dead
//! workers end in one clear error.

use std::time::{Duration, Instant};

mod common;
use common::{default_model, long_logits_args, lwm, ok_stdout as stdout, strs};

const PROMPT: &str =
    "The ring passes keys and values from worker to worker while each computes, so";

fn generate_args<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "generate",
        "-m",
        model,
        "--numerics",
        "exact",
        "--temperature",
        "0",
        "-n",
        "12",
        "-p",
        PROMPT,
    ];
    v.extend_from_slice(extra);
    v
}

#[cfg(feature = "mpi")]
fn top_ids(json: &str, k: usize) -> Vec<u64> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v["top"].as_array().unwrap()[..k]
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect()
}

#[cfg(feature = "mpi")]
fn logits_args<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "logits",
        "-m",
        model,
        "--numerics",
        "exact",
        "--json",
        "--top",
        "20",
        "-p",
        PROMPT,
    ];
    v.extend_from_slice(extra);
    v
}

/// The cases: both numerics, the KV types f16 (the default), q8_0 and f32, and
/// the sp that runs each (all of 2, 3, 4 for the default).
const RING_CASES: [(&[&str], &[usize]); 4] = [
    (&[], &[2, 3, 4]),
    (&["--kv-type", "q8_0"], &[3]),
    (&["--kv-type", "f32"], &[2]),
    (&["--numerics", "exact", "--kv-type", "q8_0"], &[4]),
];

/// The threads ring prints one worker's logits bit for bit (same code, same summation
/// order per query row), and its greedy text is one worker's.
#[test]
fn threads_ring_prints_one_workers_logits_bit_for_bit() {
    let Some(model) = default_model() else { return };
    for (extra, sps) in RING_CASES {
        let want = stdout(&lwm(&strs(&long_logits_args(&model, extra))));
        assert!(want.contains("\"top\""), "{want}");
        for sp in sps {
            let mesh = format!("1,1,1,{sp}");
            let mut with_mesh = extra.to_vec();
            with_mesh.extend(["--mesh-dim", mesh.as_str()]);
            let got = stdout(&lwm(&strs(&long_logits_args(&model, &with_mesh))));
            assert_eq!(got, want, "sp={sp} {extra:?}");
        }
    }
    let one = stdout(&lwm(&generate_args(&model, &[])));
    let ring = stdout(&lwm(&generate_args(&model, &["--mesh-dim", "1,1,1,3"])));
    assert!(one.trim().len() > 5, "{one:?}");
    assert_eq!(ring, one, "greedy text, sp=3");
}

/// The ring checks this process's share of the memory plan (here: both workers' shards of a
/// 2^27-token f16 cache, ~2.8 TiB) before anything grows, and says so.
#[test]
fn a_ring_run_beyond_memory_is_refused_before_it_starts() {
    let Some(model) = default_model() else { return };
    let big = (1usize << 27).to_string();
    let n = ((1usize << 27) - 100).to_string();
    let out = lwm(&[
        "generate",
        "-m",
        &model,
        "--mesh-dim",
        "1,1,1,2",
        "--max-sequence-length",
        &big,
        "-n",
        &n,
        "-p",
        PROMPT,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("not enough memory") && !err.contains("panicked"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "partial output");
}

#[test]
fn bad_meshes_are_refused_with_the_reason() {
    let Some(model) = default_model() else { return };
    for (mesh, needle) in [
        ("2,1,1,2", "dp=2"),
        ("1,1,2,1", "tp=2"),
        ("1,1,1", "dp,fsdp,tp,sp"),
        ("1,1,1,-1", "MPI"),
    ] {
        let out = lwm(&generate_args(&model, &["--mesh-dim", mesh]));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{mesh}: {err}");
        assert!(
            err.contains(needle) && !err.contains("panicked"),
            "{mesh}: {err}"
        );
        assert!(out.stdout.is_empty(), "{mesh}: partial output");
    }
}

/// `mpirun` on loopback, one worker per process (rank 0 prints).
#[cfg(feature = "mpi")]
mod mpi {
    use super::common::{needle_answers, needle_small_grid_args};
    use super::*;
    use std::process::{Command, Output};

    fn mpirun(n: usize, env: &[(&str, &str)], args: &[&str]) -> Output {
        let mut c = Command::new("mpirun");
        c.args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-n",
            &n.to_string(),
        ]);
        for (k, v) in env {
            c.env(k, v);
            c.args(["-x", k]);
        }
        c.arg(env!("CARGO_BIN_EXE_lwm")).args(args);
        c.output()
            .expect("run mpirun (apt-get install openmpi-bin)")
    }

    /// The same ring over MPI processes computes bit for bit what the threads ring does:
    /// identical logits and identical greedy text, for sp = 2, 3, 4.
    #[test]
    fn mpi_ring_of_2_3_4_equals_the_threads_ring() {
        let Some(model) = default_model() else { return };
        let want_top = top_ids(&stdout(&lwm(&logits_args(&model, &[]))), 1);
        for n in [2usize, 3, 4] {
            let mesh = format!("1,1,1,{n}");
            let ring = ["--mesh-dim", mesh.as_str()];
            let args = logits_args(&model, &ring);
            let via_mpi = stdout(&mpirun(n, &[], &args));
            assert_eq!(via_mpi, stdout(&lwm(&args)), "logits, mpirun -n {n}");
            assert_eq!(top_ids(&via_mpi, 1), want_top, "mpirun -n {n}");
            let args = generate_args(&model, &ring);
            assert_eq!(
                stdout(&mpirun(n, &[], &args)),
                stdout(&lwm(&args)),
                "generate, mpirun -n {n}"
            );
        }
    }

    /// The criterion under mpirun: one worker's logits bit for bit on a
    /// ~2000-token prompt, in both numerics and every KV type of `RING_CASES`.
    #[test]
    fn mpi_ring_prints_one_workers_logits_bit_for_bit() {
        let Some(model) = default_model() else { return };
        for (extra, sps) in RING_CASES {
            let want = stdout(&lwm(&strs(&long_logits_args(&model, extra))));
            for &n in sps {
                let mesh = format!("1,1,1,{n}");
                let mut with_mesh = extra.to_vec();
                with_mesh.extend(["--mesh-dim", mesh.as_str()]);
                let got = stdout(&mpirun(
                    n,
                    &[],
                    &strs(&long_logits_args(&model, &with_mesh)),
                ));
                assert_eq!(got, want, "mpirun -n {n} {extra:?}");
            }
        }
    }

    /// `lwm needle run` under mpirun: rank 0 owns the run directory, the other ranks only
    /// serve the ring, and the answers equal the threads ring's.
    #[test]
    fn needle_run_under_mpirun_answers_like_the_threads_ring() {
        let Some(model) = default_model() else { return };
        let dir = std::env::temp_dir().join(format!("lwm-ring-cli-needle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (a, b) = (dir.join("threads"), dir.join("mpi"));
        let ring = ["--mesh-dim", "1,1,1,2"];
        let a_args = needle_small_grid_args(&model, &a, &ring);
        stdout(&lwm(&a_args.iter().map(String::as_str).collect::<Vec<_>>()));
        let b_args = needle_small_grid_args(&model, &b, &ring);
        stdout(&mpirun(
            2,
            &[],
            &b_args.iter().map(String::as_str).collect::<Vec<_>>(),
        ));
        let want = needle_answers(&a);
        assert_eq!(want.len(), 2);
        assert_eq!(needle_answers(&b), want);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `lwm train` under mpirun: each rank trains on its half (third) of every sequence,
    /// attention as a ring over MPI, gradients summed over the ranks: the losses are one
    /// process's within 1e-4, rank 0 alone reports and writes the checkpoint.
    #[test]
    fn mpi_training_ring_equals_one_process() {
        let dir = std::env::temp_dir().join(format!("lwm-mpi-train-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        common::tiny_train_data(&dir);
        let config = |out: &str| common::tiny_train_config(out, 4, 0);
        let losses = |out: &str| -> Vec<f64> {
            std::fs::read_to_string(dir.join(out).join("train.jsonl"))
                .unwrap()
                .lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                        .as_f64()
                        .unwrap()
                })
                .collect()
        };
        std::fs::write(dir.join("one.toml"), config("out-one")).unwrap();
        let one = lwm(&[
            "train",
            "--config",
            dir.join("one.toml").to_str().unwrap(),
            "--quiet",
            "--threads",
            "1",
        ]);
        assert!(
            one.status.success(),
            "{}",
            String::from_utf8_lossy(&one.stderr)
        );
        let want = losses("out-one");
        assert_eq!(want.len(), 4);
        for n in [2usize, 3] {
            let out = format!("out-mpi{n}");
            let cfg = dir.join(format!("mpi{n}.toml"));
            std::fs::write(&cfg, config(&out)).unwrap();
            let run = mpirun(
                n,
                &[],
                &[
                    "train",
                    "--config",
                    cfg.to_str().unwrap(),
                    "--quiet",
                    "--threads",
                    "1",
                ],
            );
            let err = String::from_utf8_lossy(&run.stderr);
            assert!(run.status.success(), "mpirun -n {n}: {err}");
            assert_eq!(
                err.matches("done: 4 updates").count(),
                1,
                "rank 0 alone reports: {err}"
            );
            let got = losses(&out);
            assert_eq!(got.len(), want.len());
            for (step, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs(),
                    "mpirun -n {n} step {}: loss {a} vs one process {b}",
                    step + 1
                );
            }
            assert!(dir
                .join(&out)
                .join("checkpoints/stage0-step00000004/model.safetensors")
                .is_file());
        }
        // A ring size that does not match the job is refused by every rank, clearly.
        let run = mpirun(
            2,
            &[],
            &[
                "train",
                "--config",
                dir.join("mpi2.toml").to_str().unwrap(),
                "--quiet",
                "--sp",
                "3",
            ],
        );
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{err}");
        assert!(err.contains("2 processes"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A hung rank: the job ends, and every rank's error names the hung one, also the ranks
    /// that only waited on a neighbour stalled behind it (rank 0 waits on 3, 3 on 2).
    #[test]
    fn a_hung_mpi_rank_is_named_and_the_job_ends() {
        let Some(model) = default_model() else { return };
        let t0 = Instant::now();
        let out = mpirun(
            4,
            &[("LWM_RING_FAULT", "hang:2")],
            &generate_args(&model, &["--mesh-dim", "1,1,1,4", "--ring-timeout", "3"]),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
        assert!(!errors.is_empty(), "{err}");
        for e in &errors {
            assert!(
                e.contains("rank 2 sent no") || e.contains("rank 2 stalled the ring"),
                "names rank 2 as the cause: {e}"
            );
        }
        assert!(
            errors.iter().any(|e| e.starts_with("error: [rank 0]")),
            "rank 0 reports: {err}"
        );
        assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
        assert!(
            out.stdout.iter().all(|b| b.is_ascii_whitespace()),
            "partial output"
        );
    }
}

#[test]
fn timeouts_are_validated() {
    let Some(model) = default_model() else { return };
    let t0 = Instant::now();
    let out = lwm(&generate_args(
        &model,
        &["--mesh-dim", "1,1,1,2", "--ring-timeout", "0"],
    ));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ring-timeout"));
    assert!(t0.elapsed() < Duration::from_secs(60));
}
