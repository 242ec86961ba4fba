//! Mesh post-processing and texture baking (twin of `trellis/utils/postprocessing_utils.py`),
//! with our own rasterisers (`trellis_kernels::raster`) in place of nvdiffrast: visibility
//! clean-up and hole filling ([`clean`]), decimation ([`simplify`], meshoptimizer), UV unwrap
//! ([`uv`], xatlas) and baking the Gaussians into a texture ([`bake`]). [`to_textured_mesh`] runs
//! them in the original's `to_glb` order; [`preview`] renders a grid of views.

pub mod bake;
pub mod clean;
pub mod preview;
pub mod simplify;
pub mod topology;
pub mod uv;

use anyhow::{ensure, Result};
use trellis_kernels::raster::Rasterizer;

use self::bake::{BakeSettings, SplatData, Texture};
use self::clean::VisibilityOptions;
use self::topology::TriMesh;

/// How the GLB mesh is made (the `to_glb` arguments, plus ours).
#[derive(Debug, Clone, PartialEq)]
pub struct BakeOptions {
    /// Bake a texture from the Gaussians (false: vertex colours from the mesh decoder).
    pub bake: bool,
    /// Square texture size, 512 to 4096.
    pub texture_size: usize,
    /// Triangles to keep; `None`: decided by `simplify`.
    pub target_faces: Option<usize>,
    /// Fraction of triangles to remove (the original's `simplify`, default 0.95).
    pub simplify: f32,
    /// Keep every triangle (no decimation).
    pub keep_high_poly: bool,
    /// Remove invisible faces and fill small holes.
    pub clean: bool,
    /// Views used to bake.
    pub views: usize,
}

impl Default for BakeOptions {
    fn default() -> Self {
        Self {
            bake: true,
            texture_size: 1024,
            target_faces: None,
            simplify: 0.95,
            keep_high_poly: false,
            clean: true,
            views: 32,
        }
    }
}

impl BakeOptions {
    /// Checks the values before any long work.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (512..=4096).contains(&self.texture_size),
            "--texture-size {} is out of range (512 to 4096)",
            self.texture_size
        );
        ensure!(
            (0.0..1.0).contains(&self.simplify),
            "--simplify {} must be at least 0 and below 1 (the fraction of triangles removed)",
            self.simplify
        );
        if let Some(t) = self.target_faces {
            ensure!(t >= 4, "--target-faces {t} is too small (at least 4)");
        }
        ensure!(self.views >= 1, "baking needs at least one view");
        Ok(())
    }

    /// The triangle count to decimate to, for a mesh of `faces` triangles.
    pub fn target_for(&self, faces: usize) -> usize {
        if self.keep_high_poly {
            return faces;
        }
        match self.target_faces {
            Some(t) => t.min(faces),
            None => ((faces as f64 * (1.0 - self.simplify as f64)).round() as usize)
                .clamp(4, faces.max(4)),
        }
    }
}

/// The mesh the GLB gets.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportMesh {
    pub vertices: Vec<[f32; 3]>,
    pub faces: Vec<[u32; 3]>,
    /// glTF texture coordinates (with `texture`).
    pub uvs: Option<Vec<[f32; 2]>>,
    pub texture: Option<Texture>,
    /// Vertex colours (without a texture).
    pub colors: Option<Vec<[f32; 3]>>,
}

/// What each step did (for progress output and the bench).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PostprocessReport {
    pub faces_in: usize,
    pub removed_invisible: usize,
    pub holes_filled: usize,
    pub faces_out: usize,
    pub charts: usize,
    /// Seconds per step: clean, simplify, unwrap, bake.
    pub seconds: [f64; 4],
}

/// Cleans, decimates, unwraps and bakes (`to_glb` of the original, in its order: clean-up after
/// decimation there; we clean the full mesh first, which sees thin parts better, then decimate).
/// `colors` are per-vertex colours used when not baking.
pub fn to_textured_mesh(
    raster: &dyn Rasterizer,
    mesh: &TriMesh,
    colors: Option<&[[f32; 3]]>,
    gaussians: Option<&SplatData>,
    opts: &BakeOptions,
) -> Result<(ExportMesh, PostprocessReport)> {
    opts.validate()?;
    ensure!(!mesh.faces.is_empty(), "the mesh has no triangles");
    let mut rep = PostprocessReport {
        faces_in: mesh.faces.len(),
        ..Default::default()
    };
    if !opts.bake {
        // Vertex colours as the decoder made them; no topology change keeps them aligned.
        let out = ExportMesh {
            vertices: mesh.vertices.clone(),
            faces: mesh.faces.clone(),
            uvs: None,
            texture: None,
            colors: colors.map(<[_]>::to_vec),
        };
        rep.faces_out = mesh.faces.len();
        return Ok((out, rep));
    }
    let g = gaussians.ok_or_else(|| anyhow::anyhow!("baking a texture needs the Gaussians"))?;
    let t = std::time::Instant::now();
    let mut m = mesh.clone().compact();
    if opts.clean {
        let (cleaned, removed) =
            clean::remove_invisible_faces(raster, &m, &VisibilityOptions::default())?;
        rep.removed_invisible = removed;
        // Holes of up to 32 edges whose perimeter is under 0.3 (the decoder's unit cube).
        let (filled, n) = clean::fill_small_holes(&cleaned, 32, 0.3);
        rep.holes_filled = n;
        m = filled;
        ensure!(
            !m.faces.is_empty(),
            "no visible surface is left after clean-up"
        );
    }
    rep.seconds[0] = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let target = opts.target_for(m.faces.len());
    let m = simplify::simplify(&m, target)?;
    rep.seconds[1] = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let u = uv::parametrize(&m, opts.texture_size as u32, 2)?;
    rep.charts = u.charts;
    rep.seconds[2] = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let mut settings = BakeSettings::for_texture(opts.texture_size);
    settings.views = opts.views;
    let texture = bake::bake_texture(raster, &u, g, &settings)?;
    rep.seconds[3] = t.elapsed().as_secs_f64();
    rep.faces_out = u.faces.len();
    Ok((
        ExportMesh {
            vertices: u.vertices,
            faces: u.faces,
            uvs: Some(u.uvs),
            texture: Some(texture),
            colors: None,
        },
        rep,
    ))
}
