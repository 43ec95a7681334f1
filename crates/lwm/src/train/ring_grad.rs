//! Ring attention forward and backward across threads (`sp` workers on one machine), as the
//! original's `_ring_attention_fwd/_bwd`: worker w owns query, key and value rows
//! [w·L/sp, (w+1)·L/sp). In step s it holds the key/value block of worker (w − s) mod sp,
//! works on it with global positions (so causal masks and segment ids are exact), then
//! passes it to worker w + 1. In the backward pass the block's dK/dV accumulators travel
//! with it, so after sp steps every dK/dV has gone round the ring and is back at its owner.
//! Only one block per worker is in flight: memory per worker is linear in L/sp.
//!
//! Per (query shard, key/value block) pair the work is `attention_kernel`'s vectorised row
//! loops with the pair's global positions: the forward gives each block's (out, lse), merged
//! exactly through the lse; the backward recomputes p from the saved lse of the whole row.
//! Across machines (MPI) the same loop would send the block over the network; not built.

use super::attention_grad::{dot, gather_rows, scatter_rows, AttnDims, AttnMasking};
use super::attention_kernel::{backward_group_at, forward_rows_at, transpose, QueryHead, RowMask};
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

/// Fold one block's (out, lse) rows into the running ones: with m = max(lse_a, lse_b),
/// lse = m + ln(e^(lse_a − m) + e^(lse_b − m)) and out = Σ out_x · e^(lse_x − lse).
fn merge_rows(acc: &mut [f32], acc_lse: &mut [f32], o: &[f32], lse: &[f32], d: usize) {
    for (r, &lb) in lse.iter().enumerate() {
        let la = acc_lse[r];
        if lb == f32::NEG_INFINITY {
            continue;
        }
        let row = &mut acc[r * d..(r + 1) * d];
        let ob = &o[r * d..(r + 1) * d];
        if la == f32::NEG_INFINITY {
            row.copy_from_slice(ob);
            acc_lse[r] = lb;
            continue;
        }
        let m = la.max(lb);
        let (wa, wb) = ((la - m).exp(), (lb - m).exp());
        let total = wa + wb;
        let (wa, wb) = (wa / total, wb / total);
        for (x, &y) in row.iter_mut().zip(ob) {
            *x = *x * wa + y * wb;
        }
        acc_lse[r] = m + total.ln();
    }
}

/// The row mask of batch row b: causality and its segment ids, indexed by position.
fn row_mask<'a>(masking: &'a AttnMasking, dims: &AttnDims, b: usize) -> RowMask<'a> {
    RowMask {
        causal: masking.causal,
        segments: masking
            .segment_ids
            .as_deref()
            .map(|x| &x[b * dims.len..(b + 1) * dims.len]),
    }
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
    let (d, heads, kvh, group) = (
        dims.d,
        dims.heads,
        dims.kv_heads,
        dims.heads / dims.kv_heads,
    );
    let scale = 1.0 / (d as f32).sqrt();
    let parts = ring(
        sp,
        |w| own_block(k, v, dims, w, shard, false),
        |w, mut blk, pass| {
            let n = dims.batch * heads;
            let qs: Vec<Vec<f32>> = (0..n)
                .map(|i| gather_rows(q, dims, heads, i / heads, i % heads, w * shard, shard))
                .collect();
            let mut acc: Vec<Vec<f32>> = (0..n).map(|_| vec![0.0; shard * d]).collect();
            let mut acc_lse: Vec<Vec<f32>> =
                (0..n).map(|_| vec![f32::NEG_INFINITY; shard]).collect();
            let (mut o, mut l) = (vec![0.0f32; shard * d], vec![0.0f32; shard]);
            for step in 0..sp {
                let (q0, k0) = (w * shard, blk.owner * shard);
                // Causal: a block wholly after this shard is invisible to it.
                if !(masking.causal && k0 > q0 + shard - 1) {
                    for kv in 0..dims.batch * kvh {
                        let (b, hk) = (kv / kvh, kv % kvh);
                        let kt = transpose(&blk.k[kv], shard, d);
                        let vt = transpose(&blk.v[kv], shard, d);
                        for h in hk * group..(hk + 1) * group {
                            let i = b * heads + h;
                            let mask = row_mask(masking, dims, b);
                            forward_rows_at(
                                &qs[i], q0, &kt, &vt, k0, shard, d, scale, mask, &mut o, &mut l,
                            );
                            merge_rows(&mut acc[i], &mut acc_lse[i], &o, &l, d);
                        }
                    }
                }
                if step + 1 < sp {
                    blk = pass(blk);
                }
            }
            (acc, acc_lse)
        },
    );
    let mut out = vec![0.0f32; q.len()];
    let mut lse = vec![f32::NEG_INFINITY; dims.batch * heads * dims.len];
    for (w, (acc, acc_lse)) in parts.into_iter().enumerate() {
        for (i, (o, l)) in acc.iter().zip(&acc_lse).enumerate() {
            let (b, h) = (i / heads, i % heads);
            scatter_rows(&mut out, dims, heads, b, h, w * shard, o);
            lse[i * dims.len + w * shard..i * dims.len + (w + 1) * shard].copy_from_slice(l);
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
            for _ in 0..sp {
                let (q0, k0) = (w * shard, blk.owner * shard);
                if !(masking.causal && k0 > q0 + shard - 1) {
                    for kv in 0..dims.batch * kvh {
                        let (b, hk) = (kv / kvh, kv % kvh);
                        let query_heads: Vec<QueryHead> = (hk * group..(hk + 1) * group)
                            .map(|h| {
                                let i = b * heads + h;
                                QueryHead {
                                    q: &qs[i],
                                    dout: &gs[i],
                                    lse: &lse[i * dims.len + q0..i * dims.len + q0 + shard],
                                    delta: &delta[i],
                                }
                            })
                            .collect();
                        let (dqs, dk, dv) = backward_group_at(
                            &query_heads,
                            q0,
                            &blk.k[kv],
                            &blk.v[kv],
                            k0,
                            shard,
                            d,
                            masking.chunking.key_chunk,
                            scale,
                            row_mask(masking, dims, b),
                        );
                        for (j, g) in dqs.iter().enumerate() {
                            add_into(&mut dq[b * heads + hk * group + j], g);
                        }
                        add_into(&mut blk.dk[kv], &dk);
                        add_into(&mut blk.dv[kv], &dv);
                    }
                }
                // dK/dV ride along with K/V; after sp passes the block is home again.
                blk = pass(blk);
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

fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, &b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}
