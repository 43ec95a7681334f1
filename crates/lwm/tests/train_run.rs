//! The training loop end to end on a tiny model: exact resume, staged context extension
//! whose checkpoints `lwm` loads, NaN stop, and corrupt or mismatched checkpoints.

mod common;
use common::train::{config, workdir};
use lwm::model::{ForwardOptions, Model};
use lwm::train::checkpoint;
use lwm::train::config::TrainConfig;
use lwm::train::model::BatchInput;
use lwm::train::run::{run, RunOptions};
use lwm::weights::hf::{load_hf_config, HfWeights};
use std::path::Path;

fn params(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let loaded = checkpoint::load(&checkpoint::latest(dir).unwrap().unwrap()).unwrap();
    loaded
        .model
        .params()
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            )
        })
        .collect()
}

#[test]
fn resume_is_exact() {
    let a = workdir("full");
    let cfg = config(&a, "");
    let full = run(&cfg, &RunOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(full.global_step, 6);

    let b = workdir("split");
    let cfg_b = config(&b, "");
    let first = run(
        &cfg_b,
        &RunOptions {
            max_global_steps: Some(3),
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap();
    assert!(first.interrupted && first.global_step == 3);
    let rest = run(
        &cfg_b,
        &RunOptions {
            resume: true,
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(rest.global_step, 6);

    let (pa, pb) = (params(&cfg.train.out_dir), params(&cfg_b.train.out_dir));
    let mut worst = 0.0f32;
    for ((na, va), (nb, vb)) in pa.iter().zip(&pb) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(worst <= 1e-6, "resumed run differs by {worst}");
    // Training did something: the loss went down from the first step.
    let log = std::fs::read_to_string(cfg.train.out_dir.join("train.jsonl")).unwrap();
    let losses: Vec<f64> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 6);
    assert!(losses[5] < losses[0], "{losses:?}");
}

#[test]
fn stages_extend_context_and_lwm_loads_the_result() {
    let d = workdir("stages");
    let cfg = config(&d, "[[stages]]\nseq_len = 64\ntheta = 10000.0\nsteps = 2\n[[stages]]\nseq_len = 160\ntheta = 100000.0\nsteps = 2\nlr = 1e-3\n");
    let mut starts = Vec::new();
    let summary = run(&cfg, &RunOptions::default(), &mut |e| {
        if let lwm::train::run::TrainEvent::StageStart { seq_len, theta, .. } = e {
            starts.push((seq_len, theta));
        }
    })
    .unwrap();
    assert_eq!(starts, vec![(64, 1e4), (160, 1e5)]);
    let dir = summary.last_checkpoint.unwrap();
    assert!(dir.ends_with("stage1-step00000002"));
    // The checkpoint directory is a Hugging Face model the inference engine loads.
    let hf = load_hf_config(&dir).unwrap();
    assert_eq!(hf.theta, 1e5);
    assert_eq!(hf.max_sequence_length, 160);
    let model = Model::load(
        &HfWeights::open(&dir).unwrap(),
        hf,
        ForwardOptions::default(),
    )
    .unwrap();
    let trained = checkpoint::load(&dir).unwrap().model;
    let ids: Vec<u32> = (0..150u32).map(|i| 3 + (i * 7) % 250).collect();
    let mut cache = model.new_cache();
    let want = model.forward(&ids, &mut cache, true).unwrap();
    let got: Vec<f32> = trained
        .forward(&BatchInput::plain(1, ids.len(), ids))
        .unwrap()
        .text
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let diff = want
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff < 1e-4, "{diff}");
}

#[test]
fn nan_loss_stops_and_names_the_last_good_checkpoint() {
    let d = workdir("nan");
    let mut cfg = config(&d, "save_every = 1");
    cfg.optim.lr = 1e15;
    cfg.optim.warmup_steps = 0;
    cfg.train.steps = 20;
    let e = format!(
        "{:#}",
        run(&cfg, &RunOptions::default(), &mut |_| {}).unwrap_err()
    );
    assert!(
        (e.contains("loss became") || e.contains("weights non-finite"))
            && e.contains("last good checkpoint is"),
        "{e}"
    );
    let latest = checkpoint::latest(&cfg.train.out_dir).unwrap().unwrap();
    assert!(e.contains(&latest.display().to_string()), "{e}");
    // The named checkpoint is intact and finite.
    let p = params(&cfg.train.out_dir);
    assert!(p.iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));
}

#[test]
fn corrupt_or_mismatched_checkpoints_are_refused_with_a_reason() {
    let d = workdir("corrupt");
    let cfg = config(&d, "");
    run(
        &cfg,
        &RunOptions {
            max_global_steps: Some(1),
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap();
    // A model of another shape cannot resume from it.
    let mut other = cfg.clone();
    other.model.hidden_size = 64;
    let e = format!(
        "{:#}",
        run(
            &other,
            &RunOptions {
                resume: true,
                ..Default::default()
            },
            &mut |_| {}
        )
        .unwrap_err()
    );
    assert!(
        e.contains("shape") && e.contains("(259, 32, 64, 2, 4, 2)"),
        "{e}"
    );
    // A truncated weights file is named.
    let dir = checkpoint::latest(&cfg.train.out_dir).unwrap().unwrap();
    let w = dir.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let e = format!(
        "{:#}",
        run(
            &cfg,
            &RunOptions {
                resume: true,
                ..Default::default()
            },
            &mut |_| {}
        )
        .unwrap_err()
    );
    assert!(e.contains("model.safetensors is missing or corrupt"), "{e}");
    // A failed save leaves `latest` on the previous good checkpoint: block the temp dir.
    std::fs::write(&w, &bytes).unwrap();
    let blocker = cfg
        .train
        .out_dir
        .join("checkpoints")
        .join(format!(".tmp-stage0-step00000002-{}", std::process::id()));
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, b"not a directory").unwrap();
    let mut two = cfg.clone();
    two.train.steps = 2;
    let e = format!(
        "{:#}",
        run(
            &two,
            &RunOptions {
                resume: true,
                ..Default::default()
            },
            &mut |_| {}
        )
        .unwrap_err()
    );
    assert!(e.contains("previous checkpoint is kept"), "{e}");
    assert_eq!(
        checkpoint::latest(&cfg.train.out_dir).unwrap().unwrap(),
        dir
    );
    assert!(checkpoint::load(&dir).is_ok());
}

#[test]
fn bad_config_is_an_error() {
    let e = format!(
        "{:#}",
        TrainConfig::from_toml("[model]\n[data]\nfiles=[]\n[train]\n", "x.toml").unwrap_err()
    );
    assert!(
        e.contains("x.toml") && e.contains("data.files is empty"),
        "{e}"
    );
    let e = format!(
        "{:#}",
        TrainConfig::from_toml(
            "[model]\nhiden = 3\n[data]\nfiles=['a']\n[train]\n",
            "x.toml"
        )
        .unwrap_err()
    );
    assert!(e.contains("hiden"), "{e}");
}
