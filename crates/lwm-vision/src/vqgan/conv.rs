//! The VQGAN's layers on NHWC activations: convolution as an implicit GEMM with packed
//! weights, GroupNorm fused with SiLU, nearest upsampling.
//!
//! A convolution with kernel k×k and stride s over an input whose zero border is already in
//! place (`Padded`: SAME pads one pixel on every side for k = 3; the encoder's downsample
//! pads one at the bottom and right, then runs VALID with s = 2) is
//!
//! ```text
//!   out[p][o] = bias[o] + Σ_{t < k·k} Σ_{i < cin} src[base(p) + off(t)][i] · w[t][i][o]
//!   base(p)   = the source pixel under the kernel's top-left tap: (frame, s·y, s·x)
//!   off(t)    = dy·Wp + dx        (t = dy·k + dx; Wp the padded width)
//! ```
//!
//! so every tap of every output pixel reads a real source row, and the output pixels of all
//! frames are the rows of one GEMM (M = frames·Ho·Wo, N = cout, K = k·k·cin) whose A matrix
//! is never built (no im2col copy). The weights are packed once at load in panels of
//! `NR` = 16 output channels, `[panel][t][i][16]`, zero-filled past `cout`, so a panel's
//! row for one (t, i) is one contiguous 64-byte line.
//!
//! A register tile is `MR` = 6 output pixels × 16 channels: per (t, i) the six source values
//! are broadcast and multiplied with the panel's two 8-lane vectors into 12 accumulators
//! (AVX2 + FMA). Each output element is accumulated in (t, i) order, FMA on AVX2 and
//! multiply-then-add in the portable code, so the two agree to rounding, whatever the
//! tiling or the thread split. Threads take chunks of `MC` output pixels; within a chunk the
//! sum runs in K blocks of `KC` values (whole taps, or pieces of one): per block, every
//! panel, and per panel every tile, so a panel's block of weights (16 KB) stays in L1 and
//! the chunk's source values of the block stay in L2.

use lwm_core::parallel;
use std::borrow::Cow;
use std::sync::Mutex;

/// Output channels per packed panel (two AVX2 vectors).
const NR: usize = 16;
/// Output pixels per register tile.
const MR: usize = 6;
/// Output pixels per thread item (a multiple of `MR`).
const MC: usize = 16 * MR;

/// Freed activation buffers, kept for the next layer: a 256×256 frame's activations are
/// 32–64 MB each, and a fresh allocation of that size is fresh pages, whose first-touch
/// faults cost about as much as a 3×3 convolution's padding copy (~20 ms per 32 MB
/// measured). Bounded by `POOL_BYTES`; `release_buffers` empties it.
static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
const POOL_BYTES: usize = 256 << 20;
/// Smaller buffers are not worth keeping.
const POOL_MIN_BYTES: usize = 1 << 20;

/// A zeroed buffer of `len` values, reusing a pooled one when one is large enough.
fn buffer(len: usize) -> Vec<f32> {
    let mut v = buffer_any(len);
    v.fill(0.0);
    v
}

/// A buffer of `len` values whose contents are unspecified (a pooled buffer keeps its old
/// values): for outputs whose every value is written.
fn buffer_any(len: usize) -> Vec<f32> {
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let fit = (0..pool.len())
        .filter(|&i| pool[i].capacity() >= len)
        .min_by_key(|&i| pool[i].capacity());
    let mut v = fit.map(|i| pool.swap_remove(i)).unwrap_or_default();
    drop(pool);
    if v.len() >= len {
        v.truncate(len);
    } else {
        v.resize(len, 0.0);
    }
    v
}

fn recycle(v: Vec<f32>) {
    let bytes = |v: &Vec<f32>| v.capacity() * 4;
    if bytes(&v) < POOL_MIN_BYTES {
        return;
    }
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    pool.push(v);
    // Over the bound: the oldest go first.
    while pool.iter().map(bytes).sum::<usize>() > POOL_BYTES && pool.len() > 1 {
        pool.remove(0);
    }
}

/// Give the pooled activation buffers back to the allocator (after a video, say).
pub fn release_buffers() {
    POOL.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// Activations of `n` frames, NHWC row-major: pixel p's `c` channels are contiguous.
#[derive(Debug, Clone, PartialEq)]
pub struct Act {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

impl Act {
    pub fn new(n: usize, h: usize, w: usize, c: usize, data: Vec<f32>) -> Self {
        debug_assert_eq!(data.len(), n * h * w * c);
        Self { n, h, w, c, data }
    }

    /// The values, leaving the activation empty (its buffer then does not go to the pool).
    pub fn take_data(&mut self) -> Vec<f32> {
        std::mem::take(&mut self.data)
    }

    pub fn pixels(&self) -> usize {
        self.n * self.h * self.w
    }

    /// A copy with `top`/`left`/`bottom`/`right` zero pixels around every frame.
    fn padded(&self, top: usize, left: usize, bottom: usize, right: usize) -> Padded<'_> {
        if top + left + bottom + right == 0 {
            return Padded {
                n: self.n,
                hp: self.h,
                wp: self.w,
                data: Cow::Borrowed(&self.data),
            };
        }
        let (hp, wp, c) = (self.h + top + bottom, self.w + left + right, self.c);
        let mut data = buffer(self.n * hp * wp * c);
        let row = self.w * c;
        // One padded row per item: its interior is a source row (the border stays zero).
        parallel::for_each_chunk_mut(&mut data, wp * c, |i, dst| {
            let (f, y) = (i / hp, i % hp);
            if (top..top + self.h).contains(&y) {
                let s = (f * self.h + y - top) * row;
                dst[left * c..][..row].copy_from_slice(&self.data[s..s + row]);
            }
        });
        Padded {
            n: self.n,
            hp,
            wp,
            data: Cow::Owned(data),
        }
    }

    /// Nearest-neighbour ×2 in both directions.
    pub fn upsample2(&self) -> Act {
        let (h2, w2, c) = (2 * self.h, 2 * self.w, self.c);
        let mut data = buffer_any(self.n * h2 * w2 * c);
        parallel::for_each_chunk_mut(&mut data, w2 * c, |i, dst| {
            let (f, y) = (i / h2, i % h2);
            for (x, d) in dst.chunks_exact_mut(c).enumerate() {
                let s = ((f * self.h + y / 2) * self.w + x / 2) * c;
                d.copy_from_slice(&self.data[s..s + c]);
            }
        });
        Act::new(self.n, h2, w2, c, data)
    }

    /// `self += other`, element by element (the residual connection).
    pub fn add_assign(&mut self, other: &Act) {
        debug_assert_eq!(self.data.len(), other.data.len());
        for (a, b) in self.data.iter_mut().zip(&other.data) {
            *a += b;
        }
    }
}

/// One packed row of a panel: the weights of `NR` output channels for one (tap, input channel).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; NR]);

impl Drop for Act {
    fn drop(&mut self) {
        recycle(self.take_data());
    }
}

/// An input with its zero border in place, `hp × wp` pixels per frame (borrowed when there
/// is no border).
struct Padded<'a> {
    n: usize,
    hp: usize,
    wp: usize,
    data: Cow<'a, [f32]>,
}

impl Drop for Padded<'_> {
    fn drop(&mut self) {
        if let Cow::Owned(v) = std::mem::replace(&mut self.data, Cow::Borrowed(&[])) {
            recycle(v);
        }
    }
}

/// A k×k convolution (k = 1 or 3 here) with bias, weights packed for the GEMM tiles.
pub struct Conv2d {
    pub k: usize,
    pub cin: usize,
    pub cout: usize,
    /// `[panel][t][i]` lines of `NR` weights, zero past `cout`; 64-byte aligned, so the
    /// kernel's two 32-byte loads per line never straddle a cache line.
    packed: Vec<Line>,
    bias: Vec<f32>,
}

impl Conv2d {
    /// From Flax's kernel layout `(kh, kw, in, out)` (row-major) and its bias.
    pub fn new(k: usize, cin: usize, cout: usize, kernel: &[f32], bias: &[f32]) -> Self {
        assert_eq!(kernel.len(), k * k * cin * cout);
        assert_eq!(bias.len(), cout);
        let panels = cout.div_ceil(NR);
        let taps = k * k;
        let mut packed = vec![Line([0f32; NR]); panels * taps * cin];
        for t in 0..taps {
            for i in 0..cin {
                for o in 0..cout {
                    let (panel, lane) = (o / NR, o % NR);
                    packed[(panel * taps + t) * cin + i].0[lane] = kernel[(t * cin + i) * cout + o];
                }
            }
        }
        Self {
            k,
            cin,
            cout,
            packed,
            bias: bias.to_vec(),
        }
    }

    /// SAME padding, stride 1 (Flax `nn.Conv` with `padding='SAME'`).
    pub fn same(&self, x: &Act) -> Act {
        assert_eq!(x.c, self.cin, "conv input channels");
        let p = self.k / 2;
        self.run(&x.padded(p, p, p, p), x.h, x.w, 1)
    }

    /// The encoder's downsample: pad bottom and right by one, then VALID with stride 2.
    pub fn down(&self, x: &Act) -> Act {
        assert_eq!(x.c, self.cin, "conv input channels");
        let src = x.padded(0, 0, 1, 1);
        let ho = (src.hp - self.k) / 2 + 1;
        let wo = (src.wp - self.k) / 2 + 1;
        self.run(&src, ho, wo, 2)
    }

    /// `ho × wo` output pixels per frame, stride `s`, over a bordered input.
    fn run(&self, src: &Padded, ho: usize, wo: usize, s: usize) -> Act {
        let (k, cin, cout) = (self.k, self.cin, self.cout);
        let (n, hp, wp, data) = (src.n, src.hp, src.wp, &src.data[..]);
        let base = |p: usize| {
            let (f, r) = (p / (ho * wo), p % (ho * wo));
            ((f * hp + r / wo * s) * wp + r % wo * s) * cin
        };
        let blocks = k_blocks(k, cin, wp);
        let k_end = blocks
            .last()
            .and_then(|b| b.segs.last())
            .map_or(0, |g| g.off + g.len);
        let panel_len = k * k * cin;
        let (m, npanels) = (n * ho * wo, cout.div_ceil(NR));
        let mut out = buffer_any(m * cout);
        let use_avx2 = lwm_core::quant::has_avx2();
        // Items: chunks of MC output pixels × groups of panels. Large images give every
        // thread many chunks (one group: the weights are read once per chunk); small ones
        // (16×16 at the bottom of the network: 3 chunks, 21 MB of weights) split the panels
        // too, so both threads work and each reads only its share of the weights.
        let chunks = m.div_ceil(MC);
        let groups = (4 * parallel::threads()).div_ceil(chunks).clamp(1, npanels);
        let per_group = npanels.div_ceil(groups);
        let out_ptr = out.as_mut_ptr() as usize;
        parallel::for_each(chunks * groups, |item| {
            let (chunk_i, group) = (item / groups, item % groups);
            let panels = group * per_group..((group + 1) * per_group).min(npanels);
            let p0 = chunk_i * MC;
            let rows = MC.min(m - p0);
            // Each tile's source pixels; rows past the chunk's end repeat its last pixel
            // (computed, never stored).
            let a: Vec<[usize; MR]> = (0..rows.div_ceil(MR))
                .map(|ti| {
                    let (r, mr) = (ti * MR, MR.min(rows - ti * MR));
                    std::array::from_fn(|j| base(p0 + r + j.min(mr - 1)))
                })
                .collect();
            // The kernels read raw pointers: the farthest source value of the chunk (its
            // last pixel's last tap) must lie inside the bordered input.
            assert!(a.last().map_or(0, |t| t[MR - 1]) + k_end <= data.len());
            // Accumulators of every (panel, tile) of the item. K blocks run outermost, so
            // the chunk's source values of one block (MC × KC) stay in L2 while every
            // panel passes over them, and a panel's block of weights stays in L1 while
            // every tile does.
            let ntiles = a.len();
            let mut acc = vec![[[0f32; NR]; MR]; panels.len() * ntiles];
            for blk in &blocks {
                for (panel, tiles) in panels.clone().zip(acc.chunks_exact_mut(ntiles)) {
                    let b = &self.packed[panel * panel_len + blk.line0..];
                    for (t, src) in tiles.iter_mut().zip(&a) {
                        #[cfg(target_arch = "x86_64")]
                        if use_avx2 {
                            // SAFETY: AVX2+FMA are present; every source offset lies in
                            // `data` (asserted above) and `b` holds the block's lines.
                            unsafe {
                                tile_avx2(data.as_ptr(), src, &blk.segs, b.as_ptr().cast(), t)
                            };
                            continue;
                        }
                        tile_portable(data, src, &blk.segs, b, t);
                    }
                }
            }
            for (panel, tiles) in panels.clone().zip(acc.chunks_exact(ntiles)) {
                let (o0, cols) = (panel * NR, NR.min(cout - panel * NR));
                for (r, row) in tiles.iter().flatten().enumerate().take(rows) {
                    // SAFETY: items write disjoint (pixel, channel) ranges of `out`: their
                    // own chunk's rows, their own group's columns; `out` outlives the
                    // region (`for_each` returns after every item).
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            (out_ptr as *mut f32).add((p0 + r) * cout + o0),
                            cols,
                        )
                    };
                    for ((d, v), bias) in dst.iter_mut().zip(row).zip(&self.bias[o0..]) {
                        *d = v + bias;
                    }
                }
            }
        });
        Act::new(n, ho, wo, cout, out)
    }
}

/// Input values per K block: a block's weight lines (`KC` × 64 bytes) stay in L1 while
/// every tile of a chunk runs over them.
const KC: usize = 256;

/// A run of `len` consecutive input channels of one tap: source values
/// `data[a[j] + off ..][..len]` against the block's next `len` weight lines.
#[derive(Debug, Clone, Copy)]
struct Seg {
    off: usize,
    len: usize,
}

/// A K block: its segments, in (tap, channel) order, and its first weight line.
struct KBlock {
    line0: usize,
    segs: Vec<Seg>,
}

/// The (tap, channel) sum cut into blocks of at most `KC` values: whole taps while they fit,
/// else one tap's channels in pieces.
fn k_blocks(k: usize, cin: usize, wp: usize) -> Vec<KBlock> {
    let mut blocks = Vec::new();
    let (mut segs, mut filled, mut line, mut line0) = (Vec::new(), 0, 0, 0);
    for t in 0..k * k {
        let tap = (t / k * wp + t % k) * cin;
        let mut i0 = 0;
        while i0 < cin {
            let len = KC.min(cin - i0);
            if filled + len > KC && !segs.is_empty() {
                blocks.push(KBlock {
                    line0,
                    segs: std::mem::take(&mut segs),
                });
                (filled, line0) = (0, line);
            }
            segs.push(Seg { off: tap + i0, len });
            (filled, line, i0) = (filled + len, line + len, i0 + len);
        }
    }
    if !segs.is_empty() {
        blocks.push(KBlock { line0, segs });
    }
    blocks
}

/// One 6 × 16 tile, accumulated over a block:
/// `tile[j][l] += Σ_seg Σ_{i < len} data[a[j] + off + i] · b[line][l]`, lines in order.
fn tile_portable(
    data: &[f32],
    a: &[usize; MR],
    segs: &[Seg],
    b: &[Line],
    tile: &mut [[f32; NR]; MR],
) {
    let mut line = 0;
    for g in segs {
        for i in 0..g.len {
            let w = &b[line].0;
            for (j, acc) in tile.iter_mut().enumerate() {
                let x = data[a[j] + g.off + i];
                for (s, &wl) in acc.iter_mut().zip(w) {
                    *s += x * wl;
                }
            }
            line += 1;
        }
    }
}

/// `tile_portable` with AVX2: 12 accumulators (6 pixels × 2 vectors of 8 channels), per
/// input value six broadcasts and two aligned weight loads feeding 12 FMAs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(
    data: *const f32,
    a: &[usize; MR],
    segs: &[Seg],
    b: *const f32,
    tile: &mut [[f32; NR]; MR],
) {
    use std::arch::x86_64::*;
    let mut acc: [[__m256; 2]; MR] = std::array::from_fn(|j| {
        [
            _mm256_loadu_ps(tile[j].as_ptr()),
            _mm256_loadu_ps(tile[j].as_ptr().add(8)),
        ]
    });
    let mut bp = b;
    for g in segs {
        let src: [*const f32; MR] = std::array::from_fn(|j| data.add(a[j] + g.off));
        for i in 0..g.len {
            let b0 = _mm256_load_ps(bp);
            let b1 = _mm256_load_ps(bp.add(8));
            for j in 0..MR {
                let x = _mm256_broadcast_ss(&*src[j].add(i));
                acc[j][0] = _mm256_fmadd_ps(x, b0, acc[j][0]);
                acc[j][1] = _mm256_fmadd_ps(x, b1, acc[j][1]);
            }
            bp = bp.add(NR);
        }
    }
    for j in 0..MR {
        _mm256_storeu_ps(tile[j].as_mut_ptr(), acc[j][0]);
        _mm256_storeu_ps(tile[j].as_mut_ptr().add(8), acc[j][1]);
    }
}

/// `out = silu(x·mul + add)`, element by element; `silu(y) = y / (1 + e^(−y))`.
fn silu_affine(x: &[f32], mul: &[f32], add: &[f32], out: &mut [f32]) {
    for (((o, &v), &m), &a) in out.iter_mut().zip(x).zip(mul).zip(add) {
        let y = v * m + a;
        *o = y / (1.0 + (-y).exp());
    }
}

/// `silu_affine` with AVX2: e^(−y) by Cephes' `expf` (range reduction by ln 2 in two
/// parts, a degree-6 polynomial, the exponent added in the integer domain; ~1 ulp), eight
/// values at a time; the tail as `silu_affine`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_affine_avx2(x: &[f32], mul: &[f32], add: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n8 = x.len() / 8 * 8;
    let one = _mm256_set1_ps(1.0);
    for i in (0..n8).step_by(8) {
        let y = _mm256_fmadd_ps(
            _mm256_loadu_ps(x.as_ptr().add(i)),
            _mm256_loadu_ps(mul.as_ptr().add(i)),
            _mm256_loadu_ps(add.as_ptr().add(i)),
        );
        // e^z, z = −y clamped to where f32 e^z is finite and normal enough.
        let z = _mm256_min_ps(
            _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), y), _mm256_set1_ps(-87.3)),
            _mm256_set1_ps(88.3),
        );
        let fx = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(z, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), z);
        let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), one);
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(fx),
            _mm256_set1_epi32(127),
        )));
        let e = _mm256_mul_ps(p, pow2);
        _mm256_storeu_ps(
            out.as_mut_ptr().add(i),
            _mm256_div_ps(y, _mm256_add_ps(one, e)),
        );
    }
    silu_affine(&x[n8..], &mul[n8..], &add[n8..], &mut out[n8..]);
}

/// GroupNorm's per-channel affine parameters.
pub struct GroupNorm {
    pub scale: Vec<f32>,
    pub bias: Vec<f32>,
}

/// GroupNorm (statistics per frame and group over its H·W·C/G values, biased variance)
/// followed by SiLU, in one pass over the output. The sums are taken in f64, so the
/// statistics do not depend on the thread split.
pub fn group_norm_silu(x: &Act, g: &GroupNorm, groups: usize, eps: f64) -> Act {
    let (c, hw) = (x.c, x.h * x.w);
    let cg = c / groups;
    // Per frame and group: (Σx, Σx²) over the frame's pixels, in pixel chunks.
    const PIX: usize = 1024;
    let chunks_per_frame = hw.div_ceil(PIX);
    // Per-channel sums (independent lanes, so they vectorize), summed per group below.
    let partial: Vec<Vec<(f64, f64)>> = parallel::map(x.n * chunks_per_frame, |ci| {
        let (f, k) = (ci / chunks_per_frame, ci % chunks_per_frame);
        let (p0, p1) = (k * PIX, ((k + 1) * PIX).min(hw));
        let (mut sum, mut sq) = (vec![0f64; c], vec![0f64; c]);
        for px in x.data[(f * hw + p0) * c..(f * hw + p1) * c].chunks_exact(c) {
            for ((s, q), &v) in sum.iter_mut().zip(sq.iter_mut()).zip(px) {
                let v = v as f64;
                *s += v;
                *q += v * v;
            }
        }
        (0..groups)
            .map(|gi| {
                let r = gi * cg..(gi + 1) * cg;
                (sum[r.clone()].iter().sum(), sq[r].iter().sum())
            })
            .collect()
    });
    let count = (hw * cg) as f64;
    // Per frame and channel: y = x·mul + add, with mul = scale/σ and add = bias − mean·mul.
    let mut coef = vec![(0f32, 0f32); x.n * c];
    for (f, parts) in partial.chunks(chunks_per_frame).enumerate() {
        for gi in 0..groups {
            let (a, b) = parts
                .iter()
                .fold((0f64, 0f64), |(a, b), p| (a + p[gi].0, b + p[gi].1));
            let mean = a / count;
            let var = (b / count - mean * mean).max(0.0);
            let inv = 1.0 / (var + eps).sqrt();
            for ch in gi * cg..(gi + 1) * cg {
                let mul = g.scale[ch] as f64 * inv;
                coef[f * c + ch] = (mul as f32, (g.bias[ch] as f64 - mean * mul) as f32);
            }
        }
    }
    let (mul, add): (Vec<f32>, Vec<f32>) = coef.into_iter().unzip();
    let mut out = buffer_any(x.data.len());
    let use_avx2 = lwm_core::quant::has_avx2();
    parallel::for_each_chunk_mut(&mut out, PIX * c, |ci, o| {
        for (k, (op, xp)) in o
            .chunks_exact_mut(c)
            .zip(x.data[ci * PIX * c..].chunks_exact(c))
            .enumerate()
        {
            let f = (ci * PIX + k) / hw;
            let (m, a) = (&mul[f * c..][..c], &add[f * c..][..c]);
            #[cfg(target_arch = "x86_64")]
            if use_avx2 {
                // SAFETY: AVX2+FMA are present; the four slices have length c.
                unsafe { silu_affine_avx2(xp, m, a, op) };
                continue;
            }
            silu_affine(xp, m, a, op);
        }
    });
    Act::new(x.n, x.h, x.w, c, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        lwm_core::rng::XorShift::new(seed).vec(n, -1.0, 1.0)
    }

    /// The definition, one output element at a time, in f64, with explicit bounds checks.
    fn conv_ref(x: &Act, k: usize, cout: usize, w: &[f32], bias: &[f32], down: bool) -> Act {
        let (pt, s) = if down {
            (0isize, 2)
        } else {
            ((k / 2) as isize, 1)
        };
        let (ho, wo) = if down {
            ((x.h + 1 - k) / 2 + 1, (x.w + 1 - k) / 2 + 1)
        } else {
            (x.h, x.w)
        };
        let mut out = vec![0f32; x.n * ho * wo * cout];
        for f in 0..x.n {
            for y in 0..ho {
                for xx in 0..wo {
                    for o in 0..cout {
                        let mut acc = bias[o] as f64;
                        for dy in 0..k {
                            for dx in 0..k {
                                let sy = (y * s + dy) as isize - pt;
                                let sx = (xx * s + dx) as isize - pt;
                                if sy < 0 || sx < 0 || sy >= x.h as isize || sx >= x.w as isize {
                                    continue;
                                }
                                for i in 0..x.c {
                                    let v = x.data
                                        [((f * x.h + sy as usize) * x.w + sx as usize) * x.c + i];
                                    acc +=
                                        v as f64 * w[((dy * k + dx) * x.c + i) * cout + o] as f64;
                                }
                            }
                        }
                        out[((f * ho + y) * wo + xx) * cout + o] = acc as f32;
                    }
                }
            }
        }
        Act::new(x.n, ho, wo, cout, out)
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Odd shapes (channels that are not multiples of 16, pixel counts that are not
    /// multiples of the tile, two frames), SAME and the strided downsample, k = 1 and 3:
    /// the tiled kernel (AVX2 where present, and the portable one) equals the definition.
    #[test]
    fn conv_equals_the_definition_on_odd_shapes() {
        for &(n, h, w, cin, cout, k, down) in &[
            (1, 5, 7, 3, 20, 3, false),
            (1, 4, 6, 300, 18, 3, false),
            (2, 5, 4, 130, 17, 1, false),
            (2, 6, 10, 17, 3, 3, false),
            (2, 9, 5, 8, 33, 1, false),
            (1, 8, 6, 5, 16, 3, true),
            (2, 16, 16, 12, 7, 3, true),
            (1, 20, 21, 32, 48, 3, false),
        ] {
            let x = Act::new(n, h, w, cin, rand(n * h * w * cin, 1 + cin as u64));
            let wt = rand(k * k * cin * cout, 2 + cout as u64);
            let bias = rand(cout, 3);
            let conv = Conv2d::new(k, cin, cout, &wt, &bias);
            let got = if down { conv.down(&x) } else { conv.same(&x) };
            let want = conv_ref(&x, k, cout, &wt, &bias, down);
            assert_eq!((got.h, got.w, got.c), (want.h, want.w, want.c));
            let d = max_diff(&got.data, &want.data);
            let tol = 1e-5 * (k * k * cin) as f32;
            assert!(d < tol, "{n}x{h}x{w}x{cin}->{cout} k{k} down {down}: {d}");

            // The portable tile over the same operands (pixel 0, every block) agrees with
            // the dispatched kernel.
            let src = if down {
                x.padded(0, 0, 1, 1)
            } else {
                x.padded(k / 2, k / 2, k / 2, k / 2)
            };
            let mut t1 = [[0f32; NR]; MR];
            for blk in k_blocks(k, cin, src.wp) {
                tile_portable(
                    &src.data,
                    &[0; MR],
                    &blk.segs,
                    &conv.packed[blk.line0..],
                    &mut t1,
                );
            }
            for (l, v) in t1[0].iter().enumerate().take(cout.min(NR)) {
                let g = got.data[l] - bias[l];
                assert!((v - g).abs() < tol, "portable tile lane {l}: {v} vs {g}");
            }
        }
    }

    #[test]
    fn group_norm_silu_equals_the_definition() {
        let (n, h, w, c, groups) = (2, 5, 3, 8, 4);
        let x = Act::new(n, h, w, c, rand(n * h * w * c, 9));
        let g = GroupNorm {
            scale: rand(c, 10),
            bias: rand(c, 11),
        };
        let got = group_norm_silu(&x, &g, groups, 1e-6);
        let cg = c / groups;
        for f in 0..n {
            for gi in 0..groups {
                let vals: Vec<f64> = (0..h * w)
                    .flat_map(|p| (0..cg).map(move |j| (p, gi * cg + j)))
                    .map(|(p, ch)| x.data[(f * h * w + p) * c + ch] as f64)
                    .collect();
                let mean = vals.iter().sum::<f64>() / vals.len() as f64;
                let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
                for p in 0..h * w {
                    for ch in gi * cg..(gi + 1) * cg {
                        let i = (f * h * w + p) * c + ch;
                        let y = (x.data[i] as f64 - mean) / (var + 1e-6).sqrt()
                            * g.scale[ch] as f64
                            + g.bias[ch] as f64;
                        let want = y / (1.0 + (-y).exp());
                        assert!((got.data[i] as f64 - want).abs() < 1e-5, "{i}");
                    }
                }
            }
        }
    }

    /// The vector SiLU (its own e^x) against the scalar one (libm's), from deep negative
    /// (e^−y overflows) to large positive inputs, with a tail that is not a multiple of 8.
    #[test]
    fn vector_silu_matches_the_scalar_one() {
        let x: Vec<f32> = (0..2003).map(|i| (i as f32 - 1001.0) * 0.11).collect();
        let (mul, add) = (vec![1.0; x.len()], vec![0.0; x.len()]);
        let mut want = vec![0f32; x.len()];
        silu_affine(&x, &mul, &add, &mut want);
        #[cfg(target_arch = "x86_64")]
        if lwm_core::quant::has_avx2() {
            let mut got = vec![0f32; x.len()];
            // SAFETY: AVX2 present; equal lengths.
            unsafe { silu_affine_avx2(&x, &mul, &add, &mut got) };
            for ((g, w), v) in got.iter().zip(&want).zip(&x) {
                // Past y = −88 the clamped e^−y leaves |silu| < 1e-35 instead of 0.
                let tol = (4.0 * f32::EPSILON * w.abs()).max(1e-30);
                assert!((g - w).abs() <= tol, "silu({v}): {g} vs {w}");
            }
        }
        assert_eq!(want[1001], 0.0);
        assert!((want[2002] - x[2002]).abs() < 1e-4);
    }

    #[test]
    fn upsample_repeats_each_pixel_twice_in_both_directions() {
        let x = Act::new(1, 2, 2, 2, vec![1., 2., 3., 4., 5., 6., 7., 8.]);
        let u = x.upsample2();
        assert_eq!((u.h, u.w), (4, 4));
        assert_eq!(&u.data[..8], &[1., 2., 1., 2., 3., 4., 3., 4.]);
        assert_eq!(&u.data[8..16], &[1., 2., 1., 2., 3., 4., 3., 4.]);
        assert_eq!(&u.data[16..18], &[5., 6.]);
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// `cargo test -p lwm-vision --release conv_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn conv_speed() {
        for &(hw, cin, cout, k) in &[(256, 128, 128, 3), (128, 256, 256, 3), (16, 768, 768, 3)] {
            let x = Act::new(
                1,
                hw,
                hw,
                cin,
                lwm_core::rng::XorShift::new(1).vec(hw * hw * cin, -1.0, 1.0),
            );
            let w = lwm_core::rng::XorShift::new(2).vec(k * k * cin * cout, -0.1, 0.1);
            let conv = Conv2d::new(k, cin, cout, &w, &vec![0.0; cout]);
            let _ = conv.same(&x);
            let t = std::time::Instant::now();
            let reps = 3;
            for _ in 0..reps {
                std::hint::black_box(conv.same(&x));
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            let gf = 2.0 * (hw * hw * cin * cout * k * k) as f64 / 1e9;
            eprintln!(
                "conv {hw}² {cin}->{cout} k{k}: {:.1} ms, {:.1} GFLOP/s",
                s * 1e3,
                gf / s
            );
            let g = GroupNorm {
                scale: vec![1.0; cin],
                bias: vec![0.0; cin],
            };
            let t = std::time::Instant::now();
            std::hint::black_box(group_norm_silu(&x, &g, 32, 1e-6));
            eprintln!(
                "  group_norm_silu {hw}² × {cin}: {:.1} ms",
                t.elapsed().as_secs_f64() * 1e3
            );
        }
    }
}
