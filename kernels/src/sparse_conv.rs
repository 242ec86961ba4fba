//! Submanifold sparse 3-D convolution (the computation of spconv's `SubMConv3d`, which TRELLIS'
//! `trellis/modules/sparse/conv/conv_spconv.py` wraps): output sites = input sites, same order.
//!
//! Two steps, both on plain slices so a GPU implementation can provide the same interface:
//! 1. [`submanifold_neighbours`]: for every output row and kernel offset, the input row at
//!    `coord + offset` (or none), found by hashing the packed coordinates: O(N·K), never a dense grid.
//! 2. [`submanifold_conv`]: gather-GEMM-scatter. Output rows are processed in blocks (in parallel);
//!    for each kernel offset the block's neighbour rows are gathered into a small matrix, multiplied
//!    by that offset's `[Cin, Cout]` weight slice and added to the block's accumulator.
//!
//! Convention (checked against the original): plain cross-correlation,
//! `out[c] = bias + Σ_offset W[offset] · in[c + offset]`, weight layout `[Cout, kx, ky, kz, Cin]`,
//! kernel axes in coordinate order (x, y, z), offset = kernel index − kernel_size/2, no flip.

use std::collections::HashMap;

use gemm::Parallelism;
use rayon::prelude::*;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SparseConvError {
    #[error("sparse conv: coords must be [N, 4] int32 (b, x, y, z); got {0} values")]
    BadCoords(usize),
    #[error(
        "sparse conv: kernel size {0:?} must be odd and positive on every axis (submanifold conv)"
    )]
    BadKernel([usize; 3]),
    #[error("sparse conv: coordinate {0:?} appears twice (rows {1} and {2})")]
    Duplicate([i32; 4], usize, usize),
    #[error("sparse conv: {what} has {got} values, expected {want}")]
    Size {
        what: &'static str,
        got: usize,
        want: usize,
    },
}

/// For every output row `i` and kernel offset `k`, `table[i * volume + k]` is the input row holding
/// `coord_i + offset_k`, or −1. Offsets are enumerated x-major, z fastest.
#[derive(Debug, Clone)]
pub struct NeighbourMap {
    pub rows: usize,
    pub kernel: [usize; 3],
    pub volume: usize,
    pub table: Vec<i32>,
}

impl NeighbourMap {
    /// The (dx, dy, dz) displacement of kernel offset `k`.
    pub fn offset(&self, k: usize) -> [i32; 3] {
        let [_, ky, kz] = self.kernel;
        let ix = k / (ky * kz);
        let iy = (k / kz) % ky;
        let iz = k % kz;
        [
            ix as i32 - (self.kernel[0] / 2) as i32,
            iy as i32 - (ky / 2) as i32,
            iz as i32 - (kz / 2) as i32,
        ]
    }
}

/// The rows of a neighbour table (`table[i * volume + k]`, −1 = none) ordered by their neighbour
/// masks (bit k set when offset k has a neighbour; `volume` <= 64), stably: rows with the same
/// mask keep their order. Tiles of consecutive rows in this order share more empty offsets, so a
/// gather-GEMM that skips the (offset, tile) steps no row of the tile needs does fewer of them.
pub fn mask_order(table: &[i32], volume: usize) -> Vec<i32> {
    if volume == 0 || volume > 64 {
        return (0..(table.len() / volume.max(1)) as i32).collect();
    }
    let masks: Vec<u64> = table
        .chunks_exact(volume)
        .map(|row| {
            row.iter()
                .enumerate()
                .fold(0u64, |m, (k, &s)| if s >= 0 { m | 1 << k } else { m })
        })
        .collect();
    let mut order: Vec<i32> = (0..masks.len() as i32).collect();
    order.sort_by_key(|&r| masks[r as usize]);
    order
}

/// Builds the submanifold neighbour map of `coords` (`[N, 4]` row-major (b, x, y, z)).
pub fn submanifold_neighbours(
    coords: &[i32],
    kernel: [usize; 3],
) -> Result<NeighbourMap, SparseConvError> {
    if !coords.len().is_multiple_of(4) {
        return Err(SparseConvError::BadCoords(coords.len()));
    }
    if kernel.iter().any(|&k| k.is_multiple_of(2)) {
        return Err(SparseConvError::BadKernel(kernel));
    }
    let n = coords.len() / 4;
    let mut index: HashMap<[i32; 4], u32> = HashMap::with_capacity(n);
    for (i, c) in coords.chunks_exact(4).enumerate() {
        let key = [c[0], c[1], c[2], c[3]];
        if let Some(&prev) = index.get(&key) {
            return Err(SparseConvError::Duplicate(key, prev as usize, i));
        }
        index.insert(key, i as u32);
    }
    let volume = kernel.iter().product::<usize>();
    let mut map = NeighbourMap {
        rows: n,
        kernel,
        volume,
        table: vec![-1; n * volume],
    };
    let offsets: Vec<[i32; 3]> = (0..volume).map(|k| map.offset(k)).collect();
    map.table
        .par_chunks_mut(volume)
        .zip(coords.par_chunks_exact(4))
        .for_each(|(row, c)| {
            for (slot, d) in row.iter_mut().zip(&offsets) {
                let key = [c[0], c[1] + d[0], c[2] + d[1], c[3] + d[2]];
                if let Some(&j) = index.get(&key) {
                    *slot = j as i32;
                }
            }
        });
    Ok(map)
}

/// Output rows per parallel task.
const ROW_BLOCK: usize = 128;

/// `out[N, Cout] = submanifold conv of feats[N, Cin]` with `weight [Cout, K, Cin]` (K = kernel
/// volume, offsets ordered like the map) and optional `bias [Cout]`.
pub fn submanifold_conv(
    feats: &[f32],
    cin: usize,
    map: &NeighbourMap,
    weight: &[f32],
    bias: Option<&[f32]>,
    cout: usize,
) -> Result<Vec<f32>, SparseConvError> {
    let n = map.rows;
    let kv = map.volume;
    check_len("feats", feats.len(), n * cin)?;
    check_len("weight", weight.len(), cout * kv * cin)?;
    if let Some(b) = bias {
        check_len("bias", b.len(), cout)?;
    }
    // Per offset a [Cin, Cout] row-major matrix.
    let mut packed = vec![0f32; kv * cin * cout];
    packed
        .par_chunks_mut(cin * cout)
        .enumerate()
        .for_each(|(k, wk)| {
            for o in 0..cout {
                let src = &weight[(o * kv + k) * cin..(o * kv + k + 1) * cin];
                for (c, &w) in src.iter().enumerate() {
                    wk[c * cout + o] = w;
                }
            }
        });
    let mut out = vec![0f32; n * cout];
    if n == 0 || cout == 0 {
        return Ok(out);
    }
    out.par_chunks_mut(ROW_BLOCK * cout)
        .enumerate()
        .for_each(|(blk, acc)| {
            let r0 = blk * ROW_BLOCK;
            let bm = acc.len() / cout;
            fill_bias(acc, bias, cout);
            let mut gathered = vec![0f32; bm * cin];
            let mut partial = vec![0f32; bm * cout];
            let mut dst_rows: Vec<usize> = Vec::with_capacity(bm);
            for k in 0..kv {
                gather_offset(map, feats, cin, (r0, bm), k, &mut gathered, &mut dst_rows);
                let m = dst_rows.len();
                if m == 0 {
                    continue;
                }
                let wk = &packed[k * cin * cout..(k + 1) * cin * cout];
                if m == bm {
                    // Every row has this neighbour: accumulate in place.
                    matmul_acc(acc, &gathered[..m * cin], wk, m, cin, cout, true);
                } else {
                    let part = &mut partial[..m * cout];
                    matmul_acc(part, &gathered[..m * cin], wk, m, cin, cout, false);
                    for (p, &i) in dst_rows.iter().enumerate() {
                        let dst = &mut acc[i * cout..(i + 1) * cout];
                        for (d, s) in dst.iter_mut().zip(&part[p * cout..(p + 1) * cout]) {
                            *d += *s;
                        }
                    }
                }
            }
        });
    Ok(out)
}

/// Parent offset (−1, 0 or +1 per axis) that fine kernel offset `o` (−1, 0, +1) reaches from a
/// child with parity `d` (0 or 1): the child `2p + d` plus `o` lies in parent `p + ⌊(d + o) / 2⌋`.
fn parent_step(d: i32, o: i32) -> i32 {
    (d + o).div_euclid(2)
}

/// The (dx, dy, dz) of child `j = 4dx + 2dy + dz` (TRELLIS' `SparseSubdivide` order).
pub fn child_parity(j: usize) -> [i32; 3] {
    [(j >> 2) as i32 & 1, (j >> 1) as i32 & 1, j as i32 & 1]
}

/// `SparseSubdivide`'s coords: each `[b, x, y, z]` row becomes its 8 children
/// `[b, 2x + dx, 2y + dy, 2z + dz]`, child `j` at row `8i + j`.
pub fn subdivide_coords(coords: &[i32]) -> Vec<i32> {
    let mut out = Vec::with_capacity(coords.len() * 8);
    for c in coords.chunks_exact(4) {
        for j in 0..8 {
            let d = child_parity(j);
            out.extend_from_slice(&[c[0], 2 * c[1] + d[0], 2 * c[2] + d[1], 2 * c[3] + d[2]]);
        }
    }
    out
}

/// `submanifold_conv(subdivide(feats))` without building the subdivided feats.
///
/// TRELLIS' `SparseSubdivideBlock3d` convolves the output of `SparseSubdivide`, where every voxel
/// became its 8 children (child `j = 4dx + 2dy + dz` at row `8i + j`, coords `2c + (dx, dy, dz)`)
/// holding the parent's feats. A fine 3×3×3 neighbour of a child is a child of one of the parent's
/// 3×3×3 coarse neighbours, exists exactly when that parent does, and holds its feats. So every
/// child row is a convolution over the coarse rows with the fine kernel's taps summed per
/// reachable parent: 8 children × 8 merged taps instead of 8 × 27 taps, and no 8× copy of the
/// input. `map` is the coarse rows' 3×3×3 submanifold map; `weight` is `[Cout, 27, Cin]`.
/// Returns `[8N, Cout]` in the subdivided row order.
pub fn subdivided_conv(
    feats: &[f32],
    cin: usize,
    map: &NeighbourMap,
    weight: &[f32],
    bias: Option<&[f32]>,
    cout: usize,
) -> Result<Vec<f32>, SparseConvError> {
    if map.kernel != [3, 3, 3] {
        return Err(SparseConvError::BadKernel(map.kernel));
    }
    let n = map.rows;
    check_len("feats", feats.len(), n * cin)?;
    check_len("weight", weight.len(), cout * 27 * cin)?;
    if let Some(b) = bias {
        check_len("bias", b.len(), cout)?;
    }
    // For every coarse offset k: the children that reach it (`users[k]`) and their merged
    // weights side by side, `packed[k]` = [Cin, users[k].len() * Cout] row-major, each the sum of
    // the fine taps whose per-axis parent step is k's offset.
    let (users, packed): (Vec<Vec<usize>>, Vec<Vec<f32>>) = (0..27)
        .into_par_iter()
        .map(|k| {
            let p = map.offset(k);
            // (child, the fine taps that reach offset k from it), children that reach it only.
            let children: Vec<(usize, Vec<usize>)> = (0..8)
                .map(|j| {
                    let d = child_parity(j);
                    let taps = (0..27)
                        .filter(|&f| {
                            let o = map.offset(f);
                            (0..3).all(|a| parent_step(d[a], o[a]) == p[a])
                        })
                        .collect();
                    (j, taps)
                })
                .filter(|(_, taps): &(usize, Vec<usize>)| !taps.is_empty())
                .collect();
            let width = children.len() * cout;
            let mut m = vec![0f32; cin * width];
            for (u, (_, taps)) in children.iter().enumerate() {
                for &f in taps {
                    for oc in 0..cout {
                        let src = &weight[(oc * 27 + f) * cin..(oc * 27 + f + 1) * cin];
                        for (c, &w) in src.iter().enumerate() {
                            m[c * width + u * cout + oc] += w;
                        }
                    }
                }
            }
            (children.into_iter().map(|(j, _)| j).collect(), m)
        })
        .unzip();
    let mut out = vec![0f32; n * 8 * cout];
    if n == 0 || cout == 0 {
        return Ok(out);
    }
    const BLOCK: usize = 32; // coarse rows per task (256 output rows)
    out.par_chunks_mut(BLOCK * 8 * cout)
        .enumerate()
        .for_each(|(blk, acc)| {
            let r0 = blk * BLOCK;
            let bm = acc.len() / (8 * cout);
            fill_bias(acc, bias, cout);
            let mut gathered = vec![0f32; bm * cin];
            let mut partial = vec![0f32; bm * 8 * cout];
            let mut rows: Vec<usize> = Vec::with_capacity(bm);
            for k in 0..27 {
                gather_offset(map, feats, cin, (r0, bm), k, &mut gathered, &mut rows);
                let m = rows.len();
                if m == 0 {
                    continue;
                }
                let width = users[k].len() * cout;
                let part = &mut partial[..m * width];
                matmul_acc(part, &gathered[..m * cin], &packed[k], m, cin, width, false);
                for (r, &i) in rows.iter().enumerate() {
                    for (u, &child) in users[k].iter().enumerate() {
                        let dst = &mut acc[(i * 8 + child) * cout..(i * 8 + child + 1) * cout];
                        let src = &part[r * width + u * cout..r * width + (u + 1) * cout];
                        for (d, s) in dst.iter_mut().zip(src) {
                            *d += *s;
                        }
                    }
                }
            }
        });
    Ok(out)
}

fn check_len(what: &'static str, got: usize, want: usize) -> Result<(), SparseConvError> {
    if got != want {
        return Err(SparseConvError::Size { what, got, want });
    }
    Ok(())
}

/// Every `cout`-wide row of `acc` set to `bias` (zeros without one).
fn fill_bias(acc: &mut [f32], bias: Option<&[f32]>, cout: usize) {
    match bias {
        Some(b) => acc
            .chunks_exact_mut(cout)
            .for_each(|r| r.copy_from_slice(b)),
        None => acc.fill(0.0),
    }
}

/// Gathers, for rows `r0..r0 + bm` of `map`, the input rows at kernel offset `k` into the front
/// of `gathered` (`cin` wide) and records in `rows` which block row each gathered row belongs to.
fn gather_offset(
    map: &NeighbourMap,
    feats: &[f32],
    cin: usize,
    (r0, bm): (usize, usize),
    k: usize,
    gathered: &mut [f32],
    rows: &mut Vec<usize>,
) {
    rows.clear();
    for i in 0..bm {
        let j = map.table[(r0 + i) * map.volume + k];
        if j >= 0 {
            let j = j as usize;
            let m = rows.len();
            gathered[m * cin..(m + 1) * cin].copy_from_slice(&feats[j * cin..(j + 1) * cin]);
            rows.push(i);
        }
    }
}

/// `dst[m, n] (+)= a[m, k] · b[k, n]`, all row-major, single-threaded (callers parallelise).
pub(crate) fn matmul_acc(
    dst: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    assert!(dst.len() >= m * n && a.len() >= m * k && b.len() >= k * n);
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    // SAFETY: the asserts above bound every access gemm makes with these strides and sizes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_order_groups_equal_masks_stably() {
        // rows: masks 0b11, 0b01, 0b11, 0b10, 0b01 (volume 2)
        let table = [4, 5, 6, -1, 1, 2, -1, 3, 0, -1];
        assert_eq!(mask_order(&table, 2), vec![1, 4, 3, 0, 2]);
        assert_eq!(mask_order(&[], 27), Vec::<i32>::new());
    }

    /// Direct evaluation of the definition through a coordinate lookup.
    fn reference(
        coords: &[i32],
        feats: &[f32],
        cin: usize,
        weight: &[f32],
        bias: &[f32],
        cout: usize,
    ) -> Vec<f32> {
        let n = coords.len() / 4;
        let mut out = vec![0f32; n * cout];
        for i in 0..n {
            let c = &coords[i * 4..i * 4 + 4];
            for o in 0..cout {
                let mut s = bias[o] as f64;
                for j in 0..n {
                    let e = &coords[j * 4..j * 4 + 4];
                    let d = [e[1] - c[1], e[2] - c[2], e[3] - c[3]];
                    if e[0] != c[0] || d.iter().any(|v| v.abs() > 1) {
                        continue;
                    }
                    let k = ((d[0] + 1) * 9 + (d[1] + 1) * 3 + (d[2] + 1)) as usize;
                    for ci in 0..cin {
                        s += weight[(o * 27 + k) * cin + ci] as f64 * feats[j * cin + ci] as f64;
                    }
                }
                out[i * cout + o] = s as f32;
            }
        }
        out
    }

    fn lcg(state: &mut u64) -> f32 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    }

    /// A random problem: `n` distinct voxels in 2 batches on an `extent`³ grid, feats `[n, cin]`,
    /// weight `[cout, 27, cin]`, bias `[cout]`.
    struct Problem {
        coords: Vec<i32>,
        feats: Vec<f32>,
        weight: Vec<f32>,
        bias: Vec<f32>,
    }

    fn random_problem(seed: u64, n: usize, extent: f32, cin: usize, cout: usize) -> Problem {
        let mut s = seed;
        let mut coords = Vec::new();
        let mut seen = std::collections::HashSet::new();
        while coords.len() < 4 * n {
            let c = [
                (lcg(&mut s) + 0.5 > 0.5) as i32,
                ((lcg(&mut s) + 0.5) * extent) as i32,
                ((lcg(&mut s) + 0.5) * extent) as i32,
                ((lcg(&mut s) + 0.5) * extent) as i32,
            ];
            if seen.insert(c) {
                coords.extend_from_slice(&c);
            }
        }
        Problem {
            coords,
            feats: (0..n * cin).map(|_| lcg(&mut s)).collect(),
            weight: (0..cout * 27 * cin).map(|_| lcg(&mut s)).collect(),
            bias: (0..cout).map(|_| lcg(&mut s)).collect(),
        }
    }

    #[test]
    fn matches_the_definition_on_a_random_cloud() {
        let (cin, cout) = (5, 7);
        let Problem {
            coords,
            feats,
            weight,
            bias,
        } = random_problem(7, 300, 6.0, cin, cout);
        let map = submanifold_neighbours(&coords, [3, 3, 3]).unwrap();
        let got = submanifold_conv(&feats, cin, &map, &weight, Some(&bias), cout).unwrap();
        let want = reference(&coords, &feats, cin, &weight, &bias, cout);
        let err: f32 = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-4, "max abs error {err}");
    }

    #[test]
    fn centre_offset_is_self_and_missing_neighbours_are_marked() {
        let coords = [0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0];
        let map = submanifold_neighbours(&coords, [3, 3, 3]).unwrap();
        assert_eq!(map.offset(13), [0, 0, 0]);
        assert_eq!(map.table[13], 0);
        assert_eq!(map.table[27 + 13], 1);
        // (+1, 0, 0) of row 0 is row 1; the other batch is never a neighbour.
        assert_eq!(map.offset(22), [1, 0, 0]);
        assert_eq!(map.table[22], 1);
        assert_eq!(
            map.table[2 * 27..3 * 27]
                .iter()
                .filter(|&&j| j >= 0)
                .count(),
            1
        );
    }

    #[test]
    fn subdivided_conv_equals_conv_of_the_subdivided_cloud() {
        let (cin, cout) = (6, 5);
        let Problem {
            coords,
            feats,
            weight,
            bias,
        } = random_problem(11, 120, 5.0, cin, cout);
        // The explicit way: 8 children per voxel holding the parent's feats, then the fine conv.
        let fine_coords = subdivide_coords(&coords);
        let fine_feats: Vec<f32> = feats
            .chunks_exact(cin)
            .flat_map(|row| std::iter::repeat_n(row, 8).flatten().copied())
            .collect();
        let fine_map = submanifold_neighbours(&fine_coords, [3, 3, 3]).unwrap();
        let want =
            submanifold_conv(&fine_feats, cin, &fine_map, &weight, Some(&bias), cout).unwrap();
        let map = submanifold_neighbours(&coords, [3, 3, 3]).unwrap();
        let got = subdivided_conv(&feats, cin, &map, &weight, Some(&bias), cout).unwrap();
        assert_eq!(got.len(), want.len());
        let err: f32 = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-5, "max abs error {err}");
        // No bias, and a map of another kernel size is refused.
        let nb = subdivided_conv(&feats, cin, &map, &weight, None, cout).unwrap();
        assert!((nb[0] + bias[0] - got[0]).abs() < 1e-5);
        let m1 = submanifold_neighbours(&coords, [1, 1, 1]).unwrap();
        assert!(subdivided_conv(&feats, cin, &m1, &weight, None, cout).is_err());
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(matches!(
            submanifold_neighbours(&[0, 1, 2], [3, 3, 3]),
            Err(SparseConvError::BadCoords(3))
        ));
        assert!(matches!(
            submanifold_neighbours(&[0, 1, 2, 3], [2, 3, 3]),
            Err(SparseConvError::BadKernel(_))
        ));
        assert!(matches!(
            submanifold_neighbours(&[0, 1, 2, 3, 0, 1, 2, 3], [3, 3, 3]),
            Err(SparseConvError::Duplicate(_, 0, 1))
        ));
        let map = submanifold_neighbours(&[0, 1, 2, 3], [1, 1, 1]).unwrap();
        assert!(submanifold_conv(&[1.0], 2, &map, &[1.0, 1.0], None, 1).is_err());
    }
}
