//! The GLB flags shared by `generate`, `variant` and `decode`: texture baking, decimation and a
//! preview image. They become a [`BakeOptions`] for `export::textured`.

use std::path::PathBuf;

use anyhow::Result;

use crate::postprocessing::BakeOptions;

fn parse_ratio(s: &str) -> Result<f32, String> {
    let x: f32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(0.0..1.0).contains(&x) {
        return Err("the fraction of triangles to remove must be in [0, 1)".into());
    }
    Ok(x)
}

/// How the GLB is made.
#[derive(Debug, Clone, clap::Args)]
pub struct GlbArgs {
    /// Size of the baked base-colour texture (square, 512 to 4096).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(512..=4096))]
    pub texture_size: u32,
    /// Decimate the mesh to this many triangles (default: --simplify).
    #[arg(long, conflicts_with_all = ["simplify", "keep_high_poly"])]
    pub target_faces: Option<usize>,
    /// Fraction of the triangles to remove, as the original's `to_glb(simplify=...)`.
    #[arg(long, default_value_t = 0.95, value_parser = parse_ratio)]
    pub simplify: f32,
    /// Keep every triangle (no decimation; the texture is still baked).
    #[arg(long)]
    pub keep_high_poly: bool,
    /// No texture: write the decoder's vertex colours on the full mesh.
    #[arg(long)]
    pub no_bake: bool,
    /// Also write a PNG grid of views of the result (mesh above, Gaussians below).
    #[arg(long)]
    pub preview: Option<PathBuf>,
}

impl Default for GlbArgs {
    fn default() -> Self {
        Self {
            texture_size: 1024,
            target_faces: None,
            simplify: 0.95,
            keep_high_poly: false,
            no_bake: false,
            preview: None,
        }
    }
}

impl GlbArgs {
    pub fn options(&self) -> Result<BakeOptions> {
        let o = BakeOptions {
            bake: !self.no_bake,
            texture_size: self.texture_size as usize,
            target_faces: self.target_faces,
            simplify: self.simplify,
            keep_high_poly: self.keep_high_poly,
            ..Default::default()
        };
        o.validate()?;
        Ok(o)
    }
}
