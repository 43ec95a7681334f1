//! llama.cpp's CPU numerics for the non-matmul parts of a LLaMA forward pass, as its x86
//! AVX2+FMA+F16C build computes them (ggml/src/ggml-cpu: ops.cpp, vec.h, vec.cpp,
//! simd-mappings.h). Used to reproduce llama.cpp's greedy output exactly; each function
//! names the ggml routine it follows.
//!
//! * `rms_norm` — `ggml_compute_forward_rms_norm_f32`: Σx² in double (each x² rounded to
//!   f32 first), `mean = (float)(sum/n)`, `scale = 1/sqrtf(mean + eps)`, `y = x·scale·w`.
//! * `RopeCache` / `rope_norm` — `ggml_rope_cache_init` + `rotate_pairs` (GGML_ROPE_TYPE_NORMAL,
//!   adjacent pairs): `theta_scale = powf(base, -2/n_dims)`, `theta = (float)pos`, per pair
//!   `cosf/sinf(theta)` then `theta *= theta_scale`, all in f32.
//! * `swiglu` — `ggml_vec_swiglu_f32`: `silu(g)·u` with ggml's AVX2 `ggml_v_silu`, which uses
//!   the vector exp approximation `ggml_v_expf` (not libm's `expf`), re-derived here per lane.
//! * `flash_attn_f16` — `ggml_compute_forward_flash_attn_ext_f16_one_chunk` with an f16 KV
//!   cache: Q rounded to f16, `s = dot_f16(k, q)·scale` (f16×f16 products, f32 FMAs in
//!   4×8 lanes, ggml's reduction), online softmax with `expf`, and the V accumulator kept
//!   *in f16* (`ggml_vec_scale_f16` / `ggml_vec_mad_f16`), finally `VKQ · (1/S)`. llama.cpp
//!   takes this path for fewer than 64 query rows (its tiled f32 path starts at 64) and,
//!   for one query row, for fewer than 512 KV cells (its split-KV path starts at 512).
//!
//! Where the C source leaves `a*b + c` to the compiler, GCC with `-march=native` on an FMA
//! machine contracts it to one FMA (GNU C/C++ default `-ffp-contract=fast`); the options
//! below choose either form so experiments can tell which the reference used.

use half::f16;
use rayon::prelude::*;

/// `ggml_compute_forward_rms_norm_f32` followed by the weight multiply (per row of `w.len()`).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut out = vec![0.0f32; x.len()];
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mut sum = 0.0f64;
        for &v in row {
            sum += (v * v) as f64;
        }
        let mean = (sum / d as f64) as f32;
        let scale = 1.0f32 / (mean + eps).sqrt();
        for ((o, &v), &g) in o.iter_mut().zip(row).zip(w) {
            *o = v * scale * g;
        }
    }
    out
}

/// How `x0·cos − x1·sin` / `x0·sin + x1·cos` are rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeRounding {
    /// Every product rounded, then the add/sub.
    Separate,
    /// GCC's contraction: the first product of each expression fused with the add/sub:
    /// `fma(x0, cos, −(x1·sin))`, `fma(x0, sin, x1·cos)`.
    FirstProductFused,
}

/// cos/sin for one position: `n_dims / 2` pairs, as `ggml_rope_cache_init` builds them
/// (freq_scale 1, no YaRN extrapolation, attn_factor 1).
pub fn rope_cache(pos: i64, n_dims: usize, freq_base: f32) -> Vec<(f32, f32)> {
    let theta_scale = freq_base.powf(-2.0f32 / n_dims as f32);
    let mut theta = pos as f32;
    let mut out = Vec::with_capacity(n_dims / 2);
    for _ in 0..n_dims / 2 {
        out.push((theta.cos(), theta.sin()));
        theta *= theta_scale;
    }
    out
}

/// RoPE "normal" mode (adjacent pairs) on `n` rows of `n_heads` heads of `head_dim`
/// (row stride `n_heads·head_dim`), positions `pos0..pos0+n`.
pub fn rope_norm(
    x: &mut [f32],
    n: usize,
    pos0: usize,
    n_heads: usize,
    head_dim: usize,
    freq_base: f32,
    rounding: RopeRounding,
) {
    let stride = n_heads * head_dim;
    for r in 0..n {
        let cache = rope_cache((pos0 + r) as i64, head_dim, freq_base);
        for h in 0..n_heads {
            let head = &mut x[r * stride + h * head_dim..r * stride + (h + 1) * head_dim];
            for (i, &(c, s)) in cache.iter().enumerate() {
                let (x0, x1) = (head[2 * i], head[2 * i + 1]);
                let (a, b) = match rounding {
                    RopeRounding::Separate => (x0 * c - x1 * s, x0 * s + x1 * c),
                    RopeRounding::FirstProductFused => {
                        (x0.mul_add(c, -(x1 * s)), x0.mul_add(s, x1 * c))
                    }
                };
                head[2 * i] = a;
                head[2 * i + 1] = b;
            }
        }
    }
}

/// ggml's AVX2 `ggml_v_expf` for one lane (ARM optimized-routines style exp: range
/// reduction by `n = round(x·log2 e)`, a degree-5 polynomial, special scaling when
/// |n| > 126). Each `_mm256_fmadd_ps` / `_mm256_fnmadd_ps` is one `mul_add` here.
pub fn v_expf(x: f32) -> f32 {
    let c = |bits: u32| f32::from_bits(bits);
    let r = c(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(c(0x3fb8_aa3b), r); // x·log2(e) + 0x1.8p23
    let n = z - r;
    let b = (-n).mul_add(c(0x35bf_be8e), (-n).mul_add(c(0x3f31_7200), x)); // x − n·ln2 (hi, lo)
    let e = z.to_bits() << 23;
    let k = f32::from_bits(e.wrapping_add(1.0f32.to_bits()));
    let big = n.abs() > 126.0;
    let u = b * b;
    let j = c(0x3c07_2010)
        .mul_add(b, c(0x3d2b_9f17))
        .mul_add(u, c(0x3e2a_af33).mul_add(b, c(0x3eff_fedb)))
        .mul_add(u, c(0x3f7f_fff6) * b);
    if !big {
        return j.mul_add(k, k);
    }
    let g: u32 = if n <= 0.0 { 0x8200_0000 } else { 0 };
    let s1 = f32::from_bits(g.wrapping_add(0x7f00_0000));
    let s2 = f32::from_bits(e.wrapping_sub(g));
    if n.abs() > 192.0 {
        s1 * s1
    } else {
        s2.mul_add(j, s2) * s1
    }
}

/// ggml's AVX2 `ggml_v_silu`: `x / (1 + v_expf(0 − x))`.
pub fn v_silu(x: f32) -> f32 {
    x / (1.0 + v_expf(0.0 - x))
}

/// `ggml_vec_swiglu_f32`: `silu(g_i)·u_i`. (The AVX2 loop covers multiples of 8; a tail
/// would use libm `expf`, as ggml's scalar leftover loop does.)
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let n8 = gate.len() / 8 * 8;
    gate.iter()
        .zip(up)
        .enumerate()
        .map(|(i, (&g, &u))| {
            if i < n8 {
                v_silu(g) * u
            } else {
                g / (1.0 + (-g).exp()) * u
            }
        })
        .collect()
}

/// `ggml_vec_dot_f16` on AVX2: f16 inputs widened to f32, 4 accumulators of 8 lanes fed by
/// FMAs over 32-element steps, reduced as GGML_F32x8_REDUCE, leftovers in double.
pub fn dot_f16(x: &[f16], y: &[f16]) -> f32 {
    let n = x.len();
    let np = n & !31;
    let mut sum = [[0.0f32; 8]; 4];
    for i in (0..np).step_by(32) {
        for (j, s) in sum.iter_mut().enumerate() {
            for (l, a) in s.iter_mut().enumerate() {
                let t = i + 8 * j + l;
                *a = x[t].to_f32().mul_add(y[t].to_f32(), *a);
            }
        }
    }
    let mut s0 = [0.0f32; 8];
    for l in 0..8 {
        let a = sum[0][l] + sum[2][l];
        let b = sum[1][l] + sum[3][l];
        s0[l] = a + b;
    }
    let t: [f32; 4] = std::array::from_fn(|k| s0[k] + s0[k + 4]);
    let mut sumf = ((t[0] + t[1]) + (t[2] + t[3])) as f64;
    for i in np..n {
        sumf += (x[i].to_f32() * y[i].to_f32()) as f64;
    }
    sumf as f32
}

/// Options of `flash_attn_f16`.
#[derive(Debug, Clone, Copy)]
pub struct FaOptions {
    /// `S = S*ms + vs` contracted to one FMA.
    pub s_fma: bool,
    /// Keep the V accumulator in f16 (llama.cpp with an f16 V cache). `false` accumulates
    /// in f32 (what llama.cpp does for an f32 V cache), for experiments.
    pub f16_accumulator: bool,
    /// Round Q to f16 before the K dot (llama.cpp, f16 K). `false` keeps Q in f32.
    pub f16_query: bool,
}

impl Default for FaOptions {
    fn default() -> Self {
        Self {
            s_fma: true,
            f16_accumulator: true,
            f16_query: true,
        }
    }
}

/// Keys/values of one layer in llama.cpp's f16 cache: per KV head, `len × d` halves.
#[derive(Debug, Clone, Default)]
pub struct F16KvLayer {
    pub k: Vec<Vec<f16>>,
    pub v: Vec<Vec<f16>>,
}

impl F16KvLayer {
    pub fn new(n_kv_heads: usize) -> Self {
        Self {
            k: vec![Vec::new(); n_kv_heads],
            v: vec![Vec::new(); n_kv_heads],
        }
    }

    /// Append n rows of K and V (n × n_kv·d, f32), rounding to f16 (ggml's f32→f16 copy).
    pub fn append(&mut self, k: &[f32], v: &[f32], n: usize, d: usize) {
        let n_kv = self.k.len();
        for h in 0..n_kv {
            for r in 0..n {
                let src = r * n_kv * d + h * d;
                self.k[h].extend(k[src..src + d].iter().map(|&x| f16::from_f32(x)));
                self.v[h].extend(v[src..src + d].iter().map(|&x| f16::from_f32(x)));
            }
        }
    }

    pub fn len(&self, d: usize) -> usize {
        self.k.first().map_or(0, |k| k.len() / d)
    }

    pub fn is_empty(&self) -> bool {
        self.k.first().is_none_or(|k| k.is_empty())
    }
}

/// Causal attention of `nq` query rows at positions `q_pos0..` (q: nq × n_heads·d) against
/// the cache (positions 0..len), llama.cpp's one-chunk flash attention with f16 K/V.
/// Query head h reads KV head `h / (n_heads / n_kv)`.
pub fn flash_attn_f16(
    q: &[f32],
    nq: usize,
    q_pos0: usize,
    n_heads: usize,
    d: usize,
    kv: &F16KvLayer,
    scale: f32,
    opts: FaOptions,
) -> Vec<f32> {
    let n_kv = kv.k.len();
    let group = n_heads / n_kv;
    let len = kv.len(d);
    let width = n_heads * d;
    let mut out = vec![0.0f32; nq * width];
    out.par_chunks_mut(d).enumerate().for_each(|(idx, o)| {
        let (i, h) = (idx / n_heads, idx % n_heads);
        let (kh, vh) = (&kv.k[h / group], &kv.v[h / group]);
        let qrow = &q[i * width + h * d..i * width + (h + 1) * d];
        let q16: Vec<f16> = qrow.iter().map(|&x| f16::from_f32(x)).collect();
        let q32: Vec<f32> = qrow.to_vec();
        let visible = (q_pos0 + i + 1).min(len);
        let mut m = f32::NEG_INFINITY;
        let mut s_sum = 0.0f32;
        let mut acc16 = vec![f16::ZERO; d];
        let mut acc32 = vec![0.0f32; d];
        for ic in 0..visible {
            let krow = &kh[ic * d..(ic + 1) * d];
            let s = if opts.f16_query {
                dot_f16(krow, &q16)
            } else {
                let kf: Vec<f16> = krow.to_vec();
                dot_f16_f32(&kf, &q32)
            } * scale;
            let (ms, vs);
            if s > m {
                let m_old = m;
                m = s;
                ms = (m_old - m).exp();
                vs = 1.0f32;
                if opts.f16_accumulator {
                    for a in acc16.iter_mut() {
                        *a = f16::from_f32(a.to_f32() * ms);
                    }
                } else {
                    for a in acc32.iter_mut() {
                        *a *= ms;
                    }
                }
            } else {
                ms = 1.0f32;
                vs = (s - m).exp();
            }
            let vrow = &vh[ic * d..(ic + 1) * d];
            if opts.f16_accumulator {
                for (a, &v) in acc16.iter_mut().zip(vrow) {
                    *a = f16::from_f32(v.to_f32().mul_add(vs, a.to_f32()));
                }
            } else {
                for (a, &v) in acc32.iter_mut().zip(vrow) {
                    *a = v.to_f32().mul_add(vs, *a);
                }
            }
            s_sum = if opts.s_fma {
                s_sum.mul_add(ms, vs)
            } else {
                s_sum * ms + vs
            };
        }
        let s_inv = if s_sum == 0.0 { 0.0 } else { 1.0 / s_sum };
        for (k, x) in o.iter_mut().enumerate() {
            let a = if opts.f16_accumulator {
                acc16[k].to_f32()
            } else {
                acc32[k]
            };
            *x = a * s_inv;
        }
    });
    out
}

/// K (f16) · Q (f32) in the same lane order as `dot_f16` (experiments only).
fn dot_f16_f32(x: &[f16], y: &[f32]) -> f32 {
    let y16_exact: Vec<f32> = y.to_vec();
    let n = x.len();
    let np = n & !31;
    let mut sum = [[0.0f32; 8]; 4];
    for i in (0..np).step_by(32) {
        for (j, s) in sum.iter_mut().enumerate() {
            for (l, a) in s.iter_mut().enumerate() {
                let t = i + 8 * j + l;
                *a = x[t].to_f32().mul_add(y16_exact[t], *a);
            }
        }
    }
    let mut s0 = [0.0f32; 8];
    for l in 0..8 {
        s0[l] = (sum[0][l] + sum[2][l]) + (sum[1][l] + sum[3][l]);
    }
    let t: [f32; 4] = std::array::from_fn(|k| s0[k] + s0[k + 4]);
    let mut sumf = ((t[0] + t[1]) + (t[2] + t[3])) as f64;
    for i in np..n {
        sumf += (x[i].to_f32() * y[i]) as f64;
    }
    sumf as f32
}
