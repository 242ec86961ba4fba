//! Texture baking from 3-D Gaussians (the `bake_texture` step of `postprocessing_utils.py`
//! without its 2,500-step optimisation through nvdiffrast).
//!
//! Every texel the UV layout covers is mapped to its surface point and normal (the layout is
//! rasterised in texture space). The Gaussians are rendered from views spread over the sphere,
//! the mesh's depth from the same views decides which texels each view sees, and each seen texel
//! takes the view's colour weighted by `cos(normal, view)^4 · alpha`. Texels no view saw and the
//! gaps between charts are filled by dilation, then a push-pull pyramid, so seams do not bleed
//! the background when the texture is filtered. Deterministic: a fixed set of views and sums in
//! a fixed order.

use anyhow::{ensure, Result};
use rayon::prelude::*;
use trellis_kernels::raster::camera::hammersley_cameras;
use trellis_kernels::raster::splat::covariance;
use trellis_kernels::raster::{Camera, Rasterizer, SplatSettings, Splats, TexelPoint};

use super::topology::{cross, dot, sub};
use super::uv::UvMesh;
use crate::representations::gaussian::Gaussian;

/// `SH_C0` of the original's `sh_utils.py` (degree-0 spherical harmonic).
pub const SH_C0: f32 = 0.282_094_8;

/// Gaussians ready for the splatting renderer (activated parameters).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SplatData {
    pub means: Vec<[f32; 3]>,
    pub covariances: Vec<[f32; 6]>,
    pub colors: Vec<[f32; 3]>,
    pub opacities: Vec<f32>,
}

impl SplatData {
    /// From a decoded `Gaussian` (sh_degree 0: colour `SH_C0 · f_dc + 0.5`, clamped at 0).
    pub fn from_gaussian(g: &Gaussian) -> Self {
        let xyz = g.get_xyz();
        let scale = g.get_scaling();
        let rot = g.get_rotation();
        let op = g.get_opacity();
        let f = g.get_features();
        let n = g.len();
        Self {
            means: (0..n)
                .map(|i| [xyz[3 * i], xyz[3 * i + 1], xyz[3 * i + 2]])
                .collect(),
            covariances: (0..n)
                .map(|i| {
                    covariance(
                        [scale[3 * i], scale[3 * i + 1], scale[3 * i + 2]],
                        [rot[4 * i], rot[4 * i + 1], rot[4 * i + 2], rot[4 * i + 3]],
                    )
                })
                .collect(),
            colors: (0..n)
                .map(|i| [0, 1, 2].map(|k| (SH_C0 * f[3 * i + k] + 0.5).max(0.0)))
                .collect(),
            opacities: op,
        }
    }

    pub fn splats(&self) -> Splats<'_> {
        Splats {
            means: &self.means,
            covariances: &self.covariances,
            colors: &self.colors,
            opacities: &self.opacities,
        }
    }
}

/// An RGB texture, row-major, row 0 at v = 0 (glTF). Values are the rendered colours in
/// `[0, 1]`, stored as sRGB-encoded bytes without conversion (as the original does).
#[derive(Debug, Clone, PartialEq)]
pub struct Texture {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<[f32; 3]>,
}

impl Texture {
    pub fn to_rgb8(&self) -> Vec<u8> {
        self.rgb
            .iter()
            .flat_map(|c| c.map(|x| (x.clamp(0.0, 1.0) * 255.0).round() as u8))
            .collect()
    }

    /// Bilinear lookup at glTF texture coordinates, clamped to the edge.
    pub fn sample(&self, uv: [f32; 2]) -> [f32; 3] {
        let x = (uv[0] * self.width as f32 - 0.5).clamp(0.0, self.width as f32 - 1.0);
        let y = (uv[1] * self.height as f32 - 0.5).clamp(0.0, self.height as f32 - 1.0);
        let (x0, y0) = (x.floor() as usize, y.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(self.width - 1), (y0 + 1).min(self.height - 1));
        let (fx, fy) = (x - x0 as f32, y - y0 as f32);
        let at = |x: usize, y: usize| self.rgb[y * self.width + x];
        let mut out = [0f32; 3];
        for (k, o) in out.iter_mut().enumerate() {
            *o = (at(x0, y0)[k] * (1.0 - fx) + at(x1, y0)[k] * fx) * (1.0 - fy)
                + (at(x0, y1)[k] * (1.0 - fx) + at(x1, y1)[k] * fx) * fy;
        }
        out
    }
}

/// Options of [`bake_texture`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BakeSettings {
    pub texture_size: usize,
    /// Views of the Gaussians (radius 2, fov 40°, spread over the sphere).
    pub views: usize,
    pub view_resolution: usize,
}

impl BakeSettings {
    /// 32 views at half the texture size (512 to 1024 pixels): a texel is seen from many views
    /// at about one pixel each, and splatting cost stays a quarter of full-size views
    /// (`bake_quality.rs` checks 1024² textures from 512² views).
    pub fn for_texture(texture_size: usize) -> Self {
        Self {
            texture_size,
            views: 32,
            view_resolution: (texture_size / 2).clamp(512, 1024),
        }
    }
}

/// The texels the UV layout covers (row-major indices) and the surface point and unit normal
/// under each.
fn texel_surfaces(
    raster: &dyn Rasterizer,
    mesh: &UvMesh,
    size: usize,
) -> Result<(Vec<usize>, Vec<TexelPoint>)> {
    let pts: Vec<[f32; 3]> = mesh
        .uvs
        .iter()
        .map(|uv| [uv[0] * size as f32, uv[1] * size as f32, 1.0])
        .collect();
    let r = raster.screen_triangles(size, size, &pts, &mesh.faces)?;
    Ok(r.frags
        .par_iter()
        .enumerate()
        .filter(|(_, f)| !f.is_empty())
        .map(|(index, f)| {
            let tri = mesh.faces[f.face as usize].map(|i| mesh.vertices[i as usize]);
            let w = f.weights();
            let pos = [0, 1, 2].map(|k| w[0] * tri[0][k] + w[1] * tri[1][k] + w[2] * tri[2][k]);
            let n = cross(sub(tri[1], tri[0]), sub(tri[2], tri[0]));
            let l = dot(n, n).sqrt().max(1e-20);
            (
                index,
                TexelPoint {
                    pos,
                    normal: n.map(|x| x / l),
                },
            )
        })
        .unzip())
}

/// Bakes the Gaussians' appearance into a texture over the mesh's UV layout.
pub fn bake_texture(
    raster: &dyn Rasterizer,
    mesh: &UvMesh,
    gaussians: &SplatData,
    settings: &BakeSettings,
) -> Result<Texture> {
    let size = settings.texture_size;
    ensure!(
        (16..=8192).contains(&size),
        "texture size {size} is out of range (16 to 8192)"
    );
    ensure!(settings.views > 0, "baking needs at least one view");
    ensure!(!mesh.faces.is_empty(), "baking needs a mesh with triangles");
    let (index, texels) = texel_surfaces(raster, mesh, size)?;
    let cams: Vec<Camera> = hammersley_cameras(settings.views, 2.0, 40.0, settings.view_resolution)
        .into_iter()
        .map(|c| c.with_clip(0.5, 4.0))
        .collect();
    let acc = raster.bake_views(
        &cams,
        &mesh.vertices,
        &mesh.faces,
        &gaussians.splats(),
        &SplatSettings::default(),
        &texels,
    )?;
    let mut rgb = vec![[0f32; 3]; size * size];
    let mut valid = vec![false; size * size];
    for (&t, a) in index.iter().zip(&acc) {
        if a[3] > 0.0 {
            rgb[t] = [a[0] / a[3], a[1] / a[3], a[2] / a[3]];
            valid[t] = true;
        }
    }
    fill_texture(&mut rgb, &mut valid, size, size, 4);
    Ok(Texture {
        width: size,
        height: size,
        rgb,
    })
}

/// Fills invalid texels: `dilate` passes of 8-neighbour averaging from valid texels (seam
/// padding), then push-pull (a pyramid of valid averages, read back coarse to fine) for the rest.
pub fn fill_texture(rgb: &mut [[f32; 3]], valid: &mut [bool], w: usize, h: usize, dilate: usize) {
    for _ in 0..dilate {
        let mut next = valid.to_vec();
        let prev = rgb.to_vec();
        for y in 0..h {
            for x in 0..w {
                if valid[y * w + x] {
                    continue;
                }
                let mut s = [0f32; 3];
                let mut n = 0;
                for yy in y.saturating_sub(1)..(y + 2).min(h) {
                    for xx in x.saturating_sub(1)..(x + 2).min(w) {
                        if valid[yy * w + xx] {
                            for k in 0..3 {
                                s[k] += prev[yy * w + xx][k];
                            }
                            n += 1;
                        }
                    }
                }
                if n > 0 {
                    rgb[y * w + x] = s.map(|v| v / n as f32);
                    next[y * w + x] = true;
                }
            }
        }
        valid.copy_from_slice(&next);
    }
    if valid.iter().all(|&v| v) || !valid.iter().any(|&v| v) {
        return;
    }
    // Push: coarser averages of valid texels.
    let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
    let mut coarse = vec![[0f32; 3]; cw * ch];
    let mut cvalid = vec![false; cw * ch];
    for cy in 0..ch {
        for cx in 0..cw {
            let mut s = [0f32; 3];
            let mut n = 0;
            for y in 2 * cy..(2 * cy + 2).min(h) {
                for x in 2 * cx..(2 * cx + 2).min(w) {
                    if valid[y * w + x] {
                        for k in 0..3 {
                            s[k] += rgb[y * w + x][k];
                        }
                        n += 1;
                    }
                }
            }
            if n > 0 {
                coarse[cy * cw + cx] = s.map(|v| v / n as f32);
                cvalid[cy * cw + cx] = true;
            }
        }
    }
    fill_texture(&mut coarse, &mut cvalid, cw, ch, 0);
    // Pull.
    for y in 0..h {
        for x in 0..w {
            if !valid[y * w + x] {
                rgb[y * w + x] = coarse[(y / 2) * cw + x / 2];
                valid[y * w + x] = true;
            }
        }
    }
}

/// Renders the textured mesh through a camera over a background colour (for previews and the
/// quality check).
pub fn render_textured(
    raster: &dyn Rasterizer,
    cam: &Camera,
    mesh: &UvMesh,
    texture: &Texture,
    background: [f32; 3],
) -> Result<Vec<[f32; 3]>> {
    let r = raster.triangles(cam, &mesh.vertices, &mesh.faces)?;
    let uv: Vec<f32> = mesh.uvs.iter().flatten().copied().collect();
    let uvs = r.interpolate(&mesh.faces, &uv, 2)?;
    Ok(r.frags
        .par_iter()
        .enumerate()
        .map(|(i, f)| {
            if f.is_empty() {
                background
            } else {
                texture.sample([uvs[2 * i], uvs[2 * i + 1]])
            }
        })
        .collect())
}

/// Peak signal-to-noise ratio (dB) of two images with values in `[0, 1]`.
pub fn psnr(a: &[[f32; 3]], b: &[[f32; 3]]) -> f64 {
    let mse: f64 = a
        .iter()
        .zip(b)
        .map(|(p, q)| (0..3).map(|k| ((p[k] - q[k]) as f64).powi(2)).sum::<f64>())
        .sum::<f64>()
        / (3 * a.len().max(1)) as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        -10.0 * mse.log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_pads_and_pushes_pulls_every_texel() {
        let (w, h) = (8, 8);
        let mut rgb = vec![[0f32; 3]; 64];
        let mut valid = vec![false; 64];
        rgb[9] = [1.0, 0.0, 0.0];
        valid[9] = true;
        rgb[54] = [0.0, 0.0, 1.0];
        valid[54] = true;
        fill_texture(&mut rgb, &mut valid, w, h, 1);
        assert!(valid.iter().all(|&v| v));
        // Dilation: neighbours of (1,1) are red, of (6,6) blue.
        assert_eq!(rgb[0], [1.0, 0.0, 0.0]);
        assert_eq!(rgb[63], [0.0, 0.0, 1.0]);
        assert_eq!(rgb[9], [1.0, 0.0, 0.0], "valid texels are untouched");
        // Every texel is a mix of the two colours (no black).
        assert!(rgb
            .iter()
            .all(|c| (c[0] + c[2] - 1.0).abs() < 1e-5 && c[1] == 0.0));
    }

    #[test]
    fn texture_sampling_is_bilinear_at_texel_centres() {
        let t = Texture {
            width: 2,
            height: 1,
            rgb: vec![[0.0; 3], [1.0; 3]],
        };
        assert_eq!(t.sample([0.25, 0.5]), [0.0; 3]);
        assert_eq!(t.sample([0.75, 0.5]), [1.0; 3]);
        assert!((t.sample([0.5, 0.5])[0] - 0.5).abs() < 1e-6);
        assert_eq!(t.to_rgb8(), vec![0, 0, 0, 255, 255, 255]);
        assert!(psnr(&t.rgb, &t.rgb).is_infinite());
        assert!((psnr(&[[0.0; 3]], &[[0.1; 3]]) - 20.0).abs() < 1e-4);
    }
}
