//! Devices, precision, tiers and weight loading.

pub mod gpu;
pub mod pth;
pub mod system;
pub mod tiers;
pub mod weights;

use anyhow::{bail, Result};
use candle_core::Device;

/// Parses `cpu` or `cuda:N` (`cuda` = `cuda:0`).
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let idx: usize = match s.strip_prefix("cuda:") {
                Some(i) => i
                    .parse()
                    .map_err(|_| anyhow::anyhow!("bad device {s:?}: expected cuda:N"))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "device {s:?}: this build has no CUDA support (rebuild with --features cuda)"
                );
            }
            Ok(Device::new_cuda(idx)?)
        }
        other => bail!("unknown device {other:?}: expected cpu or cuda:N"),
    }
}
