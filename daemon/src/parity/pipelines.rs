//! Parity of whole pipeline runs (kind `pipelines`, format: shared/reference/README.md "Pipelines
//! (C)"): voxelisation, both sampling stages of every recorded run (single image, multi-image
//! stochastic / multidiffusion, text, text variant), coordinates exact, trajectories within
//! [`tol::TRAJECTORY`], decoded outputs within the decoders' tolerances.
//!
//! Runs are found from the tensor names (`<run>_ss_noise`, `<run>_slat_noise`); what a run is
//! follows from its name: `img*` (one image), `multi_stochastic*`, `multi_multidiffusion*`,
//! `txt*` (text) and `variant_<mesh>*` (text variant of `voxelize_<mesh>_*`). The model
//! repositories are the sub-folders holding a `pipeline.json`, told apart by their class. Each
//! stage starts from the recorded inputs (noise, and for the SLat stage the recorded coords), so
//! one mismatch does not hide the next.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor};

use super::fixture::tol;
use super::{Fixture, Outcome, Report};
use crate::hub::{self, HubOptions, PipelineClass, PipelineRepo};
use crate::models::config::SamplerParams;
use crate::pipelines::base::{
    sample_sparse_structure, sampler_with, Progress, RunControl, TrellisPipeline,
};
use crate::pipelines::loader::{self, Formats};
use crate::pipelines::noise::{NoiseSource, RecordedNoise, TorchNoise};
use crate::pipelines::samplers::{Conditioning, FlowEulerSampler, SamplerSettings};
use crate::pipelines::voxelize::{voxelize, TriMesh};
use crate::runtime::residency::Residency;

pub const KINDS: &[&str] = &["pipelines"];

/// What a recorded run exercises.
#[derive(Debug, Clone, PartialEq)]
enum RunKind {
    Image,
    Stochastic,
    MultiDiffusion,
    Text,
    Variant { mesh: String },
}

fn classify(run: &str, fx: &Fixture) -> Result<RunKind> {
    Ok(if run.starts_with("multi_stochastic") {
        RunKind::Stochastic
    } else if run.starts_with("multi_multidiffusion") {
        RunKind::MultiDiffusion
    } else if run.starts_with("img") {
        RunKind::Image
    } else if run.starts_with("txt") {
        RunKind::Text
    } else if let Some(rest) = run.strip_prefix("variant_") {
        // The longest voxelize_<mesh>_coords whose <mesh> the run name starts with.
        let mesh = fx
            .io_names()
            .iter()
            .filter_map(|n| {
                n.strip_prefix("voxelize_")?
                    .strip_suffix("_coords")
                    .map(String::from)
            })
            .filter(|m| rest.starts_with(m.as_str()))
            .max_by_key(|m| m.len())
            .ok_or_else(|| anyhow!("run {run}: no voxelize_<mesh>_coords for it"))?;
        RunKind::Variant { mesh }
    } else {
        bail!("run {run:?}: unknown kind of run (expected img*, multi_stochastic*, multi_multidiffusion*, txt*, variant_<mesh>*)")
    })
}

fn is_image(k: &RunKind) -> bool {
    matches!(
        k,
        RunKind::Image | RunKind::Stochastic | RunKind::MultiDiffusion
    )
}

/// The pipeline repositories of the fixture, by class.
fn repos(fx: &Fixture) -> Result<BTreeMap<&'static str, PipelineRepo>> {
    let mut opts = HubOptions::from_env();
    opts.offline = true;
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(&fx.dir)? {
        let p = e?.path();
        if p.join("pipeline.json").is_file() {
            let spec = p.to_string_lossy().to_string();
            let repo =
                hub::open_pipeline(&spec, &opts).with_context(|| format!("opening {spec}"))?;
            let key = match repo.config.class {
                PipelineClass::ImageTo3D => "image",
                PipelineClass::TextTo3D => "text",
            };
            out.insert(key, repo);
        }
    }
    Ok(out)
}

/// Conditions of a run (cond, neg) as the fixture's runs were given them.
fn conditions(fx: &Fixture, kind: &RunKind) -> Result<(Tensor, Tensor)> {
    if is_image(kind) {
        let all = fx.io("image_cond_multi")?;
        let cond = if *kind == RunKind::Image {
            all.narrow(0, 0, 1)?
        } else {
            all
        };
        let neg = cond.narrow(0, 0, 1)?.zeros_like()?;
        Ok((cond, neg))
    } else {
        Ok((fx.io("text_cond")?, fx.io("text_neg_cond")?))
    }
}

fn count_steps(fx: &Fixture, prefix: &str) -> usize {
    (0..)
        .take_while(|i| fx.has_io(&format!("{prefix}{i}")))
        .count()
}

fn voxel_set(t: &Tensor) -> Result<BTreeSet<[i32; 3]>> {
    let v: Vec<Vec<i32>> = t
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(DType::I64)?
        .to_dtype(DType::I32)?
        .to_vec2()?;
    Ok(v.into_iter().map(|r| [r[0], r[1], r[2]]).collect())
}

/// Voxelisation of every `voxelize_<mesh>_*` triple at 64³ (the original's fixed voxel size), as
/// sets; returns how many meshes were checked.
fn check_voxelize(fx: &Fixture, report: &mut Report) -> Result<usize> {
    let meshes: Vec<String> = fx
        .io_names()
        .iter()
        .filter_map(|n| {
            n.strip_prefix("voxelize_")?
                .strip_suffix("_coords")
                .map(String::from)
        })
        .collect();
    for m in &meshes {
        // float32 in the reference sets; a float64 recording is taken at full precision
        let v: Vec<Vec<f64>> = fx
            .io(&format!("voxelize_{m}_mesh_vertices"))?
            .to_dtype(DType::F64)?
            .to_vec2()?;
        let f: Vec<Vec<i64>> = fx
            .io(&format!("voxelize_{m}_mesh_faces"))?
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::I64)?
            .to_vec2()?;
        let mesh = TriMesh {
            vertices: v.iter().map(|r| [r[0], r[1], r[2]]).collect(),
            faces: f
                .iter()
                .map(|r| [r[0] as u32, r[1] as u32, r[2] as u32])
                .collect(),
        };
        let want = voxel_set(&fx.io(&format!("voxelize_{m}_coords"))?)?;
        let got: BTreeSet<[i32; 3]> = voxelize(&mesh, 64)?.into_iter().collect();
        let diff = want.symmetric_difference(&got).count();
        report.record(
            &format!("voxelize_{m}_coords (set)"),
            diff as f64 / want.len().max(1) as f64,
            0.0,
        );
    }
    Ok(meshes.len())
}

/// The stage's sampler from pipeline.json; `recorded` steps of x_t must not exceed its steps.
fn settings_of(
    repo: &PipelineRepo,
    stage_ss: bool,
    recorded: usize,
) -> Result<(FlowEulerSampler, SamplerSettings)> {
    let sc = if stage_ss {
        &repo.config.sparse_structure_sampler
    } else {
        &repo.config.slat_sampler
    };
    let (sampler, s) = sampler_with(sc, &SamplerParams::default())?;
    if recorded > s.steps {
        bail!(
            "pipeline.json says {} steps, the fixture recorded {recorded}",
            s.steps
        );
    }
    Ok((sampler, s))
}

fn conditioning<'a>(kind: &RunKind, cond: &'a Tensor, neg: &'a Tensor) -> Conditioning<'a> {
    match kind {
        RunKind::Stochastic => Conditioning::Stochastic { conds: cond, neg },
        RunKind::MultiDiffusion => Conditioning::MultiDiffusion { conds: cond, neg },
        _ => Conditioning::Single { cond, neg },
    }
}

/// The coords the SLat stage of a run starts from: the recorded structure, or for a variant the
/// recorded voxelisation (in its recorded row order, which the recorded noise rows follow) with
/// batch index 0 prepended.
fn slat_input_coords(fx: &Fixture, run: &str, kind: &RunKind) -> Result<Tensor> {
    match kind {
        RunKind::Variant { mesh } => {
            let v = fx
                .io(&format!("voxelize_{mesh}_coords"))?
                .to_device(&candle_core::Device::Cpu)?
                .to_dtype(DType::I64)?;
            let zeros = Tensor::zeros((v.dim(0)?, 1), DType::I64, v.device())?;
            // `v` is on the host already: integer casts stay there.
            Ok(Tensor::cat(&[zeros, v], 1)?.to_dtype(DType::I32)?)
        }
        _ => Ok(fx
            .io(&format!("{run}_coords"))?
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::I32)?),
    }
}

/// The seed meta.json's `runs` gives a run (`seed=N` in its description), if any.
fn run_seed(fx: &Fixture, run: &str) -> Option<u64> {
    let desc = fx.meta.get("runs")?.get(run)?.as_str()?;
    let rest = &desc[desc.find("seed=")? + "seed=".len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// The run's recorded noise against `torch.manual_seed(seed)` + `torch.randn` in the run's draw
/// order (structure noise, then SLat noise), when meta.json names the seed.
fn check_seeded_noise(fx: &Fixture, run: &str, report: &mut Report) -> Result<()> {
    let Some(seed) = run_seed(fx, run) else {
        return Ok(());
    };
    let mut noise = TorchNoise::new(seed);
    for stage in ["ss", "slat"] {
        let name = format!("{run}_{stage}_noise");
        if !fx.has_io(&name) {
            continue;
        }
        let want = fx.io(&name)?;
        let got = noise.randn(want.dims(), &fx.device)?;
        report.close(
            &format!("{name} (torch.manual_seed({seed}) + randn)"),
            &got,
            &want,
            tol::FORWARD,
        )?;
    }
    Ok(())
}

fn check_slat_stage(
    fx: &Fixture,
    run: &str,
    kind: &RunKind,
    pipe: &TrellisPipeline,
    report: &mut Report,
) -> Result<()> {
    let coords = slat_input_coords(fx, run, kind)?;
    let name = format!("{run}_slat_coords");
    if fx.has_io(&name) {
        report.exact(&name, &coords, &fx.io(&name)?)?;
    }
    let recorded = count_steps(fx, &format!("{run}_slat_x_t"));
    let (_, settings) = settings_of(&pipe.repo, false, recorded)?;
    let (cond, neg) = conditions(fx, kind)?;
    let c = conditioning(kind, &cond, &neg);
    let mut noise = RecordedNoise::new(vec![fx.io(&format!("{run}_slat_noise"))?]);
    let mut sink = |_: &crate::pipelines::base::ProgressEvent| {};
    let progress: &mut Progress<'_> = &mut sink;
    let mut ctl = RunControl {
        progress,
        cancel: None,
        keep_trajectory: true,
    };
    let over = SamplerParams {
        steps: Some(settings.steps),
        ..Default::default()
    };
    let out = pipe.sample_slat(&coords, &c, &mut noise, &over, &mut ctl)?;
    for i in 0..recorded {
        let name = format!("{run}_slat_x_t{i}");
        report.close(&name, &out.pred_x_t[i], &fx.io(&name)?, tol::TRAJECTORY)?;
    }
    for (suffix, t) in [("slat_samples", &out.samples), ("slat", &out.slat)] {
        let name = format!("{run}_{suffix}");
        report.close(&name, t, &fx.io(&name)?, tol::TRAJECTORY)?;
    }
    Ok(())
}

fn check_ss_stage(
    fx: &Fixture,
    run: &str,
    kind: &RunKind,
    repo: &PipelineRepo,
    report: &mut Report,
) -> Result<()> {
    let dev = fx.device.clone();
    let res = Residency::keep_all(&dev);
    let flow = loader::load_ss_flow(repo, &dev)?.place_on(&res)?;
    let decoder = loader::load_ss_decoder(repo, &dev)?.place_on(&res)?;
    let steps = count_steps(fx, &format!("{run}_ss_x_t"));
    let (sampler, settings) = settings_of(repo, true, steps)?;
    let (cond, neg) = conditions(fx, kind)?;
    let conditioning = conditioning(kind, &cond, &neg);
    let expected_noise = fx.io(&format!("{run}_ss_noise"))?;
    let mut noise = RecordedNoise::new(vec![expected_noise.clone()]);
    let shape = expected_noise.dims().to_vec();
    let noise = noise.randn(&shape, &dev)?;
    let mut fl = |x: &Tensor, t: &Tensor, c: &Tensor| -> Result<Tensor> { flow.forward(x, t, c) };
    let mut dec = |z: &Tensor| -> Result<Tensor> { decoder.forward(z) };
    let mut sink = |_: &crate::pipelines::base::ProgressEvent| {};
    let progress: &mut Progress<'_> = &mut sink;
    let mut ctl = RunControl {
        progress,
        cancel: None,
        keep_trajectory: true,
    };
    let out = sample_sparse_structure(
        &sampler,
        &settings,
        &mut fl,
        &mut dec,
        noise,
        &conditioning,
        &mut ctl,
    )?;
    for (i, x) in out.pred_x_t.iter().enumerate() {
        let name = format!("{run}_ss_x_t{i}");
        report.close(&name, x, &fx.io(&name)?, tol::TRAJECTORY)?;
    }
    for (i, x) in out.pred_x0.iter().enumerate() {
        let name = format!("{run}_ss_pred_x0_{i}");
        if fx.has_io(&name) {
            report.close(&name, x, &fx.io(&name)?, tol::TRAJECTORY)?;
        }
    }
    let name = format!("{run}_ss_samples");
    report.close(&name, &out.samples, &fx.io(&name)?, tol::TRAJECTORY)?;
    let name = format!("{run}_coords");
    let want = fx.io(&name)?;
    if out.coords.dims() != want.dims() {
        // Occupancy from thresholding: report how close the decisive logit was.
        let logits = decoder.forward(&fx.io(&format!("{run}_ss_samples"))?)?;
        let m = logits.abs()?.flatten_all()?.min(0)?.to_scalar::<f32>()?;
        eprintln!(
            "  {name}: {} voxels, expected {} (min |logit| on the recorded z_s: {m:.2e})",
            out.coords.dim(0)?,
            want.dim(0)?
        );
    }
    report.exact(&name, &out.coords, &want)?;
    Ok(())
}

/// `<prefix><field>` for every field, when the fixture recorded the first one.
fn close_fields(
    fx: &Fixture,
    report: &mut Report,
    prefix: &str,
    fields: &[(&str, &[f32])],
    t: f64,
) -> Result<()> {
    let Some((first, _)) = fields.first() else {
        return Ok(());
    };
    if !fx.has_io(&format!("{prefix}{first}")) {
        return Ok(());
    }
    for (field, v) in fields {
        close_vec(fx, report, &format!("{prefix}{field}"), v, t)?;
    }
    Ok(())
}

/// `name` from a flat vector in the recorded tensor's shape, relative L2.
fn close_vec(fx: &Fixture, report: &mut Report, name: &str, v: &[f32], t: f64) -> Result<()> {
    let want = fx.io(name)?;
    if want.elem_count() != v.len() {
        eprintln!("  {name}: {} values, expected {:?}", v.len(), want.dims());
        report.record(name, f64::INFINITY, t);
        return Ok(());
    }
    let got = Tensor::from_slice(v, want.shape(), want.device())?;
    report.close(name, &got, &want, t)
}

/// Order-independent mesh comparison: one-to-one vertex match within [`tol::MESH_ABS`], the same
/// oriented triangles, vertex attributes of matched vertices within [`tol::FORWARD`].
fn compare_mesh(
    fx: &Fixture,
    report: &mut Report,
    p: &str,
    mesh: &crate::representations::mesh::MeshExtractResult,
) -> Result<()> {
    let ev: Vec<[f32; 3]> = fx
        .io(&format!("{p}vertices"))?
        .to_vec2::<f32>()?
        .into_iter()
        .map(|r| [r[0], r[1], r[2]])
        .collect();
    let ef: Vec<[u32; 3]> = fx
        .io(&format!("{p}faces"))?
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(DType::I64)?
        .to_vec2::<i64>()?
        .into_iter()
        .map(|r| [r[0] as u32, r[1] as u32, r[2] as u32])
        .collect();
    let (map, dist) = super::decoders::match_points(&mesh.vertices, &ev, tol::MESH_ABS as f32);
    let mut used = vec![false; ev.len()];
    let mut one_to_one = map.iter().all(Option::is_some) && mesh.vertices.len() == ev.len();
    for &j in map.iter().flatten() {
        one_to_one &= !std::mem::replace(&mut used[j], true);
    }
    if !one_to_one {
        for t in [1e-3f32, 1e-2] {
            let (m2, _) = super::decoders::match_points(&mesh.vertices, &ev, t);
            let n = m2.iter().filter(|m| m.is_none()).count();
            eprintln!("  {p}vertices: {n} of ours unmatched within {t:e}");
        }
        eprintln!(
            "  {p}vertices: {} ours / {} recorded, {} of ours unmatched, {} recorded unmatched",
            mesh.vertices.len(),
            ev.len(),
            map.iter().filter(|m| m.is_none()).count(),
            used.iter().filter(|u| !**u).count()
        );
    }
    report.record(
        &format!("{p}vertices (max distance, order-independent)"),
        if one_to_one {
            dist as f64
        } else {
            f64::INFINITY
        },
        tol::MESH_ABS,
    );
    let canon = |f: [u32; 3]| {
        let k = (0..3).min_by_key(|&k| f[k]).unwrap_or(0);
        [f[k], f[(k + 1) % 3], f[(k + 2) % 3]]
    };
    let want: BTreeSet<[u32; 3]> = ef.iter().map(|&f| canon(f)).collect();
    let got: BTreeSet<[u32; 3]> = mesh
        .faces
        .iter()
        .filter_map(|f| {
            let m = f.map(|i| map.get(i as usize).copied().flatten().map(|j| j as u32));
            match m {
                [Some(a), Some(b), Some(c)] => Some(canon([a, b, c])),
                _ => None,
            }
        })
        .collect();
    let matched = want.intersection(&got).count();
    let err = if matched == want.len() && mesh.faces.len() == ef.len() {
        0.0
    } else {
        1.0 - matched as f64 / ef.len().max(mesh.faces.len()).max(1) as f64
    };
    report.record(&format!("{p}faces (fraction unmatched)"), err, 0.0);
    let attr = format!("{p}vertex_attrs");
    if fx.has_io(&attr) {
        let d = mesh.attr_dim;
        if !one_to_one || d == 0 {
            report.record(&attr, f64::INFINITY, tol::FORWARD);
        } else {
            let mut a = vec![f32::NAN; ev.len() * d];
            for (i, m) in map.iter().enumerate() {
                if let Some(j) = m {
                    a[j * d..(j + 1) * d].copy_from_slice(&mesh.vertex_attrs[i * d..(i + 1) * d]);
                }
            }
            close_vec(fx, report, &attr, &a, tol::FORWARD)?;
        }
    }
    Ok(())
}

/// Decoded outputs of a run (`<run>_gs{i}_*`, `<run>_rf{i}_*`, `<run>_mesh{i}_*`), decoded from
/// the recorded `<run>_slat` on `<run>_slat_coords`: one forward pass each, so [`tol::FORWARD`].
fn check_decoded(fx: &Fixture, run: &str, repo: &PipelineRepo, report: &mut Report) -> Result<()> {
    let formats = Formats {
        mesh: fx.has_io(&format!("{run}_mesh0_vertices")),
        gaussian: fx.has_io(&format!("{run}_gs0_xyz")),
        radiance_field: fx.has_io(&format!("{run}_rf0_trivec")),
    };
    if !formats.any() {
        return Ok(());
    }
    let decoders = loader::load_decoders(repo, formats, &fx.device)?;
    let coords = fx.io(&format!("{run}_slat_coords"))?;
    let slat = fx.io(&format!("{run}_slat"))?;
    let mut sink = |_: &crate::pipelines::base::ProgressEvent| {};
    let progress: &mut Progress<'_> = &mut sink;
    let mut ctl = RunControl {
        progress,
        cancel: None,
        keep_trajectory: false,
    };
    let res = Residency::keep_all(&fx.device);
    let d =
        crate::pipelines::base::decode_slat(&res, &decoders, &coords, &slat, formats, &mut ctl)?;
    let t = tol::FORWARD;
    for (i, g) in d.gaussians.iter().enumerate() {
        let fields = [
            ("xyz", g.xyz.as_slice()),
            ("features_dc", &g.features_dc),
            ("scaling", &g.scaling),
            ("rotation", &g.rotation),
            ("opacity", &g.opacity),
        ];
        close_fields(fx, report, &format!("{run}_gs{i}_"), &fields, t)?;
    }
    for (i, f) in d.radiance_fields.iter().enumerate() {
        let fields = [
            ("trivec", f.trivec.as_slice()),
            ("position", &f.position),
            ("density", &f.density),
            ("features_dc", &f.features_dc),
        ];
        close_fields(fx, report, &format!("{run}_rf{i}_"), &fields, t)?;
    }
    for (i, m) in d.meshes.iter().enumerate() {
        let p = format!("{run}_mesh{i}_");
        if fx.has_io(&format!("{p}vertices")) {
            compare_mesh(fx, report, &p, m)?;
        }
    }
    Ok(())
}

pub fn check(fx: &mut Fixture) -> Result<Outcome> {
    fx.load_io()?;
    let mut report = Report::default();
    let voxelized = check_voxelize(fx, &mut report)?;
    let runs: BTreeSet<String> = fx
        .io_names()
        .iter()
        .filter_map(|n| {
            n.strip_suffix("_slat_noise")
                .or_else(|| n.strip_suffix("_ss_noise"))
                .map(String::from)
        })
        .collect();
    if runs.is_empty() {
        // A fixture of section F alone (voxelisation, no model repository) is complete when every
        // tensor it records belongs to a voxelize_<mesh>_* triple.
        if voxelized > 0 {
            let triples = ["_mesh_vertices", "_mesh_faces", "_coords"];
            if let Some(n) = fx.io_names().into_iter().find(|n| {
                !n.strip_prefix("voxelize_")
                    .is_some_and(|r| triples.iter().any(|t| r.ends_with(t)))
            }) {
                bail!(
                    "{}: {n:?} is neither a run nor a voxelize_<mesh>_* tensor",
                    fx.dir.display()
                );
            }
            return Ok(Outcome::Checked(report));
        }
        bail!(
            "{}: no recorded run (no <run>_ss_noise / <run>_slat_noise) and no voxelize_<mesh>_coords",
            fx.dir.display()
        );
    }
    let repos = repos(fx)?;
    let mut pipes: BTreeMap<String, TrellisPipeline> = BTreeMap::new();
    for run in &runs {
        check_seeded_noise(fx, run, &mut report)?;
        let kind = classify(run, fx)?;
        let repo = repos
            .get(if is_image(&kind) { "image" } else { "text" })
            .ok_or_else(|| anyhow!("run {run}: the fixture has no matching pipeline repository"))?;
        if fx.has_io(&format!("{run}_ss_noise")) {
            check_ss_stage(fx, run, &kind, repo, &mut report)
                .with_context(|| format!("run {run}"))?;
        }
        if fx.has_io(&format!("{run}_slat_noise")) {
            let key = repo.root.display().to_string();
            if !pipes.contains_key(&key) {
                let res = std::sync::Arc::new(Residency::keep_all(&fx.device));
                let p = TrellisPipeline::load(repo.clone(), res, false, Formats::default())?;
                pipes.insert(key.clone(), p);
            }
            check_slat_stage(fx, run, &kind, &pipes[&key], &mut report)
                .with_context(|| format!("run {run}"))?;
        }
        if fx.has_io(&format!("{run}_slat")) {
            check_decoded(fx, run, repo, &mut report).with_context(|| format!("run {run}"))?;
        }
    }
    Ok(Outcome::Checked(report))
}
