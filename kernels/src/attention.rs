//! Variable-length scaled-dot-product attention on slices: the computation behind TRELLIS'
//! `sparse_scaled_dot_product_attention` (full self / cross attention per batch element,
//! `trellis/modules/sparse/attention/full_attn.py`) and the windowed self-attention of
//! `windowed_attn.py` (one group per (batch, window)), which the original delegates to flash-attn.
//!
//! Every group is a range of query rows attending to a range of key/value rows. Work is split into
//! (group, block of query rows) tasks run in parallel; a task holds one `[rows × keys]` score tile
//! (f32) per head at a time, never the whole attention matrix. Softmax per row in f32
//! (vectorised, `crate::vecmath`). Both products are GEMMs laid out so that gemm reads the keys,
//! values and score tile in place: the keys are transposed per head once per call (one copy of
//! `k`), and each task computes `scoresᵀ = K Qᵀ` and `outᵀ = Vᵀ Pᵀ` on column-major views.

use std::ops::Range;

use rayon::prelude::*;

use crate::vecmath;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttentionError {
    #[error("attention: {what} has {got} values, expected {want}")]
    Size {
        what: &'static str,
        got: usize,
        want: usize,
    },
    #[error(
        "attention: group {0} is out of range (query rows {1:?} of {2}, key rows {3:?} of {4})"
    )]
    OutOfRange(usize, Range<usize>, usize, Range<usize>, usize),
    #[error("attention: query rows of groups overlap at row {0}")]
    Overlap(usize),
}

/// Query rows `q` attend to key/value rows `kv`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttnGroup {
    pub q: Range<usize>,
    pub kv: Range<usize>,
}

/// Head layout: `q`/`k` rows are `[heads, head_dim]`, `v` and output rows `[heads, v_dim]`.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub heads: usize,
    pub head_dim: usize,
    pub v_dim: usize,
}

/// Query rows per task.
const Q_BLOCK: usize = 128;

/// `out[Nq, H, Dv]`: for every group, `softmax(scale · q kᵀ) v` per head. Query rows that no group
/// names stay zero. `q` is `[Nq, H, D]`, `k` `[Nk, H, D]`, `v` `[Nk, H, Dv]`, all row-major.
pub fn varlen_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    groups: &[AttnGroup],
    shape: AttnShape,
    scale: f32,
) -> Result<Vec<f32>, AttentionError> {
    let AttnShape {
        heads,
        head_dim: d,
        v_dim: dv,
    } = shape;
    let qrow = heads * d;
    let vrow = heads * dv;
    let nq = q.len().checked_div(qrow).unwrap_or(0);
    let nk = k.len().checked_div(qrow).unwrap_or(0);
    check("q", q.len(), nq * qrow)?;
    check("k", k.len(), nk * qrow)?;
    check("v", v.len(), nk * vrow)?;
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_by_key(|&g| groups[g].q.start);
    let mut last_end = 0;
    for &g in &order {
        let grp = &groups[g];
        if grp.q.start > grp.q.end || grp.q.end > nq || grp.kv.start > grp.kv.end || grp.kv.end > nk
        {
            return Err(AttentionError::OutOfRange(
                g,
                grp.q.clone(),
                nq,
                grp.kv.clone(),
                nk,
            ));
        }
        if grp.q.start < last_end && !grp.q.is_empty() {
            return Err(AttentionError::Overlap(grp.q.start));
        }
        last_end = last_end.max(grp.q.end);
    }
    let mut out = vec![0f32; nq * vrow];
    // Disjoint output slices, one per (group, query block).
    let mut tasks: Vec<(usize, Range<usize>, &mut [f32])> = Vec::new();
    let mut rest: &mut [f32] = &mut out;
    let mut pos = 0;
    for &g in &order {
        let rows = groups[g].q.clone();
        let mut start = rows.start;
        while start < rows.end {
            let end = (start + Q_BLOCK).min(rows.end);
            let (_, tail) = std::mem::take(&mut rest).split_at_mut((start - pos) * vrow);
            let (mine, tail) = tail.split_at_mut((end - start) * vrow);
            tasks.push((g, start..end, mine));
            rest = tail;
            pos = end;
            start = end;
        }
    }
    // Keys transposed per head, `kt[h][e][j] = k[j, h, e]`: each head's keys of a group are then
    // a column-major `[keys × D]` operand, which the GEMM reads without repacking.
    let mut kt = vec![0f32; heads * d * nk];
    kt.par_chunks_mut((d * nk).max(1))
        .enumerate()
        .for_each(|(h, dst)| {
            for j0 in (0..nk).step_by(64) {
                for e in 0..d {
                    let row = &mut dst[e * nk..(e + 1) * nk];
                    for j in j0..(j0 + 64).min(nk) {
                        row[j] = k[j * qrow + h * d + e];
                    }
                }
            }
        });
    let kt = &kt;
    tasks.into_par_iter().for_each(|(g, rows, dst)| {
        let kv = groups[g].kv.clone();
        let bq = rows.len();
        let l = kv.len();
        if l == 0 {
            return;
        }
        // scores[i, j] for this block's rows i, row-major `[bq × l]`
        let mut scores = vec![0f32; bq * l];
        let mut sums = vec![0f32; bq];
        for h in 0..heads {
            let qh = &q[rows.start * qrow + h * d..];
            let kh = &kt[h * d * nk + kv.start..];
            let vh = &v[kv.start * vrow + h * dv..];
            // scoresᵀ[j, i] = Σ_e kᵀ[j, e] q[i, e]: lhs (j, e) at e*nk + j, rhs (e, i) at i*qrow + e,
            // dst (j, i) at i*l + j.
            strided_matmul(
                &mut scores,
                (l as isize, 1),
                kh,
                (nk as isize, 1),
                qh,
                (qrow as isize, 1),
                (l, d, bq),
            );
            for (row, sum) in scores.chunks_exact_mut(l).zip(sums.iter_mut()) {
                *sum = vecmath::exp_shifted_row(row, scale);
            }
            // outᵀ[e, i] = Σ_j vᵀ[e, j] p[i, j]: lhs (e, j) at j*vrow + e, rhs (j, i) at i*l + j,
            // dst (e, i) at i*vrow + e, written straight into this task's rows.
            strided_matmul(
                &mut dst[h * dv..],
                (vrow as isize, 1),
                vh,
                (vrow as isize, 1),
                &scores,
                (l as isize, 1),
                (dv, l, bq),
            );
            // softmax's normalisation, applied to the output rows (dv values) instead of the
            // scores (l values)
            for (i, sum) in sums.iter().enumerate() {
                let o = &mut dst[i * vrow + h * dv..i * vrow + (h + 1) * dv];
                vecmath::scale_in_place(o, 1.0 / sum);
            }
        }
    });
    Ok(out)
}

/// `dst[m, n] = a[m, k] · b[k, n]` on strided views: each operand comes with its
/// (column stride, row stride) in elements. Bounds are checked before the unchecked GEMM.
fn strided_matmul(
    dst: &mut [f32],
    dst_s: (isize, isize),
    a: &[f32],
    a_s: (isize, isize),
    b: &[f32],
    b_s: (isize, isize),
    (m, k, n): (usize, usize, usize),
) {
    let last = |rows: usize, cols: usize, (cs, rs): (isize, isize)| {
        (rows.saturating_sub(1) as isize * rs + cols.saturating_sub(1) as isize * cs) as usize
    };
    if m == 0 || n == 0 {
        return;
    }
    assert!(last(m, n, dst_s) < dst.len());
    if k == 0 {
        return;
    }
    assert!(last(m, k, a_s) < a.len() && last(k, n, b_s) < b.len());
    // SAFETY: the asserts above bound the largest offset gemm reads or writes through each view
    // (all strides are non-negative), and `dst` is exclusively borrowed.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_s.0,
            dst_s.1,
            false,
            a.as_ptr(),
            a_s.0,
            a_s.1,
            b.as_ptr(),
            b_s.0,
            b_s.1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

fn check(what: &'static str, got: usize, want: usize) -> Result<(), AttentionError> {
    if got != want {
        return Err(AttentionError::Size { what, got, want });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(state: &mut u64) -> f32 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*state >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0
    }

    /// float64 softmax attention of one group and head.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        g: &AttnGroup,
        h: usize,
        s: AttnShape,
        r: usize,
        scale: f64,
    ) -> Vec<f64> {
        let (d, dv, hh) = (s.head_dim, s.v_dim, s.heads);
        let logits: Vec<f64> =
            g.kv.clone()
                .map(|j| {
                    (0..d)
                        .map(|e| q[(r * hh + h) * d + e] as f64 * k[(j * hh + h) * d + e] as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = logits.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = w.iter().sum();
        (0..dv)
            .map(|e| {
                g.kv.clone()
                    .zip(&w)
                    .map(|(j, wj)| wj / z * v[(j * hh + h) * dv + e] as f64)
                    .sum()
            })
            .collect()
    }

    #[test]
    fn matches_a_float64_recomputation() {
        let s = AttnShape {
            heads: 3,
            head_dim: 8,
            v_dim: 5,
        };
        let (nq, nk) = (150, 90);
        let mut st = 3u64;
        let q: Vec<f32> = (0..nq * 24).map(|_| lcg(&mut st)).collect();
        let k: Vec<f32> = (0..nk * 24).map(|_| lcg(&mut st)).collect();
        let v: Vec<f32> = (0..nk * 15).map(|_| lcg(&mut st)).collect();
        // Groups out of order, one query range longer than a block, one row left out.
        let groups = vec![
            AttnGroup {
                q: 70..149,
                kv: 10..90,
            },
            AttnGroup {
                q: 0..70,
                kv: 0..30,
            },
        ];
        let scale = 1.0 / (8f32).sqrt();
        let out = varlen_attention(&q, &k, &v, &groups, s, scale).unwrap();
        let mut err = 0f64;
        for g in &groups {
            for r in g.q.clone() {
                for h in 0..3 {
                    let want = naive(&q, &k, &v, g, h, s, r, scale as f64);
                    for e in 0..5 {
                        err = err.max((out[(r * 3 + h) * 5 + e] as f64 - want[e]).abs());
                    }
                }
            }
        }
        assert!(err < 1e-5, "max abs error {err}");
        assert!(out[149 * 15..].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn bad_groups_are_errors() {
        let s = AttnShape {
            heads: 1,
            head_dim: 2,
            v_dim: 2,
        };
        let x = vec![0f32; 8];
        let over = [
            AttnGroup { q: 0..3, kv: 0..4 },
            AttnGroup { q: 2..4, kv: 0..4 },
        ];
        assert_eq!(
            varlen_attention(&x, &x, &x, &over, s, 1.0),
            Err(AttentionError::Overlap(2))
        );
        let oob = [AttnGroup { q: 0..5, kv: 0..4 }];
        assert!(matches!(
            varlen_attention(&x, &x, &x, &oob, s, 1.0),
            Err(AttentionError::OutOfRange(..))
        ));
        assert!(varlen_attention(&x[..7], &x, &x, &oob, s, 1.0).is_err());
    }
}
