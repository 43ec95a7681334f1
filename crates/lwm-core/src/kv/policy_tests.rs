//! KV policies on the tiny LLaMA fixture (f32 weights and cache, exact numerics), checked
//! against references written out here: plain f64 softmax attention over exactly the rows a
//! policy kept (run through the model's own layers with `forward_layers`), and SnapKV's
//! selection recomputed from the queries and keys of a plain full-attention prefill.

use crate::kv::{KvCache, KvPolicy, PositionRun};
use crate::model::{AttentionBackend, ForwardOptions, Model, PolicyState};
use crate::weights::gguf::GgufFile;
use anyhow::Result;

fn tiny() -> Model {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../lwm/tests/fixtures/tiny-llama/tiny-llama-f32.gguf");
    let file = GgufFile::open(&path).unwrap();
    let cfg = file.config().unwrap();
    Model::load(&file, cfg, ForwardOptions::default()).unwrap()
}

fn prompt(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11) % 256).collect()
}

fn argmax(x: &[f32]) -> u32 {
    x.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0 as u32
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Plain attention: per layer and KV head the rows held before the step (f32, rows × d),
/// the step's rows appended and attended causally; every layer's queries kept.
struct Naive {
    k: Vec<Vec<Vec<f32>>>,
    v: Vec<Vec<Vec<f32>>>,
    n_heads: usize,
    d: usize,
    queries: Vec<Vec<f32>>,
}

impl Naive {
    fn empty(m: &Model) -> Self {
        let c = &m.config;
        let heads = vec![Vec::new(); c.num_key_value_heads];
        Self {
            k: vec![heads.clone(); c.num_hidden_layers],
            v: vec![heads; c.num_hidden_layers],
            n_heads: c.num_attention_heads,
            d: c.head_dim,
            queries: vec![Vec::new(); c.num_hidden_layers],
        }
    }

    /// The rows a cache holds, decoded.
    fn of_cache(m: &Model, cache: &KvCache) -> Self {
        let mut n = Self::empty(m);
        for li in 0..m.config.num_hidden_layers {
            let view = cache.quant_view(li);
            for g in 0..view.k.len() {
                view.decode_block(g, 0, view.len, &mut n.k[li][g], &mut n.v[li][g]);
            }
        }
        n
    }

    /// Last-token logits of `ids` at positions `pos0..`, through the model's layers.
    fn logits(&mut self, m: &Model, ids: &[u32], pos0: usize) -> Vec<f32> {
        let runs = [PositionRun {
            row0: 0,
            pos0,
            len: ids.len(),
        }];
        let x = m
            .forward_layers(m.embed(ids).unwrap(), &runs, self)
            .unwrap();
        let h = m.config.hidden_size;
        m.head_logits(&x[x.len() - h..]).unwrap()
    }
}

impl AttentionBackend for Naive {
    fn attend(&mut self, li: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        let (nh, d) = (self.n_heads, self.d);
        let n_kv = self.k[li].len();
        let n = q.len() / (nh * d);
        let held = self.k[li][0].len() / d;
        for r in 0..n {
            for g in 0..n_kv {
                let at = (r * n_kv + g) * d;
                self.k[li][g].extend_from_slice(&k[at..at + d]);
                self.v[li][g].extend_from_slice(&v[at..at + d]);
            }
        }
        self.queries[li].extend_from_slice(q);
        let mut out = vec![0.0f32; q.len()];
        for r in 0..n {
            for h in 0..nh {
                let g = h / (nh / n_kv);
                let qh = &q[(r * nh + h) * d..(r * nh + h + 1) * d];
                let p = softmax(qh, &self.k[li][g], held + r + 1, d);
                for (j, pj) in p.iter().enumerate() {
                    for t in 0..d {
                        out[(r * nh + h) * d + t] += (pj * self.v[li][g][j * d + t] as f64) as f32;
                    }
                }
            }
        }
        Ok(out)
    }
}

/// softmax_j(q · k_j / sqrt(d)) over the first `seen` rows of `k`, in f64.
fn softmax(q: &[f32], k: &[f32], seen: usize, d: usize) -> Vec<f64> {
    let s: Vec<f64> = (0..seen)
        .map(|j| {
            let dot: f64 = (0..d).map(|t| q[t] as f64 * k[j * d + t] as f64).sum();
            dot / (d as f64).sqrt()
        })
        .collect();
    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.into_iter().map(|x| x / sum).collect()
}

/// Prefill `ids` in pieces of `chunk` under `policy`, then decode `decode` greedy tokens;
/// `check(cache before the step, the step's ids, their first position, logits)` sees
/// every step. Returns every step's logits and the cache.
fn run(
    m: &Model,
    policy: KvPolicy,
    ids: &[u32],
    chunk: usize,
    decode: usize,
    mut check: impl FnMut(&KvCache, &[u32], usize, &[f32]),
) -> (Vec<Vec<f32>>, KvCache) {
    let mut cache = m.new_cache();
    let mut st = PolicyState::new(policy, ids.len());
    let mut out = Vec::new();
    let mut step = |piece: &[u32], pos0: usize, cache: &mut KvCache| {
        let before = cache.clone();
        let logits = m.forward_policy(piece, cache, &mut st).unwrap();
        check(&before, piece, pos0, &logits);
        logits
    };
    for (i, piece) in ids.chunks(chunk).enumerate() {
        out.push(step(piece, i * chunk, &mut cache));
    }
    for t in 0..decode {
        let id = argmax(out.last().unwrap());
        out.push(step(&[id], ids.len() + t, &mut cache));
    }
    (out, cache)
}

#[test]
fn full_and_unevicting_policies_give_the_full_bits() {
    let m = tiny();
    let ids = prompt(30);
    let (full, _) = run(&m, KvPolicy::Full, &ids, 7, 5, |_, _, _, _| {});
    // Before policies: plain `forward` steps.
    let mut cache = m.new_cache();
    let mut plain: Vec<Vec<f32>> = ids
        .chunks(7)
        .map(|p| m.forward(p, &mut cache, false).unwrap())
        .collect();
    for _ in 0..5 {
        let id = argmax(plain.last().unwrap());
        plain.push(m.forward(&[id], &mut cache, false).unwrap());
    }
    assert_eq!(full, plain);
    for policy in ["sinks:4,window:31", "snapkv:30,window:8", "snapkv:64"] {
        let (got, cache) = run(&m, policy.parse().unwrap(), &ids, 7, 5, |_, _, _, _| {});
        assert_eq!(got, full, "{policy}");
        assert!(!cache.has_evicted(), "{policy}");
    }
}

#[test]
fn sinks_window_holds_at_most_n_plus_w_and_decodes_like_plain_attention_over_them() {
    let m = tiny();
    let (sinks, window) = (4, 8);
    let ids = prompt(40);
    let mut steps = 0;
    let (_, cache) = run(
        &m,
        KvPolicy::SinksWindow { sinks, window },
        &ids,
        16,
        6,
        |before, step, pos, logits| {
            let n = pos;
            let want: Vec<usize> = if n <= sinks + window {
                (0..n).collect()
            } else {
                (0..sinks).chain(n - window..n).collect()
            };
            assert_eq!(before.rows(), want.len());
            assert_eq!(before.next_pos(), pos);
            for li in 0..m.config.num_hidden_layers {
                for g in 0..m.config.num_key_value_heads {
                    let mut held = before.positions(li, g);
                    held.sort_unstable();
                    assert_eq!(held, want);
                }
            }
            // Prefill pieces after an eviction attend the kept rows, then their own causally.
            let reference = Naive::of_cache(&m, before).logits(&m, step, pos);
            let diff = max_diff(logits, &reference);
            assert!(diff < 1e-4, "step at {pos}: {diff}");
            steps += 1;
        },
    );
    assert_eq!(steps, 3 + 6);
    let row_bytes = cache.types.row_pair_bytes(m.config.head_dim);
    let per_row = m.config.num_hidden_layers * m.config.num_key_value_heads * row_bytes;
    assert_eq!(cache.bytes(), (sinks + window) * per_row);
    assert_eq!(cache.len(), 46);
}

#[test]
fn snapkv_keeps_the_top_scoring_rows_of_a_plain_reference() {
    let m = tiny();
    let c = &m.config;
    let (budget, window, kernel) = (16, 4, 3);
    let ids = prompt(48);
    // Reference: a plain full-attention prefill, its queries and keys.
    let mut naive = Naive::empty(&m);
    naive.logits(&m, &ids, 0);
    let (nh, d, n) = (c.num_attention_heads, c.head_dim, ids.len());
    let group = nh / c.num_key_value_heads;
    let prefix = n - window;
    let mut expected = Vec::new();
    for li in 0..c.num_hidden_layers {
        for g in 0..c.num_key_value_heads {
            let mut score = vec![0.0f64; prefix];
            for i in prefix..n {
                for h in g * group..(g + 1) * group {
                    let q = &naive.queries[li][(i * nh + h) * d..(i * nh + h + 1) * d];
                    let p = softmax(q, &naive.k[li][g], i + 1, d);
                    for j in 0..prefix {
                        score[j] += p[j];
                    }
                }
            }
            let pooled: Vec<f64> = (0..prefix)
                .map(|j| {
                    let lo = j.saturating_sub(kernel / 2);
                    let hi = (j + kernel / 2).min(prefix - 1);
                    score[lo..=hi].iter().copied().fold(f64::MIN, f64::max)
                })
                .collect();
            let mut order: Vec<usize> = (0..prefix).collect();
            order.sort_by(|&a, &b| pooled[b].total_cmp(&pooled[a]).then(a.cmp(&b)));
            let mut keep = order[..budget - window].to_vec();
            keep.sort();
            keep.extend(prefix..n);
            expected.push(keep);
        }
    }
    let policy = KvPolicy::SnapKv {
        budget,
        window,
        kernel,
    };
    // Pieces of 5 cross the window's start (44) inside a piece and run it in two steps.
    let (_, cache) = run(&m, policy, &ids, 5, 0, |_, _, _, _| {});
    assert_eq!(cache.rows(), budget);
    assert_eq!(cache.next_pos(), n);
    let mut differ = false;
    for li in 0..c.num_hidden_layers {
        for g in 0..c.num_key_value_heads {
            let got = cache.positions(li, g);
            assert_eq!(
                got,
                expected[li * c.num_key_value_heads + g],
                "layer {li} head {g}"
            );
            differ |= got != cache.positions(0, 0);
        }
    }
    assert!(differ, "heads chose differently");
    // The decode attends exactly the kept rows (different ones per head).
    run(&m, policy, &ids, 5, 3, |before, step, pos, logits| {
        let want_rows = if pos < n { pos } else { budget + pos - n };
        assert_eq!(before.rows(), want_rows);
        let reference = Naive::of_cache(&m, before).logits(&m, step, pos);
        let diff = max_diff(logits, &reference);
        assert!(diff < 1e-4, "step at {pos}: {diff}");
    });
}
