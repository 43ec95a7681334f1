//! Which worker holds which positions.
//!
//! Positions are owned by `kv_block` (`key_chunk` consecutive positions, aligned, see
//! `lwm_core::kv`): block `b` belongs to one worker for the whole sequence, prefill and decode
//! alike, so each block's keys sit in one shard and its attention partial is computed there
//! exactly as one worker computes it. Blocks are dealt zig-zag: with `c = b mod 2·sp`,
//! worker `c` takes block `b` when `c < sp`, worker `2·sp−1−c` otherwise. Under the causal
//! mask the work of a block grows with its position, so pairing an early block with a late
//! one gives every worker the same work over each `2·sp` blocks; the original's contiguous
//! split leaves worker 0 nearly idle and worker `sp−1` doing `2·sp−1` times its work.

use lwm_core::kv::PositionRun;

/// The worker owning `kv_block` number `block` in a ring of `sp`.
pub fn block_owner(block: usize, sp: usize) -> usize {
    let c = block % (2 * sp);
    if c < sp {
        c
    } else {
        2 * sp - 1 - c
    }
}

/// The worker owning position `pos`.
pub fn position_owner(pos: usize, sp: usize, key_chunk: usize) -> usize {
    block_owner(pos / key_chunk.max(1), sp)
}

/// The runs of `rank` among a step's `n` rows at positions `pos0..pos0+n`, with `row0`
/// numbering the worker's local rows. Also returns the step row of each local row.
pub fn owned_rows(
    n: usize,
    pos0: usize,
    sp: usize,
    rank: usize,
    key_chunk: usize,
) -> (Vec<PositionRun>, Vec<usize>) {
    let kc = key_chunk.max(1);
    let mut runs: Vec<PositionRun> = Vec::new();
    let mut rows = Vec::new();
    let mut p = pos0;
    while p < pos0 + n {
        let end = ((p / kc + 1) * kc).min(pos0 + n);
        if block_owner(p / kc, sp) == rank {
            match runs.last_mut() {
                Some(r) if r.pos0 + r.len == p => r.len += end - p,
                _ => runs.push(PositionRun {
                    row0: rows.len(),
                    pos0: p,
                    len: end - p,
                }),
            }
            rows.extend(p - pos0..end - pos0);
        }
        p = end;
    }
    (runs, rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Causal (query, key) pairs a worker computes when it holds all keys before its rows.
    fn causal_work(runs: &[PositionRun]) -> usize {
        runs.iter()
            .map(|r| (r.pos0..r.pos0 + r.len).map(|p| p + 1).sum::<usize>())
            .sum()
    }

    #[test]
    fn blocks_cover_every_row_once_and_balance_causal_work() {
        let kc = 16;
        for sp in 1..=5 {
            for (n, pos0) in [(1, 0), (3, 5), (10, 0), (64, 7), (1000, 100), (4097, 0)] {
                let mut seen = vec![0; n];
                let mut work = Vec::new();
                for r in 0..sp {
                    let (runs, rows) = owned_rows(n, pos0, sp, r, kc);
                    for &g in &rows {
                        seen[g] += 1;
                        assert_eq!(position_owner(pos0 + g, sp, kc), r);
                    }
                    for run in &runs {
                        assert_eq!(rows[run.row0], run.pos0 - pos0);
                    }
                    work.push(causal_work(&runs));
                }
                assert!(seen.iter().all(|&s| s == 1), "sp={sp} n={n}");
                let (lo, hi) = (work.iter().min().unwrap(), work.iter().max().unwrap());
                if n >= 4000 {
                    // Equal to within a few blocks' worth of work.
                    assert!(
                        (hi - lo) as f64 / (*hi as f64) < 0.05,
                        "sp={sp} n={n}: {work:?}"
                    );
                }
            }
        }
    }
}
