//! Blockwise attention with a blockwise backward pass from the saved log-sum-exp, and the
//! candle custom op that lets autograd train through it.
//!
//! Forward (per head, query chunks in parallel) keeps only `out` and `lse_i = log Σ_j
//! exp(s_ij)`. Backward recomputes each key chunk's probabilities from `lse`
//! (FlashAttention-2), so no L × L matrix ever exists:
//!
//! ```text
//!   s_ij  = scale · q_i·k_j              (masked: p_ij = 0)
//!   p_ij  = exp(s_ij − lse_i)
//!   D_i   = Σ_t dO_it · O_it
//!   dp_ij = dO_i · v_j
//!   ds_ij = p_ij · (dp_ij − D_i)
//!   dQ_i += scale · ds_ij · k_j
//!   dK_j += scale · ds_ij · q_i          (summed over the query heads sharing the KV head)
//!   dV_j += p_ij · dO_i
//! ```
//!
//! The row loops are in `attention_kernel` (vectorised along the keys). The backward runs
//! one task per (batch row, KV head): it owns that head's dK, dV and its query heads' dQ,
//! so tasks need no locks and each p is computed once.
//! Masks: causal by index in the sequence, and segment ids (packing): query i sees key j
//! only when `seg_i == seg_j`. Fully masked rows give zero output and zero gradients.

pub use super::attention_rows::{AttnDims, AttnMasking};

use super::attention_kernel::{
    backward_group, forward_rows, transpose, GroupGrads, QueryHead, RowMask,
};
use super::attention_rows::{dot, gather_rows, scatter_rows, KvBlock};
use super::seq_parallel::SeqComm;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use std::sync::Arc;

/// One head of a (batch, len, n_heads, d) buffer as contiguous (len × d) rows.
fn gather_head(x: &[f32], dims: &AttnDims, n_heads: usize, b: usize, h: usize) -> Vec<f32> {
    let (l, d) = (dims.len, dims.d);
    let mut out = Vec::with_capacity(l * d);
    for t in 0..l {
        let base = ((b * l + t) * n_heads + h) * d;
        out.extend_from_slice(&x[base..base + d]);
    }
    out
}

/// Forward: `out` (batch, len, heads, d) and `lse` (batch, heads, len).
pub fn blockwise_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: &AttnDims,
    masking: &AttnMasking,
) -> (Vec<f32>, Vec<f32>) {
    let AttnDims {
        batch,
        len,
        heads,
        kv_heads,
        d,
    } = *dims;
    let group = heads / kv_heads;
    let qc = masking.chunking.query_chunk.max(1);
    let scale = dims.scale();
    // Keys and values of each (b, kv head) transposed (d × len) for the row kernel.
    let kv_t: Vec<(Vec<f32>, Vec<f32>)> = lwm_core::parallel::map(batch * kv_heads, |i| {
        let (b, h) = (i / kv_heads, i % kv_heads);
        (
            transpose(&gather_head(k, dims, kv_heads, b, h), len, d),
            transpose(&gather_head(v, dims, kv_heads, b, h), len, d),
        )
    });
    let chunks = len.div_ceil(qc);
    let tiles: Vec<(Vec<f32>, Vec<f32>)> = lwm_core::parallel::map(batch * heads * chunks, |t| {
        let (bh, c) = (t / chunks, t % chunks);
        let (b, h) = (bh / heads, bh % heads);
        let r0 = c * qc;
        let rows = qc.min(len - r0);
        let q_tile = gather_rows(q, dims, heads, b, h, r0, rows);
        let (kt, vt) = &kv_t[b * kv_heads + h / group];
        let mask = RowMask {
            causal: masking.causal,
            segments: masking.segments(dims, b),
        };
        let mut o = vec![0.0f32; rows * d];
        let mut l = vec![0.0f32; rows];
        forward_rows(&q_tile, r0, kt, vt, len, d, scale, mask, &mut o, &mut l);
        (o, l)
    });
    let mut out = vec![0.0f32; q.len()];
    let mut lse = vec![f32::NEG_INFINITY; batch * heads * len];
    for (t, (o, l)) in tiles.into_iter().enumerate() {
        let (bh, c) = (t / chunks, t % chunks);
        let (b, h) = (bh / heads, bh % heads);
        let r0 = c * qc;
        scatter_rows(&mut out, dims, heads, b, h, r0, &o);
        lse[bh * len + r0..bh * len + r0 + l.len()].copy_from_slice(&l);
    }
    (out, lse)
}

/// Gradients of the attention output w.r.t. q, k, v, from `out`, `lse` and `dout`.
#[allow(clippy::too_many_arguments)]
pub fn blockwise_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dims: &AttnDims,
    masking: &AttnMasking,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttnDims {
        batch,
        len,
        heads,
        kv_heads,
        d,
    } = *dims;
    let group = heads / kv_heads;
    let scale = dims.scale();
    // One task per (b, kv head): it owns dK, dV of that head and dQ of its query heads.
    let groups: Vec<GroupGrads> = lwm_core::parallel::map(batch * kv_heads, |i| {
        let (b, kvh) = (i / kv_heads, i % kv_heads);
        let rows: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (kvh * group..(kvh + 1) * group)
            .map(|h| {
                let qh = gather_head(q, dims, heads, b, h);
                let oh = gather_head(out, dims, heads, b, h);
                let doh = gather_head(dout, dims, heads, b, h);
                let delta = oh
                    .chunks_exact(d)
                    .zip(doh.chunks_exact(d))
                    .map(|(o, g)| dot(o, g))
                    .collect();
                (qh, doh, delta)
            })
            .collect();
        let query_heads: Vec<QueryHead> = rows
            .iter()
            .enumerate()
            .map(|(j, (qh, doh, delta))| {
                let bh = b * heads + kvh * group + j;
                QueryHead {
                    q: qh,
                    dout: doh,
                    lse: &lse[bh * len..(bh + 1) * len],
                    delta,
                }
            })
            .collect();
        let mask = RowMask {
            causal: masking.causal,
            segments: masking.segments(dims, b),
        };
        backward_group(
            &query_heads,
            &gather_head(k, dims, kv_heads, b, kvh),
            &gather_head(v, dims, kv_heads, b, kvh),
            len,
            d,
            masking.chunking.key_chunk,
            scale,
            mask,
        )
    });
    let mut dq = vec![0.0f32; q.len()];
    let mut dk = vec![0.0f32; k.len()];
    let mut dv = vec![0.0f32; v.len()];
    for (i, (dqs, tk, tv)) in groups.iter().enumerate() {
        let (b, kvh) = (i / kv_heads, i % kv_heads);
        for (j, tq) in dqs.iter().enumerate() {
            scatter_rows(&mut dq, dims, heads, b, kvh * group + j, 0, tq);
        }
        scatter_rows(&mut dk, dims, kv_heads, b, kvh, 0, tk);
        scatter_rows(&mut dv, dims, kv_heads, b, kvh, 0, tv);
    }
    (dq, dk, dv)
}

/// The custom op: inputs q (B, L, H, D), k, v (B, L, KVH, D), all f32; output
/// (B, L, H, D + 1) whose last column is `lse` (so backward gets it without hidden state).
/// Use `blockwise_attention`, which drops that column; gradients flowing into the `lse`
/// column are ignored (nothing downstream uses it).
struct BlockwiseAttentionOp {
    masking: AttnMasking,
    spread: Spread,
}

/// Where the sequence of one attention call lives.
enum Spread {
    /// All of it here: blockwise on this thread pool.
    Local,
    /// All of it here, split over a ring of this many threads (`ring_grad::ring_*`).
    Threads(usize),
    /// The inputs are this process's shard; the ring runs over processes (`seq_parallel`).
    Processes(Arc<SeqComm>),
}

impl BlockwiseAttentionOp {
    /// The transport hand-off for `ring_grad::shard_*`: blocks of batch × kv heads entries
    /// of `len` rows.
    fn pass<'a>(
        comm: &'a SeqComm,
        dims: &AttnDims,
        grads: bool,
    ) -> impl FnMut(KvBlock) -> anyhow::Result<KvBlock> + 'a {
        let (entries, per) = (dims.batch * dims.kv_heads, dims.len * dims.d);
        move |blk| comm.pass_kv(blk, entries, per, grads)
    }
}

fn msg(e: anyhow::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{e:#}"))
}

fn dims_of(lq: &Layout, lk: &Layout) -> candle_core::Result<AttnDims> {
    let (qd, kd) = (lq.dims(), lk.dims());
    if qd.len() != 4
        || kd.len() != 4
        || qd[0] != kd[0]
        || qd[1] != kd[1]
        || qd[3] != kd[3]
        || kd[2] == 0
        || qd[2] % kd[2] != 0
    {
        candle_core::bail!("blockwise attention: q {qd:?} and k/v {kd:?} must be (B, L, H, D) with H a multiple of the KV heads");
    }
    Ok(AttnDims {
        batch: qd[0],
        len: qd[1],
        heads: qd[2],
        kv_heads: kd[2],
        d: qd[3],
    })
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("blockwise attention needs contiguous f32 inputs"),
    }
}

impl CustomOp3 for BlockwiseAttentionOp {
    fn name(&self) -> &'static str {
        "blockwise-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = dims_of(l1, l2)?;
        if l3.dims() != l2.dims() {
            candle_core::bail!(
                "blockwise attention: v {:?} differs from k {:?}",
                l3.dims(),
                l2.dims()
            );
        }
        let full_len = match &self.spread {
            Spread::Processes(c) => dims.len * c.size,
            _ => dims.len,
        };
        if let Some(s) = &self.masking.segment_ids {
            if s.len() != dims.batch * full_len {
                candle_core::bail!(
                    "segment ids: {} values for batch {} × len {full_len}",
                    s.len(),
                    dims.batch,
                );
            }
        }
        let (q, k, v) = (
            contiguous_f32(s1, l1)?,
            contiguous_f32(s2, l2)?,
            contiguous_f32(s3, l3)?,
        );
        let (out, lse) = match &self.spread {
            Spread::Processes(c) => {
                let mut pass = Self::pass(c, &dims, false);
                super::ring_grad::shard_forward(
                    q,
                    k,
                    v,
                    &dims,
                    &self.masking,
                    c.rank,
                    c.size,
                    &mut pass,
                )
                .map_err(msg)?
            }
            Spread::Threads(sp) => {
                super::ring_grad::ring_forward(q, k, v, &dims, &self.masking, *sp).map_err(msg)?
            }
            Spread::Local => blockwise_forward(q, k, v, &dims, &self.masking),
        };
        let d = dims.d;
        let mut packed = Vec::with_capacity(out.len() / d * (d + 1));
        for (r, row) in out.chunks_exact(d).enumerate() {
            // Row r is (b, t, h) in order.
            let h = r % dims.heads;
            let t = (r / dims.heads) % dims.len;
            let b = r / (dims.heads * dims.len);
            packed.extend_from_slice(row);
            packed.push(lse[(b * dims.heads + h) * dims.len + t]);
        }
        Ok((
            CpuStorage::F32(packed),
            Shape::from((dims.batch, dims.len, dims.heads, d + 1)),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, l, h, d1) = res.dims4()?;
        let d = d1 - 1;
        let dims = AttnDims {
            batch: b,
            len: l,
            heads: h,
            kv_heads: k.dim(2)?,
            d,
        };
        let flat =
            |t: &Tensor| -> candle_core::Result<Vec<f32>> { t.flatten_all()?.to_vec1::<f32>() };
        let packed = flat(res)?;
        let grad = flat(grad_res)?;
        let mut out = Vec::with_capacity(b * l * h * d);
        let mut dout = Vec::with_capacity(b * l * h * d);
        let mut lse = vec![0.0f32; b * h * l];
        for (r, (row, g)) in packed
            .chunks_exact(d1)
            .zip(grad.chunks_exact(d1))
            .enumerate()
        {
            out.extend_from_slice(&row[..d]);
            dout.extend_from_slice(&g[..d]);
            let (hh, t, bb) = (r % h, (r / h) % l, r / (h * l));
            lse[(bb * h + hh) * l + t] = row[d];
        }
        let (dq, dk, dv) = match &self.spread {
            Spread::Processes(c) => {
                let (q, k, v) = (flat(q)?, flat(k)?, flat(v)?);
                let mut pass = Self::pass(c, &dims, true);
                super::ring_grad::shard_backward(
                    &q,
                    &k,
                    &v,
                    &out,
                    &lse,
                    &dout,
                    &dims,
                    &self.masking,
                    c.rank,
                    c.size,
                    &mut pass,
                )
                .map_err(msg)?
            }
            Spread::Threads(sp) => {
                let (q, k, v) = (flat(q)?, flat(k)?, flat(v)?);
                super::ring_grad::ring_backward(
                    &q,
                    &k,
                    &v,
                    &out,
                    &lse,
                    &dout,
                    &dims,
                    &self.masking,
                    *sp,
                )
                .map_err(msg)?
            }
            Spread::Local => blockwise_backward(
                &flat(q)?,
                &flat(k)?,
                &flat(v)?,
                &out,
                &lse,
                &dout,
                &dims,
                &self.masking,
            ),
        };
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// The same over a ring of `sp` threads (sequence split in `sp` shards; `sp` 1 = no ring).
pub fn ring_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    masking: &AttnMasking,
    sp: usize,
) -> candle_core::Result<Tensor> {
    let spread = if sp > 1 {
        Spread::Threads(sp)
    } else {
        Spread::Local
    };
    apply(q, k, v, masking, spread)
}

/// Attention of this process's shard of the sequence (rows rank·S.. of q, k, v, each
/// (B, S, ·, D)) over the ring of processes in `comm`; `masking`'s segment ids cover the
/// whole rows (B × S·size). Every rank must call it at the same point of its graph.
pub fn shard_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    masking: &AttnMasking,
    comm: &Arc<SeqComm>,
) -> candle_core::Result<Tensor> {
    apply(q, k, v, masking, Spread::Processes(comm.clone()))
}

/// Run the op and drop its `lse` column.
fn apply(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    masking: &AttnMasking,
    spread: Spread,
) -> candle_core::Result<Tensor> {
    let d = q.dim(3)?;
    let packed = q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        BlockwiseAttentionOp {
            masking: masking.clone(),
            spread,
        },
    )?;
    packed.narrow(3, 0, d)
}

/// Differentiable blockwise attention: q (B, L, H, D), k, v (B, L, KVH, D) → (B, L, H, D).
pub fn blockwise_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    masking: &AttnMasking,
) -> candle_core::Result<Tensor> {
    ring_attention(q, k, v, masking, 1)
}
