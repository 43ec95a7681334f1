//! Key/value cache: per layer, per KV head, one contiguous buffer of rows stored in the
//! cache's element type (`KvType`: f32, f16, bf16, q8_0, q4_0; keys and values may differ),
//! so the attention driver reads a key block as one slice of stored rows and decodes it
//! tile by tile.
//!
//! A KV policy (`policy`) may evict rows: then row index and position part ways. The cache
//! keeps counting positions (`next_pos`, the tokens run through it) and records each kept
//! row's position per layer and KV head (`positions`); keys keep the RoPE of the position
//! they were computed at. Attention needs no positions: every kept row precedes the
//! step's queries, so the causal mask over row indices (all held rows, then the step's own
//! rows causally) is the mask over positions.

use super::types::KvTypes;
use super::view::{as_f32, KvView, QuantKvView};

#[derive(Debug, Clone)]
pub struct LayerKv {
    /// Per KV head: len stored key rows.
    pub k: Vec<Vec<u8>>,
    /// Per KV head: len stored value rows.
    pub v: Vec<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
    pub head_dim: usize,
    pub types: KvTypes,
    /// The token ids run through the cache, in order: what makes reuse safe. Once rows
    /// were evicted, more than the rows held.
    tokens: Vec<u32>,
    /// Rows held (committed) per layer and KV head: `tokens.len()` until a policy evicts.
    rows: usize,
    /// Once rows were evicted: per layer, per KV head, the position of each row; empty
    /// while row r holds position r.
    positions: Vec<Vec<Vec<u32>>>,
}

impl KvCache {
    /// An f32 cache.
    pub fn new(n_layers: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        Self::with_types(n_layers, n_kv_heads, head_dim, KvTypes::F32)
    }

    /// A cache storing keys and values as `types` (the head dim must suit them:
    /// `KvTypes::check_dim`).
    pub fn with_types(n_layers: usize, n_kv_heads: usize, head_dim: usize, types: KvTypes) -> Self {
        let layer = LayerKv {
            k: vec![Vec::new(); n_kv_heads],
            v: vec![Vec::new(); n_kv_heads],
        };
        Self {
            layers: vec![layer; n_layers],
            head_dim,
            types,
            tokens: Vec::new(),
            rows: 0,
            positions: Vec::new(),
        }
    }

    /// Tokens run through the cache (equal to the rows held unless a policy evicted some).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// The position the next token takes: the tokens run so far, whatever was evicted.
    pub fn next_pos(&self) -> usize {
        self.tokens.len()
    }

    /// Rows held per layer and KV head (after the last committed step).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Whether a policy evicted rows (row index and position differ from then on).
    pub fn has_evicted(&self) -> bool {
        self.rows < self.tokens.len()
    }

    /// Positions of the rows held in `layer`'s KV head `head`, in row order: ascending,
    /// except that sinks + window eviction reuses the slots of evicted rows.
    pub fn positions(&self, layer: usize, head: usize) -> Vec<usize> {
        match self.positions.get(layer) {
            Some(l) => l[head].iter().map(|&p| p as usize).collect(),
            None => (0..self.rows).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Reserve room for `tokens` tokens in total, so growth never doubles a buffer. Room
    /// beyond that (and beyond the rows held), left by an earlier, longer use of a reused
    /// cache, is released: a short request in a cache a long prompt once filled holds (and
    /// is charged by the memory plan for) only what it needs.
    pub fn reserve_total(&mut self, tokens: usize) {
        let (kb, vb) = (
            self.types.k.row_bytes(self.head_dim),
            self.types.v.row_bytes(self.head_dim),
        );
        for l in &mut self.layers {
            for (bufs, rb) in [(&mut l.k, kb), (&mut l.v, vb)] {
                for b in bufs {
                    let want = (tokens * rb).max(b.len());
                    if b.capacity() > want {
                        b.shrink_to(want);
                    }
                    b.reserve_exact(want - b.len());
                }
            }
        }
    }

    /// Release the room reserved beyond the rows held (a cache kept idle for prefix reuse).
    pub fn shrink_to_fit(&mut self) {
        for l in &mut self.layers {
            for b in l.k.iter_mut().chain(&mut l.v) {
                b.shrink_to_fit();
            }
        }
    }

    /// Append n rows of K and V (n × n_kv·d, as the projections produced them) to `layer`,
    /// encoded in the cache's types.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32], n: usize) {
        let d = self.head_dim;
        let types = self.types;
        let (kb, vb) = (types.k.row_bytes(d), types.v.row_bytes(d));
        let lk = &mut self.layers[layer];
        let n_kv = lk.k.len();
        for h in 0..n_kv {
            let (kh, vh) = (&mut lk.k[h], &mut lk.v[h]);
            let (k0, v0) = (kh.len(), vh.len());
            kh.resize(k0 + n * kb, 0);
            vh.resize(v0 + n * vb, 0);
            for r in 0..n {
                let src = r * n_kv * d + h * d;
                types
                    .k
                    .encode_row(&k[src..src + d], &mut kh[k0 + r * kb..k0 + (r + 1) * kb]);
                types
                    .v
                    .encode_row(&v[src..src + d], &mut vh[v0 + r * vb..v0 + (r + 1) * vb]);
            }
        }
    }

    /// Record `ids` as held (after every layer appended their keys/values).
    pub fn commit(&mut self, ids: &[u32]) {
        let p0 = self.tokens.len() as u32;
        for heads in &mut self.positions {
            for pos in heads {
                pos.extend(p0..p0 + ids.len() as u32);
            }
        }
        self.tokens.extend_from_slice(ids);
        self.rows += ids.len();
    }

    /// The token ids held.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// How many leading tokens of `ids` the cache already holds: 0 once rows were evicted
    /// (a prefix of an evicted cache is not the cache of that prefix).
    pub fn common_prefix(&self, ids: &[u32]) -> usize {
        if self.has_evicted() {
            return 0;
        }
        self.tokens
            .iter()
            .zip(ids)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// Rows stored in `layer` (may run ahead of `len()` during a forward pass).
    fn layer_rows(&self, layer: usize) -> usize {
        let kb = self.types.k.row_bytes(self.head_dim).max(1);
        self.layers[layer].k.first().map_or(0, |k| k.len() / kb)
    }

    /// The stored rows of `layer`, as the attention driver reads them.
    pub fn quant_view(&self, layer: usize) -> QuantKvView<'_> {
        let l = &self.layers[layer];
        QuantKvView {
            k: l.k.iter().map(|x| &x[..]).collect(),
            v: l.v.iter().map(|x| &x[..]).collect(),
            k_type: self.types.k,
            v_type: self.types.v,
            d: self.head_dim,
            len: self.layer_rows(layer),
        }
    }

    /// An f32 view of `layer`. Only for f32 caches (`KvCache::new`); any cache can be read
    /// through `quant_view`.
    pub fn view(&self, layer: usize) -> KvView<'_> {
        self.try_view(layer)
            .expect("KvCache::view needs an f32 cache; read other types with quant_view")
    }

    /// `view` for f32 caches, `None` for other types.
    pub fn try_view(&self, layer: usize) -> Option<KvView<'_>> {
        if self.types != KvTypes::F32 {
            return None;
        }
        let l = &self.layers[layer];
        Some(KvView {
            k: l.k.iter().map(|b| as_f32(b)).collect::<Option<_>>()?,
            v: l.v.iter().map(|b| as_f32(b)).collect::<Option<_>>()?,
            len: self.layer_rows(layer),
        })
    }

    /// Drop everything after the first `len` tokens (to reuse a shared prompt prefix), and
    /// any rows a failed step appended without committing. A cache that evicted rows has no
    /// prefix to go back to: cut below its length, it is emptied.
    pub fn truncate(&mut self, len: usize) {
        let (rows, len) = if !self.has_evicted() {
            (len, len)
        } else if len >= self.len() {
            (self.rows, len)
        } else {
            (0, 0)
        };
        let d = self.head_dim;
        let (kb, vb) = (self.types.k.row_bytes(d), self.types.v.row_bytes(d));
        for l in &mut self.layers {
            for b in &mut l.k {
                b.truncate(rows * kb);
            }
            for b in &mut l.v {
                b.truncate(rows * vb);
            }
        }
        self.tokens.truncate(len);
        self.rows = rows.min(self.tokens.len());
        if self.rows == self.tokens.len() {
            self.positions.clear();
        }
    }

    /// Keep in every layer's KV head only the rows `keep(layer, head)` (ascending row
    /// indices, as many for every head), between steps: the eviction every policy runs.
    pub fn retain_rows(&mut self, mut keep: impl FnMut(usize, usize) -> Vec<usize>) {
        let d = self.head_dim;
        let (kb, vb) = (self.types.k.row_bytes(d), self.types.v.row_bytes(d));
        self.track_positions();
        let mut kept = None;
        for (li, l) in self.layers.iter_mut().enumerate() {
            for h in 0..l.k.len() {
                let rows = keep(li, h);
                assert!(
                    rows.windows(2).all(|w| w[0] < w[1])
                        && rows.last().is_none_or(|&r| r < self.rows),
                    "retain_rows: rows must ascend within the {} held",
                    self.rows
                );
                assert_eq!(
                    *kept.get_or_insert(rows.len()),
                    rows.len(),
                    "retain_rows: every head keeps as many rows"
                );
                let pos = &mut self.positions[li][h];
                for (to, &from) in rows.iter().enumerate() {
                    l.k[h].copy_within(from * kb..(from + 1) * kb, to * kb);
                    l.v[h].copy_within(from * vb..(from + 1) * vb, to * vb);
                    pos[to] = pos[from];
                }
                l.k[h].truncate(rows.len() * kb);
                l.v[h].truncate(rows.len() * vb);
                pos.truncate(rows.len());
            }
        }
        self.rows = kept.unwrap_or(self.rows);
        if self.rows == self.tokens.len() {
            self.positions.clear();
        }
    }

    /// StreamingLLM's eviction: keep the first `sinks` rows (positions 0..sinks, which are
    /// never moved) and the `window` latest positions; nothing happens while at most
    /// sinks+window rows are held. The rows past sinks+window that stay (a step's newest)
    /// move into the slots of the evicted ones, so a decode step copies one row per head,
    /// not the window (the window's rows are then not in position order; attention reads
    /// every held row alike).
    pub fn evict_to_sinks_window(&mut self, sinks: usize, window: usize) {
        let (n, keep) = (self.rows, sinks + window);
        if n <= keep {
            return;
        }
        // Every head holds the same positions under this policy.
        let pos = self.positions(0, 0);
        let mut by_age: Vec<usize> = (sinks..n).collect();
        by_age.sort_unstable_by_key(|&r| pos[r]);
        let mut dropped = vec![false; n];
        for &r in &by_age[..n - keep] {
            dropped[r] = true;
        }
        let holes = (sinks..keep).filter(|&r| dropped[r]);
        let moves: Vec<(usize, usize)> = (keep..n).filter(|&r| !dropped[r]).zip(holes).collect();
        self.move_rows(&moves, keep);
    }

    /// Start recording each row's position (row r holds position r so far).
    fn track_positions(&mut self) {
        if self.positions.is_empty() {
            let all: Vec<u32> = (0..self.rows as u32).collect();
            self.positions = self
                .layers
                .iter()
                .map(|l| vec![all.clone(); l.k.len()])
                .collect();
        }
    }

    /// Copy row `from` to row `to` for each `(from, to)` in every layer and KV head, then
    /// keep the first `rows` rows (between steps).
    fn move_rows(&mut self, moves: &[(usize, usize)], rows: usize) {
        let d = self.head_dim;
        let (kb, vb) = (self.types.k.row_bytes(d), self.types.v.row_bytes(d));
        self.track_positions();
        for (l, pos) in self.layers.iter_mut().zip(&mut self.positions) {
            for ((k, v), p) in l.k.iter_mut().zip(&mut l.v).zip(pos) {
                for &(from, to) in moves {
                    k.copy_within(from * kb..(from + 1) * kb, to * kb);
                    v.copy_within(from * vb..(from + 1) * vb, to * vb);
                    p[to] = p[from];
                }
                k.truncate(rows * kb);
                v.truncate(rows * vb);
                p.truncate(rows);
            }
        }
        self.rows = rows;
        if self.rows == self.tokens.len() {
            self.positions.clear();
        }
    }

    /// A new cache holding a copy of this one's first `len` tokens (another request with
    /// the same prompt prefix starts from it while this one goes on).
    pub fn prefix_copy(&self, len: usize) -> KvCache {
        if self.has_evicted() {
            // No prefix of an evicted cache but the whole.
            let mut c = self.clone();
            c.truncate(len);
            return c;
        }
        let len = len.min(self.len());
        let d = self.head_dim;
        let (kb, vb) = (self.types.k.row_bytes(d), self.types.v.row_bytes(d));
        KvCache {
            layers: self
                .layers
                .iter()
                .map(|l| LayerKv {
                    k: l.k.iter().map(|b| b[..len * kb].to_vec()).collect(),
                    v: l.v.iter().map(|b| b[..len * vb].to_vec()).collect(),
                })
                .collect(),
            head_dim: d,
            types: self.types,
            tokens: self.tokens[..len].to_vec(),
            rows: len,
            positions: Vec::new(),
        }
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Bytes reserved (by `reserve_total`) and not yet written: what the cache may still
    /// take before it reaches its reservation.
    pub fn unfilled_bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| l.k.iter().chain(&l.v))
            .map(|b| b.capacity() - b.len())
            .sum()
    }

    /// Bytes held by keys and values.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| l.k.iter().chain(&l.v))
            .map(|b| b.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reused cache holds what its current use needs, not what a longer earlier use
    /// reserved (the server's pool kept every cache a long prompt had grown: RSS climbed
    /// through a soak).
    #[test]
    fn reserve_total_releases_room_beyond_the_new_total() {
        let mut c = filled(3);
        c.reserve_total(1000);
        assert_eq!(c.unfilled_bytes(), 4 * (1000 - 3) * 4 * 4);
        c.truncate(2);
        c.reserve_total(10);
        assert_eq!(c.unfilled_bytes(), 4 * (10 - 2) * 4 * 4);
        assert!(c.layers[0].k.iter().all(|b| b.capacity() == 10 * 4 * 4));
        // Never below the rows held.
        c.reserve_total(1);
        assert_eq!(c.unfilled_bytes(), 0);
        assert_eq!(c.len(), 2);
        c.reserve_total(100);
        c.shrink_to_fit();
        assert_eq!(c.unfilled_bytes(), 0);
        assert_eq!(c.positions(0, 1), vec![0, 1]);
    }

    /// A 1-layer, 2-head f32 cache whose row for position p holds p (keys) and -p (values).
    fn filled(n: usize) -> KvCache {
        let (n_kv, d) = (2, 4);
        let mut c = KvCache::new(1, n_kv, d);
        for p in 0..n {
            let k = vec![p as f32; n_kv * d];
            let v = vec![-(p as f32); n_kv * d];
            c.append(0, &k, &v, 1);
            c.commit(&[p as u32]);
        }
        c
    }

    fn head_keys(c: &KvCache, h: usize) -> Vec<f32> {
        c.view(0).k[h].chunks(c.head_dim).map(|r| r[0]).collect()
    }

    #[test]
    fn eviction_keeps_positions_and_counts_on() {
        let mut c = filled(10);
        c.evict_to_sinks_window(2, 3);
        assert_eq!((c.rows(), c.len(), c.next_pos()), (5, 10, 10));
        assert!(c.has_evicted());
        assert_eq!(c.positions(0, 1), [0, 1, 7, 8, 9]);
        assert_eq!(head_keys(&c, 1), [0.0, 1.0, 7.0, 8.0, 9.0]);
        assert_eq!(c.bytes(), 5 * 2 * 2 * 4 * 4);
        // A new row takes position 10; per-head selections may differ.
        c.append(0, &[10.0; 8], &[-10.0; 8], 1);
        c.commit(&[10]);
        assert_eq!(c.positions(0, 0), [0, 1, 7, 8, 9, 10]);
        // Evicting again moves the newest row into the oldest window row's slot.
        let mut ring = c.clone();
        ring.evict_to_sinks_window(2, 3);
        assert_eq!(ring.positions(0, 1), [0, 1, 10, 8, 9]);
        assert_eq!(head_keys(&ring, 1), [0.0, 1.0, 10.0, 8.0, 9.0]);
        c.retain_rows(|_, h| if h == 0 { vec![0, 2, 5] } else { vec![1, 3, 4] });
        assert_eq!(c.positions(0, 0), [0, 7, 10]);
        assert_eq!(c.positions(0, 1), [1, 8, 9]);
        assert_eq!(head_keys(&c, 1), [1.0, 8.0, 9.0]);
        let vals: Vec<f32> = c.view(0).v[0].chunks(4).map(|r| r[0]).collect();
        assert_eq!(vals, [0.0, -7.0, -10.0]);
        // No reuse of an evicted cache: it is emptied when cut back.
        assert_eq!(c.common_prefix(&(0..11).collect::<Vec<_>>()), 0);
        assert_eq!(c.prefix_copy(4).len(), 0);
        assert_eq!(c.prefix_copy(11).rows(), 3);
        // A failed step's uncommitted rows go, the evicted state stays.
        c.append(0, &[11.0; 8], &[-11.0; 8], 1);
        c.truncate(c.len());
        assert_eq!((c.rows(), c.quant_view(0).len, c.len()), (3, 3, 11));
        c.truncate(4);
        assert_eq!((c.rows(), c.len(), c.bytes()), (0, 0, 0));
        assert!(!c.has_evicted());
        assert_eq!(c.positions(0, 0), Vec::<usize>::new());
    }

    #[test]
    fn nothing_evicted_while_within_the_window() {
        let mut c = filled(5);
        c.evict_to_sinks_window(2, 3);
        assert!(!c.has_evicted());
        assert_eq!(c.common_prefix(&[0, 1, 2, 9]), 3);
        c.truncate(3);
        assert_eq!((c.rows(), c.len()), (3, 3));
    }
}
