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
    use super::{scales_mins, BLOCK_BYTES};
    use std::arch::x86_64::*;

    /// Dot products of one weight row with `AR` activation rows.
    #[inline(always)]
    unsafe fn row_x_acts<const AR: usize>(w: *const u8, ys: [&[BlockQ8K]; AR]) -> [f32; AR] {
        let nb = ys[0].len();
        let m4 = _mm256_set1_epi8(0xF);
        let mut acc = [_mm256_setzero_ps(); AR];
        let mut acc_m = [_mm_setzero_ps(); AR];
        for i in 0..nb {
            let b = w.add(i * BLOCK_BYTES);
            let xd = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                (b as *const u16).read_unaligned() as i32,
            )));
            let xmin = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                (b.add(2) as *const u16).read_unaligned() as i32,
            )));
            let sm = scales_mins(std::slice::from_raw_parts(b.add(4), 12));
            let sm16 = _mm256_cvtepu8_epi16(_mm_loadu_si128(sm.as_ptr() as *const __m128i));
            let mins = _mm256_extracti128_si256(sm16, 1);
            let mut sumi = [_mm256_setzero_si256(); AR];
            let q4 = b.add(16);
            for j in 0..4 {
                // Sub-block 2j's scale (low nibbles) and 2j+1's (high), in every i16.
                let scale_l = _mm256_set1_epi16(sm[2 * j] as i16);
                let scale_h = _mm256_set1_epi16(sm[2 * j + 1] as i16);
                let q4bits = _mm256_loadu_si256(q4.add(32 * j) as *const __m256i);
                let q4l = _mm256_and_si256(q4bits, m4);
                let q4h = _mm256_and_si256(_mm256_srli_epi16(q4bits, 4), m4);
                for a in 0..AR {
                    let q8 = ys[a].get_unchecked(i).qs.as_ptr().add(64 * j);
                    let q8l = _mm256_loadu_si256(q8 as *const __m256i);
                    let q8h = _mm256_loadu_si256(q8.add(32) as *const __m256i);
                    let pl = _mm256_madd_epi16(scale_l, _mm256_maddubs_epi16(q4l, q8l));
                    let ph = _mm256_madd_epi16(scale_h, _mm256_maddubs_epi16(q4h, q8h));
                    sumi[a] = _mm256_add_epi32(sumi[a], _mm256_add_epi32(pl, ph));
                }
            }
            for a in 0..AR {
                let yb = ys[a].get_unchecked(i);
                let d = yb.d * xd;
                let dmin = -yb.d * xmin;
                let q8sums = _mm256_loadu_si256(yb.bsums.as_ptr() as *const __m256i);
                let q8s = _mm_hadd_epi16(
                    _mm256_castsi256_si128(q8sums),
                    _mm256_extracti128_si256(q8sums, 1),
                );
                let prod = _mm_madd_epi16(mins, q8s);
                acc_m[a] = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m[a]);
                acc[a] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[a]), acc[a]);
            }
        }
        let mut out = [0.0f32; AR];
        for a in 0..AR {
            let m = acc_m[a];
            let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_add_ss(m, _mm_movehdup_ps(m));
            out[a] = hsum(acc[a]) + _mm_cvtss_f32(m);
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
}
