//! The ring pass of one layer: every worker's queries meet every worker's key/value shard.
//!
//! Step s = 0..sp−1: worker r holds the shard of worker (r − s) mod sp. It first hands that
//! shard to its right neighbour (a non-blocking send), then computes the partials of its
//! query tiles against the shard's key blocks, then takes the next shard from its left
//! neighbour. Transfer of step s+1's block overlaps step s's compute. Key blocks whose
//! first position lies after a tile's last query are fully masked and skipped.
//!
//! Each (tile, key block) partial is the one a single worker computes
//! (`attention::tile_block_partials`), and a tile merges its blocks in ascending block order
//! whatever order the shards arrive in (blocks that arrive early wait in `pending`), so the
//! output is bit for bit that of one worker.

use super::transport::{Block, Ring, Tag};
use super::RingTimes;
use anyhow::{Context, Result};
use lwm_core::attention::{
    query_tiles, tile_block_partials, write_tile, Chunking, Partial, QueryTile,
};
use lwm_core::kv::{key_blocks, KeyBlock, KvTypes, PositionRun, ShardView};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Head layout of a layer: query heads, KV heads (grouped-query), head dimension.
#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub n_heads: usize,
    pub n_kv: usize,
    pub d: usize,
}

/// One (KV head, query tile): its merged partials so far (blocks `0..next`) and the
/// blocks that arrived ahead of their turn.
struct TileMerge {
    g: usize,
    tile: QueryTile,
    merged: Vec<Partial>,
    next: usize,
    pending: BTreeMap<usize, Vec<Partial>>,
}

impl TileMerge {
    fn add(&mut self, index: usize, parts: Vec<Partial>) {
        self.pending.insert(index, parts);
        while let Some(p) = self.pending.remove(&self.next) {
            for (m, b) in self.merged.iter_mut().zip(&p) {
                m.merge(b);
            }
            self.next += 1;
        }
    }
}

/// The rows of `block` a tile ending at position `end` (exclusive) may see: the single
/// worker's blocks stop at the tile's end too.
fn visible(block: &KeyBlock, end: usize) -> KeyBlock {
    let len = block.rows.len().min(end.saturating_sub(block.pos0));
    KeyBlock {
        index: block.index,
        pos0: block.pos0,
        rows: block.rows.start..block.rows.start + len,
    }
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
    types: KvTypes,
    chunking: Chunking,
    timeout: Duration,
    times: &mut RingTimes,
) -> Result<Vec<f32>> {
    let Heads { n_heads, n_kv, d } = heads;
    let (width, group) = (n_heads * d, n_heads / n_kv);
    let scale = 1.0 / (d as f32).sqrt();
    let n_local: usize = q_runs.iter().map(|r| r.len).sum();
    let mut work: Vec<TileMerge> = query_tiles(q_runs, chunking)
        .into_iter()
        .rev()
        .flat_map(|tile| {
            (0..n_kv).map(move |g| TileMerge {
                g,
                tile,
                merged: (0..group).map(|_| Partial::new(tile.rows, d)).collect(),
                next: 0,
                pending: BTreeMap::new(),
            })
        })
        .collect();
    let sp = ring.size();
    let mut held = own;
    for step in 0..sp {
        if step + 1 < sp {
            times.bytes_sent += held.len() * 4;
            ring.send(ring.next(), Tag::KvBlock, held.clone())?;
        }
        let t0 = Instant::now();
        let view = ShardView::parse(&held, n_kv, d, types).with_context(|| {
            format!("key/value block of rank {}", (ring.rank() + sp - step) % sp)
        })?;
        let blocks = key_blocks(&view.runs, chunking.key_chunk);
        lwm_core::parallel::for_each_chunk_mut(&mut work, 1, |_, w| {
            let w = &mut w[0];
            let end = w.tile.pos0 + w.tile.rows;
            let queries: Vec<&[f32]> = (0..group)
                .map(|j| &q[w.tile.row0 * width + (w.g * group + j) * d..])
                .collect();
            let mut bufs = (Vec::new(), Vec::new());
            for blk in blocks.iter().filter(|b| b.pos0 < end) {
                let mut parts = Vec::new();
                let blk = visible(blk, end);
                tile_block_partials(
                    &queries, width, w.tile, &view.kv, w.g, &blk, scale, &mut bufs, &mut parts,
                );
                w.add(blk.index, parts);
            }
        });
        times.compute_secs += t0.elapsed().as_secs_f64();
        times.blocks += 1;
        if step + 1 < sp {
            let t1 = Instant::now();
            held = ring.recv(ring.prev(), Tag::KvBlock, Some(timeout))?;
            times.wait_secs += t1.elapsed().as_secs_f64();
        }
    }
    let mut out = vec![0.0f32; n_local * width];
    let mut buf = Vec::new();
    for w in &work {
        let last_block = (w.tile.pos0 + w.tile.rows - 1) / chunking.key_chunk.max(1);
        anyhow::ensure!(
            w.next == last_block + 1,
            "ring pass ended with key block {} missing for positions {}..",
            w.next,
            w.tile.pos0
        );
        write_tile(&w.merged, w.g, w.tile, width, &mut out, &mut buf);
    }
    Ok(out)
}
