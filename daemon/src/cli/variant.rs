//! `trellisd variant`: a new appearance for an existing mesh (OBJ, PLY, GLB/glTF), conditioned on
//! a prompt or an image. The mesh is voxelised into the structure grid (its shape is kept); only
//! the structured latent is sampled anew (`run_variant` of the original text pipeline).

use std::path::PathBuf;

use anyhow::{ensure, Result};
use candle_core::{DType, Device};

use super::generate::{
    check_image, open_model, prompt_conditioner_dir, sampler_meta, with_control, with_reporter,
    write_outputs, OutputArgs, OutputPlan, RuntimeArgs, SamplingArgs,
};
use super::progress::Reporter;
use crate::pipelines::base::{RunParams, Stage, TrellisPipeline};
use crate::pipelines::loader::structure_resolution;
use crate::pipelines::mesh_input::load_mesh;
use crate::pipelines::noise::TorchNoise;
use crate::pipelines::variant::{run_variant, voxelize_with_progress};

#[derive(Debug, clap::Args)]
pub struct VariantArgs {
    /// Pipeline: hub id or local folder (default microsoft/TRELLIS-text-large for --text,
    /// microsoft/TRELLIS-image-large for --image).
    #[arg(long)]
    pub model: Option<String>,
    /// The base mesh: .obj, .ply, .glb or .gltf.
    #[arg(long)]
    pub mesh: PathBuf,
    /// Text prompt.
    #[arg(long, required_unless_present = "image", conflicts_with = "image")]
    pub text: Option<String>,
    /// Image prompt (RGBA, object on a transparent background).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Voxel grid resolution (default: the structure decoder's, 64 for the official models).
    #[arg(long)]
    pub voxel_resolution: Option<usize>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn run(args: &VariantArgs) -> Result<i32> {
    with_reporter(&args.runtime, |rep| variant(args, rep))
}

fn variant(args: &VariantArgs, rep: &mut Reporter) -> Result<serde_json::Value> {
    let plan = OutputPlan::from_args(&args.output)?;
    ensure!(
        args.sampling.ss_steps.is_none() && args.sampling.ss_cfg.is_none(),
        "a variant keeps the structure of the mesh: --ss-steps / --ss-cfg do not apply"
    );
    if let Some(r) = args.voxel_resolution {
        ensure!(
            (1..=1024).contains(&r),
            "--voxel-resolution must be between 1 and 1024 (got {r})"
        );
    }
    ensure!(
        args.mesh.is_file(),
        "mesh {} does not exist",
        args.mesh.display()
    );
    let mesh = load_mesh(&args.mesh)?;
    if let Some(p) = &args.image {
        check_image(p)?;
        ensure!(
            args.runtime.text_cond_model.is_none(),
            "--text-cond-model does not apply to an image prompt"
        );
    }
    if let Some(t) = &args.text {
        ensure!(!t.trim().is_empty(), "--text: the prompt is empty");
        ensure!(
            args.runtime.image_cond_model.is_none(),
            "--image-cond-model does not apply to a text prompt"
        );
    }
    let device: Device = crate::runtime::select(
        &args.runtime.device,
        &args.runtime.precision,
        crate::runtime::device::Fallback::CpuWithWarning,
    )?;
    let is_text = args.text.is_some();
    let (spec, repo) = open_model(args.model.as_deref(), is_text, rep)?;
    let resolution = match args.voxel_resolution {
        Some(r) => r,
        None => structure_resolution(&repo)?,
    };
    if plan.formats.mesh {
        let limit = crate::pipelines::loader::mesh_decoder_resolution(&repo)?;
        ensure!(
            resolution <= limit,
            "voxel resolution {resolution} is finer than the {limit}³ grid this model's mesh decoder handles"
        );
    }
    let slat_meta = sampler_meta(&repo.config.slat_sampler, &args.sampling.slat_params())?;
    let cond_dir = prompt_conditioner_dir(&args.runtime, &repo, is_text)?;
    let params = RunParams {
        ss: Default::default(),
        slat: args.sampling.slat_params(),
        formats: plan.formats,
    };
    let mut meta = serde_json::json!({
        "generator": format!("trellis-rs {}", env!("CARGO_PKG_VERSION")),
        "task": "variant",
        "model": spec,
        "pipeline": repo.config.class.name(),
        "conditioner": cond_dir,
        "mesh": args.mesh,
        "voxel_resolution": resolution,
        "seed": args.sampling.seed,
        "slat_sampler": slat_meta,
        "formats": plan.formats.names(),
        "device": crate::runtime::device::device_name(&device),
    });
    let pipeline = TrellisPipeline::load(repo, &device, false, plan.formats)?;
    let (cond, neg) = if let Some(text) = &args.text {
        meta["text"] = serde_json::json!(text);
        let c = crate::models::conditioners::clip::TextConditioner::load(
            &cond_dir,
            &device,
            DType::F32,
        )?;
        rep.emit(Stage::Loading, 2, 2, None);
        rep.emit(Stage::Conditioning, 0, 1, None);
        crate::pipelines::text_to_3d::text_cond(&c, text)?
    } else {
        let image = args
            .image
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("give --text or --image"))?;
        meta["image"] = serde_json::json!(image);
        let conditioner = crate::models::conditioners::dinov2::ImageConditioner::load(
            &cond_dir,
            &device,
            DType::F32,
        )?;
        rep.emit(Stage::Loading, 2, 2, None);
        rep.emit(Stage::Conditioning, 0, 1, None);
        let x = crate::models::conditioners::preprocess::preprocess_file(image, &device)?;
        let cond = conditioner.encode(&x)?;
        let neg = cond.zeros_like()?;
        (cond, neg)
    };
    rep.emit(Stage::Conditioning, 1, 1, None);
    let mut noise = TorchNoise::new(args.sampling.seed);
    let g = with_control(rep, |ctl| {
        let coords = voxelize_with_progress(&mesh, resolution, &device, ctl)?;
        run_variant(&pipeline, &coords, &cond, &neg, &mut noise, &params, ctl)
    })?;
    write_outputs(&plan, &g, Some(&cond), meta, rep)
}
