//! Checks every `RowFormat` shares (used by each format's own tests): dequantization equal
//! to candle's, AVX2 equal to scalar bit for bit, `matmul` close to f32 math and to
//! candle's QMatMul, thread-count independence; and the timing of the `#[ignore]`d benches.

use super::q8::{BlockQ8K, BlockQ8_0};
use super::row_kernels::{rows_x_acts_scalar, RowFormat};
use super::{has_avx2, matmul_many_with, matmul_with, Kernel, MatmulOptions, QMatrix, QType};
use crate::rng::XorShift;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use std::time::Instant;

/// Activation blocks back to f32.
pub trait DeqAct {
    fn push_f32(&self, out: &mut Vec<f32>);
}

impl DeqAct for BlockQ8K {
    fn push_f32(&self, out: &mut Vec<f32>) {
        out.extend(self.qs.iter().map(|&q| self.d * q as f32));
    }
}

impl DeqAct for BlockQ8_0 {
    fn push_f32(&self, out: &mut Vec<f32>) {
        out.extend(self.qs.iter().map(|&q| self.d * q as f32));
    }
}

/// Roughly normal values (sum of four uniforms), σ ≈ `sigma`.
fn normal(rng: &mut XorShift, n: usize, sigma: f32) -> Vec<f32> {
    (0..n)
        .map(|_| (0..4).map(|_| rng.uniform(-1.0, 1.0)).sum::<f32>() * 0.866 * sigma)
        .collect()
}

/// Weights as a trained model's: mostly small, a few larger (so per-block scales and mins
/// vary), the last row over a wide range.
pub fn weights(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = XorShift::new(seed);
    let mut w = normal(&mut rng, rows * cols, 0.02);
    for (i, v) in w.iter_mut().enumerate() {
        if i % 37 == 0 {
            *v *= 6.0;
        }
    }
    if rows > 1 {
        let last = &mut w[(rows - 1) * cols..];
        for (i, v) in last.iter_mut().enumerate() {
            *v *= 0.1 + 3.9 * i as f32 / cols as f32;
        }
    }
    w
}

/// Activation rows: normal, one with outliers (as after RMSNorm), one zero but for a few
/// values, one tiny with a negative extreme, one all zero.
pub fn acts(n: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = XorShift::new(seed ^ 0xA5A5);
    let mut x = normal(&mut rng, n * cols, 1.0);
    for (a, row) in x.chunks_mut(cols).enumerate() {
        match a % 5 {
            1 => {
                row[5] = 40.0;
                row[(700 + a) % cols] = -25.0;
            }
            2 => {
                row.iter_mut().for_each(|v| *v = 0.0);
                for v in &mut row[cols / 3..cols / 3 + 20] {
                    *v = rng.uniform(-2.0, 2.0);
                }
            }
            3 => {
                row.iter_mut().for_each(|v| *v *= 0.001);
                row[9] = -3.0;
            }
            4 if a == 4 => row.iter_mut().for_each(|v| *v = 0.0),
            _ => {}
        }
    }
    x
}

/// `rows × cols` weights quantized by candle to `g`: the tensor and its raw blocks.
pub fn quantized(g: GgmlDType, rows: usize, cols: usize, seed: u64) -> (QTensor, Vec<u8>) {
    let t = Tensor::from_vec(weights(rows, cols, seed), (rows, cols), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, g).unwrap();
    let data = q.data().unwrap().to_vec();
    (q, data)
}

fn quantize_acts<F: RowFormat>(x: &[f32], n: usize, simd: bool) -> Vec<F::Act> {
    let cols = x.len() / n;
    let mut out = vec![F::ACT_ZERO; x.len() / F::BLOCK_ELEMS];
    for (xr, o) in x.chunks(cols).zip(out.chunks_mut(cols / F::BLOCK_ELEMS)) {
        F::quantize_acts(xr, o, simd);
    }
    out
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

pub fn dequantize_matches_candle<F: RowFormat>(g: GgmlDType) {
    let cols = 4 * F::BLOCK_ELEMS;
    for (rows, seed) in [(1, 1), (7, 2), (16, 3)] {
        let (q, data) = quantized(g, rows, cols, seed);
        let want = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
        let want = want.to_vec1::<f32>().unwrap();
        let mut got = vec![0.0f32; rows * cols];
        let row_bytes = cols / F::BLOCK_ELEMS * F::BLOCK_BYTES;
        for (r, o) in got.chunks_mut(cols).enumerate() {
            F::dequantize_row(&data[r * row_bytes..(r + 1) * row_bytes], o);
        }
        assert_eq!(bits(&got), bits(&want), "{g:?} [{rows}, {cols}]");
    }
}

/// The AVX2 kernel on `rows × cols` weights against each of `ns` activation counts.
fn check_avx2<F: RowFormat>(g: GgmlDType, rows: usize, cols: usize, ns: &[usize], seed: u64)
where
    F::Act: PartialEq + std::fmt::Debug,
{
    let (_, data) = quantized(g, rows, cols, seed);
    let stride = cols / F::BLOCK_ELEMS * F::BLOCK_BYTES;
    let nb = cols / F::BLOCK_ELEMS;
    for &n in ns {
        let x = acts(n, cols, seed + n as u64);
        let qa = quantize_acts::<F>(&x, n, true);
        assert_eq!(
            qa,
            quantize_acts::<F>(&x, n, false),
            "activation quantization"
        );
        let ys: Vec<&[F::Act]> = qa.chunks(nb).collect();
        let mut want = vec![0.0f32; rows * n];
        rows_x_acts_scalar::<F>(&data, stride, rows, &ys, &mut want);
        let mut got = vec![f32::NAN; rows * n];
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: AVX2/FMA/F16C checked; shapes as documented.
            let ran = unsafe { F::rows_x_acts_avx2(&data, stride, rows, &ys, &mut got) };
            assert!(ran, "{g:?} has an AVX2 kernel");
            if super::has_avx512_vnni() {
                let mut vnni = vec![f32::NAN; rows * n];
                // SAFETY: AVX-512 F/VL/VNNI checked; shapes as above.
                if unsafe { F::rows_x_acts_vnni(&data, stride, rows, &ys, &mut vnni) } {
                    assert_eq!(
                        bits(&vnni),
                        bits(&want),
                        "{g:?} VNNI rows {rows} n {n} cols {cols}"
                    );
                }
            }
        }
        assert_eq!(
            bits(&got),
            bits(&want),
            "{g:?} rows {rows} n {n} cols {cols}"
        );
    }
}

pub fn avx2_matches_scalar<F: RowFormat>(g: GgmlDType, cols: &[usize])
where
    F::Act: PartialEq + std::fmt::Debug,
{
    if !has_avx2() || !cfg!(target_arch = "x86_64") {
        eprintln!("no AVX2: skipped");
        return;
    }
    for (i, &c) in cols.iter().enumerate() {
        for rows in [1, 3, 5, 13] {
            check_avx2::<F>(
                g,
                rows,
                c,
                &[1, 2, 3, 4, 5, 6, 7, 9, 12],
                (i * 100 + rows) as u64,
            );
        }
    }
}

/// As `avx2_matches_scalar`, for one shape (many rows: the kernels' row blocking).
pub fn avx2_matches_scalar_rows<F: RowFormat>(g: GgmlDType, rows: usize, cols: usize, ns: &[usize])
where
    F::Act: PartialEq + std::fmt::Debug,
{
    if !has_avx2() || !cfg!(target_arch = "x86_64") {
        eprintln!("no AVX2: skipped");
        return;
    }
    check_avx2::<F>(g, rows, cols, ns, 4242);
}

/// The scale of a dot product's rounding errors: Σ over runs of 32 of max |w| · Σ |x|. (The
/// kernels sum scale and min parts separately, each up to about max |w| per element, so
/// where they cancel the error is relative to this, not to Σ |w·x|.)
fn magnitude(w: &[f32], x: &[f32]) -> f64 {
    w.chunks(32)
        .zip(x.chunks(32))
        .map(|(w, x)| {
            let wmax = w.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
            wmax * x.iter().map(|v| v.abs() as f64).sum::<f64>()
        })
        .sum()
}

/// `matmul` against f64 math on the dequantized weights and activation blocks (tight:
/// catches any element summed wrongly) and against candle's QMatMul (loose: candle
/// quantizes the activations its own way).
pub fn matmul_matches_f32_and_candle<F: RowFormat>(qt: QType, g: GgmlDType, cols: &[usize])
where
    F::Act: DeqAct,
{
    let rows = 37;
    for (i, &c) in cols.iter().enumerate() {
        let (q, _) = quantized(g, rows, c, 10 + i as u64);
        let m = QMatrix::from_qtensor(&q).unwrap().expect("a native type");
        assert_eq!((m.dtype, m.rows, m.cols), (qt, rows, c));
        let cm = QMatMul::from_qtensor(q).unwrap();
        let mut wrow = vec![0.0f32; c];
        let wdq: Vec<f32> = (0..rows)
            .flat_map(|r| {
                m.dequantize_row(r, &mut wrow);
                wrow.clone()
            })
            .collect();
        for n in [1usize, 5, 16] {
            let x = acts(n, c, 20 + i as u64);
            let y = super::matmul(&m, &x, n).unwrap();
            let mut xdq = Vec::with_capacity(n * c);
            for b in quantize_acts::<F>(&x, n, true) {
                b.push_f32(&mut xdq);
            }
            let xt = Tensor::from_slice(&x, (n, c), &Device::Cpu).unwrap();
            let yc = cm.forward(&xt).unwrap().flatten_all().unwrap();
            let yc = yc.to_vec1::<f32>().unwrap();
            let (mut worst, mut worst_c) = (0.0f64, 0.0f64);
            for a in 0..n {
                for r in 0..rows {
                    let (wr, xq, xr) = (
                        &wdq[r * c..(r + 1) * c],
                        &xdq[a * c..(a + 1) * c],
                        &x[a * c..(a + 1) * c],
                    );
                    let exact: f64 = wr.iter().zip(xq).map(|(&w, &v)| w as f64 * v as f64).sum();
                    let (mag, mag_x) = (magnitude(wr, xq), magnitude(wr, xr));
                    let got = y[a * rows + r] as f64;
                    let err = (got - exact).abs() / mag.max(1e-30);
                    let err_c = (got - yc[a * rows + r] as f64).abs() / mag_x.max(1e-30);
                    assert!(
                        err <= 1e-6,
                        "{g:?} cols {c} n {n} [{a}, {r}]: {got} vs f64 {exact} (scale {mag})"
                    );
                    assert!(
                        err_c <= 1e-4,
                        "{g:?} cols {c} n {n} [{a}, {r}]: {got} vs candle {} (scale {mag_x})",
                        yc[a * rows + r]
                    );
                    worst = worst.max(err);
                    worst_c = worst_c.max(err_c);
                }
            }
            eprintln!("{g:?} cols {c} n {n}: worst relative error vs f64 {worst:.2e}, vs candle {worst_c:.2e}");
        }
    }
}

/// One thread or the pool, scalar or AVX2, one matrix or two fused: the same bits.
pub fn threads_do_not_change_bits(qt: QType, g: GgmlDType, cols: usize) {
    let (q, _) = quantized(g, 300, cols, 31);
    let (q2, _) = quantized(g, 44, cols, 32);
    let m = QMatrix::from_qtensor(&q).unwrap().unwrap();
    let m2 = QMatrix::from_qtensor(&q2).unwrap().unwrap();
    assert_eq!((m.dtype, m2.dtype), (qt, qt));
    let single = MatmulOptions {
        single_thread: true,
        ..Default::default()
    };
    let scalar = MatmulOptions {
        kernel: Kernel::Scalar,
        single_thread: false,
    };
    for n in [1usize, 3, 9] {
        let x = acts(n, cols, 40 + n as u64);
        let par = matmul_with(&m, &x, n, &MatmulOptions::default()).unwrap();
        let one = matmul_with(&m, &x, n, &single).unwrap();
        assert_eq!(bits(&par), bits(&one), "{g:?} n {n}: threads");
        let sc = matmul_with(&m, &x, n, &scalar).unwrap();
        assert_eq!(bits(&par), bits(&sc), "{g:?} n {n}: scalar");
        let both = matmul_many_with(&[&m, &m2], &x, n, &MatmulOptions::default()).unwrap();
        assert_eq!(bits(&both[0]), bits(&par), "{g:?} n {n}: fused");
        let alone = matmul_with(&m2, &x, n, &single).unwrap();
        assert_eq!(bits(&both[1]), bits(&alone), "{g:?} n {n}: fused second");
    }
}

/// Best of `reps` timings of `f`, in seconds.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Single-thread speed on a 4096 × 4096 matrix: weight GB/s of the mat-vec, GFLOP/s of
/// 64 and 512 activation rows; ours and candle's QMatMul (on its own thread count:
/// run with RAYON_NUM_THREADS=1 for one thread).
pub fn bench(qt: QType, g: GgmlDType) {
    let (rows, cols) = (4096usize, 4096usize);
    let (q, data) = quantized(g, rows, cols, 5);
    let m = QMatrix::from_qtensor(&q).unwrap().unwrap();
    assert_eq!(m.dtype, qt);
    let cm = QMatMul::from_qtensor(q).unwrap();
    let opts = MatmulOptions {
        kernel: Kernel::Auto,
        single_thread: true,
    };
    eprintln!(
        "{g:?} {rows}x{cols} ({:.1} MB), candle threads {}, /proc/pressure/cpu: {}",
        data.len() as f64 / 1e6,
        candle_core::utils::get_num_threads(),
        std::fs::read_to_string("/proc/pressure/cpu")
            .unwrap_or_default()
            .lines()
            .next()
            .unwrap_or("")
    );
    let avx2 = MatmulOptions {
        kernel: Kernel::Avx2,
        single_thread: true,
    };
    for (n, reps) in [(1usize, 30), (64, 4), (512, 2)] {
        let x = acts(n, cols, 6);
        let xt = Tensor::from_slice(&x, (n, cols), &Device::Cpu).unwrap();
        let ours = best(reps, || {
            std::hint::black_box(matmul_with(&m, &x, n, &opts).unwrap());
        });
        if super::has_avx512_vnni() {
            let t2 = best(reps, || {
                std::hint::black_box(matmul_with(&m, &x, n, &avx2).unwrap());
            });
            eprintln!(
                "  n={n:<3}: auto (VNNI) {:.2} ms, AVX2 {:.2} ms",
                ours * 1e3,
                t2 * 1e3
            );
        }
        let theirs = best(reps, || {
            std::hint::black_box(cm.forward(&xt).unwrap());
        });
        let flops = 2.0 * (rows * cols * n) as f64;
        if n == 1 {
            let gb = data.len() as f64 / 1e9;
            eprintln!(
                "  n=1:   ours {:6.2} GB/s ({:.2} ms), candle {:6.2} GB/s ({:.2} ms)",
                gb / ours,
                ours * 1e3,
                gb / theirs,
                theirs * 1e3
            );
        } else {
            eprintln!(
                "  n={n:<3}: ours {:6.1} GFLOP/s ({:.1} ms), candle {:6.1} GFLOP/s ({:.1} ms)",
                flops / ours / 1e9,
                ours * 1e3,
                flops / theirs / 1e9,
                theirs * 1e3
            );
        }
    }
}
