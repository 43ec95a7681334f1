//! Blockwise attention backward (from the saved lse) against the original's `ringattention`
//! library (fixture by scripts/make_attention_grad_fixture.py: sp=2 ring, causal + segment
//! ids) and against a dense f64 gradient, through candle autograd.

mod common;
use candle_core::{Device, Tensor, Var};
use common::fixture;
use lwm::attention::Chunking;
use lwm::train::attention_grad::{blockwise_attention, AttnMasking};
use std::sync::Arc;

fn npy(name: &str) -> Tensor {
    Tensor::read_npy(fixture(&format!("attention-grad/{name}.npy"))).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Output and (dq, dk, dv) of `sum(attention(q, k, v) ⊙ dout)` through candle autograd.
fn autograd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
    masking: &AttnMasking,
) -> (Vec<f32>, [Vec<f32>; 3]) {
    let (qv, kv, vv) = (
        Var::from_tensor(q).unwrap(),
        Var::from_tensor(k).unwrap(),
        Var::from_tensor(v).unwrap(),
    );
    let out = blockwise_attention(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), masking).unwrap();
    let loss = (&out * dout).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = |x: &Var| {
        flat(
            grads
                .get(x.as_tensor())
                .expect("gradient reaches the input"),
        )
    };
    (flat(&out), [g(&qv), g(&kv), g(&vv)])
}

#[test]
fn gradients_match_the_ringattention_library() {
    let (q, k, v, dout) = (npy("q"), npy("k"), npy("v"), npy("dout"));
    let seg: Vec<u32> = flat(
        &npy("segment_ids")
            .to_dtype(candle_core::DType::F32)
            .unwrap(),
    )
    .iter()
    .map(|&x| x as u32)
    .collect();
    assert!(seg.iter().any(|&s| s > 0), "fixture has several documents");
    // Our tiling differs from the library's (8/16 over a 2-shard ring); results must not.
    for chunking in [
        Chunking {
            query_chunk: 8,
            key_chunk: 16,
        },
        Chunking {
            query_chunk: 5,
            key_chunk: 3,
        },
        Chunking {
            query_chunk: 64,
            key_chunk: 64,
        },
    ] {
        let masking = AttnMasking {
            causal: true,
            segment_ids: Some(Arc::new(seg.clone())),
            chunking,
        };
        let (out, [dq, dk, dv]) = autograd(&q, &k, &v, &dout, &masking);
        for (name, got, want) in [
            ("out", out, flat(&npy("out"))),
            ("dq", dq, flat(&npy("dq"))),
            ("dk", dk, flat(&npy("dk"))),
            ("dv", dv, flat(&npy("dv"))),
        ] {
            let d = max_diff(&got, &want);
            assert!(d < 1e-4, "{name} {chunking:?}: max |diff| {d}");
        }
    }
    // And the segment ids matter: without them the gradients differ.
    let (_, [dq, ..]) = autograd(&q, &k, &v, &dout, &AttnMasking::causal(Chunking::default()));
    assert!(max_diff(&dq, &flat(&npy("dq"))) > 1e-2);
}

/// Dense attention and its gradient in f64 with the full L × L matrix (the textbook formulas).
#[allow(clippy::type_complexity)]
fn dense_reference(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    (b, l, h, kvh, d): (usize, usize, usize, usize, usize),
    causal: bool,
    seg: Option<&[u32]>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let group = h / kvh;
    let scale = 1.0 / (d as f64).sqrt();
    let qi = |bb: usize, t: usize, hh: usize| ((bb * l + t) * h + hh) * d;
    let ki = |bb: usize, t: usize, hh: usize| ((bb * l + t) * kvh + hh) * d;
    let (mut out, mut dq) = (vec![0.0f64; q.len()], vec![0.0f64; q.len()]);
    let (mut dk, mut dv) = (vec![0.0f64; k.len()], vec![0.0f64; v.len()]);
    for bb in 0..b {
        for hh in 0..h {
            let kh = hh / group;
            for i in 0..l {
                let allowed = |j: usize| {
                    (!causal || j <= i) && seg.is_none_or(|s| s[bb * l + i] == s[bb * l + j])
                };
                let s: Vec<f64> = (0..l)
                    .map(|j| {
                        if !allowed(j) {
                            return f64::NEG_INFINITY;
                        }
                        (0..d)
                            .map(|t| q[qi(bb, i, hh) + t] as f64 * k[ki(bb, j, kh) + t] as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                let p: Vec<f64> = s.iter().map(|x| (x - m).exp() / z).collect();
                for j in 0..l {
                    for t in 0..d {
                        out[qi(bb, i, hh) + t] += p[j] * v[ki(bb, j, kh) + t] as f64;
                    }
                }
                let g = &dout[qi(bb, i, hh)..qi(bb, i, hh) + d];
                let dp: Vec<f64> = (0..l)
                    .map(|j| {
                        (0..d)
                            .map(|t| g[t] as f64 * v[ki(bb, j, kh) + t] as f64)
                            .sum()
                    })
                    .collect();
                let pdp: f64 = (0..l).map(|j| p[j] * dp[j]).sum();
                for j in 0..l {
                    let ds = p[j] * (dp[j] - pdp);
                    for t in 0..d {
                        dq[qi(bb, i, hh) + t] += ds * scale * k[ki(bb, j, kh) + t] as f64;
                        dk[ki(bb, j, kh) + t] += ds * scale * q[qi(bb, i, hh) + t] as f64;
                        dv[ki(bb, j, kh) + t] += p[j] * g[t] as f64;
                    }
                }
            }
        }
    }
    let f = |x: Vec<f64>| x.into_iter().map(|y| y as f32).collect();
    (f(out), f(dq), f(dk), f(dv))
}

#[test]
fn gradients_match_dense_reference_with_gqa_and_odd_tiles() {
    let (b, l, h, kvh, d) = (2, 37, 4, 2, 8);
    let mut rng = lwm::rng::XorShift::new(81);
    let dev = Device::Cpu;
    let mk = |n: usize, rng: &mut lwm::rng::XorShift, shape: (usize, usize, usize, usize)| {
        Tensor::from_vec(rng.vec(n, -2.0, 2.0), shape, &dev).unwrap()
    };
    let q = mk(b * l * h * d, &mut rng, (b, l, h, d));
    let k = mk(b * l * kvh * d, &mut rng, (b, l, kvh, d));
    let v = mk(b * l * kvh * d, &mut rng, (b, l, kvh, d));
    let dout = mk(b * l * h * d, &mut rng, (b, l, h, d));
    let seg: Vec<u32> = (0..b * l).map(|i| ((i % l) / 11) as u32).collect();
    for (causal, seg) in [(true, Some(seg.clone())), (true, None), (false, Some(seg))] {
        let (out_r, dq_r, dk_r, dv_r) = dense_reference(
            &flat(&q),
            &flat(&k),
            &flat(&v),
            &flat(&dout),
            (b, l, h, kvh, d),
            causal,
            seg.as_deref(),
        );
        for chunking in [
            Chunking {
                query_chunk: 4,
                key_chunk: 7,
            },
            Chunking {
                query_chunk: 37,
                key_chunk: 1,
            },
        ] {
            let masking = AttnMasking {
                causal,
                segment_ids: seg.clone().map(Arc::new),
                chunking,
            };
            let (out, [dq, dk, dv]) = autograd(&q, &k, &v, &dout, &masking);
            for (name, got, want) in [
                ("out", out, &out_r),
                ("dq", dq, &dq_r),
                ("dk", dk, &dk_r),
                ("dv", dv, &dv_r),
            ] {
                let diff = max_diff(&got, want);
                assert!(diff < 1e-4, "{name} causal={causal} {chunking:?}: {diff}");
            }
        }
    }
}

#[test]
fn mismatched_shapes_are_an_error_not_a_panic() {
    let dev = Device::Cpu;
    let q = Tensor::zeros((1, 4, 3, 8), candle_core::DType::F32, &dev).unwrap();
    let k = Tensor::zeros((1, 4, 2, 8), candle_core::DType::F32, &dev).unwrap();
    let e = blockwise_attention(&q, &k, &k, &AttnMasking::causal(Chunking::default()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("multiple of the KV heads"), "{e}");
    let masking = AttnMasking {
        causal: true,
        segment_ids: Some(Arc::new(vec![0; 3])),
        chunking: Chunking::default(),
    };
    let e = blockwise_attention(&q, &q, &q, &masking)
        .unwrap_err()
        .to_string();
    assert!(e.contains("segment ids"), "{e}");
}
