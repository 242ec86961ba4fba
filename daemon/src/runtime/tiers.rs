//! The memory tier and precision a run uses, chosen from the device. No TRELLIS twin: the original
//! assumes one GPU with at least 16 GB and keeps every network resident in float16.
//!
//! Policy (free memory measured when each job starts; `--vram-tier` fixes it instead). What a
//! tier does is carried out by `runtime::residency` (weights stay once in host memory in their run
//! dtype; a stage's networks are put on the device for it):
//!
//! | tier      | when                       | what it means for a run                                         |
//! |-----------|----------------------------|-----------------------------------------------------------------|
//! | `high`    | GPU, free ≥ 10 GiB         | every network stays on the device once used (no uploads after the first job) |
//! | `medium`  | GPU, 6 GiB ≤ free < 10     | each stage's networks uploaded for it and freed after it (conditioner, SS flow, SS decoder, SLat flow, decoders) |
//! | `low`     | GPU, 4 GiB ≤ free < 6      | as `medium`, and the decoders one at a time; CFG branches not batched |
//! | `minimal` | GPU, free < 4 GiB          | as `low`, no copies ahead of time, and the flows' transformer blocks streamed from host memory every forward (`runtime::block_stream`) |
//! | `cpu`     | CPU                        | float32 in host memory, every network resident                  |
//!
//! A CUDA out-of-memory error inside a stage frees what the stage holds, drops one tier and runs
//! the stage again (`residency::Residency::stage`). At `high`, `medium` and `low` a stage copies
//! the next stage's networks in on a second stream while it computes ([`Tier::prefetches`],
//! `runtime::prefetch`). On a GPU at the tiers [`Tier::batches_cfg`] allows (`high`, `medium`,
//! `minimal`) the samplers run the two CFG branches as one batch (`TRELLIS_CFG_BATCH=0` runs them
//! one after the other, as `low` always does; see `pipelines::base`).
//!
//! Why these numbers: measured on an H100 with `bench pipeline --vram-tier T` (image-large, the
//! 20,000-voxel shell, docs/BENCHMARKS.md), the pool's peak reserved memory was 6.84 GiB at
//! `high`, 3.16 GiB at `medium` and 2.81 GiB at `low`/`minimal`; each bound leaves 2–3 GiB
//! above that for larger structures, the CUDA context and what else shares the card (Blender),
//! and a stage that still runs out of memory drops a tier instead of failing.
//!
//! Precision: float16 on GPUs with compute capability ≥ 7.0 (tensor cores; the checkpoints' torsos
//! are stored and run in float16 by the original), float32 on older GPUs and on the CPU (candle's
//! CPU kernels are fastest in float32, and float32 is what the parity fixtures check).

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use candle_core::DType;

const GIB: u64 = 1 << 30;
/// Free GPU memory from which everything stays resident.
pub const HIGH_MIN_FREE: u64 = 10 * GIB;
/// Free GPU memory from which networks are loaded per stage.
pub const MEDIUM_MIN_FREE: u64 = 6 * GIB;
/// Free GPU memory from which one network at a time fits without streaming weights.
pub const LOW_MIN_FREE: u64 = 4 * GIB;
/// Host memory below which a CPU run of the official models will likely swap.
pub const CPU_COMFORTABLE_RAM: u64 = 12 * GIB;

/// How much a run may keep on the device at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    Minimal,
    Low,
    Medium,
    High,
    Cpu,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::High => "high",
            Tier::Medium => "medium",
            Tier::Low => "low",
            Tier::Minimal => "minimal",
            Tier::Cpu => "cpu",
        }
    }

    /// What this tier does, in one line.
    pub fn describe(self) -> &'static str {
        match self {
            Tier::High => "every network stays on the device once used",
            Tier::Medium => "each stage's networks uploaded from host memory and freed after it",
            Tier::Low => "as medium, and the decoders one at a time",
            Tier::Minimal => {
                "as low, and the flows' transformer blocks streamed from host memory every forward"
            }
            Tier::Cpu => "float32 in host memory",
        }
    }

    /// Whether networks stay on the device after the stage that used them.
    pub fn keeps_resident(self) -> bool {
        matches!(self, Tier::High | Tier::Cpu)
    }

    /// Whether a stage copies the next stage's networks in while it computes
    /// (`runtime::prefetch`): every GPU tier but `minimal`, whose budget has no room for two.
    pub fn prefetches(self) -> bool {
        matches!(self, Tier::High | Tier::Medium | Tier::Low)
    }

    /// Whether the decoders run one at a time (each its own stage).
    pub fn decoders_one_at_a_time(self) -> bool {
        matches!(self, Tier::Low | Tier::Minimal)
    }

    /// Whether the flows' transformer blocks stay in host memory and are copied to the device
    /// for every forward, a few blocks ahead (`runtime::block_stream`): `minimal`, where a
    /// flow then needs its other layers and three blocks on the device instead of all of it.
    pub fn streams_blocks(self) -> bool {
        matches!(self, Tier::Minimal)
    }

    /// Whether the two classifier-free-guidance branches may run as one batch (twice the
    /// activations): not at `low`. At `minimal` they do: each forward there copies the flow's
    /// blocks in again, and one batch copies them once for both branches (the pair's
    /// activations are a tenth of the blocks' weights).
    pub fn batches_cfg(self) -> bool {
        !matches!(self, Tier::Low)
    }

    /// The tier an out-of-memory error drops to (`None` at `minimal`). `cpu` keeps everything
    /// resident like `high`, so it drops to `medium` too (a memory budget on the CPU).
    pub fn lower(self) -> Option<Tier> {
        match self {
            Tier::High | Tier::Cpu => Some(Tier::Medium),
            Tier::Medium => Some(Tier::Low),
            Tier::Low => Some(Tier::Minimal),
            Tier::Minimal => None,
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Tier {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "high" => Tier::High,
            "medium" => Tier::Medium,
            "low" => Tier::Low,
            "minimal" => Tier::Minimal,
            "cpu" => Tier::Cpu,
            other => bail!("unknown tier {other:?}: expected high, medium, low, minimal or cpu"),
        })
    }
}

/// The dtype of weights and activations in the networks' torsos.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    F16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Precision::F32,
            "f16" | "fp16" | "float16" => Precision::F16,
            other => bail!("unknown precision {other:?}: expected f32 or f16"),
        })
    }
}

/// The device a run would use, with what the policy needs to know about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Cpu {
        /// Host memory available, bytes.
        memory_available: u64,
    },
    Cuda {
        /// Free device memory, bytes.
        free_memory: u64,
        /// `(major, minor)` when known.
        compute_capability: Option<(u32, u32)>,
    },
}

/// The policy's decision and its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub tier: Tier,
    pub precision: Precision,
    pub reason: String,
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / GIB as f64)
}

/// Applies the policy of this module's documentation.
pub fn choose(target: Target) -> Plan {
    match target {
        Target::Cpu { memory_available } => {
            let mut reason = format!(
                "CPU device: float32 in host memory ({} available)",
                gib(memory_available)
            );
            if memory_available < CPU_COMFORTABLE_RAM {
                reason.push_str(&format!(
                    "; below {} the official models may swap",
                    gib(CPU_COMFORTABLE_RAM)
                ));
            }
            Plan {
                tier: Tier::Cpu,
                precision: Precision::F32,
                reason,
            }
        }
        Target::Cuda {
            free_memory,
            compute_capability,
        } => {
            let (tier, bound) = if free_memory >= HIGH_MIN_FREE {
                (Tier::High, format!("≥ {}", gib(HIGH_MIN_FREE)))
            } else if free_memory >= MEDIUM_MIN_FREE {
                (Tier::Medium, format!("≥ {}", gib(MEDIUM_MIN_FREE)))
            } else if free_memory >= LOW_MIN_FREE {
                (Tier::Low, format!("≥ {}", gib(LOW_MIN_FREE)))
            } else {
                (Tier::Minimal, format!("< {}", gib(LOW_MIN_FREE)))
            };
            let (precision, why) = match compute_capability {
                Some((major, minor)) if major >= 7 => (
                    Precision::F16,
                    format!("compute capability {major}.{minor} has float16 tensor cores"),
                ),
                Some((major, minor)) => (
                    Precision::F32,
                    format!("compute capability {major}.{minor} < 7.0 has no fast float16"),
                ),
                None => (
                    Precision::F32,
                    "compute capability unknown, float32 is the safe choice".to_string(),
                ),
            };
            Plan {
                tier,
                precision,
                reason: format!(
                    "{} free GPU memory ({bound}): {}; {why}",
                    gib(free_memory),
                    tier.describe()
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cuda(free_gib: f64, cc: Option<(u32, u32)>) -> Plan {
        choose(Target::Cuda {
            free_memory: (free_gib * GIB as f64) as u64,
            compute_capability: cc,
        })
    }

    #[test]
    fn tiers_follow_free_memory_at_the_documented_bounds() {
        let h100 = Some((9, 0));
        assert_eq!(cuda(79.0, h100).tier, Tier::High);
        assert_eq!(cuda(10.0, h100).tier, Tier::High);
        assert_eq!(cuda(9.9, h100).tier, Tier::Medium);
        assert_eq!(cuda(6.0, h100).tier, Tier::Medium);
        assert_eq!(cuda(5.9, h100).tier, Tier::Low);
        assert_eq!(cuda(4.0, h100).tier, Tier::Low);
        assert_eq!(cuda(3.9, h100).tier, Tier::Minimal);
        assert_eq!(cuda(0.0, h100).tier, Tier::Minimal);
        // Monotone: more memory never gives a smaller tier.
        let mut last = Tier::Minimal;
        for i in 0..100 {
            let t = cuda(i as f64 * 0.5, h100).tier;
            assert!(t >= last, "{i}");
            last = t;
        }
    }

    #[test]
    fn precision_follows_the_device() {
        assert_eq!(cuda(20.0, Some((8, 6))).precision, Precision::F16);
        assert_eq!(cuda(20.0, Some((7, 0))).precision, Precision::F16);
        assert_eq!(cuda(20.0, Some((6, 1))).precision, Precision::F32);
        assert_eq!(cuda(20.0, None).precision, Precision::F32);
        let cpu = choose(Target::Cpu {
            memory_available: 64 * GIB,
        });
        assert_eq!((cpu.tier, cpu.precision), (Tier::Cpu, Precision::F32));
        assert!(!cpu.reason.contains("swap"));
        let small = choose(Target::Cpu {
            memory_available: 4 * GIB,
        });
        assert!(small.reason.contains("swap"), "{}", small.reason);
        assert_eq!(Precision::F16.dtype(), DType::F16);
    }

    #[test]
    fn reasons_name_the_numbers_and_names_parse_back() {
        let p = cuda(12.0, Some((8, 9)));
        assert!(
            p.reason.contains("12.0 GiB") && p.reason.contains("8.9"),
            "{}",
            p.reason
        );
        for t in [
            Tier::High,
            Tier::Medium,
            Tier::Low,
            Tier::Minimal,
            Tier::Cpu,
        ] {
            assert_eq!(t.name().parse::<Tier>().unwrap(), t);
        }
        assert!("huge".parse::<Tier>().is_err());
        assert_eq!("fp16".parse::<Precision>().unwrap(), Precision::F16);
        assert!("int4".parse::<Precision>().is_err());
    }
}
