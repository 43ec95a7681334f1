//! A decode step across the ring: the new token's query is the same on every worker; each
//! computes the partials of its own key blocks (`attention::decode_block_partial`, the
//! single worker's unit), and every worker receives every block's partials and merges them
//! in ascending block order, as one worker does. So all workers end with bit-identical
//! outputs equal to one worker's, and stay in lockstep.

use super::prefill::Heads;
use super::transport::{Ring, Tag};
use super::RingTimes;
use anyhow::{bail, Result};
use lwm_core::attention::{decode_block_partial, Partial};
use lwm_core::kv::{key_blocks, KvShard};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Per own key block: its index and the partials of every KV head's query group.
type BlockPartials = Vec<(usize, Vec<Partial>)>;

fn own_partials(
    q: &[f32],
    q_pos: usize,
    heads: Heads,
    shard: &KvShard,
    layer: usize,
    key_chunk: usize,
) -> BlockPartials {
    let Heads { n_heads, n_kv, d } = heads;
    let group = n_heads / n_kv;
    let scale = 1.0 / (d as f32).sqrt();
    let view = shard.view(layer);
    let blocks = key_blocks(shard.runs(), key_chunk);
    let nb = blocks.len();
    let parts: Vec<Option<Partial>> = lwm_core::parallel::map(n_kv * nb, |i| {
        let (b, g) = (i / n_kv, i % n_kv);
        let qg = &q[g * group * d..(g + 1) * group * d];
        Some(decode_block_partial(
            qg, group, q_pos, &view, g, &blocks[b], scale,
        ))
    });
    let mut parts = parts.into_iter().map(|p| p.expect("every task ran"));
    blocks
        .iter()
        .map(|b| (b.index, parts.by_ref().take(n_kv).collect()))
        .collect()
}

/// `[n_blocks, (index, per KV head: acc, m, l)…]`, indices as u32 bits.
fn pack(parts: &BlockPartials) -> Vec<f32> {
    let mut out = vec![f32::from_bits(parts.len() as u32)];
    for (index, heads) in parts {
        out.push(f32::from_bits(*index as u32));
        for p in heads {
            out.extend_from_slice(&p.acc);
            out.extend_from_slice(&p.m);
            out.extend_from_slice(&p.l);
        }
    }
    out
}

fn unpack(block: &[f32], heads: Heads) -> Result<BlockPartials> {
    let Heads { n_heads, n_kv, d } = heads;
    let group = n_heads / n_kv;
    let per = 1 + n_kv * group * (d + 2);
    let Some(&n) = block.first() else {
        bail!("empty decode partial");
    };
    let n = n.to_bits() as usize;
    if block.len() != 1 + n * per {
        bail!(
            "decode partial of {} values, expected {} for {n} key blocks",
            block.len(),
            1 + n * per
        );
    }
    Ok(block[1..]
        .chunks_exact(per)
        .map(|b| {
            let index = b[0].to_bits() as usize;
            let heads = b[1..]
                .chunks_exact(group * (d + 2))
                .map(|h| Partial {
                    d,
                    acc: h[..group * d].to_vec(),
                    m: h[group * d..group * (d + 1)].to_vec(),
                    l: h[group * (d + 1)..].to_vec(),
                })
                .collect();
            (index, heads)
        })
        .collect())
}

/// Attention output (heads·d) of the new token's query `q` at `q_pos` against all shards.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    ring: &mut dyn Ring,
    q: &[f32],
    q_pos: usize,
    heads: Heads,
    shard: &KvShard,
    layer: usize,
    key_chunk: usize,
    timeout: Duration,
    times: &mut RingTimes,
) -> Result<Vec<f32>> {
    let t0 = Instant::now();
    let own = own_partials(q, q_pos, heads, shard, layer, key_chunk);
    times.compute_secs += t0.elapsed().as_secs_f64();
    let (sp, me) = (ring.size(), ring.rank());
    let packed = Arc::new(pack(&own));
    for dst in (0..sp).filter(|&r| r != me) {
        times.bytes_sent += packed.len() * 4;
        ring.send(dst, Tag::Partial, packed.clone())?;
    }
    let t1 = Instant::now();
    let mut all = own;
    for src in (0..sp).filter(|&r| r != me) {
        all.extend(unpack(
            &ring.recv(src, Tag::Partial, Some(timeout))?,
            heads,
        )?);
    }
    times.wait_secs += t1.elapsed().as_secs_f64();
    all.sort_by_key(|(index, _)| *index);
    let Heads { n_heads, n_kv, d } = heads;
    let group = n_heads / n_kv;
    let mut out = vec![0.0f32; n_heads * d];
    for g in 0..n_kv {
        let mut merged = Partial::new(group, d);
        for (_, parts) in &all {
            merged.merge(&parts[g]);
        }
        merged.finish_into(&mut out[g * group * d..(g + 1) * group * d]);
    }
    Ok(out)
}
