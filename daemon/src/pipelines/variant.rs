//! Variants of an existing mesh; twin of `TrellisTextTo3DPipeline.run_variant`
//! (trellis/pipelines/trellis_text_to_3d.py): the mesh is voxelised into the occupancy grid (its
//! structure is kept as is), only the structured latent is sampled anew under the given condition
//! (a prompt, or here also an image), then decoded.
//!
//! The original always voxelises at 64³ (the official structure resolution); here the default is
//! the structure decoder's own output resolution ([`super::loader::structure_resolution`]: 64
//! official, 32 for the tiny test models), overridable.

use anyhow::Result;
use candle_core::Tensor;

use super::base::{Generation, RunControl, RunParams, Stage, TrellisPipeline};
use super::noise::NoiseSource;
use super::samplers::Conditioning;
use super::voxelize::{voxelize, TriMesh};

/// `[N, 4]` int32 coords (batch 0) of the voxelised mesh, lexicographic.
pub fn mesh_coords(
    mesh: &TriMesh,
    resolution: usize,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let vox = voxelize(mesh, resolution)?;
    anyhow::ensure!(!vox.is_empty(), "the mesh occupies no voxel");
    let n = vox.len();
    let flat: Vec<i32> = vox.iter().flat_map(|v| [0, v[0], v[1], v[2]]).collect();
    Ok(Tensor::from_vec(flat, (n, 4), device)?)
}

/// `run_variant` on already voxelised coords and encoded conditions.
pub fn run_variant(
    pipeline: &TrellisPipeline,
    coords: &Tensor,
    cond: &Tensor,
    neg: &Tensor,
    noise: &mut dyn NoiseSource,
    params: &RunParams,
    ctl: &mut RunControl<'_>,
) -> Result<Generation> {
    let c = Conditioning::Single { cond, neg };
    let slat = pipeline.sample_slat(coords, &c, noise, &params.slat, ctl)?;
    let decoded = pipeline.decode(coords, &slat.slat, params.formats, ctl)?;
    Ok(Generation {
        structure: None,
        slat,
        coords: coords.clone(),
        decoded,
    })
}

/// Voxelises `mesh` at `resolution` with progress.
pub fn voxelize_with_progress(
    mesh: &TriMesh,
    resolution: usize,
    device: &candle_core::Device,
    ctl: &mut RunControl<'_>,
) -> Result<Tensor> {
    ctl.emit(Stage::Voxelizing, 0, 1, None);
    let c = mesh_coords(mesh, resolution, device)?;
    ctl.emit(
        Stage::Voxelizing,
        1,
        1,
        Some(format!("{} voxels at {resolution}³", c.dim(0)?)),
    );
    Ok(c)
}
