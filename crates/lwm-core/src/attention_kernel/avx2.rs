//! AVX2 + FMA + F16C steps of the tiled attention kernel: 8 lanes, 16 registers, so the
//! micro-tiles are MR rows × 16 columns (two vectors).

#![allow(clippy::needless_range_loop)] // register tiles are indexed by row and lane group

use super::{drive, Elem, Job, Partial, Simd, KB};
use std::arch::x86_64::*;

pub(super) struct Avx2;

/// Entry point: the shared tiling compiled with AVX2.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn attend<E: Elem>(job: &Job, states: &mut [Partial]) {
    drive::<Avx2, E>(job, states)
}

/// exp(x) per lane for x ≤ 0 (or -inf); see the module comment.
#[inline(always)]
pub(super) unsafe fn exp_ps(x: __m256) -> __m256 {
    let lo = _mm256_set1_ps(-87.0);
    let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, lo);
    let x = _mm256_max_ps(x, lo);
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666_666_5e-1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
    let r2 = _mm256_mul_ps(r, r);
    let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
    let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    let y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    _mm256_and_ps(y, keep)
}

#[inline(always)]
unsafe fn hmax(x: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    _mm_cvtss_f32(m)
}

#[inline(always)]
pub(super) unsafe fn hsum(x: __m256) -> f32 {
    let m = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
    let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_add_ss(m, _mm_movehdup_ps(m));
    _mm_cvtss_f32(m)
}

/// The 8 sums of 8 vectors, as one vector: lane i = Σ lanes of a[i] (a horizontal-add
/// tree, then the two 128-bit halves added).
#[inline(always)]
pub(super) unsafe fn hsum8(a: &[__m256; 8]) -> __m256 {
    let h01 = _mm256_hadd_ps(a[0], a[1]);
    let h23 = _mm256_hadd_ps(a[2], a[3]);
    let h45 = _mm256_hadd_ps(a[4], a[5]);
    let h67 = _mm256_hadd_ps(a[6], a[7]);
    let h0123 = _mm256_hadd_ps(h01, h23);
    let h4567 = _mm256_hadd_ps(h45, h67);
    let lo = _mm256_permute2f128_ps::<0x20>(h0123, h4567);
    let hi = _mm256_permute2f128_ps::<0x31>(h0123, h4567);
    _mm256_add_ps(lo, hi)
}

/// kt[t·KB + j] = k[j·d + t] for j < nb (nb ≤ KB), t < d (d a multiple of 8): 8×8
/// register transposes, scalar for the last nb mod 8 keys.
#[inline(always)]
pub(super) unsafe fn transpose<E: Elem>(k: *const u8, d: usize, nb: usize, kt: *mut f32) {
    let mut j = 0;
    while j + 8 <= nb {
        let mut t = 0;
        while t < d {
            let mut r = [_mm256_setzero_ps(); 8];
            for (i, x) in r.iter_mut().enumerate() {
                *x = E::load8(k.add(((j + i) * d + t) * E::BYTES));
            }
            // 8×8 transpose: unpack pairs, then 64-bit shuffles, then 128-bit permutes.
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let cols = [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            for (i, c) in cols.into_iter().enumerate() {
                _mm256_storeu_ps(kt.add((t + i) * KB + j), c);
            }
            t += 8;
        }
        j += 8;
    }
    for jj in j..nb {
        for t in 0..d {
            *kt.add(t * KB + jj) = E::get(k.add((jj * d + t) * E::BYTES));
        }
    }
}

/// s[i·KB + 0..16] = scale · Σ_t q[i·qs + t] · kt[t·KB + 0..16], for R rows.
#[inline(always)]
unsafe fn qk_tile<const R: usize>(
    q: *const f32,
    qs: usize,
    kt: *const f32,
    d: usize,
    scale: __m256,
    s: *mut f32,
) {
    let mut c0 = [_mm256_setzero_ps(); R];
    let mut c1 = [_mm256_setzero_ps(); R];
    for t in 0..d {
        let b0 = _mm256_loadu_ps(kt.add(t * KB));
        let b1 = _mm256_loadu_ps(kt.add(t * KB + 8));
        for i in 0..R {
            let a = _mm256_broadcast_ss(&*q.add(i * qs + t));
            c0[i] = _mm256_fmadd_ps(a, b0, c0[i]);
            c1[i] = _mm256_fmadd_ps(a, b1, c1[i]);
        }
    }
    for i in 0..R {
        _mm256_storeu_ps(s.add(i * KB), _mm256_mul_ps(c0[i], scale));
        _mm256_storeu_ps(s.add(i * KB + 8), _mm256_mul_ps(c1[i], scale));
    }
}

/// acc[i·d + 0..8W] += Σ_{j<n} p[i·KB + j] · v[j·d + 0..8W], for R rows, W vectors.
#[inline(always)]
unsafe fn pv_tile<E: Elem, const R: usize, const W: usize>(
    p: *const f32,
    v: *const u8,
    d: usize,
    n: usize,
    acc: *mut f32,
) {
    let mut c = [[_mm256_setzero_ps(); W]; R];
    for i in 0..R {
        for w in 0..W {
            c[i][w] = _mm256_loadu_ps(acc.add(i * d + 8 * w));
        }
    }
    for j in 0..n {
        let mut b = [_mm256_setzero_ps(); W];
        for (w, x) in b.iter_mut().enumerate() {
            *x = E::load8(v.add((j * d + 8 * w) * E::BYTES));
        }
        for i in 0..R {
            let a = _mm256_broadcast_ss(&*p.add(i * KB + j));
            for w in 0..W {
                c[i][w] = _mm256_fmadd_ps(a, b[w], c[i][w]);
            }
        }
    }
    for i in 0..R {
        for w in 0..W {
            _mm256_storeu_ps(acc.add(i * d + 8 * w), c[i][w]);
        }
    }
}

impl Simd for Avx2 {
    const LANES: usize = 8;

    #[inline(always)]
    unsafe fn transpose<E: Elem>(k: *const u8, d: usize, nb: usize, kt: *mut f32) {
        transpose::<E>(k, d, nb, kt)
    }

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
        let scale = _mm256_set1_ps(scale);
        let mut jc = 0;
        while jc < ncols {
            qk_tile::<R>(q, qs, kt.add(jc), d, scale, s.add(jc));
            jc += 16;
        }
    }

    /// 8 keys at a time, one accumulator per key over d, then `hsum8` turns the 8
    /// accumulators into one vector of 8 scores.
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
            let mut a = [_mm256_setzero_ps(); 8];
            let mut t = 0;
            while t < d {
                let qv = _mm256_loadu_ps(q.add(t));
                for (kk, x) in a.iter_mut().enumerate() {
                    *x = _mm256_fmadd_ps(qv, E::load8(k.add(((j + kk) * d + t) * E::BYTES)), *x);
                }
                t += 8;
            }
            _mm256_storeu_ps(s.add(j), _mm256_mul_ps(hsum8(&a), scale_v));
            j += 8;
        }
        while j < ncols {
            let mut a = _mm256_setzero_ps();
            let mut t = 0;
            while t < d {
                let kv = E::load8(k.add((j * d + t) * E::BYTES));
                a = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(t)), kv, a);
                t += 8;
            }
            *s.add(j) = hsum(a) * scale;
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
        while c + 16 <= d {
            pv_tile::<E, R, 2>(p, v.add(c * E::BYTES), d, n, acc.add(c));
            c += 16;
        }
        if c < d {
            pv_tile::<E, R, 1>(p, v.add(c * E::BYTES), d, n, acc.add(c));
        }
    }

    #[inline(always)]
    unsafe fn row_max(row: *const f32, n: usize) -> f32 {
        let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
        for c in (0..n).step_by(8) {
            mx = _mm256_max_ps(mx, _mm256_loadu_ps(row.add(c)));
        }
        hmax(mx)
    }

    #[inline(always)]
    unsafe fn exp_sum(row: *mut f32, n: usize, m: f32) -> f32 {
        let mv = _mm256_set1_ps(m);
        let mut sum = _mm256_setzero_ps();
        for c in (0..n).step_by(8) {
            let e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(row.add(c)), mv));
            sum = _mm256_add_ps(sum, e);
            _mm256_storeu_ps(row.add(c), e);
        }
        hsum(sum)
    }
}
