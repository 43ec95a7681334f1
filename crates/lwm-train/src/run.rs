//! The training loop: stages of (sequence length, theta, steps, lr), each continuing from
//! the previous stage's weights with a fresh optimizer; gradient accumulation; periodic
//! eval and checkpoints; exact resume from `OUT/latest`; a non-finite loss stops the run
//! without saving, naming the last good checkpoint.

use super::checkpoint::{self, TrainState, FORMAT_VERSION};
use super::config::TrainConfig;
use super::data::{ByteEncoder, DocumentReader, TextEncoder};
use super::loss::{lwm_loss, lwm_loss_shard};
use super::model::TrainModel;
use super::optim::AdamW;
use super::packing::{Batch, Packer};
use super::seq_parallel::{check_comm, shard_batch, sum_scalars, SeqComm};
use anyhow::{bail, Context, Result};
use lwm_core::attention::Chunking;
use lwm_core::weights::gguf::GgufFile;
use lwm_core::weights::hf::{load_hf_config, HfWeights};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// One optimizer update, as logged (JSONL) and shown.
#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    pub stage: usize,
    pub step: u64,
    pub global_step: u64,
    pub seq_len: usize,
    pub theta: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub param_norm: f64,
    pub tokens: u64,
    pub tokens_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
}

pub enum TrainEvent<'a> {
    StageStart {
        stage: usize,
        seq_len: usize,
        theta: f64,
        steps: u64,
        from_step: u64,
    },
    Step(&'a StepLog),
    Saved(&'a Path),
    SkippedLines(&'a [String]),
}

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from `OUT/latest`.
    pub resume: bool,
    /// Set (e.g. by Ctrl-C) to stop after the current update with a checkpoint.
    pub stop: Option<Arc<AtomicBool>>,
    /// Stop (with a checkpoint) once this many updates have run over all stages.
    pub max_global_steps: Option<u64>,
}

#[derive(Debug)]
pub struct RunSummary {
    pub global_step: u64,
    pub last_checkpoint: Option<PathBuf>,
    pub interrupted: bool,
    pub final_loss: Option<f64>,
}

pub fn load_encoder(spec: &str) -> Result<Arc<dyn TextEncoder>> {
    if spec == "bytes" {
        return Ok(Arc::new(ByteEncoder));
    }
    Ok(Arc::new(lwm_core::tokenizer::Tokenizer::from_file(
        Path::new(spec),
    )?))
}

/// The starting weights named by `[model] init`.
pub fn init_model(cfg: &TrainConfig) -> Result<TrainModel> {
    let init = cfg.model.init.as_str();
    let model = if init == "scratch" {
        TrainModel::init_normal(cfg.scratch_model()?, cfg.model.init_std, cfg.model.seed)?
    } else {
        let p = Path::new(init);
        if p.join("state.json").is_file() {
            checkpoint::load(p)?.model
        } else if p.is_dir() {
            TrainModel::load(&HfWeights::open(p)?, load_hf_config(p)?)?
        } else if p.extension().is_some_and(|e| e == "gguf") {
            let f = GgufFile::open(p)?;
            let c = f.config()?;
            TrainModel::load(&f, c)?
        } else {
            bail!("model.init '{init}' is neither `scratch`, a .gguf file, a Hugging Face directory nor a checkpoint");
        }
    };
    model.into_rotate_half()
}

fn eval_loss(
    model: &TrainModel,
    cfg: &TrainConfig,
    enc: &Arc<dyn TextEncoder>,
    seq_len: usize,
) -> Result<Option<f64>> {
    let comm = model.comm.as_deref();
    if cfg.data.eval_files.is_empty() {
        return Ok(None);
    }
    let mut reader = DocumentReader::new(cfg.data_spec(&cfg.data.eval_files), enc.clone())?;
    let mut packer = Packer::new(seq_len, cfg.train.batch_size, cfg.data.split_documents);
    packer.vision = model.config.vision_vocab_size > 0;
    let mut sum = 0.0;
    for _ in 0..cfg.train.eval_batches {
        let b = packer.next_batch(&mut reader)?;
        sum += batch_loss(model, &b)?.to_scalar::<f32>()? as f64;
    }
    if let Some(c) = comm {
        sum = sum_scalars(c, &[sum])?[0];
    }
    Ok(Some(sum / cfg.train.eval_batches as f64))
}

/// The loss of batch `b`; with a ring of processes, this rank's part of it (the parts of
/// all ranks add up to the whole batch's loss).
fn batch_loss(model: &TrainModel, b: &Batch) -> Result<candle_core::Tensor> {
    match &model.comm {
        None => {
            let logits = model.forward(&b.input)?;
            lwm_loss(&logits.text, logits.vision.as_ref(), &b.targets)
        }
        Some(c) => {
            let part = shard_batch(b, c.rank, c.size)?;
            let logits = model.forward(&part.input)?;
            lwm_loss_shard(
                &logits.text,
                logits.vision.as_ref(),
                &part.targets,
                &b.targets,
            )
        }
    }
}

fn last_good_note(last_good: &Option<PathBuf>) -> String {
    match last_good {
        Some(d) => format!("the last good checkpoint is {}", d.display()),
        None => "no checkpoint was saved yet".to_string(),
    }
}

fn append_log(path: &Path, line: &StepLog) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening log {}", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(line)?)?;
    Ok(())
}

/// Check a resumed checkpoint against the config it is resumed with.
fn check_resume(cfg: &TrainConfig, state: &TrainState, dir: &Path) -> Result<()> {
    let stages = cfg.stages();
    if state.stage >= stages.len() {
        bail!(
            "checkpoint {} is at stage {} but the config has {} stage(s)",
            dir.display(),
            state.stage,
            stages.len()
        );
    }
    if cfg.model.init == "scratch" {
        let want = cfg.scratch_model()?;
        let got = &state.model;
        let shape = |c: &lwm_core::config::ModelConfig| {
            (
                c.vocab_size,
                c.hidden_size,
                c.intermediate_size,
                c.num_hidden_layers,
                c.num_attention_heads,
                c.num_key_value_heads,
            )
        };
        if shape(&want) != shape(got) {
            bail!(
                "checkpoint {} holds a model of shape (vocab, hidden, ffn, layers, heads, kv heads) = {:?}, the config asks for {:?}",
                dir.display(),
                shape(got),
                shape(&want)
            );
        }
    }
    Ok(())
}

pub fn run(
    cfg: &TrainConfig,
    opts: &RunOptions,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<RunSummary> {
    run_on(cfg, opts, None, on_event)
}

/// `run` as one rank of a ring of processes (`seq_parallel`) when `comm` is given: every
/// rank runs this with the same config and data; each trains on its columns of every
/// batch, gradients are summed over the ranks before each update, and rank 0 alone writes
/// checkpoints and the log (every rank reads the checkpoint on resume, so `out_dir` must
/// be the same directory for all of them).
pub fn run_on(
    cfg: &TrainConfig,
    opts: &RunOptions,
    comm: Option<Arc<SeqComm>>,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<RunSummary> {
    check_comm(comm.as_deref(), cfg.train.sp)?;
    let root = comm.as_ref().is_none_or(|c| c.rank == 0);
    let out = &cfg.train.out_dir;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let log_path = out.join("train.jsonl");
    let enc = load_encoder(&cfg.data.tokenizer)?;
    let stages = cfg.stages();

    let resumed = if opts.resume {
        checkpoint::latest(out)?
    } else {
        None
    };
    let (mut model, mut state, opt_state, mut last_good) = match resumed {
        Some(dir) => {
            let loaded = checkpoint::load(&dir)?;
            check_resume(cfg, &loaded.state, &dir)?;
            (
                loaded.model,
                loaded.state,
                Some(loaded.optimizer),
                Some(dir),
            )
        }
        None => {
            if opts.resume {
                bail!(
                    "--resume: no checkpoint in {} (no `latest` file)",
                    out.display()
                );
            }
            let model = init_model(cfg)?;
            let state = TrainState {
                format_version: FORMAT_VERSION,
                stage: 0,
                stage_step: 0,
                global_step: 0,
                tokens_seen: 0,
                data: Default::default(),
                model: model.config.clone(),
                train_config: cfg.to_toml(),
            };
            (model, state, None, None)
        }
    };
    model.chunking = Chunking {
        query_chunk: cfg.train.query_chunk,
        key_chunk: cfg.train.key_chunk,
    };
    // Across processes the ring is the transport's; within one process, sp threads.
    model.sp = if comm.is_some() {
        1
    } else {
        cfg.train.sp.max(1)
    };
    model.comm = comm.clone();
    model.compute = cfg.train.dtype;
    let comm = comm.as_deref();
    let mut opt_state = opt_state;
    let mut final_loss = None;
    let vision = model.config.vision_vocab_size > 0;
    let stopped = || opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
    let resumed_stage = opts.resume.then_some(state.stage);
    let mut reader_files: Option<Vec<PathBuf>> = None;
    let mut reader: Option<DocumentReader> = None;

    for (si, stage) in stages.iter().enumerate().skip(state.stage) {
        if si != state.stage {
            state.stage = si;
            state.stage_step = 0;
        }
        // A stage with its own files reads them from the start (or the saved position when
        // resuming inside it); a stage on the same files continues the stream.
        let files = stage
            .files
            .clone()
            .unwrap_or_else(|| cfg.data.files.clone());
        if reader_files.as_ref() != Some(&files) {
            if resumed_stage != Some(si) && reader_files.is_some() {
                state.data = Default::default();
            }
            reader = Some(DocumentReader::new(cfg.data_spec(&files), enc.clone())?);
            reader_files = Some(files);
        }
        let reader = reader.as_mut().expect("created above");
        model.set_theta(stage.theta);
        model.config.max_sequence_length = model.config.max_sequence_length.max(stage.seq_len);
        let mut packer = Packer::new(
            stage.seq_len,
            cfg.train.batch_size,
            cfg.data.split_documents,
        );
        packer.vision = vision;
        packer.restore(reader, state.data.clone())?;
        let mut opt = AdamW::new(cfg.optim.adamw(stage.lr), model.params());
        if let Some(t) = opt_state.take() {
            opt.load_state(
                model.params(),
                &t,
                state.stage_step,
                "checkpoint optimizer.safetensors",
            )?;
        }
        on_event(TrainEvent::StageStart {
            stage: si,
            seq_len: stage.seq_len,
            theta: stage.theta,
            steps: stage.steps,
            from_step: state.stage_step,
        });
        while state.stage_step < stage.steps {
            let mut stop = stopped()
                || opts
                    .max_global_steps
                    .is_some_and(|m| state.global_step >= m);
            if let Some(c) = comm {
                // Any rank's interrupt stops them all at the same update.
                stop = sum_scalars(c, &[stop as u8 as f64])?[0] > 0.0;
            }
            if stop {
                let dir = if root {
                    let dir = checkpoint::save(out, &model, &opt, &state, &cfg.data.tokenizer)?;
                    on_event(TrainEvent::Saved(&dir));
                    Some(dir)
                } else {
                    None
                };
                return Ok(RunSummary {
                    global_step: state.global_step,
                    last_checkpoint: dir,
                    interrupted: true,
                    final_loss,
                });
            }
            let t0 = Instant::now();
            let mut loss_sum = 0.0f64;
            let mut tokens = 0u64;
            for _ in 0..cfg.train.grad_accum {
                let batch = packer.next_batch(reader)?;
                tokens += (batch.input.batch * batch.input.len) as u64;
                let loss = batch_loss(&model, &batch)?;
                let mut value = loss.to_scalar::<f32>()? as f64;
                if let Some(c) = comm {
                    // The whole batch's loss, and one decision for every rank.
                    value = sum_scalars(c, &[value])?[0];
                }
                if !value.is_finite() {
                    bail!(
                        "loss became {value} at stage {si} step {} (global step {}); stopping without saving: {}",
                        state.stage_step + 1,
                        state.global_step + 1,
                        last_good_note(&last_good)
                    );
                }
                loss_sum += value;
                let grads = loss.backward()?;
                opt.accumulate(model.params(), &grads)?;
            }
            if !reader.skipped.is_empty() {
                on_event(TrainEvent::SkippedLines(&reader.skipped));
                reader.skipped.clear();
            }
            if let Some(c) = comm {
                opt.map_accumulated(|g| c.sum(g))?;
            }
            let stats = opt.update(model.params())?;
            if !(stats.param_norm.is_finite() && stats.grad_norm.is_finite()) {
                bail!(
                    "the update of stage {si} step {} (global step {}) made the weights non-finite \
                     (gradient norm {}, parameter norm {}); stopping without saving: {}",
                    state.stage_step + 1,
                    state.global_step + 1,
                    stats.grad_norm,
                    stats.param_norm,
                    last_good_note(&last_good)
                );
            }
            state.stage_step += 1;
            state.global_step += 1;
            state.tokens_seen += tokens;
            state.data = packer.state(reader);
            state.model = model.config.clone();
            let loss = loss_sum / cfg.train.grad_accum as f64;
            final_loss = Some(loss);
            let eval = if cfg.train.eval_every > 0 && state.stage_step % cfg.train.eval_every == 0 {
                eval_loss(&model, cfg, &enc, stage.seq_len)?
            } else {
                None
            };
            let line = StepLog {
                stage: si,
                step: state.stage_step,
                global_step: state.global_step,
                seq_len: stage.seq_len,
                theta: stage.theta,
                loss,
                lr: stats.lr,
                grad_norm: stats.grad_norm,
                param_norm: stats.param_norm,
                tokens: state.tokens_seen,
                tokens_per_s: tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
                eval_loss: eval,
            };
            if root && (state.stage_step % cfg.train.log_every.max(1) == 0 || eval.is_some()) {
                append_log(&log_path, &line)?;
            }
            on_event(TrainEvent::Step(&line));
            let end_of_stage = state.stage_step == stage.steps;
            if root
                && (end_of_stage
                    || (cfg.train.save_every > 0 && state.stage_step % cfg.train.save_every == 0))
            {
                let dir = checkpoint::save(out, &model, &opt, &state, &cfg.data.tokenizer)?;
                on_event(TrainEvent::Saved(&dir));
                last_good = Some(dir);
            }
        }
        // The next stage starts from this stage's final weights (just saved) and data position.
        state.data = packer.state(reader);
    }
    Ok(RunSummary {
        global_step: state.global_step,
        last_checkpoint: last_good,
        interrupted: false,
        final_loss,
    })
}
