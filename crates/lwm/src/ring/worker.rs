//! One ring worker: its KV shard and the per-layer drive of a forward step, the same program
//! on every rank (threads or MPI processes). Rank 0 also talks to the user (`session`).

use super::decode::decode_attention;
use super::layout::{decode_owner, zigzag, zigzag_owner_of_last};
use super::prefill::{ring_attention, Heads};
use super::shard::KvShard;
use super::transport::{Ring, Tag};
use super::{Fault, FaultKind, RingOptions, RingTimes};
use crate::model::{Model, PositionRun};
use anyhow::{bail, Result};
use std::sync::Arc;

pub struct RingWorker<'m> {
    model: &'m Model,
    opts: RingOptions,
    pub shard: KvShard,
    /// Rows every worker's shard holds (all workers track all counts identically).
    shard_rows: Vec<usize>,
    last_owner: Option<usize>,
    /// Tokens in the sequence so far.
    len: usize,
    pub times: RingTimes,
}

impl<'m> RingWorker<'m> {
    pub fn new(model: &'m Model, sp: usize, opts: RingOptions) -> Self {
        let c = &model.config;
        Self {
            model,
            opts,
            shard: KvShard::new(c.num_hidden_layers, c.num_key_value_heads, c.head_dim),
            shard_rows: vec![0; sp],
            last_owner: None,
            len: 0,
            times: RingTimes::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.shard.truncate(0);
        self.shard_rows.fill(0);
        self.last_owner = None;
        self.len = 0;
    }

    fn heads(&self) -> Heads {
        let c = &self.model.config;
        Heads {
            n_heads: c.num_attention_heads,
            n_kv: c.num_key_value_heads,
            d: c.head_dim,
        }
    }

    fn maybe_fault(&self, ring: &dyn Ring, layer: usize) -> Result<()> {
        let Some(Fault { rank, kind }) = self.opts.fault else {
            return Ok(());
        };
        if rank != ring.rank() || layer != 1 {
            return Ok(());
        }
        match kind {
            FaultKind::Fail => bail!("injected fault (LWM_RING_FAULT) on rank {rank}"),
            FaultKind::Hang => {
                // Stop answering, as a hung worker would; wake only to let a test's threads join.
                while !ring.is_shut_down() {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                bail!("injected hang (LWM_RING_FAULT) on rank {rank} released")
            }
        }
    }

    /// Run `ids` (the tokens after those held) through the model across the ring. Returns
    /// the last token's logits on rank 0, None elsewhere. On error this worker's shard is
    /// rolled back (the ring as a whole is torn down by the caller).
    pub fn step(&mut self, ring: &mut dyn Ring, ids: &[u32]) -> Result<Option<Vec<f32>>> {
        let rows_before = self.shard.rows();
        let out = if ids.len() == 1 {
            self.decode(ring, ids[0])
        } else {
            self.prefill(ring, ids)
        };
        if out.is_err() {
            self.shard.truncate(rows_before);
        }
        out
    }

    fn prefill(&mut self, ring: &mut dyn Ring, ids: &[u32]) -> Result<Option<Vec<f32>>> {
        let (sp, me) = (ring.size(), ring.rank());
        let (n, pos0) = (ids.len(), self.len);
        let heads = self.heads();
        let (runs, rows) = zigzag(n, pos0, sp, me);
        let local: Vec<u32> = rows.iter().map(|&g| ids[g]).collect();
        self.shard.add_positions(&runs);
        let mut x = if local.is_empty() {
            Vec::new()
        } else {
            self.model.embed(&local)?
        };
        let chunking = self.model.options.chunking;
        for li in 0..self.model.n_layers() {
            self.maybe_fault(ring, li)?;
            let q = if local.is_empty() {
                Vec::new()
            } else {
                let (q, k, v) = self.model.layer_qkv(li, &x, &runs)?;
                self.shard.append(li, &k, &v, local.len());
                q
            };
            let own = Arc::new(self.shard.pack(li));
            let attn = ring_attention(
                ring,
                &q,
                &runs,
                own,
                heads,
                chunking,
                self.opts.timeout,
                &mut self.times,
            )?;
            if !local.is_empty() {
                self.model.layer_output(li, &mut x, &attn)?;
            }
        }
        for (r, rows) in self.shard_rows.iter_mut().enumerate() {
            *rows += zigzag(n, pos0, sp, r).1.len();
        }
        self.len += n;
        let owner = zigzag_owner_of_last(n, sp);
        let h = self.model.config.hidden_size;
        if me == owner {
            let logits = self.model.head_logits(&x[x.len() - h..])?;
            if me == 0 {
                return Ok(Some(logits));
            }
            ring.send(0, Tag::Logits, Arc::new(logits))?;
            return Ok(None);
        }
        if me == 0 {
            let logits = ring.recv(owner, Tag::Logits, Some(self.opts.timeout))?;
            return Ok(Some(logits.to_vec()));
        }
        Ok(None)
    }

    fn decode(&mut self, ring: &mut dyn Ring, id: u32) -> Result<Option<Vec<f32>>> {
        let me = ring.rank();
        let pos = self.len;
        let heads = self.heads();
        let owner = decode_owner(&self.shard_rows, self.last_owner);
        let run = [PositionRun {
            row0: 0,
            pos0: pos,
            len: 1,
        }];
        if owner == me {
            self.shard.add_positions(&run);
        }
        // Every worker runs the token (cheap) so each holds the query it attends with.
        let mut x = self.model.embed(&[id])?;
        let key_chunk = self.model.options.chunking.key_chunk;
        for li in 0..self.model.n_layers() {
            self.maybe_fault(ring, li)?;
            let (q, k, v) = self.model.layer_qkv(li, &x, &run)?;
            if owner == me {
                self.shard.append(li, &k, &v, 1);
            }
            let attn = decode_attention(
                ring,
                &q,
                heads,
                &self.shard,
                li,
                key_chunk,
                self.opts.timeout,
                &mut self.times,
            )?;
            self.model.layer_output(li, &mut x, &attn)?;
        }
        self.shard_rows[owner] += 1;
        self.last_owner = Some(owner);
        self.len += 1;
        if me == 0 {
            return Ok(Some(self.model.head_logits(&x)?));
        }
        Ok(None)
    }
}
