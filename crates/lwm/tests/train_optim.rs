//! AdamW + clipping + warmup/cosine + gradient accumulation against optax's trajectory
//! (fixture by scripts/make_adamw_fixture.py: the chain tux builds for LWM).

mod common;
use candle_core::{Device, Tensor, Var};
use common::fixture;
use lwm::train::optim::{AdamW, AdamWConfig};
use lwm::train::schedule::WarmupCosine;
use std::collections::BTreeMap;

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn adamw_matches_optax_multisteps_chain() {
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("adamw/trajectory.json")).unwrap())
            .unwrap();
    let c = &fx["config"];
    let f = |k: &str| c[k].as_f64().unwrap();
    let config = AdamWConfig {
        b1: f("b1"),
        b2: f("b2"),
        eps: f("eps"),
        weight_decay: f("weight_decay"),
        clip_norm: f("clip"),
        schedule: WarmupCosine {
            init_lr: f("init_value"),
            peak_lr: f("peak_value"),
            end_lr: f("end_value"),
            warmup_steps: c["warmup_steps"].as_u64().unwrap(),
            decay_steps: c["decay_steps"].as_u64().unwrap(),
        },
    };
    for (t, want) in floats(&fx["schedule_values"]).iter().enumerate() {
        let got = config.schedule.at(t as u64) as f32;
        assert!((got - want).abs() < 1e-6, "schedule t={t}: {got} vs {want}");
    }
    let accumulate = c["accumulate"].as_u64().unwrap() as usize;
    let mut params = BTreeMap::new();
    for (name, shape) in fx["shapes"].as_object().unwrap() {
        let shape: Vec<usize> = shape
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let init = floats(&fx["init"][name]);
        params.insert(
            name.clone(),
            Var::from_vec(init, shape, &Device::Cpu).unwrap(),
        );
    }
    let mut opt = AdamW::new(config, &params);
    for (i, grads) in fx["grads"].as_array().unwrap().iter().enumerate() {
        // loss = Σ θ ⊙ g has gradient g: feed optax's micro-batch gradients through autograd.
        let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
        for (name, var) in &params {
            let g = Tensor::from_vec(floats(&grads[name]), var.shape(), &Device::Cpu).unwrap();
            loss = (loss + (var.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
        }
        opt.accumulate(&params, &loss.backward().unwrap()).unwrap();
        if (i + 1) % accumulate == 0 {
            opt.update(&params).unwrap();
        }
        for (name, var) in &params {
            let want = floats(&fx["params_after"][i][name]);
            let got: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let d = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(d < 1e-6, "micro-batch {i}, '{name}': max |diff| {d}");
        }
    }
    assert_eq!(opt.step, 4);
}
