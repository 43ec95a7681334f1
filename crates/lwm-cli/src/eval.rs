//! `lwm eval ruler|report|compare`: the RULER-style long-context suite (lwm::ruler).

use crate::ModelArgs;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use lwm::needle::haystack::Haystack;
use lwm::ruler::report::{compare_table, DEFAULT_THRESHOLD};
use lwm::ruler::run::{run_samples, RunOptions, SampleResult};
use lwm::ruler::synth::{make_sample, ChatWrap, Material, QaData, Sample};
use lwm::ruler::tasks::{parse_tasks, QaDataset};
use lwm::ruler::{
    input, write_report, ResultsFile, RunParams, SamplesFile, CHART_FILE, RESULTS_FILE,
    SAMPLES_FILE, SUMMARY_FILE,
};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Instant;

#[derive(Args)]
pub struct EvalArgs {
    #[command(subcommand)]
    command: EvalCommand,
}

#[derive(Subcommand)]
enum EvalCommand {
    /// RULER's synthetic tasks over a grid of lengths (resumable), or RULER's own files
    /// with --input.
    #[command(
        after_help = "Examples:\n  lwm eval ruler --lengths 1024,2048,4096,8192 --tasks all --samples 4 --out runs/ruler\n  lwm eval ruler -m model.gguf --kv-type q8_0 --tasks niah_single_1,vt --out runs/q8\n  lwm eval ruler -m model.gguf --input RULER/data/niah_single_1/validation.jsonl --out preds/\n  lwm eval compare runs/ruler runs/q8"
    )]
    Ruler(Box<RulerArgs>),
    /// Re-render a RULER run directory's summary, chart and table.
    Report {
        /// A run directory of `lwm eval ruler --out`.
        dir: PathBuf,
    },
    /// One table over several RULER run directories (KV types and policies side by side).
    Compare {
        /// Run directories of `lwm eval ruler --out`.
        dirs: Vec<PathBuf>,
    },
}

#[derive(Args)]
struct RulerArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Lengths in tokens (prompt + answer budget), comma-separated.
    #[arg(long, default_value = "1024,2048,4096,8192")]
    lengths: String,
    /// `all` (RULER's 11 synthetic tasks, and qa_1/qa_2 when their files are given) or a
    /// comma list: niah_single_1..3, niah_multikey_1..3, niah_multivalue, niah_multiquery,
    /// vt, cwe, fwe, qa_1, qa_2.
    #[arg(long, default_value = "all")]
    tasks: String,
    /// Samples per task and length.
    #[arg(long, default_value_t = 4)]
    samples: usize,
    /// Seed of every sample (RULER's default 42).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// SQuAD v2 dev JSON (RULER's qa_1; its `json/squad.json`): enables qa_1.
    #[arg(long)]
    qa_squad: Option<PathBuf>,
    /// HotpotQA dev JSON (RULER's qa_2; its `json/hotpotqa.json`): enables qa_2.
    #[arg(long)]
    qa_hotpotqa: Option<PathBuf>,
    /// Prose for the essay haystacks (default: the bundled public-domain text).
    #[arg(long)]
    haystack: Vec<PathBuf>,
    /// The effective length is the longest length whose average stays at or above this.
    #[arg(long, default_value_t = DEFAULT_THRESHOLD)]
    threshold: f64,
    /// Run RULER's own task files (JSONL from its prepare.py) instead of generating;
    /// predictions go to OUT/<task>.jsonl with a `pred` field.
    #[arg(long)]
    input: Vec<PathBuf>,
    /// KV-cache policy: `full`, `sinks:N,window:W` (StreamingLLM's attention sinks and a
    /// recent window) or `snapkv:BUDGET[,window:OBS][,kernel:K]` (SnapKV).
    #[arg(long, default_value = "full")]
    kv_policy: lwm::kv::KvPolicy,
    /// Run directory (samples, results, summary, chart), or with --input the folder of
    /// prediction files.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    ring: crate::ring::RingArgs,
}

pub fn run(a: EvalArgs) -> Result<()> {
    match a.command {
        EvalCommand::Ruler(a) if !a.input.is_empty() => cmd_input(*a),
        EvalCommand::Ruler(a) => cmd_ruler(*a),
        EvalCommand::Report { dir } => {
            if !dir.is_dir() {
                bail!("{} is not a directory", dir.display());
            }
            let s = write_report(&dir)?;
            print!("{}", s.table());
            eprintln!("wrote {SUMMARY_FILE} and {CHART_FILE} in {}", dir.display());
            Ok(())
        }
        EvalCommand::Compare { dirs } => {
            if dirs.is_empty() {
                bail!("name one or more run directories of `lwm eval ruler --out`");
            }
            let runs = dirs
                .iter()
                .map(|d| write_report(d))
                .collect::<Result<Vec<_>>>()?;
            print!("{}", compare_table(&runs));
            Ok(())
        }
    }
}

fn parse_lengths(s: &str) -> Result<Vec<usize>> {
    let mut v = s
        .split(',')
        .map(|t| {
            let t = t.trim();
            t.parse::<usize>()
                .ok()
                .filter(|&v| v > 0)
                .with_context(|| format!("--lengths: '{t}' is not a positive integer"))
        })
        .collect::<Result<Vec<_>>>()?;
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

fn bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{bar:30}} {{msg}} | {{pos}}/{{len}} {what}, {{elapsed}} elapsed, eta {{eta}}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Make the engine ready for prompts up to `longest` tokens: lengths beyond the trained
/// context run (with a note); what cannot fit in memory is refused before any work.
fn prepare_context(engine: &mut lwm::generate::Engine, longest: usize, chunk: usize) -> Result<()> {
    let trained = engine.context_length();
    if longest > trained {
        eprintln!(
            "note: length {longest} is beyond the model's trained context ({trained} tokens); running it anyway"
        );
        engine.set_context_length(longest);
    }
    if let Some(avail) = lwm::memory_plan::available_memory() {
        engine
            .memory_plan(longest, chunk)
            .check_fits(0, &avail)
            .with_context(|| {
                format!("length {longest} does not fit; drop the longest --lengths")
            })?;
    }
    Ok(())
}

fn cmd_ruler(a: RulerArgs) -> Result<()> {
    let t0 = Instant::now();
    let mut qa = Vec::new();
    if let Some(p) = &a.qa_squad {
        qa.push((QaDataset::Squad, QaData::read(p, QaDataset::Squad)?));
    }
    if let Some(p) = &a.qa_hotpotqa {
        qa.push((QaDataset::HotpotQa, QaData::read(p, QaDataset::HotpotQa)?));
    }
    let at_hand: Vec<QaDataset> = qa.iter().map(|(d, _)| *d).collect();
    let tasks = parse_tasks(&a.tasks, &at_hand)?;
    let lengths = parse_lengths(&a.lengths)?;
    if a.samples == 0 {
        bail!("--samples must be at least 1");
    }
    if !(0.0..=100.0).contains(&a.threshold) {
        bail!("--threshold {} is not a percentage", a.threshold);
    }
    let longest = *lengths.last().context("--lengths: none given")?;
    let mut engine = a.model.load()?;
    if crate::ring::mpi_rank().is_some_and(|r| r > 0) {
        // Another rank of `mpirun ... eval ruler --mesh-dim`: it serves rank 0's ring.
        engine.set_context_length(engine.context_length().max(longest));
        a.ring.run(&engine, |_| Ok(()))?;
        return Ok(());
    }
    prepare_context(&mut engine, longest, a.model.prefill_chunk)?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create run directory {}", a.out.display()))?;
    let haystack = Haystack::load(&a.haystack)?;
    let wrap = ChatWrap::new(engine.own_chat_template(), &engine.tokenizer)?;
    let params = RunParams {
        model: engine.location.path().display().to_string(),
        tasks: tasks.iter().map(|t| t.name.to_string()).collect(),
        context_lengths: lengths.clone(),
        samples: a.samples,
        seed: a.seed,
        haystack: haystack.name.clone(),
        chat_format: wrap.name.clone(),
        kv_type: engine.model.options.kv_types().name(),
        kv_policy: a.kv_policy.to_string(),
        threshold: a.threshold,
    };
    params.write_or_check(&a.out)?;

    // The samples: those already drawn in this directory, then the missing ones.
    let samples_file = SamplesFile::new(a.out.join(SAMPLES_FILE));
    let loaded = samples_file.load_for_resume()?;
    if let Some(note) = &loaded.repaired {
        eprintln!("note: {note}");
    }
    let mut samples: HashMap<String, Sample> = loaded
        .results
        .into_iter()
        .map(|s| (s.id.clone(), s))
        .collect();
    let mut grid = Vec::new();
    for &len in &lengths {
        for t in &tasks {
            for i in 0..a.samples {
                grid.push((*t, len, i, format!("{}/{len}/{i}", t.name)));
            }
        }
    }
    let missing: Vec<_> = grid
        .iter()
        .filter(|g| !samples.contains_key(&g.3))
        .collect();
    if !missing.is_empty() {
        let mut material = Material::from_text(&haystack.text)?;
        material.qa = std::mem::take(&mut qa);
        let b = bar(missing.len() as u64, "samples drawn");
        for (t, len, i, _) in missing {
            b.set_message(format!("{} at {len}", t.name));
            let s = make_sample(t, *len, *i, a.seed, &wrap, &engine.tokenizer, &material)?;
            samples_file.append(&s)?;
            samples.insert(s.id.clone(), s);
            b.inc(1);
        }
        b.finish_and_clear();
    }

    let results_path = a.out.join(RESULTS_FILE);
    let results_file = ResultsFile::new(&results_path);
    let loaded = results_file.load_for_resume()?;
    if let Some(note) = &loaded.repaired {
        eprintln!("note: {note}");
    }
    let done: HashSet<String> = loaded.results.iter().map(|r| r.id.clone()).collect();
    let todo: Vec<&Sample> = grid
        .iter()
        .filter(|g| !done.contains(&g.3))
        .map(|g| &samples[&g.3])
        .collect();
    if !done.is_empty() {
        eprintln!(
            "resuming {}: {} of {} samples already done",
            a.out.display(),
            grid.len() - todo.len(),
            grid.len()
        );
    }
    let work: u64 = todo.iter().map(|s| s.length as u64).sum();
    let b = bar(work, "tokens");
    let total = todo.len();
    b.set_message(format!("sample 0/{total}"));
    let interrupt = crate::needle::interrupt_flag("sample");
    let opts = RunOptions {
        prefill_chunk: a.model.prefill_chunk,
        stop: engine
            .chat_template
            .as_ref()
            .map(|t| t.stop_strings())
            .unwrap_or_default(),
        kv_policy: a.kv_policy,
    };
    let mut n = 0usize;
    let mut on_result = |r: &SampleResult| {
        results_file.append(r)?;
        n += 1;
        b.inc((r.prompt_tokens + r.generated_tokens.max(1)) as u64);
        b.set_message(format!(
            "sample {n}/{total} ({} at {})",
            r.task, r.context_length
        ));
        Ok(())
    };
    let on_ring = |s: &mut lwm::ring::RingSession| {
        let mut generate = |req: &lwm::generate::GenerateRequest,
                            on_text: &mut dyn FnMut(&str) -> bool| {
            engine.generate_on_ring(req, s, on_text)
        };
        run_samples(
            &mut generate,
            &engine.tokenizer,
            &wrap,
            &todo,
            &opts,
            &interrupt,
            &mut on_result,
        )
    };
    let totals = match a.ring.run(&engine, on_ring)? {
        crate::ring::Role::Root(t) => t,
        crate::ring::Role::Worker => return Ok(()),
        crate::ring::Role::Single => {
            let mut cache = engine.model.new_cache();
            let mut generate =
                |req: &lwm::generate::GenerateRequest, on_text: &mut dyn FnMut(&str) -> bool| {
                    engine.generate_with_cache(req, &mut cache, on_text)
                };
            run_samples(
                &mut generate,
                &engine.tokenizer,
                &wrap,
                &todo,
                &opts,
                &interrupt,
                &mut on_result,
            )?
        }
    };
    b.finish_and_clear();
    let summary = write_report(&a.out)?;
    print!("{}", summary.table());
    eprintln!(
        "this run: {} samples, {} prompt tokens, {} generated, {:.1}s wall; wrote {RESULTS_FILE}, {SUMMARY_FILE}, {CHART_FILE} in {}",
        totals.samples,
        totals.prompt_tokens,
        totals.generated_tokens,
        t0.elapsed().as_secs_f64(),
        a.out.display()
    );
    if totals.interrupted {
        eprintln!(
            "interrupted: {} of {} samples done; run the same command again to resume",
            summary.samples_done, summary.samples_total
        );
        std::process::exit(130);
    }
    Ok(())
}

/// RULER's own files: run each line, append it with `pred` to OUT/<task>.jsonl, score.
fn cmd_input(a: RulerArgs) -> Result<()> {
    let files = a
        .input
        .iter()
        .map(|p| Ok((p.clone(), input::task_name(p), input::read(p)?)))
        .collect::<Result<Vec<_>>>()?;
    let mut engine = a.model.load()?;
    let wrap = ChatWrap::new(engine.own_chat_template(), &engine.tokenizer)?;
    // Prompts are RULER's text, chat format included: tokenize, then size the context.
    let mut longest = 0;
    let mut prompts = Vec::new();
    for (_, _, lines) in &files {
        let mut ids = Vec::new();
        for l in lines {
            let p = wrap.encode(
                &engine.tokenizer,
                &format!("{}{}", l.input, l.answer_prefix),
            )?;
            longest = longest.max(p.len() + 128);
            ids.push(p);
        }
        prompts.push(ids);
    }
    if crate::ring::mpi_rank().is_some_and(|r| r > 0) {
        engine.set_context_length(engine.context_length().max(longest));
        a.ring.run(&engine, |_| Ok(()))?;
        return Ok(());
    }
    prepare_context(&mut engine, longest, a.model.prefill_chunk)?;
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let interrupt = crate::needle::interrupt_flag("sample");
    let stop = engine
        .chat_template
        .as_ref()
        .map(|t| t.stop_strings())
        .unwrap_or_default();
    let run_all = |generate: &mut lwm::needle::run::Generator| -> Result<bool> {
        for ((_, task, lines), ids) in files.iter().zip(&prompts) {
            let pred_path = input::pred_path(&a.out, task);
            let done = input::done_count(&pred_path, lines)?;
            let todo: Vec<_> = lines.iter().zip(ids).skip(done).collect();
            let b = bar(todo.len() as u64, "samples");
            b.set_message(task.clone());
            for (line, ids) in todo {
                let budget = line
                    .raw
                    .get("length")
                    .and_then(serde_json::Value::as_u64)
                    .map(|l| (l as usize).saturating_sub(ids.len()))
                    .filter(|&g| g > 0)
                    .unwrap_or(
                        lwm::ruler::tasks::Task::by_name(task)
                            .map_or(128, |t| t.tokens_to_generate()),
                    );
                let mut req = lwm::generate::GenerateRequest::new(
                    ids.clone(),
                    budget,
                    lwm::needle::run::greedy(),
                );
                req.stop = stop.clone();
                req.prefill_chunk = a.model.prefill_chunk;
                req.kv_policy = a.kv_policy;
                let out = generate(&req, &mut |_| !interrupt.load(Ordering::SeqCst))?;
                if out.finish_reason == lwm::generate::FinishReason::Cancelled {
                    return Ok(true);
                }
                input::append_pred(&pred_path, line, &out.text)?;
                b.inc(1);
            }
            b.finish_and_clear();
        }
        Ok(false)
    };
    let on_ring = |s: &mut lwm::ring::RingSession| {
        let mut generate = |req: &lwm::generate::GenerateRequest,
                            on_text: &mut dyn FnMut(&str) -> bool| {
            engine.generate_on_ring(req, s, on_text)
        };
        run_all(&mut generate)
    };
    let interrupted = match a.ring.run(&engine, on_ring)? {
        crate::ring::Role::Root(i) => i,
        crate::ring::Role::Worker => return Ok(()),
        crate::ring::Role::Single => {
            let mut cache = engine.model.new_cache();
            let mut generate =
                |req: &lwm::generate::GenerateRequest, on_text: &mut dyn FnMut(&str) -> bool| {
                    engine.generate_with_cache(req, &mut cache, on_text)
                };
            run_all(&mut generate)?
        }
    };
    println!(
        "{:24} {:>8} {:>8} {:>8}",
        "task", "score", "nulls", "samples"
    );
    let mut scores = serde_json::Map::new();
    for (_, task, _) in &files {
        let (score, nulls, n) = input::score_file(&input::pred_path(&a.out, task), task)?;
        println!("{task:24} {score:>8.2} {nulls:>8} {n:>8}");
        scores.insert(
            task.clone(),
            serde_json::json!({"score": score, "nulls": nulls, "samples": n}),
        );
    }
    let p = a.out.join("scores.json");
    std::fs::write(&p, serde_json::to_string_pretty(&scores)? + "\n")
        .with_context(|| format!("cannot write {}", p.display()))?;
    if interrupted {
        eprintln!("interrupted: run the same command again to resume");
        std::process::exit(130);
    }
    Ok(())
}
