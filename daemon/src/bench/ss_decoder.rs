//! `trellisd bench ss-decoder`: the full-size SparseStructureDecoder (16³×8 latent → 64³ logits;
//! channels 512 → 128 → 32) built from the `ss_dec_conv3d_16l8_fp16` manifest with random weights,
//! run in float32 on the CPU. Prints build and forward wall time, peak memory and the output shape.

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use super::{current_rss_kib, manifest_path, mib, peak_rss_kib};
use crate::models::config::ModelConfig;
use crate::models::ss_vae::SparseStructureDecoder;
use crate::runtime::weights::{Manifest, ManifestFill};

pub fn run(dev: &Device, out: &mut dyn Write) -> Result<()> {
    let stem = "ss_dec_conv3d_16l8_fp16";
    let manifest = Manifest::load(&manifest_path(stem)?)?;
    let ModelConfig::SparseStructureDecoder(cfg) = ModelConfig::from_json(stem, &manifest.config)?
    else {
        bail!("{stem}: not a SparseStructureDecoder manifest");
    };
    let dev = dev.clone();
    writeln!(
        out,
        "ss-decoder: {stem}, channels {:?}, threads {}",
        cfg.channels,
        rayon::current_num_threads()
    )?;
    let t0 = Instant::now();
    let (vb, check) = manifest.var_builder(ManifestFill::Random { seed: 0 }, DType::F32, &dev);
    let decoder = SparseStructureDecoder::new(&cfg, vb, DType::F32)?;
    check.finish()?;
    let build = t0.elapsed().as_secs_f64();
    writeln!(
        out,
        "build (random weights): {build:.2}s, rss {}",
        mib(current_rss_kib())
    )?;

    let r = 16;
    let z = Tensor::randn(0f32, 1.0, (1, cfg.latent_channels, r, r, r), &dev)?;
    let before = peak_rss_kib();
    let t1 = Instant::now();
    let logits = decoder.forward(&z)?;
    let secs = t1.elapsed().as_secs_f64();
    let positive = logits
        .gt(0f32)?
        .to_dtype(DType::F32)?
        .mean_all()?
        .to_scalar::<f32>()?;
    writeln!(
        out,
        "forward: {secs:.2}s, output {:?}, positive fraction {positive:.3}",
        logits.dims()
    )?;
    writeln!(
        out,
        "peak memory (VmHWM): {} (before forward {})",
        mib(peak_rss_kib()),
        mib(before)
    )?;
    Ok(())
}
