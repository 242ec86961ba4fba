//! The GPU backend of `trellis_kernels::raster::Rasterizer`: triangle rasteriser, forward
//! Gaussian splatting and the bake's texel projection as CUDA C++ (`kernels/src/cuda/raster.cu`,
//! `splat.cu`, `sort.cu`), compiled with NVRTC for the GPU that is present and launched on
//! candle's stream of the job's device. Twins of the CPU rasterisers, which are the reference:
//! triangle ids, depths and barycentrics are bit-identical, splatted colours agree to float
//! rounding ([`checks`]). `bake_views` keeps the mesh, the Gaussians, every view's images and the
//! per-texel sums on the device and copies only the sums back. `cuda` builds only.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::CudaDevice;
use trellis_kernels::cuda::{self as k, KernelSource, CAM_FLOATS};
use trellis_kernels::raster::triangles::check_faces;
use trellis_kernels::raster::{
    Camera, Fragment, RasterBuffers, RasterError, Rasterizer, SplatImage, SplatSettings, Splats,
    TexelPoint,
};

use super::cuda_ops::module;

type R<T> = Result<T, RasterError>;

fn be(e: impl std::fmt::Display) -> RasterError {
    RasterError::Backend(e.to_string())
}

fn i32_of(v: usize, what: &str) -> R<i32> {
    i32::try_from(v).map_err(|_| be(format!("{what} = {v} does not fit in int32")))
}

/// A 1-D launch of `n` threads in blocks of `threads` (at least one block).
fn grid(n: usize, threads: u32) -> R<LaunchConfig> {
    let blocks = u32::try_from(n.div_ceil(threads as usize).max(1))
        .map_err(|_| be(format!("{n} threads are too many for one launch")))?;
    Ok(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The camera as the kernels read it (`CAM_FLOATS` floats).
fn cam_params(c: &Camera) -> [f32; CAM_FLOATS] {
    let mut p = [0f32; CAM_FLOATS];
    for (i, row) in c.rot.iter().enumerate() {
        p[3 * i..3 * i + 3].copy_from_slice(row);
    }
    p[9..12].copy_from_slice(&c.trans);
    p[12] = c.fx;
    p[13] = c.fy;
    p[14] = c.cx;
    p[15] = c.cy;
    p[16] = c.width as f32;
    p[17] = c.height as f32;
    p[18] = c.near;
    p[19] = c.far;
    p[20..23].copy_from_slice(&c.center());
    p
}

/// Image sizes the kernels index with int32 and the camera passes as exact floats.
fn check_image(width: usize, height: usize) -> R<()> {
    if width == 0 || height == 0 {
        return Err(RasterError::EmptyImage);
    }
    if width > 1 << 14 || height > 1 << 14 {
        return Err(be(format!(
            "{width}x{height} is larger than the GPU rasteriser's 16384x16384"
        )));
    }
    Ok(())
}

/// Gaussians on the device.
struct DeviceSplats {
    n: usize,
    means: CudaSlice<f32>,
    covs: CudaSlice<f32>,
    opac: CudaSlice<f32>,
    colors: CudaSlice<f32>,
}

/// A splatted image on the device: colour (3 per pixel), alpha, depth.
struct DeviceImage {
    color: CudaSlice<f32>,
    alpha: CudaSlice<f32>,
    depth: CudaSlice<f32>,
}

/// The GPU rasterisers on one CUDA device.
pub struct CudaRasterizer {
    dev: CudaDevice,
    stream: Arc<CudaStream>,
}

impl CudaRasterizer {
    /// Compiles (or reads from the kernel cache) and loads every raster kernel on `device`, so a
    /// missing NVRTC or a failing compile shows here, before any work.
    pub fn new(device: &candle_core::Device) -> anyhow::Result<Self> {
        let candle_core::Device::Cuda(dev) = device else {
            anyhow::bail!("the GPU rasteriser needs a CUDA device, not {device:?}");
        };
        for src in [&k::RASTER, &k::SPLAT, &k::SORT] {
            module(dev, src)?;
        }
        Ok(Self {
            dev: dev.clone(),
            stream: dev.cuda_stream(),
        })
    }

    fn func(&self, src: &KernelSource, name: &str) -> R<CudaFunction> {
        module(&self.dev, src)
            .map_err(be)?
            .load_function(name)
            .map_err(be)
    }

    fn upload<T: DeviceRepr>(&self, v: &[T]) -> R<CudaSlice<T>> {
        if v.is_empty() {
            // A zero-byte allocation is not valid everywhere: one unused element instead.
            // SAFETY: never read (every kernel bounds its reads by the real length, 0).
            return unsafe { self.stream.alloc::<T>(1) }.map_err(be);
        }
        self.stream.clone_htod(v).map_err(be)
    }

    fn alloc<T: DeviceRepr>(&self, n: usize) -> R<CudaSlice<T>> {
        // SAFETY: every caller's kernels write each element before anything reads it.
        unsafe { self.stream.alloc::<T>(n.max(1)) }.map_err(be)
    }

    fn zeros<T: DeviceRepr + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> R<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(n.max(1)).map_err(be)
    }

    /// World-space vertices through the camera: screen points as `rasterize` makes them.
    fn project(
        &self,
        verts: &CudaSlice<f32>,
        nv: usize,
        cam: &CudaView<'_, f32>,
    ) -> R<CudaSlice<f32>> {
        let out = self.alloc::<f32>(3 * nv)?;
        if nv == 0 {
            return Ok(out);
        }
        let f = self.func(&k::RASTER, "project_vertices")?;
        let n = i32_of(nv, "vertices")?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(verts).arg(&n).arg(cam).arg(&out);
        // SAFETY: `verts` and `out` hold 3 * nv floats, `cam` CAM_FLOATS.
        unsafe { b.launch(grid(nv, 256)?) }.map_err(be)?;
        Ok(out)
    }

    /// Depth-test keys (depth bits << 32 | triangle id) of screen triangles.
    fn raster_keys(
        &self,
        pts: &CudaSlice<f32>,
        faces: &CudaSlice<u32>,
        nf: usize,
        width: usize,
        height: usize,
    ) -> R<CudaSlice<u64>> {
        let npx = width * height;
        let keys = self.alloc::<u64>(npx)?;
        let npx_i = i32_of(npx, "pixels")?;
        let clear = self.func(&k::RASTER, "clear_keys")?;
        let mut b = self.stream.launch_builder(&clear);
        b.arg(&keys).arg(&npx_i);
        // SAFETY: `keys` holds npx entries.
        unsafe { b.launch(grid(npx, 256)?) }.map_err(be)?;
        if nf == 0 {
            return Ok(keys);
        }
        let (w, h, nfi) = (
            i32_of(width, "width")?,
            i32_of(height, "height")?,
            i32_of(nf, "triangles")?,
        );
        let large = self.alloc::<u32>(nf)?;
        let nlarge = self.zeros::<u32>(1)?;
        let small = self.func(&k::RASTER, "raster_small")?;
        let mut b = self.stream.launch_builder(&small);
        b.arg(pts)
            .arg(faces)
            .arg(&nfi)
            .arg(&w)
            .arg(&h)
            .arg(&keys)
            .arg(&large)
            .arg(&nlarge);
        // SAFETY: `faces` holds 3 * nf indices below the point count (checked), `large` nf.
        unsafe { b.launch(grid(nf, 128)?) }.map_err(be)?;
        let big = self.func(&k::RASTER, "raster_large")?;
        let mut b = self.stream.launch_builder(&big);
        b.arg(pts)
            .arg(faces)
            .arg(&w)
            .arg(&h)
            .arg(&keys)
            .arg(&large)
            .arg(&nlarge);
        let cfg = LaunchConfig {
            grid_dim: (nf.min(1024) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above; the kernel reads the large-triangle count from `nlarge`.
        unsafe { b.launch(cfg) }.map_err(be)?;
        Ok(keys)
    }

    /// Keys → fragments, copied to the host.
    fn resolve(
        &self,
        pts: &CudaSlice<f32>,
        faces: &CudaSlice<u32>,
        keys: &CudaSlice<u64>,
        width: usize,
        height: usize,
    ) -> R<RasterBuffers> {
        let npx = width * height;
        let out = self.alloc::<u32>(4 * npx)?;
        let f = self.func(&k::RASTER, "resolve_frags")?;
        let (w, h) = (i32_of(width, "width")?, i32_of(height, "height")?);
        let mut b = self.stream.launch_builder(&f);
        b.arg(pts).arg(faces).arg(&w).arg(&h).arg(keys).arg(&out);
        // SAFETY: `keys` holds npx entries, `out` 4 * npx.
        unsafe { b.launch(grid(npx, 256)?) }.map_err(be)?;
        let host = self.stream.clone_dtoh(&out).map_err(be)?;
        let frags = host
            .chunks_exact(4)
            .take(npx)
            .map(|q| Fragment {
                depth: f32::from_bits(q[0]),
                face: q[1],
                bary: [f32::from_bits(q[2]), f32::from_bits(q[3])],
            })
            .collect();
        Ok(RasterBuffers {
            width,
            height,
            frags,
        })
    }

    fn upload_faces(&self, faces: &[[u32; 3]], nv: usize) -> R<CudaSlice<u32>> {
        check_faces(faces, nv)?;
        i32_of(faces.len(), "triangles")?;
        self.upload(faces.as_flattened())
    }

    fn upload_splats(&self, s: &Splats<'_>) -> R<DeviceSplats> {
        let n = s.means.len();
        for (what, got) in [
            ("covariances", s.covariances.len()),
            ("colors", s.colors.len()),
            ("opacities", s.opacities.len()),
        ] {
            if got != n {
                return Err(RasterError::Size { what, got, want: n });
            }
        }
        i32_of(n, "Gaussians")?;
        Ok(DeviceSplats {
            n,
            means: self.upload(s.means.as_flattened())?,
            covs: self.upload(s.covariances.as_flattened())?,
            opac: self.upload(s.opacities)?,
            colors: self.upload(s.colors.as_flattened())?,
        })
    }

    /// Exclusive prefix sum of `input[..n]` into `out[..n]`.
    fn scan(&self, input: &CudaSlice<u32>, out: &CudaSlice<u32>, n: usize) -> R<()> {
        super::cuda_sort::scan(&self.dev, input, out, n).map_err(be)
    }

    /// Stable sort of `n` (key, value) pairs by the low `bits` bits of the key.
    fn radix_sort(
        &self,
        keys: CudaSlice<u64>,
        vals: CudaSlice<u32>,
        n: usize,
        bits: u32,
    ) -> R<(CudaSlice<u64>, CudaSlice<u32>)> {
        super::cuda_sort::radix_sort(&self.dev, keys, vals, n, bits).map_err(be)
    }

    /// Splats on the device through the camera at `cam` (its parameters already on the device).
    fn splat_device(
        &self,
        cam: &Camera,
        cam_dev: &CudaView<'_, f32>,
        s: &DeviceSplats,
        settings: &SplatSettings,
    ) -> R<DeviceImage> {
        let (width, height) = (cam.width, cam.height);
        check_image(width, height)?;
        let tile = k::SPLAT_TILE;
        let (tiles_x, tiles_y) = (width.div_ceil(tile), height.div_ceil(tile));
        let ntiles = tiles_x * tiles_y;
        let n = s.n;
        let xy = self.alloc::<f32>(2 * n)?;
        let conic = self.alloc::<f32>(3 * n)?;
        let op = self.alloc::<f32>(n)?;
        let depth = self.alloc::<f32>(n)?;
        let rect = self.alloc::<i32>(4 * n)?;
        // One more count (zero) so the scan's last entry is the total.
        let count = self.zeros::<u32>(n + 1)?;
        let offsets = self.alloc::<u32>(n + 1)?;
        let (txi, tyi, ni) = (
            i32_of(tiles_x, "tiles")?,
            i32_of(tiles_y, "tiles")?,
            i32_of(n, "Gaussians")?,
        );
        if n > 0 {
            let f = self.func(&k::SPLAT, "splat_preprocess")?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(&s.means)
                .arg(&s.covs)
                .arg(&s.opac)
                .arg(&ni)
                .arg(cam_dev)
                .arg(&settings.kernel_size)
                .arg(&settings.near)
                .arg(&txi)
                .arg(&tyi)
                .arg(&xy)
                .arg(&conic)
                .arg(&op)
                .arg(&depth)
                .arg(&rect)
                .arg(&count);
            // SAFETY: every per-Gaussian buffer holds n rows of its width.
            unsafe { b.launch(grid(n, 256)?) }.map_err(be)?;
        }
        self.scan(&count, &offsets, n + 1)?;
        let total = self
            .stream
            .clone_dtoh(&offsets.slice(n..n + 1))
            .map_err(be)?
            .first()
            .copied()
            .unwrap_or(0) as usize;
        i32_of(total, "tile entries")?;
        let ranges = self.zeros::<u32>(2 * ntiles)?;
        let mut vals_sorted = None;
        if total > 0 {
            let keys = self.alloc::<u64>(total)?;
            let vals = self.alloc::<u32>(total)?;
            let f = self.func(&k::SPLAT, "splat_keys")?;
            let mut b = self.stream.launch_builder(&f);
            b.arg(&rect)
                .arg(&depth)
                .arg(&count)
                .arg(&offsets)
                .arg(&ni)
                .arg(&txi)
                .arg(&keys)
                .arg(&vals);
            // SAFETY: `keys`/`vals` hold the scanned total; each Gaussian writes its own range.
            unsafe { b.launch(grid(n, 256)?) }.map_err(be)?;
            let tile_bits = usize::BITS - (ntiles.max(2) - 1).leading_zeros();
            let (keys, vals) = self.radix_sort(keys, vals, total, 32 + tile_bits)?;
            let f = self.func(&k::SPLAT, "tile_ranges")?;
            let mi = total as i32;
            let mut b = self.stream.launch_builder(&f);
            b.arg(&keys).arg(&mi).arg(&ranges);
            // SAFETY: tile ids in the keys are below ntiles; `ranges` holds 2 * ntiles.
            unsafe { b.launch(grid(total, 256)?) }.map_err(be)?;
            vals_sorted = Some(vals);
        }
        let vals = match vals_sorted {
            Some(v) => v,
            None => self.zeros::<u32>(1)?,
        };
        let npx = width * height;
        let img = DeviceImage {
            color: self.alloc::<f32>(3 * npx)?,
            alpha: self.alloc::<f32>(npx)?,
            depth: self.alloc::<f32>(npx)?,
        };
        let (w, h) = (i32_of(width, "width")?, i32_of(height, "height")?);
        let [bg0, bg1, bg2] = settings.background;
        let f = self.func(&k::SPLAT, "splat_render")?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(&ranges)
            .arg(&vals)
            .arg(&xy)
            .arg(&conic)
            .arg(&op)
            .arg(&depth)
            .arg(&s.colors)
            .arg(&w)
            .arg(&h)
            .arg(&txi)
            .arg(&bg0)
            .arg(&bg1)
            .arg(&bg2)
            .arg(&img.color)
            .arg(&img.alpha)
            .arg(&img.depth);
        let cfg = LaunchConfig {
            grid_dim: (u32::try_from(ntiles).map_err(be)?, 1, 1),
            block_dim: ((tile * tile) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one block per tile; ranges index `vals`, which index the per-Gaussian buffers;
        // the outputs hold one entry (three for colour) per pixel.
        unsafe { b.launch(cfg) }.map_err(be)?;
        Ok(img)
    }
}

impl Rasterizer for CudaRasterizer {
    fn triangles(
        &self,
        camera: &Camera,
        vertices: &[[f32; 3]],
        faces: &[[u32; 3]],
    ) -> R<RasterBuffers> {
        check_image(camera.width, camera.height)?;
        let fdev = self.upload_faces(faces, vertices.len())?;
        let vdev = self.upload(vertices.as_flattened())?;
        let cam = self.upload(&cam_params(camera))?;
        let pts = self.project(&vdev, vertices.len(), &cam.slice(..))?;
        let keys = self.raster_keys(&pts, &fdev, faces.len(), camera.width, camera.height)?;
        self.resolve(&pts, &fdev, &keys, camera.width, camera.height)
    }

    fn screen_triangles(
        &self,
        width: usize,
        height: usize,
        points: &[[f32; 3]],
        faces: &[[u32; 3]],
    ) -> R<RasterBuffers> {
        check_image(width, height)?;
        let fdev = self.upload_faces(faces, points.len())?;
        let pts = self.upload(points.as_flattened())?;
        let keys = self.raster_keys(&pts, &fdev, faces.len(), width, height)?;
        self.resolve(&pts, &fdev, &keys, width, height)
    }

    fn splat(
        &self,
        camera: &Camera,
        splats: &Splats<'_>,
        settings: &SplatSettings,
    ) -> R<SplatImage> {
        check_image(camera.width, camera.height)?;
        let s = self.upload_splats(splats)?;
        let cam = self.upload(&cam_params(camera))?;
        let img = self.splat_device(camera, &cam.slice(..), &s, settings)?;
        let npx = camera.width * camera.height;
        let color = self.stream.clone_dtoh(&img.color).map_err(be)?;
        let mut alpha = self.stream.clone_dtoh(&img.alpha).map_err(be)?;
        let mut depth = self.stream.clone_dtoh(&img.depth).map_err(be)?;
        alpha.truncate(npx);
        depth.truncate(npx);
        Ok(SplatImage {
            width: camera.width,
            height: camera.height,
            color: color
                .chunks_exact(3)
                .take(npx)
                .map(|c| [c[0], c[1], c[2]])
                .collect(),
            alpha,
            depth,
        })
    }

    fn bake_views(
        &self,
        cams: &[Camera],
        vertices: &[[f32; 3]],
        faces: &[[u32; 3]],
        splats: &Splats<'_>,
        settings: &SplatSettings,
        texels: &[TexelPoint],
    ) -> R<Vec<[f32; 4]>> {
        let n = texels.len();
        let ni = i32_of(n, "texels")?;
        let fdev = self.upload_faces(faces, vertices.len())?;
        let vdev = self.upload(vertices.as_flattened())?;
        let s = self.upload_splats(splats)?;
        let pos: Vec<f32> = texels.iter().flat_map(|t| t.pos).collect();
        let nrm: Vec<f32> = texels.iter().flat_map(|t| t.normal).collect();
        let pos = self.upload(&pos)?;
        let nrm = self.upload(&nrm)?;
        let params: Vec<f32> = cams.iter().flat_map(cam_params).collect();
        let cams_dev = self.upload(&params)?;
        let acc = self.zeros::<f32>(4 * n)?;
        let f = self.func(&k::RASTER, "bake_accumulate")?;
        for (i, cam) in cams.iter().enumerate() {
            check_image(cam.width, cam.height)?;
            let cv = cams_dev.slice(i * CAM_FLOATS..(i + 1) * CAM_FLOATS);
            let img = self.splat_device(cam, &cv, &s, settings)?;
            let pts = self.project(&vdev, vertices.len(), &cv)?;
            let keys = self.raster_keys(&pts, &fdev, faces.len(), cam.width, cam.height)?;
            if n == 0 {
                continue;
            }
            let mut b = self.stream.launch_builder(&f);
            b.arg(&pos)
                .arg(&nrm)
                .arg(&ni)
                .arg(&cv)
                .arg(&keys)
                .arg(&img.color)
                .arg(&img.alpha)
                .arg(&acc);
            // SAFETY: `pos`/`nrm` hold 3 n floats, `acc` 4 n; the images and keys one entry per
            // pixel of this camera.
            unsafe { b.launch(grid(n, 256)?) }.map_err(be)?;
        }
        let host = self.stream.clone_dtoh(&acc).map_err(be)?;
        Ok(host
            .chunks_exact(4)
            .take(n)
            .map(|a| [a[0], a[1], a[2], a[3]])
            .collect())
    }
}

/// The GPU rasterisers against the CPU ones on scenes built here: the unit test below and
/// `trellisd doctor --check-kernels` run these. Each returns its error figure (0 for exact
/// checks) or fails with the numbers.
pub mod checks {
    use super::*;
    use crate::bench::bake::{bumpy_sphere, gaussians};
    use trellis_kernels::raster::camera::hammersley_cameras;
    use trellis_kernels::raster::CpuRasterizer;

    fn gpu(dev: &candle_core::Device) -> anyhow::Result<CudaRasterizer> {
        CudaRasterizer::new(dev)
    }

    /// Pixels whose fragment differs in any bit (depth, id, barycentrics).
    fn frag_mismatches(a: &RasterBuffers, b: &RasterBuffers) -> anyhow::Result<usize> {
        anyhow::ensure!(
            a.width == b.width && a.height == b.height && a.frags.len() == b.frags.len(),
            "image sizes differ"
        );
        Ok(a.frags
            .iter()
            .zip(&b.frags)
            .filter(|(p, q)| {
                p.face != q.face
                    || p.depth.to_bits() != q.depth.to_bits()
                    || p.bary[0].to_bits() != q.bary[0].to_bits()
                    || p.bary[1].to_bits() != q.bary[1].to_bits()
            })
            .count())
    }

    /// A mesh with everything the rasteriser must get right: a closed bumpy sphere with an
    /// inner shell, triangles repeated under other ids (depth ties), large triangles (the
    /// block-per-triangle path), one reaching behind the camera, degenerate ones.
    fn test_mesh() -> (Vec<[f32; 3]>, Vec<[u32; 3]>) {
        let mut m = bumpy_sphere(24, 1.0, 0, false);
        let inner = bumpy_sphere(10, 0.6, m.vertices.len() as u32, true);
        m.vertices.extend(inner.vertices);
        m.faces.extend(inner.faces);
        let dup: Vec<[u32; 3]> = m
            .faces
            .iter()
            .step_by(7)
            .map(|f| [f[1], f[2], f[0]])
            .collect();
        m.faces.extend(dup);
        let o = m.vertices.len() as u32;
        m.vertices.extend([
            [-0.9, -0.5, -0.9],
            [0.9, -0.5, -0.9],
            [0.9, -0.5, 0.9],
            [-0.9, -0.5, 0.9],
            [0.0, 5.0, 0.0],
            [0.2, 0.2, 0.2],
        ]);
        m.faces.extend([
            [o, o + 1, o + 2],
            [o, o + 2, o + 3],
            [o + 2, o, o + 1],
            [o, o + 4, o + 1],
            [o + 5, o + 5, o + 5],
            [o, o, o + 1],
        ]);
        (m.vertices, m.faces)
    }

    /// GPU triangles == CPU triangles, bit for bit, through cameras (square and not) and in
    /// screen space (random overlapping triangles with depth ties, up to image-sized).
    pub fn triangles_exact(dev: &candle_core::Device) -> anyhow::Result<f64> {
        let g = gpu(dev)?;
        let (v, f) = test_mesh();
        let mut cams = hammersley_cameras(5, 2.0, 40.0, 96);
        cams.push(Camera::look_at(
            [0.3, -1.8, 0.9],
            [0.0; 3],
            [0.0, 0.0, 1.0],
            0.9,
            123,
            77,
        ));
        cams.push(Camera::orbit(0.4, 0.2, 1.2, 60.0, 64).with_clip(0.5, 1.5));
        let mut covered = 0;
        for (i, cam) in cams.iter().enumerate() {
            let c = CpuRasterizer.triangles(cam, &v, &f)?;
            let r = g.triangles(cam, &v, &f)?;
            let bad = frag_mismatches(&c, &r)?;
            anyhow::ensure!(
                bad == 0,
                "camera {i}: {bad} of {} pixels differ from the CPU",
                c.frags.len()
            );
            covered += c.frags.iter().filter(|q| !q.is_empty()).count();
        }
        anyhow::ensure!(covered > 5000, "the scenes cover only {covered} pixels");
        let mut s = 12345u64;
        let mut rnd = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32
        };
        let (w, h) = (200, 150);
        let mut pts = Vec::new();
        let mut faces = Vec::new();
        for t in 0..3000u32 {
            let size = if t % 100 == 0 {
                250.0
            } else {
                12.0 * rnd() + 0.5
            };
            let (cx, cy) = (rnd() * 220.0 - 10.0, rnd() * 170.0 - 10.0);
            // Depths from a few levels only: many exact ties.
            let z = 1.0 + (rnd() * 4.0).floor() * 0.5;
            for _ in 0..3 {
                pts.push([
                    cx + (rnd() - 0.5) * size,
                    cy + (rnd() - 0.5) * size,
                    z + rnd() * 0.01 * (t % 2) as f32,
                ]);
            }
            faces.push([3 * t, 3 * t + 1, 3 * t + 2]);
        }
        let c = CpuRasterizer.screen_triangles(w, h, &pts, &faces)?;
        let r = g.screen_triangles(w, h, &pts, &faces)?;
        let bad = frag_mismatches(&c, &r)?;
        anyhow::ensure!(
            bad == 0,
            "screen space: {bad} of {} pixels differ from the CPU",
            c.frags.len()
        );
        Ok(0.0)
    }

    /// GPU splatting vs the CPU renderer: largest absolute difference of colour, alpha and
    /// depth / 4 over a few views (must be below 1e-2: `expf` may round differently from the
    /// CPU's `exp`, which can move a Gaussian across the 1/255 alpha cut-off in a rare pixel),
    /// and the mean colour difference (below 1e-5).
    pub fn splat_vs_cpu(dev: &candle_core::Device) -> anyhow::Result<f64> {
        let g = gpu(dev)?;
        let data = gaussians(20_000);
        let s = data.splats();
        let settings = SplatSettings {
            background: [0.2, 0.3, 0.4],
            ..Default::default()
        };
        let mut cams = hammersley_cameras(3, 2.0, 40.0, 128);
        cams.push(Camera::look_at(
            [0.2, 1.9, -0.4],
            [0.0; 3],
            [0.0, 0.0, 1.0],
            0.8,
            101,
            67,
        ));
        let mut worst = 0f64;
        let (mut sum, mut count) = (0f64, 0usize);
        for (i, cam) in cams.iter().enumerate() {
            let c = trellis_kernels::raster::splat::render(cam, &s, &settings)?;
            let r = g.splat(cam, &s, &settings)?;
            anyhow::ensure!(r.color.len() == c.color.len(), "view {i}: sizes differ");
            let lit = c.alpha.iter().filter(|&&a| a > 0.5).count();
            anyhow::ensure!(lit > 100, "view {i}: only {lit} pixels covered");
            for (cc, rc) in c.color.iter().zip(&r.color) {
                for (a, b) in cc.iter().zip(rc) {
                    let d = (a - b).abs() as f64;
                    worst = worst.max(d);
                    sum += d;
                    count += 1;
                }
            }
            for (a, b) in c.alpha.iter().zip(&r.alpha) {
                worst = worst.max((a - b).abs() as f64);
            }
            for (a, b) in c.depth.iter().zip(&r.depth) {
                worst = worst.max((a - b).abs() as f64 / 4.0);
            }
        }
        let mean = sum / count.max(1) as f64;
        anyhow::ensure!(
            worst < 1e-2 && mean < 1e-5,
            "splatting: largest difference {worst:.3e}, mean colour difference {mean:.3e}"
        );
        Ok(worst)
    }

    /// GPU `bake_views` vs the CPU's: relative L2 error of the per-texel sums over views of a
    /// bumpy sphere with its Gaussians (must be below 5e-3: visibility and projection are exact,
    /// the sampled colours agree to rounding, and a texel whose sampled alpha sits at the 0.05
    /// cut-off may be counted on one side only).
    pub fn bake_views_vs_cpu(dev: &candle_core::Device) -> anyhow::Result<f64> {
        let g = gpu(dev)?;
        let m = bumpy_sphere(40, 1.0, 0, false);
        let data = gaussians(30_000);
        // Texel points: face centroids and normals.
        let texels: Vec<TexelPoint> = m
            .faces
            .iter()
            .map(|f| {
                let p = f.map(|i| m.vertices[i as usize]);
                let pos = [0, 1, 2].map(|k| (p[0][k] + p[1][k] + p[2][k]) / 3.0);
                let (a, b) = (
                    [0, 1, 2].map(|k| p[1][k] - p[0][k]),
                    [0, 1, 2].map(|k| p[2][k] - p[0][k]),
                );
                let n = [
                    a[1] * b[2] - a[2] * b[1],
                    a[2] * b[0] - a[0] * b[2],
                    a[0] * b[1] - a[1] * b[0],
                ];
                let l = (n[0] * n[0] + n[1] * n[1] + n[2] * n[2]).sqrt().max(1e-20);
                TexelPoint {
                    pos,
                    normal: n.map(|x| x / l),
                }
            })
            .collect();
        let cams: Vec<Camera> = hammersley_cameras(6, 2.0, 40.0, 160)
            .into_iter()
            .map(|c| c.with_clip(0.5, 4.0))
            .collect();
        let settings = SplatSettings::default();
        let s = data.splats();
        let c = CpuRasterizer.bake_views(&cams, &m.vertices, &m.faces, &s, &settings, &texels)?;
        let r = g.bake_views(&cams, &m.vertices, &m.faces, &s, &settings, &texels)?;
        anyhow::ensure!(c.len() == r.len(), "sizes differ");
        let seen = c.iter().filter(|a| a[3] > 0.0).count();
        anyhow::ensure!(seen * 2 > c.len(), "only {seen} of {} texels seen", c.len());
        let (mut num, mut den) = (0f64, 0f64);
        for (a, b) in c.iter().flatten().zip(r.iter().flatten()) {
            num += ((a - b) as f64).powi(2);
            den += (*a as f64).powi(2);
        }
        let e = (num / den.max(1e-30)).sqrt();
        anyhow::ensure!(e < 5e-3, "bake views: relative error {e:.3e}");
        Ok(e)
    }

    /// Every check: (name, result).
    pub fn all(dev: &candle_core::Device) -> Vec<(&'static str, anyhow::Result<f64>)> {
        vec![
            ("triangle raster (exact)", triangles_exact(dev)),
            ("Gaussian splatting (max abs)", splat_vs_cpu(dev)),
            ("bake texel projection", bake_views_vs_cpu(dev)),
        ]
    }
}

#[cfg(test)]
mod tests {
    //! The GPU rasterisers against the CPU ones; skipped (and saying so) without a usable GPU.

    #[test]
    fn gpu_rasterisers_match_the_cpu() {
        let dev = match crate::runtime::device::open(
            crate::runtime::device::DeviceRequest::Cuda(0),
            crate::runtime::device::Fallback::Fail,
        ) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("skipped: no usable GPU ({e:#})");
                return;
            }
        };
        for (name, r) in super::checks::all(&dev) {
            let e = r.unwrap_or_else(|e| panic!("{name}: {e:#}"));
            eprintln!("{name}: error {e:.2e}");
        }
    }
}
