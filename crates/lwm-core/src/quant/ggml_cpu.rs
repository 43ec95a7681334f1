//! llama.cpp's CPU numerics for the non-matmul parts of a LLaMA forward pass
//! (ggml/src/ggml-cpu: ops.cpp, vec.h, vec.cpp, simd-mappings.h), for reproducing its
//! greedy output exactly. Each function names the ggml routine it follows.
//!
//! The reference run (`crates/lwm/tests/fixtures/smollm2-reference.json`) came from an **AVX-512**
//! build of llama.cpp (AVX-512F, no AVX512-FP16): only with AVX-512's lane grouping in the
//! f16 dot product do our top-10 logits agree with it to print precision. `Isa` selects
//! the build to follow; `Isa::REFERENCE` is that one. Everything here runs on any CPU
//! (AVX2 intrinsics where available, scalar otherwise, bit-identical).
//!
//! * `rms_norm` — `ggml_compute_forward_rms_norm_f32` (+ the weight multiply): Σx² in
//!   double with each x² rounded to f32 first, `mean = (float)(sum/n)`,
//!   `scale = 1/sqrtf(mean + eps)`, `y = (x·scale)·w`.
//! * `rope_norm` — `ggml_rope_cache_init` + `rotate_pairs`, GGML_ROPE_TYPE_NORMAL (adjacent
//!   pairs): `theta_scale = powf(base, -2/n_dims)`, `theta = (float)pos`, per pair
//!   `cosf/sinf(theta)` then `theta *= theta_scale`, in f32; the rotation
//!   `x0·cos − x1·sin`, `x0·sin + x1·cos` as GCC contracts it (first product fused).
//! * `swiglu` — `ggml_vec_swiglu_f32`: `silu(g)·u` with the SIMD `ggml_v_silu`, i.e.
//!   `x / (1 + v_expf(0 − x))` using ggml's vector exp approximation, not libm's `expf`.
//! * `flash_attn_ext_f16` — `ggml_compute_forward_flash_attn_ext_f16_one_chunk` with an f16
//!   K/V cache: Q rounded to f16, `s = dot_f16(k, q)·scale`, online softmax with libm
//!   `expf`, the V accumulator kept *in f16* (`ggml_vec_scale_f16` / `ggml_vec_mad_f16`),
//!   finally `VKQ · (1/S)`. llama.cpp takes this path for fewer than 64 query rows (from
//!   64 rows it uses a tiled f32 path) and, for a single query row, for fewer than 512 KV
//!   cells (from 512 it splits the cells over threads and merges); those two paths are
//!   not emulated here.
//!
//! Where the C source leaves `a*b + c` to the compiler, GCC with `-march=native` on an FMA
//! machine contracts it to one FMA (GNU C/C++ default `-ffp-contract=fast`). The RoPE
//! rotation must be contracted (first product fused) to match; `S = S·ms + vs` and
//! Q4_1's `summs += m·s` made no observable difference either way (FMA kept).

use crate::kv::KvType;
use crate::kv::{KvView, QuantKvView};
use half::f16;

/// Which x86 SIMD build of ggml to follow where the vector width changes the numbers:
/// `ggml_vec_dot_f16`'s lane grouping and `ggml_v_expf`'s final scaling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX2 + FMA + F16C (8-lane f32 vectors).
    Avx2,
    /// AVX-512F without AVX512-FP16 (16-lane f32 vectors, `_mm512_scalef_ps` in exp).
    Avx512,
}

impl Isa {
    /// The build that produced the llama.cpp reference fixture.
    pub const REFERENCE: Isa = Isa::Avx512;
}

#[cfg(target_arch = "x86_64")]
fn simd() -> bool {
    super::has_avx2()
}

#[cfg(not(target_arch = "x86_64"))]
fn simd() -> bool {
    false
}

/// Round to the nearest f16 value (ties to even), kept as f32: what storing into an f16
/// tensor (ggml's f32→f16 copy / `GGML_CPU_FP32_TO_FP16`) and reading back gives.
#[inline]
pub fn round_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// `round_f16` on every element (e.g. K and V before they enter the cache).
pub fn round_to_f16(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: AVX2/F16C detected.
        unsafe { avx2::round_to_f16(x) };
        return;
    }
    for v in x {
        *v = round_f16(*v);
    }
}

// ---------------------------------------------------------------- RMSNorm

/// `ggml_compute_forward_rms_norm_f32` followed by the weight multiply (rows of `w.len()`).
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

// ---------------------------------------------------------------- RoPE

/// How `x0·cos − x1·sin` / `x0·sin + x1·cos` are rounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeRounding {
    /// Every product rounded, then the add/sub.
    Separate,
    /// GCC's contraction, what the reference did: the first product of each expression
    /// fused with the add/sub: `fma(x0, cos, −(x1·sin))`, `fma(x0, sin, x1·cos)`.
    FirstProductFused,
    /// The other product fused: `fma(−x1, sin, x0·cos)`, `fma(x1, cos, x0·sin)`.
    SecondProductFused,
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
                    RopeRounding::SecondProductFused => {
                        ((-x1).mul_add(s, x0 * c), x1.mul_add(c, x0 * s))
                    }
                };
                head[2 * i] = a;
                head[2 * i + 1] = b;
            }
        }
    }
}

// ---------------------------------------------------------------- SiLU

/// ggml's AVX2 `ggml_v_expf` for one lane: `n = round(x·log2 e)` (via the 0x1.8p23
/// shifter), `b = x − n·ln2` in two parts, a degree-5 polynomial `j`, result `k + k·j` with
/// `k = 2ⁿ` built in the exponent bits, and a two-factor scaling when |n| > 126. Each
/// `_mm256_fmadd_ps` / `_mm256_fnmadd_ps` of the original is one `mul_add` here.
#[inline(always)]
pub fn v_expf_avx2(x: f32) -> f32 {
    let c = f32::from_bits;
    let r = c(0x4b40_0000); // 0x1.8p23
    let z = x.mul_add(c(0x3fb8_aa3b), r); // x·log2(e) + 0x1.8p23
    let n = z - r;
    let b = (-n).mul_add(c(0x35bf_be8e), (-n).mul_add(c(0x3f31_7200), x));
    let e = z.to_bits() << 23;
    let k = f32::from_bits(e.wrapping_add(1.0f32.to_bits()));
    let u = b * b;
    let j = c(0x3c07_2010)
        .mul_add(b, c(0x3d2b_9f17))
        .mul_add(u, c(0x3e2a_af33).mul_add(b, c(0x3eff_fedb)))
        .mul_add(u, c(0x3f7f_fff6) * b);
    if n.abs() <= 126.0 {
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

/// ggml's AVX-512 `ggml_v_expf` for one lane: same reduction and polynomial, but the last
/// term is `fma(c1, b, 1)` and the result `_mm512_scalef_ps(j, n) = j·2ⁿ`.
#[inline(always)]
pub fn v_expf_avx512(x: f32) -> f32 {
    let c = f32::from_bits;
    let r = c(0x4b40_0000);
    let z = x.mul_add(c(0x3fb8_aa3b), r);
    let n = z - r;
    let b = (-n).mul_add(c(0x35bf_be8e), (-n).mul_add(c(0x3f31_7200), x));
    let u = b * b;
    let j = c(0x3c07_2010)
        .mul_add(b, c(0x3d2b_9f17))
        .mul_add(u, c(0x3e2a_af33).mul_add(b, c(0x3eff_fedb)))
        .mul_add(u, c(0x3f7f_fff6).mul_add(b, 1.0));
    if n.abs() > 192.0 {
        // ggml's blend: +inf where n <= 0, else 0 (never reached for |x| < 133)
        return if n <= 0.0 { f32::INFINITY } else { 0.0 };
    }
    // j·2ⁿ with a single rounding (exact unless the result is subnormal)
    // (|n| <= 192 here, so 2ⁿ is a normal f64 built directly from its exponent bits).
    (j as f64 * f64::from_bits(((n as i64 + 1023) as u64) << 52)) as f32
}

/// `ggml_v_expf` of the given build.
#[inline(always)]
pub fn v_expf(x: f32, isa: Isa) -> f32 {
    match isa {
        Isa::Avx2 => v_expf_avx2(x),
        Isa::Avx512 => v_expf_avx512(x),
    }
}

/// ggml's SIMD `ggml_v_silu`: `x / (1 + v_expf(0 − x))`.
#[inline(always)]
pub fn v_silu(x: f32, isa: Isa) -> f32 {
    x / (1.0 + v_expf(0.0 - x, isa))
}

/// `ggml_vec_swiglu_f32`: `silu(g_i)·u_i` per row of `row` values (SIMD body over whole
/// vectors of 8 / 16 lanes; a row's tail would use libm `expf`, as ggml's scalar leftover
/// loop does). Rows run in parallel.
pub fn swiglu(gate: &[f32], up: &[f32], row: usize, isa: Isa) -> Vec<f32> {
    let mut out = vec![0.0f32; gate.len()];
    crate::parallel::for_each_chunk_mut(&mut out, row, |r, o| {
        let (g, u) = (
            &gate[r * row..r * row + o.len()],
            &up[r * row..r * row + o.len()],
        );
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2() {
            // SAFETY: FMA detected; same arithmetic, `mul_add` becomes one instruction.
            unsafe { swiglu_row_fma(g, u, o, isa) };
            return;
        }
        swiglu_row(g, u, o, isa);
    });
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn swiglu_row_fma(g: &[f32], u: &[f32], o: &mut [f32], isa: Isa) {
    swiglu_row(g, u, o, isa)
}

#[inline(always)]
fn swiglu_row(g: &[f32], u: &[f32], o: &mut [f32], isa: Isa) {
    let w = if isa == Isa::Avx2 { 8 } else { 16 };
    let nv = g.len() / w * w;
    for (i, ((o, &g), &u)) in o.iter_mut().zip(g).zip(u).enumerate() {
        *o = if i < nv {
            v_silu(g, isa) * u
        } else {
            g / (1.0 + (-g).exp()) * u
        };
    }
}

// ---------------------------------------------------------------- f16 dot

/// `ggml_vec_dot_f16` on f16-valued inputs (given as f32; the widening is exact):
///
/// * AVX2: 4 accumulators × 8 lanes, FMAs over 32-element steps; reduce
///   `(s0+s2)+(s1+s3)`, then `t_k = l_k + l_{k+4}`, `(t0+t1)+(t2+t3)`.
/// * AVX-512: 4 × 16 lanes over 64-element steps; reduce `(s0+s2)+(s1+s3)`, then GCC's
///   `_mm512_reduce_add_ps`: 8 = hi+lo, 4 = hi+lo, `(u0+u2)+(u1+u3)`.
///
/// Elements past the last whole step are added in double, as ggml's leftover loop does.
pub fn dot_f16(x: &[f32], y: &[f32], isa: Isa) -> f32 {
    let w = if isa == Isa::Avx2 { 8 } else { 16 };
    let step = 4 * w;
    let n = x.len();
    let np = n / step * step;
    let mut sum = [[0.0f32; 16]; 4];
    for i in (0..np).step_by(step) {
        for (j, s) in sum.iter_mut().enumerate() {
            for (l, a) in s[..w].iter_mut().enumerate() {
                let t = i + w * j + l;
                *a = x[t].mul_add(y[t], *a);
            }
        }
    }
    let s0: [f32; 16] = std::array::from_fn(|l| (sum[0][l] + sum[2][l]) + (sum[1][l] + sum[3][l]));
    let r = if isa == Isa::Avx2 {
        let t: [f32; 4] = std::array::from_fn(|k| s0[k] + s0[k + 4]);
        (t[0] + t[1]) + (t[2] + t[3])
    } else {
        let t8: [f32; 8] = std::array::from_fn(|k| s0[k + 8] + s0[k]);
        let t4: [f32; 4] = std::array::from_fn(|k| t8[k + 4] + t8[k]);
        (t4[0] + t4[2]) + (t4[1] + t4[3])
    };
    let mut sumf = r as f64;
    for i in np..n {
        sumf += (x[i] * y[i]) as f64;
    }
    sumf as f32
}

// ---------------------------------------------------------------- flash attention

/// Options of `flash_attn_ext_f16`.
#[derive(Debug, Clone, Copy)]
pub struct FaOptions {
    /// `S = S*ms + vs` contracted to one FMA.
    pub s_fma: bool,
    /// Keep the V accumulator in f16 (llama.cpp with an f16 V cache). `false` accumulates
    /// in f32 (llama.cpp with an f32 V cache); for experiments.
    pub f16_accumulator: bool,
    /// Round Q to f16 before the K dot (llama.cpp with an f16 K cache). `false` keeps Q
    /// in f32; for experiments.
    pub f16_query: bool,
    /// Lane grouping of the K·Q dot.
    pub isa: Isa,
}

impl Default for FaOptions {
    fn default() -> Self {
        Self {
            s_fma: true,
            f16_accumulator: true,
            f16_query: true,
            isa: Isa::REFERENCE,
        }
    }
}

/// Causal attention of `nq` query rows at positions `q_pos0..` (q: nq × n_heads·d, as the
/// projection produced it) against the cached keys/values (positions 0..kv.len), computed
/// as llama.cpp's one-chunk flash attention over an f16 K/V cache. The cache holds f32
/// values that must already be f16-representable (`round_to_f16` before appending), which
/// keeps lwm's f32 `KvCache` usable while giving exactly the f16 cache's numbers.
/// Query head h reads KV head `h / (n_heads / n_kv)`. Output: nq × n_heads·d.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_ext_f16(
    q: &[f32],
    nq: usize,
    q_pos0: usize,
    n_heads: usize,
    d: usize,
    kv: &KvView,
    scale: f32,
    opts: &FaOptions,
) -> Vec<f32> {
    let n_kv = kv.k.len();
    let group = n_heads / n_kv;
    let width = n_heads * d;
    let mut out = vec![0.0f32; nq * width];
    let work = |idx: usize, o: &mut [f32]| {
        let (i, h) = (idx / n_heads, idx % n_heads);
        let visible = (q_pos0 + i + 1).min(kv.len);
        let qrow = &q[i * width + h * d..i * width + (h + 1) * d];
        let (k, v) = (
            Rows::F32(&kv.k[h / group][..visible * d]),
            Rows::F32(&kv.v[h / group][..visible * d]),
        );
        attend_row(qrow, k, v, visible, d, scale, opts, o);
    };
    // One (row, head) per task; below ~256k multiply-adds the pool costs more than it saves.
    if nq * n_heads * kv.len * d >= 1 << 18 {
        crate::parallel::for_each_chunk_mut(&mut out, d, work);
    } else {
        out.chunks_mut(d)
            .enumerate()
            .for_each(|(idx, o)| work(idx, o));
    }
    out
}

/// `flash_attn_ext_f16` reading a natively stored f16 cache (`KvTypes::F16`): each row is
/// widened to f32 as ggml's f16 kernels do (exact), so results are identical.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_ext_f16_stored(
    q: &[f32],
    nq: usize,
    q_pos0: usize,
    n_heads: usize,
    d: usize,
    kv: &QuantKvView,
    scale: f32,
    opts: &FaOptions,
) -> Vec<f32> {
    let n_kv = kv.k.len();
    let group = n_heads / n_kv;
    let width = n_heads * d;
    let (kb, vb) = (kv.k_type.row_bytes(d), kv.v_type.row_bytes(d));
    let mut out = vec![0.0f32; nq * width];
    let work = |idx: usize, o: &mut [f32]| {
        let (i, h) = (idx / n_heads, idx % n_heads);
        let visible = (q_pos0 + i + 1).min(kv.len);
        let qrow = &q[i * width + h * d..i * width + (h + 1) * d];
        let (k, v) = (
            Rows::Stored(&kv.k[h / group][..visible * kb], kv.k_type),
            Rows::Stored(&kv.v[h / group][..visible * vb], kv.v_type),
        );
        attend_row(qrow, k, v, visible, d, scale, opts, o);
    };
    if nq * n_heads * kv.len * d >= 1 << 18 {
        crate::parallel::for_each_chunk_mut(&mut out, d, work);
    } else {
        out.chunks_mut(d)
            .enumerate()
            .for_each(|(idx, o)| work(idx, o));
    }
    out
}

/// Cached rows as `attend_row` reads them.
#[derive(Clone, Copy)]
enum Rows<'a> {
    F32(&'a [f32]),
    Stored(&'a [u8], KvType),
}

impl Rows<'_> {
    /// Row `j` (d values), decoded into `buf` unless already f32.
    #[inline]
    fn row<'b>(&'b self, j: usize, d: usize, buf: &'b mut [f32]) -> &'b [f32] {
        match *self {
            Rows::F32(x) => &x[j * d..(j + 1) * d],
            Rows::Stored(x, t) => {
                let rb = t.row_bytes(d);
                t.decode_row(&x[j * rb..(j + 1) * rb], buf);
                buf
            }
        }
    }
}

/// One query row against `n` visible rows of `k`, `v`.
#[allow(clippy::too_many_arguments)]
fn attend_row(
    qrow: &[f32],
    k: Rows,
    v: Rows,
    n: usize,
    d: usize,
    scale: f32,
    opts: &FaOptions,
    out: &mut [f32],
) {
    let mut qv = qrow.to_vec();
    if opts.f16_query {
        round_to_f16(&mut qv);
    }
    let mut acc = vec![0.0f32; d];
    let mut m = f32::NEG_INFINITY;
    let mut s_sum = 0.0f32;
    let use_simd = simd() && d.is_multiple_of(16);
    let (mut kbuf, mut vbuf) = (vec![0.0f32; d], vec![0.0f32; d]);
    for j in 0..n {
        let kr = k.row(j, d, &mut kbuf);
        let s = dot(kr, &qv, opts.isa, use_simd) * scale;
        let (ms, vs);
        if s > m {
            // new maximum: rescale the accumulator by expf(M_old − M), weight 1
            ms = (m - s).exp();
            m = s;
            vs = 1.0f32;
            scale_acc(&mut acc, ms, opts.f16_accumulator, use_simd);
        } else {
            ms = 1.0f32;
            vs = (s - m).exp();
        }
        let vr = v.row(j, d, &mut vbuf);
        mad_acc(&mut acc, vr, vs, opts.f16_accumulator, use_simd);
        s_sum = if opts.s_fma {
            s_sum.mul_add(ms, vs)
        } else {
            s_sum * ms + vs
        };
    }
    let s_inv = if s_sum == 0.0 { 0.0 } else { 1.0 / s_sum };
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = a * s_inv;
    }
}

#[inline]
fn dot(k: &[f32], q: &[f32], isa: Isa, use_simd: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if use_simd {
        // SAFETY: AVX2/FMA detected, lengths are a multiple of 16.
        return unsafe { avx2::dot_f16(k, q, isa) };
    }
    let _ = use_simd;
    dot_f16(k, q, isa)
}

/// acc ← acc·ms (`ggml_vec_scale_f16`: product rounded to f16 when `f16`).
#[inline]
fn scale_acc(acc: &mut [f32], ms: f32, f16: bool, use_simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if use_simd {
        // SAFETY: as above.
        unsafe { avx2::scale(acc, ms, f16) };
        return;
    }
    let _ = use_simd;
    for a in acc {
        *a *= ms;
        if f16 {
            *a = round_f16(*a);
        }
    }
}

/// acc ← fma(v, vs, acc) (`ggml_vec_mad_f16`: rounded to f16 when `f16`).
#[inline]
fn mad_acc(acc: &mut [f32], v: &[f32], vs: f32, f16: bool, use_simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if use_simd {
        // SAFETY: as above.
        unsafe { avx2::mad(acc, v, vs, f16) };
        return;
    }
    let _ = use_simd;
    for (a, &x) in acc.iter_mut().zip(v) {
        *a = x.mul_add(vs, *a);
        if f16 {
            *a = round_f16(*a);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Isa;
    use std::arch::x86_64::*;

    const RNE: i32 = _MM_FROUND_TO_NEAREST_INT;

    #[inline(always)]
    unsafe fn r16(x: __m256) -> __m256 {
        _mm256_cvtph_ps(_mm256_cvtps_ph::<RNE>(x))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn round_to_f16(x: &mut [f32]) {
        let mut c = x.chunks_exact_mut(8);
        for v in &mut c {
            let p = v.as_mut_ptr();
            _mm256_storeu_ps(p, r16(_mm256_loadu_ps(p)));
        }
        for v in c.into_remainder() {
            *v = super::round_f16(*v);
        }
    }

    /// `super::dot_f16` for lengths that are a multiple of 16 (bit-identical).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(x: &[f32], y: &[f32], isa: Isa) -> f32 {
        let n = x.len();
        let (xp, yp) = (x.as_ptr(), y.as_ptr());
        let z = _mm256_setzero_ps();
        let r;
        let np;
        if isa == Isa::Avx2 {
            np = n / 32 * 32;
            let mut s = [z; 4];
            let mut i = 0;
            while i < np {
                for (j, a) in s.iter_mut().enumerate() {
                    let o = i + 8 * j;
                    *a =
                        _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(o)), _mm256_loadu_ps(yp.add(o)), *a);
                }
                i += 32;
            }
            let s0 = _mm256_add_ps(_mm256_add_ps(s[0], s[2]), _mm256_add_ps(s[1], s[3]));
            let t = _mm_add_ps(_mm256_castps256_ps128(s0), _mm256_extractf128_ps::<1>(s0));
            let t1 = _mm_hadd_ps(t, t);
            r = _mm_cvtss_f32(_mm_hadd_ps(t1, t1));
        } else {
            // 16-lane accumulators as (lo, hi) pairs of 8 lanes
            np = n / 64 * 64;
            let mut lo = [z; 4];
            let mut hi = [z; 4];
            let mut i = 0;
            while i < np {
                for j in 0..4 {
                    let o = i + 16 * j;
                    lo[j] = _mm256_fmadd_ps(
                        _mm256_loadu_ps(xp.add(o)),
                        _mm256_loadu_ps(yp.add(o)),
                        lo[j],
                    );
                    hi[j] = _mm256_fmadd_ps(
                        _mm256_loadu_ps(xp.add(o + 8)),
                        _mm256_loadu_ps(yp.add(o + 8)),
                        hi[j],
                    );
                }
                i += 64;
            }
            let l0 = _mm256_add_ps(_mm256_add_ps(lo[0], lo[2]), _mm256_add_ps(lo[1], lo[3]));
            let h0 = _mm256_add_ps(_mm256_add_ps(hi[0], hi[2]), _mm256_add_ps(hi[1], hi[3]));
            let t8 = _mm256_add_ps(h0, l0);
            let t4 = _mm_add_ps(_mm256_extractf128_ps::<1>(t8), _mm256_castps256_ps128(t8));
            let t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4)); // (u0+u2, u1+u3)
            r = _mm_cvtss_f32(_mm_add_ss(t2, _mm_movehdup_ps(t2)));
        }
        let mut sumf = r as f64;
        for i in np..n {
            sumf += (x[i] * y[i]) as f64;
        }
        sumf as f32
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scale(acc: &mut [f32], ms: f32, f16: bool) {
        let m = _mm256_set1_ps(ms);
        for c in acc.chunks_exact_mut(8) {
            let p = c.as_mut_ptr();
            let a = _mm256_mul_ps(_mm256_loadu_ps(p), m);
            _mm256_storeu_ps(p, if f16 { r16(a) } else { a });
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn mad(acc: &mut [f32], v: &[f32], vs: f32, f16: bool) {
        let s = _mm256_set1_ps(vs);
        for (c, x) in acc.chunks_exact_mut(8).zip(v.chunks_exact(8)) {
            let p = c.as_mut_ptr();
            let a = _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr()), s, _mm256_loadu_ps(p));
            _mm256_storeu_ps(p, if f16 { r16(a) } else { a });
        }
    }
}
