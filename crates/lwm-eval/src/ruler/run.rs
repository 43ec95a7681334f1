//! The evaluation loop: greedy answers for the samples not yet done, each stored before
//! the next starts.

use super::score::score;
use super::synth::{ChatWrap, Sample};
use super::tasks::metric_for_name;
use crate::needle::run::{greedy, Generator};
use anyhow::Result;
use lwm_core::tokenizer::Tokenizer;
use lwm_engine::generate::{FinishReason, GenerateRequest};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};

/// One scored answer (a line of `results.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleResult {
    pub id: String,
    pub task: String,
    pub context_length: usize,
    pub index: usize,
    pub outputs: Vec<String>,
    /// The model's answer after the answer prefix (RULER's `pred`).
    pub pred: String,
    /// Percent: RULER's metric for this one sample.
    pub score: f64,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub finish_reason: String,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    /// Bytes of KV cache held at the end of the answer (what a KV policy saves).
    #[serde(default)]
    pub kv_bytes: u64,
}

impl crate::jsonl::Keyed for SampleResult {
    fn key(&self) -> &str {
        &self.id
    }
}

impl crate::jsonl::Keyed for Sample {
    fn key(&self) -> &str {
        &self.id
    }
}

pub struct RunOptions {
    pub prefill_chunk: usize,
    pub stop: Vec<String>,
    pub kv_policy: lwm_core::kv::KvPolicy,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct RunTotals {
    pub samples: usize,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub interrupted: bool,
}

/// Run `samples` in order through `generate`, handing each scored answer to `on_result`
/// (which stores it) before the next starts. `interrupt` stops between samples or
/// mid-answer; an unfinished sample is not reported.
pub fn run_samples(
    generate: &mut Generator,
    tok: &Tokenizer,
    wrap: &ChatWrap,
    samples: &[&Sample],
    opts: &RunOptions,
    interrupt: &AtomicBool,
    on_result: &mut dyn FnMut(&SampleResult) -> Result<()>,
) -> Result<RunTotals> {
    let mut totals = RunTotals::default();
    for s in samples {
        if interrupt.load(Ordering::SeqCst) {
            totals.interrupted = true;
            break;
        }
        // RULER feeds `input + answer_prefix` and scores what follows.
        let ids = wrap.encode(tok, &format!("{}{}", s.input, s.answer_prefix))?;
        let mut req = GenerateRequest::new(ids, s.tokens_to_generate, greedy());
        req.stop = opts.stop.clone();
        req.prefill_chunk = opts.prefill_chunk;
        req.kv_policy = opts.kv_policy;
        let out = generate(&req, &mut |_| !interrupt.load(Ordering::SeqCst))?;
        if out.finish_reason == FinishReason::Cancelled {
            totals.interrupted = true;
            break;
        }
        let r = SampleResult {
            id: s.id.clone(),
            task: s.task.clone(),
            context_length: s.context_length,
            index: s.index,
            outputs: s.outputs.clone(),
            score: score(metric_for_name(&s.task), &out.text, &s.outputs),
            pred: out.text,
            prompt_tokens: out.prompt_tokens,
            generated_tokens: out.ids.len(),
            finish_reason: out.finish_reason.as_str().to_string(),
            prefill_secs: out.prefill_secs,
            decode_secs: out.decode_secs,
            kv_bytes: out.kv_bytes,
        };
        on_result(&r)?;
        totals.samples += 1;
        totals.prompt_tokens += r.prompt_tokens;
        totals.generated_tokens += r.generated_tokens;
    }
    Ok(totals)
}
