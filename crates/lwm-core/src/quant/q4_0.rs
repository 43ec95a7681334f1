//! Q4_0 weights × Q8_0 activations, in llama.cpp's exact float order.
//!
//! GGUF Q4_0 block (18 bytes, 32 weights): `d: f16, qs: [u8; 16]`; element `e < 16` is the
//! low nibble of `qs[e]`, element `e + 16` its high nibble, and `w_e = d·(nibble − 8)`.
//!
//! `ggml_vec_dot_q4_0_q8_0` (ggml-cpu/arch/x86/quants.c, `__AVX2__` branch), per block:
//! `dd = f32(x.d)·y.d`, then `acc[l] = fma(dd, f32(Σ_{e=4l}^{4l+3} q_e·y_e), acc[l])` for the
//! 8 lanes, and `hsum8(acc)` at the end (see `signed32`).
//!
//! That is the order of every output element when llama.cpp's mul_mat runs `vec_dot`. Its
//! x86 CPU backend may instead repack a Q4_0 matrix whose row count is a multiple of 8
//! (`repack.cpp`, `q4_0_8x8_q8_0`), and hands products of two or more activation rows to
//! llamafile's tinyBLAS, both of which group the sums differently.

use super::q8::QK;
use super::signed32::Signed32;

pub const BLOCK_BYTES: usize = 18;

/// The Q4_0 row format.
pub struct Q4_0;

impl Signed32 for Q4_0 {
    const BYTES: usize = BLOCK_BYTES;

    #[inline(always)]
    fn quants(b: &[u8]) -> [i8; QK] {
        let mut q = [0i8; QK];
        for j in 0..16 {
            q[j] = (b[2 + j] & 0x0F) as i8 - 8;
            q[j + 16] = (b[2 + j] >> 4) as i8 - 8;
        }
        q
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn quants_avx2(p: *const u8) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        let t = _mm_loadu_si128(p.add(2) as *const __m128i);
        let nib = _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16::<4>(t), t),
            _mm256_set1_epi8(0x0F),
        );
        _mm256_sub_epi8(nib, _mm256_set1_epi8(8))
    }
}

#[cfg(test)]
mod tests {
    use super::super::row_tests as t;
    use super::super::QType;
    use super::Q4_0;
    use candle_core::quantized::GgmlDType;

    const G: GgmlDType = GgmlDType::Q4_0;

    #[test]
    fn dequantize_matches_candle() {
        t::dequantize_matches_candle::<Q4_0>(G);
    }

    #[test]
    fn avx2_matches_scalar() {
        t::avx2_matches_scalar::<Q4_0>(G, &[32, 64, 96, 288, 1024]);
    }

    #[test]
    fn avx2_matches_scalar_across_row_blocks() {
        t::avx2_matches_scalar_rows::<Q4_0>(G, 300, 256, &[1, 2, 6, 9]);
    }

    #[test]
    fn matmul_matches_f32_and_candle() {
        t::matmul_matches_f32_and_candle::<Q4_0>(QType::Q4_0, G, &[32, 576, 2816]);
    }

    #[test]
    fn threads_do_not_change_bits() {
        t::threads_do_not_change_bits(QType::Q4_0, G, 1024);
    }

    #[test]
    #[ignore = "timing; run with --release --ignored --nocapture"]
    fn bench_q4_0() {
        t::bench(QType::Q4_0, G);
    }
}
