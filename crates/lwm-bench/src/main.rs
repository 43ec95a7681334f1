//! `lwm-bench`: the developer's benchmarks, kept out of the shipped `lwm` binary.
//!
//! - `lwm-bench kernels`: the machine's FP32 FMA peak next to the attention kernel's and the
//!   quantized mat-vec's achieved rates, on the same threads.
//! - `lwm-bench compare`: `lwm bench --json` and llama.cpp (llama-cpp-python, through
//!   `scripts/llamacpp_peer.py`) on the same GGUF in one run, with ratios lwm / llama.cpp.

mod kernels;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

#[derive(Parser)]
#[command(
    name = "lwm-bench",
    about = "lwm's kernel probes and its comparison with llama.cpp"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// FP32 FMA peak vs the attention kernel's and the mat-vec's achieved rates.
    Kernels {
        /// Worker threads (0: all cores).
        #[arg(short = 't', long, default_value_t = 0)]
        threads: usize,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        #[arg(long)]
        json: bool,
    },
    /// `lwm bench` and llama.cpp on the same GGUF, back to back, with ratios.
    Compare(CompareArgs),
}

#[derive(clap::Args)]
struct CompareArgs {
    /// The GGUF both engines run (default: lwm's default model).
    #[arg(short = 'm', long)]
    model: Option<PathBuf>,
    #[arg(short = 't', long, default_value_t = 2)]
    threads: usize,
    #[arg(short = 'p', long, default_value_t = 512)]
    prompt_tokens: usize,
    #[arg(short = 'n', long, default_value_t = 128)]
    gen_tokens: usize,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// lwm's untimed runs before the timed ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// The `lwm` binary (default: the one next to this binary).
    #[arg(long)]
    lwm: Option<PathBuf>,
    /// The peer script.
    #[arg(long, default_value = "scripts/llamacpp_peer.py")]
    peer_script: PathBuf,
    #[arg(long)]
    json: bool,
    /// More `lwm bench` flags (e.g. `-- --kv-type q8_0 --max-sequence-length 40000`).
    #[arg(last = true)]
    lwm_args: Vec<String>,
}

fn run_json(cmd: &mut Command, what: &str) -> Result<Value> {
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("{what} printed no JSON"))
}

fn compare(a: CompareArgs) -> Result<()> {
    if !a.peer_script.exists() {
        bail!(
            "peer script {} not found (run from the repository root or pass --peer-script)",
            a.peer_script.display()
        );
    }
    let lwm = match &a.lwm {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no directory for this binary")?
            .join("lwm"),
    };
    let (t, p, n, reps) = (
        a.threads.to_string(),
        a.prompt_tokens.to_string(),
        a.gen_tokens.to_string(),
        a.reps.to_string(),
    );
    let mut ours = Command::new(&lwm);
    ours.args([
        "bench", "--json", "-t", &t, "-p", &p, "-n", &n, "--reps", &reps,
    ])
    .args(["--warmup", &a.warmup.to_string()]);
    if let Some(m) = &a.model {
        ours.arg("--model").arg(m);
    }
    ours.args(&a.lwm_args);
    eprintln!("running lwm ...");
    let ours = run_json(&mut ours, &format!("{} bench", lwm.display()))?;
    let ours = ours.get("lwm").cloned().unwrap_or(ours);
    let model = ours["model"]
        .as_str()
        .context("lwm bench did not name its model")?
        .to_string();
    eprintln!("running llama.cpp peer ...");
    let peer = run_json(
        Command::new("python3")
            .arg(&a.peer_script)
            .args(["--model", &model, "--threads", &t])
            .args([
                "--prompt-tokens",
                &p,
                "--gen-tokens",
                &n,
                "--reps",
                &reps,
                "--json",
            ]),
        "the llama.cpp peer (pip install llama-cpp-python)",
    )?;
    let ratio = ratios(&ours, &peer);
    if a.json {
        let v = serde_json::json!({"lwm": ours, "llama_cpp": peer, "ratio": ratio});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "| engine | prefill {} tok/s (min-max) | decode {} tok/s (min-max) | peak RSS MB |",
        a.prompt_tokens, a.gen_tokens
    );
    println!("|---|---|---|---|");
    let f = |v: &Value, k: &str, s: &str| v[k][s].as_f64().unwrap_or(f64::NAN);
    for (name, v) in [("lwm", &ours), ("llama.cpp", &peer)] {
        println!(
            "| {name} | {:.1} ({:.1}-{:.1}) | {:.1} ({:.1}-{:.1}) | {:.0} |",
            f(v, "prefill_tok_s", "median"),
            f(v, "prefill_tok_s", "min"),
            f(v, "prefill_tok_s", "max"),
            f(v, "decode_tok_s", "median"),
            f(v, "decode_tok_s", "min"),
            f(v, "decode_tok_s", "max"),
            v["peak_rss_mb"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!(
        "| lwm / llama.cpp | {:.2}x | {:.2}x | {:.2}x |",
        ratio["prefill"], ratio["decode"], ratio["peak_rss"]
    );
    println!(
        "cpu pressure during lwm: {} -> {}; now: {}",
        ours["cpu_pressure_before"],
        ours["cpu_pressure_after"],
        lwm_core::cpu_pressure()
    );
    Ok(())
}

fn ratios(ours: &Value, peer: &Value) -> Value {
    let med = |v: &Value, k: &str| v[k]["median"].as_f64().unwrap_or(f64::NAN);
    let r = |x: f64| (x * 100.0).round() / 100.0;
    serde_json::json!({
        "prefill": r(med(ours, "prefill_tok_s") / med(peer, "prefill_tok_s")),
        "decode": r(med(ours, "decode_tok_s") / med(peer, "decode_tok_s")),
        "peak_rss": r(ours["peak_rss_mb"].as_f64().unwrap_or(f64::NAN) / peer["peak_rss_mb"].as_f64().unwrap_or(f64::NAN)),
    })
}

fn main() {
    let result = match Cli::parse().command {
        Cmd::Kernels {
            threads,
            reps,
            json,
        } => (|| {
            if reps == 0 {
                bail!("--reps must be at least 1");
            }
            lwm_core::set_threads(threads);
            let threads = lwm_core::memory_plan::worker_threads();
            println!("cpu pressure: {}", lwm_core::cpu_pressure());
            let v = kernels::run(threads, reps)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            Ok(())
        })(),
        Cmd::Compare(a) => compare(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
