//! The engine thread: one thread owns every generation and runs them in batches.
//!
//! Continuous batching: each step is one forward pass (`Model::forward_batch`) over the
//! rows every active request needs next: each decoding request's last sampled token, plus
//! prompt pieces (`prefill_chunk` tokens each) of requests still prefilling, shortest
//! remaining prompt first, while the step's token budget (one `prefill_chunk`) lasts, and
//! at least one piece per step, so a long prompt advances without stalling the decoders
//! for its whole prefill and a short one is not queued behind it. Decode is memory-bound, so one pass reading the weights for all rows
//! costs little more than one row. Requests join at the next step (at most `max_active`;
//! the rest wait in a FIFO queue) and leave when they finish; a request whose client went
//! away (its event channel is closed) is dropped at the next step.
//!
//! A batch never changes an answer: every row computes as it would alone (see
//! `forward_batch`), and a request's prompt pieces have the same boundaries whatever else
//! runs beside it.
//!
//! Each request is one `lwm_engine::generate::Generation` (the state machine `lwm generate`, chat,
//! vision chat and needle runs drive too); this thread only decides which rows run together.
//!
//! Prompt-prefix reuse: a new request starts from the longest prefix of its prompt held by
//! any cache, of the requests in flight (their committed rows are copied) or of the idle
//! caches finished requests left (taken whole); only the rest is prefilled.

use super::metrics::Metrics;
use anyhow::Context;
use lwm_core::kv::KvCache;
use lwm_core::model::SeqInput;
use lwm_engine::generate::{Engine, GenerateRequest, Generation, Step};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// One generation to run.
pub struct Job {
    /// What to generate (its `prefill_chunk` is the server's).
    pub request: GenerateRequest,
    pub events: UnboundedSender<Event>,
    pub received: Instant,
}

pub use lwm_engine::generate::TokenLogprob;

#[derive(Debug)]
pub enum Event {
    /// The request passed admission (prompt, sampling, memory) and runs now: a stream may
    /// commit to 200 OK.
    Admitted,
    /// New text (possibly empty while a stop string is pending) for one token.
    Token {
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done(Finished),
    /// The request cannot run or failed; the error's type (`lwm_core::Error`) says whose fault.
    Error(anyhow::Error),
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
}

/// A request in flight: its KV cache and its generation.
struct Active {
    job: Job,
    cache: KvCache,
    generation: Generation,
    first_token: bool,
    /// Admission number (ties between prompt pieces).
    order: u64,
    /// Steps this request's prompt piece was passed over.
    waited: u32,
}

impl Active {
    /// This request's rows of the step's forward pass (its pending input, over its cache).
    fn step_input(&mut self) -> SeqInput<'_> {
        SeqInput {
            ids: self.generation.pending_input().unwrap_or_default(),
            cache: &mut self.cache,
            all_logits: false,
            vision: self.generation.pending_vision(),
        }
    }
}

/// Steps a prompt piece may be passed over before it goes first.
const AGING_STEPS: u32 = 4;

enum Outcome {
    Continue,
    Finished(&'static str),
    Cancelled,
    Failed(anyhow::Error),
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
    let mut admitted: u64 = 0;
    // Whether caches were dropped since the allocator last gave memory back, and when.
    let mut freed = false;
    let mut last_trim = Instant::now();
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
            admitted += 1;
            if let Some(a) = admit(&engine, job, &mut pool, &active, admitted) {
                active.push(a);
            }
        }
        metrics
            .queue_depth
            .store(queue.len() as u64, Ordering::Relaxed);
        metrics.active.store(active.len() as u64, Ordering::Relaxed);

        // One step: a forward pass over the rows the chosen requests need, then every
        // request whose turn it was samples (or finishes).
        let logits = run_batch(&engine, &mut active, &metrics);
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(active.len());
        for (a, logits) in active.iter_mut().zip(logits) {
            outcomes.push(step(a, logits, &metrics));
        }
        for i in (0..active.len()).rev() {
            let outcome = std::mem::replace(&mut outcomes[i], Outcome::Continue);
            match outcome {
                Outcome::Continue => continue,
                Outcome::Finished(reason) => {
                    let a = &active[i];
                    let _ = a.job.events.send(Event::Done(Finished {
                        finish_reason: reason,
                        prompt_tokens: a.generation.prompt_tokens(),
                        completion_tokens: a.generation.generated(),
                        cached_tokens: a.generation.reused_tokens(),
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
            let done = active.remove(i);
            freed = true;
            metrics
                .completion_tokens
                .fetch_add(done.generation.generated() as u64, Ordering::Relaxed);
            give_back(&mut pool, done.cache, limits.prompt_cache);
        }
        let caches = active.iter().map(|a| &a.cache).chain(&pool);
        let (held, reserved) = caches.fold((0, 0), |(h, r), c| {
            (h + c.bytes(), r + c.bytes() + c.unfilled_bytes())
        });
        if freed && (active.is_empty() || last_trim.elapsed() >= TRIM_INTERVAL) {
            release_freed_memory();
            freed = false;
            last_trim = Instant::now();
        }
        metrics.kv_bytes.store(held as u64, Ordering::Relaxed);
        metrics
            .kv_reserved_bytes
            .store(reserved as u64, Ordering::Relaxed);
        metrics
            .queue_depth
            .store(queue.len() as u64, Ordering::Relaxed);
        metrics.active.store(active.len() as u64, Ordering::Relaxed);
    }
}

/// What a request gets from a step's forward pass.
enum Turn {
    /// Its rows did not run this step (a prompt piece beyond the budget): it waits.
    Wait,
    /// Its step needs no forward pass (sampling right after the prompt, finishing).
    NoForward,
    /// The logits of its rows (or the forward pass's error).
    Logits(anyhow::Result<Vec<f32>>),
}

/// Choose this step's rows and run them in one forward pass: every decoding request's
/// token, then prompt pieces while the budget lasts (at least one).
/// Returns each active request's turn, in `active`'s order.
fn run_batch(engine: &Engine, active: &mut [Active], metrics: &Metrics) -> Vec<Turn> {
    let mut turns: Vec<Turn> = active
        .iter()
        .map(|a| match a.generation.pending_input() {
            None => Turn::NoForward,
            Some(_) => Turn::Wait,
        })
        .collect();
    let mut chosen = vec![false; active.len()];
    for (i, a) in active.iter().enumerate() {
        if a.generation.pending_input().is_some() && !a.generation.prefilling() {
            chosen[i] = true;
        }
    }
    // Prompt pieces: the shortest remaining prompt first (a short question is not queued
    // behind a long document), except that a prompt passed over for `AGING_STEPS` steps
    // goes first, so a stream of short prompts cannot starve a long one.
    let mut pieces: Vec<usize> = (0..active.len())
        .filter(|&i| active[i].generation.prefilling())
        .collect();
    pieces.sort_by_key(|&i| {
        let a = &active[i];
        let left = a.generation.prompt_tokens() - a.generation.prefilled_tokens();
        (a.waited < AGING_STEPS, left, a.order)
    });
    let mut prefill_tokens = 0;
    for &i in &pieces {
        let len = active[i].generation.pending_input().map_or(0, <[u32]>::len);
        let budget = active[i].job.request.prefill_chunk.max(1);
        if prefill_tokens > 0 && prefill_tokens + len > budget {
            continue;
        }
        chosen[i] = true;
        prefill_tokens += len;
    }
    for &i in &pieces {
        let a = &mut active[i];
        a.waited = if chosen[i] { 0 } else { a.waited + 1 };
    }
    if !chosen.iter().any(|&c| c) {
        return turns;
    }
    let mut inputs: Vec<SeqInput<'_>> = active
        .iter_mut()
        .zip(&chosen)
        .filter(|(_, &c)| c)
        .map(|(a, _)| a.step_input())
        .collect();
    metrics.forward_steps.fetch_add(1, Ordering::Relaxed);
    metrics
        .batched_sequences
        .fetch_add(inputs.len() as u64, Ordering::Relaxed);
    match engine.model.forward_batch(&mut inputs) {
        Ok(out) => {
            let mut out = out.into_iter();
            for (t, _) in turns.iter_mut().zip(&chosen).filter(|(_, &c)| c) {
                *t = Turn::Logits(
                    out.next()
                        .ok_or_else(|| anyhow::anyhow!("batch: no logits")),
                );
            }
        }
        // The batch failed as a whole (no cache kept its rows): run each request alone, so
        // only the one at fault fails.
        Err(_) => {
            drop(inputs);
            for ((a, t), _) in active
                .iter_mut()
                .zip(turns.iter_mut())
                .zip(&chosen)
                .filter(|(_, &c)| c)
            {
                *t = Turn::Logits(
                    engine
                        .model
                        .forward_batch(&mut [a.step_input()])
                        .and_then(|mut out| out.pop().context("forward: no output")),
                );
            }
        }
    }
    turns
}

/// Most often the engine hands freed memory back to the OS while requests run.
const TRIM_INTERVAL: Duration = Duration::from_secs(1);

/// Hand the pages of freed blocks back to the OS. glibc keeps them in its arenas: the KV
/// buffers of finished requests (up to ~1 MiB per layer, head, K or V) come back only as
/// reusable heap, so without this the resident memory stays at the high-water mark of the
/// last burst of long prompts (a soak saw it climb ~150 MiB/min while the caches in use
/// did not grow).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers; it only returns free pages of glibc's arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Keep at most `cap` idle caches; the least recently used go first. An idle cache holds
/// its rows only: the room its request reserved beyond them is released.
fn give_back(pool: &mut Vec<KvCache>, mut cache: KvCache, cap: usize) {
    if cap == 0 || cache.is_empty() {
        return;
    }
    cache.shrink_to_fit();
    pool.push(cache);
    while pool.len() > cap {
        pool.remove(0);
    }
}

/// Set a job up for generation; a job that cannot start (a bad request, or more memory
/// than is left beside the requests in flight) gets its error event instead.
fn admit(
    engine: &Engine,
    job: Job,
    pool: &mut Vec<KvCache>,
    active: &[Active],
    order: u64,
) -> Option<Active> {
    // The longest prefix of this prompt any cache holds: an idle one is taken whole, one
    // of a request in flight is copied (its committed rows only); else a fresh cache.
    let keys = job.request.prompt_keys();
    let prompt = &keys[..];
    let idle = pool
        .iter()
        .enumerate()
        .map(|(i, c)| (i, c.common_prefix(prompt)))
        .max_by_key(|&(i, n)| (n, i));
    let busy = active
        .iter()
        .map(|a| (&a.cache, a.cache.common_prefix(prompt)))
        .max_by_key(|&(_, n)| n);
    let mut cache = match (idle, busy) {
        (Some((_, i)), Some((c, b))) if b > i && b > 0 => c.prefix_copy(b),
        (None, Some((c, b))) if b > 0 => c.prefix_copy(b),
        (Some((i, n)), _) if n > 0 => pool.remove(i),
        _ => engine.model.new_cache(),
    };
    // The caches in flight grow up to their reservation: count what they may still take.
    let growing: u64 = active.iter().map(|a| a.cache.unfilled_bytes() as u64).sum();
    let policy = job.request.kv_policy;
    let started = if policy.is_full() {
        engine.prepare_cache(&job.request, &mut cache, growing)
    } else {
        Err(lwm_core::Error::InvalidRequest(format!(
            "kv policy {policy} is not supported in the server"
        ))
        .into())
    };
    let started = started.and_then(|reuse| {
        Generation::new(
            &engine.tokenizer,
            engine.context_length(),
            &job.request,
            reuse,
        )
    });
    match started {
        Ok(generation) if job.events.send(Event::Admitted).is_ok() => Some(Active {
            job,
            cache,
            generation,
            first_token: false,
            order,
            waited: 0,
        }),
        Ok(_) => None,
        Err(e) => {
            let _ = job.events.send(Event::Error(e));
            None
        }
    }
}

/// Advance one request by its turn of the step.
fn step(a: &mut Active, turn: Turn, metrics: &Metrics) -> Outcome {
    if a.job.events.is_closed() {
        a.generation.cancel();
        return Outcome::Cancelled;
    }
    let mut logits = match turn {
        Turn::Wait => return Outcome::Continue,
        Turn::NoForward => None,
        Turn::Logits(Ok(l)) => Some(l),
        Turn::Logits(Err(e)) => return Outcome::Failed(e),
    };
    let stepped = a.generation.step(&mut |_ids| {
        logits.take().ok_or_else(|| {
            anyhow::anyhow!("scheduler: a step asked for a forward pass it was not given")
        })
    });
    match stepped {
        Ok(Step::Prefilled { tokens, .. }) => {
            metrics
                .prefill_tokens
                .fetch_add(tokens as u64, Ordering::Relaxed);
            Outcome::Continue
        }
        Ok(Step::Token { text, logprob, .. }) => {
            if !a.first_token {
                a.first_token = true;
                metrics
                    .time_to_first_token
                    .observe(a.job.received.elapsed().as_secs_f64());
            }
            if a.job.events.send(Event::Token { text, logprob }).is_err() {
                a.generation.cancel();
                return Outcome::Cancelled;
            }
            Outcome::Continue
        }
        Ok(Step::Finished { reason, text }) => {
            if !text.is_empty() {
                let _ = a.job.events.send(Event::Token {
                    text,
                    logprob: None,
                });
            }
            Outcome::Finished(reason.as_str())
        }
        Err(e) => Outcome::Failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Idle caches hold their rows, not their request's reservation.
    #[test]
    fn give_back_keeps_idle_caches_at_their_rows() {
        let mut pool = Vec::new();
        for n in 1..=3u32 {
            let mut c = KvCache::new(2, 1, 4);
            c.reserve_total(512);
            for p in 0..n {
                for layer in 0..2 {
                    c.append(layer, &[p as f32; 4], &[p as f32; 4], 1);
                }
                c.commit(&[p]);
            }
            assert!(c.unfilled_bytes() > 0);
            give_back(&mut pool, c, 2);
        }
        assert_eq!(pool.len(), 2);
        assert!(pool.iter().all(|c| c.unfilled_bytes() == 0));
        assert_eq!(
            pool.iter().map(KvCache::len).collect::<Vec<_>>(),
            vec![2, 3]
        );
    }
}
