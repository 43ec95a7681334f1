//! Half-precision weight matrices (IEEE f16 or bf16, 2 bytes per weight) and their products
//! `y (n × rows) = x (n × cols) · Wᵀ` with f32 accumulation.
//!
//! The weights stay as their 16-bit patterns (`HalfMatrix::data`, the GGUF / safetensors /
//! JAX bytes as `u16`); a kernel widens them to f32 as it reads them (f16: `vcvtph2ps`;
//! bf16: the bits shifted left by 16, which is exact) and multiplies with f32 FMAs.
//!
//! f16 matrices are stored in row panels and multiplied by `half_panels` (one FMA chain per
//! output, the same bits on every ISA). bf16 matrices stay row-major, because `vdpbf16ps`
//! multiplies pairs of adjacent columns; the rest of this module is their kernels.
//!
//! bf16 accumulation order of one output element (`y[a][r] = Σ_k x[a][k]·w[r][k]`), the same in
//! the mat-vec and the tiled GEMM, so a row's result depends on neither `n`, the thread
//! split nor the tiling (only on the ISA):
//!
//! ```text
//!   y = 0
//!   for each block of KC = 512 columns, in order:
//!       acc[l] = Σ_{k ≡ l mod L, k in the block's whole L-chunks} w_k·x_k   (lane l, in k order;
//!                FMA in the SIMD kernels, mul + add in the portable one)
//!       s = tree sum of acc (L = 16 on AVX-512: low half + high half first; then for L = 8
//!           ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)))
//!       s += w_k·x_k for the block's last cols % L columns (only the last block has them), in order
//!       y += s
//! ```
//!
//! L is 16 on AVX-512F, 8 on AVX2+FMA+F16C and in the portable code, so the ISAs agree to
//! float reordering (AVX2 vs portable: FMA vs separate rounding of the products).
//!
//! The mat-vec (n < `GEMM_MIN_ROWS`) streams the weights once for up to 3 activation rows,
//! widening 4 weight rows at a time in registers. The GEMM blocks over output rows (`RB`), columns
//! (`KC`) and activation rows (`NB`): a tile of `RB × KC` weights is widened into an f32
//! scratch buffer once and reused by every activation row of the block, 4 × 4 outputs per
//! register tile.
//!
//! `Numerics::Ggml` (llama.cpp parity) first rounds the activations to the weight's type,
//! as `ggml_vec_dot_f16` / `ggml_vec_dot_bf16` take f16 / bf16 operands (`round_x`).
//!
//! bf16 weights with rounded activations on a CPU with AVX-512 BF16 (`HalfIsa::Avx512Bf16`)
//! multiply with `vdpbf16ps`: 32 products per instruction instead of the FMA's 16, and
//! no widening. Its lanes take pairs, so the order of one output becomes
//!
//! ```text
//!   for each block of KC_DP = 2048 columns, in order:
//!       acc[l] (16 lanes) over the block's whole 32-column chunks c, in order:
//!           acc[l] += w[c+2l+1]·x[c+2l+1];  acc[l] += w[c+2l]·x[c+2l]   (each add rounded;
//!           the products are exact; subnormals flushed to zero)
//!       s = tree sum of acc as for AVX-512 above; s += the block's last cols % 32 products, in order
//!       y += s
//! ```
//!
//! which `dpbf16_reference` (tests) reproduces bit for bit in portable code.

use super::half_panels;
use super::matmul::kernel_cap;
use super::{has_avx2, has_avx512_bf16, has_avx512f, Kernel};
use anyhow::{bail, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};

/// The 16-bit float format of a `HalfMatrix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfKind {
    F16,
    Bf16,
}

impl HalfKind {
    /// The value of a stored bit pattern (exact).
    #[inline]
    pub fn to_f32(self, b: u16) -> f32 {
        match self {
            HalfKind::F16 => half::f16::from_bits(b).to_f32(),
            HalfKind::Bf16 => f32::from_bits((b as u32) << 16),
        }
    }

    /// `x` rounded to this format (nearest even), as f32.
    #[inline]
    pub fn round(self, x: f32) -> f32 {
        match self {
            HalfKind::F16 => half::f16::from_f32(x).to_f32(),
            HalfKind::Bf16 => half::bf16::from_f32(x).to_f32(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HalfKind::F16 => "F16",
            HalfKind::Bf16 => "BF16",
        }
    }
}

/// A weight matrix `[rows = out, cols = in]` of f16 or bf16 values.
#[derive(Clone)]
pub struct HalfMatrix {
    pub kind: HalfKind,
    pub rows: usize,
    pub cols: usize,
    /// The bit patterns: bf16 row-major (`vdpbf16ps` pairs adjacent columns); f16 in row
    /// panels (`half_panels`: 32 rows column by column, the last panel zero-padded).
    data: Vec<u16>,
}

impl std::fmt::Debug for HalfMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HalfMatrix({} [{}, {}])",
            self.kind.name(),
            self.rows,
            self.cols
        )
    }
}

impl HalfMatrix {
    /// From row-major bit patterns.
    pub fn new(kind: HalfKind, rows: usize, cols: usize, data: Vec<u16>) -> Result<Self> {
        if Some(data.len()) != rows.checked_mul(cols) {
            bail!(
                "{} matrix [{rows}, {cols}] needs {} values, got {}",
                kind.name(),
                rows.saturating_mul(cols),
                data.len()
            );
        }
        let data = match kind {
            HalfKind::Bf16 => data,
            HalfKind::F16 => half_panels::pack(rows, cols, |i| data[i])?,
        };
        Ok(Self {
            kind,
            rows,
            cols,
            data,
        })
    }

    /// The bit pattern of weight (r, k).
    #[inline]
    pub fn bits(&self, r: usize, k: usize) -> u16 {
        match self.kind {
            HalfKind::Bf16 => self.data[r * self.cols + k],
            HalfKind::F16 => self.data[half_panels::index(self.cols, r, k)],
        }
    }

    /// `Some` for 2-D GGUF F16 / BF16 tensors (their bytes, copied once), `None` otherwise.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let kind = match q.dtype() {
            GgmlDType::F16 => HalfKind::F16,
            GgmlDType::BF16 => HalfKind::Bf16,
            _ => return Ok(None),
        };
        let dims = q.shape().dims();
        if dims.len() != 2 {
            return Ok(None);
        }
        let bytes = q.data()?;
        let (rows, cols) = (dims[0], dims[1]);
        if Some(bytes.len()) != rows.checked_mul(cols).and_then(|v| v.checked_mul(2)) {
            bail!(
                "{} matrix [{rows}, {cols}] has {} bytes",
                kind.name(),
                bytes.len()
            );
        }
        let at = |i: usize| u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]);
        let data = match kind {
            HalfKind::Bf16 => (0..rows * cols).map(at).collect(),
            HalfKind::F16 => half_panels::pack(rows, cols, at)?,
        };
        Ok(Some(Self {
            kind,
            rows,
            cols,
            data,
        }))
    }

    /// `Some` for 2-D candle tensors of dtype F16 / BF16 (their values, never widened),
    /// `None` for other dtypes.
    pub fn from_tensor(t: &Tensor) -> Result<Option<Self>> {
        let dims = t.dims();
        if dims.len() != 2 {
            return Ok(None);
        }
        let flat = t.flatten_all()?;
        // `into_iter().map().collect()` into a type of the same layout reuses the buffer.
        let (kind, data): (HalfKind, Vec<u16>) = match t.dtype() {
            DType::F16 => (
                HalfKind::F16,
                flat.to_vec1::<half::f16>()?
                    .into_iter()
                    .map(|h| h.to_bits())
                    .collect(),
            ),
            DType::BF16 => (
                HalfKind::Bf16,
                flat.to_vec1::<half::bf16>()?
                    .into_iter()
                    .map(|h| h.to_bits())
                    .collect(),
            ),
            _ => return Ok(None),
        };
        Ok(Some(Self::new(kind, dims[0], dims[1], data)?))
    }

    /// Bytes the weights occupy (2 per weight; f16 also the last panel's padding).
    pub fn storage_bytes(&self) -> usize {
        self.data.len() * 2
    }

    /// Row `r` widened to f32 (exact).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        for (k, o) in out.iter_mut().enumerate().take(self.cols) {
            *o = self.kind.to_f32(self.bits(r, k));
        }
    }

    /// The whole matrix widened to f32, row-major (`--dequantize`).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0f32; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.row_to_f32(r, row);
        }
        out
    }
}

/// Instruction sets of the half kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HalfIsa {
    /// Portable scalar code (8 lane sums, separate multiply and add).
    Scalar,
    /// AVX2 + FMA + F16C, 8 lanes.
    Avx2,
    /// AVX-512F, 16 lanes.
    Avx512,
    /// AVX-512F + AVX-512 BF16: `vdpbf16ps` for bf16 weights times bf16-rounded activations
    /// (`round_x`); everything else as `Avx512`.
    Avx512Bf16,
}

impl HalfIsa {
    /// Every ISA this CPU runs (for comparisons).
    pub fn available() -> Vec<HalfIsa> {
        let mut v = vec![HalfIsa::Scalar];
        if has_avx2() {
            v.push(HalfIsa::Avx2);
        }
        if has_avx512f() {
            v.push(HalfIsa::Avx512);
        }
        if has_avx512_bf16() {
            v.push(HalfIsa::Avx512Bf16);
        }
        v
    }

    /// The fastest this CPU has, capped by `LWM_KERNEL` (`scalar`, `avx2`).
    pub fn auto() -> HalfIsa {
        match kernel_cap() {
            Kernel::Scalar => HalfIsa::Scalar,
            Kernel::Avx2 if has_avx2() => HalfIsa::Avx2,
            _ if has_avx512_bf16() => HalfIsa::Avx512Bf16,
            _ if has_avx512f() => HalfIsa::Avx512,
            _ if has_avx2() => HalfIsa::Avx2,
            _ => HalfIsa::Scalar,
        }
    }

    fn check(self) -> Result<()> {
        match self {
            HalfIsa::Avx2 if !has_avx2() => {
                bail!("half matmul: AVX2 kernel requested but this CPU lacks AVX2/FMA/F16C")
            }
            HalfIsa::Avx512 if !has_avx512f() => {
                bail!("half matmul: AVX-512 kernel requested but this CPU lacks AVX-512F")
            }
            HalfIsa::Avx512Bf16 if !has_avx512_bf16() => {
                bail!("half matmul: AVX-512 BF16 kernel requested but this CPU lacks AVX512_BF16")
            }
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct HalfOptions {
    /// `None`: `HalfIsa::auto()`.
    pub isa: Option<HalfIsa>,
    /// Round the activations to the weight's format first (llama.cpp's f16 / bf16 dots).
    pub round_x: bool,
    /// Run on the calling thread only.
    pub single_thread: bool,
}

/// Columns per block (the unit of the accumulation order).
pub const KC: usize = 512;
/// Columns per block of the `vdpbf16ps` kernel: its steps are twice as wide, and a larger
/// block sums the 16 lanes less often (4 activation rows × 2048 bf16 = 16 KB per tile).
pub const KC_DP: usize = 2048;
/// Weight rows per widened scratch tile.
const RB: usize = 8;
/// Activation rows per GEMM block (their KC-column slice stays in L2: 128 KB).
const NB: usize = 64;
/// Activation rows from which the tiled GEMM runs instead of the mat-vec (which reads the
/// weights once per 3 rows). Measured on AVX2, 2 threads, 4096×4096 and 11008×4096: the
/// mat-vec is faster up to 8 rows (4 rows: 2.3 vs 4.6 ms), about even at 16.
pub const GEMM_MIN_ROWS: usize = 12;
/// Multiply-adds below which one thread is faster than waking the pool.
const PAR_MIN_MACS: usize = 1 << 17;

/// `y = x · Wᵀ` for n rows of `x` (n × w.cols, row-major); returns n × w.rows.
pub fn matmul_half(w: &HalfMatrix, x: &[f32], n: usize, round_x: bool) -> Result<Vec<f32>> {
    matmul_half_with(
        w,
        x,
        n,
        &HalfOptions {
            round_x,
            ..Default::default()
        },
    )
}

pub fn matmul_half_with(
    w: &HalfMatrix,
    x: &[f32],
    n: usize,
    opts: &HalfOptions,
) -> Result<Vec<f32>> {
    if x.len() != n * w.cols {
        bail!(
            "half matmul: activations have {} values, expected {n} rows × {} columns",
            x.len(),
            w.cols
        );
    }
    let isa = opts.isa.unwrap_or_else(HalfIsa::auto);
    isa.check()?;
    let mut y = vec![0.0f32; n * w.rows];
    if n == 0 || w.rows == 0 {
        return Ok(y);
    }
    // The bf16 dot products take the activations rounded to bf16 as their bits, and read
    // nothing else; the other kernels take them rounded (or not) as f32.
    let dp = isa == HalfIsa::Avx512Bf16 && w.kind == HalfKind::Bf16 && opts.round_x;
    let isa = if isa == HalfIsa::Avx512Bf16 && !dp {
        HalfIsa::Avx512
    } else {
        isa
    };
    let (rounded, xb): (Vec<f32>, Vec<u16>) = if dp {
        let bits = x
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        (Vec::new(), bits)
    } else if opts.round_x {
        (round_slice(w.kind, x), Vec::new())
    } else {
        (Vec::new(), Vec::new())
    };
    let x = if opts.round_x && !dp { &rounded[..] } else { x };
    let threads = candle_core::utils::get_num_threads().max(1);
    let macs = w.rows * w.cols * n;
    let yp = y.as_mut_ptr() as usize;
    if w.kind == HalfKind::F16 {
        let panels = half_panels::padded_rows(w.rows) / half_panels::PANEL;
        let run = |p0: usize, np: usize| {
            // SAFETY: every task writes only the outputs of its panels' rows (disjoint
            // between tasks), and y outlives the parallel region.
            let out = half_panels::Out {
                p: yp as *mut f32,
                stride: w.rows,
                rows: w.rows,
            };
            unsafe { panels_task(isa, w, x, n, p0, np, out) };
        };
        if opts.single_thread || threads == 1 || macs < PAR_MIN_MACS {
            run(0, panels);
        } else {
            let chunk = panels.div_ceil(threads * 4).max(1);
            crate::parallel::for_each(panels.div_ceil(chunk), |t| {
                let p0 = t * chunk;
                run(p0, chunk.min(panels - p0));
            });
        }
        return Ok(y);
    }
    let run = |r0: usize, nr: usize| {
        // SAFETY: every task writes only columns r0..r0+nr of y's rows (disjoint between
        // tasks), and y outlives the parallel region.
        let out = OutPtr {
            p: yp as *mut f32,
            stride: w.rows,
        };
        unsafe { rows_task(isa, w, x, &xb, n, r0, nr, out) };
    };
    if opts.single_thread || threads == 1 || macs < PAR_MIN_MACS {
        run(0, w.rows);
    } else {
        let chunk = w.rows.div_ceil(threads * 4).next_multiple_of(RB).max(RB);
        let tasks = w.rows.div_ceil(chunk);
        crate::parallel::for_each(tasks, |t| {
            let r0 = t * chunk;
            run(r0, chunk.min(w.rows - r0));
        });
    }
    Ok(y)
}

/// `x` rounded to `kind` (nearest even), as f32: `HalfKind::round` of every value, f16
/// with F16C's conversions where the CPU has them (the same IEEE rounding, 8 at a time).
pub fn round_slice(kind: HalfKind, x: &[f32]) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    if kind == HalfKind::F16 && has_avx2() {
        let mut out = vec![0.0f32; x.len()];
        // SAFETY: F16C available (has_avx2 checks it); out has x.len() values.
        unsafe { round_f16_f16c(x, &mut out) };
        return out;
    }
    x.iter().map(|&v| kind.round(v)).collect()
}

/// SAFETY: F16C available; `out.len() == x.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn round_f16_f16c(x: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let full = x.len() / 8 * 8;
    for i in (0..full).step_by(8) {
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm256_loadu_ps(x.as_ptr().add(i)));
        _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
    }
    for i in full..x.len() {
        out[i] = HalfKind::F16.round(x[i]);
    }
}

/// Where outputs go: `y[a][r]` at `p + a·stride + r`.
#[derive(Clone, Copy)]
struct OutPtr {
    p: *mut f32,
    stride: usize,
}

impl OutPtr {
    /// SAFETY: (a, r) inside the output, and no other thread writes it.
    #[inline(always)]
    unsafe fn add(self, a: usize, r: usize, v: f32) {
        *self.p.add(a * self.stride + r) += v;
    }
}

/// Outputs of weight rows r0..r0+nr for all n activation rows.
///
/// `xb`: for `HalfIsa::Avx512Bf16`, the activations as bf16 bits.
///
/// SAFETY: `isa` is available; `out` as `OutPtr::add` requires for those rows.
#[allow(clippy::too_many_arguments)]
unsafe fn rows_task(
    isa: HalfIsa,
    w: &HalfMatrix,
    x: &[f32],
    xb: &[u16],
    n: usize,
    r0: usize,
    nr: usize,
    out: OutPtr,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        HalfIsa::Avx512Bf16 => simd::dp::run(w, xb, n, r0, nr, out),
        #[cfg(target_arch = "x86_64")]
        HalfIsa::Avx512 => simd::run_avx512(w, x, n, r0, nr, out),
        #[cfg(target_arch = "x86_64")]
        HalfIsa::Avx2 => simd::run_avx2(w, x, n, r0, nr, out),
        _ => scalar_task(w, x, n, r0, nr, out),
    }
}

/// f16 outputs of panels p0..p0+np for all n activation rows (`half_panels`).
///
/// SAFETY: `isa` is available; `out` is y (n × w.rows) and no other thread writes these
/// panels' outputs.
#[allow(clippy::too_many_arguments)]
unsafe fn panels_task(
    isa: HalfIsa,
    w: &HalfMatrix,
    x: &[f32],
    n: usize,
    p0: usize,
    np: usize,
    out: half_panels::Out,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        HalfIsa::Avx512 | HalfIsa::Avx512Bf16 => {
            half_panels::simd::run_avx512(&w.data, w.cols, x, n, p0, np, out)
        }
        #[cfg(target_arch = "x86_64")]
        HalfIsa::Avx2 => half_panels::simd::run_avx2(&w.data, w.cols, x, n, p0, np, out),
        _ => half_panels::portable(&w.data, w.cols, x, n, p0, np, out),
    }
}

/// The portable kernel: every output by itself, in the order of the module comment (L = 8).
///
/// SAFETY: as `rows_task`.
unsafe fn scalar_task(w: &HalfMatrix, x: &[f32], n: usize, r0: usize, nr: usize, out: OutPtr) {
    let (cols, kind) = (w.cols, w.kind);
    for a in 0..n {
        let xr = &x[a * cols..(a + 1) * cols];
        for r in r0..r0 + nr {
            let wr = &w.data[r * cols..(r + 1) * cols];
            let mut y = 0.0f32;
            for k0 in (0..cols).step_by(KC) {
                let kc = KC.min(cols - k0);
                let full = kc / 8 * 8;
                let mut acc = [0.0f32; 8];
                for k in (0..full).step_by(8) {
                    for (l, a) in acc.iter_mut().enumerate() {
                        *a += kind.to_f32(wr[k0 + k + l]) * xr[k0 + k + l];
                    }
                }
                let mut s = super::hsum8(&acc);
                for k in k0 + full..k0 + kc {
                    s += kind.to_f32(wr[k]) * xr[k];
                }
                y += s;
            }
            out.add(a, r, y);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{HalfMatrix, OutPtr, GEMM_MIN_ROWS, KC, NB, RB};
    use std::arch::x86_64::*;

    /// One vector width's operations on bf16 weights.
    pub(super) trait Vec32: Copy {
        const L: usize;
        /// Activation rows per GEMM register tile (× 4 weight rows): the accumulators, the
        /// activation vectors and one weight vector must fit the register file (AVX2: 16
        /// ymm = 12 + 3 + 1; with 4 × 4 the tile spilled and ran at a third of candle's
        /// f32 GEMM).
        const AR: usize;
        unsafe fn zero() -> Self;
        /// L weights at `p`, widened.
        unsafe fn load_w(p: *const u16) -> Self;
        unsafe fn load(p: *const f32) -> Self;
        unsafe fn store(self, p: *mut f32);
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
        /// The tree sum of the module comment.
        unsafe fn hsum(self) -> f32;
    }

    #[derive(Clone, Copy)]
    pub(super) struct V8(__m256);
    #[derive(Clone, Copy)]
    pub(super) struct V16(__m512);

    impl Vec32 for V8 {
        const L: usize = 8;
        const AR: usize = 3;
        #[inline(always)]
        unsafe fn zero() -> Self {
            V8(_mm256_setzero_ps())
        }
        #[inline(always)]
        unsafe fn load_w(p: *const u16) -> Self {
            let h = _mm_loadu_si128(p as *const __m128i);
            V8(_mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(h),
                16,
            )))
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
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            V8(_mm256_fmadd_ps(a.0, b.0, c.0))
        }
        #[inline(always)]
        unsafe fn hsum(self) -> f32 {
            super::super::q8_0::avx2::hsum(self.0)
        }
    }

    impl Vec32 for V16 {
        const L: usize = 16;
        const AR: usize = 4;
        #[inline(always)]
        unsafe fn zero() -> Self {
            V16(_mm512_setzero_ps())
        }
        #[inline(always)]
        unsafe fn load_w(p: *const u16) -> Self {
            let h = _mm256_loadu_si256(p as *const __m256i);
            V16(_mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(h),
                16,
            )))
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
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            V16(_mm512_fmadd_ps(a.0, b.0, c.0))
        }
        #[inline(always)]
        unsafe fn hsum(self) -> f32 {
            let lo = _mm512_castps512_ps256(self.0);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(self.0), 1));
            super::super::q8_0::avx2::hsum(_mm256_add_ps(lo, hi))
        }
    }

    #[inline(always)]
    fn bf16_to_f32(b: u16) -> f32 {
        f32::from_bits((b as u32) << 16)
    }

    /// SAFETY: AVX-512F available; `out` as `rows_task` requires.
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    pub(super) unsafe fn run_avx512(
        w: &HalfMatrix,
        x: &[f32],
        n: usize,
        r0: usize,
        nr: usize,
        out: OutPtr,
    ) {
        run::<V16>(w, x, n, r0, nr, out)
    }

    /// SAFETY: AVX2/FMA/F16C available; `out` as `rows_task` requires.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn run_avx2(
        w: &HalfMatrix,
        x: &[f32],
        n: usize,
        r0: usize,
        nr: usize,
        out: OutPtr,
    ) {
        run::<V8>(w, x, n, r0, nr, out)
    }

    #[inline(always)]
    unsafe fn run<V: Vec32>(
        w: &HalfMatrix,
        x: &[f32],
        n: usize,
        r0: usize,
        nr: usize,
        out: OutPtr,
    ) {
        if n < GEMM_MIN_ROWS {
            // Up to 3 activation rows share each widened weight load, so a small batch
            // (two decode streams, guidance's two rows) reads the weights once.
            let mut a = 0;
            while a < n {
                match n - a {
                    1 => matvec::<V, 1>(w, x, a, r0, nr, out),
                    2 => matvec::<V, 2>(w, x, a, r0, nr, out),
                    _ => matvec::<V, 3>(w, x, a, r0, nr, out),
                }
                a += (n - a).min(3);
            }
        } else {
            gemm::<V>(w, x, n, r0, nr, out);
        }
    }

    /// Activation rows a..a+AR against weight rows r0..r0+nr, widening in registers, 4
    /// weight rows at a time (4 × AR independent FMA chains sharing each weight and
    /// activation load).
    #[inline(always)]
    unsafe fn matvec<V: Vec32, const AR: usize>(
        w: &HalfMatrix,
        x: &[f32],
        a: usize,
        r0: usize,
        nr: usize,
        out: OutPtr,
    ) {
        let mut r = r0;
        while r + 4 <= r0 + nr {
            let y = rows_dot::<V, 4, AR>(w, x, a, r);
            for (i, ys) in y.iter().enumerate() {
                for (j, v) in ys.iter().enumerate() {
                    out.add(a + j, r + i, *v);
                }
            }
            r += 4;
        }
        while r < r0 + nr {
            let y = rows_dot::<V, 1, AR>(w, x, a, r);
            for (j, v) in y[0].iter().enumerate() {
                out.add(a + j, r, *v);
            }
            r += 1;
        }
    }

    /// Rows r..r+WR of w dotted with activation rows a..a+AR of x, each output in the
    /// module's order (so the row count changes no bit).
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn rows_dot<V: Vec32, const WR: usize, const AR: usize>(
        w: &HalfMatrix,
        x: &[f32],
        a: usize,
        r: usize,
    ) -> [[f32; AR]; WR] {
        let cols = w.cols;
        let wp = w.data.as_ptr().add(r * cols);
        let xp = x.as_ptr().add(a * cols);
        let mut y = [[0.0f32; AR]; WR];
        for k0 in (0..cols).step_by(KC) {
            let kc = KC.min(cols - k0);
            let full = kc / V::L * V::L;
            let mut acc = [[V::zero(); AR]; WR];
            let mut k = k0;
            while k < k0 + full {
                let mut xv = [V::zero(); AR];
                for j in 0..AR {
                    xv[j] = V::load(xp.add(j * cols + k));
                }
                for i in 0..WR {
                    let wv = V::load_w(wp.add(i * cols + k));
                    for j in 0..AR {
                        acc[i][j] = V::fma(wv, xv[j], acc[i][j]);
                    }
                }
                k += V::L;
            }
            for i in 0..WR {
                for j in 0..AR {
                    let mut s = acc[i][j].hsum();
                    for k in k0 + full..k0 + kc {
                        s += bf16_to_f32(*wp.add(i * cols + k)) * *xp.add(j * cols + k);
                    }
                    y[i][j] += s;
                }
            }
        }
        y
    }

    /// The tiled GEMM: for each block of NB activation rows and KC columns, widen RB weight
    /// rows × KC columns into `scratch` once, then run 4 × `V::AR` register tiles of
    /// (weight rows × activation rows) over it.
    #[inline(always)]
    unsafe fn gemm<V: Vec32>(
        w: &HalfMatrix,
        x: &[f32],
        n: usize,
        r0: usize,
        nr: usize,
        out: OutPtr,
    ) {
        let cols = w.cols;
        let mut scratch = vec![0.0f32; RB * KC];
        let sp = scratch.as_mut_ptr();
        for a0 in (0..n).step_by(NB) {
            let na = NB.min(n - a0);
            for k0 in (0..cols).step_by(KC) {
                let kc = KC.min(cols - k0);
                let full = kc / V::L * V::L;
                for rb0 in (r0..r0 + nr).step_by(RB) {
                    let rb = RB.min(r0 + nr - rb0);
                    // Widen the tile (whole L-chunks by vector, the tail by scalar).
                    for i in 0..rb {
                        let src = w.data.as_ptr().add((rb0 + i) * cols + k0);
                        let dst = sp.add(i * KC);
                        let mut k = 0;
                        while k < full {
                            V::load_w(src.add(k)).store(dst.add(k));
                            k += V::L;
                        }
                        for k in full..kc {
                            *dst.add(k) = bf16_to_f32(*src.add(k));
                        }
                    }
                    let tile = Tile {
                        s: sp,
                        x: x.as_ptr().add(k0),
                        cols,
                        full,
                        kc,
                        out,
                    };
                    let mut i = 0;
                    while i < rb {
                        let wr = if i + 4 <= rb { 4 } else { 1 };
                        let mut a = a0;
                        while a < a0 + na {
                            let ar = if a + V::AR <= a0 + na { V::AR } else { 1 };
                            match (wr, ar, V::AR) {
                                (4, 3, 3) => tile.run::<V, 4, 3>(i, rb0 + i, a),
                                (4, 4, 4) => tile.run::<V, 4, 4>(i, rb0 + i, a),
                                (4, _, _) => tile.run::<V, 4, 1>(i, rb0 + i, a),
                                (_, 3, 3) => tile.run::<V, 1, 3>(i, rb0 + i, a),
                                (_, 4, 4) => tile.run::<V, 1, 4>(i, rb0 + i, a),
                                _ => tile.run::<V, 1, 1>(i, rb0 + i, a),
                            }
                            a += ar;
                        }
                        i += wr;
                    }
                }
            }
        }
    }

    /// One widened scratch tile (rows KC apart) and the activations' current column block.
    struct Tile {
        s: *const f32,
        /// x at column k0 of row 0 (rows `cols` apart).
        x: *const f32,
        cols: usize,
        full: usize,
        kc: usize,
        out: OutPtr,
    }

    impl Tile {
        /// Scratch rows i..i+WR (weight rows r..r+WR) × activation rows a..a+AR: adds this
        /// block's sums to the outputs.
        #[inline(always)]
        #[allow(clippy::needless_range_loop)]
        unsafe fn run<V: Vec32, const WR: usize, const AR: usize>(
            &self,
            i: usize,
            r: usize,
            a: usize,
        ) {
            let mut acc = [[V::zero(); AR]; WR];
            let mut k = 0;
            while k < self.full {
                let mut xv = [V::zero(); AR];
                for j in 0..AR {
                    xv[j] = V::load(self.x.add((a + j) * self.cols + k));
                }
                for ii in 0..WR {
                    let wv = V::load(self.s.add((i + ii) * KC + k));
                    for j in 0..AR {
                        acc[ii][j] = V::fma(wv, xv[j], acc[ii][j]);
                    }
                }
                k += V::L;
            }
            for ii in 0..WR {
                for j in 0..AR {
                    let mut s = acc[ii][j].hsum();
                    for k in self.full..self.kc {
                        s += *self.s.add((i + ii) * KC + k) * *self.x.add((a + j) * self.cols + k);
                    }
                    self.out.add(a + j, r + ii, s);
                }
            }
        }
    }

    /// bf16 weights × bf16 activations with `vdpbf16ps` (the order of the module comment).
    /// No scratch: the weights are read as they are stored, 32 per load.
    pub(super) mod dp {
        use super::super::KC_DP as KC;
        use super::super::{HalfMatrix, OutPtr, GEMM_MIN_ROWS, NB};
        use super::{Vec32, V16};
        use std::arch::x86_64::*;

        /// Columns per `vdpbf16ps`.
        const C: usize = 32;
        /// Activation rows per register tile (× 4 weight rows: 16 accumulators, 4
        /// activation vectors and a weight vector of the 32 zmm).
        const AR: usize = 4;

        #[inline(always)]
        unsafe fn load(p: *const u16) -> __m512bh {
            // SAFETY (caller): 32 readable u16 at p.
            std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const __m512i))
        }

        #[inline(always)]
        fn bf(b: u16) -> f32 {
            f32::from_bits((b as u32) << 16)
        }

        /// SAFETY: AVX-512F and AVX512_BF16 available; `out` as `rows_task` requires;
        /// `xb` holds n rows of `w.cols` bf16 activations.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bf16")]
        pub(in super::super) unsafe fn run(
            w: &HalfMatrix,
            xb: &[u16],
            n: usize,
            r0: usize,
            nr: usize,
            out: OutPtr,
        ) {
            let cols = w.cols;
            let blk = Block {
                w: w.data.as_ptr(),
                x: xb.as_ptr(),
                cols,
                out,
            };
            if n < GEMM_MIN_ROWS {
                // The mat-vec: all columns of up to 4 activation rows against 4 weight
                // rows at a time, so a small batch reads the weights once.
                let mut a = 0;
                while a < n {
                    let ar = (n - a).min(AR);
                    let mut r = r0;
                    while r < r0 + nr {
                        let wr = if r + 4 <= r0 + nr { 4 } else { 1 };
                        for k0 in (0..cols).step_by(KC) {
                            blk.tiles(wr, ar, r, a, k0);
                        }
                        r += wr;
                    }
                    a += ar;
                }
                return;
            }
            // The GEMM: per block of NB activation rows and KC columns, 4 weight rows
            // (4 KB, in L1) against every 4 activation rows of the block (in L2).
            for a0 in (0..n).step_by(NB) {
                let na = NB.min(n - a0);
                for k0 in (0..cols).step_by(KC) {
                    let mut r = r0;
                    while r < r0 + nr {
                        let wr = if r + 4 <= r0 + nr { 4 } else { 1 };
                        let mut a = a0;
                        while a < a0 + na {
                            let ar = if a + AR <= a0 + na { AR } else { 1 };
                            blk.tiles(wr, ar, r, a, k0);
                            a += ar;
                        }
                        r += wr;
                    }
                }
            }
        }

        /// The operands: row-major bf16 weights and activations, `cols` apart.
        struct Block {
            w: *const u16,
            x: *const u16,
            cols: usize,
            out: OutPtr,
        }

        impl Block {
            /// Weight rows r..r+wr × activation rows a..a+ar over the KC block at k0
            /// (wr ∈ {1, 4}, ar ≤ 4).
            #[inline(always)]
            unsafe fn tiles(&self, wr: usize, ar: usize, r: usize, a: usize, k0: usize) {
                match (wr, ar) {
                    (4, 4) => self.tile::<4, 4>(r, a, k0),
                    (4, 3) => self.tile::<4, 3>(r, a, k0),
                    (4, 2) => self.tile::<4, 2>(r, a, k0),
                    (4, _) => self.tile::<4, 1>(r, a, k0),
                    (_, 4) => self.tile::<1, 4>(r, a, k0),
                    (_, 3) => self.tile::<1, 3>(r, a, k0),
                    (_, 2) => self.tile::<1, 2>(r, a, k0),
                    _ => self.tile::<1, 1>(r, a, k0),
                }
            }

            /// Adds this KC block's sums of weight rows r..r+WR × activation rows a..a+A
            /// to the outputs.
            #[inline(always)]
            #[allow(clippy::needless_range_loop)]
            unsafe fn tile<const WR: usize, const A: usize>(&self, r: usize, a: usize, k0: usize) {
                let cols = self.cols;
                let kc = KC.min(cols - k0);
                let full = kc / C * C;
                let wp = self.w.add(r * cols + k0);
                let xp = self.x.add(a * cols + k0);
                let mut acc = [[_mm512_setzero_ps(); A]; WR];
                let mut k = 0;
                while k < full {
                    let mut xv = [_mm512_setzero_ps(); A]
                        .map(|z| std::mem::transmute::<__m512, __m512bh>(z));
                    for j in 0..A {
                        xv[j] = load(xp.add(j * cols + k));
                    }
                    for i in 0..WR {
                        let wv = load(wp.add(i * cols + k));
                        for j in 0..A {
                            acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv, xv[j]);
                        }
                    }
                    k += C;
                }
                for i in 0..WR {
                    for j in 0..A {
                        let mut s = V16(acc[i][j]).hsum();
                        for k in full..kc {
                            s += bf(*wp.add(i * cols + k)) * bf(*xp.add(j * cols + k));
                        }
                        self.out.add(a + j, r + i, s);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        crate::rng::XorShift::new(seed).vec(n, -1.0, 1.0)
    }

    fn matrix(kind: HalfKind, rows: usize, cols: usize, seed: u64) -> HalfMatrix {
        let data = rand_vec(rows * cols, seed)
            .into_iter()
            .map(|v| match kind {
                HalfKind::F16 => half::f16::from_f32(v).to_bits(),
                HalfKind::Bf16 => half::bf16::from_f32(v).to_bits(),
            })
            .collect();
        HalfMatrix::new(kind, rows, cols, data).unwrap()
    }

    /// Every ISA on this CPU against the portable path, on shapes that are not multiples
    /// of the vector width or the blocks, for the mat-vec and the GEMM row counts, single
    /// and multi-threaded, with and without rounding the activations.
    #[test]
    fn every_isa_matches_the_portable_kernel_on_odd_shapes() {
        let isas = HalfIsa::available();
        eprintln!("half ISAs on this CPU: {isas:?}");
        for kind in [HalfKind::F16, HalfKind::Bf16] {
            for (rows, cols) in [
                (1, 1),
                (7, 13),
                (37, 77),
                (19, 1031),
                (45, 600),
                (64, 33),
                (160, 300),
            ] {
                let w = matrix(kind, rows, cols, (rows * 31 + cols) as u64);
                for n in [1, 2, 3, 5, 11, 12, 13, 17, 64, 70, 100] {
                    let x = rand_vec(n * cols, (n * 7 + cols) as u64);
                    for round_x in [false, true] {
                        let opts = |isa, single_thread| HalfOptions {
                            isa: Some(isa),
                            round_x,
                            single_thread,
                        };
                        let reference =
                            matmul_half_with(&w, &x, n, &opts(HalfIsa::Scalar, true)).unwrap();
                        // And the portable path is x·Wᵀ in f64 within f32 rounding.
                        for a in 0..n {
                            for r in 0..rows {
                                let xs = &x[a * cols..(a + 1) * cols];
                                let xs =
                                    xs.iter().map(|&v| if round_x { kind.round(v) } else { v });
                                let terms: Vec<f64> = xs
                                    .zip((0..cols).map(|k| w.bits(r, k)))
                                    .map(|(v, b)| v as f64 * kind.to_f32(b) as f64)
                                    .collect();
                                let exact: f64 = terms.iter().sum();
                                let scale: f64 = terms.iter().map(|t| t.abs()).sum::<f64>() + 1e-30;
                                let got = reference[a * rows + r] as f64;
                                assert!(
                                    (got - exact).abs() <= 1e-5 * scale,
                                    "{kind:?} [{rows},{cols}] n={n}: {got} vs {exact}"
                                );
                            }
                        }
                        for &isa in &isas {
                            for single in [true, false] {
                                let y = matmul_half_with(&w, &x, n, &opts(isa, single)).unwrap();
                                if kind == HalfKind::F16 {
                                    // One FMA chain per output (`half_panels`): the same
                                    // bits on every ISA.
                                    assert_eq!(y, reference, "{isa:?} [{rows},{cols}] n={n} round={round_x} single={single}");
                                    continue;
                                }
                                for (i, (g, e)) in y.iter().zip(&reference).enumerate() {
                                    let (a, r) = (i / rows, i % rows);
                                    let scale: f32 = x[a * cols..(a + 1) * cols]
                                        .iter()
                                        .zip((0..cols).map(|k| w.bits(r, k)))
                                        .map(|(v, b)| (v * kind.to_f32(b)).abs())
                                        .sum();
                                    assert!(
                                        (g - e).abs() <= 1e-5 * scale + 1e-30,
                                        "{isa:?} {kind:?} [{rows},{cols}] n={n} round={round_x} single={single} at {i}: {g} vs {e}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// A row's result does not depend on how many rows are multiplied with it (the mat-vec
    /// and the GEMM sum in the same order) nor on the thread split.
    #[test]
    fn results_do_not_depend_on_the_batch() {
        for (kind, round_x) in [(HalfKind::F16, false), (HalfKind::Bf16, true)] {
            let w = matrix(kind, 45, 1031, 3);
            let x = rand_vec(17 * 1031, 4);
            for isa in HalfIsa::available() {
                let opts = HalfOptions {
                    isa: Some(isa),
                    round_x,
                    ..Default::default()
                };
                let all = matmul_half_with(&w, &x, 17, &opts).unwrap();
                for a in [0, 5, 16] {
                    let one = matmul_half_with(&w, &x[a * 1031..(a + 1) * 1031], 1, &opts).unwrap();
                    assert_eq!(one, all[a * 45..(a + 1) * 45], "{isa:?} {kind:?} row {a}");
                }
                // The mat-vec's small batches (rows sharing weight loads) too.
                for n in [2, 3, 4, 5, 11] {
                    let few = matmul_half_with(&w, &x[..n * 1031], n, &opts).unwrap();
                    assert_eq!(few, all[..n * 45], "{isa:?} {kind:?} n={n}");
                }
            }
        }
    }

    /// The `vdpbf16ps` order of the module comment in portable code (x already rounded).
    fn dpbf16_reference(w: &HalfMatrix, x: &[f32], n: usize) -> Vec<f32> {
        let (rows, cols) = (w.rows, w.cols);
        let wf = w.to_f32();
        let mut y = vec![0.0f32; n * rows];
        for a in 0..n {
            let xr = &x[a * cols..(a + 1) * cols];
            for r in 0..rows {
                let wr = &wf[r * cols..(r + 1) * cols];
                let mut out = 0.0f32;
                for k0 in (0..cols).step_by(KC_DP) {
                    let kc = KC_DP.min(cols - k0);
                    let full = kc / 32 * 32;
                    let mut acc = [0.0f32; 16];
                    for c in (k0..k0 + full).step_by(32) {
                        for (l, v) in acc.iter_mut().enumerate() {
                            *v += wr[c + 2 * l + 1] * xr[c + 2 * l + 1];
                            *v += wr[c + 2 * l] * xr[c + 2 * l];
                        }
                    }
                    let mut half = [0.0f32; 8];
                    for l in 0..8 {
                        half[l] = acc[l] + acc[l + 8];
                    }
                    let mut s = crate::quant::hsum8(&half);
                    for k in k0 + full..k0 + kc {
                        s += wr[k] * xr[k];
                    }
                    out += s;
                }
                y[a * rows + r] = out;
            }
        }
        y
    }

    /// The AVX-512 BF16 kernel (where the CPU has it) gives the portable model of
    /// `vdpbf16ps` bit for bit: mat-vec and GEMM row counts, odd shapes, KC tails, threads.
    #[test]
    fn bf16_dot_product_kernel_equals_its_portable_order() {
        if !HalfIsa::available().contains(&HalfIsa::Avx512Bf16) {
            eprintln!("note: no AVX512_BF16 on this CPU; the vdpbf16ps kernel is not run");
            return;
        }
        for (rows, cols) in [(1, 1), (7, 31), (37, 77), (19, 1031), (45, 600), (9, 4100)] {
            let w = matrix(HalfKind::Bf16, rows, cols, (rows * 13 + cols) as u64);
            for n in [1, 2, 3, 4, 5, 11, 12, 17, 64, 70] {
                let x: Vec<f32> = rand_vec(n * cols, (n * 5 + cols) as u64)
                    .into_iter()
                    .map(|v| HalfKind::Bf16.round(v))
                    .collect();
                let expect = dpbf16_reference(&w, &x, n);
                for single_thread in [true, false] {
                    let opts = HalfOptions {
                        isa: Some(HalfIsa::Avx512Bf16),
                        round_x: true,
                        single_thread,
                    };
                    let got = matmul_half_with(&w, &x, n, &opts).unwrap();
                    assert_eq!(got, expect, "[{rows},{cols}] n={n} single={single_thread}");
                }
            }
        }
    }

    /// Rough speed of the f16 / bf16 kernels next to the f32 dense path they replace
    /// (candle's matmul on the widened matrix, `Linear::Dense`): a decode mat-vec and a
    /// 512-row prefill GEMM on LLaMA-7B shapes. Prints GFLOP/s and weight GB/s; asserts
    /// nothing about time. `cargo test -p lwm-core --lib half_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn half_speed() {
        use std::time::Instant;
        let best = |reps: usize, f: &mut dyn FnMut()| {
            (0..reps)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        };
        eprintln!(
            "threads {}, ISA {:?}",
            candle_core::utils::get_num_threads(),
            HalfIsa::auto()
        );
        for (rows, cols) in [(4096, 4096), (11008, 4096)] {
            let f16m = matrix(HalfKind::F16, rows, cols, 1);
            let wf = f16m.to_f32();
            let bf_bits = wf
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            let bf = HalfMatrix::new(HalfKind::Bf16, rows, cols, bf_bits).unwrap();
            let wt = Tensor::from_vec(wf, (rows, cols), &candle_core::Device::Cpu).unwrap();
            for n in [1usize, 2, 3, 4, 8, 16, 512] {
                let x = rand_vec(n * cols, 5);
                let reps = if n < 8 { 20 } else { 3 };
                let flop = 2.0 * (rows * cols * n) as f64;
                let report = |what: &str, t: f64, wbytes: usize| {
                    eprintln!(
                        "[{rows}x{cols}] n={n:3} {what:14} {:8.3} ms {:7.1} GFLOP/s {:6.1} GB/s (weights)",
                        t * 1e3,
                        flop / t / 1e9,
                        wbytes as f64 / t / 1e9
                    );
                };
                for (name, m) in [("f16", &f16m), ("bf16", &bf)] {
                    let t = best(reps, &mut || {
                        std::hint::black_box(matmul_half(m, &x, n, false).unwrap());
                    });
                    report(name, t, m.storage_bytes());
                }
                let t = best(reps, &mut || {
                    std::hint::black_box(matmul_half(&f16m, &x, n, true).unwrap());
                });
                report("f16 (ggml x)", t, f16m.storage_bytes());
                for isa in [HalfIsa::Avx512, HalfIsa::Avx512Bf16] {
                    if !HalfIsa::available().contains(&isa) {
                        continue;
                    }
                    let opts = HalfOptions {
                        isa: Some(isa),
                        round_x: true,
                        single_thread: false,
                    };
                    let t = best(reps, &mut || {
                        std::hint::black_box(matmul_half_with(&bf, &x, n, &opts).unwrap());
                    });
                    let name = if isa == HalfIsa::Avx512 {
                        "bf16 x fma"
                    } else {
                        "bf16 x dpbf16"
                    };
                    report(name, t, bf.storage_bytes());
                }
                let xt = Tensor::from_slice(&x, (n, cols), &candle_core::Device::Cpu).unwrap();
                let t = best(reps, &mut || {
                    let y = xt.matmul(&wt.t().unwrap()).unwrap();
                    std::hint::black_box(y.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                });
                report("f32 candle", t, rows * cols * 4);
            }
        }
    }

    /// The vector rounding to f16 is `half`'s, value for value, across the f16 range's
    /// edges: subnormals, ties, overflow to infinity, signed zero, NaN.
    #[test]
    fn slice_rounding_equals_the_scalar_rounding() {
        let mut x = rand_vec(1003, 11);
        x.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v *= [1e-7, 1e-5, 1.0, 3e4, 7e4][i % 5]);
        x.extend([
            0.0,
            -0.0,
            65504.0,
            65520.0,
            -65520.0,
            f32::INFINITY,
            f32::MIN_POSITIVE,
            5.96e-8,
            2.98e-8,
            1.0 + 0.5 * 9.765625e-4,
            1.0 + 1.5 * 9.765625e-4,
        ]);
        for kind in [HalfKind::F16, HalfKind::Bf16] {
            let got = round_slice(kind, &x);
            for (g, &v) in got.iter().zip(&x) {
                assert_eq!(g.to_bits(), kind.round(v).to_bits(), "{kind:?} {v:e}");
            }
            assert!(round_slice(kind, &[f32::NAN])[0].is_nan());
        }
    }

    #[test]
    fn conversions_are_exact_and_rows_widen_alone() {
        let w = matrix(HalfKind::Bf16, 3, 5, 9);
        let mut row = vec![0.0f32; 5];
        w.row_to_f32(1, &mut row);
        assert_eq!(row, w.to_f32()[5..10]);
        assert_eq!(w.storage_bytes(), 30);
        assert_eq!(HalfKind::Bf16.to_f32(0x3f80), 1.0);
        assert_eq!(HalfKind::F16.to_f32(0x3c00), 1.0);
        let t = Tensor::from_vec(
            vec![half::bf16::from_f32(0.5); 6],
            (2, 3),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let m = HalfMatrix::from_tensor(&t).unwrap().unwrap();
        assert_eq!((m.kind, m.rows, m.cols), (HalfKind::Bf16, 2, 3));
        assert_eq!(m.to_f32(), vec![0.5; 6]);
    }
}
