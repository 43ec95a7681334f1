//! Q6_K weights × Q8_K activations, in llama.cpp's exact float order.
//!
//! GGUF Q6_K super-block (210 bytes, 256 weights): `ql: [u8; 128]` (low 4 bits),
//! `qh: [u8; 64]` (high 2 bits), `scales: [i8; 16]` (one per 16 weights), `d: f16`;
//! `w = d·sc·(q − 32)` with `q` in 0..64. In each half of 128 weights, chunk `c` (32
//! weights) takes its low bits from `ql[64h + 32(c&1) ..]` (low nibble for c < 2, high for
//! c ≥ 2) and its high bits from bits `2c..2c+2` of `qh[32h ..]`.
//!
//! `ggml_vec_dot_q6_K_q8_K` (ggml-cpu/arch/x86/quants.c, `__AVX2__` branch), per super-block:
//!
//! ```text
//!   d = y.d · f32(x.d)
//!   sumi[t] = Σ_{h<2, c<4} sc[8h + 2c + (t ≥ 4)] · Σ_{k<4} q[128h + 32c + 4t + k] · y.qs[same]
//!           − 32 · (sc[2t]·bsum[2t] + sc[2t+1]·bsum[2t+1])              (exact integers)
//!   acc[t] = fma(d, f32(sumi[t]), acc[t])                                  t in 0..8
//! result = hsum8(acc)
//! ```

use super::f16_bits_to_f32;
use super::hsum8;
use super::q8::{self, BlockQ8K, QK_K};
use super::row_kernels::RowFormat;

pub const BLOCK_BYTES: usize = 210;

/// The Q6_K row format.
pub struct Q6K;

/// The 256 six-bit quants (0..64) of a super-block, in weight order.
#[inline(always)]
fn quants(b: &[u8]) -> [u8; QK_K] {
    let (ql, qh) = (&b[..128], &b[128..192]);
    let mut q = [0u8; QK_K];
    for h in 0..2 {
        for l in 0..32 {
            let (lo0, lo1, hi) = (ql[64 * h + l], ql[64 * h + 32 + l], qh[32 * h + l]);
            q[128 * h + l] = (lo0 & 0xF) | ((hi & 3) << 4);
            q[128 * h + 32 + l] = (lo1 & 0xF) | (((hi >> 2) & 3) << 4);
            q[128 * h + 64 + l] = (lo0 >> 4) | (((hi >> 4) & 3) << 4);
            q[128 * h + 96 + l] = (lo1 >> 4) | (((hi >> 6) & 3) << 4);
        }
    }
    q
}

#[inline(always)]
fn scale_d(b: &[u8]) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([b[208], b[209]]))
}

impl RowFormat for Q6K {
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
            let d = scale_d(b);
            let q = quants(b);
            for (e, (o, &q)) in o.iter_mut().zip(&q).enumerate() {
                let sc = b[192 + e / 16] as i8;
                *o = d * sc as f32 * (q as i32 - 32) as f32;
            }
        }
    }

    fn dot_scalar(w: &[u8], y: &[BlockQ8K]) -> f32 {
        debug_assert_eq!(w.len(), y.len() * BLOCK_BYTES);
        let mut acc = [0.0f32; 8];
        for (b, yb) in w.chunks_exact(BLOCK_BYTES).zip(y) {
            let d = yb.d * scale_d(b);
            let q = quants(b);
            let sc = |i: usize| b[192 + i] as i8 as i32;
            for (t, a) in acc.iter_mut().enumerate() {
                let mut sumi = 0i32;
                for h in 0..2 {
                    for c in 0..4 {
                        let base = 128 * h + 32 * c + 4 * t;
                        let p: i32 = (0..4)
                            .map(|k| q[base + k] as i32 * yb.qs[base + k] as i32)
                            .sum();
                        sumi += sc(8 * h + 2 * c + usize::from(t >= 4)) * p;
                    }
                }
                sumi -= 32
                    * (sc(2 * t) * yb.bsums[2 * t] as i32
                        + sc(2 * t + 1) * yb.bsums[2 * t + 1] as i32);
                *a = d.mul_add(sumi as f32, *a);
            }
        }
        hsum8(&acc)
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

    /// Dot products of one weight row with `AR` activation rows.
    #[inline(always)]
    unsafe fn row_x_acts<const AR: usize>(w: *const u8, ys: [&[BlockQ8K]; AR]) -> [f32; AR] {
        let nb = ys[0].len();
        let m3 = _mm256_set1_epi8(3);
        let m15 = _mm256_set1_epi8(15);
        let mut acc = [_mm256_setzero_ps(); AR];
        for i in 0..nb {
            let b = w.add(i * BLOCK_BYTES);
            let xd = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                (b.add(208) as *const u16).read_unaligned() as i32,
            )));
            let scales = _mm_loadu_si128(b.add(192) as *const __m128i);
            let scales_16 = _mm256_cvtepi8_epi16(scales);
            let mut sumi = [_mm256_setzero_si256(); AR];
            for h in 0..2 {
                let ql = b.add(64 * h);
                let q4bits1 = _mm256_loadu_si256(ql as *const __m256i);
                let q4bits2 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                let qhb = _mm256_loadu_si256(b.add(128 + 32 * h) as *const __m256i);
                let h0 = _mm256_slli_epi16(_mm256_and_si256(qhb, m3), 4);
                let h1 = _mm256_slli_epi16(_mm256_and_si256(qhb, _mm256_set1_epi8(12)), 2);
                let h2 = _mm256_and_si256(qhb, _mm256_set1_epi8(48));
                let h3 = _mm256_srli_epi16(_mm256_and_si256(qhb, _mm256_set1_epi8(-64)), 2);
                let q = [
                    _mm256_or_si256(_mm256_and_si256(q4bits1, m15), h0),
                    _mm256_or_si256(_mm256_and_si256(q4bits2, m15), h1),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits1, 4), m15), h2),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits2, 4), m15), h3),
                ];
                // Chunk c's two scales, each in 8 i16 lanes.
                let mut sc = [_mm256_setzero_si256(); 4];
                for (c, s) in sc.iter_mut().enumerate() {
                    let is = (4 * h + c) as i8;
                    let shuf = _mm_setr_epi8(
                        2 * is,
                        2 * is,
                        2 * is,
                        2 * is,
                        2 * is,
                        2 * is,
                        2 * is,
                        2 * is,
                        2 * is + 1,
                        2 * is + 1,
                        2 * is + 1,
                        2 * is + 1,
                        2 * is + 1,
                        2 * is + 1,
                        2 * is + 1,
                        2 * is + 1,
                    );
                    *s = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, shuf));
                }
                for a in 0..AR {
                    let q8 = ys[a].get_unchecked(i).qs.as_ptr().add(128 * h);
                    let mut s = sumi[a];
                    let mut p = [_mm256_setzero_si256(); 4];
                    for c in 0..4 {
                        let q8c = _mm256_loadu_si256(q8.add(32 * c) as *const __m256i);
                        p[c] = _mm256_madd_epi16(sc[c], _mm256_maddubs_epi16(q[c], q8c));
                    }
                    s = _mm256_add_epi32(s, _mm256_add_epi32(p[0], p[1]));
                    s = _mm256_add_epi32(s, _mm256_add_epi32(p[2], p[3]));
                    sumi[a] = s;
                }
            }
            for a in 0..AR {
                let yb = ys[a].get_unchecked(i);
                let q8sums = _mm256_loadu_si256(yb.bsums.as_ptr() as *const __m256i);
                let sub = _mm256_slli_epi32(_mm256_madd_epi16(q8sums, scales_16), 5);
                let s = _mm256_sub_epi32(sumi[a], sub);
                let d = _mm256_set1_ps(yb.d * xd);
                acc[a] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc[a]);
            }
        }
        let mut out = [0.0f32; AR];
        for a in 0..AR {
            out[a] = hsum(acc[a]);
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
        debug_assert!(w.len() >= n_rows * stride);
        debug_assert_eq!(out.len(), n_rows * n);
        let wp = w.as_ptr();
        for r in 0..n_rows {
            let wr = wp.add(r * stride);
            let orow = &mut out[r * n..(r + 1) * n];
            let mut a = 0;
            while a + 4 <= n {
                let o = row_x_acts::<4>(wr, [ys[a], ys[a + 1], ys[a + 2], ys[a + 3]]);
                orow[a..a + 4].copy_from_slice(&o);
                a += 4;
            }
            while a < n {
                orow[a] = row_x_acts::<1>(wr, [ys[a]])[0];
                a += 1;
            }
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

    fn q6k_bytes(rows: usize, cols: usize, seed: u64) -> (Vec<u8>, QTensor) {
        let w = Tensor::from_vec(random(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q6K).unwrap();
        (q.data().unwrap().to_vec(), q)
    }

    #[test]
    fn dequantize_equals_candle() {
        let (bytes, q) = q6k_bytes(3, 512, 1);
        let want: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut got = vec![0.0f32; 3 * 512];
        Q6K::dequantize_row(&bytes, &mut got);
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
            let (w, _) = q6k_bytes(rows, cols, rows as u64 * 7 + n as u64);
            let x = random(n * cols, 99 + n as u64);
            let mut acts = vec![BlockQ8K::ZERO; n * k];
            for (o, xr) in acts.chunks_mut(k).zip(x.chunks(cols)) {
                q8::quantize_row_q8_k(xr, o);
            }
            let ys: Vec<&[BlockQ8K]> = acts.chunks(k).collect();
            let stride = k * BLOCK_BYTES;
            let mut want = vec![0.0; rows * n];
            rows_x_acts_scalar::<Q6K>(&w, stride, rows, &ys, &mut want);
            let mut got = vec![0.0; rows * n];
            // SAFETY: AVX2 checked above; shapes as documented.
            assert!(unsafe { Q6K::rows_x_acts_avx2(&w, stride, rows, &ys, &mut got) });
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "rows {rows} cols {cols} n {n}"
            );
        }
    }
}
