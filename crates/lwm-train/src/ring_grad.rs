//! Ring attention forward and backward, as the original's `_ring_attention_fwd/_bwd`:
//! worker w owns query, key and value rows [w·S, (w+1)·S) of every sequence (S = L/sp). In
//! step s it holds the key/value block of worker (w − s) mod sp, works on it with global
//! positions (so causal masks and segment ids are exact), then passes it to worker w + 1.
//! In the backward pass the block's dK/dV accumulators travel with it, so after sp steps
//! every dK/dV has gone round the ring and is back at its owner. Only one block per worker
//! is in flight: memory per worker is linear in S.
//!
//! Per (query shard, key/value block) pair the work is `attention_kernel`'s vectorised row
//! loops with the pair's global positions: the forward gives each block's (out, lse), merged
//! exactly through the lse; the backward recomputes p from the saved lse of the whole row.
//!
//! Two drivers share the per-worker loops (`forward_worker`, `backward_worker`):
//! `ring_forward`/`ring_backward` split one process's whole sequence over sp threads
//! (`train.sp`); `shard_forward`/`shard_backward` run one rank's part when each rank is a
//! process holding only its own rows (`seq_parallel`: `mpirun -n SP lwm train`), passing
//! blocks with whatever `pass` the caller gives (the MPI transport there).

pub use super::attention_rows::KvBlock;

use super::attention_kernel::{backward_group_at, forward_rows_at, transpose, QueryHead, RowMask};
use super::attention_rows::{dot, gather_rows, scatter_rows, AttnDims, AttnMasking};
use anyhow::{bail, Result};
use std::sync::mpsc;

/// Hand the held block to the right neighbour and take the left one's.
pub type Pass<'a> = dyn FnMut(KvBlock) -> Result<KvBlock> + 'a;

/// One buffer per (b, head) of a worker's rows.
type HeadRows = Vec<Vec<f32>>;

/// Run `work(worker, block, pass)` on sp threads connected in a ring.
fn ring<R: Send>(
    sp: usize,
    init: impl Fn(usize) -> KvBlock + Sync,
    work: impl Fn(usize, KvBlock, &mut Pass) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..sp).map(|_| mpsc::channel::<KvBlock>()).unzip();
    // Each sender lives only in the worker that uses it, so a worker that stops (error)
    // disconnects its neighbour's receive instead of leaving it blocked.
    let mut txs: Vec<Option<mpsc::Sender<KvBlock>>> = txs.into_iter().map(Some).collect();
    let mut outs = Vec::with_capacity(sp);
    std::thread::scope(|s| {
        let handles: Vec<_> = rxs
            .into_iter()
            .enumerate()
            .map(|(w, rx)| {
                let tx = txs[(w + 1) % sp].take().expect("one sender per worker");
                let (init, work) = (&init, &work);
                s.spawn(move || {
                    let mut pass = move |blk: KvBlock| -> Result<KvBlock> {
                        if tx.send(blk).is_err() {
                            bail!("ring worker {} stopped", (w + 1) % sp);
                        }
                        rx.recv().map_err(|_| {
                            anyhow::anyhow!("ring worker {} stopped", (w + sp - 1) % sp)
                        })
                    };
                    work(w, init(w), &mut pass)
                })
            })
            .collect();
        for h in handles {
            outs.push(
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a ring worker panicked"))),
            );
        }
    });
    outs.into_iter().collect()
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

/// The block of rows r0..r0+rows of buffers laid out as `dims`, owned by worker `owner`.
fn own_block(
    k: &[f32],
    v: &[f32],
    dims: &AttnDims,
    owner: usize,
    r0: usize,
    rows: usize,
    with_grads: bool,
) -> KvBlock {
    let mut blk = KvBlock {
        owner,
        k: vec![],
        v: vec![],
        dk: vec![],
        dv: vec![],
    };
    for b in 0..dims.batch {
        for h in 0..dims.kv_heads {
            blk.k
                .push(gather_rows(k, dims, dims.kv_heads, b, h, r0, rows));
            blk.v
                .push(gather_rows(v, dims, dims.kv_heads, b, h, r0, rows));
            if with_grads {
                blk.dk.push(vec![0.0; rows * dims.d]);
                blk.dv.push(vec![0.0; rows * dims.d]);
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

/// Per (b, head) rows r0..r0+rows of a (batch, len, heads, d) buffer.
fn head_rows(x: &[f32], dims: &AttnDims, heads: usize, r0: usize, rows: usize) -> HeadRows {
    (0..dims.batch * heads)
        .map(|i| gather_rows(x, dims, heads, i / heads, i % heads, r0, rows))
        .collect()
}

/// One worker's forward: its query rows `qs` (per (b, head), `shard` rows from global row
/// `w·shard`) against every key/value block as it comes round. `dims` are the whole
/// sequence's (masks are indexed by global position). Returns per (b, head) (out, lse).
#[allow(clippy::too_many_arguments)]
fn forward_worker(
    w: usize,
    sp: usize,
    shard: usize,
    qs: &[Vec<f32>],
    mut blk: KvBlock,
    dims: &AttnDims,
    masking: &AttnMasking,
    pass: &mut Pass,
) -> Result<(HeadRows, HeadRows)> {
    let (d, heads, kvh) = (dims.d, dims.heads, dims.kv_heads);
    let group = heads / kvh;
    let scale = 1.0 / (d as f32).sqrt();
    let n = dims.batch * heads;
    let mut acc: Vec<Vec<f32>> = (0..n).map(|_| vec![0.0; shard * d]).collect();
    let mut acc_lse: Vec<Vec<f32>> = (0..n).map(|_| vec![f32::NEG_INFINITY; shard]).collect();
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
            blk = pass(blk)?;
        }
    }
    Ok((acc, acc_lse))
}

/// One worker's backward: from its rows' q, dout, out and lse (per (b, head)), the dQ of
/// its rows and its own block back home with the dK/dV every worker added to it.
#[allow(clippy::too_many_arguments)]
fn backward_worker(
    w: usize,
    sp: usize,
    shard: usize,
    qs: &[Vec<f32>],
    gs: &[Vec<f32>],
    os: &[Vec<f32>],
    lses: &[Vec<f32>],
    mut blk: KvBlock,
    dims: &AttnDims,
    masking: &AttnMasking,
    pass: &mut Pass,
) -> Result<(HeadRows, KvBlock)> {
    let (d, heads, kvh) = (dims.d, dims.heads, dims.kv_heads);
    let group = heads / kvh;
    let scale = 1.0 / (d as f32).sqrt();
    let n = dims.batch * heads;
    let delta: Vec<Vec<f32>> = (0..n)
        .map(|i| {
            os[i]
                .chunks_exact(d)
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
                            lse: &lses[i],
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
        blk = pass(blk)?;
    }
    if blk.owner != w {
        bail!(
            "ring bookkeeping: worker {w} ended with the block of worker {}",
            blk.owner
        );
    }
    Ok((dq, blk))
}

/// lse rows r0..r0+rows of every (b, head) from an lse laid out (batch, heads, len).
fn lse_rows(lse: &[f32], len: usize, n: usize, r0: usize, rows: usize) -> HeadRows {
    (0..n)
        .map(|i| lse[i * len + r0..i * len + r0 + rows].to_vec())
        .collect()
}

/// Ring forward over sp threads: `out` (batch, len, heads, d) and `lse` (batch, heads, len).
pub fn ring_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: &AttnDims,
    masking: &AttnMasking,
    sp: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let shard = check(dims, sp)?;
    let heads = dims.heads;
    let parts = ring(
        sp,
        |w| own_block(k, v, dims, w, w * shard, shard, false),
        |w, blk, pass| {
            let qs = head_rows(q, dims, heads, w * shard, shard);
            forward_worker(w, sp, shard, &qs, blk, dims, masking, pass)
        },
    )?;
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

/// Ring backward over sp threads: (dq, dk, dv) from the forward's `out` and `lse`.
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
    let heads = dims.heads;
    let n = dims.batch * heads;
    let parts = ring(
        sp,
        |w| own_block(k, v, dims, w, w * shard, shard, true),
        |w, blk, pass| {
            let r0 = w * shard;
            let qs = head_rows(q, dims, heads, r0, shard);
            let gs = head_rows(dout, dims, heads, r0, shard);
            let os = head_rows(out, dims, heads, r0, shard);
            let ls = lse_rows(lse, dims.len, n, r0, shard);
            backward_worker(w, sp, shard, &qs, &gs, &os, &ls, blk, dims, masking, pass)
        },
    )?;
    let (mut dq, mut dk, mut dv) = (
        vec![0.0f32; q.len()],
        vec![0.0f32; k.len()],
        vec![0.0f32; v.len()],
    );
    for (w, (dqs, blk)) in parts.into_iter().enumerate() {
        scatter_shard(&mut dq, &mut dk, &mut dv, dims, w * shard, &dqs, &blk);
    }
    Ok((dq, dk, dv))
}

/// Write one worker's dQ rows and its block's dK/dV (rows r0..) into (batch, len, ·, d) buffers.
fn scatter_shard(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dims: &AttnDims,
    r0: usize,
    dqs: &[Vec<f32>],
    blk: &KvBlock,
) {
    let (heads, kvh) = (dims.heads, dims.kv_heads);
    for (i, x) in dqs.iter().enumerate() {
        scatter_rows(dq, dims, heads, i / heads, i % heads, r0, x);
    }
    for i in 0..dims.batch * kvh {
        scatter_rows(dk, dims, kvh, i / kvh, i % kvh, r0, &blk.dk[i]);
        scatter_rows(dv, dims, kvh, i / kvh, i % kvh, r0, &blk.dv[i]);
    }
}

/// The whole sequence's dims for a rank holding `local.len` rows of each of `sp` shards.
fn full_dims(local: &AttnDims, sp: usize) -> AttnDims {
    AttnDims {
        len: local.len * sp,
        ..*local
    }
}

/// One rank's forward when each rank is a process holding only rows
/// [rank·S, (rank+1)·S) of every sequence: q (batch, S, heads, d), k and v (batch, S,
/// kv heads, d) are that rank's rows (`local` gives S as `len`); `masking`'s segment ids
/// cover the whole sequence (batch × S·sp). Returns this rank's out (batch, S, heads, d) and
/// lse (batch, heads, S). Every rank must call it at the same point with its own `pass`.
#[allow(clippy::too_many_arguments)]
pub fn shard_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    local: &AttnDims,
    masking: &AttnMasking,
    rank: usize,
    sp: usize,
    pass: &mut Pass,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (shard, heads) = (local.len, local.heads);
    let full = full_dims(local, sp);
    let qs = head_rows(q, local, heads, 0, shard);
    let blk = own_block(k, v, local, rank, 0, shard, false);
    let (acc, acc_lse) = forward_worker(rank, sp, shard, &qs, blk, &full, masking, pass)?;
    let mut out = vec![0.0f32; q.len()];
    for (i, o) in acc.iter().enumerate() {
        scatter_rows(&mut out, local, heads, i / heads, i % heads, 0, o);
    }
    Ok((out, acc_lse.concat()))
}

/// One rank's backward (see `shard_forward`): this rank's (dq, dk, dv), its keys' and
/// values' gradients summed over every rank's queries.
#[allow(clippy::too_many_arguments)]
pub fn shard_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    local: &AttnDims,
    masking: &AttnMasking,
    rank: usize,
    sp: usize,
    pass: &mut Pass,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (shard, heads) = (local.len, local.heads);
    let full = full_dims(local, sp);
    let n = local.batch * heads;
    let qs = head_rows(q, local, heads, 0, shard);
    let gs = head_rows(dout, local, heads, 0, shard);
    let os = head_rows(out, local, heads, 0, shard);
    let ls = lse_rows(lse, shard, n, 0, shard);
    let blk = own_block(k, v, local, rank, 0, shard, true);
    let (dqs, blk) = backward_worker(
        rank, sp, shard, &qs, &gs, &os, &ls, blk, &full, masking, pass,
    )?;
    let (mut dq, mut dk, mut dv) = (
        vec![0.0f32; q.len()],
        vec![0.0f32; k.len()],
        vec![0.0f32; v.len()],
    );
    scatter_shard(&mut dq, &mut dk, &mut dv, local, 0, &dqs, &blk);
    Ok((dq, dk, dv))
}

fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, &b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}
