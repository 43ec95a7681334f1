//! One ring worker: its KV shard and the drive of a forward step, the same program on every
//! rank (threads or MPI processes). The step runs the model's one forward
//! (`Model::forward_layers`) with a ring attention backend; rank 0 also talks to the user
//! (`session`).

use super::decode::decode_attention;
use super::layout::{owned_rows, position_owner};
use super::prefill::{ring_attention, Heads};
use super::transport::{Block, Ring, Tag};
use super::{Fault, FaultKind, RingOptions, RingTimes};
use anyhow::{bail, Context, Result};
use lwm_core::kv::{KvShard, PositionRun, QuantKvView, ShardView};
use lwm_core::model::{ggml_one_chunk, AttentionBackend, Model};
use lwm_core::quant::ggml_cpu::{self, FaOptions};
use std::sync::Arc;

pub struct RingWorker<'m> {
    model: &'m Model,
    opts: RingOptions,
    pub shard: KvShard,
    /// Tokens in the sequence so far.
    len: usize,
    pub times: RingTimes,
}

/// What a ring step's attention needs besides the model: the transport, this worker's
/// shard, and where the step's rows are.
struct RingAttention<'a> {
    model: &'a Model,
    ring: &'a mut dyn Ring,
    shard: &'a mut KvShard,
    opts: RingOptions,
    times: &'a mut RingTimes,
    /// This worker's rows of the step.
    runs: &'a [PositionRun],
    /// The step: its first position and its rows on all workers.
    pos0: usize,
    n_step: usize,
    /// Decode: whether this worker stores the new token's key/value.
    decode_owner: bool,
}

impl RingAttention<'_> {
    fn heads(&self) -> Heads {
        let c = &self.model.config;
        Heads {
            n_heads: c.num_attention_heads,
            n_kv: c.num_key_value_heads,
            d: c.head_dim,
        }
    }

    fn maybe_fault(&self, layer: usize) -> Result<()> {
        let Some(Fault { rank, kind }) = self.opts.fault else {
            return Ok(());
        };
        if rank != self.ring.rank() || layer != 1 {
            return Ok(());
        }
        match kind {
            FaultKind::Fail => bail!("injected fault (LWM_RING_FAULT) on rank {rank}"),
            FaultKind::Hang => {
                // Stop answering, as a hung worker would; wake only to let a test's threads join.
                while !self.ring.is_shut_down() {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                bail!("injected hang (LWM_RING_FAULT) on rank {rank} released")
            }
        }
    }

    /// Every worker's shard of `layer`, passed once around the ring.
    fn gather(&mut self, layer: usize) -> Result<Vec<Block>> {
        let sp = self.ring.size();
        let mut held: Block = Arc::new(self.shard.pack(layer));
        let mut all = vec![held.clone()];
        for _ in 1..sp {
            self.times.bytes_sent += held.len() * 4;
            self.ring
                .send(self.ring.next(), Tag::KvBlock, held.clone())?;
            held = self
                .ring
                .recv(self.ring.prev(), Tag::KvBlock, Some(self.opts.timeout))?;
            all.push(held.clone());
        }
        Ok(all)
    }

    /// llama.cpp's one-chunk attention (`model::ggml_one_chunk`) reads every cell in
    /// position order in one pass, which no split of the keys reproduces: for such a step
    /// (under 64 rows) each worker assembles the layer's whole cache from the shards and
    /// runs it on its rows, as one worker would.
    fn one_chunk(&mut self, layer: usize, q: &[f32]) -> Result<Vec<f32>> {
        let h = self.heads();
        let types = self.shard.types();
        let blocks = self.gather(layer)?;
        let cells = self.pos0 + self.n_step;
        let (kb, vb) = (types.k.row_bytes(h.d), types.v.row_bytes(h.d));
        let mut k = vec![vec![0u8; cells * kb]; h.n_kv];
        let mut v = vec![vec![0u8; cells * vb]; h.n_kv];
        for b in &blocks {
            let view = ShardView::parse(b, h.n_kv, h.d, types)?;
            for r in &view.runs {
                for g in 0..h.n_kv {
                    let (ks, vs) = view.kv.stored_block(g, r.row0, r.row0 + r.len);
                    k[g][r.pos0 * kb..(r.pos0 + r.len) * kb].copy_from_slice(ks);
                    v[g][r.pos0 * vb..(r.pos0 + r.len) * vb].copy_from_slice(vs);
                }
            }
        }
        let view = QuantKvView {
            k: k.iter().map(|x| &x[..]).collect(),
            v: v.iter().map(|x| &x[..]).collect(),
            k_type: types.k,
            v_type: types.v,
            d: h.d,
            len: cells,
        };
        let width = h.n_heads * h.d;
        let scale = 1.0 / (h.d as f32).sqrt();
        let mut out = vec![0.0f32; q.len()];
        for r in self.runs.iter().filter(|r| r.len > 0) {
            let rows = r.row0 * width..(r.row0 + r.len) * width;
            let o = ggml_cpu::flash_attn_ext_f16_stored(
                &q[rows.clone()],
                r.len,
                r.pos0,
                h.n_heads,
                h.d,
                &view,
                scale,
                &FaOptions::default(),
            );
            out[rows].copy_from_slice(&o);
        }
        Ok(out)
    }
}

impl AttentionBackend for RingAttention<'_> {
    fn attend(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        self.maybe_fault(layer)?;
        let heads = self.heads();
        let options = &self.model.options;
        let decode = self.n_step == 1;
        let n = q.len() / (heads.n_heads * heads.d);
        if !decode || self.decode_owner {
            self.shard.append(layer, k, v, n);
        }
        let cells = self.pos0 + self.n_step;
        if ggml_one_chunk(options, self.shard.types(), self.n_step, cells) {
            return self.one_chunk(layer, q);
        }
        if decode {
            return decode_attention(
                self.ring,
                q,
                self.pos0,
                heads,
                self.shard,
                layer,
                options.chunking.key_chunk,
                self.opts.timeout,
                self.times,
            );
        }
        let own = Arc::new(self.shard.pack(layer));
        ring_attention(
            self.ring,
            q,
            self.runs,
            own,
            heads,
            self.shard.types(),
            options.chunking,
            self.opts.timeout,
            self.times,
        )
    }
}

impl<'m> RingWorker<'m> {
    pub fn new(model: &'m Model, opts: RingOptions) -> Self {
        let c = &model.config;
        Self {
            model,
            opts,
            shard: KvShard::new(
                c.num_hidden_layers,
                c.num_key_value_heads,
                c.head_dim,
                model.options.kv_types(),
            ),
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
        self.len = 0;
    }

    /// Run `ids` (the tokens after those held) through the model across the ring. Returns
    /// the last token's logits on rank 0, None elsewhere. On error this worker's shard is
    /// rolled back (the ring as a whole is torn down by the caller).
    pub fn step(&mut self, ring: &mut dyn Ring, ids: &[u32]) -> Result<Option<Vec<f32>>> {
        let rows_before = self.shard.rows();
        let out = self.step_inner(ring, ids);
        if out.is_err() {
            self.shard.truncate(rows_before);
        }
        out
    }

    fn step_inner(&mut self, ring: &mut dyn Ring, ids: &[u32]) -> Result<Option<Vec<f32>>> {
        let (sp, me) = (ring.size(), ring.rank());
        let (n, pos0) = (ids.len(), self.len);
        let kc = self.model.options.chunking.key_chunk;
        let decode = n == 1;
        let owner_of_last = position_owner(pos0 + n - 1, sp, kc);
        // A decode token runs on every worker (cheap), so each holds the query it attends
        // with; its key/value goes to the owner of its block. Prefill rows are split by block.
        let (runs, rows) = if decode {
            (
                vec![PositionRun {
                    row0: 0,
                    pos0,
                    len: 1,
                }],
                vec![0],
            )
        } else {
            owned_rows(n, pos0, sp, me, kc)
        };
        let local: Vec<u32> = rows.iter().map(|&g| ids[g]).collect();
        let stored: &[PositionRun] = if decode && owner_of_last != me {
            &[]
        } else {
            &runs
        };
        self.shard.add_positions(stored);
        let x = if local.is_empty() {
            Vec::new()
        } else {
            self.model.embed(&local)?
        };
        let mut attention = RingAttention {
            model: self.model,
            ring,
            shard: &mut self.shard,
            opts: self.opts,
            times: &mut self.times,
            runs: &runs,
            pos0,
            n_step: n,
            decode_owner: owner_of_last == me,
        };
        let x = self
            .model
            .forward_layers(x, &runs, &mut attention)
            .with_context(|| format!("positions {pos0}..{}", pos0 + n))?;
        let stored_ids: Vec<u32> = if stored.is_empty() { Vec::new() } else { local };
        self.shard.commit(&stored_ids);
        self.len += n;
        let h = self.model.config.hidden_size;
        if decode {
            if me == 0 {
                return Ok(Some(self.model.head_logits(&x)?));
            }
            return Ok(None);
        }
        if me == owner_of_last {
            let logits = self.model.head_logits(&x[x.len() - h..])?;
            if me == 0 {
                return Ok(Some(logits));
            }
            ring.send(0, Tag::Logits, Arc::new(logits))?;
            return Ok(None);
        }
        if me == 0 {
            let logits = ring.recv(owner_of_last, Tag::Logits, Some(self.opts.timeout))?;
            return Ok(Some(logits.to_vec()));
        }
        Ok(None)
    }
}
