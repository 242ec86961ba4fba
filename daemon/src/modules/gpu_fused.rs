//! GPU fast paths of the blocks' elementwise work, the twin of `cpu_fused` on the other side:
//! each function returns `None` (nothing computed, the caller uses candle's ops) unless `x` is on
//! a CUDA device, in float32 / float16 / bfloat16, in a shape the fused kernels cover
//! (`runtime::cuda_fused`). Without the `cuda` feature every function returns `None`, and
//! [`linear`] is candle's Linear.

use std::ops::Range;

use anyhow::Result;
use candle_core::{Module, Tensor};
use candle_nn::Linear;

use super::dense::Dense;

/// Activation fused after a Linear's bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None,
    GeluTanh,
    /// The exact erf GELU (not fused on the GPU: candle's op after the product there).
    GeluErf,
}

/// The end row of each batch element when `rows` are consecutive ranges from 0 covering `n` rows.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn ends(rows: &[Range<usize>], n: usize) -> Option<Vec<usize>> {
    let mut at = 0;
    for r in rows {
        if r.start != at {
            return None;
        }
        at = r.end;
    }
    (at == n).then(|| rows.iter().map(|r| r.end).collect())
}

#[cfg(feature = "cuda")]
mod imp {
    use super::*;
    use crate::runtime::cuda_fused::{self as f, Modulation, Segments};
    use candle_core::DType;

    fn on_gpu(x: &Tensor) -> bool {
        x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
    }

    fn rows_of(x: &Tensor) -> usize {
        let c = x.dims().last().copied().unwrap_or(1).max(1);
        x.elem_count() / c
    }

    pub fn layer_norm(
        x: &Tensor,
        eps: f64,
        affine: Option<(&Tensor, &Tensor)>,
        modulation: Option<(&Tensor, &Tensor, &[Range<usize>])>,
    ) -> Result<Option<Tensor>> {
        if !on_gpu(x) {
            return Ok(None);
        }
        let m = match modulation {
            Some((shift, scale, rows)) => {
                let Some(seg) = ends(rows, rows_of(x)).and_then(|e| Segments::from_ends(&e)) else {
                    return Ok(None);
                };
                if shift.dtype() != x.dtype() || scale.dtype() != x.dtype() {
                    return Ok(None);
                }
                Some(Modulation {
                    shift,
                    scale,
                    segments: seg,
                })
            }
            None => None,
        };
        Ok(Some(f::layer_norm(&x.contiguous()?, eps, affine, m)?))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn add_layer_norm(
        x: &Tensor,
        h: &Tensor,
        gate: Option<&Tensor>,
        rows: &[Range<usize>],
        eps: f64,
        affine: Option<(&Tensor, &Tensor)>,
        modulation: Option<(&Tensor, &Tensor)>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let same = |t: Option<&Tensor>| t.is_none_or(|t| t.dtype() == x.dtype());
        if !on_gpu(x)
            || h.dtype() != x.dtype()
            || h.dims() != x.dims()
            || !same(gate)
            || !same(modulation.map(|m| m.0))
            || !same(modulation.map(|m| m.1))
        {
            return Ok(None);
        }
        let Some(seg) = ends(rows, rows_of(x)).and_then(|e| Segments::from_ends(&e)) else {
            return Ok(None);
        };
        let residual = f::Residual {
            h: &h.contiguous()?,
            gate,
            segments: seg,
        };
        let m = modulation.map(|(shift, scale)| Modulation {
            shift,
            scale,
            segments: seg,
        });
        Ok(Some(f::add_layer_norm(
            &x.contiguous()?,
            residual,
            eps,
            affine,
            m,
        )?))
    }

    pub fn gated_add(
        x: &Tensor,
        h: &Tensor,
        gate: &Tensor,
        rows: &[Range<usize>],
    ) -> Result<Option<Tensor>> {
        if !on_gpu(x) || h.dtype() != x.dtype() || gate.dtype() != x.dtype() {
            return Ok(None);
        }
        let Some(seg) = ends(rows, rows_of(x)).and_then(|e| Segments::from_ends(&e)) else {
            return Ok(None);
        };
        Ok(Some(f::gated_add(
            &x.contiguous()?,
            &h.contiguous()?,
            gate,
            seg,
        )?))
    }

    pub fn add(x: &Tensor, h: &Tensor) -> Result<Option<Tensor>> {
        if !on_gpu(x) || h.dtype() != x.dtype() || h.dims() != x.dims() {
            return Ok(None);
        }
        Ok(Some(f::add(&x.contiguous()?, &h.contiguous()?)?))
    }

    pub fn rms_norm_heads(x: &Tensor, gamma: &Tensor, scale: f64) -> Result<Option<Tensor>> {
        if !on_gpu(x) {
            return Ok(None);
        }
        // Views the kernel cannot stride through (e.g. heads not adjacent) go through a copy.
        match f::rms_norm_heads(x, gamma, scale) {
            Ok(y) => Ok(Some(y)),
            Err(_) => Ok(Some(f::rms_norm_heads(&x.contiguous()?, gamma, scale)?)),
        }
    }

    pub fn linear(l: &Linear, x: &Tensor, act: Act) -> Result<Option<Tensor>> {
        let w = l.weight();
        if !on_gpu(x) || w.dtype() != x.dtype() {
            return Ok(None);
        }
        let dims = x.dims().to_vec();
        let (Some(&cin), Some(bias)) = (dims.last(), l.bias()) else {
            return Ok(None);
        };
        let cout = w.dim(0)?;
        let rows = x.elem_count() / cin.max(1);
        let x2 = x.contiguous()?.reshape((rows, cin))?;
        let act = match act {
            Act::None => f::Act::None,
            Act::GeluTanh => f::Act::GeluTanh,
            Act::GeluErf => return Ok(None),
        };
        // Half types: bias and GELU in cuBLASLt's epilogue; float32 (TF32 never used): candle's
        // matmul and the fused bias pass.
        let y = if matches!(x.dtype(), DType::F16 | DType::BF16) && bias.dtype() == x.dtype() {
            f::linear_lt(&x2, &w.contiguous()?, &bias.contiguous()?, act)?
        } else {
            f::bias_act(&x2.matmul(&w.t()?)?, Some(bias), act)?
        };
        let mut out = dims;
        if let Some(last) = out.last_mut() {
            *last = cout;
        }
        Ok(Some(y.reshape(out)?))
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::*;

    pub fn layer_norm(
        _: &Tensor,
        _: f64,
        _: Option<(&Tensor, &Tensor)>,
        _: Option<(&Tensor, &Tensor, &[Range<usize>])>,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn add_layer_norm(
        _: &Tensor,
        _: &Tensor,
        _: Option<&Tensor>,
        _: &[Range<usize>],
        _: f64,
        _: Option<(&Tensor, &Tensor)>,
        _: Option<(&Tensor, &Tensor)>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    pub fn gated_add(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &[Range<usize>],
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }

    pub fn add(_: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }

    pub fn rms_norm_heads(_: &Tensor, _: &Tensor, _: f64) -> Result<Option<Tensor>> {
        Ok(None)
    }

    pub fn linear(_: &Linear, _: &Tensor, _: Act) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// LayerNorm32 (optional float32 affine) then the optional adaLN modulation, batch element `b`
/// owning `rows[b]`.
pub use imp::layer_norm;

/// `x + h [* gate[b]]`, then LayerNorm32 of that sum (and the optional modulation) in one pass,
/// batch element `b` owning `rows[b]`: `(sum, normed)`.
pub use imp::add_layer_norm;

/// `x + h * gate[b]`, batch element `b` owning `rows[b]`.
pub use imp::gated_add;

/// `x + h` (same shape and dtype): one vectorised pass on the GPU, `None` elsewhere.
pub use imp::add;

/// MultiHeadRMSNorm of `[..., heads, dim]` (strided q / k views accepted).
pub use imp::rms_norm_heads;

/// `l(x)` then `act` for a [`Dense`] layer: the packed CPU product, or [`linear_candle`].
pub fn linear(l: &Dense, x: &Tensor, act: Act) -> Result<Tensor> {
    l.forward_act(x, act)
}

/// `l(x)` then `act`: on the GPU one GEMM and one fused bias/activation pass; elsewhere candle's
/// Linear followed by the activation (GELU through `cpu_fused` on the CPU).
pub fn linear_candle(l: &Linear, x: &Tensor, act: Act) -> Result<Tensor> {
    if let Some(y) = imp::linear(l, x, act)? {
        return Ok(y);
    }
    let y = l.forward(x)?;
    Ok(match act {
        Act::None => y,
        Act::GeluTanh => super::cpu_fused::gelu_tanh(&y)?,
        Act::GeluErf => super::cpu_fused::gelu_erf(&y)?,
    })
}
