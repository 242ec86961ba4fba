//! `--vram-tier`, `--vram-budget`, `--vram-ballast`: shared by `generate`, `variant`, `edit`,
//! `serve` and `bench pipeline` (see `runtime::residency`).

use anyhow::Result;

use crate::runtime::residency::MemoryOptions;

#[derive(Debug, Clone, Default, clap::Args)]
pub struct MemoryArgs {
    /// GPU memory tier: auto (chosen from free memory at each job's start), high (every network
    /// stays on the GPU), medium (each stage's networks uploaded for it and freed after), low (as
    /// medium, decoders one at a time) or minimal. Env: TRELLIS_VRAM_TIER.
    #[arg(long, value_name = "TIER")]
    pub vram_tier: Option<String>,
    /// Most memory the networks' weights may take on the device at once (e.g. 6GiB): a placement
    /// beyond it counts as out of memory, so the job drops a tier and goes on. Also on the CPU
    /// (testing). Env: TRELLIS_VRAM_BUDGET.
    #[arg(long, value_name = "SIZE")]
    pub vram_budget: Option<String>,
    /// Hold this much GPU memory for the whole run (e.g. 72GiB), to try a large card as a small
    /// one. Env: TRELLIS_VRAM_BALLAST.
    #[arg(long, value_name = "SIZE")]
    pub vram_ballast: Option<String>,
}

impl MemoryArgs {
    /// The options these flags (else the environment) give.
    pub fn options(&self) -> Result<MemoryOptions> {
        MemoryOptions::parse(
            self.vram_tier.as_deref(),
            self.vram_budget.as_deref(),
            self.vram_ballast.as_deref(),
        )
    }
}
