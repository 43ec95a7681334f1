//! The evaluation loop: greedy answers for the cells not yet done, in an order that lets
//! one KV cache serve consecutive prompts.
//!
//! All cells of a sample read the same haystack stretch, so two prompts agree token for
//! token up to the first needle of either. Visiting a sample's cells by descending first
//! needle offset makes each cell reuse everything before its own first needle (the most a
//! cell can reuse), so only the tail after the needle is prefilled.

use super::results::{score, CellResult};
use super::set::NeedleCase;
use anyhow::Result;
use lwm_engine::generate::{Engine, FinishReason, GenerateOutput, GenerateRequest};
use lwm_engine::sampling::SamplingParams;
use std::sync::atomic::{AtomicBool, Ordering};

/// Greedy decoding (LWM: `do_sample=False`, `num_beams=1`), no penalties.
pub fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 0,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        logit_bias: Vec::new(),
        seed: 0,
    }
}

fn first_needle(c: &NeedleCase) -> usize {
    c.prefix_tokens
        + c.needles
            .iter()
            .map(|n| n.token_offset)
            .min()
            .unwrap_or(c.document_tokens)
}

/// The visiting order: by sample stretch, then by descending first-needle position.
pub fn order_for_prefix_reuse<'a>(cases: &[&'a NeedleCase]) -> Vec<&'a NeedleCase> {
    let mut v = cases.to_vec();
    v.sort_by(|a, b| {
        (a.haystack_start, a.sample)
            .cmp(&(b.haystack_start, b.sample))
            .then(first_needle(b).cmp(&first_needle(a)))
            .then(b.context_length.cmp(&a.context_length))
            .then(a.id.cmp(&b.id))
    });
    v
}

pub struct RunOptions {
    pub answer_tokens: usize,
    pub prefill_chunk: usize,
    /// The model's trained context length (cells beyond it run, marked).
    pub trained_length: usize,
    pub stop: Vec<String>,
}

/// Totals over the cells run now.
#[derive(Debug, Default, Clone, Copy)]
pub struct RunTotals {
    pub cells: usize,
    pub prompt_tokens: usize,
    pub prefilled_tokens: usize,
    pub reused_tokens: usize,
    pub interrupted: bool,
}

/// One greedy answer: runs a request, streaming text to the callback (false = stop), and
/// may keep KV state between calls to reuse a shared prompt prefix.
pub type Generator<'a> =
    dyn FnMut(&GenerateRequest, &mut dyn FnMut(&str) -> bool) -> Result<GenerateOutput> + 'a;

/// Run `cases` in order on the engine's own model and one KV cache, handing each finished
/// cell to `on_result` (which stores it) before the next one starts. `interrupt` stops
/// between cells or mid-answer; an unfinished cell is not reported.
pub fn run_cells(
    engine: &Engine,
    cases: &[&NeedleCase],
    opts: &RunOptions,
    interrupt: &AtomicBool,
    on_result: &mut dyn FnMut(&CellResult) -> Result<()>,
) -> Result<RunTotals> {
    let mut cache = engine.model.new_cache();
    let mut local = |req: &GenerateRequest, on_text: &mut dyn FnMut(&str) -> bool| {
        engine.generate_with_cache(req, &mut cache, on_text)
    };
    run_cells_on(&mut local, cases, opts, interrupt, on_result)
}

/// `run_cells` over any generator (the engine's cache, or a sequence-parallel ring).
pub fn run_cells_on(
    generate: &mut Generator,
    cases: &[&NeedleCase],
    opts: &RunOptions,
    interrupt: &AtomicBool,
    on_result: &mut dyn FnMut(&CellResult) -> Result<()>,
) -> Result<RunTotals> {
    let mut totals = RunTotals::default();
    for case in cases {
        if interrupt.load(Ordering::SeqCst) {
            totals.interrupted = true;
            break;
        }
        let mut req = GenerateRequest::new(case.prompt_ids.clone(), opts.answer_tokens, greedy());
        req.stop = opts.stop.clone();
        req.prefill_chunk = opts.prefill_chunk;
        let out = generate(&req, &mut |_| !interrupt.load(Ordering::SeqCst))?;
        if out.finish_reason == FinishReason::Cancelled {
            totals.interrupted = true;
            break;
        }
        let (needles, correct, cell_score) = score(case, &out.text);
        let r = CellResult {
            id: case.id.clone(),
            context_length: case.context_length,
            sample: case.sample,
            depth_percent: case.depth_percent,
            needles,
            correct,
            score: cell_score,
            response: out.text,
            response_ids: out.ids,
            finish_reason: out.finish_reason.as_str().to_string(),
            prompt_tokens: out.prompt_tokens,
            reused_tokens: out.reused_tokens,
            prefilled_tokens: out.prompt_tokens - out.reused_tokens,
            trained_length: opts.trained_length,
            beyond_trained_length: case.context_length > opts.trained_length,
            prefill_secs: out.prefill_secs,
            decode_secs: out.decode_secs,
        };
        on_result(&r)?;
        totals.cells += 1;
        totals.prompt_tokens += r.prompt_tokens;
        totals.prefilled_tokens += r.prefilled_tokens;
        totals.reused_tokens += r.reused_tokens;
    }
    Ok(totals)
}

/// Prompt tokens each cell will prefill when `ordered` runs through one cache: all but the
/// prefix it shares with the previous prompt (at least one token runs per cell).
pub fn planned_prefill(ordered: &[&NeedleCase]) -> Vec<usize> {
    let mut prev: &[u32] = &[];
    ordered
        .iter()
        .map(|c| {
            let shared = prev
                .iter()
                .zip(&c.prompt_ids)
                .take_while(|(a, b)| a == b)
                .count()
                .min(c.prompt_ids.len().saturating_sub(1));
            prev = &c.prompt_ids;
            c.prompt_ids.len() - shared
        })
        .collect()
}
