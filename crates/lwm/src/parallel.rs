//! One thread pool for the hot loops: candle's persistent spinning pool, which its own
//! GEMM uses too. A decode step runs a few hundred short parallel regions; workers that
//! spin between them cost far less than waking sleeping threads for each, and using one
//! pool for matmuls and attention keeps two pools from fighting over the cores.

/// Run `f(i)` for every i in 0..n_items across the pool (the caller's thread helps).
pub fn for_each(n_items: usize, f: impl Fn(usize) + Sync) {
    if n_items <= 1 {
        // One item: waking the pool would only add a barrier.
        (0..n_items).for_each(f);
        return;
    }
    candle_core::utils::barrier_pool().execute_chunked(n_items, |range| {
        for i in range {
            f(i)
        }
    });
}

/// Fill `out` in parallel, chunk `i` (length `chunk`, the last may be shorter) by `f(i, chunk_slice)`.
pub fn for_each_chunk_mut<T: Send>(
    out: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let len = out.len();
    let chunk = chunk.max(1);
    let n = len.div_ceil(chunk);
    let ptr = out.as_mut_ptr() as usize;
    for_each(n, |i| {
        let start = i * chunk;
        let end = (start + chunk).min(len);
        // SAFETY: chunks are disjoint ranges of `out`, which outlives the call
        // (`execute_chunked` returns only after every item ran).
        let s = unsafe { std::slice::from_raw_parts_mut((ptr as *mut T).add(start), end - start) };
        f(i, s);
    });
}

/// Map 0..n in parallel, results in order.
pub fn map<R: Send + Default + Clone>(n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let mut out = vec![R::default(); n];
    for_each_chunk_mut(&mut out, 1, |i, o| o[0] = f(i));
    out
}
