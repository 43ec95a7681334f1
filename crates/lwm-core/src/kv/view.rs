//! Read access to one layer's stored keys and values, as the attention drivers take them.

use super::types::KvType;

/// Stored f32 rows as f32 (little-endian machines, aligned buffers).
pub(crate) fn as_f32(b: &[u8]) -> Option<&[f32]> {
    // SAFETY: every bit pattern is a valid f32; alignment and length are checked.
    let (pre, mid, post) = unsafe { b.align_to::<f32>() };
    (pre.is_empty() && post.is_empty() && cfg!(target_endian = "little")).then_some(mid)
}

/// Keys and values of one attention layer as the driver reads them: per KV head a
/// contiguous (len × d) buffer.
pub struct KvView<'a> {
    pub k: Vec<&'a [f32]>,
    pub v: Vec<&'a [f32]>,
    pub len: usize,
}

/// Keys and values of one attention layer stored in a KV element type: per KV head,
/// `len` consecutive rows of `k_type.row_bytes(d)` / `v_type.row_bytes(d)` bytes.
pub struct QuantKvView<'a> {
    pub k: Vec<&'a [u8]>,
    pub v: Vec<&'a [u8]>,
    pub k_type: KvType,
    pub v_type: KvType,
    pub d: usize,
    pub len: usize,
}

impl QuantKvView<'_> {
    /// True when the SIMD kernel can read this cache's blocks as stored (f16 K and V).
    pub fn reads_f16_directly(&self) -> bool {
        self.k_type == KvType::F16
            && self.v_type == KvType::F16
            && crate::attention_kernel::available(self.d)
    }

    /// Rows `lo..hi` of KV head `h` as stored bytes (keys, values).
    pub fn stored_block(&self, h: usize, lo: usize, hi: usize) -> (&[u8], &[u8]) {
        let (kb, vb) = (self.k_type.row_bytes(self.d), self.v_type.row_bytes(self.d));
        (&self.k[h][lo * kb..hi * kb], &self.v[h][lo * vb..hi * vb])
    }

    /// Rows `lo..hi` of KV head `h` as f32 slices when both types are f32 (no copy: an f32
    /// block is read where it is stored, as the decode would copy it unchanged).
    pub fn f32_block(&self, h: usize, lo: usize, hi: usize) -> Option<(&[f32], &[f32])> {
        if self.k_type != KvType::F32 || self.v_type != KvType::F32 {
            return None;
        }
        let (kb, vb) = self.stored_block(h, lo, hi);
        Some((as_f32(kb)?, as_f32(vb)?))
    }

    /// Decode rows `lo..hi` of KV head `h` into `k_out`, `v_out` ((hi-lo) × d each).
    pub fn decode_block(
        &self,
        h: usize,
        lo: usize,
        hi: usize,
        k_out: &mut Vec<f32>,
        v_out: &mut Vec<f32>,
    ) {
        let d = self.d;
        let (kb, vb) = (self.k_type.row_bytes(d), self.v_type.row_bytes(d));
        k_out.resize((hi - lo) * d, 0.0);
        v_out.resize((hi - lo) * d, 0.0);
        self.k_type
            .decode_rows(&self.k[h][lo * kb..hi * kb], d, k_out);
        self.v_type
            .decode_rows(&self.v[h][lo * vb..hi * vb], d, v_out);
    }
}
