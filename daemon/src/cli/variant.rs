//! `trellisd variant`: a new appearance for an existing mesh (OBJ, PLY, GLB/glTF), conditioned on
//! a prompt or an image. The mesh is voxelised into the structure grid (its shape is kept); only
//! the structured latent is sampled anew (`run_variant` of the original text pipeline).

use std::path::PathBuf;

use anyhow::Result;

use super::generate::{
    run_in_process, with_reporter, OutputArgs, OutputPlan, RuntimeArgs, SamplingArgs,
};
use super::progress::Reporter;
use crate::jobs::{ImageSource, Job, MeshSource, Prompt, VariantJob};

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
    let prompt = match (&args.text, &args.image) {
        (Some(t), _) => Prompt::Text(t.clone()),
        (None, Some(i)) => {
            args.background.check(std::slice::from_ref(i))?;
            Prompt::Images(vec![ImageSource::Path(i.clone())])
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
        background: args.background.removal(),
    });
    job.validate()?;
    let opened = args.runtime.open_device()?;
    let memory = args.runtime.memory.options()?;
    run_in_process(
        &job,
        &plan.files(),
        opened,
        memory,
        Some(&args.background),
        rep,
    )
}
