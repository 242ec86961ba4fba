//! `trellisd bench mesh-decoder`: the full-size SLatMeshDecoder (swin torso 768 wide, 12 blocks;
//! two subdivide blocks 768 → 192 → 96 channels; FlexiCubes at 256³) built from the
//! `slat_dec_mesh_swin8_B_64l8m256c_fp16` manifest with random weights, run in float32 on the CPU
//! on a synthetic 20,000-voxel shell at 64³. Prints wall time, current RSS and peak RSS (VmHWM)
//! after each stage. Random weights give a noisy SDF, so the mesh is large and meaningless: the
//! figures are for time and memory only.

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use super::{current_rss_kib, manifest_path, mib, peak_rss_kib};
use crate::models::config::ModelConfig;
use crate::models::slat_vae::decoder_mesh::SLatMeshDecoder;
use crate::modules::sparse::tensor::SparseTensor;
use crate::runtime::weights::{Manifest, ManifestFill};

/// Voxels of the synthetic structure.
pub const VOXELS: usize = 20_000;

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

fn stage(out: &mut dyn Write, name: &str, t: Instant, extra: &str) -> Result<()> {
    writeln!(
        out,
        "{name:<14} {:>7.2}s  rss {:>11}  peak {:>11}  {extra}",
        t.elapsed().as_secs_f64(),
        mib(current_rss_kib()),
        mib(peak_rss_kib())
    )?;
    Ok(())
}

pub fn run(out: &mut dyn Write) -> Result<()> {
    let stem = "slat_dec_mesh_swin8_B_64l8m256c_fp16";
    let manifest = Manifest::load(&manifest_path(stem)?)?;
    let ModelConfig::SLatMeshDecoder { config: cfg, .. } =
        ModelConfig::from_json(stem, &manifest.config)?
    else {
        bail!("{stem}: not a SLatMeshDecoder manifest");
    };
    let dev = Device::Cpu;
    writeln!(
        out,
        "mesh-decoder: {stem}, {} blocks x {} channels, {VOXELS} voxels at {}^3 -> FlexiCubes at {}^3, f32, threads {}",
        cfg.num_blocks,
        cfg.model_channels,
        cfg.resolution,
        cfg.resolution * 4,
        rayon::current_num_threads()
    )?;
    let t = Instant::now();
    let (vb, check) = manifest.var_builder(ManifestFill::Random { seed: 0 }, DType::F32, &dev);
    let net = SLatMeshDecoder::new(&cfg, vb, DType::F32)?;
    check.finish()?;
    stage(out, "build", t, "(random weights)")?;

    let coords = shell_coords(cfg.resolution, VOXELS);
    let feats = Tensor::randn(0f32, 1.0, (VOXELS, cfg.latent_channels), &dev)?;
    let x = SparseTensor::new(coords, feats)?;

    let t = Instant::now();
    let mut h = net.torso().forward(&x)?;
    stage(out, "torso", t, &format!("{:?}", h.feats().dims()))?;
    for (i, block) in net.upsample().iter().enumerate() {
        let t = Instant::now();
        h = block.forward(&h)?;
        stage(
            out,
            &format!("upsample {i}"),
            t,
            &format!("{:?}", h.feats().dims()),
        )?;
    }
    let t = Instant::now();
    let raw = net.out_layer().forward(&h)?;
    drop(h);
    stage(out, "out_layer", t, &format!("{:?}", raw.feats().dims()))?;
    let t = Instant::now();
    let meshes = net.to_representation(raw)?;
    let (mesh, grid) = meshes
        .first()
        .ok_or_else(|| anyhow::anyhow!("no mesh came back"))?;
    stage(
        out,
        "flexicubes",
        t,
        &format!(
            "{} grid vertices, mesh {} vertices / {} faces",
            grid.coords.len(),
            mesh.vertices.len(),
            mesh.faces.len()
        ),
    )?;
    Ok(())
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
}
