//! AVX-512F steps of the tiled attention kernel: 16 lanes, 32 registers, so a micro-tile
//! covers MR rows × up to 64 columns (four vectors): a whole 64-key score row in QKᵀ, a
//! whole d = 64 value row in PV (24 accumulators + 4 loads + 1 broadcast of 32 registers).
//! On CPUs that split 512-bit FMAs in two halves (Zen 4) the FLOP peak is AVX2's; the
//! gain is fewer instructions and accumulator loads/stores per FMA.
//!
//! Chosen at run time wherever the CPU has AVX-512F and d is a multiple of 16; its
//! equivalence tests (`mod.rs`) check it against the portable loop and the AVX2 kernel, and
//! `lwm bench --kernels` prints both instruction sets side by side.

#![allow(clippy::needless_range_loop)] // register tiles are indexed by row and lane group

use super::avx2;
use super::{drive, Elem, Job, Partial, Simd, KB};
use std::arch::x86_64::*;

pub(super) struct Avx512;

/// Entry point: the shared tiling compiled with AVX-512F (AVX2 for the transposes).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn attend<E: Elem>(job: &Job, states: &mut [Partial]) {
    drive::<Avx512, E>(job, states)
}

/// exp(x) per lane for x ≤ 0 (or -inf): the AVX2 polynomial, lane for lane the same bits.
#[inline(always)]
pub(super) unsafe fn exp_ps(x: __m512) -> __m512 {
    let lo = _mm512_set1_ps(-87.0);
    let keep = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, lo);
    let x = _mm512_max_ps(x, lo);
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_199_9e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.666_666_5e-1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
    let r2 = _mm512_mul_ps(r, r);
    let y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
    let e = _mm512_slli_epi32::<23>(_mm512_add_epi32(
        _mm512_cvtps_epi32(n),
        _mm512_set1_epi32(127),
    ));
    let y = _mm512_mul_ps(y, _mm512_castsi512_ps(e));
    _mm512_maskz_mov_ps(keep, y)
}

/// The low and high 256-bit halves of x added (AVX-512F only: no DQ extract).
#[inline(always)]
unsafe fn fold_halves(x: __m512) -> __m256 {
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)));
    _mm256_add_ps(_mm512_castps512_ps256(x), hi)
}

/// s[i·KB + 0..16W] = scale · Σ_t q[i·qs + t] · kt[t·KB + 0..16W], for R rows.
#[inline(always)]
unsafe fn qk_tile<const R: usize, const W: usize>(
    q: *const f32,
    qs: usize,
    kt: *const f32,
    d: usize,
    scale: __m512,
    s: *mut f32,
) {
    let mut c = [[_mm512_setzero_ps(); W]; R];
    for t in 0..d {
        let mut b = [_mm512_setzero_ps(); W];
        for (w, x) in b.iter_mut().enumerate() {
            *x = _mm512_loadu_ps(kt.add(t * KB + 16 * w));
        }
        for i in 0..R {
            let a = _mm512_set1_ps(*q.add(i * qs + t));
            for w in 0..W {
                c[i][w] = _mm512_fmadd_ps(a, b[w], c[i][w]);
            }
        }
    }
    for i in 0..R {
        for w in 0..W {
            _mm512_storeu_ps(s.add(i * KB + 16 * w), _mm512_mul_ps(c[i][w], scale));
        }
    }
}

/// acc[i·d + 0..16W] += Σ_{j<n} p[i·KB + j] · v[j·d + 0..16W], for R rows, W vectors.
#[inline(always)]
unsafe fn pv_tile<E: Elem, const R: usize, const W: usize>(
    p: *const f32,
    v: *const u8,
    d: usize,
    n: usize,
    acc: *mut f32,
) {
    let mut c = [[_mm512_setzero_ps(); W]; R];
    for i in 0..R {
        for w in 0..W {
            c[i][w] = _mm512_loadu_ps(acc.add(i * d + 16 * w));
        }
    }
    for j in 0..n {
        let mut b = [_mm512_setzero_ps(); W];
        for (w, x) in b.iter_mut().enumerate() {
            *x = E::load16(v.add((j * d + 16 * w) * E::BYTES));
        }
        for i in 0..R {
            let a = _mm512_set1_ps(*p.add(i * KB + j));
            for w in 0..W {
                c[i][w] = _mm512_fmadd_ps(a, b[w], c[i][w]);
            }
        }
    }
    for i in 0..R {
        for w in 0..W {
            _mm512_storeu_ps(acc.add(i * d + 16 * w), c[i][w]);
        }
    }
}

impl Simd for Avx512 {
    const LANES: usize = 16;

    /// The AVX2 8×8 transposes: the block is transposed once per sub-block and used by
    /// every query row, so its cost is small next to the products.
    #[inline(always)]
    unsafe fn transpose<E: Elem>(k: *const u8, d: usize, nb: usize, kt: *mut f32) {
        avx2::transpose::<E>(k, d, nb, kt)
    }

    /// One micro-tile covers every column (ncols ≤ KB = 64 = 4 vectors).
    #[inline(always)]
    unsafe fn qk_rows<const R: usize>(
        q: *const f32,
        qs: usize,
        kt: *const f32,
        d: usize,
        ncols: usize,
        scale: f32,
        s: *mut f32,
    ) {
        let scale = _mm512_set1_ps(scale);
        match ncols.div_ceil(16) {
            0 => {}
            1 => qk_tile::<R, 1>(q, qs, kt, d, scale, s),
            2 => qk_tile::<R, 2>(q, qs, kt, d, scale, s),
            3 => qk_tile::<R, 3>(q, qs, kt, d, scale, s),
            _ => qk_tile::<R, 4>(q, qs, kt, d, scale, s),
        }
    }

    /// 8 keys at a time, one 16-lane accumulator per key over d; each accumulator's two
    /// halves are added, then the AVX2 add tree gives one vector of 8 scores.
    #[inline(always)]
    unsafe fn qk_dots<E: Elem>(
        q: *const f32,
        k: *const u8,
        d: usize,
        ncols: usize,
        scale: f32,
        s: *mut f32,
    ) {
        let scale_v = _mm256_set1_ps(scale);
        let mut j = 0;
        while j + 8 <= ncols {
            let mut a = [_mm512_setzero_ps(); 8];
            let mut t = 0;
            while t < d {
                let qv = _mm512_loadu_ps(q.add(t));
                for (kk, x) in a.iter_mut().enumerate() {
                    let kv = E::load16(k.add(((j + kk) * d + t) * E::BYTES));
                    *x = _mm512_fmadd_ps(qv, kv, *x);
                }
                t += 16;
            }
            let mut halves = [_mm256_setzero_ps(); 8];
            for (h, x) in halves.iter_mut().zip(a) {
                *h = fold_halves(x);
            }
            _mm256_storeu_ps(s.add(j), _mm256_mul_ps(avx2::hsum8(&halves), scale_v));
            j += 8;
        }
        while j < ncols {
            let mut a = _mm512_setzero_ps();
            let mut t = 0;
            while t < d {
                let kv = E::load16(k.add((j * d + t) * E::BYTES));
                a = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(t)), kv, a);
                t += 16;
            }
            *s.add(j) = avx2::hsum(fold_halves(a)) * scale;
            j += 1;
        }
    }

    #[inline(always)]
    unsafe fn pv_rows<E: Elem, const R: usize>(
        p: *const f32,
        v: *const u8,
        d: usize,
        n: usize,
        acc: *mut f32,
    ) {
        let mut c = 0;
        while c + 64 <= d {
            pv_tile::<E, R, 4>(p, v.add(c * E::BYTES), d, n, acc.add(c));
            c += 64;
        }
        match (d - c) / 16 {
            0 => {}
            1 => pv_tile::<E, R, 1>(p, v.add(c * E::BYTES), d, n, acc.add(c)),
            2 => pv_tile::<E, R, 2>(p, v.add(c * E::BYTES), d, n, acc.add(c)),
            _ => pv_tile::<E, R, 3>(p, v.add(c * E::BYTES), d, n, acc.add(c)),
        }
    }

    #[inline(always)]
    unsafe fn row_max(row: *const f32, n: usize) -> f32 {
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        for c in (0..n).step_by(16) {
            mx = _mm512_max_ps(mx, _mm512_loadu_ps(row.add(c)));
        }
        _mm512_reduce_max_ps(mx)
    }

    #[inline(always)]
    unsafe fn exp_sum(row: *mut f32, n: usize, m: f32) -> f32 {
        let mv = _mm512_set1_ps(m);
        let mut sum = _mm512_setzero_ps();
        for c in (0..n).step_by(16) {
            let e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(row.add(c)), mv));
            sum = _mm512_add_ps(sum, e);
            _mm512_storeu_ps(row.add(c), e);
        }
        _mm512_reduce_add_ps(sum)
    }
}
