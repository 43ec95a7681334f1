//! Q5_0 weights × Q8_0 activations, in llama.cpp's exact float order.
//!
//! GGUF Q5_0 block (22 bytes, 32 weights): `d: f16, qh: [u8; 4], qs: [u8; 16]`; element
//! `e < 16` has the low nibble of `qs[e]`, element `e + 16` its high nibble, bit `e` of the
//! little-endian `qh` is element `e`'s fifth bit, and `w_e = d·(q_e − 16)`.
//!
//! `ggml_vec_dot_q5_0_q8_0` (ggml-cpu/arch/x86/quants.c, `__AVX2__` branch), per block:
//! `dd = f32(x.d)·y.d`, then `acc[l] = fma(dd, f32(Σ_{e=4l}^{4l+3} (q_e − 16)·y_e), acc[l])`
//! for the 8 lanes, and `hsum8(acc)` at the end (see `signed32`).
//!
//! llama.cpp's x86 build hands products of two or more activation rows to llamafile's
//! tinyBLAS, which groups the sums differently; one row (decode) runs this `vec_dot`.

use super::q8::QK;
use super::signed32::Signed32;

pub const BLOCK_BYTES: usize = 22;

/// The Q5_0 row format.
pub struct Q5_0;

impl Signed32 for Q5_0 {
    const BYTES: usize = BLOCK_BYTES;

    #[inline(always)]
    fn quants(b: &[u8]) -> [i8; QK] {
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let mut q = [0i8; QK];
        for j in 0..16 {
            let lo = (b[6 + j] & 0x0F) | ((((qh >> j) & 1) as u8) << 4);
            let hi = (b[6 + j] >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            q[j] = lo as i8 - 16;
            q[j + 16] = hi as i8 - 16;
        }
        q
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn quants_avx2(p: *const u8) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        let t = _mm_loadu_si128(p.add(6) as *const __m128i);
        let nib = _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16::<4>(t), t),
            _mm256_set1_epi8(0x0F),
        );
        // Byte e gets byte e/8 of qh, then tests its bit e%8.
        let qh = _mm256_set1_epi32((p.add(2) as *const i32).read_unaligned());
        let spread = _mm256_shuffle_epi8(
            qh,
            _mm256_setr_epi64x(
                0,
                0x0101_0101_0101_0101,
                0x0202_0202_0202_0202,
                0x0303_0303_0303_0303,
            ),
        );
        let sel = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, sel), sel);
        // Fifth bit clear: nibble − 16 (0xF0 | nibble as i8); set: the nibble itself.
        _mm256_or_si256(
            nib,
            _mm256_andnot_si256(set, _mm256_set1_epi8(0xF0u8 as i8)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::super::row_tests as t;
    use super::super::QType;
    use super::Q5_0;
    use candle_core::quantized::GgmlDType;

    const G: GgmlDType = GgmlDType::Q5_0;

    #[test]
    fn dequantize_matches_candle() {
        t::dequantize_matches_candle::<Q5_0>(G);
    }

    #[test]
    fn avx2_matches_scalar() {
        t::avx2_matches_scalar::<Q5_0>(G, &[32, 64, 96, 288, 1024]);
    }

    #[test]
    fn avx2_matches_scalar_across_row_blocks() {
        t::avx2_matches_scalar_rows::<Q5_0>(G, 300, 256, &[1, 2, 6, 9]);
    }

    #[test]
    fn matmul_matches_f32_and_candle() {
        // (candle's Q5_0 product needs an even block count)
        t::matmul_matches_f32_and_candle::<Q5_0>(QType::Q5_0, G, &[64, 576, 2816]);
    }

    #[test]
    fn threads_do_not_change_bits() {
        t::threads_do_not_change_bits(QType::Q5_0, G, 1024);
    }

    #[test]
    #[ignore = "timing; run with --release --ignored --nocapture"]
    fn bench_q5_0() {
        t::bench(QType::Q5_0, G);
    }
}
