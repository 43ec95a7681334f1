//! Compute precision of training (`[train] dtype`): `f32`, or `bf16` in the usual
//! mixed-precision sense.
//!
//! Under `bf16` the master weights, their gradients and the AdamW moments stay f32 (so
//! checkpoints are f32 and resume exactly); every matrix product of the forward and of the
//! backward takes bf16 operands (the f32 weight and activation rounded to nearest even)
//! and gives a bf16 result, accumulated in f32 inside the product as bf16 hardware does:
//!
//! ```text
//!   y = f32( bf16( bf16(x) · bf16(W)ᵀ ) )        dx, dW likewise from bf16(dy)
//! ```
//!
//! Everything between the products stays f32: RMSNorm, RoPE, SiLU, the residual stream,
//! the attention op (its kernels are f32; q, k, v arrive as widened bf16 values) and the
//! softmax and loss. The original keeps norms, softmax logits (`float32_logits`) and the
//! loss in f32 too; it also keeps the residual stream in bf16, which we do not.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDType {
    #[default]
    #[serde(alias = "fp32", alias = "float32")]
    F32,
    #[serde(alias = "bfloat16")]
    Bf16,
}

impl ComputeDType {
    pub fn candle(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }

    /// y = x Wᵀ for x (rows, in) and W (out, in), with operands and result in this
    /// precision; the result is returned as f32. Autograd casts the gradient the same way
    /// (the backward of a cast is the cast back), so the backward products run in it too.
    pub fn matmul_t(self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::F32 => x.matmul(&w.t()?)?,
            Self::Bf16 => x
                .to_dtype(DType::BF16)?
                .matmul(&w.to_dtype(DType::BF16)?.t()?)?
                .to_dtype(DType::F32)?,
        })
    }
}

impl std::str::FromStr for ComputeDType {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => bail!("unknown compute dtype '{s}' (expected f32 or bf16)"),
        }
    }
}

impl std::fmt::Display for ComputeDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
