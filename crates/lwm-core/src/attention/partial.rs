//! The primitive's state and its plain-Rust form: which pairs may attend (`BlockMask`),
//! the online-softmax partial `(acc, m, l)` with its exact merge (`Partial`), one block
//! attended row by row (`attend_block_portable`, what the SIMD kernels are tested
//! against) and the full-matrix softmax oracle (`reference_attention`). The math is in
//! `attention`'s module comment; the SIMD kernels (`attention_kernel`) build on this file.

/// Which (query, key) pairs may attend. Positions are absolute sequence positions.
#[derive(Debug, Clone, Copy)]
pub struct BlockMask<'a> {
    /// Position of the first query row and of the first key row of the blocks.
    pub q_pos0: usize,
    pub k_pos0: usize,
    /// Causal: key position must be <= query position.
    pub causal: bool,
    /// Optional segment ids (packing): a query only sees keys of its own segment.
    pub q_segments: Option<&'a [u32]>,
    pub k_segments: Option<&'a [u32]>,
}

impl<'a> BlockMask<'a> {
    pub fn causal(q_pos0: usize, k_pos0: usize) -> Self {
        Self {
            q_pos0,
            k_pos0,
            causal: true,
            q_segments: None,
            k_segments: None,
        }
    }

    pub fn full() -> Self {
        Self {
            q_pos0: 0,
            k_pos0: 0,
            causal: false,
            q_segments: None,
            k_segments: None,
        }
    }

    /// True when no pair in the (nq × nk) tile can attend (the tile is skipped).
    pub fn tile_is_masked(&self, nq: usize, nk: usize) -> bool {
        self.causal && nq > 0 && self.k_pos0 > self.q_pos0 + nq - 1 || nk == 0
    }

    /// Number of leading keys query row `i` may see under the causal rule (all of them when
    /// not causal). Keys past that are masked.
    #[inline]
    pub(crate) fn visible_keys(&self, i: usize, nk: usize) -> usize {
        if !self.causal {
            return nk;
        }
        let q = self.q_pos0 + i;
        if q < self.k_pos0 {
            0
        } else {
            (q - self.k_pos0 + 1).min(nk)
        }
    }
}

/// Running online-softmax state of `nq` query rows of one head.
#[derive(Debug, Clone)]
pub struct Partial {
    pub d: usize,
    /// Unnormalised output, nq × d.
    pub acc: Vec<f32>,
    /// Running max of the scaled scores, per row (-inf while nothing attended).
    pub m: Vec<f32>,
    /// Running sum of exp(s - m), per row.
    pub l: Vec<f32>,
}

impl Partial {
    pub fn new(nq: usize, d: usize) -> Self {
        Self {
            d,
            acc: vec![0.0; nq * d],
            m: vec![f32::NEG_INFINITY; nq],
            l: vec![0.0; nq],
        }
    }

    pub fn rows(&self) -> usize {
        self.m.len()
    }

    /// Merge another partial over a disjoint key set into this one (exact).
    pub fn merge(&mut self, other: &Partial) {
        assert_eq!(
            self.rows(),
            other.rows(),
            "merging partials of different row counts"
        );
        let d = self.d;
        for i in 0..self.rows() {
            let (m1, m2) = (self.m[i], other.m[i]);
            if m2 == f32::NEG_INFINITY {
                continue;
            }
            let m = m1.max(m2);
            let a = (m1 - m).exp();
            let b = (m2 - m).exp();
            self.l[i] = self.l[i] * a + other.l[i] * b;
            self.m[i] = m;
            let acc = &mut self.acc[i * d..(i + 1) * d];
            let o = &other.acc[i * d..(i + 1) * d];
            for (x, y) in acc.iter_mut().zip(o) {
                *x = *x * a + *y * b;
            }
        }
    }

    /// Normalise into `out` (nq × d). Rows that attended nothing are written as zeros.
    pub fn finish_into(&self, out: &mut [f32]) {
        let d = self.d;
        for i in 0..self.rows() {
            let o = &mut out[i * d..(i + 1) * d];
            let l = self.l[i];
            if l > 0.0 {
                let inv = 1.0 / l;
                for (x, a) in o.iter_mut().zip(&self.acc[i * d..(i + 1) * d]) {
                    *x = a * inv;
                }
            } else {
                o.fill(0.0);
            }
        }
    }

    /// Log-sum-exp of the scaled scores per row (what the backward pass and the ring keep).
    pub fn lse(&self) -> Vec<f32> {
        self.m
            .iter()
            .zip(&self.l)
            .map(|(m, l)| m + l.ln())
            .collect()
    }
}

/// `a · b` with eight independent accumulators (the portable primitive's and training's
/// order of summation).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent accumulators so the compiler emits wide FMAs without a serial chain.
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for t in 0..8 {
            acc[t] += x[t] * y[t];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for t in chunks * 8..a.len() {
        s += a[t] * b[t];
    }
    s
}

/// `attend_block` one query row at a time in plain Rust (any CPU; the reference the SIMD
/// kernel is tested against).
pub fn attend_block_portable(
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
    debug_assert_eq!(v.len(), nk * d);
    if mask.tile_is_masked(nq, nk) {
        return;
    }
    let mut scores = vec![0.0f32; nk];
    for i in 0..nq {
        let n_vis = mask.visible_keys(i, nk);
        if n_vis == 0 {
            continue;
        }
        let qi = &q[i * q_stride..i * q_stride + d];
        let mut row_max = f32::NEG_INFINITY;
        for j in 0..n_vis {
            let s = if let (Some(qs), Some(ks)) = (mask.q_segments, mask.k_segments) {
                if qs[i] != ks[j] {
                    f32::NEG_INFINITY
                } else {
                    scale * dot(qi, &k[j * d..(j + 1) * d])
                }
            } else {
                scale * dot(qi, &k[j * d..(j + 1) * d])
            };
            scores[j] = s;
            row_max = row_max.max(s);
        }
        if row_max == f32::NEG_INFINITY {
            continue; // every visible key is in another segment
        }
        let m_old = state.m[i];
        let m_new = m_old.max(row_max);
        let correction = (m_old - m_new).exp();
        let acc = &mut state.acc[i * d..(i + 1) * d];
        if correction != 1.0 {
            for x in acc.iter_mut() {
                *x *= correction;
            }
        }
        let mut sum = 0.0f32;
        for j in 0..n_vis {
            let p = (scores[j] - m_new).exp();
            if p == 0.0 {
                continue;
            }
            sum += p;
            let vj = &v[j * d..(j + 1) * d];
            for (x, y) in acc.iter_mut().zip(vj) {
                *x += p * y;
            }
        }
        state.l[i] = state.l[i] * correction + sum;
        state.m[i] = m_new;
    }
}

/// Plain softmax attention for one head (reference for tests): full score matrix.
pub fn reference_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    d: usize,
    q_pos0: usize,
    causal: bool,
    segments: Option<(&[u32], &[u32])>,
) -> Vec<f32> {
    let nq = q.len() / d;
    let nk = k.len() / d;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0.0f32; nq * d];
    for i in 0..nq {
        let mut s: Vec<f64> = (0..nk)
            .map(|j| {
                let allowed =
                    (!causal || j <= q_pos0 + i) && segments.is_none_or(|(qs, ks)| qs[i] == ks[j]);
                if allowed {
                    let mut acc = 0.0f64;
                    for t in 0..d {
                        acc += q[i * d + t] as f64 * k[j * d + t] as f64;
                    }
                    acc * scale as f64
                } else {
                    f64::NEG_INFINITY
                }
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            continue;
        }
        let mut sum = 0.0;
        for x in s.iter_mut() {
            *x = (*x - m).exp();
            sum += *x;
        }
        for j in 0..nk {
            for t in 0..d {
                out[i * d + t] += (s[j] / sum * v[j * d + t] as f64) as f32;
            }
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod test_util {
    pub(crate) fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        crate::rng::XorShift::new(seed).vec(n, -2.0, 2.0)
    }

    pub(crate) fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }
}
