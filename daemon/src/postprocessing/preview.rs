//! `--preview FILE.png`: a small grid of views of the result, the mesh (textured, else vertex
//! colours, else shaded grey) on the top row and the Gaussians below, from four yaws at a 20°
//! pitch (the original offers `render_video` / `render_snapshot` instead).

use std::path::Path;

use anyhow::{Context, Result};
use rayon::prelude::*;
use trellis_kernels::raster::{Camera, Rasterizer, SplatSettings};

use super::bake::{SplatData, Texture};
use super::topology::{cross, dot, sub};
use crate::export::atomic::write_atomic;

const BACKGROUND: [f32; 3] = [0.12, 0.12, 0.14];

/// The views of the preview grid.
pub fn preview_cameras(resolution: usize) -> Vec<Camera> {
    (0..4)
        .map(|i| {
            let yaw = -16f32.to_radians() + i as f32 * std::f32::consts::FRAC_PI_2;
            Camera::orbit(yaw, 20f32.to_radians(), 2.0, 40.0, resolution)
        })
        .collect()
}

/// One mesh view.
pub fn render_mesh(
    raster: &dyn Rasterizer,
    cam: &Camera,
    vertices: &[[f32; 3]],
    faces: &[[u32; 3]],
    uvs: Option<(&[[f32; 2]], &Texture)>,
    colors: Option<&[[f32; 3]]>,
) -> Result<Vec<[f32; 3]>> {
    let r = raster.triangles(cam, vertices, faces)?;
    let tex = match uvs {
        Some((uv, t)) => {
            let flat: Vec<f32> = uv.iter().flatten().copied().collect();
            Some((r.interpolate(faces, &flat, 2)?, t))
        }
        None => None,
    };
    let col = match colors {
        Some(c) => {
            Some(r.interpolate(faces, &c.iter().flatten().copied().collect::<Vec<_>>(), 3)?)
        }
        None => None,
    };
    let eye = cam.center();
    Ok(r.frags
        .par_iter()
        .enumerate()
        .map(|(i, f)| {
            if f.is_empty() {
                return BACKGROUND;
            }
            if let Some((uv, t)) = &tex {
                return t.sample([uv[2 * i], uv[2 * i + 1]]);
            }
            let tri = faces[f.face as usize].map(|v| vertices[v as usize]);
            let n = cross(sub(tri[1], tri[0]), sub(tri[2], tri[0]));
            let w = f.weights();
            let p = [0, 1, 2].map(|k| w[0] * tri[0][k] + w[1] * tri[1][k] + w[2] * tri[2][k]);
            let v = sub(eye, p);
            let cos = (dot(n, v) / (dot(n, n) * dot(v, v)).sqrt().max(1e-20)).abs();
            let shade = 0.3 + 0.7 * cos;
            let base = match &col {
                Some(c) => [c[3 * i], c[3 * i + 1], c[3 * i + 2]],
                None => [0.8; 3],
            };
            base.map(|x| x * shade)
        })
        .collect())
}

/// Renders the grid (`resolution` pixels per view) and writes it as a PNG, atomically.
#[allow(clippy::too_many_arguments)]
pub fn write_preview(
    path: &Path,
    raster: &dyn Rasterizer,
    resolution: usize,
    vertices: &[[f32; 3]],
    faces: &[[u32; 3]],
    uvs: Option<(&[[f32; 2]], &Texture)>,
    colors: Option<&[[f32; 3]]>,
    gaussians: Option<&SplatData>,
) -> Result<()> {
    let cams = preview_cameras(resolution);
    let rows = if gaussians.is_some() { 2 } else { 1 };
    let (w, h) = (resolution * cams.len(), resolution * rows);
    let mut img = image::RgbImage::new(w as u32, h as u32);
    let mut put = |col: usize, row: usize, px: &[[f32; 3]]| {
        for (i, c) in px.iter().enumerate() {
            let (x, y) = (
                col * resolution + i % resolution,
                row * resolution + i / resolution,
            );
            let rgb = c.map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8);
            img.put_pixel(x as u32, y as u32, image::Rgb(rgb));
        }
    };
    for (i, cam) in cams.iter().enumerate() {
        let m = render_mesh(raster, cam, vertices, faces, uvs, colors)?;
        put(i, 0, &m);
        if let Some(g) = gaussians {
            let s = raster.splat(
                cam,
                &g.splats(),
                &SplatSettings {
                    background: BACKGROUND,
                    ..Default::default()
                },
            )?;
            put(i, 1, &s.color);
        }
    }
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .context("encoding the preview PNG")?;
    write_atomic(path, |w| Ok(w.write_all(&bytes)?))
}
