//! Devices, precision, tiers and weight loading.

pub mod block_stream;
#[cfg(feature = "cuda")]
pub mod cuda_flexicubes;
#[cfg(feature = "cuda")]
pub mod cuda_fused;
#[cfg(feature = "cuda")]
pub mod cuda_ops;
#[cfg(feature = "cuda")]
pub mod cuda_raster;
#[cfg(feature = "cuda")]
pub mod cuda_sort;
pub mod device;
pub mod gpu;
pub mod malloc;
#[cfg(feature = "cuda")]
pub mod pinned;
pub mod precision;
pub mod prefetch;
pub mod pth;
pub mod residency;
pub mod system;
pub mod tiers;
pub mod vram;
pub mod weights;

use anyhow::Result;
use candle_core::Device;

/// Parses `cpu` or `cuda:N` (`cuda` = `cuda:0`) and fails when the device cannot be opened.
/// Commands use [`device::open_str`], which also takes `auto` and can fall back to the CPU.
pub fn parse_device(s: &str) -> Result<Device> {
    device::open_str(s, device::Fallback::Fail)
}

/// What every command does with `--device` and `--precision`: sets this process's precision,
/// then opens the device (falling back to the CPU with one warning line where `fallback` says).
pub fn select(device: &str, precision: &str, fallback: device::Fallback) -> Result<Device> {
    precision::set(precision.parse()?);
    device::open_str(device, fallback)
}
