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
//!
//! On CPUs with AVX-512F and FMA a fused kernel replaces the GEMM calls: tasks are (group, head,
//! block of [`fused::QB`] query rows), so a task's transposed score tile `[keys × QB]` stays in
//! L2; both products run a 6 × 64 register-tiled microkernel that reads the keys (transposed per
//! head once per call), the task's transposed queries, the score tile and the values (copied per
//! head once per call) in place, and the softmax normalisation is applied in the output store.
//! `TRELLIS_CPU_ATTENTION=gemm` (or `TRELLIS_NO_SIMD`) keeps the GEMM path.
//!
//! Inputs are row views with any row stride ([`Rows`]), so `q`, `k` and `v` can be the three
//! parts of one fused `qkv` projection without copies.

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

/// `rows` rows of float32 values, row `r` starting at `data[r * stride]` (the caller's `[heads,
/// head_dim]` values at its start; the rest of the stride is not read).
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub stride: usize,
}

impl<'a> Rows<'a> {
    /// Dense rows of `width` values.
    pub fn dense(data: &'a [f32], width: usize) -> Self {
        Rows {
            data,
            rows: data.len().checked_div(width).unwrap_or(0),
            stride: width,
        }
    }

    /// Checks that every row holds `width` values (and that dense rows tile `data` exactly).
    fn check(&self, what: &'static str, width: usize) -> Result<(), AttentionError> {
        let need = match self.rows {
            0 => 0,
            r => (r - 1) * self.stride + width,
        };
        if self.stride < width || self.data.len() < need {
            return Err(AttentionError::Size {
                what,
                got: self.data.len(),
                want: need,
            });
        }
        Ok(())
    }

    /// `width` values of row `r` from column `at`.
    #[inline]
    fn row(&self, r: usize, at: usize, width: usize) -> &'a [f32] {
        &self.data[r * self.stride + at..][..width]
    }
}

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
    let qrow = shape.heads * shape.head_dim;
    let vrow = shape.heads * shape.v_dim;
    let nq = q.len().checked_div(qrow).unwrap_or(0);
    let nk = k.len().checked_div(qrow).unwrap_or(0);
    check("q", q.len(), nq * qrow)?;
    check("k", k.len(), nk * qrow)?;
    check("v", v.len(), nk * vrow)?;
    varlen_attention_rows(
        Rows::dense(q, qrow),
        Rows::dense(k, qrow),
        Rows {
            data: v,
            rows: nk,
            stride: vrow,
        },
        groups,
        shape,
        scale,
    )
}

/// [`varlen_attention`] on row views: `q` rows hold `[H, D]`, `k` rows `[H, D]`, `v` rows
/// `[H, Dv]` at their start, each with its own row stride; `k` and `v` have the same row count.
/// Returns the dense `[Nq, H, Dv]` output.
pub fn varlen_attention_rows(
    q: Rows,
    k: Rows,
    v: Rows,
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
    let (nq, nk) = (q.rows, k.rows);
    q.check("q", qrow)?;
    k.check("k", qrow)?;
    v.check("v", vrow)?;
    if v.rows != nk {
        return Err(AttentionError::Size {
            what: "v rows",
            got: v.rows,
            want: nk,
        });
    }
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
    if fused::available() && scale > 0.0 && heads > 0 && d > 0 && dv > 0 {
        fused::run(q, k, v, groups, &order, shape, scale, &mut out);
        return Ok(out);
    }
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
    let kt = keys_transposed(k, shape);
    let kt = &kt;
    let (qs, vs) = (q.stride, v.stride);
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
            let qh = &q.data[rows.start * qs + h * d..];
            let kh = &kt[h * d * nk + kv.start..];
            let vh = &v.data[kv.start * vs + h * dv..];
            // scoresᵀ[j, i] = Σ_e kᵀ[j, e] q[i, e]: lhs (j, e) at e*nk + j, rhs (e, i) at i*qs + e,
            // dst (j, i) at i*l + j.
            strided_matmul(
                &mut scores,
                (l as isize, 1),
                kh,
                (nk as isize, 1),
                qh,
                (qs as isize, 1),
                (l, d, bq),
            );
            for (row, sum) in scores.chunks_exact_mut(l).zip(sums.iter_mut()) {
                *sum = vecmath::exp_shifted_row(row, scale);
            }
            // outᵀ[e, i] = Σ_j vᵀ[e, j] p[i, j]: lhs (e, j) at j*vs + e, rhs (j, i) at i*l + j,
            // dst (e, i) at i*vrow + e, written straight into this task's rows.
            strided_matmul(
                &mut dst[h * dv..],
                (vrow as isize, 1),
                vh,
                (vs as isize, 1),
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

/// Keys transposed per head, `kt[h][e][j] = k[j, h, e]`: each head's keys of a group are then a
/// column-major `[keys × D]` operand (and, in the fused kernel, `D` rows of consecutive keys).
fn keys_transposed(k: Rows, shape: AttnShape) -> Vec<f32> {
    let (heads, d, nk) = (shape.heads, shape.head_dim, k.rows);
    let mut kt = vec![0f32; heads * d * nk];
    kt.par_chunks_mut((d * nk).max(1))
        .enumerate()
        .for_each(|(h, dst)| {
            for j0 in (0..nk).step_by(64) {
                for e in 0..d {
                    let row = &mut dst[e * nk..(e + 1) * nk];
                    for (j, v) in row.iter_mut().enumerate().take((j0 + 64).min(nk)).skip(j0) {
                        *v = k.data[j * k.stride + h * d + e];
                    }
                }
            }
        });
    kt
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

/// The AVX-512 attention kernel (see the module doc).
mod fused {
    use super::{AttnGroup, AttnShape, Rows};

    /// Query rows per task: the columns of the transposed score tile.
    pub(super) const QB: usize = 64;

    /// Whether this CPU runs the fused kernel (AVX-512F and FMA, not turned off).
    pub(super) fn available() -> bool {
        use std::sync::OnceLock;
        static AVAILABLE: OnceLock<bool> = OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            let off = std::env::var_os("TRELLIS_NO_SIMD").is_some()
                || std::env::var("TRELLIS_CPU_ATTENTION").is_ok_and(|v| v == "gemm");
            !off && crate::sgemm::cpu_has_avx512()
        })
    }

    #[cfg(not(target_arch = "x86_64"))]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run(
        _q: Rows,
        _k: Rows,
        _v: Rows,
        _groups: &[AttnGroup],
        _order: &[usize],
        _shape: AttnShape,
        _scale: f32,
        _out: &mut [f32],
    ) {
        unreachable!("attention: the fused kernel runs only on x86-64 with AVX-512");
    }

    /// The output pointer, shared by tasks that write disjoint (rows, head) rectangles.
    #[derive(Clone, Copy)]
    struct Out(*mut f32);
    // SAFETY: tasks write disjoint rectangles of the output (see `run`).
    unsafe impl Send for Out {}
    unsafe impl Sync for Out {}

    impl Out {
        /// The pointer (a method, so closures capture the whole `Send` wrapper).
        fn at(self, offset: usize) -> *mut f32 {
            self.0.wrapping_add(offset)
        }
    }

    /// Per-thread buffers of a task.
    #[derive(Default)]
    struct Scratch {
        /// Transposed scores / probabilities, `[keys][QB]`.
        st: Vec<f32>,
        /// Column sums, then their reciprocals.
        sums: Vec<f32>,
    }

    /// Output columns per microkernel tile (4 vectors of 16) and rows per tile: the SGEMM's
    /// register tile, whose products (`sgemm::tile_products`) the microkernel shares.
    const NR: usize = crate::sgemm::NR;
    const MR: usize = crate::sgemm::MR;

    /// `dst[c * ld + (r - rows.start)] = src[r, c]` for `r` in `rows`, `c < width`: a transpose
    /// through 16 x 16 tiles (reads and writes in runs of 16 values).
    ///
    /// # Safety
    /// `dst` is valid for those writes and no other thread writes them at once.
    unsafe fn transpose(
        src: Rows,
        rows: std::ops::Range<usize>,
        width: usize,
        dst: *mut f32,
        ld: usize,
    ) {
        const T: usize = 16;
        let mut tile = [[0f32; T]; T];
        let mut r0 = rows.start;
        while r0 < rows.end {
            let nr = T.min(rows.end - r0);
            let mut c0 = 0;
            while c0 < width {
                let nc = T.min(width - c0);
                for (ii, t) in tile.iter_mut().enumerate().take(nr) {
                    t[..nc].copy_from_slice(src.row(r0 + ii, c0, nc));
                }
                for cc in 0..nc {
                    let d = dst.add((c0 + cc) * ld + r0 - rows.start);
                    for (ii, t) in tile.iter().enumerate().take(nr) {
                        *d.add(ii) = t[cc];
                    }
                }
                c0 += nc;
            }
            r0 += nr;
        }
    }

    /// Key / value rows per task of the packing pass.
    const PACK_ROWS: usize = 64;

    /// Runs every (group, head, query block) task; `out` is the zeroed `[Nq, H, Dv]` output.
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run(
        q: Rows,
        k: Rows,
        v: Rows,
        groups: &[AttnGroup],
        order: &[usize],
        shape: AttnShape,
        scale: f32,
        out: &mut [f32],
    ) {
        use rayon::prelude::*;
        let AttnShape {
            heads,
            head_dim: d,
            v_dim: dv,
        } = shape;
        let nk = k.rows;
        let dvp = dv.div_ceil(NR) * NR;
        assert!(
            crate::sgemm::cpu_has_avx512(),
            "attention: this CPU lacks AVX-512F / FMA"
        );
        assert_eq!(out.len(), q.rows * heads * dv);
        // query blocks of every group that has keys
        let mut blocks = Vec::new();
        for &g in order {
            let grp = &groups[g];
            if grp.kv.is_empty() {
                continue;
            }
            let mut r = grp.q.start;
            while r < grp.q.end {
                let end = (r + QB).min(grp.q.end);
                blocks.push((g, r..end));
                r = end;
            }
        }
        // One pass over the rows packs every operand the tasks read:
        // qt[blk][h][e][i] = q[blk's row i, h, e] (zero past the block's rows),
        // kt[h][e][j] = k[j, h, e], vp[h][j][c] = v[j, h, c] (zero-padded to `dvp`).
        let qw = heads * d;
        let mut qt = vec![0f32; blocks.len() * qw * QB];
        let mut kt = vec![0f32; qw * nk];
        let mut vp = vec![0f32; heads * nk * dvp];
        let (qtp, ktp, vpp) = (
            Out(qt.as_mut_ptr()),
            Out(kt.as_mut_ptr()),
            Out(vp.as_mut_ptr()),
        );
        let kblocks = nk.div_ceil(PACK_ROWS);
        (0..blocks.len() + kblocks).into_par_iter().for_each(|t| {
            if let Some((_, rows)) = blocks.get(t) {
                // SAFETY: block t owns qt[t * qw * QB ..][.. qw * QB] (rows `rows` are at most QB).
                unsafe { transpose(q, rows.clone(), qw, qtp.at(t * qw * QB), QB) };
                return;
            }
            let j0 = (t - blocks.len()) * PACK_ROWS;
            let j1 = (j0 + PACK_ROWS).min(nk);
            // SAFETY: this task alone writes columns j0..j1 of kt's rows and rows j0..j1 of
            // every head of vp; both buffers have the sizes allocated above.
            unsafe {
                transpose(k, j0..j1, qw, ktp.at(j0), nk);
                for j in j0..j1 {
                    let row = v.row(j, 0, heads * dv);
                    for h in 0..heads {
                        let dst = vpp.at((h * nk + j) * dvp);
                        std::ptr::copy_nonoverlapping(row.as_ptr().add(h * dv), dst, dv);
                    }
                }
            }
        });
        let tasks: Vec<(usize, usize)> = (0..blocks.len())
            .flat_map(|b| (0..heads).map(move |h| (b, h)))
            .collect();
        let dst = Out(out.as_mut_ptr());
        let (qt, kt, vp) = (&qt[..], &kt[..], &vp[..]);
        tasks
            .par_iter()
            .for_each_init(Scratch::default, |sc, &(blk, h)| {
                let (g, rows) = &blocks[blk];
                let t = Task {
                    qt: &qt[(blk * heads + h) * d * QB..][..d * QB],
                    kt,
                    nk,
                    vp,
                    dvp,
                    kv: groups[*g].kv.clone(),
                    h,
                    rows: rows.clone(),
                    shape,
                    scale,
                };
                // SAFETY: the CPU has AVX-512F and FMA (asserted above); this task alone
                // writes rows `rows`, columns `h*dv..(h+1)*dv` of the `[Nq, H*dv]` output.
                unsafe { t.run(sc, dst) }
            });
    }

    /// One (group, head, query block).
    #[cfg(target_arch = "x86_64")]
    struct Task<'a> {
        /// This block's queries of head `h`, transposed: `[D][QB]`.
        qt: &'a [f32],
        kt: &'a [f32],
        nk: usize,
        vp: &'a [f32],
        dvp: usize,
        kv: std::ops::Range<usize>,
        h: usize,
        rows: std::ops::Range<usize>,
        shape: AttnShape,
        scale: f32,
    }

    #[cfg(target_arch = "x86_64")]
    impl Task<'_> {
        /// # Safety
        /// AVX-512F and FMA; `dst` is the `[Nq, H * Dv]` output and no other task writes this
        /// task's rectangle.
        unsafe fn run(&self, sc: &mut Scratch, dst: Out) {
            let AttnShape {
                heads,
                head_dim: d,
                v_dim: dv,
            } = self.shape;
            let (h, l, bq) = (self.h, self.kv.len(), self.rows.len());
            if sc.st.len() < l * QB {
                sc.st.resize(l * QB, 0.0);
            }
            sc.sums.clear();
            sc.sums.resize(QB, f32::NEG_INFINITY);
            // scoresᵀ[j, i] = Σ_e kᵀ[e, j] qᵀ[e, i]: A = the keys, D steps of `nk` apart;
            // B = qᵀ, rows of QB
            let kh = self.kt[h * d * self.nk + self.kv.start..].as_ptr();
            let st = sc.st.as_mut_ptr();
            let mut j0 = 0;
            while j0 < l {
                let r = MR.min(l - j0);
                let m = Micro {
                    kl: d,
                    a: kh.add(j0),
                    a_step: self.nk,
                    b: self.qt.as_ptr(),
                    b_step: QB,
                    c: st.add(j0 * QB),
                    ldc: QB,
                    cols: QB,
                    row_scale: std::ptr::null(),
                    colmax: sc.sums.as_mut_ptr(),
                };
                m.rows(r);
                j0 += r;
            }
            // sums := 1 / Σ_j e^{scale (s[j, i] - max_i)}, from the maxima the tiles left there
            softmax_cols(&mut sc.st[..l * QB], self.scale, &mut sc.sums);
            // out[i, c] = (Σ_j pᵀ[j, i] v[j, c]) / sum_i: A = the probabilities, steps of QB;
            // B = the head's values, rows of dvp
            let vh = self.vp[(h * self.nk + self.kv.start) * self.dvp..].as_ptr();
            let vrow = heads * dv;
            for p in 0..self.dvp / NR {
                let cols = NR.min(dv - p * NR);
                let mut i0 = 0;
                while i0 < bq {
                    let r = MR.min(bq - i0);
                    let m = Micro {
                        kl: l,
                        a: st.add(i0),
                        a_step: QB,
                        b: vh.add(p * NR),
                        b_step: self.dvp,
                        c: dst.at((self.rows.start + i0) * vrow + h * dv + p * NR),
                        ldc: vrow,
                        cols,
                        row_scale: sc.sums.as_ptr().add(i0),
                        colmax: std::ptr::null_mut(),
                    };
                    m.rows(r);
                    i0 += r;
                }
            }
        }
    }

    /// The column softmax of a `[keys][QB]` score tile whose column maxima are in `sums`:
    /// `st[j, i] = e^{scale st[j, i] - scale max_i}`, then `sums[i] = 1 / Σ_j st[j, i]`
    /// (`scale` positive; the same formula as `vecmath::exp_shifted_row`, its polynomial on FMAs).
    ///
    /// # Safety
    /// AVX-512F and FMA; `sums` holds QB values.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn softmax_cols(st: &mut [f32], scale: f32, sums: &mut [f32]) {
        use std::arch::x86_64::*;
        const V: usize = QB / 16;
        assert!(sums.len() >= QB && st.len().is_multiple_of(QB));
        let sc = _mm512_set1_ps(scale);
        let mut shift = [_mm512_setzero_ps(); V];
        for (v, sh) in shift.iter_mut().enumerate() {
            *sh = _mm512_mul_ps(_mm512_loadu_ps(sums.as_ptr().add(16 * v)), sc);
        }
        let mut acc = [[_mm512_setzero_ps(); V]; 2];
        for (j, row) in st.chunks_exact_mut(QB).enumerate() {
            let a = &mut acc[j % 2];
            for v in 0..V {
                let p = row.as_mut_ptr().add(16 * v);
                let x = _mm512_fmsub_ps(_mm512_loadu_ps(p), sc, shift[v]);
                let e = crate::vecmath::exp_avx512(x);
                _mm512_storeu_ps(p, e);
                a[v] = _mm512_add_ps(a[v], e);
            }
        }
        let one = _mm512_set1_ps(1.0);
        for (v, (a0, a1)) in acc[0].iter().zip(&acc[1]).enumerate() {
            let sum = _mm512_add_ps(*a0, *a1);
            _mm512_storeu_ps(sums.as_mut_ptr().add(16 * v), _mm512_div_ps(one, sum));
        }
    }

    /// One microkernel call: `c[i, n] = (Σ_kk a[kk * a_step + i] · b[kk * b_step + n]) ·
    /// row_scale[i]` for `R` rows and `cols` (≤ 64) columns; `b` rows hold 64 readable values.
    #[cfg(target_arch = "x86_64")]
    struct Micro {
        kl: usize,
        a: *const f32,
        a_step: usize,
        b: *const f32,
        b_step: usize,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        /// Null: no scaling.
        row_scale: *const f32,
        /// Non-null: 64 running column maxima, raised to the tile's (the score product).
        colmax: *mut f32,
    }

    #[cfg(target_arch = "x86_64")]
    impl Micro {
        /// # Safety
        /// AVX-512F and FMA; the pointers are valid for what the doc above reads and writes.
        unsafe fn rows(&self, r: usize) {
            match r {
                6 => tile::<6>(self),
                5 => tile::<5>(self),
                4 => tile::<4>(self),
                3 => tile::<3>(self),
                2 => tile::<2>(self),
                _ => tile::<1>(self),
            }
        }
    }

    /// # Safety
    /// See [`Micro::rows`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn tile<const R: usize>(m: &Micro) {
        use std::arch::x86_64::*;
        const V: usize = NR / 16;
        let acc = crate::sgemm::tile_products::<R>(m.kl, m.a, m.a_step, m.b, m.b_step);
        let mask = crate::sgemm::column_masks(m.cols);
        if !m.colmax.is_null() {
            for v in 0..V {
                let mut mx = _mm512_loadu_ps(m.colmax.add(16 * v));
                for acc_i in &acc {
                    mx = _mm512_max_ps(mx, acc_i[v]);
                }
                _mm512_storeu_ps(m.colmax.add(16 * v), mx);
            }
        }
        for (i, acc_i) in acc.iter().enumerate() {
            let row = m.c.add(i * m.ldc);
            let s = if m.row_scale.is_null() {
                None
            } else {
                Some(_mm512_set1_ps(*m.row_scale.add(i)))
            };
            for v in 0..V {
                let y = match s {
                    Some(s) => _mm512_mul_ps(acc_i[v], s),
                    None => acc_i[v],
                };
                _mm512_mask_storeu_ps(row.add(16 * v), mask[v], y);
            }
        }
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
