//! One ring worker's share of a sequence's keys and values: a `KvCache` of the rows it owns
//! (ascending positions, in the cache's element types) plus the positions those rows hold.
//! A layer of it travels around the ring as one block (`pack`, read back by `ShardView`).

use super::cache::KvCache;
use super::types::KvTypes;
use super::view::QuantKvView;
use super::PositionRun;
use anyhow::{bail, Result};

#[derive(Debug, Clone)]
pub struct KvShard {
    cache: KvCache,
    /// Positions of the rows (row0 counts rows of this shard).
    runs: Vec<PositionRun>,
    rows: usize,
}

/// u32 values travel bit for bit inside the ring's f32 words.
fn word(x: usize) -> f32 {
    f32::from_bits(x as u32)
}

fn unword(x: f32) -> usize {
    x.to_bits() as usize
}

impl KvShard {
    pub fn new(n_layers: usize, n_kv: usize, d: usize, types: KvTypes) -> Self {
        Self {
            cache: KvCache::with_types(n_layers, n_kv, d, types),
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

    pub fn types(&self) -> KvTypes {
        self.cache.types
    }

    /// Announce rows at `runs` (lengths and positions; row0 is assigned here), after every
    /// position held. Their keys and values follow layer by layer through `append`.
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
        self.cache.append(layer, k, v, n);
    }

    /// Record the token ids of the rows announced last (after every layer appended them).
    pub fn commit(&mut self, ids: &[u32]) {
        self.cache.commit(ids);
    }

    /// Keep the first `rows` rows (undo a failed step).
    pub fn truncate(&mut self, rows: usize) {
        self.cache.truncate(rows);
        self.runs.retain(|r| r.row0 < rows);
        if let Some(last) = self.runs.last_mut() {
            last.len = last.len.min(rows - last.row0);
        }
        self.rows = rows;
    }

    /// Bytes of keys and values held (what `sp` divides).
    pub fn bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// The stored rows of `layer`.
    pub fn view(&self, layer: usize) -> QuantKvView<'_> {
        self.cache.quant_view(layer)
    }

    /// One layer as a ring message, in f32 words: `[n_runs, (row0, pos0, len)…]` as u32
    /// bits, then the stored bytes (per head its keys, then per head its values), padded
    /// to whole words.
    pub fn pack(&self, layer: usize) -> Vec<f32> {
        let view = self.cache.quant_view(layer);
        let bytes: usize = view.k.iter().chain(&view.v).map(|b| b.len()).sum();
        let mut out = Vec::with_capacity(1 + 3 * self.runs.len() + bytes.div_ceil(4));
        out.push(word(self.runs.len()));
        for r in &self.runs {
            out.extend([word(r.row0), word(r.pos0), word(r.len)]);
        }
        let mut body = Vec::with_capacity(bytes.div_ceil(4) * 4);
        for b in view.k.iter().chain(&view.v) {
            body.extend_from_slice(b);
        }
        body.resize(bytes.div_ceil(4) * 4, 0);
        out.extend(
            body.chunks_exact(4)
                .map(|c| f32::from_bits(u32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
        );
        out
    }
}

/// A packed layer shard, read in place.
pub struct ShardView<'a> {
    pub runs: Vec<PositionRun>,
    pub rows: usize,
    pub kv: QuantKvView<'a>,
}

impl<'a> ShardView<'a> {
    pub fn parse(block: &'a [f32], n_kv: usize, d: usize, types: KvTypes) -> Result<Self> {
        let Some(&n) = block.first() else {
            bail!("empty key/value block");
        };
        let n_runs = unword(n);
        let head = 1 + 3 * n_runs;
        if block.len() < head {
            bail!("key/value block shorter than its header");
        }
        let runs: Vec<PositionRun> = (0..n_runs)
            .map(|i| PositionRun {
                row0: unword(block[1 + 3 * i]),
                pos0: unword(block[2 + 3 * i]),
                len: unword(block[3 + 3 * i]),
            })
            .collect();
        let rows: usize = runs.iter().map(|r| r.len).sum();
        let words = &block[head..];
        // SAFETY: f32 words are plain bytes; u8 has no alignment requirement.
        let body: &'a [u8] =
            unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, words.len() * 4) };
        let (kb, vb) = (types.k.row_bytes(d), types.v.row_bytes(d));
        let need = n_kv * rows * (kb + vb);
        if body.len() != need.div_ceil(4) * 4 || !cfg!(target_endian = "little") {
            bail!(
                "key/value block holds {} bytes, expected {need} for {rows} rows of {}",
                body.len(),
                types.name()
            );
        }
        let (ks, vs) = body[..need].split_at(n_kv * rows * kb);
        // Per head `rows` rows (an empty shard has empty heads; chunks of 0 bytes panic).
        let heads = |b: &'a [u8], per: usize| -> Vec<&'a [u8]> {
            (0..n_kv).map(|h| &b[h * per..(h + 1) * per]).collect()
        };
        let kv = QuantKvView {
            k: heads(ks, rows * kb),
            v: heads(vs, rows * vb),
            k_type: types.k,
            v_type: types.v,
            d,
            len: rows,
        };
        Ok(Self { runs, rows, kv })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvType;

    #[test]
    fn pack_and_parse_round_trip_with_merged_runs_in_every_type() {
        let (n_kv, d) = (2, 32);
        for t in KvType::ALL {
            let types = KvTypes::same(t);
            let mut s = KvShard::new(1, n_kv, d, types);
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
            let k: Vec<f32> = (0..3 * n_kv * d).map(|i| (i % 7) as f32).collect();
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
            let view = ShardView::parse(&packed, n_kv, d, types).unwrap();
            assert_eq!(view.rows, 4);
            let own = s.view(0);
            assert_eq!(view.kv.k, own.k, "{t:?}");
            assert_eq!(view.kv.v, own.v, "{t:?}");
            assert!(ShardView::parse(&packed[..packed.len() - 1], n_kv, d, types).is_err());
            s.truncate(2);
            assert_eq!(s.runs().len(), 1);
            assert_eq!(s.bytes(), 2 * n_kv * types.row_pair_bytes(d));
        }
    }
}
