//! Sparse normalisation (twin of `trellis/modules/sparse/norm.py`, plus `LayerNorm32` as the
//! sparse blocks apply it to feats): statistics in float32, result in the input dtype. The math is
//! the dense `crate::modules::norm` one; these wrappers apply it to a [`SparseTensor`].

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::tensor::SparseTensor;
use crate::modules::norm::{sparse_group_norm, LayerNorm32};

/// `LayerNorm32(channels, elementwise_affine, eps)` on sparse feats (row-wise, so the per-batch
/// split of `SparseLayerNorm` makes no difference).
#[derive(Debug, Clone)]
pub struct SparseLayerNorm32 {
    inner: LayerNorm32,
}

impl SparseLayerNorm32 {
    pub fn new(channels: usize, affine: bool, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            inner: LayerNorm32::new(vb, channels, affine, eps)?,
        })
    }

    pub fn forward(&self, x: &SparseTensor) -> Result<SparseTensor> {
        x.replace(self.inner.forward(x.feats())?)
    }

    /// `forward(x).modulate(shift, scale)` (`[B, C]` shift and scale), fused on the CPU.
    pub fn forward_modulated(
        &self,
        x: &SparseTensor,
        shift: &Tensor,
        scale: &Tensor,
    ) -> Result<SparseTensor> {
        let rows = x.layout().to_vec();
        match self
            .inner
            .forward_modulated(x.feats(), shift, scale, rows)?
        {
            Some(y) => x.replace(y),
            None => self.forward(x)?.modulate(shift, scale),
        }
    }

    /// `x + h` (or `x + h * gate[b]`) and the norm of that sum (with the optional modulation) in
    /// one fused pass on the GPU: `(sum, normed)`; `None` where `LayerNorm32`'s fused path does
    /// not apply (the caller then runs the two).
    pub fn forward_after_residual(
        &self,
        x: &SparseTensor,
        h: &SparseTensor,
        gate: Option<&Tensor>,
        modulation: Option<(&Tensor, &Tensor)>,
    ) -> Result<Option<(SparseTensor, SparseTensor)>> {
        let rows = x.layout().to_vec();
        match self
            .inner
            .forward_after_residual(x.feats(), h.feats(), gate, modulation, &rows)?
        {
            Some((sum, normed)) => Ok(Some((x.replace(sum)?, x.replace(normed)?))),
            None => Ok(None),
        }
    }
}

/// `SparseGroupNorm32(groups, channels)`: per batch element, statistics over (rows, channels of a
/// group), in f32; affine `weight`/`bias` `[channels]` (float32).
#[derive(Debug, Clone)]
pub struct SparseGroupNorm32 {
    groups: usize,
    affine: Option<(Tensor, Tensor)>,
    eps: f64,
}

impl SparseGroupNorm32 {
    pub fn new(
        groups: usize,
        channels: usize,
        affine: bool,
        eps: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        ensure!(
            groups > 0 && channels.is_multiple_of(groups),
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
            affine,
            eps,
        })
    }

    pub fn forward(&self, x: &SparseTensor) -> Result<SparseTensor> {
        let (w, b) = match &self.affine {
            Some((w, b)) => (Some(w), Some(b)),
            None => (None, None),
        };
        x.replace(sparse_group_norm(
            x.feats(),
            x.layout(),
            self.groups,
            w,
            b,
            self.eps,
        )?)
    }
}
