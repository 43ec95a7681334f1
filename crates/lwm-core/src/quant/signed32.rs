//! What Q4_0 and Q5_0 share: blocks of 32 weights `w_e = d·q_e`, `d` an f16 in the block's
//! first two bytes and `q_e` a small signed integer (Q4_0: [-8, 7], Q5_0: [-16, 15]), dotted
//! with Q8_0 activations. `ggml_vec_dot_q4_0_q8_0` and `ggml_vec_dot_q5_0_q8_0` (x86,
//! `__AVX2__` branch) differ only in how a block unpacks to 32 signed bytes; then, per block:
//!
//! ```text
//!   dd = f32(x.d) · y.d                                          // f32 product
//!   acc[l] = fma(dd, f32(Σ_{e=4l}^{4l+3} q_e · y.qs[e]), acc[l])   l in 0..8 (exact integers:
//!                                                                 |x|·sign(y, x) via maddubs + madd)
//! result = hsum8(acc) = ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7))
//! ```

use super::hsum8;
use super::q8::{self, BlockQ8_0, QK};
use super::row_kernels::RowFormat;

/// A 32-wide block format of signed quants with one f16 scale first.
pub trait Signed32 {
    const BYTES: usize;
    /// The 32 quants of block `b`, in element order.
    fn quants(b: &[u8]) -> [i8; QK];
    /// The same, 32 bytes from the block at `p`.
    ///
    /// # Safety
    /// AVX2 present; `p` points at a whole block.
    #[cfg(target_arch = "x86_64")]
    unsafe fn quants_avx2(p: *const u8) -> std::arch::x86_64::__m256i;
}

/// Every `Signed32` format is a row format on Q8_0 activations with these kernels.
impl<S: Signed32> RowFormat for S {
    type Act = BlockQ8_0;
    const ACT_ZERO: BlockQ8_0 = BlockQ8_0::ZERO;
    const BLOCK_ELEMS: usize = QK;
    const BLOCK_BYTES: usize = S::BYTES;

    fn quantize_acts(x: &[f32], out: &mut [BlockQ8_0], simd: bool) {
        if simd {
            q8::quantize_row_q8_0(x, out)
        } else {
            q8::quantize_row_q8_0_scalar(x, out)
        }
    }

    fn dequantize_row(row: &[u8], out: &mut [f32]) {
        dequantize_row::<S>(row, out)
    }

    fn dot_scalar(w: &[u8], y: &[BlockQ8_0]) -> f32 {
        dot_scalar::<S>(w, y)
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn rows_x_acts_avx2(
        w: &[u8],
        stride: usize,
        n_rows: usize,
        ys: &[&[BlockQ8_0]],
        out: &mut [f32],
    ) -> bool {
        avx2::rows_x_acts::<S>(w, stride, n_rows, ys, out);
        true
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn rows_x_acts_vnni(
        w: &[u8],
        stride: usize,
        n_rows: usize,
        ys: &[&[BlockQ8_0]],
        out: &mut [f32],
    ) -> bool {
        if ys.len() >= 2 {
            avx512::rows_x_acts::<S>(w, stride, n_rows, ys, out);
        } else {
            avx2::rows_x_acts_vnni::<S>(w, stride, n_rows, ys, out);
        }
        true
    }
}

#[inline(always)]
fn scale(b: &[u8]) -> f32 {
    super::f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]))
}

/// ggml's `dequantize_row_*`: `f32(q) · d`.
pub fn dequantize_row<S: Signed32>(row: &[u8], out: &mut [f32]) {
    for (b, o) in row.chunks_exact(S::BYTES).zip(out.chunks_exact_mut(QK)) {
        let d = scale(b);
        for (v, q) in o.iter_mut().zip(S::quants(b)) {
            *v = q as f32 * d;
        }
    }
}

/// One full-row dot product in ggml's AVX2 order, portable.
pub fn dot_scalar<S: Signed32>(w: &[u8], y: &[BlockQ8_0]) -> f32 {
    debug_assert_eq!(w.len(), y.len() * S::BYTES);
    let mut acc = [0.0f32; 8];
    for (b, yb) in w.chunks_exact(S::BYTES).zip(y) {
        let dd = scale(b) * yb.d;
        let q = S::quants(b);
        for (l, a) in acc.iter_mut().enumerate() {
            let s: i32 = (4 * l..4 * l + 4)
                .map(|e| q[e] as i32 * yb.qs[e] as i32)
                .sum();
            *a = dd.mul_add(s as f32, *a);
        }
    }
    hsum8(&acc)
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::super::q8::BlockQ8_0;
    use super::super::q8_0::avx2::hsum;
    use super::super::row_kernels::simd::u8s8_quads_acc;
    use super::super::row_kernels::{gemm_rows, RowTile};
    use super::Signed32;
    use std::arch::x86_64::*;

    #[inline(always)]
    pub(super) unsafe fn scale(p: *const u8) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            (p as *const u16).read_unaligned() as i32,
        )))
    }

    /// `WR` weight rows × `AR` activation rows, `out[r][a] = dot(w_r, y_a)`.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile<S: Signed32, const WR: usize, const AR: usize, const VNNI: bool>(
        w: *const u8,
        stride: usize,
        ys: [&[BlockQ8_0]; AR],
        out: &mut [[f32; AR]; WR],
    ) {
        let nb = ys[0].len();
        let mut acc = [[_mm256_setzero_ps(); AR]; WR];
        for b in 0..nb {
            for r in 0..WR {
                let p = w.add(r * stride + b * S::BYTES);
                let d = _mm256_set1_ps(scale(p));
                let qx = S::quants_avx2(p);
                let ax = _mm256_sign_epi8(qx, qx);
                for a in 0..AR {
                    let yb = ys[a].get_unchecked(b);
                    let qy = _mm256_loadu_si256(yb.qs.as_ptr() as *const __m256i);
                    let z = _mm256_setzero_si256();
                    let sumi = u8s8_quads_acc::<VNNI>(z, ax, _mm256_sign_epi8(qy, qx));
                    let s = _mm256_cvtepi32_ps(sumi);
                    // f32(x.d)·y.d: a vector product is the same IEEE product.
                    let dd = _mm256_mul_ps(d, _mm256_broadcast_ss(&yb.d));
                    acc[r][a] = _mm256_fmadd_ps(dd, s, acc[r][a]);
                }
            }
        }
        for r in 0..WR {
            for a in 0..AR {
                out[r][a] = hsum(acc[r][a]);
            }
        }
    }

    /// The GEMM tile (n > 1): one weight row × up to 8 activation rows (8 measured ~5-10%
    /// faster than 4).
    struct Gemm<S, const VNNI: bool>(std::marker::PhantomData<S>);

    impl<S: Signed32, const VNNI: bool> RowTile for Gemm<S, VNNI> {
        type Act = BlockQ8_0;
        #[inline(always)]
        unsafe fn row_x_acts<const AR: usize>(
            wr: *const u8,
            stride: usize,
            ys: &[&[BlockQ8_0]],
            a0: usize,
            out: &mut [f32],
        ) {
            let mut o = [[0.0f32; AR]; 1];
            tile::<S, 1, AR, VNNI>(wr, stride, std::array::from_fn(|k| ys[a0 + k]), &mut o);
            out.copy_from_slice(&o[0]);
        }
    }

    /// As `RowFormat::rows_x_acts_avx2`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows_x_acts<S: Signed32>(
        w: &[u8],
        stride: usize,
        n_rows: usize,
        ys: &[&[BlockQ8_0]],
        out: &mut [f32],
    ) {
        rows_x_acts_with::<S, false>(w, stride, n_rows, ys, out)
    }

    /// `rows_x_acts` with AVX-512 VNNI's `vpdpbusd` for the 4-sums (identical bits).
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn rows_x_acts_vnni<S: Signed32>(
        w: &[u8],
        stride: usize,
        n_rows: usize,
        ys: &[&[BlockQ8_0]],
        out: &mut [f32],
    ) {
        rows_x_acts_with::<S, true>(w, stride, n_rows, ys, out)
    }

    #[inline(always)]
    unsafe fn rows_x_acts_with<S: Signed32, const VNNI: bool>(
        w: &[u8],
        stride: usize,
        n_rows: usize,
        ys: &[&[BlockQ8_0]],
        out: &mut [f32],
    ) {
        let n = ys.len();
        assert!(w.len() >= n_rows * stride && out.len() == n_rows * n);
        assert!(ys.iter().all(|y| y.len() * S::BYTES == stride));
        let wp = w.as_ptr();
        if n == 1 {
            // Mat-vec: one row at a time (measured ~5% faster than 2 or 4 rows sharing
            // each activation block, as for Q8_0).
            for (r, o) in out.iter_mut().enumerate() {
                let mut t = [[0.0f32; 1]; 1];
                tile::<S, 1, 1, VNNI>(wp.add(r * stride), stride, [ys[0]], &mut t);
                *o = t[0][0];
            }
            return;
        }
        gemm_rows::<Gemm<S, VNNI>>(wp, stride, n_rows, ys, out);
    }
}

/// The GEMM with AVX-512 VNNI: two weight rows per 512-bit vector (lanes 0..8 row r, 8..16
/// row r + 1, each the 8 lanes of ggml's AVX2 loop) × up to 8 activation rows per register
/// tile. The quants are offset to unsigned for `vpdpbusd`, and each lane's sum starts from
/// −128·Σ q_y (shared by both rows):
///
/// ```text
///   Σ_{4 bytes of lane l} q·q_y = Σ (q + 128)·q_y − 128·Σ q_y      (exact in i32)
/// ```
///
/// so the integers are the AVX2 kernel's, and so is every float step (`dd = f32(x.d)·y.d`,
/// the FMA into lane l, ggml's 8-lane sum), hence the same bits.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::super::q8::BlockQ8_0;
    use super::super::row_kernels::simd::{hsum_halves, join256, splat_halves};
    use super::avx2::scale;
    use super::Signed32;
    use std::arch::x86_64::*;

    /// Activation rows per register tile (16 accumulators with two row pairs).
    const AR: usize = 8;
    /// Row pairs per register tile.
    const RP: usize = 2;

    /// `out[r * ys.len() + a]` = row r · ys[a] for `n_rows` rows `stride` bytes apart.
    ///
    /// SAFETY: AVX-512 F/BW/VL/VNNI and AVX2/FMA/F16C available; `w` holds `n_rows` rows of
    /// `stride` bytes (whole blocks); every `ys[a]` has `stride / S::BYTES` blocks; `out` has
    /// `n_rows · ys.len()` values.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub unsafe fn rows_x_acts<S: Signed32>(
        w: &[u8],
        stride: usize,
        n_rows: usize,
        ys: &[&[BlockQ8_0]],
        out: &mut [f32],
    ) {
        let n = ys.len();
        assert!(w.len() >= n_rows * stride && out.len() == n_rows * n);
        assert!(ys.iter().all(|y| y.len() * S::BYTES == stride));
        let wp = w.as_ptr();
        let mut r = 0;
        while r + 2 <= n_rows {
            let rp = if r + 2 * RP <= n_rows { RP } else { 1 };
            let mut a = 0;
            while a < n {
                let at = (n - a).min(AR);
                let acts = &ys[a..];
                let o = &mut out[r * n + a..];
                let p = wp.add(r * stride);
                macro_rules! go {
                    ($rp:literal) => {
                        match at {
                            1 => tile::<S, $rp, 1>(p, stride, acts, o, n),
                            2 => tile::<S, $rp, 2>(p, stride, acts, o, n),
                            3 => tile::<S, $rp, 3>(p, stride, acts, o, n),
                            4 => tile::<S, $rp, 4>(p, stride, acts, o, n),
                            5 => tile::<S, $rp, 5>(p, stride, acts, o, n),
                            6 => tile::<S, $rp, 6>(p, stride, acts, o, n),
                            7 => tile::<S, $rp, 7>(p, stride, acts, o, n),
                            _ => tile::<S, $rp, AR>(p, stride, acts, o, n),
                        }
                    };
                }
                if rp == RP {
                    go!(2)
                } else {
                    go!(1)
                }
                a += at;
            }
            r += 2 * rp;
        }
        if r < n_rows {
            super::avx2::rows_x_acts_vnni::<S>(&w[r * stride..], stride, 1, ys, &mut out[r * n..]);
        }
    }

    /// Row pairs p (rows 2p, 2p + 1 of the `2·P` rows at `w`, `stride` apart) × activation
    /// rows `ys[0..A]`: writes `out[k · n + a]` for the tile's rows k.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn tile<S: Signed32, const P: usize, const A: usize>(
        w: *const u8,
        stride: usize,
        ys: &[&[BlockQ8_0]],
        out: &mut [f32],
        n: usize,
    ) {
        let nb = stride / S::BYTES;
        let c80 = _mm512_set1_epi8(-128);
        let zero = _mm512_setzero_si512();
        let mut acc = [[_mm512_setzero_ps(); A]; P];
        for b in 0..nb {
            let mut qx = [zero; P];
            let mut dp = [_mm512_setzero_ps(); P];
            for p in 0..P {
                let b0 = w.add(2 * p * stride + b * S::BYTES);
                let b1 = b0.add(stride);
                let q = join256(S::quants_avx2(b0), S::quants_avx2(b1));
                qx[p] = _mm512_xor_si512(q, c80);
                // [x.d of row 2p ×8 | of row 2p + 1 ×8]
                dp[p] = splat_halves(scale(b0), scale(b1));
            }
            for a in 0..A {
                let yb = ys[a].get_unchecked(b);
                let qy =
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(yb.qs.as_ptr() as *const __m256i));
                let neg = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, c80, qy));
                let dy = _mm512_set1_ps(yb.d);
                for p in 0..P {
                    let s = _mm512_dpbusd_epi32(neg, qx[p], qy);
                    // f32(x.d)·y.d: a vector product is the same IEEE product.
                    let dd = _mm512_mul_ps(dp[p], dy);
                    acc[p][a] = _mm512_fmadd_ps(dd, _mm512_cvtepi32_ps(s), acc[p][a]);
                }
            }
        }
        for p in 0..P {
            for a in 0..A {
                let (lo, hi) = hsum_halves(acc[p][a]);
                out[2 * p * n + a] = lo;
                out[(2 * p + 1) * n + a] = hi;
            }
        }
    }
}
