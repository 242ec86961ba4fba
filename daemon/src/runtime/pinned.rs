//! Page-locked ("pinned") host copies of weights, uploaded to a CUDA device with one
//! `cuMemcpyHtoDAsync` each, on candle's stream ([`PinnedTensor::upload`]) or on another stream
//! into memory allocated in candle's stream order ([`PinnedTensor::alloc_on`] +
//! [`PinnedTensor::copy_into`], for `runtime::prefetch`). CUDA builds only. No TRELLIS twin.
//!
//! Copies from pageable memory go through a driver staging buffer (~9 GB/s measured on the H100);
//! from pinned memory they run at the bus rate (~55 GB/s, `../shared/toolchain/CUDA.md`). A
//! network's host copy (`weights::HostWeights`) moves into pinned memory the first time it is
//! placed on a GPU, and its pageable copy is dropped, so the weights are still held once.
//! `TRELLIS_PINNED=0` keeps them pageable (for comparison); a failed pinned allocation does too.

use anyhow::{anyhow, bail, Result};
use candle_core::cuda_backend::cudarc::driver::{
    result, CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr, PinnedHostSlice,
    ValidAsZeroBits,
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
    Ok(wrap(dev, slice, shape))
}

/// A device buffer as a candle tensor of `shape` on `dev`.
fn wrap<T: CudaDType + DeviceRepr>(dev: &CudaDevice, slice: CudaSlice<T>, shape: &Shape) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(
        storage,
        shape.clone(),
        candle_core::op::BackpropOp::none(),
        false,
    )
}

fn alloc<T: CudaDType + DeviceRepr>(dev: &CudaDevice, n: usize, shape: &Shape) -> Result<Tensor> {
    // SAFETY: the values are written by `copy_into` before anything reads them (the caller
    // orders the copy before every use, see `runtime::prefetch`).
    let slice = unsafe { dev.cuda_stream().alloc::<T>(n) }
        .map_err(|e| anyhow!("device allocation of {n} values: {e:?}"))?;
    Ok(wrap(dev, slice, shape))
}

/// # Safety
/// `dst` must stay allocated until the copy queued on `stream` has run.
unsafe fn copy<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    src: &PinnedHostSlice<T>,
    dst: &Tensor,
    stream: &CudaStream,
) -> Result<()> {
    let (storage, layout) = dst.storage_and_layout();
    let Storage::Cuda(c) = &*storage else {
        bail!("pinned copy: the destination is not on a CUDA device");
    };
    let d = c.as_cuda_slice::<T>()?;
    if layout.start_offset() != 0 || d.len() != src.len() {
        bail!(
            "pinned copy: destination holds {} values from offset {}, source {}",
            d.len(),
            layout.start_offset(),
            src.len()
        );
    }
    let host = src
        .as_slice()
        .map_err(|e| anyhow!("pinned host buffer: {e:?}"))?;
    let (ptr, _record) = d.device_ptr(stream);
    result::memcpy_htod_async(ptr, host, stream.cu_stream())
        .map_err(|e| anyhow!("host-to-device copy: {e:?}"))
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

    /// A device tensor of this tensor's shape and dtype, allocated in candle's stream order and
    /// not yet filled: [`PinnedTensor::copy_into`] fills it.
    pub fn alloc_on(&self, dev: &Device) -> Result<Tensor> {
        let Device::Cuda(d) = dev else {
            bail!("pinned weights upload to CUDA devices only");
        };
        let n = self.shape.elem_count();
        match &self.buf {
            Buf::F32(_) => alloc::<f32>(d, n, &self.shape),
            Buf::F16(_) => alloc::<half::f16>(d, n, &self.shape),
            Buf::Bf16(_) => alloc::<half::bf16>(d, n, &self.shape),
        }
    }

    /// Queues the copy of this tensor's values into `dst` (from [`PinnedTensor::alloc_on`]) on
    /// `stream`.
    ///
    /// # Safety
    /// `stream` must not start the copy before `dst`'s allocation is ordered (an event of
    /// candle's stream recorded after it), nothing may use `dst` before the copy is done, and
    /// `dst` and `self` must live until it is.
    pub unsafe fn copy_into(&self, dst: &Tensor, stream: &CudaStream) -> Result<()> {
        if dst.dtype() != self.dtype() || dst.shape() != &self.shape {
            bail!(
                "pinned copy: {:?} {:?} into {:?} {:?}",
                self.dtype(),
                self.shape,
                dst.dtype(),
                dst.shape()
            );
        }
        match &self.buf {
            Buf::F32(b) => copy(b, dst, stream),
            Buf::F16(b) => copy(b, dst, stream),
            Buf::Bf16(b) => copy(b, dst, stream),
        }
    }

    /// Bytes of the values.
    pub fn bytes(&self) -> u64 {
        (self.shape.elem_count() * self.dtype().size_in_bytes()) as u64
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
