//! `lwm bench`: prefill and decode throughput and peak RSS (`lwm-bench compare` runs it
//! next to llama.cpp on the same file; `lwm-bench kernels` probes the kernels).
//!
//! Method (same as the peer script): a prompt of exactly `--prompt-tokens` seeded random
//! ids is prefilled into an empty cache; then `--gen-tokens` greedy steps decode one token
//! each. `--warmup` untimed runs (default 1), then `--reps` timed repetitions; median,
//! min and max. Prompts of 16384 tokens or more print their prefill progress. `--batch B`
//! prefills B prompts (one seed each) and decodes them together, one `forward_batch` per
//! step (what the server does for B clients); the figures count all B sequences' tokens.

use crate::ModelArgs;
use anyhow::{bail, Result};
use clap::Args;
use lwm::model::SeqInput;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length for the prefill measurement.
    #[arg(short = 'p', long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens decoded after the prompt.
    #[arg(short = 'n', long, default_value_t = 128)]
    gen_tokens: usize,
    /// Timed repetitions of each case (the spread is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Sequences decoded together (continuous batching's forward: one pass over all of
    /// them per step); prefill and decode figures count the tokens of all of them.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Untimed runs before the timed ones (0 for a single very long run).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Time the VQGAN instead of a language model: encode and decode of 256×256 frames with
    /// a real-size VQGAN (LWM's config, random weights), ms per frame. No model is loaded.
    #[arg(long)]
    vqgan: bool,
    /// Frames per VQGAN call (`--vqgan`): a video's frames go through the network together.
    #[arg(long, default_value_t = 1)]
    frames: usize,
}

fn stats(v: &[f64]) -> serde_json::Value {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let median = if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    };
    let r2 = |x: f64| (x * 100.0).round() / 100.0;
    serde_json::json!({"median": r2(median), "min": r2(s[0]), "max": r2(s[s.len() - 1]), "runs": s.iter().map(|&x| r2(x)).collect::<Vec<_>>()})
}

fn prompt_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = lwm::rng::XorShift::new(seed);
    // Skip the first 256 ids (special and byte tokens in most vocabularies).
    (0..n)
        .map(|_| (256 + rng.next_u64() % (vocab as u64 - 256)) as u32)
        .collect()
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.vqgan {
        return run_vqgan(&a);
    }
    if a.prompt_tokens == 0 || a.gen_tokens == 0 || a.reps == 0 || a.batch == 0 {
        bail!("--prompt-tokens, --gen-tokens, --reps and --batch must be at least 1");
    }
    let pressure_before = lwm::cpu_pressure();
    let t_load = Instant::now();
    let engine = a.model.load()?;
    let load_s = t_load.elapsed().as_secs_f64();
    let cfg = engine.config();
    if a.prompt_tokens + a.gen_tokens > engine.context_length() {
        bail!(
            "--prompt-tokens + --gen-tokens = {} exceeds the context {}",
            a.prompt_tokens + a.gen_tokens,
            engine.context_length()
        );
    }
    let prompts: Vec<Vec<u32>> = (0..a.batch)
        .map(|b| prompt_ids(a.prompt_tokens, cfg.vocab_size, b as u64))
        .collect();
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for rep in 0..a.warmup + a.reps {
        let t0 = Instant::now();
        let mut caches = Vec::with_capacity(a.batch);
        let mut next = Vec::with_capacity(a.batch);
        for ids in &prompts {
            let mut cache = engine.model.new_cache();
            // As `lwm generate` does: room for the whole run up front, so the peak RSS is
            // the cache's size, not that of per-head buffers grown by doubling as they fill.
            cache.reserve_total(a.prompt_tokens + a.gen_tokens);
            let mut last_report = Instant::now();
            let logits = engine
                .model
                .prefill(ids, &mut cache, a.model.prefill_chunk, |done| {
                    // Long prompts take minutes to hours: one line every 30 s (works in logs too).
                    if ids.len() >= 16384 && !a.json && last_report.elapsed().as_secs() >= 30 {
                        last_report = Instant::now();
                        let secs = t0.elapsed().as_secs_f64();
                        let rate = done as f64 / secs.max(1e-9);
                        eprintln!(
                            "  prefill {done}/{} tokens, {rate:.1} tok/s, {:.0} s elapsed, eta {:.0} s",
                            ids.len(),
                            secs,
                            (ids.len() - done) as f64 / rate.max(1e-9)
                        );
                    }
                })?;
            next.push(argmax(&logits));
            caches.push(cache);
        }
        let tp = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for _ in 0..a.gen_tokens {
            let ids: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let mut inputs: Vec<SeqInput<'_>> = caches
                .iter_mut()
                .zip(&ids)
                .map(|(cache, ids)| SeqInput {
                    ids,
                    cache,
                    all_logits: false,
                    vision: None,
                })
                .collect();
            let logits = engine.model.forward_batch(&mut inputs)?;
            next = logits.iter().map(|l| argmax(l)).collect();
        }
        let td = t1.elapsed().as_secs_f64();
        let (tp, td) = (tp / a.batch as f64, td / a.batch as f64);
        let timed = rep >= a.warmup;
        if timed {
            prefill.push(a.prompt_tokens as f64 / tp);
            decode.push(a.gen_tokens as f64 / td);
        }
        if !a.json {
            eprintln!(
                "{} {}: prefill {:.1} tok/s, decode {:.1} tok/s",
                if timed { "rep" } else { "warm-up" },
                if timed { rep - a.warmup + 1 } else { rep + 1 },
                a.prompt_tokens as f64 / tp,
                a.gen_tokens as f64 / td
            );
        }
    }
    let rss_mb = lwm::peak_rss_bytes()
        .map(|b| b as f64 / 1e6)
        .unwrap_or(f64::NAN);
    let ours = serde_json::json!({
        "engine": "lwm",
        "model": engine.location.path(),
        "threads": if a.model.threads == 0 { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) } else { a.model.threads },
        "prompt_tokens": a.prompt_tokens,
        "gen_tokens": a.gen_tokens,
        "batch": a.batch,
        "prefill_tok_s": stats(&prefill),
        "decode_tok_s": stats(&decode),
        "peak_rss_mb": (rss_mb * 10.0).round() / 10.0,
        "load_s": (load_s * 100.0).round() / 100.0,
        "cpu_pressure_before": pressure_before,
        "cpu_pressure_after": lwm::cpu_pressure(),
    });
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "lwm": ours }))?
        );
        return Ok(());
    }
    let med = |v: &serde_json::Value, k: &str| v[k]["median"].as_f64().unwrap_or(f64::NAN);
    println!(
        "| engine | prefill {} tok/s (min-max) | decode {} tok/s (min-max) | peak RSS MB |",
        a.prompt_tokens, a.gen_tokens
    );
    println!("|---|---|---|---|");
    let row = |name: &str, v: &serde_json::Value| {
        println!(
            "| {name} | {:.1} ({:.1}-{:.1}) | {:.1} ({:.1}-{:.1}) | {:.0} |",
            med(v, "prefill_tok_s"),
            v["prefill_tok_s"]["min"].as_f64().unwrap_or(f64::NAN),
            v["prefill_tok_s"]["max"].as_f64().unwrap_or(f64::NAN),
            med(v, "decode_tok_s"),
            v["decode_tok_s"]["min"].as_f64().unwrap_or(f64::NAN),
            v["decode_tok_s"]["max"].as_f64().unwrap_or(f64::NAN),
            v["peak_rss_mb"].as_f64().unwrap_or(f64::NAN)
        )
    };
    row("lwm", &ours);
    println!(
        "cpu pressure before: {}; after: {}",
        ours["cpu_pressure_before"], ours["cpu_pressure_after"]
    );
    Ok(())
}

/// `lwm bench --vqgan`: encode (frames → codes) and decode (codes → frames) of `--frames`
/// random 256×256 frames through LWM's real-size VQGAN with random weights; `--warmup`
/// untimed runs, then `--reps` timed ones; milliseconds per frame.
fn run_vqgan(a: &BenchArgs) -> Result<()> {
    use lwm::vqgan::Vqgan;
    if a.reps == 0 || a.frames == 0 {
        bail!("--reps and --frames must be at least 1");
    }
    lwm::set_threads(a.model.threads);
    let pressure_before = lwm::cpu_pressure();
    let model = Vqgan::from_arrays(lwm::vqgan::lwm_shaped_random_arrays(3))?;
    let (n, size) = (a.frames, 256);
    let x = lwm::rng::XorShift::new(7).vec(n * size * size * 3, -1.0, 1.0);
    let grid = size / model.factor;
    let (mut enc, mut dec) = (Vec::new(), Vec::new());
    for rep in 0..a.warmup + a.reps {
        let t = Instant::now();
        let codes = model.encode(&x, n, size, size)?;
        let te = t.elapsed().as_secs_f64() * 1e3 / n as f64;
        let t = Instant::now();
        let frames = model.decode(&codes, n, grid, grid)?;
        let td = t.elapsed().as_secs_f64() * 1e3 / n as f64;
        std::hint::black_box(frames);
        if rep >= a.warmup {
            enc.push(te);
            dec.push(td);
        }
        if !a.json {
            eprintln!(
                "{} {}: encode {te:.0} ms/frame, decode {td:.0} ms/frame",
                if rep < a.warmup { "warmup" } else { "rep" },
                rep + 1
            );
        }
    }
    let rss_mb = lwm::peak_rss_bytes().map_or(f64::NAN, |b| b as f64 / 1e6);
    let threads = if a.model.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        a.model.threads
    };
    let out = serde_json::json!({
        "engine": "lwm",
        "vqgan": "LWM config (256 px, hidden 128, mult 1,2,2,4,6; 146,244,675 params), random weights",
        "frame_size": size,
        "frames_per_call": n,
        "threads": threads,
        "avx2": lwm::quant::has_avx2(),
        "encode_ms_per_frame": stats(&enc),
        "decode_ms_per_frame": stats(&dec),
        "peak_rss_mb": (rss_mb * 10.0).round() / 10.0,
        "cpu_pressure_before": pressure_before,
        "cpu_pressure_after": lwm::cpu_pressure(),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "VQGAN 256×256, {n} frame(s) per call, {threads} threads: encode {:.0} ms/frame, decode {:.0} ms/frame (median of {}); peak RSS {:.0} MB",
            out["encode_ms_per_frame"]["median"].as_f64().unwrap_or(f64::NAN),
            out["decode_ms_per_frame"]["median"].as_f64().unwrap_or(f64::NAN),
            a.reps,
            rss_mb
        );
    }
    Ok(())
}
