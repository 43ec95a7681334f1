//! AdamW as LWM trains with it (tux `OptimizerFactory`, optax chain):
//! `clip_by_global_norm(clip)` then `adamw(schedule, b1, b2, eps, weight_decay)` on every
//! parameter (no exclusions, norms and embeddings decay too), wrapped in gradient
//! accumulation (`optax.MultiSteps`: the mean of `accumulate` micro-batch gradients).
//!
//! ```text
//!   g      ← g · min(1, clip / ‖g‖₂)             (global norm over all parameters)
//!   m      ← b1·m + (1 − b1)·g
//!   v      ← b2·v + (1 − b2)·g²
//!   m̂, v̂  = m / (1 − b1ᵗ), v / (1 − b2ᵗ)        (t = update count, from 1)
//!   θ      ← θ − lr(t−1) · (m̂ / (√v̂ + eps) + wd·θ)
//! ```

use super::schedule::WarmupCosine;
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub b1: f64,
    pub b2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub clip_norm: f64,
    pub schedule: WarmupCosine,
}

impl Default for AdamWConfig {
    /// tux defaults: b2 0.95, weight decay 1e-4, clip 1.0, lr 0.01 → 0.001 with 2000 warmup steps.
    fn default() -> Self {
        Self {
            b1: 0.9,
            b2: 0.95,
            eps: 1e-8,
            weight_decay: 1e-4,
            clip_norm: 1.0,
            schedule: WarmupCosine {
                init_lr: 0.0,
                peak_lr: 0.01,
                end_lr: 0.001,
                warmup_steps: 2000,
                decay_steps: 500_000,
            },
        }
    }
}

/// What one update did (for the log).
#[derive(Debug, Clone, Copy)]
pub struct UpdateStats {
    pub lr: f64,
    pub grad_norm: f64,
    pub param_norm: f64,
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// Updates applied so far.
    pub step: u64,
    mu: BTreeMap<String, Vec<f32>>,
    nu: BTreeMap<String, Vec<f32>>,
    /// Gradient sums of the micro-batches since the last update.
    accum: BTreeMap<String, Vec<f32>>,
    pub accum_count: u64,
}

impl AdamW {
    pub fn new(config: AdamWConfig, params: &BTreeMap<String, Var>) -> Self {
        let zeros = || {
            params
                .iter()
                .map(|(n, v)| (n.clone(), vec![0.0f32; v.elem_count()]))
                .collect::<BTreeMap<_, _>>()
        };
        Self {
            config,
            step: 0,
            mu: zeros(),
            nu: zeros(),
            accum: zeros(),
            accum_count: 0,
        }
    }

    /// Add one micro-batch's gradients.
    pub fn accumulate(&mut self, params: &BTreeMap<String, Var>, grads: &GradStore) -> Result<()> {
        for (name, var) in params {
            let acc = self
                .accum
                .get_mut(name)
                .context("optimizer state lacks a parameter")?;
            if let Some(g) = grads.get(var.as_tensor()) {
                let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
                for (a, x) in acc.iter_mut().zip(&g) {
                    *a += x;
                }
            }
        }
        self.accum_count += 1;
        Ok(())
    }

    /// Replace the accumulated gradients with `f` of them, flattened in parameter-name order
    /// (sequence-parallel ranks sum theirs: `seq_parallel::SeqComm::sum`).
    pub fn map_accumulated(&mut self, f: impl FnOnce(Vec<f32>) -> Result<Vec<f32>>) -> Result<()> {
        let flat: Vec<f32> = self
            .accum
            .values()
            .flat_map(|g| g.iter().copied())
            .collect();
        let n = flat.len();
        let new = f(flat)?;
        if new.len() != n {
            bail!("{} gradient values came back for {n}", new.len());
        }
        let mut at = 0;
        for g in self.accum.values_mut() {
            let len = g.len();
            g.copy_from_slice(&new[at..at + len]);
            at += len;
        }
        Ok(())
    }

    /// Apply the mean accumulated gradient to `params`.
    pub fn update(&mut self, params: &BTreeMap<String, Var>) -> Result<UpdateStats> {
        if self.accum_count == 0 {
            bail!("optimizer update without gradients");
        }
        let c = self.config;
        let inv = 1.0 / self.accum_count as f64;
        let sq: f64 = self
            .accum
            .values()
            .flat_map(|g| g.iter())
            .map(|&x| (x as f64 * inv).powi(2))
            .sum();
        let grad_norm = sq.sqrt();
        let clip = if grad_norm > c.clip_norm {
            c.clip_norm / grad_norm
        } else {
            1.0
        };
        let g_scale = (inv * clip) as f32;
        let lr = c.schedule.at(self.step);
        self.step += 1;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.b1.powi(t), 1.0 - c.b2.powi(t));
        let (b1, b2) = (c.b1 as f32, c.b2 as f32);
        let mut param_sq = 0.0f64;
        for (name, var) in params {
            let mut theta: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
            let (m, v, acc) = (
                self.mu
                    .get_mut(name)
                    .context("optimizer state lacks a parameter")?,
                self.nu
                    .get_mut(name)
                    .context("optimizer state lacks a parameter")?,
                self.accum
                    .get_mut(name)
                    .context("optimizer state lacks a parameter")?,
            );
            for i in 0..theta.len() {
                let g = acc[i] * g_scale;
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let m_hat = m[i] as f64 / bc1;
                let v_hat = v[i] as f64 / bc2;
                let upd = m_hat / (v_hat.sqrt() + c.eps) + c.weight_decay * theta[i] as f64;
                theta[i] = (theta[i] as f64 - lr * upd) as f32;
                param_sq += (theta[i] as f64).powi(2);
                acc[i] = 0.0;
            }
            var.set(&Tensor::from_vec(theta, var.shape(), &Device::Cpu)?)?;
        }
        self.accum_count = 0;
        Ok(UpdateStats {
            lr,
            grad_norm,
            param_norm: param_sq.sqrt(),
        })
    }

    /// Moments as named tensors (`mu.NAME`, `nu.NAME`) for a checkpoint.
    pub fn state_tensors(&self, params: &BTreeMap<String, Var>) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (name, var) in params {
            for (prefix, map) in [("mu", &self.mu), ("nu", &self.nu)] {
                let data = map[name].clone();
                out.push((
                    format!("{prefix}.{name}"),
                    Tensor::from_vec(data, var.shape(), &Device::Cpu)?,
                ));
            }
        }
        Ok(out)
    }

    /// Restore moments saved by `state_tensors`, checking every name and shape.
    pub fn load_state(
        &mut self,
        params: &BTreeMap<String, Var>,
        tensors: &std::collections::HashMap<String, Tensor>,
        step: u64,
        origin: &str,
    ) -> Result<()> {
        for (name, var) in params {
            for prefix in ["mu", "nu"] {
                let key = format!("{prefix}.{name}");
                let t = tensors
                    .get(&key)
                    .with_context(|| format!("{origin}: optimizer tensor '{key}' is missing"))?;
                if t.dims() != var.dims() {
                    bail!(
                        "{origin}: optimizer tensor '{key}' has shape {:?}, the model has {:?}",
                        t.dims(),
                        var.dims()
                    );
                }
                let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
                let map = if prefix == "mu" {
                    &mut self.mu
                } else {
                    &mut self.nu
                };
                map.insert(name.clone(), data);
            }
        }
        self.step = step;
        self.accum.values_mut().for_each(|a| a.fill(0.0));
        self.accum_count = 0;
        Ok(())
    }
}
