//! GPU memory: what the device has free, and what this process's allocations use. No TRELLIS twin
//! (the original reads `torch.cuda.max_memory_allocated` / `max_memory_reserved`).
//!
//! candle allocates through `cuMemAllocAsync` on the device's current memory pool, so the pool's
//! counters are this process's figures:
//! * `used` / `used_high`: bytes handed out to live tensors (PyTorch's "allocated"), and the high
//!   water mark since [`reset_peaks`];
//! * `reserved` / `reserved_high`: bytes the pool holds from the driver (PyTorch's "reserved").
//!
//! [`keep_freed_memory`] raises the pool's release threshold so that memory freed by one step is
//! reused by the next instead of going back to the driver at every synchronisation (what PyTorch's
//! caching allocator does); [`trim`] hands it back (between jobs: Blender shares the card).

use candle_core::Device;

/// The pool's counters, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    pub used: u64,
    pub used_high: u64,
    pub reserved: u64,
    pub reserved_high: u64,
}

/// Free and total memory of the device (`cuMemGetInfo`), in bytes; `None` on the CPU.
pub fn mem_info(dev: &Device) -> Option<(u64, u64)> {
    imp::mem_info(dev)
}

/// The current pool's counters; `None` on the CPU or when the driver has no memory pools.
pub fn pool_stats(dev: &Device) -> Option<PoolStats> {
    imp::pool_stats(dev)
}

/// Starts new high-water marks (`used_high`, `reserved_high`) from the current values.
pub fn reset_peaks(dev: &Device) {
    imp::reset_peaks(dev)
}

/// Keeps up to `bytes` of freed memory in the pool across synchronisations.
pub fn keep_freed_memory(dev: &Device, bytes: u64) {
    imp::set_release_threshold(dev, bytes)
}

/// Returns freed pool memory to the driver, keeping at most `keep` bytes.
pub fn trim(dev: &Device, keep: u64) {
    imp::trim(dev, keep)
}

/// Bytes as GiB text with two decimals.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(feature = "cuda")]
mod imp {
    use super::PoolStats;
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    use candle_core::Device;

    /// The device's current memory pool, with its context bound to this thread.
    fn pool(dev: &Device) -> Option<sys::CUmemoryPool> {
        let Device::Cuda(d) = dev else { return None };
        let stream = d.cuda_stream();
        let ctx = stream.context();
        if !ctx.has_async_alloc() {
            return None;
        }
        ctx.bind_to_thread().ok()?;
        // SAFETY: the device handle comes from a live context.
        unsafe { result::device::get_mem_pool(ctx.cu_device()).ok() }
    }

    fn get(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute) -> Option<u64> {
        let mut v: u64 = 0;
        // SAFETY: these attributes are cuuint64_t values.
        let r = unsafe {
            sys::cuMemPoolGetAttribute(pool, attr, &mut v as *mut u64 as *mut std::ffi::c_void)
        };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
    }

    fn set(pool: sys::CUmemoryPool, attr: sys::CUmemPool_attribute, mut v: u64) {
        // SAFETY: as in `get`; a failure leaves the pool as it was.
        let _ = unsafe {
            sys::cuMemPoolSetAttribute(pool, attr, &mut v as *mut u64 as *mut std::ffi::c_void)
        };
    }

    pub fn mem_info(dev: &Device) -> Option<(u64, u64)> {
        let Device::Cuda(d) = dev else { return None };
        let stream = d.cuda_stream();
        let (free, total) = stream.context().mem_get_info().ok()?;
        Some((free as u64, total as u64))
    }

    pub fn pool_stats(dev: &Device) -> Option<PoolStats> {
        use sys::CUmemPool_attribute::*;
        let p = pool(dev)?;
        Some(PoolStats {
            used: get(p, CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
            used_high: get(p, CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            reserved: get(p, CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
            reserved_high: get(p, CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
        })
    }

    pub fn reset_peaks(dev: &Device) {
        use sys::CUmemPool_attribute::*;
        if let Some(p) = pool(dev) {
            // Only zero is accepted: the mark restarts from the current value.
            set(p, CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0);
            set(p, CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, 0);
        }
    }

    pub fn set_release_threshold(dev: &Device, bytes: u64) {
        if let Some(p) = pool(dev) {
            set(
                p,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                bytes,
            );
        }
    }

    pub fn trim(dev: &Device, keep: u64) {
        if let (Some(p), Device::Cuda(d)) = (pool(dev), dev) {
            let _ = d.cuda_stream().synchronize();
            // SAFETY: a live pool; trimming only releases unused memory.
            let _ = unsafe { sys::cuMemPoolTrimTo(p, keep as usize) };
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::PoolStats;
    use candle_core::Device;

    pub fn mem_info(_: &Device) -> Option<(u64, u64)> {
        None
    }
    pub fn pool_stats(_: &Device) -> Option<PoolStats> {
        None
    }
    pub fn reset_peaks(_: &Device) {}
    pub fn set_release_threshold(_: &Device, _: u64) {}
    pub fn trim(_: &Device, _: u64) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_has_no_pool() {
        assert_eq!(mem_info(&Device::Cpu), None);
        assert_eq!(pool_stats(&Device::Cpu), None);
        reset_peaks(&Device::Cpu);
        trim(&Device::Cpu, 0);
        assert_eq!(gib(3 << 29), "1.50 GiB");
    }
}
