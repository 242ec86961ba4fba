//! Host side of `sort.cu` (exclusive prefix sum, stable 8-bit LSD radix sort of u64 keys with
//! u32 values), shared by the GPU rasterisers (`cuda_raster`) and the GPU FlexiCubes
//! (`cuda_flexicubes`); launched on candle's stream. `cuda` builds only.

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::CudaDevice;
use trellis_kernels::cuda as k;

use super::cuda_ops::module;

fn i32_of(v: usize, what: &str) -> anyhow::Result<i32> {
    i32::try_from(v).map_err(|_| anyhow::anyhow!("{what} = {v} does not fit in int32"))
}

fn alloc<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> anyhow::Result<CudaSlice<T>> {
    // SAFETY: every caller's kernels write each element before anything reads it (a zero-length
    // request gets one element that nothing reads).
    Ok(unsafe { dev.cuda_stream().alloc::<T>(n.max(1)) }?)
}

/// Exclusive prefix sum of `input[..n]` into `out[..n]` (block sums scanned recursively).
pub(crate) fn scan(
    dev: &CudaDevice,
    input: &CudaSlice<u32>,
    out: &CudaSlice<u32>,
    n: usize,
) -> anyhow::Result<()> {
    let stream = dev.cuda_stream();
    let nb = n.div_ceil(k::SCAN_ITEMS).max(1);
    let sums = alloc::<u32>(dev, nb)?;
    let ni = i32_of(n, "scan length")?;
    let cfg = LaunchConfig {
        grid_dim: (u32::try_from(nb)?, 1, 1),
        block_dim: (k::SCAN_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = module(dev, &k::SORT)?.load_function("scan_blocks")?;
    let mut b = stream.launch_builder(&f);
    b.arg(input).arg(out).arg(&sums).arg(&ni);
    // SAFETY: `input`/`out` hold n entries, `sums` one per block.
    unsafe { b.launch(cfg) }?;
    if nb > 1 {
        let offsets = alloc::<u32>(dev, nb)?;
        scan(dev, &sums, &offsets, nb)?;
        let f = module(dev, &k::SORT)?.load_function("scan_add")?;
        let mut b = stream.launch_builder(&f);
        b.arg(out).arg(&offsets).arg(&ni);
        // SAFETY: as above.
        unsafe { b.launch(cfg) }?;
    }
    Ok(())
}

/// Stable sort of `n` (key, value) pairs by the low `bits` bits of the key.
pub(crate) fn radix_sort(
    dev: &CudaDevice,
    keys: CudaSlice<u64>,
    vals: CudaSlice<u32>,
    n: usize,
    bits: u32,
) -> anyhow::Result<(CudaSlice<u64>, CudaSlice<u32>)> {
    let stream = dev.cuda_stream();
    let nb = n.div_ceil(k::RADIX_CHUNK).max(1);
    let hist = alloc::<u32>(dev, 256 * nb)?;
    let hist_scan = alloc::<u32>(dev, 256 * nb)?;
    let (mut ka, mut va) = (keys, vals);
    let (mut kb, mut vb) = (alloc::<u64>(dev, n)?, alloc::<u32>(dev, n)?);
    let ni = i32_of(n, "sort length")?;
    let cfg = LaunchConfig {
        grid_dim: (u32::try_from(nb)?, 1, 1),
        block_dim: (k::RADIX_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let sort = module(dev, &k::SORT)?;
    let fh = sort.load_function("radix_histogram")?;
    let fs = sort.load_function("radix_scatter")?;
    let mut shift = 0i32;
    while (shift as u32) < bits {
        let mut b = stream.launch_builder(&fh);
        b.arg(&ka).arg(&ni).arg(&shift).arg(&hist);
        // SAFETY: `ka` holds n keys, `hist` 256 counts per block.
        unsafe { b.launch(cfg) }?;
        scan(dev, &hist, &hist_scan, 256 * nb)?;
        let mut b = stream.launch_builder(&fs);
        b.arg(&ka)
            .arg(&va)
            .arg(&ni)
            .arg(&shift)
            .arg(&hist_scan)
            .arg(&kb)
            .arg(&vb);
        // SAFETY: every buffer holds n entries; the scanned histogram places each exactly once.
        unsafe { b.launch(cfg) }?;
        std::mem::swap(&mut ka, &mut kb);
        std::mem::swap(&mut va, &mut vb);
        shift += 8;
    }
    Ok((ka, va))
}
