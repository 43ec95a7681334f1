//! The tiled SIMD body of `attention::attend_block` (AVX2 + FMA, chosen at run time).
//!
//! Same semantics as the portable row-at-a-time loop (`attention::attend_block_portable`):
//! for query rows Q (nq × d) and one key/value block K, V (nk × d), with the causal and
//! segment masks, it updates the online-softmax partial (acc, m, l). The work is tiled:
//!
//! ```text
//!   for each key sub-block J of KB keys:          Kᵀ_J = transpose(K_J)   (d × KB, once)
//!     for each tile I of MR query rows:
//!       S   = scale · Q_I Kᵀ_J                    MR×16 register micro-kernel over d
//!       S[i,j] = -inf where (i, j) is masked      (causal, segments, past the block)
//!       m'_i = max(m_i, max_j S[i,j]);  P = exp(S - m')     (vector polynomial exp)
//!       l_i  = l_i · exp(m_i - m'_i) + Σ_j P[i,j]
//!       acc_I = acc_I · exp(m - m') + P V_J        MR×16 register micro-kernel over keys
//! ```
//!
//! The QKᵀ micro-kernel broadcasts one query element per row and multiplies it into 16
//! consecutive keys of Kᵀ (two 8-lane vectors): MR·2 accumulators, 2 + MR loads per
//! 2·MR FMAs. The PV micro-kernel broadcasts P[i,j] and multiplies it into 16 values of
//! row j of V. With fewer than `DIRECT_ROWS` query rows (decode: the GQA group's heads)
//! the scores are instead 8 dot products at a time read straight from K (`qk_dots`), since
//! transposing a block would cost as much as using it. Rows where every key is masked are
//! left untouched (as the portable loop).
//! `exp` is a degree-6 polynomial on the reduced argument r = x − n·ln2, |r| ≤ ln2/2,
//! times 2ⁿ built in the exponent bits (relative error ~1 ulp); inputs below −87 give 0.

use crate::attention::{BlockMask, Partial};

/// Query rows per micro-tile.
const MR: usize = 6;
/// Keys per sub-block (the width of the transposed K and of a score row).
const KB: usize = 64;
/// Below this many query rows the scores are dot products straight from K (no transpose).
const DIRECT_ROWS: usize = 4;

/// True when the SIMD kernel can run for head dimension `d` on this CPU.
pub fn available(d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        d.is_multiple_of(8) && d > 0 && crate::quant::has_avx2()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = d;
        false
    }
}

/// The checks both kernels make before touching memory: the kernel exists for this head
/// size and every query row lies inside `q`. `None` when there are no rows to attend.
fn check_query_rows(q: &[f32], q_stride: usize, state: &Partial) -> Option<usize> {
    assert!(available(state.d), "SIMD attention kernel unavailable");
    let (d, nq) = (state.d, state.rows());
    if nq == 0 {
        return None;
    }
    assert!(
        q.len() >= (nq - 1) * q_stride + d,
        "query rows out of range"
    );
    Some(d)
}

/// The tiled kernel; callers check `available(state.d)` first.
pub fn attend_block_simd(
    q: &[f32],
    q_stride: usize,
    k: &[f32],
    v: &[f32],
    scale: f32,
    mask: &BlockMask,
    state: &mut Partial,
) {
    let Some(d) = check_query_rows(q, q_stride, state) else {
        return;
    };
    let nk = k.len() / d;
    assert!(v.len() >= nk * d, "value block shorter than the key block");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2/FMA/F16C detected (`available`); bounds asserted above.
    unsafe {
        avx2::attend::<avx2::F32>(
            q,
            q_stride,
            k.as_ptr() as *const u8,
            v.as_ptr() as *const u8,
            nk,
            scale,
            mask,
            state,
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (q, q_stride, k, v, nk, scale, mask);
        unreachable!("checked by available()");
    }
}

/// `attend_block_simd` reading K and V as stored in an f16 cache (`nk` rows of d IEEE
/// half values, little-endian bytes), widened in registers: the same numbers as decoding
/// the block to f32 first, without writing and re-reading that copy.
#[allow(clippy::too_many_arguments)]
pub fn attend_block_f16(
    q: &[f32],
    q_stride: usize,
    k: &[u8],
    v: &[u8],
    scale: f32,
    mask: &BlockMask,
    state: &mut Partial,
) {
    let Some(d) = check_query_rows(q, q_stride, state) else {
        return;
    };
    let nk = k.len() / (2 * d);
    assert!(
        v.len() >= nk * 2 * d,
        "value block shorter than the key block"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: as in `attend_block_simd`.
    unsafe {
        avx2::attend::<avx2::F16>(q, q_stride, k.as_ptr(), v.as_ptr(), nk, scale, mask, state)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (q, q_stride, k, v, nk, scale, mask);
        unreachable!("checked by available()");
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // register tiles are indexed by row and lane group
mod avx2 {
    use super::{BlockMask, Partial, DIRECT_ROWS, KB, MR};
    use std::arch::x86_64::*;

    /// How the kernel reads stored K/V elements: 8 at a time widened to f32.
    pub(super) trait Elem {
        const BYTES: usize;
        unsafe fn load8(p: *const u8) -> __m256;
        unsafe fn get(p: *const u8) -> f32;
    }

    pub(super) struct F32;
    pub(super) struct F16;

    impl Elem for F32 {
        const BYTES: usize = 4;
        #[inline(always)]
        unsafe fn load8(p: *const u8) -> __m256 {
            _mm256_loadu_ps(p as *const f32)
        }
        #[inline(always)]
        unsafe fn get(p: *const u8) -> f32 {
            (p as *const f32).read_unaligned()
        }
    }

    impl Elem for F16 {
        const BYTES: usize = 2;
        #[inline(always)]
        unsafe fn load8(p: *const u8) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
        #[inline(always)]
        unsafe fn get(p: *const u8) -> f32 {
            half::f16::from_bits((p as *const u16).read_unaligned()).to_f32()
        }
    }

    /// exp(x) per lane for x ≤ 0 (or -inf); see the module comment.
    #[inline(always)]
    pub(super) unsafe fn exp_ps(x: __m256) -> __m256 {
        let lo = _mm256_set1_ps(-87.0);
        let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, lo);
        let x = _mm256_max_ps(x, lo);
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
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
    unsafe fn hsum(x: __m256) -> f32 {
        let m = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
        let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_add_ss(m, _mm_movehdup_ps(m));
        _mm_cvtss_f32(m)
    }

    /// kt[t·KB + j] = k[j·d + t] for j < nb (nb ≤ KB), t < d (d a multiple of 8).
    #[inline(always)]
    unsafe fn transpose<E: Elem>(k: *const u8, d: usize, nb: usize, kt: *mut f32) {
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

    /// s[j] = scale · q·k_j for j < ncols (k: rows of d values), without a transposed
    /// block: 8 keys at a time, one accumulator per key over d, then a horizontal-add tree
    /// turns the 8 accumulators into one vector of 8 scores. For few query rows (decode),
    /// where transposing the block would cost as much as the products.
    #[inline(always)]
    unsafe fn qk_dots<E: Elem>(
        q: *const f32,
        k: *const u8,
        d: usize,
        ncols: usize,
        scale: __m256,
        s: *mut f32,
    ) {
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
            let h01 = _mm256_hadd_ps(a[0], a[1]);
            let h23 = _mm256_hadd_ps(a[2], a[3]);
            let h45 = _mm256_hadd_ps(a[4], a[5]);
            let h67 = _mm256_hadd_ps(a[6], a[7]);
            let h0123 = _mm256_hadd_ps(h01, h23);
            let h4567 = _mm256_hadd_ps(h45, h67);
            let lo = _mm256_permute2f128_ps::<0x20>(h0123, h4567);
            let hi = _mm256_permute2f128_ps::<0x31>(h0123, h4567);
            _mm256_storeu_ps(s.add(j), _mm256_mul_ps(_mm256_add_ps(lo, hi), scale));
            j += 8;
        }
        while j < ncols {
            let mut a = _mm256_setzero_ps();
            let mut t = 0;
            while t < d {
                a = _mm256_fmadd_ps(
                    _mm256_loadu_ps(q.add(t)),
                    E::load8(k.add((j * d + t) * E::BYTES)),
                    a,
                );
                t += 8;
            }
            *s.add(j) = hsum(a) * _mm256_cvtss_f32(scale);
            j += 1;
        }
    }

    /// Scores of R rows against `ncols` keys of the transposed block, then P·V.
    #[inline(always)]
    unsafe fn qk_rows<const R: usize>(
        q: *const f32,
        qs: usize,
        kt: *const f32,
        d: usize,
        ncols: usize,
        scale: __m256,
        s: *mut f32,
    ) {
        let mut jc = 0;
        while jc < ncols {
            qk_tile::<R>(q, qs, kt.add(jc), d, scale, s.add(jc));
            jc += 16;
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

    macro_rules! dispatch_rows {
        ($r:expr, $f:ident [$($g:ty),*], $($arg:expr),*) => {
            match $r {
                1 => $f::<$($g,)* 1>($($arg),*),
                2 => $f::<$($g,)* 2>($($arg),*),
                3 => $f::<$($g,)* 3>($($arg),*),
                4 => $f::<$($g,)* 4>($($arg),*),
                5 => $f::<$($g,)* 5>($($arg),*),
                _ => $f::<$($g,)* 6>($($arg),*),
            }
        };
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn attend<E: Elem>(
        q: &[f32],
        q_stride: usize,
        k: *const u8,
        v: *const u8,
        nk: usize,
        scale: f32,
        mask: &BlockMask,
        state: &mut Partial,
    ) {
        let d = state.d;
        let nq = state.rows();
        if mask.tile_is_masked(nq, nk) {
            return;
        }
        let vis: Vec<usize> = (0..nq).map(|i| mask.visible_keys(i, nk)).collect();
        // Transposed key sub-block; +16 columns of slack for the last 16-key micro-tile.
        let mut kt = vec![0.0f32; if nq < DIRECT_ROWS { 0 } else { d * KB + 16 }];
        let mut s = [0.0f32; MR * KB];
        let scale_v = _mm256_set1_ps(scale);
        let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
        let segments = mask.q_segments.zip(mask.k_segments);
        // Few rows: dot products straight from K (see `qk_dots`).
        let direct = nq < DIRECT_ROWS;
        for j0 in (0..nk).step_by(KB) {
            let nb = KB.min(nk - j0);
            // Causal rows see a non-decreasing number of keys: start at the first row that
            // sees any key of this sub-block.
            let Some(first) = (0..nq).find(|&i| vis[i] > j0) else {
                continue;
            };
            if !direct {
                transpose::<E>(k.add(j0 * d * E::BYTES), d, nb, kt.as_mut_ptr());
            }
            let mut r0 = first;
            while r0 < nq {
                let mr = MR.min(nq - r0);
                let ncols = (0..mr).map(|i| vis[r0 + i]).max().unwrap_or(0).min(j0 + nb) - j0;
                let sp = s.as_mut_ptr();
                if direct {
                    for i in 0..mr {
                        let qi = q.as_ptr().add((r0 + i) * q_stride);
                        qk_dots::<E>(
                            qi,
                            k.add(j0 * d * E::BYTES),
                            d,
                            ncols,
                            scale_v,
                            sp.add(i * KB),
                        );
                    }
                } else {
                    dispatch_rows!(
                        mr,
                        qk_rows[],
                        q.as_ptr().add(r0 * q_stride),
                        q_stride,
                        kt.as_ptr(),
                        d,
                        ncols,
                        scale_v,
                        sp
                    );
                }
                let ncols8 = ncols.next_multiple_of(8);
                for i in 0..mr {
                    let row = &mut s[i * KB..i * KB + ncols8];
                    let n_vis = vis[r0 + i].saturating_sub(j0).min(ncols);
                    row[n_vis..].fill(f32::NEG_INFINITY);
                    if let Some((qseg, kseg)) = segments {
                        let qi = qseg[r0 + i];
                        for (j, x) in row[..n_vis].iter_mut().enumerate() {
                            if kseg[j0 + j] != qi {
                                *x = f32::NEG_INFINITY;
                            }
                        }
                    }
                    let rp = row.as_mut_ptr();
                    let mut mx = neg_inf;
                    for c in (0..ncols8).step_by(8) {
                        mx = _mm256_max_ps(mx, _mm256_loadu_ps(rp.add(c)));
                    }
                    let row_max = hmax(mx);
                    if row_max == f32::NEG_INFINITY {
                        // Nothing visible in this sub-block: P = 0, state unchanged.
                        row.fill(0.0);
                        continue;
                    }
                    let gi = r0 + i;
                    let m_old = state.m[gi];
                    let m_new = m_old.max(row_max);
                    let mv = _mm256_set1_ps(m_new);
                    let mut sum = _mm256_setzero_ps();
                    for c in (0..ncols8).step_by(8) {
                        let e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(rp.add(c)), mv));
                        sum = _mm256_add_ps(sum, e);
                        _mm256_storeu_ps(rp.add(c), e);
                    }
                    let correction = (m_old - m_new).exp();
                    if correction != 1.0 {
                        for x in &mut state.acc[gi * d..(gi + 1) * d] {
                            *x *= correction;
                        }
                    }
                    state.l[gi] = state.l[gi] * correction + hsum(sum);
                    state.m[gi] = m_new;
                }
                let ap = state.acc.as_mut_ptr().add(r0 * d);
                dispatch_rows!(
                    mr,
                    pv_rows[E],
                    s.as_ptr(),
                    v.add(j0 * d * E::BYTES),
                    d,
                    ncols,
                    ap
                );
                r0 += mr;
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use std::arch::x86_64::*;

    #[test]
    fn vector_exp_matches_libm_to_a_few_ulp() {
        if !crate::quant::has_avx2() {
            return;
        }
        let xs: Vec<f32> = (0..4000).map(|i| -(i as f32) * 0.0225).collect();
        for c in xs.chunks_exact(8) {
            // SAFETY: AVX2/FMA detected above.
            let got: [f32; 8] = unsafe {
                let mut o = [0.0f32; 8];
                let attempt = super::avx2::exp_ps(_mm256_loadu_ps(c.as_ptr()));
                _mm256_storeu_ps(o.as_mut_ptr(), attempt);
                o
            };
            for (x, g) in c.iter().zip(got) {
                let want = x.exp();
                let tol = if *x < -87.0 {
                    1.7e-38
                } else {
                    4.0 * f32::EPSILON * want
                };
                assert!((g - want).abs() <= tol, "exp({x}) = {g}, libm {want}");
            }
        }
        // -inf gives exactly 0.
        let z = unsafe {
            let mut o = [1.0f32; 8];
            _mm256_storeu_ps(
                o.as_mut_ptr(),
                super::avx2::exp_ps(_mm256_set1_ps(f32::NEG_INFINITY)),
            );
            o
        };
        assert_eq!(z, [0.0; 8]);
    }
}

#[cfg(test)]
mod equivalence {
    use crate::attention::tests::{max_diff, rand_vec};
    use crate::attention::{attend_block_portable, reference_attention, BlockMask, Partial};

    /// Attend `nq` rows (positions q_pos0..) to keys 0..nk in blocks of `kb` with either
    /// kernel; returns the finished output and the lse (0 where nothing was attended).
    #[allow(clippy::too_many_arguments)]
    fn run(
        simd: bool,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: usize,
        q_pos0: usize,
        kb: usize,
        causal: bool,
        seg: Option<(&[u32], &[u32])>,
    ) -> (Vec<f32>, Vec<f32>) {
        let (nq, nk) = (q.len() / d, k.len() / d);
        let mut st = Partial::new(nq, d);
        for k0 in (0..nk).step_by(kb) {
            let k1 = (k0 + kb).min(nk);
            let mask = BlockMask {
                q_pos0,
                k_pos0: k0,
                causal,
                q_segments: seg.map(|s| s.0),
                k_segments: seg.map(|s| &s.1[k0..]),
            };
            let (kk, vv) = (&k[k0 * d..k1 * d], &v[k0 * d..k1 * d]);
            let scale = 1.0 / (d as f32).sqrt();
            if simd {
                super::attend_block_simd(q, d, kk, vv, scale, &mask, &mut st);
            } else {
                attend_block_portable(q, d, kk, vv, scale, &mask, &mut st);
            }
        }
        let mut out = vec![0.0; nq * d];
        st.finish_into(&mut out);
        let lse = st
            .lse()
            .into_iter()
            .map(|x| if x.is_finite() { x } else { 0.0 })
            .collect();
        (out, lse)
    }

    #[test]
    fn simd_kernel_equals_portable_and_reference_on_odd_shapes() {
        if !super::available(64) {
            eprintln!("no AVX2+FMA: SIMD attention kernel not tested");
            return;
        }
        let mut seed = 100;
        for d in [64, 128, 24] {
            for (nq, nk, q_pos0, kb) in [
                (1, 1, 0, 256),
                (5, 17, 12, 7),
                (7, 130, 123, 256),
                (13, 300, 287, 64),
                (64, 333, 269, 256),
                (3, 65, 64, 65),
                (64, 64, 0, 17),
                (11, 200, 20, 50), // rows past the block start see nothing of later blocks
            ] {
                seed += 1;
                let q = rand_vec(nq * d, seed);
                let k = rand_vec(nk * d, seed + 1000);
                let v = rand_vec(nk * d, seed + 2000);
                let qseg: Vec<u32> = (0..nq as u32).map(|i| (i + q_pos0 as u32) / 9).collect();
                let kseg: Vec<u32> = (0..nk as u32).map(|j| j / 9).collect();
                for causal in [true, false] {
                    for seg in [None, Some((&qseg[..], &kseg[..]))] {
                        let (a, la) = run(true, &q, &k, &v, d, q_pos0, kb, causal, seg);
                        let (b, lb) = run(false, &q, &k, &v, d, q_pos0, kb, causal, seg);
                        let what = format!(
                            "d={d} nq={nq} nk={nk} pos={q_pos0} kb={kb} causal={causal} seg={}",
                            seg.is_some()
                        );
                        assert!(max_diff(&a, &b) < 1e-5, "{what}: out {}", max_diff(&a, &b));
                        assert!(
                            max_diff(&la, &lb) < 1e-5,
                            "{what}: lse {}",
                            max_diff(&la, &lb)
                        );
                        // Keys 0..nk sit at positions 0..nk, so the plain softmax applies.
                        let r = reference_attention(&q, &k, &v, d, q_pos0, causal, seg);
                        assert!(
                            max_diff(&a, &r) < 1e-5,
                            "{what}: vs reference {}",
                            max_diff(&a, &r)
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn simd_kernel_keeps_strided_queries_and_prior_state() {
        if !super::available(64) {
            return;
        }
        // Queries with a row stride wider than d (heads interleaved), and a partial that
        // already holds a previous block whose scores are larger (the correction path).
        let (d, nq, nk, stride) = (64, 9, 70, 3 * 64);
        let q = rand_vec(nq * stride, 1);
        let k = rand_vec(nk * d, 2);
        let v = rand_vec(nk * d, 3);
        let states: Vec<Partial> = [true, false]
            .into_iter()
            .map(|simd| {
                let mut st = Partial::new(nq, d);
                for (lo, hi) in [(40, 70), (0, 40)] {
                    let mask = BlockMask::full();
                    let (kk, vv) = (&k[lo * d..hi * d], &v[lo * d..hi * d]);
                    if simd {
                        super::attend_block_simd(&q[d..], stride, kk, vv, 0.3, &mask, &mut st);
                    } else {
                        attend_block_portable(&q[d..], stride, kk, vv, 0.3, &mask, &mut st);
                    }
                }
                st
            })
            .collect();
        assert!(max_diff(&states[0].acc, &states[1].acc) < 1e-4);
        assert!(max_diff(&states[0].m, &states[1].m) < 1e-5);
        assert!(max_diff(&states[0].l, &states[1].l) < 1e-4);
    }
}

#[cfg(test)]
mod f16_blocks {
    use crate::attention::{BlockMask, Partial};
    use crate::quant::kv::KvType;

    /// Reading an f16 block in registers gives exactly the numbers of decoding it to f32
    /// first, for decode-sized (direct scores) and prefill-sized (transposed) row counts.
    #[test]
    fn f16_kernel_equals_kernel_on_decoded_rows() {
        if !super::available(64) {
            return;
        }
        for (nq, nk, d) in [(1, 77, 64), (3, 256, 64), (20, 131, 64), (7, 40, 128)] {
            let x = crate::rng::XorShift::new(nq as u64).vec((nq + 2 * nk) * d, -2.0, 2.0);
            let (q, kv) = x.split_at(nq * d);
            let mut bytes = vec![0u8; 2 * nk * KvType::F16.row_bytes(d)];
            for (row, out) in kv
                .chunks_exact(d)
                .zip(bytes.chunks_exact_mut(KvType::F16.row_bytes(d)))
            {
                KvType::F16.encode_row(row, out);
            }
            let (kb, vb) = bytes.split_at(nk * KvType::F16.row_bytes(d));
            let mut k = vec![0.0; nk * d];
            let mut v = vec![0.0; nk * d];
            KvType::F16.decode_rows(kb, d, &mut k);
            KvType::F16.decode_rows(vb, d, &mut v);
            let mask = BlockMask::causal(nk - nq, 0);
            let mut a = Partial::new(nq, d);
            let mut b = Partial::new(nq, d);
            super::attend_block_f16(q, d, kb, vb, 0.125, &mask, &mut a);
            super::attend_block_simd(q, d, &k, &v, 0.125, &mask, &mut b);
            assert_eq!(
                (&a.acc, &a.m, &a.l),
                (&b.acc, &b.m, &b.l),
                "nq={nq} nk={nk} d={d}"
            );
        }
    }
}
