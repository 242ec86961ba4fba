//! `trellisd variant`: a new appearance for an existing mesh (OBJ, PLY, GLB/glTF), conditioned on
//! a prompt or an image. The mesh is voxelised into the structure grid (its shape is kept); only
//! the structured latent is sampled anew (`run_variant` of the original text pipeline).

use std::path::PathBuf;

use anyhow::Result;

use super::generate::{
    run_in_process, with_reporter, OutputArgs, OutputPlan, RuntimeArgs, SamplingArgs,
};
use super::progress::Reporter;
use crate::jobs::{Job, MeshSource, Prompt, VariantJob};

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
    /// Image prompt (RGBA with the object on a transparent background, or a photo whose
    /// background is removed first).
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
    #[command(flatten)]
    pub background: super::background::BackgroundArgs,
}

pub fn run(args: &VariantArgs) -> Result<i32> {
    with_reporter(&args.runtime, |rep| variant(args, rep))
}

fn variant(args: &VariantArgs, rep: &mut Reporter) -> Result<serde_json::Value> {
    let plan = OutputPlan::from_args(&args.output)?;
    let mut prepared = None;
    let mut opened = None;
    let prompt = match (&args.text, &args.image) {
        (Some(t), _) => Prompt::Text(t.clone()),
        (None, Some(i)) => {
            let one = std::slice::from_ref(i);
            args.background.options().check(one)?;
            let o = args.runtime.open_device()?;
            let p = args.background.prepare(one, &o.0, rep)?;
            opened = Some(o);
            let images = super::generate::decoded_sources(one, &p.images);
            prepared = Some(p);
            Prompt::Images(images)
        }
        (None, None) => anyhow::bail!("give --text or --image"),
    };
    let job = Job::Variant(VariantJob {
        model: args.model.clone(),
        mesh: MeshSource::Path(args.mesh.clone()),
        prompt,
        voxel_resolution: args.voxel_resolution,
        sampling: args.sampling.to_sampling(),
        formats: plan.formats,
        conditioners: args.runtime.conditioners(),
    });
    job.validate()?;
    let opened = match opened {
        Some(o) => o,
        None => args.runtime.open_device()?,
    };
    let mut written = run_in_process(&job, &plan.files(), opened, rep)?;
    if let Some(p) = &prepared {
        for m in p.write_masks()? {
            written["mask"] = serde_json::json!(m);
        }
    }
    Ok(written)
}
