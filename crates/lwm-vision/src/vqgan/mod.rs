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
//! GroupNorm: 32 groups, eps 1e-6, statistics over (H, W, C/32). Activations are NHWC, as in
//! the original; convolutions are our own implicit GEMM (`conv`), threads over output pixels.

pub mod conv;
pub mod pickle;
pub mod preprocess;

use anyhow::{bail, Context, Result};
use conv::{group_norm_silu, Act, Conv2d, GroupNorm};
use pickle::NdArray;
use std::collections::BTreeMap;
use std::path::Path;

const GROUPS: usize = 32;
const GN_EPS: f64 = 1e-6;

struct ResnetBlock {
    norm0: GroupNorm,
    conv0: Conv2d,
    norm1: GroupNorm,
    conv1: Conv2d,
    shortcut: Option<Conv2d>,
}

struct Level {
    blocks: Vec<ResnetBlock>,
    /// Downsample (encoder) or Upsample (decoder) conv.
    resample: Option<Conv2d>,
}

pub struct Vqgan {
    enc_conv_in: Conv2d,
    enc_levels: Vec<Level>,
    enc_mid: Vec<ResnetBlock>,
    enc_norm_out: GroupNorm,
    enc_conv_out: Conv2d,
    quant_conv: Conv2d,
    /// (n_codes, dim) row-major.
    codebook: Vec<f32>,
    n_codes: usize,
    dim: usize,
    /// `z · eᵀ` for every code: a 1×1 convolution whose kernel is the codebook transposed.
    codebook_dots: Conv2d,
    codebook_sq: Vec<f32>,
    post_quant_conv: Conv2d,
    dec_conv_in: Conv2d,
    dec_mid: Vec<ResnetBlock>,
    dec_levels: Vec<Level>,
    dec_norm_out: GroupNorm,
    dec_conv_out: Conv2d,
    /// Total spatial downsampling (16 for LWM's).
    pub factor: usize,
}

struct Params(BTreeMap<String, NdArray>);

impl Params {
    fn has(&self, prefix: &str) -> bool {
        self.0.keys().any(|k| k.starts_with(prefix))
    }

    fn array(&self, name: &str) -> Result<&NdArray> {
        let a = self
            .0
            .get(name)
            .with_context(|| format!("VQGAN weights have no '{name}'"))?;
        if a.shape.iter().product::<usize>() != a.data.len() {
            bail!(
                "VQGAN '{name}' has shape {:?} but {} values",
                a.shape,
                a.data.len()
            );
        }
        Ok(a)
    }

    fn conv(&self, p: &str) -> Result<Conv2d> {
        let k = self.array(&format!("{p}/kernel"))?;
        let [kh, kw, cin, cout] = k.shape[..] else {
            bail!(
                "VQGAN '{p}/kernel' has shape {:?}, expected (kh, kw, in, out)",
                k.shape
            );
        };
        if kh != kw || kh % 2 == 0 || cin == 0 || cout == 0 {
            bail!(
                "VQGAN '{p}/kernel' has shape {:?}: not an odd square kernel",
                k.shape
            );
        }
        let bias = self.array(&format!("{p}/bias"))?;
        if bias.shape != [cout] {
            bail!("VQGAN '{p}/bias' has shape {:?}", bias.shape);
        }
        Ok(Conv2d::new(kh, cin, cout, &k.data, &bias.data))
    }

    fn norm(&self, p: &str) -> Result<GroupNorm> {
        let scale = self.array(&format!("{p}/scale"))?;
        let c = scale.data.len();
        if c == 0 || !c.is_multiple_of(GROUPS) {
            bail!("VQGAN '{p}' has {c} channels, not a multiple of {GROUPS} groups");
        }
        let bias = self.array(&format!("{p}/bias"))?;
        if bias.data.len() != c {
            bail!("VQGAN '{p}/bias' has shape {:?}", bias.shape);
        }
        Ok(GroupNorm {
            scale: scale.data.clone(),
            bias: bias.data.clone(),
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

/// Checks a layer's input channels (a wrong weights file fails here, not in a kernel).
fn expect_channels(x: &Act, want: usize, what: &str) -> Result<()> {
    if x.c != want {
        bail!(
            "VQGAN {what}: input has {} channels, the weights expect {want}",
            x.c
        );
    }
    Ok(())
}

fn conv_same(x: &Act, c: &Conv2d, what: &str) -> Result<Act> {
    expect_channels(x, c.cin, what)?;
    Ok(c.same(x))
}

fn gn_silu(x: &Act, g: &GroupNorm, what: &str) -> Result<Act> {
    expect_channels(x, g.scale.len(), what)?;
    Ok(group_norm_silu(x, g, GROUPS, GN_EPS))
}

fn resnet(x: &Act, r: &ResnetBlock) -> Result<Act> {
    let h = conv_same(
        &gn_silu(x, &r.norm0, "ResnetBlock")?,
        &r.conv0,
        "ResnetBlock",
    )?;
    let mut h = conv_same(
        &gn_silu(&h, &r.norm1, "ResnetBlock")?,
        &r.conv1,
        "ResnetBlock",
    )?;
    match &r.shortcut {
        Some(s) => h.add_assign(&conv_same(x, s, "ResnetBlock shortcut")?),
        None => {
            expect_channels(x, h.c, "ResnetBlock residual")?;
            h.add_assign(x)
        }
    }
    Ok(h)
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
        let cb = p.array("quantize/embeddings")?;
        let [n_codes, dim] = cb.shape[..] else {
            bail!(
                "VQGAN 'quantize/embeddings' has shape {:?}, expected (codes, dim)",
                cb.shape
            );
        };
        let codebook = cb.data.clone();
        let codebook_sq = codebook
            .chunks_exact(dim)
            .map(|e| e.iter().map(|v| v * v).sum())
            .collect();
        let mut transposed = vec![0f32; n_codes * dim];
        for (o, e) in codebook.chunks_exact(dim).enumerate() {
            for (i, v) in e.iter().enumerate() {
                transposed[i * n_codes + o] = *v;
            }
        }
        let codebook_dots = Conv2d::new(1, dim, n_codes, &transposed, &vec![0f32; n_codes]);
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
            n_codes,
            dim,
            codebook_dots,
            codebook_sq,
            factor,
        })
    }

    pub fn num_codes(&self) -> usize {
        self.n_codes
    }

    /// Pre-quantization latents `quant_conv(encoder(x))` of NHWC frames in [-1, 1]:
    /// `frames` is (n, h, w, 3) row-major; returns (n, h/f, w/f, dim).
    pub fn encode_latents(&self, frames: &[f32], n: usize, h: usize, w: usize) -> Result<Act> {
        if frames.len() != n * h * w * 3 {
            bail!(
                "encode: {} values is not {n} frames of {h}×{w}×3",
                frames.len()
            );
        }
        if !h.is_multiple_of(self.factor) || !w.is_multiple_of(self.factor) || h == 0 || w == 0 {
            bail!(
                "encode: {h}×{w} is not a multiple of the VQGAN factor {}",
                self.factor
            );
        }
        let x = Act::new(n, h, w, 3, frames.to_vec());
        let mut x = conv_same(&x, &self.enc_conv_in, "encoder Conv_0")?;
        for level in &self.enc_levels {
            for b in &level.blocks {
                x = resnet(&x, b)?;
            }
            if let Some(c) = &level.resample {
                expect_channels(&x, c.cin, "Downsample")?;
                x = c.down(&x);
            }
        }
        for b in &self.enc_mid {
            x = resnet(&x, b)?;
        }
        x = conv_same(
            &gn_silu(&x, &self.enc_norm_out, "encoder GroupNorm_0")?,
            &self.enc_conv_out,
            "encoder Conv_1",
        )?;
        conv_same(&x, &self.quant_conv, "quant_conv")
    }

    /// Nearest codebook entry of each latent vector (the pixels of `z`), by
    /// `‖z‖² + ‖e‖² − 2 z·e` as the original computes it.
    pub fn quantize(&self, z: &Act) -> Result<Vec<u32>> {
        expect_channels(z, self.dim, "quantize")?;
        let dots = self.codebook_dots.same(z);
        Ok(z.data
            .chunks_exact(self.dim)
            .zip(dots.data.chunks_exact(self.n_codes))
            .map(|(zv, row)| {
                let zs: f32 = zv.iter().map(|v| v * v).sum();
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
        let mut z = Vec::with_capacity(codes.len() * self.dim);
        for &c in codes {
            z.extend_from_slice(&self.codebook[c as usize * self.dim..][..self.dim]);
        }
        let z = Act::new(n, gh, gw, self.dim, z);
        let mut x = conv_same(&z, &self.post_quant_conv, "post_quant_conv")?;
        x = conv_same(&x, &self.dec_conv_in, "decoder Conv_0")?;
        for b in &self.dec_mid {
            x = resnet(&x, b)?;
        }
        for level in &self.dec_levels {
            for b in &level.blocks {
                x = resnet(&x, b)?;
            }
            if let Some(c) = &level.resample {
                x = conv_same(&x.upsample2(), c, "Upsample")?;
            }
        }
        x = conv_same(
            &gn_silu(&x, &self.dec_norm_out, "decoder GroupNorm_0")?,
            &self.dec_conv_out,
            "decoder Conv_1",
        )?;
        let mut pixels = x.take_data();
        for v in &mut pixels {
            *v = v.clamp(-1.0, 1.0);
        }
        Ok(pixels)
    }
}

/// Where a released LWM checkpoint keeps its VQGAN: the file `vqgan` beside the params.
pub fn beside(params: &Path) -> Option<std::path::PathBuf> {
    params.parent().map(|d| d.join("vqgan"))
}

/// `uint8((x + 1) · 127.5)` with truncation, as the original writes images.
pub fn to_u8(x: f32) -> u8 {
    ((x + 1.0) * 127.5).clamp(0.0, 255.0) as u8
}

/// Weights with the shapes of LWM's real VQGAN (the fact sheet's config: 256 px, hidden 128,
/// channel_mult (1, 2, 2, 4, 6), 2 res blocks per encoder level and 3 per decoder level,
/// z 64, 8192 × 64 codebook; 146,244,675 parameters), random values scaled like an
/// initialisation: for speed measurements, where the real file is not at hand.
pub fn lwm_shaped_random_arrays(seed: u64) -> BTreeMap<String, NdArray> {
    let mut rng = lwm_core::rng::XorShift::new(seed);
    let mut p: BTreeMap<String, NdArray> = BTreeMap::new();
    let mut put = |name: String, shape: Vec<usize>, scale: f32| {
        let n = shape.iter().product();
        let data = rng.vec(n, -scale, scale);
        p.insert(name, NdArray { shape, data });
    };
    fn conv(put: &mut dyn FnMut(String, Vec<usize>, f32), n: &str, k: usize, i: usize, o: usize) {
        put(
            format!("{n}/kernel"),
            vec![k, k, i, o],
            (1.0 / (k * k * i) as f32).sqrt(),
        );
        put(format!("{n}/bias"), vec![o], 0.01);
    }
    fn norm(put: &mut dyn FnMut(String, Vec<usize>, f32), n: &str, c: usize) {
        put(format!("{n}/scale"), vec![c], 1.0);
        put(format!("{n}/bias"), vec![c], 0.01);
    }
    fn res(put: &mut dyn FnMut(String, Vec<usize>, f32), n: &str, i: usize, o: usize) {
        norm(put, &format!("{n}/GroupNorm_0"), i);
        conv(put, &format!("{n}/Conv_0"), 3, i, o);
        norm(put, &format!("{n}/GroupNorm_1"), o);
        conv(put, &format!("{n}/Conv_1"), 3, o, o);
        if i != o {
            conv(put, &format!("{n}/Conv_2"), 1, i, o);
        }
    }
    let ch: Vec<usize> = [1, 2, 2, 4, 6].iter().map(|m| 128 * m).collect();
    conv(&mut put, "encoder/Conv_0", 3, 3, 128);
    let mut c = 128;
    for (l, &o) in ch.iter().enumerate() {
        for b in 0..2 {
            let name = format!("encoder/DownsamplingBlock_{l}/ResnetBlock_{b}");
            res(&mut put, &name, c, o);
            c = o;
        }
        if l + 1 < ch.len() {
            let name = format!("encoder/DownsamplingBlock_{l}/Downsample_0/Conv_0");
            conv(&mut put, &name, 3, c, c);
        }
    }
    for b in 0..2 {
        res(
            &mut put,
            &format!("encoder/MidBlock_0/ResnetBlock_{b}"),
            c,
            c,
        );
        res(
            &mut put,
            &format!("decoder/MidBlock_0/ResnetBlock_{b}"),
            c,
            c,
        );
    }
    norm(&mut put, "encoder/GroupNorm_0", c);
    conv(&mut put, "encoder/Conv_1", 3, c, 64);
    conv(&mut put, "quant_conv", 1, 64, 64);
    conv(&mut put, "post_quant_conv", 1, 64, 64);
    put("quantize/embeddings".into(), vec![8192, 64], 0.5);
    conv(&mut put, "decoder/Conv_0", 3, 64, c);
    for (u, l) in (0..ch.len()).rev().enumerate() {
        for b in 0..3 {
            let name = format!("decoder/UpsamplingBlock_{u}/ResnetBlock_{b}");
            res(&mut put, &name, c, ch[l]);
            c = ch[l];
        }
        if l > 0 {
            let name = format!("decoder/UpsamplingBlock_{u}/Upsample_0/Conv_0");
            conv(&mut put, &name, 3, c, c);
        }
    }
    norm(&mut put, "decoder/GroupNorm_0", c);
    conv(&mut put, "decoder/Conv_1", 3, c, 3);
    p
}
