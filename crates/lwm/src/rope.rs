//! Rotary position embedding with base `theta`.
//!
//! `inv_freq[i] = theta^(-2i/D)` in f64; the angle `t · inv_freq[i]` is formed in f64 and
//! rounded to f32 before sin/cos, exactly as LWM's JAX code built its table (numpy f64
//! outer product, cast to f32). At t ≈ 1M that rounding is ~0.03 rad; the models were
//! trained with it, so we keep it.
//!
//! Two channel pairings (see `RopeLayout`): interleaved (x[2i], x[2i+1]) and rotate-half
//! (x[i], x[i+D/2]); both rotate pair i by the same angle.

use crate::config::{RopeLayout, RopeScaling};

#[derive(Debug, Clone)]
pub struct Rope {
    pub head_dim: usize,
    pub layout: RopeLayout,
    inv_freq: Vec<f64>,
    position_scale: f64,
}

/// cos/sin for a run of consecutive positions: (n × D/2) each.
pub struct RopeTable {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    half: usize,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f64, layout: RopeLayout, scaling: &RopeScaling) -> Self {
        let half = head_dim / 2;
        let inv_freq = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
            .collect();
        let position_scale = match scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Linear { factor } => 1.0 / factor,
        };
        Self {
            head_dim,
            layout,
            inv_freq,
            position_scale,
        }
    }

    /// Angles for positions `pos0..pos0+n`.
    pub fn table(&self, pos0: usize, n: usize) -> RopeTable {
        let half = self.head_dim / 2;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for t in pos0..pos0 + n {
            let t = t as f64 * self.position_scale;
            for f in &self.inv_freq {
                let angle = (t * f) as f32;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        RopeTable { cos, sin, half }
    }

    /// Rotate `n_heads` heads of each of the n rows of `x` (row stride `stride`) in place.
    pub fn apply(&self, x: &mut [f32], n: usize, stride: usize, n_heads: usize, table: &RopeTable) {
        let d = self.head_dim;
        let half = table.half;
        for row in 0..n {
            let cos = &table.cos[row * half..(row + 1) * half];
            let sin = &table.sin[row * half..(row + 1) * half];
            for h in 0..n_heads {
                let base = row * stride + h * d;
                let head = &mut x[base..base + d];
                match self.layout {
                    RopeLayout::Interleaved => {
                        for i in 0..half {
                            let (x0, x1) = (head[2 * i], head[2 * i + 1]);
                            head[2 * i] = x0 * cos[i] - x1 * sin[i];
                            head[2 * i + 1] = x0 * sin[i] + x1 * cos[i];
                        }
                    }
                    RopeLayout::RotateHalf => {
                        for i in 0..half {
                            let (x0, x1) = (head[i], head[i + half]);
                            head[i] = x0 * cos[i] - x1 * sin[i];
                            head[i + half] = x0 * sin[i] + x1 * cos[i];
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_agree_after_the_hf_row_permutation() {
        // HF's q rows are the interleaved rows reordered: evens first, then odds (per head).
        let d = 8;
        let x: Vec<f32> = (0..d).map(|i| i as f32 * 0.37 - 1.0).collect();
        let permuted: Vec<f32> = (0..d / 2)
            .map(|i| x[2 * i])
            .chain((0..d / 2).map(|i| x[2 * i + 1]))
            .collect();
        let inter = Rope::new(d, 10_000.0, RopeLayout::Interleaved, &RopeScaling::None);
        let half = Rope::new(d, 10_000.0, RopeLayout::RotateHalf, &RopeScaling::None);
        let t = inter.table(1234, 1);
        let mut a = x.clone();
        inter.apply(&mut a, 1, d, 1, &t);
        let mut b = permuted.clone();
        half.apply(&mut b, 1, d, 1, &t);
        let a_perm: Vec<f32> = (0..d / 2)
            .map(|i| a[2 * i])
            .chain((0..d / 2).map(|i| a[2 * i + 1]))
            .collect();
        for (p, q) in a_perm.iter().zip(&b) {
            assert!((p - q).abs() < 1e-6);
        }
    }

    #[test]
    fn angle_is_rounded_to_f32_before_sin_cos() {
        let r = Rope::new(128, 5e7, RopeLayout::Interleaved, &RopeScaling::None);
        let t = r.table(1_000_000, 1);
        let angle = (1_000_000f64 * 1.0) as f32; // inv_freq[0] = 1
        assert_eq!(t.cos[0], angle.cos());
        let norm: f32 = t.cos[5] * t.cos[5] + t.sin[5] * t.sin[5];
        assert!((norm - 1.0).abs() < 1e-6);
    }
}
