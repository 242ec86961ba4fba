//! Texture baking quality (issue 16): Gaussians sampled from a sphere with a known colour
//! pattern are baked onto the sphere's mesh through an xatlas UV layout; the baked mesh and the
//! Gaussians, rendered from views the bake did not use, must agree to at least 25 dB PSNR.

use trellis::postprocessing::bake::{bake_texture, psnr, render_textured, BakeSettings, SplatData};
use trellis::postprocessing::topology::TriMesh;
use trellis::postprocessing::uv::parametrize;
use trellis_kernels::raster::{Camera, CpuRasterizer, Rasterizer, SplatSettings};

const R: f32 = 0.4;

fn pattern(p: [f32; 3]) -> [f32; 3] {
    [
        0.5 + 0.35 * (4.0 * p[0] + 1.0).sin(),
        0.5 + 0.35 * (5.0 * p[1]).sin() * (3.0 * p[2]).cos(),
        0.5 + 0.35 * (6.0 * p[2] + 2.0 * p[0]).cos(),
    ]
}

/// A UV sphere of radius `R`, `n` rings, outward winding.
fn sphere(n: usize) -> TriMesh {
    let mut v = vec![[0.0, 0.0, R]];
    for i in 1..n {
        let th = std::f32::consts::PI * i as f32 / n as f32;
        for j in 0..2 * n {
            let ph = std::f32::consts::PI * j as f32 / n as f32;
            v.push([
                R * th.sin() * ph.cos(),
                R * th.sin() * ph.sin(),
                R * th.cos(),
            ]);
        }
    }
    v.push([0.0, 0.0, -R]);
    let ring = |i: usize, j: usize| (1 + (i - 1) * 2 * n + j % (2 * n)) as u32;
    let mut f = Vec::new();
    for j in 0..2 * n {
        f.push([0, ring(1, j), ring(1, j + 1)]);
    }
    for i in 1..n - 1 {
        for j in 0..2 * n {
            f.push([ring(i, j), ring(i + 1, j), ring(i + 1, j + 1)]);
            f.push([ring(i, j), ring(i + 1, j + 1), ring(i, j + 1)]);
        }
    }
    let last = v.len() as u32 - 1;
    for j in 0..2 * n {
        f.push([ring(n - 1, j + 1), ring(n - 1, j), last]);
    }
    TriMesh::new(v, f)
}

/// Flat Gaussians on a Fibonacci lattice of the sphere, coloured by the pattern.
fn sphere_gaussians(n: usize) -> SplatData {
    let golden = std::f32::consts::PI * (3.0 - 5f32.sqrt());
    let spacing = (4.0 * std::f32::consts::PI * R * R / n as f32).sqrt();
    let (st, sn) = (spacing * 0.9, 0.002f32);
    let mut g = SplatData::default();
    for i in 0..n {
        let z = 1.0 - 2.0 * (i as f32 + 0.5) / n as f32;
        let r = (1.0 - z * z).sqrt();
        let a = golden * i as f32;
        let nrm = [r * a.cos(), r * a.sin(), z];
        let p = nrm.map(|x| x * R);
        // Σ = st² (I - n nᵀ) + sn² n nᵀ
        let c = |i: usize, j: usize| {
            let d = if i == j { 1.0 } else { 0.0 };
            st * st * (d - nrm[i] * nrm[j]) + sn * sn * nrm[i] * nrm[j]
        };
        g.means.push(p);
        g.covariances
            .push([c(0, 0), c(0, 1), c(0, 2), c(1, 1), c(1, 2), c(2, 2)]);
        g.colors.push(pattern(p));
        g.opacities.push(0.95);
    }
    g
}

#[test]
fn baked_sphere_matches_its_gaussians_from_held_out_views() {
    let mesh = sphere(48);
    let gs = sphere_gaussians(40_000);
    let uv = parametrize(&mesh, 1024, 2).expect("unwrap");
    let settings = BakeSettings {
        texture_size: 1024,
        views: 24,
        view_resolution: 512,
    };
    let tex = bake_texture(&CpuRasterizer, &uv, &gs, &settings).expect("bake");
    // Held-out views: yaws and pitches the Hammersley set does not contain, another radius.
    let views = [(0.37f32, 0.21f32), (2.1, -0.4), (4.0, 0.9)];
    for (yaw, pitch) in views {
        let cam = Camera::orbit(yaw, pitch, 1.8, 40.0, 256);
        let mesh_img = render_textured(&CpuRasterizer, &cam, &uv, &tex, [0.0; 3]).unwrap();
        let g_img = CpuRasterizer
            .splat(&cam, &gs.splats(), &SplatSettings::default())
            .unwrap()
            .color;
        // Only where the object is: the background is identical and would inflate the score.
        let r = CpuRasterizer
            .triangles(&cam, &mesh.vertices, &mesh.faces)
            .unwrap();
        let flat: Vec<f32> = mesh.vertices.iter().flatten().copied().collect();
        let pos = r.interpolate(&mesh.faces, &flat, 3).unwrap();
        let (mut a, mut b, mut truth) = (Vec::new(), Vec::new(), Vec::new());
        for (i, f) in r.frags.iter().enumerate() {
            if !f.is_empty() {
                a.push(mesh_img[i]);
                b.push(g_img[i]);
                truth.push(pattern([pos[3 * i], pos[3 * i + 1], pos[3 * i + 2]]));
            }
        }
        assert!(a.len() > 5000, "object too small in view: {}", a.len());
        let db = psnr(&a, &b);
        // Also against the analytic pattern at the surface point (the ground truth).
        let db_truth = psnr(&a, &truth);
        println!(
            "view yaw {yaw} pitch {pitch}: baked vs Gaussians {db:.2} dB, baked vs pattern \
             {db_truth:.2} dB over {} px",
            a.len()
        );
        assert!(db >= 25.0, "baked mesh vs Gaussians: {db:.2} dB < 25 dB");
        assert!(
            db_truth >= 25.0,
            "baked mesh vs pattern: {db_truth:.2} dB < 25 dB"
        );
    }
}
