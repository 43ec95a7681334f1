//! A trainable LLaMA (LWM's text model, optionally with the vision embedding and head) on
//! candle autograd, computing exactly what the inference `Model` computes in `Exact` numerics.
//!
//! Same `ModelConfig`, same canonical Hugging Face tensor names (`[out, in]` orientation),
//! same RoPE table (`rope::Rope`, either channel layout), attention through the blockwise
//! custom op (`attention_grad`), whose backward is blockwise too. Positions and segment ids
//! are per token, so packed documents restart at position 0 and never attend each other.
//!
//! Parameters are f32 `Var`s (LWM's `param_dtype`); `init_normal` follows the original's
//! init: every matrix normal(0, 0.02), norms ones. `compute` sets the precision of the
//! matrix products (`precision`: f32, or bf16 with f32 master weights).

pub use super::batch::BatchInput;

use super::attention_grad::{ring_attention, shard_attention};
use super::attention_rows::AttnMasking;
use super::precision::ComputeDType;
use super::seq_parallel::SeqComm;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use lwm_core::attention::Chunking;
use lwm_core::config::{ModelConfig, RopeLayout};
use lwm_core::decoder::{decoder_layer, DecoderOps, NormSite, RowBlock};
use lwm_core::rope::Rope;
use lwm_core::weights::{layer_name, WeightSource};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Tensor names of the vision-language extension (LWM's `vte` and `vision_head`).
pub const VISION_EMBED: &str = "model.vision_embed_tokens.weight";
pub const VISION_HEAD: &str = "vision_head.weight";

/// Output logits of one forward: text (batch, len, vocab) and, for vision models, vision
/// (batch, len, vision_vocab).
pub struct Logits {
    pub text: Tensor,
    pub vision: Option<Tensor>,
}

pub struct TrainModel {
    pub config: ModelConfig,
    /// Canonical name -> parameter, in a fixed (sorted) order for the optimizer and checkpoints.
    params: BTreeMap<String, Var>,
    rope: Rope,
    pub chunking: Chunking,
    /// Ring size of the attention (sequence split over `sp` threads); 1 = no ring.
    pub sp: usize,
    /// The ring of processes when each rank trains on its own columns (`seq_parallel`);
    /// batches then come through `shard_batch`.
    pub comm: Option<Arc<SeqComm>>,
    /// Precision of the matrix products (weights stay f32).
    pub compute: ComputeDType,
}

/// Shapes of every parameter, by canonical name.
pub fn parameter_shapes(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, hd) = (c.hidden_size, c.head_dim);
    let (q_dim, kv_dim) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![c.vocab_size, h],
    )];
    for i in 0..c.num_hidden_layers {
        let n = |s: &str| layer_name(i, s);
        out.extend([
            (n("input_layernorm.weight"), vec![h]),
            (n("self_attn.q_proj.weight"), vec![q_dim, h]),
            (n("self_attn.k_proj.weight"), vec![kv_dim, h]),
            (n("self_attn.v_proj.weight"), vec![kv_dim, h]),
            (n("self_attn.o_proj.weight"), vec![h, q_dim]),
            (n("post_attention_layernorm.weight"), vec![h]),
            (n("mlp.gate_proj.weight"), vec![c.intermediate_size, h]),
            (n("mlp.up_proj.weight"), vec![c.intermediate_size, h]),
            (n("mlp.down_proj.weight"), vec![h, c.intermediate_size]),
        ]);
    }
    out.push(("model.norm.weight".into(), vec![h]));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![c.vocab_size, h]));
    }
    if c.vision_vocab_size > 0 {
        out.push((VISION_EMBED.into(), vec![c.vision_vocab_size, h]));
        out.push((VISION_HEAD.into(), vec![c.vision_vocab_size, h]));
    }
    out
}

/// Standard normal samples from the project's deterministic generator (Box–Muller).
fn normal_vec(rng: &mut lwm_core::rng::XorShift, n: usize, std: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1 = rng.uniform(0.0, 1.0).max(1e-12) as f64;
        let u2 = rng.uniform(0.0, 1.0) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let a = std::f64::consts::TAU * u2;
        out.push((r * a.cos()) as f32 * std);
        out.push((r * a.sin()) as f32 * std);
    }
    out.truncate(n);
    out
}

/// x / sqrt(mean(x²) + eps) · w over the last dimension.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
}

/// y = x Wᵀ for x (..., in) and W (out, in), the product in `dtype`.
fn linear(x: &Tensor, w: &Tensor, dtype: ComputeDType) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inner = dims[dims.len() - 1];
    let rows = x.elem_count() / inner;
    let y = dtype.matmul_t(&x.reshape((rows, inner))?, w)?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("non-scalar") = w.dim(0)?;
    Ok(y.reshape(out_dims)?)
}

impl TrainModel {
    /// A fresh model: matrices normal(0, `init_std`) from `seed`, norms ones.
    pub fn init_normal(config: ModelConfig, init_std: f32, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = lwm_core::rng::XorShift::new(seed);
        let mut params = BTreeMap::new();
        for (name, shape) in parameter_shapes(&config) {
            let n: usize = shape.iter().product();
            let data = if shape.len() == 1 {
                vec![1.0f32; n]
            } else {
                normal_vec(&mut rng, n, init_std)
            };
            params.insert(name, Var::from_vec(data, shape, &Device::Cpu)?);
        }
        Ok(Self::from_params(config, params))
    }

    /// Load every parameter from a weight source (safetensors, GGUF dequantized), checking shapes.
    pub fn load(src: &dyn WeightSource, config: ModelConfig) -> Result<Self> {
        config.validate()?;
        let origin = src.origin();
        let mut params = BTreeMap::new();
        for (name, shape) in parameter_shapes(&config) {
            let w = src.load(&name)?;
            if w.dims() != shape {
                bail!(
                    "{origin}: tensor '{name}' has shape {:?}, expected {shape:?} for this model config",
                    w.dims()
                );
            }
            let t = w
                .to_dense()
                .with_context(|| format!("{origin}: cannot read '{name}'"))?;
            params.insert(
                name,
                Var::from_tensor(&t.to_dtype(DType::F32)?.contiguous()?)?,
            );
        }
        Ok(Self::from_params(config, params))
    }

    /// Build from named tensors (a checkpoint), checking names and shapes.
    pub fn from_tensors(
        config: ModelConfig,
        tensors: &BTreeMap<String, Tensor>,
        origin: &str,
    ) -> Result<Self> {
        config.validate()?;
        let mut params = BTreeMap::new();
        for (name, shape) in parameter_shapes(&config) {
            let t = tensors
                .get(&name)
                .with_context(|| format!("{origin}: tensor '{name}' is missing"))?;
            if t.dims() != shape {
                bail!(
                    "{origin}: tensor '{name}' has shape {:?}, expected {shape:?} for this model config",
                    t.dims()
                );
            }
            params.insert(name, Var::from_tensor(&t.to_dtype(DType::F32)?)?);
        }
        Ok(Self::from_params(config, params))
    }

    fn from_params(config: ModelConfig, params: BTreeMap<String, Var>) -> Self {
        let rope = Rope::new(
            config.head_dim,
            config.theta,
            config.rope_layout,
            &config.rope_scaling,
        );
        Self {
            config,
            params,
            rope,
            chunking: Chunking::default(),
            sp: 1,
            comm: None,
            compute: ComputeDType::F32,
        }
    }

    /// Change RoPE theta (context extension keeps the weights and raises theta).
    pub fn set_theta(&mut self, theta: f64) {
        self.config.theta = theta;
        self.rope = Rope::new(
            self.config.head_dim,
            theta,
            self.config.rope_layout,
            &self.config.rope_scaling,
        );
    }

    /// The same model in the rotate-half (Hugging Face) channel layout: q/k output rows of
    /// each head reordered evens-then-odds (the permutation of LWM's `jax2hf.py`).
    pub fn into_rotate_half(mut self) -> Result<Self> {
        if self.config.rope_layout == RopeLayout::RotateHalf {
            return Ok(self);
        }
        let hd = self.config.head_dim;
        let order: Vec<u32> = (0..hd / 2)
            .map(|i| 2 * i as u32)
            .chain((0..hd / 2).map(|i| 2 * i as u32 + 1))
            .collect();
        for i in 0..self.config.num_hidden_layers {
            for (proj, heads) in [
                ("self_attn.q_proj.weight", self.config.num_attention_heads),
                ("self_attn.k_proj.weight", self.config.num_key_value_heads),
            ] {
                let var = &self.params[&layer_name(i, proj)];
                let rows: Vec<u32> = (0..heads)
                    .flat_map(|h| order.iter().map(move |&r| (h * hd) as u32 + r))
                    .collect();
                let idx = Tensor::from_vec(rows, heads * hd, &Device::Cpu)?;
                let permuted = var.as_tensor().index_select(&idx, 0)?;
                var.set(&permuted)?;
            }
        }
        self.config.rope_layout = RopeLayout::RotateHalf;
        let theta = self.config.theta;
        self.set_theta(theta);
        Ok(self)
    }

    pub fn params(&self) -> &BTreeMap<String, Var> {
        &self.params
    }

    pub fn param(&self, name: &str) -> Result<&Tensor> {
        Ok(self
            .params
            .get(name)
            .with_context(|| format!("model has no parameter '{name}'"))?
            .as_tensor())
    }

    pub fn parameter_count(&self) -> usize {
        self.params.values().map(|v| v.elem_count()).sum()
    }

    /// cos/sin (n, D/2) for arbitrary per-token positions, from the inference RoPE table.
    fn rope_tables(&self, positions: &[u32]) -> Result<(Tensor, Tensor)> {
        let max = positions.iter().copied().max().unwrap_or(0) as usize;
        let table = self.rope.table(0, max + 1);
        let half = self.config.head_dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            let p = p as usize;
            cos.extend_from_slice(&table.cos[p * half..(p + 1) * half]);
            sin.extend_from_slice(&table.sin[p * half..(p + 1) * half]);
        }
        let n = positions.len();
        Ok((
            Tensor::from_vec(cos, (n, half), &Device::Cpu)?,
            Tensor::from_vec(sin, (n, half), &Device::Cpu)?,
        ))
    }

    /// Rotate x (B, L, H, D) with cos/sin (B·L, D/2) in the model's channel layout.
    fn apply_rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (b, l, h, d) = x.dims4()?;
        let half = d / 2;
        let (cos, sin) = (cos.reshape((b, l, 1, half))?, sin.reshape((b, l, 1, half))?);
        Ok(match self.config.rope_layout {
            RopeLayout::Interleaved => {
                let pairs = x.reshape((b, l, h, half, 2))?;
                let x0 = pairs.narrow(4, 0, 1)?.squeeze(4)?;
                let x1 = pairs.narrow(4, 1, 1)?.squeeze(4)?;
                let r0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
                let r1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
                Tensor::stack(&[r0, r1], 4)?.reshape((b, l, h, d))?
            }
            RopeLayout::RotateHalf => {
                let x0 = x.narrow(3, 0, half)?;
                let x1 = x.narrow(3, half, half)?;
                let r0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
                let r1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
                Tensor::cat(&[r0, r1], 3)?
            }
        })
    }

    /// Embedding: text rows from `embed_tokens`, vision rows (vision_mask) from the vision table.
    fn embed(&self, input: &BatchInput) -> Result<Tensor> {
        let c = &self.config;
        let h = c.hidden_size;
        let n = input.tokens.len();
        let vision = input.vision_mask.as_deref();
        for (i, &t) in input.tokens.iter().enumerate() {
            let is_vision = vision.is_some_and(|m| m[i]);
            let limit = if is_vision {
                c.vision_vocab_size
            } else {
                c.vocab_size
            };
            if t as usize >= limit {
                let kind = if is_vision { "vision" } else { "text" };
                bail!(
                    "token {t} at batch position {i} is outside the {kind} vocabulary of {limit}"
                );
            }
        }
        let text_ids: Vec<u32> = (0..n)
            .map(|i| {
                if vision.is_some_and(|m| m[i]) {
                    0
                } else {
                    input.tokens[i]
                }
            })
            .collect();
        let ids = Tensor::from_vec(text_ids, n, &Device::Cpu)?;
        let mut x = self
            .param("model.embed_tokens.weight")?
            .index_select(&ids, 0)?;
        if let Some(mask) = vision {
            // emb = wte(text ids)·(1 − vm) + vte(vision ids)·vm, as the original.
            let vids: Vec<u32> = (0..n)
                .map(|i| if mask[i] { input.tokens[i] } else { 0 })
                .collect();
            let vm: Vec<f32> = mask.iter().map(|&m| m as u8 as f32).collect();
            let vm = Tensor::from_vec(vm, (n, 1), &Device::Cpu)?;
            let vx = self
                .param(VISION_EMBED)?
                .index_select(&Tensor::from_vec(vids, n, &Device::Cpu)?, 0)?;
            x = (x.broadcast_mul(&(1.0 - &vm)?)? + vx.broadcast_mul(&vm)?)?;
        }
        Ok(x.reshape((input.batch, input.len, h))?)
    }

    /// Final hidden states (batch, len, hidden) after `ln_f`.
    pub fn hidden(&self, input: &BatchInput) -> Result<Tensor> {
        let c = &self.config;
        let (b, l) = (input.batch, input.len);
        if input.tokens.len() != b * l || input.positions.len() != b * l {
            bail!(
                "batch of {} tokens / {} positions does not match {b} × {l}",
                input.tokens.len(),
                input.positions.len()
            );
        }
        // A shard's attention runs over the ring with the whole rows' segment ids.
        let (segment_ids, dist) = match (&input.shard, &self.comm) {
            (None, _) => (input.segment_ids.clone().map(Arc::new), None),
            (Some(s), Some(c)) => {
                if s.full_len != l * c.size || s.offset != l * c.rank {
                    bail!(
                        "shard of columns {}..{} of {} does not belong to rank {} of {}",
                        s.offset,
                        s.offset + l,
                        s.full_len,
                        c.rank,
                        c.size
                    );
                }
                (s.full_segment_ids.clone(), Some(c.clone()))
            }
            (Some(_), None) => bail!("a sharded batch needs the model's ring (TrainModel::comm)"),
        };
        let masking = AttnMasking {
            causal: true,
            segment_ids,
            chunking: self.chunking,
        };
        let (cos, sin) = self.rope_tables(&input.positions)?;
        let mut ops = TapeOps {
            model: self,
            batch: b,
            len: l,
            masking,
            dist,
            cos,
            sin,
        };
        let mut x = self.embed(input)?;
        for li in 0..c.num_hidden_layers {
            x = decoder_layer(&mut ops, li, x)?;
        }
        rms_norm(&x, self.param("model.norm.weight")?, c.rms_norm_eps)
    }

    /// Logits of every position.
    pub fn forward(&self, input: &BatchInput) -> Result<Logits> {
        let hidden = self.hidden(input)?;
        let dt = self.compute;
        let head = if self.config.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        let text = linear(&hidden, self.param(head)?, dt)?;
        let vision = if self.config.vision_vocab_size > 0 {
            Some(linear(&hidden, self.param(VISION_HEAD)?, dt)?)
        } else {
            None
        };
        Ok(Logits { text, vision })
    }
}

/// Training's arithmetic for [`decoder_layer`]: candle autograd tensors (batch, len, ·), the
/// matrix products in the model's compute precision, attention through the blockwise tape
/// (`attention_grad`: over `sp` threads, or this rank's shard of the MPI ring).
struct TapeOps<'a> {
    model: &'a TrainModel,
    batch: usize,
    len: usize,
    masking: AttnMasking,
    dist: Option<Arc<SeqComm>>,
    cos: Tensor,
    sin: Tensor,
}

impl TapeOps<'_> {
    fn weight(&self, layer: usize, name: &str) -> Result<&Tensor> {
        self.model.param(&layer_name(layer, name))
    }

    fn project(&self, layer: usize, name: &str, x: &Tensor) -> Result<Tensor> {
        linear(x, self.weight(layer, name)?, self.model.compute)
    }

    fn heads(&self, x: Tensor, heads: usize) -> Result<Tensor> {
        Ok(x.reshape((self.batch, self.len, heads, self.model.config.head_dim))?)
    }
}

impl DecoderOps for TapeOps<'_> {
    type Rows = Tensor;

    fn norm(&mut self, layer: usize, site: NormSite, x: &Tensor) -> Result<Tensor> {
        let name = match site {
            NormSite::Attention => "input_layernorm.weight",
            NormSite::FeedForward => "post_attention_layernorm.weight",
        };
        rms_norm(x, self.weight(layer, name)?, self.model.config.rms_norm_eps)
    }

    fn qkv(&mut self, layer: usize, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.model.config;
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let q = self.heads(self.project(layer, "self_attn.q_proj.weight", x)?, nh)?;
        let k = self.heads(self.project(layer, "self_attn.k_proj.weight", x)?, nkv)?;
        let v = self.heads(self.project(layer, "self_attn.v_proj.weight", x)?, nkv)?;
        Ok((q, k, v))
    }

    fn rope(&mut self, q: Tensor, k: Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.model.apply_rope(&q, &self.cos, &self.sin)?,
            self.model.apply_rope(&k, &self.cos, &self.sin)?,
        ))
    }

    fn attend(&mut self, _layer: usize, q: Tensor, k: Tensor, v: Tensor) -> Result<Tensor> {
        let c = &self.model.config;
        let attn = match &self.dist {
            None => ring_attention(&q, &k, &v, &self.masking, self.model.sp)?,
            Some(comm) => shard_attention(&q, &k, &v, &self.masking, comm)?,
        };
        Ok(attn.reshape((self.batch, self.len, c.num_attention_heads * c.head_dim))?)
    }

    fn out_proj(&mut self, layer: usize, attn: &Tensor) -> Result<Tensor> {
        self.project(layer, "self_attn.o_proj.weight", attn)
    }

    fn gate_up(&mut self, layer: usize, x: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.project(layer, "mlp.gate_proj.weight", x)?,
            self.project(layer, "mlp.up_proj.weight", x)?,
        ))
    }

    fn swiglu(&mut self, gate: Tensor, up: Tensor) -> Result<Tensor> {
        Ok((gate.silu()? * up)?)
    }

    fn down(&mut self, layer: usize, act: &Tensor) -> Result<Tensor> {
        self.project(layer, "mlp.down_proj.weight", act)
    }

    fn residual(&mut self, x: Tensor, y: Tensor) -> Result<Tensor> {
        Ok((x + y)?)
    }

    fn is_empty(&self, x: &Tensor) -> bool {
        x.elem_count() == 0
    }

    /// The tape keeps every activation for the backward anyway: one block.
    fn per_token_blocks(&mut self, x: Tensor, block: &mut RowBlock<'_, Self>) -> Result<Tensor> {
        block(self, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_init_has_the_requested_spread() {
        let v = normal_vec(&mut lwm_core::rng::XorShift::new(3), 20000, 0.02);
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 1e-3, "{mean}");
        assert!((var.sqrt() - 0.02).abs() < 1e-3, "{}", var.sqrt());
    }
}
