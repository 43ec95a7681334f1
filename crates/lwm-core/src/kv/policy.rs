//! KV-cache policies: which rows a sequence's cache keeps as it grows.
//!
//! * `full`: every row (the default).
//! * `sinks:N,window:W` (StreamingLLM, Xiao et al. 2023): the first N positions (attention
//!   sinks) and the W most recent; the rows in between are evicted after every forward step
//!   (each prefill chunk, each decoded token), so between steps the cache holds at most N+W
//!   rows (during a step, its own rows on top).
//! * `snapkv:BUDGET[,window:OBS][,kernel:K]` (SnapKV, Li et al. 2024): once the prompt is
//!   prefilled, every layer's KV head keeps the BUDGET−OBS prefix rows its last OBS prompt
//!   queries attended most (scores max-pooled over K neighbours) plus those OBS rows; the
//!   decode then attends only them and the new tokens.
//!
//! Keys are stored after RoPE at their original positions and are never re-rotated: a kept
//! row keeps the position it was computed at, and a new token takes the next position of
//! the sequence (`KvCache::next_pos`), not the row count.

use super::{KvCache, QuantKvView};
use crate::attention::partial::dot;
use std::fmt;
use std::str::FromStr;

/// SnapKV's defaults (the paper's observation window and pooling kernel).
pub const SNAPKV_WINDOW: usize = 32;
pub const SNAPKV_KERNEL: usize = 7;
/// Larger sizes are refused as typos (no context is that long).
const MAX_SIZE: usize = 1 << 30;

/// Which rows a KV cache keeps (see the module comment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvPolicy {
    #[default]
    Full,
    SinksWindow {
        sinks: usize,
        window: usize,
    },
    SnapKv {
        budget: usize,
        window: usize,
        kernel: usize,
    },
}

impl KvPolicy {
    /// Rows the cache holds (between steps) after `tokens` tokens. For SnapKV an upper
    /// bound: the prompt is held whole until it is compacted (`rows_after` is exact).
    pub fn max_rows(&self, tokens: usize) -> usize {
        match *self {
            KvPolicy::Full | KvPolicy::SnapKv { .. } => tokens,
            KvPolicy::SinksWindow { sinks, window } => tokens.min(sinks + window),
        }
    }

    /// Rows held after a prompt of `prompt` tokens and `generated` decoded tokens.
    pub fn rows_after(&self, prompt: usize, generated: usize) -> usize {
        match *self {
            KvPolicy::SnapKv { budget, .. } => prompt.min(budget) + generated,
            _ => self.max_rows(prompt + generated),
        }
    }

    /// Whether the policy may evict rows at all.
    pub fn is_full(&self) -> bool {
        *self == KvPolicy::Full
    }

    /// How many leading tokens of a prompt of `prompt` tokens may come from a cache that
    /// evicted nothing (a `Full` one): as many as hold the same keys under this policy.
    /// Sinks + window: the first N+W (nothing is evicted before). SnapKV must itself run
    /// its last OBS prompt tokens (it observes their queries).
    pub fn reusable_prefix(&self, prompt: usize) -> usize {
        match *self {
            KvPolicy::Full => prompt,
            KvPolicy::SinksWindow { sinks, window } => prompt.min(sinks + window),
            KvPolicy::SnapKv { budget, window, .. } if prompt > budget => prompt - window,
            KvPolicy::SnapKv { .. } => prompt,
        }
    }
}

impl fmt::Display for KvPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            KvPolicy::Full => write!(f, "full"),
            KvPolicy::SinksWindow { sinks, window } => write!(f, "sinks:{sinks},window:{window}"),
            KvPolicy::SnapKv {
                budget,
                window,
                kernel,
            } => {
                write!(f, "snapkv:{budget}")?;
                if window != SNAPKV_WINDOW {
                    write!(f, ",window:{window}")?;
                }
                if kernel != SNAPKV_KERNEL {
                    write!(f, ",kernel:{kernel}")?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for KvPolicy {
    type Err = anyhow::Error;

    /// `full`, `sinks:N,window:W`, `snapkv:BUDGET[,window:OBS][,kernel:K]`.
    fn from_str(s: &str) -> anyhow::Result<Self> {
        let text = s.trim();
        let fail = |why: &str| anyhow::anyhow!("kv policy '{text}': {why}");
        if text.eq_ignore_ascii_case("full") {
            return Ok(KvPolicy::Full);
        }
        // `key:value` pairs, comma separated; the first key names the policy.
        let mut pairs = Vec::new();
        for part in text.split(',') {
            let (k, v) = part
                .split_once(':')
                .ok_or_else(|| fail("use full, sinks:N,window:W or snapkv:BUDGET"))?;
            let k = k.trim().to_ascii_lowercase();
            let v = v.trim();
            let n: usize = v
                .parse()
                .map_err(|_| fail(&format!("'{v}' is not a whole number")))?;
            if n == 0 || n > MAX_SIZE {
                return Err(fail(&format!("{k} must be between 1 and {MAX_SIZE}")));
            }
            if pairs.iter().any(|(seen, _)| *seen == k) {
                return Err(fail(&format!("{k} given twice")));
            }
            pairs.push((k, n));
        }
        let get = |k: &str| pairs.iter().find(|(p, _)| p == k).map(|p| p.1);
        let only = |allowed: &[&str], usage: &str| -> anyhow::Result<()> {
            match pairs.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
                Some((k, _)) => Err(fail(&format!("unknown key '{k}': {usage}"))),
                None => Ok(()),
            }
        };
        match pairs[0].0.as_str() {
            "sinks" => {
                const USAGE: &str = "need sinks:N,window:W";
                only(&["sinks", "window"], USAGE)?;
                let (Some(sinks), Some(window)) = (get("sinks"), get("window")) else {
                    return Err(fail(USAGE));
                };
                Ok(KvPolicy::SinksWindow { sinks, window })
            }
            "snapkv" => {
                only(
                    &["snapkv", "window", "kernel"],
                    "need snapkv:BUDGET[,window:OBS][,kernel:K]",
                )?;
                let budget = pairs[0].1;
                let window = get("window").unwrap_or(SNAPKV_WINDOW);
                let kernel = get("kernel").unwrap_or(SNAPKV_KERNEL);
                if window >= budget {
                    return Err(fail(&format!(
                        "the observation window ({window}) must be smaller than the budget ({budget})"
                    )));
                }
                if kernel % 2 == 0 {
                    return Err(fail(&format!("the pooling kernel ({kernel}) must be odd")));
                }
                Ok(KvPolicy::SnapKv {
                    budget,
                    window,
                    kernel,
                })
            }
            _ => Err(fail("use full, sinks:N,window:W or snapkv:BUDGET")),
        }
    }
}

/// SnapKV's choice for one KV head: `scores[j]` is the attention prefix position j got from
/// the observation queries. Pooled: `s'[j] = max(s[j-K/2 ..= j+K/2])` (clipped at the
/// ends); kept: the `keep` positions of largest `s'` (ties: the earlier position), returned
/// ascending.
pub fn snapkv_select(scores: &[f32], keep: usize, kernel: usize) -> Vec<usize> {
    let half = kernel / 2;
    let n = scores.len();
    let pooled: Vec<f32> = (0..n)
        .map(|j| {
            scores[j.saturating_sub(half)..(j + half + 1).min(n)]
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max)
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| pooled[b].total_cmp(&pooled[a]).then(a.cmp(&b)));
    order.truncate(keep);
    order.sort_unstable();
    order
}

/// Queries kept during SnapKV's observation steps: per layer the RoPE'd query rows (rows ×
/// n_heads·d, appended step after step) and the cache row each query takes.
#[derive(Debug, Clone, Default)]
pub struct ObservedQueries {
    pub q: Vec<Vec<f32>>,
    pub rows: Vec<usize>,
}

impl ObservedQueries {
    /// Keep `layer`'s queries `q` (rows of `width` values) of a step whose rows start at
    /// cache row `row0`.
    pub fn push(&mut self, layer: usize, q: &[f32], row0: usize, width: usize) {
        if self.q.len() <= layer {
            self.q.resize(layer + 1, Vec::new());
        }
        self.q[layer].extend_from_slice(q);
        if layer == 0 {
            self.rows.extend(row0..row0 + q.len() / width.max(1));
        }
    }
}

/// SnapKV's scores of KV head `g` of one layer (`kv`, keys decoded to f32), from the
/// observed queries `q` (rows × n_heads·d) at cache rows `rows`:
///   p[h,i,j]  = softmax_{j' <= rows[i]} (q[i,h] · k[j'] / sqrt(d))[j]
///   score[j]  = Σ_i Σ_{h in g's group} p[h,i,j]
pub fn snapkv_head_scores(
    kv: &QuantKvView,
    g: usize,
    q: &[f32],
    rows: &[usize],
    n_heads: usize,
) -> Vec<f32> {
    let (d, n) = (kv.d, kv.len);
    let group = n_heads / kv.k.len();
    let width = n_heads * d;
    let scale = 1.0 / (d as f32).sqrt();
    let (mut k, mut v) = (Vec::new(), Vec::new());
    kv.decode_block(g, 0, n, &mut k, &mut v);
    let mut score = vec![0.0f32; n];
    let mut p = Vec::with_capacity(n);
    for (i, &row) in rows.iter().enumerate() {
        let seen = (row + 1).min(n);
        for h in g * group..(g + 1) * group {
            let qh = &q[i * width + h * d..i * width + (h + 1) * d];
            p.clear();
            p.extend(k[..seen * d].chunks_exact(d).map(|kj| scale * dot(qh, kj)));
            let m = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            p.iter_mut().for_each(|x| *x = (*x - m).exp());
            let sum: f32 = p.iter().sum();
            for (s, x) in score.iter_mut().zip(&p) {
                *s += x / sum;
            }
        }
    }
    score
}

/// SnapKV's compaction, once the whole prompt (P rows, nothing evicted) is in: every
/// layer's KV head keeps the `budget − window` prefix rows (of the first P − window) with
/// the largest pooled scores (`snapkv_head_scores`, `snapkv_select`) and the last `window`
/// rows (the observation window itself): `budget` rows, different ones per head.
pub fn snapkv_compact(
    cache: &mut KvCache,
    obs: &ObservedQueries,
    n_heads: usize,
    budget: usize,
    window: usize,
    kernel: usize,
) {
    let rows = cache.rows();
    if rows <= budget || cache.has_evicted() {
        return;
    }
    let prefix = rows - window;
    let n_kv = cache.layers.first().map_or(0, |l| l.k.len());
    let cache_ref = &*cache;
    let keep: Vec<Vec<usize>> = crate::parallel::map(cache.layers.len() * n_kv, |i| {
        let (layer, g) = (i / n_kv, i % n_kv);
        let kv = cache_ref.quant_view(layer);
        let scores = snapkv_head_scores(&kv, g, &obs.q[layer], &obs.rows, n_heads);
        let mut keep = snapkv_select(&scores[..prefix], budget - window, kernel);
        keep.extend(prefix..rows);
        keep
    });
    cache.retain_rows(|layer, g| keep[layer * n_kv + g].clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips() {
        for (text, want) in [
            ("full", KvPolicy::Full),
            (
                "sinks:4,window:1024",
                KvPolicy::SinksWindow {
                    sinks: 4,
                    window: 1024,
                },
            ),
            (
                "snapkv:1024",
                KvPolicy::SnapKv {
                    budget: 1024,
                    window: 32,
                    kernel: 7,
                },
            ),
            (
                "snapkv:64,window:8,kernel:3",
                KvPolicy::SnapKv {
                    budget: 64,
                    window: 8,
                    kernel: 3,
                },
            ),
        ] {
            let p: KvPolicy = text.parse().unwrap();
            assert_eq!(p, want);
            assert_eq!(p.to_string(), text);
        }
        assert_eq!(KvPolicy::default(), KvPolicy::Full);
        // Any key order, explicit defaults dropped from the canonical text.
        let p: KvPolicy = "snapkv:100,kernel:7,window:32".parse().unwrap();
        assert_eq!(p.to_string(), "snapkv:100");
    }

    #[test]
    fn bad_text_is_named() {
        for (text, says) in [
            ("sinks:0,window:0", "between 1"),
            ("sinks:4", "need sinks:N,window:W"),
            ("snapkv:", "not a whole number"),
            ("bogus", "use full"),
            ("snapkv:10,window:20", "must be smaller than the budget"),
            ("snapkv:100,kernel:4", "odd"),
            ("sinks:4,window:8,extra:1", "unknown key 'extra'"),
            ("sinks:4,window:99999999999", "between 1"),
            ("window:8,sinks:2", "use full"),
        ] {
            let e = text.parse::<KvPolicy>().unwrap_err().to_string();
            assert!(
                e.contains(&format!("'{text}'")) && e.contains(says),
                "{text}: {e}"
            );
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn rows_held() {
        let sw = KvPolicy::SinksWindow {
            sinks: 4,
            window: 16,
        };
        assert_eq!(sw.max_rows(10), 10);
        assert_eq!(sw.max_rows(1000), 20);
        assert_eq!(sw.reusable_prefix(1000), 20);
        let snap: KvPolicy = "snapkv:64,window:8".parse().unwrap();
        assert_eq!(snap.rows_after(1000, 5), 69);
        assert_eq!(snap.rows_after(50, 5), 55);
        assert_eq!(snap.reusable_prefix(1000), 992);
        assert_eq!(snap.reusable_prefix(60), 60);
        assert_eq!(KvPolicy::Full.max_rows(7), 7);
    }

    #[test]
    fn selection_pools_then_takes_the_largest() {
        // Pooling (K=3) spreads the peak at 4 to 3 and 5; 9 stands alone.
        let s = [0.0, 0.1, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.5];
        assert_eq!(snapkv_select(&s, 3, 3), vec![3, 4, 5]);
        assert_eq!(snapkv_select(&s, 5, 3), vec![3, 4, 5, 8, 9]);
        assert_eq!(snapkv_select(&s, 2, 1), vec![4, 9]);
    }
}
