//! `trellisd bench pipeline`: one whole official pipeline end to end (image-large or a text
//! pipeline) built from `../shared/reference/manifests` with seeded random weights, on the device
//! and precision asked for. The stages are the original's (`TrellisImageTo3DPipeline.run`):
//! conditioner, sparse-structure flow sampled with the pipeline's own sampler settings (25 steps,
//! CFG 5 inside [0.5, 1], rescale_t 3: 44 forwards), structure decoder, SLat flow on a fixed
//! N-voxel shell at 64³ (random weights give no meaningful structure, so the SLat stage runs on the
//! shell the issue-12 figures of the original were measured on), then the mesh (+ FlexiCubes),
//! Gaussian and radiance-field decoders.
//!
//! The stages run through the same code as a job's (`pipelines::base`'s stage functions on a
//! `runtime::residency::Residency`), at the tier `--vram-tier` names (default: chosen from free
//! memory), with `--vram-budget` / `--vram-ballast` as a job would. The weights are built once in
//! host memory; each stage's networks are placed on the device as the tier says.
//!
//! Per stage: the median wall time of `--runs` runs after one warm-up (the device synchronised
//! before each clock read; uploads included), the tier it ran at, the number of flow forwards,
//! how long the weight uploads took (and how much of that was hidden behind compute: copies a
//! stage started for the next one, `runtime::prefetch`), and the peak GPU memory of the stage: the high-water mark of
//! the memory pool candle allocates from (`runtime::vram`: "allocated" is memory handed to live
//! tensors, "reserved" what the pool took from the driver), plus the peak host RSS. Prints a
//! table; `--json FILE` writes the same figures.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::{manifest_path, median, peak_rss_kib};
use crate::hub::config::PipelineConfig;
use crate::models::conditioners::common::layer_norm_plain;
use crate::models::config::SparseStructureFlowConfig;
use crate::models::config::{ModelConfig, SamplerParams};
use crate::models::slat_flow::SLatFlowModel;
use crate::models::slat_vae::decoder_gs::SLatGaussianDecoder;
use crate::models::slat_vae::decoder_mesh::SLatMeshDecoder;
use crate::models::slat_vae::decoder_rf::SLatRadianceFieldDecoder;
use crate::models::ss_flow::SparseStructureFlowModel;
use crate::models::ss_vae::SparseStructureDecoder;
use crate::pipelines::base::{
    decode_slat, sampler_with, slat_stage, ss_decoder_stage, ss_flow_stage, RunControl,
};
use crate::pipelines::loader::{host_network_streaming, Decoders, Formats};
use crate::pipelines::samplers::Conditioning;
use crate::runtime::block_stream::{BlockStream, StreamTotals};
use crate::runtime::precision::torso_dtype;
use crate::runtime::residency::{MemoryOptions, Network, Residency, StageRecord};
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
    /// `--vram-tier`, `--vram-budget`, `--vram-ballast`.
    pub memory: MemoryOptions,
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
            memory: MemoryOptions::default(),
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
    /// The tier(s) the stage ran at over the timed runs.
    pub tiers: Vec<String>,
    /// Median seconds of its weight uploads, the bytes uploaded per run (median), and the median
    /// seconds of uploads hidden behind compute (copies started during an earlier stage).
    pub upload_median_s: f64,
    pub upload_bytes: u64,
    pub upload_hidden_median_s: f64,
    /// Out-of-memory fallbacks over the timed runs.
    pub fallbacks: usize,
    /// What its networks streamed per run (blocks, bytes, copy and waited seconds: medians over
    /// the runs), at the tier that streams the flows' blocks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streamed: Option<StreamTotals>,
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
    /// The tier asked for (`auto` when chosen per run) and the memory budget, if any.
    pub tier: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vram_budget: Option<u64>,
    /// Bytes of weights as the networks hold them (their run dtypes), in host memory.
    pub weight_bytes: u64,
    pub stages: Vec<StageFigures>,
    pub total_median_s: f64,
    /// Pool high-water marks over the whole timed runs (bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vram_peak: Option<PoolStats>,
    /// Pool figures after the warm-up (the weights the tier keeps resident).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vram_resident: Option<PoolStats>,
    pub peak_rss_bytes: Option<u64>,
    /// Median over the timed runs (each a later job in the same process) of the time from the
    /// job's start to the end of its first sampling step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_step_s: Option<f64>,
}

/// The networks of one pipeline, random weights.
struct Networks {
    cond: Conditioner,
    ss_flow: Network<SparseStructureFlowModel>,
    ss_decoder: Network<SparseStructureDecoder>,
    ss_flow_config: SparseStructureFlowConfig,
    slat_flow: Network<SLatFlowModel>,
    slat_in_channels: usize,
    decoders: Decoders,
    config: PipelineConfig,
    dtypes: BTreeMap<String, String>,
    weight_bytes: u64,
}

enum Conditioner {
    Image(Network<crate::models::conditioners::dinov2::Dinov2WithRegisters>),
    Text(Network<crate::models::conditioners::clip::ClipTextTransformer>),
}

/// Builds one network of the pipeline from its manifest into host memory, in the torso dtype it
/// runs in on `dev`; returns it with the bytes its weights take.
fn build<C, M>(
    stem: &str,
    dev: &Device,
    seed: u64,
    dtypes: &mut BTreeMap<String, String>,
    mut pick: impl FnMut(ModelConfig) -> Result<(C, bool)>,
    streams: Option<&str>,
    make: impl Fn(&C, candle_nn::VarBuilder<'static>, DType, Option<&BlockStream>) -> Result<M>
        + Send
        + Sync
        + 'static,
) -> Result<(Network<M>, u64)>
where
    C: Send + Sync + 'static,
    M: Send + Sync + 'static,
{
    let manifest = Manifest::load(&manifest_path(stem)?)?;
    let (cfg, use_fp16) = pick(ModelConfig::from_json(stem, &manifest.config)?)?;
    let vb = manifest.var_builder(ManifestFill::Random { seed }, DType::F32, &Device::Cpu);
    let dtype = torso_dtype(use_fp16, dev);
    let net = host_network_streaming(stem, vb, cfg, dtype, streams, make, |check| {
        Ok(check.finish()?)
    })
    .with_context(|| format!("building {stem}"))?;
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    for (_, dtype, n) in net.host().entries() {
        *kinds
            .entry(format!("{dtype:?}").to_lowercase())
            .or_default() += n as u64;
    }
    let main = kinds
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(d, _)| d.clone())
        .unwrap_or_default();
    dtypes.insert(stem.to_string(), main);
    let bytes = net.host().bytes();
    Ok((net, bytes))
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
        let (m, params) = super::conditioners::random_dinov2_large_network()?;
        bytes += params as u64 * 4;
        dtypes.insert("dinov2_vitl14_reg".into(), "f32".into());
        Conditioner::Image(m)
    } else {
        let (m, params) = super::conditioners::random_clip_large_text_network()?;
        bytes += params as u64 * 4;
        dtypes.insert("clip-vit-large-patch14 (text)".into(), "f32".into());
        Conditioner::Text(m)
    };
    fn wrong<T>(want: &str, got: ModelConfig) -> Result<T> {
        bail!("expected a {want}, got {}", got.class_name())
    }
    let mut ss_flow_config = None;
    let (ss_flow, b) = build(
        &model_stem(&config, "sparse_structure_flow_model")?,
        dev,
        1,
        &mut dtypes,
        |c| match c {
            ModelConfig::SparseStructureFlow(c) => {
                ss_flow_config = Some(c.clone());
                let fp16 = c.use_fp16;
                Ok((c, fp16))
            }
            other => wrong("SparseStructureFlowModel", other),
        },
        Some("blocks"),
        |c, vb, dt, stream| SparseStructureFlowModel::placed(c, vb, dt, stream),
    )?;
    let ss_flow_config =
        ss_flow_config.ok_or_else(|| anyhow::anyhow!("no sparse-structure flow config"))?;
    bytes += b;
    let (ss_decoder, b) = build(
        &model_stem(&config, "sparse_structure_decoder")?,
        dev,
        2,
        &mut dtypes,
        |c| match c {
            ModelConfig::SparseStructureDecoder(c) => {
                let fp16 = c.use_fp16;
                Ok((c, fp16))
            }
            other => wrong("SparseStructureDecoder", other),
        },
        None,
        |c, vb, dt, _| SparseStructureDecoder::new(c, vb, dt),
    )?;
    bytes += b;
    let mut slat_in_channels = 0;
    let (slat_flow, b) = build(
        &model_stem(&config, "slat_flow_model")?,
        dev,
        3,
        &mut dtypes,
        |c| match c {
            ModelConfig::SLatFlow { config: c, .. } => {
                slat_in_channels = c.in_channels;
                let fp16 = c.use_fp16;
                Ok((c, fp16))
            }
            other => wrong("SLatFlowModel", other),
        },
        Some("blocks"),
        |c, vb, dt, stream| SLatFlowModel::placed(c, vb, dt, stream),
    )?;
    bytes += b;
    let mut decoders = Decoders::default();
    if opts.formats.mesh {
        let (m, b) = build(
            &model_stem(&config, "slat_decoder_mesh")?,
            dev,
            4,
            &mut dtypes,
            |c| match c {
                ModelConfig::SLatMeshDecoder { config: c, .. } => {
                    let fp16 = c.use_fp16;
                    Ok((c, fp16))
                }
                other => wrong("SLatMeshDecoder", other),
            },
            None,
            |c, vb, dt, _| SLatMeshDecoder::new(c, vb, dt),
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
            |c| match c {
                ModelConfig::SLatGaussianDecoder { config: c, .. } => {
                    let fp16 = c.use_fp16;
                    Ok((c, fp16))
                }
                other => wrong("SLatGaussianDecoder", other),
            },
            None,
            |c, vb, dt, _| SLatGaussianDecoder::new(c, vb, dt),
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
            |c| match c {
                ModelConfig::SLatRadianceFieldDecoder { config: c, .. } => {
                    let fp16 = c.use_fp16;
                    Ok((c, fp16))
                }
                other => wrong("SLatRadianceFieldDecoder", other),
            },
            None,
            |c, vb, dt, _| SLatRadianceFieldDecoder::new(c, vb, dt),
        )?;
        decoders.radiance_field = Some(m);
        bytes += b;
    }
    Ok(Networks {
        cond,
        ss_flow,
        ss_decoder,
        ss_flow_config,
        slat_flow,
        slat_in_channels,
        decoders,
        config,
        dtypes,
        weight_bytes: bytes,
    })
}

/// One run of every stage: per stage (name, seconds, forwards, its residency record).
type RunFigures = Vec<(String, f64, Option<usize>, StageRecord)>;

/// The record of the stage `res` ran last.
fn last_stage(res: &Residency) -> Result<StageRecord> {
    res.stage_log()
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no stage ran"))
}

fn run_once(
    nets: &Networks,
    res: &Residency,
    opts: &PipelineOptions,
    dev: &Device,
    shell: &[i32],
    seed: u64,
    first_step: &mut Option<f64>,
) -> Result<(RunFigures, [f64; 2])> {
    let mut fig: RunFigures = Vec::new();
    let job_start = Instant::now();
    res.begin_job();
    let over = SamplerParams {
        steps: opts.steps,
        ..SamplerParams::default()
    };
    // When the first sampling step of the job is done (the daemon's `first_step_s`: the job
    // start to the end of the sparse-structure flow's first step; progress events come after
    // each step's host-side update, so this is not synchronised with the GPU).
    let mut on_progress = |e: &crate::pipelines::base::ProgressEvent| {
        let sampling = matches!(
            e.stage,
            crate::pipelines::base::Stage::SparseStructure
                | crate::pipelines::base::Stage::StructuredLatent
        );
        if sampling && first_step.is_none() && e.step >= 1 {
            *first_step = Some(job_start.elapsed().as_secs_f64());
        }
    };
    let mut ctl = RunControl {
        progress: &mut on_progress,
        cancel: None,
        keep_trajectory: false,
    };
    // Wall time of a stage: synchronised before and after (its uploads included).
    let clock = |t: Instant| -> Result<f64> {
        dev.synchronize()?;
        Ok(t.elapsed().as_secs_f64())
    };

    // Conditioning (the structure flow copied in meanwhile, as a job does it).
    res.prefetch_next(&[&nets.ss_flow]);
    dev.synchronize()?;
    let t = Instant::now();
    let (cond, neg) = match &nets.cond {
        Conditioner::Image(m) => {
            let x = super::randn(&[1, 3, 518, 518], seed, dev)?;
            let c = res.stage("conditioner", &[m], || {
                layer_norm_plain(&m.get()?.forward_prenorm(&x)?, 1e-6)
            })?;
            let n = c.zeros_like()?;
            (c, n)
        }
        Conditioner::Text(m) => {
            let ids = super::conditioners::clip_ids(dev)?;
            let y = res.stage("conditioner", &[m], || m.get()?.forward(&ids))?;
            (y.narrow(0, 0, 1)?, y.narrow(0, 1, 1)?)
        }
    };
    fig.push(("conditioner".into(), clock(t)?, None, last_stage(res)?));
    let c = Conditioning::Single {
        cond: &cond,
        neg: &neg,
    };

    // Sparse structure: flow, then decoder (each its own stage).
    let (sampler, settings) = sampler_with(&nets.config.sparse_structure_sampler, &over)?;
    let fc = &nets.ss_flow_config;
    let r = fc.resolution;
    let z = super::randn(&[1, fc.in_channels, r, r, r], seed + 1, dev)?;
    res.prefetch_next(&[&nets.ss_decoder, &nets.slat_flow]);
    dev.synchronize()?;
    let t = Instant::now();
    let (out, forwards) = ss_flow_stage(res, &nets.ss_flow, &sampler, &settings, &z, &c, &mut ctl)?;
    let ss_sum = abs_sum(&out.samples)?;
    fig.push((
        "sparse-structure flow".into(),
        clock(t)?,
        Some(forwards),
        last_stage(res)?,
    ));
    let t = Instant::now();
    let logits = ss_decoder_stage(res, &nets.ss_decoder, &out.samples)?;
    // The occupied voxels are counted (the original's `argwhere`, timed with the stage) but not
    // used: random weights give no structure, the SLat stage runs on the fixed shell. The count
    // differs from run to run, so it stays out of the stage's name.
    let _occupied = crate::models::ss_vae::occupied_coords(&logits)?.dim(0)?;
    fig.push((
        "sparse-structure decode (occupancy unused)".to_string(),
        clock(t)?,
        None,
        last_stage(res)?,
    ));

    // Structured latent on the fixed shell.
    let (sampler, settings) = sampler_with(&nets.config.slat_sampler, &over)?;
    let n = shell.len() / 4;
    let coords = Tensor::from_vec(shell.to_vec(), (n, 4), dev)?;
    let feats = super::randn(&[n, nets.slat_in_channels], seed + 2, dev)?;
    let norm = &nets.config.slat_normalization;
    res.prefetch_next(&nets.decoders.placeables(opts.formats));
    dev.synchronize()?;
    let t = Instant::now();
    let (slat, forwards) = slat_stage(
        res,
        &nets.slat_flow,
        &sampler,
        &settings,
        &coords,
        feats,
        &c,
        &norm.mean,
        &norm.std,
        &mut ctl,
    )?;
    fig.push((
        "SLat flow".into(),
        clock(t)?,
        Some(forwards),
        last_stage(res)?,
    ));
    let slat_sum = abs_sum(&slat.slat)?;

    // Decoders: one stage each, or one for all of them at `medium` (as a job runs them).
    let before = res.stage_log().len();
    let d = decode_slat(
        res,
        &nets.decoders,
        &coords,
        &slat.slat,
        opts.formats,
        &mut ctl,
    )?;
    dev.synchronize()?;
    drop(d);
    for rec in res.stage_log().into_iter().skip(before) {
        let name = match rec.stage.as_str() {
            "mesh decoder" => "mesh decode + FlexiCubes".to_string(),
            "Gaussian decoder" => "Gaussian decode".to_string(),
            "radiance-field decoder" => "radiance-field decode".to_string(),
            "decoders" => format!("decoders ({}, one stage)", opts.formats.names().join(", ")),
            other => other.to_string(),
        };
        fig.push((name, rec.upload_s + rec.compute_s, None, rec));
    }
    Ok((fig, [ss_sum, slat_sum]))
}

/// Σ|x| in float64 of a flow's output (read back after the stage's timing): equal across tiers
/// and switches that must not change the result.
fn abs_sum(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?
        .abs()?
        .sum_all()?
        .to_scalar::<f64>()?)
}

/// One SLat-flow forward on the shell (t = 500, random cond) with the device synchronised after
/// every block: milliseconds per part (input layer + first io block, each io block, the
/// transformer blocks together, the out layer), after one untimed forward; then, for the SLat and
/// the SS flow, [`unsynced_forward`]'s host issue time and GPU time. For `TRELLIS_BENCH_BLOCKS=1`.
fn slat_block_times(
    nets: &Networks,
    res: &Residency,
    dev: &Device,
    shell: &[i32],
) -> Result<Vec<(String, f64)>> {
    use crate::modules::sparse::tensor::{Geometry, SparseTensor};
    let n = shell.len() / 4;
    let geo = std::sync::Arc::new(Geometry::new(shell.to_vec(), None, dev)?);
    let x = SparseTensor::from_geometry(geo, super::randn(&[n, nets.slat_in_channels], 7, dev)?)?;
    let (l, c) = match nets.cond {
        Conditioner::Image(_) => (1374, 1024),
        Conditioner::Text(_) => (77, 768),
    };
    let cond = super::randn(&[1, l, c], 8, dev)?;
    let t = Tensor::new(&[500f32], dev)?;
    let (ss_issued, ss_done) = res.stage("SS flow (issue time)", &[&nets.ss_flow], || {
        let f = nets.ss_flow.get()?;
        let fc = &nets.ss_flow_config;
        let r = fc.resolution;
        let z = super::randn(&[1, fc.in_channels, r, r, r], 9, dev)?;
        // the condition's projections kept across forwards, as a sampling stage keeps them
        let mut contexts = crate::modules::context::ContextCache::new();
        unsynced_forward(dev, "ss", || {
            f.forward_cached(&z, &t, &cond, &mut contexts).map(drop)
        })
    })?;
    let mut parts = res.stage("SLat flow (block times)", &[&nets.slat_flow], || {
        let f = nets.slat_flow.get()?;
        let mut contexts = crate::modules::context::ContextCache::new();
        let (issued, done) = unsynced_forward(dev, "slat", || {
            f.forward_cached(&x, &t, &cond, &mut contexts).map(drop)
        })?;
        let mut parts: Vec<(String, f64)> = Vec::new();
        let start = Instant::now();
        let mut last = start;
        let mut hook = |name: &str, _: &SparseTensor| -> Result<Option<Tensor>> {
            dev.synchronize()?;
            let now = Instant::now();
            let ms = now.duration_since(last).as_secs_f64() * 1e3;
            last = now;
            let part = if name.starts_with("block") {
                "transformer blocks".to_string()
            } else if parts.is_empty() {
                format!("input layer + {name}")
            } else {
                name.to_string()
            };
            match parts.iter_mut().find(|p| p.0 == part) {
                Some(p) => p.1 += ms,
                None => parts.push((part, ms)),
            }
            Ok(None)
        };
        f.forward_traced(&x, &t, &cond, &mut hook)?;
        dev.synchronize()?;
        parts.push(("out layer".into(), last.elapsed().as_secs_f64() * 1e3));
        parts.push(("whole forward".into(), start.elapsed().as_secs_f64() * 1e3));
        parts.push(("unsynced forward: host issue time".into(), issued));
        parts.push(("unsynced forward: until the GPU is done".into(), done));
        Ok(parts)
    })?;
    parts.push((
        "SS flow unsynced forward: host issue time".into(),
        ss_issued,
    ));
    parts.push((
        "SS flow unsynced forward: until the GPU is done".into(),
        ss_done,
    ));
    Ok(parts)
}

/// `forward` once untimed, then once with no syncs inside: (ms until the host has issued it, ms
/// until the GPU is done). Issue ≈ done means the forward is launch-bound. With
/// `TRELLIS_PROFILE=what` the timed forward is the profiler range ([`profile_range`]).
fn unsynced_forward(
    dev: &Device,
    what: &str,
    mut forward: impl FnMut() -> Result<()>,
) -> Result<(f64, f64)> {
    forward()?;
    dev.synchronize()?;
    profile_range(what, true);
    let start = Instant::now();
    forward()?;
    let issued = start.elapsed().as_secs_f64() * 1e3;
    dev.synchronize()?;
    let done = start.elapsed().as_secs_f64() * 1e3;
    profile_range(what, false);
    Ok((issued, done))
}

/// With `TRELLIS_PROFILE=ss` or `slat`, the profiler API range (`ncu --profile-from-start off`,
/// `tools/gpu/profile_flows.sh`) around that flow's one unsynced forward in [`slat_block_times`].
fn profile_range(what: &str, start: bool) {
    if std::env::var("TRELLIS_PROFILE").as_deref() != Ok(what) {
        return;
    }
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::{profiler_start, profiler_stop};
        let r = if start {
            profiler_start()
        } else {
            profiler_stop()
        };
        if let Err(e) = r {
            eprintln!("warning: TRELLIS_PROFILE: profiler range not set: {e:?}");
        }
    }
    #[cfg(not(feature = "cuda"))]
    eprintln!(
        "warning: TRELLIS_PROFILE={what}: this build has no CUDA profiler API (start={start})"
    );
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
    let res = Residency::new(&dev, opts.memory.clone())?;
    let t = Instant::now();
    let nets = build_networks(opts, &dev)?;
    dev.synchronize()?;
    let build_s = t.elapsed().as_secs_f64();
    let shell = super::shell_coords(64, opts.voxels);
    let tier_asked = opts
        .memory
        .tier
        .map_or("auto".to_string(), |t| t.name().to_string());
    writeln!(
        out,
        "pipeline TRELLIS-{}: built in {build_s:.1}s, weights {} in host memory ({}), on {}, tier {tier_asked}{}; SLat stage on a {}-voxel shell at 64^3; {} timed run(s) after a warm-up",
        opts.pipeline,
        vram::gib(nets.weight_bytes),
        nets.dtypes
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
        crate::runtime::device::device_name(&dev),
        opts.memory
            .budget
            .map_or(String::new(), |b| format!(", weights budget {}", vram::gib(b)))
            + &match res.ballast_bytes() {
                0 => String::new(),
                b => format!(", {} ballast held (not in the figures below)", vram::gib(b)),
            },
        opts.voxels,
        opts.runs
    )?;
    out.flush()?;
    let (warm, sums) = run_once(&nets, &res, opts, &dev, &shell, 0, &mut None)?;
    writeln!(
        out,
        "warm-up: {:.2}s (tiers: {}); outputs: SS flow Σ|x| {:.6e}, SLat flow Σ|x| {:.6e}",
        warm.iter().map(|f| f.1).sum::<f64>(),
        warm.iter()
            .map(|f| format!("{} {}", f.0, f.3.tier))
            .collect::<Vec<_>>()
            .join(", "),
        sums[0],
        sums[1]
    )?;
    out.flush()?;
    let vram_resident = res.pool_stats();
    let mut runs: Vec<RunFigures> = Vec::new();
    let mut first_steps: Vec<f64> = Vec::new();
    for i in 0..opts.runs {
        let mut first = None;
        let (r, _) = run_once(
            &nets,
            &res,
            opts,
            &dev,
            &shell,
            100 * (i as u64 + 1),
            &mut first,
        )?;
        first_steps.extend(first);
        if let Some(first) = runs.first() {
            let names = |r: &RunFigures| r.iter().map(|f| f.0.clone()).collect::<Vec<_>>();
            if names(first) != names(&r) {
                bail!(
                    "bench pipeline: run {} went through other stages than run 1 ({:?} vs {:?})",
                    i + 1,
                    names(&r),
                    names(first)
                );
            }
        }
        runs.push(r);
    }
    let mut stages = Vec::new();
    let mut vram_peak = None;
    for (k, (name, _, forwards, _)) in runs[0].iter().enumerate() {
        let seconds: Vec<f64> = runs.iter().map(|r| r[k].1).collect();
        let uploads: Vec<f64> = runs.iter().map(|r| r[k].3.upload_s).collect();
        let hidden: Vec<f64> = runs.iter().map(|r| r[k].3.upload_hidden_s).collect();
        let mut bytes: Vec<u64> = runs.iter().map(|r| r[k].3.upload_bytes).collect();
        bytes.sort_unstable();
        let mut tiers: Vec<String> = runs.iter().map(|r| r[k].3.tier.clone()).collect();
        tiers.dedup();
        let mut v = None;
        for r in &runs {
            v = max_stats(v, r[k].3.vram);
        }
        vram_peak = max_stats(vram_peak, v);
        let streamed: Vec<StreamTotals> = runs.iter().filter_map(|r| r[k].3.streamed).collect();
        let streamed = (!streamed.is_empty()).then(|| {
            let med =
                |f: fn(&StreamTotals) -> f64| median(&streamed.iter().map(f).collect::<Vec<_>>());
            StreamTotals {
                blocks: streamed[0].blocks,
                bytes: streamed[0].bytes,
                copy_s: med(|t| t.copy_s),
                waited_s: med(|t| t.waited_s),
            }
        });
        stages.push(StageFigures {
            stage: name.clone(),
            streamed,
            median_s: median(&seconds),
            seconds,
            forwards: *forwards,
            vram: v,
            tiers,
            upload_median_s: median(&uploads),
            upload_bytes: bytes[bytes.len() / 2],
            upload_hidden_median_s: median(&hidden),
            fallbacks: runs.iter().map(|r| r[k].3.fallbacks).sum(),
        });
    }
    let total: f64 = stages.iter().map(|s| s.median_s).sum();
    writeln!(
        out,
        "{:<52} {:>8} {:>10} {:>9} {:>11} {:>10} {:>10} {:>9} {:>11} {:>13}",
        "stage",
        "tier",
        "median",
        "forwards",
        "ms/forward",
        "upload",
        "uploaded",
        "hidden",
        "peak alloc",
        "peak reserved"
    )?;
    for s in &stages {
        writeln!(
            out,
            "{:<52} {:>8} {:>8.1}ms {:>9} {:>11} {:>8.1}ms {:>10} {:>7.1}ms {:>11} {:>13}",
            s.stage,
            s.tiers.join("/"),
            s.median_s * 1e3,
            s.forwards.map_or("".into(), |f| f.to_string()),
            s.forwards
                .map_or("".into(), |f| format!("{:.1}", s.median_s * 1e3 / f as f64)),
            s.upload_median_s * 1e3,
            vram::gib(s.upload_bytes),
            s.upload_hidden_median_s * 1e3,
            s.vram.map_or("n/a".into(), |v| vram::gib(v.used_high)),
            s.vram.map_or("n/a".into(), |v| vram::gib(v.reserved_high)),
        )?;
    }
    writeln!(out, "{:<52} {:>8} {:>8.1}ms", "sum", "", total * 1e3)?;
    if std::env::var("TRELLIS_BENCH_BLOCKS").as_deref() == Ok("1") {
        let parts = slat_block_times(&nets, &res, &dev, &shell)?;
        writeln!(
            out,
            "SLat flow, one forward synchronised after every block, and unsynced forwards (ms): {}",
            parts
                .iter()
                .map(|(n, ms)| format!("{n} {ms:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
    }
    let fallbacks: usize = stages.iter().map(|s| s.fallbacks).sum();
    if fallbacks > 0 {
        writeln!(
            out,
            "out-of-memory fallbacks over the timed runs: {fallbacks} (each run starts at tier {tier_asked} again)"
        )?;
    }
    let uploaded: f64 = stages.iter().map(|s| s.upload_median_s).sum();
    let hidden: f64 = stages.iter().map(|s| s.upload_hidden_median_s).sum();
    writeln!(
        out,
        "weight uploads per run: {:.1} ms, {:.1} ms of it hidden behind compute (copied on the copy stream while an earlier stage computed{})",
        uploaded * 1e3,
        hidden * 1e3,
        if crate::runtime::prefetch::enabled() {
            ""
        } else {
            "; off: TRELLIS_PREFETCH=0"
        }
    )?;
    let streamed: Vec<String> = stages
        .iter()
        .filter_map(|s| {
            let t = s.streamed?;
            Some(format!(
                "{} {} blocks, {}, copies {:.1} ms of which {:.1} ms waited for",
                s.stage,
                t.blocks,
                vram::gib(t.bytes),
                t.copy_s * 1e3,
                t.waited_s * 1e3
            ))
        })
        .collect();
    if !streamed.is_empty() {
        writeln!(
            out,
            "transformer blocks streamed from host memory per run (copied while earlier blocks computed): {}",
            streamed.join("; ")
        )?;
    }
    if let (Some(r), Some(p)) = (vram_resident, vram_peak) {
        writeln!(
            out,
            "GPU memory: resident between runs {} (pool after the warm-up), peak allocated {}, peak reserved {}",
            vram::gib(r.used),
            vram::gib(p.used_high),
            vram::gib(p.reserved_high)
        )?;
    }
    let first_step_s = (!first_steps.is_empty()).then(|| median(&first_steps));
    if let Some(f) = first_step_s {
        writeln!(
            out,
            "later jobs in this process: first sampling step done {:.1} ms after the job started (median; no reload)",
            f * 1e3
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
        tier: tier_asked,
        vram_budget: opts.memory.budget,
        weight_bytes: nets.weight_bytes,
        stages,
        total_median_s: total,
        vram_peak,
        vram_resident,
        peak_rss_bytes: peak_rss,
        first_step_s,
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
