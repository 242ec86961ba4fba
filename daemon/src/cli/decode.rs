//! `trellisd decode`: decode a saved `.trellis` asset again (no sampling) into a GLB mesh and/or
//! a Gaussian PLY, with the decoders of the model recorded in the asset (or `--model`).

use std::path::PathBuf;

use anyhow::{ensure, Result};

use super::generate::{run_in_process, with_reporter, OutputPlan};
use super::progress::Reporter;
use crate::jobs::{DecodeJob, Job};

#[derive(Debug, clap::Args)]
pub struct DecodeArgs {
    /// The asset written by `generate --asset` or `variant --asset`.
    #[arg(long)]
    pub asset: PathBuf,
    /// Pipeline whose decoders to use (default: the model recorded in the asset).
    #[arg(long)]
    pub model: Option<String>,
    /// Write the mesh as binary glTF (.glb).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the 3D Gaussians as .ply.
    #[arg(long)]
    pub ply: Option<PathBuf>,
    #[command(flatten)]
    pub glb: super::bake_args::GlbArgs,
    /// auto (the first GPU with enough free memory, else the CPU), cpu or cuda[:N].
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// auto, full (float32, TF32 off), half (float16 torsos as the original) or bf16.
    #[arg(long, default_value = "auto")]
    pub precision: String,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
    /// One JSON object per progress event on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &DecodeArgs) -> Result<i32> {
    let runtime = super::generate::RuntimeArgs {
        image_cond_model: None,
        text_cond_model: None,
        device: args.device.clone(),
        precision: args.precision.clone(),
        quiet: args.quiet,
        json: args.json,
        memory: Default::default(),
    };
    with_reporter(&runtime, |rep| decode(args, rep))
}

fn decode(args: &DecodeArgs, rep: &mut Reporter) -> Result<serde_json::Value> {
    ensure!(
        args.out.is_some() || args.ply.is_some(),
        "nothing to write: give --out FILE.glb and/or --ply FILE.ply"
    );
    let plan = OutputPlan::from_args(&super::generate::OutputArgs {
        formats: None,
        out: args.out.clone(),
        ply: args.ply.clone(),
        asset: None,
        glb: args.glb.clone(),
    })?;
    let job = Job::Decode(DecodeJob {
        asset: args.asset.clone(),
        model: args.model.clone(),
        formats: plan.formats,
    });
    job.validate()?;
    let opened = super::generate::open_device(&args.device, &args.precision)?;
    let memory = crate::runtime::residency::MemoryOptions::from_env()?;
    run_in_process(&job, &plan.files(), opened, memory, None, rep)
}
