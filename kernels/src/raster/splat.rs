//! Forward 3-D Gaussian splatting (CPU), as described in the 3DGS paper (Kerbl et al. 2023):
//! each Gaussian is projected to a 2-D Gaussian through the local affine (EWA) approximation of
//! the perspective, sorted front to back per 8×8 tile (smaller than the paper's 16×16: with many tiny Gaussians a pixel scans its whole tile list, so cost follows the list length), and alpha-blended
//! (`C = Σ c_i α_i Π_{j<i} (1 - α_j)`, stopping once the transmittance drops below 1e-4).
//!
//! Like the renderer TRELLIS uses (the Mip-Splatting rasteriser with `kernel_size = 0.1`), the
//! 2-D covariance is dilated by `kernel_size` pixels² and the opacity scaled by
//! `sqrt(det(Σ) / det(Σ + kernel))`, so small Gaussians do not alias. Written from the paper;
//! none of the original CUDA rasteriser's code is used.

use rayon::prelude::*;

use super::camera::Camera;
use super::RasterError;

const TILE: usize = 8;

/// Gaussians in world space, one row each.
#[derive(Debug, Clone, Copy)]
pub struct Splats<'a> {
    pub means: &'a [[f32; 3]],
    /// Upper triangle of each 3-D covariance: `xx, xy, xz, yy, yz, zz`.
    pub covariances: &'a [[f32; 6]],
    /// RGB (already activated: `SH_C0 · f_dc + 0.5`, clamped at 0).
    pub colors: &'a [[f32; 3]],
    pub opacities: &'a [f32],
}

/// Options of a splat rendering.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SplatSettings {
    /// 2-D low-pass filter added to the projected covariance, in pixels² (TRELLIS: 0.1).
    pub kernel_size: f32,
    pub background: [f32; 3],
    /// Gaussians nearer than this (camera-space z) are culled, as in 3DGS.
    pub near: f32,
}

impl Default for SplatSettings {
    fn default() -> Self {
        Self {
            kernel_size: 0.1,
            background: [0.0; 3],
            near: 0.2,
        }
    }
}

/// A rendered image, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct SplatImage {
    pub width: usize,
    pub height: usize,
    /// Blended colour over the background.
    pub color: Vec<[f32; 3]>,
    /// Accumulated opacity `1 - T`.
    pub alpha: Vec<f32>,
    /// Opacity-weighted camera depth divided by `alpha` (0 where `alpha` is 0).
    pub depth: Vec<f32>,
}

/// The 3-D covariance `R S Sᵀ Rᵀ` of a Gaussian with per-axis scales and a unit quaternion
/// `(w, x, y, z)` (the original's `build_scaling_rotation`).
pub fn covariance(scale: [f32; 3], q: [f32; 4]) -> [f32; 6] {
    let n = (q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3])
        .sqrt()
        .max(1e-12);
    let (r, x, y, z) = (q[0] / n, q[1] / n, q[2] / n, q[3] / n);
    let rot = [
        [
            1.0 - 2.0 * (y * y + z * z),
            2.0 * (x * y - r * z),
            2.0 * (x * z + r * y),
        ],
        [
            2.0 * (x * y + r * z),
            1.0 - 2.0 * (x * x + z * z),
            2.0 * (y * z - r * x),
        ],
        [
            2.0 * (x * z - r * y),
            2.0 * (y * z + r * x),
            1.0 - 2.0 * (x * x + y * y),
        ],
    ];
    let m = |i: usize, j: usize| -> f32 {
        (0..3)
            .map(|k| rot[i][k] * scale[k] * scale[k] * rot[j][k])
            .sum()
    };
    [m(0, 0), m(0, 1), m(0, 2), m(1, 1), m(1, 2), m(2, 2)]
}

#[derive(Debug, Clone, Copy)]
struct Projected {
    xy: [f32; 2],
    /// Inverse 2-D covariance (a, b, c): power = -½(a dx² + c dy²) - b dx dy.
    conic: [f32; 3],
    opacity: f32,
    depth: f32,
    tiles: [usize; 4],
}

fn project(
    cam: &Camera,
    mean: [f32; 3],
    cov: [f32; 6],
    opacity: f32,
    s: &SplatSettings,
    tiles_x: usize,
    tiles_y: usize,
) -> Option<Projected> {
    let t = cam.to_camera(mean);
    if !t.iter().all(|v| v.is_finite()) || t[2] <= s.near {
        return None;
    }
    let (fx, fy) = cam.focal_px();
    let (w, h) = (cam.width as f32, cam.height as f32);
    let xy = [fx * t[0] / t[2] + cam.cx * w, fy * t[1] / t[2] + cam.cy * h];
    // Jacobian of the perspective at t, with the 3DGS guard band on the view direction.
    let limx = 1.3 * 0.5 / cam.fx;
    let limy = 1.3 * 0.5 / cam.fy;
    let tx = (t[0] / t[2]).clamp(-limx, limx) * t[2];
    let ty = (t[1] / t[2]).clamp(-limy, limy) * t[2];
    let j = [
        [fx / t[2], 0.0, -fx * tx / (t[2] * t[2])],
        [0.0, fy / t[2], -fy * ty / (t[2] * t[2])],
    ];
    // T = J W (2×3), Σ' = T Σ Tᵀ.
    let r = &cam.rot;
    let mut tm = [[0f32; 3]; 2];
    for a in 0..2 {
        for b in 0..3 {
            tm[a][b] = (0..3).map(|k| j[a][k] * r[k][b]).sum();
        }
    }
    let sig = [
        [cov[0], cov[1], cov[2]],
        [cov[1], cov[3], cov[4]],
        [cov[2], cov[4], cov[5]],
    ];
    let mut c2 = [[0f32; 2]; 2];
    for a in 0..2 {
        for b in 0..2 {
            let mut acc = 0.0;
            for k in 0..3 {
                for l in 0..3 {
                    acc += tm[a][k] * sig[k][l] * tm[b][l];
                }
            }
            c2[a][b] = acc;
        }
    }
    let det0 = c2[0][0] * c2[1][1] - c2[0][1] * c2[0][1];
    let (ca, cb, cc) = (c2[0][0] + s.kernel_size, c2[0][1], c2[1][1] + s.kernel_size);
    let det = ca * cc - cb * cb;
    if det.is_nan() || det <= 0.0 {
        return None;
    }
    let opacity = opacity * (det0.max(0.0) / det).max(2.5e-5).sqrt();
    let conic = [cc / det, -cb / det, ca / det];
    let mid = 0.5 * (ca + cc);
    let lambda = mid + (mid * mid - det).max(0.1).sqrt();
    let radius = (3.0 * lambda.sqrt()).ceil();
    if !radius.is_finite() || !xy[0].is_finite() || !xy[1].is_finite() {
        return None;
    }
    // Tiles the 3σ box meets (pixel i's centre is at i + 0.5).
    let t0x = ((xy[0] - radius) / TILE as f32).floor().max(0.0);
    let t1x = ((xy[0] + radius) / TILE as f32).ceil().min(tiles_x as f32);
    let t0y = ((xy[1] - radius) / TILE as f32).floor().max(0.0);
    let t1y = ((xy[1] + radius) / TILE as f32).ceil().min(tiles_y as f32);
    if t1x <= t0x || t1y <= t0y {
        return None;
    }
    Some(Projected {
        xy,
        conic,
        opacity,
        depth: t[2],
        tiles: [t0x as usize, t1x as usize, t0y as usize, t1y as usize],
    })
}

/// Renders the Gaussians through `camera` (`camera.width × camera.height`).
pub fn render(
    camera: &Camera,
    splats: &Splats<'_>,
    settings: &SplatSettings,
) -> Result<SplatImage, RasterError> {
    let n = splats.means.len();
    for (what, got) in [
        ("covariances", splats.covariances.len()),
        ("colors", splats.colors.len()),
        ("opacities", splats.opacities.len()),
    ] {
        if got != n {
            return Err(RasterError::Size { what, got, want: n });
        }
    }
    let (width, height) = (camera.width, camera.height);
    if width == 0 || height == 0 {
        return Err(RasterError::EmptyImage);
    }
    let tiles_x = width.div_ceil(TILE);
    let tiles_y = height.div_ceil(TILE);
    let proj: Vec<Option<Projected>> = (0..n)
        .into_par_iter()
        .map(|i| {
            project(
                camera,
                splats.means[i],
                splats.covariances[i],
                splats.opacities[i],
                settings,
                tiles_x,
                tiles_y,
            )
        })
        .collect();
    // (tile, depth) keys; positive f32 depths order like their bit patterns.
    let mut keys: Vec<(u64, u32)> = Vec::new();
    for (i, p) in proj.iter().enumerate() {
        if let Some(p) = p {
            for ty in p.tiles[2]..p.tiles[3] {
                for tx in p.tiles[0]..p.tiles[1] {
                    let tile = (ty * tiles_x + tx) as u64;
                    keys.push(((tile << 32) | p.depth.to_bits() as u64, i as u32));
                }
            }
        }
    }
    keys.par_sort_unstable();
    let ntiles = tiles_x * tiles_y;
    let mut starts = vec![0usize; ntiles + 1];
    for (k, _) in &keys {
        starts[(k >> 32) as usize + 1] += 1;
    }
    for t in 0..ntiles {
        starts[t + 1] += starts[t];
    }
    let bg = settings.background;
    let tiles: Vec<Vec<([f32; 3], f32, f32)>> = (0..ntiles)
        .into_par_iter()
        .map(|t| {
            let (tx, ty) = (t % tiles_x, t / tiles_x);
            let list = &keys[starts[t]..starts[t + 1]];
            let mut out = Vec::with_capacity(TILE * TILE);
            for py in ty * TILE..((ty + 1) * TILE).min(height) {
                for px in tx * TILE..((tx + 1) * TILE).min(width) {
                    let (x, y) = (px as f32 + 0.5, py as f32 + 0.5);
                    let mut tr = 1.0f32;
                    let mut c = [0f32; 3];
                    let mut d = 0f32;
                    for &(_, gi) in list {
                        let Some(g) = &proj[gi as usize] else {
                            continue;
                        };
                        let dx = g.xy[0] - x;
                        let dy = g.xy[1] - y;
                        let power = -0.5 * (g.conic[0] * dx * dx + g.conic[2] * dy * dy)
                            - g.conic[1] * dx * dy;
                        if power > 0.0 {
                            continue;
                        }
                        let alpha = (g.opacity * power.exp()).min(0.99);
                        if alpha < 1.0 / 255.0 {
                            continue;
                        }
                        let next = tr * (1.0 - alpha);
                        if next < 1e-4 {
                            break;
                        }
                        let col = splats.colors[gi as usize];
                        let wgt = alpha * tr;
                        for k in 0..3 {
                            c[k] += col[k] * wgt;
                        }
                        d += g.depth * wgt;
                        tr = next;
                    }
                    let a = 1.0 - tr;
                    out.push((
                        [c[0] + tr * bg[0], c[1] + tr * bg[1], c[2] + tr * bg[2]],
                        a,
                        if a > 0.0 { d / a } else { 0.0 },
                    ));
                }
            }
            out
        })
        .collect();
    let mut img = SplatImage {
        width,
        height,
        color: vec![bg; width * height],
        alpha: vec![0.0; width * height],
        depth: vec![0.0; width * height],
    };
    for (t, px) in tiles.into_iter().enumerate() {
        let (tx, ty) = (t % tiles_x, t / tiles_x);
        let mut it = px.into_iter();
        for py in ty * TILE..((ty + 1) * TILE).min(height) {
            for pxx in tx * TILE..((tx + 1) * TILE).min(width) {
                if let Some((c, a, d)) = it.next() {
                    let i = py * width + pxx;
                    img.color[i] = c;
                    img.alpha[i] = a;
                    img.depth[i] = d;
                }
            }
        }
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cam(res: usize) -> Camera {
        Camera::orbit(0.0, 0.0, 2.0, 40.0, res)
    }

    #[test]
    fn covariance_of_a_rotated_gaussian() {
        // 90° about z swaps the x and y scales.
        let h = std::f32::consts::FRAC_1_SQRT_2;
        let c = covariance([1.0, 2.0, 3.0], [h, 0.0, 0.0, h]);
        let want = [4.0, 0.0, 0.0, 1.0, 0.0, 9.0];
        for (a, b) in c.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{c:?}");
        }
    }

    #[test]
    fn one_gaussian_is_an_elliptical_blob_at_its_projection() {
        let c = cam(64);
        // Wider along world x (image x) than along z (image y).
        let mean = [0.1, 0.0, 0.0];
        let cov = covariance([0.06, 0.01, 0.03], [1.0, 0.0, 0.0, 0.0]);
        let img = render(
            &c,
            &Splats {
                means: &[mean],
                covariances: &[cov],
                colors: &[[1.0, 0.5, 0.25]],
                opacities: &[0.9],
            },
            &SplatSettings::default(),
        )
        .unwrap();
        let p = c.project(mean).unwrap();
        let (cx, cy) = (p[0] as usize, p[1] as usize);
        let peak = img.alpha.iter().copied().fold(0.0, f32::max);
        assert!(peak > 0.8 && peak <= 0.9, "{peak}");
        let col = img.color[cy * 64 + cx];
        assert!((col[1] / col[0] - 0.5).abs() < 1e-5);
        assert!((img.depth[cy * 64 + cx] - 2.0).abs() < 1e-3);
        // Falls off faster vertically than horizontally.
        assert!(img.alpha[cy * 64 + cx + 4] > img.alpha[(cy + 4) * 64 + cx]);
        // Far away: nothing.
        assert_eq!(img.alpha[0], 0.0);
        // Centroid of the blob is the projected mean.
        let (mut sx, mut sy, mut sw) = (0.0, 0.0, 0.0);
        for y in 0..64 {
            for x in 0..64 {
                let a = img.alpha[y * 64 + x];
                sx += a * (x as f32 + 0.5);
                sy += a * (y as f32 + 0.5);
                sw += a;
            }
        }
        assert!((sx / sw - p[0]).abs() < 0.05 && (sy / sw - p[1]).abs() < 0.05);
    }

    #[test]
    fn front_gaussian_occludes_and_blending_follows_the_formula() {
        let c = cam(32);
        let cov = covariance([0.3, 0.3, 0.3], [1.0, 0.0, 0.0, 0.0]);
        // Camera at +y looking towards -y: the Gaussian at y = 0.5 is in front.
        let means = [[0.0, -0.5, 0.0], [0.0, 0.5, 0.0]];
        let s = Splats {
            means: &means,
            covariances: &[cov, cov],
            colors: &[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
            opacities: &[0.5, 0.5],
        };
        let bg = [0.0, 0.0, 1.0];
        let img = render(
            &c,
            &s,
            &SplatSettings {
                background: bg,
                ..Default::default()
            },
        )
        .unwrap();
        let i = 16 * 32 + 16;
        // Near the centre both alphas are close to 0.5 (the Gaussians are wide): green in front.
        let col = img.color[i];
        assert!(col[1] > col[0], "{col:?}");
        let a = img.alpha[i];
        assert!((col[0] + col[1] + col[2] - 1.0).abs() < 1e-4, "{col:?}");
        assert!((col[2] - (1.0 - a)).abs() < 1e-5);
        // Same result whatever the input order.
        let img2 = render(
            &c,
            &Splats {
                means: &[means[1], means[0]],
                covariances: &[cov, cov],
                colors: &[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]],
                opacities: &[0.5, 0.5],
            },
            &SplatSettings {
                background: bg,
                ..Default::default()
            },
        )
        .unwrap();
        for (p, q) in img.color.iter().zip(&img2.color) {
            for k in 0..3 {
                assert!((p[k] - q[k]).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn behind_the_camera_is_culled_and_sizes_are_checked() {
        let c = cam(16);
        let cov = covariance([0.1; 3], [1.0, 0.0, 0.0, 0.0]);
        let img = render(
            &c,
            &Splats {
                means: &[[0.0, 3.0, 0.0]],
                covariances: &[cov],
                colors: &[[1.0; 3]],
                opacities: &[1.0],
            },
            &SplatSettings::default(),
        )
        .unwrap();
        assert!(img.alpha.iter().all(|&a| a == 0.0));
        assert!(render(
            &c,
            &Splats {
                means: &[[0.0; 3]],
                covariances: &[],
                colors: &[[1.0; 3]],
                opacities: &[1.0],
            },
            &SplatSettings::default(),
        )
        .is_err());
    }
}
