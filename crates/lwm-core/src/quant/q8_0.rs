//! Q8_0 weights × Q8_0 activations, in llama.cpp's exact float order.
//!
//! GGUF Q8_0 block (34 bytes): `d: f16, qs: [i8; 32]`, `w_j = d·q_j`.
//!
//! `ggml_vec_dot_q8_0_q8_0` (x86 AVX2 path):
//!
//! ```text
//!   acc[0..8] = 0
//!   for each block, in order:
//!       dd = d_x · d_y                                    // f32 product
//!       acc[l] = fma(dd, float(Σ_{e=4l}^{4l+3} q_x[e]·q_y[e]), acc[l])   for l in 0..8
//!   result = ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))
//! ```
//!
//! llama.cpp only takes this path for one activation row (`n = 1`): for two or more rows
//! it hands Q8_0 matmuls to llamafile's tinyBLAS, whose sums are grouped differently. Our
//! `matmul` applies this per-element order for every `n` (in this model the Q8_0 tensor is
//! the output head, which llama.cpp runs on one row: the last token's).

use super::q8::{BlockQ8_0, QK};
use super::{f16_bits_to_f32, hsum8};

pub const BLOCK_BYTES: usize = 34;

/// Dequantize one row (exact).
pub fn dequantize_row(row: &[u8], out: &mut [f32]) {
    for (b, o) in row.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
        for j in 0..QK {
            o[j] = b[2 + j] as i8 as f32 * d;
        }
    }
}

/// Scalar dot of one Q8_0 row with one Q8_0 activation row.
pub fn dot_scalar(w: &[u8], y: &[BlockQ8_0]) -> f32 {
    debug_assert_eq!(w.len(), y.len() * BLOCK_BYTES);
    let mut acc = [0.0f32; 8];
    for (b, yb) in w.chunks_exact(BLOCK_BYTES).zip(y) {
        let d = f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
        let dd = d * yb.d;
        for (l, a) in acc.iter_mut().enumerate() {
            let mut isum = 0i32;
            for k in 0..4 {
                let e = 4 * l + k;
                isum += b[2 + e] as i8 as i32 * yb.qs[e] as i32;
            }
            *a = dd.mul_add(isum as f32, *a);
        }
    }
    hsum8(&acc)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::super::q8::BlockQ8_0;
    use super::BLOCK_BYTES;
    use std::arch::x86_64::*;

    /// ggml's `hsum_float_8`: ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)).
    #[inline(always)]
    pub(crate) unsafe fn hsum(x: __m256) -> f32 {
        let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    #[inline(always)]
    unsafe fn scale(p: *const u8) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            (p as *const u16).read_unaligned() as i32,
        )))
    }

    /// 8 lanes of Σ of 4 consecutive signed products (exact), as f32.
    #[inline(always)]
    unsafe fn lane_sums(qx: __m256i, y: &BlockQ8_0) -> __m256 {
        lane_sums_of(qx, _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i))
    }

    /// `lane_sums` with the activation quants already loaded.
    #[inline(always)]
    pub(crate) unsafe fn lane_sums_of(qx: __m256i, qy: __m256i) -> __m256 {
        let ax = _mm256_sign_epi8(qx, qx);
        let sy = _mm256_sign_epi8(qy, qx);
        let p16 = _mm256_maddubs_epi16(ax, sy);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile<const WR: usize, const AR: usize>(
        w: *const u8,
        stride: usize,
        ys: [&[BlockQ8_0]; AR],
        out: &mut [[f32; AR]; WR],
    ) {
        let nb = ys[0].len();
        let mut acc = [[_mm256_setzero_ps(); AR]; WR];
        for b in 0..nb {
            for r in 0..WR {
                let p = w.add(r * stride + b * BLOCK_BYTES);
                let d = scale(p);
                let qx = _mm256_loadu_si256(p.add(2) as *const __m256i);
                for a in 0..AR {
                    let yb = ys[a].get_unchecked(b);
                    let dd = _mm256_set1_ps(d * yb.d);
                    acc[r][a] = _mm256_fmadd_ps(dd, lane_sums(qx, yb), acc[r][a]);
                }
            }
        }
        for r in 0..WR {
            for a in 0..AR {
                out[r][a] = hsum(acc[r][a]);
            }
        }
    }

    /// As `q4_1::avx2::rows_x_acts`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_x_acts(
        w: &[u8],
        stride: usize,
        n_rows: usize,
        ys: &[&[BlockQ8_0]],
        out: &mut [f32],
    ) {
        let n = ys.len();
        debug_assert!(w.len() >= n_rows * stride);
        debug_assert_eq!(out.len(), n_rows * n);
        let wp = w.as_ptr();
        if n == 1 {
            // Mat-vec: one weight row at a time streams fastest here (measured: sharing the
            // activation loads between 4 rows was ~1.5x slower on this 34-byte format).
            let y = ys[0];
            for (r, o) in out.iter_mut().enumerate() {
                let mut t = [[0.0f32; 1]; 1];
                tile::<1, 1>(wp.add(r * stride), stride, [y], &mut t);
                *o = t[0][0];
            }
            return;
        }
        for r in 0..n_rows {
            let wr = wp.add(r * stride);
            let orow = &mut out[r * n..(r + 1) * n];
            let mut a = 0;
            while a + 4 <= n {
                let mut o = [[0.0f32; 4]; 1];
                tile::<1, 4>(wr, stride, [ys[a], ys[a + 1], ys[a + 2], ys[a + 3]], &mut o);
                orow[a..a + 4].copy_from_slice(&o[0]);
                a += 4;
            }
            while a < n {
                let mut o = [[0.0f32; 1]; 1];
                tile::<1, 1>(wr, stride, [ys[a]], &mut o);
                orow[a] = o[0][0];
                a += 1;
            }
        }
    }
}
