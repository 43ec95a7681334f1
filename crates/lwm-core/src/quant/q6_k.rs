//! Q6_K weights × Q8_K activations, in llama.cpp's exact float order.
//!
//! GGUF Q6_K super-block (210 bytes, 256 weights): `ql: [u8; 128], qh: [u8; 64],
//! scales: [i8; 16], d: f16`. Weight `e` is `w_e = d·sc[e/16]·(q_e − 32)` with `q_e` six
//! bits: in half `h = e/128` (offset `r = e%128`, quarter `k = r/32`, `l = r%32`) its low
//! nibble is `ql[64h + 32(k&1) + l]` (low nibble for k < 2, high for k ≥ 2) and its two
//! high bits are bits `2k, 2k+1` of `qh[32h + l]`. So 32 consecutive weights (a "chunk",
//! `c = e/32`) come from one 32-byte run of `ql` and of `qh`, and hold sub-blocks `2c`
//! (first 16) and `2c+1`.
//!
//! `ggml_vec_dot_q6_K_q8_K` (ggml-cpu/arch/x86/quants.c, `__AVX2__` branch), per
//! super-block (the `-32` offset is taken out through the activations' `bsums`):
//!
//! ```text
//!   d = y.d · f32(x.d)                                               // f32 product
//!   sumi[t] = Σ_c  sc[2c + t/4] · Σ_{k<4} q[32c+4t+k] · y.qs[32c+4t+k]     t in 0..8,
//!           − 32 · (sc[2t]·y.bsums[2t] + sc[2t+1]·y.bsums[2t+1])           c in 0..8
//!   acc[t] = fma(d, f32(sumi[t]), acc[t])                              (exact integers)
//! result = hsum8(acc) = ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))
//! ```
//!
//! (`maddubs` pairs unsigned `q ≤ 63` with `|y| ≤ 128`, so nothing saturates, and every
//! `sumi[t]` is an exact i32.) The lane of each product and of each `bsums` term matters,
//! since lanes are rounded separately: lane `t` gathers bytes `4t..4t+3` of every chunk,
//! but the `bsums` of sub-blocks `2t, 2t+1`.
//!
//! llama.cpp's x86 build never repacks Q6_K (its `repack.cpp` does only on ARM) and its
//! llamafile GEMM takes no K-quant, so this per-element order is what its `mul_mat`
//! computes for any number of activation rows.
//!
//! The AVX2 kernel streams each row for the mat-vec (one or two activation rows); for more
//! it unpacks 4 weight rows at a time (six-bit quants to bytes, scales to `madd`
//! operands) and runs every activation row over them in tiles of 2 weight × 4 activation
//! rows, where `vpmaddwd` (one per 32 products, one more per block for the `bsums`)
//! bounds the speed.

use super::k_tiles::SuperBlock;
use super::q8::{self, BlockQ8K, QK_K};
use super::row_kernels::RowFormat;
use super::{f16_bits_to_f32, hsum8};

pub const BLOCK_BYTES: usize = 210;
/// Byte offsets of the fields in a super-block.
const QH: usize = 128;
const SCALES: usize = 192;
const D: usize = 208;

/// The Q6_K row format.
pub struct Q6K;

/// The 32 six-bit (unsigned, 0..=63) quants of chunk `c` (weights `32c..32c+32`).
#[inline(always)]
fn chunk_quants(b: &[u8], c: usize) -> [u8; 32] {
    let (h, k) = (c / 4, c % 4);
    let ql = &b[64 * h + 32 * (k & 1)..][..32];
    let qh = &b[QH + 32 * h..][..32];
    let mut q = [0u8; 32];
    for l in 0..32 {
        let lo = if k < 2 { ql[l] & 0xF } else { ql[l] >> 4 };
        q[l] = lo | (((qh[l] >> (2 * k)) & 3) << 4);
    }
    q
}

#[inline(always)]
fn block_d(b: &[u8]) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([b[D], b[D + 1]]))
}

impl RowFormat for Q6K {
    type Act = BlockQ8K;
    const ACT_ZERO: BlockQ8K = BlockQ8K::ZERO;
    const BLOCK_ELEMS: usize = QK_K;
    const BLOCK_BYTES: usize = BLOCK_BYTES;

    fn quantize_acts(x: &[f32], out: &mut [BlockQ8K], _simd: bool) {
        q8::quantize_row_q8_k(x, out)
    }

    /// ggml's `dequantize_row_q6_K`: `(d · sc) · (q − 32)`, two f32 roundings.
    fn dequantize_row(row: &[u8], out: &mut [f32]) {
        for (b, o) in row
            .chunks_exact(BLOCK_BYTES)
            .zip(out.chunks_exact_mut(QK_K))
        {
            let d = block_d(b);
            for c in 0..8 {
                let q = chunk_quants(b, c);
                for (l, &v) in q.iter().enumerate() {
                    let sc = b[SCALES + 2 * c + l / 16] as i8;
                    o[32 * c + l] = d * sc as f32 * (v as i32 - 32) as f32;
                }
            }
        }
    }

    fn dot_scalar(w: &[u8], y: &[BlockQ8K]) -> f32 {
        debug_assert_eq!(w.len(), y.len() * BLOCK_BYTES);
        let mut acc = [0.0f32; 8];
        for (b, yb) in w.chunks_exact(BLOCK_BYTES).zip(y) {
            let d = yb.d * block_d(b);
            let sc = |s: usize| b[SCALES + s] as i8 as i32;
            let mut sumi = [0i32; 8];
            for c in 0..8 {
                let q = chunk_quants(b, c);
                let ys = &yb.qs[32 * c..32 * c + 32];
                for (t, s) in sumi.iter_mut().enumerate() {
                    let dot: i32 = (4 * t..4 * t + 4).map(|p| q[p] as i32 * ys[p] as i32).sum();
                    *s += sc(2 * c + t / 4) * dot;
                }
            }
            for (t, (s, a)) in sumi.iter().zip(acc.iter_mut()).enumerate() {
                let sub =
                    sc(2 * t) * yb.bsums[2 * t] as i32 + sc(2 * t + 1) * yb.bsums[2 * t + 1] as i32;
                *a = d.mul_add((s - 32 * sub) as f32, *a);
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

    #[cfg(target_arch = "x86_64")]
    unsafe fn rows_x_acts_vnni(
        w: &[u8],
        stride: usize,
        n_rows: usize,
        ys: &[&[BlockQ8K]],
        out: &mut [f32],
    ) -> bool {
        if ys.len() >= 3 {
            avx512::rows_x_acts(w, stride, n_rows, ys, out);
        } else {
            avx2::rows_x_acts_vnni(w, stride, n_rows, ys, out);
        }
        true
    }
}

impl SuperBlock for Q6K {
    const SUB: usize = 16;
    const HAS_MIN: bool = false;
    const BIAS: i32 = 32;

    #[inline(always)]
    fn unpack(b: &[u8], codes: &mut [u8], scales: &mut [i32], _mins: &mut [i32]) -> (f32, f32) {
        for (s, sc) in scales[..16].iter_mut().enumerate() {
            *sc = b[SCALES + s] as i8 as i32;
        }
        for h in 0..2 {
            let (ql, qh) = (&b[64 * h..64 * h + 64], &b[QH + 32 * h..QH + 32 * h + 32]);
            let o = &mut codes[128 * h..128 * h + 128];
            for l in 0..32 {
                let hb = qh[l];
                o[l] = (ql[l] & 0xF) | ((hb & 3) << 4);
                o[32 + l] = (ql[32 + l] & 0xF) | (((hb >> 2) & 3) << 4);
                o[64 + l] = (ql[l] >> 4) | (((hb >> 4) & 3) << 4);
                o[96 + l] = (ql[32 + l] >> 4) | (((hb >> 6) & 3) << 4);
            }
        }
        (block_d(b), 0.0)
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::super::q8::BlockQ8K;
    use super::super::q8_0::avx2::hsum;
    use super::super::row_kernels::simd::scaled_pairs_acc;
    use super::{BLOCK_BYTES, D, QH, SCALES};
    use std::arch::x86_64::*;

    /// The 16 scales of the super-block at `b` as i16 (for the `bsums` term), and sc[0..8]
    /// / sc[8..16] repeated in both 128-bit lanes (for `chunk_scale`).
    #[inline(always)]
    unsafe fn scales(b: *const u8) -> [__m256i; 3] {
        let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(b.add(SCALES) as *const __m128i));
        let lo = _mm256_permute2x128_si256(sc16, sc16, 0x00);
        let hi = _mm256_permute2x128_si256(sc16, sc16, 0x11);
        [sc16, lo, hi]
    }

    /// Chunk `c`'s `madd` operand: `sc[2c]` in the low 8 i16 and `sc[2c+1]` in the high 8
    /// (the i16 lanes of `maddubs` over weights `32c..32c+16` and `32c+16..32c+32`).
    #[inline(always)]
    unsafe fn chunk_scale(s: &[__m256i; 3], c: usize) -> __m256i {
        let k = (c % 4) as i8;
        let (a, b) = (4 * k, 4 * k + 1);
        let m = _mm256_setr_epi8(
            a,
            b,
            a,
            b,
            a,
            b,
            a,
            b,
            a,
            b,
            a,
            b,
            a,
            b,
            a,
            b, //
            a + 2,
            b + 2,
            a + 2,
            b + 2,
            a + 2,
            b + 2,
            a + 2,
            b + 2, //
            a + 2,
            b + 2,
            a + 2,
            b + 2,
            a + 2,
            b + 2,
            a + 2,
            b + 2,
        );
        _mm256_shuffle_epi8(if c < 4 { s[1] } else { s[2] }, m)
    }

    /// The 32 six-bit quants of each chunk `4h..4h+4` of half `h`, in weight order.
    #[inline(always)]
    unsafe fn half_quants(b: *const u8, h: usize) -> [__m256i; 4] {
        let m15 = _mm256_set1_epi8(0x0F);
        let m48 = _mm256_set1_epi8(0x30);
        let ql0 = _mm256_loadu_si256(b.add(64 * h) as *const __m256i);
        let ql1 = _mm256_loadu_si256(b.add(64 * h + 32) as *const __m256i);
        let qh = _mm256_loadu_si256(b.add(QH + 32 * h) as *const __m256i);
        // qh bits 2k, 2k+1 moved to bits 4, 5 (16-bit shifts: the mask drops what crosses
        // from the neighbouring byte).
        let hi = |x: __m256i| _mm256_and_si256(x, m48);
        [
            _mm256_or_si256(_mm256_and_si256(ql0, m15), hi(_mm256_slli_epi16(qh, 4))),
            _mm256_or_si256(_mm256_and_si256(ql1, m15), hi(_mm256_slli_epi16(qh, 2))),
            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m15), hi(qh)),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m15),
                hi(_mm256_srli_epi16(qh, 2)),
            ),
        ]
    }

    #[inline(always)]
    unsafe fn block_d(b: *const u8) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            (b.add(D) as *const u16).read_unaligned() as i32,
        )))
    }

    /// `sumi + scale · maddubs(q, y)`: lane t gains the scale of bytes 4t.. × Σ of their 4
    /// products (`vpdpwssd` with `VNNI`).
    #[inline(always)]
    unsafe fn chunk_acc<const VNNI: bool>(
        sumi: __m256i,
        q: __m256i,
        y: __m256i,
        scale: __m256i,
    ) -> __m256i {
        scaled_pairs_acc::<VNNI>(sumi, _mm256_maddubs_epi16(q, y), scale)
    }

    /// The per-block f32 step: `acc = fma(y.d · x.d, f32(sumi − 32·Σ sc·bsums), acc)`.
    #[inline(always)]
    unsafe fn finish_block(
        acc: __m256,
        sumi: __m256i,
        sc16: __m256i,
        xd: f32,
        yb: &BlockQ8K,
    ) -> __m256 {
        let bsums = _mm256_loadu_si256(yb.bsums.as_ptr() as *const __m256i);
        let sub = _mm256_slli_epi32(_mm256_madd_epi16(bsums, sc16), 5);
        let d = _mm256_set1_ps(yb.d * xd);
        _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(_mm256_sub_epi32(sumi, sub)), acc)
    }

    #[inline(always)]
    unsafe fn load(p: *const i8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }

    /// One weight row · one activation row, unpacking each block as it streams by.
    #[inline(always)]
    unsafe fn row_dot<const VNNI: bool>(w: *const u8, y: &[BlockQ8K]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (i, yb) in y.iter().enumerate() {
            let b = w.add(i * BLOCK_BYTES);
            let s = scales(b);
            let yq = yb.qs.as_ptr();
            let mut sumi = _mm256_setzero_si256();
            for h in 0..2 {
                let q = half_quants(b, h);
                for (k, &qk) in q.iter().enumerate() {
                    let c = 4 * h + k;
                    sumi = chunk_acc::<VNNI>(sumi, qk, load(yq.add(32 * c)), chunk_scale(&s, c));
                }
            }
            acc = finish_block(acc, sumi, s[0], block_d(b), yb);
        }
        hsum(acc)
    }

    /// A super-block unpacked for the GEMM: its chunks' quants and `madd` scale operands,
    /// the 16 scales as i16 and `d`.
    #[derive(Clone, Copy)]
    #[repr(C, align(32))]
    pub(super) struct Prepared {
        pub(super) q: [__m256i; 8],
        pub(super) s: [__m256i; 8],
        pub(super) sc16: __m256i,
        pub(super) d: f32,
    }

    #[inline(always)]
    pub(super) unsafe fn prepare(b: *const u8, p: &mut Prepared) {
        let s = scales(b);
        for h in 0..2 {
            for (k, q) in half_quants(b, h).into_iter().enumerate() {
                p.q[4 * h + k] = q;
                p.s[4 * h + k] = chunk_scale(&s, 4 * h + k);
            }
        }
        p.sc16 = s[0];
        p.d = block_d(b);
    }

    /// `WR` prepared rows (`p`, `p + nb`, ...) × `AR` activation rows: `out[r][a]`. Each
    /// chunk's quants and scales are loaded once for all `AR` rows, each activation chunk
    /// once for all `WR` rows. `chunks` is 8, opaque to the optimizer, so that it keeps
    /// this loop (unrolled, it interleaves the activation rows and runs out of registers).
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile<const WR: usize, const AR: usize, const VNNI: bool>(
        p: *const Prepared,
        nb: usize,
        ys: [&[BlockQ8K]; AR],
        chunks: usize,
    ) -> [[f32; AR]; WR] {
        let mut acc = [[_mm256_setzero_ps(); AR]; WR];
        for i in 0..nb {
            let pr: [&Prepared; WR] = std::array::from_fn(|r| &*p.add(r * nb + i));
            let yb: [&BlockQ8K; AR] = std::array::from_fn(|a| ys[a].get_unchecked(i));
            let mut sumi = [[_mm256_setzero_si256(); AR]; WR];
            for c in 0..chunks {
                for r in 0..WR {
                    let q = *pr[r].q.get_unchecked(c);
                    let s = *pr[r].s.get_unchecked(c);
                    for a in 0..AR {
                        let y = load(yb[a].qs.as_ptr().add(32 * c));
                        sumi[r][a] = chunk_acc::<VNNI>(sumi[r][a], q, y, s);
                    }
                }
            }
            for r in 0..WR {
                for a in 0..AR {
                    acc[r][a] = finish_block(acc[r][a], sumi[r][a], pr[r].sc16, pr[r].d, yb[a]);
                }
            }
        }
        let mut out = [[0.0f32; AR]; WR];
        for r in 0..WR {
            for a in 0..AR {
                out[r][a] = hsum(acc[r][a]);
            }
        }
        out
    }

    /// Rows `r0 .. r0 + WR` (prepared at `p`) × activation rows `a0 .. a0 + AR` into `out`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_into<const WR: usize, const AR: usize, const VNNI: bool>(
        p: *const Prepared,
        nb: usize,
        ys: &[&[BlockQ8K]],
        a0: usize,
        chunks: usize,
        out: &mut [f32],
        r0: usize,
    ) {
        let n = ys.len();
        let t = tile::<WR, AR, VNNI>(p, nb, std::array::from_fn(|a| ys[a0 + a]), chunks);
        for (r, tr) in t.iter().enumerate() {
            out[(r0 + r) * n + a0..][..AR].copy_from_slice(tr);
        }
    }

    /// Weight rows prepared together; every activation row passes over them.
    const ROW_BLOCK: usize = 4;
    /// About the activation bytes one pass over the weights multiplies (rounded up to 4
    /// rows): they stay in L2 while the weights stream by.
    const ACT_BYTES: usize = 256 << 10;

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
        assert!(w.len() >= n_rows * stride && out.len() == n_rows * n);
        assert!(ys.iter().all(|y| y.len() == nb));
        let wp = w.as_ptr();
        if n <= 2 {
            // Mat-vec: nothing to share, so stream each row (measured: two rows sharing
            // the activation loads ran out of registers and were slower; for two
            // activation rows this still beats preparing the blocks).
            for (r, o) in out.chunks_exact_mut(n).enumerate() {
                for (o, y) in o.iter_mut().zip(ys) {
                    *o = row_dot::<VNNI>(wp.add(r * stride), y);
                }
            }
            return;
        }
        // GEMM: unpack ROW_BLOCK rows once, then multiply them with a group of activation
        // rows that stays in L2 (ACT_BYTES), in tiles of 2 weight rows × 4 activation rows.
        let mut prep = vec![std::mem::zeroed::<Prepared>(); ROW_BLOCK * nb];
        let chunks = std::hint::black_box(8usize);
        let group = (ACT_BYTES / (nb * std::mem::size_of::<BlockQ8K>())).max(1) * 4;
        for g0 in (0..n).step_by(group) {
            let g1 = (g0 + group).min(n);
            for r0 in (0..n_rows).step_by(ROW_BLOCK) {
                let rb = ROW_BLOCK.min(n_rows - r0);
                for (k, p) in prep[..rb * nb].iter_mut().enumerate() {
                    prepare(wp.add((r0 + k / nb) * stride + k % nb * BLOCK_BYTES), p);
                }
                let mut a0 = g0;
                while a0 < g1 {
                    let ar = (g1 - a0).min(4);
                    let mut r = 0;
                    while r < rb {
                        let wr = (rb - r).min(2);
                        let p = prep.as_ptr().add(r * nb);
                        let (o, r1) = (&mut *out, r0 + r);
                        match (wr, ar) {
                            (2, 4) => tile_into::<2, 4, VNNI>(p, nb, ys, a0, chunks, o, r1),
                            (2, 3) => tile_into::<2, 3, VNNI>(p, nb, ys, a0, chunks, o, r1),
                            (2, 2) => tile_into::<2, 2, VNNI>(p, nb, ys, a0, chunks, o, r1),
                            (2, _) => tile_into::<2, 1, VNNI>(p, nb, ys, a0, chunks, o, r1),
                            (_, 4) => tile_into::<1, 4, VNNI>(p, nb, ys, a0, chunks, o, r1),
                            (_, 3) => tile_into::<1, 3, VNNI>(p, nb, ys, a0, chunks, o, r1),
                            (_, 2) => tile_into::<1, 2, VNNI>(p, nb, ys, a0, chunks, o, r1),
                            _ => tile_into::<1, 1, VNNI>(p, nb, ys, a0, chunks, o, r1),
                        }
                        r += wr;
                    }
                    a0 += ar;
                }
            }
        }
    }
}

/// The GEMM with 512-bit vectors (AVX-512 F/BW/VL/VNNI): two weight rows per vector (lanes
/// 0..8 row r, 8..16 row r + 1, each exactly the 8 lanes of ggml's AVX2 loop) × up to 6
/// activation rows per register tile, on blocks unpacked once per row pair (`prepare`).
/// A chunk is one `vpmaddubsw` and one `vpdpwssd` per row pair and activation row, on the
/// activation's 32 quants broadcast to both halves; the integers are exact and the float
/// step per block (`d = y.d · x.d`, the FMA, ggml's 8-lane sum at the end) is the AVX2
/// kernel's, so the bits are the same.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::q8::BlockQ8K;
    use super::super::row_kernels::simd::{dpwssd512, hsum_halves, join256, splat_halves};
    use super::avx2::{prepare, Prepared};
    use super::BLOCK_BYTES;
    use std::arch::x86_64::*;

    /// Activation rows per register tile (12 accumulators, 6 sums).
    const AR: usize = 6;
    /// Row pairs unpacked together; every activation row of the group passes over them.
    const PB: usize = 2;
    /// About the activation bytes one pass over the weights multiplies: they stay in L2
    /// while the row pairs are unpacked and multiplied.
    const ACT_BYTES: usize = 256 << 10;

    /// A block of two rows unpacked: each chunk's quants and `madd` scales with row r in
    /// the low 256 bits and row r + 1 in the high ones, the 16 scales of both as i16, and
    /// `[x.d of r ×8 | x.d of r + 1 ×8]`.
    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    struct Pair {
        q: [__m512i; 8],
        s: [__m512i; 8],
        sc16: __m512i,
        d: __m512,
    }

    #[inline(always)]
    unsafe fn prepare_pair(b0: *const u8, b1: *const u8, out: &mut Pair) {
        let (mut p0, mut p1) = (
            std::mem::zeroed::<Prepared>(),
            std::mem::zeroed::<Prepared>(),
        );
        prepare(b0, &mut p0);
        prepare(b1, &mut p1);
        for c in 0..8 {
            out.q[c] = join256(p0.q[c], p1.q[c]);
            out.s[c] = join256(p0.s[c], p1.s[c]);
        }
        out.sc16 = join256(p0.sc16, p1.sc16);
        out.d = splat_halves(p0.d, p1.d);
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
        let wp = w.as_ptr();
        let pairs = n_rows / 2;
        let mut prep = vec![std::mem::zeroed::<Pair>(); PB * nb];
        // Opaque to the optimizer, as in the AVX2 tile: unrolled, the chunk loop
        // interleaves the activation rows and runs out of registers.
        let chunks = std::hint::black_box(8usize);
        let group = (ACT_BYTES / (nb * std::mem::size_of::<BlockQ8K>())).max(1) * AR;
        for g0 in (0..n).step_by(group) {
            let g1 = (g0 + group).min(n);
            for p0 in (0..pairs).step_by(PB) {
                let pb = PB.min(pairs - p0);
                for (k, pr) in prep[..pb * nb].iter_mut().enumerate() {
                    let b0 = wp.add(2 * (p0 + k / nb) * stride + k % nb * BLOCK_BYTES);
                    prepare_pair(b0, b0.add(stride), pr);
                }
                let mut a0 = g0;
                while a0 < g1 {
                    let ar = (g1 - a0).min(AR);
                    for p in 0..pb {
                        let t = Tile {
                            p: prep.as_ptr().add(p * nb),
                            nb,
                            ys: &ys[a0..],
                            chunks,
                        };
                        let o = &mut out[2 * (p0 + p) * n + a0..];
                        match ar {
                            1 => t.run::<1>(o, n),
                            2 => t.run::<2>(o, n),
                            3 => t.run::<3>(o, n),
                            4 => t.run::<4>(o, n),
                            5 => t.run::<5>(o, n),
                            _ => t.run::<AR>(o, n),
                        }
                    }
                    a0 += ar;
                }
            }
        }
        if n_rows % 2 == 1 {
            let r = n_rows - 1;
            super::avx2::rows_x_acts_vnni(&w[r * stride..], stride, 1, ys, &mut out[r * n..]);
        }
    }

    /// One unpacked row pair (`nb` blocks at `p`) and its activation rows.
    struct Tile<'a> {
        p: *const Pair,
        nb: usize,
        ys: &'a [&'a [BlockQ8K]],
        chunks: usize,
    }

    impl Tile<'_> {
        /// The pair × activation rows `ys[0..A]`: `out[k · n + a]` for rows k = 0, 1.
        #[inline(always)]
        #[allow(clippy::needless_range_loop)]
        unsafe fn run<const A: usize>(&self, out: &mut [f32], n: usize) {
            let mut acc = [_mm512_setzero_ps(); A];
            for i in 0..self.nb {
                let pr = &*self.p.add(i);
                let yb: [&BlockQ8K; A] = std::array::from_fn(|a| self.ys[a].get_unchecked(i));
                let mut sumi = [_mm512_setzero_si512(); A];
                for c in 0..self.chunks {
                    let q = *pr.q.get_unchecked(c);
                    let s = *pr.s.get_unchecked(c);
                    for a in 0..A {
                        let y = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                            yb[a].qs.as_ptr().add(32 * c) as *const __m256i,
                        ));
                        sumi[a] = dpwssd512(sumi[a], _mm512_maddubs_epi16(q, y), s);
                    }
                }
                for a in 0..A {
                    // acc = fma(y.d · x.d, f32(sumi − 32·Σ sc·bsums), acc), per row.
                    let bsums = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                        yb[a].bsums.as_ptr() as *const __m256i
                    ));
                    let sub = _mm512_slli_epi32(_mm512_madd_epi16(bsums, pr.sc16), 5);
                    let d = _mm512_mul_ps(_mm512_set1_ps(yb[a].d), pr.d);
                    let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(sumi[a], sub));
                    acc[a] = _mm512_fmadd_ps(d, v, acc[a]);
                }
            }
            for a in 0..A {
                let (lo, hi) = hsum_halves(acc[a]);
                out[a] = lo;
                out[n + a] = hi;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::row_kernels::rows_x_acts_scalar;
    use crate::quant::{matmul_with, MatmulOptions, QMatrix, QType};
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::rng::XorShift::new(seed);
        (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect()
    }

    /// Q6_K bytes of a random rows × cols matrix, quantized by candle (real-looking scales).
    fn q6k_bytes(rows: usize, cols: usize, seed: u64) -> (Vec<u8>, QTensor) {
        let w = Tensor::from_vec(random(rows * cols, seed), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q6K).unwrap();
        (q.data().unwrap().to_vec(), q)
    }

    /// Arbitrary bytes (any scale in -128..=127, any quant, any f16 `d` of moderate size).
    fn raw_bytes(blocks: usize, seed: u64) -> Vec<u8> {
        let mut rng = crate::rng::XorShift::new(seed);
        let mut v = Vec::with_capacity(blocks * BLOCK_BYTES);
        for _ in 0..blocks {
            v.extend((0..D).map(|_| rng.next_u64() as u8));
            let d = half::f16::from_f32(rng.uniform(-0.01, 0.01));
            v.extend(d.to_bits().to_le_bytes());
        }
        v
    }

    fn q8k_rows(x: &[f32], cols: usize) -> Vec<BlockQ8K> {
        let mut acts = vec![BlockQ8K::ZERO; x.len() / QK_K];
        for (o, xr) in acts.chunks_mut(cols / QK_K).zip(x.chunks(cols)) {
            q8::quantize_row_q8_k(xr, o);
        }
        acts
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn dequantize_equals_candle() {
        let (rows, cols) = (5, 1024);
        let (q_bytes, q) = q6k_bytes(rows, cols, 1);
        // Candle's own quantization, and arbitrary bytes read back by candle.
        let raw = raw_bytes(rows * cols / QK_K, 2);
        let raw_q = QTensor::new(
            candle_core::quantized::QStorage::from_data(
                std::borrow::Cow::Borrowed(&raw[..]),
                &Device::Cpu,
                GgmlDType::Q6K,
            )
            .unwrap(),
            (rows, cols),
        )
        .unwrap();
        for (bytes, q) in [(q_bytes, q), (raw, raw_q)] {
            let want: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut got = vec![0.0f32; rows * cols];
            Q6K::dequantize_row(&bytes, &mut got);
            assert_eq!(bits(&got), bits(&want));
            // Through QMatrix too.
            let m = QMatrix::new(QType::Q6K, rows, cols, bytes.into()).unwrap();
            let mut row = vec![0.0f32; cols];
            m.dequantize_row(3, &mut row);
            assert_eq!(bits(&row), bits(&want[3 * cols..4 * cols]));
        }
    }

    #[test]
    fn avx2_equals_scalar_on_odd_shapes() {
        if !crate::quant::has_avx2() {
            return;
        }
        for rows in [1, 3, 5, 13, 34] {
            for n in [1, 2, 3, 5, 6, 7, 9, 14] {
                for k in [1, 2, 3, 6] {
                    let cols = QK_K * k;
                    let seed = (rows * 100 + n * 10 + k) as u64;
                    let (quantized, _) = q6k_bytes(rows, cols, seed);
                    let raw = raw_bytes(rows * k, seed);
                    // Activations with one far larger value (coarse Q8_K steps) and plain ones.
                    let mut x = random(n * cols, seed + 1);
                    x[cols / 2] = 40.0;
                    let acts = q8k_rows(&x, cols);
                    let ys: Vec<&[BlockQ8K]> = acts.chunks(k).collect();
                    let stride = k * BLOCK_BYTES;
                    for w in [&quantized, &raw] {
                        let mut want = vec![0.0; rows * n];
                        rows_x_acts_scalar::<Q6K>(w, stride, rows, &ys, &mut want);
                        let mut got = vec![0.0; rows * n];
                        // SAFETY: AVX2 checked above; shapes as documented.
                        assert!(unsafe { Q6K::rows_x_acts_avx2(w, stride, rows, &ys, &mut got) });
                        assert_eq!(bits(&got), bits(&want), "rows {rows} cols {cols} n {n}");
                        if crate::quant::has_avx512_vnni() {
                            let mut vnni = vec![f32::NAN; rows * n];
                            // SAFETY: AVX-512 F/VL/VNNI checked; shapes as documented.
                            assert!(unsafe {
                                Q6K::rows_x_acts_vnni(w, stride, rows, &ys, &mut vnni)
                            });
                            assert_eq!(bits(&vnni), bits(&want), "VNNI rows {rows} n {n}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_blocks_avx2_equals_scalar() {
        // Every quant 63 or 0, scales ±128/127, activations ±127: the widest integer sums.
        if !crate::quant::has_avx2() {
            return;
        }
        let mut w = Vec::new();
        for (ql, qh, sc) in [(0xFFu8, 0xFFu8, 0x80u8), (0xFF, 0xFF, 0x7F), (0, 0, 0x80)] {
            w.extend([ql; 128]);
            w.extend([qh; 64]);
            w.extend([sc; 16]);
            w.extend(half::f16::from_f32(1.5).to_bits().to_le_bytes());
        }
        let mut acts = vec![BlockQ8K::ZERO; 3];
        for (i, sign) in [(0, 1.0f32), (1, -1.0), (2, 1.0)] {
            let x: Vec<f32> = (0..QK_K).map(|e| sign * (1.0 + (e % 2) as f32)).collect();
            q8::quantize_row_q8_k(&x, &mut acts[i..i + 1]);
        }
        let ys = [&acts[..]];
        let want = Q6K::dot_scalar(&w, &acts);
        let mut got = [0.0f32];
        // SAFETY: AVX2 checked above; one row of 3 blocks, one activation row of 3.
        assert!(unsafe { Q6K::rows_x_acts_avx2(&w, w.len(), 1, &ys, &mut got) });
        assert_eq!(got[0].to_bits(), want.to_bits());
        assert!(want.is_finite() && want != 0.0);
    }

    #[test]
    fn matmul_is_close_to_f32_math_and_candle() {
        let (rows, cols, n) = (37, 1024, 5);
        let (bytes, q) = q6k_bytes(rows, cols, 5);
        let m = QMatrix::new(QType::Q6K, rows, cols, bytes.into()).unwrap();
        let x = random(n * cols, 6);
        let got = crate::quant::matmul(&m, &x, n).unwrap();
        let mut wd = vec![0.0f32; rows * cols];
        for r in 0..rows {
            m.dequantize_row(r, &mut wd[r * cols..(r + 1) * cols]);
        }
        let xt = Tensor::from_vec(x.clone(), (n, cols), &Device::Cpu).unwrap();
        let candle: Vec<f32> = QMatMul::from_qtensor(q)
            .unwrap()
            .forward(&xt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let acts = q8k_rows(&x, cols);
        let nb = cols / QK_K;
        for a in 0..n {
            for r in 0..rows {
                // f64 sums of the dequantized weights × the dequantized Q8_K activations.
                let (mut exact, mut mag) = (0.0f64, 0.0f64);
                for (bi, yb) in acts[a * nb..(a + 1) * nb].iter().enumerate() {
                    for e in 0..QK_K {
                        let p =
                            wd[r * cols + bi * QK_K + e] as f64 * (yb.d * yb.qs[e] as f32) as f64;
                        exact += p;
                        mag += p.abs();
                    }
                }
                let g = got[a * rows + r] as f64;
                assert!(
                    (g - exact).abs() <= 1e-6 * mag,
                    "{g} vs {exact} (Σ|p| {mag})"
                );
                let c = candle[a * rows + r] as f64;
                assert!(
                    (g - c).abs() <= 5e-3 * mag,
                    "{g} vs candle {c} (Σ|p| {mag})"
                );
            }
        }
    }

    #[test]
    fn threads_do_not_change_bits() {
        // 3 × 96 rows × 2048 columns is past matmul's threading threshold.
        let (rows, cols) = (96, 2048);
        let (bytes, _) = q6k_bytes(rows, cols, 8);
        let m = QMatrix::new(QType::Q6K, rows, cols, bytes.into()).unwrap();
        for n in [1, 3, 8] {
            let x = random(n * cols, 9 + n as u64);
            let single = MatmulOptions {
                single_thread: true,
                ..Default::default()
            };
            let one = matmul_with(&m, &x, n, &single).unwrap();
            let many = matmul_with(&m, &x, n, &MatmulOptions::default()).unwrap();
            assert_eq!(bits(&one), bits(&many), "n {n}");
            let scalar = MatmulOptions {
                kernel: crate::quant::Kernel::Scalar,
                single_thread: false,
            };
            let s = matmul_with(&m, &x, n, &scalar).unwrap();
            assert_eq!(bits(&one), bits(&s), "n {n}: SIMD vs scalar");
        }
    }

    /// Single-thread speed against candle's own Q6_K kernels on a 4096 × 4096 matrix, and
    /// on a 512-row slice of it whose products are short enough to run between the other
    /// processes of a busy machine (run with `RAYON_NUM_THREADS=1` for single-thread candle
    /// figures):
    /// `cargo test --release -p lwm-core --lib quant::q6_k::tests::bench_q6k -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_q6k() {
        use std::time::Instant;
        let cols = 4096;
        let (bytes, _) = q6k_bytes(4096, cols, 12);
        let opts = MatmulOptions {
            single_thread: true,
            ..Default::default()
        };
        // Best of `reps` timings, ours and candle's taken in turn so that both meet the
        // same load from other processes.
        let best2 = |reps: usize, f: &mut dyn FnMut(), g: &mut dyn FnMut()| {
            f();
            g();
            let time = |h: &mut dyn FnMut()| {
                let t = Instant::now();
                h();
                t.elapsed().as_secs_f64()
            };
            (0..reps).fold((f64::INFINITY, f64::INFINITY), |(bf, bg), _| {
                (bf.min(time(f)), bg.min(time(g)))
            })
        };
        println!(
            "Q6_K, single thread; candle threads: {}",
            candle_core::utils::get_num_threads()
        );
        for (rows, scale) in [(4096usize, 1usize), (512, 8)] {
            let part = &bytes[..rows * cols / QK_K * BLOCK_BYTES];
            let m = QMatrix::new(QType::Q6K, rows, cols, part.to_vec().into()).unwrap();
            let storage = candle_core::quantized::QStorage::from_data(
                std::borrow::Cow::Borrowed(part),
                &Device::Cpu,
                GgmlDType::Q6K,
            )
            .unwrap();
            let qmm = QMatMul::from_qtensor(QTensor::new(storage, (rows, cols)).unwrap()).unwrap();
            println!("{rows} x {cols} ({:.1} MB):", m.data.len() as f64 / 1e6);
            for (n, reps) in [(1usize, 100usize), (64, 12), (512, 4)] {
                let x = random(n * cols, 13);
                let xt = Tensor::from_vec(x.clone(), (n, cols), &Device::Cpu).unwrap();
                let (ours, theirs) = best2(
                    reps * scale,
                    &mut || {
                        std::hint::black_box(matmul_with(&m, &x, n, &opts).unwrap());
                    },
                    &mut || {
                        std::hint::black_box(qmm.forward(&xt).unwrap());
                    },
                );
                if n == 1 {
                    let gb = m.data.len() as f64 / 1e9;
                    println!(
                        "  n=1   lwm {:7.2} GB/s ({:.3} ms)   candle {:7.2} GB/s ({:.3} ms)",
                        gb / ours,
                        ours * 1e3,
                        gb / theirs,
                        theirs * 1e3
                    );
                } else {
                    let gf = 2.0 * (n * rows * cols) as f64 / 1e9;
                    println!(
                        "  n={n:<3} lwm {:7.1} GFLOP/s ({:.1} ms)   candle {:7.1} GFLOP/s ({:.1} ms)",
                        gf / ours,
                        ours * 1e3,
                        gf / theirs,
                        theirs * 1e3
                    );
                }
            }
        }
    }
}
