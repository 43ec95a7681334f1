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
    /// Base of ggml's RoPE cache (`rope_norm`), when that arithmetic is in force: llama.cpp
    /// numerics, interleaved pairs and unscaled frequencies (its emulation covers no more).
    ggml_base: Option<f32>,
    inv_freq: Vec<f64>,
    position_scale: f64,
    /// YaRN's attention factor: cos and sin are scaled by it (1 otherwise).
    attention_factor: f32,
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
        let mut inv_freq: Vec<f64> = (0..half)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64))
            .collect();
        let mut position_scale = 1.0;
        let mut attention_factor = 1.0;
        match *scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => position_scale = 1.0 / factor,
            RopeScaling::Yarn {
                factor,
                original_max_position,
                beta_fast,
                beta_slow,
                attention_factor: af,
            } => {
                attention_factor = af.unwrap_or(if factor <= 1.0 {
                    1.0
                } else {
                    0.1 * factor.ln() + 1.0
                }) as f32;
                yarn_inv_freq(
                    &mut inv_freq,
                    head_dim,
                    theta,
                    factor,
                    original_max_position as f64,
                    beta_fast,
                    beta_slow,
                );
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                let old = original_max_position as f64;
                let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
                for f in &mut inv_freq {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        Self {
            head_dim,
            layout,
            ggml_base: None,
            inv_freq,
            position_scale,
            attention_factor,
        }
    }

    /// The model's RoPE, decided once from its config and the numerics: ggml's arithmetic
    /// when `ggml_numerics` and the model's RoPE is one ggml's emulation reproduces
    /// (interleaved, unscaled), LWM's table otherwise.
    pub fn for_model(c: &crate::config::ModelConfig, ggml_numerics: bool) -> Self {
        let mut rope = Self::new(c.head_dim, c.theta, c.rope_layout, &c.rope_scaling);
        if ggml_numerics
            && c.rope_layout == RopeLayout::Interleaved
            && c.rope_scaling == RopeScaling::None
        {
            rope.ggml_base = Some(c.theta as f32);
        }
        rope
    }

    /// The angles of the positions `runs` give (one table per run; none under ggml's
    /// arithmetic, which forms its own), computed once per step for every layer.
    pub fn tables(&self, runs: &[crate::kv::PositionRun]) -> Vec<RopeTable> {
        if self.ggml_base.is_some() {
            return Vec::new();
        }
        runs.iter().map(|r| self.table(r.pos0, r.len)).collect()
    }

    /// Rotate the `n_heads` heads of the rows of `x` (row stride `n_heads · head_dim`) at
    /// the positions `runs` give them; `tables` is `self.tables(runs)`.
    pub fn apply_runs(
        &self,
        x: &mut [f32],
        runs: &[crate::kv::PositionRun],
        n_heads: usize,
        tables: &[RopeTable],
    ) {
        let width = n_heads * self.head_dim;
        for (i, run) in runs.iter().enumerate() {
            if run.len == 0 {
                continue;
            }
            let xs = &mut x[run.row0 * width..(run.row0 + run.len) * width];
            match self.ggml_base {
                Some(base) => crate::quant::ggml_cpu::rope_norm(
                    xs,
                    run.len,
                    run.pos0,
                    n_heads,
                    self.head_dim,
                    base,
                    crate::quant::ggml_cpu::RopeRounding::FirstProductFused,
                ),
                None => self.apply(xs, run.len, width, n_heads, &tables[i]),
            }
        }
    }

    /// The inverse frequencies in use (per rotated pair).
    pub fn inv_freq(&self) -> &[f64] {
        &self.inv_freq
    }

    pub fn attention_factor(&self) -> f32 {
        self.attention_factor
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
                cos.push(angle.cos() * self.attention_factor);
                sin.push(angle.sin() * self.attention_factor);
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

/// YaRN's frequencies: pair i keeps `θ^{-2i/D}` (extrapolation) below the ramp, takes
/// `θ^{-2i/D}/factor` (interpolation) above it, and blends linearly in between; the ramp
/// runs from `floor(dim(β_fast))` to `ceil(dim(β_slow))`, where
/// `dim(r) = D·ln(L/(2πr)) / (2 ln θ)` is the pair that turns r times over the original
/// context L.
fn yarn_inv_freq(
    inv_freq: &mut [f64],
    d: usize,
    theta: f64,
    factor: f64,
    original: f64,
    beta_fast: f64,
    beta_slow: f64,
) {
    let dim_of =
        |r: f64| d as f64 * (original / (r * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
    let low = dim_of(beta_fast).floor().max(0.0);
    let mut high = dim_of(beta_slow).ceil().min(d as f64 - 1.0);
    if low == high {
        high += 0.001;
    }
    for (i, f) in inv_freq.iter_mut().enumerate() {
        let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
        let extrapolation = 1.0 - ramp;
        *f = *f / factor * ramp + *f * extrapolation;
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

    fn fixture() -> serde_json::Value {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../lwm/tests/fixtures/rope_scaling.json"
        );
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    fn assert_close(ours: &[f64], want: &serde_json::Value, what: &str) {
        let want: Vec<f64> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(ours.len(), want.len(), "{what}");
        for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
            // The reference runs in f32 (as transformers does): relative 1e-6.
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "{what} pair {i}: {a} vs {b}"
            );
        }
    }

    #[test]
    fn yarn_and_llama3_frequencies_match_the_transformers_formulas() {
        let f = fixture();
        for key in ["yarn", "yarn_b"] {
            let y = &f[key];
            let scaling = RopeScaling::Yarn {
                factor: y["factor"].as_f64().unwrap(),
                original_max_position: y["original_max"].as_u64().unwrap() as usize,
                beta_fast: y["beta_fast"].as_f64().unwrap(),
                beta_slow: y["beta_slow"].as_f64().unwrap(),
                attention_factor: None,
            };
            let d = y["dim"].as_u64().unwrap() as usize;
            let r = Rope::new(
                d,
                y["base"].as_f64().unwrap(),
                RopeLayout::RotateHalf,
                &scaling,
            );
            assert_close(r.inv_freq(), &y["inv_freq"], key);
            let af = y["attention_factor"].as_f64().unwrap();
            assert!(
                (r.attention_factor() as f64 - af).abs() < 1e-6,
                "{key} mscale"
            );
            // The table carries the factor: |(cos, sin)| = attention_factor.
            let t = r.table(100, 1);
            let norm = (t.cos[3] * t.cos[3] + t.sin[3] * t.sin[3]).sqrt() as f64;
            assert!((norm - af).abs() < 1e-5);
        }
        let l = &f["llama3"];
        let scaling = RopeScaling::Llama3 {
            factor: l["factor"].as_f64().unwrap(),
            low_freq_factor: l["low_freq_factor"].as_f64().unwrap(),
            high_freq_factor: l["high_freq_factor"].as_f64().unwrap(),
            original_max_position: l["original_max"].as_u64().unwrap() as usize,
        };
        let r = Rope::new(
            128,
            l["base"].as_f64().unwrap(),
            RopeLayout::RotateHalf,
            &scaling,
        );
        assert_close(r.inv_freq(), &l["inv_freq"], "llama3");
    }
}
