//! Threaded driver: `y (n × rows) = x (n × cols) · Wᵀ`.
//!
//! 1. Each activation row is quantized once (Q8_1 for Q4_1 weights, Q8_0 for Q8_0).
//! 2. Weight rows are split into contiguous chunks run in parallel on the shared pool (`parallel`); inside a
//!    chunk the kernels read each weight block once per group of activation rows (n > 1)
//!    or share each activation block between 4 weight rows (n = 1).
//!
//! Every output element is one full-row dot product in llama.cpp's order (see `q4_1`,
//! `q8_0`), computed by a single task, so the result is the same for any thread count or
//! chunking.

use super::q8::{self, BlockQ8_0, BlockQ8_1, QK};
use super::{has_avx2, q4_1, q8_0, QMatrix, QType};
use anyhow::{bail, Result};

/// Which kernels to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AVX2 when the CPU has AVX2+FMA+F16C, else scalar.
    Auto,
    /// Portable scalar code (bit-identical to AVX2).
    Scalar,
    /// AVX2 (errors if the CPU lacks it).
    Avx2,
}

#[derive(Debug, Clone, Copy)]
pub struct MatmulOptions {
    pub kernel: Kernel,
    /// Run on the calling thread only.
    pub single_thread: bool,
}

impl Default for MatmulOptions {
    fn default() -> Self {
        Self {
            kernel: Kernel::Auto,
            single_thread: false,
        }
    }
}

/// `y = x · Wᵀ` for n rows of `x` (n × w.cols, row-major); returns n × w.rows.
pub fn matmul(w: &QMatrix, x: &[f32], n: usize) -> Result<Vec<f32>> {
    matmul_with(w, x, n, &MatmulOptions::default())
}

pub fn matmul_with(w: &QMatrix, x: &[f32], n: usize, opts: &MatmulOptions) -> Result<Vec<f32>> {
    if x.len() != n * w.cols {
        bail!(
            "matmul: activations have {} values, expected {n} rows × {} columns",
            x.len(),
            w.cols
        );
    }
    if n == 0 || w.rows == 0 {
        return Ok(vec![0.0; n * w.rows]);
    }
    let avx2 = match opts.kernel {
        Kernel::Auto => has_avx2(),
        Kernel::Scalar => false,
        Kernel::Avx2 => {
            if !has_avx2() {
                bail!("matmul: AVX2 kernel requested but this CPU lacks AVX2/FMA/F16C");
            }
            true
        }
    };
    let nb = w.cols / QK;
    let par = !opts.single_thread;
    Ok(match w.dtype {
        QType::Q4_1 => {
            let acts = quantize_rows(x, n, nb, par, BlockQ8_1::ZERO, |xr, o| {
                if avx2 {
                    q8::quantize_row_q8_1(xr, o)
                } else {
                    q8::quantize_row_q8_1_scalar(xr, o)
                }
            });
            drive(w, &acts, nb, n, par, |rows, stride, n_rows, ys, out| {
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: AVX2/FMA/F16C checked above; `rows` holds n_rows rows.
                    unsafe { q4_1::avx2::rows_x_acts(rows, stride, n_rows, ys, out) };
                    return;
                }
                for r in 0..n_rows {
                    let wr = &rows[r * stride..(r + 1) * stride];
                    for (a, y) in ys.iter().enumerate() {
                        out[r * ys.len() + a] = q4_1::dot_scalar(wr, y);
                    }
                }
            })
        }
        QType::Q8_0 => {
            let acts = quantize_rows(x, n, nb, par, BlockQ8_0::ZERO, |xr, o| {
                if avx2 {
                    q8::quantize_row_q8_0(xr, o)
                } else {
                    q8::quantize_row_q8_0_scalar(xr, o)
                }
            });
            drive(w, &acts, nb, n, par, |rows, stride, n_rows, ys, out| {
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: as above.
                    unsafe { q8_0::avx2::rows_x_acts(rows, stride, n_rows, ys, out) };
                    return;
                }
                for r in 0..n_rows {
                    let wr = &rows[r * stride..(r + 1) * stride];
                    for (a, y) in ys.iter().enumerate() {
                        out[r * ys.len() + a] = q8_0::dot_scalar(wr, y);
                    }
                }
            })
        }
    })
}

fn quantize_rows<B: Copy + Send + Sync>(
    x: &[f32],
    n: usize,
    nb: usize,
    par: bool,
    zero: B,
    f: impl Fn(&[f32], &mut [B]) + Sync,
) -> Vec<B> {
    let cols = nb * QK;
    let mut acts = vec![zero; n * nb];
    if par && n >= 8 {
        crate::parallel::for_each_chunk_mut(&mut acts, nb, |i, o| {
            f(&x[i * cols..(i + 1) * cols], o)
        });
    } else {
        for (o, xr) in acts.chunks_mut(nb).zip(x.chunks(cols)) {
            f(xr, o);
        }
    }
    acts
}

/// Multiply-adds below which one thread is faster than waking the pool.
const PAR_MIN_MACS: usize = 1 << 17;

fn drive<B: Sync>(
    w: &QMatrix,
    acts: &[B],
    nb: usize,
    n: usize,
    par: bool,
    kernel: impl Fn(&[u8], usize, usize, &[&[B]], &mut [f32]) + Sync,
) -> Vec<f32> {
    let rows = w.rows;
    let stride = w.row_bytes();
    let ys: Vec<&[B]> = acts.chunks(nb).collect();
    // out_t is rows × n (row-major by weight row); transposed to n × rows at the end.
    let mut out_t = vec![0.0f32; rows * n];
    let threads = candle_core::utils::get_num_threads().max(1);
    let macs = rows * nb * QK * n;
    if !par || threads == 1 || macs < PAR_MIN_MACS {
        kernel(&w.data[..], stride, rows, &ys, &mut out_t);
    } else {
        // ~4 chunks per thread for balance, multiples of 4 rows for the mat-vec tile. The
        // pool is candle's persistent spinning pool: a decode step runs ~200 of these
        // products, and waking sleeping rayon workers for each cost more than the math.
        let chunk = rows.div_ceil(threads * 4).next_multiple_of(4).max(4);
        crate::parallel::for_each_chunk_mut(&mut out_t, chunk * n, |c, o| {
            let r0 = c * chunk;
            let n_rows = o.len() / n;
            kernel(
                &w.data[r0 * stride..(r0 + n_rows) * stride],
                stride,
                n_rows,
                &ys,
                o,
            );
        });
    }
    if n == 1 {
        return out_t;
    }
    let mut out = vec![0.0f32; n * rows];
    for (r, row) in out_t.chunks_exact(n).enumerate() {
        for (a, v) in row.iter().enumerate() {
            out[a * rows + r] = *v;
        }
    }
    out
}
