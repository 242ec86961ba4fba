//! The bake's texel projection (CPU): surface points under a texture's texels are projected into
//! a rendered view; where the mesh's depth buffer does not hide a point and the Gaussians cover
//! it, the point takes the view's colour, weighted by `cos(normal, view)^4 · alpha`. The texture
//! bake (`trellisd`'s `postprocessing::bake`) sums this over its views; the GPU backend runs the
//! same rule on the device (`cuda/raster.cu`, `bake_accumulate`).

use rayon::prelude::*;

use super::camera::Camera;
use super::splat::SplatImage;
use super::triangles::RasterBuffers;
use super::RasterError;

/// A texel's surface point and unit normal (world space).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TexelPoint {
    pub pos: [f32; 3],
    pub normal: [f32; 3],
}

/// Bilinear colour and alpha of a rendered image at continuous pixel coordinates (pixel `i`'s
/// centre at `i + 0.5`, clamped to the edge).
pub fn sample_view(img: &SplatImage, px: f32, py: f32) -> ([f32; 3], f32) {
    let (w, h) = (img.width, img.height);
    let x = (px - 0.5).clamp(0.0, w as f32 - 1.0);
    let y = (py - 0.5).clamp(0.0, h as f32 - 1.0);
    let (x0, y0) = (x.floor() as usize, y.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let wts = [
        (y0 * w + x0, (1.0 - fx) * (1.0 - fy)),
        (y0 * w + x1, fx * (1.0 - fy)),
        (y1 * w + x0, (1.0 - fx) * fy),
        (y1 * w + x1, fx * fy),
    ];
    let mut c = [0f32; 3];
    let mut a = 0f32;
    for (i, wt) in wts {
        for (k, ck) in c.iter_mut().enumerate() {
            *ck += img.color[i][k] * wt;
        }
        a += img.alpha[i] * wt;
    }
    (c, a)
}

/// Adds one view to `acc` (`[r, g, b, weight]` per texel): `depth` is the mesh rasterised
/// through `cam`, `img` the Gaussians rendered through it over a black background.
pub fn accumulate_view(
    cam: &Camera,
    depth: &RasterBuffers,
    img: &SplatImage,
    texels: &[TexelPoint],
    acc: &mut [[f32; 4]],
) -> Result<(), RasterError> {
    let (w, h) = (cam.width, cam.height);
    for (what, got, want) in [
        ("depth buffer pixels", depth.frags.len(), w * h),
        ("splat image pixels", img.color.len(), w * h),
        ("splat alpha pixels", img.alpha.len(), w * h),
        ("bake accumulators", acc.len(), texels.len()),
    ] {
        if got != want {
            return Err(RasterError::Size { what, got, want });
        }
    }
    let eye = cam.center();
    // Size of a pixel at unit depth: the depth tolerance grows with it.
    let pix = 1.0 / (cam.fx * w as f32);
    acc.par_iter_mut()
        .zip(texels.par_iter())
        .for_each(|(a, t)| {
            let Some(p) = cam.project(t.pos) else {
                return;
            };
            if p[0] < 0.0 || p[1] < 0.0 || p[0] >= w as f32 || p[1] >= h as f32 {
                return;
            }
            let v = [eye[0] - t.pos[0], eye[1] - t.pos[1], eye[2] - t.pos[2]];
            let vn = v[0] * t.normal[0] + v[1] * t.normal[1] + v[2] * t.normal[2];
            let cos = vn / (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt().max(1e-12);
            if cos <= 0.05 {
                return;
            }
            // Visible when nothing in the mesh's depth buffer (3×3 neighbourhood) is clearly in
            // front of the texel's point.
            let (ix, iy) = (p[0] as usize, p[1] as usize);
            let mut front = f32::INFINITY;
            for y in iy.saturating_sub(1)..(iy + 2).min(h) {
                for x in ix.saturating_sub(1)..(ix + 2).min(w) {
                    front = front.min(depth.frags[y * w + x].depth);
                }
            }
            let tol = 4.0 * pix * p[2] / cos.max(0.2) + 2e-3;
            if p[2] > front + tol {
                return;
            }
            let (c, alpha) = sample_view(img, p[0], p[1]);
            if alpha < 0.05 {
                return;
            }
            let c2 = cos * cos;
            let wt = c2 * c2 * alpha;
            // The background is black: colour / alpha un-premultiplies it.
            for k in 0..3 {
                a[k] += wt * c[k] / alpha;
            }
            a[3] += wt;
        });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raster::triangles;

    #[test]
    fn a_visible_texel_takes_the_view_colour_and_a_hidden_one_nothing() {
        let cam = Camera::orbit(0.0, 0.0, 2.0, 40.0, 32);
        // The camera sits at +y looking at the origin: a square at y = 0.2 facing it hides
        // what is behind it (y = -0.2).
        let v = [
            [-0.3, 0.2, -0.3],
            [0.3, 0.2, -0.3],
            [0.3, 0.2, 0.3],
            [-0.3, 0.2, 0.3],
        ];
        let depth = triangles::rasterize(&cam, &v, &[[0, 1, 2], [0, 2, 3]]).unwrap();
        let img = SplatImage {
            width: 32,
            height: 32,
            color: vec![[0.4, 0.2, 0.1]; 32 * 32],
            alpha: vec![0.5; 32 * 32],
            depth: vec![0.0; 32 * 32],
        };
        let texels = [
            TexelPoint {
                pos: [0.0, 0.2, 0.0],
                normal: [0.0, 1.0, 0.0],
            },
            TexelPoint {
                pos: [0.0, -0.2, 0.0],
                normal: [0.0, 1.0, 0.0],
            },
            TexelPoint {
                pos: [0.0, 0.2, 0.0],
                normal: [0.0, -1.0, 0.0],
            },
        ];
        let mut acc = vec![[0f32; 4]; 3];
        accumulate_view(&cam, &depth, &img, &texels, &mut acc).unwrap();
        // Facing the camera head-on: cos = 1, weight = alpha; colour un-premultiplied.
        assert!((acc[0][3] - 0.5).abs() < 1e-5, "{:?}", acc[0]);
        for k in 0..3 {
            assert!((acc[0][k] / acc[0][3] - img.color[0][k] / 0.5).abs() < 1e-5);
        }
        assert_eq!(acc[1], [0.0; 4], "behind the square");
        assert_eq!(acc[2], [0.0; 4], "facing away");
        let bad = accumulate_view(&cam, &depth, &img, &texels, &mut acc[..2]);
        assert!(bad.is_err());
    }
}
