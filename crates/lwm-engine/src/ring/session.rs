//! Rank 0's handle on the ring (`RingSession`: validates input, tells the other workers
//! what to run, returns logits) and the loop the other ranks run (`serve`).

use super::transport::{f32_to_u32, u32_to_f32, Ring, Tag};
use super::worker::RingWorker;
use super::{RingOptions, RingTimes};
use anyhow::{bail, Context, Result};
use lwm_core::model::Model;
use std::sync::Arc;

const STOP: u32 = 0;
const FORWARD: u32 = 1;
const CLEAR: u32 = 2;
const STATS: u32 = 3;

/// One worker's figures, as `RingSession::stats` gathers them.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkerStats {
    pub rank: usize,
    pub kv_bytes: usize,
    pub kv_rows: usize,
    pub times: RingTimes,
}

pub struct RingSession<'m> {
    model: &'m Model,
    worker: RingWorker<'m>,
    ring: Box<dyn Ring + 'm>,
    failed: bool,
    /// Token ids the ring holds, in order.
    tokens: Vec<u32>,
}

impl<'m> RingSession<'m> {
    /// Rank 0 of a ring whose other ranks run `serve`.
    pub fn new(model: &'m Model, ring: Box<dyn Ring + 'm>, opts: RingOptions) -> Self {
        assert_eq!(ring.rank(), 0, "the session is rank 0");
        let worker = RingWorker::new(model, opts);
        Self {
            model,
            worker,
            ring,
            failed: false,
            tokens: Vec::new(),
        }
    }

    pub fn sp(&self) -> usize {
        self.ring.size()
    }

    /// How many workers share this process's memory (`Ring::workers_in_process`).
    pub fn workers_in_process(&self) -> usize {
        self.ring.workers_in_process()
    }

    /// Tokens held by the ring.
    pub fn len(&self) -> usize {
        self.worker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.worker.is_empty()
    }

    fn command(&mut self, body: Vec<f32>) -> Result<()> {
        if self.failed {
            bail!("the ring failed earlier; start a new one");
        }
        let body = Arc::new(body);
        for dst in 1..self.ring.size() {
            self.ring.send(dst, Tag::Command, body.clone())?;
        }
        Ok(())
    }

    fn fail<T>(&mut self, e: anyhow::Error) -> Result<T> {
        self.failed = true;
        self.ring.shut_down();
        Err(e)
    }

    /// Run `ids` (after the tokens held) on every worker; the last token's logits.
    pub fn forward(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        if ids.is_empty() {
            bail!("forward called with no tokens");
        }
        let vocab = self.model.config.vocab_size;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            bail!("token id {bad} is outside the model's vocabulary of {vocab}");
        }
        let mut body = vec![u32_to_f32(FORWARD)];
        body.extend(ids.iter().map(|&t| u32_to_f32(t)));
        self.command(body)?;
        match self.worker.step(self.ring.as_mut(), ids) {
            Ok(Some(logits)) => {
                self.tokens.extend_from_slice(ids);
                Ok(logits)
            }
            Ok(None) => unreachable!("rank 0 always gets the logits"),
            Err(e) => self.fail(e.context(format!("ring step failed on rank 0 of {}", self.sp()))),
        }
    }

    /// Forward a long prompt in pieces of `chunk` tokens (each piece is one ring step,
    /// attending everything before it), calling `progress(done)` after each.
    pub fn prefill(
        &mut self,
        ids: &[u32],
        chunk: usize,
        progress: impl FnMut(usize),
    ) -> Result<Vec<f32>> {
        lwm_core::model::prefill_in_pieces(ids, chunk, progress, |piece| self.forward(piece))
            .context("ring prefill failed")
    }

    /// The token ids the ring holds.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Forget the sequence on every worker.
    pub fn clear(&mut self) -> Result<()> {
        self.command(vec![u32_to_f32(CLEAR)])?;
        self.worker.clear();
        self.tokens.clear();
        Ok(())
    }

    /// Keep the held tokens when `prompt` starts with all of them (a chat's next turn),
    /// otherwise clear. Returns how many prompt tokens are held (at most `len - 1`, so one
    /// runs and produces logits).
    pub fn reuse_prefix(&mut self, prompt: &[u32]) -> Result<usize> {
        let held = self.tokens.len();
        if held > 0 && held < prompt.len() && prompt[..held] == self.tokens[..] {
            return Ok(held);
        }
        if held > 0 {
            self.clear()?;
        }
        Ok(0)
    }

    /// Every worker's KV bytes and timings, rank order.
    pub fn stats(&mut self) -> Result<Vec<WorkerStats>> {
        self.command(vec![u32_to_f32(STATS)])?;
        let mut out = vec![stats_of(0, &self.worker)];
        for src in 1..self.ring.size() {
            let b = match self.ring.recv(src, Tag::Stats, Some(self.worker_timeout())) {
                Ok(b) => b,
                Err(e) => return self.fail(e),
            };
            out.push(decode_stats(src, &b)?);
        }
        Ok(out)
    }

    /// Tear the ring down (workers blocked in a step give up at once).
    pub fn shut_down_ring(&mut self) {
        self.failed = true;
        self.ring.shut_down();
    }

    fn worker_timeout(&self) -> std::time::Duration {
        super::DEFAULT_TIMEOUT.max(std::time::Duration::from_secs(1))
    }
}

impl Drop for RingSession<'_> {
    fn drop(&mut self) {
        if !self.failed {
            let stop = Arc::new(vec![u32_to_f32(STOP)]);
            for dst in 1..self.ring.size() {
                let _ = self.ring.send(dst, Tag::Command, stop.clone());
            }
        }
    }
}

fn stats_of(rank: usize, w: &RingWorker) -> WorkerStats {
    WorkerStats {
        rank,
        kv_bytes: w.shard.bytes(),
        kv_rows: w.shard.rows(),
        times: w.times,
    }
}

fn encode_stats(s: &WorkerStats) -> Vec<f32> {
    // f64 figures as two f32 bit-halves each, counts as u32 (they fit: bytes per shard < 4 GiB
    // is not guaranteed, so bytes go as two halves too).
    let mut out = Vec::new();
    for x in [
        s.kv_bytes as u64,
        s.kv_rows as u64,
        s.times.compute_secs.to_bits(),
        s.times.wait_secs.to_bits(),
        s.times.blocks as u64,
        s.times.bytes_sent as u64,
    ] {
        out.push(u32_to_f32(x as u32));
        out.push(u32_to_f32((x >> 32) as u32));
    }
    out
}

fn decode_stats(rank: usize, b: &[f32]) -> Result<WorkerStats> {
    if b.len() != 12 {
        bail!("rank {rank} sent malformed statistics");
    }
    let g = |i: usize| f32_to_u32(b[2 * i]) as u64 | (f32_to_u32(b[2 * i + 1]) as u64) << 32;
    Ok(WorkerStats {
        rank,
        kv_bytes: g(0) as usize,
        kv_rows: g(1) as usize,
        times: RingTimes {
            compute_secs: f64::from_bits(g(2)),
            wait_secs: f64::from_bits(g(3)),
            blocks: g(4) as usize,
            bytes_sent: g(5) as usize,
        },
    })
}

/// The loop of ranks 1..sp: run rank 0's commands until it says stop (or disappears).
pub fn serve(model: &Model, ring: &mut dyn Ring, opts: RingOptions) -> Result<()> {
    let rank = ring.rank();
    let mut worker = RingWorker::new(model, opts);
    loop {
        let cmd = ring.recv(0, Tag::Command, None)?;
        let Some(&kind) = cmd.first() else {
            bail!("rank {rank}: empty command");
        };
        match f32_to_u32(kind) {
            STOP => return Ok(()),
            FORWARD => {
                let ids: Vec<u32> = cmd[1..].iter().map(|&x| f32_to_u32(x)).collect();
                if let Err(e) = worker.step(ring, &ids) {
                    ring.shut_down();
                    return Err(e.context(format!("ring step failed on rank {rank}")));
                }
            }
            CLEAR => worker.clear(),
            STATS => {
                let s = encode_stats(&stats_of(rank, &worker));
                ring.send(0, Tag::Stats, Arc::new(s))?;
            }
            other => bail!("rank {rank}: unknown command {other}"),
        }
    }
}
