//! `trellisd doctor`: what this machine and this build can run, which models are already in the
//! Hugging Face cache, and the tier/precision a run would choose. No TRELLIS twin.

use std::io::Write;

use anyhow::Result;

use crate::hub::status::{cache_state, CacheState, RepoKind};
use crate::hub::{HubOptions, OFFICIAL_CONDITIONERS, OFFICIAL_PIPELINES};
use crate::runtime::gpu::{find_cuda_libraries, library_dirs, list_gpus, GpuInfo};
use crate::runtime::system::{build_features, human_bytes, SystemInfo};
use crate::runtime::tiers::{choose, Target};

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Device to plan for: cpu or cuda:N (default: cuda:0 when this build has CUDA and a GPU is
    /// visible, else cpu).
    #[arg(long)]
    pub device: Option<String>,
    /// Also run every GPU kernel against its CPU twin on random inputs (cuda builds, a GPU).
    #[arg(long)]
    pub check_kernels: bool,
}

/// Prints the report to stdout; exit code 0 (the report itself is the result).
pub fn run(args: &DoctorArgs) -> Result<i32> {
    let mut out = std::io::stdout().lock();
    report(args, &HubOptions::from_env(), &mut out)?;
    if args.check_kernels {
        return check_kernels(args, &mut out);
    }
    Ok(0)
}

/// Writes the whole report.
pub fn report(args: &DoctorArgs, hub: &HubOptions, out: &mut dyn Write) -> Result<()> {
    let sys = SystemInfo::detect();
    writeln!(out, "trellisd {} doctor", env!("CARGO_PKG_VERSION"))?;
    writeln!(out, "\nSystem")?;
    writeln!(
        out,
        "  OS:      {}{} ({})",
        sys.os,
        sys.kernel
            .as_deref()
            .map(|k| format!(", kernel {k}"))
            .unwrap_or_default(),
        sys.arch
    )?;
    writeln!(
        out,
        "  CPU:     {} ({} logical cores{})",
        sys.cpu_model,
        sys.logical_cores,
        sys.physical_cores
            .map(|p| format!(", {p} physical"))
            .unwrap_or_default()
    )?;
    writeln!(
        out,
        "  Memory:  {} total, {} available",
        human_bytes(sys.memory_total),
        human_bytes(sys.memory_available)
    )?;

    let features = build_features();
    let has_cuda = features.contains(&"cuda");
    writeln!(out, "\nBuild")?;
    writeln!(
        out,
        "  features: {}",
        if features.is_empty() {
            "none (CPU only)".to_string()
        } else {
            features.join(", ")
        }
    )?;
    if !has_cuda {
        writeln!(
            out,
            "  CUDA:     this build has no CUDA support. For an NVIDIA GPU, rebuild with\n            \
             `cargo build --release --features cuda` (needs the CUDA toolkit's nvcc at build time and\n            \
             the CUDA runtime libraries (cuBLAS, cuRAND, NVRTC) of the same major version at run time)."
        )?;
    }

    writeln!(out, "\nGPUs (nvidia-smi)")?;
    let gpus = match list_gpus() {
        Ok(g) if g.is_empty() => {
            writeln!(out, "  none listed")?;
            g
        }
        Ok(g) => {
            for gpu in &g {
                writeln!(out, "  {}", describe_gpu(gpu))?;
            }
            g
        }
        Err(why) => {
            writeln!(out, "  none: {why}")?;
            Vec::new()
        }
    };
    if has_cuda || !gpus.is_empty() {
        writeln!(
            out,
            "\nCUDA libraries{}",
            crate::runtime::device::cuda_major()
                .map(|m| format!(" (this binary opens CUDA {m}'s)"))
                .unwrap_or_default()
        )?;
        if has_cuda {
            // What the backend will open, opened the same way (by name, then by full path).
            for p in crate::runtime::device::probe_libraries() {
                match &p.result {
                    Ok(at) => writeln!(out, "  {:<18} {at}", p.what)?,
                    Err(e) => writeln!(out, "  {:<18} MISSING: {e}", p.what)?,
                }
            }
            let dirs = crate::runtime::device::library_dirs();
            let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            writeln!(out, "  (searched by full path: {})", looked.join(", "))?;
            if let Some(why) = crate::runtime::device::cuda_unavailable_reason() {
                writeln!(
                    out,
                    "  => CUDA cannot be used: {why}; runs fall back to the CPU"
                )?;
            }
        } else {
            let dirs = library_dirs();
            for (lib, found) in find_cuda_libraries(&dirs) {
                match found {
                    Some(p) => writeln!(out, "  {lib:<14} {}", p.display())?,
                    None => writeln!(out, "  {lib:<14} not found")?,
                }
            }
            let looked: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            writeln!(out, "  (searched: {})", looked.join(", "))?;
        }
    }

    writeln!(
        out,
        "\nModels in the Hugging Face cache {}{}",
        hub.cache_dir.display(),
        if hub.offline {
            " (HF_HUB_OFFLINE set)"
        } else {
            ""
        }
    )?;
    let repos = OFFICIAL_PIPELINES
        .iter()
        .map(|r| (*r, RepoKind::Pipeline))
        .chain(
            OFFICIAL_CONDITIONERS
                .iter()
                .map(|r| (*r, RepoKind::Conditioner)),
        );
    for (repo, kind) in repos {
        let line = match cache_state(repo, kind, hub) {
            CacheState::Absent => "not downloaded".to_string(),
            CacheState::Complete { bytes } => format!("complete ({})", human_bytes(bytes)),
            CacheState::Partial { missing } => {
                let first = missing.first().cloned().unwrap_or_default();
                format!(
                    "partial: {} missing (first: {first}); the next run downloads the rest",
                    missing.len()
                )
            }
        };
        writeln!(out, "  {repo:<38} {line}")?;
    }

    let device = args.device.clone().unwrap_or_else(|| {
        if has_cuda && !gpus.is_empty() {
            "cuda:0".to_string()
        } else {
            "cpu".to_string()
        }
    });
    let target = if device == "cpu" {
        Target::Cpu {
            memory_available: sys.memory_available,
        }
    } else {
        let idx: usize = device
            .strip_prefix("cuda:")
            .or_else(|| (device == "cuda").then_some("0"))
            .and_then(|i| i.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("unknown device {device:?}: expected cpu or cuda:N"))?;
        let gpu = gpus
            .iter()
            .find(|g| g.index == idx)
            .ok_or_else(|| anyhow::anyhow!("device {device}: no such GPU in nvidia-smi's list"))?;
        Target::Cuda {
            free_memory: gpu.memory_free,
            compute_capability: gpu.compute_capability,
        }
    };
    let plan = choose(target);
    writeln!(out, "\nPlan for device {device}")?;
    writeln!(out, "  tier:      {}", plan.tier)?;
    writeln!(out, "  precision: {}", plan.precision)?;
    writeln!(out, "  why:       {}", plan.reason)?;
    if let Target::Cuda {
        compute_capability, ..
    } = target
    {
        let (p, why) = crate::runtime::precision::PrecisionChoice::Auto.resolve(compute_capability);
        writeln!(out, "  --precision auto: {p} ({why})")?;
    }
    if !has_cuda && device != "cpu" {
        writeln!(
            out,
            "  note:      this build cannot use {device}: rebuild with --features cuda"
        )?;
    }
    Ok(())
}

fn describe_gpu(g: &GpuInfo) -> String {
    format!(
        "{}: {}, {} total, {} free{}{}",
        g.index,
        g.name,
        human_bytes(g.memory_total),
        human_bytes(g.memory_free),
        g.compute_capability
            .map(|(a, b)| format!(", compute {a}.{b}"))
            .unwrap_or_default(),
        g.driver
            .as_deref()
            .map(|d| format!(", driver {d}"))
            .unwrap_or_default()
    )
}

/// `--check-kernels`: exit code 1 when a kernel disagrees with its CPU twin or cannot run.
fn check_kernels(args: &DoctorArgs, out: &mut dyn Write) -> Result<i32> {
    writeln!(out, "\nGPU kernels against their CPU twins")?;
    #[cfg(feature = "cuda")]
    {
        let dev = crate::runtime::device::open_str(
            args.device.as_deref().unwrap_or("cuda:0"),
            crate::runtime::device::Fallback::Fail,
        )?;
        let mut failed = false;
        let mut checks = crate::runtime::cuda_ops::checks::all(&dev);
        checks.extend(crate::runtime::cuda_raster::checks::all(&dev));
        checks.extend(crate::runtime::cuda_flexicubes::checks::all(&dev));
        for (name, r) in checks {
            match r {
                Ok(e) => writeln!(out, "  {name:<28} ok (error {e:.2e})")?,
                Err(e) => {
                    failed = true;
                    writeln!(out, "  {name:<28} FAILED: {e:#}")?
                }
            }
        }
        Ok(i32::from(failed))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = args;
        writeln!(
            out,
            "  this build has no CUDA kernels (build it with tools/build-cuda.sh)"
        )?;
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_covers_every_section() {
        let tmp = tempfile::tempdir().unwrap();
        let hub = HubOptions::new("http://127.0.0.1:9", tmp.path());
        let mut out = Vec::new();
        report(
            &DoctorArgs {
                device: Some("cpu".into()),
                check_kernels: false,
            },
            &hub,
            &mut out,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        for needle in [
            "System",
            "CPU:",
            "Memory:",
            "features:",
            "microsoft/TRELLIS-image-large",
            "openai/clip-vit-large-patch14",
            "not downloaded",
            "tier:      cpu",
            "precision: f32",
        ] {
            assert!(text.contains(needle), "{needle:?} missing in\n{text}");
        }
        if !cfg!(feature = "cuda") {
            assert!(text.contains("no CUDA support") && text.contains("--features cuda"));
        }
        let mut out = Vec::new();
        assert!(report(
            &DoctorArgs {
                device: Some("tpu".into()),
                check_kernels: false,
            },
            &hub,
            &mut out
        )
        .is_err());
    }
}
