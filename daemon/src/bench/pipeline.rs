//! `trellisd bench pipeline`: one whole official pipeline end to end (image-large or a text
//! pipeline) built from `../shared/reference/manifests` with seeded random weights, on the device
//! and precision asked for. The stages are the original's (`TrellisImageTo3DPipeline.run`):
//! conditioner, sparse-structure flow sampled with the pipeline's own sampler settings (25 steps,
//! CFG 5 inside [0.5, 1], rescale_t 3: 44 forwards), structure decoder, SLat flow on a fixed
//! N-voxel shell at 64³ (random weights give no meaningful structure, so the SLat stage runs on the
//! shell the issue-12 figures of the original were measured on), then the mesh (+ FlexiCubes),
//! Gaussian and radiance-field decoders.
//!
//! Per stage: the median wall time of `--runs` runs after one warm-up (the device synchronised
//! before each clock read), the number of flow forwards, and the peak GPU memory of the stage: the
//! high-water mark of the memory pool candle allocates from (`runtime::vram`: "allocated" is
//! memory handed to live tensors, "reserved" what the pool took from the driver), plus the peak
//! host RSS. Prints a table; `--json FILE` writes the same figures.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::{manifest_path, median, peak_rss_kib};
use crate::hub::config::PipelineConfig;
use crate::models::conditioners::common::layer_norm_plain;
use crate::models::config::{ModelConfig, SamplerParams};
use crate::models::slat_flow::SLatFlowModel;
use crate::models::slat_vae::decoder_gs::SLatGaussianDecoder;
use crate::models::slat_vae::decoder_mesh::SLatMeshDecoder;
use crate::models::slat_vae::decoder_rf::SLatRadianceFieldDecoder;
use crate::models::ss_flow::SparseStructureFlowModel;
use crate::models::ss_vae::SparseStructureDecoder;
use crate::modules::sparse::tensor::{Geometry, SparseTensor};
use crate::pipelines::base::{
    decode_slat, sample_slat, sample_sparse_structure, sampler_with, RunControl,
};
use crate::pipelines::loader::{Decoders, Formats};
use crate::pipelines::samplers::Conditioning;
use crate::runtime::precision::torso_dtype;
use crate::runtime::vram::{self, PoolStats};
use crate::runtime::weights::{Manifest, ManifestFill};

/// What to run.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// `image-large`, `text-base`, `text-large` or `text-xlarge`.
    pub pipeline: String,
    /// Voxels of the SLat stage's shell.
    pub voxels: usize,
    /// Sampler steps of both flows (default: the pipeline's own, 25).
    pub steps: Option<usize>,
    /// Timed runs after the warm-up.
    pub runs: usize,
    pub formats: Formats,
    pub json: Option<PathBuf>,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        Self {
            pipeline: "image-large".into(),
            voxels: 20_000,
            steps: None,
            runs: 3,
            formats: Formats::ALL,
            json: None,
        }
    }
}

/// The figures of one stage over the timed runs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageFigures {
    pub stage: String,
    /// Wall time of each timed run, seconds.
    pub seconds: Vec<f64>,
    pub median_s: f64,
    /// Flow forwards per run (flows only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwards: Option<usize>,
    /// GPU pool high-water marks during the stage (bytes), absent on the CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vram: Option<PoolStats>,
}

/// The whole report (`--json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PipelineReport {
    pub pipeline: String,
    pub device: String,
    pub dtypes: BTreeMap<String, String>,
    pub voxels: usize,
    pub runs: usize,
    pub build_s: f64,
    /// Bytes of weights as the networks hold them (their run dtypes).
    pub weight_bytes: u64,
    pub stages: Vec<StageFigures>,
    pub total_median_s: f64,
    /// Pool high-water marks over the whole timed runs (bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vram_peak: Option<PoolStats>,
    /// Pool figures right after the networks were built (the resident weights).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vram_resident: Option<PoolStats>,
    pub peak_rss_bytes: Option<u64>,
}

/// The networks of one pipeline, random weights.
struct Networks {
    cond: Conditioner,
    ss_flow: SparseStructureFlowModel,
    ss_decoder: SparseStructureDecoder,
    slat_flow: SLatFlowModel,
    slat_in_channels: usize,
    decoders: Decoders,
    config: PipelineConfig,
    dtypes: BTreeMap<String, String>,
    weight_bytes: u64,
}

enum Conditioner {
    Image(crate::models::conditioners::dinov2::Dinov2WithRegisters),
    Text(crate::models::conditioners::clip::ClipTextTransformer),
}

/// Builds one network of the pipeline from its manifest, in its torso dtype on `dev`; returns it
/// with the bytes its weights take.
fn build<M>(
    stem: &str,
    dev: &Device,
    seed: u64,
    dtypes: &mut BTreeMap<String, String>,
    make: impl Fn(ModelConfig, candle_nn::VarBuilder<'static>, &dyn Fn(bool) -> DType) -> Result<M>,
) -> Result<(M, u64)> {
    let manifest = Manifest::load(&manifest_path(stem)?)?;
    let cfg = ModelConfig::from_json(stem, &manifest.config)?;
    let (vb, check) = manifest.var_builder(ManifestFill::Random { seed }, DType::F32, dev);
    let dtype_of = |fp16: bool| torso_dtype(fp16, dev);
    let m = make(cfg, vb, &dtype_of).with_context(|| format!("building {stem}"))?;
    let requested = check.requested_dtypes();
    check
        .finish()
        .with_context(|| format!("weights of {stem}"))?;
    let mut bytes = 0u64;
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    for (name, dt) in &requested {
        if let Some(spec) = manifest.entries.get(name) {
            let n: usize = spec.shape.iter().product();
            bytes += (n * dt.size_in_bytes()) as u64;
            *kinds.entry(format!("{dt:?}").to_lowercase()).or_default() += n as u64;
        }
    }
    let main = kinds
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(d, _)| d.clone())
        .unwrap_or_default();
    dtypes.insert(stem.to_string(), main);
    Ok((m, bytes))
}

fn model_stem(config: &PipelineConfig, key: &str) -> Result<String> {
    let entry = config
        .models
        .get(key)
        .ok_or_else(|| anyhow::anyhow!("the pipeline manifest has no {key}"))?;
    Ok(entry.rsplit('/').next().unwrap_or(entry).to_string())
}

fn build_networks(opts: &PipelineOptions, dev: &Device) -> Result<Networks> {
    let name = format!("pipeline_TRELLIS-{}", opts.pipeline);
    let path = manifest_path(&name)?;
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let config = PipelineConfig::parse(&text, &path.display().to_string())?;
    let mut dtypes = BTreeMap::new();
    let mut bytes = 0u64;
    let cond = if config.image_cond_model.is_some() {
        let (m, params) = super::conditioners::random_dinov2_large(dev)?;
        bytes += params as u64 * 4;
        dtypes.insert("dinov2_vitl14_reg".into(), "f32".into());
        Conditioner::Image(m)
    } else {
        let (m, params) = super::conditioners::random_clip_large_text(dev)?;
        bytes += params as u64 * 4;
        dtypes.insert("clip-vit-large-patch14 (text)".into(), "f32".into());
        Conditioner::Text(m)
    };
    let (ss_flow, b) = build(
        &model_stem(&config, "sparse_structure_flow_model")?,
        dev,
        1,
        &mut dtypes,
        |c, vb, dt| match c {
            ModelConfig::SparseStructureFlow(c) => {
                SparseStructureFlowModel::new(&c, vb, dt(c.use_fp16))
            }
            other => bail!(
                "expected a SparseStructureFlowModel, got {}",
                other.class_name()
            ),
        },
    )?;
    bytes += b;
    let (ss_decoder, b) = build(
        &model_stem(&config, "sparse_structure_decoder")?,
        dev,
        2,
        &mut dtypes,
        |c, vb, dt| match c {
            ModelConfig::SparseStructureDecoder(c) => {
                SparseStructureDecoder::new(&c, vb, dt(c.use_fp16))
            }
            other => bail!(
                "expected a SparseStructureDecoder, got {}",
                other.class_name()
            ),
        },
    )?;
    bytes += b;
    let (slat_flow, b) = build(
        &model_stem(&config, "slat_flow_model")?,
        dev,
        3,
        &mut dtypes,
        |c, vb, dt| match c {
            ModelConfig::SLatFlow { config: c, .. } => {
                Ok((c.in_channels, SLatFlowModel::new(&c, vb, dt(c.use_fp16))?))
            }
            other => bail!("expected a SLatFlowModel, got {}", other.class_name()),
        },
    )?;
    let (slat_in_channels, slat_flow) = slat_flow;
    bytes += b;
    let mut decoders = Decoders {
        mesh: None,
        gaussian: None,
        radiance_field: None,
    };
    if opts.formats.mesh {
        let (m, b) = build(
            &model_stem(&config, "slat_decoder_mesh")?,
            dev,
            4,
            &mut dtypes,
            |c, vb, dt| match c {
                ModelConfig::SLatMeshDecoder { config: c, .. } => {
                    SLatMeshDecoder::new(&c, vb, dt(c.use_fp16))
                }
                other => bail!("expected a SLatMeshDecoder, got {}", other.class_name()),
            },
        )?;
        decoders.mesh = Some(m);
        bytes += b;
    }
    if opts.formats.gaussian {
        let (m, b) = build(
            &model_stem(&config, "slat_decoder_gs")?,
            dev,
            5,
            &mut dtypes,
            |c, vb, dt| match c {
                ModelConfig::SLatGaussianDecoder { config: c, .. } => {
                    SLatGaussianDecoder::new(&c, vb, dt(c.use_fp16))
                }
                other => bail!("expected a SLatGaussianDecoder, got {}", other.class_name()),
            },
        )?;
        decoders.gaussian = Some(m);
        bytes += b;
    }
    if opts.formats.radiance_field {
        let (m, b) = build(
            &model_stem(&config, "slat_decoder_rf")?,
            dev,
            6,
            &mut dtypes,
            |c, vb, dt| match c {
                ModelConfig::SLatRadianceFieldDecoder { config: c, .. } => {
                    SLatRadianceFieldDecoder::new(&c, vb, dt(c.use_fp16))
                }
                other => bail!(
                    "expected a SLatRadianceFieldDecoder, got {}",
                    other.class_name()
                ),
            },
        )?;
        decoders.radiance_field = Some(m);
        bytes += b;
    }
    Ok(Networks {
        cond,
        ss_flow,
        ss_decoder,
        slat_flow,
        slat_in_channels,
        decoders,
        config,
        dtypes,
        weight_bytes: bytes,
    })
}

/// Times `f` on `dev` (synchronised) and reads the pool's high-water marks of that span.
fn timed<T>(dev: &Device, f: impl FnOnce() -> Result<T>) -> Result<(T, f64, Option<PoolStats>)> {
    dev.synchronize()?;
    vram::reset_peaks(dev);
    let t = Instant::now();
    let v = f()?;
    dev.synchronize()?;
    Ok((v, t.elapsed().as_secs_f64(), vram::pool_stats(dev)))
}

/// One run of every stage: (stage name, seconds, forwards, pool marks).
type RunFigures = Vec<(String, f64, Option<usize>, Option<PoolStats>)>;

fn run_once(
    nets: &Networks,
    opts: &PipelineOptions,
    dev: &Device,
    shell: &[i32],
    seed: u64,
) -> Result<RunFigures> {
    let mut fig: RunFigures = Vec::new();
    let over = SamplerParams {
        steps: opts.steps,
        ..SamplerParams::default()
    };
    let mut nothing = |_: &crate::pipelines::base::ProgressEvent| {};
    let mut ctl = RunControl {
        progress: &mut nothing,
        cancel: None,
        keep_trajectory: false,
    };

    // Conditioning.
    let ((cond, neg), s, v) = timed(dev, || -> Result<(Tensor, Tensor)> {
        match &nets.cond {
            Conditioner::Image(m) => {
                let x = super::randn(&[1, 3, 518, 518], seed, dev)?;
                let c = layer_norm_plain(&m.forward_prenorm(&x)?, 1e-6)?;
                let n = c.zeros_like()?;
                Ok((c, n))
            }
            Conditioner::Text(m) => {
                let ids = super::conditioners::clip_ids(dev)?;
                let y = m.forward(&ids)?;
                Ok((y.narrow(0, 0, 1)?, y.narrow(0, 1, 1)?))
            }
        }
    })?;
    fig.push(("conditioner".into(), s, None, v));
    let c = Conditioning::Single {
        cond: &cond,
        neg: &neg,
    };

    // Sparse structure: flow, then decoder (timed apart).
    let (sampler, settings) = sampler_with(&nets.config.sparse_structure_sampler, &over)?;
    let fc = nets.ss_flow.config();
    let r = fc.resolution;
    let z = super::randn(&[1, fc.in_channels, r, r, r], seed + 1, dev)?;
    let mut forwards = 0usize;
    let mut z_s: Option<Tensor> = None;
    let (_, s, v) = timed(dev, || -> Result<()> {
        let mut fl = |x: &Tensor, t: &Tensor, c: &Tensor| -> Result<Tensor> {
            forwards += 1;
            nets.ss_flow.forward(x, t, c)
        };
        // The decoder runs apart below: here it only hands z_s out.
        let mut keep = |z: &Tensor| -> Result<Tensor> {
            z_s = Some(z.clone());
            Ok(Tensor::ones((1, 1, 1, 1, 1), DType::F32, dev)?)
        };
        sample_sparse_structure(&sampler, &settings, &mut fl, &mut keep, z, &c, &mut ctl)?;
        Ok(())
    })?;
    fig.push(("sparse-structure flow".into(), s, Some(forwards), v));
    let z_s = z_s.ok_or_else(|| anyhow::anyhow!("the structure sampler returned nothing"))?;
    let (occupied, s, v) = timed(dev, || -> Result<usize> {
        let logits = nets.ss_decoder.forward(&z_s)?;
        let coords = crate::models::ss_vae::occupied_coords(&logits)?;
        Ok(coords.dim(0)?)
    })?;
    fig.push((
        format!("sparse-structure decode ({occupied} occupied, unused)"),
        s,
        None,
        v,
    ));

    // Structured latent on the fixed shell.
    let (sampler, settings) = sampler_with(&nets.config.slat_sampler, &over)?;
    let n = shell.len() / 4;
    let coords = Tensor::from_vec(shell.to_vec(), (n, 4), dev)?;
    let in_ch = nets.slat_in_channels;
    let feats = super::randn(&[n, in_ch], seed + 2, dev)?;
    let geo = std::sync::Arc::new(Geometry::new(shell.to_vec(), None, dev)?);
    let norm = &nets.config.slat_normalization;
    let mut forwards = 0usize;
    let (slat, s, v) = timed(dev, || -> Result<Tensor> {
        let mut fl = |x: &Tensor, t: &Tensor, c: &Tensor| -> Result<Tensor> {
            forwards += 1;
            let st = SparseTensor::from_geometry(geo.clone(), x.clone())?;
            Ok(nets.slat_flow.forward(&st, t, c)?.feats().clone())
        };
        let out = sample_slat(
            &sampler, &settings, &mut fl, &coords, feats, &c, &norm.mean, &norm.std, &mut ctl,
        )?;
        Ok(out.slat)
    })?;
    fig.push(("SLat flow".into(), s, Some(forwards), v));

    // Decoders, one by one.
    for (name, f) in [
        (
            "mesh decode + FlexiCubes",
            Formats {
                mesh: true,
                ..Formats::default()
            },
        ),
        (
            "Gaussian decode",
            Formats {
                gaussian: true,
                ..Formats::default()
            },
        ),
        (
            "radiance-field decode",
            Formats {
                radiance_field: true,
                ..Formats::default()
            },
        ),
    ] {
        let wanted = (f.mesh && opts.formats.mesh)
            || (f.gaussian && opts.formats.gaussian)
            || (f.radiance_field && opts.formats.radiance_field);
        if !wanted {
            continue;
        }
        let (_, s, v) = timed(dev, || -> Result<()> {
            let d = decode_slat(&nets.decoders, &coords, &slat, f, &mut ctl)?;
            drop(d);
            Ok(())
        })?;
        fig.push((name.into(), s, None, v));
    }
    Ok(fig)
}

fn max_stats(a: Option<PoolStats>, b: Option<PoolStats>) -> Option<PoolStats> {
    match (a, b) {
        (Some(a), Some(b)) => Some(PoolStats {
            used: a.used.max(b.used),
            used_high: a.used_high.max(b.used_high),
            reserved: a.reserved.max(b.reserved),
            reserved_high: a.reserved_high.max(b.reserved_high),
        }),
        (a, b) => a.or(b),
    }
}

/// `trellisd bench pipeline` with the defaults (image-large, 20,000 voxels, 3 runs).
pub fn run_default(dev: &Device, out: &mut dyn Write) -> Result<()> {
    run(dev, &PipelineOptions::default(), out)
}

pub fn run(dev: &Device, opts: &PipelineOptions, out: &mut dyn Write) -> Result<()> {
    if opts.runs == 0 {
        bail!("bench pipeline: --runs must be at least 1");
    }
    if opts.voxels == 0 || opts.voxels > 64 * 64 * 64 {
        bail!(
            "bench pipeline: --voxels must be in 1..={} (a 64^3 grid)",
            64 * 64 * 64
        );
    }
    let dev = dev.clone();
    let t = Instant::now();
    let nets = build_networks(opts, &dev)?;
    dev.synchronize()?;
    let build_s = t.elapsed().as_secs_f64();
    let vram_resident = vram::pool_stats(&dev);
    let shell = super::shell_coords(64, opts.voxels);
    writeln!(
        out,
        "pipeline TRELLIS-{}: built in {build_s:.1}s, weights {} ({}), on {}; SLat stage on a {}-voxel shell at 64^3; {} timed run(s) after a warm-up",
        opts.pipeline,
        vram::gib(nets.weight_bytes),
        nets.dtypes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        crate::runtime::device::device_name(&dev),
        opts.voxels,
        opts.runs
    )?;
    out.flush()?;
    let warm = run_once(&nets, opts, &dev, &shell, 0)?;
    writeln!(
        out,
        "warm-up: {:.2}s",
        warm.iter().map(|f| f.1).sum::<f64>()
    )?;
    out.flush()?;
    let mut runs: Vec<RunFigures> = Vec::new();
    for i in 0..opts.runs {
        runs.push(run_once(&nets, opts, &dev, &shell, 100 * (i as u64 + 1))?);
    }
    let mut stages = Vec::new();
    let mut vram_peak = None;
    for (k, (name, _, forwards, _)) in runs[0].iter().enumerate() {
        let seconds: Vec<f64> = runs.iter().map(|r| r[k].1).collect();
        let mut v = None;
        for r in &runs {
            v = max_stats(v, r[k].3);
        }
        vram_peak = max_stats(vram_peak, v);
        stages.push(StageFigures {
            stage: name.clone(),
            median_s: median(&seconds),
            seconds,
            forwards: *forwards,
            vram: v,
        });
    }
    let total: f64 = stages.iter().map(|s| s.median_s).sum();
    writeln!(
        out,
        "{:<44} {:>10} {:>9} {:>12} {:>14} {:>14}",
        "stage", "median", "forwards", "ms/forward", "peak alloc", "peak reserved"
    )?;
    for s in &stages {
        writeln!(
            out,
            "{:<44} {:>9.1}ms {:>9} {:>12} {:>14} {:>14}",
            s.stage,
            s.median_s * 1e3,
            s.forwards.map_or("".into(), |f| f.to_string()),
            s.forwards
                .map_or("".into(), |f| format!("{:.1}", s.median_s * 1e3 / f as f64)),
            s.vram.map_or("n/a".into(), |v| vram::gib(v.used_high)),
            s.vram.map_or("n/a".into(), |v| vram::gib(v.reserved_high)),
        )?;
    }
    writeln!(out, "{:<44} {:>9.1}ms", "sum", total * 1e3)?;
    if let (Some(r), Some(p)) = (vram_resident, vram_peak) {
        writeln!(
            out,
            "GPU memory: weights resident {} (pool after building), peak allocated {}, peak reserved {}",
            vram::gib(r.used),
            vram::gib(p.used_high),
            vram::gib(p.reserved_high)
        )?;
    }
    let peak_rss = peak_rss_kib().map(|k| k * 1024);
    writeln!(
        out,
        "host: peak RSS {}",
        peak_rss.map_or("n/a".into(), vram::gib)
    )?;
    let report = PipelineReport {
        pipeline: format!("TRELLIS-{}", opts.pipeline),
        device: crate::runtime::device::device_name(&dev),
        dtypes: nets.dtypes.clone(),
        voxels: opts.voxels,
        runs: opts.runs,
        build_s,
        weight_bytes: nets.weight_bytes,
        stages,
        total_median_s: total,
        vram_peak,
        vram_resident,
        peak_rss_bytes: peak_rss,
    };
    if let Some(p) = &opts.json {
        let text = serde_json::to_string_pretty(&report)?;
        crate::export::atomic::write_atomic(p, |w| Ok(w.write_all(text.as_bytes())?))
            .with_context(|| format!("writing {}", p.display()))?;
        writeln!(out, "wrote {}", p.display())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_maxima() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let a = PoolStats {
            used: 1,
            used_high: 5,
            reserved: 2,
            reserved_high: 6,
        };
        let b = PoolStats {
            used: 3,
            used_high: 4,
            reserved: 1,
            reserved_high: 9,
        };
        let m = max_stats(Some(a), Some(b)).unwrap();
        assert_eq!(
            (m.used, m.used_high, m.reserved, m.reserved_high),
            (3, 5, 2, 9)
        );
        assert_eq!(max_stats(None, Some(a)), Some(a));
    }
}
