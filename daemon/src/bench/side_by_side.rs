//! One forward of a full-size network from weight and input files, timed and measured the same
//! way as `tools/bench/side_by_side.py` times the ORIGINAL TRELLIS on the same files:
//! `trellisd bench NAME --weights W --inputs I` (NAME one of [`NETS`]). Without files,
//! `trellisd bench ss-flow` runs the SS flow on random manifest weights and seeded inputs.
//!
//! Memory: the weights are loaded, the network built and the inputs read first; then the peak
//! resident set size (VmHWM) is reset (`/proc/self/clear_refs`, value 5) so that the reported
//! forward peak is the network's working set, not the load (which both sides do differently).
//! The process-wide peak is reported too.
//!
//! The last line is `side-by-side: {json}` with `net`, `build_s`, `forward_s`, `stages` (name,
//! seconds), `rss_before_mib`, `peak_forward_mib`, `peak_total_mib`, `threads` and a checksum.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::{current_rss_kib, manifest_path, peak_rss_kib};
use crate::models::conditioners::dinov2::ImageConditioner;
use crate::models::config::ModelConfig;
use crate::models::slat_flow::SLatFlowModel;
use crate::models::slat_vae::decoder_mesh::SLatMeshDecoder;
use crate::models::ss_flow::SparseStructureFlowModel;
use crate::modules::sparse::tensor::SparseTensor;
use crate::runtime::weights::{self, Manifest, ManifestFill, WeightCheck};

/// The networks this module runs, and the manifest (or, for DINOv2, the folder layout) of each.
pub const NETS: &[(&str, &str)] = &[
    ("ss-flow", "ss_flow_img_dit_L_16l8_fp16"),
    ("slat-flow", "slat_flow_img_dit_L_64l8p2_fp16"),
    ("mesh-decoder", "slat_dec_mesh_swin8_B_64l8m256c_fp16"),
    (
        "dinov2-large",
        "a Hugging Face Dinov2WithRegistersModel folder (config.json, model.safetensors)",
    ),
];

/// Weight and input files of one side-by-side run.
pub struct Files<'a> {
    /// `.safetensors` in TRELLIS key names, or for `dinov2-large` a Hugging Face model folder.
    pub weights: &'a Path,
    /// `.safetensors` with the inputs: `x`, `t`, `cond` (SS flow); `coords` (int64 `[N, 4]`),
    /// `feats`, `t`, `cond` (SLat flow); `coords`, `feats` (mesh decoder); `image` (DINOv2).
    pub inputs: &'a Path,
}

/// `trellisd bench ss-flow` without files: random manifest weights, seeded inputs.
pub fn run_ss_flow(dev: &Device, out: &mut dyn Write) -> Result<()> {
    run("ss-flow", None, dev, out)
}

/// Runs network `name` once, from `files` or (SS flow only) from random weights.
pub fn run(name: &str, files: Option<Files>, dev: &Device, out: &mut dyn Write) -> Result<()> {
    let Some(&(_, stem)) = NETS.iter().find(|(n, _)| *n == name) else {
        bail!(
            "bench: --weights/--inputs work with {} only, not {name:?}",
            NETS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
        );
    };
    let dev = dev.clone();
    let t0 = Instant::now();
    let inputs = match &files {
        Some(f) => candle_core::safetensors::load(f.inputs, &dev)
            .with_context(|| format!("reading inputs {}", f.inputs.display()))?,
        None => random_inputs(name, &dev)?,
    };
    let input = |k: &str| -> Result<&Tensor> {
        inputs
            .get(k)
            .with_context(|| format!("inputs: no tensor {k:?} for {name}"))
    };
    let mut stages: Vec<(String, f64)> = Vec::new();
    let (build_s, forward_s, rss_before, checksum);
    match name {
        "ss-flow" => {
            let (vb, check, manifest) = weights_for(stem, files.as_ref(), &dev)?;
            let ModelConfig::SparseStructureFlow(cfg) =
                ModelConfig::from_json(stem, &manifest.config)?
            else {
                bail!("{stem}: not a SparseStructureFlowModel manifest");
            };
            let model = SparseStructureFlowModel::new(&cfg, vb, DType::F32)?;
            check.finish()?;
            let (x, t, cond) = (input("x")?, input("t")?, input("cond")?);
            build_s = t0.elapsed().as_secs_f64();
            rss_before = reset_peak();
            let t1 = Instant::now();
            let y = model.forward(x, t, cond)?;
            forward_s = t1.elapsed().as_secs_f64();
            checksum = rms(&y)?;
        }
        "slat-flow" => {
            let (vb, check, manifest) = weights_for(stem, files.as_ref(), &dev)?;
            let ModelConfig::SLatFlow { config: cfg, .. } =
                ModelConfig::from_json(stem, &manifest.config)?
            else {
                bail!("{stem}: not an SLatFlowModel manifest");
            };
            let model = SLatFlowModel::new(&cfg, vb, DType::F32)?;
            check.finish()?;
            let x = SparseTensor::new(coords_of(input("coords")?)?, input("feats")?.clone())?;
            let (t, cond) = (input("t")?, input("cond")?);
            build_s = t0.elapsed().as_secs_f64();
            rss_before = reset_peak();
            let t1 = Instant::now();
            let y = model.forward(&x, t, cond)?;
            forward_s = t1.elapsed().as_secs_f64();
            checksum = rms(y.feats())?;
        }
        "mesh-decoder" => {
            let (vb, check, manifest) = weights_for(stem, files.as_ref(), &dev)?;
            let ModelConfig::SLatMeshDecoder { config: cfg, .. } =
                ModelConfig::from_json(stem, &manifest.config)?
            else {
                bail!("{stem}: not a SLatMeshDecoder manifest");
            };
            let net = SLatMeshDecoder::new(&cfg, vb, DType::F32)?;
            check.finish()?;
            let x = SparseTensor::new(coords_of(input("coords")?)?, input("feats")?.clone())?;
            build_s = t0.elapsed().as_secs_f64();
            rss_before = reset_peak();
            let t1 = Instant::now();
            let mut lap = Instant::now();
            let mut stage = |n: &str, lap: &mut Instant| {
                stages.push((n.to_string(), lap.elapsed().as_secs_f64()));
                *lap = Instant::now();
            };
            let mut h = net.torso().forward(&x)?;
            stage("torso", &mut lap);
            for block in net.upsample() {
                h = block.forward(&h)?;
            }
            stage("upsample", &mut lap);
            let raw = net.out_layer().forward(&h)?;
            drop(h);
            stage("out_layer", &mut lap);
            let meshes = net.to_representation(raw)?;
            stage("flexicubes", &mut lap);
            forward_s = t1.elapsed().as_secs_f64();
            let (mesh, _) = meshes.first().context("no mesh came back")?;
            checksum = (mesh.vertices.len() + mesh.faces.len()) as f64;
        }
        "dinov2-large" => {
            let Some(f) = &files else {
                bail!("dinov2-large: without --weights use `trellisd bench dinov2-large`");
            };
            let model = ImageConditioner::load(f.weights, &dev, DType::F32)?;
            let image = input("image")?;
            build_s = t0.elapsed().as_secs_f64();
            rss_before = reset_peak();
            let t1 = Instant::now();
            let y = model.encode(image)?;
            forward_s = t1.elapsed().as_secs_f64();
            checksum = rms(&y)?;
        }
        _ => unreachable!("NETS and this match list the same names"),
    }
    let peak_forward = peak_rss_kib();
    let report = serde_json::json!({
        "net": name,
        "threads": rayon::current_num_threads(),
        "build_s": build_s,
        "forward_s": forward_s,
        "stages": stages,
        "rss_before_mib": rss_before.map(|k| k as f64 / 1024.0),
        "peak_forward_mib": peak_forward.map(|k| k as f64 / 1024.0),
        "peak_total_mib": peak_total_kib(peak_forward).map(|k| k as f64 / 1024.0),
        "checksum": checksum,
    });
    writeln!(
        out,
        "{name}: build {build_s:.2}s, forward {forward_s:.2}s, peak during forward {:.1} MiB",
        peak_forward.unwrap_or(0) as f64 / 1024.0
    )?;
    writeln!(out, "side-by-side: {report}")?;
    Ok(())
}

/// The highest VmHWM seen before the reset (kept by [`reset_peak`]) or after it.
static PEAK_BEFORE_RESET: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Resets the process's peak RSS to its current RSS (Linux `clear_refs` 5), remembering the old
/// peak; returns the current RSS in KiB. Where the reset is refused, the peak keeps counting the
/// load and the forward peak is an upper bound.
fn reset_peak() -> Option<u64> {
    if let Some(p) = peak_rss_kib() {
        PEAK_BEFORE_RESET.fetch_max(p, std::sync::atomic::Ordering::Relaxed);
    }
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    current_rss_kib()
}

fn peak_total_kib(after: Option<u64>) -> Option<u64> {
    let before = PEAK_BEFORE_RESET.load(std::sync::atomic::Ordering::Relaxed);
    after.map(|a| a.max(before))
}

/// The manifest of `stem` and a checked `VarBuilder` over the weights file or random weights.
fn weights_for(
    stem: &str,
    files: Option<&Files>,
    dev: &Device,
) -> Result<(candle_nn::VarBuilder<'static>, WeightCheck, Manifest)> {
    let manifest = Manifest::load(&manifest_path(stem)?)?;
    let (vb, check) = match files {
        Some(f) => weights::from_safetensors(f.weights, DType::F32, dev)?,
        None => manifest.var_builder(ManifestFill::Random { seed: 0 }, DType::F32, dev),
    };
    Ok((vb, check, manifest))
}

/// Seeded inputs of the random-weight run (SS flow only).
fn random_inputs(name: &str, dev: &Device) -> Result<HashMap<String, Tensor>> {
    if name != "ss-flow" {
        bail!("{name}: give --weights and --inputs (see tools/bench/side_by_side.py)");
    }
    let mut m = HashMap::new();
    m.insert("x".to_string(), super::randn(&[1, 8, 16, 16, 16], 1, dev)?);
    m.insert("t".to_string(), Tensor::new(&[500f32], dev)?);
    m.insert("cond".to_string(), super::randn(&[1, 1374, 1024], 2, dev)?);
    Ok(m)
}

/// `[N, 4]` integer coords (any integer dtype) as the flat `i32` list `SparseTensor` takes.
fn coords_of(t: &Tensor) -> Result<Vec<i32>> {
    let (_, four) = t.dims2().context("coords must be [N, 4]")?;
    if four != 4 {
        bail!("coords must be [N, 4], got {:?}", t.dims());
    }
    let v = t.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
    v.into_iter()
        .map(|c| i32::try_from(c).context("coordinate out of the i32 range"))
        .collect()
}

fn rms(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F32)?
        .sqr()?
        .mean_all()?
        .sqrt()?
        .to_scalar::<f32>()? as f64)
}
