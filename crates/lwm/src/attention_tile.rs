//! The tiled fast path of `attention::attend_block` for query tiles of 4+ rows with a head
//! dimension that is a multiple of 16: both products run as register-blocked micro-GEMMs
//! (4 rows × 16 columns of accumulators, broadcast-FMA over the shared dimension), the
//! exponentials as a branch-free polynomial the compiler vectorizes.
//!
//! ```text
//!   S = scale · Q Kᵀ           (Kᵀ laid out d × nk so 16 keys are one contiguous load)
//!   S[i,j] = −inf where masked
//!   m'_i = max(m_i, max_j S[i,j]),  P[i,j] = exp(S[i,j] − m'_i)
//!   acc_i = acc_i · exp(m_i − m'_i) + (P V)_i,   l_i = l_i · exp(m_i − m'_i) + Σ_j P[i,j]
//! ```
//!
//! The same generic code is compiled twice: with AVX2+FMA enabled (chosen at run time) and
//! portable.

use crate::attention::{BlockMask, Partial};

const MR: usize = 4;
const NR: usize = 16;

#[inline(always)]
fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// exp(x) for x <= 0 (relative error ~2e-7); 0 below −87 (and for −inf).
#[inline(always)]
fn exp_nonpositive<const FMA: bool>(x: f32) -> f32 {
    let xc = x.max(-87.0);
    // n = round(x·log2 e) by the 1.5·2^23 shifter; r = x − n·ln 2 in two parts.
    let shifter = 12_582_912.0f32;
    let n = fmadd::<FMA>(xc, std::f32::consts::LOG2_E, shifter) - shifter;
    let r = fmadd::<FMA>(-n, 0.693_145_75, xc);
    let r = fmadd::<FMA>(-n, 1.428_606_8e-6, r);
    // Taylor polynomial to degree 6 on |r| <= ln2/2.
    let mut p = 1.0 / 720.0;
    p = fmadd::<FMA>(p, r, 1.0 / 120.0);
    p = fmadd::<FMA>(p, r, 1.0 / 24.0);
    p = fmadd::<FMA>(p, r, 1.0 / 6.0);
    p = fmadd::<FMA>(p, r, 0.5);
    p = fmadd::<FMA>(p, r, 1.0);
    p = fmadd::<FMA>(p, r, 1.0);
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let v = p * scale;
    if x < -87.0 {
        0.0
    } else {
        v
    }
}

/// C[MR × NR] += A[MR × kk] · B[kk × NR]; A rows at `a + r·lda`, B rows at `b + t·ldb`.
#[inline(always)]
fn micro_gemm<const FMA: bool>(
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    kk: usize,
    c: &mut [[f32; NR]; MR],
) {
    let mut acc = *c;
    for t in 0..kk {
        let brow: &[f32; NR] = b[t * ldb..t * ldb + NR].try_into().expect("NR wide");
        for (r, accr) in acc.iter_mut().enumerate() {
            let av = a[r * lda + t];
            for l in 0..NR {
                accr[l] = fmadd::<FMA>(av, brow[l], accr[l]);
            }
        }
    }
    *c = acc;
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_tile<const FMA: bool>(
    q: &[f32],
    q_stride: usize,
    k: &[f32],
    v: &[f32],
    scale: f32,
    mask: &BlockMask,
    state: &mut Partial,
) {
    let d = state.d;
    let nq = state.rows();
    let nk = k.len() / d;
    let nq_pad = nq.div_ceil(MR) * MR;
    let nk_pad = nk.div_ceil(NR) * NR;
    // Q rows, zero-padded to whole MR groups, contiguous.
    let mut qp = vec![0.0f32; nq_pad * d];
    for i in 0..nq {
        qp[i * d..(i + 1) * d].copy_from_slice(&q[i * q_stride..i * q_stride + d]);
    }
    // Kᵀ, d × nk_pad (zero columns past nk).
    let mut kt = vec![0.0f32; d * nk_pad];
    for (j, krow) in k.chunks_exact(d).enumerate() {
        for (t, &x) in krow.iter().enumerate() {
            kt[t * nk_pad + j] = x;
        }
    }
    // S = Q Kᵀ, nq_pad × nk_pad.
    let mut s = vec![0.0f32; nq_pad * nk_pad];
    for i0 in (0..nq_pad).step_by(MR) {
        for j0 in (0..nk_pad).step_by(NR) {
            let mut c = [[0.0f32; NR]; MR];
            micro_gemm::<FMA>(&qp[i0 * d..], d, &kt[j0..], nk_pad, d, &mut c);
            for (r, cr) in c.iter().enumerate() {
                s[(i0 + r) * nk_pad + j0..][..NR].copy_from_slice(cr);
            }
        }
    }
    // Mask, online softmax update, P in place of S (zeros where masked).
    let mut corr = vec![1.0f32; nq];
    let mut live = vec![false; nq];
    for i in 0..nq {
        let n_vis = mask_visible(mask, i, nk);
        let row = &mut s[i * nk_pad..(i + 1) * nk_pad];
        let mut row_max = f32::NEG_INFINITY;
        for (j, x) in row.iter_mut().enumerate() {
            let seg_ok = match (mask.q_segments, mask.k_segments) {
                (Some(qs), Some(ks)) => j >= nk || qs[i] == ks[j],
                _ => true,
            };
            *x = if j < n_vis && seg_ok {
                *x * scale
            } else {
                f32::NEG_INFINITY
            };
            row_max = row_max.max(*x);
        }
        if row_max == f32::NEG_INFINITY {
            row.fill(0.0);
            continue;
        }
        live[i] = true;
        let m_new = state.m[i].max(row_max);
        corr[i] = exp_nonpositive::<FMA>(state.m[i] - m_new);
        let mut sum = 0.0f32;
        for x in row.iter_mut() {
            *x = exp_nonpositive::<FMA>(*x - m_new);
            sum += *x;
        }
        state.l[i] = state.l[i] * corr[i] + sum;
        state.m[i] = m_new;
    }
    // O = P V (nq_pad × d), then acc = acc · corr + O.
    let mut vp = vec![0.0f32; nk_pad * d];
    vp[..nk * d].copy_from_slice(v);
    for i0 in (0..nq_pad).step_by(MR) {
        for c0 in (0..d).step_by(NR) {
            let mut c = [[0.0f32; NR]; MR];
            micro_gemm::<FMA>(&s[i0 * nk_pad..], nk_pad, &vp[c0..], d, nk_pad, &mut c);
            for (r, cr) in c.iter().enumerate() {
                let i = i0 + r;
                if i >= nq || !live[i] {
                    continue;
                }
                let acc = &mut state.acc[i * d + c0..i * d + c0 + NR];
                for (a, &o) in acc.iter_mut().zip(cr) {
                    *a = fmadd::<FMA>(*a, corr[i], o);
                }
            }
        }
    }
}

#[inline(always)]
fn mask_visible(mask: &BlockMask, i: usize, nk: usize) -> usize {
    if !mask.causal {
        return nk;
    }
    let q = mask.q_pos0 + i;
    if q < mask.k_pos0 {
        0
    } else {
        (q - mask.k_pos0 + 1).min(nk)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_tile_avx2(
    q: &[f32],
    q_stride: usize,
    k: &[f32],
    v: &[f32],
    scale: f32,
    mask: &BlockMask,
    state: &mut Partial,
) {
    attend_tile::<true>(q, q_stride, k, v, scale, mask, state)
}

/// Whether the tiled path applies (4+ query rows, head dim a multiple of 16).
pub fn applies(nq: usize, d: usize) -> bool {
    nq >= MR && d.is_multiple_of(NR)
}

/// `attend_block` through the tiled kernel (callers check `applies`).
pub fn attend_block_tiled(
    q: &[f32],
    q_stride: usize,
    k: &[f32],
    v: &[f32],
    scale: f32,
    mask: &BlockMask,
    state: &mut Partial,
) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::has_avx2() {
        // SAFETY: AVX2 and FMA were detected at run time.
        unsafe { attend_tile_avx2(q, q_stride, k, v, scale, mask, state) };
        return;
    }
    attend_tile::<false>(q, q_stride, k, v, scale, mask, state)
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_polynomial_is_accurate_on_the_softmax_range() {
        for i in 0..=20000 {
            let x = -(i as f32) * 0.0045;
            let (a, b) = (super::exp_nonpositive::<false>(x), x.exp());
            // Below e^-87 (~1.6e-38) results flush to 0: far under any weight that matters.
            assert!((a - b).abs() <= 4e-7 * b + 2e-38, "{x}: {a} vs {b}");
        }
        assert_eq!(super::exp_nonpositive::<false>(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp_nonpositive::<false>(-100.0), 0.0);
    }
}
