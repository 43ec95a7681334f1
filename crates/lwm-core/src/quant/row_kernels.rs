//! The common shape of the kernels of a weight format stored as GGUF lays it out (row-major
//! blocks, no interleaving): Q4_0 and Q5_0 (multiplied with Q8_0 activations) and the
//! K-quants Q4_K, Q5_K and Q6_K (with Q8_K activations). `matmul` drives any `RowFormat`:
//! it quantizes each activation row once, splits the weight rows over the pool and calls
//! the widest kernel the CPU has.
//!
//! Every output element is one full-row dot product in ggml's float order for that format
//! (`ggml_vec_dot_*` of ggml-cpu's x86 build), computed by one task, so the result is the
//! same for any thread count, row grouping or ISA.

/// One weight block format's kernels.
pub trait RowFormat {
    /// The activation block its dot products take (`q8::BlockQ8_0`, `q8::BlockQ8K`).
    type Act: Copy + Send + Sync;
    const ACT_ZERO: Self::Act;
    /// Weights in one block, also the values in one activation block.
    const BLOCK_ELEMS: usize;
    /// Bytes of one weight block.
    const BLOCK_BYTES: usize;

    /// Quantizes one activation row (length a multiple of `BLOCK_ELEMS`) as ggml's x86
    /// build does for this format; `simd` may pick a faster path with the same bits.
    fn quantize_acts(x: &[f32], out: &mut [Self::Act], simd: bool);

    /// One row of blocks to f32 (ggml's `dequantize_row_*`).
    fn dequantize_row(row: &[u8], out: &mut [f32]);

    /// One full-row dot product, portable, in the float order of ggml's AVX2 `vec_dot`.
    fn dot_scalar(w: &[u8], y: &[Self::Act]) -> f32;

    /// `out[r * ys.len() + a] = dot(row r, ys[a])` for `n_rows` rows `stride` bytes apart,
    /// bit-identical to `dot_scalar`; `false` where the format has no AVX2 kernel (the
    /// caller then runs `dot_scalar`).
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `w` holds `n_rows` rows, `out` is `n_rows ×
    /// ys.len()`, every `ys[a]` has `stride / BLOCK_BYTES` blocks.
    #[cfg(target_arch = "x86_64")]
    unsafe fn rows_x_acts_avx2(
        _w: &[u8],
        _stride: usize,
        _n_rows: usize,
        _ys: &[&[Self::Act]],
        _out: &mut [f32],
    ) -> bool {
        false
    }

    /// As `rows_x_acts_avx2`, with AVX-512 (F, BW, VL, VNNI) where the format gains from
    /// it; `false` falls back to AVX2.
    ///
    /// # Safety
    /// As `rows_x_acts_avx2`, and the CPU must have AVX-512 F/VL/VNNI.
    #[cfg(target_arch = "x86_64")]
    unsafe fn rows_x_acts_vnni(
        _w: &[u8],
        _stride: usize,
        _n_rows: usize,
        _ys: &[&[Self::Act]],
        _out: &mut [f32],
    ) -> bool {
        false
    }
}

/// The portable loop over rows and activation rows.
pub fn rows_x_acts_scalar<F: RowFormat>(
    w: &[u8],
    stride: usize,
    n_rows: usize,
    ys: &[&[F::Act]],
    out: &mut [f32],
) {
    for r in 0..n_rows {
        let wr = &w[r * stride..(r + 1) * stride];
        for (a, y) in ys.iter().enumerate() {
            out[r * ys.len() + a] = F::dot_scalar(wr, y);
        }
    }
}

/// A GEMM register tile: one weight row against `AR` (1 to 8) consecutive activation rows.
pub trait RowTile {
    type Act;
    /// `out[k] = dot(row at wr, ys[a0 + k])` for k < AR, in the format's order.
    ///
    /// # Safety
    /// The CPU has the tile's instructions; `wr` points at a whole row of `stride` bytes;
    /// `ys[a0..a0 + AR]` exist and each has the row's block count.
    unsafe fn row_x_acts<const AR: usize>(
        wr: *const u8,
        stride: usize,
        ys: &[&[Self::Act]],
        a0: usize,
        out: &mut [f32],
    );
}

/// Bytes of weight rows kept in cache while every activation tile passes over them.
const ROW_BLOCK_BYTES: usize = 64 << 10;

/// The GEMM loop the per-row kernels share (n > 1): blocks of weight rows that stay in L2,
/// and for each, tiles of up to 8 activation rows that share each unpacked weight block.
/// `out[r * ys.len() + a]` = row r · ys[a]. Inline it into a `#[target_feature]` function.
///
/// # Safety
/// As `RowTile::row_x_acts`, for `n_rows` rows `stride` bytes apart from `wp`; `out` holds
/// `n_rows * ys.len()` values.
#[inline(always)]
pub unsafe fn gemm_rows<T: RowTile>(
    wp: *const u8,
    stride: usize,
    n_rows: usize,
    ys: &[&[T::Act]],
    out: &mut [f32],
) {
    let n = ys.len();
    let block_rows = (ROW_BLOCK_BYTES / stride).max(1);
    for r0 in (0..n_rows).step_by(block_rows) {
        let r1 = (r0 + block_rows).min(n_rows);
        let mut a = 0;
        while a < n {
            let ar = (n - a).min(8);
            for r in r0..r1 {
                let (wr, o) = (wp.add(r * stride), &mut out[r * n + a..r * n + a + ar]);
                match ar {
                    8 => T::row_x_acts::<8>(wr, stride, ys, a, o),
                    7 => T::row_x_acts::<7>(wr, stride, ys, a, o),
                    6 => T::row_x_acts::<6>(wr, stride, ys, a, o),
                    5 => T::row_x_acts::<5>(wr, stride, ys, a, o),
                    4 => T::row_x_acts::<4>(wr, stride, ys, a, o),
                    3 => T::row_x_acts::<3>(wr, stride, ys, a, o),
                    2 => T::row_x_acts::<2>(wr, stride, ys, a, o),
                    _ => T::row_x_acts::<1>(wr, stride, ys, a, o),
                }
            }
            a += ar;
        }
    }
}

/// Integer building blocks shared by the formats' AVX2 and AVX-512 VNNI kernels.
#[cfg(target_arch = "x86_64")]
pub mod simd {
    use std::arch::x86_64::*;

    /// `[lo | hi]` as one 512-bit vector: the two-rows-per-vector layout of the AVX-512
    /// GEMMs (row r in the low half, row r + 1 in the high one).
    ///
    /// # Safety
    /// The CPU has AVX-512 F; inline into a function that enables it.
    #[inline(always)]
    pub unsafe fn join256(lo: __m256i, hi: __m256i) -> __m512i {
        _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
    }

    /// `[a ×8 | b ×8]`: a per-row f32 factor in that layout.
    ///
    /// # Safety
    /// As `join256`.
    #[inline(always)]
    pub unsafe fn splat_halves(a: f32, b: f32) -> __m512 {
        _mm512_castpd_ps(_mm512_insertf64x4(
            _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_set1_ps(a))),
            _mm256_castps_pd(_mm256_set1_ps(b)),
            1,
        ))
    }

    /// ggml's 8-lane sum (`q8_0::avx2::hsum`) of each half: the two rows' results in that
    /// layout.
    ///
    /// # Safety
    /// As `join256`.
    #[inline(always)]
    pub unsafe fn hsum_halves(v: __m512) -> (f32, f32) {
        let hsum = super::super::q8_0::avx2::hsum;
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
        (hsum(lo), hsum(hi))
    }

    /// `acc + vpmaddwd(a, b)` on 512-bit vectors as one `vpdpwssd`. Written in assembly
    /// because LLVM reassociates the intrinsic's adds along a chain and emits `vpmaddwd` +
    /// `vpaddd` (in the Q4_K GEMM, 80 of its 90 were split): one more instruction per
    /// sub-block, activation row and row pair.
    ///
    /// # Safety
    /// The CPU has AVX-512 F and VNNI.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn dpwssd512(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
        let mut acc = acc;
        // SAFETY: register-only arithmetic; the target features are enabled here.
        std::arch::asm!(
            "vpdpwssd {acc}, {a}, {b}",
            acc = inout(zmm_reg) acc,
            a = in(zmm_reg) a,
            b = in(zmm_reg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
        acc
    }

    /// `acc + madd(scale, p)`: the i16 lanes of `p` (`maddubs` pair sums) times the i16
    /// scales, summed in pairs into the i32 lanes of `acc`. With `VNNI` this is one
    /// `vpdpwssd` instead of `vpmaddwd` + `vpaddd`; both wrap the same way, so the
    /// integers (and everything computed from them) are identical.
    ///
    /// # Safety
    /// The CPU has AVX2, and AVX-512 VL/VNNI when `VNNI`; inline into a function that
    /// enables them.
    #[inline(always)]
    pub unsafe fn scaled_pairs_acc<const VNNI: bool>(
        acc: __m256i,
        p: __m256i,
        scale: __m256i,
    ) -> __m256i {
        if VNNI {
            _mm256_dpwssd_epi32(acc, p, scale)
        } else {
            _mm256_add_epi32(acc, _mm256_madd_epi16(scale, p))
        }
    }

    /// `acc + Σ_{k<4} u[4t+k]·s[4t+k]` per i32 lane t (u unsigned, s signed bytes, both
    /// < 2^7 in magnitude as the callers use it, so `maddubs` does not saturate): one
    /// `vpdpbusd` with `VNNI`, else `maddubs` + `madd` by ones + add. Same integers.
    ///
    /// # Safety
    /// As `scaled_pairs_acc`.
    #[inline(always)]
    pub unsafe fn u8s8_quads_acc<const VNNI: bool>(
        acc: __m256i,
        u: __m256i,
        s: __m256i,
    ) -> __m256i {
        if VNNI {
            _mm256_dpbusd_epi32(acc, u, s)
        } else {
            let p = _mm256_maddubs_epi16(u, s);
            _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
        }
    }
}
