//! The GLB of a generation: post-processing and texture baking (`postprocessing`) on the decoded
//! mesh and Gaussians, then the GLB writer, and the optional preview image. The one entry point
//! the command line (and later the daemon's jobs) call; options arrive as a [`BakeOptions`].

use std::path::Path;

use anyhow::{ensure, Result};
use trellis_kernels::raster::{CpuRasterizer, Rasterizer};

use super::glb::{encode_png_rgb, write_glb_textured, GlbMesh, GlbTexture};
use crate::postprocessing::bake::SplatData;
use crate::postprocessing::topology::TriMesh;
use crate::postprocessing::{
    preview, to_textured_mesh, BakeOptions, ExportMesh, PostprocessReport,
};
use crate::representations::gaussian::Gaussian;
use crate::representations::mesh::MeshExtractResult;

/// The rasteriser for post-processing on `device`: on a CUDA device (cuda builds) the GPU one,
/// whose kernels are compiled (or read from the kernel cache) here, falling back to the CPU one
/// with one warning line when that fails; otherwise the CPU one.
pub fn rasterizer_for(device: Option<&candle_core::Device>) -> Box<dyn Rasterizer> {
    #[cfg(feature = "cuda")]
    if let Some(d @ candle_core::Device::Cuda(_)) = device {
        match crate::runtime::cuda_raster::CudaRasterizer::new(d) {
            Ok(r) => return Box::new(r),
            Err(e) => eprintln!("warning: GPU rasteriser unavailable, baking on the CPU: {e:#}"),
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    Box::new(CpuRasterizer)
}

/// Writes `path` (GLB) from a decoded mesh, baking the Gaussians into a texture unless
/// `opts.bake` is off, and `preview` (PNG) when given; the rasterisers run on `device` (see
/// [`rasterizer_for`]).
pub fn write_textured_glb(
    path: &Path,
    mesh: &MeshExtractResult,
    gaussians: Option<&Gaussian>,
    opts: &BakeOptions,
    preview_path: Option<&Path>,
    device: Option<&candle_core::Device>,
) -> Result<PostprocessReport> {
    ensure!(
        mesh.success && !mesh.faces.is_empty(),
        "the decoded mesh is empty (no surface found); nothing written to {}",
        path.display()
    );
    ensure!(
        !opts.bake || gaussians.is_some(),
        "baking a texture needs the Gaussians (decode them, or pass --no-bake)"
    );
    let raster = rasterizer_for(device);
    let raster = raster.as_ref();
    let splats = gaussians.map(SplatData::from_gaussian);
    let (out, report) = textured_mesh_from(raster, mesh, splats.as_ref(), opts)?;
    write_export_glb(path, &out)?;
    if let Some(p) = preview_path {
        let uvtex = match (&out.uvs, &out.texture) {
            (Some(u), Some(t)) => Some((u.as_slice(), t)),
            _ => None,
        };
        preview::write_preview(
            p,
            raster,
            256,
            &out.vertices,
            &out.faces,
            uvtex,
            out.colors.as_deref(),
            splats.as_ref(),
        )?;
    }
    Ok(report)
}

/// The mesh a GLB gets (cleaned, decimated, unwrapped and baked unless `opts.bake` is off), without
/// writing anything: the daemon hands its arrays to clients. `raster`: see [`rasterizer_for`].
pub fn textured_mesh(
    raster: &dyn Rasterizer,
    mesh: &MeshExtractResult,
    gaussians: Option<&Gaussian>,
    opts: &BakeOptions,
) -> Result<(ExportMesh, PostprocessReport)> {
    ensure!(
        mesh.success && !mesh.faces.is_empty(),
        "the decoded mesh is empty (no surface found)"
    );
    ensure!(
        !opts.bake || gaussians.is_some(),
        "baking a texture needs the Gaussians (decode them, or do not bake)"
    );
    let splats = gaussians.map(SplatData::from_gaussian);
    textured_mesh_from(raster, mesh, splats.as_ref(), opts)
}

fn textured_mesh_from(
    raster: &dyn Rasterizer,
    mesh: &MeshExtractResult,
    splats: Option<&SplatData>,
    opts: &BakeOptions,
) -> Result<(ExportMesh, PostprocessReport)> {
    let colors: Option<Vec<[f32; 3]>> = (mesh.attr_dim >= 3).then(|| {
        mesh.vertex_attrs
            .chunks_exact(mesh.attr_dim)
            .map(|a| [a[0], a[1], a[2]])
            .collect()
    });
    let tri = TriMesh::new(mesh.vertices.clone(), mesh.faces.clone());
    to_textured_mesh(raster, &tri, colors.as_deref(), splats, opts)
}

/// Writes an [`ExportMesh`] as GLB (textured when it has UVs and a texture).
pub fn write_export_glb(path: &Path, out: &ExportMesh) -> Result<()> {
    let glb = GlbMesh {
        vertices: &out.vertices,
        faces: &out.faces,
        colors: out.colors.as_deref(),
    };
    let png = match &out.texture {
        Some(t) => Some(encode_png_rgb(t.width, t.height, &t.to_rgb8())?),
        None => None,
    };
    let tex = match (&out.uvs, &png) {
        (Some(uvs), Some(png)) => Some(GlbTexture { uvs, png }),
        _ => None,
    };
    write_glb_textured(path, &glb, tex)
}
