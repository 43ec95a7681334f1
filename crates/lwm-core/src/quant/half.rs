//! Half-precision weight matrices (IEEE f16 or bf16, 2 bytes per weight) and their products
//! `y (n × rows) = x (n × cols) · Wᵀ` with f32 accumulation.
//!
//! The weights stay as their 16-bit patterns (`HalfMatrix::data`, the GGUF / safetensors /
//! JAX bytes as `u16`), reordered into row panels at load; the kernels and their
//! accumulation order are in `half_panels` (one FMA chain per output, the same bits on
//! every ISA, batch size and thread split; `vdpbf16ps` pairs for bf16 × bf16 where the CPU
//! has AVX512_BF16).
//!
//! `Numerics::Ggml` (llama.cpp parity) first rounds the activations to the weight's type,
//! as `ggml_vec_dot_f16` / `ggml_vec_dot_bf16` take f16 / bf16 operands (`round_x`).

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

    /// Columns per step of its panels (`half_panels`).
    pub fn step(self) -> usize {
        match self {
            HalfKind::F16 => 1,
            HalfKind::Bf16 => 2,
        }
    }
}

/// A weight matrix `[rows = out, cols = in]` of f16 or bf16 values.
#[derive(Clone)]
pub struct HalfMatrix {
    pub kind: HalfKind,
    pub rows: usize,
    pub cols: usize,
    /// The bit patterns in row panels (`half_panels`: 32 rows a step of columns at a time,
    /// f16 one column, bf16 a pair; zero-padded to whole panels and steps).
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
        let data = half_panels::pack(kind.name(), rows, cols, kind.step(), |i| data[i])?;
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
        self.data[half_panels::index(self.kind.step(), self.cols, r, k)]
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
        let data = half_panels::pack(kind.name(), rows, cols, kind.step(), at)?;
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
        let kind = match t.dtype() {
            DType::F16 => HalfKind::F16,
            DType::BF16 => HalfKind::Bf16,
            _ => return Ok(None),
        };
        let (rows, cols) = (dims[0], dims[1]);
        // Packed straight from the tensor's buffer when it is a contiguous CPU one (no
        // widened or row-major copy next to the panels); through a copy otherwise.
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            let data = match cpu {
                candle_core::CpuStorage::F16(v) => {
                    let v = &v[start..end];
                    half_panels::pack(kind.name(), rows, cols, 1, |i| v[i].to_bits())?
                }
                candle_core::CpuStorage::BF16(v) => {
                    let v = &v[start..end];
                    half_panels::pack(kind.name(), rows, cols, 2, |i| v[i].to_bits())?
                }
                _ => bail!("{} tensor whose buffer holds another type", kind.name()),
            };
            return Ok(Some(Self {
                kind,
                rows,
                cols,
                data,
            }));
        }
        drop(storage);
        let flat = t.flatten_all()?;
        let data: Vec<u16> = match kind {
            HalfKind::F16 => flat
                .to_vec1::<half::f16>()?
                .into_iter()
                .map(|h| h.to_bits())
                .collect(),
            HalfKind::Bf16 => flat
                .to_vec1::<half::bf16>()?
                .into_iter()
                .map(|h| h.to_bits())
                .collect(),
        };
        Ok(Some(Self::new(kind, rows, cols, data)?))
    }

    /// Bytes the weights occupy (2 per weight, and the panels' padding).
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
    /// Portable code (`f32::mul_add`).
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
    let op = match (w.kind, isa) {
        (HalfKind::F16, _) => half_panels::Op::F16,
        (HalfKind::Bf16, HalfIsa::Avx512Bf16) if opts.round_x => half_panels::Op::Bf16Dot,
        (HalfKind::Bf16, _) => half_panels::Op::Bf16,
    };
    let rounded;
    let x = if opts.round_x {
        rounded = round_slice(w.kind, x);
        &rounded[..]
    } else {
        x
    };
    let threads = candle_core::utils::get_num_threads().max(1);
    let macs = w.rows * w.cols * n;
    let yp = y.as_mut_ptr() as usize;
    let panels = half_panels::padded_rows(w.rows) / half_panels::PANEL;
    let run = |p0: usize, np: usize| {
        // SAFETY: every task writes only the outputs of its panels' rows (disjoint between
        // tasks), and y outlives the parallel region.
        let out = half_panels::Out {
            p: yp as *mut f32,
            stride: w.rows,
            rows: w.rows,
        };
        unsafe { panels_task(isa, op, w, x, n, p0, np, out) };
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

/// Outputs of panels p0..p0+np for all n activation rows (`half_panels`).
///
/// SAFETY: `isa` is available (AVX512_BF16 for `Op::Bf16Dot`); `out` is y (n × w.rows) and
/// no other thread writes these panels' outputs.
#[allow(clippy::too_many_arguments)]
unsafe fn panels_task(
    isa: HalfIsa,
    op: half_panels::Op,
    w: &HalfMatrix,
    x: &[f32],
    n: usize,
    p0: usize,
    np: usize,
    out: half_panels::Out,
) {
    let (d, c) = (&w.data[..], w.cols);
    match isa {
        #[cfg(target_arch = "x86_64")]
        HalfIsa::Avx512 | HalfIsa::Avx512Bf16 => {
            half_panels::simd::run_avx512(op, d, c, x, n, p0, np, out)
        }
        #[cfg(target_arch = "x86_64")]
        HalfIsa::Avx2 => half_panels::simd::run_avx2(op, d, c, x, n, p0, np, out),
        _ => half_panels::portable(op, d, c, x, n, p0, np, out),
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
                                let dot =
                                    isa == HalfIsa::Avx512Bf16 && kind == HalfKind::Bf16 && round_x;
                                if !dot {
                                    // One FMA chain per output (`half_panels`): the same
                                    // bits on every ISA.
                                    assert_eq!(y, reference, "{isa:?} {kind:?} [{rows},{cols}] n={n} round={round_x} single={single}");
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

    /// The `vdpbf16ps` chain of `half_panels` in portable code (x already rounded): per
    /// pair of columns the odd column's product, then the even one's, each add rounded.
    fn dpbf16_reference(w: &HalfMatrix, x: &[f32], n: usize) -> Vec<f32> {
        let (rows, cols) = (w.rows, w.cols);
        let wf = w.to_f32();
        let mut y = vec![0.0f32; n * rows];
        for a in 0..n {
            let xr = &x[a * cols..(a + 1) * cols];
            for r in 0..rows {
                let wr = &wf[r * cols..(r + 1) * cols];
                let mut acc = 0.0f32;
                for k in (0..cols).step_by(2) {
                    if k + 1 < cols {
                        acc += wr[k + 1] * xr[k + 1];
                    }
                    acc += wr[k] * xr[k];
                }
                y[a * rows + r] = acc;
            }
        }
        y
    }

    /// The AVX-512 BF16 kernel (where the CPU has it) gives the portable model of
    /// `vdpbf16ps` bit for bit: mat-vec and GEMM row counts, odd shapes and odd column
    /// counts (a zero pair half), column blocks, whole and partial panels, threads.
    #[test]
    fn bf16_dot_product_kernel_equals_its_portable_order() {
        if !HalfIsa::available().contains(&HalfIsa::Avx512Bf16) {
            eprintln!("note: no AVX512_BF16 on this CPU; the vdpbf16ps kernel is not run");
            return;
        }
        for (rows, cols) in [
            (1, 1),
            (7, 31),
            (37, 77),
            (19, 1031),
            (45, 600),
            (9, 4100),
            (160, 301),
        ] {
            let w = matrix(HalfKind::Bf16, rows, cols, (rows * 13 + cols) as u64);
            for n in [1, 2, 3, 4, 5, 11, 12, 17, 64, 70, 100] {
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

    /// A candle tensor is packed from its own buffer when contiguous, through a copy when
    /// not (a transposed view); both give its values.
    #[test]
    fn tensors_pack_contiguous_or_strided() {
        let v = rand_vec(35 * 9, 21);
        let t = Tensor::from_vec(v, (35, 9), &candle_core::Device::Cpu).unwrap();
        for dt in [DType::F16, DType::BF16] {
            for view in [
                t.to_dtype(dt).unwrap(),
                t.to_dtype(dt).unwrap().t().unwrap(),
            ] {
                let m = HalfMatrix::from_tensor(&view).unwrap().unwrap();
                let expect: Vec<f32> = view
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert_eq!((m.rows, m.cols), view.dims2().unwrap());
                assert_eq!(m.to_f32(), expect, "{dt:?} {:?}", view.dims());
            }
        }
    }

    #[test]
    fn conversions_are_exact_and_rows_widen_alone() {
        let w = matrix(HalfKind::Bf16, 3, 5, 9);
        let mut row = vec![0.0f32; 5];
        w.row_to_f32(1, &mut row);
        assert_eq!(row, w.to_f32()[5..10]);
        // Whole panels of 32 rows, bf16 columns in pairs: 32 × 6 values.
        assert_eq!(w.storage_bytes(), 2 * 32 * 6);
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
