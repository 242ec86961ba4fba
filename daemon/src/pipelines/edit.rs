//! Local region edits: regenerate a box (or a voxel mask) of an asset or of a mesh under a new
//! condition and keep everything outside it exactly. TRELLIS shows local editing in its paper but
//! never released code for it; this is RePaint-style masked regeneration (Lugmayr et al. 2022)
//! carried over to TRELLIS' two rectified flows, tuning-free. `docs/EDIT.md` describes it.
//!
//! Both stages run the same loop ([`sample_inpaint`]): the flow's Euler step for the whole sample,
//! then the known part replaced by the known clean value pushed through the forward process of the
//! flow to the new time (`x_t = (1 - t) x0 + (σ_min + (1 - σ_min) t) ε`, the `diffuse` of
//! TRELLIS' flow-matching trainer and the convention of its Euler sampler), with a fresh ε per
//! step; at `t = 0` the known part is the clean value itself, so it comes out bit-identical.
//! Optional RePaint resampling jumps back `jump_length` steps (re-noising the whole sample with the
//! flow's forward transition between two times) and denoises again, `jumps` times per jump point.
//!
//! * Stage 1 (sparse structure): the latent cells whose voxel block touches the region are
//!   sampled, the others are the known structure latent (the asset's `ss_latent`, or the
//!   `SparseStructureEncoder` applied to the occupancy). The new occupancy is the decoded one inside
//!   the region and the original one outside, exactly.
//! * Stage 2 (structured latent): on the new voxels, the latents of voxels outside the region are
//!   known (the asset's `slat`), the others sampled. A mesh has no latent: then every voxel is
//!   sampled (a variant of the edited structure), and [`EditReport::slat_regenerated_everywhere`]
//!   says so.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::base::{
    denormalize, Generation, RunControl, SlatSample, SparseStructureSample, Stage, TrellisPipeline,
};
use super::loader::Formats;
use super::noise::NoiseSource;
use super::samplers::{
    as_f32, ConditionMemo, Conditioning, FlowEulerSampler, SamplerSettings, Velocity,
};
use super::voxelize::TriMesh;
use crate::models::config::SamplerParams;
use crate::models::ss_vae::SparseStructureEncoder;
use crate::modules::context::ContextCache;
use crate::modules::sparse::tensor::{Geometry, SparseTensor};

/// The region to regenerate.
#[derive(Debug, Clone, PartialEq)]
pub enum Region {
    /// An axis-aligned box `[min, max]` in the normalised space of the structure grid: the cube
    /// `[-0.5, 0.5]³` on TRELLIS' axes (z up; a glTF point `(X, Y, Z)` is `(X, -Z, Y)` here), where
    /// voxel `i` of `R` spans `[-0.5 + i / R, -0.5 + (i + 1) / R]`. A voxel is in the region when
    /// its cell and the box overlap with positive volume.
    Box { min: [f64; 3], max: [f64; 3] },
    /// A voxel mask of the structure grid: `dims` must be `[R, R, R]`, `voxels[(x R + y) R + z]`.
    Mask { dims: Vec<usize>, voxels: Vec<bool> },
    /// The voxels of any of these regions (each must be valid on its own).
    Union(Vec<Region>),
}

impl Region {
    /// `box:x0,y0,z0,x1,y1,z1`, or `mask:FILE.npy` (a `[R, R, R]` array of any numeric or bool
    /// dtype, non-zero = in the region).
    pub fn parse(spec: &str) -> Result<Region> {
        if let Some(b) = spec.strip_prefix("box:") {
            return Region::parse_box(b);
        }
        if let Some(f) = spec.strip_prefix("mask:") {
            let path = std::path::Path::new(f);
            ensure!(path.is_file(), "region mask {f} does not exist");
            let t = Tensor::read_npy(path)
                .map_err(|e| anyhow!("region mask {f}: not a readable .npy array ({e})"))?;
            return Region::from_mask_tensor(&t);
        }
        bail!("--region {spec:?}: expected box:x0,y0,z0,x1,y1,z1 or mask:FILE.npy")
    }

    /// `x0,y0,z0,x1,y1,z1` (the part after `box:` of the command line's `--region`).
    pub fn parse_box(spec: &str) -> Result<Region> {
        let v: Vec<f64> = spec
            .split(',')
            .map(|s| {
                let s = s.trim();
                s.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| anyhow!("box coordinate {s:?} is not a finite number"))
            })
            .collect::<Result<_>>()?;
        ensure!(
            v.len() == 6,
            "a box region is x0,y0,z0,x1,y1,z1 (6 numbers), got {} number(s)",
            v.len()
        );
        let r = Region::Box {
            min: [v[0], v[1], v[2]],
            max: [v[3], v[4], v[5]],
        };
        r.check_box()?;
        Ok(r)
    }

    /// A mask from a tensor of any dtype (non-zero = in the region), e.g. a `.npy` file.
    pub fn from_mask_tensor(t: &Tensor) -> Result<Region> {
        let dims = t.dims().to_vec();
        let flat: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(Region::Mask {
            dims,
            voxels: flat.iter().map(|&x| x != 0.0).collect(),
        })
    }

    /// The checks that need no grid: a box is not empty and meets the grid (every box of a
    /// union).
    pub fn check_box(&self) -> Result<()> {
        if let Region::Union(parts) = self {
            ensure!(!parts.is_empty(), "the region is empty: no box and no mask");
            return parts.iter().try_for_each(Region::check_box);
        }
        let Region::Box { min, max } = self else {
            return Ok(());
        };
        for a in 0..3 {
            ensure!(
                min[a] < max[a],
                "the region is empty: the box needs x0 < x1, y0 < y1 and z0 < z1 (axis {} has {} .. {})",
                ["x", "y", "z"][a],
                min[a],
                max[a]
            );
        }
        for a in 0..3 {
            ensure!(
                max[a] > -0.5 && min[a] < 0.5,
                "the region lies outside the grid: the box {:?} .. {:?} does not meet [-0.5, 0.5]³ (axis {})",
                min,
                max,
                ["x", "y", "z"][a]
            );
        }
        Ok(())
    }

    /// The voxels of an `R³` grid the region covers; an empty region, one outside the grid or a
    /// mask of another shape is an error.
    pub fn voxel_mask(&self, resolution: usize) -> Result<VoxelMask> {
        ensure!(resolution >= 1, "structure resolution 0");
        let r = resolution;
        let inside = match self {
            Region::Box { min, max } => {
                self.check_box()?;
                let hit = |a: usize, i: usize| {
                    let lo = -0.5 + i as f64 / r as f64;
                    let hi = -0.5 + (i + 1) as f64 / r as f64;
                    lo < max[a] && hi > min[a]
                };
                let mut v = vec![false; r * r * r];
                for x in (0..r).filter(|&i| hit(0, i)) {
                    for y in (0..r).filter(|&i| hit(1, i)) {
                        for z in (0..r).filter(|&i| hit(2, i)) {
                            v[(x * r + y) * r + z] = true;
                        }
                    }
                }
                v
            }
            Region::Mask { dims, voxels } => {
                ensure!(
                    dims.as_slice() == [r, r, r],
                    "the region mask has shape {dims:?}; this model's structure grid is [{r}, {r}, {r}]"
                );
                ensure!(
                    voxels.len() == r * r * r,
                    "the region mask has {} values for shape {dims:?}",
                    voxels.len()
                );
                voxels.clone()
            }
            Region::Union(parts) => {
                ensure!(!parts.is_empty(), "the region is empty: no box and no mask");
                let mut v = vec![false; r * r * r];
                for p in parts {
                    for (o, i) in v.iter_mut().zip(p.voxel_mask(r)?.inside) {
                        *o |= i;
                    }
                }
                v
            }
        };
        let m = VoxelMask {
            resolution: r,
            inside,
        };
        ensure!(
            m.count() > 0,
            "the region is empty: it covers no voxel of the {r}³ grid"
        );
        Ok(m)
    }

    /// JSON description for the asset metadata.
    pub fn describe(&self) -> serde_json::Value {
        match self {
            Region::Box { min, max } => serde_json::json!({"box": [min, max]}),
            Region::Mask { dims, voxels } => serde_json::json!({
                "mask": {"shape": dims, "voxels": voxels.iter().filter(|&&b| b).count()}
            }),
            Region::Union(parts) => {
                serde_json::json!({"union": parts.iter().map(Region::describe).collect::<Vec<_>>()})
            }
        }
    }
}

/// The voxels of an `R³` grid a region covers.
#[derive(Debug, Clone, PartialEq)]
pub struct VoxelMask {
    resolution: usize,
    inside: Vec<bool>,
}

impl VoxelMask {
    pub fn resolution(&self) -> usize {
        self.resolution
    }

    /// Number of voxels in the region.
    pub fn count(&self) -> usize {
        self.inside.iter().filter(|&&b| b).count()
    }

    /// Whether voxel `(x, y, z)` is in the region (outside the grid: no).
    pub fn contains(&self, v: [i32; 3]) -> bool {
        let r = self.resolution as i64;
        let [x, y, z] = v.map(i64::from);
        if [x, y, z].iter().any(|&c| c < 0 || c >= r) {
            return false;
        }
        self.inside[((x * r + y) * r + z) as usize]
    }

    /// Per cell of the `latent³` grid (each covers a block of `(R / latent)³` voxels): whether its
    /// block meets the region. `R` must be a multiple of `latent`.
    pub fn cells(&self, latent: usize) -> Result<Vec<bool>> {
        let r = self.resolution;
        ensure!(
            latent >= 1 && r.is_multiple_of(latent),
            "the structure grid {r}³ is not a whole number of latent cells {latent}³"
        );
        let f = r / latent;
        let mut cells = vec![false; latent * latent * latent];
        for x in 0..r {
            for y in 0..r {
                for z in 0..r {
                    if self.inside[(x * r + y) * r + z] {
                        cells[((x / f) * latent + y / f) * latent + z / f] = true;
                    }
                }
            }
        }
        Ok(cells)
    }
}

/// RePaint resampling: after reaching a step that is a multiple of `jump_length`, jump back
/// `jump_length` steps (re-noising) and denoise again, `jumps` times (RePaint's `jump_n_sample`
/// is `jumps + 1`). `jumps = 0`: no resampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Resampling {
    pub jump_length: usize,
    pub jumps: usize,
}

impl Default for Resampling {
    fn default() -> Self {
        Self {
            jump_length: 1,
            jumps: 0,
        }
    }
}

impl Resampling {
    pub fn validate(&self, steps: usize) -> Result<()> {
        ensure!(
            self.jump_length >= 1,
            "the jump length must be at least 1 step"
        );
        ensure!(
            self.jumps == 0 || self.jump_length <= steps,
            "the jump length ({}) is longer than the {steps} sampler steps",
            self.jump_length
        );
        ensure!(
            self.jumps <= 100,
            "at most 100 jumps per jump point (got {})",
            self.jumps
        );
        Ok(())
    }
}

/// One move of the resampling schedule over the time grid `t_0 = 1 > t_1 > ... > t_n = 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// Denoise from `t_i` to `t_{i+1}`.
    Down(usize),
    /// Re-noise from `t_from` back up to `t_to` (`to < from`).
    Up { from: usize, to: usize },
}

/// The moves of a run of `steps` steps: plain descent, plus at each index `i` that is a positive
/// multiple of `jump_length` (the last one included), `jumps` jumps back to `i - jump_length`.
pub fn schedule(steps: usize, r: Resampling) -> Vec<Move> {
    let j = r.jump_length.max(1);
    let mut left: Vec<usize> = (0..=steps)
        .map(|i| {
            if i >= j && i.is_multiple_of(j) {
                r.jumps
            } else {
                0
            }
        })
        .collect();
    let mut moves = Vec::new();
    let mut i = 0;
    loop {
        if left[i] > 0 {
            left[i] -= 1;
            moves.push(Move::Up { from: i, to: i - j });
            i -= j;
            continue;
        }
        if i == steps {
            return moves;
        }
        moves.push(Move::Down(i));
        i += 1;
    }
}

/// `α_t = 1 - t` and `σ_t = σ_min + (1 - σ_min) t` of the flow's forward process.
fn alpha_sigma(sigma_min: f64, t: f64) -> (f64, f64) {
    (1.0 - t, sigma_min + (1.0 - sigma_min) * t)
}

/// `x_t = (1 - t) x0 + (σ_min + (1 - σ_min) t) ε`; exactly `x0` at `t = 0`.
pub fn diffuse(x0: &Tensor, t: f64, eps: &Tensor, sigma_min: f64) -> Result<Tensor> {
    if t == 0.0 {
        return Ok(x0.clone());
    }
    let (a, s) = alpha_sigma(sigma_min, t);
    Ok((x0.affine(a, 0.0)? + eps.affine(s, 0.0)?)?)
}

/// The forward transition from time `t_lo` up to `t_hi > t_lo`: `x_hi = (α_hi / α_lo) x_lo + c ε`
/// with `c² = σ_hi² - (α_hi / α_lo)² σ_lo²`, so that `x_hi` has the marginal of `diffuse` at
/// `t_hi` whenever `x_lo` had it at `t_lo`.
pub fn renoise(x: &Tensor, t_lo: f64, t_hi: f64, eps: &Tensor, sigma_min: f64) -> Result<Tensor> {
    ensure!(
        (0.0..1.0).contains(&t_lo) && t_lo < t_hi && t_hi <= 1.0,
        "renoise from t = {t_lo} to t = {t_hi}"
    );
    let (a_lo, s_lo) = alpha_sigma(sigma_min, t_lo);
    let (a_hi, s_hi) = alpha_sigma(sigma_min, t_hi);
    let k = a_hi / a_lo;
    let c = (s_hi * s_hi - k * k * s_lo * s_lo).max(0.0).sqrt();
    Ok((x.affine(k, 0.0)? + eps.affine(c, 0.0)?)?)
}

/// The known part of an inpainting run: clean values and where they hold.
pub struct Known<'a> {
    /// Clean values `x0`, the shape of the sample (float32).
    pub x0: &'a Tensor,
    /// `u8`, the shape of the sample: 1 where `x0` is kept.
    pub keep: &'a Tensor,
}

/// RePaint-style masked sampling with a flow-matching Euler sampler. Starts from `init` (the
/// noise at `t = 1`, where the forward process is pure noise for the known part too), takes the
/// sampler's (guided) Euler steps over `settings`' time grid and after each one replaces the known
/// part by `diffuse(x0, t_prev, ε)` with fresh noise (exactly `x0` at `t = 0`); `resampling` adds
/// RePaint's jumps. Reports every denoising step of `stage`; the cancel flag is checked before
/// each move. The result equals `x0` bit for bit where `keep` is set.
#[allow(clippy::too_many_arguments)]
pub fn sample_inpaint(
    sampler: &FlowEulerSampler,
    settings: &SamplerSettings,
    resampling: Resampling,
    model: &mut Velocity<'_>,
    init: &Tensor,
    batch: usize,
    cond: &Conditioning<'_>,
    known: &Known<'_>,
    noise: &mut dyn NoiseSource,
    stage: Stage,
    ctl: &mut RunControl<'_>,
) -> Result<Tensor> {
    settings.validate()?;
    resampling.validate(settings.steps)?;
    ensure!(
        known.x0.dims() == init.dims() && known.keep.dims() == init.dims(),
        "inpainting: sample {:?}, known values {:?}, mask {:?}",
        init.dims(),
        known.x0.dims(),
        known.keep.dims()
    );
    let pairs = settings.time_pairs();
    let n = pairs.len();
    let mut ts: Vec<f64> = pairs.iter().map(|p| p.0).collect();
    ts.push(pairs.last().map(|p| p.1).unwrap_or(0.0));
    let moves = schedule(n, resampling);
    let total = moves.iter().filter(|m| matches!(m, Move::Down(_))).count();
    let sm = sampler.sigma_min;
    let shape = init.dims().to_vec();
    let dev = init.device().clone();
    let x0 = as_f32(known.x0)?;
    let keep = known.keep.to_dtype(DType::U8)?;
    ctl.emit(stage, 0, total, None);
    let mut x = as_f32(init)?;
    let mut memo = ConditionMemo::new();
    let mut done = 0;
    for mv in moves {
        if ctl.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            bail!("cancelled at step {} of {total}", done + 1);
        }
        match mv {
            Move::Down(i) => {
                let (t, t_prev) = (ts[i], ts[i + 1]);
                let v = sampler.velocity(model, &x, batch, t, i, cond, settings, &mut memo)?;
                let v = as_f32(&v)?;
                let stepped = (&x - v.affine(t - t_prev, 0.0)?)?;
                let at_prev = if i + 1 == n {
                    x0.clone()
                } else {
                    diffuse(&x0, t_prev, &noise.randn(&shape, &dev)?, sm)?
                };
                x = keep.where_cond(&at_prev, &stepped)?;
                done += 1;
                ctl.emit(stage, done, total, None);
            }
            Move::Up { from, to } => {
                let eps = noise.randn(&shape, &dev)?;
                x = renoise(&x, ts[from], ts[to], &eps, sm)?;
            }
        }
    }
    Ok(x)
}

/// What is edited: a saved asset, or the voxels of a mesh.
#[derive(Debug, Clone)]
pub struct EditSource {
    /// `[N, 4]` int (batch 0, x, y, z) on the structure grid.
    pub coords: Tensor,
    /// `[N, C]` structured latent (de-normalised, as in the asset); none for a mesh.
    pub slat: Option<Tensor>,
    /// `[1, C, r, r, r]` structure latent; none: encoded from the occupancy.
    pub ss_latent: Option<Tensor>,
}

impl EditSource {
    pub fn from_asset(a: &crate::export::asset::Asset) -> Self {
        Self {
            coords: a.coords.clone(),
            slat: Some(a.slat.clone()),
            ss_latent: a.ss_latent.clone(),
        }
    }

    /// The mesh voxelised at `resolution` (normalised to the unit cube like `run_variant`).
    pub fn from_mesh(mesh: &TriMesh, resolution: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            coords: super::variant::mesh_coords(mesh, resolution, device)?,
            slat: None,
            ss_latent: None,
        })
    }

    /// The voxels `(x, y, z)`, checked to lie in one `R³` grid of batch 0.
    pub fn voxels(&self, resolution: usize) -> Result<Vec<[i32; 3]>> {
        let (n, four) = self
            .coords
            .dims2()
            .context("the coords to edit must be [N, 4]")?;
        ensure!(
            four == 4,
            "the coords to edit must be [N, 4], got {:?}",
            self.coords.dims()
        );
        ensure!(n > 0, "nothing to edit: no voxels");
        if let Some(s) = &self.slat {
            ensure!(
                s.dims2()?.0 == n,
                "the latent has {} rows for {n} voxels",
                s.dims2()?.0
            );
        }
        let flat: Vec<i64> = self
            .coords
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1()?;
        let r = resolution as i64;
        let mut out = Vec::with_capacity(n);
        for c in flat.chunks_exact(4) {
            ensure!(
                c[0] == 0,
                "the asset holds several samples (batch index {}); edit one at a time",
                c[0]
            );
            ensure!(
                c[1..].iter().all(|&v| (0..r).contains(&v)),
                "voxel {:?} lies outside this model's {r}³ structure grid (was the asset made at another resolution?)",
                &c[1..]
            );
            out.push([c[1] as i32, c[2] as i32, c[3] as i32]);
        }
        Ok(out)
    }
}

/// Per-call parameters of an edit.
#[derive(Debug, Clone, Default)]
pub struct EditParams {
    pub ss: SamplerParams,
    pub slat: SamplerParams,
    pub resampling: Resampling,
    pub formats: Formats,
}

/// The networks of an edit: a pipeline with its structure networks, and the structure encoder
/// when the source has no structure latent.
pub struct EditPipeline<'a> {
    pub pipeline: &'a TrellisPipeline,
    pub encoder: Option<&'a SparseStructureEncoder>,
}

/// What an edit kept and changed.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EditReport {
    /// Voxels of the structure grid inside the region.
    pub region_voxels: usize,
    /// Structure latent cells sampled anew, of `latent_cells`.
    pub regenerated_cells: usize,
    pub latent_cells: usize,
    /// Voxels of the source outside the region (kept with their latents).
    pub kept_voxels: usize,
    /// Voxels of the source inside the region (replaced).
    pub replaced_voxels: usize,
    /// Voxels of the result inside the region (new).
    pub new_voxels: usize,
    /// The source had no structured latent (a mesh): every voxel's latent was sampled.
    pub slat_regenerated_everywhere: bool,
}

/// The result: the edited generation (coords, structure sample, latent, decoded) and the report.
pub struct EditOutcome {
    pub generation: Generation,
    pub report: EditReport,
}

/// Dense occupancy `[1, 1, R, R, R]` (float32) of voxels.
fn occupancy(voxels: &[[i32; 3]], r: usize, device: &Device) -> Result<Tensor> {
    let mut v = vec![0f32; r * r * r];
    for p in voxels {
        v[(p[0] as usize * r + p[1] as usize) * r + p[2] as usize] = 1.0;
    }
    Ok(Tensor::from_vec(v, (1, 1, r, r, r), device)?)
}

/// `[N, 4]` int32 coords (batch 0) of voxels.
fn coords_tensor(voxels: &[[i32; 3]], device: &Device) -> Result<Tensor> {
    let flat: Vec<i32> = voxels.iter().flat_map(|v| [0, v[0], v[1], v[2]]).collect();
    Ok(Tensor::from_vec(flat, (voxels.len(), 4), device)?)
}

impl EditPipeline<'_> {
    /// The known structure latent: the source's, or the encoder's posterior mean of its occupancy.
    fn known_latent(
        &self,
        source: &EditSource,
        voxels: &[[i32; 3]],
        r: usize,
        ctl: &mut RunControl<'_>,
    ) -> Result<Tensor> {
        if let Some(z) = &source.ss_latent {
            return as_f32(z);
        }
        let enc = self.encoder.as_ref().ok_or_else(|| {
            anyhow!("the source has no structure latent and no structure encoder was loaded")
        })?;
        ctl.emit(
            Stage::SparseStructure,
            0,
            1,
            Some("encoding the original structure".into()),
        );
        let dev = &self.pipeline.device;
        as_f32(&enc.forward(&occupancy(voxels, r, dev)?)?)
    }

    /// Stage 1: the edited structure latent and voxels.
    #[allow(clippy::too_many_arguments)]
    fn edit_structure(
        &self,
        known_latent: &Tensor,
        original: &[[i32; 3]],
        region: &VoxelMask,
        cond: &Conditioning<'_>,
        noise: &mut dyn NoiseSource,
        params: &EditParams,
        ctl: &mut RunControl<'_>,
    ) -> Result<(SparseStructureSample, Vec<[i32; 3]>, usize)> {
        let p = &self.pipeline;
        let (Some(flow), Some(decoder), Some(cfg)) = (&p.ss_flow, &p.ss_decoder, &p.ss_flow_config)
        else {
            bail!("this pipeline was loaded without its sparse-structure networks");
        };
        let (lr, ch) = (cfg.resolution, cfg.in_channels);
        ensure!(
            known_latent.dims() == [1, ch, lr, lr, lr],
            "the structure latent is {:?}; this model's is [1, {ch}, {lr}, {lr}, {lr}]",
            known_latent.dims()
        );
        let cells = region.cells(lr)?;
        let regenerated = cells.iter().filter(|&&c| c).count();
        let keep_cells: Vec<u8> = cells.iter().map(|&c| u8::from(!c)).collect();
        let dev = &p.device;
        let keep = Tensor::from_vec(keep_cells, (1, 1, lr, lr, lr), dev)?
            .repeat((1, ch, 1, 1, 1))?
            .contiguous()?;
        let (sampler, settings) = p.ss_sampler(&params.ss)?;
        let init = noise.randn(&[1, ch, lr, lr, lr], dev)?;
        // A retry after an out-of-memory fallback draws the resampling noise anew.
        let z = p.residency.stage("sparse-structure flow", &[flow], || {
            let f = flow.get()?;
            let mut contexts = ContextCache::new();
            let mut fl = |x: &Tensor, t: &Tensor, c: &Tensor| -> Result<Tensor> {
                f.forward_cached(x, t, c, &mut contexts)
            };
            sample_inpaint(
                &sampler,
                &settings,
                params.resampling,
                &mut fl,
                &init,
                1,
                cond,
                &Known {
                    x0: known_latent,
                    keep: &keep,
                },
                &mut *noise,
                Stage::SparseStructure,
                ctl,
            )
        })?;
        let logits = p
            .residency
            .stage("sparse-structure decoder", &[decoder], || {
                decoder.get()?.forward(&z)
            })?;
        let decoded = crate::models::ss_vae::occupied_coords(&logits)?;
        let r = region.resolution();
        ensure!(
            logits.dims() == [1, 1, r, r, r],
            "the structure decoder produced {:?} for a {r}³ grid",
            logits.dims()
        );
        let dv: Vec<i64> = decoded
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1()?;
        let mut voxels: Vec<[i32; 3]> = original
            .iter()
            .copied()
            .filter(|v| !region.contains(*v))
            .collect();
        voxels.extend(
            dv.chunks_exact(4)
                .map(|c| [c[1] as i32, c[2] as i32, c[3] as i32])
                .filter(|v| region.contains(*v)),
        );
        voxels.sort_unstable();
        voxels.dedup();
        ensure!(
            !voxels.is_empty(),
            "the edit left no voxel (the region covered the whole object and nothing was generated in it); try another seed or prompt"
        );
        let sample = SparseStructureSample {
            noise: init,
            samples: z,
            coords: coords_tensor(&voxels, dev)?,
            pred_x_t: vec![],
            pred_x0: vec![],
        };
        Ok((sample, voxels, regenerated))
    }

    /// Stage 2 with a known latent: voxels outside the region keep theirs.
    #[allow(clippy::too_many_arguments)]
    fn edit_slat(
        &self,
        voxels: &[[i32; 3]],
        original: &[[i32; 3]],
        original_slat: &Tensor,
        region: &VoxelMask,
        cond: &Conditioning<'_>,
        noise: &mut dyn NoiseSource,
        params: &EditParams,
        ctl: &mut RunControl<'_>,
    ) -> Result<SlatSample> {
        let p = &self.pipeline;
        let dev = &p.device;
        let ch = p.slat_in_channels;
        let (_, sch) = original_slat.dims2()?;
        ensure!(
            sch == ch,
            "the asset's latent has {sch} channels; this model's SLat flow has {ch}"
        );
        let row_of: HashMap<[i32; 3], u32> = original
            .iter()
            .enumerate()
            .map(|(i, v)| (*v, i as u32))
            .collect();
        let n = voxels.len();
        let mut rows = Vec::with_capacity(n);
        let mut keep_rows = Vec::with_capacity(n);
        for v in voxels {
            match row_of.get(v).filter(|_| !region.contains(*v)) {
                Some(&i) => {
                    rows.push(i);
                    keep_rows.push(1u8);
                }
                None => {
                    rows.push(0);
                    keep_rows.push(0u8);
                }
            }
        }
        let idx = Tensor::from_vec(rows, n, dev)?;
        let kept_slat = as_f32(original_slat)?.index_select(&idx, 0)?;
        let norm = &p.repo.config.slat_normalization;
        let mean = Tensor::new(norm.mean.as_slice(), dev)?.unsqueeze(0)?;
        let std = Tensor::new(norm.std.as_slice(), dev)?.unsqueeze(0)?;
        let x0 = kept_slat.broadcast_sub(&mean)?.broadcast_div(&std)?;
        let keep = Tensor::from_vec(keep_rows, (n, 1), dev)?
            .repeat((1, ch))?
            .contiguous()?;
        let (sampler, settings) = p.slat_sampler(&params.slat)?;
        let init = noise.randn(&[n, ch], dev)?;
        let geo = Arc::new(Geometry::new(
            voxels.iter().flat_map(|v| [0, v[0], v[1], v[2]]).collect(),
            None,
            dev,
        )?);
        let flow = &p.slat_flow;
        let samples = p.residency.stage("SLat flow", &[flow], || {
            let f = flow.get()?;
            let mut contexts = ContextCache::new();
            let mut fl = |x: &Tensor, t: &Tensor, c: &Tensor| -> Result<Tensor> {
                let st = SparseTensor::from_geometry(geo.clone(), x.clone())?;
                Ok(f.forward_cached(&st, t, c, &mut contexts)?.feats().clone())
            };
            sample_inpaint(
                &sampler,
                &settings,
                params.resampling,
                &mut fl,
                &init,
                1,
                cond,
                &Known {
                    x0: &x0,
                    keep: &keep,
                },
                &mut *noise,
                Stage::StructuredLatent,
                ctl,
            )
        })?;
        // The kept rows are the asset's own values, not a round trip through the normalisation.
        let slat = keep.where_cond(&kept_slat, &denormalize(&samples, &norm.mean, &norm.std)?)?;
        Ok(SlatSample {
            noise: init,
            samples,
            slat,
            pred_x_t: vec![],
        })
    }
}

/// Runs a region edit: stage 1 on the structure, stage 2 on the structured latent, then the
/// decoders of `params.formats`. `region` must be a mask of the pipeline's structure grid.
pub fn run_edit(
    pipe: &EditPipeline<'_>,
    source: &EditSource,
    region: &VoxelMask,
    cond: &Conditioning<'_>,
    noise: &mut dyn NoiseSource,
    params: &EditParams,
    ctl: &mut RunControl<'_>,
) -> Result<EditOutcome> {
    let r = region.resolution();
    let original = source.voxels(r)?;
    let known_latent = pipe.known_latent(source, &original, r, ctl)?;
    let (structure, voxels, regenerated_cells) =
        pipe.edit_structure(&known_latent, &original, region, cond, noise, params, ctl)?;
    let coords = structure.coords.clone();
    let p = &pipe.pipeline;
    let (slat, everywhere) = match &source.slat {
        Some(s) => (
            pipe.edit_slat(&voxels, &original, s, region, cond, noise, params, ctl)?,
            false,
        ),
        None => {
            ctl.emit(
                Stage::StructuredLatent,
                0,
                1,
                Some("a mesh has no latent: every voxel's latent is sampled (a variant)".into()),
            );
            (
                p.sample_slat(&coords, cond, noise, &params.slat, ctl)?,
                true,
            )
        }
    };
    let decoded = p.decode(&coords, &slat.slat, params.formats, ctl)?;
    let lr = structure.samples.dim(2)?;
    let replaced_voxels = original.iter().filter(|v| region.contains(**v)).count();
    let new_voxels = voxels.iter().filter(|v| region.contains(**v)).count();
    let report = EditReport {
        region_voxels: region.count(),
        regenerated_cells,
        latent_cells: lr * lr * lr,
        kept_voxels: original.len() - replaced_voxels,
        replaced_voxels,
        new_voxels,
        slat_regenerated_everywhere: everywhere,
    };
    Ok(EditOutcome {
        generation: Generation {
            structure: Some(structure),
            slat,
            coords,
            decoded,
        },
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::config::SamplerKind;
    use crate::pipelines::noise::TorchNoise;
    use crate::pipelines::samplers::Hooks;

    #[test]
    fn box_regions_select_overlapping_cells_and_reject_bad_boxes() {
        // The x half 0 .. 0.5 of a 4³ grid: cells 2 and 3 on x, all on y and z.
        let m = Region::parse_box("0,-0.5,-0.5,0.5,0.5,0.5")
            .unwrap()
            .voxel_mask(4)
            .unwrap();
        assert_eq!(m.count(), 2 * 4 * 4);
        assert!(m.contains([2, 0, 3]) && !m.contains([1, 0, 0]) && !m.contains([4, 0, 0]));
        // A tiny box still hits the cell around it; latent cells at 2³ are the blocks it touches.
        let m = Region::parse_box("0.01,0.01,0.01,0.02,0.02,0.02")
            .unwrap()
            .voxel_mask(4)
            .unwrap();
        assert_eq!(m.count(), 1);
        assert!(m.contains([2, 2, 2]));
        let cells = m.cells(2).unwrap();
        assert_eq!(cells.iter().filter(|&&c| c).count(), 1);
        assert!(cells[(2 + 1) * 2 + 1]);
        for (spec, needle) in [
            ("0,0,0,0,1,1", "empty"),
            ("0.2,0,0,0.1,0.3,0.3", "empty"),
            ("0.5,0,0,0.9,0.3,0.3", "outside the grid"),
            ("-2,-2,-2,-0.6,0,0", "outside the grid"),
            ("0,0,0,1,1", "6 numbers"),
            ("0,0,0,1,1,nan", "finite"),
        ] {
            let e = Region::parse_box(spec).unwrap_err().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }

    #[test]
    fn masks_must_match_the_grid_and_select_something() {
        let dev = Device::Cpu;
        let mut v = vec![0u8; 4 * 4 * 4];
        v[5] = 1;
        let t = Tensor::from_vec(v, (4, 4, 4), &dev).unwrap();
        let r = Region::from_mask_tensor(&t).unwrap();
        let m = r.voxel_mask(4).unwrap();
        assert_eq!(m.count(), 1);
        assert!(m.contains([0, 1, 1]));
        let e = r.voxel_mask(8).unwrap_err().to_string();
        assert!(
            e.contains("shape [4, 4, 4]") && e.contains("[8, 8, 8]"),
            "{e}"
        );
        let z =
            Region::from_mask_tensor(&Tensor::zeros((4, 4, 4), DType::U8, &dev).unwrap()).unwrap();
        assert!(z.voxel_mask(4).unwrap_err().to_string().contains("empty"));
    }

    #[test]
    fn resampling_schedule_jumps_back_and_ends_at_zero() {
        assert_eq!(
            schedule(3, Resampling::default()),
            vec![Move::Down(0), Move::Down(1), Move::Down(2)]
        );
        let s = schedule(
            4,
            Resampling {
                jump_length: 2,
                jumps: 1,
            },
        );
        use Move::*;
        assert_eq!(
            s,
            vec![
                Down(0),
                Down(1),
                Up { from: 2, to: 0 },
                Down(0),
                Down(1),
                Down(2),
                Down(3),
                Up { from: 4, to: 2 },
                Down(2),
                Down(3),
            ]
        );
        // Every Down(i) is preceded by a state at i.
        let mut i = 0;
        for m in &s {
            match *m {
                Down(k) => {
                    assert_eq!(k, i);
                    i += 1
                }
                Up { from, to } => {
                    assert_eq!(from, i);
                    i = to
                }
            }
        }
        assert_eq!(i, 4);
        assert!(Resampling {
            jump_length: 5,
            jumps: 1
        }
        .validate(4)
        .is_err());
    }

    #[test]
    fn renoise_keeps_the_forward_marginal() {
        // x_lo = a_lo x0 + s_lo e1, renoised to t_hi with e2: mean a_hi x0, variance s_hi².
        let sm = 1e-5;
        let (t_lo, t_hi) = (0.3, 0.7);
        let (a_lo, s_lo) = alpha_sigma(sm, t_lo);
        let (a_hi, s_hi) = alpha_sigma(sm, t_hi);
        let k = a_hi / a_lo;
        let c2 = s_hi * s_hi - k * k * s_lo * s_lo;
        assert!((k * a_lo - a_hi).abs() < 1e-12);
        assert!((k * k * s_lo * s_lo + c2 - s_hi * s_hi).abs() < 1e-12);
        let dev = Device::Cpu;
        let x = Tensor::new(&[2.0f32], &dev).unwrap();
        let e = Tensor::new(&[0.5f32], &dev).unwrap();
        let got: Vec<f32> = renoise(&x, t_lo, t_hi, &e, sm).unwrap().to_vec1().unwrap();
        assert!((got[0] as f64 - (k * 2.0 + c2.sqrt() * 0.5)).abs() < 1e-6);
        assert_eq!(
            diffuse(&x, 0.0, &e, sm).unwrap().to_vec1::<f32>().unwrap(),
            vec![2.0]
        );
        let d: Vec<f32> = diffuse(&x, 1.0, &e, sm).unwrap().to_vec1().unwrap();
        assert!((d[0] - 0.5).abs() < 1e-7);
    }

    fn toy_run(
        keep: &Tensor,
        x0: &Tensor,
        resampling: Resampling,
        seed: u64,
    ) -> (Tensor, Vec<usize>) {
        let dev = Device::Cpu;
        let sampler = FlowEulerSampler {
            kind: SamplerKind::FlowEulerGuidanceInterval,
            sigma_min: 1e-5,
        };
        let settings = SamplerSettings {
            steps: 4,
            rescale_t: 3.0,
            cfg_strength: 2.0,
            cfg_interval: (0.5, 1.0),
            cfg_batched: false,
        };
        let c = Tensor::new(&[[0.3f32]], &dev).unwrap();
        let neg = Tensor::new(&[[0.0f32]], &dev).unwrap();
        let mut model = |x: &Tensor, _t: &Tensor, c: &Tensor| -> Result<Tensor> {
            Ok(((x * 0.5)? + c.broadcast_as(x.dims())?)?)
        };
        let mut noise = TorchNoise::new(seed);
        let init = noise.randn(x0.dims(), &dev).unwrap();
        let mut steps = vec![];
        let mut sink = |e: &crate::pipelines::base::ProgressEvent| steps.push(e.step);
        let mut ctl = RunControl {
            progress: &mut sink,
            cancel: None,
            keep_trajectory: false,
        };
        let out = sample_inpaint(
            &sampler,
            &settings,
            resampling,
            &mut model,
            &init,
            1,
            &Conditioning::Single {
                cond: &c,
                neg: &neg,
            },
            &Known { x0, keep },
            &mut noise,
            Stage::SparseStructure,
            &mut ctl,
        )
        .unwrap();
        // Plain sampling from the same init, for comparison.
        let plain = sampler
            .sample(
                &mut model,
                &init,
                1,
                &Conditioning::Single {
                    cond: &c,
                    neg: &neg,
                },
                &settings,
                Hooks::default(),
            )
            .unwrap()
            .samples;
        if keep.sum_all().unwrap().to_scalar::<u8>().unwrap() == 0 && resampling.jumps == 0 {
            assert_eq!(
                out.to_vec2::<f32>().unwrap(),
                plain.to_vec2::<f32>().unwrap(),
                "nothing known, no jumps: plain sampling"
            );
        }
        (out, steps)
    }

    #[test]
    fn inpainting_keeps_known_values_exactly_and_is_seeded() {
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[[1.25f32, -0.75, 3.5, 0.1, -2.0, 0.7]], &dev).unwrap();
        let keep = Tensor::new(&[[1u8, 0, 1, 0, 0, 1]], &dev).unwrap();
        for rs in [
            Resampling::default(),
            Resampling {
                jump_length: 2,
                jumps: 2,
            },
        ] {
            let (a, steps) = toy_run(&keep, &x0, rs, 7);
            let (b, _) = toy_run(&keep, &x0, rs, 7);
            let (c, _) = toy_run(&keep, &x0, rs, 8);
            let (av, x0v) = (a.to_vec2::<f32>().unwrap(), x0.to_vec2::<f32>().unwrap());
            for k in [0, 2, 5] {
                assert_eq!(av[0][k].to_bits(), x0v[0][k].to_bits());
            }
            assert_eq!(av, b.to_vec2::<f32>().unwrap(), "same seed, same result");
            let cv = c.to_vec2::<f32>().unwrap();
            assert!([1, 3, 4].iter().all(|&k| av[0][k] != cv[0][k]));
            let downs = schedule(4, rs)
                .iter()
                .filter(|m| matches!(m, Move::Down(_)))
                .count();
            assert_eq!(steps, (0..=downs).collect::<Vec<_>>());
        }
        // Nothing known, no jumps: the plain sampler's result (checked inside toy_run).
        let none = Tensor::zeros((1, 6), DType::U8, &dev).unwrap();
        toy_run(&none, &x0, Resampling::default(), 3);
    }
}
