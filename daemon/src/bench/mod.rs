//! `trellisd bench NAME`: speed and memory benchmarks of full-size networks with random weights.
//!
//! Each benchmark is one file here and one entry of [`BENCHES`]; it prints its own figures. Helpers
//! shared by all: [`peak_rss_kib`] (VmHWM), [`manifest_path`], the synthetic structure
//! [`shell_coords`] and [`lcg_vec`] values.

pub mod attention;
pub mod bake;
pub mod conditioners;
pub mod conv;
pub mod mesh_decoder;
pub mod pipeline;
pub mod side_by_side;
pub mod sparse;
pub mod ss_decoder;
pub mod subdivide;
pub mod u2net;

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};

/// One benchmark: its name on the command line, a one-line description, and the function that runs it.
pub struct Bench {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(&candle_core::Device, &mut dyn Write) -> Result<()>,
}

/// Every benchmark, in the order `trellisd bench --list` shows them.
pub const BENCHES: &[Bench] = &[
    Bench {
        name: "pipeline",
        about: "a whole official pipeline end to end (image-large by default; --pipeline, --voxels, --steps, --runs, --json) from the manifests with random weights on --device/--precision: per-stage median time, flow ms per forward, peak GPU memory (pool high-water marks) and host RSS",
        run: pipeline::run_default,
    },
    Bench {
        name: "attention",
        about: "the attention kernels on TRELLIS's shapes (SS flow self/cross, SLat varlen, decoder windows) in TFLOP/s beside the device's matrix-product rate: tensor cores in f16/bf16 on a GPU, f32 on the CPU",
        run: attention::run,
    },
    Bench {
        name: "sparse-conv",
        about: "the half-precision tensor-core sparse conv on the SLat flow's io-block shapes (20,000-voxel shell at 64^3 and its 2x downsample: 2048->128 shift 3, 128->128, 128->1024, 1024->1024), every TRELLIS_CONV_TILE tiling with and without the mask row order, in TFLOP/s (CUDA); on any device the tiles' mean active offsets",
        run: conv::run,
    },
    Bench {
        name: "ss-flow",
        about: "full-size SparseStructureFlowModel (ss_flow_img_dit_L_16l8_fp16 manifest, random weights), f32 CPU, x [1,8,16,16,16], cond [1,1374,1024]; with --weights/--inputs, one forward from files (also slat-flow, mesh-decoder, dinov2-large: see tools/bench/side_by_side.py)",
        run: side_by_side::run_ss_flow,
    },
    Bench {
        name: "ss-decoder",
        about: "full-size SparseStructureDecoder (ss_dec_conv3d_16l8_fp16 manifest, random weights), f32 CPU, latent [1,8,16,16,16]",
        run: ss_decoder::run,
    },
    Bench {
        name: "slat-flow",
        about: "full-size SLatFlowModel (slat_flow_img_dit_L_64l8p2_fp16 manifest, random weights), f32 CPU, 20k-voxel shell at 64^3; plus the sparse conv and attention kernels alone",
        run: sparse::run,
    },
    Bench {
        name: "dinov2-large",
        about: "full-size DINOv2-L with registers (random weights), f32 CPU, one 518x518 image -> [1,1374,1024]",
        run: conditioners::run_dinov2,
    },
    Bench {
        name: "clip-large-text",
        about: "full-size CLIP ViT-L/14 text transformer (random weights), f32 CPU, batch 2 x 77 tokens",
        run: conditioners::run_clip,
    },
    Bench {
        name: "mesh-decoder",
        about: "full-size SLatMeshDecoder + FlexiCubes at 256^3 (slat_dec_mesh_swin8_B_64l8m256c_fp16 manifest, random weights), f32 CPU, 20,000-voxel shell at 64^3; time and peak RSS per stage",
        run: mesh_decoder::run,
    },
    Bench {
        name: "subdivide-conv",
        about: "the mesh decoder's subdivide-block conv (768 -> 192 ch, 5,000-voxel shell at 64^3), explicit 8x subdivide + conv vs subdivided_conv, side by side in one process",
        run: subdivide::run,
    },
    Bench {
        name: "bake",
        about: "GLB post-processing (rasterisers on --device: cuda:N uses the GPU ones): ~200k-triangle mesh with a hidden inner shell and 512k Gaussians -> visibility clean-up, 20k triangles (meshopt), xatlas UVs, 1024^2 texture baked from 32 views of 512^2",
        run: bake::run,
    },
    Bench {
        name: "u2net",
        about: "full-size U²-Net background removal (u2net.pth layout from tests/reference-u2net, random weights), f32 CPU: forward on 1x3x320x320, and the whole removal of a 1024x768 image",
        run: u2net::run,
    },
];

/// Runs the benchmark called `name`; an unknown name is an error listing the known ones.
pub fn run(name: &str, device: &candle_core::Device, out: &mut dyn Write) -> Result<()> {
    match BENCHES.iter().find(|b| b.name == name) {
        Some(b) => (b.run)(device, out),
        None => bail!(
            "unknown benchmark {name:?} (known: {})",
            BENCHES
                .iter()
                .map(|b| b.name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The `n` voxels of a `res^3` grid closest to a centred sphere of radius `0.375 res`
/// (a shell like a TRELLIS surface structure), as `[n, 4]` batch-0 coords in lexicographic order.
pub fn shell_coords(res: usize, n: usize) -> Vec<i32> {
    let c = res as f64 / 2.0;
    let radius = 0.375 * res as f64;
    let mut all: Vec<(f64, [i32; 3])> = Vec::with_capacity(res * res * res);
    for x in 0..res as i32 {
        for y in 0..res as i32 {
            for z in 0..res as i32 {
                let d = [x, y, z].map(|v| v as f64 + 0.5 - c);
                let r = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt();
                all.push(((r - radius).abs(), [x, y, z]));
            }
        }
    }
    all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut picked: Vec<[i32; 3]> = all.into_iter().take(n).map(|(_, p)| p).collect();
    picked.sort_unstable();
    picked
        .into_iter()
        .flat_map(|p| [0, p[0], p[1], p[2]])
        .collect()
}

/// Standard normal inputs, the same on every run (`torch.manual_seed(seed)` + `torch.randn`), so
/// that two builds benchmark exactly the same data.
pub fn randn(shape: &[usize], seed: u64, dev: &candle_core::Device) -> Result<candle_core::Tensor> {
    use crate::pipelines::noise::{NoiseSource, TorchNoise};
    TorchNoise::new(seed).randn(shape, dev)
}

/// `n` deterministic values in [-1, 1) from a 64-bit LCG (benchmark inputs and weights).
pub fn lcg_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The process's peak resident set size in KiB (`VmHWM` of /proc/self/status), where available.
pub fn peak_rss_kib() -> Option<u64> {
    proc_status_kib("VmHWM:")
}

/// The process's current resident set size in KiB (`VmRSS`), where available.
pub fn current_rss_kib() -> Option<u64> {
    proc_status_kib("VmRSS:")
}

fn proc_status_kib(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status_kib(&s, field)
}

fn parse_status_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

/// The median of `v` (the mean of the middle two for an even count; NaN when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

/// Formats KiB as MiB text ("n/a" when unknown).
pub fn mib(kib: Option<u64>) -> String {
    kib.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
        .unwrap_or_else(|| "n/a".to_string())
}

/// A checkpoint manifest of the reference directory (`manifests/<stem>.json`); an error names the
/// path when it is missing.
pub fn manifest_path(stem: &str) -> Result<PathBuf> {
    let p = crate::reference_dir()
        .join("manifests")
        .join(format!("{stem}.json"));
    if !p.is_file() {
        bail!(
            "manifest {} not found (set TRELLIS_REFERENCE_DIR to the reference fixtures)",
            p.display()
        );
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_has_the_requested_size_sorted_and_in_range() {
        let c = shell_coords(16, 500);
        assert_eq!(c.len(), 2000);
        let rows: Vec<&[i32]> = c.chunks(4).collect();
        assert!(rows.windows(2).all(|w| w[0] < w[1]));
        assert!(c.iter().all(|&v| (0..16).contains(&v)));
        // a shell: the centre voxel is not in it
        assert!(!rows.iter().any(|r| r[1..] == [8, 8, 8]));
    }

    #[test]
    fn parses_proc_status_fields() {
        let s = "Name:\ttrellisd\nVmHWM:\t  123456 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_status_kib(s, "VmHWM:"), Some(123456));
        assert_eq!(parse_status_kib(s, "VmRSS:"), Some(1000));
        assert_eq!(parse_status_kib(s, "VmPeak:"), None);
        assert_eq!(mib(Some(2048)), "2.0 MiB");
    }

    #[test]
    fn unknown_bench_is_an_error() {
        let mut out = Vec::new();
        let e = run("no-such-bench", &candle_core::Device::Cpu, &mut out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("ss-decoder"), "{e}");
    }
}
