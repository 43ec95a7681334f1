//! The llama.cpp-exact quantized kernels (`lwm::quant`): activation quantization rules,
//! accuracy against an f64 reference, scalar == AVX2 bit for bit, thread-count
//! independence; plus two `#[ignore]` experiments: timings against candle's QMatMul, and
//! a llama.cpp-emulating forward pass checked against llama.cpp's greedy reference.

use half::f16;
use lwm::quant::q8::{self, BlockQ8_0, BlockQ8_1};
use lwm::quant::{matmul, matmul_many, matmul_with, Kernel, Layout, MatmulOptions, QMatrix, QType};
use std::sync::Arc;

// ---------------------------------------------------------------- helpers

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn byte(&mut self) -> u8 {
        (self.next() >> 32) as u8
    }
}

fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    (0..n).map(|_| r.f() * scale).collect()
}

/// Random raw weight blocks of `dtype` (random scales/mins, random quants).
fn rand_matrix(dtype: QType, rows: usize, cols: usize, seed: u64) -> QMatrix {
    let mut r = Rng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
    let nb = rows * cols / 32;
    let mut data = Vec::with_capacity(nb * dtype.block_bytes());
    for _ in 0..nb {
        match dtype {
            QType::Q4_1 => {
                let d = f16::from_f32(0.001 + 0.02 * (r.f() + 1.0));
                let m = f16::from_f32(-0.15 * (r.f() + 1.0));
                data.extend_from_slice(&d.to_bits().to_le_bytes());
                data.extend_from_slice(&m.to_bits().to_le_bytes());
                for _ in 0..16 {
                    data.push(r.byte());
                }
            }
            QType::Q8_0 => {
                let d = f16::from_f32(0.0005 + 0.002 * (r.f() + 1.0));
                data.extend_from_slice(&d.to_bits().to_le_bytes());
                for _ in 0..32 {
                    // [-127, 127] like ggml's quantizer produces
                    data.push(((r.byte() % 255) as i32 - 127) as i8 as u8);
                }
            }
            // The row formats' own tests (lwm-core quant::row_tests, ggml_kernels.rs) cover them.
            QType::Q4K | QType::Q5K | QType::Q6K | QType::Q4_0 | QType::Q5_0 => {
                unreachable!("rand_matrix makes Q4_1 and Q8_0 only")
            }
        }
    }
    QMatrix::new(dtype, rows, cols, Arc::from(data)).unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn q8_1(x: &[f32]) -> Vec<BlockQ8_1> {
    let mut o = vec![BlockQ8_1::ZERO; x.len() / 32];
    q8::quantize_row_q8_1(x, &mut o);
    o
}

fn q8_1_scalar(x: &[f32]) -> Vec<BlockQ8_1> {
    let mut o = vec![BlockQ8_1::ZERO; x.len() / 32];
    q8::quantize_row_q8_1_scalar(x, &mut o);
    o
}

// ---------------------------------------------------------------- activation quantization

#[test]
fn q8_1_block_with_ties_rounds_half_to_even() {
    // amax = 127 -> d = 1, id = 1: each value is rounded on its own, ties to even.
    let mut x = [0.0f32; 32];
    let vals = [
        127.0, 2.5, 3.5, -2.5, 0.5, -0.5, 1.5, -1.5, 126.5, -3.25, 7.75, 10.0,
    ];
    x[..vals.len()].copy_from_slice(&vals);
    let want: [i8; 12] = [127, 2, 4, -2, 0, 0, 2, -2, 126, -3, 8, 10];
    for b in [&q8_1(&x)[0], &q8_1_scalar(&x)[0]] {
        assert_eq!(
            &b.qs[..12],
            &want,
            "round half to even (candle would round 2.5 -> 3)"
        );
        assert!(b.qs[12..].iter().all(|&q| q == 0));
        assert_eq!(b.d_f16(), f16::from_f32(1.0));
        let sum: i32 = want.iter().map(|&q| q as i32).sum();
        assert_eq!(b.s, sum as f32); // 1·Σq, exact in f16
        assert_eq!(b.s_f16(), f16::from_f32(sum as f32));
    }
}

#[test]
fn q8_1_scale_and_sum_follow_llama_cpp() {
    // amax = 1: d = 1/127 (f32), id = 127; 0.5·127 = 63.5 is a tie -> 64.
    let mut x = [0.0f32; 32];
    let vals = [1.0f32, 0.5, -0.25, 0.1, -1.0, 0.3];
    x[..vals.len()].copy_from_slice(&vals);
    let b = q8_1(&x)[0];
    let id = 127.0f32;
    let want: Vec<i8> = vals
        .iter()
        .map(|v| (v * id).round_ties_even() as i8)
        .collect();
    assert_eq!(&b.qs[..6], &want[..]);
    assert_eq!(&b.qs[..6], &[127, 64, -32, 13, -127, 38]);
    let d = 1.0f32 / 127.0;
    assert_eq!(b.d.to_bits(), f16::from_f32(d).to_f32().to_bits());
    // s = fp16(d_f32 · Σq), formed from the f32 d (candle uses fp16(d)·fp16(Σq) in f16).
    let sum: i32 = want.iter().map(|&q| q as i32).sum();
    assert_eq!(
        b.s.to_bits(),
        f16::from_f32(d * sum as f32).to_f32().to_bits()
    );
    assert_eq!(b, q8_1_scalar(&x)[0]);
}

#[test]
fn all_zero_block_quantizes_to_zero() {
    let x = [0.0f32; 64];
    for b in q8_1(&x).iter().chain(q8_1_scalar(&x).iter()) {
        assert_eq!(*b, BlockQ8_1::ZERO);
    }
    let mut o = [BlockQ8_0::ZERO; 2];
    q8::quantize_row_q8_0(&x, &mut o);
    assert_eq!(o, [BlockQ8_0::ZERO; 2]);
    // A zero block next to a non-zero one keeps its own zero scale.
    let mut y = [0.0f32; 64];
    y[40] = -3.0;
    let b = q8_1(&y);
    assert_eq!(b[0], BlockQ8_1::ZERO);
    assert_eq!(b[1].qs[8], -127);
}

#[test]
fn q8_0_matches_q8_1_quants_and_scale() {
    let x = rand_vec(32 * 9, 5, 3.0);
    let a = q8_1(&x);
    let mut b = vec![BlockQ8_0::ZERO; 9];
    q8::quantize_row_q8_0(&x, &mut b);
    let mut c = vec![BlockQ8_0::ZERO; 9];
    q8::quantize_row_q8_0_scalar(&x, &mut c);
    assert_eq!(b, c);
    for (p, q) in a.iter().zip(&b) {
        assert_eq!(p.qs, q.qs);
        assert_eq!(p.d, q.d);
    }
}

#[test]
fn quantization_scalar_equals_avx2_on_random_rows() {
    for seed in 0..50 {
        let scale = [1e-3f32, 0.3, 7.0, 1e4][seed as usize % 4];
        let mut x = rand_vec(32 * 24, seed, scale);
        // exact ties and zeros sprinkled in
        x[3] = 0.0;
        x[40] = x[41] * 0.5;
        assert_eq!(q8_1(&x), q8_1_scalar(&x), "seed {seed}");
    }
}

// ---------------------------------------------------------------- matmul

/// f64 reference `x · Wᵀ` over the dequantized weights, and a bound on the activation
/// quantization error (Σ|w|·d_block/2 plus slack for the f16 scales and f32 sums).
fn reference(w: &QMatrix, x: &[f32], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut wrow = vec![0.0f32; w.cols];
    let mut out = vec![0.0f64; n * w.rows];
    let mut bound = vec![0.0f64; n * w.rows];
    for r in 0..w.rows {
        w.dequantize_row(r, &mut wrow);
        for a in 0..n {
            let xa = &x[a * w.cols..(a + 1) * w.cols];
            let (mut s, mut e, mut mag) = (0.0f64, 0.0f64, 0.0f64);
            for (wb, xb) in wrow.chunks(32).zip(xa.chunks(32)) {
                let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
                for (wv, xv) in wb.iter().zip(xb) {
                    s += *wv as f64 * *xv as f64;
                    e += (*wv as f64).abs() * amax / 127.0 * 0.5;
                    mag += (*wv as f64 * *xv as f64).abs();
                }
            }
            out[a * w.rows + r] = s;
            bound[a * w.rows + r] = e * 1.01 + mag * 2e-3 + 1e-5;
        }
    }
    (out, bound)
}

/// The fused product (Q, K, V sharing one quantized activation and one parallel region)
/// gives each matrix the same bits as its own `matmul`, and the f64 reference's values;
/// matrices of different widths are refused.
#[test]
fn fused_matmul_equals_separate_products() {
    for (dtype, n) in [(QType::Q4_1, 1), (QType::Q4_1, 7), (QType::Q8_0, 3)] {
        let ws: Vec<QMatrix> = [(576, 1), (192, 2), (200, 3)]
            .iter()
            .map(|&(rows, seed)| rand_matrix(dtype, rows, 576, seed))
            .collect();
        let x = rand_vec(n * 576, 9, 2.0);
        let refs: Vec<&QMatrix> = ws.iter().collect();
        let fused = matmul_many(&refs, &x, n).unwrap();
        for (w, y) in ws.iter().zip(&fused) {
            let alone = matmul(w, &x, n).unwrap();
            assert_eq!(y, &alone, "{dtype:?} n={n} rows={}", w.rows);
            let (r, bound) = reference(w, &x, n);
            for i in 0..y.len() {
                assert!((y[i] as f64 - r[i]).abs() <= bound[i]);
            }
        }
    }
    let narrow = rand_matrix(QType::Q4_1, 8, 64, 4);
    let wide = rand_matrix(QType::Q4_1, 8, 96, 5);
    assert!(matmul_many(&[&narrow, &wide], &[0.0; 64], 1).is_err());
}

#[test]
fn matmul_matches_f64_reference_within_quantization_error() {
    for (dtype, rows, cols, n) in [
        (QType::Q4_1, 37, 96, 1),
        (QType::Q4_1, 20, 576, 5),
        (QType::Q8_0, 41, 128, 1),
        (QType::Q8_0, 16, 576, 6),
    ] {
        let w = rand_matrix(dtype, rows, cols, rows as u64);
        let x = rand_vec(n * cols, cols as u64, 2.0);
        let y = matmul(&w, &x, n).unwrap();
        let (r, bound) = reference(&w, &x, n);
        for i in 0..y.len() {
            assert!(
                (y[i] as f64 - r[i]).abs() <= bound[i],
                "{dtype:?} [{rows}x{cols}] n={n} elem {i}: {} vs {} (bound {})",
                y[i],
                r[i],
                bound[i]
            );
        }
    }
}

#[test]
fn q4_1_dot_follows_the_documented_order() {
    // Restate the order for one row independently of the kernels: per-lane FMAs, ggml's
    // horizontal sum, then + summs (m·s is exact in f32: both are f16 values).
    let w = rand_matrix(QType::Q4_1, 1, 32 * 7, 77);
    let x = rand_vec(32 * 7, 78, 1.5);
    let y = q8_1_scalar(&x);
    let mut acc = [0.0f32; 8];
    let mut summs = 0.0f32;
    for (b, yb) in w.data.chunks(20).zip(&y) {
        let d = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
        let m = f16::from_bits(u16::from_le_bytes([b[2], b[3]])).to_f32();
        summs += m * yb.s;
        let q: Vec<i32> = (0..32)
            .map(|e| {
                if e < 16 {
                    (b[4 + e] & 15) as i32
                } else {
                    (b[4 + e - 16] >> 4) as i32
                }
            })
            .collect();
        for (l, a) in acc.iter_mut().enumerate() {
            let isum: i32 = (4 * l..4 * l + 4).map(|e| q[e] * yb.qs[e] as i32).sum();
            *a = (d * yb.d).mul_add(isum as f32, *a);
        }
    }
    let want =
        ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])) + summs;
    for kernel in [Kernel::Scalar, Kernel::Auto] {
        let got = matmul_with(
            &w,
            &x,
            1,
            &MatmulOptions {
                kernel,
                ..Default::default()
            },
        )
        .unwrap()[0];
        assert_eq!(got.to_bits(), want.to_bits(), "{kernel:?}");
    }
}

/// Scalar, AVX2 and (where the CPU has it) AVX-512 VNNI kernels give the same bits.
#[test]
fn scalar_and_avx2_kernels_agree_bit_for_bit() {
    if !lwm::quant::has_avx2() {
        eprintln!("note: no AVX2/FMA/F16C on this CPU; only the scalar kernels exist here");
        return;
    }
    let mut seed = 1;
    for dtype in [QType::Q4_1, QType::Q8_0] {
        for (rows, cols) in [(1, 32), (7, 64), (33, 576), (130, 96), (64, 1536)] {
            for n in [1, 2, 3, 4, 5, 8, 13] {
                seed += 1;
                let w = rand_matrix(dtype, rows, cols, seed);
                let x = rand_vec(
                    n * cols,
                    seed + 1000,
                    [0.01f32, 1.0, 40.0][seed as usize % 3],
                );
                let opts = |kernel| MatmulOptions {
                    kernel,
                    single_thread: false,
                };
                let s = matmul_with(&w, &x, n, &opts(Kernel::Scalar)).unwrap();
                let v = matmul_with(&w, &x, n, &opts(Kernel::Avx2)).unwrap();
                assert_eq!(bits(&s), bits(&v), "{dtype:?} [{rows}x{cols}] n={n}");
                if lwm::quant::has_avx512_vnni() {
                    let vnni = matmul_with(&w, &x, n, &opts(Kernel::Avx512Vnni)).unwrap();
                    assert_eq!(
                        bits(&s),
                        bits(&vnni),
                        "VNNI {dtype:?} [{rows}x{cols}] n={n}"
                    );
                }
            }
        }
    }
}

/// Decode's interleaved layouts (8 rows per group, `Layout::Q4_1X8` and `Layout::Q8_0X8`)
/// hold the same blocks and give the row layout's results bit for bit, for mat-vec and
/// batches, scalar and AVX2, whole matrices and the fused product; they dequantize rows
/// identically.
#[test]
fn interleaved_layouts_equal_the_row_layout_bit_for_bit() {
    let mut seed = 500;
    for (dtype, layout) in [(QType::Q4_1, Layout::Q4_1X8), (QType::Q8_0, Layout::Q8_0X8)] {
        for (rows, cols) in [(8, 32), (64, 576), (576, 1536), (1000, 96)] {
            let plain = rand_matrix(dtype, rows, cols, seed);
            assert_eq!(plain.layout, layout, "new() interleaves rows % 8 == 0");
            let rows_layout = QMatrix::with_layout(
                dtype,
                rows,
                cols,
                {
                    // Re-create the GGUF bytes from the interleaved matrix.
                    let mut raw = vec![0u8; plain.data.len()];
                    let (nb, rb) = (cols / 32, plain.row_bytes());
                    for r in 0..rows {
                        let out = &mut raw[r * rb..(r + 1) * rb];
                        lwm::quant::interleave::gather_row(
                            &plain.data,
                            nb,
                            r,
                            dtype.block_fields(),
                            out,
                        );
                    }
                    Arc::from(raw)
                },
                Layout::Rows,
            )
            .unwrap();
            let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
            for r in [0, rows / 2, rows - 1] {
                plain.dequantize_row(r, &mut a);
                rows_layout.dequantize_row(r, &mut b);
                assert_eq!(bits(&a), bits(&b), "{dtype:?} row {r}");
            }
            for n in [1, 2, 3, 4, 5, 9, 14] {
                seed += 1;
                let x = rand_vec(n * cols, seed, [0.02f32, 1.0, 30.0][seed as usize % 3]);
                let mut kernels = vec![Kernel::Scalar, Kernel::Auto];
                if lwm::quant::has_avx2() {
                    kernels.push(Kernel::Avx2);
                }
                if lwm::quant::has_avx512_vnni() {
                    kernels.push(Kernel::Avx512Vnni);
                }
                for &kernel in &kernels {
                    for single_thread in [true, false] {
                        let opts = MatmulOptions {
                            kernel,
                            single_thread,
                        };
                        let want = matmul_with(&rows_layout, &x, n, &opts).unwrap();
                        let got = matmul_with(&plain, &x, n, &opts).unwrap();
                        assert_eq!(
                            bits(&got),
                            bits(&want),
                            "{dtype:?} [{rows}x{cols}] n={n} {kernel:?} single_thread={single_thread}"
                        );
                    }
                }
            }
        }
    }
    for (dtype, rows, bytes, layout, why) in [
        (
            QType::Q4_1,
            12,
            240,
            Layout::Q4_1X8,
            "12 rows are not whole groups of 8",
        ),
        (
            QType::Q8_0,
            12,
            408,
            Layout::Q8_0X8,
            "12 rows are not whole groups of 8",
        ),
        (
            QType::Q8_0,
            8,
            272,
            Layout::Q4_1X8,
            "Q8_0 blocks in the Q4_1 layout",
        ),
        (
            QType::Q4_1,
            8,
            160,
            Layout::Q8_0X8,
            "Q4_1 blocks in the Q8_0 layout",
        ),
    ] {
        let got = QMatrix::with_layout(dtype, rows, 32, Arc::from(vec![0u8; bytes]), layout);
        assert!(got.is_err(), "{why}");
    }
}

#[test]
fn result_does_not_depend_on_thread_count() {
    let w = rand_matrix(QType::Q4_1, 1000, 576, 9);
    let h = rand_matrix(QType::Q8_0, 999, 576, 10);
    for n in [1, 7] {
        let x = rand_vec(n * 576, 11, 1.0);
        let run = |t: usize, m: &QMatrix| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap();
            pool.install(|| matmul(m, &x, n).unwrap())
        };
        for m in [&w, &h] {
            let one = run(1, m);
            let single = matmul_with(
                m,
                &x,
                n,
                &MatmulOptions {
                    single_thread: true,
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(bits(&one), bits(&single));
            for t in [2, 3, 8] {
                assert_eq!(bits(&one), bits(&run(t, m)), "{t} threads, n={n}");
            }
        }
    }
}

#[test]
fn rows_of_a_batch_equal_single_row_products() {
    // Grouping activation rows (n > 1) must not change any element.
    let w = rand_matrix(QType::Q4_1, 50, 192, 21);
    let n = 9;
    let x = rand_vec(n * 192, 22, 1.0);
    let y = matmul(&w, &x, n).unwrap();
    for a in 0..n {
        let ya = matmul(&w, &x[a * 192..(a + 1) * 192], 1).unwrap();
        assert_eq!(bits(&y[a * 50..(a + 1) * 50]), bits(&ya), "row {a}");
    }
}

#[test]
fn shape_errors_are_reported() {
    let w = rand_matrix(QType::Q8_0, 4, 64, 1);
    assert!(matmul(&w, &[0.0; 63], 1).is_err());
    assert!(QMatrix::new(QType::Q4_1, 2, 48, Arc::from(vec![0u8; 60])).is_err());
    assert!(QMatrix::new(QType::Q4_1, 2, 64, Arc::from(vec![0u8; 79])).is_err());
}

#[test]
fn from_qtensor_takes_native_types_only() {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let t = Tensor::from_vec(rand_vec(8 * 64, 3, 1.0), (8, 64), &Device::Cpu).unwrap();
    for (dt, want) in [
        (GgmlDType::Q4_1, Some(QType::Q4_1)),
        (GgmlDType::Q8_0, Some(QType::Q8_0)),
        (GgmlDType::Q4_0, Some(QType::Q4_0)),
        (GgmlDType::Q5_0, Some(QType::Q5_0)),
        (GgmlDType::Q5_1, None),
    ] {
        let q = QTensor::quantize(&t, dt).unwrap();
        let m = QMatrix::from_qtensor(&q).unwrap();
        assert_eq!(m.as_ref().map(|m| m.dtype), want);
        if let Some(m) = m {
            assert_eq!((m.rows, m.cols), (8, 64));
            // dequantization agrees with candle's
            let dq = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let mut row = vec![0.0f32; 64];
            for (r, want_row) in dq.iter().enumerate() {
                m.dequantize_row(r, &mut row);
                for (a, b) in row.iter().zip(want_row) {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                        "{dt:?} row {r}: {a} vs {b}"
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------- other llama.cpp numerics

#[test]
fn v_expf_is_a_close_exp() {
    use lwm::quant::ggml_cpu::{v_expf, v_silu, Isa};
    for isa in [Isa::Avx2, Isa::Avx512] {
        assert_eq!(v_expf(0.0, isa), 1.0);
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = v_expf(x, isa) as f64;
            assert!(
                ((got - want) / want).abs() < 3e-7,
                "{isa:?} v_expf({x}) = {got}, exp = {want}"
            );
            x += 0.0137;
        }
        assert!((v_silu(2.0, isa) - 2.0 / (1.0 + (-2.0f32).exp())).abs() < 1e-6);
    }
    assert_eq!(v_expf(100.0, Isa::Avx2), f32::INFINITY);
    assert_eq!(v_expf(-200.0, Isa::Avx2), 0.0);
}

#[test]
fn dot_f16_is_close_to_f64() {
    use lwm::quant::ggml_cpu::{dot_f16, round_to_f16, Isa};
    for n in [64, 96, 70, 128] {
        let mut a = rand_vec(n, 1, 2.0);
        let mut b = rand_vec(n, 2, 2.0);
        round_to_f16(&mut a);
        round_to_f16(&mut b);
        let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        for isa in [Isa::Avx2, Isa::Avx512] {
            assert!((dot_f16(&a, &b, isa) as f64 - want).abs() < 1e-4);
        }
    }
}

#[test]
fn round_to_f16_is_round_to_nearest_even() {
    use lwm::quant::ggml_cpu::round_to_f16;
    // 1 + 2^-11 is halfway between 1 and the next f16 (1 + 2^-10): ties to even -> 1
    let mut x = vec![
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        65520.0,
        -0.0,
        1e-8,
        0.1,
        -3.3,
        7.0,
        1.5,
    ];
    let want: Vec<f32> = x.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
    round_to_f16(&mut x);
    assert_eq!(bits(&x), bits(&want));
    assert_eq!(x[0], 1.0);
    assert_eq!(x[1], 1.0 + 4.0 * 2f32.powi(-11));
    assert_eq!(x[2], f32::INFINITY);
}

fn attention_case(n: usize) -> (Vec<f32>, Vec<Vec<f32>>, Vec<Vec<f32>>) {
    use lwm::quant::ggml_cpu::round_to_f16;
    let (heads, kv_heads, d) = (4, 2, 64);
    let q = rand_vec(n * heads * d, 1, 1.0);
    let mut kb: Vec<Vec<f32>> = (0..kv_heads)
        .map(|h| rand_vec(n * d, 20 + h as u64, 1.0))
        .collect();
    let mut vb: Vec<Vec<f32>> = (0..kv_heads)
        .map(|h| rand_vec(n * d, 30 + h as u64, 1.0))
        .collect();
    for b in kb.iter_mut().chain(vb.iter_mut()) {
        round_to_f16(b);
    }
    (q, kb, vb)
}

#[test]
fn flash_attn_ext_f16_is_close_to_plain_softmax_attention() {
    use lwm::attention::reference_attention;
    use lwm::kv::KvView;
    use lwm::quant::ggml_cpu::{flash_attn_ext_f16, FaOptions};
    let (heads, d, n) = (4, 64, 11);
    let (q, kb, vb) = attention_case(n);
    let kv = KvView {
        k: kb.iter().map(|x| &x[..]).collect(),
        v: vb.iter().map(|x| &x[..]).collect(),
        len: n,
    };
    let out = flash_attn_ext_f16(&q, n, 0, heads, d, &kv, 0.125, &FaOptions::default());
    // decode of the last row alone agrees exactly with its prefill row
    let last = flash_attn_ext_f16(
        &q[(n - 1) * heads * d..],
        1,
        n - 1,
        heads,
        d,
        &kv,
        0.125,
        &FaOptions::default(),
    );
    assert_eq!(bits(&last), bits(&out[(n - 1) * heads * d..]));
    for h in 0..heads {
        let qh: Vec<f32> = (0..n)
            .flat_map(|i| q[i * heads * d + h * d..][..d].to_vec())
            .collect();
        let r = reference_attention(&qh, &kb[h / 2], &vb[h / 2], d, 0, true, None);
        for i in 0..n {
            for t in 0..d {
                let (got, want) = (out[i * heads * d + h * d + t], r[i * d + t]);
                assert!(
                    (got - want).abs() < 5e-3,
                    "row {i} head {h} dim {t}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn flash_attn_simd_equals_scalar_emulation() {
    // Reimplements ggml's one-chunk loop with the scalar `dot_f16` and checks the library
    // (AVX2 intrinsics on this CPU) bit for bit, for both lane groupings.
    use lwm::kv::KvView;
    use lwm::quant::ggml_cpu::{dot_f16, flash_attn_ext_f16, round_f16, FaOptions, Isa};
    let (heads, d, n) = (4, 64, 23);
    let (q, kb, vb) = attention_case(n);
    let kv = KvView {
        k: kb.iter().map(|x| &x[..]).collect(),
        v: vb.iter().map(|x| &x[..]).collect(),
        len: n,
    };
    for isa in [Isa::Avx2, Isa::Avx512] {
        for s_fma in [true, false] {
            let opts = FaOptions {
                isa,
                s_fma,
                ..FaOptions::default()
            };
            let got = flash_attn_ext_f16(&q, n, 0, heads, d, &kv, 0.125, &opts);
            for i in 0..n {
                for h in 0..heads {
                    let q16: Vec<f32> = q[i * heads * d + h * d..][..d]
                        .iter()
                        .map(|&x| round_f16(x))
                        .collect();
                    let (k, v) = (&kb[h / 2], &vb[h / 2]);
                    let (mut m, mut s_sum) = (f32::NEG_INFINITY, 0.0f32);
                    let mut acc = vec![0.0f32; d];
                    for j in 0..=i {
                        let s = dot_f16(&k[j * d..(j + 1) * d], &q16, isa) * 0.125;
                        let (ms, vs);
                        if s > m {
                            ms = (m - s).exp();
                            m = s;
                            vs = 1.0;
                            acc.iter_mut().for_each(|a| *a = round_f16(*a * ms));
                        } else {
                            ms = 1.0;
                            vs = (s - m).exp();
                        }
                        for t in 0..d {
                            acc[t] = round_f16(v[j * d + t].mul_add(vs, acc[t]));
                        }
                        s_sum = if s_fma {
                            s_sum.mul_add(ms, vs)
                        } else {
                            s_sum * ms + vs
                        };
                    }
                    let inv = 1.0 / s_sum;
                    let want: Vec<f32> = acc.iter().map(|a| a * inv).collect();
                    assert_eq!(
                        bits(&got[i * heads * d + h * d..][..d]),
                        bits(&want),
                        "{isa:?} row {i} head {h}"
                    );
                }
            }
        }
    }
}

// ---------------------------------------------------------------- timings (ignored)

/// Median microseconds of each closure, run round-robin (so a change in machine load hits
/// all of them alike).
fn medians_us(fs: &mut [&mut dyn FnMut()], reps: usize) -> Vec<f64> {
    for f in fs.iter_mut() {
        f();
    }
    let mut t = vec![Vec::with_capacity(reps); fs.len()];
    for _ in 0..reps {
        for (k, f) in fs.iter_mut().enumerate() {
            let s = std::time::Instant::now();
            f();
            t[k].push(s.elapsed().as_secs_f64() * 1e6);
        }
    }
    t.iter_mut()
        .map(|v| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[reps / 2]
        })
        .collect()
}

/// `cargo test --release -p lwm --test quant_kernels -- --ignored --nocapture timings`
#[test]
#[ignore]
fn timings_vs_candle_qmatmul() {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};
    use std::hint::black_box;
    eprintln!(
        "rayon threads: {}, AVX2: {}",
        rayon::current_num_threads(),
        lwm::quant::has_avx2()
    );
    for (dt, rows, cols) in [
        (GgmlDType::Q4_1, 576, 1536),
        (GgmlDType::Q4_1, 1536, 576),
        (GgmlDType::Q8_0, 49152, 576),
    ] {
        let wt =
            Tensor::from_vec(rand_vec(rows * cols, 7, 0.1), (rows, cols), &Device::Cpu).unwrap();
        let q = Arc::new(QTensor::quantize(&wt, dt).unwrap());
        let ours = QMatrix::from_qtensor(&q).unwrap().unwrap();
        let cq = QMatMul::from_arc(q.clone()).unwrap();
        let dense = q.dequantize(&Device::Cpu).unwrap();
        for n in [1usize, 64] {
            let x = rand_vec(n * cols, 8, 1.0);
            let xt = Tensor::from_slice(&x, (n, cols), &Device::Cpu).unwrap();
            let reps = if rows * n > 100_000 { 21 } else { 301 };
            let scalar = MatmulOptions {
                kernel: Kernel::Scalar,
                ..Default::default()
            };
            let t = medians_us(
                &mut [
                    &mut || drop(black_box(matmul(&ours, &x, n).unwrap())),
                    &mut || {
                        let y = cq.forward(&xt).unwrap();
                        drop(black_box(
                            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        ))
                    },
                    // model.rs today for n >= 32: dequantize, then an f32 GEMM
                    &mut || {
                        let w = q.dequantize(&Device::Cpu).unwrap();
                        let y = xt.matmul(&w.t().unwrap()).unwrap();
                        drop(black_box(
                            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        ))
                    },
                    &mut || {
                        let y = xt.matmul(&dense.t().unwrap()).unwrap();
                        drop(black_box(
                            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                        ))
                    },
                    &mut || drop(black_box(matmul_with(&ours, &x, n, &scalar).unwrap())),
                ],
                reps,
            );
            let a = matmul(&ours, &x, n).unwrap();
            let b = cq
                .forward(&xt)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let diff = a
                .iter()
                .zip(&b)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0f32, f32::max);
            eprintln!(
                "{dt:?} W[{rows}x{cols}] n={n:2}: ours {:8.1} us | candle QMatMul {:8.1} us | dequant+f32 GEMM {:8.1} us | pre-dequantized f32 GEMM {:8.1} us | ours scalar {:8.1} us | max|ours-candle| {diff:.1e}",
                t[0], t[1], t[2], t[3], t[4]
            );
        }
    }
}
