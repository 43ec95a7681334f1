//! Q5_K weights × Q8_K activations, in llama.cpp's exact float order.
//!
//! GGUF Q5_K super-block (176 bytes, 256 weights): `d: f16, dmin: f16, scales: [u8; 12],
//! qh: [u8; 32], qs: [u8; 128]`. The 12 bytes pack 8 six-bit scales `sc` and 8 six-bit
//! mins `m`, one pair per sub-block of 32 (ggml's `get_scale_min_k4`). Sub-block `s = 2j`
//! takes the low nibbles of `qs[32j..32j+32]`, `s = 2j+1` their high nibbles; bit `s` of
//! `qh[e]` is the fifth bit of element `e` of sub-block `s`. So `q ∈ [0, 31]` and
//! `w = d·sc_s·q − dmin·m_s` (`dequantize_row_q5_K`: `(d·sc)·q − (dmin·m)` in f32).
//!
//! `ggml_vec_dot_q5_K_q8_K` (ggml-cpu/arch/x86/quants.c, the `__AVX2__` branch, which
//! AVX-512 builds also take), per super-block, for one weight row and one activation row:
//!
//! ```text
//!   d    = y.d · f32(x.d);   dmin = (−y.d) · f32(x.dmin)        // f32 products
//!   mins = Σ_{t<8} m_t · (bsums[2t] + bsums[2t+1])             // exact integer
//!   summs = fma(dmin, f32(mins), summs)                         // (C `summs += dmin * mins`,
//!                                                               //  contracted by GCC: vfmadd231ss)
//!   sumi[l] = Σ_{s<8} sc_s · Σ_{k<4} q_s[4l+k] · y.qs[32s+4l+k]   l in 0..8 (exact integers)
//!   acc[l] = fma(d, f32(sumi[l]), acc[l])
//! result = hsum8(acc) + summs,  hsum8 = ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))
//! ```
//!
//! llama.cpp's x86 CPU backend neither repacks Q5_K (its repacked Q5_K kernels are ARM's)
//! nor hands it to llamafile's tinyBLAS, so this is every mul_mat's per-element order.

use super::k_tiles::SuperBlock;
use super::q4_k::scales_mins;
use super::q8::{self, BlockQ8K, QK_K};
use super::row_kernels::RowFormat;
use super::{f16_bits_to_f32, hsum8};

pub const BLOCK_BYTES: usize = 176;
/// Offsets of the fields in a block.
const SCALES: usize = 4;
const QH: usize = 16;
const QS: usize = 48;

/// The Q5_K row format.
pub struct Q5K;

/// The 5-bit quant of element `e < 32` of sub-block `s < 8` of the block `b`.
#[inline(always)]
fn quant(b: &[u8], s: usize, e: usize) -> u8 {
    let q = b[QS + 32 * (s / 2) + e];
    let lo = if s.is_multiple_of(2) { q & 0xF } else { q >> 4 };
    lo | (((b[QH + e] >> s) & 1) << 4)
}

#[inline(always)]
fn block_d_dmin(b: &[u8]) -> (f32, f32) {
    (
        f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])),
        f16_bits_to_f32(u16::from_le_bytes([b[2], b[3]])),
    )
}

impl RowFormat for Q5K {
    type Act = BlockQ8K;
    const ACT_ZERO: BlockQ8K = BlockQ8K::ZERO;
    const BLOCK_ELEMS: usize = QK_K;
    const BLOCK_BYTES: usize = BLOCK_BYTES;

    fn quantize_acts(x: &[f32], out: &mut [BlockQ8K], _simd: bool) {
        q8::quantize_row_q8_k(x, out)
    }

    fn dequantize_row(row: &[u8], out: &mut [f32]) {
        for (b, o) in row
            .chunks_exact(BLOCK_BYTES)
            .zip(out.chunks_exact_mut(QK_K))
        {
            let (d, min) = block_d_dmin(b);
            let sm = scales_mins(&b[SCALES..QH]);
            for (s, o) in o.chunks_exact_mut(32).enumerate() {
                let (ds, ms) = (d * sm[s] as f32, min * sm[8 + s] as f32);
                for (e, v) in o.iter_mut().enumerate() {
                    *v = ds * quant(b, s, e) as f32 - ms;
                }
            }
        }
    }

    fn dot_scalar(w: &[u8], y: &[BlockQ8K]) -> f32 {
        debug_assert_eq!(w.len(), y.len() * BLOCK_BYTES);
        let mut acc = [0.0f32; 8];
        let mut summs = 0.0f32;
        for (b, yb) in w.chunks_exact(BLOCK_BYTES).zip(y) {
            let (xd, xmin) = block_d_dmin(b);
            let d = yb.d * xd;
            let dmin = -yb.d * xmin;
            let sm = scales_mins(&b[SCALES..QH]);
            let mins: i32 = (0..8)
                .map(|t| sm[8 + t] as i32 * (yb.bsums[2 * t] as i32 + yb.bsums[2 * t + 1] as i32))
                .sum();
            summs = dmin.mul_add(mins as f32, summs);
            let mut sumi = [0i32; 8];
            for (s, &sc) in sm[..8].iter().enumerate() {
                for (l, v) in sumi.iter_mut().enumerate() {
                    let p: i32 = (4 * l..4 * l + 4)
                        .map(|e| quant(b, s, e) as i32 * yb.qs[32 * s + e] as i32)
                        .sum();
                    *v += sc as i32 * p;
                }
            }
            for (a, &v) in acc.iter_mut().zip(&sumi) {
                *a = d.mul_add(v as f32, *a);
            }
        }
        hsum8(&acc) + summs
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn rows_x_acts_avx2(
        w: &[u8],
        stride: usize,
        n_rows: usize,
        ys: &[&[BlockQ8K]],
        out: &mut [f32],
    ) -> bool {
        avx2::rows_x_acts(w, stride, n_rows, ys, out);
        true
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn rows_x_acts_vnni(
        w: &[u8],
        stride: usize,
        n_rows: usize,
        ys: &[&[BlockQ8K]],
        out: &mut [f32],
    ) -> bool {
        if ys.len() >= 2 {
            avx512::rows_x_acts(w, stride, n_rows, ys, out);
        } else {
            avx2::rows_x_acts_vnni(w, stride, n_rows, ys, out);
        }
        true
    }
}

impl SuperBlock for Q5K {
    const SUB: usize = 32;
    const HAS_MIN: bool = true;
    const BIAS: i32 = 0;

    #[inline(always)]
    fn unpack(b: &[u8], codes: &mut [u8], scales: &mut [i32], mins: &mut [i32]) -> (f32, f32) {
        let sm = scales_mins(&b[SCALES..QH]);
        for s in 0..8 {
            scales[s] = sm[s] as i32;
            mins[s] = sm[8 + s] as i32;
        }
        let (qh, qs) = (&b[QH..QH + 32], &b[QS..QS + 128]);
        for j in 0..4 {
            for l in 0..32 {
                let (q, h) = (qs[32 * j + l], qh[l] >> (2 * j));
                codes[64 * j + l] = (q & 0xF) | ((h & 1) << 4);
                codes[64 * j + 32 + l] = (q >> 4) | ((h & 2) << 3);
            }
        }
        block_d_dmin(b)
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::super::q4_k::avx2::scales_mins_gpr;
    use super::super::q8::BlockQ8K;
    use super::super::q8_0::avx2::hsum;
    use super::super::row_kernels::simd::scaled_pairs_acc;
    use super::super::row_kernels::{gemm_rows, RowTile};
    use super::{BLOCK_BYTES, QH, QS};
    use std::arch::x86_64::*;

    /// (d, dmin) of the block at `p`.
    #[inline(always)]
    pub(super) unsafe fn d_dmin(p: *const u8) -> (f32, f32) {
        let h = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
        (_mm_cvtss_f32(h), _mm_cvtss_f32(_mm_movehdup_ps(h)))
    }

    /// Bit `BIT` of every byte of `h` moved to bit 4 (other bits garbage).
    #[inline(always)]
    unsafe fn bit_to_4<const BIT: usize>(h: __m256i) -> __m256i {
        // A 16-bit shift by ≤ 4 keeps each byte's bit 4 within its own byte.
        match BIT {
            0 => _mm256_slli_epi16::<4>(h),
            1 => _mm256_slli_epi16::<3>(h),
            2 => _mm256_slli_epi16::<2>(h),
            3 => _mm256_slli_epi16::<1>(h),
            4 => h,
            5 => _mm256_srli_epi16::<1>(h),
            6 => _mm256_srli_epi16::<2>(h),
            _ => _mm256_srli_epi16::<3>(h),
        }
    }

    /// One weight row's super-block, unpacked as the dot products want it.
    #[derive(Clone, Copy)]
    struct Sb {
        p: *const u8,
        /// The 8 scales as i16 in both 128-bit lanes.
        scales: __m256i,
        hbits: __m256i,
    }

    /// The quants of sub-blocks 2J and 2J+1 of `sb` (bytes in [0, 31]).
    #[inline(always)]
    unsafe fn quants<const J: usize, const B0: usize, const B1: usize>(
        sb: &Sb,
    ) -> (__m256i, __m256i) {
        let m4 = _mm256_set1_epi8(0x0F);
        let m10 = _mm256_set1_epi8(0x10);
        let q = _mm256_loadu_si256(sb.p.add(QS + 32 * J) as *const __m256i);
        let q0 = _mm256_or_si256(
            _mm256_and_si256(q, m4),
            _mm256_and_si256(bit_to_4::<B0>(sb.hbits), m10),
        );
        let q1 = _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4),
            _mm256_and_si256(bit_to_4::<B1>(sb.hbits), m10),
        );
        (q0, q1)
    }

    /// Scale `s` of `sb` broadcast to all 16 i16 lanes.
    #[inline(always)]
    unsafe fn scale(scales: __m256i, s: usize) -> __m256i {
        let i = 2 * s as i16;
        _mm256_shuffle_epi8(scales, _mm256_set1_epi16(((i + 1) << 8) | i))
    }

    /// Sub-blocks 2J, 2J+1 of WR weight rows against AR activation rows' block `yb`:
    /// `sumi[r][a] += Σ sc·(Σ of 4 products)` per lane.
    #[inline(always)]
    unsafe fn pair<
        const J: usize,
        const B0: usize,
        const B1: usize,
        const WR: usize,
        const AR: usize,
        const VNNI: bool,
    >(
        sbs: &[Sb; WR],
        yb: &[&BlockQ8K; AR],
        sumi: &mut [[__m256i; AR]; WR],
    ) {
        let mut q8 = [[_mm256_setzero_si256(); 2]; AR];
        for a in 0..AR {
            let p = yb[a].qs.as_ptr().add(64 * J) as *const __m256i;
            q8[a] = [_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1))];
        }
        for r in 0..WR {
            let (q0, q1) = quants::<J, B0, B1>(&sbs[r]);
            let s0 = scale(sbs[r].scales, 2 * J);
            let s1 = scale(sbs[r].scales, 2 * J + 1);
            for a in 0..AR {
                let p0 = _mm256_maddubs_epi16(q0, q8[a][0]);
                let p1 = _mm256_maddubs_epi16(q1, q8[a][1]);
                let acc = scaled_pairs_acc::<VNNI>(sumi[r][a], p0, s0);
                sumi[r][a] = scaled_pairs_acc::<VNNI>(acc, p1, s1);
            }
        }
    }

    /// Lane k of the result: the sum of the 8 i32 of `v[k]` (exact).
    #[inline(always)]
    pub(super) unsafe fn hsum4_i32(v: &[__m256i; 4]) -> __m128i {
        let h01 = _mm256_hadd_epi32(v[0], v[1]);
        let h23 = _mm256_hadd_epi32(v[2], v[3]);
        let h = _mm256_hadd_epi32(h01, h23);
        _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h))
    }

    /// `WR` weight rows (`stride` bytes apart from `w`) × `AR` activation rows (WR·AR ≤ 8):
    /// `out[r][a] = dot(w_r, y_a)` in ggml's order.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile<const WR: usize, const AR: usize, const VNNI: bool>(
        w: *const u8,
        stride: usize,
        ys: [&[BlockQ8K]; AR],
        out: &mut [[f32; AR]; WR],
    ) {
        debug_assert!(WR * AR <= 8);
        let nb = ys[0].len();
        // Byte pairs (8+t, 8+t): each min twice, beside the two bsums of its sub-block.
        let mdup = _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
        let mut acc = [[_mm256_setzero_ps(); AR]; WR];
        // Lane k = r·AR + a of summs[k / 4]: summs of (row r, activation row a).
        let mut summs = [_mm_setzero_ps(); 2];
        for b in 0..nb {
            let yb: [&BlockQ8K; AR] = std::array::from_fn(|a| ys[a].get_unchecked(b));
            let mut mprod = [_mm256_setzero_si256(); 8];
            let mut dmin = [0.0f32; 8];
            let mut d = [[0.0f32; AR]; WR];
            // A plain loop, not `array::from_fn`: a closure does not inherit the caller's
            // target features, so its intrinsics would stay out-of-line calls.
            let mut sbs = [Sb {
                p: w,
                scales: _mm256_setzero_si256(),
                hbits: _mm256_setzero_si256(),
            }; WR];
            for (r, sb) in sbs.iter_mut().enumerate() {
                let p = w.add(r * stride + b * BLOCK_BYTES);
                let (xd, xmin) = d_dmin(p);
                let sm = scales_mins_gpr(p);
                let mins = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(sm, mdup));
                for a in 0..AR {
                    let bs = _mm256_loadu_si256(yb[a].bsums.as_ptr() as *const __m256i);
                    mprod[r * AR + a] = _mm256_madd_epi16(mins, bs);
                    dmin[r * AR + a] = -yb[a].d * xmin;
                    d[r][a] = yb[a].d * xd;
                }
                let sc = _mm256_cvtepu8_epi16(sm);
                *sb = Sb {
                    p,
                    scales: _mm256_permute2x128_si256::<0x00>(sc, sc),
                    hbits: _mm256_loadu_si256(p.add(QH) as *const __m256i),
                };
            }
            for h in 0..(WR * AR).div_ceil(4) {
                let v = [
                    mprod[4 * h],
                    mprod[4 * h + 1],
                    mprod[4 * h + 2],
                    mprod[4 * h + 3],
                ];
                let isum = _mm_cvtepi32_ps(hsum4_i32(&v));
                let dm = _mm_loadu_ps(dmin.as_ptr().add(4 * h));
                summs[h] = _mm_fmadd_ps(dm, isum, summs[h]);
            }
            let mut sumi = [[_mm256_setzero_si256(); AR]; WR];
            pair::<0, 0, 1, WR, AR, VNNI>(&sbs, &yb, &mut sumi);
            pair::<1, 2, 3, WR, AR, VNNI>(&sbs, &yb, &mut sumi);
            pair::<2, 4, 5, WR, AR, VNNI>(&sbs, &yb, &mut sumi);
            pair::<3, 6, 7, WR, AR, VNNI>(&sbs, &yb, &mut sumi);
            for r in 0..WR {
                for a in 0..AR {
                    acc[r][a] = _mm256_fmadd_ps(
                        _mm256_set1_ps(d[r][a]),
                        _mm256_cvtepi32_ps(sumi[r][a]),
                        acc[r][a],
                    );
                }
            }
        }
        let mut sm = [0.0f32; 8];
        _mm_storeu_ps(sm.as_mut_ptr(), summs[0]);
        _mm_storeu_ps(sm.as_mut_ptr().add(4), summs[1]);
        for r in 0..WR {
            for a in 0..AR {
                out[r][a] = hsum(acc[r][a]) + sm[r * AR + a];
            }
        }
    }

    /// Weight rows sharing each activation block in the mat-vec (measured: 4 beat 1 and 2
    /// by 10-20%, 8 no better).
    const MV_ROWS: usize = 4;
    /// The GEMM tile (n > 1): one weight row × up to 8 activation rows (8 measured ~15%
    /// faster than 4 here, as fast as 2 weight rows × 4).
    struct Gemm<const VNNI: bool>;

    impl<const VNNI: bool> RowTile for Gemm<VNNI> {
        type Act = BlockQ8K;
        #[inline(always)]
        unsafe fn row_x_acts<const AR: usize>(
            wr: *const u8,
            stride: usize,
            ys: &[&[BlockQ8K]],
            a0: usize,
            out: &mut [f32],
        ) {
            let mut o = [[0.0f32; AR]; 1];
            tile::<1, AR, VNNI>(wr, stride, std::array::from_fn(|k| ys[a0 + k]), &mut o);
            out.copy_from_slice(&o[0]);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_x_acts(
        w: &[u8],
        stride: usize,
        n_rows: usize,
        ys: &[&[BlockQ8K]],
        out: &mut [f32],
    ) {
        rows_x_acts_with::<false>(w, stride, n_rows, ys, out)
    }

    /// `rows_x_acts` with AVX-512 VNNI's `vpdpwssd` for the scaled sums (identical bits).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn rows_x_acts_vnni(
        w: &[u8],
        stride: usize,
        n_rows: usize,
        ys: &[&[BlockQ8K]],
        out: &mut [f32],
    ) {
        rows_x_acts_with::<true>(w, stride, n_rows, ys, out)
    }

    #[inline(always)]
    unsafe fn rows_x_acts_with<const VNNI: bool>(
        w: &[u8],
        stride: usize,
        n_rows: usize,
        ys: &[&[BlockQ8K]],
        out: &mut [f32],
    ) {
        let n = ys.len();
        assert!(w.len() >= n_rows * stride && out.len() == n_rows * n);
        assert!(ys.iter().all(|y| y.len() * BLOCK_BYTES == stride));
        let wp = w.as_ptr();
        if n == 1 {
            let y = ys[0];
            let mut r = 0;
            while r + MV_ROWS <= n_rows {
                let mut o = [[0.0f32; 1]; MV_ROWS];
                tile::<MV_ROWS, 1, VNNI>(wp.add(r * stride), stride, [y], &mut o);
                for k in 0..MV_ROWS {
                    out[r + k] = o[k][0];
                }
                r += MV_ROWS;
            }
            while r < n_rows {
                let mut o = [[0.0f32; 1]; 1];
                tile::<1, 1, VNNI>(wp.add(r * stride), stride, [y], &mut o);
                out[r] = o[0][0];
                r += 1;
            }
            return;
        }
        gemm_rows::<Gemm<VNNI>>(wp, stride, n_rows, ys, out);
    }
}

/// The GEMM with 512-bit vectors (AVX-512 F/BW/VL/VNNI): two weight rows per vector (lanes
/// 0..8 row r, 8..16 row r + 1, each exactly the 8 lanes of ggml's AVX2 loop) × up to 4
/// activation rows per register tile; per sub-block pair one `vpmaddubsw` and one
/// `vpdpwssd` per sub-block, row pair and activation row, on the activation's quants
/// broadcast to both halves. The mins part is the AVX2 tile's (4 (row, activation) sums at
/// a time, then the FMA of each), so every integer and float step, and the bits, are the
/// same.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::q4_k::avx2::scales_mins_gpr;
    use super::super::q8::BlockQ8K;
    use super::super::row_kernels::simd::{dpwssd512, hsum_halves, join256, splat_halves};
    use super::avx2::{d_dmin, hsum4_i32};
    use super::{BLOCK_BYTES, QH, QS};
    use std::arch::x86_64::*;

    /// Activation rows per register tile (2·A (row, activation) pairs: A ≤ 4 keeps the
    /// mins sums in 2 vectors of 4).
    const A: usize = 4;
    /// Row pairs per block of the GEMM: their weights stay in L2 while every activation
    /// tile passes over them.
    const PB: usize = 16;

    /// Bit `BIT` of every byte of `h` moved to bit 4 (other bits garbage).
    #[inline(always)]
    unsafe fn bit_to_4<const BIT: usize>(h: __m512i) -> __m512i {
        // A 16-bit shift by ≤ 4 keeps each byte's bit 4 within its own byte.
        match BIT {
            0 => _mm512_slli_epi16::<4>(h),
            1 => _mm512_slli_epi16::<3>(h),
            2 => _mm512_slli_epi16::<2>(h),
            3 => _mm512_slli_epi16::<1>(h),
            4 => h,
            5 => _mm512_srli_epi16::<1>(h),
            6 => _mm512_srli_epi16::<2>(h),
            _ => _mm512_srli_epi16::<3>(h),
        }
    }

    /// `out[r * ys.len() + a]` = row r · ys[a] for `n_rows` rows `stride` bytes apart.
    ///
    /// SAFETY: AVX-512 F/BW/VL/VNNI and AVX2/FMA/F16C available; `w` holds `n_rows` rows of
    /// `stride` bytes (whole blocks); every `ys[a]` has `stride / BLOCK_BYTES` blocks; `out`
    /// has `n_rows · ys.len()` values.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn rows_x_acts(
        w: &[u8],
        stride: usize,
        n_rows: usize,
        ys: &[&[BlockQ8K]],
        out: &mut [f32],
    ) {
        let n = ys.len();
        let nb = stride / BLOCK_BYTES;
        assert!(w.len() >= n_rows * stride && out.len() == n_rows * n);
        assert!(ys.iter().all(|y| y.len() == nb));
        let pairs = n_rows / 2;
        for p0 in (0..pairs).step_by(PB) {
            let mut a = 0;
            while a < n {
                let at = (n - a).min(A);
                for p in p0..(p0 + PB).min(pairs) {
                    let wp = w.as_ptr().add(2 * p * stride);
                    let o = &mut out[2 * p * n + a..];
                    let t = (wp, stride, nb, &ys[a..], n);
                    match at {
                        1 => tile::<1>(t, o),
                        2 => tile::<2>(t, o),
                        3 => tile::<3>(t, o),
                        _ => tile::<A>(t, o),
                    }
                }
                a += at;
            }
        }
        if n_rows % 2 == 1 {
            let r = n_rows - 1;
            super::avx2::rows_x_acts_vnni(&w[r * stride..], stride, 1, ys, &mut out[r * n..]);
        }
    }

    /// Rows r, r + 1 (at `wp`, `stride` apart) × activation rows `ys[0..AT]`: writes
    /// `out[k · n + a]` for k = 0, 1.
    #[inline(always)]
    #[allow(clippy::needless_range_loop, clippy::type_complexity)]
    unsafe fn tile<const AT: usize>(
        (wp, stride, nb, ys, n): (*const u8, usize, usize, &[&[BlockQ8K]], usize),
        out: &mut [f32],
    ) {
        let m4 = _mm512_set1_epi8(0x0F);
        let m10 = _mm512_set1_epi8(0x10);
        // Byte pairs (8+t, 8+t): each min twice, beside the two bsums of its sub-block.
        let mdup = _mm_setr_epi8(8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15);
        let mut acc = [_mm512_setzero_ps(); AT];
        // Lane k = r·AT + a of summs[k / 4]: summs of (row r, activation row a).
        let mut summs = [_mm_setzero_ps(); 2];
        for b in 0..nb {
            let p = [wp.add(b * BLOCK_BYTES), wp.add(stride + b * BLOCK_BYTES)];
            let yb: [&BlockQ8K; AT] = std::array::from_fn(|a| ys[a].get_unchecked(b));
            let mut mprod = [_mm256_setzero_si256(); 8];
            let mut dmin = [0.0f32; 8];
            let mut d = [[0.0f32; AT]; 2];
            let mut sc = [_mm256_setzero_si256(); 2];
            for r in 0..2 {
                let (xd, xmin) = d_dmin(p[r]);
                let sm = scales_mins_gpr(p[r]);
                let mins = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(sm, mdup));
                for a in 0..AT {
                    let bs = _mm256_loadu_si256(yb[a].bsums.as_ptr() as *const __m256i);
                    mprod[r * AT + a] = _mm256_madd_epi16(mins, bs);
                    dmin[r * AT + a] = -yb[a].d * xmin;
                    d[r][a] = yb[a].d * xd;
                }
                let s16 = _mm256_cvtepu8_epi16(sm);
                sc[r] = _mm256_permute2x128_si256::<0x00>(s16, s16);
            }
            for h in 0..(2 * AT).div_ceil(4) {
                let v = [
                    mprod[4 * h],
                    mprod[4 * h + 1],
                    mprod[4 * h + 2],
                    mprod[4 * h + 3],
                ];
                let isum = _mm_cvtepi32_ps(hsum4_i32(&v));
                let dm = _mm_loadu_ps(dmin.as_ptr().add(4 * h));
                summs[h] = _mm_fmadd_ps(dm, isum, summs[h]);
            }
            let scales = join256(sc[0], sc[1]);
            let hbits = join256(
                _mm256_loadu_si256(p[0].add(QH) as *const __m256i),
                _mm256_loadu_si256(p[1].add(QH) as *const __m256i),
            );
            let mut sumi = [_mm512_setzero_si512(); AT];
            macro_rules! pair {
                ($j:literal, $b0:literal, $b1:literal) => {{
                    let q = join256(
                        _mm256_loadu_si256(p[0].add(QS + 32 * $j) as *const __m256i),
                        _mm256_loadu_si256(p[1].add(QS + 32 * $j) as *const __m256i),
                    );
                    let q0 = _mm512_or_si512(
                        _mm512_and_si512(q, m4),
                        _mm512_and_si512(bit_to_4::<$b0>(hbits), m10),
                    );
                    let q1 = _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(q), m4),
                        _mm512_and_si512(bit_to_4::<$b1>(hbits), m10),
                    );
                    // Scale s (i16 lane s of each 128-bit lane) to every i16 lane.
                    let s0 = _mm512_shuffle_epi8(
                        scales,
                        _mm512_set1_epi16((2 * $b0 + 1) << 8 | 2 * $b0),
                    );
                    let s1 = _mm512_shuffle_epi8(
                        scales,
                        _mm512_set1_epi16((2 * $b1 + 1) << 8 | 2 * $b1),
                    );
                    for a in 0..AT {
                        let y = yb[a].qs.as_ptr().add(64 * $j) as *const __m256i;
                        let y0 = _mm512_broadcast_i64x4(_mm256_loadu_si256(y));
                        let y1 = _mm512_broadcast_i64x4(_mm256_loadu_si256(y.add(1)));
                        sumi[a] = dpwssd512(sumi[a], _mm512_maddubs_epi16(q0, y0), s0);
                        sumi[a] = dpwssd512(sumi[a], _mm512_maddubs_epi16(q1, y1), s1);
                    }
                }};
            }
            pair!(0, 0, 1);
            pair!(1, 2, 3);
            pair!(2, 4, 5);
            pair!(3, 6, 7);
            for a in 0..AT {
                let dv = splat_halves(d[0][a], d[1][a]);
                acc[a] = _mm512_fmadd_ps(dv, _mm512_cvtepi32_ps(sumi[a]), acc[a]);
            }
        }
        let mut sm = [0.0f32; 8];
        _mm_storeu_ps(sm.as_mut_ptr(), summs[0]);
        _mm_storeu_ps(sm.as_mut_ptr().add(4), summs[1]);
        for a in 0..AT {
            let (lo, hi) = hsum_halves(acc[a]);
            out[a] = lo + sm[a];
            out[n + a] = hi + sm[AT + a];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::row_tests as t;
    use super::super::QType;
    use super::Q5K;
    use candle_core::quantized::GgmlDType;

    const G: GgmlDType = GgmlDType::Q5K;

    #[test]
    fn dequantize_matches_candle() {
        t::dequantize_matches_candle::<Q5K>(G);
    }

    #[test]
    fn avx2_matches_scalar() {
        t::avx2_matches_scalar::<Q5K>(G, &[256, 512, 768, 1280]);
    }

    #[test]
    fn avx2_matches_scalar_across_row_blocks() {
        t::avx2_matches_scalar_rows::<Q5K>(G, 400, 256, &[1, 2, 6, 9]);
    }

    #[test]
    fn matmul_matches_f32_and_candle() {
        t::matmul_matches_f32_and_candle::<Q5K>(QType::Q5K, G, &[256, 1024, 2816]);
    }

    #[test]
    fn threads_do_not_change_bits() {
        t::threads_do_not_change_bits(QType::Q5K, G, 1024);
    }

    #[test]
    #[ignore = "timing; run with --release --ignored --nocapture"]
    fn bench_q5k() {
        t::bench(QType::Q5K, G);
    }
}
