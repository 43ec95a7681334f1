//! Half-precision weights (f16, bf16) in row panels, and their product
//! `y (n × rows) = x (n × cols) · Wᵀ`.
//!
//! Layout: the rows are grouped in panels of `PANEL` = 32; a panel stores its columns one
//! step after another, a step being the panel's 32 rows of `step` adjacent columns (f16:
//! one column, `(r, k)` at `(r / 32)·32·cols + k·32 + r % 32`; bf16: a pair, row by row,
//! because `vdpbf16ps` multiplies pairs of adjacent columns). The last panel is padded
//! with zero rows, an odd bf16 matrix with a zero column. Same 2 bytes per weight; the
//! GGUF / safetensors / JAX row-major bytes are reordered once at load.
//!
//! Why: a kernel then keeps one accumulator lane per output row and broadcasts one
//! activation per column (an outer product per column):
//!
//! ```text
//!   y[a][r] = 0;  for k in 0..cols, in order:  y[a][r] = fma(w[r][k], x[a][k], y[a][r])
//! ```
//!
//! One rounded FMA chain per output, nothing else: no lane tree and no horizontal sums
//! (which cost the row-major kernel a third of its time in prefill), and the result is the
//! same bit for bit on AVX-512, AVX2 and in portable code (`f32::mul_add`), for any batch
//! size, tiling or thread split. A chain may be cut into column blocks (the accumulators
//! are stored to `y` and loaded again, which is exact), so the GEMM blocks columns for the
//! caches. The chain is long (4096 or 11008 terms), but its error bound, `cols · ε` of
//! Σ|w·x|, is what BLAS GEMMs give as well; the tests hold it to 1e-5 of Σ|w·x|.
//!
//! bf16 weights with bf16-rounded activations on a CPU with AVX512_BF16 (`Op::Bf16Dot`)
//! take `vdpbf16ps` instead, 32 products per instruction: per pair of columns,
//!
//! ```text
//!   y[a][r] += w[r][k+1]·x[a][k+1];  y[a][r] += w[r][k]·x[a][k]
//! ```
//!
//! (the products exact, each add rounded, subnormals flushed: measured on Zen 4/5), one
//! chain per output again.
//!
//! A register tile is `RV` vectors of rows (L = 16 rows on AVX-512, 8 on AVX2) × `AR`
//! activation rows: per step one load (+ widening) per row vector, one broadcast per
//! activation row and RV·AR FMAs. The GEMM runs 32 × 12 tiles (AVX-512: 24 accumulators)
//! or 16 × 6 (AVX2: 12); a few activation rows (decode) run taller tiles so that at least
//! 8 independent chains hide the FMA latency while the weights stream from memory once.
//! The activations of a block are packed group by group (`[step][row][column of the
//! step]`), so a tile's broadcasts read one sequential stream.

use anyhow::{bail, Result};

/// Rows per panel.
pub const PANEL: usize = 32;

/// Rows rounded up to whole panels.
pub fn padded_rows(rows: usize) -> usize {
    rows.next_multiple_of(PANEL)
}

/// Index of weight (r, k) in a panel-ordered buffer of `cols` columns stored `step` at a
/// time.
#[inline(always)]
pub fn index(step: usize, cols: usize, r: usize, k: usize) -> usize {
    let pc = cols.next_multiple_of(step);
    (r / PANEL) * PANEL * pc + (k / step) * PANEL * step + (r % PANEL) * step + k % step
}

/// Reorders a row-major `rows × cols` matrix (`get(i)` = element i of the row-major
/// order) into panels of `step`-column steps. Reads the source a panel at a time: 32 rows,
/// each sequentially.
pub fn pack(
    name: &str,
    rows: usize,
    cols: usize,
    step: usize,
    get: impl Fn(usize) -> u16,
) -> Result<Vec<u16>> {
    let pc = cols.next_multiple_of(step);
    let len = padded_rows(rows)
        .checked_mul(pc)
        .ok_or_else(|| anyhow::anyhow!("{name} matrix [{rows}, {cols}] is too large"))?;
    let mut out = Vec::new();
    if out.try_reserve_exact(len).is_err() {
        bail!(
            "{name} matrix [{rows}, {cols}]: cannot allocate {} MB for its weights",
            (len * 2) >> 20
        );
    }
    out.resize(len, 0u16);
    for p in 0..padded_rows(rows) / PANEL {
        let panel = &mut out[p * PANEL * pc..(p + 1) * PANEL * pc];
        for l in 0..PANEL.min(rows - p * PANEL) {
            let src = (p * PANEL + l) * cols;
            for k in 0..cols {
                panel[(k / step) * PANEL * step + l * step + k % step] = get(src + k);
            }
        }
    }
    Ok(out)
}

/// The product a kernel computes (the weights' format and the multiply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    /// f16 weights, one column per step, FMA chains.
    F16,
    /// bf16 weights, column pairs, FMA chains (column k, then k + 1).
    Bf16,
    /// bf16 weights × bf16-rounded activations with `vdpbf16ps` (AVX512_BF16 only).
    Bf16Dot,
}

impl Op {
    pub fn step(self) -> usize {
        match self {
            Op::F16 => 1,
            Op::Bf16 | Op::Bf16Dot => 2,
        }
    }
}

/// Where outputs go: `y[a][r]` at `p + a·stride + r` (only rows `< rows` exist).
#[derive(Clone, Copy)]
pub(super) struct Out {
    pub p: *mut f32,
    pub stride: usize,
    pub rows: usize,
}

/// Columns per block of the GEMM (the chains are stored and reloaded between blocks).
const KC: usize = 256;
/// Activation rows per GEMM block: their KC-column slice (96 KB) stays in L2 while every
/// panel of the task passes over it; one panel's slice (16 KB) stays in L1 for the
/// block's activation rows.
const NB: usize = 96;

/// The portable kernel: each output's FMA chain, in column order (`Op::F16`, `Op::Bf16`).
///
/// SAFETY: `out` covers n activation rows of `out.rows` outputs; panels p0..p0+np exist and
/// no other thread writes their outputs.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn portable(
    op: Op,
    data: &[u16],
    cols: usize,
    x: &[f32],
    n: usize,
    p0: usize,
    np: usize,
    out: Out,
) {
    let step = op.step();
    let widen = |b: u16| match op {
        Op::F16 => half::f16::from_bits(b).to_f32(),
        Op::Bf16 | Op::Bf16Dot => f32::from_bits((b as u32) << 16),
    };
    for a in 0..n {
        let xr = &x[a * cols..(a + 1) * cols];
        for r in p0 * PANEL..((p0 + np) * PANEL).min(out.rows) {
            let mut acc = 0.0f32;
            for (k, &xv) in xr.iter().enumerate() {
                acc = widen(data[index(step, cols, r, k)]).mul_add(xv, acc);
            }
            *out.p.add(a * out.stride + r) = acc;
        }
    }
}

// The tiles index accumulators [row vector][activation row] by both loop variables.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
pub(super) mod simd {
    use super::{Op, Out, KC, NB, PANEL};
    use std::arch::x86_64::*;

    /// One vector width: L f32 lanes.
    trait Lanes: Copy {
        const L: usize;
        /// Activation rows of the GEMM tile (with 2 row vectors: 2·AR accumulators, 2
        /// weight vectors and a broadcast fit the register file).
        const AR: usize;
        unsafe fn zero() -> Self;
        /// L f16 weights at p, widened.
        unsafe fn load_f16(p: *const u16) -> Self;
        /// Column `S` (0 or 1) of the L bf16 pairs at p, widened (exact).
        unsafe fn load_bf16<const S: usize>(p: *const u16) -> Self;
        unsafe fn load(p: *const f32) -> Self;
        unsafe fn store(self, p: *mut f32);
        unsafe fn splat(v: f32) -> Self;
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
    }

    #[derive(Clone, Copy)]
    struct V8(__m256);
    #[derive(Clone, Copy)]
    struct V16(__m512);

    impl Lanes for V8 {
        const L: usize = 8;
        const AR: usize = 6;
        #[inline(always)]
        unsafe fn zero() -> Self {
            V8(_mm256_setzero_ps())
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> Self {
            V8(_mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)))
        }
        #[inline(always)]
        unsafe fn load_bf16<const S: usize>(p: *const u16) -> Self {
            let v = _mm256_loadu_si256(p as *const __m256i);
            V8(_mm256_castsi256_ps(if S == 0 {
                _mm256_slli_epi32(v, 16)
            } else {
                _mm256_and_si256(v, _mm256_set1_epi32(-65536))
            }))
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            V8(_mm256_loadu_ps(p))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm256_storeu_ps(p, self.0)
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            V8(_mm256_set1_ps(v))
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            V8(_mm256_fmadd_ps(a.0, b.0, c.0))
        }
    }

    impl Lanes for V16 {
        const L: usize = 16;
        const AR: usize = 12;
        #[inline(always)]
        unsafe fn zero() -> Self {
            V16(_mm512_setzero_ps())
        }
        #[inline(always)]
        unsafe fn load_f16(p: *const u16) -> Self {
            V16(_mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)))
        }
        #[inline(always)]
        unsafe fn load_bf16<const S: usize>(p: *const u16) -> Self {
            let v = _mm512_loadu_si512(p as *const __m512i);
            V16(_mm512_castsi512_ps(if S == 0 {
                _mm512_slli_epi32(v, 16)
            } else {
                _mm512_and_si512(v, _mm512_set1_epi32(-65536))
            }))
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            V16(_mm512_loadu_ps(p))
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm512_storeu_ps(p, self.0)
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            V16(_mm512_set1_ps(v))
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            V16(_mm512_fmadd_ps(a.0, b.0, c.0))
        }
    }

    /// One step of columns of a tile, for one `Op`.
    trait Step<V: Lanes> {
        /// Columns per step (as the panels store them).
        const STEP: usize;
        /// Packed values per step and activation row.
        const XW: usize;
        /// Packs activation row j of a group of `ar` (its columns `src`, zero past the
        /// end) at `dst` (`[step][j][XW]`).
        #[inline(always)]
        unsafe fn pack(src: &[f32], j: usize, ar: usize, dst: *mut f32) {
            for t in 0..src.len().div_ceil(Self::STEP) {
                for s in 0..Self::STEP {
                    let v = src.get(t * Self::STEP + s).copied().unwrap_or(0.0);
                    *dst.add((t * ar + j) * Self::STEP + s) = v;
                }
            }
        }
        /// acc[i][j] continued by one step: the weights of row vector i at wp[i], the
        /// step's packed activations at xk.
        unsafe fn step<const RV: usize, const AR: usize>(
            acc: &mut [[V; AR]; RV],
            wp: &[*const u16; RV],
            xk: *const f32,
        );
    }

    struct F16;
    struct Bf16;
    struct Bf16Dot;

    impl<V: Lanes> Step<V> for F16 {
        const STEP: usize = 1;
        const XW: usize = 1;
        #[inline(always)]
        unsafe fn step<const RV: usize, const AR: usize>(
            acc: &mut [[V; AR]; RV],
            wp: &[*const u16; RV],
            xk: *const f32,
        ) {
            let mut wv = [V::zero(); RV];
            for i in 0..RV {
                wv[i] = V::load_f16(wp[i]);
            }
            for j in 0..AR {
                let xb = V::splat(*xk.add(j));
                for i in 0..RV {
                    acc[i][j] = V::fma(wv[i], xb, acc[i][j]);
                }
            }
        }
    }

    impl<V: Lanes> Step<V> for Bf16 {
        const STEP: usize = 2;
        const XW: usize = 2;
        #[inline(always)]
        unsafe fn step<const RV: usize, const AR: usize>(
            acc: &mut [[V; AR]; RV],
            wp: &[*const u16; RV],
            xk: *const f32,
        ) {
            // Column k for every row, then k + 1: the chain's order. Widening one column
            // at a time keeps AVX2's 12 accumulators, 2 weights and a broadcast in 16 ymm.
            let mut wv = [V::zero(); RV];
            for i in 0..RV {
                wv[i] = V::load_bf16::<0>(wp[i]);
            }
            for j in 0..AR {
                let xb = V::splat(*xk.add(2 * j));
                for i in 0..RV {
                    acc[i][j] = V::fma(wv[i], xb, acc[i][j]);
                }
            }
            for i in 0..RV {
                wv[i] = V::load_bf16::<1>(wp[i]);
            }
            for j in 0..AR {
                let xb = V::splat(*xk.add(2 * j + 1));
                for i in 0..RV {
                    acc[i][j] = V::fma(wv[i], xb, acc[i][j]);
                }
            }
        }
    }

    impl Step<V16> for Bf16Dot {
        const STEP: usize = 2;
        const XW: usize = 1;
        /// One u32 per step and row: the pair's bf16 bits (column k low), stored in an f32
        /// slot. The activations are bf16-rounded already, so the top halves are exact.
        #[inline(always)]
        unsafe fn pack(src: &[f32], j: usize, ar: usize, dst: *mut f32) {
            let bits = |i: usize| src.get(i).map_or(0, |v| v.to_bits() >> 16);
            for t in 0..src.len().div_ceil(2) {
                let pair = bits(2 * t) | (bits(2 * t + 1) << 16);
                *dst.add(t * ar + j) = f32::from_bits(pair);
            }
        }
        #[inline(always)]
        unsafe fn step<const RV: usize, const AR: usize>(
            acc: &mut [[V16; AR]; RV],
            wp: &[*const u16; RV],
            xk: *const f32,
        ) {
            let mut wv = [_mm512_setzero_si512(); RV];
            for i in 0..RV {
                wv[i] = _mm512_loadu_si512(wp[i] as *const __m512i);
            }
            for j in 0..AR {
                let xb: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32((*xk.add(j)).to_bits() as i32));
                for i in 0..RV {
                    let w: __m512bh = std::mem::transmute(wv[i]);
                    acc[i][j] = V16(_mm512_dpbf16_ps(acc[i][j].0, w, xb));
                }
            }
        }
    }

    /// SAFETY: AVX-512F available, and AVX512_BF16 for `Op::Bf16Dot`; as `super::portable`.
    #[allow(clippy::too_many_arguments)]
    pub(in super::super) unsafe fn run_avx512(
        op: Op,
        data: &[u16],
        cols: usize,
        x: &[f32],
        n: usize,
        p0: usize,
        np: usize,
        out: Out,
    ) {
        let job = Job { data, cols, out };
        match op {
            Op::F16 => avx512::<F16>(&job, x, n, p0, np),
            Op::Bf16 => avx512::<Bf16>(&job, x, n, p0, np),
            Op::Bf16Dot => avx512_dot(&job, x, n, p0, np),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    unsafe fn avx512<K: Step<V16>>(job: &Job, x: &[f32], n: usize, p0: usize, np: usize) {
        job.run::<V16, K>(x, n, p0, np)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bf16")]
    unsafe fn avx512_dot(job: &Job, x: &[f32], n: usize, p0: usize, np: usize) {
        job.run::<V16, Bf16Dot>(x, n, p0, np)
    }

    /// SAFETY: AVX2/FMA/F16C available; `op` is not `Bf16Dot`; as `super::portable`.
    #[allow(clippy::too_many_arguments)]
    pub(in super::super) unsafe fn run_avx2(
        op: Op,
        data: &[u16],
        cols: usize,
        x: &[f32],
        n: usize,
        p0: usize,
        np: usize,
        out: Out,
    ) {
        let job = Job { data, cols, out };
        match op {
            Op::F16 => avx2::<F16>(&job, x, n, p0, np),
            _ => avx2::<Bf16>(&job, x, n, p0, np),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn avx2<K: Step<V8>>(job: &Job, x: &[f32], n: usize, p0: usize, np: usize) {
        job.run::<V8, K>(x, n, p0, np)
    }

    /// The operands of one task.
    struct Job<'a> {
        data: &'a [u16],
        cols: usize,
        out: Out,
    }

    /// One block of activation rows and columns, packed.
    struct Block {
        /// Group g0 (rows a0+g0..a0+g0+ar) at `xp + g0·width`, `[step][j][XW]`.
        xp: *const f32,
        /// Packed values per activation row: the block's steps × XW.
        width: usize,
        a0: usize,
        na: usize,
        group: usize,
        k0: usize,
        /// Steps in the block.
        steps: usize,
    }

    impl Block {
        /// The groups: (first row within the block, rows, packed activations).
        fn groups(&self) -> impl Iterator<Item = (usize, usize, *const f32)> + '_ {
            (0..self.na).step_by(self.group).map(move |g0| {
                let ar = self.group.min(self.na - g0);
                (g0, ar, self.xp.wrapping_add(g0 * self.width))
            })
        }
    }

    impl Job<'_> {
        #[inline(always)]
        unsafe fn run<V: Lanes, K: Step<V>>(&self, x: &[f32], n: usize, p0: usize, np: usize) {
            let (cols, out) = (self.cols, self.out);
            // Row vectors of the task (PANEL / L per panel).
            let v0 = p0 * PANEL / V::L;
            let nv = np * PANEL / V::L;
            // Row vectors whose rows all exist write straight into y; a partial last panel
            // goes through a buffer.
            let full_rows = out.rows - out.rows % PANEL;
            let nv_direct = (full_rows / V::L).saturating_sub(v0).min(nv);
            // A few rows (decode): one block of all columns, one group, tall tiles.
            let (kc, nb, group) = if n < V::AR {
                (cols, n, n)
            } else {
                (KC.min(cols), NB, V::AR)
            };
            let width = kc.div_ceil(K::STEP) * K::XW;
            let mut packed = vec![0.0f32; nb.min(n) * width];
            for a0 in (0..n).step_by(nb) {
                let na = nb.min(n - a0);
                for k0 in (0..cols).step_by(kc) {
                    let k1 = (k0 + kc).min(cols);
                    let steps = (k1 - k0).div_ceil(K::STEP);
                    let width = steps * K::XW;
                    for g0 in (0..na).step_by(group) {
                        let ar = group.min(na - g0);
                        let dst = packed.as_mut_ptr().add(g0 * width);
                        for j in 0..ar {
                            let row = (a0 + g0 + j) * cols;
                            K::pack(&x[row + k0..row + k1], j, ar, dst);
                        }
                    }
                    let blk = Block {
                        xp: packed.as_ptr(),
                        width,
                        a0,
                        na,
                        group,
                        k0,
                        steps,
                    };
                    self.block::<V, K>(&blk, v0, nv_direct);
                    if nv_direct < nv {
                        self.partial_panel::<V, K>(&blk, v0 + nv_direct, nv - nv_direct);
                    }
                }
            }
        }

        /// Row vectors v0..v0+nv (all their rows exist) × the block, accumulating into y.
        #[inline(always)]
        unsafe fn block<V: Lanes, K: Step<V>>(&self, b: &Block, v0: usize, nv: usize) {
            let (y, ys) = (self.out.p, self.out.stride);
            for (g0, ar, xg) in b.groups() {
                let a = b.a0 + g0;
                let mut v = v0;
                // Tall tiles for a few activation rows: 8 or more chains per tile.
                if ar <= 3 {
                    let rv = match (ar, V::L) {
                        (1, 16) => 8,
                        _ => 4,
                    };
                    while v + rv <= v0 + nv {
                        let yp = y.add(a * ys + v * V::L);
                        self.tiles::<V, K>(rv, ar, v, xg, yp, ys, b);
                        v += rv;
                    }
                }
                while v + 2 <= v0 + nv {
                    self.tiles::<V, K>(2, ar, v, xg, y.add(a * ys + v * V::L), ys, b);
                    v += 2;
                }
                if v < v0 + nv {
                    self.tiles::<V, K>(1, ar, v, xg, y.add(a * ys + v * V::L), ys, b);
                }
            }
        }

        /// The last panel when its rows do not all exist: its outputs go through a buffer.
        #[inline(always)]
        unsafe fn partial_panel<V: Lanes, K: Step<V>>(&self, b: &Block, v: usize, nv: usize) {
            let r0 = v * V::L;
            let live = self.out.rows - r0;
            let mut buf = [0.0f32; 12 * PANEL];
            for (g0, ar, xg) in b.groups() {
                for j in 0..ar {
                    let yrow = self.out.p.add((b.a0 + g0 + j) * self.out.stride + r0);
                    for i in 0..live {
                        buf[j * PANEL + i] = *yrow.add(i);
                    }
                }
                let mut i = 0;
                while i < nv {
                    let rv = if i + 2 <= nv { 2 } else { 1 };
                    let yp = buf.as_mut_ptr().add(i * V::L);
                    self.tiles::<V, K>(rv, ar, v + i, xg, yp, PANEL, b);
                    i += rv;
                }
                for j in 0..ar {
                    let yrow = self.out.p.add((b.a0 + g0 + j) * self.out.stride + r0);
                    for i in 0..live {
                        *yrow.add(i) = buf[j * PANEL + i];
                    }
                }
            }
        }

        /// Dispatch to a const-shaped tile.
        #[allow(clippy::too_many_arguments)]
        #[inline(always)]
        unsafe fn tiles<V: Lanes, K: Step<V>>(
            &self,
            rv: usize,
            ar: usize,
            v: usize,
            xg: *const f32,
            yp: *mut f32,
            ys: usize,
            b: &Block,
        ) {
            macro_rules! by_ar {
                ($rv:literal) => {
                    match ar {
                        1 => self.tile::<V, K, $rv, 1>(v, xg, yp, ys, b),
                        2 => self.tile::<V, K, $rv, 2>(v, xg, yp, ys, b),
                        3 => self.tile::<V, K, $rv, 3>(v, xg, yp, ys, b),
                        4 => self.tile::<V, K, $rv, 4>(v, xg, yp, ys, b),
                        5 => self.tile::<V, K, $rv, 5>(v, xg, yp, ys, b),
                        6 => self.tile::<V, K, $rv, 6>(v, xg, yp, ys, b),
                        7 => self.tile::<V, K, $rv, 7>(v, xg, yp, ys, b),
                        8 => self.tile::<V, K, $rv, 8>(v, xg, yp, ys, b),
                        9 => self.tile::<V, K, $rv, 9>(v, xg, yp, ys, b),
                        10 => self.tile::<V, K, $rv, 10>(v, xg, yp, ys, b),
                        11 => self.tile::<V, K, $rv, 11>(v, xg, yp, ys, b),
                        _ => self.tile::<V, K, $rv, 12>(v, xg, yp, ys, b),
                    }
                };
            }
            match rv {
                8 => self.tile::<V, K, 8, 1>(v, xg, yp, ys, b),
                4 => match ar {
                    1 => self.tile::<V, K, 4, 1>(v, xg, yp, ys, b),
                    2 => self.tile::<V, K, 4, 2>(v, xg, yp, ys, b),
                    _ => self.tile::<V, K, 4, 3>(v, xg, yp, ys, b),
                },
                2 => by_ar!(2),
                _ => by_ar!(1),
            }
        }

        /// Row vectors v..v+RV × the AR activation rows packed at `xg` over the block's
        /// steps: loads the chains from `yp` (`y[j][row]` at `yp + j·ys + i·L + lane`),
        /// continues them, stores them back.
        #[inline(always)]
        unsafe fn tile<V: Lanes, K: Step<V>, const RV: usize, const AR: usize>(
            &self,
            v: usize,
            xg: *const f32,
            yp: *mut f32,
            ys: usize,
            b: &Block,
        ) {
            let step = K::STEP;
            let pc = self.cols.next_multiple_of(step);
            let mut acc = [[V::zero(); AR]; RV];
            for i in 0..RV {
                for j in 0..AR {
                    acc[i][j] = V::load(yp.add(j * ys + i * V::L));
                }
            }
            // Row vector i: panel r / 32, rows from r % 32, at the block's first step.
            let mut wp = [std::ptr::null::<u16>(); RV];
            for i in 0..RV {
                let r = (v + i) * V::L;
                wp[i] = self.data.as_ptr().add(
                    (r / PANEL) * PANEL * pc + (b.k0 / step) * PANEL * step + (r % PANEL) * step,
                );
            }
            let mut xk = xg;
            for _ in 0..b.steps {
                K::step::<RV, AR>(&mut acc, &wp, xk);
                for p in wp.iter_mut() {
                    *p = p.add(PANEL * step);
                }
                xk = xk.add(AR * K::XW);
            }
            for i in 0..RV {
                for j in 0..AR {
                    acc[i][j].store(yp.add(j * ys + i * V::L));
                }
            }
        }
    }
}
