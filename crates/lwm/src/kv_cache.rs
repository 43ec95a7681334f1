//! Key/value cache: per layer, per KV head, one contiguous (len × head_dim) f32 buffer, so a
//! key block is a plain slice the attention primitive reads directly.

use crate::attention::KvView;

#[derive(Debug, Clone)]
pub struct LayerKv {
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
    pub head_dim: usize,
    /// The token ids whose keys/values are held, in order: what makes reuse safe.
    tokens: Vec<u32>,
}

impl KvCache {
    pub fn new(n_layers: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        let layer = LayerKv {
            k: vec![Vec::new(); n_kv_heads],
            v: vec![Vec::new(); n_kv_heads],
        };
        Self {
            layers: vec![layer; n_layers],
            head_dim,
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

    /// Append n rows of K and V (n × n_kv·d, as the projections produced them) to `layer`.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32], n: usize) {
        let d = self.head_dim;
        let lk = &mut self.layers[layer];
        let n_kv = lk.k.len();
        for h in 0..n_kv {
            let (kh, vh) = (&mut lk.k[h], &mut lk.v[h]);
            kh.reserve(n * d);
            vh.reserve(n * d);
            for r in 0..n {
                let src = r * n_kv * d + h * d;
                kh.extend_from_slice(&k[src..src + d]);
                vh.extend_from_slice(&v[src..src + d]);
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

    pub fn view(&self, layer: usize) -> KvView<'_> {
        let l = &self.layers[layer];
        let len = l.k.first().map_or(0, |k| k.len() / self.head_dim);
        KvView {
            k: l.k.iter().map(|x| &x[..]).collect(),
            v: l.v.iter().map(|x| &x[..]).collect(),
            len,
        }
    }

    /// Drop everything after the first `len` tokens (to reuse a shared prompt prefix).
    pub fn truncate(&mut self, len: usize) {
        let d = self.head_dim;
        for l in &mut self.layers {
            for b in l.k.iter_mut().chain(l.v.iter_mut()) {
                b.truncate(len * d);
            }
        }
        self.tokens.truncate(len);
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Bytes held by keys and values.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| l.k.iter().chain(&l.v))
            .map(|b| b.len() * 4)
            .sum()
    }
}
