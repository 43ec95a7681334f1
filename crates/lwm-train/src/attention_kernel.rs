//! The per-head inner loops of the training attention (forward and backward), vectorised
//! along the key axis: keys and values are held transposed (d × keys), so every step is a
//! contiguous multiply-add over a row of scores and the exponential runs on whole rows.
//! Compiled for AVX2+FMA when the CPU has it (runtime check), plain Rust otherwise.
//!
//! ```text
//!   forward, query row i over its visible keys j:
//!     s_j = scale · q_i·k_j,  m = max_j s_j,  p_j = exp(s_j − m),  l = Σ_j p_j
//!     o_i = Σ_j p_j v_j / l,  lse_i = m + ln l
//!   backward, key chunk C, every query row i that sees it (p recomputed from lse):
//!     p_ij = exp(scale · q_i·k_j − lse_i),  ds_ij = p_ij · (dO_i·v_j − D_i),  D_i = dO_i·o_i
//!     dQ_i += scale · Σ_j ds_ij k_j,  dK_j += scale · Σ_i ds_ij q_i,  dV_j += Σ_i p_ij dO_i
//! ```
//!
//! One backward task owns a KV head and every query head of its group, so it writes dQ,
//! dK and dV without sharing and computes each p once. Only rows of scores exist (one key
//! chunk wide in the backward, one row in the forward): memory stays linear in the length.

/// Which keys a query row sees: causal by index, and equal segment ids (packing).
#[derive(Clone, Copy)]
pub struct RowMask<'a> {
    pub causal: bool,
    pub segments: Option<&'a [u32]>,
}

impl RowMask<'_> {
    /// Keys k_pos0..k_pos0 + n (of `len` from k_pos0) are candidates for the query at
    /// position `i`; 0 when causality hides the whole block.
    #[inline(always)]
    fn key_end(&self, i: usize, k_pos0: usize, len: usize) -> usize {
        if self.causal {
            (i + 1).saturating_sub(k_pos0).min(len)
        } else {
            len
        }
    }

    /// Scores of the keys at positions k0.. that the query at position i may not see
    /// become −inf (exp → 0). Segment ids are indexed by position.
    #[inline(always)]
    fn mask_segments(&self, i: usize, k0: usize, s: &mut [f32]) {
        if let Some(seg) = self.segments {
            let si = seg[i];
            let n = s.len();
            for (x, &sj) in s.iter_mut().zip(&seg[k0..k0 + n]) {
                if sj != si {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// (rows × cols) row-major → (cols × rows).
pub fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = x[r * cols + c];
        }
    }
    out
}

/// e^x to about 2e-7 relative error, 0 below −87 (and for −inf); vectorises. Range
/// reduction x = k·ln2 + r, |r| ≤ ln2/2, then a degree-6 Taylor polynomial.
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let xc = x.clamp(-87.0, 88.0);
    let k = (xc * LOG2E + 0.5).floor();
    let r = xc - k * LN2_HI - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((k as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let n = a.len().min(b.len());
    let full = n / 16 * 16;
    for (x, y) in a[..full].chunks_exact(16).zip(b[..full].chunks_exact(16)) {
        for t in 0..16 {
            acc[t] += x[t] * y[t];
        }
    }
    let mut s = 0.0f32;
    for t in 0..8 {
        s += acc[t] + acc[t + 8];
    }
    for t in full..n {
        s += a[t] * b[t];
    }
    s
}

#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `s[..n] = Σ_t a[t] · mt[t, ..n]` for `mt` (d × stride): 32 columns at a time in
/// registers, so `s` is written once instead of once per t.
#[inline(always)]
fn row_times_transposed(s: &mut [f32], a: &[f32], mt: &[f32], stride: usize) {
    const W: usize = 32;
    let n = s.len();
    let mut j = 0;
    while j + W <= n {
        let mut acc = [0.0f32; W];
        for (t, &at) in a.iter().enumerate() {
            let row = &mt[t * stride + j..t * stride + j + W];
            for c in 0..W {
                acc[c] += at * row[c];
            }
        }
        s[j..j + W].copy_from_slice(&acc);
        j += W;
    }
    if j < n {
        let tail = &mut s[j..];
        tail.fill(0.0);
        for (t, &at) in a.iter().enumerate() {
            axpy(tail, at, &mt[t * stride + j..t * stride + n]);
        }
    }
}

/// Forward of query rows r0.. of one head: `q` (rows × d), `kt`/`vt` (d × len) the KV head
/// transposed; writes `out` (rows × d) and `lse` (rows). Fully masked rows give 0 and −inf.
#[allow(clippy::too_many_arguments)]
pub fn forward_rows(
    q: &[f32],
    r0: usize,
    kt: &[f32],
    vt: &[f32],
    len: usize,
    d: usize,
    scale: f32,
    mask: RowMask,
    out: &mut [f32],
    lse: &mut [f32],
) {
    forward_rows_at(q, r0, kt, vt, 0, len, d, scale, mask, out, lse)
}

/// `forward_rows` for one block of keys: query row ii is at position `q_pos0 + ii`, key
/// column c (of `len`) at `k_pos0 + c` (a ring shard). `out`/`lse` are this block's alone;
/// blocks combine exactly through their lse.
#[allow(clippy::too_many_arguments)]
pub fn forward_rows_at(
    q: &[f32],
    q_pos0: usize,
    kt: &[f32],
    vt: &[f32],
    k_pos0: usize,
    len: usize,
    d: usize,
    scale: f32,
    mask: RowMask,
    out: &mut [f32],
    lse: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU features were just detected.
        return unsafe {
            forward_rows_avx2(q, q_pos0, kt, vt, k_pos0, len, d, scale, mask, out, lse)
        };
    }
    forward_rows_generic(q, q_pos0, kt, vt, k_pos0, len, d, scale, mask, out, lse)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn forward_rows_avx2(
    q: &[f32],
    q_pos0: usize,
    kt: &[f32],
    vt: &[f32],
    k_pos0: usize,
    len: usize,
    d: usize,
    scale: f32,
    mask: RowMask,
    out: &mut [f32],
    lse: &mut [f32],
) {
    forward_rows_generic(q, q_pos0, kt, vt, k_pos0, len, d, scale, mask, out, lse)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_rows_generic(
    q: &[f32],
    q_pos0: usize,
    kt: &[f32],
    vt: &[f32],
    k_pos0: usize,
    len: usize,
    d: usize,
    scale: f32,
    mask: RowMask,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let mut s = vec![0.0f32; len];
    for (ii, qi) in q.chunks_exact(d).enumerate() {
        let i = q_pos0 + ii;
        let n = mask.key_end(i, k_pos0, len);
        let o = &mut out[ii * d..(ii + 1) * d];
        if n == 0 {
            o.fill(0.0);
            lse[ii] = f32::NEG_INFINITY;
            continue;
        }
        let s = &mut s[..n];
        row_times_transposed(s, qi, kt, len);
        for x in s.iter_mut() {
            *x *= scale;
        }
        mask.mask_segments(i, k_pos0, s);
        let m = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        if m == f32::NEG_INFINITY {
            o.fill(0.0);
            lse[ii] = f32::NEG_INFINITY;
            continue;
        }
        let mut l = 0.0f32;
        for x in s.iter_mut() {
            *x = exp_approx(*x - m);
            l += *x;
        }
        let inv = 1.0 / l;
        for (t, ot) in o.iter_mut().enumerate() {
            *ot = dot(s, &vt[t * len..t * len + n]) * inv;
        }
        lse[ii] = m + l.ln();
    }
}

/// One query head's inputs to the backward: rows (len × d) of q and dO, and per row
/// `lse` and `delta` = dO·O.
pub struct QueryHead<'a> {
    pub q: &'a [f32],
    pub dout: &'a [f32],
    pub lse: &'a [f32],
    pub delta: &'a [f32],
}

/// dQ of each query head of a group, dK and dV of its KV head (each len × d).
pub type GroupGrads = (Vec<Vec<f32>>, Vec<f32>, Vec<f32>);

/// Backward of one KV head and the query heads sharing it: `k`, `v` (len × d). Returns
/// dQ per query head (len × d each), dK and dV (len × d).
#[allow(clippy::too_many_arguments)]
pub fn backward_group(
    heads: &[QueryHead],
    k: &[f32],
    v: &[f32],
    len: usize,
    d: usize,
    key_chunk: usize,
    scale: f32,
    mask: RowMask,
) -> GroupGrads {
    backward_group_at(heads, 0, k, v, 0, len, d, key_chunk, scale, mask)
}

/// `backward_group` for one block of keys (a ring shard): query row ii of every head is at
/// position `q_pos0 + ii`, key row c (of `k_len`) at `k_pos0 + c`; `lse` is the row's
/// over all keys, so the block's p, dQ share, dK and dV are exact. Returns dQ per query
/// head (query rows × d), dK and dV (k_len × d).
#[allow(clippy::too_many_arguments)]
pub fn backward_group_at(
    heads: &[QueryHead],
    q_pos0: usize,
    k: &[f32],
    v: &[f32],
    k_pos0: usize,
    k_len: usize,
    d: usize,
    key_chunk: usize,
    scale: f32,
    mask: RowMask,
) -> GroupGrads {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU features were just detected.
        return unsafe {
            backward_group_avx2(
                heads, q_pos0, k, v, k_pos0, k_len, d, key_chunk, scale, mask,
            )
        };
    }
    backward_group_generic(
        heads, q_pos0, k, v, k_pos0, k_len, d, key_chunk, scale, mask,
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn backward_group_avx2(
    heads: &[QueryHead],
    q_pos0: usize,
    k: &[f32],
    v: &[f32],
    k_pos0: usize,
    k_len: usize,
    d: usize,
    key_chunk: usize,
    scale: f32,
    mask: RowMask,
) -> GroupGrads {
    backward_group_generic(
        heads, q_pos0, k, v, k_pos0, k_len, d, key_chunk, scale, mask,
    )
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_group_generic(
    heads: &[QueryHead],
    q_pos0: usize,
    k: &[f32],
    v: &[f32],
    k_pos0: usize,
    k_len: usize,
    d: usize,
    key_chunk: usize,
    scale: f32,
    mask: RowMask,
) -> GroupGrads {
    let q_len = heads.first().map_or(0, |h| h.q.len() / d);
    let kc = key_chunk.clamp(1, k_len.max(1));
    let mut dq: Vec<Vec<f32>> = heads.iter().map(|_| vec![0.0f32; q_len * d]).collect();
    let mut dk = vec![0.0f32; k_len * d];
    let mut dv = vec![0.0f32; k_len * d];
    let mut p = vec![0.0f32; kc];
    let mut ds = vec![0.0f32; kc];
    let mut k0 = 0;
    while k0 < k_len {
        let cols = kc.min(k_len - k0);
        // Causal: rows before the chunk's first key see none of it.
        let i_start = if mask.causal {
            (k_pos0 + k0).saturating_sub(q_pos0).min(q_len)
        } else {
            0
        };
        if i_start == q_len {
            k0 += cols;
            continue;
        }
        let kt = transpose(&k[k0 * d..(k0 + cols) * d], cols, d);
        let vt = transpose(&v[k0 * d..(k0 + cols) * d], cols, d);
        let mut dkt = vec![0.0f32; d * cols];
        let mut dvt = vec![0.0f32; d * cols];
        for (head, dqh) in heads.iter().zip(dq.iter_mut()) {
            for i in i_start..q_len {
                let lse_i = head.lse[i];
                if lse_i == f32::NEG_INFINITY {
                    continue;
                }
                let pos = q_pos0 + i;
                let n = mask.key_end(pos, k_pos0, k_len).min(k0 + cols) - k0;
                let (p, ds) = (&mut p[..n], &mut ds[..n]);
                let qi = &head.q[i * d..(i + 1) * d];
                let gi = &head.dout[i * d..(i + 1) * d];
                row_times_transposed(p, qi, &kt, cols);
                for x in p.iter_mut() {
                    *x = *x * scale - lse_i;
                }
                mask.mask_segments(pos, k_pos0 + k0, p);
                for x in p.iter_mut() {
                    *x = exp_approx(*x);
                }
                row_times_transposed(ds, gi, &vt, cols);
                let delta = head.delta[i];
                for (g, &pj) in ds.iter_mut().zip(p.iter()) {
                    *g = pj * (*g - delta);
                }
                let dqi = &mut dqh[i * d..(i + 1) * d];
                for (t, x) in dqi.iter_mut().enumerate() {
                    *x += scale * dot(ds, &kt[t * cols..t * cols + n]);
                }
                for t in 0..d {
                    axpy(&mut dkt[t * cols..t * cols + n], scale * qi[t], ds);
                    axpy(&mut dvt[t * cols..t * cols + n], gi[t], p);
                }
            }
        }
        dk[k0 * d..(k0 + cols) * d].copy_from_slice(&transpose(&dkt, d, cols));
        dv[k0 * d..(k0 + cols) * d].copy_from_slice(&transpose(&dvt, d, cols));
        k0 += cols;
    }
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_approx_matches_exp() {
        for i in -2000..=200 {
            let x = i as f32 * 0.05;
            let (a, b) = (exp_approx(x), x.exp());
            assert!((a - b).abs() <= 3e-7 * b + 1e-37, "{x}: {a} vs {b}");
        }
        assert_eq!(exp_approx(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_approx(-100.0), 0.0);
    }
}
