//! `trellisd edit`: regenerate a region of a `.trellis` asset, or of a mesh, under a prompt or an
//! image and keep the rest exactly ([`crate::pipelines::edit`], `docs/EDIT.md`). Thin: it checks
//! the arguments (like `generate`, before any network is loaded), loads the networks and the
//! condition, calls [`run_edit`] and writes the outputs atomically.

use std::path::PathBuf;

use anyhow::{anyhow, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::generate::{
    check_image, open_model, prompt_conditioner_dir, sampler_meta, with_control, with_reporter,
    write_outputs, OutputArgs, OutputPlan, RuntimeArgs, SamplingArgs,
};
use super::progress::Reporter;
use crate::export::asset::Asset;
use crate::hub::{self, HubOptions};
use crate::pipelines::base::{Stage, TrellisPipeline};
use crate::pipelines::edit::{run_edit, EditParams, EditPipeline, EditSource, Region, Resampling};
use crate::pipelines::loader::{load_ss_encoder, mesh_decoder_resolution, structure_resolution};
use crate::pipelines::mesh_input::load_mesh;
use crate::pipelines::noise::TorchNoise;
use crate::pipelines::samplers::{Conditioning, SamplerSettings};

fn parse_jump_length(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number"))?;
    if n == 0 {
        return Err("the jump length must be at least 1 step".into());
    }
    Ok(n)
}

#[derive(Debug, clap::Args)]
pub struct EditArgs {
    /// The asset to edit (`.trellis`, from generate / variant / edit).
    #[arg(long, required_unless_present = "mesh", conflicts_with = "mesh")]
    pub asset: Option<PathBuf>,
    /// A mesh to edit instead (.obj, .ply, .glb, .gltf): voxelised on the structure grid, its
    /// structure latent encoded; every voxel's latent is then sampled.
    #[arg(long)]
    pub mesh: Option<PathBuf>,
    /// Pipeline: hub id or local folder (default: the model recorded in the asset, else
    /// microsoft/TRELLIS-text-large for --text, microsoft/TRELLIS-image-large for --image).
    #[arg(long)]
    pub model: Option<String>,
    /// The region to regenerate: box:x0,y0,z0,x1,y1,z1 in the normalised grid space
    /// [-0.5, 0.5]³ (TRELLIS axes, z up), or mask:FILE.npy (an [R, R, R] array on the structure
    /// grid, non-zero = regenerate).
    #[arg(long)]
    pub region: String,
    /// Text prompt.
    #[arg(long, required_unless_present = "image", conflicts_with = "image")]
    pub text: Option<String>,
    /// Image prompt (RGBA, object on a transparent background).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// RePaint resampling: how many times to jump back at each jump point (0: none).
    #[arg(long, default_value_t = 0)]
    pub jumps: usize,
    /// RePaint resampling: the length of a jump, in sampler steps.
    #[arg(long, default_value_t = 1, value_parser = parse_jump_length)]
    pub jump_length: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Representations to decode: mesh,gaussian,radiance_field (default: what the outputs need).
    #[arg(long)]
    pub formats: Option<String>,
    /// Write the mesh as binary glTF (.glb).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the 3D Gaussians as .ply.
    #[arg(long)]
    pub ply: Option<PathBuf>,
    /// Write the edited asset bundle (.trellis; it can be edited or decoded again).
    #[arg(long)]
    pub save_asset: Option<PathBuf>,
    #[command(flatten)]
    pub glb: super::bake_args::GlbArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn run(args: &EditArgs) -> Result<i32> {
    with_reporter(&args.runtime, |rep| edit(args, rep))
}

/// The validated outputs (`--save-asset` is the bundle's flag here: `--asset` is the input).
fn output_plan(args: &EditArgs) -> Result<OutputPlan> {
    ensure!(
        args.out.is_some() || args.ply.is_some() || args.save_asset.is_some(),
        "nothing to write: give --out FILE.glb, --ply FILE.ply and/or --save-asset FILE.trellis"
    );
    if let Some(p) = &args.save_asset {
        ensure!(
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case("trellis")),
            "--save-asset {}: the file name must end in .trellis",
            p.display()
        );
    }
    OutputPlan::from_args(&OutputArgs {
        formats: args.formats.clone(),
        out: args.out.clone(),
        ply: args.ply.clone(),
        asset: args.save_asset.clone(),
        glb: args.glb.clone(),
    })
}

/// (cond, neg) of the prompt, with the conditioner in `dir`.
fn encode_prompt(
    args: &EditArgs,
    dir: &std::path::Path,
    device: &Device,
    rep: &mut Reporter,
) -> Result<(Tensor, Tensor)> {
    if let Some(text) = &args.text {
        let c = crate::models::conditioners::clip::TextConditioner::load(dir, device, DType::F32)?;
        rep.emit(Stage::Loading, 2, 2, None);
        rep.emit(Stage::Conditioning, 0, 1, None);
        return crate::pipelines::text_to_3d::text_cond(&c, text);
    }
    let image = args
        .image
        .as_ref()
        .ok_or_else(|| anyhow!("give --text or --image"))?;
    let c = crate::models::conditioners::dinov2::ImageConditioner::load(dir, device, DType::F32)?;
    rep.emit(Stage::Loading, 2, 2, None);
    rep.emit(Stage::Conditioning, 0, 1, None);
    let x = crate::models::conditioners::preprocess::preprocess_file(image, device)?;
    let cond = c.encode(&x)?;
    let neg = cond.zeros_like()?;
    Ok((cond, neg))
}

fn edit(args: &EditArgs, rep: &mut Reporter) -> Result<serde_json::Value> {
    // 1. Everything cheap, before any download or network load.
    let plan = output_plan(args)?;
    let region = Region::parse(&args.region)?;
    let is_text = args.text.is_some();
    if let Some(t) = &args.text {
        ensure!(!t.trim().is_empty(), "--text: the prompt is empty");
        ensure!(
            args.runtime.image_cond_model.is_none(),
            "--image-cond-model does not apply to a text prompt"
        );
    }
    if let Some(p) = &args.image {
        check_image(p)?;
        ensure!(
            args.runtime.text_cond_model.is_none(),
            "--text-cond-model does not apply to an image prompt"
        );
    }
    let (device, _) = args.runtime.open_device()?;
    let asset = match &args.asset {
        Some(p) => {
            ensure!(p.is_file(), "asset {} does not exist", p.display());
            Some(Asset::load(p, &device)?)
        }
        None => None,
    };
    let mesh = match &args.mesh {
        Some(p) => {
            ensure!(p.is_file(), "mesh {} does not exist", p.display());
            Some(load_mesh(p)?)
        }
        None => None,
    };
    let recorded = asset
        .as_ref()
        .and_then(|a| a.meta.get("model"))
        .and_then(|m| m.as_str())
        .map(String::from);
    let from_asset = args.model.is_none() && recorded.is_some();
    let (spec, repo) = open_model(args.model.as_deref().or(recorded.as_deref()), is_text, rep)
        .with_context(|| {
            if from_asset {
                "the model recorded in the asset; give --model to choose another".to_string()
            } else {
                "--model".to_string()
            }
        })?;
    let spec = spec.to_string();
    let resolution = structure_resolution(&repo)?;
    let mask = region.voxel_mask(resolution)?;
    if plan.formats.mesh {
        let limit = mesh_decoder_resolution(&repo)?;
        ensure!(
            resolution <= limit,
            "the structure grid {resolution}³ is finer than the {limit}³ grid this model's mesh decoder handles"
        );
    }
    let ss_params = args.sampling.ss_params();
    let slat_params = args.sampling.slat_params();
    let ss_meta = sampler_meta(&repo.config.sparse_structure_sampler, &ss_params)?;
    let slat_meta = sampler_meta(&repo.config.slat_sampler, &slat_params)?;
    let resampling = Resampling {
        jump_length: args.jump_length,
        jumps: args.jumps,
    };
    for (c, over) in [
        (&repo.config.sparse_structure_sampler, &ss_params),
        (&repo.config.slat_sampler, &slat_params),
    ] {
        resampling.validate(SamplerSettings::resolve(&c.params.overridden_by(over))?.steps)?;
    }
    let source = match (&asset, &mesh) {
        (Some(a), _) => {
            // A variant's asset records the grid its mesh was voxelised on.
            if let Some(vr) = a.meta.get("voxel_resolution").and_then(|v| v.as_u64()) {
                ensure!(
                    vr == resolution as u64,
                    "the asset's voxels are on a {vr}³ grid; this model's structure grid is {resolution}³"
                );
            }
            EditSource::from_asset(a)
        }
        (None, Some(m)) => {
            rep.emit(Stage::Voxelizing, 0, 1, None);
            let s = EditSource::from_mesh(m, resolution, &device)?;
            rep.emit(
                Stage::Voxelizing,
                1,
                1,
                Some(format!("{} voxels at {resolution}³", s.coords.dim(0)?)),
            );
            s
        }
        (None, None) => anyhow::bail!("give --asset FILE.trellis or --mesh FILE"),
    };
    source.voxels(resolution)?;
    let encoder_files = match source.ss_latent {
        Some(_) => None,
        None => Some(hub::structure_encoder(&repo, &HubOptions::from_env())?),
    };
    let cond_dir = prompt_conditioner_dir(&args.runtime, &repo, is_text)?;
    let mut meta = serde_json::json!({
        "generator": format!("trellis-rs {}", env!("CARGO_PKG_VERSION")),
        "task": "edit",
        "model": spec,
        "pipeline": repo.config.class.name(),
        "conditioner": cond_dir,
        "region": region.describe(),
        "resampling": resampling,
        "seed": args.sampling.seed,
        "sparse_structure_sampler": ss_meta,
        "slat_sampler": slat_meta,
        "formats": plan.formats.names(),
        "device": crate::runtime::device::device_name(&device),
    });
    match (&args.asset, &args.mesh) {
        (Some(p), _) => {
            meta["source"] = serde_json::json!({"asset": p});
            if let Some(a) = &asset {
                meta["source_meta"] = a.meta.clone();
            }
        }
        (None, Some(p)) => meta["source"] = serde_json::json!({"mesh": p}),
        (None, None) => {}
    }
    if let Some(t) = &args.text {
        meta["text"] = serde_json::json!(t);
    }
    if let Some(i) = &args.image {
        meta["image"] = serde_json::json!(i);
    }
    // 2. Networks and the condition.
    let pipeline = TrellisPipeline::load(repo, &device, true, plan.formats)?;
    let encoder = match &encoder_files {
        Some(f) => Some(load_ss_encoder(f, &device)?),
        None => None,
    };
    let pipe = EditPipeline { pipeline, encoder };
    let (cond, neg) = encode_prompt(args, &cond_dir, &device, rep)?;
    rep.emit(Stage::Conditioning, 1, 1, None);
    // 3. The edit.
    let params = EditParams {
        ss: ss_params,
        slat: slat_params,
        resampling,
        formats: plan.formats,
    };
    let mut noise = TorchNoise::new(args.sampling.seed);
    let c = Conditioning::Single {
        cond: &cond,
        neg: &neg,
    };
    let outcome = with_control(rep, |ctl| {
        run_edit(&pipe, &source, &mask, &c, &mut noise, &params, ctl)
    })?;
    if outcome.report.slat_regenerated_everywhere {
        rep.note("the mesh has no structured latent: every voxel's latent was sampled anew (a variant of the edited structure)");
    }
    meta["edit"] = serde_json::to_value(&outcome.report)?;
    write_outputs(&plan, &outcome.generation, Some(&cond), meta, rep)
}
