//! Q4_1 weights × Q8_1 activations, in llama.cpp's exact float order.
//!
//! GGUF Q4_1 block (20 bytes): `d: f16, m: f16, qs: [u8; 16]`; element `j < 16` is the low
//! nibble of `qs[j]`, element `j + 16` its high nibble, and `w_j = d·q_j + m`.
//!
//! `ggml_vec_dot_q4_1_q8_1` (x86 AVX2 path) computes, for one weight row and one
//! activation row:
//!
//! ```text
//!   acc[0..8] = 0 (f32 lanes);  summs = 0 (f32)
//!   for each block b, in order:
//!       summs  = summs + m_x·s_y               // m_x, s_y are f16 values: m_x·s_y is exact in f32,
//!                                               // so contracting this to an FMA changes nothing
//!       dd     = d_x · d_y                      // f32 product
//!       for lane l in 0..8:                     // lane l holds elements 4l..4l+3 (maddubs + madd)
//!           acc[l] = fma(dd, float(Σ_{e=4l}^{4l+3} q_x[e]·q_y[e]), acc[l])
//!   result = hsum(acc) + summs,  hsum = ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))
//! ```
//!
//! The integer lane sums are exact, so only the f32 operations above need to be in this
//! order; both the scalar and the AVX2 kernels below follow it, so they agree bit for bit.

use super::q8::{BlockQ8_1, QK};
use super::{f16_bits_to_f32, hsum8};

pub const BLOCK_BYTES: usize = 20;

#[inline]
fn block_dm(b: &[u8]) -> (f32, f32) {
    (
        f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])),
        f16_bits_to_f32(u16::from_le_bytes([b[2], b[3]])),
    )
}

/// Dequantize one row of Q4_1 blocks (exact: `d·q + m` is formed in f32 like ggml's
/// `dequantize_row_q4_1`, which GCC may contract to one FMA; we use the FMA form).
pub fn dequantize_row(row: &[u8], out: &mut [f32]) {
    for (b, o) in row.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(QK)) {
        let (d, m) = block_dm(b);
        for j in 0..16 {
            o[j] = ((b[4 + j] & 0x0F) as f32).mul_add(d, m);
            o[j + 16] = ((b[4 + j] >> 4) as f32).mul_add(d, m);
        }
    }
}

/// Scalar dot of one Q4_1 row with one Q8_1 row.
pub fn dot_scalar(w: &[u8], y: &[BlockQ8_1]) -> f32 {
    debug_assert_eq!(w.len(), y.len() * BLOCK_BYTES);
    let mut acc = [0.0f32; 8];
    let mut summs = 0.0f32;
    for (b, yb) in w.chunks_exact(BLOCK_BYTES).zip(y) {
        let (d, m) = block_dm(b);
        summs += m * yb.s;
        let dd = d * yb.d;
        for (l, a) in acc.iter_mut().enumerate() {
            let mut isum = 0i32;
            for k in 0..4 {
                let e = 4 * l + k;
                let q = if e < 16 {
                    b[4 + e] & 0x0F
                } else {
                    b[4 + e - 16] >> 4
                };
                isum += q as i32 * yb.qs[e] as i32;
            }
            *a = dd.mul_add(isum as f32, *a);
        }
    }
    hsum8(&acc) + summs
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::super::q8::BlockQ8_1;
    use super::BLOCK_BYTES;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(x: __m256) -> f32 {
        // ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)), as ggml's hsum_float_8.
        let r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    /// (d, m) of the block at `p` as f32.
    #[inline(always)]
    unsafe fn dm(p: *const u8) -> (f32, f32) {
        let h = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
        (_mm_cvtss_f32(h), _mm_cvtss_f32(_mm_movehdup_ps(h)))
    }

    /// The 32 unsigned 4-bit values of the block at `p`, in element order.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let t = _mm_loadu_si128(p.add(4) as *const __m128i);
        let b = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
        _mm256_and_si256(b, _mm256_set1_epi8(0x0F))
    }

    /// 8 lanes of Σ of 4 consecutive products (exact), as f32.
    #[inline(always)]
    unsafe fn lane_sums(qx: __m256i, y: &BlockQ8_1) -> __m256 {
        let qy = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
        let p16 = _mm256_maddubs_epi16(qx, qy);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    /// `WR` consecutive weight rows (row stride `stride` bytes, starting at `w`) against
    /// `AR` activation rows; `out[r][a]` receives dot(w_r, y_a).
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile<const WR: usize, const AR: usize>(
        w: *const u8,
        stride: usize,
        ys: [&[BlockQ8_1]; AR],
        out: &mut [[f32; AR]; WR],
    ) {
        let nb = ys[0].len();
        let mut acc = [[_mm256_setzero_ps(); AR]; WR];
        let mut summs = [[0.0f32; AR]; WR];
        for b in 0..nb {
            for r in 0..WR {
                let p = w.add(r * stride + b * BLOCK_BYTES);
                let (d, m) = dm(p);
                let qx = nibbles(p);
                for a in 0..AR {
                    let yb = ys[a].get_unchecked(b);
                    summs[r][a] += m * yb.s;
                    let dd = _mm256_set1_ps(d * yb.d);
                    acc[r][a] = _mm256_fmadd_ps(dd, lane_sums(qx, yb), acc[r][a]);
                }
            }
        }
        for r in 0..WR {
            for a in 0..AR {
                out[r][a] = hsum(acc[r][a]) + summs[r][a];
            }
        }
    }

    /// Rows `rows` of the weight matrix (`w` = first byte of row `rows.start`) against
    /// every activation row in `ys`; `out[(r - rows.start) * n + a]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_x_acts(
        w: &[u8],
        stride: usize,
        n_rows: usize,
        ys: &[&[BlockQ8_1]],
        out: &mut [f32],
    ) {
        let n = ys.len();
        debug_assert!(w.len() >= n_rows * stride);
        debug_assert_eq!(out.len(), n_rows * n);
        let wp = w.as_ptr();
        if n == 1 {
            // Mat-vec: 4 weight rows share each activation block load.
            let y = ys[0];
            let mut r = 0;
            while r + 4 <= n_rows {
                let mut o = [[0.0f32; 1]; 4];
                tile::<4, 1>(wp.add(r * stride), stride, [y], &mut o);
                for k in 0..4 {
                    out[r + k] = o[k][0];
                }
                r += 4;
            }
            while r < n_rows {
                let mut o = [[0.0f32; 1]; 1];
                tile::<1, 1>(wp.add(r * stride), stride, [y], &mut o);
                out[r] = o[0][0];
                r += 1;
            }
            return;
        }
        // Several activation rows: each weight block is unpacked once per group of rows.
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
