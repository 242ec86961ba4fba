//! `nn.Conv3d` (cubic kernel, equal stride/padding on every axis) on candle tensors, computed by the
//! bounded-memory CPU kernel `trellis_kernels::conv3d` in float32, and `pixel_shuffle_3d` likewise.
//!
//! Weights keep the builder's dtype (float16 in fp16 torsos) and are widened to float32 per call;
//! the result is returned in the input's dtype on the input's device. On a GPU (candle has no 3-D
//! convolution) a stride-1, same-padded convolution runs as a sparse convolution over every voxel
//! of the grid: the voxels as channels-last rows, the dense grid's neighbour table
//! (`cuda_ops::dense_neighbours`, made once per grid), and the tensor-core kernel
//! (`cuda_ops::sparse_conv_half`) for float16/bfloat16 with input channels a multiple of 8, else
//! the float32 gather-GEMM (`cuda_ops::sparse_conv`); other stride-1 convolutions (and builds
//! without `cuda`) are an implicit im2col of candle ops
//! — the k³ shifted views of the zero-padded input stacked along the channels — and one matrix
//! product with the `[Cout, Cin·k³]` weight, in the input's dtype (float32 accumulation), without
//! leaving the device; `pixel_shuffle_3d` is a reshape-permute there. Other strides take the CPU
//! kernel.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Storage, Tensor};
use candle_nn::VarBuilder;
use trellis_kernels::conv3d::{self as kernel, Conv3dShape};

/// Runs `f` on the float32 values of `t` (row-major), borrowing them when `t` already is a
/// contiguous float32 CPU tensor, converting otherwise.
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    if t.dtype() == DType::F32 && t.device().is_cpu() {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            let all = cpu.as_slice::<f32>()?;
            return f(&all[start..end]);
        }
    }
    let v: Vec<f32> = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    f(&v)
}

/// A 3-D convolution layer (`weight [Cout, Cin, k, k, k]`, `bias [Cout]`).
#[derive(Debug, Clone)]
pub struct Conv3d {
    weight: Tensor,
    bias: Option<Tensor>,
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    /// The neighbour-table path's weight `[Cout', k³, Cin]` in the input's dtype and float32 bias
    /// `[Cout']` (for the tensor cores Cout' = Cout rounded up to 8 with zero rows), made on first
    /// use.
    #[cfg(feature = "cuda")]
    mma_weights: std::sync::OnceLock<(Tensor, Tensor)>,
}

impl Conv3d {
    /// Reads `weight` and `bias` in `vb`'s dtype.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get(
            (out_channels, in_channels, kernel, kernel, kernel),
            "weight",
        )?;
        let bias = Some(vb.get(out_channels, "bias")?);
        Ok(Self {
            weight,
            bias,
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
            #[cfg(feature = "cuda")]
            mma_weights: std::sync::OnceLock::new(),
        })
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// `x` `[B, Cin, D, H, W]` → `[B, Cout, OD, OH, OW]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() != 5 || dims[1] != self.in_channels {
            bail!(
                "Conv3d: input is {dims:?}, expected [B, {}, D, H, W]",
                self.in_channels
            );
        }
        let shape = Conv3dShape {
            batch: dims[0],
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            input: [dims[2], dims[3], dims[4]],
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
        };
        let out_dims = shape.output().map_err(|e| anyhow!("{e}"))?;
        if !x.device().is_cpu() && self.stride == 1 {
            #[cfg(feature = "cuda")]
            if self.grid_conv_applies(x) {
                return self.forward_grid(x);
            }
            return self.forward_im2col(x, out_dims);
        }
        let out = with_f32(x, |input| {
            with_f32(&self.weight, |weight| match &self.bias {
                Some(b) => with_f32(b, |bias| {
                    kernel::conv3d(input, weight, Some(bias), &shape).map_err(|e| anyhow!("{e}"))
                }),
                None => kernel::conv3d(input, weight, None, &shape).map_err(|e| anyhow!("{e}")),
            })
        })
        .context("Conv3d")?;
        let t = Tensor::from_vec(
            out,
            (
                dims[0],
                self.out_channels,
                out_dims[0],
                out_dims[1],
                out_dims[2],
            ),
            &Device::Cpu,
        )?;
        Ok(t.to_dtype(x.dtype())?.to_device(x.device())?)
    }
}

impl Conv3d {
    /// Stride 1 on a GPU: `[B, Cin·k³, OD·OH·OW]` columns (channel-major, then kz, ky, kx, as
    /// the weight is laid out) times the `[Cout, Cin·k³]` weight.
    fn forward_im2col(&self, x: &Tensor, out_dims: [usize; 3]) -> Result<Tensor> {
        let (b, c, k, p) = (x.dim(0)?, self.in_channels, self.kernel, self.padding);
        let mut xp = x.clone();
        for axis in 2..5 {
            xp = xp.pad_with_zeros(axis, p, p)?;
        }
        let [od, oh, ow] = out_dims;
        let mut taps = Vec::with_capacity(k * k * k);
        for dz in 0..k {
            for dy in 0..k {
                for dx in 0..k {
                    taps.push(
                        xp.narrow(2, dz, od)?
                            .narrow(3, dy, oh)?
                            .narrow(4, dx, ow)?
                            .unsqueeze(2)?,
                    );
                }
            }
        }
        let cols = Tensor::cat(&taps, 2)?.reshape((b, c * k * k * k, od * oh * ow))?;
        drop(taps);
        let w = self
            .weight
            .to_dtype(x.dtype())?
            .reshape((self.out_channels, c * k * k * k))?;
        let mut y = w.broadcast_left(b)?.matmul(&cols)?;
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(&bias.to_dtype(x.dtype())?.reshape((
                1,
                self.out_channels,
                1,
            ))?)?;
        }
        Ok(y.reshape((b, self.out_channels, od, oh, ow))?)
    }
}

#[cfg(feature = "cuda")]
impl Conv3d {
    /// Whether [`Self::forward_grid`] takes `x`: a CUDA input, an odd kernel of at most 3³ with
    /// same padding.
    fn grid_conv_applies(&self, x: &Tensor) -> bool {
        x.device().is_cuda()
            && self.stride == 1
            && self.kernel % 2 == 1
            && self.padding == self.kernel / 2
            && self.kernel.pow(3) <= trellis_kernels::cuda::SPARSE_CONV_MMA_MAX_VOLUME
    }

    /// The convolution as a sparse conv over every voxel of the grid: `x` `[B, Cin, D, H, W]`
    /// becomes `[B·D·H·W, Cin]` rows, each row's k³ neighbours (−1 outside the grid: the zero
    /// padding) come from the grid's cached neighbour table, and the `[rows, Cout]` result goes
    /// back to `[B, Cout, D, H, W]`. Float16/bfloat16 with Cin a multiple of 8 run on the tensor
    /// cores, the rest on the float32 gather-GEMM.
    fn forward_grid(&self, x: &Tensor) -> Result<Tensor> {
        use crate::runtime::cuda_ops;
        let (b, c, d, h, w) = x.dims5()?;
        let dt = x.dtype();
        let half = matches!(dt, DType::F16 | DType::BF16) && c % 8 == 0;
        let run_dt = if half { dt } else { DType::F32 };
        let (weight, bias) = match self.mma_weights.get() {
            Some(wb) if wb.0.dtype() == run_dt => wb.clone(),
            Some(_) => self.grid_weights(run_dt, x.device())?,
            None => {
                let wb = self.grid_weights(run_dt, x.device())?;
                self.mma_weights.get_or_init(|| wb).clone()
            }
        };
        let nbr = cuda_ops::dense_neighbours(x.device(), b, [d, h, w], self.kernel)?;
        let rows = x
            .permute((0, 2, 3, 4, 1))?
            .contiguous()?
            .reshape((b * d * h * w, c))?;
        let y = if half {
            cuda_ops::sparse_conv_half(&rows, &nbr, &weight, Some(&bias), 0)?
        } else {
            cuda_ops::sparse_conv(&rows.to_dtype(DType::F32)?, &nbr, &weight, Some(&bias))?
                .to_dtype(dt)?
        };
        let y = if y.dim(1)? == self.out_channels {
            y
        } else {
            y.narrow(1, 0, self.out_channels)?
        };
        Ok(y.reshape((b, d, h, w, self.out_channels))?
            .permute((0, 4, 1, 2, 3))?
            .contiguous()?)
    }

    /// `[Cout', k³, Cin]` weight in `dt` and float32 bias on `dev`; for a half `dt` Cout' is Cout
    /// rounded up to 8 (zero rows, sliced off after the product), as the tensor cores need.
    fn grid_weights(&self, dt: DType, dev: &Device) -> Result<(Tensor, Tensor)> {
        let (co, ci, vol) = (self.out_channels, self.in_channels, self.kernel.pow(3));
        let pad = if dt == DType::F32 {
            0
        } else {
            co.next_multiple_of(8) - co
        };
        let mut wt = self
            .weight
            .to_device(dev)?
            .to_dtype(DType::F32)?
            .reshape((co, ci, vol))?
            .transpose(1, 2)?
            .contiguous()?;
        let mut bias = match &self.bias {
            Some(b) => b.to_device(dev)?.to_dtype(DType::F32)?,
            None => Tensor::zeros(co, DType::F32, dev)?,
        };
        if pad > 0 {
            wt = Tensor::cat(&[wt, Tensor::zeros((pad, vol, ci), DType::F32, dev)?], 0)?;
            bias = Tensor::cat(&[bias, Tensor::zeros(pad, DType::F32, dev)?], 0)?;
        }
        Ok((wt.to_dtype(dt)?.contiguous()?, bias.contiguous()?))
    }
}

/// [`pixel_shuffle_3d`] as candle ops (any device).
fn pixel_shuffle_3d_ops(x: &Tensor, scale: usize) -> Result<Tensor> {
    let (b, c, h, w, d) = x.dims5()?;
    let s3 = scale.pow(3).max(1);
    if scale == 0 || c % s3 != 0 {
        bail!("pixel_shuffle_3d: {c} channels are not a multiple of {scale}^3");
    }
    Ok(x.reshape(vec![b, c / s3, scale, scale, scale, h, w, d])?
        .permute(vec![0, 1, 5, 2, 6, 3, 7, 4])?
        .contiguous()?
        .reshape((b, c / s3, h * scale, w * scale, d * scale))?)
}

/// `pixel_shuffle_3d(x [B, C·s³, H, W, D], s)` → `[B, C, H·s, W·s, D·s]`: the CPU kernel, or on
/// a GPU the original's reshape `[B, C, s, s, s, H, W, D]`, permute `(0, 1, 5, 2, 6, 3, 7, 4)`.
pub fn pixel_shuffle_3d(x: &Tensor, scale: usize) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() != 5 {
        bail!("pixel_shuffle_3d: input must be [B, C, H, W, D], got {dims:?}");
    }
    let (b, c) = (dims[0], dims[1]);
    let sp = [dims[2], dims[3], dims[4]];
    if !x.device().is_cpu() {
        return pixel_shuffle_3d_ops(x, scale);
    }
    let out = with_f32(x, |v| {
        kernel::pixel_shuffle_3d(v, b, c, sp, scale).map_err(|e| anyhow!("{e}"))
    })?;
    let s3 = scale.pow(3).max(1);
    let t = Tensor::from_vec(
        out,
        (b, c / s3, sp[0] * scale, sp[1] * scale, sp[2] * scale),
        &Device::Cpu,
    )?;
    Ok(t.to_dtype(x.dtype())?.to_device(x.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn the_gpu_formulations_match_the_cpu_kernels() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 6, 7, 4), &dev).unwrap();
        let mut t = HashMap::new();
        t.insert(
            "weight".to_string(),
            Tensor::randn(0f32, 0.3, (4, 5, 3, 3, 3), &dev).unwrap(),
        );
        t.insert(
            "bias".to_string(),
            Tensor::randn(0f32, 1.0, 4, &dev).unwrap(),
        );
        let vb = VarBuilder::from_tensors(t, DType::F32, &dev);
        let conv = Conv3d::new(vb, 5, 4, 3, 1, 1).unwrap();
        let cpu = conv.forward(&x).unwrap();
        let ops = conv.forward_im2col(&x, [6, 7, 4]).unwrap();
        let err = (cpu - ops)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(err < 1e-4, "im2col conv3d differs by {err}");
        let y = Tensor::randn(0f32, 1.0, (2, 16, 3, 2, 4), &dev).unwrap();
        let a: Vec<f32> = pixel_shuffle_3d(&y, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = pixel_shuffle_3d_ops(&y, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn conv_layer_matches_naive_kernel_and_keeps_dtype() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.3, (4, 3, 3, 3, 3), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, 4, &dev).unwrap();
        let mut t = HashMap::new();
        t.insert("weight".to_string(), w.clone());
        t.insert("bias".to_string(), b.clone());
        let conv =
            Conv3d::new(VarBuilder::from_tensors(t, DType::F32, &dev), 3, 4, 3, 1, 1).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 4, 3), &dev).unwrap();
        let y = conv.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 4, 5, 4, 3]);
        let shape = Conv3dShape {
            batch: 2,
            in_channels: 3,
            out_channels: 4,
            input: [5, 4, 3],
            kernel: 3,
            stride: 1,
            padding: 1,
        };
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = kernel::conv3d_naive(&flat(&x), &flat(&w), Some(&flat(&b)), &shape).unwrap();
        let got = flat(&y);
        let err = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err < 1e-4, "{err}");
        // a non-contiguous f16 input takes the converting path and keeps its dtype
        let xh = x.to_dtype(DType::F16).unwrap();
        assert_eq!(conv.forward(&xh).unwrap().dtype(), DType::F16);
        assert!(conv.forward(&x.narrow(1, 0, 2).unwrap()).is_err());
    }

    #[test]
    fn kernel_shuffle_equals_tensor_shuffle() {
        let x = Tensor::randn(0f32, 1.0, (2, 16, 3, 2, 2), &Device::Cpu).unwrap();
        let a = pixel_shuffle_3d(&x, 2).unwrap();
        let b = crate::modules::patchify::pixel_shuffle_3d(&x, 2).unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
    }
}
