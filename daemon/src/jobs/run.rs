//! Running a job on a worker's [`ModelCache`]: open (or reuse) the models, condition, sample,
//! decode. Progress and cancel go through the [`RunControl`] (cancel is checked before every
//! sampler step, so it takes effect within one step).

use std::sync::atomic::Ordering;

use anyhow::{anyhow, bail, ensure, Result};
use candle_core::{DType, Tensor};

use super::models::{conditioner_dir, model_spec, ModelCache};
use super::params::{DecodeJob, GenerateJob, Job, Prompt, VariantJob};
use crate::export::asset::Asset;
use crate::hub::{PipelineClass, PipelineRepo};
use crate::models::config::{SamplerConfig, SamplerParams};
use crate::pipelines::base::{decode_slat, Decoded, Generation, RunControl, RunParams, Stage};
use crate::pipelines::image_to_3d::MultiImageMode;
use crate::pipelines::loader::{load_decoders, structure_resolution};
use crate::pipelines::noise::TorchNoise;
use crate::pipelines::samplers::{Conditioning, SamplerSettings};
use crate::pipelines::text_to_3d::text_cond;
use crate::pipelines::variant::{run_variant, voxelize_with_progress};

/// What a job produced.
pub enum JobOutput {
    /// `generate` / `variant`: the whole generation, its condition and the asset metadata.
    Generated {
        generation: Box<Generation>,
        cond: Tensor,
        meta: serde_json::Value,
    },
    /// `decode`: the representations decoded from a saved asset.
    Decoded {
        decoded: Decoded,
        meta: serde_json::Value,
    },
}

impl JobOutput {
    pub fn decoded(&self) -> &Decoded {
        match self {
            JobOutput::Generated { generation, .. } => &generation.decoded,
            JobOutput::Decoded { decoded, .. } => decoded,
        }
    }

    pub fn meta(&self) -> &serde_json::Value {
        match self {
            JobOutput::Generated { meta, .. } | JobOutput::Decoded { meta, .. } => meta,
        }
    }

    /// The `.trellis` bundle of a generation (none for `decode`).
    pub fn asset(&self) -> Result<Option<Asset>> {
        let JobOutput::Generated {
            generation: g,
            cond,
            meta,
        } = self
        else {
            return Ok(None);
        };
        Ok(Some(Asset {
            coords: g.coords.clone(),
            slat: g.slat.slat.clone(),
            ss_latent: g.structure.as_ref().map(|s| s.samples.clone()),
            ss_noise: g.structure.as_ref().map(|s| s.noise.clone()),
            slat_noise: Some(g.slat.noise.clone()),
            cond_summary: Some(cond.to_dtype(DType::F32)?.mean(1)?),
            meta: meta.clone(),
        }))
    }
}

/// JSON summary of a sampler as it will run.
pub fn sampler_meta(c: &SamplerConfig, over: &SamplerParams) -> Result<serde_json::Value> {
    let s = SamplerSettings::resolve(&c.params.overridden_by(over))?;
    Ok(serde_json::json!({
        "kind": format!("{:?}", c.kind),
        "sigma_min": c.args.sigma_min,
        "steps": s.steps,
        "rescale_t": s.rescale_t,
        "cfg_strength": s.cfg_strength,
        "cfg_interval": [s.cfg_interval.0, s.cfg_interval.1],
    }))
}

fn check_cancel(ctl: &RunControl<'_>) -> Result<()> {
    if ctl.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
        bail!("cancelled");
    }
    Ok(())
}

/// Runs `job` (already [`Job::validate`]d) on `cache`'s device.
pub fn run_job(job: &Job, cache: &mut ModelCache, ctl: &mut RunControl<'_>) -> Result<JobOutput> {
    check_cancel(ctl)?;
    match job {
        Job::Generate(g) => generate(g, cache, ctl),
        Job::Variant(v) => variant(v, cache, ctl),
        Job::Decode(d) => decode(d, cache, ctl),
    }
}

fn class_of(prompt: &Prompt) -> PipelineClass {
    if prompt.is_text() {
        PipelineClass::TextTo3D
    } else {
        PipelineClass::ImageTo3D
    }
}

fn prompt_conditioner_dir(
    prompt: &Prompt,
    over: &super::params::ConditionerOverrides,
    repo: &PipelineRepo,
) -> Result<std::path::PathBuf> {
    if prompt.is_text() {
        conditioner_dir(
            over.text.as_deref(),
            repo,
            repo.config.text_cond_model.as_deref(),
            "text",
        )
    } else {
        conditioner_dir(
            over.image.as_deref(),
            repo,
            repo.config.image_cond_model.as_deref(),
            "image",
        )
    }
}

fn base_meta(task: &str, spec: &str, repo: &PipelineRepo, device: &str) -> serde_json::Value {
    serde_json::json!({
        "generator": format!("trellis-rs {}", env!("CARGO_PKG_VERSION")),
        "task": task,
        "model": spec,
        "pipeline": repo.config.class.name(),
        "device": device,
    })
}

/// (cond, neg) of a prompt with the resident conditioner in `cond_dir`.
fn encode_prompt(
    prompt: &Prompt,
    cond_dir: &std::path::Path,
    resident: &mut super::models::Resident,
    dev: &candle_core::Device,
    ctl: &mut RunControl<'_>,
) -> Result<(Tensor, Tensor)> {
    match prompt {
        Prompt::Text(text) => {
            let c = resident.text_conditioner(cond_dir, dev)?;
            ctl.emit(Stage::Loading, 2, 2, None);
            ctl.emit(Stage::Conditioning, 0, 1, None);
            let r = text_cond(c, text)?;
            ctl.emit(Stage::Conditioning, 1, 1, None);
            Ok(r)
        }
        Prompt::Images(images) => {
            let c = resident.image_conditioner(cond_dir, dev)?;
            ctl.emit(Stage::Loading, 2, 2, None);
            ctl.emit(Stage::Conditioning, 0, images.len(), None);
            let batch: Vec<Tensor> = images
                .iter()
                .map(|i| i.tensor(dev))
                .collect::<Result<_>>()?;
            let cond = c.encode(&Tensor::cat(&batch, 0)?)?;
            let neg = cond.narrow(0, 0, 1)?.zeros_like()?;
            ctl.emit(Stage::Conditioning, images.len(), images.len(), None);
            Ok((cond, neg))
        }
    }
}

fn generate(
    job: &GenerateJob,
    cache: &mut ModelCache,
    ctl: &mut RunControl<'_>,
) -> Result<JobOutput> {
    let is_text = job.prompt.is_text();
    let spec = model_spec(job.model.as_deref(), is_text).to_string();
    let dev = cache.device.clone();
    let device_name = cache.device_name.clone();
    let params = RunParams {
        ss: job.sampling.ss.clone(),
        slat: job.sampling.slat.clone(),
        formats: job.formats,
    };
    let resident = cache.pipeline(&spec, class_of(&job.prompt), true, job.formats, ctl)?;
    let repo = &resident.pipeline.repo;
    // Sampler parameters resolve now (step counts of 0 from pipeline.json, ...).
    let task = if is_text { "text_to_3d" } else { "image_to_3d" };
    let mut meta = base_meta(task, &spec, repo, &device_name);
    meta["sparse_structure_sampler"] =
        sampler_meta(&repo.config.sparse_structure_sampler, &params.ss)?;
    meta["slat_sampler"] = sampler_meta(&repo.config.slat_sampler, &params.slat)?;
    let cond_dir = prompt_conditioner_dir(&job.prompt, &job.conditioners, repo)?;
    meta["conditioner"] = serde_json::json!(cond_dir);
    meta["seed"] = serde_json::json!(job.sampling.seed);
    meta["formats"] = serde_json::json!(job.formats.names());
    match &job.prompt {
        Prompt::Text(t) => meta["text"] = serde_json::json!(t),
        Prompt::Images(images) => {
            meta["images"] = images.iter().map(|i| i.describe()).collect();
            if images.len() > 1 {
                meta["multi_image_mode"] = serde_json::json!(job.multi_image_mode);
            }
        }
    }
    let (cond, neg) = encode_prompt(&job.prompt, &cond_dir, resident, &dev, ctl)?;
    check_cancel(ctl)?;
    let c = if cond.dim(0)? == 1 {
        Conditioning::Single {
            cond: &cond,
            neg: &neg,
        }
    } else {
        match job.multi_image_mode {
            MultiImageMode::Stochastic => Conditioning::Stochastic {
                conds: &cond,
                neg: &neg,
            },
            MultiImageMode::Multidiffusion => Conditioning::MultiDiffusion {
                conds: &cond,
                neg: &neg,
            },
        }
    };
    let mut noise = TorchNoise::new(job.sampling.seed);
    let g = resident
        .pipeline
        .generate(&c, 1, &mut noise, &params, ctl)?;
    Ok(JobOutput::Generated {
        generation: Box::new(g),
        cond,
        meta,
    })
}

fn variant(
    job: &VariantJob,
    cache: &mut ModelCache,
    ctl: &mut RunControl<'_>,
) -> Result<JobOutput> {
    let is_text = job.prompt.is_text();
    let spec = model_spec(job.model.as_deref(), is_text).to_string();
    let dev = cache.device.clone();
    let device_name = cache.device_name.clone();
    let mesh = job.mesh.load()?;
    // Cheap checks on the repository before any weight is read.
    let repo = super::models::open_repo(&spec, class_of(&job.prompt))?;
    let resolution = match job.voxel_resolution {
        Some(r) => r,
        None => structure_resolution(&repo)?,
    };
    if job.formats.mesh {
        let limit = crate::pipelines::loader::mesh_decoder_resolution(&repo)?;
        ensure!(
            resolution <= limit,
            "voxel resolution {resolution} is finer than the {limit}³ grid this model's mesh decoder handles"
        );
    }
    let params = RunParams {
        ss: Default::default(),
        slat: job.sampling.slat.clone(),
        formats: job.formats,
    };
    let slat_meta = sampler_meta(&repo.config.slat_sampler, &params.slat)?;
    let cond_dir = prompt_conditioner_dir(&job.prompt, &job.conditioners, &repo)?;
    let mut meta = base_meta("variant", &spec, &repo, &device_name);
    meta["conditioner"] = serde_json::json!(cond_dir);
    meta["mesh"] = job.mesh.describe();
    meta["voxel_resolution"] = serde_json::json!(resolution);
    meta["seed"] = serde_json::json!(job.sampling.seed);
    meta["slat_sampler"] = slat_meta;
    meta["formats"] = serde_json::json!(job.formats.names());
    match &job.prompt {
        Prompt::Text(t) => meta["text"] = serde_json::json!(t),
        Prompt::Images(images) => {
            let first = images
                .first()
                .ok_or_else(|| anyhow!("give a text prompt or an image"))?;
            meta["image"] = first.describe();
        }
    }
    let resident = cache.pipeline(&spec, class_of(&job.prompt), false, job.formats, ctl)?;
    let (cond, neg) = encode_prompt(&job.prompt, &cond_dir, resident, &dev, ctl)?;
    check_cancel(ctl)?;
    let mut noise = TorchNoise::new(job.sampling.seed);
    let coords = voxelize_with_progress(&mesh, resolution, &dev, ctl)?;
    let g = run_variant(
        &resident.pipeline,
        &coords,
        &cond,
        &neg,
        &mut noise,
        &params,
        ctl,
    )?;
    Ok(JobOutput::Generated {
        generation: Box::new(g),
        cond,
        meta,
    })
}

fn decode(job: &DecodeJob, cache: &mut ModelCache, ctl: &mut RunControl<'_>) -> Result<JobOutput> {
    let dev = cache.device.clone();
    let asset = Asset::load(&job.asset, &dev)?;
    let spec = match &job.model {
        Some(m) => m.clone(),
        None => asset
            .meta
            .get("model")
            .and_then(|m| m.as_str())
            .map(String::from)
            .ok_or_else(|| anyhow!("the asset records no model; give --model"))?,
    };
    ctl.emit(Stage::Loading, 0, 1, Some(spec.clone()));
    // A resident pipeline lends its decoders (loading those missing); otherwise only the
    // decoders are read, not the flows.
    let standalone;
    let decoders = match cache.resident_mut(&spec) {
        Some(r) => {
            r.complete(false, job.formats, &dev)?;
            &r.pipeline.decoders
        }
        None => {
            let repo = super::models::open_repo_any(&spec)?;
            standalone = load_decoders(&repo, job.formats, &dev)?;
            &standalone
        }
    };
    ctl.emit(Stage::Loading, 1, 1, None);
    check_cancel(ctl)?;
    let decoded = decode_slat(decoders, &asset.coords, &asset.slat, job.formats, ctl)?;
    Ok(JobOutput::Decoded {
        decoded,
        meta: asset.meta,
    })
}
