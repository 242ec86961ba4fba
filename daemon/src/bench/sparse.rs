//! `trellisd bench slat-flow`: the full-size image SLatFlowModel (`slat_flow_img_dit_L_64l8p2_fp16`
//! manifest, random weights) in float32 on the CPU, on a synthetic ~20,000-voxel thick spherical
//! shell at 64³, plus the two sparse kernels alone at that size: the submanifold conv (neighbour
//! map + gather-GEMM-scatter, io-block width) and the varlen attention (the flow's token count after
//! its 2× downsample, model width and heads). Prints wall times and peak memory (VmHWM).

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use trellis_kernels::attention::{varlen_attention, AttnGroup, AttnShape};
use trellis_kernels::sparse_conv::{submanifold_conv, submanifold_neighbours};

use super::lcg_vec;
use super::{current_rss_kib, manifest_path, mib, peak_rss_kib};
use crate::models::config::ModelConfig;
use crate::models::slat_flow::SLatFlowModel;
use crate::modules::sparse::spatial::SparseDownsample;
use crate::modules::sparse::tensor::SparseTensor;
use crate::runtime::weights::{Manifest, ManifestFill};

pub fn run(dev: &Device, out: &mut dyn Write) -> Result<()> {
    let stem = "slat_flow_img_dit_L_64l8p2_fp16";
    let manifest = Manifest::load(&manifest_path(stem)?)?;
    let ModelConfig::SLatFlow { config: cfg, .. } = ModelConfig::from_json(stem, &manifest.config)?
    else {
        bail!("{stem}: not an SLatFlowModel manifest");
    };
    let dev = dev.clone();
    let coords = super::shell_coords(cfg.resolution, 20_000);
    let n = coords.len() / 4;
    writeln!(
        out,
        "slat-flow: {stem}, model {} ch x {} blocks, io {:?}; {n} voxels (a shell in {}^3); threads {}",
        cfg.model_channels,
        cfg.num_blocks,
        cfg.io_block_channels,
        cfg.resolution,
        rayon::current_num_threads()
    )?;

    // Kernels alone.
    let io_ch = cfg
        .io_block_channels
        .first()
        .copied()
        .unwrap_or(cfg.model_channels);
    let t0 = Instant::now();
    let map = submanifold_neighbours(&coords, [3, 3, 3])?;
    let t_map = t0.elapsed().as_secs_f64();
    let feats = lcg_vec(n * io_ch, 1);
    let weight = lcg_vec(io_ch * 27 * io_ch, 2);
    let t0 = Instant::now();
    let y = submanifold_conv(&feats, io_ch, &map, &weight, None, io_ch)?;
    let t_conv = t0.elapsed().as_secs_f64();
    let pairs = map.table.iter().filter(|&&j| j >= 0).count();
    let gflop = 2.0 * pairs as f64 * (io_ch * io_ch) as f64 / 1e9;
    writeln!(
        out,
        "sparse conv kernel {io_ch}->{io_ch} k3 on {n} voxels: neighbour map {:.3}s ({pairs} pairs), conv {:.3}s ({:.1} GFLOP/s), checksum {:.3}",
        t_map,
        t_conv,
        gflop / t_conv,
        y.iter().map(|v| v.abs() as f64).sum::<f64>() / y.len() as f64
    )?;

    let fine = SparseTensor::new(coords.clone(), Tensor::zeros((n, 1), DType::F32, &dev)?)?;
    let mut coarse = fine.clone();
    for _ in 0..cfg.io_block_channels.len() {
        coarse = SparseDownsample::new(2).forward(&coarse)?;
    }
    let m = coarse.rows();
    let (h, d) = (cfg.heads(), cfg.model_channels / cfg.heads());
    let q = lcg_vec(m * h * d, 3);
    let k = lcg_vec(m * h * d, 4);
    let v = lcg_vec(m * h * d, 5);
    let groups = [AttnGroup { q: 0..m, kv: 0..m }];
    let shape = AttnShape {
        heads: h,
        head_dim: d,
        v_dim: d,
    };
    let t0 = Instant::now();
    let o = varlen_attention(&q, &k, &v, &groups, shape, 1.0 / (d as f32).sqrt())?;
    let t_attn = t0.elapsed().as_secs_f64();
    let gflop = 4.0 * (m * m * h * d) as f64 / 1e9;
    writeln!(
        out,
        "attention kernel, full self over {m} tokens (the flow's coarse level), {h} heads x {d}: {t_attn:.3}s ({:.1} GFLOP/s), checksum {:.4}",
        gflop / t_attn,
        o.iter().map(|x| x.abs() as f64).sum::<f64>() / o.len() as f64
    )?;
    drop((feats, weight, y, q, k, v, o));

    // The whole network.
    let t0 = Instant::now();
    let (vb, check) = manifest.var_builder(ManifestFill::Random { seed: 0 }, DType::F32, &dev);
    let model = SLatFlowModel::new(&cfg, vb, DType::F32)?;
    check.finish()?;
    writeln!(
        out,
        "build (random weights, f32): {:.2}s, rss {}",
        t0.elapsed().as_secs_f64(),
        mib(current_rss_kib())
    )?;
    let x = SparseTensor::new(coords, super::randn(&[n, cfg.in_channels], 1, &dev)?)?;
    let t = Tensor::new(&[500f32], &dev)?;
    let cond = super::randn(&[1, 1374, cfg.cond_channels], 2, &dev)?;
    let before = peak_rss_kib();
    let t0 = Instant::now();
    let y = model.forward(&x, &t, &cond)?;
    let secs = t0.elapsed().as_secs_f64();
    let std = y.feats().sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?;
    writeln!(
        out,
        "forward (1 x {n} voxels, cond [1, 1374, {}]): {secs:.2}s, output {:?}, rms {std:.4}",
        cfg.cond_channels,
        y.feats().dims()
    )?;
    writeln!(
        out,
        "peak memory (VmHWM): {} (before forward {})",
        mib(peak_rss_kib()),
        mib(before)
    )?;
    Ok(())
}
