//! The K-quants' prefill GEMM (Q4_K, Q5_K, Q6_K × Q8_K activations, 8 or more activation
//! rows) in integer tiles: llama.cpp's "tiled" mul_mat arithmetic (ggml-cpu/tiled, its
//! AVX-512 VNNI build), which its CPU backend takes for these formats from 8 rows on.
//!
//! A weight super-block is unpacked once per tile into its 256 unsigned codes `q` (one byte
//! each, k order), its sub-block scales `sc_s` (and mins `m_s`) as i32 and `d`, `dmin` as
//! f32; the activations are repacked once per product so that 4 consecutive codes of 16
//! activation rows are one 64-byte vector. Then every product is a `vpdpbusd` of 4 weight
//! codes (broadcast) against those 16 rows, and the format is only in the per-block
//! epilogue. For weight row r, activation row a and super-block b, with `y` the Q8_K codes,
//! `bsum_s` their sum over sub-block s and `yd` their scale:
//!
//! ```text
//!   s1 = Σ_s sc_s · (Σ_{k∈s} q_k·y_k − BIAS·bsum_s)      exact i32 (BIAS = 32 for Q6_K)
//!   s2 = Σ_s m_s · bsum_s                                 exact i32 (Q4_K, Q5_K)
//!   v  = f32(s1) · d
//!   v  = fma(−dmin, f32(s2), v)                           (Q4_K, Q5_K)
//!   out[r][a] = out[r][a] + v · yd                        (product rounded, then the sum;
//!                                                           blocks in order from out = 0)
//! ```
//!
//! The integers are exact in any order, so the AVX-512 VNNI, AVX2 (`maddubs` + `madd`,
//! which cannot saturate with codes below 64) and portable kernels give the same bits, and
//! those of ggml's AVX-512 VNNI build. (Its AVX2 build fuses the last product and sum;
//! `vec_dot`, used below 8 rows and by `row_kernels`, sums per lane in another order.)

use super::matmul::Isa;
use super::q8::{BlockQ8K, QK_K};
use super::row_kernels::RowFormat;
use std::cell::RefCell;

/// A K-quant super-block format, as the tiles need it.
pub trait SuperBlock: RowFormat<Act = BlockQ8K> {
    /// Codes per sub-block scale: 32 (Q4_K, Q5_K) or 16 (Q6_K).
    const SUB: usize;
    /// Whether weights carry a sub-block min (`w = d·sc·q − dmin·m`).
    const HAS_MIN: bool;
    /// The code offset: `w = d·sc·(q − BIAS)` (32 for Q6_K's 6-bit codes).
    const BIAS: i32;

    /// One super-block: its 256 codes in k order, `256 / SUB` scales, 8 mins (when
    /// `HAS_MIN`); returns `(d, dmin)` as f32.
    fn unpack(b: &[u8], codes: &mut [u8], scales: &mut [i32], mins: &mut [i32]) -> (f32, f32);
}

/// Activation rows in one tile (one 512-bit vector of i32 lanes).
const COLS: usize = 16;
/// Weight rows per register tile.
const ROWS: usize = 8;
/// Weight rows unpacked together: their codes stay in L1 while each activation tile
/// passes.
const ROW_BLOCK: usize = 128;
/// Activation rows accumulated at once (the f32 accumulator is ROW_BLOCK × this, in L2).
const COL_WINDOW: usize = 512;

/// Activations repacked for the tiles: for each 16-row column tile and super-block, the
/// codes as `[group of 4][row][4]` (4 KiB), the sums of each 16 codes as `[16][row]` i32
/// and the rows' scales. Rows past `n` are zero.
pub struct ActTiles {
    n: usize,
    nb: usize,
    codes: Vec<i8>,
    bsums: Vec<i32>,
    /// The sums of two neighbouring sub-blocks (of `sub` codes) as two i16 in one i32
    /// lane, `[pair][row]`: one `vpdpwssd` applies two sub-blocks' mins (or offsets).
    pairs: Vec<i32>,
    d: Vec<f32>,
}

/// Two i16 in one i32 lane, `lo` in the low half (`vpdpwssd`'s pair order).
fn i16_pair(lo: i32, hi: i32) -> i32 {
    (lo as i16 as u16 as u32 | ((hi as i16 as u16 as u32) << 16)) as i32
}

/// Sub-block pairs of a super-block.
const PAIRS: usize = 8;

impl ActTiles {
    /// Repacks `ys` (n rows of `nb` blocks each).
    /// `sub`: codes per sub-block of the weight format (`SuperBlock::SUB`).
    pub fn new(ys: &[&[BlockQ8K]], nb: usize, sub: usize) -> Self {
        let n = ys.len();
        let tiles = n.div_ceil(COLS) * nb;
        let mut t = Self {
            n,
            nb,
            codes: vec![0; tiles * QK_K * COLS],
            bsums: vec![0; tiles * 16 * COLS],
            pairs: vec![0; tiles * PAIRS * COLS],
            d: vec![0.0; tiles * COLS],
        };
        // Each 4-code group is one u32: row c's group g goes to word g·16 + c of its tile.
        for (a, y) in ys.iter().enumerate() {
            let (cb, c) = (a / COLS, a % COLS);
            for (kb, blk) in y[..nb].iter().enumerate() {
                let tile = cb * nb + kb;
                let codes = &mut t.codes[tile * QK_K * COLS..(tile + 1) * QK_K * COLS];
                for (g, q) in blk.qs.chunks_exact(4).enumerate() {
                    codes[g * 4 * COLS + 4 * c..][..4].copy_from_slice(q);
                }
                let bsums = &mut t.bsums[tile * 16 * COLS..(tile + 1) * 16 * COLS];
                for (s, &v) in blk.bsums.iter().enumerate() {
                    bsums[s * COLS + c] = v as i32;
                }
                // A sub-block sums `sub / 16` bsums (|sum| ≤ 32·128: an i16).
                let per = sub / 16;
                let sub_sum = |j: usize| -> i32 {
                    blk.bsums[j * per..(j + 1) * per]
                        .iter()
                        .map(|&v| v as i32)
                        .sum()
                };
                let pairs = &mut t.pairs[tile * PAIRS * COLS..(tile + 1) * PAIRS * COLS];
                for p in 0..QK_K / sub / 2 {
                    pairs[p * COLS + c] = i16_pair(sub_sum(2 * p), sub_sum(2 * p + 1));
                }
                t.d[tile * COLS + c] = blk.d;
            }
        }
        t
    }

    fn tile(&self, cb: usize, kb: usize) -> ActTile<'_> {
        let i = cb * self.nb + kb;
        ActTile {
            codes: &self.codes[i * QK_K * COLS..(i + 1) * QK_K * COLS],
            bsums: &self.bsums[i * 16 * COLS..(i + 1) * 16 * COLS],
            pairs: &self.pairs[i * PAIRS * COLS..(i + 1) * PAIRS * COLS],
            d: &self.d[i * COLS..(i + 1) * COLS],
        }
    }
}

/// One column tile of one super-block.
#[derive(Clone, Copy)]
struct ActTile<'a> {
    codes: &'a [i8],
    bsums: &'a [i32],
    pairs: &'a [i32],
    d: &'a [f32],
}

/// Unpacked weight rows of one super-block: `ROW_BLOCK` rows (zero past the last row).
struct WeightTile {
    codes: Vec<u8>,
    scales: Vec<i32>,
    mins: Vec<i32>,
    /// Per row, the factors of `ActTiles::pairs` as i16 pairs: `(m_2p, m_2p+1)` with mins,
    /// else `(BIAS·sc_2p, BIAS·sc_2p+1)` (|·| ≤ 32·128).
    pair_factors: Vec<i32>,
    d: Vec<f32>,
    dmin: Vec<f32>,
}

impl WeightTile {
    fn new() -> Self {
        Self {
            codes: vec![0; ROW_BLOCK * QK_K],
            scales: vec![0; ROW_BLOCK * 16],
            mins: vec![0; ROW_BLOCK * 8],
            pair_factors: vec![0; ROW_BLOCK * PAIRS],
            d: vec![0.0; ROW_BLOCK],
            dmin: vec![0.0; ROW_BLOCK],
        }
    }

    /// Unpacks block `kb` of `rows` rows `stride` bytes apart; clears the rows after them
    /// up to the next multiple of `ROWS`.
    #[inline(always)]
    fn fill<F: SuperBlock>(&mut self, w: &[u8], stride: usize, rows: usize, kb: usize) {
        let nsub = QK_K / F::SUB;
        for r in 0..rows {
            let b = &w[r * stride + kb * F::BLOCK_BYTES..][..F::BLOCK_BYTES];
            let (d, dmin) = F::unpack(
                b,
                &mut self.codes[r * QK_K..(r + 1) * QK_K],
                &mut self.scales[r * nsub..(r + 1) * nsub],
                &mut self.mins[r * 8..(r + 1) * 8],
            );
            self.d[r] = d;
            self.dmin[r] = dmin;
            for p in 0..nsub / 2 {
                let f = |j: usize| {
                    if F::HAS_MIN {
                        self.mins[r * 8 + j]
                    } else {
                        F::BIAS * self.scales[r * nsub + j]
                    }
                };
                self.pair_factors[r * PAIRS + p] = i16_pair(f(2 * p), f(2 * p + 1));
            }
        }
        for r in rows..rows.next_multiple_of(ROWS) {
            self.codes[r * QK_K..(r + 1) * QK_K].fill(0);
            self.scales[r * nsub..(r + 1) * nsub].fill(0);
            self.mins[r * 8..(r + 1) * 8].fill(0);
            self.pair_factors[r * PAIRS..(r + 1) * PAIRS].fill(0);
            self.d[r] = 0.0;
            self.dmin[r] = 0.0;
        }
    }
}

thread_local! {
    /// Each pool thread's weight tile and accumulator, kept between products.
    static SCRATCH: RefCell<(WeightTile, Vec<f32>)> =
        RefCell::new((WeightTile::new(), vec![0.0; ROW_BLOCK * COL_WINDOW]));
}

/// `out[r * n + a] = row r · activation row a` for `n_rows` rows `stride` bytes apart.
pub(super) fn rows_x_acts<F: SuperBlock>(
    isa: Isa,
    w: &[u8],
    stride: usize,
    n_rows: usize,
    acts: &ActTiles,
    out: &mut [f32],
) {
    SCRATCH.with(|s| {
        let (tile, acc) = &mut *s.borrow_mut();
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the caller resolved the ISA against the CPU.
            Isa::Vnni => unsafe { avx512::drive::<F>(w, stride, n_rows, acts, out, tile, acc) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2 => unsafe { avx2::drive::<F>(w, stride, n_rows, acts, out, tile, acc) },
            _ => drive::<F, Portable>(w, stride, n_rows, acts, out, tile, acc),
        }
    })
}

/// An ISA's register tile: `ROWS` weight rows from `r0` × the 16 activation rows of `act`,
/// one super-block, added into `acc` (row stride `acc_stride`).
trait Tile {
    /// # Safety
    /// The CPU has the tile's instructions; `acc` holds `ROWS` rows of 16 values.
    unsafe fn tile<F: SuperBlock>(
        w: &WeightTile,
        r0: usize,
        act: ActTile,
        acc: *mut f32,
        acc_stride: usize,
    );

    /// `tile` on two adjacent column tiles (32 activation rows), where an ISA gains from
    /// sharing each weight load between them.
    ///
    /// # Safety
    /// As `tile`, with 32 values per accumulator row.
    #[inline(always)]
    unsafe fn tile_pair<F: SuperBlock>(
        w: &WeightTile,
        r0: usize,
        act: [ActTile; 2],
        acc: *mut f32,
        acc_stride: usize,
    ) {
        Self::tile::<F>(w, r0, act[0], acc, acc_stride);
        Self::tile::<F>(w, r0, act[1], acc.add(COLS), acc_stride);
    }
}

/// The loop shared by every ISA: column windows of up to `COL_WINDOW` activation rows; in
/// each, blocks of `ROW_BLOCK` weight rows, whose super-blocks are unpacked once and met by
/// every column tile of the window. Inline it into a `#[target_feature]` function.
#[inline(always)]
fn drive<F: SuperBlock, T: Tile>(
    w: &[u8],
    stride: usize,
    n_rows: usize,
    acts: &ActTiles,
    out: &mut [f32],
    tile: &mut WeightTile,
    acc: &mut [f32],
) {
    let (n, nb) = (acts.n, acts.nb);
    for c0 in (0..n).step_by(COL_WINDOW) {
        let cw = (n - c0).min(COL_WINDOW);
        let tiles = cw.div_ceil(COLS);
        let acc_stride = tiles * COLS;
        for r0 in (0..n_rows).step_by(ROW_BLOCK) {
            let rows = (n_rows - r0).min(ROW_BLOCK);
            let acc = &mut acc[..rows.next_multiple_of(ROWS) * acc_stride];
            acc.fill(0.0);
            for kb in 0..nb {
                tile.fill::<F>(&w[r0 * stride..], stride, rows, kb);
                for ct in (0..tiles).step_by(2) {
                    let act = acts.tile(c0 / COLS + ct, kb);
                    for t0 in (0..rows).step_by(ROWS) {
                        let o = acc.as_mut_ptr().wrapping_add(t0 * acc_stride + ct * COLS);
                        // SAFETY: the ISA is the caller's; rows t0..t0+8 of the accumulator
                        // exist (rounded up), columns ct*16..+16 (+32) fit its stride.
                        unsafe {
                            if ct + 1 < tiles {
                                let next = acts.tile(c0 / COLS + ct + 1, kb);
                                T::tile_pair::<F>(tile, t0, [act, next], o, acc_stride)
                            } else {
                                T::tile::<F>(tile, t0, act, o, acc_stride)
                            }
                        };
                    }
                }
            }
            for r in 0..rows {
                out[(r0 + r) * n + c0..(r0 + r) * n + c0 + cw]
                    .copy_from_slice(&acc[r * acc_stride..r * acc_stride + cw]);
            }
        }
    }
}

/// Portable tiles: the arithmetic of the module comment, one output at a time.
struct Portable;

impl Tile for Portable {
    unsafe fn tile<F: SuperBlock>(
        w: &WeightTile,
        r0: usize,
        act: ActTile,
        acc: *mut f32,
        acc_stride: usize,
    ) {
        let nsub = QK_K / F::SUB;
        for t in 0..ROWS {
            let r = r0 + t;
            let q = &w.codes[r * QK_K..(r + 1) * QK_K];
            for c in 0..COLS {
                let (mut s1, mut s2) = (0i32, 0i32);
                for s in 0..nsub {
                    let k0 = s * F::SUB;
                    let raw: i32 = (k0..k0 + F::SUB)
                        .zip(&q[k0..k0 + F::SUB])
                        .map(|(k, &x)| {
                            x as i32 * act.codes[(k / 4) * 4 * COLS + 4 * c + k % 4] as i32
                        })
                        .sum();
                    let bsum: i32 = (0..F::SUB / 16)
                        .map(|u| act.bsums[(s * F::SUB / 16 + u) * COLS + c])
                        .sum();
                    s1 += w.scales[r * nsub + s] * (raw - F::BIAS * bsum);
                    if F::HAS_MIN {
                        s2 += w.mins[r * 8 + s] * bsum;
                    }
                }
                let mut v = s1 as f32 * w.d[r];
                if F::HAS_MIN {
                    v = (-w.dmin[r]).mul_add(s2 as f32, v);
                }
                let o = acc.add(t * acc_stride + c);
                *o += v * act.d[c];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::super::row_kernels::simd::dpwssd512;
    use super::*;
    use std::arch::x86_64::*;

    pub(super) struct Vnni;

    /// # Safety
    /// The CPU has AVX-512 F/BW/VL/VNNI; `w` holds `n_rows` rows of `stride` bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    pub(super) unsafe fn drive<F: SuperBlock>(
        w: &[u8],
        stride: usize,
        n_rows: usize,
        acts: &ActTiles,
        out: &mut [f32],
        tile: &mut WeightTile,
        acc: &mut [f32],
    ) {
        super::drive::<F, Vnni>(w, stride, n_rows, acts, out, tile, acc)
    }

    impl Tile for Vnni {
        #[inline(always)]
        unsafe fn tile<F: SuperBlock>(
            w: &WeightTile,
            r0: usize,
            act: ActTile,
            acc: *mut f32,
            acc_stride: usize,
        ) {
            rows_x_vectors::<F, 8, 1>(w, r0, [act], acc, acc_stride)
        }

        /// Four rows at a time: each weight broadcast feeds two `vpdpbusd` (loads, not
        /// products, bound the 8 × 16 tile).
        #[inline(always)]
        unsafe fn tile_pair<F: SuperBlock>(
            w: &WeightTile,
            r0: usize,
            act: [ActTile; 2],
            acc: *mut f32,
            acc_stride: usize,
        ) {
            rows_x_vectors::<F, 8, 2>(w, r0, act, acc, acc_stride);
        }
    }

    /// `R` weight rows × `V` column tiles of 16 activation rows. Per sub-block, the
    /// `vpdpbusd` sums are scaled into `s1`; the terms that need only the activations' sums
    /// (Q4_K/Q5_K's mins, Q6_K's −32 offset) are a second pass off that chain.
    #[inline(always)]
    unsafe fn rows_x_vectors<F: SuperBlock, const R: usize, const V: usize>(
        w: &WeightTile,
        r0: usize,
        act: [ActTile; V],
        acc: *mut f32,
        acc_stride: usize,
    ) {
        let nsub = QK_K / F::SUB;
        let groups = F::SUB / 4;
        let q = w.codes.as_ptr().add(r0 * QK_K);
        let mut s1 = [[_mm512_setzero_si512(); V]; R];
        for s in 0..nsub {
            let mut raw = [[_mm512_setzero_si512(); V]; R];
            for g in s * groups..(s + 1) * groups {
                let mut y = [_mm512_setzero_si512(); V];
                for (v, y) in y.iter_mut().enumerate() {
                    *y = _mm512_loadu_si512(act[v].codes.as_ptr().add(g * 4 * COLS) as *const _);
                }
                for (t, raw) in raw.iter_mut().enumerate() {
                    let x =
                        _mm512_set1_epi32((q.add(t * QK_K + 4 * g) as *const i32).read_unaligned());
                    for (r, y) in raw.iter_mut().zip(y) {
                        *r = _mm512_dpbusd_epi32(*r, x, y);
                    }
                }
            }
            for (t, (s1, raw)) in s1.iter_mut().zip(raw).enumerate() {
                let sc = _mm512_set1_epi32(w.scales[(r0 + t) * nsub + s]);
                for (a, r) in s1.iter_mut().zip(raw) {
                    *a = _mm512_add_epi32(*a, _mm512_mullo_epi32(r, sc));
                }
            }
        }
        // The terms of the activations' sums, two sub-blocks per `vpdpwssd`:
        // s2 = Σ_s m_s·bsum_s (mins), or s1 −= Σ_s BIAS·sc_s·bsum_s.
        let mut s2 = [[_mm512_setzero_si512(); V]; R];
        if F::HAS_MIN || F::BIAS != 0 {
            for p in 0..nsub / 2 {
                let mut b = [_mm512_setzero_si512(); V];
                for (v, b) in b.iter_mut().enumerate() {
                    *b = _mm512_loadu_si512(act[v].pairs.as_ptr().add(p * COLS) as *const _);
                }
                for (t, s2) in s2.iter_mut().enumerate() {
                    let f = _mm512_set1_epi32(w.pair_factors[(r0 + t) * PAIRS + p]);
                    for (a, b) in s2.iter_mut().zip(b) {
                        *a = dpwssd512(*a, b, f);
                    }
                }
            }
            if F::BIAS != 0 {
                for (s1, s2) in s1.iter_mut().zip(&s2) {
                    for (a, b) in s1.iter_mut().zip(s2) {
                        *a = _mm512_sub_epi32(*a, *b);
                    }
                }
            }
        }
        for t in 0..R {
            let r = r0 + t;
            for v in 0..V {
                let yd = _mm512_loadu_ps(act[v].d.as_ptr());
                let mut x = _mm512_mul_ps(_mm512_cvtepi32_ps(s1[t][v]), _mm512_set1_ps(w.d[r]));
                if F::HAS_MIN {
                    x = _mm512_fnmadd_ps(
                        _mm512_set1_ps(w.dmin[r]),
                        _mm512_cvtepi32_ps(s2[t][v]),
                        x,
                    );
                }
                let o = acc.add(t * acc_stride + v * COLS);
                _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), _mm512_mul_ps(x, yd)));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::super::row_kernels::simd::u8s8_quads_acc;
    use super::*;
    use std::arch::x86_64::*;

    pub(super) struct Avx2;

    /// # Safety
    /// The CPU has AVX2 and FMA; `w` holds `n_rows` rows of `stride` bytes.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn drive<F: SuperBlock>(
        w: &[u8],
        stride: usize,
        n_rows: usize,
        acts: &ActTiles,
        out: &mut [f32],
        tile: &mut WeightTile,
        acc: &mut [f32],
    ) {
        super::drive::<F, Avx2>(w, stride, n_rows, acts, out, tile, acc)
    }

    impl Tile for Avx2 {
        /// Two halves of 8 activation rows (one 256-bit vector of i32 lanes each).
        #[inline(always)]
        unsafe fn tile<F: SuperBlock>(
            w: &WeightTile,
            r0: usize,
            act: ActTile,
            acc: *mut f32,
            acc_stride: usize,
        ) {
            let nsub = QK_K / F::SUB;
            let groups = F::SUB / 4;
            let q = w.codes.as_ptr().add(r0 * QK_K);
            for h in 0..2 {
                let codes = act.codes.as_ptr().add(h * 32);
                let bsums = act.bsums.as_ptr().add(h * 8);
                let sub_bsum = |s: usize| {
                    let mut v = _mm256_loadu_si256(bsums.add(s * (F::SUB / 16) * COLS) as *const _);
                    if F::SUB == 32 {
                        v = _mm256_add_epi32(
                            v,
                            _mm256_loadu_si256(bsums.add((2 * s + 1) * COLS) as *const _),
                        );
                    }
                    v
                };
                let mut s1 = [_mm256_setzero_si256(); ROWS];
                for s in 0..nsub {
                    let mut raw = [_mm256_setzero_si256(); ROWS];
                    for g in s * groups..(s + 1) * groups {
                        let y = _mm256_loadu_si256(codes.add(g * 4 * COLS) as *const _);
                        for (t, r) in raw.iter_mut().enumerate() {
                            let x = (q.add(t * QK_K + 4 * g) as *const i32).read_unaligned();
                            *r = u8s8_quads_acc::<false>(*r, _mm256_set1_epi32(x), y);
                        }
                    }
                    let bias = if F::BIAS != 0 {
                        _mm256_mullo_epi32(sub_bsum(s), _mm256_set1_epi32(F::BIAS))
                    } else {
                        _mm256_setzero_si256()
                    };
                    for (t, (a, r)) in s1.iter_mut().zip(raw).enumerate() {
                        let sc = _mm256_set1_epi32(w.scales[(r0 + t) * nsub + s]);
                        *a =
                            _mm256_add_epi32(*a, _mm256_mullo_epi32(_mm256_sub_epi32(r, bias), sc));
                    }
                }
                let mut s2 = [_mm256_setzero_si256(); ROWS];
                if F::HAS_MIN {
                    for s in 0..nsub {
                        let b = sub_bsum(s);
                        for (t, a) in s2.iter_mut().enumerate() {
                            let m = _mm256_set1_epi32(w.mins[(r0 + t) * 8 + s]);
                            *a = _mm256_add_epi32(*a, _mm256_mullo_epi32(b, m));
                        }
                    }
                }
                let yd = _mm256_loadu_ps(act.d.as_ptr().add(h * 8));
                for t in 0..ROWS {
                    let r = r0 + t;
                    let mut v = _mm256_mul_ps(_mm256_cvtepi32_ps(s1[t]), _mm256_set1_ps(w.d[r]));
                    if F::HAS_MIN {
                        v = _mm256_fnmadd_ps(
                            _mm256_set1_ps(w.dmin[r]),
                            _mm256_cvtepi32_ps(s2[t]),
                            v,
                        );
                    }
                    let o = acc.add(t * acc_stride + h * 8);
                    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), _mm256_mul_ps(v, yd)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::row_tests::{acts, quantized};
    use super::super::{has_avx2, has_avx512_vnni, q4_k, q5_k, q6_k};
    use super::*;
    use candle_core::quantized::GgmlDType;

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Every ISA's tiles give the portable tiles' bits (odd row counts, activation rows
    /// past a column tile and past a column window, several row blocks); all of them are
    /// `vec_dot`'s value up to rounding.
    fn isas_agree<F: SuperBlock>(g: GgmlDType) {
        let cols = 3 * QK_K;
        let nb = cols / QK_K;
        let stride = nb * F::BLOCK_BYTES;
        for (rows, n, seed) in [(13, 8, 1), (67, 17, 2), (130, 40, 3), (9, 530, 4)] {
            let (_, w) = quantized(g, rows, cols, seed);
            let x = acts(n, cols, seed + 7);
            let mut qa = vec![BlockQ8K::ZERO; n * nb];
            for (xr, o) in x.chunks(cols).zip(qa.chunks_mut(nb)) {
                F::quantize_acts(xr, o, true);
            }
            let ys: Vec<&[BlockQ8K]> = qa.chunks(nb).collect();
            let tiles = ActTiles::new(&ys, nb, F::SUB);
            let run = |isa| {
                let mut out = vec![f32::NAN; rows * n];
                rows_x_acts::<F>(isa, &w, stride, rows, &tiles, &mut out);
                out
            };
            let want = run(Isa::Scalar);
            if has_avx2() {
                assert_eq!(bits(&run(Isa::Avx2)), bits(&want), "{g:?} AVX2 {rows}x{n}");
            }
            if has_avx512_vnni() {
                assert_eq!(bits(&run(Isa::Vnni)), bits(&want), "{g:?} VNNI {rows}x{n}");
            }
            // Against the exact value of the same integers and scales (f64): each f32
            // operation of a block rounds a value no larger than the block's scale and min
            // parts, so 8 roundings of their sum bound the error.
            let mut worst = 0.0f64;
            for r in 0..rows {
                for (a, y) in ys.iter().enumerate() {
                    let (mut exact, mut parts) = (0.0f64, 0.0f64);
                    for (kb, yb) in y.iter().enumerate() {
                        let b = &w[r * stride + kb * F::BLOCK_BYTES..][..F::BLOCK_BYTES];
                        let (mut c, mut sc, mut mn) = ([0u8; QK_K], [0i32; 16], [0i32; 8]);
                        let (d, dmin) = F::unpack(b, &mut c, &mut sc, &mut mn);
                        let (mut s1, mut s2) = (0i64, 0i64);
                        for k in 0..QK_K {
                            let q = c[k] as i64 - F::BIAS as i64;
                            s1 += sc[k / F::SUB] as i64 * q * yb.qs[k] as i64;
                            s2 += mn[k / F::SUB.max(32)] as i64 * yb.qs[k] as i64;
                        }
                        let (p1, p2) = (d as f64 * s1 as f64, dmin as f64 * s2 as f64);
                        exact += yb.d as f64 * (p1 - p2);
                        parts += (yb.d as f64).abs() * (p1.abs() + p2.abs());
                    }
                    let err = (want[r * n + a] as f64 - exact).abs();
                    assert!(
                        err <= 8.0 * f32::EPSILON as f64 / 2.0 * parts,
                        "{g:?} [{r}, {a}]: {} vs exact {exact} (parts {parts})",
                        want[r * n + a]
                    );
                    worst = worst.max(err / parts.max(1e-30));
                }
            }
            eprintln!("{g:?} {rows}x{n}: worst error / block parts {worst:.2e}");
        }
    }

    #[test]
    fn q4_k_tiles_agree_across_isas() {
        isas_agree::<q4_k::Q4K>(GgmlDType::Q4K);
    }

    #[test]
    fn q5_k_tiles_agree_across_isas() {
        isas_agree::<q5_k::Q5K>(GgmlDType::Q5K);
    }

    #[test]
    fn q6_k_tiles_agree_across_isas() {
        isas_agree::<q6_k::Q6K>(GgmlDType::Q6K);
    }
}
