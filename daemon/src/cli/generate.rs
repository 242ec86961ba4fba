//! `trellisd generate`: image(s) or text → 3D (GLB mesh, Gaussian PLY, `.trellis` asset).
//!
//! Everything that can be checked cheaply is checked before any network is loaded: input files
//! exist and decode, step counts are at least 1, output folders exist and extensions match, the
//! model's class fits the input (a text model given an image is an error). Outputs are written
//! atomically, so a failure never leaves a partial file at an output path.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::progress::{Mode, Reporter};
use crate::export::asset::Asset;
use crate::export::atomic::check_output_path;
use crate::export::glb::{write_glb, GlbMesh};
use crate::hub::{self, HubOptions, PipelineClass, PipelineRepo};
use crate::models::config::{SamplerConfig, SamplerParams};
use crate::pipelines::base::{Generation, ProgressEvent, RunControl, RunParams, Stage};
use crate::pipelines::image_to_3d::MultiImageMode;
use crate::pipelines::loader::Formats;
use crate::pipelines::samplers::SamplerSettings;

pub const DEFAULT_IMAGE_MODEL: &str = "microsoft/TRELLIS-image-large";
pub const DEFAULT_TEXT_MODEL: &str = "microsoft/TRELLIS-text-large";

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
}

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Pipeline: hub id or local folder (default microsoft/TRELLIS-image-large for images,
    /// microsoft/TRELLIS-text-large for text).
    #[arg(long)]
    pub model: Option<String>,
    /// Input image(s) (RGBA with the object on a transparent background); several = multi-view.
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
}

/// Validated outputs.
#[derive(Debug, Clone)]
pub struct OutputPlan {
    pub formats: Formats,
    pub glb: Option<PathBuf>,
    pub ply: Option<PathBuf>,
    pub asset: Option<PathBuf>,
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
        let paths: Vec<&PathBuf> = [&o.out, &o.ply, &o.asset].into_iter().flatten().collect();
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
                f
            }
            None => Formats {
                mesh: o.out.is_some(),
                gaussian: o.ply.is_some(),
                radiance_field: false,
            },
        };
        Ok(Self {
            formats,
            glb: o.out.clone(),
            ply: o.ply.clone(),
            asset: o.asset.clone(),
        })
    }
}

/// Checks an input image exists and can be preprocessed (alpha channel with an object).
pub fn check_image(p: &Path) -> Result<()> {
    ensure!(p.is_file(), "image {} does not exist", p.display());
    let img = crate::models::conditioners::preprocess::load_image(p)?;
    crate::models::conditioners::preprocess::preprocess_rgba(&img, 518)
        .with_context(|| format!("image {}", p.display()))?;
    Ok(())
}

/// Opens the pipeline repository for a text or an image prompt (`--model`, else the default of
/// that kind), reporting the loading step, and checks its class fits the prompt. Returns the
/// model spec used and the repository.
pub fn open_model<'a>(
    model: Option<&'a str>,
    is_text: bool,
    rep: &mut Reporter,
) -> Result<(&'a str, PipelineRepo)> {
    let (spec, want, input) = if is_text {
        (
            model.unwrap_or(DEFAULT_TEXT_MODEL),
            PipelineClass::TextTo3D,
            "a text prompt",
        )
    } else {
        (
            model.unwrap_or(DEFAULT_IMAGE_MODEL),
            PipelineClass::ImageTo3D,
            "images",
        )
    };
    rep.emit(Stage::Loading, 0, 2, Some(spec.to_string()));
    let repo = hub::open_pipeline(spec, &HubOptions::from_env())?;
    if repo.config.class != want {
        bail!(
            "model {spec} is a {} pipeline; it cannot take {input} (use a {} model)",
            repo.config.class.name(),
            want.name()
        );
    }
    Ok((spec, repo))
}

/// The conditioner folder a text (CLIP) or image (DINOv2) prompt needs: the
/// `--text-cond-model` / `--image-cond-model` flag, else the name in pipeline.json.
pub fn prompt_conditioner_dir(
    runtime: &RuntimeArgs,
    repo: &PipelineRepo,
    is_text: bool,
) -> Result<PathBuf> {
    if is_text {
        conditioner_dir(
            runtime.text_cond_model.as_deref(),
            repo,
            repo.config.text_cond_model.as_deref(),
            "text",
        )
    } else {
        conditioner_dir(
            runtime.image_cond_model.as_deref(),
            repo,
            repo.config.image_cond_model.as_deref(),
            "image",
        )
    }
}

/// The conditioner folder: the flag, else the name in pipeline.json (a hub name, or a folder
/// relative to the repository folder).
pub fn conditioner_dir(
    flag: Option<&str>,
    repo: &PipelineRepo,
    from_pipeline: Option<&str>,
    what: &str,
) -> Result<PathBuf> {
    let opts = HubOptions::from_env();
    if let Some(f) = flag {
        return hub::resolve_conditioner(f, &opts);
    }
    let name = from_pipeline.ok_or_else(|| {
        anyhow!("the pipeline names no {what} conditioner; give --{what}-cond-model")
    })?;
    let local = repo.root.join(name);
    if local.is_dir() {
        return hub::resolve_conditioner(&local.to_string_lossy(), &opts);
    }
    hub::resolve_conditioner(name, &opts)
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

/// Writes the requested outputs of a generation (sample 0).
pub fn write_outputs(
    plan: &OutputPlan,
    g: &Generation,
    cond: Option<&Tensor>,
    meta: serde_json::Value,
    rep: &mut Reporter,
) -> Result<serde_json::Value> {
    let total = [&plan.glb, &plan.ply, &plan.asset]
        .iter()
        .filter(|p| p.is_some())
        .count();
    let mut done = 0;
    let mut written = serde_json::Map::new();
    rep.emit(Stage::Writing, 0, total, None);
    if let Some(p) = &plan.asset {
        let a = Asset {
            coords: g.coords.clone(),
            slat: g.slat.slat.clone(),
            ss_latent: g.structure.as_ref().map(|s| s.samples.clone()),
            ss_noise: g.structure.as_ref().map(|s| s.noise.clone()),
            slat_noise: Some(g.slat.noise.clone()),
            cond_summary: match cond {
                Some(c) => Some(c.to_dtype(DType::F32)?.mean(1)?),
                None => None,
            },
            meta: meta.clone(),
        };
        a.save(p)?;
        done += 1;
        written.insert("asset".into(), serde_json::json!(p));
        rep.emit(Stage::Writing, done, total, Some(p.display().to_string()));
    }
    write_decoded(plan, &g.decoded, &mut written, &mut done, total, rep)?;
    Ok(serde_json::Value::Object(written))
}

/// Writes the GLB / PLY of decoded representations.
pub fn write_decoded(
    plan: &OutputPlan,
    d: &crate::pipelines::base::Decoded,
    written: &mut serde_json::Map<String, serde_json::Value>,
    done: &mut usize,
    total: usize,
    rep: &mut Reporter,
) -> Result<()> {
    if let Some(p) = &plan.glb {
        let m = d
            .meshes
            .first()
            .ok_or_else(|| anyhow!("no mesh was decoded"))?;
        ensure!(
            m.success && !m.faces.is_empty(),
            "the decoded mesh is empty (no surface found); nothing written to {}",
            p.display()
        );
        let colors: Option<Vec<[f32; 3]>> = (m.attr_dim >= 3).then(|| {
            m.vertex_attrs
                .chunks_exact(m.attr_dim)
                .map(|a| [a[0], a[1], a[2]])
                .collect()
        });
        write_glb(
            p,
            &GlbMesh {
                vertices: &m.vertices,
                faces: &m.faces,
                colors: colors.as_deref(),
            },
        )?;
        *done += 1;
        written.insert("glb".into(), serde_json::json!(p));
        rep.emit(Stage::Writing, *done, total, Some(p.display().to_string()));
    }
    if let Some(p) = &plan.ply {
        let gs = d
            .gaussians
            .first()
            .ok_or_else(|| anyhow!("no Gaussians were decoded"))?;
        crate::export::ply::save_gaussian_ply(gs, p)?;
        *done += 1;
        written.insert("ply".into(), serde_json::json!(p));
        rep.emit(Stage::Writing, *done, total, Some(p.display().to_string()));
    }
    Ok(())
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

fn generate(args: &GenerateArgs, rep: &mut Reporter) -> Result<serde_json::Value> {
    // 1. Everything cheap, before any download or network load.
    let plan = OutputPlan::from_args(&args.output)?;
    let is_text = args.text.is_some();
    if let Some(t) = &args.text {
        ensure!(!t.trim().is_empty(), "--text: the prompt is empty");
        ensure!(
            args.runtime.image_cond_model.is_none(),
            "--image-cond-model does not apply to a text prompt"
        );
    } else {
        ensure!(
            !args.image.is_empty(),
            "give --image PATH... or --text PROMPT"
        );
        ensure!(
            args.runtime.text_cond_model.is_none(),
            "--text-cond-model does not apply to images"
        );
        for p in &args.image {
            check_image(p)?;
        }
    }
    let device: Device = crate::runtime::select(
        &args.runtime.device,
        &args.runtime.precision,
        crate::runtime::device::Fallback::CpuWithWarning,
    )?;
    let (spec, repo) = open_model(args.model.as_deref(), is_text, rep)?;
    // Sampler parameters resolve now (step counts of 0 from pipeline.json, ...).
    let ss_meta = sampler_meta(
        &repo.config.sparse_structure_sampler,
        &args.sampling.ss_params(),
    )?;
    let slat_meta = sampler_meta(&repo.config.slat_sampler, &args.sampling.slat_params())?;
    let cond_dir = prompt_conditioner_dir(&args.runtime, &repo, is_text)?;
    let params = RunParams {
        ss: args.sampling.ss_params(),
        slat: args.sampling.slat_params(),
        formats: plan.formats,
    };
    let mut meta = serde_json::json!({
        "generator": format!("trellis-rs {}", env!("CARGO_PKG_VERSION")),
        "task": if is_text { "text_to_3d" } else { "image_to_3d" },
        "model": spec,
        "pipeline": repo.config.class.name(),
        "conditioner": cond_dir,
        "seed": args.sampling.seed,
        "sparse_structure_sampler": ss_meta,
        "slat_sampler": slat_meta,
        "formats": plan.formats.names(),
        "device": crate::runtime::device::device_name(&device),
    });
    // 2. Networks.
    let pipeline =
        crate::pipelines::base::TrellisPipeline::load(repo, &device, true, plan.formats)?;
    let mut noise = crate::pipelines::noise::TorchNoise::new(args.sampling.seed);
    let (cond, g) = if let Some(text) = &args.text {
        meta["text"] = serde_json::json!(text);
        let conditioner = crate::models::conditioners::clip::TextConditioner::load(
            &cond_dir,
            &device,
            DType::F32,
        )?;
        rep.emit(Stage::Loading, 2, 2, None);
        let t = crate::pipelines::text_to_3d::TextTo3D {
            pipeline,
            conditioner,
        };
        with_control(rep, |ctl| t.run(text, &mut noise, &params, ctl))?
    } else {
        meta["images"] = serde_json::json!(args.image);
        if args.image.len() > 1 {
            meta["multi_image_mode"] = serde_json::json!(args.multi_image_mode);
        }
        let conditioner = crate::models::conditioners::dinov2::ImageConditioner::load(
            &cond_dir,
            &device,
            DType::F32,
        )?;
        rep.emit(Stage::Loading, 2, 2, None);
        let t = crate::pipelines::image_to_3d::ImageTo3D {
            pipeline,
            conditioner,
        };
        let paths: Vec<&Path> = args.image.iter().map(PathBuf::as_path).collect();
        with_control(rep, |ctl| {
            t.run(&paths, args.multi_image_mode, &mut noise, &params, ctl)
        })?
    };
    write_outputs(&plan, &g, Some(&cond), meta, rep)
}
