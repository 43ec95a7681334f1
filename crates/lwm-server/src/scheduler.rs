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
//! Each request is one `lwm_engine::generate::Generation` (the state machine `lwm generate`, chat,
//! vision chat and needle runs drive too); this thread only decides whose step is next.
//!
//! Prompt cache: finished requests hand their KV cache (which records its token ids) back
//! to a small pool; a new request takes the cache sharing the longest prefix with its
//! prompt and only prefills the rest.

use super::metrics::Metrics;
use lwm_core::kv::KvCache;
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
}

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
            if let Some(a) = admit(&engine, job, &mut pool, &active) {
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
            let outcome = step(&engine, &mut active[i], &metrics);
            match outcome {
                Outcome::Continue => {
                    i += 1;
                    continue;
                }
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
            let done = active.swap_remove(i);
            metrics
                .completion_tokens
                .fetch_add(done.generation.generated() as u64, Ordering::Relaxed);
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

/// Set a job up for generation; a job that cannot start (a bad request, or more memory
/// than is left beside the requests in flight) gets its error event instead.
fn admit(engine: &Engine, job: Job, pool: &mut Vec<KvCache>, active: &[Active]) -> Option<Active> {
    // The pooled cache sharing the longest prefix with this prompt, or a fresh one.
    let prompt = &job.request.prompt_ids;
    let best = pool
        .iter()
        .enumerate()
        .map(|(i, c)| (i, c.common_prefix(prompt)))
        .max_by_key(|&(_, n)| n);
    let mut cache = match best {
        Some((i, n)) if n > 0 => pool.swap_remove(i),
        _ => engine.model.new_cache(),
    };
    // The caches in flight grow up to their reservation: count what they may still take.
    let growing: u64 = active.iter().map(|a| a.cache.unfilled_bytes() as u64).sum();
    let started = engine
        .prepare_cache(&job.request, &mut cache, growing)
        .and_then(|reuse| {
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
        }),
        Ok(_) => None,
        Err(e) => {
            let _ = job.events.send(Event::Error(e));
            None
        }
    }
}

fn step(engine: &Engine, a: &mut Active, metrics: &Metrics) -> Outcome {
    if a.job.events.is_closed() {
        a.generation.cancel();
        return Outcome::Cancelled;
    }
    let cache = &mut a.cache;
    let stepped = a
        .generation
        .step(&mut |ids| engine.model.forward(ids, cache, false));
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
