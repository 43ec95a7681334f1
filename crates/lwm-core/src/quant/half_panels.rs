//! f16 weights in row panels, and their product `y (n × rows) = x (n × cols) · Wᵀ`.
//!
//! Layout: the rows are grouped in panels of `PANEL` = 32; a panel stores its columns one
//! after another, each column as the panel's 32 values (`(r, k)` at
//! `(r / 32)·32·cols + k·32 + r % 32`). The last panel is padded with zero rows. Same 2
//! bytes per weight; the GGUF / safetensors row-major bytes are reordered once at load.
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
//! A register tile is `RV` vectors of rows (L = 16 rows on AVX-512, 8 on AVX2) × `AR`
//! activation rows: per column one load + `vcvtph2ps` per row vector, one broadcast per
//! activation row and RV·AR FMAs. The GEMM runs 32 × 12 tiles (AVX-512: 24 accumulators)
//! or 16 × 6 (AVX2: 12); a few activation rows (decode) run taller tiles so that at least
//! 8 independent chains hide the FMA latency while the weights stream from memory once.

use anyhow::{bail, Result};

/// Rows per panel.
pub const PANEL: usize = 32;

/// Rows rounded up to whole panels.
pub fn padded_rows(rows: usize) -> usize {
    rows.next_multiple_of(PANEL)
}

/// Index of weight (r, k) in a panel-ordered buffer of `cols` columns.
#[inline(always)]
pub fn index(cols: usize, r: usize, k: usize) -> usize {
    (r / PANEL) * PANEL * cols + k * PANEL + r % PANEL
}

/// Reorders a row-major `rows × cols` matrix (`get(i)` = element i of the row-major
/// order) into panels. Reads the source a panel at a time: 32 rows, each sequentially.
pub fn pack(rows: usize, cols: usize, get: impl Fn(usize) -> u16) -> Result<Vec<u16>> {
    let len = padded_rows(rows)
        .checked_mul(cols)
        .ok_or_else(|| anyhow::anyhow!("f16 matrix [{rows}, {cols}] is too large"))?;
    let mut out = Vec::new();
    if out.try_reserve_exact(len).is_err() {
        bail!(
            "f16 matrix [{rows}, {cols}]: cannot allocate {} MB for its weights",
            (len * 2) >> 20
        );
    }
    out.resize(len, 0u16);
    for p in 0..padded_rows(rows) / PANEL {
        let panel = &mut out[p * PANEL * cols..(p + 1) * PANEL * cols];
        for l in 0..PANEL.min(rows - p * PANEL) {
            let src = (p * PANEL + l) * cols;
            for k in 0..cols {
                panel[k * PANEL + l] = get(src + k);
            }
        }
    }
    Ok(out)
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

/// The portable kernel: each output's FMA chain, in column order.
///
/// SAFETY: `out` covers n activation rows of `out.rows` outputs; panels p0..p0+np exist and
/// no other thread writes their outputs.
pub(super) unsafe fn portable(
    data: &[u16],
    cols: usize,
    x: &[f32],
    n: usize,
    p0: usize,
    np: usize,
    out: Out,
) {
    for a in 0..n {
        let xr = &x[a * cols..(a + 1) * cols];
        for r in p0 * PANEL..((p0 + np) * PANEL).min(out.rows) {
            let base = (r / PANEL) * PANEL * cols + r % PANEL;
            let mut acc = 0.0f32;
            for (k, &xv) in xr.iter().enumerate() {
                let wv = half::f16::from_bits(data[base + k * PANEL]).to_f32();
                acc = wv.mul_add(xv, acc);
            }
            *out.p.add(a * out.stride + r) = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod simd {
    use super::{Out, KC, NB, PANEL};
    use std::arch::x86_64::*;

    /// One vector width: L f32 lanes.
    trait Lanes: Copy {
        const L: usize;
        /// Activation rows of the GEMM tile (with 2 row vectors: 2·AR accumulators, 2
        /// weight vectors and a broadcast fit the register file).
        const AR: usize;
        unsafe fn zero() -> Self;
        unsafe fn load_f16(p: *const u16) -> Self;
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

    /// SAFETY: AVX-512F available; as `super::portable`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    pub(in super::super) unsafe fn run_avx512(
        data: &[u16],
        cols: usize,
        x: &[f32],
        n: usize,
        p0: usize,
        np: usize,
        out: Out,
    ) {
        run::<V16>(data, cols, x, n, p0, np, out)
    }

    /// SAFETY: AVX2/FMA/F16C available; as `super::portable`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in super::super) unsafe fn run_avx2(
        data: &[u16],
        cols: usize,
        x: &[f32],
        n: usize,
        p0: usize,
        np: usize,
        out: Out,
    ) {
        run::<V8>(data, cols, x, n, p0, np, out)
    }

    /// The operands of one task.
    struct Job<'a> {
        data: &'a [u16],
        cols: usize,
        out: Out,
    }

    #[inline(always)]
    unsafe fn run<V: Lanes>(
        data: &[u16],
        cols: usize,
        x: &[f32],
        n: usize,
        p0: usize,
        np: usize,
        out: Out,
    ) {
        let job = Job { data, cols, out };
        // Row vectors of the task (PANEL / L per panel).
        let v0 = p0 * PANEL / V::L;
        let nv = np * PANEL / V::L;
        // Row vectors whose rows all exist write straight into y; a partial last panel goes
        // through a buffer.
        let full_rows = out.rows - out.rows % PANEL;
        let nv_direct = (full_rows / V::L).saturating_sub(v0).min(nv);
        // A few rows (decode): one block of all columns, one group, tall tiles.
        let (kc, nb, group) = if n < V::AR {
            (cols, n, n)
        } else {
            (KC.min(cols), NB, V::AR)
        };
        // The block's activations, packed group by group as [column][row of the group]:
        // a tile's broadcasts then read one sequential stream instead of AR rows `cols`
        // apart (which share L1 sets).
        let mut packed = vec![0.0f32; nb.min(n) * kc];
        for a0 in (0..n).step_by(nb) {
            let na = nb.min(n - a0);
            for k0 in (0..cols).step_by(kc) {
                let k1 = (k0 + kc).min(cols);
                let w = k1 - k0;
                for g0 in (0..na).step_by(group) {
                    let ar = group.min(na - g0);
                    let dst = &mut packed[g0 * w..(g0 + ar) * w];
                    for j in 0..ar {
                        let src = &x[(a0 + g0 + j) * cols + k0..(a0 + g0 + j) * cols + k1];
                        for (k, &v) in src.iter().enumerate() {
                            dst[k * ar + j] = v;
                        }
                    }
                }
                let blk = Block {
                    xp: packed.as_ptr(),
                    a0,
                    na,
                    group,
                    k0,
                    k1,
                };
                job.block::<V>(&blk, v0, nv_direct);
                if nv_direct < nv {
                    job.partial_panel::<V>(&blk, v0 + nv_direct, nv - nv_direct);
                }
            }
        }
    }

    /// One block of activation rows and columns, packed.
    struct Block {
        /// Group g0 (rows a0+g0..a0+g0+ar) at `xp + g0·(k1 − k0)`, `[k − k0][j]`.
        xp: *const f32,
        a0: usize,
        na: usize,
        group: usize,
        k0: usize,
        k1: usize,
    }

    impl Block {
        /// The groups: (first row within the block, rows, packed activations).
        fn groups(&self) -> impl Iterator<Item = (usize, usize, *const f32)> + '_ {
            let w = self.k1 - self.k0;
            (0..self.na).step_by(self.group).map(move |g0| {
                let ar = self.group.min(self.na - g0);
                (g0, ar, self.xp.wrapping_add(g0 * w))
            })
        }
    }

    impl Job<'_> {
        /// Row vectors v0..v0+nv (all their rows exist) × the block, accumulating into y.
        #[inline(always)]
        unsafe fn block<V: Lanes>(&self, b: &Block, v0: usize, nv: usize) {
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
                        self.tiles::<V>(rv, ar, v, xg, yp, ys, b);
                        v += rv;
                    }
                }
                while v + 2 <= v0 + nv {
                    self.tiles::<V>(2, ar, v, xg, y.add(a * ys + v * V::L), ys, b);
                    v += 2;
                }
                if v < v0 + nv {
                    self.tiles::<V>(1, ar, v, xg, y.add(a * ys + v * V::L), ys, b);
                }
            }
        }

        /// The last panel when its rows do not all exist: its outputs go through a buffer.
        #[inline(always)]
        unsafe fn partial_panel<V: Lanes>(&self, b: &Block, v: usize, nv: usize) {
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
                    self.tiles::<V>(rv, ar, v + i, xg, yp, PANEL, b);
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
        unsafe fn tiles<V: Lanes>(
            &self,
            rv: usize,
            ar: usize,
            v: usize,
            xg: *const f32,
            yp: *mut f32,
            ys: usize,
            b: &Block,
        ) {
            let (k0, k1) = (b.k0, b.k1);
            macro_rules! by_ar {
                ($rv:literal) => {
                    match ar {
                        1 => self.tile::<V, $rv, 1>(v, xg, yp, ys, k0, k1),
                        2 => self.tile::<V, $rv, 2>(v, xg, yp, ys, k0, k1),
                        3 => self.tile::<V, $rv, 3>(v, xg, yp, ys, k0, k1),
                        4 => self.tile::<V, $rv, 4>(v, xg, yp, ys, k0, k1),
                        5 => self.tile::<V, $rv, 5>(v, xg, yp, ys, k0, k1),
                        6 => self.tile::<V, $rv, 6>(v, xg, yp, ys, k0, k1),
                        7 => self.tile::<V, $rv, 7>(v, xg, yp, ys, k0, k1),
                        8 => self.tile::<V, $rv, 8>(v, xg, yp, ys, k0, k1),
                        9 => self.tile::<V, $rv, 9>(v, xg, yp, ys, k0, k1),
                        10 => self.tile::<V, $rv, 10>(v, xg, yp, ys, k0, k1),
                        11 => self.tile::<V, $rv, 11>(v, xg, yp, ys, k0, k1),
                        _ => self.tile::<V, $rv, 12>(v, xg, yp, ys, k0, k1),
                    }
                };
            }
            match rv {
                8 => self.tile::<V, 8, 1>(v, xg, yp, ys, k0, k1),
                4 => match ar {
                    1 => self.tile::<V, 4, 1>(v, xg, yp, ys, k0, k1),
                    2 => self.tile::<V, 4, 2>(v, xg, yp, ys, k0, k1),
                    _ => self.tile::<V, 4, 3>(v, xg, yp, ys, k0, k1),
                },
                2 => by_ar!(2),
                _ => by_ar!(1),
            }
        }

        /// Row vectors v..v+RV × the AR activation rows packed at `xg` (`[k − k0][j]`)
        /// over columns k0..k1: loads the chains from `yp` (`y[j][row]` at `yp + j·ys +
        /// i·L + lane`), continues them, stores them back.
        #[inline(always)]
        #[allow(clippy::needless_range_loop)]
        unsafe fn tile<V: Lanes, const RV: usize, const AR: usize>(
            &self,
            v: usize,
            xg: *const f32,
            yp: *mut f32,
            ys: usize,
            k0: usize,
            k1: usize,
        ) {
            let cols = self.cols;
            let mut acc = [[V::zero(); AR]; RV];
            for i in 0..RV {
                for j in 0..AR {
                    acc[i][j] = V::load(yp.add(j * ys + i * V::L));
                }
            }
            // Row vector i: panel (v + i)·L / 32, lanes from ((v + i)·L) % 32.
            let mut wp = [std::ptr::null::<u16>(); RV];
            for i in 0..RV {
                let r = (v + i) * V::L;
                wp[i] = self
                    .data
                    .as_ptr()
                    .add((r / PANEL) * PANEL * cols + r % PANEL);
            }
            let mut xk = xg;
            for k in k0..k1 {
                let mut wv = [V::zero(); RV];
                for i in 0..RV {
                    wv[i] = V::load_f16(wp[i].add(k * PANEL));
                }
                for j in 0..AR {
                    let xb = V::splat(*xk.add(j));
                    for i in 0..RV {
                        acc[i][j] = V::fma(wv[i], xb, acc[i][j]);
                    }
                }
                xk = xk.add(AR);
            }
            for i in 0..RV {
                for j in 0..AR {
                    acc[i][j].store(yp.add(j * ys + i * V::L));
                }
            }
        }
    }
}
