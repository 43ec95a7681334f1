//! Q8_0 rows interleaved in groups of 8: the decode (mat-vec) layout of the output head.
//!
//! In the default model the one Q8_0 matrix is the 49152 × 576 output head (30 MB, the
//! largest read of a decode step). In GGUF's row layout the mat-vec walks one row at a
//! time: per 34-byte block a scalar f16 scale load and conversion, a scalar product with
//! the activation scale, a broadcast, the activation quants loaded again, and a single
//! accumulator chain per row. Stored 8 rows at a time, block by block, the 8 scales are one
//! 16-byte load and one vector multiply, the activation block is loaded once for 8 rows,
//! and 8 independent accumulators hide the FMA latency:
//!
//! ```text
//!   group g = rows 8g..8g+7, blocks b = 0..nb in order; per (g, b), 272 bytes:
//!     d[8]: f16  |  qs[8][32]: the 8 rows' quants, row after row
//! ```
//!
//! A group holds exactly the bytes of its 8 GGUF rows (`8 · nb · 34`), so the matrix costs
//! no extra memory. Every output is still llama.cpp's `ggml_vec_dot_q8_0_q8_0` order (see
//! `q8_0`): per lane l (elements 4l..4l+3) `acc_l = fma(d·d_y, Σ q·q_y, acc_l)` block by
//! block, then ggml's 8-lane horizontal sum.

use super::interleave;
use super::q8::BlockQ8_0;
use super::q8_0::{self, BLOCK_BYTES};

/// Rows per interleaved group.
pub const GROUP: usize = interleave::GROUP;
/// Bytes of one (group, block) cell: 8 scales, 8 × 32 quants.
pub const CELL_BYTES: usize = GROUP * BLOCK_BYTES;
/// A Q8_0 block's fields: `d`, the 32 quants.
pub const FIELDS: [usize; 2] = [2, 32];
/// Offset of the quants in a cell (after the 8 f16 scales).
const QS: usize = GROUP * FIELDS[0];

/// Scalar: `n_groups` groups (starting at `w`) against every activation row in `ys`;
/// `out[row * n + a]`, as `q8_0::dot_scalar` on each gathered row.
pub fn groups_x_acts_scalar(w: &[u8], n_groups: usize, ys: &[&[BlockQ8_0]], out: &mut [f32]) {
    interleave::groups_x_acts_scalar(w, n_groups, ys, &FIELDS, q8_0::dot_scalar, out)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::super::q8::BlockQ8_0;
    use super::super::q8_0::avx2::{hsum, lane_sums_of};
    use super::{CELL_BYTES, GROUP, QS};
    use std::arch::x86_64::*;

    /// How far ahead of the cell in use the mat-vec prefetches.
    const PREFETCH: usize = 4 * CELL_BYTES;

    /// One group (at `gp`, `y.len()` blocks per row) times one activation row: the 8
    /// rows' dot products in `out[0..8]`.
    #[inline(always)]
    unsafe fn group_x_act(gp: *const u8, y: &[BlockQ8_0], out: &mut [f32]) {
        let mut acc = [_mm256_setzero_ps(); GROUP];
        for (b, yb) in y.iter().enumerate() {
            let cell = gp.add(b * CELL_BYTES);
            // Decode streams every weight once from memory: ask for the cell PREFETCH
            // bytes ahead (5 lines cover its 272 bytes).
            let ahead = cell.wrapping_add(PREFETCH) as *const i8;
            for l in 0..5 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l));
            }
            // d_j · d_y for the 8 rows, each the same f32 product as the row kernel's.
            let dd = _mm256_mul_ps(
                _mm256_cvtph_ps(_mm_loadu_si128(cell as *const __m128i)),
                _mm256_set1_ps(yb.d),
            );
            let mut ddv = [0.0f32; GROUP];
            _mm256_storeu_ps(ddv.as_mut_ptr(), dd);
            let qy = _mm256_loadu_si256(yb.qs.as_ptr() as *const __m256i);
            for (j, a) in acc.iter_mut().enumerate() {
                let qx = _mm256_loadu_si256(cell.add(QS + 32 * j) as *const __m256i);
                *a = _mm256_fmadd_ps(_mm256_set1_ps(ddv[j]), lane_sums_of(qx, qy), *a);
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = hsum(a);
        }
    }

    /// `n_groups` groups against every activation row in `ys` (n = 1: decode's mat-vec;
    /// n > 1: the head on several rows, each group's 8 rows re-read from cache per
    /// activation row): `out[row * n + a]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn groups_x_acts(w: &[u8], n_groups: usize, ys: &[&[BlockQ8_0]], out: &mut [f32]) {
        let n = ys.len();
        let nb = ys.first().map_or(0, |y| y.len());
        debug_assert!(w.len() >= n_groups * nb * CELL_BYTES);
        debug_assert!(out.len() >= n_groups * GROUP * n);
        let mut o = [0.0f32; GROUP];
        for g in 0..n_groups {
            let gp = w.as_ptr().add(g * nb * CELL_BYTES);
            if n == 1 {
                group_x_act(gp, ys[0], &mut out[g * GROUP..(g + 1) * GROUP]);
                continue;
            }
            for (a, y) in ys.iter().enumerate() {
                group_x_act(gp, y, &mut o);
                for (j, v) in o.iter().enumerate() {
                    out[(g * GROUP + j) * n + a] = *v;
                }
            }
        }
    }
}

/// The same products with AVX-512 VNNI, a register tile of the group's 8 rows × up to 4
/// activation rows. Two rows share a 512-bit vector (their quants are adjacent in a
/// cell), and `vpdpbusd` takes the weights offset to unsigned:
///
/// ```text
///   Σ_{4 bytes of lane l} q·q_y = Σ (q + 128)·q_y − 128·Σ q_y      (exact in i32)
/// ```
///
/// so a lane's sum is one `vpdpbusd` started from −128·Σ q_y (shared by the 8 rows) instead
/// of AVX2's sign, sign, `maddubs` and `madd`. Lane l still sums elements 4l..4l+3 of the
/// block and every float step (`d·d_y`, the FMA into lane l, ggml's 8-lane sum at the end)
/// is the AVX2 kernel's, so the bits are the same.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::super::q8::BlockQ8_0;
    use super::super::row_kernels::simd::hsum_halves;
    use super::{CELL_BYTES, GROUP, QS};
    use std::arch::x86_64::*;

    /// Activation rows per register tile (× 4 row pairs: 16 accumulators).
    const AR: usize = 4;
    /// Groups per block of the GEMM: their cells (8 × 34 bytes × blocks per row, 35 KB at
    /// 4096 columns each) stay in L2 while every activation tile passes over them.
    const GB: usize = 8;

    /// As `avx2::groups_x_acts`: `out[row * n + a]`.
    ///
    /// SAFETY: AVX-512 F/VL/VNNI and AVX2/FMA/F16C available; `w` holds `n_groups` groups
    /// of `ys[0].len()` blocks; every `ys[a]` has that many blocks; `out` has
    /// `n_groups · 8 · ys.len()` values.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn groups_x_acts(w: &[u8], n_groups: usize, ys: &[&[BlockQ8_0]], out: &mut [f32]) {
        let n = ys.len();
        let nb = ys.first().map_or(0, |y| y.len());
        debug_assert!(w.len() >= n_groups * nb * CELL_BYTES);
        debug_assert!(out.len() >= n_groups * GROUP * n);
        for g0 in (0..n_groups).step_by(GB) {
            for g in g0..(g0 + GB).min(n_groups) {
                let gp = w.as_ptr().add(g * nb * CELL_BYTES);
                let mut a = 0;
                while a < n {
                    let acts = &ys[a..];
                    let o = &mut out[g * GROUP * n..];
                    match n - a {
                        1 => tile::<1>(gp, nb, acts, o, a, n),
                        2 => tile::<2>(gp, nb, acts, o, a, n),
                        3 => tile::<3>(gp, nb, acts, o, a, n),
                        _ => tile::<AR>(gp, nb, acts, o, a, n),
                    }
                    a += (n - a).min(AR);
                }
            }
        }
    }

    /// The group at `gp` × activation rows `ys[0..A]` (rows a0.. of the product): writes
    /// `out[j · n + a0 + a]` for the group's rows j.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile<const A: usize>(
        gp: *const u8,
        nb: usize,
        ys: &[&[BlockQ8_0]],
        out: &mut [f32],
        a0: usize,
        n: usize,
    ) {
        let c80 = _mm512_set1_epi8(-128);
        let zero = _mm512_setzero_si512();
        // Row pair p's scales: d[2p] in lanes 0..8, d[2p + 1] in lanes 8..16.
        let idx: [__m512i; 4] = std::array::from_fn(|p| {
            let (lo, hi) = (2 * p as i32, 2 * p as i32 + 1);
            _mm512_setr_epi32(
                lo, lo, lo, lo, lo, lo, lo, lo, hi, hi, hi, hi, hi, hi, hi, hi,
            )
        });
        let mut acc = [[_mm512_setzero_ps(); A]; 4];
        for b in 0..nb {
            let cell = gp.add(b * CELL_BYTES);
            let d8 = _mm256_cvtph_ps(_mm_loadu_si128(cell as *const __m128i));
            let d16 = _mm512_castps256_ps512(d8);
            let mut qx = [zero; 4];
            let mut dp = [_mm512_setzero_ps(); 4];
            for p in 0..4 {
                let q = _mm512_loadu_si512(cell.add(QS + 64 * p) as *const __m512i);
                qx[p] = _mm512_xor_si512(q, c80);
                dp[p] = _mm512_permutexvar_ps(idx[p], d16);
            }
            for a in 0..A {
                let yb = ys[a].get_unchecked(b);
                let qy =
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(yb.qs.as_ptr() as *const __m256i));
                let neg = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, c80, qy));
                let dy = _mm512_set1_ps(yb.d);
                for p in 0..4 {
                    let s = _mm512_dpbusd_epi32(neg, qx[p], qy);
                    let dd = _mm512_mul_ps(dp[p], dy);
                    acc[p][a] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(s), acc[p][a]);
                }
            }
        }
        for p in 0..4 {
            for a in 0..A {
                let (lo, hi) = hsum_halves(acc[p][a]);
                out[2 * p * n + a0 + a] = lo;
                out[(2 * p + 1) * n + a0 + a] = hi;
            }
        }
    }
}
