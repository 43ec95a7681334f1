//! The low-level pieces shared by the blockwise attention (`attention_grad`), the ring
//! drivers (`ring_grad`) and the process ring (`seq_parallel`): the shape and masking of
//! one attention call, the row gather/scatter helpers over (batch, len, heads, d) buffers,
//! and the key/value block that travels round the ring.

use anyhow::{bail, Result};
use lwm_core::attention::Chunking;
use lwm_engine::ring::transport::{f32_to_u32, u32_to_f32};
use std::sync::Arc;

/// Sizes of one attention call: q is (batch, len, heads, d), k and v (batch, len, kv_heads, d).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnDims {
    pub batch: usize,
    pub len: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
}

impl AttnDims {
    pub(super) fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }
}

/// Which pairs attend, and the tile sizes.
#[derive(Debug, Clone)]
pub struct AttnMasking {
    pub causal: bool,
    /// (batch × len) segment ids, or none (one segment per row).
    pub segment_ids: Option<Arc<Vec<u32>>>,
    pub chunking: Chunking,
}

impl AttnMasking {
    pub fn causal(chunking: Chunking) -> Self {
        Self {
            causal: true,
            segment_ids: None,
            chunking,
        }
    }

    pub(super) fn segments(&self, dims: &AttnDims, b: usize) -> Option<&[u32]> {
        self.segment_ids
            .as_deref()
            .map(|s| &s[b * dims.len..(b + 1) * dims.len])
    }
}

pub(super) fn scatter_rows(
    dst: &mut [f32],
    dims: &AttnDims,
    n_heads: usize,
    b: usize,
    h: usize,
    r0: usize,
    rows: &[f32],
) {
    let d = dims.d;
    for (i, row) in rows.chunks_exact(d).enumerate() {
        let base = ((b * dims.len + r0 + i) * n_heads + h) * d;
        dst[base..base + d].copy_from_slice(row);
    }
}

pub(super) use lwm_core::attention::partial::dot;

/// Rows r0..r0+rows of one head as a contiguous (rows × d) buffer.
pub(super) fn gather_rows(
    x: &[f32],
    dims: &AttnDims,
    n_heads: usize,
    b: usize,
    h: usize,
    r0: usize,
    rows: usize,
) -> Vec<f32> {
    let d = dims.d;
    let mut out = Vec::with_capacity(rows * d);
    for t in r0..r0 + rows {
        let base = ((b * dims.len + t) * n_heads + h) * d;
        out.extend_from_slice(&x[base..base + d]);
    }
    out
}

/// The key/value block travelling round the ring: per (b, kv head) contiguous rows.
pub struct KvBlock {
    pub owner: usize,
    pub(super) k: Vec<Vec<f32>>,
    pub(super) v: Vec<Vec<f32>>,
    pub(super) dk: Vec<Vec<f32>>,
    pub(super) dv: Vec<Vec<f32>>,
}

impl KvBlock {
    /// The block as one message: owner, entries, values per entry, whether the gradients
    /// come along (u32s in f32 bits), then every k, v (and dk, dv) entry.
    pub fn to_message(&self) -> Vec<f32> {
        let per = self.k.first().map_or(0, Vec::len);
        let grads = !self.dk.is_empty();
        let mut m = Vec::with_capacity(4 + self.k.len() * per * if grads { 4 } else { 2 });
        for x in [self.owner, self.k.len(), per, grads as usize] {
            m.push(u32_to_f32(x as u32));
        }
        for part in [&self.k, &self.v, &self.dk, &self.dv] {
            for e in part.iter() {
                m.extend_from_slice(e);
            }
        }
        m
    }

    /// Read a message of `to_message`, checking it has the shape this worker expects.
    pub fn from_message(m: &[f32], entries: usize, per: usize, grads: bool) -> Result<Self> {
        let head: Vec<usize> = m.iter().take(4).map(|&x| f32_to_u32(x) as usize).collect();
        let want = 4 + entries * per * if grads { 4 } else { 2 };
        if head.len() != 4
            || head[1] != entries
            || head[2] != per
            || head[3] != grads as usize
            || m.len() != want
        {
            bail!(
                "ring protocol error: a key/value block of {} values (header {head:?}) where {want} values of {entries} entries × {per} were expected",
                m.len()
            );
        }
        let mut parts = m[4..].chunks_exact(per.max(1)).map(<[f32]>::to_vec);
        let mut take = |n: usize| -> Vec<Vec<f32>> {
            (0..n).map(|_| parts.next().unwrap_or_default()).collect()
        };
        let (k, v) = (take(entries), take(entries));
        let (dk, dv) = if grads {
            (take(entries), take(entries))
        } else {
            (vec![], vec![])
        };
        Ok(Self {
            owner: head[0],
            k,
            v,
            dk,
            dv,
        })
    }
}
