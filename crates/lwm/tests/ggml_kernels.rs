//! Our quantized kernels against ggml's own: weight bytes quantized by ggml, ggml's
//! dequantization, the activation blocks its x86 build makes (`from_float` of the format's
//! `vec_dot_type`) and its `vec_dot` results, recorded from llama.cpp's libggml-cpu by
//! scripts/ggml_kernel_fixture.py on an AVX2 machine. Every product must give the same f32
//! bits, on the portable path and on each SIMD path this CPU has.

mod common;
use common::*;
use lwm::quant::q8::{self, BlockQ8K, BlockQ8_0, QK_K};
use lwm::quant::{matmul_with, Kernel, MatmulOptions, QMatrix, QType};
use std::sync::Arc;

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn fixture_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("ggml_kernels.json")).unwrap()).unwrap()
}

fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The bytes ggml's `block_q8_K` has for our block.
fn q8k_bytes(b: &BlockQ8K) -> Vec<u8> {
    let mut v = b.d.to_le_bytes().to_vec();
    v.extend(b.qs.iter().map(|&q| q as u8));
    for s in b.bsums {
        v.extend(s.to_le_bytes());
    }
    v
}

fn q8_0_bytes(b: &BlockQ8_0) -> Vec<u8> {
    let mut v = b.d_f16().to_bits().to_le_bytes().to_vec();
    v.extend(b.qs.iter().map(|&q| q as u8));
    v
}

/// The formats with our own kernels, as the fixture names them.
const NATIVE: [(&str, QType); 6] = [
    ("q4_0", QType::Q4_0),
    ("q5_0", QType::Q5_0),
    ("q8_0", QType::Q8_0),
    ("q4_k", QType::Q4K),
    ("q5_k", QType::Q5K),
    ("q6_k", QType::Q6K),
];

#[test]
fn activation_blocks_equal_ggml() {
    let fx = fixture_json();
    let cols = fx["cols"].as_u64().unwrap() as usize;
    let acts: Vec<Vec<f32>> = fx["acts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    for (a, x) in acts.iter().enumerate() {
        if cols.is_multiple_of(QK_K) {
            let mut k = vec![BlockQ8K::ZERO; cols / QK_K];
            q8::quantize_row_q8_k(x, &mut k);
            let got: Vec<u8> = k.iter().flat_map(q8k_bytes).collect();
            assert_eq!(
                got,
                unhex(fx["types"]["q4_k"]["acts_q"][a].as_str().unwrap()),
                "Q8_K row {a}"
            );
        }
        let mut z = vec![BlockQ8_0::ZERO; cols / 32];
        q8::quantize_row_q8_0(x, &mut z);
        let got: Vec<u8> = z.iter().flat_map(q8_0_bytes).collect();
        assert_eq!(
            got,
            unhex(fx["types"]["q8_0"]["acts_q"][a].as_str().unwrap()),
            "Q8_0 row {a}"
        );
    }
}

#[test]
fn dequantization_and_dot_products_equal_ggml() {
    let fx = fixture_json();
    let (rows, cols) = (
        fx["rows"].as_u64().unwrap() as usize,
        fx["cols"].as_u64().unwrap() as usize,
    );
    let acts: Vec<f32> = fx["acts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
        })
        .collect();
    let n = acts.len() / cols;
    let mut kernels = vec![Kernel::Scalar];
    if lwm::quant::has_avx2() {
        kernels.push(Kernel::Avx2);
    }
    if lwm::quant::has_avx512_vnni() {
        kernels.push(Kernel::Avx512Vnni);
    }
    for (name, dtype) in NATIVE {
        let t = &fx["types"][name];
        if t.is_null() {
            continue; // a shape this format cannot hold (K-quants: 256-column multiples)
        }
        let m = QMatrix::new(
            dtype,
            rows,
            cols,
            Arc::from(unhex(t["weights"].as_str().unwrap())),
        )
        .unwrap();
        for r in 0..rows {
            let mut out = vec![0.0f32; cols];
            m.dequantize_row(r, &mut out);
            let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, u32s(&t["dequant"][r]), "{name} dequantized row {r}");
        }
        for kernel in &kernels {
            for single_thread in [true, false] {
                let opts = MatmulOptions {
                    kernel: *kernel,
                    single_thread,
                };
                // One activation row (decode's mat-vec) and all of them (prefill's GEMM).
                for (first, count) in [(0, 1), (1, 1), (0, n)] {
                    let x = &acts[first * cols..(first + count) * cols];
                    let y = matmul_with(&m, x, count, &opts).unwrap();
                    for a in 0..count {
                        for r in 0..rows {
                            let want = t["dots"][r][first + a].as_u64().unwrap() as u32;
                            let got = y[a * rows + r];
                            assert_eq!(
                                got.to_bits(),
                                want,
                                "{name} {kernel:?} row {r} act {}: {got} vs ggml {}",
                                first + a,
                                f32::from_bits(want)
                            );
                        }
                    }
                }
            }
        }
    }
}
