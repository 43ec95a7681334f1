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
//! Here `hsum8(a) = ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))` (ggml's `hsum_float_8`), the
//! `sumi` lanes `t` are the 32-bit lanes of `_mm256_madd_epi16(scale, maddubs(q4, q8))`,
//! and `-y.d · x.dmin` is exactly `y.d · (−x.dmin)`. The integer parts are exact (any
//! order); every f32 operation above is reproduced one for one, so `dot_scalar`, the AVX2
//! kernels and ggml agree bit for bit.
//!
//! AVX2 kernels (`rows_x_acts_avx2`): for one activation row (decode) each weight row runs
//! ggml's loop, the 6-bit scales unpacked in general-purpose registers so the vector pipes
//! only multiply; the activation side (`y.d`, the bsum pairs) is prepared once per call.
//! For several rows (prefill) tiles of up to 8 activation rows share each weight super-
//! block: its nibbles and scale broadcasts are made once and stay in registers while the
//! tile's quants stream past; `d` for the tile's rows is one vector product and two rows'
//! mins one 256-bit `madd`. (Measured here: tiles of 4 or 6 rows, or 2 weight rows per
//! tile sharing the activation loads, were slower; so were mat-vecs of several rows.)
//! Activations are quantized by `q8::quantize_row_q8_k` (AVX2, same bits as ggml's).
//!
//! llama.cpp may instead repack Q4_K matrices (`repack.cpp`, `ggml_gemv/gemm_q4_K_8x8_q8_K`
//! on AVX2), which sum in another order; the order above is `ggml_vec_dot_q4_K_q8_K`'s, what
//! its `mul_mat` computes without the repack.

use super::f16_bits_to_f32;
use super::hsum8;
use super::k_tiles::SuperBlock;
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

/// The 8 scales then the 8 mins of a super-block, from its 12 packed bytes (Q4_K and
/// Q5_K pack them alike).
#[inline(always)]
pub(super) fn scales_mins(q: &[u8]) -> [u8; 16] {
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

impl SuperBlock for Q4K {
    const SUB: usize = 32;
    const HAS_MIN: bool = true;
    const BIAS: i32 = 0;

    #[inline(always)]
    fn unpack(b: &[u8], codes: &mut [u8], scales: &mut [i32], mins: &mut [i32]) -> (f32, f32) {
        let sm = scales_mins(&b[4..16]);
        for s in 0..8 {
            scales[s] = sm[s] as i32;
            mins[s] = sm[8 + s] as i32;
        }
        let qs = &b[16..16 + 128];
        for j in 0..4 {
            for l in 0..32 {
                codes[64 * j + l] = qs[32 * j + l] & 0xF;
                codes[64 * j + 32 + l] = qs[32 * j + l] >> 4;
            }
        }
        (
            f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])),
            f16_bits_to_f32(u16::from_le_bytes([b[2], b[3]])),
        )
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::super::q8::BlockQ8K;
    use super::super::q8_0::avx2::hsum;
    use super::super::row_kernels::simd::scaled_pairs_acc;
    use super::BLOCK_BYTES;
    use std::arch::x86_64::*;

    /// The 8 scales then the 8 mins of the super-block at `b` as 16 bytes (the vector form
    /// of `scales_mins`), unpacked in general-purpose registers (ggml's `utmp` masks) so
    /// that the vector pipes stay free for the products.
    #[inline(always)]
    pub(in crate::quant) unsafe fn scales_mins_gpr(b: *const u8) -> __m128i {
        let q = b.add(4);
        // l = bytes 0..8 (sc0..3 and m0..3 in their low 6 bits, the top 2 bits of sc4..7 and
        // m4..7 above); h = bytes 8..12 (the low 4 bits of sc4..7 and m4..7 as nibbles).
        let l = (q as *const u64).read_unaligned();
        let h = (q.add(8) as *const u32).read_unaligned() as u64;
        let low = l & 0x3f3f_3f3f_3f3f_3f3f; // [sc0..3 | m0..3]
        let nib = (h & 0x0f0f_0f0f) | ((h << 28) & 0x0f0f_0f0f_0000_0000);
        let high = nib | ((l >> 2) & 0x3030_3030_3030_3030); // [sc4..7 | m4..7]
        _mm_unpacklo_epi32(
            _mm_cvtsi64_si128(low as i64),
            _mm_cvtsi64_si128(high as i64),
        )
    }

    /// `scales_mins_gpr` in vector registers, for the GEMM (whose integer registers hold
    /// the activation rows' pointers). Reads `b[4..20]`, inside the block.
    #[inline(always)]
    pub(super) unsafe fn scales_mins_simd(b: *const u8) -> __m128i {
        let v = _mm_loadu_si128(b.add(4) as *const __m128i);
        // Bytes 0..4: sc0..3 = q[0..4] & 63; 4..8: sc4..7 = q[8..12] & 15 | q[0..4] >> 6 << 4;
        // 8..12: m0..3 = q[4..8] & 63; 12..16: m4..7 = q[8..12] >> 4 | q[4..8] >> 6 << 4.
        let a = _mm_shuffle_epi8(
            v,
            _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11),
        );
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
    /// every i16 of a 256-bit vector, zero-extended: a table, so that a rolled loop reads
    /// them instead of building them.
    static SCALE_CTRL: [[u16; 16]; 8] = {
        let mut t = [[0u16; 16]; 8];
        let mut s = 0;
        while s < 8 {
            t[s] = [0x8000 | s as u16; 16];
            s += 1;
        }
        t
    };

    #[inline(always)]
    pub(super) unsafe fn scale_ctrl(s: i8) -> __m256i {
        _mm256_loadu_si256(SCALE_CTRL.as_ptr().add(s as usize) as *const __m256i)
    }

    /// The two f16 scales of the block at `b` as f32: `[d, dmin, 0, 0]`.
    #[inline(always)]
    pub(super) unsafe fn d_dmin(b: *const u8) -> __m128 {
        _mm_cvtph_ps(_mm_cvtsi32_si128((b as *const i32).read_unaligned()))
    }

    /// ggml's `acc_m` reduction: (m0 + m2) + (m1 + m3).
    #[inline(always)]
    pub(super) unsafe fn hsum4(m: __m128) -> f32 {
        let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)))
    }

    /// `q8s[l] = bsums[2l] + bsums[2l+1]` (ggml's `_mm_hadd_epi16` of the two halves).
    #[inline(always)]
    pub(super) unsafe fn q8sums(y: &BlockQ8K) -> __m128i {
        let s = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
        _mm_hadd_epi16(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1))
    }

    /// Σ_j sc[2j]·(lo nibbles · q8[64j..64j+32]) + sc[2j+1]·(hi nibbles · q8[64j+32..64j+64])
    /// per 32-bit lane, for one block's quants `q4` and scales `sc` (both 128-bit lanes).
    #[inline(always)]
    unsafe fn block_sumi<const VNNI: bool>(q4: *const u8, sc: __m256i, q8: *const i8) -> __m256i {
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
            sumi = scaled_pairs_acc::<VNNI>(sumi, _mm256_maddubs_epi16(q4l, q8l), sl);
            sumi = scaled_pairs_acc::<VNNI>(sumi, _mm256_maddubs_epi16(q4h, q8h), sh);
        }
        sumi
    }

    /// The activation side of the mat-vec, per block: `[y.d, -y.d, 0, 0]` and `q8sums`.
    #[derive(Clone, Copy)]
    struct ActBlock {
        yd: __m128,
        q8s: __m128i,
    }

    /// Mat-vec: one weight row times one activation row (`y` its blocks, `pre` their
    /// `ActBlock`s), ggml's loop.
    #[inline(always)]
    unsafe fn row_x_act<const VNNI: bool>(w: *const u8, y: &[BlockQ8K], pre: &[ActBlock]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut acc_m = _mm_setzero_ps();
        // Zero-extends the mins (bytes 8..16 of `scales_mins`) to i16.
        let mins_ctrl = _mm_setr_epi8(8, -1, 9, -1, 10, -1, 11, -1, 12, -1, 13, -1, 14, -1, 15, -1);
        for (i, (yb, p)) in y.iter().zip(pre).enumerate() {
            let b = w.add(i * BLOCK_BYTES);
            // [d, dmin] = [y.d · x.d, -y.d · x.dmin], as ggml's two f32 products.
            let dd = _mm_mul_ps(p.yd, d_dmin(b));
            let sm = scales_mins_gpr(b);
            let prod = _mm_madd_epi16(_mm_shuffle_epi8(sm, mins_ctrl), p.q8s);
            acc_m = _mm_fmadd_ps(_mm_shuffle_ps(dd, dd, 0x55), _mm_cvtepi32_ps(prod), acc_m);
            let sumi =
                block_sumi::<VNNI>(b.add(16), _mm256_broadcastsi128_si256(sm), yb.qs.as_ptr());
            acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(dd), _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum(acc) + hsum4(acc_m)
    }

    /// Activation rows per GEMM tile, and weight rows sharing their loads.
    const TILE: usize = 8;
    const GEMM_ROWS: usize = 1;
    // Row pairs share a mins vector; `d` for the tile is one 8-lane vector.
    const _: () = assert!(TILE.is_multiple_of(2) && TILE <= 8);

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
                let mut d = [0.0f32; 8];
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

    /// GEMM tile: `R` weight rows `stride` bytes apart times `A` activation rows (`A` ≤
    /// `TILE`): each weight block is unpacked once for the tile and kept in registers while
    /// the activation rows' quants stream past it (each load shared by the `R` rows).
    #[inline(always)]
    unsafe fn rows_x_tile<const R: usize, const A: usize, const VNNI: bool>(
        w: *const u8,
        stride: usize,
        ys: &[*const BlockQ8K; TILE],
        t: &TileActs,
    ) -> [[f32; A]; R] {
        let m4 = _mm256_set1_epi8(0xF);
        let mut acc = [[_mm256_setzero_ps(); A]; R];
        let mut acc_m = [[_mm256_setzero_ps(); TILE / 2]; R];
        for i in 0..t.yd.len() {
            let b: [*const u8; R] = std::array::from_fn(|r| w.add(r * stride + i * BLOCK_BYTES));
            let sm: [__m128i; R] = std::array::from_fn(|r| scales_mins_simd(b[r]));
            let sc: [__m256i; R] = std::array::from_fn(|r| _mm256_broadcastsi128_si256(sm[r]));
            let q8: [*const i8; A] = std::array::from_fn(|a| (*ys[a].add(i)).qs.as_ptr());
            let mut sumi = [[_mm256_setzero_si256(); A]; R];
            for j in 0..4 {
                // Sub-block 2j (low nibbles of qs[32j..32j+32]), then 2j+1 (high nibbles).
                let bits: [__m256i; R] = std::array::from_fn(|r| {
                    _mm256_loadu_si256(b[r].add(16 + 32 * j) as *const __m256i)
                });
                let q4: [__m256i; R] = std::array::from_fn(|r| _mm256_and_si256(bits[r], m4));
                let s: [__m256i; R] =
                    std::array::from_fn(|r| _mm256_shuffle_epi8(sc[r], scale_ctrl(2 * j as i8)));
                for a in 0..A {
                    let y = _mm256_loadu_si256(q8[a].add(64 * j) as *const __m256i);
                    for r in 0..R {
                        let p = _mm256_maddubs_epi16(q4[r], y);
                        sumi[r][a] = scaled_pairs_acc::<VNNI>(sumi[r][a], p, s[r]);
                    }
                }
                let q4: [__m256i; R] =
                    std::array::from_fn(|r| _mm256_and_si256(_mm256_srli_epi16(bits[r], 4), m4));
                let s: [__m256i; R] = std::array::from_fn(|r| {
                    _mm256_shuffle_epi8(sc[r], scale_ctrl(2 * j as i8 + 1))
                });
                for a in 0..A {
                    let y = _mm256_loadu_si256(q8[a].add(64 * j + 32) as *const __m256i);
                    for r in 0..R {
                        let p = _mm256_maddubs_epi16(q4[r], y);
                        sumi[r][a] = scaled_pairs_acc::<VNNI>(sumi[r][a], p, s[r]);
                    }
                }
            }
            let nyd = t.nyd.get_unchecked(i);
            let q8s = t.q8s.get_unchecked(i);
            for r in 0..R {
                let x = d_dmin(b[r]);
                // d = y.d · x.d for the tile's rows at once; dmin = (−y.d) · x.dmin.
                let dv = _mm256_mul_ps(*t.yd.get_unchecked(i), _mm256_broadcastss_ps(x));
                for a in 0..A {
                    let d = _mm256_permutevar8x32_ps(dv, _mm256_set1_epi32(a as i32));
                    acc[r][a] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi[r][a]), acc[r][a]);
                }
                let xmin = _mm256_broadcastss_ps(_mm_movehdup_ps(x));
                let mins = _mm256_cvtepu8_epi16(_mm_srli_si128(sm[r], 8));
                let mins = _mm256_permute2x128_si256(mins, mins, 0);
                for p in 0..A.div_ceil(2) {
                    let prod = _mm256_madd_epi16(mins, q8s[p]);
                    acc_m[r][p] = _mm256_fmadd_ps(
                        _mm256_mul_ps(nyd[p], xmin),
                        _mm256_cvtepi32_ps(prod),
                        acc_m[r][p],
                    );
                }
            }
        }
        let mut out = [[0.0f32; A]; R];
        for r in 0..R {
            for a in 0..A {
                let m = acc_m[r][a / 2];
                let m = if a % 2 == 0 {
                    _mm256_castps256_ps128(m)
                } else {
                    _mm256_extractf128_ps(m, 1)
                };
                out[r][a] = hsum(acc[r][a]) + hsum4(m);
            }
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
        let nb = stride / BLOCK_BYTES;
        debug_assert!(w.len() >= n_rows * stride);
        debug_assert_eq!(out.len(), n_rows * n);
        debug_assert!(ys.iter().all(|y| y.len() == nb));
        let wp = w.as_ptr();
        if n == 1 {
            let y = ys[0];
            let pre: Vec<ActBlock> = y
                .iter()
                .map(|b| ActBlock {
                    yd: _mm_setr_ps(b.d, -b.d, 0.0, 0.0),
                    q8s: q8sums(b),
                })
                .collect();
            for (r, o) in out.iter_mut().enumerate().take(n_rows) {
                *o = row_x_act::<VNNI>(wp.add(r * stride), y, &pre);
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
                ($a:literal) => {{
                    let mut r = 0;
                    while r + GEMM_ROWS <= n_rows {
                        let o = rows_x_tile::<GEMM_ROWS, $a, VNNI>(
                            wp.add(r * stride),
                            stride,
                            &p,
                            &tile,
                        );
                        for (k, o) in o.iter().enumerate() {
                            out[(r + k) * n + a0..(r + k) * n + a0 + $a].copy_from_slice(o);
                        }
                        r += GEMM_ROWS;
                    }
                    while r < n_rows {
                        let o = rows_x_tile::<1, $a, VNNI>(wp.add(r * stride), stride, &p, &tile);
                        out[r * n + a0..r * n + a0 + $a].copy_from_slice(&o[0]);
                        r += 1;
                    }
                }};
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
    fn simd_scale_unpacking_equals_scalar() {
        if !crate::quant::has_avx2() {
            return;
        }
        let mut rng = crate::rng::XorShift::new(3);
        for _ in 0..2000 {
            let b: Vec<u8> = (0..BLOCK_BYTES).map(|_| rng.next_u64() as u8).collect();
            let want = scales_mins(&b[4..16]);
            let mut got = [[0u8; 16]; 2];
            // SAFETY: AVX2 checked above; `b` is one whole block.
            unsafe {
                use std::arch::x86_64::*;
                let g = avx2::scales_mins_gpr(b.as_ptr());
                _mm_storeu_si128(got[0].as_mut_ptr() as *mut __m128i, g);
                let s = avx2::scales_mins_simd(b.as_ptr());
                _mm_storeu_si128(got[1].as_mut_ptr() as *mut __m128i, s);
            }
            assert_eq!(got[0], want, "{b:?}");
            assert_eq!(got[1], want, "{b:?}");
        }
    }

    /// Every mat-vec and GEMM tile width (n = 1..9, 16, 17: tiles of 8 and every remainder), odd row counts and widths;
    /// 34 and 70 rows span the AVX-512 kernel's blocks of 16 row pairs.
    #[test]
    fn avx2_equals_scalar_on_odd_shapes() {
        if !crate::quant::has_avx2() {
            return;
        }
        for rows in [1, 3, 5, 13, 34, 70] {
            for k in [1, 2, 3, 5] {
                let cols = 256 * k;
                let (w, _) = q4k_bytes(rows, cols, rows as u64 * 7 + k as u64);
                let stride = k * BLOCK_BYTES;
                for n in [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17] {
                    let x = random(n * cols, 99 + n as u64);
                    let mut acts = vec![BlockQ8K::ZERO; n * k];
                    for (o, xr) in acts.chunks_mut(k).zip(x.chunks(cols)) {
                        q8::quantize_row_q8_k(xr, o);
                    }
                    let ys: Vec<&[BlockQ8K]> = acts.chunks(k).collect();
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
                    if crate::quant::has_avx512_vnni() {
                        let mut vnni = vec![f32::NAN; rows * n];
                        // SAFETY: AVX-512 F/VL/VNNI checked; shapes as documented.
                        assert!(unsafe { Q4K::rows_x_acts_vnni(&w, stride, rows, &ys, &mut vnni) });
                        assert_eq!(
                            vnni.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            "VNNI rows {rows} cols {cols} n {n}"
                        );
                    }
                }
            }
        }
    }

    /// (c) and (d): `quant::matmul` against f64 math on the dequantized weights and
    /// activations (tight) and candle's QMatMul (loose); threads and chunking change no bit.
    #[test]
    fn matmul_is_close_to_f32_math_and_candle() {
        // 137 rows: even the mat-vec is past the size `drive` runs on one thread.
        let (rows, cols) = (137, 1024);
        let (bytes, q) = q4k_bytes(rows, cols, 5);
        let m =
            crate::quant::QMatrix::new(crate::quant::QType::Q4K, rows, cols, bytes.into()).unwrap();
        let mut wd = vec![0.0f32; rows * cols];
        for r in 0..rows {
            m.dequantize_row(r, &mut wd[r * cols..(r + 1) * cols]);
        }
        for n in [1, 3, 17] {
            let x = random(n * cols, 6 + n as u64);
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
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                single.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "threads change bits (n = {n})"
            );
            let scalar = crate::quant::matmul_with(
                &m,
                &x,
                n,
                &crate::quant::MatmulOptions {
                    kernel: crate::quant::Kernel::Scalar,
                    single_thread: true,
                },
            )
            .unwrap();
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                scalar.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "SIMD and portable paths differ (n = {n})"
            );
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
            if crate::quant::has_avx2() {
                let ys: Vec<&[BlockQ8K]> = acts.chunks(cols / QK_K).collect();
                let data = m.data.clone();
                let mut out = vec![0.0f32; rows * n];
                let t = best(reps, &mut || {
                    // SAFETY: AVX2 checked; `data` holds `rows` rows of `cols` values.
                    unsafe {
                        Q4K::rows_x_acts_avx2(&data, m.row_bytes(), rows, &ys, &mut out);
                    }
                    std::hint::black_box(&out);
                });
                report("(kernel)", t);
            }
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

/// The GEMM with 512-bit vectors (AVX-512 F/BW/VL/VNNI): two weight rows per vector (lanes
/// 0..8 row r, 8..16 row r + 1, each exactly the 8 lanes of ggml's AVX2 loop) × up to 6
/// activation rows per register tile. A sub-block is one `vpmaddubsw` and one `vpdpwssd`
/// per row pair and activation row, on the activation's 32 quants broadcast to both
/// halves; the integer sums are exact and every float step (`d`, `dmin`, the FMAs, ggml's
/// sums at the end) is the AVX2 kernel's, so the bits are the same.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use super::super::q8::BlockQ8K;
    use super::super::row_kernels::simd::{dpwssd512, hsum_halves, join256, splat_halves};
    use super::avx2::{d_dmin, hsum4, q8sums, scale_ctrl, scales_mins_simd};
    use super::BLOCK_BYTES;
    use std::arch::x86_64::*;

    /// Activation rows per register tile.
    const A: usize = 6;
    /// Row pairs per block of the GEMM: their weights (32 rows, 74 KB at 4096 columns) stay
    /// in L2 while every activation tile passes over them.
    const PB: usize = 16;

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
        debug_assert!(w.len() >= n_rows * stride);
        debug_assert_eq!(out.len(), n_rows * n);
        debug_assert!(ys.iter().all(|y| y.len() == nb));
        let pairs = n_rows / 2;
        // Per activation tile and block, each row's `q8sums` in both 128-bit halves (what
        // the mins products take), computed once for every row pair.
        let mut q8s = vec![_mm256_setzero_si256(); nb * A];
        for p0 in (0..pairs).step_by(PB) {
            let mut a = 0;
            while a < n {
                let at = (n - a).min(A);
                for i in 0..nb {
                    for k in 0..at {
                        q8s[i * A + k] = _mm256_broadcastsi128_si256(q8sums(&ys[a + k][i]));
                    }
                }
                for p in p0..(p0 + PB).min(pairs) {
                    let wp = w.as_ptr().add(2 * p * stride);
                    let o = &mut out[2 * p * n..];
                    let t = (wp, stride, nb, &ys[a..], &q8s[..], a, n);
                    match at {
                        1 => tile::<1>(t, o),
                        2 => tile::<2>(t, o),
                        3 => tile::<3>(t, o),
                        4 => tile::<4>(t, o),
                        5 => tile::<5>(t, o),
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

    /// Rows r, r + 1 (at `wp`, `stride` apart) × activation rows `ys[0..AT]` (a0.. of the
    /// product; their `q8sums` at `q8s[i · A + a]`): writes `out[k · n + a0 + a]` for k = 0, 1.
    #[inline(always)]
    #[allow(clippy::needless_range_loop, clippy::type_complexity)]
    unsafe fn tile<const AT: usize>(
        (wp, stride, nb, ys, q8s, a0, n): (
            *const u8,
            usize,
            usize,
            &[&[BlockQ8K]],
            &[__m256i],
            usize,
            usize,
        ),
        out: &mut [f32],
    ) {
        let m4 = _mm512_set1_epi8(0xF);
        let ctrl: [__m512i; 8] =
            std::array::from_fn(|s| _mm512_broadcast_i64x4(scale_ctrl(s as i8)));
        let mut acc = [_mm512_setzero_ps(); AT];
        let mut acc_m = [_mm256_setzero_ps(); AT];
        for i in 0..nb {
            let b0 = wp.add(i * BLOCK_BYTES);
            let b1 = b0.add(stride);
            let sm0 = scales_mins_simd(b0);
            let sm1 = scales_mins_simd(b1);
            // Row r's scales in the low 128-bit lanes, row r + 1's in the high ones.
            let sc = join256(
                _mm256_broadcastsi128_si256(sm0),
                _mm256_broadcastsi128_si256(sm1),
            );
            let q8: [*const i8; AT] = std::array::from_fn(|a| ys[a].get_unchecked(i).qs.as_ptr());
            let mut sumi = [_mm512_setzero_si512(); AT];
            for j in 0..4 {
                let bits = join256(
                    _mm256_loadu_si256(b0.add(16 + 32 * j) as *const __m256i),
                    _mm256_loadu_si256(b1.add(16 + 32 * j) as *const __m256i),
                );
                // Sub-block 2j (low nibbles), then 2j + 1 (high nibbles).
                let q4 = _mm512_and_si512(bits, m4);
                let s = _mm512_shuffle_epi8(sc, ctrl[2 * j]);
                for a in 0..AT {
                    let y = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                        q8[a].add(64 * j) as *const __m256i
                    ));
                    sumi[a] = dpwssd512(sumi[a], _mm512_maddubs_epi16(q4, y), s);
                }
                let q4 = _mm512_and_si512(_mm512_srli_epi16(bits, 4), m4);
                let s = _mm512_shuffle_epi8(sc, ctrl[2 * j + 1]);
                for a in 0..AT {
                    let y = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                        q8[a].add(64 * j + 32) as *const __m256i
                    ));
                    sumi[a] = dpwssd512(sumi[a], _mm512_maddubs_epi16(q4, y), s);
                }
            }
            let (x0, x1) = (d_dmin(b0), d_dmin(b1));
            // [x.d of row r ×8 | of row r + 1 ×8] and [x.dmin of r ×4 | of r + 1 ×4].
            let xd = splat_halves(_mm_cvtss_f32(x0), _mm_cvtss_f32(x1));
            let xmin = _mm256_set_m128(
                _mm_broadcastss_ps(_mm_movehdup_ps(x1)),
                _mm_broadcastss_ps(_mm_movehdup_ps(x0)),
            );
            let mins = _mm256_set_m128i(
                _mm_cvtepu8_epi16(_mm_srli_si128(sm1, 8)),
                _mm_cvtepu8_epi16(_mm_srli_si128(sm0, 8)),
            );
            for a in 0..AT {
                let yb = ys[a].get_unchecked(i);
                // d = y.d · x.d; dmin = (−y.d) · x.dmin (ggml's two products).
                let d = _mm512_mul_ps(xd, _mm512_set1_ps(yb.d));
                acc[a] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(sumi[a]), acc[a]);
                let prod = _mm256_madd_epi16(mins, *q8s.get_unchecked(i * A + a));
                let dmin = _mm256_mul_ps(_mm256_set1_ps(-yb.d), xmin);
                acc_m[a] = _mm256_fmadd_ps(dmin, _mm256_cvtepi32_ps(prod), acc_m[a]);
            }
        }
        for a in 0..AT {
            let (lo, hi) = hsum_halves(acc[a]);
            let m_lo = _mm256_castps256_ps128(acc_m[a]);
            let m_hi = _mm256_extractf128_ps(acc_m[a], 1);
            out[a0 + a] = lo + hsum4(m_lo);
            out[n + a0 + a] = hi + hsum4(m_hi);
        }
    }
}
