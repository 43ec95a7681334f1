//! Sequence-parallel training across processes (`train::seq_parallel`): each rank holds only
//! its columns of every row, attention runs as a ring over the transport, gradients are
//! summed over the ranks. The ranks here are threads on the in-process transport
//! (`ThreadRing`), which runs the same code as MPI processes (`lwm-cli/tests/ring_cli.rs`
//! runs it under mpirun).

mod common;
use common::train::{config, workdir};
use lwm::ring::threads::ThreadRing;
use lwm::train::checkpoint;
use lwm::train::loss::{lwm_loss, lwm_loss_shard, Targets};
use lwm::train::model::{BatchInput, TrainModel};
use lwm::train::packing::Batch;
use lwm::train::run::{run, run_on, RunOptions, RunSummary};
use lwm::train::seq_parallel::{shard_batch, SeqComm};
use std::path::Path;
use std::time::Duration;

fn tiny_model() -> TrainModel {
    TrainModel::init_normal(common::train::tiny_llama(), 0.2, 4).unwrap()
}

/// Two rows of 48: row 0 packs two documents (boundary at 21, positions restart), row 1 is
/// one document with its first 10 targets unweighted (a prompt), so the per-row loss
/// normalisation differs between rows and between shards.
fn batch() -> Batch {
    let tokens: Vec<u32> = (0..96u32).map(|i| (i * 13 + 5) % 50).collect();
    let mut input = BatchInput::plain(2, 48, tokens.clone());
    input.segment_ids = Some((0..96).map(|i| (21..48).contains(&i) as u32).collect());
    input.positions = (0..96u32)
        .map(|i| match i {
            21..=47 => i - 21,
            48.. => i - 48,
            _ => i,
        })
        .collect();
    let targets = Targets {
        tokens: tokens.iter().map(|t| (t * 7 + 3) % 50).collect(),
        loss_mask: (0..96)
            .map(|i| if (48..58).contains(&i) { 0.0 } else { 1.0 })
            .collect(),
        vision_mask: None,
    };
    Batch { input, targets }
}

fn grads(model: &TrainModel, g: &candle_core::backprop::GradStore) -> Vec<f32> {
    model
        .params()
        .values()
        .flat_map(|v| {
            g.get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

/// Run `f(rank, comm)` on `sp` threads, each with its own transport of one ring.
fn on_ranks<R: Send>(sp: usize, f: impl Fn(usize, std::sync::Arc<SeqComm>) -> R + Sync) -> Vec<R> {
    let rings = ThreadRing::mesh(sp);
    std::thread::scope(|s| {
        let hs: Vec<_> = rings
            .into_iter()
            .enumerate()
            .map(|(r, ring)| {
                let f = &f;
                s.spawn(move || f(r, SeqComm::new(Box::new(ring), Duration::from_secs(60))))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

#[test]
fn sharded_ranks_give_the_whole_batch_loss_and_gradients() {
    let b = batch();
    let reference = tiny_model();
    let logits = reference.forward(&b.input).unwrap();
    let loss = lwm_loss(&logits.text, None, &b.targets).unwrap();
    let want_loss = loss.to_scalar::<f32>().unwrap();
    let want = grads(&reference, &loss.backward().unwrap());
    for sp in [2, 3, 4] {
        let per_rank = on_ranks(sp, |rank, comm| {
            let mut model = tiny_model();
            model.comm = Some(comm.clone());
            let part = shard_batch(&b, rank, sp).unwrap();
            assert_eq!(part.input.len, 48 / sp);
            let logits = model.forward(&part.input).unwrap();
            let loss = lwm_loss_shard(&logits.text, None, &part.targets, &b.targets).unwrap();
            let value = loss.to_scalar::<f32>().unwrap();
            let g = grads(&model, &loss.backward().unwrap());
            let total = comm.sum(g).unwrap();
            let total_loss = comm.sum(vec![value]).unwrap()[0];
            (total_loss, total)
        });
        for (rank, (l, g)) in per_rank.iter().enumerate() {
            assert!(
                (l - want_loss).abs() <= 1e-5 * want_loss.abs(),
                "sp={sp} rank {rank}: loss {l} vs {want_loss}"
            );
            let d = max_rel(g, &want);
            eprintln!("sp={sp} rank {rank}: loss {l} vs {want_loss}, gradients {d:.2e} relative");
            assert!(
                d < 1e-4,
                "sp={sp} rank {rank}: gradients differ by {d} (relative)"
            );
            // Every rank holds the same summed bits.
            assert_eq!(
                g, &per_rank[0].1,
                "sp={sp}: rank {rank} got other gradients"
            );
        }
    }
}

#[test]
fn a_shard_without_its_ring_or_of_another_rank_is_refused() {
    let b = batch();
    let part = shard_batch(&b, 1, 2).unwrap();
    let model = tiny_model();
    let e = model.forward(&part.input).err().expect("no ring: refused");
    assert!(format!("{e:#}").contains("ring"), "{e:#}");
    let e = shard_batch(&b, 0, 5).expect_err("48 does not split in 5");
    assert!(format!("{e:#}").contains("does not split"), "{e:#}");
    let errs = on_ranks(2, |rank, comm| {
        let mut model = tiny_model();
        model.comm = Some(comm);
        // Each rank is handed the other rank's columns.
        let part = shard_batch(&b, 1 - rank, 2).unwrap();
        model.forward(&part.input).err().map(|e| format!("{e:#}"))
    });
    for e in errs {
        let e = e.expect("a shard of another rank is refused");
        assert!(e.contains("does not belong to rank"), "{e}");
    }
}

fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("train.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

fn final_params(out: &Path) -> Vec<f32> {
    let loaded = checkpoint::load(&checkpoint::latest(out).unwrap().unwrap()).unwrap();
    loaded
        .model
        .params()
        .values()
        .flat_map(|v| {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

#[test]
fn training_on_a_ring_of_processes_equals_one_process() {
    // The shared tiny setup: packed rows of 96 (segment ids), GQA, 2 micro-batches per update.
    let one = workdir("seqpar-one");
    let cfg = config(&one, "");
    run(&cfg, &RunOptions::default(), &mut |_| {}).unwrap();
    let want = losses(&cfg.train.out_dir);
    let want_params = final_params(&cfg.train.out_dir);
    for sp in [2, 3] {
        let dir = workdir(&format!("seqpar-{sp}"));
        let cfg = config(&dir, &format!("sp = {sp}"));
        let summaries: Vec<RunSummary> = on_ranks(sp, |_, comm| {
            run_on(&cfg, &RunOptions::default(), Some(comm), &mut |_| {}).unwrap()
        });
        // Rank 0 alone writes checkpoints.
        assert!(summaries[0].last_checkpoint.is_some());
        assert!(summaries[1..].iter().all(|s| s.last_checkpoint.is_none()));
        for s in &summaries {
            assert_eq!(s.global_step, 6);
            assert_eq!(
                s.final_loss, summaries[0].final_loss,
                "ranks report one loss"
            );
        }
        let got = losses(&cfg.train.out_dir);
        assert_eq!(got.len(), want.len());
        for (step, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs(),
                "sp={sp} step {}: loss {a} vs one process {b}",
                step + 1
            );
        }
        // Six AdamW steps from the same start on gradients equal to ~1e-6: the weights agree
        // to a small fraction of one step's size (lr 3e-3).
        let p = final_params(&cfg.train.out_dir);
        let worst = p
            .iter()
            .zip(&want_params)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        let dl = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs() / b.abs())
            .fold(0.0, f64::max);
        eprintln!("sp={sp}: losses {dl:.2e} relative, weights {worst:.2e} after 6 updates");
        assert!(worst < 1e-4, "sp={sp}: weights differ by {worst}");
    }
}

#[test]
fn a_ring_whose_size_is_not_train_sp_is_refused() {
    let dir = workdir("seqpar-mismatch");
    let cfg = config(&dir, "sp = 3");
    let errs = on_ranks(2, |_, comm| {
        run_on(&cfg, &RunOptions::default(), Some(comm), &mut |_| {})
            .err()
            .map(|e| format!("{e:#}"))
    });
    for e in errs {
        let e = e.expect("refused");
        assert!(
            e.contains("train.sp = 3") && e.contains("2 processes"),
            "{e}"
        );
    }
}
