//! Element types of the KV cache, stored natively (the bytes llama.cpp would hold):
//!
//! | type   | bytes per 32 values | layout of one row of `d` values                      |
//! |--------|---------------------|------------------------------------------------------|
//! | f32    | 128                 | `d` little-endian f32                                 |
//! | f16    | 64                  | `d` IEEE half (round to nearest even)                 |
//! | bf16   | 64                  | `d` bfloat16 (round to nearest even, as ggml)         |
//! | q8_0   | 34                  | `d/32` ggml `block_q8_0`: f16 scale, 32 × i8          |
//! | q4_0   | 18                  | `d/32` ggml `block_q4_0`: f16 scale, 16 bytes nibbles |
//!
//! q8_0: `x_i ≈ D·q_i`, `D = fp16(amax/127)`, `q_i = round(x_i·127/amax)` (llama.cpp's AVX2
//! `quantize_row_q8_0`, which its CPU backend uses to write a q8_0 cache).
//! q4_0 (`quantize_row_q4_0_ref`): `m` = the value of largest magnitude, `D = m / −8`,
//! `q_i = min(15, trunc(x_i/D + 8.5))`; byte j holds `q_j` (low nibble) and `q_{j+16}`
//! (high nibble); `x_i ≈ (q_i − 8)·D`.
//!
//! Rows are encoded once when appended and decoded per attention tile (`decode_rows`), so
//! the cache is read at its stored width.

use crate::quant::q8::{quantize_row_q8_0, BlockQ8_0, QK};
use anyhow::{bail, Result};
use half::{bf16, f16};

/// Element types of keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvTypes {
    pub k: KvType,
    pub v: KvType,
}

impl KvTypes {
    pub const F32: KvTypes = KvTypes::same(KvType::F32);
    pub const F16: KvTypes = KvTypes::same(KvType::F16);

    pub const fn same(t: KvType) -> Self {
        Self { k: t, v: t }
    }

    /// `T` (both) or `K,V` (e.g. `q8_0,f16`).
    pub fn parse(s: &str) -> Result<Self> {
        match s.split_once(',') {
            None => Ok(Self::same(KvType::parse(s)?)),
            Some((k, v)) => Ok(Self {
                k: KvType::parse(k)?,
                v: KvType::parse(v)?,
            }),
        }
    }

    pub fn name(&self) -> String {
        if self.k == self.v {
            self.k.name().to_string()
        } else {
            format!("{},{}", self.k.name(), self.v.name())
        }
    }

    /// Bytes one token occupies in one layer's one KV head (its key row plus value row).
    pub fn row_pair_bytes(&self, head_dim: usize) -> usize {
        self.k.row_bytes(head_dim) + self.v.row_bytes(head_dim)
    }

    /// Check the head dimension suits both types.
    pub fn check_dim(&self, head_dim: usize) -> Result<()> {
        for t in [self.k, self.v] {
            if !t.supports_dim(head_dim) {
                bail!(
                    "KV cache type {} needs a head dimension that is a multiple of 32, this model has {head_dim}",
                    t.name()
                );
            }
        }
        Ok(())
    }
}

/// One KV element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
}

/// ggml block sizes.
pub const Q8_0_BLOCK_BYTES: usize = 34;
pub const Q4_0_BLOCK_BYTES: usize = 18;

impl KvType {
    pub const ALL: [KvType; 5] = [
        KvType::F32,
        KvType::F16,
        KvType::Bf16,
        KvType::Q8_0,
        KvType::Q4_0,
    ];

    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "f32" => KvType::F32,
            "f16" => KvType::F16,
            "bf16" => KvType::Bf16,
            "q8_0" => KvType::Q8_0,
            "q4_0" => KvType::Q4_0,
            other => bail!("unknown KV cache type '{other}' (use f32, f16, bf16, q8_0 or q4_0)"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Bf16 => "bf16",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
        }
    }

    /// Stable code for files (prompt caches).
    pub fn code(self) -> u8 {
        match self {
            KvType::F32 => 0,
            KvType::F16 => 1,
            KvType::Bf16 => 2,
            KvType::Q8_0 => 3,
            KvType::Q4_0 => 4,
        }
    }

    pub fn from_code(c: u8) -> Option<Self> {
        KvType::ALL.into_iter().find(|t| t.code() == c)
    }

    /// Whether rows of `d` values can be stored (block types need whole blocks).
    pub fn supports_dim(self, d: usize) -> bool {
        match self {
            KvType::Q8_0 | KvType::Q4_0 => d.is_multiple_of(QK),
            _ => true,
        }
    }

    /// Bytes of one row of `d` values.
    pub fn row_bytes(self, d: usize) -> usize {
        match self {
            KvType::F32 => 4 * d,
            KvType::F16 | KvType::Bf16 => 2 * d,
            KvType::Q8_0 => d / QK * Q8_0_BLOCK_BYTES,
            KvType::Q4_0 => d / QK * Q4_0_BLOCK_BYTES,
        }
    }

    /// Average bytes per element (for memory plans).
    pub fn bytes_per_elem(self) -> f64 {
        self.row_bytes(QK) as f64 / QK as f64
    }

    /// Encode one row `x` (length d) into `out` (`row_bytes(d)` bytes).
    pub fn encode_row(self, x: &[f32], out: &mut [u8]) {
        debug_assert_eq!(out.len(), self.row_bytes(x.len()));
        match self {
            KvType::F32 => {
                for (o, v) in out.chunks_exact_mut(4).zip(x) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
            KvType::F16 => {
                #[cfg(target_arch = "x86_64")]
                if crate::quant::has_avx2() {
                    // SAFETY: F16C detected; lengths match (checked above in debug, by
                    // construction in the cache).
                    unsafe { avx2::encode_f16(x, out) };
                    return;
                }
                for (o, v) in out.chunks_exact_mut(2).zip(x) {
                    o.copy_from_slice(&f16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
            KvType::Bf16 => {
                for (o, v) in out.chunks_exact_mut(2).zip(x) {
                    o.copy_from_slice(&bf16_from_f32(*v).to_le_bytes());
                }
            }
            KvType::Q8_0 => {
                let mut blocks = vec![BlockQ8_0::ZERO; x.len() / QK];
                quantize_row_q8_0(x, &mut blocks);
                for (o, b) in out.chunks_exact_mut(Q8_0_BLOCK_BYTES).zip(&blocks) {
                    o[..2].copy_from_slice(&b.d_f16().to_bits().to_le_bytes());
                    for (dst, q) in o[2..].iter_mut().zip(&b.qs) {
                        *dst = *q as u8;
                    }
                }
            }
            KvType::Q4_0 => {
                for (o, xb) in out
                    .chunks_exact_mut(Q4_0_BLOCK_BYTES)
                    .zip(x.chunks_exact(QK))
                {
                    quantize_block_q4_0(xb, o);
                }
            }
        }
    }

    /// Decode one stored row into `out` (length d), with AVX2 where present.
    pub fn decode_row(self, row: &[u8], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if crate::quant::has_avx2() {
            // SAFETY: AVX2/FMA/F16C detected; `row` holds one row of out.len() values.
            match self {
                KvType::F16 => return unsafe { avx2::decode_f16(row, out) },
                KvType::Q8_0 => return unsafe { avx2::decode_q8_0(row, out) },
                KvType::Q4_0 => return unsafe { avx2::decode_q4_0(row, out) },
                _ => {}
            }
        }
        self.decode_row_scalar(row, out)
    }

    /// Portable decoding (bit-identical to the SIMD one).
    pub fn decode_row_scalar(self, row: &[u8], out: &mut [f32]) {
        match self {
            KvType::F32 => {
                for (o, b) in out.iter_mut().zip(row.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            KvType::F16 => {
                for (o, b) in out.iter_mut().zip(row.chunks_exact(2)) {
                    *o = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
            KvType::Bf16 => {
                // bf16 is the top half of an f32: exact widening.
                for (o, b) in out.iter_mut().zip(row.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
                }
            }
            KvType::Q8_0 => {
                for (o, b) in out
                    .chunks_exact_mut(QK)
                    .zip(row.chunks_exact(Q8_0_BLOCK_BYTES))
                {
                    let d = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                    for (x, &q) in o.iter_mut().zip(&b[2..]) {
                        *x = q as i8 as f32 * d;
                    }
                }
            }
            KvType::Q4_0 => {
                for (o, b) in out
                    .chunks_exact_mut(QK)
                    .zip(row.chunks_exact(Q4_0_BLOCK_BYTES))
                {
                    let d = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                    for j in 0..QK / 2 {
                        o[j] = ((b[2 + j] & 0x0f) as i32 - 8) as f32 * d;
                        o[j + QK / 2] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
                    }
                }
            }
        }
    }

    /// Decode `n` consecutive rows (`n · row_bytes(d)` bytes) into `out` (n × d).
    pub fn decode_rows(self, rows: &[u8], d: usize, out: &mut [f32]) {
        // Rows are whole blocks laid end to end, so the block loop of `decode_row` covers
        // them in one call (one dispatch per block of rows, not per row).
        let n = (rows.len() / self.row_bytes(d)).min(out.len() / d.max(1));
        self.decode_row(&rows[..n * self.row_bytes(d)], &mut out[..n * d]);
    }
}

/// ggml's `GGML_FP32_TO_BF16`: round to nearest even; NaN stays a (quiet) NaN.
fn bf16_from_f32(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    bf16::from_bits(((u + (0x7fff + ((u >> 16) & 1))) >> 16) as u16).to_bits()
}

/// `quantize_row_q4_0_ref` for one block of 32 values into 18 bytes.
fn quantize_block_q4_0(x: &[f32], out: &mut [u8]) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
    for j in 0..QK / 2 {
        let x0 = x[j] * id;
        let x1 = x[j + QK / 2] * id;
        // C's (int8_t) conversion truncates toward zero; MIN(15, ..) caps the top.
        let q0 = ((x0 + 8.5) as i8).min(15) as u8;
        let q1 = ((x1 + 8.5) as i8).min(15) as u8;
        out[2 + j] = q0 | (q1 << 4);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Q4_0_BLOCK_BYTES, Q8_0_BLOCK_BYTES, QK};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn encode_f16(x: &[f32], out: &mut [u8]) {
        let n = x.len() / 8 * 8;
        let mut i = 0;
        while i < n {
            let h =
                _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(x.as_ptr().add(i)));
            _mm_storeu_si128(out.as_mut_ptr().add(2 * i) as *mut __m128i, h);
            i += 8;
        }
        for j in n..x.len() {
            out[2 * j..2 * j + 2]
                .copy_from_slice(&half::f16::from_f32(x[j]).to_bits().to_le_bytes());
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn decode_f16(row: &[u8], out: &mut [f32]) {
        let n = out.len() / 8 * 8;
        let mut i = 0;
        while i < n {
            let h = _mm_loadu_si128(row.as_ptr().add(2 * i) as *const __m128i);
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            i += 8;
        }
        for j in n..out.len() {
            out[j] =
                half::f16::from_bits(u16::from_le_bytes([row[2 * j], row[2 * j + 1]])).to_f32();
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scale(b: *const u8) -> __m256 {
        let h = u16::from_le_bytes([*b, *b.add(1)]);
        _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32))))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn decode_q8_0(row: &[u8], out: &mut [f32]) {
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let p = row.as_ptr().add(b * Q8_0_BLOCK_BYTES);
            let d = scale(p);
            for k in 0..4 {
                let q = _mm_loadl_epi64(p.add(2 + 8 * k) as *const __m128i);
                let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                _mm256_storeu_ps(o.as_mut_ptr().add(8 * k), _mm256_mul_ps(f, d));
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn decode_q4_0(row: &[u8], out: &mut [f32]) {
        let low = _mm_set1_epi8(0x0f);
        let eight = _mm256_set1_epi32(8);
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let p = row.as_ptr().add(b * Q4_0_BLOCK_BYTES);
            let d = scale(p);
            let bytes = _mm_loadu_si128(p.add(2) as *const __m128i);
            let lo = _mm_and_si128(bytes, low);
            let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
            for (k, nib) in [lo, hi].into_iter().enumerate() {
                for half in 0..2 {
                    let part = if half == 0 {
                        nib
                    } else {
                        _mm_unpackhi_epi64(nib, nib)
                    };
                    let i = _mm256_sub_epi32(_mm256_cvtepu8_epi32(part), eight);
                    let f = _mm256_mul_ps(_mm256_cvtepi32_ps(i), d);
                    _mm256_storeu_ps(o.as_mut_ptr().add(16 * k + 8 * half), f);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_and_scalar_decoding_agree_and_roundtrip_within_type_error() {
        let d = 128;
        let x = crate::rng::XorShift::new(3).vec(d, -3.0, 3.0);
        for t in KvType::ALL {
            let mut row = vec![0u8; t.row_bytes(d)];
            t.encode_row(&x, &mut row);
            let mut y = vec![0.0f32; d];
            t.decode_row(&row, &mut y);
            let mut y_scalar = vec![0.0f32; d];
            t.decode_row_scalar(&row, &mut y_scalar);
            assert_eq!(y, y_scalar, "{t:?}: SIMD and scalar decoding differ");
            let tol = match t {
                KvType::F32 => 0.0,
                KvType::F16 => 3.0 * 2f32.powi(-11),
                KvType::Bf16 => 3.0 * 2f32.powi(-8),
                KvType::Q8_0 => 3.0 / 127.0 * 0.5 * 1.01,
                // the value opposite the largest one's sign may clip at q = 15: one whole step
                KvType::Q4_0 => 3.0 / 8.0 * 1.01,
            };
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() <= tol, "{t:?}: {a} vs {b}");
            }
        }
    }
}
