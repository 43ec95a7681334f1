//! Rows interleaved in groups of 8, block by block: the byte shuffling behind the decode
//! layouts (`q4_1_x8`, `q8_0_x8`).
//!
//! A block is a sequence of fields (Q4_1: `d`, `m`, 16 nibble bytes; Q8_0: `d`, 32 quants).
//! The cell of (group g, block b) holds block b of rows 8g..8g+7 field by field: field f
//! of all 8 rows side by side, then field f+1, so each field of the 8 rows is one
//! contiguous load. A cell has exactly the bytes of its 8 blocks, so a group of rows keeps
//! its size and byte offset.

/// Rows per interleaved group.
pub const GROUP: usize = 8;

/// Offset of row `j`'s field `f` in a cell, and that field's size.
fn field_at(fields: &[usize], f: usize, j: usize) -> (usize, usize) {
    let before: usize = fields[..f].iter().sum();
    (GROUP * before + j * fields[f], fields[f])
}

/// Row-major blocks of `fields` (`rows` a multiple of 8, `nb` blocks per row) -> the
/// interleaved layout.
pub fn interleave(rows_data: &[u8], rows: usize, nb: usize, fields: &[usize]) -> Vec<u8> {
    let block: usize = fields.iter().sum();
    debug_assert_eq!(rows % GROUP, 0);
    debug_assert_eq!(rows_data.len(), rows * nb * block);
    let mut out = vec![0u8; rows_data.len()];
    for (r, row) in rows_data.chunks_exact(nb * block).enumerate().take(rows) {
        scatter_row(&mut out, nb, r, fields, row);
    }
    out
}

/// `interleave` over the matrix's own bytes: a group of 8 rows occupies the same byte
/// range in both layouts, so each group is shuffled through a one-group scratch buffer
/// and loading a matrix never holds a second copy of it.
pub fn interleave_in_place(data: &mut [u8], rows: usize, nb: usize, fields: &[usize]) {
    let block: usize = fields.iter().sum();
    debug_assert_eq!(rows % GROUP, 0);
    debug_assert_eq!(data.len(), rows * nb * block);
    let (row_bytes, group_bytes) = (nb * block, GROUP * nb * block);
    let mut scratch = vec![0u8; group_bytes];
    for g in 0..rows / GROUP {
        scratch.copy_from_slice(&data[g * group_bytes..(g + 1) * group_bytes]);
        for (j, row) in scratch.chunks_exact(row_bytes).enumerate() {
            scatter_row(data, nb, g * GROUP + j, fields, row);
        }
    }
}

/// Row `r` of an interleaved matrix back in the row layout (`out`: nb blocks).
pub fn gather_row(data: &[u8], nb: usize, r: usize, fields: &[usize], out: &mut [u8]) {
    let block: usize = fields.iter().sum();
    let (g, j) = (r / GROUP, r % GROUP);
    for (b, dst) in out.chunks_exact_mut(block).enumerate().take(nb) {
        let cell = &data[(g * nb + b) * GROUP * block..][..GROUP * block];
        let mut at = 0;
        for f in 0..fields.len() {
            let (off, len) = field_at(fields, f, j);
            dst[at..at + len].copy_from_slice(&cell[off..off + len]);
            at += len;
        }
    }
}

/// The inverse of `gather_row`: row `r` (nb blocks in `row`) into its cells.
fn scatter_row(data: &mut [u8], nb: usize, r: usize, fields: &[usize], row: &[u8]) {
    let block: usize = fields.iter().sum();
    let (g, j) = (r / GROUP, r % GROUP);
    for (b, src) in row.chunks_exact(block).enumerate().take(nb) {
        let cell = &mut data[(g * nb + b) * GROUP * block..][..GROUP * block];
        let mut at = 0;
        for f in 0..fields.len() {
            let (off, len) = field_at(fields, f, j);
            cell[off..off + len].copy_from_slice(&src[at..at + len]);
            at += len;
        }
    }
}

/// The portable product: `n_groups` groups (starting at `w`) against every activation row
/// in `ys`, `out[row * n + a] = dot(gathered row, ys[a])`.
pub fn groups_x_acts_scalar<B>(
    w: &[u8],
    n_groups: usize,
    ys: &[&[B]],
    fields: &[usize],
    dot: impl Fn(&[u8], &[B]) -> f32,
    out: &mut [f32],
) {
    let nb = ys.first().map_or(0, |y| y.len());
    let n = ys.len();
    let mut row = vec![0u8; nb * fields.iter().sum::<usize>()];
    for r in 0..n_groups * GROUP {
        gather_row(w, nb, r, fields, &mut row);
        for (a, y) in ys.iter().enumerate() {
            out[r * n + a] = dot(&row, y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleave_then_gather_gives_back_every_row() {
        for fields in [&[2usize, 2, 16][..], &[2, 32][..]] {
            let block: usize = fields.iter().sum();
            let (rows, nb) = (16, 3);
            let data: Vec<u8> = (0..rows * nb * block)
                .map(|i| (i * 7 % 251) as u8)
                .collect();
            let x8 = interleave(&data, rows, nb, fields);
            assert_eq!(x8.len(), data.len());
            let mut in_place = data.clone();
            interleave_in_place(&mut in_place, rows, nb, fields);
            assert_eq!(in_place, x8, "{fields:?}: in place = copied");
            assert_ne!(x8, data, "{fields:?}: the layout moved bytes");
            let mut row = vec![0u8; nb * block];
            for r in 0..rows {
                gather_row(&x8, nb, r, fields, &mut row);
                assert_eq!(
                    row,
                    &data[r * nb * block..(r + 1) * nb * block],
                    "{fields:?}"
                );
            }
        }
    }

    #[test]
    fn a_cell_holds_each_field_of_the_8_rows_side_by_side() {
        // Q8_0-like blocks: d (2 bytes), then 32 quants; byte value = row number.
        let (rows, nb) = (8, 1);
        let data: Vec<u8> = (0..rows).flat_map(|r| vec![r as u8; 34]).collect();
        let x8 = interleave(&data, rows, nb, &[2, 32]);
        let scales: Vec<u8> = (0..8u8).flat_map(|r| [r, r]).collect();
        assert_eq!(&x8[..16], &scales[..]);
        for r in 0..8 {
            assert!(x8[16 + 32 * r..16 + 32 * (r + 1)]
                .iter()
                .all(|&b| b == r as u8));
        }
    }
}
