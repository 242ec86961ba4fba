//! `SparseTensor` (twin of `trellis/modules/sparse/basic.py`): int32 coords `[N, 4]` = (b, x, y, z)
//! with contiguous batch blocks, feats `[N, C]` in the same row order.
//!
//! The coordinates live in a shared [`Geometry`] that also caches what later layers at the same
//! scale reuse (the original's "spatial cache" keyed by scale): submanifold neighbour maps, window
//! partitions, and — on a downsampled geometry — the finer geometry plus the inverse index that the
//! paired `SparseUpsample` restores. `replace(feats)` keeps the geometry, so every layer between two
//! rescalings shares one set of caches.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use trellis_kernels::sparse_conv::{submanifold_neighbours, NeighbourMap};

/// Windowed-attention partition (TRELLIS `calc_window_partition`): `fwd` lists the rows window by
/// window (windows ordered by their code), `bwd` is its inverse, `seq_lens`/`seq_batch` describe the
/// non-empty windows in that order, `window_xyz` is each row's window index (after the shift).
#[derive(Debug, Clone)]
pub struct WindowPartition {
    pub fwd: Vec<u32>,
    pub bwd: Vec<u32>,
    pub seq_lens: Vec<usize>,
    pub seq_batch: Vec<usize>,
    pub window_xyz: Vec<i32>,
}

/// The finer geometry a downsample came from, for the paired upsample.
pub struct UpsampleCache {
    pub factor: [usize; 3],
    pub fine: Arc<Geometry>,
    /// For every fine row, its coarse row.
    pub inverse: Vec<u32>,
    /// `inverse` on the geometry's device, made by the first upsample.
    pub index: Mutex<Option<Tensor>>,
    /// [`Self::parent_table_cuda`] by kernel size.
    #[cfg(feature = "cuda")]
    pub parent_tables: Mutex<HashMap<[usize; 3], Tensor>>,
}

impl UpsampleCache {
    /// `inverse` as a u32 tensor on `dev` (uploaded once).
    pub fn index(&self, dev: &Device) -> Result<Tensor> {
        let mut i = self.index.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = i.as_ref().filter(|t| t.device().same_device(dev)) {
            return Ok(t.clone());
        }
        let t = Tensor::from_slice(&self.inverse, self.inverse.len(), dev)?;
        *i = Some(t.clone());
        Ok(t)
    }

    /// The fine geometry's neighbour map of `kernel` with every neighbour replaced by its coarse
    /// row ([`parent_table`]), int32 `[fine rows * K]` on the fine geometry's CUDA device: a conv
    /// on the upsampled tensor reads the coarse feats through it
    /// (`SparseConv3d::forward_upsampled`). Made once per kernel size from
    /// [`Geometry::neighbour_table_cuda`] (one copy to the host and back).
    #[cfg(feature = "cuda")]
    pub fn parent_table_cuda(&self, kernel: [usize; 3]) -> Result<Tensor> {
        cached(&self.parent_tables, kernel, || {
            let nbr = self.fine.neighbour_table_cuda(kernel)?;
            let table = parent_table(&nbr.to_vec1::<i32>()?, &self.inverse)?;
            let n = table.len();
            Ok(Tensor::from_vec(table, n, nbr.device())?)
        })
    }
}

/// `table` (fine-row neighbours, −1 for none) with every neighbour `j` replaced by its coarse
/// row `inverse[j]`; −1 stays −1.
pub fn parent_table(table: &[i32], inverse: &[u32]) -> Result<Vec<i32>> {
    table
        .iter()
        .map(|&j| {
            if j < 0 {
                return Ok(-1);
            }
            let p = inverse.get(j as usize).with_context(|| {
                format!("neighbour row {j} outside the {} fine rows", inverse.len())
            })?;
            Ok(i32::try_from(*p)?)
        })
        .collect()
}

/// The value of `key` in one of a geometry's caches, made by `make` (and kept) the first time.
fn cached<K: std::hash::Hash + Eq, V: Clone>(
    map: &Mutex<HashMap<K, V>>,
    key: K,
    make: impl FnOnce() -> Result<V>,
) -> Result<V> {
    let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(v) = m.get(&key) {
        return Ok(v.clone());
    }
    let v = make()?;
    m.insert(key, v.clone());
    Ok(v)
}

/// (window size, shift) per axis.
type WindowKey = ([usize; 3], [i32; 3]);

/// Coordinates, batch layout and the per-scale caches.
pub struct Geometry {
    coords: Vec<i32>,
    batch_size: usize,
    layout: Vec<Range<usize>>,
    device: Device,
    upsample: Option<UpsampleCache>,
    neighbours: Mutex<HashMap<[usize; 3], Arc<NeighbourMap>>>,
    #[cfg(feature = "cuda")]
    neighbours_cuda: Mutex<HashMap<[usize; 3], Tensor>>,
    /// [`Self::conv_order_cuda`] by kernel size.
    #[cfg(feature = "cuda")]
    conv_orders_cuda: Mutex<HashMap<[usize; 3], Tensor>>,
    windows: Mutex<HashMap<WindowKey, Arc<WindowPartition>>>,
    batch_index: Mutex<Option<Tensor>>,
    /// Absolute position embeddings of the coords, by (channels, in_channels).
    position_embeddings: Mutex<HashMap<(usize, usize), Tensor>>,
}

impl std::fmt::Debug for Geometry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Geometry")
            .field("rows", &self.rows())
            .field("batch_size", &self.batch_size)
            .finish()
    }
}

impl Geometry {
    /// Validates `coords` (`[N, 4]` row-major; batch indices non-negative and non-decreasing) and
    /// derives the layout. `batch_size` defaults to `max batch + 1`.
    pub fn new(coords: Vec<i32>, batch_size: Option<usize>, device: &Device) -> Result<Self> {
        ensure!(
            coords.len().is_multiple_of(4),
            "sparse tensor: coords must be [N, 4] (b, x, y, z), got {} values",
            coords.len()
        );
        let n = coords.len() / 4;
        let mut prev = 0i32;
        for i in 0..n {
            let b = coords[i * 4];
            ensure!(b >= 0, "sparse tensor: negative batch index {b} at row {i}");
            ensure!(
                b >= prev,
                "sparse tensor: batch blocks must be contiguous and ascending (row {i} has batch {b} after {prev})"
            );
            prev = b;
        }
        let max_b = if n == 0 { 0 } else { prev as usize + 1 };
        let batch_size = batch_size.unwrap_or(max_b);
        ensure!(
            batch_size >= max_b,
            "sparse tensor: batch size {batch_size} but a coordinate has batch {}",
            max_b.saturating_sub(1)
        );
        let mut layout = Vec::with_capacity(batch_size);
        let mut start = 0;
        for b in 0..batch_size {
            let mut end = start;
            while end < n && coords[end * 4] as usize == b {
                end += 1;
            }
            layout.push(start..end);
            start = end;
        }
        Ok(Self {
            coords,
            batch_size,
            layout,
            device: device.clone(),
            upsample: None,
            neighbours: Mutex::new(HashMap::new()),
            #[cfg(feature = "cuda")]
            neighbours_cuda: Mutex::new(HashMap::new()),
            #[cfg(feature = "cuda")]
            conv_orders_cuda: Mutex::new(HashMap::new()),
            windows: Mutex::new(HashMap::new()),
            batch_index: Mutex::new(None),
            position_embeddings: Mutex::new(HashMap::new()),
        })
    }

    pub fn rows(&self) -> usize {
        self.coords.len() / 4
    }
    pub fn coords(&self) -> &[i32] {
        &self.coords
    }
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }
    /// Row range of every batch element.
    pub fn layout(&self) -> &[Range<usize>] {
        &self.layout
    }
    pub fn upsample_cache(&self) -> Option<&UpsampleCache> {
        self.upsample.as_ref()
    }
    pub(crate) fn with_upsample(mut self, cache: UpsampleCache) -> Self {
        self.upsample = Some(cache);
        self
    }

    /// The position embedding table keyed by `key` (made by `make` once per geometry): a flow
    /// adds the same table at every step.
    pub fn position_embedding(
        &self,
        key: (usize, usize),
        make: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        cached(&self.position_embeddings, key, make)
    }

    /// Submanifold neighbour map for a kernel size (built once per geometry).
    pub fn neighbour_map(&self, kernel: [usize; 3]) -> Result<Arc<NeighbourMap>> {
        cached(&self.neighbours, kernel, || {
            Ok(Arc::new(submanifold_neighbours(&self.coords, kernel)?))
        })
    }

    /// The window partition for `window` and `shift` (built once per geometry).
    pub fn window_partition(
        &self,
        window: [usize; 3],
        shift: [i32; 3],
    ) -> Result<Arc<WindowPartition>> {
        cached(&self.windows, (window, shift), || {
            Ok(Arc::new(self.compute_window_partition(window, shift)?))
        })
    }

    fn compute_window_partition(
        &self,
        window: [usize; 3],
        shift: [i32; 3],
    ) -> Result<WindowPartition> {
        ensure!(
            window.iter().all(|&w| w > 0),
            "windowed attention: window size {window:?} must be positive"
        );
        let n = self.rows();
        let mut max = [0i64; 3];
        for c in self.coords.chunks_exact(4) {
            for a in 0..3 {
                max[a] = max[a].max(c[a + 1] as i64 + shift[a] as i64);
            }
        }
        let nw: Vec<i64> = (0..3)
            .map(|a| (max[a] + 1 + window[a] as i64 - 1).div_euclid(window[a] as i64))
            .collect();
        let offset = [nw[0] * nw[1] * nw[2], nw[1] * nw[2], nw[2], 1];
        let mut window_xyz = Vec::with_capacity(n * 3);
        let mut code = Vec::with_capacity(n);
        for c in self.coords.chunks_exact(4) {
            let mut k = c[0] as i64 * offset[0];
            for a in 0..3 {
                let w = (c[a + 1] as i64 + shift[a] as i64).div_euclid(window[a] as i64);
                window_xyz.push(i32::try_from(w).context("window index overflows i32")?);
                k += w * offset[a + 1];
            }
            code.push(k);
        }
        let mut fwd: Vec<u32> = (0..n as u32).collect();
        fwd.sort_by_key(|&i| code[i as usize]);
        let mut bwd = vec![0u32; n];
        for (p, &i) in fwd.iter().enumerate() {
            bwd[i as usize] = p as u32;
        }
        let mut seq_lens = Vec::new();
        let mut seq_batch = Vec::new();
        let mut p = 0;
        while p < n {
            let k = code[fwd[p] as usize];
            let mut q = p;
            while q < n && code[fwd[q] as usize] == k {
                q += 1;
            }
            seq_lens.push(q - p);
            seq_batch.push(k.div_euclid(offset[0]) as usize);
            p = q;
        }
        Ok(WindowPartition {
            fwd,
            bwd,
            seq_lens,
            seq_batch,
            window_xyz,
        })
    }

    /// The batch index of every row as a u32 tensor `[N]` (for per-batch broadcasts).
    pub fn batch_index(&self) -> Result<Tensor> {
        let mut m = self.batch_index.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = m.as_ref() {
            return Ok(t.clone());
        }
        let idx: Vec<u32> = self.coords.chunks_exact(4).map(|c| c[0] as u32).collect();
        let t = Tensor::from_vec(idx, self.rows(), &self.device)?;
        *m = Some(t.clone());
        Ok(t)
    }

    /// The submanifold neighbour map of `kernel` as an int32 tensor `[N * K]` on this geometry's
    /// (CUDA) device, built on the GPU from the coords and cached like [`Self::neighbour_map`].
    #[cfg(feature = "cuda")]
    pub fn neighbour_table_cuda(&self, kernel: [usize; 3]) -> Result<Tensor> {
        cached(&self.neighbours_cuda, kernel, || {
            crate::runtime::cuda_ops::submanifold_neighbours(&self.coords_tensor()?, kernel)
        })
    }

    /// The rows ordered by their neighbour masks of `kernel` (stable:
    /// `trellis_kernels::sparse_conv::mask_order`) as an int32 tensor `[N]` on this geometry's
    /// (CUDA) device, for the `sparse_conv_k64_*` kernels' row order (`TRELLIS_CONV_ORDER`).
    /// Made once per kernel size from [`Self::neighbour_table_cuda`] (one copy of it to the host,
    /// the sort on the CPU) and cached.
    #[cfg(feature = "cuda")]
    pub fn conv_order_cuda(&self, kernel: [usize; 3]) -> Result<Tensor> {
        cached(&self.conv_orders_cuda, kernel, || {
            let table: Vec<i32> = self.neighbour_table_cuda(kernel)?.to_vec1()?;
            let volume = kernel.iter().product::<usize>();
            let order = trellis_kernels::sparse_conv::mask_order(&table, volume);
            Ok(Tensor::from_vec(order, self.rows(), &self.device)?)
        })
    }

    /// The coords as an int32 tensor `[N, 4]`.
    pub fn coords_tensor(&self) -> Result<Tensor> {
        Ok(Tensor::from_slice(
            &self.coords,
            (self.rows(), 4),
            &self.device,
        )?)
    }
}

/// A batch of sparse voxel features.
#[derive(Clone, Debug)]
pub struct SparseTensor {
    feats: Tensor,
    geo: Arc<Geometry>,
}

impl SparseTensor {
    /// From row-major coords `[N, 4]` and feats `[N, C]`.
    pub fn new(coords: Vec<i32>, feats: Tensor) -> Result<Self> {
        let geo = Geometry::new(coords, None, feats.device())?;
        Self::from_geometry(Arc::new(geo), feats)
    }

    /// From an int32 (or any integer) coords tensor `[N, 4]` and feats `[N, C]`.
    pub fn from_tensors(coords: &Tensor, feats: Tensor) -> Result<Self> {
        ensure!(
            coords.rank() == 2 && coords.dim(1)? == 4,
            "sparse tensor: coords must be [N, 4], got {:?}",
            coords.dims()
        );
        let c: Vec<i32> = coords
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::I64)?
            .flatten_all()?
            .to_vec1::<i64>()?
            .into_iter()
            .map(i32::try_from)
            .collect::<std::result::Result<_, _>>()
            .context("sparse tensor: a coordinate does not fit in int32")?;
        Self::new(c, feats)
    }

    /// Feats on an existing geometry (sharing its caches).
    pub fn from_geometry(geo: Arc<Geometry>, feats: Tensor) -> Result<Self> {
        ensure!(
            feats.rank() >= 1 && feats.dim(0)? == geo.rows(),
            "sparse tensor: feats {:?} do not match {} coords",
            feats.dims(),
            geo.rows()
        );
        Ok(Self { feats, geo })
    }

    pub fn feats(&self) -> &Tensor {
        &self.feats
    }
    pub fn geometry(&self) -> &Arc<Geometry> {
        &self.geo
    }
    pub fn coords(&self) -> &[i32] {
        self.geo.coords()
    }
    pub fn coords_tensor(&self) -> Result<Tensor> {
        self.geo.coords_tensor()
    }
    pub fn rows(&self) -> usize {
        self.geo.rows()
    }
    pub fn batch_size(&self) -> usize {
        self.geo.batch_size()
    }
    pub fn layout(&self) -> &[Range<usize>] {
        self.geo.layout()
    }
    pub fn dtype(&self) -> DType {
        self.feats.dtype()
    }
    pub fn device(&self) -> &Device {
        self.feats.device()
    }
    /// Channels of `[N, C]` feats.
    pub fn channels(&self) -> Result<usize> {
        Ok(self.feats.dim(1)?)
    }

    /// Same coords and caches, new feats.
    pub fn replace(&self, feats: Tensor) -> Result<Self> {
        Self::from_geometry(self.geo.clone(), feats)
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        self.replace(self.feats.to_dtype(dtype)?)
    }

    /// Elementwise sum with another sparse tensor on the same coords.
    pub fn add(&self, other: &SparseTensor) -> Result<Self> {
        self.same_rows(other)?;
        if let Some(y) = crate::modules::gpu_fused::add(&self.feats, other.feats())? {
            return self.replace(y);
        }
        self.replace((&self.feats + other.feats())?)
    }

    fn same_rows(&self, other: &SparseTensor) -> Result<()> {
        if !Arc::ptr_eq(&self.geo, &other.geo) && self.coords() != other.coords() {
            bail!("sparse tensors on different coords cannot be combined");
        }
        Ok(())
    }

    /// A per-batch-element tensor `[B, C]` repeated onto every row: `[N, C]`.
    pub fn batch_broadcast(&self, per_batch: &Tensor) -> Result<Tensor> {
        ensure!(
            per_batch.rank() == 2 && per_batch.dim(0)? == self.batch_size(),
            "per-batch tensor {:?} does not match batch size {}",
            per_batch.dims(),
            self.batch_size()
        );
        Ok(per_batch
            .contiguous()?
            .index_select(&self.geo.batch_index()?, 0)?)
    }

    /// `x * (1 + scale[b]) + shift[b]` with `[B, C]` scale and shift (the adaLN modulation).
    pub fn modulate(&self, shift: &Tensor, scale: &Tensor) -> Result<Self> {
        let scale = (self.batch_broadcast(scale)? + 1.0)?;
        let shift = self.batch_broadcast(shift)?;
        self.replace(self.feats.mul(&scale)?.add(&shift)?)
    }

    /// `x * gate[b]` with a `[B, C]` gate.
    pub fn gate(&self, gate: &Tensor) -> Result<Self> {
        self.replace(self.feats.mul(&self.batch_broadcast(gate)?)?)
    }

    /// `self + h * gate[b]` with a `[B, C]` gate (the gated residual of the DiT blocks), one fused
    /// pass on the CPU.
    pub fn gated_add(&self, h: &SparseTensor, gate: &Tensor) -> Result<Self> {
        self.same_rows(h)?;
        let rows = self.layout().to_vec();
        if let Some(y) = crate::modules::gpu_fused::gated_add(&self.feats, h.feats(), gate, &rows)?
        {
            return self.replace(y);
        }
        match crate::modules::cpu_fused::gated_add(&self.feats, h.feats(), gate, rows)? {
            Some(y) => self.replace(y),
            None => self.add(&h.gate(gate)?),
        }
    }

    /// Feats concatenated along channels with another `[N, C']` tensor on the same rows.
    pub fn cat_feats(&self, other: &Tensor) -> Result<Self> {
        self.replace(Tensor::cat(&[&self.feats, other], 1)?)
    }
}

/// Row-major f32 copy of any float tensor.
pub fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_table_maps_neighbours_to_coarse_rows() {
        let inverse = [0u32, 0, 1, 2, 1];
        assert_eq!(
            parent_table(&[-1, 0, 4, 3, 2, -1], &inverse).unwrap(),
            vec![-1, 0, 1, 2, 1, -1]
        );
        assert!(parent_table(&[5], &inverse).is_err());
    }

    #[test]
    fn layout_and_validation() {
        let dev = Device::Cpu;
        let f = Tensor::zeros((3, 2), DType::F32, &dev).unwrap();
        let x = SparseTensor::new(vec![0, 1, 1, 1, 0, 2, 2, 2, 2, 0, 0, 0], f.clone()).unwrap();
        assert_eq!(x.batch_size(), 3);
        assert_eq!(x.layout(), &[0..2, 2..2, 2..3]);
        // Not batch-contiguous / ascending.
        assert!(SparseTensor::new(vec![1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1], f.clone()).is_err());
        // Feats rows do not match.
        assert!(SparseTensor::new(vec![0, 0, 0, 0], f).is_err());
    }

    #[test]
    fn window_partition_groups_by_batch_and_window() {
        let dev = Device::Cpu;
        let coords = vec![0, 0, 0, 0, 0, 5, 0, 0, 0, 1, 1, 1, 1, 4, 4, 4];
        let g = Geometry::new(coords, None, &dev).unwrap();
        let p = g.window_partition([4, 4, 4], [0, 0, 0]).unwrap();
        // Windows: b0 (0,0,0) rows 0,2; b0 (1,0,0) row 1; b1 (1,1,1) row 3.
        assert_eq!(p.seq_lens, vec![2, 1, 1]);
        assert_eq!(p.seq_batch, vec![0, 0, 1]);
        assert_eq!(p.fwd, vec![0, 2, 1, 3]);
        for (i, &f) in p.fwd.iter().enumerate() {
            assert_eq!(p.bwd[f as usize] as usize, i);
        }
        let s = g.window_partition([4, 4, 4], [2, 2, 2]).unwrap();
        assert_eq!(&s.window_xyz[3..6], &[1, 0, 0]);
        assert_eq!(s.seq_lens.iter().sum::<usize>(), 4);
    }
}
