//! The `lwm train` config file (TOML). Every field has the original's default where it has
//! one; see docs/training.md for an example.
//!
//! ```toml
//! [model]
//! init = "scratch"              # or a .gguf file / HF directory / checkpoint directory
//! vocab_size = 259              # scratch only: the shape (LWM's `debug` preset otherwise)
//! [data]
//! files = ["train.jsonl"]
//! format = "json"               # json | json_vision | text
//! fields = "[prompt],answer"
//! tokenizer = "bytes"           # or a tokenizer.json / tokenizer.model / .gguf
//! [optim]
//! lr = 1e-3
//! [train]
//! seq_len = 512
//! steps = 200
//! [[stages]]                    # progressive context extension (optional)
//! seq_len = 1024
//! theta = 1e6
//! steps = 50
//! ```

use super::data::{DataFormat, DataSpec, OnError};
use super::optim::AdamWConfig;
use super::precision::ComputeDType;
use super::schedule::WarmupCosine;
use anyhow::{bail, Context, Result};
use lwm_core::config::{ModelConfig, RopeLayout, RopeScaling};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// `scratch`, or weights to start from: .gguf (dequantized), HF directory, or a
    /// checkpoint directory of an earlier run (its weights; fresh optimizer).
    #[serde(default = "scratch")]
    pub init: String,
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "d_theta")]
    pub theta: f64,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub vision_vocab_size: usize,
    /// Normal init spread (`initializer_range`).
    #[serde(default = "d_init_std")]
    pub init_std: f32,
    #[serde(default)]
    pub seed: u64,
}

fn scratch() -> String {
    "scratch".into()
}
// LWM's `debug` preset shape (hidden 256, 2 layers, 2 heads), with a byte vocabulary.
fn d_vocab() -> usize {
    259
}
fn d_hidden() -> usize {
    256
}
fn d_inter() -> usize {
    256
}
fn d_layers() -> usize {
    2
}
fn d_heads() -> usize {
    2
}
fn d_theta() -> f64 {
    10_000.0
}
fn d_eps() -> f64 {
    1e-6
}
fn d_init_std() -> f32 {
    0.02
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub files: Vec<PathBuf>,
    #[serde(default = "d_format")]
    pub format: DataFormat,
    #[serde(default = "d_fields")]
    pub fields: String,
    #[serde(default = "d_on_error")]
    pub on_error: OnError,
    /// `bytes` (ids = byte + 3, BOS 1, EOS 2) or a tokenizer file.
    #[serde(default = "d_tokenizer")]
    pub tokenizer: String,
    /// Cut documents at row ends (else pad and start the next row).
    #[serde(default)]
    pub split_documents: bool,
    #[serde(default)]
    pub eval_files: Vec<PathBuf>,
}

fn d_format() -> DataFormat {
    DataFormat::Json
}
fn d_fields() -> String {
    "text".into()
}
fn d_on_error() -> OnError {
    OnError::Stop
}
fn d_tokenizer() -> String {
    "bytes".into()
}

/// AdamW and its schedule; defaults are tux's (b2 0.95, wd 1e-4, clip 1.0).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default)]
    pub init_lr: f64,
    #[serde(default = "d_end_lr")]
    pub end_lr: f64,
    #[serde(default = "d_warmup")]
    pub warmup_steps: u64,
    #[serde(default = "d_decay")]
    pub decay_steps: u64,
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    #[serde(default = "d_b1")]
    pub b1: f64,
    #[serde(default = "d_b2")]
    pub b2: f64,
    #[serde(default = "d_adam_eps")]
    pub eps: f64,
    #[serde(default = "d_clip")]
    pub clip_norm: f64,
}

fn d_lr() -> f64 {
    0.01
}
fn d_end_lr() -> f64 {
    0.001
}
fn d_warmup() -> u64 {
    2000
}
fn d_decay() -> u64 {
    500_000
}
fn d_wd() -> f64 {
    1e-4
}
fn d_b1() -> f64 {
    0.9
}
fn d_b2() -> f64 {
    0.95
}
fn d_adam_eps() -> f64 {
    1e-8
}
fn d_clip() -> f64 {
    1.0
}

impl Default for OptimSection {
    fn default() -> Self {
        toml::from_str("").expect("all optimizer fields have defaults")
    }
}

impl OptimSection {
    pub fn adamw(&self, lr_override: Option<f64>) -> AdamWConfig {
        AdamWConfig {
            b1: self.b1,
            b2: self.b2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            clip_norm: self.clip_norm,
            schedule: WarmupCosine {
                init_lr: self.init_lr,
                peak_lr: lr_override.unwrap_or(self.lr),
                end_lr: self.end_lr,
                warmup_steps: self.warmup_steps,
                decay_steps: self.decay_steps,
            },
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    #[serde(default = "d_seq")]
    pub seq_len: usize,
    #[serde(default = "d_one")]
    pub batch_size: usize,
    /// Micro-batches per optimizer update (`accumulate_gradient_steps`).
    #[serde(default = "d_one")]
    pub grad_accum: usize,
    #[serde(default = "d_steps")]
    pub steps: u64,
    #[serde(default = "d_log")]
    pub log_every: u64,
    /// 0 = never.
    #[serde(default)]
    pub eval_every: u64,
    #[serde(default = "d_one")]
    pub eval_batches: usize,
    /// 0 = only at the end of each stage.
    #[serde(default)]
    pub save_every: u64,
    #[serde(default = "d_out")]
    pub out_dir: PathBuf,
    #[serde(default = "d_qc")]
    pub query_chunk: usize,
    #[serde(default = "d_kc")]
    pub key_chunk: usize,
    /// Ring attention over this many threads (sequence shards; every stage's seq_len must
    /// split evenly). 1 = blockwise attention without a ring.
    #[serde(default = "d_one")]
    pub sp: usize,
    /// Precision of the matrix products: `f32`, or `bf16` (weights, gradients and
    /// optimizer state stay f32; see `precision`).
    #[serde(default)]
    pub dtype: ComputeDType,
}

fn d_seq() -> usize {
    512
}
fn d_one() -> usize {
    1
}
fn d_steps() -> u64 {
    100
}
fn d_log() -> u64 {
    1
}
fn d_out() -> PathBuf {
    PathBuf::from("lwm-train")
}
fn d_qc() -> usize {
    128
}
fn d_kc() -> usize {
    128
}

/// One stage of progressive context extension: it starts from the previous stage's final
/// weights (fresh optimizer, as LWM's `params::` loading), with its own length and theta.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub seq_len: usize,
    pub theta: f64,
    pub steps: u64,
    pub lr: Option<f64>,
    /// Data of this stage (longer documents for longer contexts); default `data.files`.
    #[serde(default)]
    pub files: Option<Vec<PathBuf>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub optim: OptimSection,
    pub train: TrainSection,
    #[serde(default)]
    pub stages: Vec<Stage>,
}

impl TrainConfig {
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let c: Self =
            toml::from_str(text).with_context(|| format!("{origin}: invalid training config"))?;
        c.validate()
            .with_context(|| format!("{origin}: invalid training config"))?;
        Ok(c)
    }

    /// Read a config file; relative paths in it are relative to the file's directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut c = Self::from_toml(&text, &path.display().to_string())?;
        if let Some(base) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            c.resolve_paths(base);
        }
        Ok(c)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        self.data.files.iter_mut().for_each(fix);
        self.data.eval_files.iter_mut().for_each(fix);
        for s in &mut self.stages {
            if let Some(f) = &mut s.files {
                f.iter_mut().for_each(fix);
            }
        }
        fix(&mut self.train.out_dir);
        for spec in [&mut self.data.tokenizer, &mut self.model.init] {
            if spec != "bytes" && spec != "scratch" && Path::new(spec.as_str()).is_relative() {
                *spec = base.join(spec.as_str()).display().to_string();
            }
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the training config serializes")
    }

    /// The stages to run: the `[[stages]]` list, or one stage from `[train]` and `[model]`.
    pub fn stages(&self) -> Vec<Stage> {
        if self.stages.is_empty() {
            vec![Stage {
                seq_len: self.train.seq_len,
                theta: self.model.theta,
                steps: self.train.steps,
                lr: None,
                files: None,
            }]
        } else {
            self.stages.clone()
        }
    }

    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        if t.seq_len == 0 || t.batch_size == 0 || t.grad_accum == 0 {
            bail!("train.seq_len, batch_size and grad_accum must be positive");
        }
        if self.data.files.is_empty() {
            bail!("data.files is empty");
        }
        for s in self.stages() {
            if s.seq_len == 0 || !(s.theta.is_finite() && s.theta > 1.0) {
                bail!("stage {s:?}: seq_len must be positive and theta a finite number > 1");
            }
        }
        for s in self.stages() {
            if !s.seq_len.is_multiple_of(t.sp.max(1)) {
                bail!(
                    "seq_len {} does not split into train.sp = {} ring shards",
                    s.seq_len,
                    t.sp
                );
            }
        }
        if !(self.optim.b2 > 0.0
            && self.optim.b2 < 1.0
            && self.optim.b1 >= 0.0
            && self.optim.b1 < 1.0)
        {
            bail!("optim.b1/b2 must lie in [0, 1)");
        }
        Ok(())
    }

    pub fn data_spec(&self, files: &[PathBuf]) -> DataSpec {
        DataSpec {
            files: files.to_vec(),
            format: self.data.format,
            fields: self.data.fields.clone(),
            on_error: self.data.on_error,
        }
    }

    /// Shape of a from-scratch model (rotate-half RoPE, untied head).
    pub fn scratch_model(&self) -> Result<ModelConfig> {
        let m = &self.model;
        if m.num_attention_heads == 0 || !m.hidden_size.is_multiple_of(m.num_attention_heads) {
            bail!(
                "model.hidden_size {} is not a multiple of num_attention_heads {}",
                m.hidden_size,
                m.num_attention_heads
            );
        }
        let max_len = self
            .stages()
            .iter()
            .map(|s| s.seq_len)
            .max()
            .unwrap_or(self.train.seq_len);
        let c = ModelConfig {
            architecture: "llama".into(),
            vocab_size: m.vocab_size,
            hidden_size: m.hidden_size,
            intermediate_size: m.intermediate_size,
            num_hidden_layers: m.num_hidden_layers,
            num_attention_heads: m.num_attention_heads,
            num_key_value_heads: m.num_key_value_heads.unwrap_or(m.num_attention_heads),
            head_dim: m.hidden_size / m.num_attention_heads,
            rms_norm_eps: m.rms_norm_eps,
            theta: m.theta,
            rope_layout: RopeLayout::RotateHalf,
            rope_scaling: RopeScaling::None,
            max_sequence_length: max_len,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            vision_vocab_size: m.vision_vocab_size,
        };
        c.validate()?;
        Ok(c)
    }
}
