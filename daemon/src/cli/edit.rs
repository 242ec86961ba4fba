//! `trellisd edit`: regenerate a region of a `.trellis` asset, or of a mesh, under a prompt or an
//! image and keep the rest exactly ([`crate::pipelines::edit`], `docs/EDIT.md`). Thin: it builds
//! the same edit job the daemon runs ([`crate::jobs::EditJob`]), validates it before any network
//! is loaded, runs it in-process and writes the outputs atomically.

use std::path::PathBuf;

use anyhow::{bail, ensure, Result};

use super::generate::{
    run_in_process, with_reporter, OutputArgs, OutputPlan, RuntimeArgs, SamplingArgs,
};
use super::progress::Reporter;
use crate::jobs::{EditInput, EditJob, ImageSource, Job, MeshSource, Prompt};
use crate::pipelines::edit::{Region, Resampling};

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
    /// Image prompt: RGBA with the object on a transparent background, or an ordinary photo (its
    /// background is removed first).
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
    #[command(flatten)]
    pub background: super::background::BackgroundArgs,
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

fn edit(args: &EditArgs, rep: &mut Reporter) -> Result<serde_json::Value> {
    // Everything cheap, before any download or network load (the job's validation checks the
    // region against the model's grid, the source and the resampling).
    let plan = output_plan(args)?;
    let region = Region::parse(&args.region)?;
    let prompt = match (&args.text, &args.image) {
        (Some(t), _) => {
            ensure!(
                args.background.save_mask.is_none() && args.background.background_model.is_none(),
                "--save-mask and --background-model apply to an image, not to a text prompt"
            );
            Prompt::Text(t.clone())
        }
        (None, Some(p)) => {
            args.background.check(std::slice::from_ref(p))?;
            Prompt::Images(vec![ImageSource::Path(p.clone())])
        }
        (None, None) => bail!("give --text or --image"),
    };
    let source = match (&args.asset, &args.mesh) {
        (Some(p), _) => EditInput::Asset {
            path: p.clone(),
            id: None,
        },
        (None, Some(m)) => EditInput::Mesh(MeshSource::Path(m.clone())),
        (None, None) => bail!("give --asset FILE.trellis or --mesh FILE"),
    };
    let job = Job::Edit(EditJob {
        model: args.model.clone(),
        source,
        region,
        prompt,
        sampling: args.sampling.to_sampling(),
        resampling: Resampling {
            jump_length: args.jump_length,
            jumps: args.jumps,
        },
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
