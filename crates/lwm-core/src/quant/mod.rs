//! Quantized matrix products that reproduce llama.cpp's CPU results bit for bit.
//!
//! `matmul(w, x, n)` computes `y = x · Wᵀ` for a GGUF-quantized weight matrix `W` (Q4_1,
//! Q8_0, Q4_0, Q5_0 or Q5_K), quantizing each activation row the way llama.cpp's x86 builds
//! do (AVX2 and AVX-512 builds run the same code for these; `q8`: Q8_1 for Q4_1 weights,
//! Q8_0 for Q8_0, Q4_0 and Q5_0, Q8_K for Q5_K) and accumulating every dot product in the
//! same float order as that format's `ggml_vec_dot_*` (see `q4_1`, `q8_0`, `signed32`,
//! `q5_k`; `row_kernels` for the formats kept in GGUF's row-major layout). In ggml's mul_mat every output element is one such `vec_dot` over
//! the whole row, whatever the thread split, so the result depends on neither our thread
//! count nor how rows are grouped.
//!
//! Each kernel has a portable scalar version and an AVX2+FMA+F16C version chosen at run
//! time; where the CPU has AVX-512 VNNI (with VL, on 256-bit vectors), the interleaved Q4_1,
//! Q4_0 and Q5_0 kernels form their integer 4-sums with `vpdpbusd` and the K-quants (Q4_K,
//! Q5_K, Q6_K) their scaled sums with `vpdpwssd` (`row_kernels::simd`). Integer sums are
//! exact, so all give identical bits.
//!
//! `ggml_cpu` holds the other llama.cpp CPU numerics needed to match its greedy output
//! (RMSNorm, RoPE, SwiGLU, f16-KV flash attention); see there for which of them matter.

pub mod ggml_cpu;
pub mod half;
pub mod half_panels;
pub mod interleave;
pub mod k_tiles;
pub mod matmul;
pub mod q4_0;
pub mod q4_1;
pub mod q4_1_x8;
pub mod q4_k;
pub mod q5_0;
pub mod q5_k;
pub mod q6_k;
pub mod q8;
pub mod q8_0;
pub mod q8_0_x8;
pub mod row_kernels;
#[cfg(test)]
mod row_tests;
pub mod signed32;

pub use matmul::{
    kernel_cap, matmul, matmul_many, matmul_many_with, matmul_with, Kernel, MatmulOptions,
};

use anyhow::{bail, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use row_kernels::RowFormat;
use std::sync::Arc;

/// Weight block formats with a native kernel here (others fall back to candle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QType {
    Q4_1,
    Q8_0,
    /// K-quant, 4.5 bits a weight (most of a Q4_K_M file).
    Q4K,
    /// K-quant, 6.56 bits a weight (Q6_K files; the head and some layers of Q4_K_M).
    Q6K,
    /// K-quant, 5.5 bits a weight (most of a Q5_K_M file).
    Q5K,
    /// 4.5 bits a weight, no offset (`w = d·(q − 8)`).
    Q4_0,
    /// 5.5 bits a weight, no offset (`w = d·(q − 16)`).
    Q5_0,
}

impl QType {
    /// Bytes of one block.
    pub fn block_bytes(self) -> usize {
        match self {
            QType::Q4_1 => q4_1::BLOCK_BYTES,
            QType::Q8_0 => q8_0::BLOCK_BYTES,
            QType::Q4K => q4_k::BLOCK_BYTES,
            QType::Q6K => q6_k::BLOCK_BYTES,
            QType::Q5K => q5_k::BLOCK_BYTES,
            QType::Q4_0 => q4_0::BLOCK_BYTES,
            QType::Q5_0 => q5_0::BLOCK_BYTES,
        }
    }

    /// Weights in one block: 32, or 256 for the K-quants' super-blocks.
    pub fn block_elems(self) -> usize {
        match self {
            QType::Q4_1 | QType::Q8_0 | QType::Q4_0 | QType::Q5_0 => q8::QK,
            QType::Q4K | QType::Q5K | QType::Q6K => q8::QK_K,
        }
    }

    /// The native type for a GGUF type, if there is one.
    pub fn from_ggml(t: GgmlDType) -> Option<Self> {
        Some(match t {
            GgmlDType::Q4_1 => QType::Q4_1,
            GgmlDType::Q8_0 => QType::Q8_0,
            GgmlDType::Q4K => QType::Q4K,
            GgmlDType::Q6K => QType::Q6K,
            GgmlDType::Q5K => QType::Q5K,
            GgmlDType::Q4_0 => QType::Q4_0,
            GgmlDType::Q5_0 => QType::Q5_0,
            _ => return None,
        })
    }
}

/// How a matrix's blocks are ordered in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// GGUF's: row-major, each row `cols / 32` blocks.
    Rows,
    /// Q4_1 rows interleaved in groups of 8 (`q4_1_x8`), the decode layout; same bytes.
    Q4_1X8,
    /// Q8_0 rows interleaved in groups of 8 (`q8_0_x8`), the decode layout; same bytes.
    Q8_0X8,
}

impl Layout {
    /// The block type an interleaved layout holds (`None` for `Rows`).
    fn interleaved_type(self) -> Option<QType> {
        match self {
            Layout::Rows => None,
            Layout::Q4_1X8 => Some(QType::Q4_1),
            Layout::Q8_0X8 => Some(QType::Q8_0),
        }
    }
}

impl QType {
    /// A block's fields in bytes, in order: what `interleave` places side by side.
    pub fn block_fields(self) -> &'static [usize] {
        match self {
            QType::Q4_1 => &q4_1_x8::FIELDS,
            QType::Q8_0 => &q8_0_x8::FIELDS,
            // Not interleaved (`Layout::Rows` only).
            QType::Q4K | QType::Q5K | QType::Q6K | QType::Q4_0 | QType::Q5_0 => &[],
        }
    }
}

/// Quantized weight matrix `[rows = out, cols = in]`: GGUF's raw blocks, in `layout`
/// order (`new` picks the fastest layout the kernels have for the type and shape).
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub dtype: QType,
    pub rows: usize,
    pub cols: usize,
    pub layout: Layout,
    pub data: Arc<[u8]>,
}

impl QMatrix {
    /// From GGUF's row-major blocks; matrices whose row count is a multiple of 8 are
    /// interleaved (`Layout::Q4_1X8`, `Layout::Q8_0X8`), which makes decode's mat-vec
    /// cheaper (Q4_1 about twice).
    pub fn new(dtype: QType, rows: usize, cols: usize, data: Arc<[u8]>) -> Result<Self> {
        let layout = match dtype {
            _ if !rows.is_multiple_of(interleave::GROUP) => Layout::Rows,
            QType::Q4_1 => Layout::Q4_1X8,
            QType::Q8_0 => Layout::Q8_0X8,
            QType::Q4K | QType::Q5K | QType::Q6K | QType::Q4_0 | QType::Q5_0 => Layout::Rows,
        };
        Self::with_layout(dtype, rows, cols, data, layout)
    }

    /// From GGUF's row-major blocks, stored in `layout` (which must suit the type and shape).
    pub fn with_layout(
        dtype: QType,
        rows: usize,
        cols: usize,
        data: Arc<[u8]>,
        layout: Layout,
    ) -> Result<Self> {
        let qk = dtype.block_elems();
        if !cols.is_multiple_of(qk) {
            bail!("quantized {dtype:?} matrix: {cols} columns is not a multiple of {qk}");
        }
        let want = rows * (cols / qk) * dtype.block_bytes();
        if data.len() != want {
            bail!(
                "quantized {dtype:?} matrix [{rows}, {cols}] needs {want} bytes, got {}",
                data.len()
            );
        }
        let data = match layout.interleaved_type() {
            None => data,
            Some(wants) => {
                if dtype != wants || !rows.is_multiple_of(interleave::GROUP) {
                    bail!(
                        "the interleaved {wants:?} layout needs {wants:?} rows in multiples of {}, got {dtype:?} with {rows} rows",
                        interleave::GROUP
                    );
                }
                let (nb, fields) = (cols / q8::QK, dtype.block_fields());
                let mut data = data;
                // A freshly loaded matrix is ours alone: shuffle it where it lies (the
                // 30 MB output head would otherwise exist twice while loading).
                match Arc::get_mut(&mut data) {
                    Some(bytes) => {
                        interleave::interleave_in_place(bytes, rows, nb, fields);
                        data
                    }
                    None => Arc::from(interleave::interleave(&data, rows, nb, fields)),
                }
            }
        };
        Ok(Self {
            dtype,
            rows,
            cols,
            layout,
            data,
        })
    }

    /// Rows a parallel chunk must be a multiple of (one interleaved group).
    pub fn row_align(&self) -> usize {
        match self.layout {
            Layout::Rows => 1,
            Layout::Q4_1X8 | Layout::Q8_0X8 => interleave::GROUP,
        }
    }

    /// `Some` for Q4_1 / Q8_0 2-D tensors (copying their blocks), `None` for other types.
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let Some(dtype) = QType::from_ggml(q.dtype()) else {
            return Ok(None);
        };
        let dims = q.shape().dims();
        if dims.len() != 2 {
            return Ok(None);
        }
        let data = q.data()?;
        Ok(Some(Self::new(
            dtype,
            dims[0],
            dims[1],
            Arc::from(&data[..]),
        )?))
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.dtype.block_elems() * self.dtype.block_bytes()
    }

    /// Blocks in one row.
    pub fn row_blocks(&self) -> usize {
        self.cols / self.dtype.block_elems()
    }

    /// Row `r` dequantized to f32.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        let gathered;
        let row = match self.layout {
            Layout::Rows => &self.data[r * rb..(r + 1) * rb],
            Layout::Q4_1X8 | Layout::Q8_0X8 => {
                let mut g = vec![0u8; rb];
                let (nb, fields) = (self.cols / q8::QK, self.dtype.block_fields());
                interleave::gather_row(&self.data, nb, r, fields, &mut g);
                gathered = g;
                &gathered[..]
            }
        };
        match self.dtype {
            QType::Q4_1 => q4_1::dequantize_row(row, out),
            QType::Q8_0 => q8_0::dequantize_row(row, out),
            QType::Q4K => <q4_k::Q4K as row_kernels::RowFormat>::dequantize_row(row, out),
            QType::Q6K => <q6_k::Q6K as row_kernels::RowFormat>::dequantize_row(row, out),
            QType::Q5K => <q5_k::Q5K as RowFormat>::dequantize_row(row, out),
            QType::Q4_0 => <q4_0::Q4_0 as RowFormat>::dequantize_row(row, out),
            QType::Q5_0 => <q5_0::Q5_0 as RowFormat>::dequantize_row(row, out),
        }
    }
}

/// AVX2 + FMA + F16C present (checked once).
#[inline]
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX-512F on top of AVX2 + FMA + F16C (checked once).
#[inline]
pub fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| has_avx2() && is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX-512 VNNI (with VL, on 256-bit vectors) on top of AVX2 (checked once): `vpdpbusd`
/// forms the 4-element u8×i8 sums in one instruction, the same integers as AVX2's
/// `maddubs` + `madd` pair (no i16 saturation is possible with these block formats), so
/// the kernels that use it give identical bits.
#[inline]
pub fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            has_avx2()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX-512 BF16 on top of AVX-512F (checked once): `vdpbf16ps` multiplies 32 bf16 pairs
/// and adds them into 16 f32 lanes, two per lane, odd element first, each add rounded
/// (products of two bf16 are exact in f32), subnormal inputs and results flushed to zero.
#[inline]
pub fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| has_avx512f() && is_x86_feature_detected!("avx512bf16"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// IEEE half bits -> f32 (exact).
#[inline]
pub(crate) fn f16_bits_to_f32(b: u16) -> f32 {
    ::half::f16::from_bits(b).to_f32()
}

/// ggml's `hsum_float_8`: ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)).
#[inline]
pub(crate) fn hsum8(a: &[f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}
