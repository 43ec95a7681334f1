//! The engine thread: one thread owns every generation and interleaves them.
//!
//! Scheduling is round-robin, one token per active request per round (a prefill advances
//! by one `prefill_chunk` per round), over at most `max_active` requests; the rest wait in a
//! FIFO queue. Our forward pass runs one sequence at a time (each has its own KV cache), so
//! batching would not raise throughput on the CPU; interleaving keeps every client's tokens
//! flowing at the same rate and a long prompt cannot stall the short ones for its whole
//! prefill. A request whose client went away (its event channel is closed) is dropped at
//! its next turn.
//!
//! Prompt cache: finished requests hand their KV cache (which records its token ids) back
//! to a small pool; a new request takes the cache sharing the longest prefix with its
//! prompt and only prefills the rest.

use super::metrics::Metrics;
use lwm::constrain::{Grammar, GrammarState};
use lwm::generate::{Engine, StopMatcher};
use lwm::kv::KvCache;
use lwm::sampling::{logprobs, Sampler, SamplingParams};
use lwm::tokenizer::StreamDecoder;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// One generation to run.
pub struct Job {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub grammar: Option<Grammar>,
    /// Report log-probabilities with this many alternatives (None: no logprobs).
    pub top_logprobs: Option<usize>,
    pub events: UnboundedSender<Event>,
    pub received: Instant,
}

#[derive(Debug, Clone)]
pub struct TokenLogprob {
    pub token: String,
    pub bytes: Vec<u8>,
    pub logprob: f32,
    pub top: Vec<(String, Vec<u8>, f32)>,
}

#[derive(Debug)]
pub enum Event {
    /// New text (possibly empty while a stop string is pending) for one token.
    Token {
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done(Finished),
    Error(String),
}

#[derive(Debug, Clone)]
pub struct Finished {
    pub finish_reason: &'static str,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct SchedulerLimits {
    pub max_active: usize,
    pub prompt_cache: usize,
    pub prefill_chunk: usize,
}

/// A request in flight.
struct Active {
    job: Job,
    cache: KvCache,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    cached_tokens: usize,
    logits: Vec<f32>,
    sampler: Sampler,
    history: Vec<u32>,
    decoder: StreamDecoder,
    stops: StopMatcher,
    grammar: Option<GrammarState>,
    generated: usize,
    first_token: Option<Instant>,
}

enum Outcome {
    Continue,
    Finished(&'static str),
    Cancelled,
    Failed(String),
}

pub fn run(
    engine: Arc<Engine>,
    jobs: Receiver<Job>,
    limits: SchedulerLimits,
    metrics: Arc<Metrics>,
) {
    let mut queue: VecDeque<Job> = VecDeque::new();
    let mut active: Vec<Active> = Vec::new();
    let mut pool: Vec<KvCache> = Vec::new();
    loop {
        // Collect new jobs; block only when there is nothing to do.
        if active.is_empty() && queue.is_empty() {
            match jobs.recv_timeout(Duration::from_millis(500)) {
                Ok(j) => queue.push_back(j),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        while let Ok(j) = jobs.try_recv() {
            queue.push_back(j);
        }
        queue.retain(|j| {
            let gone = j.events.is_closed();
            if gone {
                metrics.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            !gone
        });
        while active.len() < limits.max_active.max(1) {
            let Some(job) = queue.pop_front() else { break };
            metrics
                .queue_wait
                .observe(job.received.elapsed().as_secs_f64());
            if let Some(a) = admit(&engine, job, &mut pool) {
                active.push(a);
            }
        }
        metrics
            .queue_depth
            .store(queue.len() as u64, Ordering::Relaxed);
        metrics.active.store(active.len() as u64, Ordering::Relaxed);

        // One round: every active request advances by one step.
        let mut i = 0;
        while i < active.len() {
            let outcome = step(&engine, &mut active[i], limits.prefill_chunk, &metrics);
            match outcome {
                Outcome::Continue => {
                    i += 1;
                    continue;
                }
                Outcome::Finished(reason) => {
                    let a = &active[i];
                    let _ = a.job.events.send(Event::Done(Finished {
                        finish_reason: reason,
                        prompt_tokens: a.job.prompt_ids.len(),
                        completion_tokens: a.generated,
                        cached_tokens: a.cached_tokens,
                    }));
                    metrics
                        .generation_seconds
                        .observe(a.job.received.elapsed().as_secs_f64());
                }
                Outcome::Cancelled => {
                    metrics.cancelled.fetch_add(1, Ordering::Relaxed);
                }
                Outcome::Failed(e) => {
                    let _ = active[i].job.events.send(Event::Error(e));
                }
            }
            let done = active.swap_remove(i);
            metrics
                .completion_tokens
                .fetch_add(done.generated as u64, Ordering::Relaxed);
            give_back(&mut pool, done.cache, limits.prompt_cache);
        }
        metrics
            .queue_depth
            .store(queue.len() as u64, Ordering::Relaxed);
        metrics.active.store(active.len() as u64, Ordering::Relaxed);
    }
}

/// Keep at most `cap` idle caches; the shortest ones (least reusable) go first.
fn give_back(pool: &mut Vec<KvCache>, cache: KvCache, cap: usize) {
    if cap == 0 {
        return;
    }
    pool.push(cache);
    while pool.len() > cap {
        let (idx, _) = pool
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| c.len())
            .expect("pool is not empty");
        pool.swap_remove(idx);
    }
}

/// Set a job up for generation; a job that cannot start gets its error event instead.
fn admit(engine: &Engine, job: Job, pool: &mut Vec<KvCache>) -> Option<Active> {
    let sampler = match Sampler::new(job.sampling.clone()) {
        Ok(s) => s,
        Err(e) => {
            let _ = job.events.send(Event::Error(format!("{e:#}")));
            return None;
        }
    };
    // The pooled cache sharing the longest prefix with this prompt, or a fresh one.
    let best = pool
        .iter()
        .enumerate()
        .map(|(i, c)| (i, c.common_prefix(&job.prompt_ids)))
        .max_by_key(|&(_, n)| n);
    let mut cache = match best {
        Some((i, n)) if n > 0 => pool.swap_remove(i),
        _ => engine.model.new_cache(),
    };
    // At least the last prompt token runs, to produce the first logits.
    let reuse = cache
        .common_prefix(&job.prompt_ids)
        .min(job.prompt_ids.len().saturating_sub(1));
    cache.truncate(reuse);
    let grammar = job.grammar.as_ref().map(Grammar::start);
    Some(Active {
        cache,
        prefilled: reuse,
        cached_tokens: reuse,
        logits: Vec::new(),
        sampler,
        history: job.prompt_ids.clone(),
        decoder: StreamDecoder::new(&engine.tokenizer),
        stops: StopMatcher::new(&job.stop),
        grammar,
        generated: 0,
        first_token: None,
        job,
    })
}

fn step(engine: &Engine, a: &mut Active, prefill_chunk: usize, metrics: &Metrics) -> Outcome {
    if a.job.events.is_closed() {
        return Outcome::Cancelled;
    }
    let n_prompt = a.job.prompt_ids.len();
    if a.prefilled < n_prompt {
        let end = (a.prefilled + prefill_chunk.max(1)).min(n_prompt);
        match engine
            .model
            .forward(&a.job.prompt_ids[a.prefilled..end], &mut a.cache, false)
        {
            Ok(l) => a.logits = l,
            Err(e) => return Outcome::Failed(format!("prefill failed: {e:#}")),
        }
        metrics
            .prefill_tokens
            .fetch_add((end - a.prefilled) as u64, Ordering::Relaxed);
        a.prefilled = end;
        return Outcome::Continue;
    }
    let budget = a
        .job
        .max_tokens
        .min(engine.context_length().saturating_sub(n_prompt));
    if a.generated >= budget {
        return finish_length(a);
    }
    let id = match a.grammar.as_mut() {
        Some(g) => match g.allowed(a.logits.len()) {
            Ok(allowed) => a
                .sampler
                .sample_masked(&a.logits, &a.history, Some(allowed)),
            Err(e) => return Outcome::Failed(format!("{e:#}")),
        },
        None => a.sampler.sample(&a.logits, &a.history),
    };
    if a.first_token.is_none() {
        a.first_token = Some(Instant::now());
        metrics
            .time_to_first_token
            .observe(a.job.received.elapsed().as_secs_f64());
    }
    let end_of_output = match a.grammar.as_mut() {
        Some(g) if id == g.eos_id() => true,
        Some(g) => {
            if let Err(e) = g.consume(id) {
                return Outcome::Failed(format!("{e:#}"));
            }
            false
        }
        None => engine.tokenizer.is_end_of_generation(id),
    };
    if end_of_output {
        return finish_stop(a);
    }
    let logprob = a.job.top_logprobs.map(|n| {
        let (lp, top) = logprobs(&a.logits, id, n);
        let bytes = engine.tokenizer.token_bytes(id);
        TokenLogprob {
            token: String::from_utf8_lossy(&bytes).into_owned(),
            bytes,
            logprob: lp,
            top: top
                .into_iter()
                .map(|(t, l)| {
                    let b = engine.tokenizer.token_bytes(t);
                    (String::from_utf8_lossy(&b).into_owned(), b, l)
                })
                .collect(),
        }
    });
    a.generated += 1;
    a.history.push(id);
    let piece = a.decoder.push(id);
    let (text, hit) = a.stops.push(&piece);
    if a.job.events.send(Event::Token { text, logprob }).is_err() {
        return Outcome::Cancelled;
    }
    if hit || a.grammar.as_ref().is_some_and(|g| g.is_finished()) {
        return finish_stop(a);
    }
    if a.generated >= budget {
        return finish_length(a);
    }
    match engine.model.forward(&[id], &mut a.cache, false) {
        Ok(l) => a.logits = l,
        Err(e) => return Outcome::Failed(format!("decode failed: {e:#}")),
    }
    Outcome::Continue
}

/// Release text held back for stop strings or incomplete UTF-8.
fn flush(a: &mut Active) {
    if a.stops.hit {
        return;
    }
    let rest = a.stops.flush(&a.decoder.flush());
    if !rest.is_empty() {
        let _ = a.job.events.send(Event::Token {
            text: rest,
            logprob: None,
        });
    }
}

fn finish_stop(a: &mut Active) -> Outcome {
    flush(a);
    Outcome::Finished("stop")
}

fn finish_length(a: &mut Active) -> Outcome {
    flush(a);
    Outcome::Finished("length")
}
