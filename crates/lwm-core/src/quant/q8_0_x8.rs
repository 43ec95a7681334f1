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
