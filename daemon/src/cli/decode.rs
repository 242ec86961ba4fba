//! `trellisd decode`: decode a saved `.trellis` asset again (no sampling) into a GLB mesh and/or
//! a Gaussian PLY, with the decoders of the model recorded in the asset (or `--model`).

use std::path::PathBuf;

use anyhow::{anyhow, ensure, Result};
use candle_core::Device;

use super::generate::{with_control, with_reporter, write_decoded, OutputPlan};
use super::progress::Reporter;
use crate::export::asset::Asset;
use crate::hub::{self, HubOptions};
use crate::pipelines::base::{decode_slat, Stage};
use crate::pipelines::loader::{load_decoders, Formats};

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
    })?;
    ensure!(
        args.asset.is_file(),
        "asset {} does not exist",
        args.asset.display()
    );
    let device: Device = crate::runtime::select(
        &args.device,
        &args.precision,
        crate::runtime::device::Fallback::CpuWithWarning,
    )?;
    let asset = Asset::load(&args.asset, &device)?;
    let spec = match &args.model {
        Some(m) => m.clone(),
        None => asset
            .meta
            .get("model")
            .and_then(|m| m.as_str())
            .map(String::from)
            .ok_or_else(|| anyhow!("the asset records no model; give --model"))?,
    };
    rep.emit(Stage::Loading, 0, 1, Some(spec.clone()));
    let repo = hub::open_pipeline(&spec, &HubOptions::from_env())?;
    let formats: Formats = plan.formats;
    let decoders = load_decoders(&repo, formats, &device)?;
    rep.emit(Stage::Loading, 1, 1, None);
    let d = with_control(rep, |ctl| {
        decode_slat(&decoders, &asset.coords, &asset.slat, formats, ctl)
    })?;
    let total = [&plan.glb, &plan.ply]
        .iter()
        .filter(|p| p.is_some())
        .count();
    let mut written = serde_json::Map::new();
    let mut done = 0;
    write_decoded(&plan, &d, &mut written, &mut done, total, rep)?;
    Ok(serde_json::Value::Object(written))
}
