//! The ring pass of one layer: every worker's queries meet every worker's key/value shard.
//!
//! Step s = 0..sp−1: worker r holds the shard of worker (r − s) mod sp. It first hands that
//! shard to its right neighbour (a non-blocking send), then merges the partials of its
//! query tiles against it with the blockwise primitive, then takes the next shard from its
//! left neighbour. Transfer of step s+1's block overlaps step s's compute. Key chunks
//! whose first position lies after a query tile's last position are fully masked and
//! skipped, so with the zig-zag layout every worker does the same causal work.

use super::shard::ShardView;
use super::transport::{Block, Ring, Tag};
use super::RingTimes;
use crate::attention::{attend_block, BlockMask, Chunking, Partial};
use crate::model::PositionRun;
use anyhow::{Context, Result};
use std::time::{Duration, Instant};

/// Head layout of a layer: query heads, KV heads (grouped-query), head dimension.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub n_heads: usize,
    pub n_kv: usize,
    pub d: usize,
}

/// A query tile: `rows` consecutive local rows of head `h` starting at local row `row0`,
/// at positions `pos0..`.
#[derive(Debug, Clone, Copy)]
struct Tile {
    h: usize,
    row0: usize,
    pos0: usize,
    rows: usize,
}

fn tiles(q_runs: &[PositionRun], heads: Heads, query_chunk: usize) -> Vec<Tile> {
    let qc = query_chunk.max(1);
    let mut out = Vec::new();
    for h in 0..heads.n_heads {
        for run in q_runs {
            for off in (0..run.len).step_by(qc) {
                out.push(Tile {
                    h,
                    row0: run.row0 + off,
                    pos0: run.pos0 + off,
                    rows: qc.min(run.len - off),
                });
            }
        }
    }
    out
}

/// Merge into each tile's partial its causally visible keys of one shard.
fn attend_shard(
    q: &[f32],
    heads: Heads,
    tiles: &[Tile],
    partials: &mut [Partial],
    shard: &ShardView,
    key_chunk: usize,
) {
    let d = heads.d;
    let width = heads.n_heads * d;
    let group = heads.n_heads / heads.n_kv;
    let scale = 1.0 / (d as f32).sqrt();
    let kc = key_chunk.max(1);
    crate::parallel::for_each_chunk_mut(partials, 1, |i, p| {
        let t = tiles[i];
        let q_last = t.pos0 + t.rows - 1;
        let (k, v) = shard.head(t.h / group);
        for run in &shard.runs {
            let mut j = 0;
            // Keys past the tile's last query are masked: skip those chunks entirely.
            while j < run.len && run.pos0 + j <= q_last {
                let j1 = (j + kc).min(run.len);
                let (r0, r1) = (run.row0 + j, run.row0 + j1);
                attend_block(
                    &q[t.row0 * width + t.h * d..],
                    width,
                    &k[r0 * d..r1 * d],
                    &v[r0 * d..r1 * d],
                    scale,
                    &BlockMask::causal(t.pos0, run.pos0 + j),
                    &mut p[0],
                );
                j = j1;
            }
        }
    });
}

/// Attention output (local rows × heads·d) of this worker's queries `q` (at `q_runs`)
/// against the shards of all workers; `own` is this worker's packed shard of the layer.
#[allow(clippy::too_many_arguments)]
pub fn ring_attention(
    ring: &mut dyn Ring,
    q: &[f32],
    q_runs: &[PositionRun],
    own: Block,
    heads: Heads,
    chunking: Chunking,
    timeout: Duration,
    times: &mut RingTimes,
) -> Result<Vec<f32>> {
    let d = heads.d;
    let width = heads.n_heads * d;
    let n_local: usize = q_runs.iter().map(|r| r.len).sum();
    let tiles = tiles(q_runs, heads, chunking.query_chunk);
    let mut partials: Vec<Partial> = tiles.iter().map(|t| Partial::new(t.rows, d)).collect();
    let sp = ring.size();
    let mut held = own;
    for step in 0..sp {
        if step + 1 < sp {
            times.bytes_sent += held.len() * 4;
            ring.send(ring.next(), Tag::KvBlock, held.clone())?;
        }
        let t0 = Instant::now();
        let view = ShardView::parse(&held, heads.n_kv, d).with_context(|| {
            format!("key/value block of rank {}", (ring.rank() + sp - step) % sp)
        })?;
        attend_shard(q, heads, &tiles, &mut partials, &view, chunking.key_chunk);
        times.compute_secs += t0.elapsed().as_secs_f64();
        times.blocks += 1;
        if step + 1 < sp {
            let t1 = Instant::now();
            held = ring.recv(ring.prev(), Tag::KvBlock, Some(timeout))?;
            times.wait_secs += t1.elapsed().as_secs_f64();
        }
    }
    let mut out = vec![0.0f32; n_local * width];
    for (t, p) in tiles.iter().zip(&partials) {
        let mut o = vec![0.0f32; t.rows * d];
        p.finish_into(&mut o);
        for (i, row) in o.chunks_exact(d).enumerate() {
            let dst = (t.row0 + i) * width + t.h * d;
            out[dst..dst + d].copy_from_slice(row);
        }
    }
    Ok(out)
}
