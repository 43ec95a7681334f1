//! Token sampling: penalties, greedy / top-k / top-p / min-p / temperature,
//! grammar masks and log-probabilities.
//!
//! The chain follows llama.cpp's default order:
//!
//! 0. logit bias (OpenAI's `logit_bias`: added to the raw logits; -100 bans the token),
//! 1. grammar mask (disallowed tokens are removed before anything else),
//! 2. penalties over the last `repeat_last_n` tokens of the history
//!    (repeat penalty, then OpenAI-style presence / frequency penalties),
//! 3. `temperature <= 0` → argmax (ties go to the lowest id, NaN never wins),
//! 4. otherwise top-k → top-p → min-p → temperature → softmax → draw.
//!
//! Top-p and min-p look at the distribution at temperature 1 over the
//! candidates that survived the previous filters (as llama.cpp does);
//! temperature only reshapes the final draw.
//!
//! Cost per step is O(vocab) plus O(k log k) for the top-k sort. Top-p without
//! top-k needs a full sort of the surviving candidates. Working buffers live in
//! the [`Sampler`] and are reused between calls.

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Ordering;

/// Sampling settings. Missing fields take their [`Default`] values when
/// deserialized.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature. `0` (or less) selects greedy decoding.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens. `0` turns it off.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of tokens whose cumulative
    /// probability is at least `top_p` (at least one token). `1.0` turns it off.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the probability of
    /// the most likely token. `0` turns it off.
    pub min_p: f32,
    /// Repetition penalty: positive logits of recently seen tokens are divided
    /// by it, negative ones multiplied. `1.0` turns it off.
    pub repeat_penalty: f32,
    /// How many of the most recent history tokens the penalties look at.
    /// `0` disables all penalties.
    pub repeat_last_n: usize,
    /// Subtracted once from the logit of every token seen in the window.
    pub presence_penalty: f32,
    /// Subtracted from the logit of a token once per occurrence in the window.
    pub frequency_penalty: f32,
    /// Seed of the random generator.
    pub seed: u64,
    /// (token id, bias) added to that token's logit before anything else, as OpenAI's
    /// `logit_bias`; a bias of -100 or less bans the token outright (its logit becomes
    /// -inf), so a ban holds even against a huge logit. Ids past the vocabulary are ignored.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    /// llama.cpp-like defaults: temperature 0.8, top_k 40, top_p 0.95,
    /// min_p 0.05, repeat_penalty 1.0 (off), repeat_last_n 64, no presence or
    /// frequency penalty, seed 0.
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Plain greedy decoding: temperature 0, every filter and penalty off.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
            logit_bias: Vec::new(),
        }
    }

    /// Check that every value is usable.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !t.is_finite() {
            bail!("sampling: temperature must be a finite number, got {t}");
        }
        if t < 0.0 {
            bail!("sampling: temperature must be >= 0 (0 = greedy), got {t}");
        }
        let p = self.top_p;
        if p.is_nan() || p <= 0.0 || p > 1.0 {
            bail!("sampling: top_p must be in (0, 1] (1 = off), got {p}");
        }
        let m = self.min_p;
        if m.is_nan() || !(0.0..=1.0).contains(&m) {
            bail!("sampling: min_p must be in [0, 1] (0 = off), got {m}");
        }
        let r = self.repeat_penalty;
        if !r.is_finite() || r <= 0.0 {
            bail!("sampling: repeat_penalty must be a finite number > 0 (1 = off), got {r}");
        }
        if !self.presence_penalty.is_finite() {
            bail!(
                "sampling: presence_penalty must be a finite number, got {}",
                self.presence_penalty
            );
        }
        if !self.frequency_penalty.is_finite() {
            bail!(
                "sampling: frequency_penalty must be a finite number, got {}",
                self.frequency_penalty
            );
        }
        if let Some((id, b)) = self.logit_bias.iter().find(|(_, b)| b.is_nan()) {
            bail!("sampling: the logit bias of token {id} must be a number, got {b}");
        }
        Ok(())
    }

    fn penalties_active(&self) -> bool {
        self.repeat_last_n > 0
            && (self.repeat_penalty != 1.0
                || self.presence_penalty != 0.0
                || self.frequency_penalty != 0.0)
    }
}

/// A seeded token sampler. Keep one per generated sequence: its random state
/// advances with every draw, so the same seed and the same logits give the
/// same tokens.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Penalised copy of the logits (only used when penalties are on).
    work: Vec<f32>,
    /// Candidate (logit, id) pairs; later overwritten with probabilities.
    cands: Vec<(f32, u32)>,
    /// Sorted copy of the penalty window.
    window: Vec<u32>,
}

/// Descending by logit, ties by ascending id. Logits are never NaN here.
fn by_logit_desc(a: &(f32, u32), b: &(f32, u32)) -> Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

fn is_allowed(allowed: Option<&[bool]>, i: usize) -> bool {
    match allowed {
        None => true,
        Some(mask) => mask.get(i).copied().unwrap_or(false),
    }
}

/// Argmax over allowed, non-NaN logits; ties go to the lowest id. An allowed
/// token wins even if its logit is `-inf`.
fn argmax_allowed(logits: &[f32], allowed: Option<&[bool]>) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() || !is_allowed(allowed, i) {
            continue;
        }
        match best {
            Some((_, bv)) if v <= bv => {}
            _ => best = Some((i, v)),
        }
    }
    best.map(|(i, _)| i as u32)
}

impl Sampler {
    /// Validate `params` and seed the generator with `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Self {
            params,
            rng,
            work: Vec::new(),
            cands: Vec::new(),
            window: Vec::new(),
        })
    }

    /// The settings this sampler uses.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Pick the next token from raw logits (`logits.len()` = vocab size).
    /// `history` holds every token id so far (prompt + generated); the
    /// penalties use its last `repeat_last_n` entries.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        self.sample_masked(logits, history, None)
    }

    /// Like [`Sampler::sample`], with an optional allowed-token mask (e.g. from
    /// a grammar). Token `i` may be returned only if `allowed[i]` is true; ids
    /// past the end of the mask count as disallowed.
    ///
    /// Fallbacks: if filtering leaves no candidate with a finite logit, the
    /// allowed non-NaN token with the highest logit is returned (lowest id on
    /// ties). If the mask allows no non-NaN token at all, the mask is ignored
    /// and the plain argmax is returned; if every logit is NaN, 0 is returned.
    pub fn sample_masked(
        &mut self,
        logits: &[f32],
        history: &[u32],
        allowed: Option<&[bool]>,
    ) -> u32 {
        let Self {
            params,
            rng,
            work,
            cands,
            window,
        } = self;

        // 0. Logit bias, then 1. penalties (on a copy, only when either is active).
        let biased = !params.logit_bias.is_empty();
        let penalised = params.penalties_active() && !history.is_empty();
        if biased || penalised {
            work.clear();
            work.extend_from_slice(logits);
        }
        if biased {
            for &(id, b) in &params.logit_bias {
                if let Some(l) = work.get_mut(id as usize) {
                    *l = if b <= -100.0 {
                        f32::NEG_INFINITY
                    } else {
                        *l + b
                    };
                }
            }
        }
        let src: &[f32] = if penalised {
            let start = history.len().saturating_sub(params.repeat_last_n);
            window.clear();
            window.extend_from_slice(&history[start..]);
            window.sort_unstable();
            let mut i = 0;
            while i < window.len() {
                let id = window[i];
                let mut j = i + 1;
                while j < window.len() && window[j] == id {
                    j += 1;
                }
                let count = (j - i) as f32;
                i = j;
                let Some(l) = work.get_mut(id as usize) else {
                    continue;
                };
                if *l <= 0.0 {
                    *l *= params.repeat_penalty;
                } else {
                    *l /= params.repeat_penalty;
                }
                *l -= count * params.frequency_penalty + params.presence_penalty;
            }
            work
        } else if biased {
            work
        } else {
            logits
        };

        let fallback = |src: &[f32]| -> u32 {
            argmax_allowed(src, allowed)
                .or_else(|| argmax_allowed(src, None))
                .unwrap_or(0)
        };

        // 2. Greedy.
        if params.temperature <= 0.0 {
            return fallback(src);
        }

        // 3. Candidates: allowed tokens with a logit above -inf.
        cands.clear();
        match allowed {
            None => cands.extend(
                src.iter()
                    .enumerate()
                    .filter(|(_, &v)| v > f32::NEG_INFINITY)
                    .map(|(i, &v)| (v, i as u32)),
            ),
            Some(mask) => cands.extend(
                src.iter()
                    .zip(mask.iter())
                    .enumerate()
                    .filter(|(_, (&v, &ok))| ok && v > f32::NEG_INFINITY)
                    .map(|(i, (&v, _))| (v, i as u32)),
            ),
        }
        if cands.is_empty() {
            return fallback(src);
        }
        // +inf logits: those tokens share all the probability mass.
        if cands.iter().any(|c| c.0 == f32::INFINITY) {
            cands.retain(|c| c.0 == f32::INFINITY);
            for c in cands.iter_mut() {
                c.0 = 0.0;
            }
        }

        // 4. Top-k (leaves the kept candidates sorted, descending).
        let mut sorted = false;
        let k = params.top_k;
        if k > 0 {
            if k < cands.len() {
                cands.select_nth_unstable_by(k - 1, by_logit_desc);
                cands.truncate(k);
            }
            cands.sort_unstable_by(by_logit_desc);
            sorted = true;
        }

        // 5. Top-p, on the temperature-1 distribution of the candidates.
        if params.top_p < 1.0 && cands.len() > 1 {
            if !sorted {
                cands.sort_unstable_by(by_logit_desc);
                sorted = true;
            }
            let max = cands[0].0;
            let total: f64 = cands.iter().map(|c| ((c.0 - max) as f64).exp()).sum();
            let target = params.top_p as f64 * total;
            let mut cum = 0.0f64;
            let mut keep = cands.len();
            for (i, c) in cands.iter().enumerate() {
                cum += ((c.0 - max) as f64).exp();
                if cum >= target {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep.max(1));
        }

        // 6. Min-p: p_i >= min_p * p_max  <=>  l_i >= l_max + ln(min_p).
        if params.min_p > 0.0 && cands.len() > 1 {
            let max = if sorted {
                cands[0].0
            } else {
                cands.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.0))
            };
            let threshold = max + params.min_p.ln();
            cands.retain(|c| c.0 >= threshold);
        }

        if cands.len() == 1 {
            return cands[0].1;
        }

        // 7. Temperature + softmax (weights stored in place), then draw.
        let max = cands.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.0));
        let inv_t = 1.0 / params.temperature as f64;
        let mut total = 0.0f64;
        for c in cands.iter_mut() {
            let w = (((c.0 - max) as f64) * inv_t).exp();
            c.0 = w as f32;
            total += w;
        }
        let u = rng.random::<f64>() * total;
        let mut cum = 0.0f64;
        for c in cands.iter() {
            cum += c.0 as f64;
            if u < cum {
                return c.1;
            }
        }
        // Rounding left `u` past the last cumulative sum: take the last token
        // with non-zero weight.
        cands
            .iter()
            .rev()
            .find(|c| c.0 > 0.0)
            .map_or(cands[0].1, |c| c.1)
    }
}

/// Log-softmax helper for logprobs. Returns the log-probability of `id`
/// (`-inf` if `id` is out of range or its logit is NaN) and the `top_n` most
/// likely `(id, logprob)` pairs, sorted descending (ties by lowest id).
/// NaN logits are ignored. If no logit is above `-inf`, returns
/// `(-inf, [])`.
pub fn logprobs(logits: &[f32], id: u32, top_n: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits
        .iter()
        .filter(|v| !v.is_nan())
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if max == f32::NEG_INFINITY {
        return (f32::NEG_INFINITY, Vec::new());
    }
    if max == f32::INFINITY {
        // Degenerate: the +inf tokens share the mass uniformly.
        let n = logits.iter().filter(|&&v| v == f32::INFINITY).count() as f32;
        let lp = |v: f32| {
            if v == f32::INFINITY {
                -n.ln()
            } else {
                f32::NEG_INFINITY
            }
        };
        let own = logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |&v| lp(v));
        let top = logits
            .iter()
            .enumerate()
            .filter(|(_, &v)| v == f32::INFINITY)
            .take(top_n)
            .map(|(i, &v)| (i as u32, lp(v)))
            .collect();
        return (own, top);
    }
    let sum: f64 = logits
        .iter()
        .filter(|v| !v.is_nan())
        .map(|&v| ((v - max) as f64).exp())
        .sum();
    let lse = max as f64 + sum.ln();
    let lp = |v: f32| (v as f64 - lse) as f32;
    let own = match logits.get(id as usize) {
        Some(&v) if !v.is_nan() => lp(v),
        _ => f32::NEG_INFINITY,
    };
    let mut top: Vec<(f32, u32)> = Vec::new();
    if top_n > 0 {
        top.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, v)| !v.is_nan())
                .map(|(i, &v)| (v, i as u32)),
        );
        if top_n < top.len() {
            top.select_nth_unstable_by(top_n - 1, by_logit_desc);
            top.truncate(top_n);
        }
        top.sort_unstable_by(by_logit_desc);
    }
    (own, top.into_iter().map(|(v, i)| (i, lp(v))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplingParams::greedy()
        }
    }

    /// Pseudo-random logits without pulling in another RNG.
    fn fake_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
            })
            .collect()
    }

    fn argmax(v: &[f32]) -> u32 {
        argmax_allowed(v, None).unwrap()
    }

    #[test]
    fn defaults_and_validation() {
        let d = SamplingParams::default();
        assert_eq!(d.temperature, 0.8);
        assert_eq!(d.top_k, 40);
        assert_eq!(d.top_p, 0.95);
        assert_eq!(d.min_p, 0.05);
        assert_eq!(d.repeat_last_n, 64);
        d.validate().unwrap();
        SamplingParams::greedy().validate().unwrap();

        let bad = |f: &dyn Fn(&mut SamplingParams), what: &str| {
            let mut p = SamplingParams::default();
            f(&mut p);
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains(what), "{e}");
            assert!(Sampler::new(p).is_err());
        };
        bad(&|p| p.temperature = -0.1, "temperature");
        bad(&|p| p.temperature = f32::NAN, "temperature");
        bad(&|p| p.top_p = 0.0, "top_p");
        bad(&|p| p.top_p = 1.5, "top_p");
        bad(&|p| p.top_p = f32::NAN, "top_p");
        bad(&|p| p.min_p = -0.1, "min_p");
        bad(&|p| p.min_p = 1.1, "min_p");
        bad(&|p| p.min_p = f32::NAN, "min_p");
        bad(&|p| p.repeat_penalty = 0.0, "repeat_penalty");
        bad(&|p| p.repeat_penalty = f32::NAN, "repeat_penalty");
        bad(&|p| p.presence_penalty = f32::NAN, "presence_penalty");
        bad(
            &|p| p.frequency_penalty = f32::INFINITY,
            "frequency_penalty",
        );
    }

    #[test]
    fn serde_partial() {
        let p: SamplingParams = serde_json::from_str(r#"{"temperature": 0.0, "seed": 7}"#).unwrap();
        assert_eq!(p.temperature, 0.0);
        assert_eq!(p.seed, 7);
        assert_eq!(p.top_k, 40);
        let back: SamplingParams =
            serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        for seed in 0..20 {
            let l = fake_logits(1000, seed);
            assert_eq!(s.sample(&l, &[]), argmax(&l));
        }
        // Ties go to the lowest id; NaN is never chosen.
        assert_eq!(s.sample(&[1.0, 3.0, 3.0, 2.0], &[]), 1);
        assert_eq!(s.sample(&[f32::NAN, 0.5, f32::NAN, 0.7], &[]), 3);
        assert_eq!(s.sample(&[-1.0, f32::NAN, -0.5], &[]), 2);
        // Default params with temperature 0 are greedy too.
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        })
        .unwrap();
        let l = fake_logits(500, 3);
        assert_eq!(s.sample(&l, &[]), argmax(&l));
    }

    #[test]
    fn seeds_are_reproducible() {
        let l = vec![0.0f32; 100];
        let draw = |seed: u64| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params(1.0)
            })
            .unwrap();
            (0..300).map(|_| s.sample(&l, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
        // With defaults (top-k/top-p/min-p on) too.
        let l = fake_logits(32000, 9);
        let draw = |seed: u64| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                temperature: 1.5,
                ..Default::default()
            })
            .unwrap();
            (0..200).map(|_| s.sample(&l, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn top_k_one_is_greedy() {
        for &t in &[0.1f32, 1.0, 5.0, 100.0] {
            let mut s = Sampler::new(SamplingParams {
                top_k: 1,
                ..params(t)
            })
            .unwrap();
            for seed in 0..20 {
                let l = fake_logits(2000, seed);
                assert_eq!(s.sample(&l, &[]), argmax(&l));
            }
            // Tie: lowest id, like greedy.
            assert_eq!(s.sample(&[0.0, 2.0, 2.0], &[]), 1);
        }
    }

    #[test]
    fn top_k_restricts_support() {
        let l = fake_logits(5000, 11);
        let mut idx: Vec<u32> = (0..l.len() as u32).collect();
        idx.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]));
        let top5 = &idx[..5];
        let mut s = Sampler::new(SamplingParams {
            top_k: 5,
            ..params(50.0)
        })
        .unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..2000 {
            let t = s.sample(&l, &[]);
            assert!(top5.contains(&t));
            seen.insert(t);
        }
        assert_eq!(seen.len(), 5, "high temperature should reach all top-5");
    }

    #[test]
    fn tiny_top_p_is_argmax() {
        let mut s = Sampler::new(SamplingParams {
            top_p: 1e-6,
            ..params(10.0)
        })
        .unwrap();
        for seed in 0..20 {
            let l = fake_logits(3000, seed);
            assert_eq!(s.sample(&l, &[]), argmax(&l));
        }
        // With top-k as well.
        let mut s = Sampler::new(SamplingParams {
            top_p: 1e-6,
            top_k: 40,
            ..params(10.0)
        })
        .unwrap();
        let l = fake_logits(3000, 5);
        assert_eq!(s.sample(&l, &[]), argmax(&l));
    }

    #[test]
    fn top_p_keeps_nucleus() {
        // probs ≈ [0.5, 0.3, 0.2, ~0]: p = 0.7 keeps {0, 1}.
        let l = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln(), -30.0];
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.7,
            ..params(1.0)
        })
        .unwrap();
        let mut seen = [0usize; 4];
        for _ in 0..3000 {
            seen[s.sample(&l, &[]) as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0);
        assert_eq!(seen[2] + seen[3], 0);
    }

    #[test]
    fn min_p_filters() {
        // probs ∝ [1, 0.5, 0.04, 0.01]; min_p = 0.1 keeps ids 0 and 1.
        let l = [0.0f32, 0.5f32.ln(), 0.04f32.ln(), 0.01f32.ln()];
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.1,
            ..params(1.0)
        })
        .unwrap();
        let mut seen = [0usize; 4];
        for _ in 0..5000 {
            seen[s.sample(&l, &[]) as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        // Without min_p the tail shows up.
        let mut s = Sampler::new(params(1.0)).unwrap();
        let mut tail = 0;
        for _ in 0..5000 {
            tail += (s.sample(&l, &[]) >= 2) as usize;
        }
        assert!(tail > 0);
        // min_p = 1 keeps only the max.
        let mut s = Sampler::new(SamplingParams {
            min_p: 1.0,
            ..params(3.0)
        })
        .unwrap();
        for _ in 0..100 {
            assert_eq!(s.sample(&l, &[]), 0);
        }
    }

    #[test]
    fn repeat_penalty_changes_argmax() {
        let l = [1.0f32, 2.0, 1.8, -1.0];
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 1.5,
            ..SamplingParams::greedy()
        })
        .unwrap();
        assert_eq!(s.sample(&l, &[]), 1);
        // 2.0 / 1.5 = 1.33 < 1.8
        assert_eq!(s.sample(&l, &[1]), 2);
        // Both penalised: 1.33 vs 1.2 vs 1.0 → 1.
        assert_eq!(s.sample(&l, &[1, 2]), 1);
        // Outside the window: no effect.
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 1.5,
            repeat_last_n: 2,
            ..SamplingParams::greedy()
        })
        .unwrap();
        assert_eq!(s.sample(&l, &[1, 0, 0]), 1);
        assert_eq!(s.sample(&l, &[0, 0, 1]), 2);
        // repeat_last_n = 0 disables penalties.
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 1.5,
            repeat_last_n: 0,
            ..SamplingParams::greedy()
        })
        .unwrap();
        assert_eq!(s.sample(&l, &[1]), 1);
        // Negative logits are multiplied: -1 * 3 = -3 < -2.
        let l = [-1.0f32, -2.0];
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 3.0,
            ..SamplingParams::greedy()
        })
        .unwrap();
        assert_eq!(s.sample(&l, &[0]), 1);
        // Out-of-vocab history ids are ignored.
        assert_eq!(s.sample(&l, &[99]), 0);
    }

    #[test]
    fn presence_and_frequency_penalties() {
        let l = [3.0f32, 2.5, 0.0];
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.6,
            ..SamplingParams::greedy()
        })
        .unwrap();
        assert_eq!(s.sample(&l, &[0, 0, 0]), 1); // 2.4 < 2.5
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 0.2,
            ..SamplingParams::greedy()
        })
        .unwrap();
        assert_eq!(s.sample(&l, &[0, 0]), 0); // 2.6 > 2.5
        assert_eq!(s.sample(&l, &[0, 0, 0]), 1); // 2.4 < 2.5
    }

    #[test]
    fn logit_bias_bans_and_forces() {
        let logits = fake_logits(64, 7);
        let top = argmax(&logits);
        // -100 bans the greedy choice, at any temperature.
        for t in [0.0, 1.0] {
            let mut p = params(t);
            p.logit_bias = vec![(top, -100.0)];
            let mut s = Sampler::new(p).unwrap();
            for _ in 0..50 {
                assert_ne!(s.sample(&logits, &[]), top);
            }
        }
        // +100 forces a token the model ranks last, also under a mask that allows it.
        let last = logits
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0 as u32;
        let mut p = params(1.0);
        p.logit_bias = vec![(last, 100.0), (10_000, 5.0)];
        let mut s = Sampler::new(p).unwrap();
        let mask: Vec<bool> = (0..64).map(|i| i % 2 == last as usize % 2).collect();
        for _ in 0..50 {
            assert_eq!(s.sample(&logits, &[]), last);
            assert_eq!(s.sample_masked(&logits, &[], Some(&mask)), last);
        }
        // The mask still wins over a bias: a forced but disallowed token is not drawn.
        let mask: Vec<bool> = (0..64).map(|i| i as u32 != last).collect();
        assert_ne!(s.sample_masked(&logits, &[], Some(&mask)), last);
        let mut p = params(1.0);
        p.logit_bias = vec![(1, f32::NAN)];
        assert!(Sampler::new(p).is_err());
    }

    #[test]
    fn masked_never_disallowed() {
        let n = 1000;
        let allowed: Vec<bool> = (0..n).map(|i| i % 7 == 3).collect();
        for p in [
            SamplingParams::greedy(),
            params(1.0),
            params(5.0),
            SamplingParams::default(),
            SamplingParams {
                top_k: 3,
                ..params(2.0)
            },
        ] {
            let mut s = Sampler::new(p).unwrap();
            for seed in 0..200 {
                let l = fake_logits(n, seed);
                let t = s.sample_masked(&l, &[], Some(&allowed)) as usize;
                assert!(allowed[t], "token {t} is not allowed");
            }
        }
        // The best token is masked out: greedy takes the best allowed one.
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        let l = [5.0f32, 1.0, 2.0];
        assert_eq!(s.sample_masked(&l, &[], Some(&[false, true, true])), 2);
        // An allowed -inf token is still picked when it is the only one.
        let l = [5.0f32, f32::NEG_INFINITY, 2.0];
        let mask = [false, true, false];
        assert_eq!(s.sample_masked(&l, &[], Some(&mask)), 1);
        let mut s = Sampler::new(params(1.0)).unwrap();
        assert_eq!(s.sample_masked(&l, &[], Some(&mask)), 1);
        // Short mask: ids past its end are disallowed.
        assert_eq!(s.sample_masked(&[0.0, 9.0, 9.0], &[], Some(&[true])), 0);
    }

    #[test]
    fn frequencies_match_softmax() {
        let l = [1.0f32, 0.0, -0.5];
        let z: f64 = l.iter().map(|&v| (v as f64).exp()).sum();
        let expect: Vec<f64> = l.iter().map(|&v| (v as f64).exp() / z).collect();
        let mut s = Sampler::new(SamplingParams {
            seed: 1234,
            ..params(1.0)
        })
        .unwrap();
        let n = 20000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[s.sample(&l, &[]) as usize] += 1;
        }
        for i in 0..3 {
            let f = counts[i] as f64 / n as f64;
            assert!(
                (f - expect[i]).abs() < 0.02,
                "token {i}: {f} vs {}",
                expect[i]
            );
        }
        // Temperature 2 flattens: p ∝ exp(l / 2).
        let z: f64 = l.iter().map(|&v| (v as f64 / 2.0).exp()).sum();
        let mut s = Sampler::new(SamplingParams {
            seed: 99,
            ..params(2.0)
        })
        .unwrap();
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[s.sample(&l, &[]) as usize] += 1;
        }
        for i in 0..3 {
            let e = (l[i] as f64 / 2.0).exp() / z;
            let f = counts[i] as f64 / n as f64;
            assert!((f - e).abs() < 0.02, "token {i}: {f} vs {e}");
        }
    }

    #[test]
    fn degenerate_logits() {
        let mut s = Sampler::new(params(1.0)).unwrap();
        assert_eq!(s.sample(&[f32::NAN, f32::NAN], &[]), 0);
        assert_eq!(
            s.sample(&[f32::NEG_INFINITY, f32::NEG_INFINITY, 1.0], &[]),
            2
        );
        assert_eq!(s.sample(&[0.0, f32::INFINITY, 3.0], &[]), 1);
        assert_eq!(s.sample(&[f32::NAN, 0.0], &[]), 1);
    }

    #[test]
    fn logprobs_normalised() {
        let l = fake_logits(32000, 77);
        let (lp, top) = logprobs(&l, 5, 10);
        assert_eq!(top.len(), 10);
        // Sum of exp over every token is 1.
        let (_, every) = logprobs(&l, 0, l.len());
        assert_eq!(every.len(), l.len());
        let sum: f64 = every.iter().map(|&(_, p)| (p as f64).exp()).sum();
        assert!((sum - 1.0).abs() < 1e-4, "{sum}");
        // Own logprob agrees with the list; top is sorted and starts at argmax.
        let own = every.iter().find(|&&(i, _)| i == 5).unwrap().1;
        assert!((own - lp).abs() < 1e-6);
        assert_eq!(top[0].0, argmax(&l));
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
        // Small exact case.
        let (lp, top) = logprobs(&[0.0, 0.0, f32::NAN, 0.0, 0.0], 1, 2);
        assert!((lp - 0.25f32.ln()).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(logprobs(&[1.0], 3, 1).0, f32::NEG_INFINITY);
    }
}
