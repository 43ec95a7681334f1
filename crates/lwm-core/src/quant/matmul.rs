//! Threaded driver: `y (n × rows) = x (n × cols) · Wᵀ`.
//!
//! 1. Each activation row is quantized once (Q8_1 for Q4_1 weights, Q8_0 for Q8_0).
//! 2. Weight rows are split into contiguous chunks run in parallel on the shared pool (`parallel`); inside a
//!    chunk the kernels read each weight block once per group of activation rows (n > 1)
//!    or share each activation block between 4 weight rows (n = 1). Matrices stored
//!    interleaved (`q4_1_x8`, `q8_0_x8`, whole groups of 8 rows per chunk) share it
//!    between 8 rows and handle the 8 rows' scales (and Q4_1's mins) as vectors.
//!
//! Every output element is one full-row dot product in llama.cpp's order (see `q4_1`,
//! `q8_0`), computed by a single task, so the result is the same for any thread count or
//! chunking. The K-quants follow llama.cpp's two CPU paths: `vec_dot` below 8 activation
//! rows, its integer tiles (`k_tiles`) from 8 on.

use super::k_tiles::{self, SuperBlock};
use super::q8::{self, BlockQ8K, BlockQ8_0, BlockQ8_1, QK, QK_K};
use super::row_kernels::{rows_x_acts_scalar, RowFormat};
use super::{
    has_avx2, has_avx512_vnni, q4_0, q4_1, q4_1_x8, q4_k, q5_0, q5_k, q6_k, q8_0, q8_0_x8, Layout,
    QMatrix, QType,
};
use anyhow::{bail, Result};

/// Which kernels to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// The fastest this CPU has: AVX-512 VNNI, else AVX2+FMA+F16C, else scalar
    /// (`LWM_KERNEL=avx2|scalar` in the environment caps it, for comparisons).
    Auto,
    /// Portable scalar code (bit-identical to AVX2).
    Scalar,
    /// AVX2 (errors if the CPU lacks it).
    Avx2,
    /// AVX2 with AVX-512 VNNI integer dot products (errors if the CPU lacks it).
    Avx512Vnni,
}

/// The instruction set a product runs with, resolved from `Kernel` and the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Isa {
    Scalar,
    Avx2,
    Vnni,
}

/// `LWM_KERNEL` (read once): `scalar` or `avx2` caps what `Kernel::Auto` picks (here and
/// in the attention kernel); `Kernel::Auto` when unset.
pub fn kernel_cap() -> Kernel {
    use std::sync::OnceLock;
    static CAP: OnceLock<Kernel> = OnceLock::new();
    *CAP.get_or_init(|| match std::env::var("LWM_KERNEL").as_deref() {
        Ok("scalar") => Kernel::Scalar,
        Ok("avx2") => Kernel::Avx2,
        Ok("avx512vnni") | Ok("auto") | Err(_) => Kernel::Auto,
        Ok(other) => {
            eprintln!(
                "warning: LWM_KERNEL='{other}' is not scalar, avx2, avx512vnni or auto; ignored"
            );
            Kernel::Auto
        }
    })
}

fn resolve(kernel: Kernel) -> Result<Isa> {
    let kernel = match (kernel, kernel_cap()) {
        (Kernel::Auto, Kernel::Avx2) if has_avx2() => Kernel::Avx2,
        (Kernel::Auto, Kernel::Scalar) => Kernel::Scalar,
        (k, _) => k,
    };
    Ok(match kernel {
        Kernel::Auto if has_avx512_vnni() => Isa::Vnni,
        Kernel::Auto if has_avx2() => Isa::Avx2,
        Kernel::Auto | Kernel::Scalar => Isa::Scalar,
        Kernel::Avx2 if has_avx2() => Isa::Avx2,
        Kernel::Avx2 => bail!("matmul: AVX2 kernel requested but this CPU lacks AVX2/FMA/F16C"),
        Kernel::Avx512Vnni if has_avx512_vnni() => Isa::Vnni,
        Kernel::Avx512Vnni => {
            bail!("matmul: AVX-512 VNNI kernel requested but this CPU lacks AVX-512 F/VL/VNNI")
        }
    })
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
    let mut ys = matmul_many_with(&[w], x, n, opts)?;
    Ok(ys.pop().unwrap_or_default())
}

/// `y_i = x · W_iᵀ` for several matrices of one type and width that read the same
/// activations (Q, K, V; gate, up): the activations are quantized once and every
/// matrix's row chunks run in one parallel region. Each output element is the same
/// full-row dot product as `matmul` computes, so results are identical.
pub fn matmul_many(ws: &[&QMatrix], x: &[f32], n: usize) -> Result<Vec<Vec<f32>>> {
    matmul_many_with(ws, x, n, &MatmulOptions::default())
}

pub fn matmul_many_with(
    ws: &[&QMatrix],
    x: &[f32],
    n: usize,
    opts: &MatmulOptions,
) -> Result<Vec<Vec<f32>>> {
    let Some(w0) = ws.first() else {
        return Ok(Vec::new());
    };
    if let Some(w) = ws.iter().find(|w| w.dtype != w0.dtype || w.cols != w0.cols) {
        bail!(
            "matmul: fused matrices differ ({:?} [{}, {}] vs {:?} [{}, {}])",
            w.dtype,
            w.rows,
            w.cols,
            w0.dtype,
            w0.rows,
            w0.cols
        );
    }
    if x.len() != n * w0.cols {
        bail!(
            "matmul: activations have {} values, expected {n} rows × {} columns",
            x.len(),
            w0.cols
        );
    }
    if n == 0 {
        return Ok(ws.iter().map(|_| Vec::new()).collect());
    }
    let isa = resolve(opts.kernel)?;
    let avx2 = isa != Isa::Scalar;
    let nb = w0.row_blocks();
    let par = !opts.single_thread;
    Ok(match w0.dtype {
        QType::Q4_1 => {
            let acts = quantize_rows(x, n, nb, QK, par, BlockQ8_1::ZERO, |xr, o| {
                if avx2 {
                    q8::quantize_row_q8_1(xr, o)
                } else {
                    q8::quantize_row_q8_1_scalar(xr, o)
                }
            });
            drive(ws, &acts, nb, n, par, |w, rows, stride, n_rows, ys, out| {
                if w.layout == Layout::Q4_1X8 {
                    // `rows` starts on a group boundary and n_rows is whole groups (`row_align`).
                    let groups = n_rows / q4_1_x8::GROUP;
                    #[cfg(target_arch = "x86_64")]
                    match isa {
                        // SAFETY: the ISA was checked (`resolve`); `rows` holds `groups` groups.
                        Isa::Vnni => {
                            unsafe { q4_1_x8::avx2::groups_x_acts_vnni(rows, groups, ys, out) };
                            return;
                        }
                        Isa::Avx2 => {
                            unsafe { q4_1_x8::avx2::groups_x_acts(rows, groups, ys, out) };
                            return;
                        }
                        Isa::Scalar => {}
                    }
                    q4_1_x8::groups_x_acts_scalar(rows, groups, ys, out);
                    return;
                }
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
            let acts = quantize_rows(x, n, nb, QK, par, BlockQ8_0::ZERO, |xr, o| {
                if avx2 {
                    q8::quantize_row_q8_0(xr, o)
                } else {
                    q8::quantize_row_q8_0_scalar(xr, o)
                }
            });
            drive(ws, &acts, nb, n, par, |w, rows, stride, n_rows, ys, out| {
                if w.layout == Layout::Q8_0X8 {
                    // `rows` starts on a group boundary and n_rows is whole groups (`row_align`).
                    let groups = n_rows / q8_0_x8::GROUP;
                    #[cfg(target_arch = "x86_64")]
                    if isa == Isa::Vnni && ys.len() >= 2 {
                        // SAFETY: AVX-512 F/VL/VNNI checked (`resolve`); as below.
                        unsafe { q8_0_x8::avx512::groups_x_acts(rows, groups, ys, out) };
                        return;
                    }
                    #[cfg(target_arch = "x86_64")]
                    if avx2 {
                        // SAFETY: AVX2/FMA/F16C checked (`resolve`); `rows` holds `groups` groups.
                        unsafe { q8_0_x8::avx2::groups_x_acts(rows, groups, ys, out) };
                        return;
                    }
                    q8_0_x8::groups_x_acts_scalar(rows, groups, ys, out);
                    return;
                }
                // Q8_0 stays on AVX2 under VNNI: `vpdpbusd` measured 0.5x (mat-vec) and 0.85x
                // (64 rows) of `maddubs` + `madd` here on this format (`lwm bench --kernels`).
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
        QType::Q4K => run_k_quant::<q4_k::Q4K>(ws, x, n, isa, par),
        QType::Q6K => run_k_quant::<q6_k::Q6K>(ws, x, n, isa, par),
        QType::Q5K => run_k_quant::<q5_k::Q5K>(ws, x, n, isa, par),
        QType::Q4_0 => run_rows::<q4_0::Q4_0>(ws, x, n, isa, par),
        QType::Q5_0 => run_rows::<q5_0::Q5_0>(ws, x, n, isa, par),
    })
}

/// `y_i = x · W_iᵀ` for a `RowFormat` (GGUF's row-major blocks).
fn run_rows<F: RowFormat>(
    ws: &[&QMatrix],
    x: &[f32],
    n: usize,
    isa: Isa,
    par: bool,
) -> Vec<Vec<f32>> {
    let nb = ws[0].cols / F::BLOCK_ELEMS;
    let simd = isa != Isa::Scalar;
    let acts = quantize_rows(x, n, nb, F::BLOCK_ELEMS, par, F::ACT_ZERO, |xr, o| {
        F::quantize_acts(xr, o, simd)
    });
    drive(ws, &acts, nb, n, par, |_, rows, stride, n_rows, ys, out| {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `resolve` checked the ISA; `drive` passes whole rows and an output
            // of n_rows × ys.len().
            if isa == Isa::Vnni && unsafe { F::rows_x_acts_vnni(rows, stride, n_rows, ys, out) } {
                return;
            }
            if simd && unsafe { F::rows_x_acts_avx2(rows, stride, n_rows, ys, out) } {
                return;
            }
        }
        rows_x_acts_scalar::<F>(rows, stride, n_rows, ys, out)
    })
}

/// Activation rows from which the K-quants take the integer tiles (`k_tiles`), as
/// llama.cpp's CPU backend does; below, the row kernels (`vec_dot`'s order).
pub const K_TILES_MIN_ROWS: usize = 8;

/// `y_i = x · W_iᵀ` for a K-quant: `k_tiles` from `K_TILES_MIN_ROWS` activation rows on.
fn run_k_quant<F: SuperBlock>(
    ws: &[&QMatrix],
    x: &[f32],
    n: usize,
    isa: Isa,
    par: bool,
) -> Vec<Vec<f32>> {
    if n < K_TILES_MIN_ROWS {
        return run_rows::<F>(ws, x, n, isa, par);
    }
    let nb = ws[0].cols / QK_K;
    let acts = quantize_rows(x, n, nb, QK_K, par, BlockQ8K::ZERO, |xr, o| {
        F::quantize_acts(xr, o, true)
    });
    let ys: Vec<&[BlockQ8K]> = acts.chunks(nb).collect();
    let tiles = k_tiles::ActTiles::new(&ys, nb, F::SUB);
    drive(ws, &acts, nb, n, par, |_, rows, stride, n_rows, _, out| {
        k_tiles::rows_x_acts::<F>(isa, rows, stride, n_rows, &tiles, out)
    })
}

fn quantize_rows<B: Copy + Send + Sync>(
    x: &[f32],
    n: usize,
    nb: usize,
    block_elems: usize,
    par: bool,
    zero: B,
    f: impl Fn(&[f32], &mut [B]) + Sync,
) -> Vec<B> {
    let cols = nb * block_elems;
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
    ws: &[&QMatrix],
    acts: &[B],
    nb: usize,
    n: usize,
    par: bool,
    kernel: impl Fn(&QMatrix, &[u8], usize, usize, &[&[B]], &mut [f32]) + Sync,
) -> Vec<Vec<f32>> {
    let ys: Vec<&[B]> = acts.chunks(nb).collect();
    // out_t[i] is rows_i × n (row-major by weight row); transposed to n × rows_i at the end.
    let mut outs_t: Vec<Vec<f32>> = ws.iter().map(|w| vec![0.0f32; w.rows * n]).collect();
    let threads = candle_core::utils::get_num_threads().max(1);
    let macs: usize = ws.iter().map(|w| w.rows * w.cols).sum::<usize>() * n;
    if !par || threads == 1 || macs < PAR_MIN_MACS {
        for (w, o) in ws.iter().zip(outs_t.iter_mut()) {
            kernel(w, &w.data[..], w.row_bytes(), w.rows, &ys, o);
        }
    } else {
        // ~4 chunks per thread and matrix for balance, multiples of 4 rows for the mat-vec
        // tile (of 8 for interleaved matrices: whole groups). The pool is candle's persistent spinning pool: a decode step runs ~200 of
        // these products, and waking sleeping rayon workers for each cost more than the math.
        let mut tasks = Vec::new(); // (matrix, first row, rows)
        for (i, w) in ws.iter().enumerate() {
            let unit = 4usize.max(w.row_align());
            let chunk = w
                .rows
                .div_ceil(threads * 4)
                .next_multiple_of(unit)
                .max(unit);
            for r0 in (0..w.rows).step_by(chunk) {
                tasks.push((i, r0, chunk.min(w.rows - r0)));
            }
        }
        let ptrs: Vec<usize> = outs_t.iter_mut().map(|o| o.as_mut_ptr() as usize).collect();
        crate::parallel::for_each(tasks.len(), |t| {
            let (i, r0, n_rows) = tasks[t];
            let w = ws[i];
            let stride = w.row_bytes();
            // SAFETY: tasks cover disjoint row ranges of each output, which outlives the
            // call (`for_each` returns after every task ran).
            let o = unsafe {
                std::slice::from_raw_parts_mut((ptrs[i] as *mut f32).add(r0 * n), n_rows * n)
            };
            kernel(
                w,
                &w.data[r0 * stride..(r0 + n_rows) * stride],
                stride,
                n_rows,
                &ys,
                o,
            );
        });
    }
    if n == 1 {
        return outs_t;
    }
    ws.iter()
        .zip(outs_t)
        .map(|(w, out_t)| {
            let rows = w.rows;
            let mut out = vec![0.0f32; n * rows];
            // In tiles of 16 weight rows: each activation row's 16 outputs are one cache
            // line, and the tile's inputs (16 × n) stay in L1 (the row-at-a-time scatter
            // cost ~10% of a 512-row prefill GEMM).
            const T: usize = 16;
            for (rt, tile) in out_t.chunks(T * n).enumerate() {
                let r0 = rt * T;
                let tr = tile.len() / n;
                for a in 0..n {
                    let o = &mut out[a * rows + r0..a * rows + r0 + tr];
                    for (k, v) in o.iter_mut().enumerate() {
                        *v = tile[k * n + a];
                    }
                }
            }
            out
        })
        .collect()
}
