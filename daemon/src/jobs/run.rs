//! Running a job on a worker's [`ModelCache`]: open (or reuse) the models, condition, sample,
//! decode. Progress and cancel go through the [`RunControl`] (cancel is checked before every
//! sampler step, so it takes effect within one step).

use std::sync::atomic::Ordering;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::GrayImage;

use super::models::{conditioner_dir, model_spec, open_repo, ModelCache};
use super::params::{
    BackgroundRemoval, DecodeJob, EditInput, EditJob, GenerateJob, ImageSource, Job, Prompt,
    VariantJob,
};
use crate::export::asset::Asset;
use crate::hub::{self, HubOptions, PipelineClass, PipelineRepo};
use crate::models::background::has_useful_alpha;
use crate::models::conditioners::preprocess::alpha_crop_box;
use crate::models::config::{SamplerConfig, SamplerParams};
use crate::pipelines::base::{decode_slat, Decoded, Generation, RunControl, RunParams, Stage};
use crate::pipelines::edit::{run_edit, EditParams, EditPipeline, EditSource, VoxelMask};
use crate::pipelines::image_to_3d::MultiImageMode;
use crate::pipelines::loader::{load_decoders, mesh_decoder_resolution, structure_resolution};
use crate::pipelines::noise::TorchNoise;
use crate::pipelines::samplers::{Conditioning, SamplerSettings};
use crate::pipelines::text_to_3d::text_cond;
use crate::pipelines::variant::{run_variant, voxelize_with_progress};
use crate::pipelines::voxelize::TriMesh;

/// What a job produced.
pub enum JobOutput {
    /// `generate` / `variant` / `edit`: the whole generation, its condition, the asset
    /// metadata and the mattes of the background-removed input images (when asked to keep them).
    Generated {
        generation: Box<Generation>,
        cond: Tensor,
        meta: serde_json::Value,
        masks: Vec<GrayImage>,
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

    /// The mattes of the input images whose background was removed (empty unless the job's
    /// [`BackgroundRemoval::keep_masks`]).
    pub fn masks(&self) -> &[GrayImage] {
        match self {
            JobOutput::Generated { masks, .. } => masks,
            JobOutput::Decoded { .. } => &[],
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
            ..
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
/// The memory tier starts where `--vram-tier` (or the free memory) says; an out-of-memory error
/// inside a stage drops it for the rest of the job (`runtime::residency`). The metadata records
/// the tier the job started and ended at.
pub fn run_job(job: &Job, cache: &mut ModelCache, ctl: &mut RunControl<'_>) -> Result<JobOutput> {
    check_cancel(ctl)?;
    let (tier, why) = cache.residency.begin_job();
    let mut out = match job {
        Job::Generate(g) => generate(g, cache, ctl),
        Job::Variant(v) => variant(v, cache, ctl),
        Job::Edit(e) => edit(e, cache, ctl),
        Job::Decode(d) => decode(d, cache, ctl),
    }?;
    let end = cache.residency.tier();
    let memory = serde_json::json!({
        "tier": tier.name(),
        "tier_reason": why,
        "tier_at_end": end.name(),
    });
    match &mut out {
        JobOutput::Generated { meta, .. } => meta["memory"] = memory,
        JobOutput::Decoded { .. } => {}
    }
    Ok(out)
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
    let res = resident.pipeline.residency.clone();
    match prompt {
        Prompt::Text(text) => {
            let c = resident.text_conditioner(cond_dir)?;
            ctl.emit(Stage::Loading, 2, 2, None);
            ctl.emit(Stage::Conditioning, 0, 1, None);
            let r = res.stage("conditioner", &[c], || text_cond(&*c.get()?, text))?;
            ctl.emit(Stage::Conditioning, 1, 1, None);
            Ok(r)
        }
        Prompt::Images(images) => {
            let c = resident.image_conditioner(cond_dir)?;
            ctl.emit(Stage::Loading, 2, 2, None);
            ctl.emit(Stage::Conditioning, 0, images.len(), None);
            let batch: Vec<Tensor> = images
                .iter()
                .map(|i| i.tensor(dev))
                .collect::<Result<_>>()?;
            let x = Tensor::cat(&batch, 0)?;
            let cond = res.stage("conditioner", &[c], || c.get()?.encode(&x))?;
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
    let (prompt, masks, removed) = remove_backgrounds(&job.prompt, &job.background, cache, ctl)?;
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
    record_removed(&mut meta, &removed, &job.background);
    // While the conditioner runs, the structure flow is copied in (`Residency::prefetch_next`).
    if let Some(f) = &resident.pipeline.ss_flow {
        resident.pipeline.residency.prefetch_next(&[f]);
    }
    let (cond, neg) = encode_prompt(&prompt, &cond_dir, resident, &dev, ctl)?;
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
        masks,
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
    let (prompt, masks, removed) = remove_backgrounds(&job.prompt, &job.background, cache, ctl)?;
    record_removed(&mut meta, &removed, &job.background);
    let resident = cache.pipeline(&spec, class_of(&job.prompt), false, job.formats, ctl)?;
    let (cond, neg) = encode_prompt(&prompt, &cond_dir, resident, &dev, ctl)?;
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
        masks,
    })
}

/// What an edit runs on, checked: everything that needs no network (the region against the
/// model's grid, the source's voxels, the resampling against the sampler steps).
pub(super) struct EditPlan {
    spec: String,
    mask: VoxelMask,
    asset: Option<Asset>,
    mesh: Option<Arc<TriMesh>>,
    cond_dir: PathBuf,
    meta: serde_json::Value,
}

/// Checks an edit job and gathers what it runs on (the source loaded on `dev`).
pub(super) fn plan_edit(job: &EditJob, dev: &Device) -> Result<EditPlan> {
    job.region.check_box()?;
    let (asset, mesh) = match &job.source {
        EditInput::Asset { path, .. } => {
            ensure!(path.is_file(), "asset {} does not exist", path.display());
            (Some(Asset::load(path, dev)?), None)
        }
        EditInput::Mesh(m) => (None, Some(m.load()?)),
    };
    let is_text = job.prompt.is_text();
    let recorded = asset
        .as_ref()
        .and_then(|a| a.meta.get("model"))
        .and_then(|m| m.as_str())
        .map(String::from);
    let from_asset = job.model.is_none() && recorded.is_some();
    let spec = job
        .model
        .clone()
        .or(recorded)
        .unwrap_or_else(|| model_spec(None, is_text).to_string());
    let repo = open_repo(&spec, class_of(&job.prompt)).with_context(|| {
        if from_asset {
            format!("model {spec}, recorded in the asset (give a model to choose another)")
        } else {
            format!("model {spec}")
        }
    })?;
    let resolution = structure_resolution(&repo)?;
    let mask = job.region.voxel_mask(resolution)?;
    if job.formats.mesh {
        let limit = mesh_decoder_resolution(&repo)?;
        ensure!(
            resolution <= limit,
            "the structure grid {resolution}³ is finer than the {limit}³ grid this model's mesh decoder handles"
        );
    }
    let ss_meta = sampler_meta(&repo.config.sparse_structure_sampler, &job.sampling.ss)?;
    let slat_meta = sampler_meta(&repo.config.slat_sampler, &job.sampling.slat)?;
    for (c, over) in [
        (&repo.config.sparse_structure_sampler, &job.sampling.ss),
        (&repo.config.slat_sampler, &job.sampling.slat),
    ] {
        let steps = SamplerSettings::resolve(&c.params.overridden_by(over))?.steps;
        job.resampling.validate(steps)?;
    }
    if let Some(a) = &asset {
        // A variant's asset records the grid its mesh was voxelised on.
        if let Some(vr) = a.meta.get("voxel_resolution").and_then(|v| v.as_u64()) {
            ensure!(
                vr == resolution as u64,
                "the asset's voxels are on a {vr}³ grid; this model's structure grid is {resolution}³"
            );
        }
        EditSource::from_asset(a).voxels(resolution)?;
    }
    if asset.as_ref().is_none_or(|a| a.ss_latent.is_none()) {
        // The source's structure latent is encoded: the encoder must exist.
        hub::structure_encoder(&repo, &HubOptions::from_env())?;
    }
    let cond_dir = prompt_conditioner_dir(&job.prompt, &job.conditioners, &repo)?;
    let mut meta = base_meta(
        "edit",
        &spec,
        &repo,
        &crate::runtime::device::device_name(dev),
    );
    meta["conditioner"] = serde_json::json!(cond_dir);
    meta["region"] = job.region.describe();
    meta["resampling"] = serde_json::to_value(job.resampling)?;
    meta["seed"] = serde_json::json!(job.sampling.seed);
    meta["sparse_structure_sampler"] = ss_meta;
    meta["slat_sampler"] = slat_meta;
    meta["formats"] = serde_json::json!(job.formats.names());
    meta["source"] = job.source.describe();
    if let Some(a) = &asset {
        meta["source_meta"] = a.meta.clone();
    }
    match &job.prompt {
        Prompt::Text(t) => meta["text"] = serde_json::json!(t),
        Prompt::Images(images) => {
            let first = images
                .first()
                .ok_or_else(|| anyhow!("give a text prompt or an image"))?;
            meta["image"] = first.describe();
        }
    }
    Ok(EditPlan {
        spec,
        mask,
        asset,
        mesh,
        cond_dir,
        meta,
    })
}

fn edit(job: &EditJob, cache: &mut ModelCache, ctl: &mut RunControl<'_>) -> Result<JobOutput> {
    let dev = cache.device.clone();
    let EditPlan {
        spec,
        mask,
        asset,
        mesh,
        cond_dir,
        mut meta,
    } = plan_edit(job, &dev)?;
    let (prompt, masks, removed) = remove_backgrounds(&job.prompt, &job.background, cache, ctl)?;
    record_removed(&mut meta, &removed, &job.background);
    let source = match (&asset, &mesh) {
        (Some(a), _) => EditSource::from_asset(a),
        (None, Some(m)) => {
            let r = mask.resolution();
            ctl.emit(Stage::Voxelizing, 0, 1, None);
            let s = EditSource::from_mesh(m, r, &dev)?;
            let n = s.coords.dim(0)?;
            ctl.emit(Stage::Voxelizing, 1, 1, Some(format!("{n} voxels at {r}³")));
            s
        }
        (None, None) => bail!("an edit needs an asset or a mesh"),
    };
    check_cancel(ctl)?;
    let resident = cache.pipeline(&spec, class_of(&job.prompt), true, job.formats, ctl)?;
    if source.ss_latent.is_none() {
        resident.structure_encoder(&dev)?;
    }
    let (cond, neg) = encode_prompt(&prompt, &cond_dir, resident, &dev, ctl)?;
    check_cancel(ctl)?;
    let pipe = EditPipeline {
        pipeline: &resident.pipeline,
        encoder: resident.ss_encoder.as_ref(),
    };
    let params = EditParams {
        ss: job.sampling.ss.clone(),
        slat: job.sampling.slat.clone(),
        resampling: job.resampling,
        formats: job.formats,
    };
    let mut noise = TorchNoise::new(job.sampling.seed);
    let c = Conditioning::Single {
        cond: &cond,
        neg: &neg,
    };
    let outcome = run_edit(&pipe, &source, &mask, &c, &mut noise, &params, ctl)?;
    meta["edit"] = serde_json::to_value(&outcome.report)?;
    Ok(JobOutput::Generated {
        generation: Box::new(outcome.generation),
        cond,
        meta,
        masks,
    })
}

/// Removes the background of every input image without useful alpha (U²-Net, loaded into the
/// cache on first need), as TRELLIS' `preprocess_image` does with rembg: returns the prompt with
/// those images replaced by their cutouts, the mattes (when `bg.keep_masks`) and which images
/// were matted.
fn remove_backgrounds(
    prompt: &Prompt,
    bg: &BackgroundRemoval,
    cache: &mut ModelCache,
    ctl: &mut RunControl<'_>,
) -> Result<(Prompt, Vec<GrayImage>, Vec<usize>)> {
    let Prompt::Images(images) = prompt else {
        return Ok((prompt.clone(), Vec::new(), Vec::new()));
    };
    let mut loaded = Vec::with_capacity(images.len());
    for i in images {
        loaded.push(i.load()?);
    }
    let todo: Vec<usize> = (0..loaded.len())
        .filter(|&k| !has_useful_alpha(&loaded[k]))
        .collect();
    if todo.is_empty() {
        return Ok((prompt.clone(), Vec::new(), Vec::new()));
    }
    if !bg.enabled {
        // Validation refuses this before the job runs; a file changed since is refused here.
        images[todo[0]].check(false)?;
    }
    let model_name = bg
        .model
        .clone()
        .unwrap_or_else(|| crate::models::background::DEFAULT_MODEL.to_string());
    ctl.emit(Stage::RemovingBackground, 0, todo.len(), Some(model_name));
    let model = cache.background_model(bg.model.as_deref())?;
    let mut out = images.clone();
    let mut masks = Vec::new();
    for (done, &k) in todo.iter().enumerate() {
        if ctl.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            bail!("cancelled");
        }
        let name = images[k].name();
        let (cut, matte) = model.remove(&loaded[k]).with_context(|| name.clone())?;
        // The crop of preprocess_image needs an opaque object.
        alpha_crop_box(&cut).with_context(|| format!("{name} after background removal"))?;
        let cut = Arc::new(cut);
        out[k] = match &images[k] {
            ImageSource::Path(p) | ImageSource::Decoded { path: p, .. } => ImageSource::Decoded {
                path: p.clone(),
                image: cut,
            },
            ImageSource::Rgba(_) => ImageSource::Rgba(cut),
        };
        if bg.keep_masks {
            masks.push(matte);
        }
        ctl.emit(Stage::RemovingBackground, done + 1, todo.len(), None);
    }
    Ok((Prompt::Images(out), masks, todo))
}

/// Notes in the asset metadata which input images were matted, and by which network.
fn record_removed(meta: &mut serde_json::Value, removed: &[usize], bg: &BackgroundRemoval) {
    if removed.is_empty() {
        return;
    }
    meta["background_removed"] = serde_json::json!({
        "images": removed,
        "model": bg.model.as_deref().unwrap_or(crate::models::background::DEFAULT_MODEL),
    });
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
    let res = cache.residency.clone();
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
    let decoded = decode_slat(&res, decoders, &asset.coords, &asset.slat, job.formats, ctl)?;
    Ok(JobOutput::Decoded {
        decoded,
        meta: asset.meta,
    })
}
