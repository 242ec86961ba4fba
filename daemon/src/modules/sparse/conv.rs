//! `SparseConv3d` (twin of `trellis/modules/sparse/conv/conv_spconv.py`, spconv `SubMConv3d`):
//! submanifold convolution, output rows = input rows. Weights `conv.weight [Cout, kx, ky, kz, Cin]`,
//! `conv.bias [Cout]`; cross-correlation in (x, y, z) order, no flip. Computed by the gather-GEMM-
//! scatter kernel of `trellis_kernels::sparse_conv` in f32 over the geometry's cached neighbour map.
//!
//! A 1x1x1 kernel is evaluated as spconv 2 evaluates it: its "conv1x1" shortcut computes
//! `feats @ weight.view(in, out) + bias`, reading the `[out, 1, 1, 1, in]` weight memory as an
//! `[in, out]` matrix (not the transpose of `[out, in]`), so such a layer is NOT the dense
//! `conv3d` with `weight.permute(0, 4, 1, 2, 3)`. Checkpoints trained through spconv (the mesh
//! decoder's skip convolutions) depend on it.

use std::sync::{Arc, OnceLock};

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use trellis_kernels::sparse_conv::{
    subdivided_conv, submanifold_conv, NeighbourMap, SparseConvError,
};

use super::spatial::SparseUpsample;
use super::tensor::{to_f32_vec, Geometry, SparseTensor};

/// The signature shared by `submanifold_conv` and `subdivided_conv`.
type ConvKernel = fn(
    &[f32],
    usize,
    &NeighbourMap,
    &[f32],
    Option<&[f32]>,
    usize,
) -> Result<Vec<f32>, SparseConvError>;

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
    /// The f32 kernel-layout weight on the GPU (made on first GPU use).
    #[cfg(feature = "cuda")]
    weight_dev: OnceLock<Tensor>,
    /// The kernel-layout weight in the half type of the first half-precision GPU input, and the
    /// f32 bias on that device (tensor-core path).
    #[cfg(feature = "cuda")]
    weight_dev_half: OnceLock<Tensor>,
    /// The same weight as `[K·Cout, Cin]` for the GEMM-first path (`cuda_ops::conv_plan`).
    #[cfg(feature = "cuda")]
    weight_dev_kc: OnceLock<Tensor>,
    #[cfg(feature = "cuda")]
    bias_dev: OnceLock<Option<Tensor>>,
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
            #[cfg(feature = "cuda")]
            weight_dev: OnceLock::new(),
            #[cfg(feature = "cuda")]
            weight_dev_half: OnceLock::new(),
            #[cfg(feature = "cuda")]
            weight_dev_kc: OnceLock::new(),
            #[cfg(feature = "cuda")]
            bias_dev: OnceLock::new(),
        })
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    fn weights_f32(&self) -> Result<(&[f32], Option<&[f32]>)> {
        let w = match self.weight_f32.get() {
            Some(w) => w,
            None => {
                let mut w = to_f32_vec(&self.weight)?;
                if self.kernel == [1; 3] {
                    w = spconv_1x1_weight(&w, self.in_channels, self.out_channels);
                }
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

    /// The GPU path (`runtime::cuda_ops`): the f32 weight `[Cout, K, Cin]` on `x`'s device (made
    /// once), the geometry's neighbour map built on the GPU (cached per geometry), one gather-GEMM
    /// launch. `subdivided`: `x` holds the coarse rows and `fine` the 8× geometry; each child row
    /// reads its parent's feats (the `SparseSubdivide` copy is a broadcast on the device).
    #[cfg(feature = "cuda")]
    fn compute_cuda(&self, x: &SparseTensor, fine: Option<&Geometry>) -> Result<Tensor> {
        if self.half_path(x) {
            let (geo, shift) = match fine {
                None => (x.geometry().as_ref(), 0),
                Some(f) => (f, 3),
            };
            let nbr = geo.neighbour_table_cuda(self.kernel)?;
            return self.compute_cuda_half(x, geo, &nbr, shift);
        }
        let w = self.weight_device(x)?;
        let bias = self
            .bias
            .as_ref()
            .map(|b| b.to_device(x.device()))
            .transpose()?;
        let (geo, feats) = match fine {
            None => (x.geometry().as_ref(), x.feats().to_dtype(DType::F32)?),
            Some(f) => {
                let (n, c) = x.feats().dims2()?;
                let rep = x
                    .feats()
                    .to_dtype(DType::F32)?
                    .unsqueeze(1)?
                    .broadcast_as((n, 8, c))?
                    .reshape((8 * n, c))?;
                (f, rep)
            }
        };
        let nbr = geo.neighbour_table_cuda(self.kernel)?;
        let out = crate::runtime::cuda_ops::sparse_conv(&feats, &nbr, &w, bias.as_ref())?;
        Ok(if x.dtype() == DType::F32 {
            out
        } else {
            out.to_dtype(x.dtype())?
        })
    }

    /// Whether `x` takes the half-precision GPU kernels ([`Self::compute_cuda_half`]): float16 /
    /// bfloat16 feats, channels in multiples of 8, a kernel volume the tensor-core builds take.
    #[cfg(feature = "cuda")]
    fn half_path(&self, x: &SparseTensor) -> bool {
        matches!(x.dtype(), DType::F16 | DType::BF16)
            && self.in_channels.is_multiple_of(8)
            && self.out_channels.is_multiple_of(8)
            && self.kernel.iter().product::<usize>()
                <= trellis_kernels::cuda::SPARSE_CONV_MMA_MAX_VOLUME
    }

    /// A weight made from the f32 kernel-layout weight by `make` in dtype `dt`, kept in `cell`
    /// for the first dtype asked (made again, not kept, for another).
    #[cfg(feature = "cuda")]
    fn weight_as(
        &self,
        cell: &OnceLock<Tensor>,
        x: &SparseTensor,
        dt: DType,
        make: impl Fn(Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        match cell.get() {
            Some(w) if w.dtype() == dt => Ok(w.clone()),
            Some(_) => make(self.weight_device(x)?.to_dtype(dt)?),
            None => {
                let w = make(self.weight_device(x)?.to_dtype(dt)?)?;
                Ok(cell.get_or_init(|| w).clone())
            }
        }
    }

    /// The f32 kernel-layout weight `[Cout, K, Cin]` on `x`'s device (made once).
    #[cfg(feature = "cuda")]
    fn weight_device(&self, x: &SparseTensor) -> Result<Tensor> {
        if let Some(w) = self.weight_dev.get() {
            return Ok(w.clone());
        }
        let (w, _) = self.weights_f32()?;
        let vol: usize = self.kernel.iter().product();
        let t = Tensor::from_slice(w, (self.out_channels, vol, self.in_channels), x.device())?;
        Ok(self.weight_dev.get_or_init(|| t).clone())
    }

    /// Half-precision feats on the tensor cores (`cuda_ops::sparse_conv_half` or the GEMM-first
    /// path, as `cuda_ops::conv_plan` picks): weight in the feats' type, f32 bias, output in the
    /// feats' type, one row per row of `geo` (the output geometry) reading the rows of `x`
    /// through the int32 table `nbr` `[rows(geo) * K]` shifted by `shift` (3: a subdivided
    /// input read through its parent rows, `nbr >> 3`, instead of an 8x copy).
    #[cfg(feature = "cuda")]
    fn compute_cuda_half(
        &self,
        x: &SparseTensor,
        geo: &Geometry,
        nbr: &Tensor,
        shift: u32,
    ) -> Result<Tensor> {
        use crate::runtime::cuda_ops as ops;
        let dt = x.dtype();
        let bias = match self.bias_dev.get() {
            Some(b) => b.clone(),
            None => {
                let b = self
                    .bias
                    .as_ref()
                    .map(|b| b.to_dtype(DType::F32)?.to_device(x.device()))
                    .transpose()?;
                self.bias_dev.get_or_init(|| b).clone()
            }
        };
        let volume: usize = self.kernel.iter().product();
        let tile = ops::conv_plan(self.out_channels, volume, x.rows());
        if tile == ops::ConvTile::GemmGather {
            let w_kc = self.weight_as(&self.weight_dev_kc, x, dt, |w| ops::conv_gemm_weight(&w))?;
            return ops::sparse_conv_gemm_gather(
                &x.feats().contiguous()?,
                nbr,
                &w_kc,
                bias.as_ref(),
                shift,
                volume,
            );
        }
        let w = self.weight_as(&self.weight_dev_half, x, dt, Ok)?;
        // the mask-sorted row order only for the kernels that take one (`TRELLIS_CONV_ORDER`)
        let order = match tile {
            ops::ConvTile::K64 { .. } if ops::conv_order() => {
                Some(geo.conv_order_cuda(self.kernel)?)
            }
            _ => None,
        };
        ops::sparse_conv_half_with(
            &x.feats().contiguous()?,
            nbr,
            &w,
            bias.as_ref(),
            shift,
            tile,
            order.as_ref(),
        )
    }

    /// Runs `kernel` (a `trellis_kernels::sparse_conv` convolution) on the f32 feats of `x` with
    /// its neighbour map and this layer's f32 weights; the `[rows, out]` result in `x`'s dtype.
    fn compute(&self, x: &SparseTensor, rows: usize, kernel: ConvKernel) -> Result<Tensor> {
        let c = x.channels()?;
        ensure!(
            c == self.in_channels,
            "SparseConv3d: expected {} input channels, got {c}",
            self.in_channels
        );
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return self.compute_cuda(x, None);
        }
        let map = x.geometry().neighbour_map(self.kernel)?;
        let (w, b) = self.weights_f32()?;
        let feats = to_f32_vec(x.feats())?;
        let out = kernel(&feats, c, &map, w, b, self.out_channels)?;
        let t = Tensor::from_vec(out, (rows, self.out_channels), x.device())?;
        Ok(if x.dtype() == DType::F32 {
            t
        } else {
            t.to_dtype(x.dtype())?
        })
    }

    /// Output feats in the input's dtype (computed in f32).
    pub fn forward(&self, x: &SparseTensor) -> Result<SparseTensor> {
        x.replace(self.compute(x, x.rows(), submanifold_conv)?)
    }

    /// `self.forward(SparseSubdivide.forward(x))` computed from the coarse rows of `x`
    /// (`trellis_kernels::sparse_conv::subdivided_conv`): 8 merged taps per child instead of 27
    /// and no 8× copy of the input. `fine` is `SparseSubdivide.geometry(x)`.
    pub fn forward_subdivided(
        &self,
        x: &SparseTensor,
        fine: Arc<Geometry>,
    ) -> Result<SparseTensor> {
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
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let c = x.channels()?;
            ensure!(
                c == self.in_channels,
                "SparseConv3d: expected {} input channels, got {c}",
                self.in_channels
            );
            let t = self.compute_cuda(x, Some(&fine))?;
            return SparseTensor::from_geometry(fine, t);
        }
        let t = self.compute(x, fine.rows(), subdivided_conv)?;
        SparseTensor::from_geometry(fine, t)
    }
}

impl SparseConv3d {
    /// `self.forward(SparseUpsample.forward(x))` computed from the coarse rows of `x` (which
    /// carries the upsample's cache): on a GPU in half precision each fine row reads its
    /// neighbours' coarse rows through the fine neighbour map composed with the upsample's
    /// index (`UpsampleCache::parent_table_cuda`), so the upsampled feats are never made;
    /// elsewhere the upsampled tensor is made and convolved.
    pub fn forward_upsampled(&self, x: &SparseTensor, up: &SparseUpsample) -> Result<SparseTensor> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && self.half_path(x) {
            let c = x.channels()?;
            ensure!(
                c == self.in_channels,
                "SparseConv3d: expected {} input channels, got {c}",
                self.in_channels
            );
            let cache = up.cache_of(x)?;
            let table = cache.parent_table_cuda(self.kernel)?;
            let t = self.compute_cuda_half(x, &cache.fine, &table, 0)?;
            return SparseTensor::from_geometry(cache.fine.clone(), t);
        }
        self.forward(&up.forward(x)?)
    }
}

/// The `[out, in]` kernel weight that reproduces spconv's conv1x1 shortcut: the stored memory read
/// as `[in, out]`, transposed (`result[o * in + i] = stored[i * out + o]`).
fn spconv_1x1_weight(stored: &[f32], in_channels: usize, out_channels: usize) -> Vec<f32> {
    let mut w = vec![0f32; stored.len()];
    for i in 0..in_channels {
        for o in 0..out_channels {
            w[o * in_channels + i] = stored[i * out_channels + o];
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    /// A 1x1x1 conv must give `feats @ weight.view(in, out) + bias` (spconv's conv1x1 path), not
    /// the dense-conv `feats @ weight.view(out, in)^T + bias`.
    #[test]
    fn kernel_1_follows_spconv_conv1x1() -> Result<()> {
        let dev = Device::Cpu;
        let (cin, cout) = (3, 2);
        let stored: Vec<f32> = (0..cin * cout).map(|v| v as f32 * 0.5 - 1.0).collect();
        let weight = Tensor::from_vec(stored.clone(), (cout, 1, 1, 1, cin), &dev)?;
        let bias = Tensor::new(&[0.25f32, -0.5], &dev)?;
        let tensors = HashMap::from([
            ("conv.weight".to_string(), weight),
            ("conv.bias".to_string(), bias),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
        let conv = SparseConv3d::new(cin, cout, 1, vb)?;
        let coords = Tensor::new(&[[0i32, 1, 2, 3], [0, 1, 2, 4]], &dev)?;
        let feats = Tensor::new(&[[1f32, 2., 3.], [-1., 0.5, 2.]], &dev)?;
        let x = SparseTensor::from_tensors(&coords, feats.clone())?;
        let y = conv.forward(&x)?.feats().to_vec2::<f32>()?;
        let f = feats.to_vec2::<f32>()?;
        for (r, row) in y.iter().enumerate() {
            for (o, &v) in row.iter().enumerate() {
                let expected: f32 = (0..cin)
                    .map(|i| f[r][i] * stored[i * cout + o])
                    .sum::<f32>()
                    + [0.25f32, -0.5][o];
                assert!(
                    (v - expected).abs() < 1e-5,
                    "row {r} out {o}: {v} vs {expected}"
                );
            }
        }
        Ok(())
    }
}
