//! Sparse normalisation (twin of `trellis/modules/sparse/norm.py` and the `LayerNorm32` /
//! `GroupNorm32` wrappers of `trellis/modules/norm.py` as applied to sparse feats): statistics in
//! float32, result cast back to the input dtype.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

use super::tensor::SparseTensor;

/// Layer norm over the last dim of `x`, in f32, optional affine `(weight, bias)`, same dtype out.
pub fn layer_norm_f32(x: &Tensor, affine: Option<(&Tensor, &Tensor)>, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let mut y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    if let Some((w, b)) = affine {
        y = y
            .broadcast_mul(&w.to_dtype(DType::F32)?)?
            .broadcast_add(&b.to_dtype(DType::F32)?)?;
    }
    Ok(y.to_dtype(dt)?)
}

/// `LayerNorm32(channels, elementwise_affine, eps)` on sparse feats (row-wise, so the batch split
/// of `SparseLayerNorm` does not matter).
#[derive(Debug, Clone)]
pub struct SparseLayerNorm32 {
    affine: Option<(Tensor, Tensor)>,
    eps: f64,
}

impl SparseLayerNorm32 {
    pub fn new(channels: usize, affine: bool, eps: f64, vb: VarBuilder) -> Result<Self> {
        let affine = if affine {
            let vb = vb.to_dtype(DType::F32);
            Some((vb.get(channels, "weight")?, vb.get(channels, "bias")?))
        } else {
            None
        };
        Ok(Self { affine, eps })
    }

    pub fn forward_dense(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm_f32(x, self.affine.as_ref().map(|(w, b)| (w, b)), self.eps)
    }

    pub fn forward(&self, x: &SparseTensor) -> Result<SparseTensor> {
        x.replace(self.forward_dense(x.feats())?)
    }
}

/// `SparseGroupNorm32(groups, channels)`: per batch element, statistics over (rows, channels of a
/// group), in f32; affine `weight`/`bias` `[channels]`.
#[derive(Debug, Clone)]
pub struct SparseGroupNorm32 {
    groups: usize,
    channels: usize,
    affine: Option<(Tensor, Tensor)>,
    eps: f64,
}

impl SparseGroupNorm32 {
    pub fn new(groups: usize, channels: usize, affine: bool, eps: f64, vb: VarBuilder) -> Result<Self> {
        ensure!(
            groups > 0 && channels % groups == 0,
            "GroupNorm: {channels} channels are not divisible into {groups} groups"
        );
        let affine = if affine {
            let vb = vb.to_dtype(DType::F32);
            Some((vb.get(channels, "weight")?, vb.get(channels, "bias")?))
        } else {
            None
        };
        Ok(Self {
            groups,
            channels,
            affine,
            eps,
        })
    }

    pub fn forward(&self, x: &SparseTensor) -> Result<SparseTensor> {
        let dt = x.dtype();
        let f = x.feats().to_dtype(DType::F32)?;
        ensure!(
            f.dim(1)? == self.channels,
            "GroupNorm: expected {} channels, got {}",
            self.channels,
            f.dim(1)?
        );
        let cg = self.channels / self.groups;
        let mut parts = Vec::with_capacity(x.batch_size());
        for r in x.layout() {
            if r.is_empty() {
                continue;
            }
            let b = f.narrow(0, r.start, r.len())?;
            let g = b.reshape((r.len(), self.groups, cg))?;
            let mean = g.mean_keepdim(2)?.mean_keepdim(0)?;
            let c = g.broadcast_sub(&mean)?;
            let var = c.sqr()?.mean_keepdim(2)?.mean_keepdim(0)?;
            let y = c.broadcast_div(&(var + self.eps)?.sqrt()?)?;
            parts.push(y.reshape((r.len(), self.channels))?);
        }
        let mut y = if parts.is_empty() {
            f
        } else {
            Tensor::cat(&parts, 0)?
        };
        if let Some((w, b)) = &self.affine {
            y = y.broadcast_mul(w)?.broadcast_add(b)?;
        }
        x.replace(y.to_dtype(dt)?)
    }
}
