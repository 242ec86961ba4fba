//! Launchers of the fused transformer-block kernels (`kernels/src/cuda/fused.cu`): Linear bias
//! (+ GELU / SiLU), LayerNorm32 (+ adaLN modulation), gated residual, per-head RMS norm. Each one
//! replaces several of candle's generic elementwise passes (and the float32 round trip of every
//! norm) with one; the modules call them through `modules::gpu_fused`, which falls back to
//! candle's ops where a shape or dtype is not covered. `cuda` builds only.

use candle_core::cuda_backend::cudarc::cublaslt::{
    Activation as LtActivation, CudaBlasLT, Matmul, MatmulConfig,
};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{DType, Layout, Result, Storage, Tensor};
use trellis_kernels::cuda::{self as k, FUSED_MAX_SEGMENTS};

use super::cuda_ops::module;

fn err(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("fused kernel: {msg}"))
}

/// Row ranges of the batch elements (`Segments` in fused.cu): rows `[ends[b-1], ends[b])` use
/// batch element `b`'s modulation / gate.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Segments {
    n: i32,
    ends: [i32; FUSED_MAX_SEGMENTS],
}

// SAFETY: plain-old-data, laid out as the kernel's `struct Segments { int n; int ends[8]; }`.
unsafe impl DeviceRepr for Segments {}

impl Segments {
    /// From the end row of each batch element (ascending); `None` beyond the kernel's limit.
    pub fn from_ends(ends: &[usize]) -> Option<Self> {
        if ends.is_empty() || ends.len() > FUSED_MAX_SEGMENTS {
            return None;
        }
        let mut s = Segments {
            n: ends.len() as i32,
            ends: [0; FUSED_MAX_SEGMENTS],
        };
        for (d, &e) in s.ends.iter_mut().zip(ends) {
            *d = i32::try_from(e).ok()?;
        }
        Some(s)
    }

    /// `b` batch elements of `l` rows each.
    pub fn dense(b: usize, l: usize) -> Option<Self> {
        Self::from_ends(&(1..=b).map(|i| i * l).collect::<Vec<_>>())
    }
}

/// The activation `bias_act` applies after the bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None = 0,
    GeluTanh = 1,
    Silu = 2,
}

/// A CUDA view of `t`'s storage from its layout's start offset to the end of what the layout
/// reaches (the kernels apply their own strides), with the storage's read guard held by the caller.
pub(crate) fn view<'a, T: candle_core::cuda_backend::CudaDType>(
    s: &'a Storage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(c) = s else {
        return Err(err(format!("{what} is not on a CUDA device")));
    };
    let slice = c.as_cuda_slice::<T>()?;
    let start = l.start_offset();
    if start > slice.len() {
        return Err(err(format!("{what}: offset beyond its storage")));
    }
    Ok(slice.slice(start..))
}

pub(crate) fn device_of(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        candle_core::Device::Cuda(d) => Ok(d.clone()),
        _ => Err(err("tensor is not on a CUDA device")),
    }
}

pub(crate) fn wrap<T: candle_core::cuda_backend::CudaDType>(
    out: CudaSlice<T>,
    dev: &CudaDevice,
    shape: &[usize],
) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone())),
        shape,
        BackpropOp::none(),
        false,
    )
}

fn grid_for(n: usize, threads: u32) -> u32 {
    n.div_ceil(threads as usize).clamp(1, 65_535 * 8) as u32
}

const NULL: u64 = 0;

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => return Err(err(format!("{other:?} not supported"))),
    })
}

fn check_contiguous(t: &Tensor, what: &str) -> Result<()> {
    if t.is_contiguous() {
        Ok(())
    } else {
        Err(err(format!("{what} must be contiguous")))
    }
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| err(format!("{what} = {v} does not fit in int32")))
}

/// `act(y + bias)` with `bias` `[C]` broadcast over the rows of a contiguous `y` `[..., C]`;
/// `bias` may be absent (activation only). Output in `y`'s dtype and shape.
pub fn bias_act(y: &Tensor, bias: Option<&Tensor>, act: Act) -> Result<Tensor> {
    check_contiguous(y, "y")?;
    let dev = device_of(y)?;
    let cols = y.dims().last().copied().unwrap_or(1);
    if let Some(b) = bias {
        check_contiguous(b, "bias")?;
        if b.elem_count() != cols || b.dtype() != y.dtype() {
            return Err(err(format!(
                "bias {:?} {:?} does not match y's last dim {cols} {:?}",
                b.dims(),
                b.dtype(),
                y.dtype()
            )));
        }
    }
    let n = y.elem_count();
    let entry = format!("bias_act_{}", suffix(y.dtype())?);
    let func = module(&dev, &k::FUSED)?.load_function(&entry).w()?;
    let stream = dev.cuda_stream();
    let cfg = LaunchConfig {
        grid_dim: (grid_for(n, 256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (cols, act) = (i32_of(cols, "columns")?, act as i32);
    let n64 = n as u64;
    macro_rules! go {
        ($t:ty) => {{
            // SAFETY: every element is written by the kernel before the tensor is read.
            let out = unsafe { dev.alloc::<$t>(n)? };
            let (gy, ly) = y.storage_and_layout();
            let ys = view::<$t>(&gy, ly, "y")?;
            let gb = bias.map(|b| b.storage_and_layout());
            let bs = match &gb {
                Some((g, l)) => Some(view::<$t>(g, l, "bias")?),
                None => None,
            };
            let mut b = stream.launch_builder(&func);
            b.arg(&ys);
            match &bs {
                Some(v) => b.arg(v),
                None => b.arg(&NULL),
            };
            b.arg(&out).arg(&n64).arg(&cols).arg(&act);
            // SAFETY: argument types and order match `bias_act_*`; sizes checked above.
            unsafe { b.launch(cfg) }.w()?;
            Ok(wrap(out, &dev, y.dims()))
        }};
    }
    match y.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    }
}

/// The adaLN modulation of [`layer_norm`]: `shift` / `scale` `[B, C]` (rows may be strided, e.g.
/// column slices of the `[B, 6C]` modulation vector) in the input's dtype, batch element `b`
/// owning the rows of `segments`.
pub struct Modulation<'a> {
    pub shift: &'a Tensor,
    pub scale: &'a Tensor,
    pub segments: Segments,
}

/// The `[B, C]` row stride of a modulation operand whose last dim is contiguous.
fn row_stride(t: &Tensor, c: usize, what: &str) -> Result<usize> {
    let (b, cc) = t
        .dims2()
        .map_err(|_| err(format!("{what} must be [B, C]")))?;
    let st = t.stride();
    if cc != c || st[1] != 1 {
        return Err(err(format!(
            "{what} {:?} is not [B, {c}] row-major",
            t.dims()
        )));
    }
    Ok(if b == 1 { c } else { st[0] })
}

/// LayerNorm32 over the last dim of a contiguous `x` (`[rows, C]` seen flat), float32 statistics,
/// optional float32 affine `(weight, bias)`, rounded to `x`'s dtype; then the optional adaLN
/// modulation `y * (1 + scale) + shift` in `x`'s dtype.
pub fn layer_norm(
    x: &Tensor,
    eps: f64,
    affine: Option<(&Tensor, &Tensor)>,
    modulation: Option<Modulation>,
) -> Result<Tensor> {
    Ok(norm(x, None, eps, affine, modulation)?.1)
}

/// The residual before a norm: `x + h`, or `x + h * gate[b]` with batch element `b` (`gate`
/// `[B, C]`) owning the rows of `segments`.
pub struct Residual<'a> {
    pub h: &'a Tensor,
    pub gate: Option<&'a Tensor>,
    pub segments: Segments,
}

/// `x + h [* gate]` ([`gated_add`] / [`add`]) and [`layer_norm`] of that sum in one pass (one read
/// of the residual stream instead of two, one launch instead of two), both results as the two
/// kernels give them: `(sum, normed)`. A modulation must use the residual's segments.
pub fn add_layer_norm(
    x: &Tensor,
    residual: Residual,
    eps: f64,
    affine: Option<(&Tensor, &Tensor)>,
    modulation: Option<Modulation>,
) -> Result<(Tensor, Tensor)> {
    let (sum, y) = norm(x, Some(residual), eps, affine, modulation)?;
    Ok((sum.ok_or_else(|| err("add_layer_norm: no sum"))?, y))
}

/// `layer_norm_*` without a residual, `add_layer_norm_*` with one (then also the sum).
fn norm(
    x: &Tensor,
    residual: Option<Residual>,
    eps: f64,
    affine: Option<(&Tensor, &Tensor)>,
    modulation: Option<Modulation>,
) -> Result<(Option<Tensor>, Tensor)> {
    check_contiguous(x, "x")?;
    let dev = device_of(x)?;
    let cols = x.dims().last().copied().unwrap_or(1);
    let rows = x.elem_count() / cols.max(1);
    if let Some((w, b)) = affine {
        for (t, what) in [(w, "weight"), (b, "bias")] {
            check_contiguous(t, what)?;
            if t.dtype() != DType::F32 || t.elem_count() != cols {
                return Err(err(format!("norm {what} must be float32 [{cols}]")));
            }
        }
    }
    let mut mod_stride = 0usize;
    let mut segments = Segments::dense(1, rows).ok_or_else(|| err("rows overflow"))?;
    let mut gate_stride = 0usize;
    if let Some(r) = &residual {
        check_contiguous(r.h, "h")?;
        if r.h.dims() != x.dims()
            || r.h.dtype() != x.dtype()
            || r.gate.is_some_and(|g| g.dtype() != x.dtype())
        {
            return Err(err(
                "add_layer_norm: x, h and gate must agree in shape and dtype",
            ));
        }
        if let Some(g) = r.gate {
            gate_stride = row_stride(g, cols, "gate")?;
        }
        segments = r.segments;
    }
    if let Some(m) = &modulation {
        for t in [m.shift, m.scale] {
            if t.dtype() != x.dtype() {
                return Err(err("modulation dtype differs from x's"));
            }
        }
        let s1 = row_stride(m.shift, cols, "shift")?;
        let s2 = row_stride(m.scale, cols, "scale")?;
        if s1 != s2 {
            return Err(err("shift and scale have different row strides"));
        }
        mod_stride = s1;
        if residual.is_some() && (m.segments.n, m.segments.ends) != (segments.n, segments.ends) {
            return Err(err(
                "add_layer_norm: the modulation's rows differ from the gate's",
            ));
        }
        segments = m.segments;
    }
    let entry = format!(
        "{}layer_norm_{}",
        if residual.is_some() { "add_" } else { "" },
        suffix(x.dtype())?
    );
    let func = module(&dev, &k::FUSED)?.load_function(&entry).w()?;
    let stream = dev.cuda_stream();
    // One warp per row, four rows per block.
    let cfg = LaunchConfig {
        grid_dim: (
            u32::try_from(rows.div_ceil(4)).map_err(|_| err("too many rows"))?,
            1,
            1,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows_i, cols_i, eps_f) = (i32_of(rows, "rows")?, i32_of(cols, "cols")?, eps as f32);
    let mod_stride = i32_of(mod_stride, "modulation stride")?;
    let gate_stride = i32_of(gate_stride, "gate stride")?;
    macro_rules! go {
        ($t:ty) => {{
            // SAFETY: every element of both outputs is written by the kernel (one warp per row).
            let out = unsafe { dev.alloc::<$t>(x.elem_count())? };
            let sum = if residual.is_some() {
                Some(unsafe { dev.alloc::<$t>(x.elem_count())? })
            } else {
                None
            };
            let (gx, lx) = x.storage_and_layout();
            let xs = view::<$t>(&gx, lx, "x")?;
            let gr = residual.as_ref().map(|r| {
                (
                    r.h.storage_and_layout(),
                    r.gate.map(|g| g.storage_and_layout()),
                )
            });
            let rvs = match &gr {
                Some(((gh, lh), g)) => Some((
                    view::<$t>(gh, lh, "h")?,
                    match g {
                        Some((gg, lg)) => Some(view::<$t>(gg, lg, "gate")?),
                        None => None,
                    },
                )),
                None => None,
            };
            let ga = affine.map(|(w, b)| (w.storage_and_layout(), b.storage_and_layout()));
            let avs = match &ga {
                Some(((gw, lw), (gb, lb))) => {
                    Some((view::<f32>(gw, lw, "weight")?, view::<f32>(gb, lb, "bias")?))
                }
                None => None,
            };
            let gm = modulation
                .as_ref()
                .map(|m| (m.shift.storage_and_layout(), m.scale.storage_and_layout()));
            let mvs = match &gm {
                Some(((gs, ls), (gc, lc))) => {
                    Some((view::<$t>(gs, ls, "shift")?, view::<$t>(gc, lc, "scale")?))
                }
                None => None,
            };
            let mut b = stream.launch_builder(&func);
            b.arg(&xs);
            if let (Some((h, g)), Some(sum)) = (&rvs, &sum) {
                b.arg(h);
                match g {
                    Some(g) => b.arg(g),
                    None => b.arg(&NULL),
                };
                b.arg(&gate_stride).arg(sum);
            }
            b.arg(&out).arg(&rows_i).arg(&cols_i).arg(&eps_f);
            match &avs {
                Some((w, bb)) => b.arg(w).arg(bb),
                None => b.arg(&NULL).arg(&NULL),
            };
            match &mvs {
                Some((s, c)) => b.arg(s).arg(c),
                None => b.arg(&NULL).arg(&NULL),
            };
            b.arg(&mod_stride).arg(&segments);
            if rows > 0 {
                // SAFETY: argument types and order match `layer_norm_*` / `add_layer_norm_*`
                // (x, [h, gate, gate_stride, xout,] out, rows, cols, eps, w, b, shift, scale,
                // mod_stride, seg); sizes checked above.
                unsafe { b.launch(cfg) }.w()?;
            }
            Ok((
                sum.map(|s| wrap(s, &dev, x.dims())),
                wrap(out, &dev, x.dims()),
            ))
        }};
    }
    match x.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    }
}

/// `x + h * gate[b]` for contiguous `x`, `h` `[rows, C]` (any rank, flat rows) and `gate` `[B, C]`
/// (rows may be strided), batch element `b` owning the rows of `segments`.
pub fn gated_add(x: &Tensor, h: &Tensor, gate: &Tensor, segments: Segments) -> Result<Tensor> {
    residual(x, h, Some(gate), segments)
}

/// `x + h` for contiguous `x`, `h` of one shape and dtype (the blocks' plain residual), in the
/// same kernel as [`gated_add`]: 16-byte vectors, float32 sum rounded once.
pub fn add(x: &Tensor, h: &Tensor) -> Result<Tensor> {
    let rows = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
    let seg = Segments::dense(1, rows).ok_or_else(|| err("add: too many rows"))?;
    residual(x, h, None, seg)
}

fn residual(x: &Tensor, h: &Tensor, gate: Option<&Tensor>, segments: Segments) -> Result<Tensor> {
    check_contiguous(x, "x")?;
    check_contiguous(h, "h")?;
    if x.dims() != h.dims()
        || x.dtype() != h.dtype()
        || gate.is_some_and(|g| g.dtype() != x.dtype())
    {
        return Err(err(format!(
            "{}: x, h and gate must agree in shape and dtype",
            if gate.is_some() { "gated_add" } else { "add" }
        )));
    }
    let dev = device_of(x)?;
    let cols = x.dims().last().copied().unwrap_or(1);
    let rows = x.elem_count() / cols.max(1);
    let gstride = match gate {
        Some(g) => i32_of(row_stride(g, cols, "gate")?, "gate stride")?,
        None => 0,
    };
    let entry = format!("gated_add_{}", suffix(x.dtype())?);
    let func = module(&dev, &k::FUSED)?.load_function(&entry).w()?;
    let stream = dev.cuda_stream();
    let n = x.elem_count();
    // one 16-byte vector per thread on the kernel's fast path
    let per_thread = 16 / x.dtype().size_in_bytes();
    let cfg = LaunchConfig {
        grid_dim: (grid_for(n.div_ceil(per_thread), 256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows64, cols_i) = (rows as u64, i32_of(cols, "cols")?);
    macro_rules! go {
        ($t:ty) => {{
            // SAFETY: every element is written by the kernel.
            let out = unsafe { dev.alloc::<$t>(n)? };
            let (gx, lx) = x.storage_and_layout();
            let (gh, lh) = h.storage_and_layout();
            let gg = gate.map(|g| g.storage_and_layout());
            let (xs, hs) = (view::<$t>(&gx, lx, "x")?, view::<$t>(&gh, lh, "h")?);
            let gs = match &gg {
                Some((g, l)) => Some(view::<$t>(g, l, "gate")?),
                None => None,
            };
            let mut b = stream.launch_builder(&func);
            b.arg(&xs).arg(&hs);
            match &gs {
                Some(g) => b.arg(g),
                None => b.arg(&NULL),
            };
            b.arg(&gstride)
                .arg(&out)
                .arg(&rows64)
                .arg(&cols_i)
                .arg(&segments);
            // SAFETY: argument types and order match `gated_add_*`; sizes checked above.
            unsafe { b.launch(cfg) }.w()?;
            Ok(wrap(out, &dev, x.dims()))
        }};
    }
    match x.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    }
}

/// MultiHeadRMSNorm of `x` `[..., heads, dim]` whose (heads, dim) block is contiguous and whose
/// leading dims flatten to rows a fixed stride apart (q / k sliced out of a packed projection):
/// `normalize(x) * gamma * scale` in float32, rounded to `x`'s dtype, contiguous output.
pub fn rms_norm_heads(x: &Tensor, gamma: &Tensor, scale: f64) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let st = x.stride().to_vec();
    let r = dims.len();
    if r < 3 {
        return Err(err("rms_norm_heads: x must be [..., heads, dim]"));
    }
    let (heads, dim) = (dims[r - 2], dims[r - 1]);
    if st[r - 1] != 1 || st[r - 2] != dim {
        return Err(err("rms_norm_heads: (heads, dim) must be contiguous"));
    }
    // Leading dims must flatten with one row stride.
    let rows: usize = dims[..r - 2].iter().product();
    let row_stride = st[r - 3];
    let mut expect = row_stride;
    for i in (0..r - 3).rev() {
        expect *= dims[i + 1];
        if dims[i] > 1 && st[i] != expect {
            return Err(err("rms_norm_heads: leading dims do not flatten"));
        }
    }
    check_contiguous(gamma, "gamma")?;
    if gamma.dtype() != DType::F32 || gamma.elem_count() != heads * dim {
        return Err(err("rms_norm_heads: gamma must be float32 [heads, dim]"));
    }
    let dev = device_of(x)?;
    let entry = format!("rms_norm_heads_{}", suffix(x.dtype())?);
    let func = module(&dev, &k::FUSED)?.load_function(&entry).w()?;
    let stream = dev.cuda_stream();
    // The kernel's fast path runs dim / V threads per (row, head) (V elements of 16 bytes each),
    // the other one warp; both walk the grid in strides, so this only sizes it.
    let v = 16 / x.dtype().size_in_bytes();
    let lanes = dim / v;
    let vectors = dim.is_multiple_of(v)
        && (1..=32).contains(&lanes)
        && lanes.is_power_of_two()
        && row_stride.is_multiple_of(v)
        && x.layout().start_offset().is_multiple_of(v);
    let threads = rows * heads * if vectors { lanes } else { 32 };
    let cfg = LaunchConfig {
        grid_dim: (grid_for(threads, 256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rs, rows_i, heads_i, dim_i, sc) = (
        row_stride as u64,
        i32_of(rows, "rows")?,
        i32_of(heads, "heads")?,
        i32_of(dim, "dim")?,
        scale as f32,
    );
    let n = rows * heads * dim;
    macro_rules! go {
        ($t:ty) => {{
            // SAFETY: every element is written by the kernel (each (row, head) by one warp or
            // lane group).
            let out = unsafe { dev.alloc::<$t>(n)? };
            let (gx, lx) = x.storage_and_layout();
            let (gg, lg) = gamma.storage_and_layout();
            let (xs, gs) = (view::<$t>(&gx, lx, "x")?, view::<f32>(&gg, lg, "gamma")?);
            let mut b = stream.launch_builder(&func);
            b.arg(&xs)
                .arg(&rs)
                .arg(&gs)
                .arg(&out)
                .arg(&rows_i)
                .arg(&heads_i)
                .arg(&dim_i)
                .arg(&sc);
            if n > 0 {
                // SAFETY: argument types and order match `rms_norm_heads_*`; strides checked.
                unsafe { b.launch(cfg) }.w()?;
            }
            Ok(wrap(out, &dev, &dims))
        }};
    }
    match x.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    }
}

/// SparseDownsample's mean on the device: `out[j] = sum(feats[members[starts[j]..starts[j+1]]])
/// / (count + 1)` (the original's include_self scatter-mean), float32 sums in the members' order,
/// `feats`' dtype out. `starts` int32 `[segments + 1]`, `members` int32 `[rows]`.
pub fn segment_mean(feats: &Tensor, starts: &Tensor, members: &Tensor) -> Result<Tensor> {
    check_contiguous(feats, "feats")?;
    check_contiguous(starts, "starts")?;
    check_contiguous(members, "members")?;
    let (_, cols) = feats.dims2()?;
    if starts.dtype() != DType::I32 || members.dtype() != DType::I32 || starts.elem_count() == 0 {
        return Err(err(
            "segment_mean: starts / members must be int32, starts non-empty",
        ));
    }
    let segments = starts.elem_count() - 1;
    let dev = device_of(feats)?;
    let entry = format!("segment_mean_{}", suffix(feats.dtype())?);
    let func = module(&dev, &k::FUSED)?.load_function(&entry).w()?;
    let stream = dev.cuda_stream();
    let n = segments * cols;
    let cfg = LaunchConfig {
        grid_dim: (grid_for(n, 256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (seg_i, cols_i) = (i32_of(segments, "segments")?, i32_of(cols, "cols")?);
    macro_rules! go {
        ($t:ty) => {{
            // SAFETY: every element is written by the kernel.
            let out = unsafe { dev.alloc::<$t>(n)? };
            let (gf, lf) = feats.storage_and_layout();
            let (gs, ls) = starts.storage_and_layout();
            let (gm, lm) = members.storage_and_layout();
            let (fs, ss, ms) = (
                view::<$t>(&gf, lf, "feats")?,
                view::<i32>(&gs, ls, "starts")?,
                view::<i32>(&gm, lm, "members")?,
            );
            let mut b = stream.launch_builder(&func);
            b.arg(&fs)
                .arg(&ss)
                .arg(&ms)
                .arg(&out)
                .arg(&seg_i)
                .arg(&cols_i);
            if n > 0 {
                // SAFETY: argument types and order match `segment_mean_*`; the caller builds
                // starts / members from the same rows as feats.
                unsafe { b.launch(cfg) }.w()?;
            }
            Ok(wrap(out, &dev, &[segments, cols]))
        }};
    }
    match feats.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    }
}

/// One cuBLASLt handle (with its workspace) per device, on candle's stream.
fn blas_lt(dev: &CudaDevice) -> Result<std::sync::Arc<CudaBlasLT>> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    static LT: OnceLock<Mutex<HashMap<candle_core::cuda_backend::DeviceId, Arc<CudaBlasLT>>>> =
        OnceLock::new();
    let map = LT.get_or_init(|| Mutex::new(HashMap::new()));
    let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(h) = m.get(&dev.id()) {
        return Ok(h.clone());
    }
    let h =
        Arc::new(CudaBlasLT::new(dev.cuda_stream()).map_err(|e| err(format!("cuBLASLt: {e:?}")))?);
    m.insert(dev.id(), h.clone());
    Ok(h)
}

/// `act(x · wᵀ + bias)` in one cuBLASLt call with the bias (and GELU) in its epilogue, for float16 /
/// bfloat16 `x` `[rows, Cin]`, `w` `[Cout, Cin]` and `bias` `[Cout]` of one dtype (float32
/// accumulation, one rounding of the result, as PyTorch's `addmm` through cuBLASLt).
pub fn linear_lt(x: &Tensor, w: &Tensor, bias: &Tensor, act: Act) -> Result<Tensor> {
    lt_product(x, w, Some(bias), act)
}

/// `x · wᵀ` in one cuBLASLt call (no bias, no epilogue) for float16 / bfloat16 `x` `[rows, Cin]`
/// and `w` `[Cout, Cin]`: float32 accumulation, the result rounded once to the inputs' dtype.
pub fn matmul_lt(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    lt_product(x, w, None, Act::None)
}

fn lt_product(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, act: Act) -> Result<Tensor> {
    let (rows, cin) = x.dims2()?;
    let (cout, wcin) = w.dims2()?;
    let dt = x.dtype();
    let bias_ok = bias.is_none_or(|b| b.elem_count() == cout && b.dtype() == dt);
    if wcin != cin || !bias_ok || w.dtype() != dt {
        return Err(err("linear_lt: shapes or dtypes do not agree"));
    }
    for (t, what) in [(x, "x"), (w, "weight")] {
        check_contiguous(t, what)?;
    }
    if let Some(b) = bias {
        check_contiguous(b, "bias")?;
    }
    let act = match act {
        Act::None => None,
        Act::GeluTanh => Some(LtActivation::Gelu),
        Act::Silu => return Err(err("linear_lt: no SiLU epilogue")),
    };
    let dev = device_of(x)?;
    let lt = blas_lt(&dev)?;
    let cfg = MatmulConfig {
        transa: true,
        transb: false,
        transc: false,
        m: cout as u64,
        n: rows as u64,
        k: cin as u64,
        alpha: 1.0,
        lda: cin as i64,
        ldb: cin as i64,
        beta: 0.0,
        ldc: cout as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    macro_rules! go {
        ($t:ty) => {{
            // SAFETY: cuBLASLt writes every element of the [rows, cout] output (beta = 0).
            let mut out = unsafe { dev.alloc::<$t>(rows * cout)? };
            let (gx, lx) = x.storage_and_layout();
            let (gw, lw) = w.storage_and_layout();
            let gb = bias.map(|b| b.storage_and_layout());
            let (xs, ws) = (view::<$t>(&gx, lx, "x")?, view::<$t>(&gw, lw, "weight")?);
            let bs = match &gb {
                Some((g, l)) => Some(view::<$t>(g, l, "bias")?),
                None => None,
            };
            if rows > 0 {
                // SAFETY: column-major view of the row-major product: A = w (transposed, lda =
                // Cin), B = x (ldb = Cin), C = out (ldc = Cout); sizes checked above.
                unsafe { lt.matmul(cfg, &ws, &xs, &mut out, bs.as_ref(), act.as_ref()) }
                    .map_err(|e| err(format!("cuBLASLt matmul: {e:?}")))?;
            }
            Ok(wrap(out, &dev, &[rows, cout]))
        }};
    }
    match dt {
        DType::F16 => go!(half::f16),
        DType::BF16 => go!(half::bf16),
        other => Err(err(format!("linear_lt: {other:?} (f16 or bf16 only)"))),
    }
}
