//! Ring attention forward and backward across threads (`sp` workers on one machine), as the
//! original's `_ring_attention_fwd/_bwd`: worker w owns query, key and value rows
//! [w·L/sp, (w+1)·L/sp). In step s it holds the key/value block of worker (w − s) mod sp,
//! works on it with global positions (so causal masks and segment ids are exact), then
//! passes it to worker w + 1. In the backward pass the block's dK/dV accumulators travel
//! with it, so after sp steps every dK/dV has gone round the ring and is back at its owner.
//! Only one block per worker is in flight: memory per worker is linear in L/sp.
//!
//! Per (query row i, key j) pair the math is `attention_grad`'s (p from the saved lse).
//! Across machines (MPI) the same loop would send the block over the network; not built.

use super::attention_grad::{dot, gather_rows, scatter_rows, AttnDims, AttnMasking};
use crate::attention::{attend_block, BlockMask, Partial};
use anyhow::{bail, Result};
use std::sync::mpsc;

/// The key/value block travelling round the ring: per (b, kv head) contiguous rows.
struct KvBlock {
    owner: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    dk: Vec<Vec<f32>>,
    dv: Vec<Vec<f32>>,
}

/// Run `work(worker, block, send)` on sp threads connected in a ring.
fn ring<R: Send>(
    sp: usize,
    init: impl Fn(usize) -> KvBlock + Sync,
    work: impl Fn(usize, KvBlock, &dyn Fn(KvBlock) -> KvBlock) -> R + Sync,
) -> Vec<R> {
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..sp).map(|_| mpsc::channel::<KvBlock>()).unzip();
    std::thread::scope(|s| {
        let handles: Vec<_> = rxs
            .into_iter()
            .enumerate()
            .map(|(w, rx)| {
                let tx = txs[(w + 1) % sp].clone();
                let (init, work) = (&init, &work);
                s.spawn(move || {
                    // Pass the held block to the right neighbour, take the left one's.
                    let pass = move |blk: KvBlock| -> KvBlock {
                        tx.send(blk).expect("ring neighbour alive");
                        rx.recv().expect("ring neighbour alive")
                    };
                    work(w, init(w), &pass)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("ring worker panicked"))
            .collect()
    })
}

fn check(dims: &AttnDims, sp: usize) -> Result<usize> {
    if sp == 0 || !dims.len.is_multiple_of(sp) {
        bail!(
            "sequence length {} does not split into {sp} ring shards",
            dims.len
        );
    }
    Ok(dims.len / sp)
}

fn own_block(
    k: &[f32],
    v: &[f32],
    dims: &AttnDims,
    w: usize,
    shard: usize,
    with_grads: bool,
) -> KvBlock {
    let mut blk = KvBlock {
        owner: w,
        k: vec![],
        v: vec![],
        dk: vec![],
        dv: vec![],
    };
    for b in 0..dims.batch {
        for h in 0..dims.kv_heads {
            blk.k
                .push(gather_rows(k, dims, dims.kv_heads, b, h, w * shard, shard));
            blk.v
                .push(gather_rows(v, dims, dims.kv_heads, b, h, w * shard, shard));
            if with_grads {
                blk.dk.push(vec![0.0; shard * dims.d]);
                blk.dv.push(vec![0.0; shard * dims.d]);
            }
        }
    }
    blk
}

/// Ring forward: `out` (batch, len, heads, d) and `lse` (batch, heads, len).
pub fn ring_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: &AttnDims,
    masking: &AttnMasking,
    sp: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let shard = check(dims, sp)?;
    let (d, heads, group) = (dims.d, dims.heads, dims.heads / dims.kv_heads);
    let scale = 1.0 / (d as f32).sqrt();
    let parts = ring(
        sp,
        |w| own_block(k, v, dims, w, shard, false),
        |w, mut blk, pass| {
            let qs: Vec<Vec<f32>> = (0..dims.batch * heads)
                .map(|i| gather_rows(q, dims, heads, i / heads, i % heads, w * shard, shard))
                .collect();
            let mut st: Vec<Partial> = (0..dims.batch * heads)
                .map(|_| Partial::new(shard, d))
                .collect();
            for step in 0..sp {
                for (i, s) in st.iter_mut().enumerate() {
                    let (b, h) = (i / heads, i % heads);
                    let seg = masking
                        .segment_ids
                        .as_deref()
                        .map(|x| &x[b * dims.len..(b + 1) * dims.len]);
                    let kv = b * dims.kv_heads + h / group;
                    let mask = BlockMask {
                        q_pos0: w * shard,
                        k_pos0: blk.owner * shard,
                        causal: masking.causal,
                        q_segments: seg.map(|x| &x[w * shard..(w + 1) * shard]),
                        k_segments: seg.map(|x| &x[blk.owner * shard..(blk.owner + 1) * shard]),
                    };
                    attend_block(&qs[i], d, &blk.k[kv], &blk.v[kv], scale, &mask, s);
                }
                if step + 1 < sp {
                    blk = pass(blk);
                }
            }
            st
        },
    );
    let mut out = vec![0.0f32; q.len()];
    let mut lse = vec![f32::NEG_INFINITY; dims.batch * heads * dims.len];
    for (w, st) in parts.into_iter().enumerate() {
        for (i, s) in st.into_iter().enumerate() {
            let (b, h) = (i / heads, i % heads);
            let mut o = vec![0.0f32; shard * d];
            s.finish_into(&mut o);
            scatter_rows(&mut out, dims, heads, b, h, w * shard, &o);
            lse[i * dims.len + w * shard..i * dims.len + (w + 1) * shard].copy_from_slice(&s.lse());
        }
    }
    Ok((out, lse))
}

/// Ring backward: (dq, dk, dv) from the forward's `out` and `lse`.
#[allow(clippy::too_many_arguments)]
pub fn ring_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dims: &AttnDims,
    masking: &AttnMasking,
    sp: usize,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let shard = check(dims, sp)?;
    let (d, heads, kvh, group) = (
        dims.d,
        dims.heads,
        dims.kv_heads,
        dims.heads / dims.kv_heads,
    );
    let scale = 1.0 / (d as f32).sqrt();
    let parts = ring(
        sp,
        |w| own_block(k, v, dims, w, shard, true),
        |w, mut blk, pass| {
            let n = dims.batch * heads;
            let qs: Vec<Vec<f32>> = (0..n)
                .map(|i| gather_rows(q, dims, heads, i / heads, i % heads, w * shard, shard))
                .collect();
            let gs: Vec<Vec<f32>> = (0..n)
                .map(|i| gather_rows(dout, dims, heads, i / heads, i % heads, w * shard, shard))
                .collect();
            let delta: Vec<Vec<f32>> = (0..n)
                .map(|i| {
                    let o = gather_rows(out, dims, heads, i / heads, i % heads, w * shard, shard);
                    o.chunks_exact(d)
                        .zip(gs[i].chunks_exact(d))
                        .map(|(a, g)| dot(a, g))
                        .collect()
                })
                .collect();
            let mut dq: Vec<Vec<f32>> = (0..n).map(|_| vec![0.0; shard * d]).collect();
            for step in 0..sp {
                let (q0, k0) = (w * shard, blk.owner * shard);
                for i in 0..n {
                    let (b, h) = (i / heads, i % heads);
                    let kv = b * kvh + h / group;
                    let seg = masking
                        .segment_ids
                        .as_deref()
                        .map(|x| &x[b * dims.len..(b + 1) * dims.len]);
                    for r in 0..shard {
                        let lse_r = lse[i * dims.len + q0 + r];
                        if lse_r == f32::NEG_INFINITY {
                            continue;
                        }
                        let (qi, gi) = (&qs[i][r * d..(r + 1) * d], &gs[i][r * d..(r + 1) * d]);
                        for c in 0..shard {
                            let (qp, kp) = (q0 + r, k0 + c);
                            if (masking.causal && kp > qp) || seg.is_some_and(|s| s[qp] != s[kp]) {
                                continue;
                            }
                            let kj = &blk.k[kv][c * d..(c + 1) * d];
                            let p = (scale * dot(qi, kj) - lse_r).exp();
                            let ds = p * (dot(gi, &blk.v[kv][c * d..(c + 1) * d]) - delta[i][r]);
                            for t in 0..d {
                                dq[i][r * d + t] += scale * ds * kj[t];
                                blk.dk[kv][c * d + t] += scale * ds * qi[t];
                                blk.dv[kv][c * d + t] += p * gi[t];
                            }
                        }
                    }
                }
                // dK/dV ride along with K/V; after sp passes the block is home again.
                blk = pass(blk);
                let _ = step;
            }
            debug_assert_eq!(blk.owner, w);
            (dq, blk)
        },
    );
    let (mut dq, mut dk, mut dv) = (
        vec![0.0f32; q.len()],
        vec![0.0f32; k.len()],
        vec![0.0f32; v.len()],
    );
    for (w, (dqs, blk)) in parts.into_iter().enumerate() {
        if blk.owner != w {
            bail!(
                "ring bookkeeping: worker {w} ended with the block of worker {}",
                blk.owner
            );
        }
        for (i, x) in dqs.iter().enumerate() {
            scatter_rows(&mut dq, dims, heads, i / heads, i % heads, w * shard, x);
        }
        for i in 0..dims.batch * kvh {
            scatter_rows(&mut dk, dims, kvh, i / kvh, i % kvh, w * shard, &blk.dk[i]);
            scatter_rows(&mut dv, dims, kvh, i / kvh, i % kvh, w * shard, &blk.dv[i]);
        }
    }
    Ok((dq, dk, dv))
}
