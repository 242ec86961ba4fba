//! The two sampling stages every TRELLIS pipeline shares; twin of `sample_sparse_structure` and
//! `sample_slat` in `trellis/pipelines/trellis_{image,text}_to_3d.py` (identical in both), plus
//! progress reporting.
//!
//! * sparse structure: noise `[B, C, R, R, R]` → sampler with the structure flow → z_s →
//!   structure decoder → `coords = argwhere(logits > 0)[:, [0, 2, 3, 4]]` (lexicographic);
//! * structured latent: noise feats `[N, C]` on those coords → sampler with the SLat flow →
//!   `slat = samples * std + mean` per channel.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{anyhow, ensure, Result};
use candle_core::{DType, Device, Tensor};

use super::loader::{self, Decoders, Formats};
use super::noise::NoiseSource;
use super::samplers::{
    Conditioning, FlowEulerSampler, Hooks, SamplerSettings, StepEvent, Velocity,
};
use crate::hub::PipelineRepo;
use crate::models::config::{ModelConfig, SamplerConfig, SamplerParams, SparseStructureFlowConfig};
use crate::models::slat_flow::SLatFlowModel;
use crate::models::ss_flow::SparseStructureFlowModel;
use crate::models::ss_vae::SparseStructureDecoder;
use crate::modules::context::ContextCache;
use crate::modules::sparse::tensor::{Geometry, SparseTensor};
use crate::representations::gaussian::Gaussian;
use crate::representations::mesh::MeshExtractResult;
use crate::representations::strivec::Strivec;
use crate::runtime::residency::{Network, Placeable, Residency};

/// The stages a generation goes through, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Loading,
    /// Background removal of input images without transparency.
    RemovingBackground,
    Conditioning,
    Voxelizing,
    SparseStructure,
    StructuredLatent,
    Decoding,
    Writing,
}

impl Stage {
    pub fn label(self) -> &'static str {
        match self {
            Stage::Loading => "loading models",
            Stage::RemovingBackground => "removing background",
            Stage::Conditioning => "conditioning",
            Stage::Voxelizing => "voxelizing",
            Stage::SparseStructure => "sparse structure",
            Stage::StructuredLatent => "structured latent",
            Stage::Decoding => "decoding",
            Stage::Writing => "writing",
        }
    }
}

/// One progress event: `step` of `steps` done in `stage` (`step == 0`: the stage starts).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProgressEvent {
    pub stage: Stage,
    pub step: usize,
    pub steps: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Receives progress events.
pub type Progress<'a> = dyn FnMut(&ProgressEvent) + 'a;

/// Per-run controls shared by the stages.
pub struct RunControl<'a> {
    pub progress: &'a mut Progress<'a>,
    pub cancel: Option<&'a AtomicBool>,
    /// Keep every step's `x_t` / `pred_x0` (parity and debugging).
    pub keep_trajectory: bool,
}

impl RunControl<'_> {
    pub fn emit(&mut self, stage: Stage, step: usize, steps: usize, detail: Option<String>) {
        (self.progress)(&ProgressEvent {
            stage,
            step,
            steps,
            detail,
        });
    }
}

/// Result of the sparse-structure stage.
pub struct SparseStructureSample {
    pub noise: Tensor,
    /// z_s.
    pub samples: Tensor,
    /// `[N, 4]` int32 (batch, x, y, z).
    pub coords: Tensor,
    pub pred_x_t: Vec<Tensor>,
    pub pred_x0: Vec<Tensor>,
}

/// Result of the structured-latent stage.
pub struct SlatSample {
    pub noise: Tensor,
    /// Before de-normalisation.
    pub samples: Tensor,
    /// After de-normalisation (decoder input).
    pub slat: Tensor,
    pub pred_x_t: Vec<Tensor>,
}

#[allow(clippy::too_many_arguments)]
fn run_sampler(
    stage: Stage,
    sampler: &FlowEulerSampler,
    settings: &SamplerSettings,
    model: &mut Velocity<'_>,
    noise: &Tensor,
    batch: usize,
    cond: &Conditioning<'_>,
    ctl: &mut RunControl<'_>,
) -> Result<super::samplers::SampleOutput> {
    ctl.emit(stage, 0, settings.steps, None);
    let progress = &mut *ctl.progress;
    let mut on_step = |e: StepEvent| {
        progress(&ProgressEvent {
            stage,
            step: e.step,
            steps: e.steps,
            detail: None,
        })
    };
    sampler.sample(
        model,
        noise,
        batch,
        cond,
        settings,
        Hooks {
            on_step: Some(&mut on_step),
            cancel: ctl.cancel,
            keep_trajectory: ctl.keep_trajectory,
        },
    )
}

/// Sparse-structure stage. `decoder` maps z_s to occupancy logits `[B, 1, R, R, R]`.
#[allow(clippy::too_many_arguments)]
pub fn sample_sparse_structure(
    sampler: &FlowEulerSampler,
    settings: &SamplerSettings,
    flow: &mut Velocity<'_>,
    decoder: &mut dyn FnMut(&Tensor) -> Result<Tensor>,
    noise: Tensor,
    cond: &Conditioning<'_>,
    ctl: &mut RunControl<'_>,
) -> Result<SparseStructureSample> {
    let batch = noise.dim(0)?;
    let out = run_sampler(
        Stage::SparseStructure,
        sampler,
        settings,
        flow,
        &noise,
        batch,
        cond,
        ctl,
    )?;
    let logits = decoder(&out.samples)?;
    let coords = occupied_coords(&logits)?;
    Ok(SparseStructureSample {
        noise,
        samples: out.samples,
        coords,
        pred_x_t: out.pred_x_t,
        pred_x0: out.pred_x0,
    })
}

/// `argwhere(logits > 0)[:, [0, 2, 3, 4]]` (int32, lexicographic); an empty structure is an error.
pub fn occupied_coords(logits: &Tensor) -> Result<Tensor> {
    let coords = crate::models::ss_vae::occupied_coords(logits)?;
    ensure!(
        coords.dim(0)? > 0,
        "the sparse structure is empty (no voxel of the {:?} grid is occupied); try another seed",
        logits.dims()
    );
    Ok(coords)
}

/// Number of batch elements of `[N, 4]` coords (max batch index + 1).
pub fn coords_batch(coords: &Tensor) -> Result<usize> {
    let b = coords
        .narrow(1, 0, 1)?
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(DType::I64)?
        .max_all()?
        .to_scalar::<i64>()?;
    ensure!(b >= 0, "negative batch index in coords");
    Ok(b as usize + 1)
}

/// Structured-latent stage: `flow` is the SLat flow bound to `coords` (it receives feats `[N, C]`).
#[allow(clippy::too_many_arguments)]
pub fn sample_slat(
    sampler: &FlowEulerSampler,
    settings: &SamplerSettings,
    flow: &mut Velocity<'_>,
    coords: &Tensor,
    noise: Tensor,
    cond: &Conditioning<'_>,
    mean: &[f32],
    std: &[f32],
    ctl: &mut RunControl<'_>,
) -> Result<SlatSample> {
    let (n, ch) = noise.dims2()?;
    ensure!(
        n == coords.dim(0)?,
        "SLat noise has {n} rows for {} coords",
        coords.dim(0)?
    );
    ensure!(
        mean.len() == ch && std.len() == ch,
        "slat_normalization has {} / {} channels, the SLat flow {ch}",
        mean.len(),
        std.len()
    );
    let batch = coords_batch(coords)?;
    let out = run_sampler(
        Stage::StructuredLatent,
        sampler,
        settings,
        flow,
        &noise,
        batch,
        cond,
        ctl,
    )?;
    let slat = denormalize(&out.samples, mean, std)?;
    Ok(SlatSample {
        noise,
        samples: out.samples,
        slat,
        pred_x_t: out.pred_x_t,
    })
}

/// The sparse-structure stages on `res`: the flow sampled ([`ss_flow_stage`]), then the decoder
/// ([`ss_decoder_stage`]), each with its network placed as the tier says.
#[allow(clippy::too_many_arguments)]
pub fn structure_stages(
    res: &Residency,
    flow: &Network<SparseStructureFlowModel>,
    decoder: &Network<SparseStructureDecoder>,
    sampler: &FlowEulerSampler,
    settings: &SamplerSettings,
    noise: Tensor,
    cond: &Conditioning<'_>,
    ctl: &mut RunControl<'_>,
) -> Result<SparseStructureSample> {
    let (out, _) = ss_flow_stage(res, flow, sampler, settings, &noise, cond, ctl)?;
    let logits = ss_decoder_stage(res, decoder, &out.samples)?;
    let coords = occupied_coords(&logits)?;
    Ok(SparseStructureSample {
        noise,
        samples: out.samples,
        coords,
        pred_x_t: out.pred_x_t,
        pred_x0: out.pred_x0,
    })
}

/// Stage `sparse-structure flow`: `flow` sampled from `noise` `[B, C, R, R, R]`. Returns the
/// sampler's output and the number of flow forwards (per sample: a CFG-batched call counts two).
pub fn ss_flow_stage(
    res: &Residency,
    flow: &Network<SparseStructureFlowModel>,
    sampler: &FlowEulerSampler,
    settings: &SamplerSettings,
    noise: &Tensor,
    cond: &Conditioning<'_>,
    ctl: &mut RunControl<'_>,
) -> Result<(super::samplers::SampleOutput, usize)> {
    let batch = noise.dim(0)?;
    let mut forwards = 0;
    let out = res.stage("sparse-structure flow", &[flow], || {
        let f = flow.get()?;
        forwards = 0;
        let settings = &paired_guidance(res, settings, Flow::SparseStructure);
        // the condition's cross-attention projections, made once for the stage's steps
        let mut contexts = ContextCache::new();
        let mut fl = |x: &Tensor, t: &Tensor, c: &Tensor| -> Result<Tensor> {
            // forwards of one sample: a paired (CFG-batched) call counts two
            forwards += (x.dim(0)? / batch.max(1)).max(1);
            f.forward_cached(x, t, c, &mut contexts)
        };
        run_sampler(
            Stage::SparseStructure,
            sampler,
            settings,
            &mut fl,
            noise,
            batch,
            cond,
            ctl,
        )
    })?;
    Ok((out, forwards))
}

/// Stage `sparse-structure decoder`: occupancy logits `[B, 1, R, R, R]` of z_s.
pub fn ss_decoder_stage(
    res: &Residency,
    decoder: &Network<SparseStructureDecoder>,
    z_s: &Tensor,
) -> Result<Tensor> {
    res.stage("sparse-structure decoder", &[decoder], || {
        decoder.get()?.forward(z_s)
    })
}

/// The structured-latent stage on `res` (stage `SLat flow`): `flow` on `coords` from the noise
/// feats `noise` `[N, C]`. Returns the sample and the number of flow forwards.
#[allow(clippy::too_many_arguments)]
pub fn slat_stage(
    res: &Residency,
    flow: &Network<SLatFlowModel>,
    sampler: &FlowEulerSampler,
    settings: &SamplerSettings,
    coords: &Tensor,
    noise: Tensor,
    cond: &Conditioning<'_>,
    mean: &[f32],
    std: &[f32],
    ctl: &mut RunControl<'_>,
) -> Result<(SlatSample, usize)> {
    let dev = noise.device().clone();
    let cv: Vec<i32> = coords
        .to_device(&Device::Cpu)?
        .to_dtype(DType::I32)?
        .flatten_all()?
        .to_vec1()?;
    let rows = cv.len() / 4;
    let geo = Arc::new(Geometry::new(cv.clone(), None, &dev)?);
    // The coords twice, the copy's batch indices after the originals', for guided steps run as
    // one call on the conditional and unconditional halves (`SamplerSettings::cfg_batched`).
    let mut paired_geo: Option<Arc<Geometry>> = None;
    let mut forwards = 0;
    let out = res.stage("SLat flow", &[flow], || {
        let f = flow.get()?;
        forwards = 0;
        let settings = &paired_guidance(res, settings, Flow::SLat);
        let mut contexts = ContextCache::new();
        let mut fl = |x: &Tensor, t: &Tensor, c: &Tensor| -> Result<Tensor> {
            // forwards of one sample: a paired (CFG-batched) call counts two
            forwards += (x.dim(0)? / rows.max(1)).max(1);
            let g = if x.dim(0)? == 2 * rows && rows > 0 {
                match &paired_geo {
                    Some(g) => g.clone(),
                    None => {
                        let batch = cv.chunks_exact(4).map(|c| c[0]).max().unwrap_or(0) + 1;
                        let mut twice = cv.clone();
                        twice.extend(
                            cv.chunks_exact(4)
                                .flat_map(|c| [c[0] + batch, c[1], c[2], c[3]]),
                        );
                        let g = Arc::new(Geometry::new(twice, None, &dev)?);
                        paired_geo = Some(g.clone());
                        g
                    }
                }
            } else {
                geo.clone()
            };
            let st = SparseTensor::from_geometry(g, x.clone())?;
            Ok(f.forward_cached(&st, t, c, &mut contexts)?.feats().clone())
        };
        sample_slat(
            sampler,
            settings,
            &mut fl,
            coords,
            noise.clone(),
            cond,
            mean,
            std,
            ctl,
        )
    })?;
    Ok((out, forwards))
}

/// The flow a sampling stage runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    SparseStructure,
    SLat,
}

/// `settings` with `cfg_batched` on when the stage runs on a GPU at a tier that allows it
/// (`Tier::batches_cfg`: not `low`), for the sparse-structure flow always, for the SLat flow only
/// where its blocks stream (`minimal`: a pair copies them in once instead of twice).
/// `TRELLIS_CFG_BATCH=0` turns it off, `=1` on for both flows.
///
/// Measured on an H100 (`bench pipeline`, image-large, the 20,000-voxel shell): the SS flow
/// (4,096 dense tokens) gains from it, 16.8 against 17.6 ms per forward (session 10), 15.1
/// against 15.6 (session 12); the SLat flow loses, 17.7 paired against 17.3 ms per forward one
/// branch after the other at `high`, 18.9 at `medium` (paired) against 18.5 at `low` (session
/// 12, call 1; 20.2 against 19.6 in session 11): its 3,928-token products fill the GPU already,
/// the unconditional branch skips the cross-attention either way (`modules::context`), and the
/// pair costs the two sparse batches' concatenation and split. (When the kernels were slower, in
/// session 5, the paired calls took as long as the two single ones.)
fn paired_guidance(res: &Residency, settings: &SamplerSettings, flow: Flow) -> SamplerSettings {
    let tier = res.tier();
    let forced = std::env::var("TRELLIS_CFG_BATCH").ok();
    let pays = match forced.as_deref().map(str::trim) {
        Some("0") => false,
        Some("1") => true,
        _ => flow == Flow::SparseStructure || res.streams_blocks(),
    };
    let on = pays
        && res.device().is_cuda()
        && tier != crate::runtime::tiers::Tier::Cpu
        && tier.batches_cfg();
    SamplerSettings {
        cfg_batched: on,
        ..*settings
    }
}

/// `x * std + mean` per channel (last dim).
pub fn denormalize(x: &Tensor, mean: &[f32], std: &[f32]) -> Result<Tensor> {
    let dev: &Device = x.device();
    let m = Tensor::new(mean, dev)?.unsqueeze(0)?;
    let s = Tensor::new(std, dev)?.unsqueeze(0)?;
    Ok(x.broadcast_mul(&s)?.broadcast_add(&m)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argwhere_order_and_layout() {
        let dev = Device::Cpu;
        let mut v = vec![-1.0f32; 2 * 2 * 2 * 2];
        v[1] = 0.5; // b0 (0,0,1)
        v[6] = 2.0; // b0 (1,1,0)
        v[8 + 3] = 1.0; // b1 (0,1,1)
        v[2] = 0.0; // not > 0
        let l = Tensor::from_vec(v, (2, 1, 2, 2, 2), &dev).unwrap();
        let c: Vec<Vec<i32>> = occupied_coords(&l).unwrap().to_vec2().unwrap();
        assert_eq!(
            c,
            vec![vec![0, 0, 0, 1], vec![0, 1, 1, 0], vec![1, 0, 1, 1]]
        );
        let empty = Tensor::full(-1f32, (1, 1, 2, 2, 2), &dev).unwrap();
        assert!(occupied_coords(&empty)
            .unwrap_err()
            .to_string()
            .contains("empty"));
    }

    #[test]
    fn denormalize_is_per_channel() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1.0f32, 2.0], [0.0, -1.0]], &dev).unwrap();
        let y: Vec<Vec<f32>> = denormalize(&x, &[10.0, 20.0], &[2.0, 3.0])
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(y, vec![vec![12.0, 26.0], vec![10.0, 17.0]]);
    }
}

/// Decoded representations, one per batch element each.
#[derive(Default)]
pub struct Decoded {
    pub meshes: Vec<MeshExtractResult>,
    pub gaussians: Vec<Gaussian>,
    pub radiance_fields: Vec<Strivec>,
}

/// Everything one generation produced.
pub struct Generation {
    /// Absent for variants (the structure comes from the given mesh).
    pub structure: Option<SparseStructureSample>,
    pub slat: SlatSample,
    /// `[N, 4]` int32 coords of the structured latent.
    pub coords: Tensor,
    pub decoded: Decoded,
}

/// Per-call sampler overrides and output formats.
#[derive(Debug, Clone, Default)]
pub struct RunParams {
    pub ss: SamplerParams,
    pub slat: SamplerParams,
    pub formats: Formats,
}

/// The networks of a TRELLIS pipeline repository (twin of `Pipeline` in base.py plus the
/// samplers and normalisation `from_pretrained` reads from pipeline.json).
///
/// The networks live in host memory; [`Residency`] places each stage's on the device (all of
/// them stay there at tier `high`).
pub struct TrellisPipeline {
    pub repo: PipelineRepo,
    pub device: Device,
    /// Where the networks are placed (the model cache's, shared by its pipelines).
    pub residency: Arc<Residency>,
    pub ss_flow: Option<Network<SparseStructureFlowModel>>,
    pub ss_decoder: Option<Network<SparseStructureDecoder>>,
    /// The structure flow's config (latent shape), read with it.
    pub ss_flow_config: Option<SparseStructureFlowConfig>,
    pub slat_flow: Network<SLatFlowModel>,
    pub slat_in_channels: usize,
    pub decoders: Decoders,
}

impl TrellisPipeline {
    /// Loads the networks a run needs into host memory: the structure flow and decoder only when
    /// `need_structure` (not for variants), the decoders of `formats` only. They are placed on
    /// `residency`'s device per stage.
    pub fn load(
        repo: PipelineRepo,
        residency: Arc<Residency>,
        need_structure: bool,
        formats: Formats,
    ) -> Result<Self> {
        let device = &residency.device().clone();
        let (ss_flow, ss_decoder) = if need_structure {
            (
                Some(loader::load_ss_flow(&repo, device)?),
                Some(loader::load_ss_decoder(&repo, device)?),
            )
        } else {
            (None, None)
        };
        let ss_flow_config = ss_flow_config(&repo)?;
        let slat_flow = loader::load_slat_flow(&repo, device)?;
        let slat_in_channels = match ModelConfig::from_file(&repo.model("slat_flow_model")?.config)?
        {
            ModelConfig::SLatFlow { config, .. } => config.in_channels,
            other => anyhow::bail!("slat_flow_model is a {}", other.class_name()),
        };
        let norm = &repo.config.slat_normalization;
        ensure!(
            norm.mean.len() == slat_in_channels && norm.std.len() == slat_in_channels,
            "pipeline.json slat_normalization has {} / {} channels, the SLat flow {slat_in_channels}",
            norm.mean.len(),
            norm.std.len()
        );
        let decoders = loader::load_decoders(&repo, formats, device)?;
        Ok(Self {
            repo,
            device: device.clone(),
            residency,
            ss_flow,
            ss_decoder,
            ss_flow_config,
            slat_flow,
            slat_in_channels,
            decoders,
        })
    }

    /// The structure sampler with pipeline.json's params overridden key by key by `over`.
    pub fn ss_sampler(&self, over: &SamplerParams) -> Result<(FlowEulerSampler, SamplerSettings)> {
        sampler_with(&self.repo.config.sparse_structure_sampler, over)
    }

    /// The SLat sampler with pipeline.json's params overridden key by key by `over`.
    pub fn slat_sampler(
        &self,
        over: &SamplerParams,
    ) -> Result<(FlowEulerSampler, SamplerSettings)> {
        sampler_with(&self.repo.config.slat_sampler, over)
    }

    /// `sample_sparse_structure`: noise `[num_samples, C, R, R, R]` from `noise`, sampled, decoded.
    pub fn sample_structure(
        &self,
        cond: &Conditioning<'_>,
        num_samples: usize,
        noise: &mut dyn NoiseSource,
        over: &SamplerParams,
        ctl: &mut RunControl<'_>,
    ) -> Result<SparseStructureSample> {
        let (Some(flow), Some(decoder), Some(cfg)) =
            (&self.ss_flow, &self.ss_decoder, &self.ss_flow_config)
        else {
            anyhow::bail!("this pipeline was loaded without its sparse-structure networks");
        };
        let (sampler, settings) = self.ss_sampler(over)?;
        let r = cfg.resolution;
        let z = noise.randn(&[num_samples, cfg.in_channels, r, r, r], &self.device)?;
        structure_stages(
            &self.residency,
            flow,
            decoder,
            &sampler,
            &settings,
            z,
            cond,
            ctl,
        )
    }

    /// `sample_slat` on `coords` (`[N, 4]` int32, batch-major).
    pub fn sample_slat(
        &self,
        coords: &Tensor,
        cond: &Conditioning<'_>,
        noise: &mut dyn NoiseSource,
        over: &SamplerParams,
        ctl: &mut RunControl<'_>,
    ) -> Result<SlatSample> {
        let (sampler, settings) = self.slat_sampler(over)?;
        let n = coords.dim(0)?;
        let feats = noise.randn(&[n, self.slat_in_channels], &self.device)?;
        let norm = &self.repo.config.slat_normalization;
        let (out, _) = slat_stage(
            &self.residency,
            &self.slat_flow,
            &sampler,
            &settings,
            coords,
            feats,
            cond,
            &norm.mean,
            &norm.std,
            ctl,
        )?;
        Ok(out)
    }

    /// `decode_slat` with this pipeline's decoders.
    pub fn decode(
        &self,
        coords: &Tensor,
        slat: &Tensor,
        formats: Formats,
        ctl: &mut RunControl<'_>,
    ) -> Result<Decoded> {
        decode_slat(&self.residency, &self.decoders, coords, slat, formats, ctl)
    }

    /// Sparse structure, then SLat, then decoding (`run` / `run_multi_image` of the original).
    pub fn generate(
        &self,
        cond: &Conditioning<'_>,
        num_samples: usize,
        noise: &mut dyn NoiseSource,
        params: &RunParams,
        ctl: &mut RunControl<'_>,
    ) -> Result<Generation> {
        // While the structure flow samples, the structure decoder and the SLat flow are copied
        // in; while the SLat flow samples, the decoders (tiers that free networks between stages).
        let mut next: Vec<&dyn Placeable> = vec![&self.slat_flow];
        if let Some(d) = &self.ss_decoder {
            next.insert(0, d);
        }
        self.residency.prefetch_next(&next);
        let structure = self.sample_structure(cond, num_samples, noise, &params.ss, ctl)?;
        let coords = structure.coords.clone();
        self.residency
            .prefetch_next(&self.decoders.placeables(params.formats));
        let slat = self.sample_slat(&coords, cond, noise, &params.slat, ctl)?;
        let decoded = self.decode(&coords, &slat.slat, params.formats, ctl)?;
        Ok(Generation {
            structure: Some(structure),
            slat,
            coords,
            decoded,
        })
    }
}

/// A decoder `formats` asked for, or an error naming it.
fn loaded<'a, T>(decoder: &'a Option<T>, what: &str) -> Result<&'a T> {
    decoder
        .as_ref()
        .ok_or_else(|| anyhow!("{what} decoder not loaded"))
}

/// The sampler a pipeline.json entry names, with its params overridden key by key by `over`.
pub fn sampler_with(
    c: &SamplerConfig,
    over: &SamplerParams,
) -> Result<(FlowEulerSampler, SamplerSettings)> {
    Ok((
        FlowEulerSampler::from_config(c),
        SamplerSettings::resolve(&c.params.overridden_by(over))?,
    ))
}

/// `decode_slat`: the representations of `formats` (their decoders must be loaded). Stages on
/// `res`: at `medium` one stage `decoders` with every decoder placed (out of memory there: the
/// tier drops to `low` and they run one at a time); at the other tiers one stage per decoder
/// (`low` and `minimal` thereby hold one decoder at a time; `high` keeps them all).
pub fn decode_slat(
    res: &Residency,
    decoders: &Decoders,
    coords: &Tensor,
    slat: &Tensor,
    formats: Formats,
    ctl: &mut RunControl<'_>,
) -> Result<Decoded> {
    let x = SparseTensor::from_tensors(coords, slat.clone())?;
    let total = formats.names().len();
    let mesh = formats
        .mesh
        .then(|| loaded(&decoders.mesh, "mesh"))
        .transpose()?;
    let gaussian = formats
        .gaussian
        .then(|| loaded(&decoders.gaussian, "Gaussian"))
        .transpose()?;
    let radiance_field = formats
        .radiance_field
        .then(|| loaded(&decoders.radiance_field, "radiance-field"))
        .transpose()?;
    let mut out = Decoded::default();
    let begin = |ctl: &mut RunControl<'_>, done: usize, name: &str| {
        ctl.emit(Stage::Decoding, done, total, Some(name.into()));
    };
    let mut together = false;
    if res.tier() == crate::runtime::tiers::Tier::Medium {
        let mut nets: Vec<&dyn Placeable> = Vec::new();
        if let Some(m) = mesh {
            nets.push(m);
        }
        if let Some(g) = gaussian {
            nets.push(g);
        }
        if let Some(r) = radiance_field {
            nets.push(r);
        }
        // Out of memory with every decoder placed: the tier drops to low, which runs them one
        // at a time below.
        match res.stage_or_drop("decoders", &nets, || {
            let mut o = Decoded::default();
            let mut k = 0;
            if let Some(m) = mesh {
                begin(ctl, k, "mesh");
                k += 1;
                o.meshes = m.get()?.forward(&x)?;
            }
            if let Some(g) = gaussian {
                begin(ctl, k, "gaussian");
                k += 1;
                o.gaussians = g.get()?.forward(&x)?;
            }
            if let Some(r) = radiance_field {
                begin(ctl, k, "radiance_field");
                o.radiance_fields = r.get()?.forward(&x)?;
            }
            Ok(o)
        }) {
            Ok(o) => {
                out = o;
                together = true;
            }
            Err(e) if crate::runtime::residency::is_oom(&e) => {}
            Err(e) => return Err(e),
        }
    }
    if !together {
        let mut done = 0;
        if let Some(m) = mesh {
            out.meshes = res.stage("mesh decoder", &[m], || {
                begin(ctl, done, "mesh");
                m.get()?.forward(&x)
            })?;
            done += 1;
        }
        if let Some(g) = gaussian {
            out.gaussians = res.stage("Gaussian decoder", &[g], || {
                begin(ctl, done, "gaussian");
                g.get()?.forward(&x)
            })?;
            done += 1;
        }
        if let Some(r) = radiance_field {
            out.radiance_fields = res.stage("radiance-field decoder", &[r], || {
                begin(ctl, done, "radiance_field");
                r.get()?.forward(&x)
            })?;
        }
    }
    if total > 0 {
        ctl.emit(Stage::Decoding, total, total, None);
    }
    Ok(out)
}

/// The structure flow's config, read from the repository (configs only).
fn ss_flow_config(repo: &PipelineRepo) -> Result<Option<SparseStructureFlowConfig>> {
    let Ok(files) = repo.model("sparse_structure_flow_model") else {
        return Ok(None);
    };
    match ModelConfig::from_file(&files.config)? {
        ModelConfig::SparseStructureFlow(c) => Ok(Some(c)),
        other => anyhow::bail!(
            "sparse_structure_flow_model is a {}, not a SparseStructureFlowModel",
            other.class_name()
        ),
    }
}
