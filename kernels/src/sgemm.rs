//! Float32 products with a constant right-hand side, for `nn.Linear` on the CPU:
//! `out[m, n] = act(sum_k x[m, k] * w[n, k] + bias[n])`, `x` row-major `[M, K]`, `w` the layer's
//! row-major `[N, K]` weight.
//!
//! The weight is packed once ([`PackedWeights::pack`]) into the layout the microkernel reads:
//! panels of [`NR`] output columns, each `K` rows of `NR` consecutive values (zero-padded past
//! `N`), so a call packs only `x`. The microkernel keeps an `MR x NR` = 6 x 64 tile of the output
//! in 24 AVX-512 registers and, for each `k`, loads four vectors of the weight panel and
//! broadcasts `MR` values of `x` (packed per call as `[k][MR]` micro-panels) into 24 fused
//! multiply-adds. (Measured on the 2-core Xeon against 14 x 32, 12 x 32 and 8 x 48 tiles: 6 x 64
//! and 8 x 48 were the fastest; 64 divides every width of the networks, so no padded columns.)
//!
//! Blocking: `K` is cut into equal blocks of at most [`Blocking::kc`] values; the rows are cut into
//! tasks of at most about [`Blocking::mc`] rows (a whole multiple of the thread count, so both
//! cores of a 2-core machine get the same work), each task packing its rows of `x` for one K block
//! (kept in L2) and walking every weight panel (one `kc x NR` panel block in L1 at a time) over
//! its row tiles. With fewer row tiles than threads the columns are split instead. The bias is
//! added in the first K block's store and the activation applied to each tile after the last.
//!
//! Only x86-64 CPUs with AVX-512F and FMA run it ([`available`]); elsewhere `pack` returns `None`
//! and callers keep their own path. `TRELLIS_NO_SIMD` or `TRELLIS_SGEMM=off` turn it off too.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use crate::vecmath;

/// 16-lane vectors per weight panel row.
const V: usize = 4;
/// Output columns per weight panel.
pub const NR: usize = 16 * V;
/// Output rows per microkernel tile.
pub const MR: usize = 6;

/// Activation applied to the output (after the bias).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    /// `GELU(approximate="tanh")`.
    GeluTanh,
    /// The exact erf GELU.
    GeluErf,
}

/// What is applied to `x · Wᵀ + bias` before it is stored.
#[derive(Debug, Clone, Copy)]
pub enum Epilogue<'a> {
    /// An activation.
    Act(Activation),
    /// `res + gamma ⊙ (x · Wᵀ + bias)` (`gamma` per output column, `res` row-major `[m, N]`): a
    /// LayerScale'd residual branch, rounded as the separate product and sum would be.
    ScaledResidual { gamma: &'a [f32], res: &'a [f32] },
}

/// Cache blocking of [`linear_with`]; [`Blocking::default`] is what [`linear`] uses.
#[derive(Debug, Clone, Copy)]
pub struct Blocking {
    /// Most values of K per block.
    pub kc: usize,
    /// Rows per task, about (rounded to whole tiles and to the thread count).
    pub mc: usize,
}

impl Default for Blocking {
    fn default() -> Self {
        Blocking { kc: 1024, mc: 448 }
    }
}

/// Whether this CPU runs the kernel (AVX-512F and FMA, and not turned off by the environment).
pub fn available() -> bool {
    use std::sync::OnceLock;
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let off = std::env::var_os("TRELLIS_NO_SIMD").is_some()
            || std::env::var("TRELLIS_SGEMM").is_ok_and(|v| v == "off" || v == "0");
        !off && cpu_has_avx512()
    })
}

/// Whether the CPU has AVX-512F and FMA (the SGEMM and the fused CPU attention kernel need both).
#[cfg(target_arch = "x86_64")]
pub(crate) fn cpu_has_avx512() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn cpu_has_avx512() -> bool {
    false
}

/// Values of one 64-byte line.
const LINE: usize = 16;

/// A float32 buffer whose values start on a 64-byte boundary.
struct Aligned {
    buf: Vec<f32>,
    off: usize,
}

impl Aligned {
    fn zeroed(len: usize) -> Self {
        let buf = vec![0f32; len + LINE];
        let off = buf.as_ptr().align_offset(64).min(LINE);
        Aligned { buf, off }
    }

    fn as_slice(&self) -> &[f32] {
        &self.buf[self.off..]
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.buf[self.off..]
    }
}

/// A `[N, K]` weight in the microkernel's panel layout (see the module doc).
pub struct PackedWeights {
    n: usize,
    k: usize,
    data: Aligned,
}

impl std::fmt::Debug for PackedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedWeights")
            .field("n", &self.n)
            .field("k", &self.k)
            .finish()
    }
}

impl PackedWeights {
    /// Packs the row-major `[n, k]` weight `w`, or `None` when the CPU cannot run the kernel
    /// ([`available`]). Panics if `w.len() != n * k`.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Option<Self> {
        available().then(|| Self::pack_any_cpu(w, n, k))
    }

    /// [`Self::pack`] of the weights `parts` (each row-major `[n_i, k]`) stacked along the output
    /// features, as if concatenated first (without the copy): `None` when the CPU cannot run the
    /// kernel. Panics if a part's length is not a multiple of `k` (or not 0 when `k` is 0).
    pub fn pack_stacked(parts: &[&[f32]], k: usize) -> Option<Self> {
        available().then(|| Self::pack_parts(parts, k))
    }

    /// The packing itself, on any CPU (the tests' reference path uses it too).
    fn pack_any_cpu(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(
            w.len(),
            n * k,
            "sgemm: weight has {} values, not {n} x {k}",
            w.len()
        );
        if k == 0 {
            return PackedWeights {
                n,
                k,
                data: Aligned::zeroed(0),
            };
        }
        Self::pack_parts(&[w], k)
    }

    fn pack_parts(parts: &[&[f32]], k: usize) -> Self {
        let rows: Vec<usize> = parts
            .iter()
            .map(|p| {
                assert!(
                    k > 0 && p.len().is_multiple_of(k),
                    "sgemm: a stacked weight part has {} values, not rows of {k}",
                    p.len()
                );
                p.len() / k
            })
            .collect();
        let n: usize = rows.iter().sum();
        // output feature r is row r - starts[i] of part i
        let row = |mut r: usize| -> &[f32] {
            for (part, &nr) in parts.iter().zip(&rows) {
                if r < nr {
                    return &part[r * k..][..k];
                }
                r -= nr;
            }
            unreachable!("sgemm: row past the stacked parts")
        };
        let panels = n.div_ceil(NR);
        let mut data = Aligned::zeroed(panels * k * NR);
        data.as_mut_slice()[..panels * k * NR]
            .par_chunks_mut(k * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                let cols = NR.min(n - p * NR);
                for j in 0..cols {
                    for (kk, &v) in row(p * NR + j).iter().enumerate() {
                        panel[kk * NR + j] = v;
                    }
                }
            });
        PackedWeights { n, k, data }
    }

    /// Output features (rows of the original weight).
    pub fn n(&self) -> usize {
        self.n
    }

    /// Input features (columns of the original weight).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bytes held (the padded panels).
    pub fn bytes(&self) -> usize {
        self.data.buf.len() * 4
    }

    fn panel(&self, p: usize) -> &[f32] {
        &self.data.as_slice()[p * self.k * NR..][..self.k * NR]
    }
}

/// `out = act(x · Wᵀ + bias)` with the default [`Blocking`]; `x` is row-major `[m, K]`, `out`
/// row-major `[m, N]` (every value written). Panics on mismatched lengths; the CPU must pass
/// [`available`] (as it did for `w` to exist).
pub fn linear(
    x: &[f32],
    m: usize,
    w: &PackedWeights,
    bias: Option<&[f32]>,
    act: Activation,
    out: &mut [f32],
) {
    linear_with(x, m, w, bias, act, out, Blocking::default())
}

/// [`linear`] with any [`Epilogue`], writing into uninitialised memory (every value is
/// written). Panics on mismatched lengths (`gamma` must have `N` values, `res` `m * N`).
pub fn linear_epilogue_uninit(
    x: &[f32],
    m: usize,
    w: &PackedWeights,
    bias: Option<&[f32]>,
    epilogue: Epilogue,
    out: &mut [MaybeUninit<f32>],
) {
    run(x, m, w, bias, epilogue, out, Blocking::default())
}

/// [`linear`] with explicit cache blocking (for tuning).
pub fn linear_with(
    x: &[f32],
    m: usize,
    w: &PackedWeights,
    bias: Option<&[f32]>,
    act: Activation,
    out: &mut [f32],
    blocking: Blocking,
) {
    // SAFETY: f32 and MaybeUninit<f32> share their layout, and `run` writes only floats.
    let out = unsafe {
        std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<MaybeUninit<f32>>(), out.len())
    };
    run(x, m, w, bias, Epilogue::Act(act), out, blocking)
}

fn run(
    x: &[f32],
    m: usize,
    w: &PackedWeights,
    bias: Option<&[f32]>,
    epi: Epilogue,
    out: &mut [MaybeUninit<f32>],
    blocking: Blocking,
) {
    let (n, k) = (w.n, w.k);
    assert_eq!(
        x.len(),
        m * k,
        "sgemm: input has {} values, not {m} x {k}",
        x.len()
    );
    assert_eq!(
        out.len(),
        m * n,
        "sgemm: output has {} values, not {m} x {n}",
        out.len()
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "sgemm: bias has {} values, not {n}", b.len());
    }
    if let Epilogue::ScaledResidual { gamma, res } = epi {
        assert_eq!(
            gamma.len(),
            n,
            "sgemm: gamma has {} values, not {n}",
            gamma.len()
        );
        assert_eq!(
            res.len(),
            m * n,
            "sgemm: residual has {} values, not {m} x {n}",
            res.len()
        );
    }
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for (i, row) in out.chunks_exact_mut(n).enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                v.write(bias.map_or(0.0, |b| b[j]));
            }
            // SAFETY: every value of the row was just written.
            let row = unsafe { std::slice::from_raw_parts_mut(row.as_mut_ptr().cast::<f32>(), n) };
            finish_row(epi, row, i * n);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        assert!(cpu_has_avx512(), "sgemm: this CPU lacks AVX-512F / FMA");
        let kc = blocking.kc.max(1);
        let kblocks = k.div_ceil(kc);
        let kc = k.div_ceil(kblocks);
        let (tasks, parallel) = plan(m, n, k, blocking.mc, rayon::current_num_threads());
        let dst = Out(out.as_mut_ptr().cast::<f32>());
        let run = |(rows, cols): &Rect| {
            // SAFETY: the tasks' (rows, panels) rectangles are disjoint and inside `out`, whose
            // row length is `n`; the CPU has AVX-512F and FMA (asserted above).
            unsafe { task(x, w, bias, epi, dst, rows.clone(), cols.clone(), kc) }
        };
        if parallel {
            tasks.par_iter().for_each(run);
        } else {
            tasks.iter().for_each(run);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (blocking, x, out);
        unreachable!("sgemm: PackedWeights exist only on x86-64 with AVX-512");
    }
}

fn apply(act: Activation, v: &mut [f32]) {
    match act {
        Activation::None => {}
        Activation::GeluTanh => vecmath::gelu_tanh_in_place(v),
        Activation::GeluErf => vecmath::gelu_erf_in_place(v),
    }
}

/// The epilogue on `row` (output values from flat index `at`), outside the microkernel.
fn finish_row(epi: Epilogue, row: &mut [f32], at: usize) {
    match epi {
        Epilogue::Act(act) => apply(act, row),
        Epilogue::ScaledResidual { gamma, res } => {
            let n = gamma.len();
            for (j, v) in row.iter_mut().enumerate() {
                *v = res[at + j] + *v * gamma[(at + j) % n];
            }
        }
    }
}

/// The output pointer, shared by tasks that write disjoint parts.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: tasks write disjoint rectangles (see `linear_with`).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

type Rect = (std::ops::Range<usize>, std::ops::Range<usize>);

/// Splits the output into tasks (rows in whole tiles, columns in whole panels), and whether to
/// run them in parallel. Every task has at most about `mc` rows, so its packed rows of `x` stay
/// in L2 (one thread walks the tasks in order).
fn plan(m: usize, n: usize, k: usize, mc: usize, threads: usize) -> (Vec<Rect>, bool) {
    let tiles = m.div_ceil(MR);
    let panels = n.div_ceil(NR);
    let threads = threads.max(1);
    let mut row_tasks = tiles.div_ceil((mc / MR).max(1)).max(1);
    // small products run on the calling thread (rayon's hand-off costs more than it saves)
    let parallel = threads > 1 && m * n * k >= (1 << 20);
    let mut col_tasks = 1;
    if parallel {
        row_tasks = (row_tasks.div_ceil(threads) * threads).min(tiles);
        if row_tasks < threads {
            col_tasks = (2 * threads).div_ceil(row_tasks).min(panels).max(1);
        }
    }
    let tiles_per = tiles.div_ceil(row_tasks);
    let panels_per = panels.div_ceil(col_tasks);
    let mut out = Vec::with_capacity(row_tasks * col_tasks);
    for r in (0..tiles).step_by(tiles_per) {
        let rows = r * MR..((r + tiles_per) * MR).min(m);
        for p in (0..panels).step_by(panels_per) {
            out.push((rows.clone(), p..(p + panels_per).min(panels)));
        }
    }
    let parallel = parallel && out.len() > 1;
    (out, parallel)
}

/// One task: rows `rows` of the output, weight panels `panels`, every K block.
///
/// # Safety
/// `dst` points to the `m x n` output; no other task writes these rows and panels at once; the
/// CPU has AVX-512F and FMA.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn task(
    x: &[f32],
    w: &PackedWeights,
    bias: Option<&[f32]>,
    epi: Epilogue,
    dst: Out,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    kc: usize,
) {
    let (n, k) = (w.n, w.k);
    let tiles = rows.len().div_ceil(MR);
    let mut apack = Aligned::zeroed(tiles * MR * kc);
    let mut k0 = 0;
    while k0 < k {
        let kl = kc.min(k - k0);
        let ap = apack.as_mut_slice();
        pack_a(x, k, rows.clone(), k0, kl, ap);
        let first = k0 == 0;
        let last = k0 + kl == k;
        for p in panels.clone() {
            let b = &w.panel(p)[k0 * NR..][..kl * NR];
            let cols = NR.min(n - p * NR);
            let bias_p = match (first, bias) {
                (true, Some(bv)) => Some(&bv[p * NR..p * NR + cols]),
                _ => None,
            };
            for t in 0..tiles {
                let r0 = rows.start + t * MR;
                let mr = MR.min(rows.end - r0);
                let a = &ap[t * MR * kl..][..MR * kl];
                let c = dst.0.add(r0 * n + p * NR);
                let residual = match (last, epi) {
                    (true, Epilogue::ScaledResidual { gamma, res }) => Some((
                        &gamma[p * NR..p * NR + cols],
                        res[r0 * n + p * NR..].as_ptr(),
                    )),
                    _ => None,
                };
                let st = Store {
                    c,
                    ldc: n,
                    cols,
                    bias: bias_p,
                    first,
                    residual,
                };
                match mr {
                    MR => tile::<MR>(kl, a, b, &st),
                    1 => tile::<1>(kl, a, b, &st),
                    2 => tile::<2>(kl, a, b, &st),
                    3 => tile::<3>(kl, a, b, &st),
                    4 => tile::<4>(kl, a, b, &st),
                    _ => tile::<5>(kl, a, b, &st),
                }
                match epi {
                    Epilogue::Act(act) if last && act != Activation::None => {
                        for i in 0..mr {
                            apply(act, std::slice::from_raw_parts_mut(c.add(i * n), cols));
                        }
                    }
                    _ => {}
                }
            }
        }
        k0 += kl;
    }
}

/// Rows `rows`, columns `k0..k0 + kl` of `x` (row length `k`) into `MR`-row micro-panels, each
/// `kl` groups of `MR` values (rows past the end are zero).
fn pack_a(x: &[f32], k: usize, rows: std::ops::Range<usize>, k0: usize, kl: usize, ap: &mut [f32]) {
    for (t, panel) in ap.chunks_exact_mut(MR * kl).enumerate() {
        let r0 = rows.start + t * MR;
        if r0 >= rows.end {
            break;
        }
        for i in 0..MR {
            let r = r0 + i;
            if r < rows.end {
                let src = &x[r * k + k0..][..kl];
                for (kk, &v) in src.iter().enumerate() {
                    panel[kk * MR + i] = v;
                }
            } else {
                for kk in 0..kl {
                    panel[kk * MR + i] = 0.0;
                }
            }
        }
    }
}

/// Where and how a tile is stored.
struct Store<'a> {
    /// The tile's first output value.
    c: *mut f32,
    ldc: usize,
    /// Valid columns (1..=NR).
    cols: usize,
    /// The panel's bias values (first K block only).
    bias: Option<&'a [f32]>,
    /// First K block: the output is overwritten, not accumulated onto.
    first: bool,
    /// Last K block of a [`Epilogue::ScaledResidual`]: the panel's `gamma` values and the
    /// tile's first residual value (same row stride as the output).
    residual: Option<(&'a [f32], *const f32)>,
}

/// The products of an `R x NR` register tile over `kl` values of K:
/// `acc[i][n] = Σ_k a[k * a_step + i] · b[k * b_step + n]`, on AVX-512 FMAs, two `k` per loop
/// (shared by [`tile`] and the CPU attention kernel's microkernel).
///
/// # Safety
/// Called from a function with AVX-512F and FMA enabled; `a` is valid for `kl` steps of `a_step`
/// values (`R` read each), `b` for `kl` steps of `b_step` values (`NR` read each).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn tile_products<const R: usize>(
    kl: usize,
    a: *const f32,
    a_step: usize,
    b: *const f32,
    b_step: usize,
) -> [[std::arch::x86_64::__m512; V]; R] {
    use std::arch::x86_64::*;
    #[inline(always)]
    unsafe fn step<const R: usize>(acc: &mut [[__m512; V]; R], pa: *const f32, pb: *const f32) {
        let mut bv = [_mm512_setzero_ps(); V];
        for (v, bv) in bv.iter_mut().enumerate() {
            *bv = _mm512_loadu_ps(pb.add(16 * v));
        }
        for (i, acc_i) in acc.iter_mut().enumerate() {
            let ai = _mm512_set1_ps(*pa.add(i));
            for v in 0..V {
                acc_i[v] = _mm512_fmadd_ps(ai, bv[v], acc_i[v]);
            }
        }
    }
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    let (mut pa, mut pb) = (a, b);
    for _ in 0..kl / 2 {
        step::<R>(&mut acc, pa, pb);
        step::<R>(&mut acc, pa.add(a_step), pb.add(b_step));
        pa = pa.add(2 * a_step);
        pb = pb.add(2 * b_step);
    }
    if kl % 2 == 1 {
        step::<R>(&mut acc, pa, pb);
    }
    acc
}

/// The store masks of a tile row with `cols` (≤ `NR`) valid columns, one per 16-lane vector.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn column_masks(cols: usize) -> [std::arch::x86_64::__mmask16; V] {
    let mut mask = [0; V];
    for (v, m) in mask.iter_mut().enumerate() {
        let c = cols.saturating_sub(16 * v).min(16);
        *m = ((1u32 << c) - 1) as u16;
    }
    mask
}

/// One `R x NR` tile over `kl` values of K: `a` is the `[kl][MR]` micro-panel of `x`, `b` the
/// `[kl][NR]` block of the weight panel.
///
/// # Safety
/// AVX-512F and FMA; `st.c` is valid for `R` rows of `st.cols` values at stride `st.ldc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn tile<const R: usize>(kl: usize, a: &[f32], b: &[f32], st: &Store) {
    use std::arch::x86_64::*;
    debug_assert!(a.len() >= kl * MR && b.len() >= kl * NR && R <= MR);
    if !st.first {
        // the partial sums of the earlier K blocks: fetch them while the products run
        for i in 0..R {
            let row = st.c.add(i * st.ldc) as *const i8;
            for v in 0..V {
                _mm_prefetch::<_MM_HINT_T0>(row.add(v * 64));
            }
        }
    }
    let acc = tile_products::<R>(kl, a.as_ptr(), MR, b.as_ptr(), NR);
    let mask = column_masks(st.cols);
    let mut add = [_mm512_setzero_ps(); V];
    if let Some(bv) = st.bias {
        for v in 0..V {
            add[v] = _mm512_maskz_loadu_ps(mask[v], bv.as_ptr().add(16 * v));
        }
    }
    let mut gamma = [_mm512_setzero_ps(); V];
    if let Some((g, _)) = st.residual {
        for v in 0..V {
            gamma[v] = _mm512_maskz_loadu_ps(mask[v], g.as_ptr().add(16 * v));
        }
    }
    for (i, acc_i) in acc.iter().enumerate() {
        let row = st.c.add(i * st.ldc);
        for v in 0..V {
            let s = if st.first {
                add[v]
            } else {
                _mm512_maskz_loadu_ps(mask[v], row.add(16 * v))
            };
            let mut y = _mm512_add_ps(acc_i[v], s);
            if let Some((_, res)) = st.residual {
                let r = _mm512_maskz_loadu_ps(mask[v], res.add(i * st.ldc + 16 * v));
                // two roundings, as `res + (y * gamma)` computed apart
                y = _mm512_add_ps(r, _mm512_mul_ps(y, gamma[v]));
            }
            _mm512_mask_storeu_ps(row.add(16 * v), mask[v], y);
        }
    }
}

/// The plain triple loop the tests check against.
#[cfg(test)]
fn reference(
    x: &[f32],
    m: usize,
    w: &[f32],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    act: Activation,
) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for kk in 0..k {
                s += x[i * k + kk] as f64 * w[j * k + kk] as f64;
            }
            out[i * n + j] = s as f32 + bias.map_or(0.0, |b| b[j]);
        }
        apply(act, &mut out[i * n..(i + 1) * n]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn check(m: usize, n: usize, k: usize, with_bias: bool, act: Activation, blocking: Blocking) {
        let x = values(m * k, 1 + m as u64);
        let w = values(n * k, 2 + n as u64);
        let b = values(n, 3 + k as u64);
        let bias = with_bias.then_some(&b[..]);
        let want = reference(&x, m, &w, n, k, bias, act);
        let Some(pw) = PackedWeights::pack(&w, n, k) else {
            // no AVX-512 here: the packing alone is still checked
            let pw = PackedWeights::pack_any_cpu(&w, n, k);
            for p in 0..n.div_ceil(NR) {
                for kk in 0..k {
                    for j in 0..NR {
                        let want = if p * NR + j < n {
                            w[(p * NR + j) * k + kk]
                        } else {
                            0.0
                        };
                        assert_eq!(pw.panel(p)[kk * NR + j], want);
                    }
                }
            }
            return;
        };
        let mut got = vec![f32::NAN; m * n];
        linear_with(&x, m, &pw, bias, act, &mut got, blocking);
        let tol = 1e-5 * (k as f32).sqrt().max(1.0) * 4.0;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= tol,
                "m={m} n={n} k={k} bias={with_bias} {act:?}: [{}, {}] {g} vs {w}",
                i / n,
                i % n
            );
        }
    }

    #[test]
    fn odd_shapes_match_the_reference() {
        let small = Blocking { kc: 7, mc: 28 };
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 33, 1),
            (13, 31, 5),
            (14, 32, 16),
            (15, 33, 17),
            (29, 65, 9),
            (3, 100, 40),
            (57, 47, 23),
            (2, 1, 300),
        ] {
            for blocking in [Blocking::default(), small] {
                check(m, n, k, true, Activation::None, blocking);
                check(m, n, k, false, Activation::None, blocking);
            }
            check(m, n, k, true, Activation::GeluTanh, small);
            check(m, n, k, true, Activation::GeluErf, Blocking::default());
        }
    }

    #[test]
    fn larger_products_split_over_threads() {
        // enough work for several tasks: rows split, and (few rows) columns split
        check(
            300,
            130,
            70,
            true,
            Activation::None,
            Blocking { kc: 32, mc: 56 },
        );
        check(5, 300, 800, true, Activation::GeluTanh, Blocking::default());
        check(
            1374 / 8,
            96,
            520,
            false,
            Activation::None,
            Blocking::default(),
        );
    }

    #[test]
    fn stacked_parts_pack_as_their_concatenation() {
        let (k, n1, n2) = (19, 70, 64);
        let a = values(n1 * k, 21);
        let b = values(n2 * k, 22);
        let whole: Vec<f32> = a.iter().chain(&b).copied().collect();
        let want = PackedWeights::pack_any_cpu(&whole, n1 + n2, k);
        let got = PackedWeights::pack_parts(&[&a, &b], k);
        assert_eq!((got.n, got.k), (n1 + n2, k));
        let len = (n1 + n2).div_ceil(NR) * k * NR;
        assert_eq!(got.data.as_slice()[..len], want.data.as_slice()[..len]);
    }

    #[test]
    fn scaled_residual_epilogue() {
        // one K block and several (kc 32), a partial last panel, a partial last tile
        for &(m, n, k, kc) in &[(13, 70, 40, 1024), (29, 64, 100, 32), (200, 130, 96, 1024)] {
            let x = values(m * k, 11);
            let w = values(n * k, 12);
            let b = values(n, 13);
            let gamma = values(n, 14);
            let res = values(m * n, 15);
            let mut want = reference(&x, m, &w, n, k, Some(&b), Activation::None);
            for (i, v) in want.iter_mut().enumerate() {
                *v = res[i] + *v * gamma[i % n];
            }
            let Some(pw) = PackedWeights::pack(&w, n, k) else {
                return;
            };
            let mut got = vec![MaybeUninit::new(f32::NAN); m * n];
            let epi = Epilogue::ScaledResidual {
                gamma: &gamma,
                res: &res,
            };
            run(
                &x,
                m,
                &pw,
                Some(&b),
                epi,
                &mut got,
                Blocking { kc, mc: 448 },
            );
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // SAFETY: every value was initialised above.
                let g = unsafe { g.assume_init() };
                assert!((g - w).abs() <= 1e-4, "m={m} n={n} k={k}: [{i}] {g} vs {w}");
            }
        }
    }

    #[test]
    fn empty_k_gives_the_bias() {
        if let Some(pw) = PackedWeights::pack(&[], 3, 0) {
            let mut out = vec![f32::NAN; 6];
            linear(
                &[],
                2,
                &pw,
                Some(&[1.0, -2.0, 3.0]),
                Activation::None,
                &mut out,
            );
            assert_eq!(out, [1.0, -2.0, 3.0, 1.0, -2.0, 3.0]);
        }
    }

    #[test]
    fn plan_covers_the_output_once() {
        for &(m, n, k, threads) in &[
            (1374, 1024, 1024, 2),
            (4096, 3072, 1024, 2),
            (3928, 1024, 4096, 2),
            (1, 6144, 1024, 2),
            (20, 64, 4096, 4),
            (1374, 1024, 1024, 1),
        ] {
            let (tasks, _) = plan(m, n, k, Blocking::default().mc, threads);
            let mut seen = vec![0u8; m.div_ceil(MR) * n.div_ceil(NR)];
            for (rows, panels) in &tasks {
                assert_eq!(rows.start % MR, 0);
                for t in rows.start / MR..rows.end.div_ceil(MR) {
                    for p in panels.clone() {
                        seen[t * n.div_ceil(NR) + p] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "{m} {n} {k} {threads}");
            if threads > 1 && m * n * k >= 1 << 20 {
                let cells = m.div_ceil(MR) * n.div_ceil(NR);
                assert!(tasks.len() >= threads.min(cells), "{m} {n} {k}: {tasks:?}");
            }
        }
    }
}
