//! Key/value cache: per layer, per KV head, one contiguous buffer of rows stored in the
//! cache's element type (`KvType`: f32, f16, bf16, q8_0, q4_0; keys and values may differ),
//! so the attention driver reads a key block as one slice of stored rows and decodes it
//! tile by tile.

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
    /// The token ids whose keys/values are held, in order: what makes reuse safe.
    tokens: Vec<u32>,
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
        }
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Reserve room for `tokens` tokens in total, so growth never doubles a buffer.
    pub fn reserve_total(&mut self, tokens: usize) {
        let (kb, vb) = (
            self.types.k.row_bytes(self.head_dim),
            self.types.v.row_bytes(self.head_dim),
        );
        for l in &mut self.layers {
            for b in &mut l.k {
                b.reserve_exact((tokens * kb).saturating_sub(b.len()));
            }
            for b in &mut l.v {
                b.reserve_exact((tokens * vb).saturating_sub(b.len()));
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
        self.tokens.extend_from_slice(ids);
    }

    /// The token ids held.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// How many leading tokens of `ids` the cache already holds.
    pub fn common_prefix(&self, ids: &[u32]) -> usize {
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

    /// Drop everything after the first `len` tokens (to reuse a shared prompt prefix).
    pub fn truncate(&mut self, len: usize) {
        let d = self.head_dim;
        let (kb, vb) = (self.types.k.row_bytes(d), self.types.v.row_bytes(d));
        for l in &mut self.layers {
            for b in &mut l.k {
                b.truncate(len * kb);
            }
            for b in &mut l.v {
                b.truncate(len * vb);
            }
        }
        self.tokens.truncate(len);
    }

    /// A new cache holding a copy of this one's first `len` tokens (another request with
    /// the same prompt prefix starts from it while this one goes on).
    pub fn prefix_copy(&self, len: usize) -> KvCache {
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
