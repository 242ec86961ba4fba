//! `--precision auto|full|half|bf16`: the dtype of the networks' torsos on a GPU, set once per
//! process before networks are loaded. No TRELLIS twin (the original runs `use_fp16` torsos in
//! float16 and the rest in float32, with PyTorch's default TF32 settings).
//!
//! | choice | torsos of `use_fp16` checkpoints | float32 matmuls                     |
//! |--------|----------------------------------|-------------------------------------|
//! | `full` | float32                          | true float32 (TF32 off): parity     |
//! | `half` | float16, as the original         | true float32, as PyTorch's default  |
//! | `bf16` | bfloat16                         | true float32                        |
//! | `auto` | `half` on GPUs with compute capability ≥ 7.0, `full` otherwise (`doctor` says which) |
//!
//! On the CPU every choice runs float32 (candle's CPU kernels are fastest there).

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrecisionChoice {
    #[default]
    Auto,
    Full,
    Half,
    Bf16,
}

impl FromStr for PrecisionChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "auto" => PrecisionChoice::Auto,
            "full" | "fp32" | "f32" => PrecisionChoice::Full,
            "half" | "fp16" | "f16" => PrecisionChoice::Half,
            "bf16" | "bfloat16" => PrecisionChoice::Bf16,
            other => bail!("unknown precision {other:?}: expected auto, full, half or bf16"),
        })
    }
}

impl fmt::Display for PrecisionChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PrecisionChoice::Auto => "auto",
            PrecisionChoice::Full => "full",
            PrecisionChoice::Half => "half",
            PrecisionChoice::Bf16 => "bf16",
        })
    }
}

impl PrecisionChoice {
    /// `auto` resolved for a GPU of `compute_capability` (`None`: unknown), with the reason.
    pub fn resolve(self, compute_capability: Option<(u32, u32)>) -> (PrecisionChoice, String) {
        match self {
            PrecisionChoice::Auto => match compute_capability {
                Some((ma, mi)) if ma >= 7 => (
                    PrecisionChoice::Half,
                    format!("compute capability {ma}.{mi} has float16 tensor cores: float16 torsos as the original"),
                ),
                Some((ma, mi)) => (
                    PrecisionChoice::Full,
                    format!("compute capability {ma}.{mi} < 7.0 has no fast float16"),
                ),
                None => (
                    PrecisionChoice::Full,
                    "compute capability unknown: float32".to_string(),
                ),
            },
            other => (other, "asked for".to_string()),
        }
    }

    fn code(self) -> u8 {
        match self {
            PrecisionChoice::Auto => 0,
            PrecisionChoice::Full => 1,
            PrecisionChoice::Half => 2,
            PrecisionChoice::Bf16 => 3,
        }
    }

    fn from_code(c: u8) -> Self {
        match c {
            1 => PrecisionChoice::Full,
            2 => PrecisionChoice::Half,
            3 => PrecisionChoice::Bf16,
            _ => PrecisionChoice::Auto,
        }
    }
}

static CHOICE: AtomicU8 = AtomicU8::new(0);

/// Sets this process's precision (commands call it once, from `--precision`).
pub fn set(choice: PrecisionChoice) {
    CHOICE.store(choice.code(), Ordering::Relaxed);
    apply_to_backend();
}

/// This process's precision as set (`Auto` until [`set`]).
pub fn get() -> PrecisionChoice {
    PrecisionChoice::from_code(CHOICE.load(Ordering::Relaxed))
}

/// Tells candle's CUDA backend that float32 matmuls stay float32 (no TF32) under every choice:
/// the original runs its float32 parts (DINOv2, the float32 layers around the float16 torsos)
/// with PyTorch's default `allow_tf32 = False`, and the float32 fixtures hold at 1e-5 only so.
pub fn apply_to_backend() {
    #[cfg(feature = "cuda")]
    {
        candle_core::cuda::set_gemm_reduced_precision_f32(false);
    }
}

/// The torso dtype for a checkpoint saved with `use_fp16` (float32 ones stay float32) on `device`.
pub fn torso_dtype(use_fp16: bool, device: &Device) -> DType {
    if !use_fp16 || !device.is_cuda() {
        return DType::F32;
    }
    let cc = match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => super::gpu::list_gpus()
            .ok()
            .and_then(|g| g.into_iter().find(|g| g.index == gpu_id))
            .and_then(|g| g.compute_capability),
        _ => None,
    };
    match get().resolve(cc).0 {
        PrecisionChoice::Half => DType::F16,
        PrecisionChoice::Bf16 => DType::BF16,
        _ => DType::F32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_resolve() {
        assert_eq!(
            "full".parse::<PrecisionChoice>().unwrap(),
            PrecisionChoice::Full
        );
        assert_eq!(
            "FP16".parse::<PrecisionChoice>().unwrap(),
            PrecisionChoice::Half
        );
        assert_eq!(
            "bf16".parse::<PrecisionChoice>().unwrap(),
            PrecisionChoice::Bf16
        );
        assert!("int8".parse::<PrecisionChoice>().is_err());
        assert_eq!(
            PrecisionChoice::Auto.resolve(Some((9, 0))).0,
            PrecisionChoice::Half
        );
        assert_eq!(
            PrecisionChoice::Auto.resolve(Some((6, 1))).0,
            PrecisionChoice::Full
        );
        assert_eq!(PrecisionChoice::Auto.resolve(None).0, PrecisionChoice::Full);
        assert_eq!(PrecisionChoice::Bf16.resolve(None).0, PrecisionChoice::Bf16);
        for c in [
            PrecisionChoice::Auto,
            PrecisionChoice::Full,
            PrecisionChoice::Half,
            PrecisionChoice::Bf16,
        ] {
            assert_eq!(PrecisionChoice::from_code(c.code()), c);
            assert_eq!(c.to_string().parse::<PrecisionChoice>().unwrap(), c);
        }
    }

    #[test]
    fn the_cpu_always_runs_float32() {
        assert_eq!(torso_dtype(true, &Device::Cpu), DType::F32);
        assert_eq!(torso_dtype(false, &Device::Cpu), DType::F32);
    }
}
