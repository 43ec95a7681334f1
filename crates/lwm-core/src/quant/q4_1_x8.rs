//! Q4_1 rows interleaved in groups of 8: the decode (mat-vec) layout.
//!
//! A decode step multiplies every weight matrix by one activation row, so the work per
//! weight block is all there is. In GGUF's row layout each block carries its own f16
//! scale `d` and min `m`, and the kernel spends about half its instructions turning those
//! two scalars into a broadcast `d·d_y` and a scalar `summs += m·s_y` (`q4_1`). Stored 8
//! rows at a time, block by block, the 8 scales and 8 mins are two 16-byte loads and the
//! per-row scalar work becomes one 8-lane multiply and one 8-lane FMA per block:
//!
//! ```text
//!   group g = rows 8g..8g+7, blocks b = 0..nb in order; per (g, b), 160 bytes:
//!     d[8]: f16  |  m[8]: f16  |  qs[8][16]: the 8 rows' nibble bytes, row after row
//! ```
//!
//! A group holds exactly the bytes of its 8 GGUF rows (`8 · nb · 20`), so row ranges that
//! start on a group boundary keep their byte offsets, and the matrix costs no extra memory.
//!
//! Every output is still llama.cpp's `ggml_vec_dot_q4_1_q8_1` order (see `q4_1`): per lane
//! l (elements 4l..4l+3) `acc_l = fma(d·d_y, Σ q·q_y, acc_l)` block by block, then
//! `hsum(acc) + summs` with `summs += m·s_y` (exact products, so an FMA changes nothing).
//! The AVX2 kernel keeps the 8 lanes of each row split over two registers, lanes 0–3
//! (low nibbles) and 4–7 (high nibbles) of two rows side by side, which only renames lanes:
//! each lane still sees the same sequence of FMAs, and the final sum pairs them as ggml does.

use super::interleave;
use super::q4_1::{self, BLOCK_BYTES};
use super::q8::{BlockQ8_1, QK};

/// Rows per interleaved group.
pub const GROUP: usize = interleave::GROUP;
/// Bytes of one (group, block) cell: 8 scales, 8 mins, 8 × 16 nibble bytes.
pub const CELL_BYTES: usize = GROUP * BLOCK_BYTES;
/// A Q4_1 block's fields: `d`, `m`, the 16 nibble bytes.
pub const FIELDS: [usize; 3] = [2, 2, 16];

/// Scalar: `n_groups` groups (starting at `w`) against every activation row in `ys`;
/// `out[(row) * n + a]`, as `q4_1::dot_scalar` on each gathered row.
pub fn groups_x_acts_scalar(w: &[u8], n_groups: usize, ys: &[&[BlockQ8_1]], out: &mut [f32]) {
    interleave::groups_x_acts_scalar(w, n_groups, ys, &FIELDS, q4_1::dot_scalar, out)
}

const _: () = assert!(QK == 32);

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{BlockQ8_1, CELL_BYTES, GROUP};
    use std::arch::x86_64::*;

    /// How far ahead of the cell in use the mat-vec prefetches.
    const PREFETCH: usize = 8 * CELL_BYTES;

    /// ggml's `hsum_float_8` of the row whose lanes 0–3 are `lo` and 4–7 are `hi`:
    /// ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)).
    #[inline(always)]
    unsafe fn hsum_split(lo: __m128, hi: __m128) -> f32 {
        let r = _mm_add_ps(hi, lo);
        let r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        let r = _mm_add_ss(r, _mm_movehdup_ps(r));
        _mm_cvtss_f32(r)
    }

    /// Lane index vectors picking `[x[2k] ×4, x[2k+1] ×4]` out of an 8-lane vector.
    #[inline(always)]
    unsafe fn pair_index(k: usize) -> __m256i {
        let a = 2 * k as i32;
        _mm256_setr_epi32(a, a, a, a, a + 1, a + 1, a + 1, a + 1)
    }

    /// Rows 2k, 2k+1 of a cell as unsigned 4-bit values: (`[row 2k elements 0–15 | row
    /// 2k+1 elements 0–15]`, the same for elements 16–31).
    #[inline(always)]
    unsafe fn pair_nibbles(cell: *const u8, k: usize) -> (__m256i, __m256i) {
        let nib = _mm256_set1_epi8(0x0F);
        let x = _mm256_loadu_si256(cell.add(32 + 32 * k) as *const __m256i);
        (
            _mm256_and_si256(x, nib),
            _mm256_and_si256(_mm256_srli_epi16(x, 4), nib),
        )
    }

    /// The exact integer 4-sums of a pair's nibbles (`pair_nibbles`) against one activation
    /// block, as f32: (`[row 2k lanes 0–3 | row 2k+1 lanes 0–3]`, the same for lanes 4–7).
    /// With `VNNI` one `vpdpbusd` per half instead of `maddubs` + `madd` (same integers).
    #[inline(always)]
    unsafe fn pair_sums<const VNNI: bool>(
        (lo, hi): (__m256i, __m256i),
        qy_lo: __m256i,
        qy_hi: __m256i,
    ) -> (__m256, __m256) {
        let (plo, phi) = if VNNI {
            let z = _mm256_setzero_si256();
            (
                _mm256_dpbusd_epi32(z, lo, qy_lo),
                _mm256_dpbusd_epi32(z, hi, qy_hi),
            )
        } else {
            let ones = _mm256_set1_epi16(1);
            (
                _mm256_madd_epi16(_mm256_maddubs_epi16(lo, qy_lo), ones),
                _mm256_madd_epi16(_mm256_maddubs_epi16(hi, qy_hi), ones),
            )
        };
        (_mm256_cvtepi32_ps(plo), _mm256_cvtepi32_ps(phi))
    }

    /// Activation quants of one block: elements 0–15 and 16–31, each in both halves.
    #[inline(always)]
    unsafe fn act_quants(yb: &BlockQ8_1) -> (__m256i, __m256i) {
        let p = yb.qs.as_ptr() as *const __m128i;
        (
            _mm256_broadcastsi128_si256(_mm_loadu_si128(p)),
            _mm256_broadcastsi128_si256(_mm_loadu_si128(p.add(1))),
        )
    }

    /// `n_groups` groups (starting at `w`, `nb` blocks per row) times one activation row:
    /// `out[r]` for the group's rows in order.
    #[inline(always)]
    unsafe fn groups_x_act<const VNNI: bool>(
        w: &[u8],
        n_groups: usize,
        y: &[BlockQ8_1],
        out: &mut [f32],
    ) {
        let nb = y.len();
        debug_assert!(w.len() >= n_groups * nb * CELL_BYTES);
        debug_assert!(out.len() >= n_groups * GROUP);
        for g in 0..n_groups {
            let gp = w.as_ptr().add(g * nb * CELL_BYTES);
            let mut acc_lo = [_mm256_setzero_ps(); 4];
            let mut acc_hi = [_mm256_setzero_ps(); 4];
            let mut summs = _mm256_setzero_ps();
            for (b, yb) in y.iter().enumerate() {
                let cell = gp.add(b * CELL_BYTES);
                // Decode streams every weight once from memory: ask for the cell PREFETCH
                // bytes ahead (3 lines cover its 160 bytes).
                let ahead = cell.wrapping_add(PREFETCH) as *const i8;
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(128));
                let d = _mm256_cvtph_ps(_mm_loadu_si128(cell as *const __m128i));
                let m = _mm256_cvtph_ps(_mm_loadu_si128(cell.add(16) as *const __m128i));
                summs = _mm256_fmadd_ps(m, _mm256_set1_ps(yb.s), summs);
                let dd = _mm256_mul_ps(d, _mm256_set1_ps(yb.d));
                let (qy_lo, qy_hi) = act_quants(yb);
                for k in 0..4 {
                    let (plo, phi) = pair_sums::<VNNI>(pair_nibbles(cell, k), qy_lo, qy_hi);
                    let ddk = _mm256_permutevar8x32_ps(dd, pair_index(k));
                    acc_lo[k] = _mm256_fmadd_ps(ddk, plo, acc_lo[k]);
                    acc_hi[k] = _mm256_fmadd_ps(ddk, phi, acc_hi[k]);
                }
            }
            let mut s = [0.0f32; GROUP];
            _mm256_storeu_ps(s.as_mut_ptr(), summs);
            let o = &mut out[g * GROUP..(g + 1) * GROUP];
            for k in 0..4 {
                let (lo, hi) = (acc_lo[k], acc_hi[k]);
                o[2 * k] =
                    hsum_split(_mm256_castps256_ps128(lo), _mm256_castps256_ps128(hi)) + s[2 * k];
                o[2 * k + 1] =
                    hsum_split(_mm256_extractf128_ps(lo, 1), _mm256_extractf128_ps(hi, 1))
                        + s[2 * k + 1];
            }
        }
    }

    /// Rows 2k, 2k+1 of group `gp` against `A` activation rows: for each row (2) and
    /// activation (A), the lane accumulators; `summs` are added by the caller.
    #[inline(always)]
    unsafe fn pair_tile<const A: usize, const VNNI: bool>(
        gp: *const u8,
        k: usize,
        ys: [&[BlockQ8_1]; A],
    ) -> ([__m256; A], [__m256; A]) {
        let nb = ys[0].len();
        let idx = pair_index(k);
        let mut acc_lo = [_mm256_setzero_ps(); A];
        let mut acc_hi = [_mm256_setzero_ps(); A];
        for b in 0..nb {
            let cell = gp.add(b * CELL_BYTES);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(cell as *const __m128i));
            let dk = _mm256_permutevar8x32_ps(d, idx);
            let nibbles = pair_nibbles(cell, k);
            for a in 0..A {
                let yb = ys[a].get_unchecked(b);
                let (qy_lo, qy_hi) = act_quants(yb);
                let (plo, phi) = pair_sums::<VNNI>(nibbles, qy_lo, qy_hi);
                let dd = _mm256_mul_ps(dk, _mm256_set1_ps(yb.d));
                acc_lo[a] = _mm256_fmadd_ps(dd, plo, acc_lo[a]);
                acc_hi[a] = _mm256_fmadd_ps(dd, phi, acc_hi[a]);
            }
        }
        (acc_lo, acc_hi)
    }

    /// `n_groups` groups against every activation row in `ys` (n = 1: decode's mat-vec;
    /// n > 1: prefill): `out[row * n + a]`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn groups_x_acts(w: &[u8], n_groups: usize, ys: &[&[BlockQ8_1]], out: &mut [f32]) {
        groups_x_acts_with::<false>(w, n_groups, ys, out)
    }

    /// `groups_x_acts` with AVX-512 VNNI dot products (identical bits).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn groups_x_acts_vnni(
        w: &[u8],
        n_groups: usize,
        ys: &[&[BlockQ8_1]],
        out: &mut [f32],
    ) {
        groups_x_acts_with::<true>(w, n_groups, ys, out)
    }

    /// Each pair of rows is unpacked once per block for up to 4 activation rows.
    #[inline(always)]
    unsafe fn groups_x_acts_with<const VNNI: bool>(
        w: &[u8],
        n_groups: usize,
        ys: &[&[BlockQ8_1]],
        out: &mut [f32],
    ) {
        let n = ys.len();
        if n == 1 {
            groups_x_act::<VNNI>(w, n_groups, ys[0], out);
            return;
        }
        let nb = ys[0].len();
        debug_assert!(w.len() >= n_groups * nb * CELL_BYTES);
        debug_assert!(out.len() >= n_groups * GROUP * n);
        for g in 0..n_groups {
            let gp = w.as_ptr().add(g * nb * CELL_BYTES);
            // summs[a][j] = Σ_b m_j·s_y(a, b) for the group's 8 rows j, in block order. (A
            // loop, not an iterator closure: a closure does not inherit this function's
            // target features, so its intrinsics became calls.)
            let mut summs: Vec<[f32; GROUP]> = vec![[0.0; GROUP]; n];
            for (y, s) in ys.iter().zip(summs.iter_mut()) {
                let mut acc = _mm256_setzero_ps();
                for (b, yb) in y.iter().enumerate() {
                    let cell = gp.add(b * CELL_BYTES);
                    let m = _mm256_cvtph_ps(_mm_loadu_si128(cell.add(16) as *const __m128i));
                    acc = _mm256_fmadd_ps(m, _mm256_set1_ps(yb.s), acc);
                }
                _mm256_storeu_ps(s.as_mut_ptr(), acc);
            }
            let o = &mut out[g * GROUP * n..(g + 1) * GROUP * n];
            for k in 0..4 {
                let mut a = 0;
                while a < n {
                    let take = (n - a).min(4);
                    let mut put = |j: usize, lo: __m256, hi: __m256| {
                        let (r0, r1) = (2 * k, 2 * k + 1);
                        o[r0 * n + a + j] =
                            hsum_split(_mm256_castps256_ps128(lo), _mm256_castps256_ps128(hi))
                                + summs[a + j][r0];
                        o[r1 * n + a + j] =
                            hsum_split(_mm256_extractf128_ps(lo, 1), _mm256_extractf128_ps(hi, 1))
                                + summs[a + j][r1];
                    };
                    match take {
                        4 => {
                            let (lo, hi) = pair_tile::<4, VNNI>(
                                gp,
                                k,
                                [ys[a], ys[a + 1], ys[a + 2], ys[a + 3]],
                            );
                            (0..4).for_each(|j| put(j, lo[j], hi[j]));
                        }
                        3 => {
                            let (lo, hi) =
                                pair_tile::<3, VNNI>(gp, k, [ys[a], ys[a + 1], ys[a + 2]]);
                            (0..3).for_each(|j| put(j, lo[j], hi[j]));
                        }
                        2 => {
                            let (lo, hi) = pair_tile::<2, VNNI>(gp, k, [ys[a], ys[a + 1]]);
                            (0..2).for_each(|j| put(j, lo[j], hi[j]));
                        }
                        _ => {
                            let (lo, hi) = pair_tile::<1, VNNI>(gp, k, [ys[a]]);
                            put(0, lo[0], hi[0]);
                        }
                    }
                    a += take;
                }
            }
        }
    }
}
