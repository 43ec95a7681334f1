//! Learning-rate schedule: optax `warmup_cosine_decay_schedule`, as tux's AdamW uses it.
//!
//! ```text
//!   t < warmup:  lr(t) = init + (peak − init) · t / warmup
//!   else:        u = min(t − warmup, decay − warmup) / (decay − warmup)
//!                lr(t) = end + (peak − end) · ½ (1 + cos(π u))
//! ```
//! `t` counts optimizer updates already applied (0 for the first update).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WarmupCosine {
    pub init_lr: f64,
    pub peak_lr: f64,
    pub end_lr: f64,
    pub warmup_steps: u64,
    /// Step at which the cosine reaches `end_lr` (counted from 0, warmup included).
    pub decay_steps: u64,
}

impl WarmupCosine {
    pub fn at(&self, t: u64) -> f64 {
        if t < self.warmup_steps {
            return self.init_lr
                + (self.peak_lr - self.init_lr) * t as f64 / self.warmup_steps as f64;
        }
        let span = self.decay_steps.saturating_sub(self.warmup_steps).max(1);
        let u = (t - self.warmup_steps).min(span) as f64 / span as f64;
        self.end_lr + (self.peak_lr - self.end_lr) * 0.5 * (1.0 + (std::f64::consts::PI * u).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_optax_values() {
        // optax.warmup_cosine_decay_schedule(0.0, 1e-2, 10, 110, 1e-3) at t = 0, 5, 10, 60, 110, 200.
        let s = WarmupCosine {
            init_lr: 0.0,
            peak_lr: 1e-2,
            end_lr: 1e-3,
            warmup_steps: 10,
            decay_steps: 110,
        };
        let want = [0.0, 5e-3, 1e-2, 5.5e-3, 1e-3, 1e-3];
        for (t, w) in [0u64, 5, 10, 60, 110, 200].iter().zip(want) {
            assert!((s.at(*t) - w).abs() < 1e-12, "t={t}: {} vs {w}", s.at(*t));
        }
    }
}
