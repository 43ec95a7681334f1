//! The one attention primitive and the blockwise driver built on it.
//!
//! For one head, a block of queries Q (nq × D) attends a block of keys/values K, V (nk × D):
//!
//! ```text
//!   s[i,j] = scale · q_i · k_j            (masked pairs: -inf)
//!   m'_i   = max(m_i, max_j s[i,j])
//!   p[i,j] = exp(s[i,j] - m'_i)
//!   acc_i  = acc_i · exp(m_i - m'_i) + Σ_j p[i,j] v_j
//!   l_i    = l_i   · exp(m_i - m'_i) + Σ_j p[i,j]
//! ```
//!
//! `(acc, m, l)` is a *partial*: the unnormalised output with its running max and sum.
//! Partials over disjoint key sets merge exactly (`merge`), and the final output is
//! `acc / l` with log-sum-exp `lse = m + ln l`. Blockwise attention on one worker,
//! single-row decode against a long cache, and the ring across workers are all loops of
//! `attend_block` + `merge`; memory stays linear in sequence length because no score
//! matrix larger than one tile ever exists.

pub mod partial;

use crate::kv::{KeyBlock, PositionRun, QuantKvView};
pub use partial::{attend_block_portable, reference_attention, BlockMask, Partial};

/// The primitive: attend query rows `q` (nq × d, row stride `q_stride`) to one key/value
/// block `k`, `v` (nk × d, contiguous), updating `state`. Runs the tiled SIMD kernel
/// (`attention_kernel`) where the CPU has it, else `attend_block_portable`.
pub fn attend_block(
    q: &[f32],
    q_stride: usize,
    k: &[f32],
    v: &[f32],
    scale: f32,
    mask: &BlockMask,
    state: &mut Partial,
) {
    if crate::attention_kernel::available(state.d) {
        crate::attention_kernel::attend_block_simd(q, q_stride, k, v, scale, mask, state);
    } else {
        attend_block_portable(q, q_stride, k, v, scale, mask, state);
    }
}

/// `attend_block` for the query heads of one GQA group against one shared key/value block
/// (`queries[h]` updating `states[h]`, all with the same rows and mask): the SIMD kernel
/// prepares each key sub-block once for all heads. Same numbers per head as `attend_block`.
pub fn attend_group(
    queries: &[&[f32]],
    q_stride: usize,
    k: &[f32],
    v: &[f32],
    scale: f32,
    mask: &BlockMask,
    states: &mut [Partial],
) {
    let d = states.first().map_or(0, |st| st.d);
    if crate::attention_kernel::available(d) {
        let block = crate::attention_kernel::KvBlock::F32 { k, v };
        crate::attention_kernel::attend_group_simd(queries, q_stride, block, scale, mask, states);
    } else {
        for (q, st) in queries.iter().zip(states.iter_mut()) {
            attend_block_portable(q, q_stride, k, v, scale, mask, st);
        }
    }
}

/// Chunk sizes of the blockwise driver (`scan_query_chunk_size`, `scan_key_chunk_size`).
#[derive(Debug, Clone, Copy)]
pub struct Chunking {
    pub query_chunk: usize,
    pub key_chunk: usize,
}

impl Default for Chunking {
    fn default() -> Self {
        Self {
            query_chunk: 64,
            key_chunk: 256,
        }
    }
}

/// A query tile: `rows` consecutive rows of a step, from local row `row0`, at positions
/// `pos0..pos0 + rows`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryTile {
    pub row0: usize,
    pub pos0: usize,
    pub rows: usize,
}

/// The query tiles of rows laid out as `runs`, cut at every multiple of `query_chunk` and
/// of `key_chunk` positions: a tile is a function of positions only, so it is the same on
/// one worker and on whichever ring worker owns its key block.
pub fn query_tiles(runs: &[PositionRun], chunking: Chunking) -> Vec<QueryTile> {
    let (qc, kc) = (chunking.query_chunk.max(1), chunking.key_chunk.max(1));
    let mut out = Vec::new();
    for r in runs.iter().filter(|r| r.len > 0) {
        let mut p = r.pos0;
        while p < r.pos0 + r.len {
            let end = ((p / qc + 1) * qc)
                .min((p / kc + 1) * kc)
                .min(r.pos0 + r.len);
            out.push(QueryTile {
                row0: r.row0 + p - r.pos0,
                pos0: p,
                rows: end - p,
            });
            p = end;
        }
    }
    out
}

/// Reset `states` to `group` empty partials of `rows` rows.
fn fresh(states: &mut Vec<Partial>, group: usize, rows: usize, d: usize) {
    states.resize_with(group, || Partial::new(rows, d));
    for st in states.iter_mut() {
        if st.rows() == rows {
            st.acc.fill(0.0);
            st.m.fill(f32::NEG_INFINITY);
            st.l.fill(0.0);
        } else {
            *st = Partial::new(rows, d);
        }
    }
}

/// The unit every prefill path computes: the partials of one query tile of the `group`
/// query heads of KV head `g` (`queries[j]`: the tile's first row of head `g·group + j`,
/// row stride `width`) against one key block (rows `block.rows` of `kv`, causally masked),
/// written into `out` from empty. Callers merge the blocks of a tile in ascending order.
#[allow(clippy::too_many_arguments)]
pub fn tile_block_partials(
    queries: &[&[f32]],
    width: usize,
    tile: QueryTile,
    kv: &QuantKvView,
    g: usize,
    block: &KeyBlock,
    scale: f32,
    bufs: &mut (Vec<f32>, Vec<f32>),
    out: &mut Vec<Partial>,
) {
    fresh(out, queries.len(), tile.rows, kv.d);
    let (lo, hi) = (block.rows.start, block.rows.end);
    let mask = BlockMask::causal(tile.pos0, block.pos0);
    if mask.tile_is_masked(tile.rows, hi - lo) {
        return;
    }
    if kv.reads_f16_directly() {
        let (kb, vb) = kv.stored_block(g, lo, hi);
        let block = crate::attention_kernel::KvBlock::F16 { k: kb, v: vb };
        crate::attention_kernel::attend_group_simd(queries, width, block, scale, &mask, out);
    } else if let Some((k, v)) = kv.f32_block(g, lo, hi) {
        attend_group(queries, width, k, v, scale, &mask, out);
    } else {
        let (kbuf, vbuf) = bufs;
        kv.decode_block(g, lo, hi, kbuf, vbuf);
        attend_group(queries, width, kbuf, vbuf, scale, &mask, out);
    }
}

/// The unit every decode path computes: the partial of the one new query row at `q_pos`,
/// for the `group` query heads of KV head `g` taken as `group` rows of one tile (`q_group`,
/// row stride d), against one key block of `kv`.
pub fn decode_block_partial(
    q_group: &[f32],
    group: usize,
    q_pos: usize,
    kv: &QuantKvView,
    g: usize,
    block: &KeyBlock,
    scale: f32,
) -> Partial {
    thread_local! {
        // Decoded key/value block, reused across tasks and tokens.
        static KV_BLOCK: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
            const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    }
    let d = kv.d;
    let mut st = Partial::new(group, d);
    let (lo, hi) = (block.rows.start, block.rows.end);
    if hi <= lo {
        return st;
    }
    let mask = BlockMask::causal(q_pos, block.pos0);
    if kv.reads_f16_directly() {
        let (kb, vb) = kv.stored_block(g, lo, hi);
        crate::attention_kernel::attend_block_f16(q_group, d, kb, vb, scale, &mask, &mut st);
    } else if let Some((k, v)) = kv.f32_block(g, lo, hi) {
        attend_block(q_group, d, k, v, scale, &mask, &mut st);
    } else {
        KV_BLOCK.with_borrow_mut(|(kbuf, vbuf)| {
            kv.decode_block(g, lo, hi, kbuf, vbuf);
            attend_block(q_group, d, kbuf, vbuf, scale, &mask, &mut st);
        });
    }
    st
}

/// Write finished partials of one tile (`states[j]` for head `g·group + j`) into `out`
/// (rows × width).
pub fn write_tile(
    states: &[Partial],
    g: usize,
    tile: QueryTile,
    width: usize,
    out: &mut [f32],
    buf: &mut Vec<f32>,
) {
    let group = states.len();
    for (j, st) in states.iter().enumerate() {
        let d = st.d;
        let h = g * group + j;
        buf.resize(st.rows() * d, 0.0);
        st.finish_into(buf);
        for (i, row) in buf.chunks_exact(d).enumerate() {
            let dst = (tile.row0 + i) * width + h * d;
            out[dst..dst + d].copy_from_slice(row);
        }
    }
}

/// Causal blockwise attention for `nq` new query rows at positions `q_pos0..q_pos0+nq`
/// against the `kv.len` cached rows (positions 0..kv.len) of a typed cache.
///
/// `q` is (nq × n_heads·d) as the projection produced it; the output has the same layout.
/// Query heads map onto KV heads in groups (GQA). Per (KV head, query tile) the group's
/// heads attend every key block (`tile_block_partials`: each block read at its stored
/// width, decoded once for the group) and the blocks' partials are merged in ascending
/// order. Decode (one query row) computes one partial per (KV head, key block) in parallel
/// and merges them in the same order. That order is what the ring reproduces.
pub fn causal_attention_quant(
    q: &[f32],
    nq: usize,
    q_pos0: usize,
    n_heads: usize,
    d: usize,
    kv: &QuantKvView,
    chunking: Chunking,
) -> Vec<f32> {
    let n_kv = kv.k.len();
    let group = n_heads / n_kv;
    let scale = 1.0 / (d as f32).sqrt();
    let width = n_heads * d;
    let mut out = vec![0.0f32; nq * width];
    let k_end = kv.len.min(q_pos0 + nq);

    if nq == 1 {
        let blocks = crate::kv::key_blocks(
            &[PositionRun {
                row0: 0,
                pos0: 0,
                len: k_end,
            }],
            chunking.key_chunk,
        );
        let nb = blocks.len().max(1);
        let parts: Vec<Option<Partial>> = crate::parallel::map(n_kv * nb, |i| {
            let (g, b) = (i / nb, i % nb);
            let qg = &q[g * group * d..(g + 1) * group * d];
            blocks
                .get(b)
                .map(|blk| decode_block_partial(qg, group, q_pos0, kv, g, blk, scale))
        });
        for (g, head_parts) in parts.chunks(nb).enumerate() {
            let mut merged = Partial::new(group, d);
            for p in head_parts.iter().flatten() {
                merged.merge(p);
            }
            merged.finish_into(&mut out[g * group * d..(g + 1) * group * d]);
        }
        return out;
    }

    let step = [PositionRun {
        row0: 0,
        pos0: q_pos0,
        len: nq,
    }];
    // Later query tiles see more keys: hand them out first so the pool's dynamic schedule
    // ends with short tiles.
    let tiles: Vec<(usize, QueryTile)> = query_tiles(&step, chunking)
        .into_iter()
        .rev()
        .flat_map(|t| (0..n_kv).map(move |g| (g, t)))
        .collect();
    let results: Vec<Vec<Partial>> = crate::parallel::map(tiles.len(), |i| {
        let (g, tile) = tiles[i];
        let queries: Vec<&[f32]> = (0..group)
            .map(|j| &q[tile.row0 * width + (g * group + j) * d..])
            .collect();
        let keys = [PositionRun {
            row0: 0,
            pos0: 0,
            len: k_end.min(tile.pos0 + tile.rows),
        }];
        let mut states: Vec<Partial> = (0..group).map(|_| Partial::new(tile.rows, d)).collect();
        let (mut bufs, mut block_states) = ((Vec::new(), Vec::new()), Vec::new());
        for blk in crate::kv::key_blocks(&keys, chunking.key_chunk) {
            tile_block_partials(
                &queries,
                width,
                tile,
                kv,
                g,
                &blk,
                scale,
                &mut bufs,
                &mut block_states,
            );
            for (st, b) in states.iter_mut().zip(&block_states) {
                st.merge(b);
            }
        }
        states
    });
    let mut buf = Vec::new();
    for (&(g, tile), states) in tiles.iter().zip(&results) {
        write_tile(states, g, tile, width, &mut out, &mut buf);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use super::partial::test_util::{max_diff, rand_vec};

    #[test]
    fn blockwise_matches_plain_softmax_for_any_tiling() {
        let (d, n) = (16, 37);
        let q = rand_vec(n * d, 1);
        let k = rand_vec(n * d, 2);
        let v = rand_vec(n * d, 3);
        let reference = reference_attention(&q, &k, &v, d, 0, true, None);
        for (qc, kc) in [(1, 1), (4, 8), (8, 4), (5, 7), (64, 64), (37, 1)] {
            let mut out = Vec::new();
            for r0 in (0..n).step_by(qc) {
                let rows = qc.min(n - r0);
                let mut st = Partial::new(rows, d);
                for k0 in (0..n).step_by(kc) {
                    let k1 = (k0 + kc).min(n);
                    let mask = BlockMask::causal(r0, k0);
                    attend_block(
                        &q[r0 * d..],
                        d,
                        &k[k0 * d..k1 * d],
                        &v[k0 * d..k1 * d],
                        1.0 / 4.0,
                        &mask,
                        &mut st,
                    );
                }
                let mut o = vec![0.0; rows * d];
                st.finish_into(&mut o);
                out.extend(o);
            }
            assert!(
                max_diff(&out, &reference) < 1e-5,
                "tiling ({qc},{kc}): {}",
                max_diff(&out, &reference)
            );
        }
    }

    #[test]
    fn partials_over_disjoint_keys_merge_exactly() {
        let (d, nq, nk) = (8, 5, 40);
        let q = rand_vec(nq * d, 4);
        let k = rand_vec(nk * d, 5);
        let v = rand_vec(nk * d, 6);
        let reference = reference_attention(&q, &k, &v, d, 0, false, None);
        // Two "workers" each hold half the keys, in the order a ring would deliver them.
        let mut a = Partial::new(nq, d);
        let mut b = Partial::new(nq, d);
        let half = nk / 2 * d;
        attend_block(
            &q,
            d,
            &k[..half],
            &v[..half],
            1.0 / (d as f32).sqrt(),
            &BlockMask::full(),
            &mut a,
        );
        attend_block(
            &q,
            d,
            &k[half..],
            &v[half..],
            1.0 / (d as f32).sqrt(),
            &BlockMask::full(),
            &mut b,
        );
        b.merge(&a);
        let mut out = vec![0.0; nq * d];
        b.finish_into(&mut out);
        assert!(max_diff(&out, &reference) < 1e-5);
        // lse equals log Σ exp(scores) computed directly.
        let scale = 1.0 / (d as f32).sqrt();
        let direct: f64 = (0..nk)
            .map(|j| ((0..d).map(|t| q[t] * k[j * d + t]).sum::<f32>() * scale) as f64)
            .map(f64::exp)
            .sum::<f64>()
            .ln();
        assert!((b.lse()[0] as f64 - direct).abs() < 1e-4);
    }

    #[test]
    fn segment_ids_block_attention_across_documents() {
        let (d, n) = (8, 12);
        let q = rand_vec(n * d, 7);
        let k = rand_vec(n * d, 8);
        let v = rand_vec(n * d, 9);
        let seg: Vec<u32> = (0..n as u32).map(|i| i / 5).collect();
        let reference = reference_attention(&q, &k, &v, d, 0, true, Some((&seg, &seg)));
        let mut st = Partial::new(n, d);
        for k0 in (0..n).step_by(3) {
            let mask = BlockMask {
                q_pos0: 0,
                k_pos0: k0,
                causal: true,
                q_segments: Some(&seg),
                k_segments: Some(&seg[k0..]),
            };
            attend_block(
                &q,
                d,
                &k[k0 * d..(k0 + 3) * d],
                &v[k0 * d..(k0 + 3) * d],
                1.0 / (d as f32).sqrt(),
                &mask,
                &mut st,
            );
        }
        let mut out = vec![0.0; n * d];
        st.finish_into(&mut out);
        assert!(max_diff(&out, &reference) < 1e-5);
    }

    #[test]
    fn causal_driver_with_gqa_matches_reference_prefill_and_decode() {
        let (heads, kv_heads, d, n) = (4, 2, 16, 29);
        let q = rand_vec(n * heads * d, 10);
        let kb: Vec<Vec<f32>> = (0..kv_heads)
            .map(|h| rand_vec(n * d, 20 + h as u64))
            .collect();
        let vb: Vec<Vec<f32>> = (0..kv_heads)
            .map(|h| rand_vec(n * d, 30 + h as u64))
            .collect();
        // An f32 cache holding those rows (rows × kv_heads·d, as the projections give them).
        let mut cache = crate::kv::KvCache::new(1, kv_heads, d);
        let rows: Vec<f32> = (0..n)
            .flat_map(|i| (0..kv_heads).map(move |h| (i, h)))
            .flat_map(|(i, h)| kb[h][i * d..(i + 1) * d].to_vec())
            .collect();
        let vrows: Vec<f32> = (0..n)
            .flat_map(|i| (0..kv_heads).map(move |h| (i, h)))
            .flat_map(|(i, h)| vb[h][i * d..(i + 1) * d].to_vec())
            .collect();
        cache.append(0, &rows, &vrows, n);
        let kv = cache.quant_view(0);
        for chunking in [
            Chunking {
                query_chunk: 4,
                key_chunk: 8,
            },
            Chunking {
                query_chunk: 64,
                key_chunk: 3,
            },
        ] {
            let out = causal_attention_quant(&q, n, 0, heads, d, &kv, chunking);
            // Decode of the last row alone, at position n-1.
            let last = causal_attention_quant(
                &q[(n - 1) * heads * d..],
                1,
                n - 1,
                heads,
                d,
                &kv,
                chunking,
            );
            for h in 0..heads {
                let qh: Vec<f32> = (0..n)
                    .flat_map(|i| q[i * heads * d + h * d..][..d].to_vec())
                    .collect();
                let r = reference_attention(&qh, &kb[h / 2], &vb[h / 2], d, 0, true, None);
                let got: Vec<f32> = (0..n)
                    .flat_map(|i| out[i * heads * d + h * d..][..d].to_vec())
                    .collect();
                assert!(max_diff(&got, &r) < 1e-5, "head {h} {chunking:?}");
                assert!(max_diff(&last[h * d..(h + 1) * d], &r[(n - 1) * d..]) < 1e-5);
            }
        }
    }
}
