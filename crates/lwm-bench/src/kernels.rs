//! `lwm-bench kernels`: the machine's FP32 FMA peak (register-only AVX2 and AVX-512
//! loops) next to the attention kernel's achieved FLOP/s, both on the same threads.
//!
//! Peak: 10 independent 8- or 16-lane FMA chains per thread (enough to cover FMA latency ×
//! ports), 2 flops per lane per FMA; the faster width is the peak. Attention:
//! `causal_attention_quant` for `q_rows` new rows of a 9-head / 3-KV-head / d=64 layer (the
//! default model's shape) against `depth` cached keys; flops = 4·d per (query head, visible
//! key) pair (q·k and p·v, 2 each), softmax not counted.

use anyhow::Result;
use lwm_core::attention::{causal_attention_quant, Chunking};
use lwm_core::attention_kernel::{attend_group_with, isa_for, supports, AttnIsa, KvBlock};
use lwm_core::kv::{KvCache, KvTypes};
use std::time::Instant;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(0.0); 10];
    let a = _mm256_set1_ps(0.999_999);
    let b = _mm256_set1_ps(1e-7);
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm256_fmadd_ps(*x, a, b);
        }
    }
    let mut s = _mm256_setzero_ps();
    for x in acc {
        s = _mm256_add_ps(s, x);
    }
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), s);
    out.iter().sum()
}

/// The same 10 chains on 16-lane vectors (CPUs with two 512-bit FMA units double the
/// AVX2 figure; those that split them in halves, as Zen 4, match it).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_loop512(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(0.0); 10];
    let a = _mm512_set1_ps(0.999_999);
    let b = _mm512_set1_ps(1e-7);
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = _mm512_fmadd_ps(*x, a, b);
        }
    }
    let mut s = _mm512_setzero_ps();
    for x in acc {
        s = _mm512_add_ps(s, x);
    }
    _mm512_reduce_add_ps(s)
}

/// GFLOP/s of the FMA loop on `threads` threads at once: the best of 5 short runs (on a
/// shared machine any one run can lose its core for part of the time), on 8-lane (AVX2)
/// or 16-lane (AVX-512) vectors; None when the CPU lacks them.
pub fn fma_peak_gflops(threads: usize, lanes: usize) -> Option<f64> {
    (0..5)
        .filter_map(|_| fma_peak_once(threads, lanes))
        .max_by(f64::total_cmp)
}

fn fma_peak_once(threads: usize, lanes: usize) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        let have = match lanes {
            8 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            16 => is_x86_feature_detected!("avx512f"),
            _ => false,
        };
        if !have {
            return None;
        }
        let iters: u64 = 20_000_000;
        let t = Instant::now();
        let sink: f32 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads.max(1))
                // SAFETY: the instruction set was detected above.
                .map(|_| {
                    s.spawn(move || unsafe {
                        if lanes == 16 {
                            fma_loop512(iters)
                        } else {
                            fma_loop(iters)
                        }
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        std::hint::black_box(sink);
        let flops = threads.max(1) as f64 * iters as f64 * 10.0 * lanes as f64 * 2.0;
        Some(flops / t.elapsed().as_secs_f64() / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (threads, lanes);
        None
    }
}

/// The machine's FP32 FMA peak: the faster of the two vector widths, and each of them.
fn best_peak(threads: usize) -> (Option<f64>, [Option<f64>; 2]) {
    let each = [fma_peak_gflops(threads, 8), fma_peak_gflops(threads, 16)];
    let best = each.into_iter().flatten().max_by(f64::total_cmp);
    (best, each)
}

/// GFLOP/s of the attention kernel (median of `reps`) for `q_rows` rows at `depth`.
pub fn attention_gflops(kv: KvTypes, q_rows: usize, depth: usize, reps: usize) -> f64 {
    let (heads, kv_heads, d) = (9, 3, 64);
    let total = depth + q_rows;
    let mut cache = KvCache::with_types(1, kv_heads, d, kv);
    let x = lwm_core::rng::XorShift::new(3).vec(total * kv_heads * d, -1.0, 1.0);
    cache.append(0, &x, &x, total);
    let q = lwm_core::rng::XorShift::new(4).vec(q_rows * heads * d, -1.0, 1.0);
    // Visible (query, key) pairs per head: depth + i + 1 for row i.
    let pairs: f64 = (0..q_rows).map(|i| (depth + i + 1) as f64).sum();
    let flops = heads as f64 * pairs * 4.0 * d as f64;
    let mut runs: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            let out = causal_attention_quant(
                &q,
                q_rows,
                depth,
                heads,
                d,
                &cache.quant_view(0),
                Chunking::default(),
            );
            std::hint::black_box(out);
            flops / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[runs.len() / 2]
}

/// A `rows × cols` matrix of random blocks of `dtype` (small positive scales, mins ≤ 0 for
/// Q4_1, random packed scales and mins for the K-quants), in `layout` or the type's default
/// one; None if the shape does not suit the type or layout.
fn random_qmatrix(
    rng: &mut lwm_core::rng::XorShift,
    dtype: lwm_core::quant::QType,
    rows: usize,
    cols: usize,
    layout: Option<lwm_core::quant::Layout>,
) -> Option<lwm_core::quant::QMatrix> {
    use lwm_core::quant::{QMatrix, QType};
    if !cols.is_multiple_of(dtype.block_elems()) {
        return None;
    }
    let nb = rows * cols / dtype.block_elems();
    let mut data = Vec::with_capacity(nb * dtype.block_bytes());
    for _ in 0..nb {
        let d = half::f16::from_f32(0.01 + 0.01 * rng.uniform(0.0, 1.0));
        data.extend_from_slice(&d.to_bits().to_le_bytes());
        let qs = match dtype {
            QType::Q4_1 => {
                let m = half::f16::from_f32(-0.1 * rng.uniform(0.0, 1.0));
                data.extend_from_slice(&m.to_bits().to_le_bytes());
                16
            }
            QType::Q8_0 => 32,
            // Random nibbles (and fifth bits).
            QType::Q4_0 | QType::Q5_0 => dtype.block_bytes() - 2,
            QType::Q5K => {
                // Then random packed scales, mins and quants (these matrices only time).
                let dmin = half::f16::from_f32(0.0005 * rng.uniform(0.0, 1.0));
                data.extend_from_slice(&dmin.to_bits().to_le_bytes());
                dtype.block_bytes() - 4
            }
            QType::Q4K | QType::Q6K => return None,
        };
        data.extend((0..qs).map(|_| rng.uniform(0.0, 255.0) as u8));
    }
    match layout {
        Some(l) => QMatrix::with_layout(dtype, rows, cols, data.into(), l).ok(),
        None => QMatrix::new(dtype, rows, cols, data.into()).ok(),
    }
}

/// Weight GB/s of the mat-vec (decode's product) for a `rows × cols` matrix of `dtype` in
/// `layout`, on the calling thread only (or all threads): the best of `reps` timings of 64
/// products each, so a moment without the core doesn't count. Matrices under 8 MB stay in
/// cache, so there this is the kernel's arithmetic speed, not memory bandwidth.
pub fn matvec_gbps(
    dtype: lwm_core::quant::QType,
    layout: lwm_core::quant::Layout,
    rows: usize,
    cols: usize,
    reps: usize,
    single_thread: bool,
) -> f64 {
    use lwm_core::quant::{matmul_with, Kernel, MatmulOptions};
    let mut rng = lwm_core::rng::XorShift::new(11);
    let Some(w) = random_qmatrix(&mut rng, dtype, rows, cols, Some(layout)) else {
        return f64::NAN;
    };
    let x = rng.vec(cols, -1.0, 1.0);
    let opts = MatmulOptions {
        kernel: Kernel::Auto,
        single_thread,
    };
    let per_rep = if w.data.len() > 8 << 20 { 1 } else { 64 };
    let best = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per_rep {
                std::hint::black_box(matmul_with(&w, &x, 1, &opts).ok());
            }
            t.elapsed().as_secs_f64() / per_rep as f64
        })
        .fold(f64::INFINITY, f64::min);
    w.data.len() as f64 / best / 1e9
}

/// Seconds of one `y = x · Wᵀ` (best of `reps`, one thread) for a random `rows × cols` matrix
/// of `dtype` in its default layout and `n` activation rows, with `kernel`; NaN when the
/// CPU lacks the kernel.
pub fn quant_matmul_secs(
    dtype: lwm_core::quant::QType,
    kernel: lwm_core::quant::Kernel,
    rows: usize,
    cols: usize,
    n: usize,
    reps: usize,
) -> f64 {
    use lwm_core::quant::{matmul_with, MatmulOptions};
    let mut rng = lwm_core::rng::XorShift::new(13);
    let Some(w) = random_qmatrix(&mut rng, dtype, rows, cols, None) else {
        return f64::NAN;
    };
    let x = rng.vec(n * cols, -1.0, 1.0);
    let opts = MatmulOptions {
        kernel,
        single_thread: true,
    };
    if matmul_with(&w, &x, n, &opts).is_err() {
        return f64::NAN;
    }
    let per_rep = (64 / n).max(1);
    (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            for _ in 0..per_rep {
                std::hint::black_box(matmul_with(&w, &x, n, &opts).ok());
            }
            t.elapsed().as_secs_f64() / per_rep as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// Single-thread GFLOP/s of the attention primitive for one head's 64 query rows against
/// `depth` keys in blocks of 256: `attend_block` as the engine calls it (`None`), or the
/// tiled kernel on one instruction set.
pub fn primitive_gflops(depth: usize, isa: Option<AttnIsa>) -> f64 {
    use lwm_core::attention::{attend_block, BlockMask, Partial};
    let (nq, d, kc) = (64, 64, 256);
    let q = lwm_core::rng::XorShift::new(5).vec(nq * d, -1.0, 1.0);
    let k = lwm_core::rng::XorShift::new(6).vec(depth * d, -1.0, 1.0);
    let v = lwm_core::rng::XorShift::new(7).vec(depth * d, -1.0, 1.0);
    let t = Instant::now();
    let mut st = Partial::new(nq, d);
    for k0 in (0..depth).step_by(kc) {
        let k1 = (k0 + kc).min(depth);
        let (kb, vb) = (&k[k0 * d..k1 * d], &v[k0 * d..k1 * d]);
        let mask = BlockMask::full();
        match isa {
            Some(isa) => {
                let block = KvBlock::F32 { k: kb, v: vb };
                let st = std::slice::from_mut(&mut st);
                attend_group_with(isa, &[&q], d, block, 0.125, &mask, st)
            }
            None => attend_block(&q, d, kb, vb, 0.125, &mask, &mut st),
        }
    }
    std::hint::black_box(&st);
    (nq * depth * 4 * d) as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// Print the peak and the kernel's figures (and return them as JSON).
pub fn run(threads: usize, reps: usize) -> Result<serde_json::Value> {
    let (peak, each) = best_peak(threads);
    let mut rows = Vec::new();
    println!("| kernel | GFLOP/s | % of FMA peak |");
    println!("|---|---|---|");
    for (isa, width_peak) in ["AVX2", "AVX-512"].into_iter().zip(each) {
        match (width_peak, peak) {
            (Some(p), Some(best)) => println!(
                "| FMA peak, {threads} threads ({isa}, 10 chains) | {p:.1} | {:.0}% |",
                100.0 * p / best
            ),
            _ => println!("| FMA peak ({isa}) | n/a (not on this CPU) | |"),
        }
    }
    let one = best_peak(1).0;
    let primitive = primitive_gflops(8192, None);
    let of_one = |g: f64| one.map_or("n/a".into(), |p| format!("{:.0}%", 100.0 * g / p));
    println!(
        "| attend_block ({}), 1 thread, 64 rows × 8192 keys | {primitive:.1} | {} of 1-thread peak {:.1} |",
        isa_for(64).map_or("portable".into(), |i| format!("{i:?}")),
        of_one(primitive),
        one.unwrap_or(f64::NAN)
    );
    // Each instruction set on its own (best of 3: one core of a shared machine).
    let mut by_isa = serde_json::Map::new();
    for isa in [AttnIsa::Avx2, AttnIsa::Avx512] {
        if !supports(isa, 64) {
            continue;
        }
        let g = (0..3)
            .map(|_| primitive_gflops(8192, Some(isa)))
            .fold(0.0, f64::max);
        println!(
            "| tiled kernel {isa:?}, 1 thread, 64 rows × 8192 keys, best of 3 | {g:.1} | {} of 1-thread peak |",
            of_one(g)
        );
        by_isa.insert(format!("{isa:?}"), g.into());
    }
    for (kv, q_rows, depth) in [
        (KvTypes::F32, 512, 0),
        (KvTypes::F16, 512, 0),
        (KvTypes::F16, 512, 8192),
        (KvTypes::same(lwm_core::kv::KvType::Q8_0), 512, 8192),
        (KvTypes::F16, 1, 8192),
    ] {
        let g = attention_gflops(kv, q_rows, depth, reps);
        let pct = peak.map(|p| 100.0 * g / p);
        println!(
            "| attention {} KV, {q_rows} rows at depth {depth} | {g:.1} | {} |",
            kv.name(),
            pct.map_or("n/a".into(), |p| format!("{p:.0}%"))
        );
        rows.push(serde_json::json!({"kv_type": kv.name(), "q_rows": q_rows, "depth": depth, "gflops": g, "pct_of_peak": pct}));
    }
    println!();
    println!(
        "| mat-vec (decode), best of {} | row layout GB/s | interleaved x8 GB/s | ratio |",
        reps * 10
    );
    println!("|---|---|---|---|");
    let mut matvec = Vec::new();
    // The default model's shapes in cache (the kernel's arithmetic), then matrices of 30 MB
    // and more on all threads (beyond this machine's L3: memory bandwidth, as in a decode
    // step). Q8_0 49152 × 576 is the default model's output head.
    use lwm_core::quant::{Layout, QType};
    for (dtype, x8_layout, rows, cols, single) in [
        (QType::Q4_1, Layout::Q4_1X8, 1536, 576, true),
        (QType::Q4_1, Layout::Q4_1X8, 576, 1536, true),
        (QType::Q4_1, Layout::Q4_1X8, 576, 576, true),
        (QType::Q4_1, Layout::Q4_1X8, 49152, 1536, false),
        (QType::Q8_0, Layout::Q8_0X8, 4096, 576, true),
        (QType::Q8_0, Layout::Q8_0X8, 49152, 576, false),
    ] {
        let plain = matvec_gbps(dtype, Layout::Rows, rows, cols, reps * 10, single);
        let x8 = matvec_gbps(dtype, x8_layout, rows, cols, reps * 10, single);
        let used = if single { 1 } else { threads };
        println!(
            "| {dtype:?} {rows} × {cols}, {used} thread(s) | {plain:.1} | {x8:.1} | {:.2}x |",
            x8 / plain
        );
        matvec.push(serde_json::json!({"dtype": format!("{dtype:?}"), "rows": rows, "cols": cols, "threads": used, "row_layout_gbps": plain, "x8_gbps": x8}));
    }
    println!();
    println!(
        "| quantized product, 1 thread, best of {} | AVX2 ms | AVX-512 VNNI ms | VNNI speed-up |",
        reps * 10
    );
    println!("|---|---|---|---|");
    let mut vnni = Vec::new();
    // The default model's FFN shapes: decode (1 row) and a prefill chunk (64 rows). (Q8_0
    // runs AVX2 either way: VNNI measured slower on that format.)
    for (dtype, rows, cols, n) in [
        (lwm_core::quant::QType::Q4_1, 1536, 576, 1),
        (lwm_core::quant::QType::Q4_1, 576, 1536, 1),
        (lwm_core::quant::QType::Q4_1, 1536, 576, 64),
        (lwm_core::quant::QType::Q4_1, 576, 1536, 64),
    ] {
        let t2 = quant_matmul_secs(
            dtype,
            lwm_core::quant::Kernel::Avx2,
            rows,
            cols,
            n,
            reps * 10,
        );
        let tv = quant_matmul_secs(
            dtype,
            lwm_core::quant::Kernel::Avx512Vnni,
            rows,
            cols,
            n,
            reps * 10,
        );
        println!(
            "| {dtype:?} {rows} × {cols}, {n} row(s) | {:.3} | {:.3} | {:.2}x |",
            t2 * 1e3,
            tv * 1e3,
            t2 / tv
        );
        vnni.push(serde_json::json!({"dtype": format!("{dtype:?}"), "rows": rows, "cols": cols, "n": n, "avx2_ms": t2 * 1e3, "vnni_ms": tv * 1e3}));
    }
    Ok(
        serde_json::json!({"quant_vnni_vs_avx2": vnni, "matvec": matvec, "fma_peak_gflops": peak, "fma_peak_avx2_gflops": each[0], "fma_peak_avx512_gflops": each[1], "fma_peak_1_thread_gflops": one, "attend_block_1_thread_gflops": primitive, "tiled_1_thread_gflops_by_isa": by_isa, "threads": threads, "attention": rows}),
    )
}
