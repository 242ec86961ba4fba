//! Fused float32 CPU paths for the element-wise work around the matrix products: tanh-GELU,
//! layer norm with its optional affine and adaLN modulation in one pass, and the gated residual
//! `x + h * gate`. candle runs each element-wise op single-threaded in its own pass with its own
//! output allocation; these run one pass over the rows on every core with the vectorised
//! primitives of `trellis_kernels::vecmath`.
//!
//! Each function takes the fast path only for float32 tensors on the CPU and otherwise returns
//! `None` (or falls back to the candle ops it replaces), so the GPU path is untouched. The math is
//! the same as the candle versions (two-pass statistics, biased variance), up to summation order.

use std::ops::Range;

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;
use trellis_kernels::vecmath;

/// Rows of at least this many values go one per task; shorter rows are grouped.
const ROWS_PER_TASK_MIN_VALUES: usize = 1 << 14;

fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// The contiguous float32 values of a CPU storage (candle errors for anything else).
fn values<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("cpu_fused: expected float32 storage")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("cpu_fused: expected a contiguous tensor"),
    }
}

/// Rows per parallel task for rows of `c` values.
fn rows_per_task(c: usize) -> usize {
    (ROWS_PER_TASK_MIN_VALUES / c.max(1)).max(1)
}

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "cpu-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut out = values(s, l)?.to_vec();
        out.par_chunks_mut(ROWS_PER_TASK_MIN_VALUES)
            .for_each(vecmath::gelu_tanh_in_place);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "cpu-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut out = values(s, l)?.to_vec();
        out.par_chunks_mut(ROWS_PER_TASK_MIN_VALUES)
            .for_each(vecmath::gelu_erf_in_place);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// `torch.nn.GELU()`, the exact erf form (candle's `gelu_erf`).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !is_cpu_f32(x) {
        return Ok(x.gelu_erf()?);
    }
    Ok(x.contiguous()?.apply_op1_no_bwd(&GeluErf)?)
}

/// `torch.nn.GELU(approximate="tanh")` (candle's `gelu`).
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if !is_cpu_f32(x) {
        return Ok(x.gelu()?);
    }
    Ok(x.contiguous()?.apply_op1_no_bwd(&GeluTanh)?)
}

/// Per-row adaLN modulation: rows `rows[b]` use `shift[b]` / `scale[b]` (`[B, C]` row-major).
#[derive(Debug, Clone)]
pub struct RowModulation {
    pub shift: Vec<f32>,
    pub scale: Vec<f32>,
    pub rows: Vec<Range<usize>>,
}

impl RowModulation {
    /// `shift`, `scale` `[B, C]`; batch element `b` owns `rows[b]`.
    pub fn new(shift: &Tensor, scale: &Tensor, rows: Vec<Range<usize>>) -> Result<Self> {
        let f = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let (shift, scale) = (f(shift)?, f(scale)?);
        if shift.len() != scale.len() || rows.is_empty() || !shift.len().is_multiple_of(rows.len())
        {
            bail!(
                "modulation: shift ({}), scale ({}) and {} batch elements do not match",
                shift.len(),
                scale.len(),
                rows.len()
            );
        }
        Ok(Self { shift, scale, rows })
    }

    /// Rows `b*l .. (b+1)*l` for each of `b` batch elements (a dense `[B, L, C]` tensor).
    pub fn dense(shift: &Tensor, scale: &Tensor, b: usize, l: usize) -> Result<Self> {
        Self::new(shift, scale, (0..b).map(|i| i * l..(i + 1) * l).collect())
    }

    /// Batch element of `row` (None: no element owns it).
    fn batch_of(&self, row: usize) -> Option<usize> {
        self.rows.iter().position(|r| r.contains(&row))
    }
}

struct LayerNormOp {
    eps: f32,
    affine: Option<(Vec<f32>, Vec<f32>)>,
    modulation: Option<RowModulation>,
}

impl CustomOp1 for LayerNormOp {
    fn name(&self) -> &'static str {
        "cpu-layer-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = values(s, l)?;
        let c = l.dims().last().copied().unwrap_or(1).max(1);
        let nrows = x.len() / c;
        if let Some((w, b)) = &self.affine {
            if w.len() != c || b.len() != c {
                candle_core::bail!("layer norm: affine parameters do not have {c} channels");
            }
        }
        if let Some(m) = &self.modulation {
            let batches = m.rows.len();
            if m.shift.len() != batches * c || m.rows.iter().any(|r| r.end > nrows) {
                candle_core::bail!("layer norm: modulation does not match [{nrows}, {c}]");
            }
        }
        let mut out = vec![0f32; x.len()];
        let per = rows_per_task(c);
        out.par_chunks_mut(per * c)
            .zip(x.par_chunks(per * c))
            .enumerate()
            .for_each(|(task, (dst, src))| {
                for (i, (d, r)) in dst.chunks_exact_mut(c).zip(src.chunks_exact(c)).enumerate() {
                    let row = task * per + i;
                    let (mean, var) = vecmath::mean_var(r);
                    let rstd = 1.0 / (var + self.eps).sqrt();
                    let affine = self.affine.as_ref().map(|(w, b)| (&w[..], &b[..]));
                    let modulation = self.modulation.as_ref().and_then(|m| {
                        m.batch_of(row)
                            .map(|b| (&m.shift[b * c..(b + 1) * c], &m.scale[b * c..(b + 1) * c]))
                    });
                    vecmath::normalize_row(r, mean, rstd, affine, modulation, d);
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// Layer norm over the last dimension of a float32 CPU tensor (eps, optional affine `weight` /
/// `bias`, optional modulation `y * (1 + scale) + shift` after it); `None` when `x` is not a
/// float32 CPU tensor.
pub fn layer_norm(
    x: &Tensor,
    eps: f64,
    affine: Option<(&Tensor, &Tensor)>,
    modulation: Option<RowModulation>,
) -> Result<Option<Tensor>> {
    if !is_cpu_f32(x) || x.rank() == 0 {
        return Ok(None);
    }
    let affine = match affine {
        Some((w, b)) => Some((
            w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
        )),
        None => None,
    };
    let op = LayerNormOp {
        eps: eps as f32,
        affine,
        modulation,
    };
    Ok(Some(x.contiguous()?.apply_op1_no_bwd(&op)?))
}

struct GatedAdd {
    gate: RowModulation,
}

impl CustomOp2 for GatedAdd {
    fn name(&self) -> &'static str {
        "cpu-gated-add"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        hs: &CpuStorage,
        hl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, h) = (values(xs, xl)?, values(hs, hl)?);
        let c = xl.dims().last().copied().unwrap_or(1).max(1);
        if h.len() != x.len() || self.gate.shift.len() != self.gate.rows.len() * c {
            candle_core::bail!("gated add: shapes do not match");
        }
        let mut out = x.to_vec();
        let per = rows_per_task(c);
        let g = &self.gate;
        out.par_chunks_mut(per * c)
            .zip(h.par_chunks(per * c))
            .enumerate()
            .for_each(|(task, (dst, src))| {
                for (i, (d, r)) in dst.chunks_exact_mut(c).zip(src.chunks_exact(c)).enumerate() {
                    if let Some(b) = g.batch_of(task * per + i) {
                        let gate = &g.shift[b * c..(b + 1) * c];
                        for k in 0..c {
                            d[k] += r[k] * gate[k];
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// `x + h * gate[b]` row-wise (`gate` `[B, C]`, batch element `b` owning `rows[b]`); rows no
/// element owns keep `x`. `None` unless both are float32 CPU tensors of one shape.
pub fn gated_add(
    x: &Tensor,
    h: &Tensor,
    gate: &Tensor,
    rows: Vec<Range<usize>>,
) -> Result<Option<Tensor>> {
    if !is_cpu_f32(x) || !is_cpu_f32(h) || x.dims() != h.dims() || x.rank() == 0 {
        return Ok(None);
    }
    let gate = RowModulation::new(gate, gate, rows)?;
    let op = GatedAdd { gate };
    Ok(Some(
        x.contiguous()?.apply_op2_no_bwd(&h.contiguous()?, &op)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn close(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn fused_ops_match_the_candle_ops() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 2.0, (2, 37, 48), &dev).unwrap();
        assert!(close(&gelu_tanh(&x).unwrap(), &x.gelu().unwrap()) < 1e-5);
        assert!(close(&gelu_erf(&x).unwrap(), &x.gelu_erf().unwrap()) < 1e-5);

        let w = Tensor::randn(1f32, 0.1, 48, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, 48, &dev).unwrap();
        let shift = Tensor::randn(0f32, 0.5, (2, 48), &dev).unwrap();
        let scale = Tensor::randn(0f32, 0.5, (2, 48), &dev).unwrap();
        let m = RowModulation::dense(&shift, &scale, 2, 37).unwrap();
        let got = layer_norm(&x, 1e-6, Some((&w, &b)), Some(m))
            .unwrap()
            .unwrap();
        let ln = crate::modules::norm::LayerNorm32::from_parts(Some(w), Some(b), 1e-6);
        let want =
            crate::modules::transformer::modulate(&ln.forward_candle(&x).unwrap(), &shift, &scale)
                .unwrap();
        assert!(close(&got, &want) < 1e-5, "{}", close(&got, &want));

        let h = Tensor::randn(0f32, 1.0, (2, 37, 48), &dev).unwrap();
        let got = gated_add(&x, &h, &shift, vec![0..37, 37..74])
            .unwrap()
            .unwrap();
        let want = (&x + h.broadcast_mul(&shift.unsqueeze(1).unwrap()).unwrap()).unwrap();
        assert!(close(&got, &want) < 1e-6);
        // not float32: no fast path
        let x16 = x.to_dtype(DType::F16).unwrap();
        assert!(layer_norm(&x16, 1e-6, None, None).unwrap().is_none());
    }
}
