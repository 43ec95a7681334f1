//! Weight sources. Every loader maps its file's tensor names to the canonical Hugging Face
//! LLaMA names (`model.layers.{i}.self_attn.q_proj.weight`, ...) and hands out tensors with
//! PyTorch's `[out, in]` orientation, quantized (GGUF, its F16/BF16 included) or dense in
//! the file's float type (f32, f16 or bf16; `Weight::to_dense` widens to f32).

pub mod digest;
pub mod gguf;
pub mod hf;
pub mod jax;
pub mod msgpack;

use anyhow::Result;
use candle_core::quantized::QTensor;
use candle_core::Tensor;
use std::sync::Arc;

/// One weight tensor as stored: kept quantized for GGUF, dense (f32, f16 or bf16) otherwise.
#[derive(Debug, Clone)]
pub enum Weight {
    Quant(Arc<QTensor>),
    Dense(Tensor),
}

impl Weight {
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Weight::Quant(q) => q.shape().dims().to_vec(),
            Weight::Dense(t) => t.dims().to_vec(),
        }
    }

    /// Dense f32 copy (dequantizing if needed).
    pub fn to_dense(&self) -> Result<Tensor> {
        Ok(match self {
            Weight::Quant(q) => q.dequantize(&candle_core::Device::Cpu)?,
            Weight::Dense(t) => t.to_dtype(candle_core::DType::F32)?,
        })
    }

    /// Storage type name for `lwm info` (e.g. "Q4_1", "F32", "BF16").
    pub fn type_name(&self) -> String {
        match self {
            Weight::Quant(q) => format!("{:?}", q.dtype()),
            Weight::Dense(t) => format!("{:?}", t.dtype()).to_uppercase(),
        }
    }
}

/// A set of named weights in canonical Hugging Face LLaMA naming.
pub trait WeightSource: Send + Sync {
    /// Where the weights come from (a file or directory), for error messages.
    fn origin(&self) -> String;
    /// Canonical names of every tensor present.
    fn names(&self) -> Vec<String>;
    /// Load one tensor; a missing name is an error naming the tensor and `origin()`.
    fn load(&self, name: &str) -> Result<Weight>;
    fn contains(&self, name: &str) -> bool {
        self.names().iter().any(|n| n == name)
    }
}

/// Canonical per-layer tensor names.
pub fn layer_name(layer: usize, suffix: &str) -> String {
    format!("model.layers.{layer}.{suffix}")
}
