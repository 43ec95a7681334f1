//! `lwm needle create|run|report`: the needle-in-a-haystack evaluation (lwm::needle).

use crate::ModelArgs;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use lwm::needle::haystack::Haystack;
use lwm::needle::results::{check_against_set, ResultsFile};
use lwm::needle::run::{
    order_for_prefix_reuse, planned_prefill, run_cells, run_cells_on, RunOptions,
};
use lwm::needle::set::{create_set, NeedleSet, PromptFormat, SetParams};
use lwm::needle::{write_report, HEATMAP_FILE, RESULTS_FILE, SET_FILE, SUMMARY_FILE};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Args)]
pub struct NeedleArgs {
    #[command(subcommand)]
    command: NeedleCommand,
}

#[derive(Subcommand)]
enum NeedleCommand {
    /// Build an evaluation set (JSONL) from a seed, cut with the model's tokenizer.
    Create(CreateArgs),
    /// Run the grid greedily, score, and write results, summary, heatmap (resumable).
    Run(RunArgs),
    /// Re-render the summary, heatmap and table of a run directory.
    Report(ReportArgs),
}

#[derive(Args, Clone)]
struct GridArgs {
    /// Context lengths in tokens (prompt + answer budget), comma-separated.
    #[arg(long, default_value = "1024,2048,4096,8192")]
    context_lengths: String,
    /// Needle depths in percent: a comma list (0,10,20) or START:END:STEP.
    #[arg(long, default_value = "0:100:10")]
    depths: String,
    /// Needles per prompt (N); more than one makes a multi-needle set.
    #[arg(long, default_value_t = 1)]
    needles: usize,
    /// Needles asked for (R <= N); default: all of them.
    #[arg(long)]
    retrieve: Option<usize>,
    /// Prompts per cell, each over a different stretch of the haystack.
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Seed of the needles and their positions (the same seed gives the same set).
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Tokens the answer may take (each prompt is context length minus this).
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Haystack text files or directories (default: the bundled public-domain prose).
    #[arg(long)]
    haystack: Vec<PathBuf>,
}

#[derive(Args)]
struct CreateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    grid: GridArgs,
    /// Output JSONL file.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    grid: GridArgs,
    /// Run directory: set.jsonl, results.jsonl, summary.json, heatmap.png.
    #[arg(long)]
    out: PathBuf,
    /// Run this set (from `lwm needle create`) instead of building one from the flags.
    #[arg(long)]
    set: Option<PathBuf>,
    #[command(flatten)]
    ring: crate::ring::RingArgs,
}

#[derive(Args)]
struct ReportArgs {
    /// A run directory of `lwm needle run`.
    dir: PathBuf,
}

fn parse_lengths(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|t| {
            let t = t.trim();
            t.parse::<usize>()
                .ok()
                .filter(|&v| v > 0)
                .with_context(|| format!("--context-lengths: '{t}' is not a positive integer"))
        })
        .collect()
}

fn parse_depths(s: &str) -> Result<Vec<u32>> {
    let parts: Vec<&str> = s.split(':').collect();
    let depths: Vec<u32> = match parts.as_slice() {
        [start, end, step] => {
            let num = |t: &str| {
                t.trim()
                    .parse::<u32>()
                    .with_context(|| format!("--depths: '{t}' is not a whole percentage"))
            };
            let (a, b, st) = (num(start)?, num(end)?, num(step)?);
            if st == 0 || a > b {
                bail!("--depths {s}: need START <= END and STEP >= 1");
            }
            (a..=b).step_by(st as usize).collect()
        }
        [_] => s
            .split(',')
            .map(|t| {
                t.trim()
                    .parse::<u32>()
                    .with_context(|| format!("--depths: '{}' is not a whole percentage", t.trim()))
            })
            .collect::<Result<_>>()?,
        _ => bail!("--depths {s}: use a comma list (0,50,100) or START:END:STEP"),
    };
    Ok(depths)
}

impl GridArgs {
    fn params(&self, haystack: &Haystack) -> Result<SetParams> {
        let mut context_lengths = parse_lengths(&self.context_lengths)?;
        context_lengths.sort_unstable();
        context_lengths.dedup();
        let mut depths = parse_depths(&self.depths)?;
        depths.sort_unstable();
        depths.dedup();
        let p = SetParams {
            context_lengths,
            depths,
            needles: self.needles,
            retrieve: self.retrieve.unwrap_or(self.needles),
            samples: self.samples,
            seed: self.seed,
            answer_tokens: self.max_new_tokens,
            haystack: haystack.name.clone(),
        };
        p.validate()?;
        Ok(p)
    }
}

pub fn run(a: NeedleArgs) -> Result<()> {
    match a.command {
        NeedleCommand::Create(a) => cmd_create(a),
        NeedleCommand::Run(a) => cmd_run(a),
        NeedleCommand::Report(a) => cmd_report(a),
    }
}

fn cmd_create(a: CreateArgs) -> Result<()> {
    let haystack = Haystack::load(&a.grid.haystack)?;
    let params = a.grid.params(&haystack)?;
    let engine = a.model.load()?;
    let model = engine.location.path().display().to_string();
    let set = create_set(
        &params,
        &haystack,
        &engine.tokenizer,
        engine.own_chat_template(),
        &model,
    )?;
    set.write(&a.out)?;
    eprintln!(
        "{} prompts ({} lengths x {} depths x {} samples, {} needle(s), {} asked) -> {}",
        set.cases.len(),
        params.context_lengths.len(),
        if params.is_multi() {
            1
        } else {
            params.depths.len()
        },
        params.samples,
        params.needles,
        params.retrieve,
        a.out.display()
    );
    Ok(())
}

/// The run directory's set: the one already there (it must match the flags), the one
/// given with --set, or a new one built from the flags.
fn load_or_create_set(a: &RunArgs, engine: &lwm::generate::Engine) -> Result<NeedleSet> {
    let set_path = a.out.join(SET_FILE);
    let given = a.set.as_ref().map(|p| NeedleSet::read(p)).transpose()?;
    if set_path.exists() {
        let existing = NeedleSet::read(&set_path)?;
        match &given {
            Some(g) if g != &existing => bail!(
                "{} already holds a different set than {}; use a new --out",
                a.out.display(),
                a.set
                    .as_ref()
                    .map_or(String::new(), |p| p.display().to_string())
            ),
            Some(_) => {}
            None => {
                let haystack = Haystack::load(&a.grid.haystack)?;
                let params = a.grid.params(&haystack)?;
                if params != existing.header.needle_set {
                    bail!(
                        "{} was started with other parameters ({}); repeat that run's flags to resume it, or use a new --out",
                        a.out.display(),
                        serde_json::to_string(&existing.header.needle_set)?
                    );
                }
            }
        }
        return Ok(existing);
    }
    let set = match given {
        Some(s) => s,
        None => {
            let haystack = Haystack::load(&a.grid.haystack)?;
            let params = a.grid.params(&haystack)?;
            create_set(
                &params,
                &haystack,
                &engine.tokenizer,
                engine.own_chat_template(),
                &engine.location.path().display().to_string(),
            )?
        }
    };
    set.write(&set_path)?;
    Ok(set)
}

/// Ctrl-C stops after the current `unit` (a cell, a sample): finished ones are on disk.
/// A second Ctrl-C quits at once.
pub(crate) fn interrupt_flag(unit: &'static str) -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    let _ = ctrlc::set_handler(move || {
        if f.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: stopping after the current {unit} (Ctrl-C again to quit now; finished {unit}s are saved)");
    });
    flag
}

/// The longest context a run will reach, known without writing anything: from --set, or
/// from the --context-lengths flag.
fn longest_context(a: &RunArgs) -> Result<usize> {
    Ok(match &a.set {
        Some(p) => NeedleSet::read(p)?
            .cases
            .iter()
            .map(|c| c.context_length)
            .max()
            .unwrap_or(0),
        None => parse_lengths(&a.grid.context_lengths)?
            .into_iter()
            .max()
            .unwrap_or(0),
    })
}

fn cmd_run(a: RunArgs) -> Result<()> {
    let t0 = Instant::now();
    let mut engine = a.model.load()?;
    if crate::ring::mpi_rank().is_some_and(|r| r > 0) {
        // Another rank of `mpirun ... needle run --mesh-dim`: it only serves rank 0's ring
        // (rank 0 owns the run directory), for sequences up to the longest context.
        let longest = longest_context(&a)?;
        engine.set_context_length(engine.context_length().max(longest));
        a.ring.run(&engine, |_| Ok(()))?;
        return Ok(());
    }
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create run directory {}", a.out.display()))?;
    let set = load_or_create_set(&a, &engine)?;
    let format = PromptFormat::new(engine.own_chat_template(), &engine.tokenizer)?;
    set.check_compatible(&engine.tokenizer, &format)?;
    let stop_strings = engine
        .chat_template
        .as_ref()
        .map(|t| t.stop_strings())
        .unwrap_or_default();

    // Lengths beyond the trained context run (marked); only what cannot fit is refused.
    let trained = engine.context_length();
    let max_len = set
        .cases
        .iter()
        .map(|c| c.context_length)
        .max()
        .unwrap_or(0);
    if max_len > trained {
        let beyond: Vec<String> = set
            .header
            .needle_set
            .context_lengths
            .iter()
            .filter(|&&l| l > trained)
            .map(|l| l.to_string())
            .collect();
        eprintln!(
            "note: context length(s) {} are beyond the model's trained context ({trained} tokens); running them anyway, marked with * in the table and heatmap",
            beyond.join(", ")
        );
        engine.set_context_length(max_len);
    }
    // The check every generation makes, made once up front for the longest cell (the
    // weights are loaded already, so only what a run adds counts).
    if let Some(avail) = lwm::memory_plan::available_memory() {
        engine
            .memory_plan(max_len, a.model.prefill_chunk)
            .check_fits(0, &avail)
            .with_context(|| {
                format!("context length {max_len} does not fit; drop the longest --context-lengths")
            })?;
    }

    let results_path = a.out.join(RESULTS_FILE);
    let results_file = ResultsFile::new(&results_path);
    let loaded = results_file.load_for_resume()?;
    if let Some(note) = &loaded.repaired {
        eprintln!("note: {note}");
    }
    check_against_set(&loaded.results, &set.cases, &results_path)?;
    let done: HashSet<&str> = loaded.results.iter().map(|r| r.id.as_str()).collect();
    let todo: Vec<_> = set
        .cases
        .iter()
        .filter(|c| !done.contains(c.id.as_str()))
        .collect();
    if !done.is_empty() {
        eprintln!(
            "resuming {}: {} of {} cells already done",
            a.out.display(),
            done.len(),
            set.cases.len()
        );
    }
    let ordered = order_for_prefix_reuse(&todo);
    let plan = planned_prefill(&ordered);
    let answer_tokens = set.header.needle_set.answer_tokens;
    let work: u64 = plan.iter().map(|&p| (p + answer_tokens) as u64).sum();
    let bar = indicatif::ProgressBar::new(work);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {msg} | {pos}/{len} tokens to prefill+decode, {elapsed} elapsed, eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let total_cells = ordered.len();
    bar.set_message(format!("cell 0/{total_cells}"));
    let interrupt = interrupt_flag("cell");
    let opts = RunOptions {
        answer_tokens,
        prefill_chunk: a.model.prefill_chunk,
        trained_length: trained,
        stop: stop_strings,
    };
    let mut n = 0usize;
    let mut correct = 0usize;
    let mut on_result = |r: &lwm::needle::results::CellResult| {
        results_file.append(r)?;
        n += 1;
        correct += r.correct as usize;
        bar.inc((r.prefilled_tokens + answer_tokens) as u64);
        bar.set_message(format!("cell {n}/{total_cells}, {correct} correct"));
        Ok(())
    };
    // With --mesh-dim sp > 1 each prompt runs on the ring (threads, or MPI ranks); its
    // session keeps a prompt's KV only when the next prompt extends it exactly, so cells
    // mostly prefill in full there.
    let on_ring = |s: &mut lwm::ring::RingSession| {
        let mut generate = |req: &lwm::generate::GenerateRequest,
                            on_text: &mut dyn FnMut(&str) -> bool| {
            engine.generate_on_ring(req, s, on_text)
        };
        run_cells_on(&mut generate, &ordered, &opts, &interrupt, &mut on_result)
    };
    let totals = match a.ring.run(&engine, on_ring)? {
        crate::ring::Role::Root(t) => t,
        crate::ring::Role::Worker => return Ok(()),
        crate::ring::Role::Single => {
            run_cells(&engine, &ordered, &opts, &interrupt, &mut on_result)?
        }
    };
    bar.finish_and_clear();

    let summary = write_report(&a.out)?;
    print!("{}", summary.table());
    eprintln!(
        "this run: {} cells, {} prompt tokens evaluated, {} prefilled ({} reused from the shared-prefix cache), {:.1}s wall",
        totals.cells,
        totals.prompt_tokens,
        totals.prefilled_tokens,
        totals.reused_tokens,
        t0.elapsed().as_secs_f64()
    );
    eprintln!(
        "wrote {} / {} / {} in {}",
        RESULTS_FILE,
        SUMMARY_FILE,
        HEATMAP_FILE,
        a.out.display()
    );
    if totals.interrupted {
        eprintln!(
            "interrupted: {} of {} cells done; run the same command again to resume",
            summary.cells_done, summary.cells_total
        );
        std::process::exit(130);
    }
    Ok(())
}

fn cmd_report(a: ReportArgs) -> Result<()> {
    if !a.dir.is_dir() {
        bail!("{} is not a directory", a.dir.display());
    }
    let summary = write_report(&a.dir)?;
    print!("{}", summary.table());
    eprintln!(
        "wrote {} and {} in {}",
        SUMMARY_FILE,
        HEATMAP_FILE,
        Path::new(&a.dir).display()
    );
    Ok(())
}
