//! Which worker holds which positions.
//!
//! Prefill uses a zig-zag layout: a step's `n` new rows are cut into `2·sp` chunks (sizes
//! differ by at most one) and worker `r` takes chunks `r` and `2·sp−1−r`. Under the causal
//! mask the work of a chunk grows with its position, so pairing an early chunk with a late
//! one gives every worker the same number of (query, key) pairs to within a row; the
//! original's contiguous split leaves worker 0 nearly idle and worker `sp−1` doing
//! `2·sp−1` times its work.
//!
//! Decode gives each new token's key/value to one worker: the last owner while its shard
//! is under `min + DECODE_SLACK` rows, else the worker with the fewest rows, so shards stay
//! balanced and runs of consecutive positions stay long (fewer, larger attention tiles).

use crate::model::PositionRun;

/// Rows a decode owner may run ahead of the smallest shard before the next takes over.
pub const DECODE_SLACK: usize = 64;

fn chunk_bounds(n: usize, parts: usize, c: usize) -> (usize, usize) {
    (c * n / parts, (c + 1) * n / parts)
}

/// The runs of `rank` among a prefill step's `n` rows at positions `pos0..pos0+n`, with
/// `row0` numbering the worker's local rows. Also returns the global row of each local row.
pub fn zigzag(n: usize, pos0: usize, sp: usize, rank: usize) -> (Vec<PositionRun>, Vec<usize>) {
    let parts = 2 * sp;
    let mut runs = Vec::with_capacity(2);
    let mut rows = Vec::new();
    for c in [rank, parts - 1 - rank] {
        let (lo, hi) = chunk_bounds(n, parts, c);
        if hi > lo {
            runs.push(PositionRun {
                row0: rows.len(),
                pos0: pos0 + lo,
                len: hi - lo,
            });
            rows.extend(lo..hi);
        }
    }
    (runs, rows)
}

/// The worker holding the last of a prefill step's `n` rows (it produces the logits).
pub fn zigzag_owner_of_last(n: usize, sp: usize) -> usize {
    let parts = 2 * sp;
    let c = (0..parts)
        .rev()
        .find(|&c| {
            let (lo, hi) = chunk_bounds(n, parts, c);
            hi > lo && hi == n
        })
        .unwrap_or(parts - 1);
    if c < sp {
        c
    } else {
        parts - 1 - c
    }
}

/// The worker that stores the next decode token's key/value.
pub fn decode_owner(shard_rows: &[usize], last_owner: Option<usize>) -> usize {
    let min = shard_rows.iter().copied().min().unwrap_or(0);
    if let Some(o) = last_owner {
        if shard_rows[o] < min + DECODE_SLACK {
            return o;
        }
    }
    shard_rows
        .iter()
        .position(|&r| r == min)
        .expect("at least one worker")
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
    fn zigzag_covers_every_row_once_and_balances_causal_work() {
        for sp in 1..=5 {
            for n in [1, 2, 3, 7, 10, 64, 1000, 4097] {
                let mut seen = vec![0; n];
                let mut work = Vec::new();
                for r in 0..sp {
                    let (runs, rows) = zigzag(n, 100, sp, r);
                    for &g in &rows {
                        seen[g] += 1;
                    }
                    for run in &runs {
                        assert_eq!(rows[run.row0], run.pos0 - 100);
                    }
                    work.push(causal_work(&runs));
                }
                assert!(seen.iter().all(|&s| s == 1), "sp={sp} n={n}");
                let (lo, hi) = (work.iter().min().unwrap(), work.iter().max().unwrap());
                if n >= 1000 {
                    // Equal to within a few rows' worth of work.
                    assert!(
                        (hi - lo) as f64 / (*hi as f64) < 0.01,
                        "sp={sp} n={n}: {work:?}"
                    );
                }
                let last = zigzag_owner_of_last(n, sp);
                assert!(zigzag(n, 0, sp, last).1.contains(&(n - 1)), "sp={sp} n={n}");
            }
        }
    }

    #[test]
    fn decode_keeps_shards_within_the_slack() {
        let mut rows = vec![10, 10, 10];
        let mut last = None;
        for _ in 0..1000 {
            let o = decode_owner(&rows, last);
            rows[o] += 1;
            last = Some(o);
            let (lo, hi) = (rows.iter().min().unwrap(), rows.iter().max().unwrap());
            assert!(hi - lo <= DECODE_SLACK, "{rows:?}");
        }
    }
}
