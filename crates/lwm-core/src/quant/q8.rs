//! Activation quantization to 8-bit blocks of 32, exactly as llama.cpp's x86 build does it
//! (`quantize_row_q8_0` / `quantize_row_q8_1` in ggml-cpu/arch/x86/quants.c, AVX2 path).
//!
//! Per block of 32 values `x`:
//!
//! ```text
//!   amax = max |x_i|
//!   d    = amax / 127              (f32 division)
//!   id   = 127 / amax, or 0 when amax == 0
//!   q_i  = round_half_to_even(x_i * id)      (_mm256_round_ps(.., _MM_ROUND_NEAREST))
//!   D    = fp16(d)                            (stored scale, round to nearest even)
//!   S    = fp16(d * float(Σ q_i))             (Q8_1 only; d is the f32 value, not D)
//! ```
//!
//! This differs from candle's Q8_1 (which uses `1/d`, rounds half away from zero and forms
//! `s` from the f16 scale), so our products reproduce llama.cpp's, not candle's.
//!
//! The scales are kept as f32 values that are exactly representable in f16 (the rounding
//! to f16 has been applied), because every consumer in ggml converts them back to f32
//! before use; keeping them as f32 saves a conversion per block in the dot products.

use half::f16;

pub const QK: usize = 32;

/// One Q8_1 activation block: `x_i ≈ d · qs_i`, `s = fp16(d_f32 · Σ qs_i)`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C, align(8))]
pub struct BlockQ8_1 {
    /// fp16-rounded scale, as f32.
    pub d: f32,
    /// fp16-rounded `d · Σ qs`, as f32.
    pub s: f32,
    pub qs: [i8; QK],
}

/// One Q8_0 activation block: `x_i ≈ d · qs_i`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C, align(4))]
pub struct BlockQ8_0 {
    /// fp16-rounded scale, as f32.
    pub d: f32,
    pub qs: [i8; QK],
}

impl BlockQ8_1 {
    pub const ZERO: Self = Self {
        d: 0.0,
        s: 0.0,
        qs: [0; QK],
    };
    /// The stored scale as the f16 llama.cpp writes.
    pub fn d_f16(&self) -> f16 {
        f16::from_f32(self.d)
    }
    pub fn s_f16(&self) -> f16 {
        f16::from_f32(self.s)
    }
}

impl BlockQ8_0 {
    pub const ZERO: Self = Self {
        d: 0.0,
        qs: [0; QK],
    };
    pub fn d_f16(&self) -> f16 {
        f16::from_f32(self.d)
    }
}

#[inline]
fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Scalar quantization of one block; returns (d_f32, qs, Σqs).
#[inline]
fn quantize_block_scalar(x: &[f32]) -> (f32, [i8; QK], i32) {
    debug_assert_eq!(x.len(), QK);
    // max(|x|): order does not matter for max (NaN inputs are outside the contract).
    let mut amax = 0.0f32;
    for &v in x {
        amax = amax.max(v.abs());
    }
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        // x·id ∈ [-127, 127] up to rounding; round half to even like _mm256_round_ps(.., 0),
        // then the packs saturate to i8 (never reached for finite input).
        let r = (v * id).round_ties_even();
        let i = r.clamp(-128.0, 127.0) as i32;
        *q = i as i8;
        sum += i;
    }
    (d, qs, sum)
}

/// Quantize a row (length multiple of 32) to Q8_1, scalar reference path.
pub fn quantize_row_q8_1_scalar(x: &[f32], out: &mut [BlockQ8_1]) {
    assert_eq!(x.len() % QK, 0);
    assert_eq!(out.len(), x.len() / QK);
    for (xb, o) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let (d, qs, sum) = quantize_block_scalar(xb);
        *o = BlockQ8_1 {
            d: round_f16(d),
            s: round_f16(d * sum as f32),
            qs,
        };
    }
}

/// Quantize a row (length multiple of 32) to Q8_0, scalar reference path.
pub fn quantize_row_q8_0_scalar(x: &[f32], out: &mut [BlockQ8_0]) {
    assert_eq!(x.len() % QK, 0);
    assert_eq!(out.len(), x.len() / QK);
    for (xb, o) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let (d, qs, _) = quantize_block_scalar(xb);
        *o = BlockQ8_0 {
            d: round_f16(d),
            qs,
        };
    }
}

/// Quantize a row to Q8_1 with the fastest available path (bit-identical to the scalar one).
pub fn quantize_row_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        assert_eq!(x.len() % QK, 0);
        assert_eq!(out.len(), x.len() / QK);
        // SAFETY: AVX2/FMA/F16C were detected at runtime; lengths checked above.
        unsafe { avx2::quantize_row_q8_1(x, out) };
        return;
    }
    quantize_row_q8_1_scalar(x, out)
}

/// Quantize a row to Q8_0 with the fastest available path (bit-identical to the scalar one).
pub fn quantize_row_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        assert_eq!(x.len() % QK, 0);
        assert_eq!(out.len(), x.len() / QK);
        // SAFETY: as above.
        unsafe { avx2::quantize_row_q8_0(x, out) };
        return;
    }
    quantize_row_q8_0_scalar(x, out)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{round_f16, BlockQ8_0, BlockQ8_1, QK};
    use std::arch::x86_64::*;

    /// Quantize 32 floats at `x`: returns (d_f32, Σq) and stores the 32 i8 at `qs`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block(x: *const f32, qs: *mut i8) -> (f32, i32) {
        let v0 = _mm256_loadu_ps(x);
        let v1 = _mm256_loadu_ps(x.add(8));
        let v2 = _mm256_loadu_ps(x.add(16));
        let v3 = _mm256_loadu_ps(x.add(24));
        let sign = _mm256_set1_ps(-0.0);
        let mut m = _mm256_andnot_ps(sign, v0);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v1));
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v2));
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v3));
        let mut m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        let amax = _mm_cvtss_f32(m4);
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mul = _mm256_set1_ps(id);
        const RN: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        let i0 = _mm256_cvtps_epi32(_mm256_round_ps::<RN>(_mm256_mul_ps(v0, mul)));
        let i1 = _mm256_cvtps_epi32(_mm256_round_ps::<RN>(_mm256_mul_ps(v1, mul)));
        let i2 = _mm256_cvtps_epi32(_mm256_round_ps::<RN>(_mm256_mul_ps(v2, mul)));
        let i3 = _mm256_cvtps_epi32(_mm256_round_ps::<RN>(_mm256_mul_ps(v3, mul)));
        // Σq (exact integer sum; any order).
        let s8 = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
        let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
        let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01));
        let sum = _mm_cvtsi128_si32(s1);
        // Saturating packs to i8; the 128-bit lanes interleave, so fix the order after.
        let p01 = _mm256_packs_epi32(i0, i1);
        let p23 = _mm256_packs_epi32(i2, i3);
        let p = _mm256_packs_epi16(p01, p23);
        let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(qs as *mut __m256i, p);
        (d, sum)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize_row_q8_1(x: &[f32], out: &mut [BlockQ8_1]) {
        for (b, o) in out.iter_mut().enumerate() {
            let (d, sum) = block(x.as_ptr().add(b * QK), o.qs.as_mut_ptr());
            o.d = round_f16(d);
            o.s = round_f16(d * sum as f32);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize_row_q8_0(x: &[f32], out: &mut [BlockQ8_0]) {
        for (b, o) in out.iter_mut().enumerate() {
            let (d, _) = block(x.as_ptr().add(b * QK), o.qs.as_mut_ptr());
            o.d = round_f16(d);
        }
    }
}

/// Values in one K-quant super-block (and in one Q8_K activation block).
pub const QK_K: usize = 256;

/// One Q8_K activation block (ggml's `block_q8_K`): `x_i ≈ d · qs_i`, and the sums of
/// each 16 consecutive quants, which the K-quant dot products use for the weights' mins.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C, align(32))]
pub struct BlockQ8K {
    /// An f32 scale (not rounded to f16, unlike Q8_0's).
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

impl BlockQ8K {
    pub const ZERO: Self = Self {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
}

/// Quantize a row (length a multiple of 256) to Q8_K, as ggml's `quantize_row_q8_K_ref`
/// (which its x86 build runs):
///
/// ```text
///   max   = the first x_i of largest |x_i|        (signed)
///   iscale = -127 / max;  q_i = min(127, round_half_even(iscale · x_i));  d = 1 / iscale
///   bsums[j] = Σ_{i=16j}^{16j+15} q_i
/// ```
///
/// (The sign flip makes the largest value -127, so no quant is -128.) An all-zero block
/// has `d = 0` and zero quants. Runs the AVX2 path where the CPU has it (same bits as
/// `quantize_row_q8_k_scalar`).
pub fn quantize_row_q8_k(x: &[f32], out: &mut [BlockQ8K]) {
    assert_eq!(x.len() % QK_K, 0);
    assert_eq!(out.len(), x.len() / QK_K);
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: AVX2/FMA/F16C were detected at runtime; lengths checked above.
        unsafe { avx2_k::quantize_row_q8_k(x, out) };
        return;
    }
    quantize_row_q8_k_scalar(x, out)
}

/// The portable `quantize_row_q8_k`, line for line ggml's `quantize_row_q8_K_ref`.
pub fn quantize_row_q8_k_scalar(x: &[f32], out: &mut [BlockQ8K]) {
    assert_eq!(x.len() % QK_K, 0);
    assert_eq!(out.len(), x.len() / QK_K);
    for (xb, o) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        // The first value of largest magnitude: the largest magnitude (a max, which the
        // compiler vectorizes), then the first value that has it.
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        if amax == 0.0 {
            *o = BlockQ8K::ZERO;
            continue;
        }
        let max = *xb.iter().find(|v| v.abs() == amax).unwrap_or(&amax);
        let iscale = -127.0 / max;
        for (q, &v) in o.qs.iter_mut().zip(xb) {
            *q = nearest_int(iscale * v).min(127) as i8;
        }
        for (s, q) in o.bsums.iter_mut().zip(o.qs.chunks_exact(16)) {
            *s = q.iter().map(|&v| v as i16).sum();
        }
        o.d = 1.0 / iscale;
    }
}

/// ggml's `nearest_int`: round half to even through the float adder (adding 1.5·2^23
/// leaves the rounded integer in the low mantissa bits), for |x| < 2^22. Bit-identical to
/// `x.round_ties_even() as i32` there, and far cheaper where the target has no SSE4.1
/// `roundss` (that one is a libm call on baseline x86-64).
#[inline(always)]
fn nearest_int(x: f32) -> i32 {
    ((x + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

#[cfg(target_arch = "x86_64")]
mod avx2_k {
    use super::{BlockQ8K, QK_K};
    use std::arch::x86_64::*;

    /// `quantize_row_q8_k_scalar`, 8 lanes at a time: the same f32 products, rounded half
    /// to even by `cvtps_epi32` (the default MXCSR mode), as ggml's `nearest_int` does
    /// (which also turns a NaN product into 0).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize_row_q8_k(x: &[f32], out: &mut [BlockQ8K]) {
        let sign = _mm256_set1_ps(-0.0);
        for (b, o) in out.iter_mut().enumerate() {
            let xb = x.as_ptr().add(b * QK_K);
            // amax; `max_ps(|v|, m)` keeps m where v is NaN, as ggml's `ax > amax` skips it.
            let mut m = _mm256_setzero_ps();
            for k in 0..QK_K / 8 {
                m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(xb.add(8 * k))), m);
            }
            let m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
            let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
            if amax == 0.0 {
                *o = BlockQ8K::ZERO;
                continue;
            }
            // max: the first value of that magnitude, with its sign.
            let am = _mm256_set1_ps(amax);
            let mut max = 0.0f32;
            for k in 0..QK_K / 8 {
                let v = _mm256_loadu_ps(xb.add(8 * k));
                let hit =
                    _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_andnot_ps(sign, v), am));
                if hit != 0 {
                    max = *xb.add(8 * k + hit.trailing_zeros() as usize);
                    break;
                }
            }
            let iscale = -127.0 / max;
            let mul = _mm256_set1_ps(iscale);
            let cap = _mm256_set1_epi32(127);
            for g in 0..QK_K / 32 {
                let q: [__m256i; 4] = std::array::from_fn(|k| {
                    let v = _mm256_mul_ps(_mm256_loadu_ps(xb.add(32 * g + 8 * k)), mul);
                    let q = _mm256_min_epi32(_mm256_cvtps_epi32(v), cap);
                    // NaN: `cvtps` gives i32::MIN, ggml's `nearest_int` 0.
                    _mm256_and_si256(q, _mm256_castps_si256(_mm256_cmp_ps::<_CMP_ORD_Q>(v, v)))
                });
                // bsums of quants 32g..32g+16 and 32g+16..32g+32 (exact).
                let s =
                    _mm256_hadd_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
                let s = _mm256_hadd_epi32(s, s);
                o.bsums[2 * g] =
                    _mm256_extract_epi32::<0>(s) as i16 + _mm256_extract_epi32::<4>(s) as i16;
                o.bsums[2 * g + 1] =
                    _mm256_extract_epi32::<1>(s) as i16 + _mm256_extract_epi32::<5>(s) as i16;
                // Saturating packs to i8 (values are in [-128, 127]); undo the lane interleave.
                let p = _mm256_packs_epi16(
                    _mm256_packs_epi32(q[0], q[1]),
                    _mm256_packs_epi32(q[2], q[3]),
                );
                let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256(o.qs.as_mut_ptr().add(32 * g) as *mut __m256i, p);
            }
            o.d = 1.0 / iscale;
        }
    }
}

#[cfg(test)]
mod q8_k_tests {
    use super::*;

    #[test]
    #[allow(clippy::identity_op)] // the sum spelled out
    fn q8_k_matches_ggml_reference_rules() {
        // Hand-checked: max is the first value of largest magnitude, signed; quants are
        // round-half-even of -127/max · x, capped at 127.
        let mut x = vec![0.0f32; QK_K];
        x[3] = -2.0;
        x[7] = 2.0; // same magnitude, later: not the max
        x[10] = 1.0; // -127/-2 · 1 = 63.5 -> 64 (even)
        x[11] = 0.0125; // 0.79375 -> 1
        let mut o = [BlockQ8K::ZERO];
        quantize_row_q8_k(&x, &mut o);
        assert_eq!(o[0].d, 1.0 / (127.0 / 2.0));
        assert_eq!(
            (o[0].qs[3], o[0].qs[7], o[0].qs[10], o[0].qs[11]),
            (-127, 127, 64, 1)
        );
        assert_eq!(o[0].bsums[0], 65); // -127 + 127 + 64 + 1
        assert!(o[0].bsums[1..].iter().all(|&s| s == 0));
        quantize_row_q8_k(&[0.0; QK_K], &mut o);
        assert_eq!(o[0], BlockQ8K::ZERO);
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        for i in -400_000..=400_000 {
            let x = i as f32 / 1024.0;
            assert_eq!(nearest_int(x), x.round_ties_even() as i32, "{x}");
        }
        for x in [0.5f32, 1.5, 2.5, -0.5, -1.5, 126.5, -127.5, 127.49999] {
            assert_eq!(nearest_int(x), x.round_ties_even() as i32, "{x}");
        }
    }

    #[test]
    fn q8_k_simd_equals_scalar() {
        let mut rng = crate::rng::XorShift::new(17);
        let mut x = rng.vec(QK_K * 12, -3.0, 3.0);
        // Ties of magnitude (first one wins, whatever its sign), exact halves, zero blocks,
        // a block whose largest value is negative, NaNs (skipped, as ggml's `>` skips them),
        // a large dynamic range.
        x[2 * QK_K + 5] = -4.0;
        x[2 * QK_K + 9] = 4.0;
        x[3 * QK_K + 1] = 4.0;
        x[3 * QK_K + 200] = -4.0;
        for (i, v) in x[4 * QK_K..5 * QK_K].iter_mut().enumerate() {
            *v = (i as f32 - 128.0) * 0.5;
        }
        x[5 * QK_K..6 * QK_K].fill(0.0);
        x[6 * QK_K..7 * QK_K].fill(-0.0);
        x[7 * QK_K + 77] = -9.5;
        x[8 * QK_K + 3] = f32::NAN;
        x[8 * QK_K + 100] = f32::NAN;
        for v in &mut x[9 * QK_K..10 * QK_K] {
            *v *= 1e-30;
        }
        x[10 * QK_K + 255] = 1e30;
        let mut want = vec![BlockQ8K::ZERO; 12];
        quantize_row_q8_k_scalar(&x, &mut want);
        let mut got = vec![BlockQ8K::ZERO; 12];
        quantize_row_q8_k(&x, &mut got);
        for (b, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.d.to_bits(), w.d.to_bits(), "block {b} d");
            assert_eq!(g.qs, w.qs, "block {b} qs");
            assert_eq!(g.bsums, w.bsums, "block {b} bsums");
        }
    }
}
