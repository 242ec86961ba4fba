//! `trellisd bench bake`: GLB post-processing and texture baking for a full-size-like asset: a
//! bumpy sphere of about 200k triangles with a hidden inner shell (what FlexiCubes leaves
//! inside), 512k Gaussians on its surface (TRELLIS decodes 32 per voxel of a ~16k-voxel
//! structure), decimated to 20k triangles and baked into a 1024² texture. Prints the time of
//! every step, and of one view of each rasteriser. `--device cuda:N` rasterises on the GPU
//! (decimation and UV unwrap stay on the CPU).

use std::io::Write;
use std::time::Instant;

use anyhow::Result;
use trellis_kernels::raster::camera::hammersley_cameras;
use trellis_kernels::raster::{CpuRasterizer, Rasterizer, SplatSettings};

use crate::postprocessing::bake::SplatData;
use crate::postprocessing::topology::TriMesh;
use crate::postprocessing::{to_textured_mesh, BakeOptions};

fn bump(d: [f32; 3]) -> f32 {
    0.4 + 0.02 * (9.0 * d[0]).sin() * (7.0 * d[1]).cos() + 0.015 * (11.0 * d[2]).sin()
}

/// A UV sphere with `n` rings, radius modulated by [`bump`], scaled by `s`; vertex offset `o`.
pub fn bumpy_sphere(n: usize, s: f32, o: u32, flip: bool) -> TriMesh {
    let dir = |th: f32, ph: f32| [th.sin() * ph.cos(), th.sin() * ph.sin(), th.cos()];
    let at = |d: [f32; 3]| d.map(|x| x * bump(d) * s);
    let mut v = vec![at([0.0, 0.0, 1.0])];
    for i in 1..n {
        let th = std::f32::consts::PI * i as f32 / n as f32;
        for j in 0..2 * n {
            v.push(at(dir(th, std::f32::consts::PI * j as f32 / n as f32)));
        }
    }
    v.push(at([0.0, 0.0, -1.0]));
    let ring = |i: usize, j: usize| o + (1 + (i - 1) * 2 * n + j % (2 * n)) as u32;
    let last = o + v.len() as u32 - 1;
    let mut f = Vec::new();
    for j in 0..2 * n {
        f.push([o, ring(1, j), ring(1, j + 1)]);
        f.push([ring(n - 1, j + 1), ring(n - 1, j), last]);
    }
    for i in 1..n - 1 {
        for j in 0..2 * n {
            f.push([ring(i, j), ring(i + 1, j), ring(i + 1, j + 1)]);
            f.push([ring(i, j), ring(i + 1, j + 1), ring(i, j + 1)]);
        }
    }
    if flip {
        f.iter_mut().for_each(|t| t.swap(1, 2));
    }
    TriMesh::new(v, f)
}

/// `n` flat Gaussians spread evenly over the bumpy sphere's surface, with a colour pattern.
pub fn gaussians(n: usize) -> SplatData {
    let golden = std::f32::consts::PI * (3.0 - 5f32.sqrt());
    let spacing = (4.0 * std::f32::consts::PI * 0.16 / n as f32).sqrt();
    let mut g = SplatData::default();
    for i in 0..n {
        let z = 1.0 - 2.0 * (i as f32 + 0.5) / n as f32;
        let r = (1.0 - z * z).sqrt();
        let a = golden * i as f32;
        let d = [r * a.cos(), r * a.sin(), z];
        let p = d.map(|x| x * bump(d));
        let s = spacing;
        let c = |i: usize, j: usize| {
            let e = if i == j { 1.0 } else { 0.0 };
            s * s * (e - d[i] * d[j]) + 1e-6 * d[i] * d[j]
        };
        g.means.push(p);
        g.covariances
            .push([c(0, 0), c(0, 1), c(0, 2), c(1, 1), c(1, 2), c(2, 2)]);
        g.colors.push([
            0.5 + 0.4 * (6.0 * p[0]).sin(),
            0.5 + 0.4 * (5.0 * p[1] + 1.0).sin(),
            0.5 + 0.4 * (7.0 * p[2]).cos(),
        ]);
        g.opacities.push(0.9);
    }
    g
}

/// Seconds of the best of `reps` calls of `f` (after one warm-up call).
fn best_of(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// The GPU rasterisers on a CUDA device (an error when they cannot be used: no silent fallback
/// in a benchmark), else the CPU's; and its name.
fn rasterizer(device: &candle_core::Device) -> Result<(Box<dyn Rasterizer>, String)> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        let r = crate::runtime::cuda_raster::CudaRasterizer::new(device)?;
        return Ok((Box::new(r), format!("GPU {device:?}")));
    }
    anyhow::ensure!(
        !device.is_cuda(),
        "this build has no GPU rasteriser (build with --features cuda)"
    );
    Ok((Box::new(CpuRasterizer), "CPU".to_string()))
}

/// Rasterises on `device`: the GPU rasterisers on a CUDA device (cuda builds), else the CPU's.
pub fn run(device: &candle_core::Device, out: &mut dyn Write) -> Result<()> {
    // 4 n² triangles outside (n = 216: 186,624), an inner shell facing inward of 10k.
    let mut mesh = bumpy_sphere(216, 1.0, 0, false);
    let inner = bumpy_sphere(50, 0.6, mesh.vertices.len() as u32, true);
    mesh.vertices.extend(inner.vertices);
    mesh.faces.extend(inner.faces);
    let g = gaussians(512_000);
    let opts = BakeOptions {
        target_faces: Some(20_000),
        texture_size: 1024,
        ..Default::default()
    };
    let t = Instant::now();
    let (raster, backend) = rasterizer(device)?;
    let raster = raster.as_ref();
    let setup = t.elapsed().as_secs_f64();
    writeln!(
        out,
        "bake: {} triangles, {} Gaussians -> {} triangles, {}^2 texture, {} views, rasteriser {backend}, threads {}",
        mesh.faces.len(),
        g.means.len(),
        20_000,
        opts.texture_size,
        opts.views,
        rayon::current_num_threads()
    )?;
    if device.is_cuda() {
        writeln!(
            out,
            "  GPU rasteriser set-up (NVRTC compile or kernel cache, module load): {setup:.2} s"
        )?;
    }
    // One view of each rasteriser (best of 3 after a warm-up; includes the copies to and from
    // the device on the GPU).
    let cam = hammersley_cameras(8, 2.0, 40.0, 512)[3].with_clip(0.5, 4.0);
    let tri = best_of(3, || {
        raster.triangles(&cam, &mesh.vertices, &mesh.faces)?;
        Ok(())
    })?;
    let splat = best_of(3, || {
        raster.splat(&cam, &g.splats(), &SplatSettings::default())?;
        Ok(())
    })?;
    writeln!(
        out,
        "  one 512^2 view: triangles {:.1} ms, Gaussians {:.1} ms",
        tri * 1e3,
        splat * 1e3
    )?;
    let t = Instant::now();
    let (m, rep) = to_textured_mesh(raster, &mesh, None, Some(&g), &opts)?;
    let total = t.elapsed().as_secs_f64();
    writeln!(
        out,
        "  clean-up (visibility, {} views at {}^2; holes): {:.2} s  removed {} faces, filled {} holes",
        crate::postprocessing::clean::VisibilityOptions::default().views,
        crate::postprocessing::clean::VisibilityOptions::default().resolution,
        rep.seconds[0],
        rep.removed_invisible,
        rep.holes_filled
    )?;
    writeln!(
        out,
        "  decimate (meshopt):  {:.2} s  -> {} faces",
        rep.seconds[1],
        m.faces.len()
    )?;
    writeln!(
        out,
        "  UV unwrap (xatlas):  {:.2} s  {} charts",
        rep.seconds[2], rep.charts
    )?;
    writeln!(
        out,
        "  bake (splat + project + fill): {:.2} s",
        rep.seconds[3]
    )?;
    writeln!(
        out,
        "  total: {total:.2} s, peak RSS {} MiB",
        super::peak_rss_kib().unwrap_or(0) / 1024
    )?;
    Ok(())
}
