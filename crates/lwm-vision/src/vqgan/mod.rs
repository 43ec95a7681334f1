//! LWM's VQGAN (`lwm/vqgan.py`): encoder, nearest-code quantizer, decoder, and the
//! original's image preprocessing.
//!
//! The architecture is read off the parameter tree (levels, res blocks, shortcuts), so the
//! real model (256 px, 8192×64 codebook) and smaller test models load alike:
//! * encoder: Conv_0 → per level: ResnetBlocks, Downsample (pad bottom/right by 1, 3×3
//!   stride-2 VALID conv) on all levels but the last → MidBlock (2 ResnetBlocks) → GroupNorm →
//!   SiLU → Conv_1 → quant_conv (1×1).
//! * ResnetBlock: GN → SiLU → Conv3×3 → GN → SiLU → Conv3×3, plus a 1×1 `Conv_2` shortcut when
//!   the channel count changes.
//! * quantizer: `argmin_n ‖z‖² + ‖e_n‖² − 2 z·e_n`.
//! * decoder: codebook rows → post_quant_conv → Conv_0 → MidBlock → UpsamplingBlock_0.. (deepest
//!   level first; nearest ×2 then a 3×3 conv) → GN → SiLU → Conv_1 → clip to [−1, 1].
//!
//! GroupNorm: 32 groups, eps 1e-6, statistics over (H, W, C/32). Tensors are NCHW on the CPU;
//! convolutions go through candle's conv2d (im2col + GEMM).

pub mod pickle;
pub mod preprocess;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use pickle::NdArray;
use std::collections::BTreeMap;
use std::path::Path;

const GROUPS: usize = 32;
const GN_EPS: f64 = 1e-6;

struct Conv {
    /// (out, in, kh, kw)
    weight: Tensor,
    bias: Tensor,
}

struct GroupNorm {
    scale: Tensor,
    bias: Tensor,
}

struct ResnetBlock {
    norm0: GroupNorm,
    conv0: Conv,
    norm1: GroupNorm,
    conv1: Conv,
    shortcut: Option<Conv>,
}

struct Level {
    blocks: Vec<ResnetBlock>,
    /// Downsample (encoder) or Upsample (decoder) conv.
    resample: Option<Conv>,
}

pub struct Vqgan {
    enc_conv_in: Conv,
    enc_levels: Vec<Level>,
    enc_mid: Vec<ResnetBlock>,
    enc_norm_out: GroupNorm,
    enc_conv_out: Conv,
    quant_conv: Conv,
    /// (n_codes, dim)
    codebook: Tensor,
    codebook_sq: Vec<f32>,
    post_quant_conv: Conv,
    dec_conv_in: Conv,
    dec_mid: Vec<ResnetBlock>,
    dec_levels: Vec<Level>,
    dec_norm_out: GroupNorm,
    dec_conv_out: Conv,
    /// Total spatial downsampling (16 for LWM's).
    pub factor: usize,
}

struct Params(BTreeMap<String, NdArray>);

impl Params {
    fn has(&self, prefix: &str) -> bool {
        self.0.keys().any(|k| k.starts_with(prefix))
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        let a = self
            .0
            .get(name)
            .with_context(|| format!("VQGAN weights have no '{name}'"))?;
        Ok(Tensor::from_slice(
            &a.data,
            a.shape.as_slice(),
            &Device::Cpu,
        )?)
    }

    fn conv(&self, p: &str) -> Result<Conv> {
        let k = self.tensor(&format!("{p}/kernel"))?;
        if k.rank() != 4 {
            bail!(
                "VQGAN '{p}/kernel' has shape {:?}, expected (kh, kw, in, out)",
                k.dims()
            );
        }
        let bias = self.tensor(&format!("{p}/bias"))?;
        if bias.dims() != [k.dims()[3]] {
            bail!("VQGAN '{p}/bias' has shape {:?}", bias.dims());
        }
        Ok(Conv {
            // flax (kh, kw, in, out) -> (out, in, kh, kw)
            weight: k.permute((3, 2, 0, 1))?.contiguous()?,
            bias: bias.reshape((1, (), 1, 1))?,
        })
    }

    fn norm(&self, p: &str) -> Result<GroupNorm> {
        let scale = self.tensor(&format!("{p}/scale"))?;
        let c = scale.dims()[0];
        if !c.is_multiple_of(GROUPS) {
            bail!("VQGAN '{p}' has {c} channels, not a multiple of {GROUPS} groups");
        }
        Ok(GroupNorm {
            scale: scale.reshape((1, c, 1, 1))?,
            bias: self.tensor(&format!("{p}/bias"))?.reshape((1, c, 1, 1))?,
        })
    }

    fn resnet(&self, p: &str) -> Result<ResnetBlock> {
        Ok(ResnetBlock {
            norm0: self.norm(&format!("{p}/GroupNorm_0"))?,
            conv0: self.conv(&format!("{p}/Conv_0"))?,
            norm1: self.norm(&format!("{p}/GroupNorm_1"))?,
            conv1: self.conv(&format!("{p}/Conv_1"))?,
            shortcut: if self.has(&format!("{p}/Conv_2/")) {
                Some(self.conv(&format!("{p}/Conv_2"))?)
            } else {
                None
            },
        })
    }

    fn blocks(&self, p: &str) -> Result<Vec<ResnetBlock>> {
        let mut v = Vec::new();
        while self.has(&format!("{p}/ResnetBlock_{}/", v.len())) {
            v.push(self.resnet(&format!("{p}/ResnetBlock_{}", v.len()))?);
        }
        if v.is_empty() {
            bail!("VQGAN weights have no ResnetBlock under '{p}'");
        }
        Ok(v)
    }
}

/// SAME-padded stride-1 conv (kernel 1 or 3).
fn conv_same(x: &Tensor, c: &Conv) -> Result<Tensor> {
    let k = c.weight.dims()[2];
    Ok(x.conv2d(&c.weight, k / 2, 1, 1, 1)?
        .broadcast_add(&c.bias)?)
}

fn silu(x: &Tensor) -> Result<Tensor> {
    Ok(x.silu()?)
}

/// GroupNorm over (C/G, H, W) per group, biased variance, then per-channel scale and bias.
fn group_norm(x: &Tensor, g: &GroupNorm) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let xg = x.reshape((b, GROUPS, (c / GROUPS) * h * w))?;
    let mean = xg.mean_keepdim(D::Minus1)?;
    let centered = xg.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + GN_EPS)?.sqrt()?)?;
    Ok(normed
        .reshape((b, c, h, w))?
        .broadcast_mul(&g.scale)?
        .broadcast_add(&g.bias)?)
}

fn resnet(x: &Tensor, r: &ResnetBlock) -> Result<Tensor> {
    let h = conv_same(&silu(&group_norm(x, &r.norm0)?)?, &r.conv0)?;
    let h = conv_same(&silu(&group_norm(&h, &r.norm1)?)?, &r.conv1)?;
    let skip = match &r.shortcut {
        Some(s) => conv_same(x, s)?,
        None => x.clone(),
    };
    Ok((skip + h)?)
}

impl Vqgan {
    /// Load the original's weights file (a pickle of numpy float32 arrays).
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read VQGAN weights {}", path.display()))?;
        let arrays = pickle::load_arrays(&bytes)
            .with_context(|| format!("{}: not a VQGAN weights pickle", path.display()))?;
        drop(bytes);
        Self::from_arrays(arrays).with_context(|| format!("{}", path.display()))
    }

    pub fn from_arrays(arrays: BTreeMap<String, NdArray>) -> Result<Self> {
        let p = Params(arrays);
        let mut enc_levels = Vec::new();
        while p.has(&format!("encoder/DownsamplingBlock_{}/", enc_levels.len())) {
            let pre = format!("encoder/DownsamplingBlock_{}", enc_levels.len());
            enc_levels.push(Level {
                blocks: p.blocks(&pre)?,
                resample: if p.has(&format!("{pre}/Downsample_0/")) {
                    Some(p.conv(&format!("{pre}/Downsample_0/Conv_0"))?)
                } else {
                    None
                },
            });
        }
        let mut dec_levels = Vec::new();
        while p.has(&format!("decoder/UpsamplingBlock_{}/", dec_levels.len())) {
            let pre = format!("decoder/UpsamplingBlock_{}", dec_levels.len());
            dec_levels.push(Level {
                blocks: p.blocks(&pre)?,
                resample: if p.has(&format!("{pre}/Upsample_0/")) {
                    Some(p.conv(&format!("{pre}/Upsample_0/Conv_0"))?)
                } else {
                    None
                },
            });
        }
        if enc_levels.is_empty() || dec_levels.is_empty() {
            bail!("VQGAN weights have no encoder/decoder levels");
        }
        let codebook = p.tensor("quantize/embeddings")?;
        let codebook_sq = codebook.sqr()?.sum(1)?.to_vec1()?;
        let factor = 1 << enc_levels.iter().filter(|l| l.resample.is_some()).count();
        Ok(Self {
            enc_conv_in: p.conv("encoder/Conv_0")?,
            enc_mid: p.blocks("encoder/MidBlock_0")?,
            enc_norm_out: p.norm("encoder/GroupNorm_0")?,
            enc_conv_out: p.conv("encoder/Conv_1")?,
            quant_conv: p.conv("quant_conv")?,
            post_quant_conv: p.conv("post_quant_conv")?,
            dec_conv_in: p.conv("decoder/Conv_0")?,
            dec_mid: p.blocks("decoder/MidBlock_0")?,
            dec_norm_out: p.norm("decoder/GroupNorm_0")?,
            dec_conv_out: p.conv("decoder/Conv_1")?,
            enc_levels,
            dec_levels,
            codebook,
            codebook_sq,
            factor,
        })
    }

    pub fn num_codes(&self) -> usize {
        self.codebook.dims()[0]
    }

    /// Pre-quantization latents `quant_conv(encoder(x))` of NHWC frames in [-1, 1]:
    /// `frames` is (n, h, w, 3) row-major; returns (n, h/f, w/f, dim) row-major.
    pub fn encode_latents(&self, frames: &[f32], n: usize, h: usize, w: usize) -> Result<Tensor> {
        if frames.len() != n * h * w * 3 {
            bail!(
                "encode: {} values is not {n} frames of {h}×{w}×3",
                frames.len()
            );
        }
        if !h.is_multiple_of(self.factor) || !w.is_multiple_of(self.factor) {
            bail!(
                "encode: {h}×{w} is not a multiple of the VQGAN factor {}",
                self.factor
            );
        }
        let x = Tensor::from_slice(frames, (n, h, w, 3), &Device::Cpu)?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        let mut x = conv_same(&x, &self.enc_conv_in)?;
        for level in &self.enc_levels {
            for b in &level.blocks {
                x = resnet(&x, b)?;
            }
            if let Some(c) = &level.resample {
                // pad bottom/right by one, then a VALID 3×3 stride-2 conv
                let padded = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
                x = padded
                    .conv2d(&c.weight, 0, 2, 1, 1)?
                    .broadcast_add(&c.bias)?;
            }
        }
        for b in &self.enc_mid {
            x = resnet(&x, b)?;
        }
        x = conv_same(
            &silu(&group_norm(&x, &self.enc_norm_out)?)?,
            &self.enc_conv_out,
        )?;
        x = conv_same(&x, &self.quant_conv)?;
        Ok(x.permute((0, 2, 3, 1))?.contiguous()?)
    }

    /// Nearest codebook entry of each latent vector (rows of `z`, (m, dim)), by
    /// `‖z‖² + ‖e‖² − 2 z·e` as the original computes it.
    pub fn quantize(&self, z: &Tensor) -> Result<Vec<u32>> {
        let dim = self.codebook.dims()[1];
        let z = z.reshape(((), dim))?;
        let z_sq: Vec<f32> = z.sqr()?.sum(1)?.to_vec1()?;
        let dots: Vec<Vec<f32>> = z.matmul(&self.codebook.t()?)?.to_vec2()?;
        Ok(dots
            .iter()
            .zip(&z_sq)
            .map(|(row, zs)| {
                let mut best = (f32::INFINITY, 0u32);
                for (i, (d, es)) in row.iter().zip(&self.codebook_sq).enumerate() {
                    let dist = zs + es - 2.0 * d;
                    // strict < keeps the first minimum, as argmin does
                    if dist < best.0 {
                        best = (dist, i as u32);
                    }
                }
                best.1
            })
            .collect())
    }

    /// Codes of NHWC frames: (n, h/f, w/f) row-major.
    pub fn encode(&self, frames: &[f32], n: usize, h: usize, w: usize) -> Result<Vec<u32>> {
        self.quantize(&self.encode_latents(frames, n, h, w)?)
    }

    /// Decode `n` grids of `gh × gw` codes to NHWC frames in [-1, 1].
    pub fn decode(&self, codes: &[u32], n: usize, gh: usize, gw: usize) -> Result<Vec<f32>> {
        if codes.len() != n * gh * gw {
            bail!(
                "decode: {} codes is not {n} grids of {gh}×{gw}",
                codes.len()
            );
        }
        if let Some(bad) = codes.iter().find(|&&c| c as usize >= self.num_codes()) {
            bail!(
                "decode: code {bad} is outside the codebook of {}",
                self.num_codes()
            );
        }
        let ids = Tensor::from_slice(codes, codes.len(), &Device::Cpu)?;
        let dim = self.codebook.dims()[1];
        let z = self
            .codebook
            .embedding(&ids)?
            .reshape((n, gh, gw, dim))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        let mut x = conv_same(&z, &self.post_quant_conv)?;
        x = conv_same(&x, &self.dec_conv_in)?;
        for b in &self.dec_mid {
            x = resnet(&x, b)?;
        }
        for level in &self.dec_levels {
            for b in &level.blocks {
                x = resnet(&x, b)?;
            }
            if let Some(c) = &level.resample {
                let (_, _, h, w) = x.dims4()?;
                x = conv_same(&x.upsample_nearest2d(2 * h, 2 * w)?, c)?;
            }
        }
        x = conv_same(
            &silu(&group_norm(&x, &self.dec_norm_out)?)?,
            &self.dec_conv_out,
        )?;
        let x = x.clamp(-1f32, 1f32)?.permute((0, 2, 3, 1))?.contiguous()?;
        Ok(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
    }
}

/// `uint8((x + 1) · 127.5)` with truncation, as the original writes images.
pub fn to_u8(x: f32) -> u8 {
    ((x + 1.0) * 127.5).clamp(0.0, 255.0) as u8
}
