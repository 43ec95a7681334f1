//! The one key/value store of every path: element types (`types`), the per-sequence cache
//! (`cache`), read views for the attention drivers (`view`), and a ring worker's shard of a
//! sequence (`shard`, a cache of the rows it owns plus their positions), and the policies
//! that evict rows of a long sequence (`policy`: StreamingLLM sinks + window, SnapKV).
//!
//! Keys are grouped into `kv_block`s of `key_chunk` consecutive positions, aligned to
//! multiples of `key_chunk` (block `b` holds positions `b·kc .. (b+1)·kc`). Attention
//! computes one partial per query tile and key block and merges them in ascending block
//! order, and the ring gives each block to exactly one worker, so a sequence split over any
//! number of workers is summed in the same order as on one.

pub mod cache;
pub mod policy;
#[cfg(test)]
mod policy_tests;
pub mod shard;
pub mod types;
pub mod view;

pub use cache::{KvCache, LayerKv};
pub use policy::KvPolicy;
pub use shard::{KvShard, ShardView};
pub use types::{KvType, KvTypes};
pub use view::{KvView, QuantKvView};

/// Rows `row0..row0 + len` of a step (or of a shard) hold the consecutive positions
/// `pos0..pos0 + len`. A sequence-parallel worker owns non-contiguous positions, described
/// as a few such runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PositionRun {
    pub row0: usize,
    pub pos0: usize,
    pub len: usize,
}

/// Keys of one `kv_block` held in consecutive rows `rows.start..rows.end` of a cache or
/// shard, at positions `pos0..`; `index` is the block's number (`pos0 / key_chunk`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyBlock {
    pub index: usize,
    pub pos0: usize,
    pub rows: std::ops::Range<usize>,
}

/// The key blocks of rows laid out as `runs` (ascending positions), cut at multiples of
/// `key_chunk`.
pub fn key_blocks(runs: &[PositionRun], key_chunk: usize) -> Vec<KeyBlock> {
    let kc = key_chunk.max(1);
    let mut out: Vec<KeyBlock> = Vec::new();
    for r in runs.iter().filter(|r| r.len > 0) {
        let mut p = r.pos0;
        while p < r.pos0 + r.len {
            let end = ((p / kc + 1) * kc).min(r.pos0 + r.len);
            let rows = r.row0 + (p - r.pos0)..r.row0 + (end - r.pos0);
            match out.last_mut() {
                // A block continued by the next run (consecutive rows, same block).
                Some(b) if b.index == p / kc && b.rows.end == rows.start => b.rows.end = rows.end,
                _ => out.push(KeyBlock {
                    index: p / kc,
                    pos0: p,
                    rows,
                }),
            }
            p = end;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_blocks_cut_runs_at_aligned_positions() {
        let runs = [
            PositionRun {
                row0: 0,
                pos0: 3,
                len: 6,
            },
            PositionRun {
                row0: 6,
                pos0: 16,
                len: 5,
            },
        ];
        let b = key_blocks(&runs, 4);
        let got: Vec<(usize, usize, usize, usize)> = b
            .iter()
            .map(|b| (b.index, b.pos0, b.rows.start, b.rows.end))
            .collect();
        assert_eq!(
            got,
            [
                (0, 3, 0, 1),
                (1, 4, 1, 5),
                (2, 8, 5, 6),
                (4, 16, 6, 10),
                (5, 20, 10, 11)
            ]
        );
    }
}
