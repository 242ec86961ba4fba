//! `SparseConv3d` (twin of `trellis/modules/sparse/conv/conv_spconv.py`, spconv `SubMConv3d`):
//! submanifold convolution, output rows = input rows. Weights `conv.weight [Cout, kx, ky, kz, Cin]`,
//! `conv.bias [Cout]`; cross-correlation in (x, y, z) order, no flip. Computed by the gather-GEMM-
//! scatter kernel of `trellis_kernels::sparse_conv` in f32 over the geometry's cached neighbour map.

use std::sync::OnceLock;

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use std::sync::Arc;

use trellis_kernels::sparse_conv::{subdivided_conv, submanifold_conv};

use super::tensor::{to_f32_vec, Geometry, SparseTensor};

#[derive(Debug)]
pub struct SparseConv3d {
    in_channels: usize,
    out_channels: usize,
    kernel: [usize; 3],
    weight: Tensor,
    bias: Option<Tensor>,
    /// f32 copies made on first use (a weight may be a zero-cost broadcast placeholder until then).
    weight_f32: OnceLock<Vec<f32>>,
    bias_f32: OnceLock<Option<Vec<f32>>>,
}

impl SparseConv3d {
    /// `SparseConv3d(in, out, kernel_size)` with a bias; `vb` is the module's prefix (the tensors
    /// are `conv.weight` / `conv.bias` under it).
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel_size: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        ensure!(
            kernel_size % 2 == 1,
            "SparseConv3d: kernel size {kernel_size} must be odd (submanifold convolution)"
        );
        let k = kernel_size;
        let vb = vb.pp("conv");
        let weight = vb.get((out_channels, k, k, k, in_channels), "weight")?;
        let bias = Some(vb.get(out_channels, "bias")?);
        Ok(Self {
            in_channels,
            out_channels,
            kernel: [k; 3],
            weight,
            bias,
            weight_f32: OnceLock::new(),
            bias_f32: OnceLock::new(),
        })
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    fn weights_f32(&self) -> Result<(&[f32], Option<&[f32]>)> {
        let w = match self.weight_f32.get() {
            Some(w) => w,
            None => {
                let w = to_f32_vec(&self.weight)?;
                self.weight_f32.get_or_init(|| w)
            }
        };
        let b = match self.bias_f32.get() {
            Some(b) => b,
            None => {
                let b = self.bias.as_ref().map(to_f32_vec).transpose()?;
                self.bias_f32.get_or_init(|| b)
            }
        };
        Ok((w, b.as_deref()))
    }

    /// Output feats in the input's dtype (computed in f32).
    pub fn forward(&self, x: &SparseTensor) -> Result<SparseTensor> {
        let c = x.channels()?;
        ensure!(
            c == self.in_channels,
            "SparseConv3d: expected {} input channels, got {c}",
            self.in_channels
        );
        let map = x.geometry().neighbour_map(self.kernel)?;
        let (w, b) = self.weights_f32()?;
        let feats = to_f32_vec(x.feats())?;
        let out = submanifold_conv(&feats, c, &map, w, b, self.out_channels)?;
        let t = Tensor::from_vec(out, (x.rows(), self.out_channels), x.device())?;
        let t = if x.dtype() == DType::F32 {
            t
        } else {
            t.to_dtype(x.dtype())?
        };
        x.replace(t)
    }

    /// `self.forward(SparseSubdivide.forward(x))` computed from the coarse rows of `x`
    /// (`trellis_kernels::sparse_conv::subdivided_conv`): 8 merged taps per child instead of 27
    /// and no 8× copy of the input. `fine` is `SparseSubdivide.geometry(x)`.
    pub fn forward_subdivided(
        &self,
        x: &SparseTensor,
        fine: Arc<Geometry>,
    ) -> Result<SparseTensor> {
        let c = x.channels()?;
        ensure!(
            c == self.in_channels,
            "SparseConv3d: expected {} input channels, got {c}",
            self.in_channels
        );
        ensure!(
            self.kernel == [3, 3, 3],
            "SparseConv3d: the subdivided path needs a 3x3x3 kernel, not {:?}",
            self.kernel
        );
        ensure!(
            fine.rows() == 8 * x.rows(),
            "SparseConv3d: {} subdivided rows for {} coarse rows",
            fine.rows(),
            x.rows()
        );
        let map = x.geometry().neighbour_map(self.kernel)?;
        let (w, b) = self.weights_f32()?;
        let feats = to_f32_vec(x.feats())?;
        let out = subdivided_conv(&feats, c, &map, w, b, self.out_channels)?;
        let t = Tensor::from_vec(out, (fine.rows(), self.out_channels), x.device())?;
        let t = if x.dtype() == DType::F32 {
            t
        } else {
            t.to_dtype(x.dtype())?
        };
        SparseTensor::from_geometry(fine, t)
    }
}
