//! FlexiCubes on the GPU: the CUDA twin of `trellis_kernels::flexicubes` (grid vertices from the
//! cube corners, deformation, surface cubes and their case ids with the ambiguity check, dual
//! vertices, surface edges, triangles), with the kernels of `kernels/src/cuda/flexicubes.cu` and the
//! sort and scan of `sort.cu`, compiled with NVRTC for the GPU that is present and launched on
//! candle's stream. No dense grid: every set is a sorted array of packed keys; indices are int32.
//! The CPU implementation is the reference: the output has its vertex and face order, face
//! indices and (up to a last-ulp difference of tanh / exp) its values ([`checks`]).
//!
//! The network features stay on the device; the cube coordinates are uploaded once; what comes
//! back is the mesh (and, when asked for, the grid vertices). Between stages the host reads a few
//! counts (grid vertices, candidate and surface cubes, dual vertices, edges, quads) to size the
//! next buffers: 9 scalars per extraction. `cuda` builds only.

use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Result};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Storage, Tensor};
use trellis_kernels::cuda::{self as k, FLEXICUBES_MAX_COLOR};
use trellis_kernels::flexicubes::{
    edge_group_table, ExtractTrace, ExtractedMesh, FlexiCubesOptions, GridVertices, CHECK_TABLE,
    DMC_TABLE, MAX_RESOLUTION, NUM_VD_TABLE, WEIGHT_CHANNELS,
};

use super::cuda_ops::module;

/// Where the FlexiCubes inputs sit in a row of the network's features (`[N, stride]`, float32 on
/// the device): per cube, 8 corner scalars from `sdf`, 8 × 3 deformations from `deform`, the 21
/// raw weights from `weights` (none: all normalised weights 1), and 8 × width colour logits from
/// `color`. `sdf_bias` is added to every corner scalar (`SparseFeatures2Mesh`'s `-1 / res`).
#[derive(Debug, Clone, Copy)]
pub struct FeatureLayout {
    pub stride: usize,
    pub sdf: usize,
    pub deform: usize,
    pub weights: Option<usize>,
    pub color: Option<(usize, usize)>,
    pub sdf_bias: f32,
}

impl FeatureLayout {
    fn check(&self) -> Result<()> {
        let mut need = vec![
            ("corner scalars", self.sdf + 8),
            ("deformations", self.deform + 24),
        ];
        if let Some(w) = self.weights {
            need.push(("weights", w + WEIGHT_CHANNELS));
        }
        if let Some((base, width)) = self.color {
            ensure!(
                (1..=FLEXICUBES_MAX_COLOR).contains(&width),
                "flexicubes (GPU): {width} colour channels per corner, the kernels take 1..={FLEXICUBES_MAX_COLOR}"
            );
            need.push(("colours", base + 8 * width));
        }
        for (what, end) in need {
            ensure!(
                end <= self.stride,
                "flexicubes (GPU): the {what} end at channel {end}, beyond the {} channels",
                self.stride
            );
        }
        Ok(())
    }

    fn color_dim(&self) -> usize {
        self.color.map_or(0, |c| c.1)
    }
}

/// What one GPU extraction brings back.
#[derive(Debug, Clone, Default)]
pub struct DeviceExtraction {
    pub mesh: ExtractedMesh,
    /// The grid vertices (coordinates, averaged `[sdf, deform 3, colour]`) and their deformed
    /// positions, when asked for.
    pub grid: Option<(GridVertices, Vec<[f32; 3]>)>,
    /// The intermediates, when asked for (as `flexicubes::extract_traced` records them).
    pub trace: Option<ExtractTrace>,
}

/// What to bring back beside the mesh.
#[derive(Debug, Clone, Copy, Default)]
pub struct Keep {
    /// The grid vertices and their deformed positions.
    pub grid: bool,
    /// The intermediates ([`ExtractTrace`]).
    pub trace: bool,
}

/// The FlexiCubes kernels on one CUDA device, with the case tables uploaded.
pub struct CudaFlexiCubes {
    dev: CudaDevice,
    stream: Arc<CudaStream>,
    check: CudaSlice<i32>,
    num_vd: CudaSlice<i32>,
    dmc: CudaSlice<i32>,
    egroup: CudaSlice<i32>,
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow!("flexicubes (GPU): {what} = {v} does not fit in int32"))
}

/// A 1-D launch of `n` threads in blocks of 256 (at least one block).
fn grid(n: usize) -> Result<LaunchConfig> {
    let blocks = u32::try_from(n.div_ceil(256).max(1))
        .map_err(|_| anyhow!("flexicubes (GPU): {n} threads are too many for one launch"))?;
    Ok(LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Bits needed for the values `0..count` (at least 1).
fn bits_for(count: u64) -> u32 {
    (u64::BITS - count.saturating_sub(1).leading_zeros()).max(1)
}

impl CudaFlexiCubes {
    /// Compiles (or reads from the kernel cache) the FlexiCubes and sort kernels on `device` and
    /// uploads the case tables.
    pub fn new(device: &candle_core::Device) -> Result<Self> {
        let candle_core::Device::Cuda(dev) = device else {
            bail!("the GPU FlexiCubes needs a CUDA device, not {device:?}");
        };
        module(dev, &k::FLEXICUBES)?;
        module(dev, &k::SORT)?;
        let stream = dev.cuda_stream();
        let check: Vec<i32> = CHECK_TABLE.iter().flatten().copied().collect();
        let num_vd: Vec<i32> = NUM_VD_TABLE.iter().map(|&n| n as i32).collect();
        let dmc: Vec<i32> = DMC_TABLE
            .iter()
            .flatten()
            .flatten()
            .map(|&e| e as i32)
            .collect();
        let egroup: Vec<i32> = edge_group_table()
            .iter()
            .flatten()
            .map(|&g| g as i32)
            .collect();
        Ok(Self {
            check: stream.clone_htod(&check)?,
            num_vd: stream.clone_htod(&num_vd)?,
            dmc: stream.clone_htod(&dmc)?,
            egroup: stream.clone_htod(&egroup)?,
            dev: dev.clone(),
            stream,
        })
    }

    fn func(&self, name: &str) -> Result<CudaFunction> {
        Ok(module(&self.dev, &k::FLEXICUBES)?.load_function(name)?)
    }

    fn alloc<T: DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: every caller's kernels write each element before anything reads it (a
        // zero-length request gets one element that nothing reads).
        Ok(unsafe { self.stream.alloc::<T>(n.max(1)) }?)
    }

    fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        Ok(self.stream.alloc_zeros::<T>(n.max(1))?)
    }

    /// Element `i` of a device array (one small device→host copy; it synchronises the stream).
    fn read_u32(&self, s: &CudaSlice<u32>, i: usize) -> Result<usize> {
        let v = self.stream.clone_dtoh(&s.slice(i..i + 1))?;
        Ok(v.first().copied().unwrap_or(0) as usize)
    }

    fn read<T: DeviceRepr>(&self, s: &CudaSlice<T>, n: usize) -> Result<Vec<T>> {
        if n == 0 {
            return Ok(Vec::new());
        }
        Ok(self.stream.clone_dtoh(&s.slice(0..n))?)
    }

    /// Exclusive prefix sum of `input[..n]` into `out[..n]`.
    fn scan(&self, input: &CudaSlice<u32>, out: &CudaSlice<u32>, n: usize) -> Result<()> {
        super::cuda_sort::scan(&self.dev, input, out, n)
    }

    /// Stable sort of `n` (key, value) pairs by the low `bits` bits of the key.
    fn radix_sort(
        &self,
        keys: CudaSlice<u64>,
        vals: CudaSlice<u32>,
        n: usize,
        bits: u32,
    ) -> Result<(CudaSlice<u64>, CudaSlice<u32>)> {
        super::cuda_sort::radix_sort(&self.dev, keys, vals, n, bits)
    }

    /// Unique runs of the sorted `keys[..n]`: (their keys, where each run starts, their count).
    fn unique(
        &self,
        keys: &CudaSlice<u64>,
        n: usize,
    ) -> Result<(CudaSlice<u64>, CudaSlice<u32>, usize)> {
        let ni = i32_of(n, "keys")?;
        let flags = self.alloc::<u32>(n + 1)?;
        let f = self.func("fc_unique_flags")?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(keys).arg(&ni).arg(&flags);
        // SAFETY: `keys` holds n entries, `flags` n + 1.
        unsafe { b.launch(grid(n + 1)?) }?;
        let ranks = self.alloc::<u32>(n + 1)?;
        self.scan(&flags, &ranks, n + 1)?;
        let count = self.read_u32(&ranks, n)?;
        let ukeys = self.alloc::<u64>(count)?;
        let ustart = self.alloc::<u32>(count)?;
        let f = self.func("fc_unique_scatter")?;
        let mut b = self.stream.launch_builder(&f);
        b.arg(keys)
            .arg(&ni)
            .arg(&flags)
            .arg(&ranks)
            .arg(&ukeys)
            .arg(&ustart);
        // SAFETY: the ranks of flagged entries are below `count`.
        unsafe { b.launch(grid(n)?) }?;
        Ok((ukeys, ustart, count))
    }

    /// Runs the whole extraction on the cubes `cubes` (in `0..res`, no duplicates) whose feature
    /// rows are `feats` (`[cubes.len(), layout.stride]`, on this device; float32 or converted to
    /// it). `keep` says what else comes back.
    pub fn extract(
        &self,
        res: usize,
        cubes: &[[i32; 3]],
        feats: &Tensor,
        layout: FeatureLayout,
        opts: FlexiCubesOptions,
        keep: Keep,
    ) -> Result<DeviceExtraction> {
        let (keep_grid, trace) = (keep.grid, keep.trace);
        ensure!(
            (1..=MAX_RESOLUTION).contains(&res),
            "flexicubes (GPU): resolution {res} is outside 1..={MAX_RESOLUTION}"
        );
        layout.check()?;
        let n = cubes.len();
        ensure!(
            feats.dims() == [n, layout.stride],
            "flexicubes (GPU): features of shape {:?}, expected [{n}, {}]",
            feats.dims(),
            layout.stride
        );
        if let Some(c) = cubes
            .iter()
            .find(|c| c.iter().any(|&v| v < 0 || v as usize >= res))
        {
            bail!("flexicubes (GPU): cube {c:?} lies outside the grid 0..{res} per axis");
        }
        ensure!(
            feats
                .device()
                .same_device(&candle_core::Device::Cuda(self.dev.clone())),
            "flexicubes (GPU): the features are on {:?}, not on this GPU",
            feats.device()
        );
        let cd = layout.color_dim();
        let dim = 4 + cd;
        let mut out = DeviceExtraction {
            mesh: ExtractedMesh {
                color_dim: cd,
                ..Default::default()
            },
            grid: keep_grid.then(|| {
                (
                    GridVertices {
                        coords: Vec::new(),
                        attrs: Vec::new(),
                        dim,
                    },
                    Vec::new(),
                )
            }),
            trace: trace.then(ExtractTrace::default),
        };
        if n == 0 {
            return Ok(out);
        }
        let feats = if feats.dtype() == DType::F32 {
            feats.contiguous()?
        } else {
            feats.to_dtype(DType::F32)?.contiguous()?
        };
        let (storage, flayout) = feats.storage_and_layout();
        let Storage::Cuda(fs) = &*storage else {
            bail!("flexicubes (GPU): the features are not on a CUDA device");
        };
        let (a, b) = flayout
            .contiguous_offsets()
            .ok_or_else(|| anyhow!("flexicubes (GPU): features must be contiguous"))?;
        let fv: CudaView<'_, f32> = fs.as_cuda_slice::<f32>()?.slice(a..b);

        let side = res + 1;
        let (res_i, side_i) = (i32_of(res, "res")?, i32_of(side, "res + 1")?);
        let vbits = bits_for((side as u64).pow(3));
        let cbits = bits_for((res as u64).pow(3));
        let vbits_i = vbits as i32;
        let deform_k = ((1.0 - 1e-8) / (res as f64 * 2.0)) as f32;
        let ws = opts.weight_scale;
        let gamma_shift = ((1.0 - ws as f64) / 2.0) as f32;
        let stride_i = i32_of(layout.stride, "feature channels")?;
        let (sdf_i, deform_i) = (
            i32_of(layout.sdf, "sdf channel")?,
            i32_of(layout.deform, "deform channel")?,
        );
        let (color_base, cd_i) = (
            i32_of(layout.color.map_or(0, |c| c.0), "colour channel")?,
            cd as i32,
        );
        let dim_i = dim as i32;
        let (has_w, wbase) = match layout.weights {
            Some(w) => (1i32, i32_of(w, "weight channel")?),
            None => (0i32, 0i32),
        };
        let ni = i32_of(n, "cubes")?;
        let nk = 8 * n;
        let nk_i = i32_of(nk, "cube corners")?;
        let flat: Vec<i32> = cubes.iter().flatten().copied().collect();
        let cubes_d = self.stream.clone_htod(&flat)?;

        // 1. grid vertices: sorted unique corner ids; attributes averaged in cube, corner order.
        let keys = self.alloc::<u64>(nk)?;
        let vals = self.alloc::<u32>(nk)?;
        let f = self.func("fc_corner_keys")?;
        let mut bl = self.stream.launch_builder(&f);
        bl.arg(&cubes_d).arg(&ni).arg(&side_i).arg(&keys).arg(&vals);
        // SAFETY: `cubes_d` holds 3 n ints, `keys`/`vals` 8 n entries.
        unsafe { bl.launch(grid(nk)?) }?;
        let (keys, vals) = self.radix_sort(keys, vals, nk, vbits)?;
        // the active cubes by id (weight rows; duplicates)
        let ckeys = self.alloc::<u64>(n)?;
        let crows = self.alloc::<u32>(n)?;
        let f = self.func("fc_cube_keys")?;
        let mut bl = self.stream.launch_builder(&f);
        bl.arg(&cubes_d)
            .arg(&ni)
            .arg(&res_i)
            .arg(&ckeys)
            .arg(&crows);
        // SAFETY: n cubes in, n keys and rows out.
        unsafe { bl.launch(grid(n)?) }?;
        let (ckeys, crows) = self.radix_sort(ckeys, crows, n, cbits)?;
        let dups = self.zeros::<u32>(1)?;
        let f = self.func("fc_count_duplicates")?;
        let mut bl = self.stream.launch_builder(&f);
        bl.arg(&ckeys).arg(&ni).arg(&dups);
        // SAFETY: `ckeys` holds n keys, `dups` one counter.
        unsafe { bl.launch(grid(n)?) }?;
        let ndup = self.read_u32(&dups, 0)?;
        ensure!(
            ndup == 0,
            "flexicubes (GPU): {ndup} cube(s) appear more than once"
        );
        let (ukeys, ustart, nv) = self.unique(&keys, nk)?;
        drop(keys);
        let nv_i = i32_of(nv, "grid vertices")?;
        let attrs = self.alloc::<f32>(nv * dim)?;
        let vcoords = self.alloc::<i32>(nv * 3)?;
        let pos = self.alloc::<f32>(nv * 3)?;
        let f = self.func("fc_vertex_attrs")?;
        let mut bl = self.stream.launch_builder(&f);
        bl.arg(&ukeys)
            .arg(&ustart)
            .arg(&nv_i)
            .arg(&nk_i)
            .arg(&vals)
            .arg(&fv)
            .arg(&stride_i)
            .arg(&sdf_i)
            .arg(&deform_i)
            .arg(&color_base)
            .arg(&cd_i)
            .arg(&layout.sdf_bias)
            .arg(&side_i)
            .arg(&res_i)
            .arg(&deform_k)
            .arg(&attrs)
            .arg(&vcoords)
            .arg(&pos);
        // SAFETY: runs index `vals` (8 n) whose entries name rows of `feats` (n rows of
        // `stride`, channel ranges checked); outputs hold nv rows.
        unsafe { bl.launch(grid(nv)?) }?;
        drop((vals, ustart));
        if let Some((g, deformed)) = out.grid.as_mut() {
            let c = self.read(&vcoords, nv * 3)?;
            g.coords = c.chunks_exact(3).map(|p| [p[0], p[1], p[2]]).collect();
            g.attrs = self.read(&attrs, nv * dim)?;
            let p = self.read(&pos, nv * 3)?;
            *deformed = p.chunks_exact(3).map(|p| [p[0], p[1], p[2]]).collect();
        }
        drop(vcoords);

        // 2. surface cubes: candidates around negative vertices, sorted, unique, with a sign change.
        let cnt = self.alloc::<u32>(nv + 1)?;
        let f = self.func("fc_neg_count")?;
        let mut bl = self.stream.launch_builder(&f);
        bl.arg(&ukeys)
            .arg(&attrs)
            .arg(&dim_i)
            .arg(&nv_i)
            .arg(&side_i)
            .arg(&res_i)
            .arg(&cnt);
        // SAFETY: nv vertices in, nv + 1 counts out.
        unsafe { bl.launch(grid(nv + 1)?) }?;
        let off = self.alloc::<u32>(nv + 1)?;
        self.scan(&cnt, &off, nv + 1)?;
        let m = self.read_u32(&off, nv)?;
        if m == 0 {
            return Ok(out);
        }
        let m_i = i32_of(m, "candidate cubes")?;
        let cand = self.alloc::<u64>(m)?;
        let cval = self.alloc::<u32>(m)?;
        let f = self.func("fc_neg_cubes")?;
        let mut bl = self.stream.launch_builder(&f);
        bl.arg(&ukeys)
            .arg(&attrs)
            .arg(&dim_i)
            .arg(&nv_i)
            .arg(&side_i)
            .arg(&res_i)
            .arg(&off)
            .arg(&cand)
            .arg(&cval);
        // SAFETY: each vertex writes its counted range of the scanned offsets (total m).
        unsafe { bl.launch(grid(nv)?) }?;
        drop((cnt, off));
        let (cand, cval) = self.radix_sort(cand, cval, m, cbits)?;
        drop(cval);
        let sflag = self.alloc::<u32>(m + 1)?;
        let f = self.func("fc_surf_flags")?;
        let mut bl = self.stream.launch_builder(&f);
        bl.arg(&cand)
            .arg(&m_i)
            .arg(&ukeys)
            .arg(&nv_i)
            .arg(&attrs)
            .arg(&dim_i)
            .arg(&side_i)
            .arg(&res_i)
            .arg(&sflag);
        // SAFETY: m candidates in, m + 1 flags out.
        unsafe { bl.launch(grid(m + 1)?) }?;
        let srank = self.alloc::<u32>(m + 1)?;
        self.scan(&sflag, &srank, m + 1)?;
        let ns = self.read_u32(&srank, m)?;
        if ns == 0 {
            return Ok(out);
        }
        let ns_i = i32_of(ns, "surface cubes")?;
        let skeys = self.alloc::<u64>(ns)?;
        let scorner = self.alloc::<i32>(8 * ns)?;
        let scase = self.alloc::<i32>(ns)?;
        let f = self.func("fc_surf_write")?;
        let mut bl = self.stream.launch_builder(&f);
        bl.arg(&cand)
            .arg(&m_i)
            .arg(&sflag)
            .arg(&srank)
            .arg(&ukeys)
            .arg(&nv_i)
            .arg(&attrs)
            .arg(&dim_i)
            .arg(&side_i)
            .arg(&res_i)
            .arg(&skeys)
            .arg(&scorner)
            .arg(&scase);
        // SAFETY: flagged candidates' ranks are below ns; outputs hold ns (8 ns) entries.
        unsafe { bl.launch(grid(m)?) }?;
        drop((cand, sflag, srank));

        // 3. case ids after the ambiguity check
        let rcase = self.alloc::<i32>(ns)?;
        let f = self.func("fc_resolve_cases")?;
        let mut bl = self.stream.launch_builder(&f);
        bl.arg(&skeys)
            .arg(&scase)
            .arg(&ns_i)
            .arg(&res_i)
            .arg(&self.check)
            .arg(&rcase);
        // SAFETY: ns cubes; cases index the 256 x 5 table.
        unsafe { bl.launch(grid(ns)?) }?;

        // 4. dual vertex numbering: by count (1..4), then cube order
        let mut vranks = Vec::with_capacity(4);
        let vflags = self.alloc::<u32>(ns + 1)?;
        let f = self.func("fc_vd_flags")?;
        for num in 1..=4i32 {
            let mut bl = self.stream.launch_builder(&f);
            bl.arg(&rcase)
                .arg(&ns_i)
                .arg(&self.num_vd)
                .arg(&num)
                .arg(&vflags);
            // SAFETY: ns cases in, ns + 1 flags out.
            unsafe { bl.launch(grid(ns + 1)?) }?;
            let r = self.alloc::<u32>(ns + 1)?;
            self.scan(&vflags, &r, ns + 1)?;
            vranks.push(r);
        }
        let base = self.alloc::<u32>(ns)?;
        let total = self.zeros::<u32>(1)?;
        let f = self.func("fc_vd_base")?;
        let mut bl = self.stream.launch_builder(&f);
        bl.arg(&rcase)
            .arg(&ns_i)
            .arg(&self.num_vd)
            .arg(&vranks[0])
            .arg(&vranks[1])
            .arg(&vranks[2])
            .arg(&vranks[3])
            .arg(&base)
            .arg(&total);
        // SAFETY: four scans of ns + 1 entries; ns bases out.
        unsafe { bl.launch(grid(ns)?) }?;
        drop((vranks, vflags));
        let nvd = self.read_u32(&total, 0)?;
        i32_of(nvd, "dual vertices")?;

        // 5. dual vertices (crossings weighted by alpha, means weighted by beta) and gammas
        let vd = self.alloc::<f32>(3 * nvd)?;
        let vcol = self.alloc::<f32>(nvd * cd)?;
        let vgam = self.alloc::<f32>(nvd)?;
        let f = self.func("fc_dual_vertices")?;
        let mut bl = self.stream.launch_builder(&f);
        bl.arg(&skeys)
            .arg(&scorner)
            .arg(&rcase)
            .arg(&base)
            .arg(&ns_i)
            .arg(&res_i)
            .arg(&side_i)
            .arg(&attrs)
            .arg(&cd_i)
            .arg(&pos)
            .arg(&fv)
            .arg(&stride_i)
            .arg(&wbase)
            .arg(&has_w)
            .arg(&ckeys)
            .arg(&crows)
            .arg(&ni)
            .arg(&ws)
            .arg(&gamma_shift)
            .arg(&deform_k)
            .arg(&self.dmc)
            .arg(&self.num_vd)
            .arg(&vd)
            .arg(&vcol)
            .arg(&vgam);
        // SAFETY: each cube writes its num_vd dual vertices from its base (below nvd); rows of
        // `feats` come from the sorted active cubes (n).
        unsafe { bl.launch(grid(ns)?) }?;
        drop((ckeys, crows, pos));

        // 6. sign-changing edges, sorted and unique, and the quads around them
        let ecount = self.alloc::<u32>(ns + 1)?;
        let f = self.func("fc_edge_count")?;
        let mut bl = self.stream.launch_builder(&f);
        bl.arg(&scorner)
            .arg(&ns_i)
            .arg(&attrs)
            .arg(&dim_i)
            .arg(&ecount);
        // SAFETY: ns cubes in, ns + 1 counts out.
        unsafe { bl.launch(grid(ns + 1)?) }?;
        let eoff = self.alloc::<u32>(ns + 1)?;
        self.scan(&ecount, &eoff, ns + 1)?;
        let me = self.read_u32(&eoff, ns)?;
        let ekeys = self.alloc::<u64>(me)?;
        let evals = self.alloc::<u32>(me)?;
        let f = self.func("fc_edge_keys")?;
        let mut bl = self.stream.launch_builder(&f);
        bl.arg(&skeys)
            .arg(&scorner)
            .arg(&ns_i)
            .arg(&attrs)
            .arg(&dim_i)
            .arg(&side_i)
            .arg(&res_i)
            .arg(&vbits_i)
            .arg(&eoff)
            .arg(&ekeys)
            .arg(&evals);
        // SAFETY: each cube writes its counted range of the scanned offsets (total me).
        unsafe { bl.launch(grid(ns)?) }?;
        drop((ecount, eoff));
        let (ekeys, evals) = self.radix_sort(ekeys, evals, me, 2 * vbits)?;
        drop(evals);
        let (uekeys, _, ne) = self.unique(&ekeys, me)?;
        drop(ekeys);
        let ne_i = i32_of(ne, "surface edges")?;
        let quads = self.alloc::<i32>(4 * ne)?;
        let fout = self.alloc::<u32>(ne + 1)?;
        let fin = self.alloc::<u32>(ne + 1)?;
        let f = self.func("fc_quads")?;
        let mut bl = self.stream.launch_builder(&f);
        bl.arg(&uekeys)
            .arg(&ne_i)
            .arg(&vbits_i)
            .arg(&side_i)
            .arg(&res_i)
            .arg(&skeys)
            .arg(&ns_i)
            .arg(&rcase)
            .arg(&base)
            .arg(&self.egroup)
            .arg(&ukeys)
            .arg(&nv_i)
            .arg(&attrs)
            .arg(&dim_i)
            .arg(&quads)
            .arg(&fout)
            .arg(&fin);
        // SAFETY: ne edges in; 4 ne quad entries and ne + 1 flags out.
        unsafe { bl.launch(grid(ne + 1)?) }?;
        let rout = self.alloc::<u32>(ne + 1)?;
        let rin = self.alloc::<u32>(ne + 1)?;
        self.scan(&fout, &rout, ne + 1)?;
        self.scan(&fin, &rin, ne + 1)?;
        let nq = self.read_u32(&rout, ne)? + self.read_u32(&rin, ne)?;
        let nf = 2 * nq;
        i32_of(3 * nf, "face indices")?;
        let faces = self.alloc::<i32>(3 * nf)?;
        if nq > 0 {
            let f = self.func("fc_faces")?;
            let mut bl = self.stream.launch_builder(&f);
            bl.arg(&quads)
                .arg(&ne_i)
                .arg(&fout)
                .arg(&fin)
                .arg(&rout)
                .arg(&rin)
                .arg(&vgam)
                .arg(&faces);
            // SAFETY: each quad writes 6 indices at 6 x its rank (below 3 nf).
            unsafe { bl.launch(grid(ne)?) }?;
        }

        // 7. the mesh (and the intermediates) back to the host
        let v = self.read(&vd, 3 * nvd)?;
        out.mesh.vertices = v.chunks_exact(3).map(|p| [p[0], p[1], p[2]]).collect();
        if cd > 0 {
            out.mesh.colors = self.read(&vcol, nvd * cd)?;
        }
        let fi = self.read(&faces, 3 * nf)?;
        out.mesh.faces = fi.chunks_exact(3).map(|t| [t[0], t[1], t[2]]).collect();
        if let Some(t) = out.trace.as_mut() {
            t.surf_cubes = self.read(&skeys, ns)?;
            t.raw_cases = self.read(&scase, ns)?.iter().map(|&c| c as u8).collect();
            t.cases = self.read(&rcase, ns)?.iter().map(|&c| c as u8).collect();
            t.gammas = self.read(&vgam, nvd)?;
            let mask = (1u64 << vbits) - 1;
            t.edges = self
                .read(&uekeys, ne)?
                .iter()
                .map(|&e| ((e >> vbits) << 32) | (e & mask))
                .collect();
        }
        drop(storage);
        Ok(out)
    }
}

/// The GPU FlexiCubes against the CPU one on random sparse grids built here: the unit test below
/// and `trellisd doctor --check-kernels` run these. A failure names the first stage that
/// diverges (grid vertices, surface cubes, case ids, dual vertices, surface edges, faces).
pub mod checks {
    use super::*;
    use crate::representations::mesh::{
        GridVertexData, MeshExtractResult, MeshFeatureLayout, SparseFeatures2Mesh,
    };

    /// xorshift64*: deterministic data without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        /// Uniform in [-1, 1).
        fn uniform(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    /// A fraction `density` of the cubes of a `res` grid, shuffled, with random mesh-decoder
    /// rows (no SDF bias): corner scalars of both signs, deformations, weights, colour logits.
    fn random_grid(seed: u64, res: usize, density: f32, color: bool) -> (Vec<[i32; 3]>, Vec<f32>) {
        let mut rng = Rng(seed);
        let mut cubes = Vec::new();
        for x in 0..res as i32 {
            for y in 0..res as i32 {
                for z in 0..res as i32 {
                    if (rng.uniform() + 1.0) / 2.0 < density {
                        cubes.push([x, y, z]);
                    }
                }
            }
        }
        for i in (1..cubes.len()).rev() {
            let j = (rng.next() % (i as u64 + 1)) as usize;
            cubes.swap(i, j);
        }
        let c = MeshFeatureLayout { use_color: color }.channels();
        let feats = (0..cubes.len() * c)
            .map(|j| {
                let x = rng.uniform();
                match j % c {
                    0..8 => 0.5 * x + 0.02,
                    8..32 => 2.0 * x,
                    _ => 3.0 * x,
                }
            })
            .collect();
        (cubes, feats)
    }

    fn first_diff<T: PartialEq>(a: &[T], b: &[T]) -> Option<usize> {
        (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i))
    }

    /// Largest |a - b| over two equally long slices.
    fn max_abs(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() as f64)
            .fold(0.0, f64::max)
    }

    fn flat3<T: Copy>(v: &[[T; 3]]) -> Vec<T> {
        v.iter().flatten().copied().collect()
    }

    /// Exact equality of one stage, with the first differing element in the error.
    fn exact<T: PartialEq + std::fmt::Debug>(stage: &str, gpu: &[T], cpu: &[T]) -> Result<()> {
        if let Some(i) = first_diff(gpu, cpu) {
            bail!(
                "first divergence: {stage}: GPU has {} entries, CPU {}; first difference at {i}: GPU {:?}, CPU {:?}",
                gpu.len(),
                cpu.len(),
                gpu.get(i),
                cpu.get(i)
            );
        }
        Ok(())
    }

    /// Values of one stage within `tol` (absolute), else the worst element in the error.
    fn close(stage: &str, gpu: &[f32], cpu: &[f32], tol: f64) -> Result<f64> {
        ensure!(
            gpu.len() == cpu.len(),
            "first divergence: {stage}: GPU has {} values, CPU {}",
            gpu.len(),
            cpu.len()
        );
        let e = max_abs(gpu, cpu);
        if e > tol {
            let i = (0..gpu.len())
                .max_by(|&a, &b| (gpu[a] - cpu[a]).abs().total_cmp(&(gpu[b] - cpu[b]).abs()))
                .unwrap_or(0);
            bail!(
                "first divergence: {stage}: largest difference {e:.3e} > {tol:.0e} at {i} (GPU {}, CPU {})",
                gpu[i],
                cpu[i]
            );
        }
        Ok(e)
    }

    /// Coverage of one comparison: case ids seen and ambiguous cubes replaced (CPU trace).
    struct Coverage {
        cases: [bool; 256],
        replaced: usize,
        faces: usize,
    }

    /// One grid through both paths, stage by stage; returns the largest value difference.
    fn compare(
        dev: &candle_core::Device,
        (seed, res, density, color): (u64, usize, f32, bool),
        cov: &mut Coverage,
    ) -> Result<f64> {
        let what = format!("grid seed {seed} (res {res}, density {density}, colour {color})");
        let s2m = SparseFeatures2Mesh::new(res, color);
        let (cubes, feats) = random_grid(seed, res, density, color);
        let c = s2m.feats_channels();
        let mut biased = feats.clone();
        s2m.apply_sdf_bias(&mut biased)?;
        let mut ct = ExtractTrace::default();
        let t0 = std::time::Instant::now();
        let (cm, cg): (MeshExtractResult, GridVertexData) =
            s2m.extract_traced(&cubes, &biased, Some(&mut ct))?;
        let cpu_s = t0.elapsed().as_secs_f64();
        let t = Tensor::from_slice(&feats, (cubes.len(), c), dev)?;
        let mut gt = ExtractTrace::default();
        let (gm, gg) = s2m.extract_tensor(&cubes, &t, true, Some(&mut gt))?;
        // a second run, kernels compiled and loaded, without the intermediates: the stage's time
        let t0 = std::time::Instant::now();
        s2m.extract_tensor(&cubes, &t, false, None)?;
        let gpu_s = t0.elapsed().as_secs_f64();
        eprintln!(
            "flexicubes check, {what}: {} cubes, {} faces; CPU {:.1} ms, GPU {:.1} ms",
            cubes.len(),
            cm.faces.len(),
            cpu_s * 1e3,
            gpu_s * 1e3
        );
        let gg = gg.ok_or_else(|| anyhow!("{what}: the GPU did not return the grid vertices"))?;
        let run = || -> Result<f64> {
            exact("grid vertices (coords)", &gg.coords, &cg.coords)?;
            let mut worst = close("grid vertices (attrs)", &gg.attrs, &cg.attrs, 1e-6)?;
            worst = worst.max(close(
                "grid vertices (deformed)",
                &flat3(&gg.deformed),
                &flat3(&cg.deformed),
                1e-6,
            )?);
            exact("surface cubes (ids)", &gt.surf_cubes, &ct.surf_cubes)?;
            exact("surface cubes (raw case ids)", &gt.raw_cases, &ct.raw_cases)?;
            exact("case ids (ambiguity check)", &gt.cases, &ct.cases)?;
            worst = worst.max(close(
                "dual vertices (gamma)",
                &gt.gammas,
                &ct.gammas,
                1e-6,
            )?);
            worst = worst.max(close(
                "dual vertices (positions)",
                &flat3(&gm.vertices),
                &flat3(&cm.vertices),
                1e-5,
            )?);
            worst = worst.max(close(
                "dual vertices (colours)",
                &gm.vertex_attrs,
                &cm.vertex_attrs,
                1e-5,
            )?);
            exact("surface edges", &gt.edges, &ct.edges)?;
            exact("faces", &gm.faces, &cm.faces)?;
            ensure!(
                gm.attr_dim == cm.attr_dim && gm.success == cm.success,
                "mesh attribute width or success flag differ"
            );
            Ok(worst)
        };
        let worst = run().map_err(|e| anyhow!("{what}: {e}"))?;
        for &k in &ct.raw_cases {
            cov.cases[k as usize] = true;
        }
        cov.replaced += ct
            .raw_cases
            .iter()
            .zip(&ct.cases)
            .filter(|(a, b)| a != b)
            .count();
        cov.faces += cm.faces.len();
        Ok(worst)
    }

    /// GPU FlexiCubes == CPU FlexiCubes: grid vertices, surface cubes, case ids, surface edges and
    /// faces exactly, values within 1e-6 (grid) / 1e-5 (dual vertices, colours). Grids: a large
    /// random one (over a million corner keys: multi-level scans, many sort blocks) with colours,
    /// a small one without, a dense one; all 254 surface cases and the ambiguity replacements
    /// must occur. An all-outside grid must give the empty mesh on both.
    pub fn flexicubes_vs_cpu(dev: &candle_core::Device) -> Result<f64> {
        let mut cov = Coverage {
            cases: [false; 256],
            replaced: 0,
            faces: 0,
        };
        let mut worst = 0f64;
        for g in [
            (11, 72, 0.45, true),
            (12, 29, 0.3, false),
            (13, 12, 1.0, true),
        ] {
            worst = worst.max(compare(dev, g, &mut cov)?);
        }
        let missing: Vec<usize> = (1..255).filter(|&k| !cov.cases[k]).collect();
        ensure!(
            missing.is_empty(),
            "the test grids miss surface cases {missing:?}"
        );
        ensure!(
            cov.replaced > 0 && cov.faces > 1000,
            "the test grids replace {} ambiguous cases and make {} faces",
            cov.replaced,
            cov.faces
        );
        // nothing inside: no surface on either path
        let s2m = SparseFeatures2Mesh::new(8, true);
        let (cubes, mut feats) = random_grid(14, 8, 0.5, true);
        let c = s2m.feats_channels();
        for row in feats.chunks_mut(c) {
            row[..8].iter_mut().for_each(|v| *v = v.abs() + 0.5);
        }
        let t = Tensor::from_slice(&feats, (cubes.len(), c), dev)?;
        let (gm, _) = s2m.extract_tensor(&cubes, &t, false, None)?;
        ensure!(
            gm.vertices.is_empty() && gm.faces.is_empty() && !gm.success,
            "an all-outside grid gave {} vertices, {} faces on the GPU",
            gm.vertices.len(),
            gm.faces.len()
        );
        Ok(worst)
    }

    /// Every check: (name, result).
    pub fn all(dev: &candle_core::Device) -> Vec<(&'static str, Result<f64>)> {
        vec![("FlexiCubes (exact structure)", flexicubes_vs_cpu(dev))]
    }
}

#[cfg(test)]
mod tests {
    //! The GPU FlexiCubes against the CPU one; skipped (and saying so) without a usable GPU.

    #[test]
    fn gpu_flexicubes_matches_the_cpu() {
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
            eprintln!("{name}: largest value difference {e:.2e}");
        }
    }
}
