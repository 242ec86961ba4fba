//! `SparseLinear` (twin of `trellis/modules/sparse/linear.py`): a `nn.Linear` on the feats.

use anyhow::Result;
use candle_nn::VarBuilder;

use crate::modules::dense::{self, Dense};
use crate::modules::gpu_fused::{self, Act};

use super::tensor::SparseTensor;

/// `nn.Linear(in, out)` applied row-wise to the feats; weights `weight [out, in]`, `bias [out]`.
#[derive(Debug, Clone)]
pub struct SparseLinear {
    inner: Dense,
}

impl SparseLinear {
    pub fn new(in_channels: usize, out_channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            inner: dense::linear(in_channels, out_channels, vb)?,
        })
    }

    /// The wrapped dense layer (for dense inputs such as a cross-attention context).
    pub fn dense(&self) -> &Dense {
        &self.inner
    }

    /// Applies the layer to `[.., in]`, computing in the weights' dtype and returning the input's.
    pub fn forward_dense(&self, x: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        self.forward_dense_act(x, Act::None)
    }

    /// [`Self::forward_dense`] followed by `act` (fused with the bias on the GPU).
    pub fn forward_dense_act(
        &self,
        x: &candle_core::Tensor,
        act: Act,
    ) -> Result<candle_core::Tensor> {
        let wd = self.inner.dtype();
        let xd = x.dtype();
        let y = gpu_fused::linear(&self.inner, &x.to_dtype(wd)?, act)?;
        Ok(y.to_dtype(xd)?)
    }

    pub fn forward(&self, x: &SparseTensor) -> Result<SparseTensor> {
        x.replace(self.forward_dense(x.feats())?)
    }

    /// The layer then `act` on the feats.
    pub fn forward_act(&self, x: &SparseTensor, act: Act) -> Result<SparseTensor> {
        x.replace(self.forward_dense_act(x.feats(), act)?)
    }
}
