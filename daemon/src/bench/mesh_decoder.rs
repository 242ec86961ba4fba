//! `trellisd bench mesh-decoder`: the full-size SLatMeshDecoder (swin torso 768 wide, 12 blocks;
//! two subdivide blocks 768 → 192 → 96 channels; FlexiCubes at 256³) built from the
//! `slat_dec_mesh_swin8_B_64l8m256c_fp16` manifest with random weights, run in float32 on the CPU
//! on a synthetic 20,000-voxel shell at 64³. Prints wall time, current RSS and peak RSS (VmHWM)
//! after each stage. Random weights give a noisy SDF, so the mesh is large and meaningless: the
//! figures are for time and memory only.

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device};

use super::{current_rss_kib, manifest_path, mib, peak_rss_kib};
use crate::models::config::ModelConfig;
use crate::models::slat_vae::decoder_mesh::SLatMeshDecoder;
use crate::modules::sparse::tensor::SparseTensor;
use crate::runtime::weights::{Manifest, ManifestFill};

/// Voxels of the synthetic structure.
pub const VOXELS: usize = 20_000;

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

pub fn run(dev: &Device, out: &mut dyn Write) -> Result<()> {
    let stem = "slat_dec_mesh_swin8_B_64l8m256c_fp16";
    let manifest = Manifest::load(&manifest_path(stem)?)?;
    let ModelConfig::SLatMeshDecoder { config: cfg, .. } =
        ModelConfig::from_json(stem, &manifest.config)?
    else {
        bail!("{stem}: not a SLatMeshDecoder manifest");
    };
    let dev = dev.clone();
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

    let coords = super::shell_coords(cfg.resolution, VOXELS);
    let feats = super::randn(&[VOXELS, cfg.latent_channels], 1, &dev)?;
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
