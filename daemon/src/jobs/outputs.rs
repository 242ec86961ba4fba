//! What a finished job leaves behind: files (GLB mesh, Gaussian PLY, `.trellis` bundle) written
//! atomically, and the described arrays the daemon hands to clients (`fetch`).

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use trellis_ipc_protocol::{BinaryBuilder, DType as WireDType};

use super::run::JobOutput;
use crate::export::textured::write_textured_glb;
use crate::pipelines::base::{Decoded, RunControl, Stage};
use crate::postprocessing::{BakeOptions, ExportMesh};
use crate::representations::gaussian::Gaussian;
use crate::representations::mesh::MeshExtractResult;

/// Files to write (each optional).
#[derive(Debug, Clone, Default)]
pub struct OutputFiles {
    pub glb: Option<PathBuf>,
    pub ply: Option<PathBuf>,
    pub asset: Option<PathBuf>,
    /// How the GLB is made (texture baking from the Gaussians, decimation).
    pub bake: BakeOptions,
    /// A PNG grid of views of the GLB (mesh above, Gaussians below).
    pub preview: Option<PathBuf>,
    /// Where post-processing rasterises (a CUDA device: the GPU rasterisers); `None`: the CPU.
    pub device: Option<candle_core::Device>,
}

impl OutputFiles {
    fn count(&self) -> usize {
        [&self.glb, &self.ply, &self.asset]
            .iter()
            .filter(|p| p.is_some())
            .count()
    }
}

/// Writes the requested files of a job's output (sample 0); returns `{"glb": path, ...}`.
pub fn write_outputs(
    files: &OutputFiles,
    out: &JobOutput,
    ctl: &mut RunControl<'_>,
) -> Result<serde_json::Value> {
    let total = files.count();
    let mut done = 0;
    let mut written = serde_json::Map::new();
    ctl.emit(Stage::Writing, 0, total, None);
    if let Some(p) = &files.asset {
        let a = out
            .asset()?
            .ok_or_else(|| anyhow!("a decode job has no new .trellis bundle to write"))?;
        a.save(p)?;
        done += 1;
        written.insert("asset".into(), serde_json::json!(p));
        ctl.emit(Stage::Writing, done, total, Some(p.display().to_string()));
    }
    let more = write_decoded_from(files, out.decoded(), done, total, ctl)?;
    if let serde_json::Value::Object(m) = more {
        written.extend(m);
    }
    Ok(serde_json::Value::Object(written))
}

/// Writes the GLB / PLY files of decoded representations.
pub fn write_decoded(
    files: &OutputFiles,
    d: &Decoded,
    ctl: &mut RunControl<'_>,
) -> Result<serde_json::Value> {
    let total = files.count();
    write_decoded_from(files, d, 0, total, ctl)
}

fn write_decoded_from(
    files: &OutputFiles,
    d: &Decoded,
    mut done: usize,
    total: usize,
    ctl: &mut RunControl<'_>,
) -> Result<serde_json::Value> {
    let mut written = serde_json::Map::new();
    if let Some(p) = &files.glb {
        let m = first_mesh(d)?;
        ctl.emit(
            Stage::Writing,
            done,
            total,
            Some(format!("{} (post-processing)", p.display())),
        );
        write_textured_glb(
            p,
            m,
            d.gaussians.first(),
            &files.bake,
            files.preview.as_deref(),
            files.device.as_ref(),
        )?;
        done += 1;
        written.insert("glb".into(), serde_json::json!(p));
        if let Some(pv) = &files.preview {
            written.insert("preview".into(), serde_json::json!(pv));
        }
        ctl.emit(Stage::Writing, done, total, Some(p.display().to_string()));
    }
    if let Some(p) = &files.ply {
        crate::export::ply::save_gaussian_ply(first_gaussians(d)?, p)?;
        done += 1;
        written.insert("ply".into(), serde_json::json!(p));
        ctl.emit(Stage::Writing, done, total, Some(p.display().to_string()));
    }
    Ok(serde_json::Value::Object(written))
}

pub fn first_mesh(d: &Decoded) -> Result<&MeshExtractResult> {
    d.meshes
        .first()
        .ok_or_else(|| anyhow!("no mesh was decoded"))
}

pub fn first_gaussians(d: &Decoded) -> Result<&Gaussian> {
    d.gaussians
        .first()
        .ok_or_else(|| anyhow!("no Gaussians were decoded"))
}

/// The first three vertex attributes (RGB) when the decoder gives colours.
pub fn mesh_colors(m: &MeshExtractResult) -> Option<Vec<[f32; 3]>> {
    (m.attr_dim >= 3).then(|| {
        m.vertex_attrs
            .chunks_exact(m.attr_dim)
            .map(|a| [a[0], a[1], a[2]])
            .collect()
    })
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `positions f32 [V,3]` and `triangles u32 [F,3]`, the part every fetched mesh shares.
fn geometry_arrays(vertices: &[[f32; 3]], faces: &[[u32; 3]]) -> Result<BinaryBuilder> {
    let mut b = BinaryBuilder::default();
    let pos: Vec<f32> = vertices.iter().flatten().copied().collect();
    let v = vertices.len() as u64;
    b.push("positions", WireDType::F32, &[v, 3], &f32_bytes(&pos))?;
    let tri: Vec<u8> = faces
        .iter()
        .flatten()
        .flat_map(|i| i.to_le_bytes())
        .collect();
    b.push("triangles", WireDType::U32, &[faces.len() as u64, 3], &tri)?;
    Ok(b)
}

/// `positions f32 [V,3]`, `triangles u32 [F,3]`, `colors f32 [V,3]` (docs/PROTOCOL.md, fetch).
pub fn mesh_arrays(m: &MeshExtractResult) -> Result<BinaryBuilder> {
    let mut b = geometry_arrays(&m.vertices, &m.faces)?;
    let v = m.vertices.len() as u64;
    if let Some(c) = mesh_colors(m) {
        let c: Vec<f32> = c.into_iter().flatten().collect();
        b.push("colors", WireDType::F32, &[v, 3], &f32_bytes(&c))?;
    }
    Ok(b)
}

/// The arrays of a baked GLB mesh: `positions f32 [V,3]`, `triangles u32 [F,3]`, `uvs f32 [V,2]`
/// and `texture u8 [H,W,3]` (glTF's UV convention: v down from the image's top row), or `colors
/// f32 [V,3]` when not baked (docs/PROTOCOL.md, fetch).
pub fn export_mesh_arrays(m: &ExportMesh) -> Result<BinaryBuilder> {
    let mut b = geometry_arrays(&m.vertices, &m.faces)?;
    let v = m.vertices.len() as u64;
    if let Some(c) = &m.colors {
        let c: Vec<f32> = c.iter().flatten().copied().collect();
        b.push("colors", WireDType::F32, &[v, 3], &f32_bytes(&c))?;
    }
    if let Some(uv) = &m.uvs {
        let uv: Vec<f32> = uv.iter().flatten().copied().collect();
        b.push("uvs", WireDType::F32, &[v, 2], &f32_bytes(&uv))?;
    }
    if let Some(t) = &m.texture {
        b.push(
            "texture",
            WireDType::U8,
            &[t.height as u64, t.width as u64, 3],
            &t.to_rgb8(),
        )?;
    }
    Ok(b)
}

/// The zeroth spherical-harmonics band's constant.
const SH_C0: f32 = 0.282_094_8;

/// `positions`, `colors`, `scales`, `rotations`, `opacities` (activated values, `f32`).
pub fn gaussian_arrays(g: &Gaussian) -> Result<BinaryBuilder> {
    let mut b = BinaryBuilder::default();
    let n = g.len() as u64;
    b.push(
        "positions",
        WireDType::F32,
        &[n, 3],
        &f32_bytes(&g.get_xyz()),
    )?;
    let colors: Vec<f32> = g.get_features().iter().map(|f| 0.5 + SH_C0 * f).collect();
    b.push("colors", WireDType::F32, &[n, 3], &f32_bytes(&colors))?;
    b.push(
        "scales",
        WireDType::F32,
        &[n, 3],
        &f32_bytes(&g.get_scaling()),
    )?;
    b.push(
        "rotations",
        WireDType::F32,
        &[n, 4],
        &f32_bytes(&g.get_rotation()),
    )?;
    b.push(
        "opacities",
        WireDType::F32,
        &[n, 1],
        &f32_bytes(&g.get_opacity()),
    )?;
    Ok(b)
}
