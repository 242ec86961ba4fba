//! Page-locked ("pinned") host copies of weights, uploaded to a CUDA device with one
//! `cuMemcpyHtoDAsync` each on candle's stream (CUDA builds only). No TRELLIS twin.
//!
//! Copies from pageable memory go through a driver staging buffer (~9 GB/s measured on the H100);
//! from pinned memory they run at the bus rate (~55 GB/s, `../shared/toolchain/CUDA.md`). A
//! network's host copy (`weights::HostWeights`) moves into pinned memory the first time it is
//! placed on a GPU, and its pageable copy is dropped, so the weights are still held once.
//! `TRELLIS_PINNED=0` keeps them pageable (for comparison); a failed pinned allocation does too.

use anyhow::{anyhow, bail, Result};
use candle_core::cuda_backend::cudarc::driver::{
    CudaContext, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::{DType, Device, Shape, Storage, Tensor, WithDType};
use std::sync::Arc;

/// Whether host copies are pinned (`TRELLIS_PINNED` unset or not `0`).
pub fn enabled() -> bool {
    std::env::var("TRELLIS_PINNED").map_or(true, |v| v.trim() != "0")
}

enum Buf {
    F32(PinnedHostSlice<f32>),
    F16(PinnedHostSlice<half::f16>),
    Bf16(PinnedHostSlice<half::bf16>),
}

/// One tensor in page-locked host memory.
pub struct PinnedTensor {
    buf: Buf,
    shape: Shape,
}

fn pin<T: WithDType + DeviceRepr + ValidAsZeroBits>(
    ctx: &Arc<CudaContext>,
    t: &Tensor,
) -> Result<PinnedHostSlice<T>> {
    let v: Vec<T> = t.flatten_all()?.to_vec1::<T>()?;
    // SAFETY: every element is written below before the buffer is read.
    let mut p = unsafe { ctx.alloc_pinned_with_flags::<T>(v.len(), 0) }
        .map_err(|e| anyhow!("pinned host allocation of {} values: {e:?}", v.len()))?;
    p.as_mut_slice()
        .map_err(|e| anyhow!("pinned host buffer: {e:?}"))?
        .copy_from_slice(&v);
    Ok(p)
}

fn upload<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    src: &PinnedHostSlice<T>,
    shape: &Shape,
) -> Result<Tensor> {
    let stream = dev.cuda_stream();
    let slice = stream
        .clone_htod(src)
        .map_err(|e| anyhow!("host-to-device copy: {e:?}"))?;
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Ok(Tensor::from_storage(
        storage,
        shape.clone(),
        candle_core::op::BackpropOp::none(),
        false,
    ))
}

impl PinnedTensor {
    /// A pinned copy of the host tensor `t` for uploads to `dev`; `None` for dtypes other than
    /// f32/f16/bf16 (those stay pageable).
    pub fn new(t: &Tensor, dev: &Device) -> Result<Option<Self>> {
        let Device::Cuda(d) = dev else {
            bail!("pinned host memory is for CUDA devices");
        };
        let ctx = d.cuda_stream().context().clone();
        let buf = match t.dtype() {
            DType::F32 => Buf::F32(pin(&ctx, t)?),
            DType::F16 => Buf::F16(pin(&ctx, t)?),
            DType::BF16 => Buf::Bf16(pin(&ctx, t)?),
            _ => return Ok(None),
        };
        Ok(Some(Self {
            buf,
            shape: t.shape().clone(),
        }))
    }

    pub fn dtype(&self) -> DType {
        match self.buf {
            Buf::F32(_) => DType::F32,
            Buf::F16(_) => DType::F16,
            Buf::Bf16(_) => DType::BF16,
        }
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// A new device tensor with this tensor's values (queued on candle's stream).
    pub fn upload(&self, dev: &Device) -> Result<Tensor> {
        let Device::Cuda(d) = dev else {
            bail!("pinned weights upload to CUDA devices only");
        };
        match &self.buf {
            Buf::F32(b) => upload(d, b, &self.shape),
            Buf::F16(b) => upload(d, b, &self.shape),
            Buf::Bf16(b) => upload(d, b, &self.shape),
        }
    }
}
