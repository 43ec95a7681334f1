//! Q4_K weights × Q8_K activations, in llama.cpp's exact float order.
//!
//! GGUF Q4_K super-block (144 bytes, 256 weights): `d: f16, dmin: f16, scales: [u8; 12],
//! qs: [u8; 128]`. The 12 bytes pack 8 six-bit scales `sc` and 8 six-bit mins `m`, one
//! pair per sub-block of 32; `w = d·sc_s·q − dmin·m_s` with `q` a nibble: the 32 bytes
//! `qs[32j..32j+32]` hold sub-block `2j` in their low nibbles and `2j+1` in their high ones.
//!
//! `ggml_vec_dot_q4_K_q8_K` (ggml-cpu/arch/x86/quants.c, `__AVX2__` branch), per super-block:
//!
//! ```text
//!   d    = y.d · f32(x.d);   dmin = -y.d · f32(x.dmin)            // f32 products
//!   sumi[t] = Σ_j  sc[2j]  ·Σ_{k<4} lo(qs[32j+4t+k]) · y.qs[64j+4t+k]          (exact
//!             +    sc[2j+1]·Σ_{k<4} hi(qs[32j+4t+k]) · y.qs[64j+32+4t+k]        integers,
//!   acc[t]  = fma(d, f32(sumi[t]), acc[t])                    t in 0..8         j in 0..4)
//!   mins[l] = m[2l]·(bsum[4l]+bsum[4l+1]) + m[2l+1]·(bsum[4l+2]+bsum[4l+3])    (exact)
//!   acc_m[l] = fma(dmin, f32(mins[l]), acc_m[l])              l in 0..4
//! result = hsum8(acc) + ((acc_m0+acc_m2) + (acc_m1+acc_m3))
//! ```
//!
//! llama.cpp may instead repack Q4_K matrices for its own GEMM (`repack.cpp`), which sums
//! in another order; the per-element order above is what its `mul_mat` computes without it.

use super::f16_bits_to_f32;
use super::hsum8;
use super::q8::{self, BlockQ8K, QK_K};
use super::row_kernels::RowFormat;

pub const BLOCK_BYTES: usize = 144;

/// The Q4_K row format.
pub struct Q4K;

/// Scale and min of sub-block `j` from the 12 packed bytes (ggml's `get_scale_min_k4`).
#[inline(always)]
fn scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The 8 scales then the 8 mins of a super-block.
#[inline(always)]
fn scales_mins(q: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for j in 0..8 {
        let (s, m) = scale_min(j, q);
        out[j] = s;
        out[8 + j] = m;
    }
    out
}

impl RowFormat for Q4K {
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
            let d = f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
            let min = f16_bits_to_f32(u16::from_le_bytes([b[2], b[3]]));
            let (scales, qs) = (&b[4..16], &b[16..]);
            for j in 0..4 {
                let (s1, m1) = scale_min(2 * j, scales);
                let (s2, m2) = scale_min(2 * j + 1, scales);
                let (d1, m1) = (d * s1 as f32, min * m1 as f32);
                let (d2, m2) = (d * s2 as f32, min * m2 as f32);
                for l in 0..32 {
                    let q = qs[32 * j + l];
                    o[64 * j + l] = d1 * (q & 0xF) as f32 - m1;
                    o[64 * j + 32 + l] = d2 * (q >> 4) as f32 - m2;
                }
            }
        }
    }

    fn dot_scalar(w: &[u8], y: &[BlockQ8K]) -> f32 {
        debug_assert_eq!(w.len(), y.len() * BLOCK_BYTES);
        let mut acc = [0.0f32; 8];
        let mut acc_m = [0.0f32; 4];
        for (b, yb) in w.chunks_exact(BLOCK_BYTES).zip(y) {
            let d = yb.d * f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
            let dmin = -yb.d * f16_bits_to_f32(u16::from_le_bytes([b[2], b[3]]));
            let sm = scales_mins(&b[4..16]);
            let qs = &b[16..];
            for (l, a) in acc_m.iter_mut().enumerate() {
                let s0 = yb.bsums[4 * l] as i32 + yb.bsums[4 * l + 1] as i32;
                let s1 = yb.bsums[4 * l + 2] as i32 + yb.bsums[4 * l + 3] as i32;
                let mins = sm[8 + 2 * l] as i32 * s0 + sm[8 + 2 * l + 1] as i32 * s1;
                *a = dmin.mul_add(mins as f32, *a);
            }
            for (t, a) in acc.iter_mut().enumerate() {
                let mut sumi = 0i32;
                for j in 0..4 {
                    let (mut lo, mut hi) = (0i32, 0i32);
                    for k in 0..4 {
                        let q = qs[32 * j + 4 * t + k];
                        lo += (q & 0xF) as i32 * yb.qs[64 * j + 4 * t + k] as i32;
                        hi += (q >> 4) as i32 * yb.qs[64 * j + 32 + 4 * t + k] as i32;
                    }
                    sumi += sm[2 * j] as i32 * lo + sm[2 * j + 1] as i32 * hi;
                }
                *a = d.mul_add(sumi as f32, *a);
            }
        }
        hsum8(&acc) + ((acc_m[0] + acc_m[2]) + (acc_m[1] + acc_m[3]))
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
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::q8::BlockQ8K;
    use super::super::q8_0::avx2::hsum;
    use super::BLOCK_BYTES;
    use std::arch::x86_64::*;

    /// The 8 scales then the 8 mins of the super-block at `b` as 16 bytes (the vector form
    /// of `scales_mins`). Reads `b[4..20]`, inside the block.
    #[inline(always)]
    pub(super) unsafe fn scales_mins(b: *const u8) -> __m128i {
        let v = _mm_loadu_si128(b.add(4) as *const __m128i);
        // Bytes 0..4: sc0..3 = q[0..4] & 63; 4..8: sc4..7 = q[8..12] & 15 | q[0..4] >> 6 << 4;
        // 8..12: m0..3 = q[4..8] & 63; 12..16: m4..7 = q[8..12] >> 4 | q[4..8] >> 6 << 4.
        let a = _mm_shuffle_epi8(v, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11));
        let h = _mm_shuffle_epi8(
            v,
            _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7),
        );
        let lo = _mm_and_si128(
            a,
            _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0),
        );
        let hi = _mm_and_si128(
            _mm_srli_epi16(a, 4),
            _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 15, 15, 15),
        );
        // (x >> 6) << 4 == (x >> 2) & 0x30; the 16-bit shift brings nothing into bits 4, 5.
        let top = _mm_and_si128(_mm_srli_epi16(h, 2), _mm_set1_epi8(0x30));
        _mm_or_si128(_mm_or_si128(lo, hi), top)
    }

    /// `pshufb` controls that spread scale `s` (a byte of the scales vector, both lanes) to
    /// every i16 of a 256-bit vector, zero-extended.
    #[inline(always)]
    unsafe fn scale_ctrl(s: i8) -> __m256i {
        _mm256_set1_epi16(((0x80u16 << 8) | s as u16) as i16)
    }

    /// The two f16 scales of the block at `b` as f32: `[d, dmin, 0, 0]`.
    #[inline(always)]
    unsafe fn d_dmin(b: *const u8) -> __m128 {
        _mm_cvtph_ps(_mm_cvtsi32_si128((b as *const i32).read_unaligned()))
    }

    /// ggml's `acc_m` reduction: (m0 + m2) + (m1 + m3).
    #[inline(always)]
    unsafe fn hsum4(m: __m128) -> f32 {
        let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)))
    }

    /// `q8s[l] = bsums[2l] + bsums[2l+1]` (ggml's `_mm_hadd_epi16` of the two halves).
    #[inline(always)]
    unsafe fn q8sums(y: &BlockQ8K) -> __m128i {
        let s = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
        _mm_hadd_epi16(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1))
    }

    /// Σ_j sc[2j]·(lo nibbles · q8[64j..64j+32]) + sc[2j+1]·(hi nibbles · q8[64j+32..64j+64])
    /// per 32-bit lane, for one block's quants `q4` and scales `sc` (both 128-bit lanes).
    #[inline(always)]
    unsafe fn block_sumi(q4: *const u8, sc: __m256i, q8: *const i8) -> __m256i {
        let m4 = _mm256_set1_epi8(0xF);
        let mut sumi = _mm256_setzero_si256();
        for j in 0..4 {
            let sl = _mm256_shuffle_epi8(sc, scale_ctrl(2 * j as i8));
            let sh = _mm256_shuffle_epi8(sc, scale_ctrl(2 * j as i8 + 1));
            let bits = _mm256_loadu_si256(q4.add(32 * j) as *const __m256i);
            let q4l = _mm256_and_si256(bits, m4);
            let q4h = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
            let q8l = _mm256_loadu_si256(q8.add(64 * j) as *const __m256i);
            let q8h = _mm256_loadu_si256(q8.add(64 * j + 32) as *const __m256i);
            let pl = _mm256_madd_epi16(sl, _mm256_maddubs_epi16(q4l, q8l));
            let ph = _mm256_madd_epi16(sh, _mm256_maddubs_epi16(q4h, q8h));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
        }
        sumi
    }

    /// Mat-vec: `R` weight rows `stride` bytes apart times one activation row, sharing its
    /// loads; `q8s[i]` = `q8sums(&y[i])`.
    #[inline(always)]
    unsafe fn rows_x_act<const R: usize>(
        w: *const u8,
        stride: usize,
        y: &[BlockQ8K],
        q8s: &[__m128i],
    ) -> [f32; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        let mut acc_m = [_mm_setzero_ps(); R];
        for (i, yb) in y.iter().enumerate() {
            let yd = _mm_setr_ps(yb.d, -yb.d, 0.0, 0.0);
            let q8 = yb.qs.as_ptr();
            let q8s = *q8s.get_unchecked(i);
            for r in 0..R {
                let b = w.add(r * stride + i * BLOCK_BYTES);
                // [d, dmin] = [y.d · x.d, -y.d · x.dmin], as ggml's two f32 products.
                let dd = _mm_mul_ps(yd, d_dmin(b));
                let sm = scales_mins(b);
                let sc = _mm256_broadcastsi128_si256(sm);
                let mins = _mm_cvtepu8_epi16(_mm_srli_si128(sm, 8));
                let prod = _mm_madd_epi16(mins, q8s);
                acc_m[r] = _mm_fmadd_ps(
                    _mm_shuffle_ps(dd, dd, 0x55),
                    _mm_cvtepi32_ps(prod),
                    acc_m[r],
                );
                let sumi = block_sumi(b.add(16), sc, q8);
                acc[r] = _mm256_fmadd_ps(
                    _mm256_broadcastss_ps(dd),
                    _mm256_cvtepi32_ps(sumi),
                    acc[r],
                );
            }
        }
        let mut out = [0.0f32; R];
        for r in 0..R {
            out[r] = hsum(acc[r]) + hsum4(acc_m[r]);
        }
        out
    }

    /// Activation rows per GEMM tile.
    const TILE: usize = 8;

    /// The activation side of a GEMM tile, per block `i`: `yd[i]` the `TILE` rows' `d`,
    /// `nyd[i][p]` = `[-d_{2p} ×4, -d_{2p+1} ×4]` and `q8s[i][p]` = `[q8sums_{2p}, q8sums_{2p+1}]`
    /// (pairs of rows share one 256-bit mins product). Rows past the tile's end are zero.
    struct TileActs {
        yd: Vec<__m256>,
        nyd: Vec<[__m256; TILE / 2]>,
        q8s: Vec<[__m256i; TILE / 2]>,
    }

    impl TileActs {
        fn new(nb: usize) -> Self {
            // SAFETY (zeroed): plain vector types.
            unsafe {
                Self {
                    yd: vec![_mm256_setzero_ps(); nb],
                    nyd: vec![[_mm256_setzero_ps(); TILE / 2]; nb],
                    q8s: vec![[_mm256_setzero_si256(); TILE / 2]; nb],
                }
            }
        }

        #[inline(always)]
        unsafe fn fill(&mut self, ys: &[&[BlockQ8K]]) {
            let nb = self.yd.len();
            for i in 0..nb {
                let mut d = [0.0f32; TILE];
                let mut nd = [[0.0f32; 8]; TILE / 2];
                let mut s = [_mm_setzero_si128(); TILE];
                for (a, y) in ys.iter().enumerate() {
                    let b = y.get_unchecked(i);
                    d[a] = b.d;
                    nd[a / 2][4 * (a % 2)..4 * (a % 2) + 4].fill(-b.d);
                    s[a] = q8sums(b);
                }
                self.yd[i] = _mm256_loadu_ps(d.as_ptr());
                for p in 0..TILE / 2 {
                    self.nyd[i][p] = _mm256_loadu_ps(nd[p].as_ptr());
                    self.q8s[i][p] = _mm256_set_m128i(s[2 * p + 1], s[2 * p]);
                }
            }
        }
    }

    /// GEMM tile: one weight row times `A` activation rows (`A` ≤ `TILE`), each weight
    /// block unpacked once for the tile and kept in registers while the rows' quants
    /// stream past it.
    #[inline(always)]
    unsafe fn row_x_tile<const A: usize>(
        w: *const u8,
        ys: &[*const BlockQ8K; TILE],
        t: &TileActs,
    ) -> [f32; A] {
        let m4 = _mm256_set1_epi8(0xF);
        let mut acc = [_mm256_setzero_ps(); A];
        let mut acc_m = [_mm256_setzero_ps(); TILE / 2];
        let mut dv = [0.0f32; TILE];
        for i in 0..t.yd.len() {
            let b = w.add(i * BLOCK_BYTES);
            let x = d_dmin(b);
            let sm = scales_mins(b);
            let sc = _mm256_broadcastsi128_si256(sm);
            let q4 = b.add(16);
            let q8: [*const i8; A] = std::array::from_fn(|a| (*ys[a].add(i)).qs.as_ptr());
            let mut sumi = [_mm256_setzero_si256(); A];
            for j in 0..4 {
                // Sub-block 2j (low nibbles of qs[32j..32j+32]), then 2j+1 (high nibbles).
                let bits = _mm256_loadu_si256(q4.add(32 * j) as *const __m256i);
                let q4l = _mm256_and_si256(bits, m4);
                let sl = _mm256_shuffle_epi8(sc, scale_ctrl(2 * j as i8));
                for a in 0..A {
                    let y = _mm256_loadu_si256(q8[a].add(64 * j) as *const __m256i);
                    let p = _mm256_madd_epi16(sl, _mm256_maddubs_epi16(q4l, y));
                    sumi[a] = _mm256_add_epi32(sumi[a], p);
                }
                let q4h = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
                let sh = _mm256_shuffle_epi8(sc, scale_ctrl(2 * j as i8 + 1));
                for a in 0..A {
                    let y = _mm256_loadu_si256(q8[a].add(64 * j + 32) as *const __m256i);
                    let p = _mm256_madd_epi16(sh, _mm256_maddubs_epi16(q4h, y));
                    sumi[a] = _mm256_add_epi32(sumi[a], p);
                }
            }
            // d = y.d · x.d for the tile's rows at once; dmin = (−y.d) · x.dmin.
            _mm256_storeu_ps(
                dv.as_mut_ptr(),
                _mm256_mul_ps(*t.yd.get_unchecked(i), _mm256_broadcastss_ps(x)),
            );
            for a in 0..A {
                acc[a] = _mm256_fmadd_ps(
                    _mm256_broadcast_ss(&dv[a]),
                    _mm256_cvtepi32_ps(sumi[a]),
                    acc[a],
                );
            }
            let xmin = _mm256_broadcastss_ps(_mm_movehdup_ps(x));
            let mins = _mm256_cvtepu8_epi16(_mm_srli_si128(sm, 8));
            let mins = _mm256_permute2x128_si256(mins, mins, 0);
            let nyd = t.nyd.get_unchecked(i);
            let q8s = t.q8s.get_unchecked(i);
            for p in 0..A.div_ceil(2) {
                let prod = _mm256_madd_epi16(mins, q8s[p]);
                acc_m[p] = _mm256_fmadd_ps(
                    _mm256_mul_ps(nyd[p], xmin),
                    _mm256_cvtepi32_ps(prod),
                    acc_m[p],
                );
            }
        }
        let mut out = [0.0f32; A];
        for a in 0..A {
            let m = acc_m[a / 2];
            let m = if a % 2 == 0 {
                _mm256_castps256_ps128(m)
            } else {
                _mm256_extractf128_ps(m, 1)
            };
            out[a] = hsum(acc[a]) + hsum4(m);
        }
        out
    }

    /// `out[r * ys.len() + a]` = row r · ys[a] for `n_rows` rows `stride` bytes apart.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_x_acts(
        w: &[u8],
        stride: usize,
        n_rows: usize,
        ys: &[&[BlockQ8K]],
        out: &mut [f32],
    ) {
        let n = ys.len();
        let nb = stride / BLOCK_BYTES;
        debug_assert!(w.len() >= n_rows * stride);
        debug_assert_eq!(out.len(), n_rows * n);
        debug_assert!(ys.iter().all(|y| y.len() == nb));
        let wp = w.as_ptr();
        if n == 1 {
            let y = ys[0];
            let q8s: Vec<__m128i> = y.iter().map(|b| q8sums(b)).collect();
            const R: usize = 4;
            let mut r = 0;
            while r + R <= n_rows {
                let o = rows_x_act::<R>(wp.add(r * stride), stride, y, &q8s);
                out[r..r + R].copy_from_slice(&o);
                r += R;
            }
            while r < n_rows {
                out[r] = rows_x_act::<1>(wp.add(r * stride), stride, y, &q8s)[0];
                r += 1;
            }
            return;
        }
        let mut tile = TileActs::new(nb);
        let mut a0 = 0;
        while a0 < n {
            let t = TILE.min(n - a0);
            tile.fill(&ys[a0..a0 + t]);
            let p: [*const BlockQ8K; TILE] =
                std::array::from_fn(|a| ys[a0 + a.min(t - 1)].as_ptr());
            macro_rules! tile {
                ($a:literal) => {
                    for r in 0..n_rows {
                        let o = row_x_tile::<$a>(wp.add(r * stride), &p, &tile);
                        out[r * n + a0..r * n + a0 + $a].copy_from_slice(&o);
                    }
                };
            }
            match t {
                8 => tile!(8),
                7 => tile!(7),
                6 => tile!(6),
                5 => tile!(5),
                4 => tile!(4),
                3 => tile!(3),
                2 => tile!(2),
                _ => tile!(1),
            }
            a0 += t;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::row_kernels::rows_x_acts_scalar;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::XorShift::new(seed);
        (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect()
    }

    /// Q4_K bytes of a random rows × cols matrix, quantized by candle.
    fn q4k_bytes(rows: usize, cols: usize, seed: u64) -> (Vec<u8>, QTensor) {
        let w = Tensor::from_vec(random(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
        (q.data().unwrap().to_vec(), q)
    }

    #[test]
    fn dequantize_equals_candle() {
        let (bytes, q) = q4k_bytes(3, 512, 1);
        let want: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut got = vec![0.0f32; 3 * 512];
        Q4K::dequantize_row(&bytes, &mut got);
        assert_eq!(got, want);
    }

    #[test]
    fn avx2_equals_scalar_on_odd_shapes() {
        if !crate::quant::has_avx2() {
            return;
        }
        for (rows, k, n) in [
            (1, 1, 1),
            (3, 2, 2),
            (5, 3, 3),
            (13, 2, 5),
            (4, 4, 7),
            (2, 1, 9),
        ] {
            let cols = 256 * k;
            let (w, _) = q4k_bytes(rows, cols, rows as u64 * 7 + n as u64);
            let x = random(n * cols, 99 + n as u64);
            let mut acts = vec![BlockQ8K::ZERO; n * k];
            for (o, xr) in acts.chunks_mut(k).zip(x.chunks(cols)) {
                q8::quantize_row_q8_k(xr, o);
            }
            let ys: Vec<&[BlockQ8K]> = acts.chunks(k).collect();
            let stride = k * BLOCK_BYTES;
            let mut want = vec![0.0; rows * n];
            rows_x_acts_scalar::<Q4K>(&w, stride, rows, &ys, &mut want);
            let mut got = vec![0.0; rows * n];
            // SAFETY: AVX2 checked above; shapes as documented.
            assert!(unsafe { Q4K::rows_x_acts_avx2(&w, stride, rows, &ys, &mut got) });
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "rows {rows} cols {cols} n {n}"
            );
        }
    }

    #[test]
    fn matmul_is_close_to_f32_math_and_candle() {
        let (rows, cols, n) = (37, 1024, 3);
        let (bytes, q) = q4k_bytes(rows, cols, 5);
        let m =
            crate::quant::QMatrix::new(crate::quant::QType::Q4K, rows, cols, bytes.into()).unwrap();
        let x = random(n * cols, 6);
        let got = crate::quant::matmul(&m, &x, n).unwrap();
        let single = crate::quant::matmul_with(
            &m,
            &x,
            n,
            &crate::quant::MatmulOptions {
                single_thread: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(got, single, "threads change bits");
        // f32 math on the dequantized weights and the dequantized Q8_K activations.
        let mut wd = vec![0.0f32; rows * cols];
        for r in 0..rows {
            m.dequantize_row(r, &mut wd[r * cols..(r + 1) * cols]);
        }
        let xt = Tensor::from_vec(x.clone(), (n, cols), &Device::Cpu).unwrap();
        let candle: Vec<f32> = xt
            .apply_op1_no_bwd(&q)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for a in 0..n {
            let mut acts = vec![BlockQ8K::ZERO; cols / QK_K];
            q8::quantize_row_q8_k(&x[a * cols..(a + 1) * cols], &mut acts);
            for r in 0..rows {
                let mut exact = 0.0f64;
                for (bi, yb) in acts.iter().enumerate() {
                    for e in 0..QK_K {
                        let c = bi * QK_K + e;
                        exact += wd[r * cols + c] as f64 * (yb.d * yb.qs[e] as f32) as f64;
                    }
                }
                let g = got[a * rows + r] as f64;
                assert!(
                    (g - exact).abs() < 1e-4 * (1.0 + exact.abs()),
                    "{g} vs {exact}"
                );
                let c = candle[a * rows + r] as f64;
                assert!((g - c).abs() < 2e-3 * (1.0 + c.abs()), "{g} vs candle {c}");
            }
        }
    }
    /// Single-thread speed of the Q4_K kernels next to candle's QMatMul on the same
    /// tensor: a 4096×4096 mat-vec (weight GB/s) and 64- and 512-row GEMMs (GFLOP/s).
    /// Asserts nothing about time; other agents share the CPU (see /proc/pressure/cpu).
    /// `RAYON_NUM_THREADS=1 cargo test -p lwm-core --release --lib quant::q4_k::tests::bench_q4k
    /// -- --ignored --nocapture` (the variable keeps candle on one thread too).
    #[test]
    #[ignore]
    fn bench_q4k() {
        use std::time::Instant;
        // This process's CPU time in seconds (clock_gettime(CLOCK_PROCESS_CPUTIME_ID)):
        // robust to other agents taking the core.
        extern "C" {
            fn clock_gettime(clock: i32, ts: *mut [i64; 2]) -> i32;
        }
        let cpu = || -> f64 {
            let mut ts = [0i64; 2];
            // SAFETY: a valid clock id and a timespec-sized buffer (two i64 on x86_64 Linux).
            unsafe { clock_gettime(2, &mut ts) };
            ts[0] as f64 + ts[1] as f64 * 1e-9
        };
        // Best wall-clock and best CPU time over the repetitions.
        let best = |reps: usize, f: &mut dyn FnMut()| {
            let (mut wall, mut cput) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..reps {
                let (t, c) = (Instant::now(), cpu());
                f();
                cput = cput.min(cpu() - c);
                wall = wall.min(t.elapsed().as_secs_f64());
            }
            (wall, cput)
        };
        let shape = std::env::var("Q4K_BENCH_SHAPE").unwrap_or_default();
        let mut dims = shape.split('x').filter_map(|v| v.parse::<usize>().ok());
        let (rows, cols) = (dims.next().unwrap_or(4096), dims.next().unwrap_or(4096));
        let (bytes, q) = q4k_bytes(rows, cols, 11);
        let wbytes = bytes.len();
        let m =
            crate::quant::QMatrix::new(crate::quant::QType::Q4K, rows, cols, bytes.into()).unwrap();
        let qmm = candle_core::quantized::QMatMul::from_qtensor(q).unwrap();
        let single = crate::quant::MatmulOptions {
            single_thread: true,
            ..Default::default()
        };
        eprintln!(
            "candle threads {}; /proc/pressure/cpu: {}",
            candle_core::utils::get_num_threads(),
            std::fs::read_to_string("/proc/pressure/cpu")
                .unwrap_or_default()
                .lines()
                .next()
                .unwrap_or("")
        );
        for n in [1usize, 64, 512] {
            let x = random(n * cols, 12);
            let xt = Tensor::from_slice(&x, (n, cols), &Device::Cpu).unwrap();
            let reps = match n {
                1 => 200,
                64 => 10,
                _ => 4,
            };
            let flop = 2.0 * (rows * cols * n) as f64;
            let report = |what: &str, (t, c): (f64, f64)| {
                eprintln!(
                    "q4_k {rows}x{cols} n={n:3} {what:7} {:8.3} ms {:7.1} GFLOP/s {:6.2} GB/s \
                     (weights) | CPU time {:8.3} ms {:7.1} GFLOP/s {:6.2} GB/s",
                    t * 1e3,
                    flop / t / 1e9,
                    wbytes as f64 / t / 1e9,
                    c * 1e3,
                    flop / c / 1e9,
                    wbytes as f64 / c / 1e9
                );
            };
            let t = best(reps, &mut || {
                std::hint::black_box(crate::quant::matmul_with(&m, &x, n, &single).unwrap());
            });
            report("lwm", t);
            let mut acts = vec![BlockQ8K::ZERO; n * cols / QK_K];
            let t = best(reps, &mut || {
                for (o, xr) in acts.chunks_mut(cols / QK_K).zip(x.chunks(cols)) {
                    q8::quantize_row_q8_k(xr, o);
                }
                std::hint::black_box(&acts);
            });
            report("(acts)", t);
            let t = best(reps, &mut || {
                std::hint::black_box(crate::quant::matmul(&m, &x, n).unwrap());
            });
            report("lwm mt", t);
            let t = best(reps, &mut || {
                use candle_core::Module;
                std::hint::black_box(qmm.forward(&xt).unwrap());
            });
            report("candle", t);
        }
    }
}
