//! The tiled SIMD body of `attention::attend_block`, for AVX2 or AVX-512 (chosen at run
//! time; `avx2.rs` and `avx512.rs` hold the vector code, this file the tiling they share).
//!
//! Same semantics as the portable row-at-a-time loop (`attention::attend_block_portable`):
//! for query rows Q (nq × d) and one key/value block K, V (nk × d), with the causal and
//! segment masks, it updates the online-softmax partial (acc, m, l). The work is tiled:
//!
//! ```text
//!   for each key sub-block J of KB keys:          Kᵀ_J = transpose(K_J)   (d × KB, once)
//!     for each tile I of MR query rows:
//!       S   = scale · Q_I Kᵀ_J                    MR×(lanes·W) register micro-kernel over d
//!       S[i,j] = -inf where (i, j) is masked      (causal, segments, past the block)
//!       m'_i = max(m_i, max_j S[i,j]);  P = exp(S - m')     (vector polynomial exp)
//!       l_i  = l_i · exp(m_i - m'_i) + Σ_j P[i,j]
//!       acc_I = acc_I · exp(m - m') + P V_J        MR×(lanes·W) micro-kernel over keys
//! ```
//!
//! The QKᵀ micro-kernel broadcasts one query element per row and multiplies it into W
//! vectors of consecutive keys of Kᵀ: MR·W accumulators, W + MR loads per MR·W FMAs. The
//! PV micro-kernel broadcasts P[i,j] and multiplies it into W vectors of row j of V. AVX2
//! has 16 registers of 8 lanes (W = 2: 16 keys or values per pass); AVX-512 has 32 of 16
//! lanes (W up to 4: a whole 64-key score row, or a whole d = 64 value row, per pass, so
//! the accumulators of a tile are loaded and stored once). With fewer than `DIRECT_ROWS`
//! query rows (decode: the GQA group's heads) the scores are instead dot products read
//! straight from K (`qk_dots`), since transposing a block would cost as much as using it.
//! Rows where every key is masked are left untouched (as the portable loop).
//! `exp` is a degree-6 polynomial on the reduced argument r = x − n·ln2, |r| ≤ ln2/2,
//! times 2ⁿ built in the exponent bits (relative error ~1 ulp); inputs below −87 give 0.
//! Both instruction sets compute the same polynomial per lane; only the order of the
//! horizontal sums differs (results agree to ~1e-6 relative).

use crate::attention::partial::{BlockMask, Partial};
use crate::quant::has_avx512f;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

/// Query rows per micro-tile.
const MR: usize = 6;
/// Keys per sub-block (the width of the transposed K and of a score row).
const KB: usize = 64;
/// Below this many query rows the scores are dot products straight from K (no transpose).
const DIRECT_ROWS: usize = 4;

/// The instruction set the tiled kernel runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnIsa {
    /// 8-lane AVX2 + FMA + F16C.
    Avx2,
    /// 16-lane AVX-512F (head dimension a multiple of 16).
    Avx512,
}

/// The kernel `attend_block` uses for head dimension `d` on this CPU: AVX-512 when present
/// and d is a multiple of 16, else AVX2 when present and d is a multiple of 8, else None
/// (the portable loop). `LWM_KERNEL=avx2` stops at AVX2 and `LWM_KERNEL=scalar` at the
/// portable loop, as for the quantized products.
pub fn isa_for(d: usize) -> Option<AttnIsa> {
    let cap = crate::quant::kernel_cap();
    if d == 0 || !d.is_multiple_of(8) || cap == crate::quant::Kernel::Scalar {
        return None;
    }
    if d.is_multiple_of(16) && has_avx512f() && cap == crate::quant::Kernel::Auto {
        Some(AttnIsa::Avx512)
    } else if crate::quant::has_avx2() {
        Some(AttnIsa::Avx2)
    } else {
        None
    }
}

/// True when a SIMD kernel can run for head dimension `d` on this CPU.
pub fn available(d: usize) -> bool {
    isa_for(d).is_some()
}

/// True when `isa` can run for head dimension `d` here, whatever `LWM_KERNEL` says (for
/// comparing the two instruction sets in one process).
pub fn supports(isa: AttnIsa, d: usize) -> bool {
    match isa {
        AttnIsa::Avx2 => d > 0 && d.is_multiple_of(8) && crate::quant::has_avx2(),
        AttnIsa::Avx512 => d > 0 && d.is_multiple_of(16) && has_avx512f(),
    }
}

/// The checks every kernel makes before touching memory: the kernel exists for this head
/// size, every head's partial has the same shape, and every query row lies inside its
/// `q`. `None` when there are no rows to attend.
fn check_query_rows(
    isa: AttnIsa,
    queries: &[&[f32]],
    q_stride: usize,
    states: &[Partial],
) -> Option<usize> {
    assert_eq!(queries.len(), states.len(), "one partial per query head");
    let first = states.first()?;
    assert!(
        supports(isa, first.d),
        "{isa:?} attention kernel unavailable"
    );
    let (d, nq) = (first.d, first.rows());
    assert!(
        states.iter().all(|st| st.d == d && st.rows() == nq),
        "query heads of one group differ in shape"
    );
    if nq == 0 {
        return None;
    }
    for q in queries {
        assert!(
            q.len() >= (nq - 1) * q_stride + d,
            "query rows out of range"
        );
    }
    Some(d)
}

/// One key/value block as the kernels read it: `nk` rows of d values each, f32 or the
/// IEEE half bytes of an f16 cache (little-endian), widened in registers.
#[derive(Clone, Copy)]
pub enum KvBlock<'a> {
    F32 { k: &'a [f32], v: &'a [f32] },
    F16 { k: &'a [u8], v: &'a [u8] },
}

impl KvBlock<'_> {
    /// Rows of K, and the checks the kernel relies on: V has at least as many rows.
    fn rows(&self, d: usize) -> usize {
        let (k_bytes, v_bytes, width) = match self {
            KvBlock::F32 { k, v } => (4 * k.len(), 4 * v.len(), 4 * d),
            KvBlock::F16 { k, v } => (k.len(), v.len(), 2 * d),
        };
        let nk = k_bytes / width;
        assert!(
            v_bytes >= nk * width,
            "value block shorter than the key block"
        );
        nk
    }
}

/// The tiled kernel; callers check `available(state.d)` first.
pub fn attend_block_simd(
    q: &[f32],
    q_stride: usize,
    k: &[f32],
    v: &[f32],
    scale: f32,
    mask: &BlockMask,
    state: &mut Partial,
) {
    let block = KvBlock::F32 { k, v };
    attend_group_simd(
        &[q],
        q_stride,
        block,
        scale,
        mask,
        std::slice::from_mut(state),
    );
}

/// `attend_block_simd` reading K and V as stored in an f16 cache: the same numbers as
/// decoding the block to f32 first, without writing and re-reading that copy.
pub fn attend_block_f16(
    q: &[f32],
    q_stride: usize,
    k: &[u8],
    v: &[u8],
    scale: f32,
    mask: &BlockMask,
    state: &mut Partial,
) {
    let block = KvBlock::F16 { k, v };
    attend_group_simd(
        &[q],
        q_stride,
        block,
        scale,
        mask,
        std::slice::from_mut(state),
    );
}

/// The query heads of one GQA group (`queries[h]`, each nq rows of stride `q_stride`,
/// updating `states[h]`) against one shared key/value block: each key sub-block is
/// transposed once for all of them instead of once per head. Same numbers per head as
/// attending it alone. Callers check `available(d)` first.
pub fn attend_group_simd(
    queries: &[&[f32]],
    q_stride: usize,
    block: KvBlock,
    scale: f32,
    mask: &BlockMask,
    states: &mut [Partial],
) {
    let Some(d) = states.first().map(|st| st.d) else {
        return;
    };
    let isa = isa_for(d).expect("SIMD attention kernel unavailable");
    attend_group_with(isa, queries, q_stride, block, scale, mask, states);
}

/// `attend_group_simd` on the named instruction set (which `supports` must allow).
pub fn attend_group_with(
    isa: AttnIsa,
    queries: &[&[f32]],
    q_stride: usize,
    block: KvBlock,
    scale: f32,
    mask: &BlockMask,
    states: &mut [Partial],
) {
    let Some(d) = check_query_rows(isa, queries, q_stride, states) else {
        return;
    };
    let nk = block.rows(d);
    let (k, v) = match block {
        KvBlock::F32 { k, v } => (k.as_ptr() as *const u8, v.as_ptr() as *const u8),
        KvBlock::F16 { k, v } => (k.as_ptr(), v.as_ptr()),
    };
    let job = Job {
        queries,
        q_stride,
        k,
        v,
        nk,
        scale,
        mask,
    };
    // SAFETY: the instruction set was detected (`check_query_rows`); `rows` checked that
    // K and V hold nk rows of d elements.
    unsafe {
        match block {
            KvBlock::F32 { .. } => attend_raw::<F32>(isa, &job, states),
            KvBlock::F16 { .. } => attend_raw::<F16>(isa, &job, states),
        }
    }
}

/// One checked call: the query heads of a group (`queries[h]`, rows of stride `q_stride`)
/// against one block of `nk` K and V rows of d elements of the kernel's element type.
struct Job<'a> {
    queries: &'a [&'a [f32]],
    q_stride: usize,
    k: *const u8,
    v: *const u8,
    nk: usize,
    scale: f32,
    mask: &'a BlockMask<'a>,
}

/// The checked entry points' common tail: the instruction set's kernel over element type
/// `E`. Safety: `isa` is supported and `job.k`, `job.v` hold `nk` rows of d elements.
unsafe fn attend_raw<E: Elem>(isa: AttnIsa, job: &Job, states: &mut [Partial]) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        AttnIsa::Avx2 => avx2::attend::<E>(job, states),
        AttnIsa::Avx512 => avx512::attend::<E>(job, states),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, job, states);
        unreachable!("checked by supports()");
    }
}

/// How the kernels read stored K/V elements: 8 or 16 at a time widened to f32.
#[cfg(target_arch = "x86_64")]
trait Elem {
    const BYTES: usize;
    unsafe fn load8(p: *const u8) -> std::arch::x86_64::__m256;
    unsafe fn load16(p: *const u8) -> std::arch::x86_64::__m512;
    unsafe fn get(p: *const u8) -> f32;
}

struct F32;
struct F16;

/// Elsewhere no kernel runs (`supports` is false); the types only keep the signatures.
#[cfg(not(target_arch = "x86_64"))]
trait Elem {}
#[cfg(not(target_arch = "x86_64"))]
impl Elem for F32 {}
#[cfg(not(target_arch = "x86_64"))]
impl Elem for F16 {}

#[cfg(target_arch = "x86_64")]
impl Elem for F32 {
    const BYTES: usize = 4;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p as *const f32)
    }
    #[inline(always)]
    unsafe fn load16(p: *const u8) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p as *const f32)
    }
    #[inline(always)]
    unsafe fn get(p: *const u8) -> f32 {
        (p as *const f32).read_unaligned()
    }
}

#[cfg(target_arch = "x86_64")]
impl Elem for F16 {
    const BYTES: usize = 2;
    #[inline(always)]
    unsafe fn load8(p: *const u8) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn load16(p: *const u8) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[inline(always)]
    unsafe fn get(p: *const u8) -> f32 {
        half::f16::from_bits((p as *const u16).read_unaligned()).to_f32()
    }
}

/// The vector steps of one instruction set that the shared tiling (`drive`) calls. Rows
/// of the score buffer hold `KB` floats; `LANES` is the vector width the softmax steps
/// round a row up to (the columns past the visible keys hold -inf).
#[cfg(target_arch = "x86_64")]
trait Simd {
    const LANES: usize;
    /// kt[t·KB + j] = k[j·d + t] for j < nb ≤ KB, t < d.
    unsafe fn transpose<E: Elem>(k: *const u8, d: usize, nb: usize, kt: *mut f32);
    /// s[i·KB + j] = scale · Σ_t q[i·qs + t] · kt[t·KB + j] for i < R, j < ncols (the
    /// columns up to the next vector multiple are written too).
    unsafe fn qk_rows<const R: usize>(
        q: *const f32,
        qs: usize,
        kt: *const f32,
        d: usize,
        ncols: usize,
        scale: f32,
        s: *mut f32,
    );
    /// s[j] = scale · q·k_j for j < ncols, straight from the rows of K.
    unsafe fn qk_dots<E: Elem>(
        q: *const f32,
        k: *const u8,
        d: usize,
        ncols: usize,
        scale: f32,
        s: *mut f32,
    );
    /// acc[i·d + c] += Σ_{j<n} p[i·KB + j] · v[j·d + c] for i < R, c < d.
    unsafe fn pv_rows<E: Elem, const R: usize>(
        p: *const f32,
        v: *const u8,
        d: usize,
        n: usize,
        acc: *mut f32,
    );
    /// max of row[0..n] (n a multiple of LANES).
    unsafe fn row_max(row: *const f32, n: usize) -> f32;
    /// row[j] = exp(row[j] - m) for j < n (n a multiple of LANES); returns the sum.
    unsafe fn exp_sum(row: *mut f32, n: usize, m: f32) -> f32;
}

/// dst[0..n] = the n stored elements at `src` as f32 (n a multiple of 8).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn widen<E: Elem>(src: *const u8, n: usize, dst: *mut f32) {
    for i in (0..n).step_by(8) {
        std::arch::x86_64::_mm256_storeu_ps(dst.add(i), E::load8(src.add(i * E::BYTES)));
    }
}

/// Calls `$f::<[$g,] R>` for a micro-tile of `$r` rows (1..=MR).
macro_rules! dispatch_rows {
    ($r:expr, $s:ident :: $f:ident [$($g:ty),*], $($arg:expr),*) => {
        match $r {
            1 => $s::$f::<$($g,)* 1>($($arg),*),
            2 => $s::$f::<$($g,)* 2>($($arg),*),
            3 => $s::$f::<$($g,)* 3>($($arg),*),
            4 => $s::$f::<$($g,)* 4>($($arg),*),
            5 => $s::$f::<$($g,)* 5>($($arg),*),
            _ => $s::$f::<$($g,)* 6>($($arg),*),
        }
    };
}

/// The tiling of the module comment over one instruction set `S` (inlined into each set's
/// `#[target_feature]` entry point, so its vector steps compile with those features), for
/// the query heads of one group: each key sub-block is transposed once, then every head's
/// row tiles run against it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn drive<S: Simd, E: Elem>(job: &Job, states: &mut [Partial]) {
    let Job {
        queries,
        q_stride,
        k,
        v,
        nk,
        scale,
        mask,
    } = *job;
    let Some(d) = states.first().map(|st| st.d) else {
        return;
    };
    let nq = states[0].rows();
    if mask.tile_is_masked(nq, nk) {
        return;
    }
    let vis: Vec<usize> = (0..nq).map(|i| mask.visible_keys(i, nk)).collect();
    // Few rows: dot products straight from K (see `qk_dots`).
    let direct = nq < DIRECT_ROWS;
    // Transposed key sub-block; one score row of slack for the last micro-tile's columns.
    let mut kt = vec![0.0f32; if direct { 0 } else { d * KB + KB }];
    // Stored f16 values are widened once per sub-block for the whole group (as Kᵀ is), so
    // the PV micro-kernel's inner loop is loads and FMAs only, without a conversion per 8
    // values per row tile. Exact: f16 -> f32 loses nothing, and the FMAs are the same.
    let widen_v = !direct && E::BYTES != 4;
    let mut vw = vec![0.0f32; if widen_v { d * KB } else { 0 }];
    let mut s = [0.0f32; MR * KB];
    let segments = mask.q_segments.zip(mask.k_segments);
    for j0 in (0..nk).step_by(KB) {
        let nb = KB.min(nk - j0);
        // Causal rows see a non-decreasing number of keys: start at the first row that
        // sees any key of this sub-block.
        let Some(first) = (0..nq).find(|&i| vis[i] > j0) else {
            continue;
        };
        if !direct {
            S::transpose::<E>(k.add(j0 * d * E::BYTES), d, nb, kt.as_mut_ptr());
        }
        if widen_v {
            widen::<E>(v.add(j0 * d * E::BYTES), nb * d, vw.as_mut_ptr());
        }
        for (q, state) in queries.iter().zip(states.iter_mut()) {
            let mut r0 = first;
            while r0 < nq {
                let mr = MR.min(nq - r0);
                let ncols = (0..mr).map(|i| vis[r0 + i]).max().unwrap_or(0).min(j0 + nb) - j0;
                let sp = s.as_mut_ptr();
                if direct {
                    for i in 0..mr {
                        let qi = q.as_ptr().add((r0 + i) * q_stride);
                        S::qk_dots::<E>(
                            qi,
                            k.add(j0 * d * E::BYTES),
                            d,
                            ncols,
                            scale,
                            sp.add(i * KB),
                        );
                    }
                } else {
                    let q0 = q.as_ptr().add(r0 * q_stride);
                    dispatch_rows!(mr, S::qk_rows[], q0, q_stride, kt.as_ptr(), d, ncols, scale, sp);
                }
                let ncols_v = ncols.next_multiple_of(S::LANES);
                for i in 0..mr {
                    let row = &mut s[i * KB..i * KB + ncols_v];
                    let n_vis = vis[r0 + i].saturating_sub(j0).min(ncols);
                    row[n_vis..].fill(f32::NEG_INFINITY);
                    if let Some((qseg, kseg)) = segments {
                        let qi = qseg[r0 + i];
                        for (j, x) in row[..n_vis].iter_mut().enumerate() {
                            if kseg[j0 + j] != qi {
                                *x = f32::NEG_INFINITY;
                            }
                        }
                    }
                    let row_max = S::row_max(row.as_ptr(), ncols_v);
                    if row_max == f32::NEG_INFINITY {
                        // Nothing visible in this sub-block: P = 0, state unchanged.
                        row.fill(0.0);
                        continue;
                    }
                    let gi = r0 + i;
                    let m_old = state.m[gi];
                    let m_new = m_old.max(row_max);
                    let sum = S::exp_sum(row.as_mut_ptr(), ncols_v, m_new);
                    // exp(0) = 1 exactly: skip the libm call when the running max stands.
                    let correction = if m_new > m_old {
                        (m_old - m_new).exp()
                    } else {
                        1.0
                    };
                    if correction != 1.0 {
                        for x in &mut state.acc[gi * d..(gi + 1) * d] {
                            *x *= correction;
                        }
                    }
                    state.l[gi] = state.l[gi] * correction + sum;
                    state.m[gi] = m_new;
                }
                let ap = state.acc.as_mut_ptr().add(r0 * d);
                if widen_v {
                    let vp = vw.as_ptr() as *const u8;
                    dispatch_rows!(mr, S::pv_rows[F32], s.as_ptr(), vp, d, ncols, ap);
                } else {
                    let vp = v.add(j0 * d * E::BYTES);
                    dispatch_rows!(mr, S::pv_rows[E], s.as_ptr(), vp, d, ncols, ap);
                }
                r0 += mr;
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use std::arch::x86_64::*;

    #[test]
    fn vector_exp_matches_libm_to_a_few_ulp() {
        if !crate::quant::has_avx2() {
            return;
        }
        let xs: Vec<f32> = (0..4000).map(|i| -(i as f32) * 0.0225).collect();
        let check = |c: &[f32], got: &[f32]| {
            for (x, g) in c.iter().zip(got) {
                let want = x.exp();
                let tol = if *x < -87.0 {
                    1.7e-38
                } else {
                    4.0 * f32::EPSILON * want
                };
                assert!((g - want).abs() <= tol, "exp({x}) = {g}, libm {want}");
            }
        };
        for c in xs.chunks_exact(8) {
            // SAFETY: AVX2/FMA detected above.
            let got: [f32; 8] = unsafe {
                let mut o = [0.0f32; 8];
                let attempt = super::avx2::exp_ps(_mm256_loadu_ps(c.as_ptr()));
                _mm256_storeu_ps(o.as_mut_ptr(), attempt);
                o
            };
            check(c, &got);
        }
        // -inf gives exactly 0.
        let z = unsafe {
            let mut o = [1.0f32; 8];
            _mm256_storeu_ps(
                o.as_mut_ptr(),
                super::avx2::exp_ps(_mm256_set1_ps(f32::NEG_INFINITY)),
            );
            o
        };
        assert_eq!(z, [0.0; 8]);
        exp16_matches_libm_and_avx2(&xs, check);
    }

    fn exp16_matches_libm_and_avx2(xs: &[f32], check: impl Fn(&[f32], &[f32])) {
        if !super::supports(super::AttnIsa::Avx512, 16) {
            eprintln!("no AVX-512F: its exp not tested");
            return;
        }
        for c in xs.chunks_exact(16) {
            // SAFETY: AVX-512F detected above.
            let (got, narrow) = unsafe { exp16(c) };
            check(c, &got);
            // Lane for lane the same bits as the AVX2 polynomial.
            assert_eq!(got, narrow);
        }
        let (z, _) = unsafe { exp16(&[f32::NEG_INFINITY; 16]) };
        assert_eq!(z, [0.0; 16]);
    }

    /// exp of 16 values with the AVX-512 kernel, and with the AVX2 one 8 at a time.
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn exp16(c: &[f32]) -> ([f32; 16], [f32; 16]) {
        let mut o = [0.0f32; 16];
        _mm512_storeu_ps(
            o.as_mut_ptr(),
            super::avx512::exp_ps(_mm512_loadu_ps(c.as_ptr())),
        );
        let mut n = [0.0f32; 16];
        for h in 0..2 {
            let e = super::avx2::exp_ps(_mm256_loadu_ps(c.as_ptr().add(8 * h)));
            _mm256_storeu_ps(n.as_mut_ptr().add(8 * h), e);
        }
        (o, n)
    }
}

#[cfg(test)]
mod equivalence {
    use super::{attend_group_with, supports, AttnIsa, KvBlock};
    use crate::attention::partial::test_util::{max_diff, rand_vec};
    use crate::attention::partial::{
        attend_block_portable, reference_attention, BlockMask, Partial,
    };

    /// One head's rows against one block on `isa`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend_one(
        isa: AttnIsa,
        q: &[f32],
        q_stride: usize,
        block: KvBlock,
        scale: f32,
        mask: &BlockMask,
        state: &mut Partial,
    ) {
        attend_group_with(
            isa,
            &[q],
            q_stride,
            block,
            scale,
            mask,
            std::slice::from_mut(state),
        );
    }

    /// The instruction sets this CPU can run for head size d.
    fn isas(d: usize) -> Vec<AttnIsa> {
        let all = [AttnIsa::Avx2, AttnIsa::Avx512];
        let here: Vec<AttnIsa> = all.into_iter().filter(|&i| supports(i, d)).collect();
        if here.len() < 2 {
            eprintln!("d={d}: only {here:?} of {all:?} run on this CPU");
        }
        here
    }

    /// Attend `nq` rows (positions q_pos0..) to keys 0..nk in blocks of `kb` with a SIMD
    /// kernel (`Some(isa)`) or the portable loop; returns the finished output and the lse
    /// (0 where nothing was attended).
    #[allow(clippy::too_many_arguments)]
    fn run(
        isa: Option<AttnIsa>,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: usize,
        q_pos0: usize,
        kb: usize,
        causal: bool,
        seg: Option<(&[u32], &[u32])>,
    ) -> (Vec<f32>, Vec<f32>) {
        let (nq, nk) = (q.len() / d, k.len() / d);
        let mut st = Partial::new(nq, d);
        for k0 in (0..nk).step_by(kb) {
            let k1 = (k0 + kb).min(nk);
            let mask = BlockMask {
                q_pos0,
                k_pos0: k0,
                causal,
                q_segments: seg.map(|s| s.0),
                k_segments: seg.map(|s| &s.1[k0..]),
            };
            let (kk, vv) = (&k[k0 * d..k1 * d], &v[k0 * d..k1 * d]);
            let scale = 1.0 / (d as f32).sqrt();
            match isa {
                Some(isa) => attend_one(
                    isa,
                    q,
                    d,
                    KvBlock::F32 { k: kk, v: vv },
                    scale,
                    &mask,
                    &mut st,
                ),
                None => attend_block_portable(q, d, kk, vv, scale, &mask, &mut st),
            }
        }
        let mut out = vec![0.0; nq * d];
        st.finish_into(&mut out);
        let lse = st
            .lse()
            .into_iter()
            .map(|x| if x.is_finite() { x } else { 0.0 })
            .collect();
        (out, lse)
    }

    #[test]
    fn simd_kernels_equal_portable_and_reference_on_odd_shapes() {
        let mut seed = 100;
        for d in [64, 128, 24, 16, 80] {
            let isas = isas(d);
            for (nq, nk, q_pos0, kb) in [
                (1, 1, 0, 256),
                (5, 17, 12, 7),
                (7, 130, 123, 256),
                (13, 300, 287, 64),
                (64, 333, 269, 256),
                (3, 65, 64, 65),
                (64, 64, 0, 17),
                (11, 200, 20, 50), // rows past the block start see nothing of later blocks
            ] {
                seed += 1;
                let q = rand_vec(nq * d, seed);
                let k = rand_vec(nk * d, seed + 1000);
                let v = rand_vec(nk * d, seed + 2000);
                let qseg: Vec<u32> = (0..nq as u32).map(|i| (i + q_pos0 as u32) / 9).collect();
                let kseg: Vec<u32> = (0..nk as u32).map(|j| j / 9).collect();
                for causal in [true, false] {
                    for seg in [None, Some((&qseg[..], &kseg[..]))] {
                        let (b, lb) = run(None, &q, &k, &v, d, q_pos0, kb, causal, seg);
                        // Keys 0..nk sit at positions 0..nk, so the plain softmax applies.
                        let r = reference_attention(&q, &k, &v, d, q_pos0, causal, seg);
                        for &isa in &isas {
                            let (a, la) = run(Some(isa), &q, &k, &v, d, q_pos0, kb, causal, seg);
                            let what = format!(
                                "{isa:?} d={d} nq={nq} nk={nk} pos={q_pos0} kb={kb} causal={causal} seg={}",
                                seg.is_some()
                            );
                            assert!(max_diff(&a, &b) < 1e-5, "{what}: out {}", max_diff(&a, &b));
                            assert!(
                                max_diff(&la, &lb) < 1e-5,
                                "{what}: lse {}",
                                max_diff(&la, &lb)
                            );
                            assert!(
                                max_diff(&a, &r) < 1e-5,
                                "{what}: vs reference {}",
                                max_diff(&a, &r)
                            );
                        }
                    }
                }
            }
        }
    }

    /// The heads of one GQA group attended together (one transpose per key sub-block) give
    /// each head exactly the numbers of attending it alone, f32 and f16 blocks, prefill
    /// and decode row counts, causal offsets that leave early rows with nothing visible.
    #[test]
    fn group_of_heads_equals_each_head_alone() {
        use crate::kv::KvType;
        let (d, heads) = (64, 3);
        for isa in isas(d) {
            for (nq, nk, q_pos0) in [(1, 300, 299), (2, 70, 69), (20, 131, 100), (64, 256, 40)] {
                let width = heads * d;
                let q = rand_vec(nq * width, nq as u64);
                let k = rand_vec(nk * d, 7);
                let v = rand_vec(nk * d, 8);
                let mut kb = vec![0u8; nk * KvType::F16.row_bytes(d)];
                let mut vb = kb.clone();
                for (rows, bytes) in [(&k, &mut kb), (&v, &mut vb)] {
                    for (row, out) in rows
                        .chunks_exact(d)
                        .zip(bytes.chunks_exact_mut(KvType::F16.row_bytes(d)))
                    {
                        KvType::F16.encode_row(row, out);
                    }
                }
                let mask = BlockMask::causal(q_pos0, 0);
                let queries: Vec<&[f32]> = (0..heads).map(|h| &q[h * d..]).collect();
                let fresh = || (0..heads).map(|_| Partial::new(nq, d)).collect::<Vec<_>>();
                let (mut g32, mut g16) = (fresh(), fresh());
                let b32 = KvBlock::F32 { k: &k, v: &v };
                let b16 = KvBlock::F16 { k: &kb, v: &vb };
                attend_group_with(isa, &queries, width, b32, 0.125, &mask, &mut g32);
                attend_group_with(isa, &queries, width, b16, 0.125, &mask, &mut g16);
                for h in 0..heads {
                    let (mut a32, mut a16) = (Partial::new(nq, d), Partial::new(nq, d));
                    attend_one(isa, queries[h], width, b32, 0.125, &mask, &mut a32);
                    attend_one(isa, queries[h], width, b16, 0.125, &mask, &mut a16);
                    let what = format!("{isa:?} nq={nq} nk={nk} head {h}");
                    assert_eq!(
                        (&g32[h].acc, &g32[h].m, &g32[h].l),
                        (&a32.acc, &a32.m, &a32.l),
                        "{what} f32"
                    );
                    assert_eq!(
                        (&g16[h].acc, &g16[h].m, &g16[h].l),
                        (&a16.acc, &a16.m, &a16.l),
                        "{what} f16"
                    );
                }
            }
        }
    }

    #[test]
    fn simd_kernels_keep_strided_queries_and_prior_state() {
        // Queries with a row stride wider than d (heads interleaved), and a partial that
        // already holds a previous block whose scores are larger (the correction path).
        let (d, nq, nk, stride) = (64, 9, 70, 3 * 64);
        let q = rand_vec(nq * stride, 1);
        let k = rand_vec(nk * d, 2);
        let v = rand_vec(nk * d, 3);
        let attend = |isa: Option<AttnIsa>| {
            let mut st = Partial::new(nq, d);
            for (lo, hi) in [(40, 70), (0, 40)] {
                let mask = BlockMask::full();
                let (kk, vv) = (&k[lo * d..hi * d], &v[lo * d..hi * d]);
                match isa {
                    Some(isa) => {
                        let block = KvBlock::F32 { k: kk, v: vv };
                        attend_one(isa, &q[d..], stride, block, 0.3, &mask, &mut st)
                    }
                    None => attend_block_portable(&q[d..], stride, kk, vv, 0.3, &mask, &mut st),
                }
            }
            st
        };
        let want = attend(None);
        for isa in isas(d) {
            let got = attend(Some(isa));
            assert!(max_diff(&got.acc, &want.acc) < 1e-4, "{isa:?}");
            assert!(max_diff(&got.m, &want.m) < 1e-5, "{isa:?}");
            assert!(max_diff(&got.l, &want.l) < 1e-4, "{isa:?}");
        }
    }
}

#[cfg(test)]
mod f16_blocks {
    use super::equivalence::attend_one;
    use super::{supports, AttnIsa, KvBlock};
    use crate::attention::partial::{BlockMask, Partial};
    use crate::kv::KvType;

    /// Reading an f16 block in registers gives exactly the numbers of decoding it to f32
    /// first, for decode-sized (direct scores) and prefill-sized (transposed) row counts,
    /// on each instruction set.
    #[test]
    fn f16_kernel_equals_kernel_on_decoded_rows() {
        for isa in [AttnIsa::Avx2, AttnIsa::Avx512] {
            for (nq, nk, d) in [(1, 77, 64), (3, 256, 64), (20, 131, 64), (7, 40, 128)] {
                if !supports(isa, d) {
                    eprintln!("{isa:?} unavailable: f16 blocks not tested on it");
                    continue;
                }
                let x = crate::rng::XorShift::new(nq as u64).vec((nq + 2 * nk) * d, -2.0, 2.0);
                let (q, kv) = x.split_at(nq * d);
                let mut bytes = vec![0u8; 2 * nk * KvType::F16.row_bytes(d)];
                for (row, out) in kv
                    .chunks_exact(d)
                    .zip(bytes.chunks_exact_mut(KvType::F16.row_bytes(d)))
                {
                    KvType::F16.encode_row(row, out);
                }
                let (kb, vb) = bytes.split_at(nk * KvType::F16.row_bytes(d));
                let mut k = vec![0.0; nk * d];
                let mut v = vec![0.0; nk * d];
                KvType::F16.decode_rows(kb, d, &mut k);
                KvType::F16.decode_rows(vb, d, &mut v);
                let mask = BlockMask::causal(nk - nq, 0);
                let mut a = Partial::new(nq, d);
                let mut b = Partial::new(nq, d);
                attend_one(
                    isa,
                    q,
                    d,
                    KvBlock::F16 { k: kb, v: vb },
                    0.125,
                    &mask,
                    &mut a,
                );
                attend_one(
                    isa,
                    q,
                    d,
                    KvBlock::F32 { k: &k, v: &v },
                    0.125,
                    &mask,
                    &mut b,
                );
                assert_eq!(
                    (&a.acc, &a.m, &a.l),
                    (&b.acc, &b.m, &b.l),
                    "{isa:?} nq={nq} nk={nk} d={d}"
                );
            }
        }
    }
}
