//! `trellisd generate`: image(s) or text → 3D (GLB mesh, Gaussian PLY, `.trellis` asset).
//!
//! Everything that can be checked cheaply is checked before any network is loaded: input files
//! exist and decode, step counts are at least 1, output folders exist and extensions match, the
//! model's class fits the input (a text model given an image is an error). Outputs are written
//! atomically, so a failure never leaves a partial file at an output path.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

use super::progress::{Mode, Reporter};
use crate::export::atomic::check_output_path;
use crate::jobs::outputs::{self, OutputFiles};
use crate::jobs::{
    run_job, ConditionerOverrides, GenerateJob, ImageSource, Job, ModelCache, Prompt, Sampling,
};
use crate::models::config::SamplerParams;
use crate::pipelines::base::{ProgressEvent, RunControl};
use crate::pipelines::image_to_3d::MultiImageMode;
use crate::pipelines::loader::Formats;
use crate::runtime::precision::PrecisionChoice;
use crate::runtime::residency::MemoryOptions;

fn parse_steps(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number"))?;
    if n == 0 {
        return Err("the number of sampling steps must be at least 1".into());
    }
    Ok(n)
}

fn parse_cfg(s: &str) -> Result<f64, String> {
    let x: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !x.is_finite() {
        return Err("the guidance strength must be finite".into());
    }
    Ok(x)
}

/// Sampler overrides (every one optional: pipeline.json's value otherwise).
#[derive(Debug, Clone, clap::Args)]
pub struct SamplingArgs {
    /// Random seed, as the original's `torch.manual_seed`: the same seed draws the same noise as
    /// the original pipeline's `run(..., seed=N)`.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Sparse-structure sampler steps.
    #[arg(long, value_parser = parse_steps)]
    pub ss_steps: Option<usize>,
    /// Sparse-structure classifier-free guidance strength.
    #[arg(long, value_parser = parse_cfg)]
    pub ss_cfg: Option<f64>,
    /// Structured-latent sampler steps.
    #[arg(long, value_parser = parse_steps)]
    pub slat_steps: Option<usize>,
    /// Structured-latent classifier-free guidance strength.
    #[arg(long, value_parser = parse_cfg)]
    pub slat_cfg: Option<f64>,
}

impl SamplingArgs {
    pub fn ss_params(&self) -> SamplerParams {
        SamplerParams {
            steps: self.ss_steps,
            cfg_strength: self.ss_cfg,
            ..Default::default()
        }
    }
    pub fn slat_params(&self) -> SamplerParams {
        SamplerParams {
            steps: self.slat_steps,
            cfg_strength: self.slat_cfg,
            ..Default::default()
        }
    }
    pub fn to_sampling(&self) -> Sampling {
        Sampling {
            seed: self.seed,
            ss: self.ss_params(),
            slat: self.slat_params(),
        }
    }
}

/// Output files and formats.
#[derive(Debug, Clone, clap::Args)]
pub struct OutputArgs {
    /// Representations to decode: mesh,gaussian,radiance_field (default: what the outputs need).
    #[arg(long)]
    pub formats: Option<String>,
    /// Write the mesh as binary glTF (.glb).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the 3D Gaussians as .ply.
    #[arg(long)]
    pub ply: Option<PathBuf>,
    /// Write the .trellis asset bundle (decodable again with `trellisd decode`).
    #[arg(long)]
    pub asset: Option<PathBuf>,
    #[command(flatten)]
    pub glb: super::bake_args::GlbArgs,
}

/// Where models come from and how progress is shown.
#[derive(Debug, Clone, clap::Args)]
pub struct RuntimeArgs {
    /// Image conditioner (hub id or folder); default: the one pipeline.json names.
    #[arg(long)]
    pub image_cond_model: Option<String>,
    /// Text conditioner (hub id or folder); default: the one pipeline.json names.
    #[arg(long)]
    pub text_cond_model: Option<String>,
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
    #[command(flatten)]
    pub memory: super::memory_args::MemoryArgs,
}

impl RuntimeArgs {
    /// Sets `--precision` and opens `--device` (a CUDA device that cannot be used falls back to
    /// the CPU with one warning line).
    pub fn open_device(&self) -> Result<(candle_core::Device, PrecisionChoice)> {
        open_device(&self.device, &self.precision)
    }

    pub fn conditioners(&self) -> ConditionerOverrides {
        ConditionerOverrides {
            image: self.image_cond_model.clone(),
            text: self.text_cond_model.clone(),
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Pipeline: hub id or local folder (default microsoft/TRELLIS-image-large for images,
    /// microsoft/TRELLIS-text-large for text).
    #[arg(long)]
    pub model: Option<String>,
    /// Input image(s): RGBA with the object on a transparent background, or an ordinary photo
    /// (its background is removed first); several = multi-view.
    #[arg(long, num_args = 1.., required_unless_present = "text", conflicts_with = "text")]
    pub image: Vec<PathBuf>,
    /// How several images condition the generation.
    #[arg(long, value_enum, default_value = "stochastic")]
    pub multi_image_mode: MultiImageMode,
    /// Text prompt.
    #[arg(long)]
    pub text: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub output: OutputArgs,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    #[command(flatten)]
    pub background: super::background::BackgroundArgs,
}

/// Validated outputs.
#[derive(Debug, Clone)]
pub struct OutputPlan {
    pub formats: Formats,
    pub glb: Option<PathBuf>,
    pub ply: Option<PathBuf>,
    pub asset: Option<PathBuf>,
    /// How the GLB is made (texture baking, decimation).
    pub bake: crate::postprocessing::BakeOptions,
    pub preview: Option<PathBuf>,
}

fn check_ext(path: &Path, ext: &str, flag: &str) -> Result<()> {
    let ok = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case(ext));
    ensure!(
        ok,
        "{flag} {}: the file name must end in .{ext}",
        path.display()
    );
    check_output_path(path).with_context(|| format!("{flag} {}", path.display()))
}

impl OutputPlan {
    pub fn from_args(o: &OutputArgs) -> Result<Self> {
        if let Some(p) = &o.out {
            check_ext(p, "glb", "--out")?;
        }
        if let Some(p) = &o.ply {
            check_ext(p, "ply", "--ply")?;
        }
        if let Some(p) = &o.asset {
            check_ext(p, "trellis", "--asset")?;
        }
        let bake = o.glb.options()?;
        if let Some(p) = &o.glb.preview {
            ensure!(
                o.out.is_some(),
                "--preview renders the GLB's mesh: give --out FILE.glb"
            );
            check_ext(p, "png", "--preview")?;
        }
        let paths: Vec<&PathBuf> = [&o.out, &o.ply, &o.asset, &o.glb.preview]
            .into_iter()
            .flatten()
            .collect();
        ensure!(
            !paths.is_empty(),
            "nothing to write: give --out FILE.glb, --ply FILE.ply and/or --asset FILE.trellis"
        );
        for (i, a) in paths.iter().enumerate() {
            for b in &paths[i + 1..] {
                ensure!(
                    a != b,
                    "the same output path {} is given twice",
                    a.display()
                );
            }
        }
        let formats = match &o.formats {
            Some(f) => {
                let f = Formats::parse(f)?;
                ensure!(
                    o.out.is_none() || f.mesh,
                    "--out writes the mesh: add mesh to --formats"
                );
                ensure!(
                    o.ply.is_none() || f.gaussian,
                    "--ply writes the Gaussians: add gaussian to --formats"
                );
                ensure!(
                    o.out.is_none() || !bake.bake || f.gaussian,
                    "--out bakes the Gaussians into a texture: add gaussian to --formats \
                     (or pass --no-bake)"
                );
                f
            }
            None => Formats {
                mesh: o.out.is_some(),
                // The texture is baked from the Gaussians.
                gaussian: o.ply.is_some() || (o.out.is_some() && bake.bake),
                radiance_field: false,
            },
        };
        Ok(Self {
            formats,
            glb: o.out.clone(),
            ply: o.ply.clone(),
            asset: o.asset.clone(),
            bake,
            preview: o.glb.preview.clone(),
        })
    }

    pub fn files(&self) -> OutputFiles {
        OutputFiles {
            glb: self.glb.clone(),
            ply: self.ply.clone(),
            asset: self.asset.clone(),
            bake: self.bake.clone(),
            preview: self.preview.clone(),
            device: None,
        }
    }
}

/// Runs `body` with the reporter, turning an error into a JSON event too (in `--json` mode).
pub fn with_reporter(
    runtime: &RuntimeArgs,
    body: impl FnOnce(&mut Reporter) -> Result<serde_json::Value>,
) -> Result<i32> {
    let mut rep = Reporter::new(Mode::from_flags(runtime.quiet, runtime.json));
    match body(&mut rep) {
        Ok(outputs) => {
            rep.finish();
            rep.json(&serde_json::json!({"event": "done", "outputs": outputs}));
            if rep.mode() == Mode::Bars {
                for (k, v) in outputs.as_object().into_iter().flatten() {
                    eprintln!("wrote {k}: {}", v.as_str().unwrap_or_default());
                }
            }
            Ok(0)
        }
        Err(e) => {
            rep.finish();
            rep.json(&serde_json::json!({"event": "error", "message": format!("{e:#}")}));
            Err(e)
        }
    }
}

/// Calls `f` with a [`RunControl`] that forwards progress to the reporter.
pub fn with_control<T>(
    rep: &mut Reporter,
    f: impl FnOnce(&mut RunControl<'_>) -> Result<T>,
) -> Result<T> {
    let mut sink = |e: &ProgressEvent| rep.event(e);
    let mut ctl = RunControl {
        progress: &mut sink,
        cancel: None,
        keep_trajectory: false,
    };
    f(&mut ctl)
}

pub fn run(args: &GenerateArgs) -> Result<i32> {
    with_reporter(&args.runtime, |rep| generate(args, rep))
}

/// What `--device` / `--precision` select for an in-process job: the precision parsed and set,
/// the device opened with the CPU fallback (one warning line).
pub fn open_device(
    device: &str,
    precision: &str,
) -> Result<(candle_core::Device, PrecisionChoice)> {
    let precision: PrecisionChoice = precision.parse()?;
    let device = crate::runtime::select(
        device,
        &precision.to_string(),
        crate::runtime::device::Fallback::CpuWithWarning,
    )?;
    Ok((device, precision))
}

/// Runs a validated job in-process on a fresh model cache (on `device`, at `precision`) and
/// writes its files (and the mattes of `background`'s `--save-mask`).
pub fn run_in_process(
    job: &Job,
    files: &OutputFiles,
    (device, precision): (candle_core::Device, PrecisionChoice),
    memory: MemoryOptions,
    background: Option<&super::background::BackgroundArgs>,
    rep: &mut Reporter,
) -> Result<serde_json::Value> {
    let files = OutputFiles {
        device: Some(device.clone()),
        ..files.clone()
    };
    let mut cache = ModelCache::with_memory(device, precision, 1, memory)?;
    let out = with_control(rep, |ctl| run_job(job, &mut cache, ctl))?;
    let mut written = with_control(rep, |ctl| outputs::write_outputs(&files, &out, ctl))?;
    if let Some(b) = background {
        b.write_masks(&out, &mut written)?;
    }
    if out.meta()["edit"]["slat_regenerated_everywhere"] == serde_json::json!(true) {
        rep.note("the mesh has no structured latent: every voxel's latent was sampled anew (a variant of the edited structure)");
    }
    Ok(written)
}

fn generate(args: &GenerateArgs, rep: &mut Reporter) -> Result<serde_json::Value> {
    // Everything cheap, before any download or network load.
    let plan = OutputPlan::from_args(&args.output)?;
    let prompt = match &args.text {
        Some(t) => {
            ensure!(
                args.background.save_mask.is_none() && args.background.background_model.is_none(),
                "--save-mask and --background-model apply to images, not to a text prompt"
            );
            Prompt::Text(t.clone())
        }
        None => {
            args.background.check(&args.image)?;
            Prompt::Images(args.image.iter().cloned().map(ImageSource::Path).collect())
        }
    };
    let job = Job::Generate(GenerateJob {
        model: args.model.clone(),
        prompt,
        multi_image_mode: args.multi_image_mode,
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
