//! Sequence-parallel training across processes: LWM's `sp` mesh axis with one process per
//! ring position (`mpirun -n SP lwm train`, cargo feature `mpi`; any `ring::transport::Ring`
//! works, the tests use the in-process threads transport).
//!
//! Every rank reads the same batch and keeps only its columns [rank·S, (rank+1)·S) of each
//! row (S = seq_len / sp): embeddings, MLPs, logits and the saved activations exist for
//! those S positions only, so activation memory per process is linear in S. Attention is
//! the ring (`ring_grad::shard_forward/shard_backward`): key/value blocks (and in the
//! backward their dK/dV) go round the ring over the transport. The loss of a shard is
//! normalised by the whole row's weight (`loss::lwm_loss_shard`), so the shards' losses
//! and gradients add up to the full batch's. After the micro-batches of an update the
//! accumulated gradients are summed over the ranks (`sum`: rank 0 adds them in rank order
//! and sends the sum back, so every rank applies the same bits and the weights never
//! drift apart). Rank 0 alone writes checkpoints and logs.
//!
//! ```text
//!   rank r:  x_r = embed(tokens[:, rS:(r+1)S])  ──layers──►  loss_r = Σ_{t∈r} w·nll / W_row
//!            attention(q_r, K, V) = ring over k/v blocks of ranks r, r−1, …   (sp passes)
//!   update:  g = Σ_r ∇loss_r   (= ∇ of the full batch's loss),  same AdamW step on every rank
//! ```

pub use super::batch::SeqShard;

use super::attention_rows::KvBlock;
use super::batch::Batch;
use anyhow::{bail, Context, Result};
use lwm_engine::ring::transport::{Ring, Tag};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// This process's place in the ring and the transport to its peers.
pub struct SeqComm {
    ring: Mutex<Box<dyn Ring>>,
    pub rank: usize,
    pub size: usize,
    /// How long a receive waits before naming the silent rank.
    pub timeout: Duration,
}

impl std::fmt::Debug for SeqComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SeqComm(rank {} of {})", self.rank, self.size)
    }
}

impl SeqComm {
    pub fn new(ring: Box<dyn Ring>, timeout: Duration) -> Arc<Self> {
        let (rank, size) = (ring.rank(), ring.size());
        Arc::new(Self {
            ring: Mutex::new(ring),
            rank,
            size,
            timeout,
        })
    }

    fn ring(&self) -> Result<std::sync::MutexGuard<'_, Box<dyn Ring>>> {
        self.ring
            .lock()
            .map_err(|_| anyhow::anyhow!("the ring transport was poisoned by a panic"))
    }

    /// Pass `blk` to the right neighbour and take the left neighbour's block, which must
    /// hold `entries` rows of `per` values (with dK/dV when `grads`).
    pub fn pass_kv(
        &self,
        blk: KvBlock,
        entries: usize,
        per: usize,
        grads: bool,
    ) -> Result<KvBlock> {
        let mut ring = self.ring()?;
        let (next, prev) = (ring.next(), ring.prev());
        ring.send(next, Tag::TrainKv, Arc::new(blk.to_message()))?;
        let m = ring.recv(prev, Tag::TrainKv, Some(self.timeout))?;
        KvBlock::from_message(&m, entries, per, grads)
    }

    /// The element-wise sum of every rank's `data` (all the same length), on every rank:
    /// rank 0 adds the others' in rank order and sends the result back, so all ranks hold
    /// identical bits.
    pub fn sum(&self, mut data: Vec<f32>) -> Result<Vec<f32>> {
        if self.size == 1 {
            return Ok(data);
        }
        let mut ring = self.ring()?;
        let n = data.len();
        if self.rank == 0 {
            for src in 1..self.size {
                let part = ring.recv(src, Tag::Grads, Some(self.timeout))?;
                if part.len() != n {
                    bail!(
                        "ring protocol error: rank {src} sent {} gradient values, rank 0 has {n}",
                        part.len()
                    );
                }
                for (a, b) in data.iter_mut().zip(part.iter()) {
                    *a += b;
                }
            }
            let total = Arc::new(data);
            for dst in 1..self.size {
                ring.send(dst, Tag::Grads, total.clone())?;
            }
            Ok(Arc::try_unwrap(total).unwrap_or_else(|a| a.as_ref().clone()))
        } else {
            ring.send(0, Tag::Grads, Arc::new(data))?;
            let total = ring.recv(0, Tag::Grads, Some(self.timeout))?;
            if total.len() != n {
                bail!(
                    "ring protocol error: rank 0 sent {} summed values, rank {} has {n}",
                    total.len(),
                    self.rank
                );
            }
            Ok(total.as_ref().clone())
        }
    }
}

/// Columns [rank·S, (rank+1)·S) of every row of `b` (S = b.input.len / size), with a
/// `SeqShard` naming where they sit. The targets are cut the same way; the loss needs the
/// whole batch's targets too (`loss::lwm_loss_shard`).
pub fn shard_batch(b: &Batch, rank: usize, size: usize) -> Result<Batch> {
    let (rows, len) = (b.input.batch, b.input.len);
    if size == 0 || !len.is_multiple_of(size) || rank >= size {
        bail!("sequence length {len} does not split into {size} ring shards (rank {rank})");
    }
    let s = len / size;
    let cut = |v: &[u32]| columns(v, rows, len, rank * s, s);
    let cut_f = |v: &[f32]| columns(v, rows, len, rank * s, s);
    let cut_b = |v: &[bool]| columns(v, rows, len, rank * s, s);
    let mut input = b.input.clone();
    input.len = s;
    input.tokens = cut(&b.input.tokens);
    input.positions = cut(&b.input.positions);
    input.segment_ids = b.input.segment_ids.as_deref().map(cut);
    input.vision_mask = b.input.vision_mask.as_deref().map(cut_b);
    // Without packing every row is one sequence: the ring still needs ids to mask by, and
    // a single segment per row masks nothing.
    let full = b
        .input
        .segment_ids
        .clone()
        .unwrap_or_else(|| vec![0; rows * len]);
    input.shard = Some(SeqShard {
        offset: rank * s,
        full_len: len,
        full_segment_ids: Some(Arc::new(full)),
    });
    let mut targets = b.targets.clone();
    targets.tokens = cut(&b.targets.tokens);
    targets.loss_mask = cut_f(&b.targets.loss_mask);
    targets.vision_mask = b.targets.vision_mask.as_deref().map(cut_b);
    Ok(Batch { input, targets })
}

/// Columns c0..c0+n of each of `rows` rows of `len` values.
fn columns<T: Copy>(v: &[T], rows: usize, len: usize, c0: usize, n: usize) -> Vec<T> {
    (0..rows)
        .flat_map(|r| v[r * len + c0..r * len + c0 + n].iter().copied())
        .collect()
}

/// The ring size and rank a training run should use: `sp` from the config, and the
/// transport's when one is given (they must agree).
pub fn check_comm(comm: Option<&SeqComm>, sp: usize) -> Result<()> {
    if let Some(c) = comm {
        if c.size != sp.max(1) {
            bail!(
                "train.sp = {sp} but the job has {} processes: give train.sp = {} (or --sp), or start {sp} processes",
                c.size,
                c.size
            );
        }
    }
    Ok(())
}

/// Sum a list of per-update numbers (loss, flags) over the ranks with the gradients' `sum`.
pub fn sum_scalars(comm: &SeqComm, xs: &[f64]) -> Result<Vec<f64>> {
    let v = comm
        .sum(xs.iter().map(|&x| x as f32).collect())
        .context("summing the update's loss over the ring")?;
    Ok(v.into_iter().map(f64::from).collect())
}
