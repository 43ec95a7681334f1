//! `lwm train` (the training loop of `lwm::train::run` with a progress bar, Ctrl-C saving a
//! checkpoint) and `lwm train-bench` (training tokens/s and peak memory per sequence length).

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use lwm::train::config::TrainConfig;
use lwm::train::model::{BatchInput, TrainModel};
use lwm::train::precision::ComputeDType;
use lwm::train::run::{run_on, RunOptions, TrainEvent};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Args)]
pub struct TrainArgs {
    /// Training config (TOML): [model], [data], [optim], [train], [[stages]].
    #[arg(short, long)]
    config: PathBuf,
    /// Continue from OUT/latest (weights, optimizer, data position, stage).
    #[arg(long)]
    resume: bool,
    /// Override train.out_dir.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override model.init (scratch, .gguf, HF directory, checkpoint directory).
    #[arg(long)]
    init: Option<String>,
    /// Override train.steps (single-stage runs).
    #[arg(long)]
    steps: Option<u64>,
    /// Override train.seq_len (single-stage runs).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Override optim.lr.
    #[arg(long)]
    lr: Option<f64>,
    /// Override train.dtype: precision of the matrix products (f32, or bf16 with f32
    /// master weights and optimizer state).
    #[arg(long)]
    dtype: Option<ComputeDType>,
    /// Worker threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// No progress bar (log lines only).
    #[arg(long)]
    quiet: bool,
    /// Override train.sp: ring attention over this many threads, or under `mpirun -n SP`
    /// (built with --features mpi) over the SP processes, each training on its 1/SP of
    /// every sequence.
    #[arg(long)]
    sp: Option<usize>,
    /// Seconds an MPI rank waits for another before naming it dead or hung (it also waits
    /// for rank 0 while that one writes a checkpoint).
    #[arg(long, default_value_t = 300.0)]
    ring_timeout: f64,
}

/// The ring of processes when `lwm train` was started by mpirun with more than one process.
fn process_ring(ring_timeout: f64) -> Result<Option<Arc<lwm::train::seq_parallel::SeqComm>>> {
    let Some(world) = crate::ring::mpi_world_size().filter(|&n| n > 1) else {
        return Ok(None);
    };
    if !(ring_timeout.is_finite() && ring_timeout > 0.0) {
        bail!("--ring-timeout must be a positive number of seconds");
    }
    #[cfg(feature = "mpi")]
    {
        let _ = world;
        let ring = lwm::ring::mpi::MpiRing::init()?;
        Ok(Some(lwm::train::seq_parallel::SeqComm::new(
            Box::new(ring),
            std::time::Duration::from_secs_f64(ring_timeout),
        )))
    }
    #[cfg(not(feature = "mpi"))]
    bail!("started by mpirun with {world} processes, but this lwm was built without MPI support (cargo build --features mpi)")
}

pub fn cmd_train(a: TrainArgs) -> Result<()> {
    lwm::set_threads(a.threads);
    let mut cfg = TrainConfig::load(&a.config)?;
    if let Some(o) = a.out {
        cfg.train.out_dir = o;
    }
    if let Some(i) = a.init {
        cfg.model.init = i;
    }
    if let Some(s) = a.steps {
        cfg.train.steps = s;
    }
    if let Some(l) = a.seq_len {
        cfg.train.seq_len = l;
    }
    if let Some(lr) = a.lr {
        cfg.optim.lr = lr;
    }
    if let Some(d) = a.dtype {
        cfg.train.dtype = d;
    }
    let comm = process_ring(a.ring_timeout)?;
    if let Some(c) = &comm {
        // Under mpirun the ring is the job's processes: sp defaults to their number.
        cfg.train.sp = a.sp.unwrap_or(c.size);
    } else if let Some(sp) = a.sp {
        cfg.train.sp = sp;
    }
    cfg.validate()?;
    let root = comm.as_ref().is_none_or(|c| c.rank == 0);
    let quiet = a.quiet || !root;
    let total: u64 = cfg.stages().iter().map(|s| s.steps).sum();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\ninterrupt: finishing this update and saving a checkpoint (Ctrl-C again to abort)"
        );
    });
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    let opts = RunOptions {
        resume: a.resume,
        stop: Some(stop),
        max_global_steps: None,
    };
    // A hidden bar swallows println: quiet runs print to stderr directly.
    let say = |line: String| {
        if !root {
            // Other ranks train in silence; rank 0 reports for the job.
        } else if quiet {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    let mut on_event = |e: TrainEvent| match e {
        TrainEvent::StageStart {
            stage,
            seq_len,
            theta,
            steps,
            from_step,
        } => {
            say(format!(
                "stage {stage}: seq_len {seq_len}, theta {theta}, {steps} steps (from step {from_step})"
            ));
        }
        TrainEvent::Step(s) => {
            bar.set_position(s.global_step);
            let eval = s
                .eval_loss
                .map(|e| format!(" eval {e:.4}"))
                .unwrap_or_default();
            bar.set_message(format!(
                "stage {} loss {:.4}{eval} | {:.0} tok/s | lr {:.2e}",
                s.stage, s.loss, s.tokens_per_s, s.lr
            ));
            if quiet || s.eval_loss.is_some() {
                say(serde_json::to_string(s).unwrap_or_default());
            }
        }
        TrainEvent::Saved(p) => say(format!("saved {}", p.display())),
        TrainEvent::SkippedLines(lines) => {
            for l in lines {
                say(format!("skipped malformed line {l}"));
            }
        }
    };
    let rank = comm.as_ref().map(|c| c.rank);
    let summary = run_on(&cfg, &opts, comm, &mut on_event);
    bar.finish_and_clear();
    let summary = match (summary, rank) {
        (Ok(s), _) => s,
        #[cfg(feature = "mpi")]
        (Err(e), Some(rank)) => {
            // One rank's error ends the job; a normal exit would leave the others waiting.
            use std::io::Write;
            eprintln!("error: [rank {rank}] {e:#}");
            let _ = std::io::stderr().flush();
            lwm::ring::mpi::abort_job(1)
        }
        (Err(e), _) => return Err(e),
    };
    if !root {
        return Ok(());
    }
    if summary.interrupted {
        eprintln!(
            "interrupted after {} updates; checkpoint {}; continue with --resume",
            summary.global_step,
            summary
                .last_checkpoint
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
    } else {
        eprintln!(
            "done: {} updates, final loss {}, checkpoint {} (loadable with `lwm generate -m DIR`)",
            summary.global_step,
            summary
                .final_loss
                .map(|l| format!("{l:.4}"))
                .unwrap_or("-".into()),
            summary
                .last_checkpoint
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct TrainBenchArgs {
    /// Sequence lengths (each measured in its own process, so peak memory is per length).
    #[arg(long, value_delimiter = ',', default_value = "512,1024,2048,4096,8192")]
    lengths: Vec<usize>,
    /// Timed training steps per length (after one warm-up step).
    #[arg(long, default_value_t = 2)]
    steps: usize,
    /// Hidden size of the synthetic model.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Transformer layers.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 259)]
    vocab: usize,
    /// Query and key rows per attention block.
    #[arg(long, default_value_t = 256)]
    chunk: usize,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Ring attention over this many threads (1: no ring).
    #[arg(long, default_value_t = 1)]
    sp: usize,
    /// Precision of the matrix products: f32 or bf16 (f32 weights and optimizer state).
    #[arg(long, default_value_t = ComputeDType::F32)]
    dtype: ComputeDType,
    /// Print one JSON line per length instead of the table.
    #[arg(long)]
    json: bool,
    /// Internal: measure one length in this process and print a JSON line.
    #[arg(long, hide = true)]
    one: Option<usize>,
}

fn bench_one(a: &TrainBenchArgs, len: usize) -> Result<serde_json::Value> {
    let cfg = lwm::config::ModelConfig {
        architecture: "llama".into(),
        vocab_size: a.vocab,
        hidden_size: a.hidden,
        intermediate_size: a.hidden * 2,
        num_hidden_layers: a.layers,
        num_attention_heads: a.heads,
        num_key_value_heads: a.heads,
        head_dim: a.hidden / a.heads,
        rms_norm_eps: 1e-6,
        theta: 10_000.0,
        rope_layout: lwm::config::RopeLayout::RotateHalf,
        rope_scaling: lwm::config::RopeScaling::None,
        max_sequence_length: len,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        vision_vocab_size: 0,
    };
    let mut model = TrainModel::init_normal(cfg, 0.02, 1)?;
    model.chunking = lwm::attention::Chunking {
        query_chunk: a.chunk,
        key_chunk: a.chunk,
    };
    model.sp = a.sp;
    model.compute = a.dtype;
    let mut rng = lwm::rng::XorShift::new(9);
    let tokens: Vec<u32> = (0..len + 1)
        .map(|_| 3 + (rng.next_u64() % 256) as u32)
        .collect();
    let input = BatchInput::plain(1, len, tokens[..len].to_vec());
    let targets = lwm::train::loss::Targets {
        tokens: tokens[1..].to_vec(),
        loss_mask: vec![1.0; len],
        vision_mask: None,
    };
    let mut opt = lwm::train::optim::AdamW::new(Default::default(), model.params());
    let mut step = || -> Result<()> {
        let logits = model.forward(&input)?;
        let loss = lwm::train::loss::lwm_loss(&logits.text, None, &targets)?;
        let grads = loss.backward()?;
        opt.accumulate(model.params(), &grads)?;
        opt.update(model.params())?;
        Ok(())
    };
    step()?;
    let mut times = Vec::new();
    let mut cpu = Vec::new();
    for _ in 0..a.steps.max(1) {
        let (t, c) = (Instant::now(), process_cpu_s());
        step()?;
        times.push(t.elapsed().as_secs_f64());
        cpu.push(process_cpu_s() - c);
    }
    times.sort_by(f64::total_cmp);
    cpu.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    Ok(serde_json::json!({
        "seq_len": len,
        "sp": a.sp,
        "dtype": a.dtype.name(),
        "threads": a.threads,
        "tokens_per_s": len as f64 / median,
        "step_s_min": times[0],
        "step_s_max": times[times.len() - 1],
        "cpu_s_per_step": cpu[cpu.len() / 2],
        "peak_rss_mib": lwm::peak_rss_bytes().unwrap_or(0) as f64 / (1 << 20) as f64,
        "params": model.parameter_count(),
    }))
}

/// User + system CPU seconds of this process (all threads) from /proc/self/stat, in clock
/// ticks of USER_HZ = 100 (Linux on x86): on a shared machine CPU time is steadier than wall
/// time and shows how many cores a step used.
fn process_cpu_s() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<u64>() as f64 / 100.0
}

pub fn cmd_train_bench(a: TrainBenchArgs) -> Result<()> {
    lwm::set_threads(a.threads);
    if let Some(len) = a.one {
        println!("{}", bench_one(&a, len)?);
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating the lwm binary")?;
    if !a.json {
        println!(
            "{:>8} {:>12} {:>12} {:>14}",
            "seq_len", "tokens/s", "step s", "peak RSS MiB"
        );
    }
    for &len in &a.lengths {
        let out = std::process::Command::new(&exe)
            .args(["train-bench", "--one", &len.to_string()])
            .args([
                "--steps",
                &a.steps.to_string(),
                "--hidden",
                &a.hidden.to_string(),
            ])
            .args([
                "--layers",
                &a.layers.to_string(),
                "--heads",
                &a.heads.to_string(),
            ])
            .args([
                "--vocab",
                &a.vocab.to_string(),
                "--chunk",
                &a.chunk.to_string(),
            ])
            .args([
                "--threads",
                &a.threads.to_string(),
                "--sp",
                &a.sp.to_string(),
                "--dtype",
                a.dtype.name(),
            ])
            .output()
            .context("running the per-length measurement")?;
        if !out.status.success() {
            bail!("seq_len {len}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        if a.json {
            println!("{v}");
            continue;
        }
        println!(
            "{:>8} {:>12.0} {:>12.3} {:>14.1}",
            len,
            v["tokens_per_s"].as_f64().unwrap_or(0.0),
            len as f64 / v["tokens_per_s"].as_f64().unwrap_or(1.0),
            v["peak_rss_mib"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}
