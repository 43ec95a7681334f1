//! The LLaMA transformer forward pass (LWM's text model), with a KV cache.
//!
//! Pre-norm blocks: `h += Attn(RMSNorm(h))`, `h += FFN(RMSNorm(h))`, FFN = `down(silu(gate x) ⊙ up x)`.
//! Attention goes through the blockwise primitive (`attention`), the FFN runs over chunks of
//! `mlp_chunk` tokens, so activation memory is bounded by the chunk sizes, not the prompt.
//! Activations are plain f32 row-major buffers. Q4_1 and Q8_0 weights run through our own
//! kernels (`quant`, llama.cpp's activation quantization and summation order), f16 / bf16
//! weights stay 2 bytes each and run through `quant::half`; other quantizations and f32
//! weights go through candle.
//!
//! Two numerics (`Numerics`): `Exact` keeps everything in f32 with LWM's RoPE table and the
//! blockwise attention primitive; `Ggml` reproduces llama.cpp's CPU results on the same GGUF
//! (f16 KV cache and its flash attention, ggml's RoPE, RMSNorm and SiLU), the default for
//! GGUF files so that `lwm` and llama.cpp agree token for token.

use crate::attention::{causal_attention_quant, Chunking};
use crate::config::ModelConfig;
use crate::decoder::{decoder_layer, DecoderOps, NormSite, RowBlock};
use crate::kv::policy::{snapkv_compact, ObservedQueries};
pub use crate::kv::PositionRun;
use crate::kv::{KvCache, KvPolicy, KvTypes};
use crate::quant::ggml_cpu::{self, FaOptions, Isa};
use crate::quant::half::{matmul_half, HalfMatrix};
use crate::quant::QMatrix;
use crate::rope::Rope;
use crate::weights::{layer_name, Weight, WeightSource};
use anyhow::{bail, Context, Result};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};
use std::sync::Arc;

/// Which arithmetic the non-matmul parts follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Numerics {
    /// f32 activations and KV cache, LWM's RoPE table (f64 angle rounded to f32), the
    /// blockwise attention primitive with `chunking`.
    Exact,
    /// llama.cpp's CPU arithmetic: f16 KV cache with its flash attention (f16 V
    /// accumulator), ggml's RoPE cache, RMSNorm and vector SiLU. Exact llama.cpp parity for
    /// prompts under 64 tokens per batch and caches under 512 tokens (beyond that llama.cpp
    /// switches algorithms, and results agree to float noise instead).
    Ggml,
}

/// Query rows from which llama.cpp's CPU flash attention takes its tiled f32 path.
const GGML_TILED_ATTENTION_ROWS: usize = 64;
/// Cached cells from which llama.cpp's CPU flash attention splits a single query row's
/// keys over threads (and merges the partials) instead of its one-chunk loop.
const GGML_SPLIT_DECODE_CELLS: usize = 512;

/// Tunables of the forward pass. Only `numerics` changes results beyond float rounding.
#[derive(Debug, Clone, Copy)]
pub struct ForwardOptions {
    /// `scan_query_chunk_size` / `scan_key_chunk_size`.
    pub chunking: Chunking,
    /// `scan_mlp_chunk_size`: tokens per FFN chunk.
    pub mlp_chunk: usize,
    /// With at least this many rows, quantized weights are dequantized for one f32 GEMM
    /// (fast for prefill); below it the quantized dot products are used (fast for decode).
    pub dense_min_rows: usize,
    pub numerics: Numerics,
    /// Element types of the KV cache; `None`: f16 under `Ggml` numerics (llama.cpp's
    /// default), f32 under `Exact`.
    pub kv_types: Option<KvTypes>,
}

impl ForwardOptions {
    /// The KV cache types in effect.
    pub fn kv_types(&self) -> KvTypes {
        self.kv_types.unwrap_or(match self.numerics {
            Numerics::Ggml => KvTypes::F16,
            Numerics::Exact => KvTypes::F32,
        })
    }
}

impl Default for ForwardOptions {
    fn default() -> Self {
        Self {
            chunking: Chunking::default(),
            mlp_chunk: 512,
            dense_min_rows: 32,
            numerics: Numerics::Exact,
            kv_types: None,
        }
    }
}

/// A weight matrix `[out, in]` applied as `y = x Wᵀ`.
#[derive(Debug, Clone)]
pub enum Linear {
    /// Q4_1 / Q8_0: our kernels.
    Native(Arc<QMatrix>),
    /// Other GGUF quantizations: candle's kernels.
    Quant(Arc<QTensor>),
    /// f16 / bf16 weights (GGUF F16/BF16, safetensors, JAX), kept at 2 bytes per weight:
    /// `quant::half`'s kernels.
    Half(Arc<HalfMatrix>),
    /// f32 weights.
    Dense(Tensor),
}

impl Linear {
    pub(crate) fn from_weight(
        w: Weight,
        name: &str,
        out_dim: usize,
        in_dim: usize,
        origin: &str,
    ) -> Result<Self> {
        let dims = w.dims();
        if dims != [out_dim, in_dim] {
            bail!("{origin}: tensor '{name}' has shape {dims:?}, expected [{out_dim}, {in_dim}] for this model config");
        }
        Ok(match w {
            Weight::Quant(q) => {
                if let Some(m) = QMatrix::from_qtensor(&q)? {
                    Linear::Native(Arc::new(m))
                } else if let Some(m) = HalfMatrix::from_qtensor(&q)? {
                    Linear::Half(Arc::new(m))
                } else {
                    Linear::Quant(q)
                }
            }
            Weight::Dense(t) => match HalfMatrix::from_tensor(&t)? {
                Some(m) => Linear::Half(Arc::new(m)),
                None => Linear::Dense(t.to_dtype(candle_core::DType::F32)?.contiguous()?),
            },
        })
    }

    pub fn out_dim(&self) -> usize {
        match self {
            Linear::Native(m) => m.rows,
            Linear::Quant(q) => q.shape().dims()[0],
            Linear::Half(m) => m.rows,
            Linear::Dense(t) => t.dims()[0],
        }
    }

    /// Rows `ids` of the matrix as f32 (an embedding lookup).
    pub fn rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        match self {
            Linear::Native(m) => {
                let mut out = vec![0.0f32; ids.len() * m.cols];
                for (o, &id) in out.chunks_exact_mut(m.cols).zip(ids) {
                    m.dequantize_row(id as usize, o);
                }
                Ok(out)
            }
            Linear::Half(m) => {
                let mut out = vec![0.0f32; ids.len() * m.cols];
                for (o, &id) in out.chunks_exact_mut(m.cols).zip(ids) {
                    m.row_to_f32(id as usize, o);
                }
                Ok(out)
            }
            Linear::Quant(q) => {
                let idt = Tensor::from_slice(ids, ids.len(), &Device::Cpu)?;
                Ok(q.embedding(&idt)?
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1()?)
            }
            Linear::Dense(t) => {
                let idt = Tensor::from_slice(ids, ids.len(), &Device::Cpu)?;
                Ok(t.embedding(&idt)?.flatten_all()?.to_vec1()?)
            }
        }
    }

    /// x: n rows of `in` features -> n rows of `out` features.
    pub fn forward(&self, x: &[f32], n: usize, opts: &ForwardOptions) -> Result<Vec<f32>> {
        match self {
            Linear::Native(m) => return crate::quant::matmul(m, x, n),
            // llama.cpp's f16 / bf16 dots take the activations rounded to the weight's type.
            Linear::Half(m) => return matmul_half(m, x, n, opts.numerics == Numerics::Ggml),
            _ => {}
        }
        let in_dim = x.len() / n.max(1);
        let xt = Tensor::from_slice(x, (n, in_dim), &Device::Cpu)?;
        let y = match self {
            Linear::Native(_) | Linear::Half(_) => unreachable!("handled above"),
            Linear::Quant(q) if n < opts.dense_min_rows => xt.apply_op1_no_bwd(q.as_ref())?,
            Linear::Quant(q) => {
                let w = q.dequantize(&Device::Cpu)?;
                xt.matmul(&w.t()?)?
            }
            Linear::Dense(w) => xt.matmul(&w.t()?)?,
        };
        Ok(y.flatten_all()?.to_vec1::<f32>()?)
    }

    /// The same matrix as f32 (a quantized matrix dequantized once): its products no longer
    /// quantize activations, so results change continuously with the inputs.
    pub fn to_dense(&self) -> Result<Linear> {
        Ok(match self {
            Linear::Native(m) => {
                let mut w = vec![0.0f32; m.rows * m.cols];
                for (r, row) in w.chunks_exact_mut(m.cols).enumerate() {
                    m.dequantize_row(r, row);
                }
                Linear::Dense(Tensor::from_vec(w, (m.rows, m.cols), &Device::Cpu)?)
            }
            Linear::Quant(q) => Linear::Dense(
                q.dequantize(&Device::Cpu)?
                    .to_dtype(candle_core::DType::F32)?
                    .contiguous()?,
            ),
            Linear::Half(m) => Linear::Dense(Tensor::from_vec(
                m.to_f32(),
                (m.rows, m.cols),
                &Device::Cpu,
            )?),
            Linear::Dense(t) => Linear::Dense(t.clone()),
        })
    }

    /// `forward` of several matrices on the same input; Q4_1/Q8_0 matrices of one type
    /// share one activation quantization and one parallel region (`quant::matmul_many`).
    pub fn forward_many(
        lins: &[&Linear],
        x: &[f32],
        n: usize,
        opts: &ForwardOptions,
    ) -> Result<Vec<Vec<f32>>> {
        let natives: Option<Vec<&QMatrix>> = lins
            .iter()
            .map(|l| match l {
                Linear::Native(m) => Some(m.as_ref()),
                _ => None,
            })
            .collect();
        match natives {
            Some(ms)
                if ms
                    .iter()
                    .all(|m| m.dtype == ms[0].dtype && m.cols == ms[0].cols) =>
            {
                crate::quant::matmul_many(&ms, x, n)
            }
            _ => lins.iter().map(|l| l.forward(x, n, opts)).collect(),
        }
    }

    pub fn storage_bytes(&self) -> usize {
        match self {
            Linear::Native(m) => m.data.len(),
            Linear::Quant(q) => q.storage_size_in_bytes(),
            Linear::Half(m) => m.storage_bytes(),
            Linear::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
        }
    }
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Vec<f32>,
    w_gate: Linear,
    w_up: Linear,
    w_down: Linear,
}

pub struct Model {
    pub config: ModelConfig,
    /// Token embedding table [vocab, hidden] (also the head when tied).
    embed: Linear,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Linear,
    /// LWM vision-language models: `vte` and `vision_head` (see `vision_model`).
    pub(crate) vision: Option<VisionParts>,
    rope: Rope,
    pub options: ForwardOptions,
}

fn load_vector(src: &dyn WeightSource, name: &str, len: usize) -> Result<Vec<f32>> {
    let w = src.load(name)?;
    let dims = w.dims();
    if dims != [len] {
        bail!(
            "{}: tensor '{name}' has shape {dims:?}, expected [{len}]",
            src.origin()
        );
    }
    Ok(w.to_dense()?.to_vec1::<f32>()?)
}

/// y = x / sqrt(mean(x²) + eps) · w, per row (computed in f32, as LWM does).
fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut out = vec![0.0f32; x.len()];
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), g) in o.iter_mut().zip(row).zip(w) {
            *o = v * inv * g;
        }
    }
    out
}

impl Model {
    /// Build the model from canonical-named weights, checking every shape against `config`.
    pub fn load(
        src: &dyn WeightSource,
        config: ModelConfig,
        options: ForwardOptions,
    ) -> Result<Self> {
        config.validate()?;
        options.kv_types().check_dim(config.head_dim)?;
        let origin = src.origin();
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (q_dim, kv_dim) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let lin = |name: String, o: usize, i: usize| -> Result<Linear> {
            let w = src.load(&name)?;
            Linear::from_weight(w, &name, o, i, &origin)
        };
        let embed = lin("model.embed_tokens.weight".into(), c.vocab_size, h)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let n = |s: &str| layer_name(i, s);
            layers.push(Layer {
                attn_norm: load_vector(src, &n("input_layernorm.weight"), h)?,
                wq: lin(n("self_attn.q_proj.weight"), q_dim, h)?,
                wk: lin(n("self_attn.k_proj.weight"), kv_dim, h)?,
                wv: lin(n("self_attn.v_proj.weight"), kv_dim, h)?,
                wo: lin(n("self_attn.o_proj.weight"), h, q_dim)?,
                ffn_norm: load_vector(src, &n("post_attention_layernorm.weight"), h)?,
                w_gate: lin(n("mlp.gate_proj.weight"), c.intermediate_size, h)?,
                w_up: lin(n("mlp.up_proj.weight"), c.intermediate_size, h)?,
                w_down: lin(n("mlp.down_proj.weight"), h, c.intermediate_size)?,
            });
        }
        let norm = load_vector(src, "model.norm.weight", h)?;
        let lm_head = if src.contains("lm_head.weight") && !c.tie_word_embeddings {
            lin("lm_head.weight".into(), c.vocab_size, h)?
        } else {
            embed.clone()
        };
        let rope = Rope::for_model(c, options.numerics == Numerics::Ggml);
        let vision = VisionParts::load(src, c)?;
        Ok(Self {
            config,
            embed,
            layers,
            norm,
            lm_head,
            vision,
            rope,
            options,
        })
    }

    pub(crate) fn embed_table(&self) -> &Linear {
        &self.embed
    }

    pub(crate) fn lm_head_linear(&self) -> &Linear {
        &self.lm_head
    }

    /// Store keys/values of caches made from now on as `types` (checked against the head
    /// dimension).
    pub fn set_kv_types(&mut self, types: KvTypes) -> Result<()> {
        types.check_dim(self.config.head_dim)?;
        self.options.kv_types = Some(types);
        Ok(())
    }

    /// An empty KV cache of the configured types (`ForwardOptions::kv_types`).
    pub fn new_cache(&self) -> KvCache {
        KvCache::with_types(
            self.config.num_hidden_layers,
            self.config.num_key_value_heads,
            self.config.head_dim,
            self.options.kv_types(),
        )
    }

    /// Replace every quantized matrix by its f32 dequantization (`--dequantize`). Weight
    /// memory grows to 4 bytes per parameter; in exchange no activation is rounded to 8 bits,
    /// so a reordered float sum (another chunking, the ring) moves logits by float noise
    /// instead of by flipped quantization steps.
    pub fn dequantize_weights(&mut self) -> Result<()> {
        let tied = self.config.tie_word_embeddings || !self.lm_head_is_separate();
        self.embed = self.embed.to_dense()?;
        self.lm_head = if tied {
            self.embed.clone()
        } else {
            self.lm_head.to_dense()?
        };
        for l in &mut self.layers {
            for w in [
                &mut l.wq,
                &mut l.wk,
                &mut l.wv,
                &mut l.wo,
                &mut l.w_gate,
                &mut l.w_up,
                &mut l.w_down,
            ] {
                *w = w.to_dense()?;
            }
        }
        Ok(())
    }

    /// Whether `lm_head` is its own matrix rather than a clone of the embedding.
    fn lm_head_is_separate(&self) -> bool {
        match (&self.embed, &self.lm_head) {
            (Linear::Native(a), Linear::Native(b)) => !Arc::ptr_eq(a, b),
            (Linear::Quant(a), Linear::Quant(b)) => !Arc::ptr_eq(a, b),
            (Linear::Half(a), Linear::Half(b)) => !Arc::ptr_eq(a, b),
            (Linear::Dense(a), Linear::Dense(b)) => a.id() != b.id(),
            _ => true,
        }
    }

    /// Every weight matrix: the embedding, each layer's seven projections, the head (the
    /// embedding again when tied), the vision embedding and head when present.
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = vec![&self.embed];
        for l in &self.layers {
            v.extend([&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]);
        }
        v.push(&self.lm_head);
        if let Some(vp) = &self.vision {
            v.extend([&vp.embed, &vp.head]);
        }
        v
    }

    /// Bytes of weights as held in memory.
    pub fn weight_bytes(&self) -> usize {
        let embed = self.embed.storage_bytes();
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                    .iter()
                    .map(|w| w.storage_bytes())
                    .sum::<usize>()
                    + 8 * l.attn_norm.len()
            })
            .sum();
        let head = if self.config.tie_word_embeddings {
            0
        } else {
            self.lm_head.storage_bytes()
        };
        embed + layers + head
    }

    fn embed_tokens(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let vocab = self.config.vocab_size;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            bail!("token id {bad} is outside the model's vocabulary of {vocab}");
        }
        self.embed.rows(ids)
    }

    /// Run `ids` (the tokens after those already in `cache`) through the model, append their
    /// keys/values to `cache`, and return logits: of the last token (vocab), or of every
    /// token (n × vocab) when `all_logits`. A batch of one sequence (`forward_batch`).
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache, all_logits: bool) -> Result<Vec<f32>> {
        let mut out = self.forward_batch(&mut [SeqInput {
            ids,
            cache,
            all_logits,
            vision: None,
        }])?;
        out.pop().context("forward: no output")
    }

    /// Several sequences in one step (continuous batching): every weight product runs once
    /// over all their rows, so decode reads the weights once for the whole batch; RoPE and
    /// attention run per sequence, each over its own cache. Each row's result equals the
    /// same row run alone: the kernels compute every output as one full-row dot product
    /// whatever the row count (`quant::matmul`, `quant::half`), and a sequence's attention
    /// sees only its own rows and cache. Returns each sequence's logits as `forward` does.
    /// On an error no cache keeps rows of this step.
    pub fn forward_batch(&self, seqs: &mut [SeqInput<'_>]) -> Result<Vec<Vec<f32>>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let normed = self.hidden_batch(seqs)?;
        let logits = self.apply_head(&self.lm_head, &normed)?;
        if seqs.len() == 1 {
            // `forward`'s case: the logits are that sequence's already, no copy.
            return Ok(vec![logits]);
        }
        Ok(split_rows(&logits, seqs, self.lm_head.out_dim()))
    }

    /// `forward_batch` up to the head: each sequence's embedded rows through the layers, the
    /// final-normed rows out (each sequence's last, or all when `all_logits`).
    pub(crate) fn hidden_batch(&self, seqs: &mut [SeqInput<'_>]) -> Result<Vec<f32>> {
        self.hidden_batch_observed(seqs, None)
    }

    /// `hidden_batch`, copying every layer's RoPE'd queries into `observe` (one sequence).
    fn hidden_batch_observed(
        &self,
        seqs: &mut [SeqInput<'_>],
        observe: Option<&mut ObservedQueries>,
    ) -> Result<Vec<f32>> {
        if seqs.iter().any(|s| s.ids.is_empty()) {
            bail!("forward called with no tokens");
        }
        // Each sequence's embedding rows; vision rows (an LWM vision-language prompt) take
        // their own table and are recorded in the cache under keys apart from text ids.
        let mut x = Vec::with_capacity(
            seqs.iter().map(|s| s.ids.len()).sum::<usize>() * self.config.hidden_size,
        );
        let mut keys: Vec<Option<Vec<u32>>> = Vec::with_capacity(seqs.len());
        for s in seqs.iter() {
            match s.vision {
                Some(m) => {
                    x.extend(self.embed_mixed(s.ids, m)?);
                    keys.push(Some(crate::vision_model::cache_keys(s.ids, m)));
                }
                None => {
                    x.extend(self.embed_tokens(s.ids)?);
                    keys.push(None);
                }
            }
        }
        let mut inner: Vec<SeqInput<'_>> = seqs
            .iter_mut()
            .zip(&keys)
            .map(|(s, k)| SeqInput {
                ids: k.as_deref().unwrap_or(s.ids),
                cache: &mut *s.cache,
                all_logits: s.all_logits,
                vision: None,
            })
            .collect();
        self.run_layers_batch(x, &mut inner, observe)
    }

    /// The transformer on the embedded rows `x` of several sequences, one after the other:
    /// returns each sequence's final-normed rows (its last, or all when `all_logits`), in order.
    fn run_layers_batch(
        &self,
        x: Vec<f32>,
        seqs: &mut [SeqInput<'_>],
        observe: Option<&mut ObservedQueries>,
    ) -> Result<Vec<f32>> {
        if observe.is_some() && seqs.len() != 1 {
            bail!("observing queries needs a batch of one sequence");
        }
        let h = self.config.hidden_size;
        let mut runs = Vec::with_capacity(seqs.len());
        let mut row0 = 0;
        for s in seqs.iter() {
            // RoPE positions continue the sequence, whatever a KV policy evicted.
            runs.push(PositionRun {
                row0,
                pos0: s.cache.next_pos(),
                len: s.ids.len(),
            });
            row0 += s.ids.len();
        }
        let out = {
            let mut attention = BatchAttention {
                model: self,
                seqs: &mut *seqs,
                runs: &runs,
                observe,
            };
            self.forward_layers(x, &runs, &mut attention)
        };
        let x = match out {
            Ok(x) => x,
            Err(e) => {
                // Never leave layers holding keys of tokens a cache does not list.
                for (s, r) in seqs.iter_mut().zip(&runs) {
                    s.cache.truncate(r.pos0);
                }
                return Err(e);
            }
        };
        let mut rows = Vec::with_capacity(x.len());
        for (s, r) in seqs.iter_mut().zip(&runs) {
            s.cache.commit(s.ids);
            let first = if s.all_logits {
                r.row0
            } else {
                r.row0 + r.len - 1
            };
            rows.extend_from_slice(&x[first * h..(r.row0 + r.len) * h]);
        }
        Ok(self.final_norm(&rows))
    }

    fn norm(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        let eps = self.config.rms_norm_eps as f32;
        if self.options.numerics == Numerics::Ggml {
            ggml_cpu::rms_norm(x, w, eps)
        } else {
            rms_norm(x, w, eps)
        }
    }

    /// The final RMSNorm on hidden rows.
    pub fn final_norm(&self, x: &[f32]) -> Vec<f32> {
        self.norm(x, &self.norm)
    }

    /// The one transformer forward for inference: `decoder::decoder_layer` per layer, on
    /// f32 rows over the stored weights, RoPE at the positions `runs` give the rows of `x`,
    /// and `attention` storing the keys/values and attending (the local cache, a ring
    /// shard). `x` may hold no rows (a ring worker owning none of a step's positions still
    /// takes part in every layer's attention). Returns the last layer's hidden rows.
    pub fn forward_layers(
        &self,
        x: Vec<f32>,
        runs: &[PositionRun],
        attention: &mut dyn AttentionBackend,
    ) -> Result<Vec<f32>> {
        let n = x.len() / self.config.hidden_size;
        if runs.iter().map(|r| r.len).sum::<usize>() != n || runs.iter().any(|r| r.row0 + r.len > n)
        {
            bail!("position runs {runs:?} do not cover the {n} rows");
        }
        let mut ops = RowOps {
            model: self,
            runs,
            tables: self.rope.tables(runs),
            attention,
        };
        let mut x = x;
        for li in 0..self.layers.len() {
            x = decoder_layer(&mut ops, li, x)?;
        }
        Ok(x)
    }

    /// A head (`lm_head` or the vision head) on normed hidden rows.
    pub(crate) fn apply_head(&self, head: &Linear, normed: &[f32]) -> Result<Vec<f32>> {
        let h = self.config.hidden_size;
        let opts = &self.options;
        let m = normed.len() / h;
        // The head runs per chunk too, so n × vocab scores exist only once, in the output.
        let mut logits = Vec::with_capacity(m * head.out_dim());
        for r0 in (0..m).step_by(opts.mlp_chunk.max(1)) {
            let r = opts.mlp_chunk.max(1).min(m - r0);
            logits.extend(head.forward(&normed[r0 * h..(r0 + r) * h], r, opts)?);
        }
        Ok(logits)
    }

    /// Forward a long prompt in chunks of `chunk` tokens (bounded activation memory),
    /// calling `progress(done)` after each; returns the last token's logits.
    pub fn prefill(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        chunk: usize,
        progress: impl FnMut(usize),
    ) -> Result<Vec<f32>> {
        prefill_in_pieces(ids, chunk, progress, |piece| {
            self.forward(piece, cache, false)
        })
    }

    /// `forward` (last token's logits) of one sequence under a KV policy: its steps are the
    /// prompt pieces, then one token at a time, in order.
    /// * `Full`: `forward` itself.
    /// * `SinksWindow`: `forward`, then evict to the sinks and the window (every step).
    /// * `SnapKv` with a prompt longer than the budget: prompt positions before the last
    ///   OBS run as usual; those OBS run with their queries kept (a piece crossing the
    ///   boundary is split there), and the step that completes the prompt compacts every
    ///   layer and KV head to its budget (`snapkv_compact`). The decode is `forward`.
    pub fn forward_policy(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        state: &mut PolicyState,
    ) -> Result<Vec<f32>> {
        match state.policy {
            KvPolicy::Full => self.forward(ids, cache, false),
            KvPolicy::SinksWindow { sinks, window } => {
                let logits = self.forward(ids, cache, false)?;
                cache.evict_to_sinks_window(sinks, window);
                Ok(logits)
            }
            KvPolicy::SnapKv {
                budget,
                window,
                kernel,
            } => {
                let prompt = state.prompt_len;
                let p0 = cache.next_pos();
                if prompt <= budget || p0 >= prompt {
                    return self.forward(ids, cache, false);
                }
                let w0 = prompt - window;
                let observed = state.observed.get_or_insert_with(ObservedQueries::default);
                if p0 > w0 && observed.rows.len() != p0 - w0 {
                    bail!("snapkv: the cache holds {p0} prompt tokens, but the observation window starts at {w0}: its queries were not seen");
                }
                // Before the window, in the window, after the prompt.
                let a = w0.saturating_sub(p0).min(ids.len());
                let b = (prompt - p0).min(ids.len());
                let mut logits = Vec::new();
                if a > 0 {
                    logits = self.forward(&ids[..a], cache, false)?;
                }
                if b > a {
                    let mut seq = [SeqInput {
                        ids: &ids[a..b],
                        cache: &mut *cache,
                        all_logits: false,
                        vision: None,
                    }];
                    let normed = match self.hidden_batch_observed(&mut seq, Some(observed)) {
                        Ok(x) => x,
                        Err(e) => {
                            // Part of the layers saw this step: the observation is lost.
                            state.observed = None;
                            return Err(e);
                        }
                    };
                    logits = self.apply_head(&self.lm_head, &normed)?;
                    if p0 + b == prompt {
                        let c = &self.config;
                        snapkv_compact(
                            cache,
                            observed,
                            c.num_attention_heads,
                            budget,
                            window,
                            kernel,
                        );
                        state.observed = None;
                    }
                }
                if ids.len() > b {
                    logits = self.forward(&ids[b..], cache, false)?;
                }
                Ok(logits)
            }
        }
    }
}

/// A sequence's KV policy and what it needs across steps (`Model::forward_policy`).
#[derive(Debug, Clone)]
pub struct PolicyState {
    pub policy: KvPolicy,
    /// Prompt tokens of the sequence (SnapKV compacts once they are all in).
    pub prompt_len: usize,
    observed: Option<ObservedQueries>,
}

impl PolicyState {
    pub fn new(policy: KvPolicy, prompt_len: usize) -> Self {
        Self {
            policy,
            prompt_len,
            observed: None,
        }
    }
}

/// Run `ids` through `forward` in pieces of `chunk` tokens (bounded activation memory),
/// calling `progress(done)` after each; returns the last piece's logits. One worker's
/// model and a ring session both prefill through this.
pub fn prefill_in_pieces(
    ids: &[u32],
    chunk: usize,
    mut progress: impl FnMut(usize),
    mut forward: impl FnMut(&[u32]) -> Result<Vec<f32>>,
) -> Result<Vec<f32>> {
    let mut logits = Vec::new();
    let mut done = 0;
    for piece in ids.chunks(chunk.max(1)) {
        logits = forward(piece).context("prefill failed")?;
        done += piece.len();
        progress(done);
    }
    Ok(logits)
}

/// LWM vision-language models' second embedding table `vte` and second head
/// `vision_head` (`vision_model` runs them).
pub(crate) struct VisionParts {
    pub(crate) embed: Linear,
    pub(crate) head: Linear,
}

impl VisionParts {
    /// Load `vte`/`vision_head` when the config has a vision vocabulary.
    pub(crate) fn load(src: &dyn WeightSource, c: &ModelConfig) -> Result<Option<Self>> {
        if c.vision_vocab_size == 0 {
            return Ok(None);
        }
        let origin = src.origin();
        let get = |name: &str| -> Result<Linear> {
            if !src.contains(name) {
                bail!(
                    "{origin}: the config has a vision vocabulary but there is no '{name}' tensor"
                );
            }
            Linear::from_weight(
                src.load(name)?,
                name,
                c.vision_vocab_size,
                c.hidden_size,
                &origin,
            )
        };
        Ok(Some(Self {
            embed: get(crate::weights::jax::VISION_EMBED)?,
            head: get(crate::weights::jax::VISION_HEAD)?,
        }))
    }
}

/// Inference's arithmetic for [`decoder_layer`]: f32 rows (row-major, `n × width`) over the
/// stored weights, in the model's numerics.
struct RowOps<'a> {
    model: &'a Model,
    runs: &'a [PositionRun],
    tables: Vec<crate::rope::RopeTable>,
    attention: &'a mut dyn AttentionBackend,
}

impl RowOps<'_> {
    fn layer(&self, li: usize) -> &Layer {
        &self.model.layers[li]
    }
}

impl DecoderOps for RowOps<'_> {
    type Rows = Vec<f32>;

    fn norm(&mut self, li: usize, site: NormSite, x: &Vec<f32>) -> Result<Vec<f32>> {
        let l = self.layer(li);
        let w = match site {
            NormSite::Attention => &l.attn_norm,
            NormSite::FeedForward => &l.ffn_norm,
        };
        Ok(self.model.norm(x, w))
    }

    fn qkv(&mut self, li: usize, x: &Vec<f32>) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        if x.is_empty() {
            return Ok(Default::default());
        }
        let n = x.len() / self.model.config.hidden_size;
        let l = self.layer(li);
        let mut qkv = Linear::forward_many(&[&l.wq, &l.wk, &l.wv], x, n, &self.model.options)?;
        let v = qkv.pop().context("fused projection")?;
        let k = qkv.pop().context("fused projection")?;
        Ok((qkv.pop().context("fused projection")?, k, v))
    }

    fn rope(&mut self, mut q: Vec<f32>, mut k: Vec<f32>) -> Result<(Vec<f32>, Vec<f32>)> {
        let c = &self.model.config;
        let rope = &self.model.rope;
        rope.apply_runs(&mut q, self.runs, c.num_attention_heads, &self.tables);
        rope.apply_runs(&mut k, self.runs, c.num_key_value_heads, &self.tables);
        Ok((q, k))
    }

    fn attend(&mut self, li: usize, q: Vec<f32>, k: Vec<f32>, v: Vec<f32>) -> Result<Vec<f32>> {
        self.attention.attend(li, &q, &k, &v)
    }

    fn out_proj(&mut self, li: usize, attn: &Vec<f32>) -> Result<Vec<f32>> {
        let c = &self.model.config;
        let n = attn.len() / (c.num_attention_heads * c.head_dim);
        self.layer(li).wo.forward(attn, n, &self.model.options)
    }

    fn gate_up(&mut self, li: usize, x: &Vec<f32>) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = x.len() / self.model.config.hidden_size;
        let l = self.layer(li);
        let mut gate_up = Linear::forward_many(&[&l.w_gate, &l.w_up], x, n, &self.model.options)?;
        let up = gate_up.pop().context("fused projection")?;
        Ok((gate_up.pop().context("fused projection")?, up))
    }

    fn swiglu(&mut self, gate: Vec<f32>, up: Vec<f32>) -> Result<Vec<f32>> {
        let c = &self.model.config;
        Ok(if self.model.options.numerics == Numerics::Ggml {
            ggml_cpu::swiglu(&gate, &up, c.intermediate_size, Isa::REFERENCE)
        } else {
            gate.iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect()
        })
    }

    fn down(&mut self, li: usize, act: &Vec<f32>) -> Result<Vec<f32>> {
        let n = act.len() / self.model.config.intermediate_size;
        self.layer(li).w_down.forward(act, n, &self.model.options)
    }

    fn residual(&mut self, mut x: Vec<f32>, y: Vec<f32>) -> Result<Vec<f32>> {
        for (xi, yi) in x.iter_mut().zip(&y) {
            *xi += yi;
        }
        Ok(x)
    }

    fn is_empty(&self, x: &Vec<f32>) -> bool {
        x.is_empty()
    }

    /// Blockwise feed-forward: `--scan-mlp-chunk-size` rows at a time.
    fn per_token_blocks(
        &mut self,
        x: Vec<f32>,
        block: &mut RowBlock<'_, Self>,
    ) -> Result<Vec<f32>> {
        let piece = self.model.options.mlp_chunk.max(1) * self.model.config.hidden_size;
        if x.len() <= piece {
            return block(self, x);
        }
        let mut out = Vec::with_capacity(x.len());
        for rows in x.chunks(piece) {
            out.extend(block(self, rows.to_vec())?);
        }
        Ok(out)
    }
}

/// Where a layer's keys and values live and how a step's queries attend them: the local
/// KV caches of a step's sequences (`BatchAttention`) or a ring worker's shard (`ring::worker`). `forward_layers`
/// is the same code for both, so a ring changes no bit of the result.
pub trait AttentionBackend {
    /// Store the step's keys and values of layer `layer` (rows × n_kv·d, RoPE applied) and
    /// return the attention output of its queries `q` (rows × n_heads·d).
    fn attend(&mut self, layer: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>>;
}

/// A batch's head output (`width` values a row) cut into each sequence's rows.
pub(crate) fn split_rows(flat: &[f32], seqs: &[SeqInput<'_>], width: usize) -> Vec<Vec<f32>> {
    let mut rest = flat;
    seqs.iter()
        .map(|s| {
            let rows = if s.all_logits { s.ids.len() } else { 1 };
            let (mine, tail) = rest.split_at(rows * width);
            rest = tail;
            mine.to_vec()
        })
        .collect()
}

/// One sequence's share of a batched forward step (`Model::forward_batch`): the tokens
/// after those its cache holds.
pub struct SeqInput<'a> {
    pub ids: &'a [u32],
    pub cache: &'a mut KvCache,
    /// Logits of every token (n × vocab), not only the last one's.
    pub all_logits: bool,
    /// For an LWM vision-language model: which of `ids` are vision ids (embedded with `vte`,
    /// recorded in the cache as `vision_model::cache_key`); `None`: all text.
    pub vision: Option<&'a [bool]>,
}

/// Attention over local KV caches for the sequences of a step: each sequence's rows (its
/// run) are its cache's next positions and attend only that cache.
struct BatchAttention<'a, 'b> {
    model: &'a Model,
    seqs: &'a mut [SeqInput<'b>],
    runs: &'a [PositionRun],
    /// SnapKV's observation: the queries of every layer, kept (one sequence).
    observe: Option<&'a mut ObservedQueries>,
}

impl AttentionBackend for BatchAttention<'_, '_> {
    fn attend(&mut self, li: usize, q: &[f32], k: &[f32], v: &[f32]) -> Result<Vec<f32>> {
        let c = &self.model.config;
        if let ([s], [_]) = (&mut *self.seqs, self.runs) {
            if let Some(obs) = self.observe.as_deref_mut() {
                obs.push(li, q, s.cache.rows(), c.num_attention_heads * c.head_dim);
            }
            return Ok(attend_cache(self.model, s.cache, li, q, k, v));
        }
        let (qw, kw) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let mut out = Vec::with_capacity(q.len());
        for (s, r) in self.seqs.iter_mut().zip(self.runs) {
            let rows = r.row0..r.row0 + r.len;
            out.extend(attend_cache(
                self.model,
                s.cache,
                li,
                &q[rows.start * qw..rows.end * qw],
                &k[rows.start * kw..rows.end * kw],
                &v[rows.start * kw..rows.end * kw],
            ));
        }
        Ok(out)
    }
}

/// Store one sequence's new keys/values of layer `li` in its cache and attend its query
/// rows to everything the cache holds up to each row. The mask runs over row indices (the
/// step's rows follow the `cache.rows()` held, all of which precede them): equal to the
/// positions while nothing is evicted, and the right mask after a KV policy evicted rows.
fn attend_cache(
    model: &Model,
    cache: &mut KvCache,
    li: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> Vec<f32> {
    let c = &model.config;
    let (nh, hd) = (c.num_attention_heads, c.head_dim);
    let opts = &model.options;
    let n = q.len() / (nh * hd);
    let pos0 = cache.rows();
    cache.append(li, k, v, n);
    let view = cache.quant_view(li);
    if ggml_one_chunk(opts, cache.types, n, view.len) {
        // llama.cpp's one-chunk flash attention over its f16 cache. From 64 rows
        // llama.cpp itself switches to a tiled f32 path, so the f16-accumulator
        // emulation buys no parity there: the blockwise primitive runs instead.
        let fa = FaOptions::default();
        let scale = 1.0 / (hd as f32).sqrt();
        return ggml_cpu::flash_attn_ext_f16_stored(q, n, pos0, nh, hd, &view, scale, &fa);
    }
    causal_attention_quant(q, n, pos0, nh, hd, &view, opts.chunking)
}

/// Whether a step of `n` rows against `cells` cached rows (its own included) takes
/// llama.cpp's one-chunk f16 flash attention (`Ggml` numerics with an f16 cache). llama.cpp
/// decodes one row against 512+ cells by splitting the cells over threads and merging (not
/// emulated), so there the blockwise kernel runs too.
pub fn ggml_one_chunk(opts: &ForwardOptions, types: KvTypes, n: usize, cells: usize) -> bool {
    opts.numerics == Numerics::Ggml
        && types == KvTypes::F16
        && n < GGML_TILED_ATTENTION_ROWS
        && !(n == 1 && cells >= GGML_SPLIT_DECODE_CELLS)
}

/// Entry points for drivers that run `forward_layers` with their own attention (the ring).
impl Model {
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Embedding rows of `ids` (errors on ids outside the vocabulary).
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        self.embed_tokens(ids)
    }

    /// Final norm and output head for the hidden rows `x` (rows × vocab logits).
    pub fn head_logits(&self, x: &[f32]) -> Result<Vec<f32>> {
        self.apply_head(&self.lm_head, &self.final_norm(x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        crate::rng::XorShift::new(seed).vec(n, -1.0, 1.0)
    }

    /// Every GGUF weight type the engine accepts gives `x Wᵀ` within its quantization error,
    /// for a decode-sized and a prefill-sized batch (the two code paths of `Linear`).
    #[test]
    fn every_supported_quantization_multiplies_correctly() {
        let (out_dim, in_dim) = (48, 512);
        let w = rand_vec(out_dim * in_dim, 1);
        let wt = Tensor::from_slice(&w, (out_dim, in_dim), &Device::Cpu).unwrap();
        let cases = [
            (GgmlDType::F16, 2e-3),
            (GgmlDType::BF16, 2e-2),
            (GgmlDType::Q8_0, 3e-2),
            (GgmlDType::Q4_0, 0.25),
            (GgmlDType::Q4_1, 0.2),
            (GgmlDType::Q5_0, 0.25),
            (GgmlDType::Q5_1, 0.2),
            (GgmlDType::Q4K, 0.25),
            (GgmlDType::Q5K, 0.15),
            (GgmlDType::Q6K, 0.08),
        ];
        let opts = ForwardOptions::default();
        for (dtype, tol) in cases {
            let q = QTensor::quantize(&wt, dtype).unwrap();
            let weight = Weight::Quant(Arc::new(q));
            let lin = Linear::from_weight(weight, "w", out_dim, in_dim, "test").unwrap();
            if matches!(dtype, GgmlDType::F16 | GgmlDType::BF16) {
                assert!(matches!(lin, Linear::Half(_)), "{dtype:?}");
                // Whole panels of 32 rows (`half_panels`).
                assert_eq!(
                    lin.storage_bytes(),
                    2 * out_dim.next_multiple_of(32) * in_dim
                );
            }
            for n in [1, 40] {
                let x = rand_vec(n * in_dim, 7 + n as u64);
                let y = lin.forward(&x, n, &opts).unwrap();
                for r in 0..n {
                    for o in 0..out_dim {
                        let terms = (0..in_dim).map(|i| x[r * in_dim + i] * w[o * in_dim + i]);
                        let exact: f32 = terms.clone().sum();
                        // Rounding errors of the terms add up like a random walk.
                        let scale = terms.map(|t| t * t).sum::<f32>().sqrt();
                        let got = y[r * out_dim + o];
                        assert!(
                            (got - exact).abs() < tol * scale,
                            "{dtype:?} n={n}: {got} vs {exact} (scale {scale})"
                        );
                    }
                }
            }
        }
    }

    /// f16 / bf16 candle tensors (safetensors, JAX) become `Linear::Half` at 2 bytes per
    /// weight; their rows, products and `to_dense` agree with the widened f32 matrix.
    #[test]
    fn half_dense_tensors_stay_half() {
        let (out_dim, in_dim) = (37, 77);
        let w = Tensor::from_slice(
            &rand_vec(out_dim * in_dim, 3),
            (out_dim, in_dim),
            &Device::Cpu,
        )
        .unwrap();
        for dt in [candle_core::DType::F16, candle_core::DType::BF16] {
            let t = w.to_dtype(dt).unwrap();
            let lin =
                Linear::from_weight(Weight::Dense(t.clone()), "w", out_dim, in_dim, "t").unwrap();
            assert!(matches!(lin, Linear::Half(_)), "{dt:?}");
            // Whole panels of 32 rows (the last one zero-padded); bf16 columns in pairs.
            let stored_cols = match dt {
                candle_core::DType::BF16 => in_dim.next_multiple_of(2),
                _ => in_dim,
            };
            assert_eq!(
                lin.storage_bytes(),
                2 * out_dim.next_multiple_of(32) * stored_cols
            );
            let dense = lin.to_dense().unwrap();
            assert!(matches!(dense, Linear::Dense(_)));
            assert_eq!(dense.storage_bytes(), 4 * out_dim * in_dim);
            assert_eq!(
                lin.rows(&[0, 36, 5]).unwrap(),
                dense.rows(&[0, 36, 5]).unwrap()
            );
            let opts = ForwardOptions::default();
            for n in [1, 3, 40] {
                let x = rand_vec(n * in_dim, n as u64);
                let a = lin.forward(&x, n, &opts).unwrap();
                let b = dense.forward(&x, n, &opts).unwrap();
                let d = a
                    .iter()
                    .zip(&b)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0f32, f32::max);
                assert!(d < 1e-4, "{dt:?} n={n}: {d}");
            }
        }
    }

    #[test]
    fn a_wrong_weight_shape_is_named() {
        let wt = Tensor::zeros((4, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        let e = Linear::from_weight(
            Weight::Dense(wt),
            "model.layers.0.mlp.up_proj.weight",
            8,
            4,
            "m.gguf",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("m.gguf") && e.contains("up_proj") && e.contains("[4, 8]"),
            "{e}"
        );
    }
}
