//! `SparseLinear` (twin of `trellis/modules/sparse/linear.py`): a `nn.Linear` on the feats.

use anyhow::Result;
use candle_core::Module;
use candle_nn::VarBuilder;

use super::tensor::SparseTensor;

/// `nn.Linear(in, out)` applied row-wise to the feats; weights `weight [out, in]`, `bias [out]`.
#[derive(Debug, Clone)]
pub struct SparseLinear {
    inner: candle_nn::Linear,
}

impl SparseLinear {
    pub fn new(in_channels: usize, out_channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            inner: candle_nn::linear(in_channels, out_channels, vb)?,
        })
    }

    /// The wrapped dense layer (for dense inputs such as a cross-attention context).
    pub fn dense(&self) -> &candle_nn::Linear {
        &self.inner
    }

    /// Applies the layer to `[.., in]`, computing in the weights' dtype and returning the input's.
    pub fn forward_dense(&self, x: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        let wd = self.inner.weight().dtype();
        let xd = x.dtype();
        let y = self.inner.forward(&x.to_dtype(wd)?)?;
        Ok(y.to_dtype(xd)?)
    }

    pub fn forward(&self, x: &SparseTensor) -> Result<SparseTensor> {
        x.replace(self.forward_dense(x.feats())?)
    }
}
