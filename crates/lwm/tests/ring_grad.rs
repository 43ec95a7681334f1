//! Ring attention across threads: forward and backward (dK/dV travelling back to their
//! owners) against the original's ringattention library (sp=2 fixture) and against the
//! non-ring blockwise gradients, for several ring sizes.

mod common;
use candle_core::Tensor;
use common::fixture;
use lwm::attention::Chunking;
use lwm::train::attention_grad::{blockwise_backward, blockwise_forward, AttnDims, AttnMasking};
use lwm::train::ring_grad::{ring_backward, ring_forward};
use std::sync::Arc;

fn npy(name: &str) -> Vec<f32> {
    Tensor::read_npy(fixture(&format!("attention-grad/{name}.npy")))
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn ring_gradients_match_the_ringattention_library() {
    let dims = AttnDims {
        batch: 2,
        len: 64,
        heads: 2,
        kv_heads: 2,
        d: 16,
    };
    let seg: Vec<u32> = npy("segment_ids").iter().map(|&x| x as u32).collect();
    let masking = AttnMasking {
        causal: true,
        segment_ids: Some(Arc::new(seg)),
        chunking: Chunking::default(),
    };
    let (q, k, v, dout) = (npy("q"), npy("k"), npy("v"), npy("dout"));
    for sp in [1, 2, 4, 8] {
        let (out, lse) = ring_forward(&q, &k, &v, &dims, &masking, sp).unwrap();
        let (dq, dk, dv) =
            ring_backward(&q, &k, &v, &out, &lse, &dout, &dims, &masking, sp).unwrap();
        for (name, got) in [("out", out), ("dq", dq), ("dk", dk), ("dv", dv)] {
            let d = max_diff(&got, &npy(name));
            assert!(d < 1e-4, "sp={sp} {name}: max |diff| {d}");
        }
    }
}

#[test]
fn ring_matches_non_ring_with_gqa_and_no_segments() {
    let dims = AttnDims {
        batch: 1,
        len: 36,
        heads: 4,
        kv_heads: 2,
        d: 8,
    };
    let mut rng = lwm::rng::XorShift::new(5);
    let q = rng.vec(36 * 4 * 8, -2.0, 2.0);
    let k = rng.vec(36 * 2 * 8, -2.0, 2.0);
    let v = rng.vec(36 * 2 * 8, -2.0, 2.0);
    let dout = rng.vec(36 * 4 * 8, -1.0, 1.0);
    for causal in [true, false] {
        let masking = AttnMasking {
            causal,
            segment_ids: None,
            chunking: Chunking {
                query_chunk: 5,
                key_chunk: 7,
            },
        };
        let (out, lse) = blockwise_forward(&q, &k, &v, &dims, &masking);
        let (dq, dk, dv) = blockwise_backward(&q, &k, &v, &out, &lse, &dout, &dims, &masking);
        for sp in [2, 3, 6] {
            let (rout, rlse) = ring_forward(&q, &k, &v, &dims, &masking, sp).unwrap();
            assert!(max_diff(&rout, &out) < 1e-5 && max_diff(&rlse, &lse) < 1e-5);
            let (rq, rk, rv) =
                ring_backward(&q, &k, &v, &rout, &rlse, &dout, &dims, &masking, sp).unwrap();
            for (name, a, b) in [("dq", &rq, &dq), ("dk", &rk, &dk), ("dv", &rv, &dv)] {
                let d = max_diff(a, b);
                assert!(d < 1e-4, "causal={causal} sp={sp} {name}: {d}");
            }
        }
    }
    let masking = AttnMasking::causal(Chunking::default());
    let e = ring_forward(&q, &k, &v, &dims, &masking, 5)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not split into 5"), "{e}");
}

#[test]
fn training_through_the_ring_equals_training_without_it() {
    use lwm::train::loss::{lwm_loss, Targets};
    use lwm::train::model::{BatchInput, TrainModel};
    let cfg = common::train::tiny_llama();
    let mut model = TrainModel::init_normal(cfg, 0.2, 4).unwrap();
    let tokens: Vec<u32> = (0..49u32).map(|i| (i * 13 + 5) % 50).collect();
    let mut input = BatchInput::plain(1, 48, tokens[..48].to_vec());
    // Two packed documents: the boundary falls inside the second of three shards.
    input.segment_ids = Some((0..48).map(|i| (i >= 21) as u32).collect());
    input.positions = (0..48u32)
        .map(|i| if i >= 21 { i - 21 } else { i })
        .collect();
    let targets = Targets {
        tokens: tokens[1..].to_vec(),
        loss_mask: vec![1.0; 48],
        vision_mask: None,
    };
    let grads_for = |model: &TrainModel| -> Vec<Vec<f32>> {
        let logits = model.forward(&input).unwrap();
        let g = lwm_loss(&logits.text, None, &targets)
            .unwrap()
            .backward()
            .unwrap();
        model
            .params()
            .values()
            .map(|v| {
                g.get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect()
    };
    let reference = grads_for(&model);
    for sp in [2, 3] {
        model.sp = sp;
        let got = grads_for(&model);
        for (a, b) in got.iter().zip(&reference) {
            let d = max_diff(a, b);
            assert!(d < 1e-4, "sp={sp}: gradient differs by {d}");
        }
    }
}
