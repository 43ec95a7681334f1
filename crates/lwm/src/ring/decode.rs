//! A decode step across the ring: the new token's query is the same on every worker; each
//! attends it to its own shard, and the partials (unnormalised output, running max, sum —
//! i.e. output and log-sum-exp) are exchanged and merged exactly. Every worker merges them
//! in rank order, so all workers end with bit-identical outputs and stay in lockstep.

use super::prefill::Heads;
use super::shard::KvShard;
use super::transport::{Ring, Tag};
use super::RingTimes;
use crate::attention::{attend_block, BlockMask, Partial};
use anyhow::{bail, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Partials of one query row per head against this worker's shard of `layer`, computed over
/// key chunks in parallel and merged per head.
fn own_partials(
    q: &[f32],
    heads: Heads,
    shard: &KvShard,
    layer: usize,
    key_chunk: usize,
) -> Vec<Partial> {
    let d = heads.d;
    let group = heads.n_heads / heads.n_kv;
    let scale = 1.0 / (d as f32).sqrt();
    let kc = key_chunk.max(1);
    let rows = shard.rows();
    let splits = rows.div_ceil(kc).max(1);
    let parts: Vec<Option<Partial>> = crate::parallel::map(heads.n_heads * splits, |i| {
        let (h, s) = (i / splits, i % splits);
        let (k, v) = shard.head(layer, h / group);
        let (lo, hi) = (s * kc, ((s + 1) * kc).min(rows));
        let mut p = Partial::new(1, d);
        if hi > lo {
            // Every key held precedes (or is) the new token: nothing to mask.
            attend_block(
                &q[h * d..],
                d,
                &k[lo * d..hi * d],
                &v[lo * d..hi * d],
                scale,
                &BlockMask::full(),
                &mut p,
            );
        }
        Some(p)
    });
    let mut merged: Vec<Partial> = (0..heads.n_heads).map(|_| Partial::new(1, d)).collect();
    for (i, p) in parts.into_iter().enumerate() {
        merged[i / splits].merge(&p.expect("every task ran"));
    }
    merged
}

fn pack(parts: &[Partial]) -> Vec<f32> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(&p.acc);
    }
    out.extend(parts.iter().map(|p| p.m[0]));
    out.extend(parts.iter().map(|p| p.l[0]));
    out
}

fn unpack(block: &[f32], heads: Heads) -> Result<Vec<Partial>> {
    let (nh, d) = (heads.n_heads, heads.d);
    if block.len() != nh * (d + 2) {
        bail!(
            "decode partial of {} values, expected {}",
            block.len(),
            nh * (d + 2)
        );
    }
    Ok((0..nh)
        .map(|h| Partial {
            d,
            acc: block[h * d..(h + 1) * d].to_vec(),
            m: vec![block[nh * d + h]],
            l: vec![block[nh * d + nh + h]],
        })
        .collect())
}

/// Attention output (heads·d) of the new token's query `q` against all shards.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    ring: &mut dyn Ring,
    q: &[f32],
    heads: Heads,
    shard: &KvShard,
    layer: usize,
    key_chunk: usize,
    timeout: Duration,
    times: &mut RingTimes,
) -> Result<Vec<f32>> {
    let t0 = Instant::now();
    let own = own_partials(q, heads, shard, layer, key_chunk);
    times.compute_secs += t0.elapsed().as_secs_f64();
    let sp = ring.size();
    let me = ring.rank();
    let packed = Arc::new(pack(&own));
    for dst in (0..sp).filter(|&r| r != me) {
        times.bytes_sent += packed.len() * 4;
        ring.send(dst, Tag::Partial, packed.clone())?;
    }
    let t1 = Instant::now();
    let mut merged: Vec<Partial> = (0..heads.n_heads)
        .map(|_| Partial::new(1, heads.d))
        .collect();
    for src in 0..sp {
        let parts = if src == me {
            unpack(&packed, heads)?
        } else {
            unpack(&ring.recv(src, Tag::Partial, Some(timeout))?, heads)?
        };
        for (m, p) in merged.iter_mut().zip(&parts) {
            m.merge(p);
        }
    }
    times.wait_secs += t1.elapsed().as_secs_f64();
    let mut out = vec![0.0f32; heads.n_heads * heads.d];
    for (h, p) in merged.iter().enumerate() {
        p.finish_into(&mut out[h * heads.d..(h + 1) * heads.d]);
    }
    Ok(out)
}
