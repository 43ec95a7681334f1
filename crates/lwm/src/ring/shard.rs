//! One worker's share of the KV cache: per layer, per KV head, contiguous (rows × head_dim)
//! f32 keys and values, plus the positions those rows hold (runs of consecutive positions,
//! ascending). A shard is what travels around the ring, packed into one block per layer.

use super::transport::{f32_to_u32, u32_to_f32};
use crate::model::PositionRun;
use anyhow::{bail, Result};

#[derive(Debug, Clone)]
pub struct KvShard {
    n_kv: usize,
    d: usize,
    /// `k[layer][head]`, `v[layer][head]`: rows × d.
    k: Vec<Vec<Vec<f32>>>,
    v: Vec<Vec<Vec<f32>>>,
    /// Positions of the rows (row0 counts rows of this shard).
    runs: Vec<PositionRun>,
    rows: usize,
}

impl KvShard {
    pub fn new(n_layers: usize, n_kv: usize, d: usize) -> Self {
        Self {
            n_kv,
            d,
            k: vec![vec![Vec::new(); n_kv]; n_layers],
            v: vec![vec![Vec::new(); n_kv]; n_layers],
            runs: Vec::new(),
            rows: 0,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn runs(&self) -> &[PositionRun] {
        &self.runs
    }

    /// Announce rows at `positions` runs (lengths only; row0 is assigned here). Their keys
    /// and values follow layer by layer through `append`.
    pub fn add_positions(&mut self, runs: &[PositionRun]) {
        for r in runs.iter().filter(|r| r.len > 0) {
            match self.runs.last_mut() {
                Some(last) if last.pos0 + last.len == r.pos0 => last.len += r.len,
                _ => self.runs.push(PositionRun {
                    row0: self.rows,
                    pos0: r.pos0,
                    len: r.len,
                }),
            }
            self.rows += r.len;
        }
    }

    /// Append `n` rows of keys and values (n × n_kv·d, as the projections produce them).
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32], n: usize) {
        let d = self.d;
        for h in 0..self.n_kv {
            let (kh, vh) = (&mut self.k[layer][h], &mut self.v[layer][h]);
            for r in 0..n {
                let src = (r * self.n_kv + h) * d;
                kh.extend_from_slice(&k[src..src + d]);
                vh.extend_from_slice(&v[src..src + d]);
            }
        }
    }

    /// Keep the first `rows` rows (undo a failed step).
    pub fn truncate(&mut self, rows: usize) {
        for l in self.k.iter_mut().chain(self.v.iter_mut()) {
            for b in l.iter_mut() {
                b.truncate(rows * self.d);
            }
        }
        self.runs.retain(|r| r.row0 < rows);
        if let Some(last) = self.runs.last_mut() {
            last.len = last.len.min(rows - last.row0);
        }
        self.rows = rows;
    }

    /// Bytes of keys and values held (what `sp` divides).
    pub fn bytes(&self) -> usize {
        self.k
            .iter()
            .chain(&self.v)
            .flatten()
            .map(|b| b.len() * 4)
            .sum()
    }

    /// Keys and values of one head of one layer.
    pub fn head(&self, layer: usize, h: usize) -> (&[f32], &[f32]) {
        (&self.k[layer][h], &self.v[layer][h])
    }

    /// One layer as a ring message: `[n_runs, (row0, pos0, len)…]` as u32 bits, then per
    /// head its keys, then per head its values.
    pub fn pack(&self, layer: usize) -> Vec<f32> {
        let body = 2 * self.n_kv * self.rows * self.d;
        let mut out = Vec::with_capacity(1 + 3 * self.runs.len() + body);
        out.push(u32_to_f32(self.runs.len() as u32));
        for r in &self.runs {
            for x in [r.row0, r.pos0, r.len] {
                out.push(u32_to_f32(x as u32));
            }
        }
        for h in 0..self.n_kv {
            out.extend_from_slice(&self.k[layer][h]);
        }
        for h in 0..self.n_kv {
            out.extend_from_slice(&self.v[layer][h]);
        }
        out
    }
}

/// A packed layer shard, read in place.
pub struct ShardView<'a> {
    pub runs: Vec<PositionRun>,
    pub rows: usize,
    d: usize,
    n_kv: usize,
    body: &'a [f32],
}

impl<'a> ShardView<'a> {
    pub fn parse(block: &'a [f32], n_kv: usize, d: usize) -> Result<Self> {
        let Some(&n) = block.first() else {
            bail!("empty key/value block");
        };
        let n_runs = f32_to_u32(n) as usize;
        let head = 1 + 3 * n_runs;
        if block.len() < head {
            bail!("key/value block shorter than its header");
        }
        let runs: Vec<PositionRun> = (0..n_runs)
            .map(|i| {
                let g = |j: usize| f32_to_u32(block[1 + 3 * i + j]) as usize;
                PositionRun {
                    row0: g(0),
                    pos0: g(1),
                    len: g(2),
                }
            })
            .collect();
        let rows: usize = runs.iter().map(|r| r.len).sum();
        let body = &block[head..];
        if body.len() != 2 * n_kv * rows * d {
            bail!(
                "key/value block holds {} values, expected {} for {rows} rows",
                body.len(),
                2 * n_kv * rows * d
            );
        }
        Ok(Self {
            runs,
            rows,
            d,
            n_kv,
            body,
        })
    }

    pub fn head(&self, h: usize) -> (&'a [f32], &'a [f32]) {
        let per = self.rows * self.d;
        let k = &self.body[h * per..(h + 1) * per];
        let v = &self.body[(self.n_kv + h) * per..(self.n_kv + h + 1) * per];
        (k, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_and_parse_round_trip_with_merged_runs() {
        let (n_kv, d) = (2, 3);
        let mut s = KvShard::new(1, n_kv, d);
        let runs = [
            PositionRun {
                row0: 0,
                pos0: 0,
                len: 2,
            },
            PositionRun {
                row0: 2,
                pos0: 10,
                len: 1,
            },
        ];
        s.add_positions(&runs);
        let k: Vec<f32> = (0..3 * n_kv * d).map(|i| i as f32).collect();
        let v: Vec<f32> = k.iter().map(|x| -x).collect();
        s.append(0, &k, &v, 3);
        // Position 11 continues the run at 10.
        s.add_positions(&[PositionRun {
            row0: 0,
            pos0: 11,
            len: 1,
        }]);
        s.append(0, &k[..n_kv * d], &v[..n_kv * d], 1);
        assert_eq!(s.runs().len(), 2);
        assert_eq!(s.runs()[1].len, 2);
        let packed = s.pack(0);
        let view = ShardView::parse(&packed, n_kv, d).unwrap();
        assert_eq!(view.rows, 4);
        let (k1, v1) = view.head(1);
        // Row 0 of head 1 is k[3..6].
        assert_eq!(&k1[..3], &[3.0, 4.0, 5.0]);
        assert_eq!(&v1[..3], &[-3.0, -4.0, -5.0]);
        s.truncate(2);
        assert_eq!(s.runs().len(), 1);
        assert_eq!(s.bytes(), 2 * 2 * n_kv * d * 4);
        assert!(ShardView::parse(&packed[..packed.len() - 1], n_kv, d).is_err());
    }
}
