//! Sparse resampling (twin of `trellis/modules/sparse/spatial.py`): `SparseDownsample` (the
//! original's scatter-mean of the children, output sorted by (b, x, y, z)), `SparseUpsample` (back to the exact coords and order
//! of the paired downsample, nearest), `SparseSubdivide` (8 children per voxel, child j = 4dx+2dy+dz
//! at row 8i+j).

use std::sync::{Arc, Mutex};

use anyhow::{anyhow, ensure, Result};
use candle_core::{DType, Tensor};
use trellis_kernels::sparse_conv::subdivide_coords;

use super::tensor::{Geometry, SparseTensor, UpsampleCache};

/// Average pooling by `factor` per axis. The coarse geometry of the last input geometries is kept
/// (with the tables the mean needs): a flow calls its downsample on the same voxels at every step,
/// and the coarse geometry's own caches (neighbour maps, position embeddings, attention tables)
/// then live across steps instead of being rebuilt each forward.
#[derive(Debug, Clone)]
pub struct SparseDownsample {
    pub factor: [usize; 3],
    last: Arc<Mutex<Vec<Arc<Downsampled>>>>,
}

/// Input geometries whose downsampling is kept: two, for a sampler that alternates single and
/// CFG-paired (two-element) batches.
const KEEP_DOWNSAMPLED: usize = 2;

/// One input geometry's downsampling: the coarse geometry (which holds the fine one through its
/// [`UpsampleCache`], so the fine geometry stays alive while this is kept) and the mean's tables.
#[derive(Debug)]
struct Downsampled {
    coarse: Arc<Geometry>,
    /// CUDA: segment starts `[m + 1]` and members `[n]` (children in ascending row order).
    segments: Option<(Tensor, Tensor)>,
    /// Elsewhere: the coarse row of every fine row `[n]` and `children + 1` per coarse row `[m, 1]`.
    index_counts: Option<(Tensor, Tensor)>,
}

impl SparseDownsample {
    pub fn new(factor: usize) -> Self {
        Self {
            factor: [factor; 3],
            last: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub fn forward(&self, x: &SparseTensor) -> Result<SparseTensor> {
        let d = self.downsampled(x)?;
        let dev = x.device();
        if let Some((starts, members)) = &d.segments {
            #[cfg(feature = "cuda")]
            {
                let mean = crate::runtime::cuda_fused::segment_mean(
                    &x.feats().contiguous()?,
                    starts,
                    members,
                )?;
                return SparseTensor::from_geometry(d.coarse.clone(), mean);
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = (starts, members);
                anyhow::bail!("SparseDownsample: CUDA tables without the cuda feature");
            }
        }
        let Some((idx, counts)) = &d.index_counts else {
            anyhow::bail!("SparseDownsample: no tables for {dev:?}");
        };
        let feats32 = x.feats().to_dtype(DType::F32)?;
        let c = x.channels()?;
        let m = d.coarse.rows();
        let sums = Tensor::zeros((m, c), DType::F32, dev)?.index_add(idx, &feats32, 0)?;
        let mean = sums.broadcast_div(counts)?.to_dtype(x.dtype())?;
        SparseTensor::from_geometry(d.coarse.clone(), mean)
    }

    /// The coarse geometry and tables of `x`'s geometry: the kept ones when `x` has the geometry
    /// of the last call, else built (and kept instead).
    fn downsampled(&self, x: &SparseTensor) -> Result<Arc<Downsampled>> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let same = |d: &Arc<Downsampled>| {
            d.coarse
                .upsample_cache()
                .is_some_and(|u| Arc::ptr_eq(&u.fine, x.geometry()))
        };
        if let Some(i) = last.iter().position(same) {
            let d = last.remove(i);
            last.push(d.clone());
            return Ok(d);
        }
        let d = Arc::new(self.build(x)?);
        if last.len() >= KEEP_DOWNSAMPLED {
            last.remove(0);
        }
        last.push(d.clone());
        Ok(d)
    }

    fn build(&self, x: &SparseTensor) -> Result<Downsampled> {
        ensure!(
            self.factor.iter().all(|&f| f > 0),
            "SparseDownsample: factor {:?} must be positive",
            self.factor
        );
        let n = x.rows();
        let coarse: Vec<[i32; 4]> = x
            .coords()
            .chunks_exact(4)
            .map(|c| {
                [
                    c[0],
                    c[1].div_euclid(self.factor[0] as i32),
                    c[2].div_euclid(self.factor[1] as i32),
                    c[3].div_euclid(self.factor[2] as i32),
                ]
            })
            .collect();
        // torch.unique of the packed code = lexicographic order of (b, x, y, z).
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_unstable_by_key(|&i| coarse[i as usize]);
        let mut inverse = vec![0u32; n];
        let mut coords = Vec::new();
        // The original's `scatter_reduce(zeros, 'mean')` keeps include_self=True: the zero it starts
        // from counts as one more member, so a coarse voxel gets sum(children) / (children + 1).
        let mut counts: Vec<f32> = Vec::new();
        let mut last: Option<[i32; 4]> = None;
        for &i in &order {
            let c = coarse[i as usize];
            if last != Some(c) {
                coords.extend_from_slice(&c);
                counts.push(1.0);
                last = Some(c);
            }
            let row = counts.len() - 1;
            counts[row] += 1.0;
            inverse[i as usize] = row as u32;
        }
        let m = counts.len();
        let dev = x.device();
        let (mut segments, mut index_counts) = (None, None);
        if cfg!(feature = "cuda") && dev.is_cuda() {
            // Segments of the coarse rows, children in ascending row order (index_add's order).
            let mut starts = vec![0i32; m + 1];
            for &j in &inverse {
                starts[j as usize + 1] += 1;
            }
            for j in 0..m {
                starts[j + 1] += starts[j];
            }
            let mut fill: Vec<i32> = starts[..m].to_vec();
            let mut members = vec![0i32; n];
            for (i, &j) in inverse.iter().enumerate() {
                members[fill[j as usize] as usize] = i as i32;
                fill[j as usize] += 1;
            }
            segments = Some((
                Tensor::from_vec(starts, m + 1, dev)?,
                Tensor::from_vec(members, n, dev)?,
            ));
        } else {
            index_counts = Some((
                Tensor::from_slice(&inverse, n, dev)?,
                Tensor::from_vec(counts, (m, 1), dev)?,
            ));
        }
        let geo = Geometry::new(coords, Some(x.batch_size()), dev)?.with_upsample(UpsampleCache {
            factor: self.factor,
            fine: x.geometry().clone(),
            inverse,
            index: Mutex::new(None),
            #[cfg(feature = "cuda")]
            parent_tables: Mutex::new(Default::default()),
        });
        Ok(Downsampled {
            coarse: Arc::new(geo),
            segments,
            index_counts,
        })
    }
}

/// Nearest upsampling back onto the coords the paired [`SparseDownsample`] saw.
#[derive(Debug, Clone, Copy)]
pub struct SparseUpsample {
    pub factor: [usize; 3],
}

impl SparseUpsample {
    pub fn new(factor: usize) -> Self {
        Self {
            factor: [factor; 3],
        }
    }

    /// The cache of the downsample that made `x` (its fine geometry and each fine row's coarse
    /// row), checked against this upsample's factor.
    pub fn cache_of<'a>(&self, x: &'a SparseTensor) -> Result<&'a UpsampleCache> {
        let cache = x.geometry().upsample_cache().ok_or_else(|| {
            anyhow!("SparseUpsample: no paired SparseDownsample (this tensor was not downsampled)")
        })?;
        ensure!(
            cache.factor == self.factor,
            "SparseUpsample: factor {:?} does not match the downsample's {:?}",
            self.factor,
            cache.factor
        );
        Ok(cache)
    }

    pub fn forward(&self, x: &SparseTensor) -> Result<SparseTensor> {
        let cache = self.cache_of(x)?;
        let idx = cache.index(x.device())?;
        let feats = x.feats().contiguous()?.index_select(&idx, 0)?;
        SparseTensor::from_geometry(cache.fine.clone(), feats)
    }
}

/// Every voxel → its 8 children at twice the resolution, feats copied.
#[derive(Debug, Clone, Copy, Default)]
pub struct SparseSubdivide;

impl SparseSubdivide {
    pub fn forward(&self, x: &SparseTensor) -> Result<SparseTensor> {
        let n = x.rows();
        let c = x.channels()?;
        let feats = x
            .feats()
            .unsqueeze(1)?
            .broadcast_as((n, 8, c))?
            .reshape((n * 8, c))?;
        SparseTensor::from_geometry(self.geometry(x)?, feats)
    }

    /// The subdivided coords alone (child `j = 4dx + 2dy + dz` of row `i` at row `8i + j`), for
    /// layers that compute on the children without materialising their copied feats
    /// (`SparseConv3d::forward_subdivided`).
    pub fn geometry(&self, x: &SparseTensor) -> Result<Arc<Geometry>> {
        Ok(Arc::new(Geometry::new(
            subdivide_coords(x.coords()),
            Some(x.batch_size()),
            x.device(),
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn downsample_then_upsample_restores_order() {
        let dev = Device::Cpu;
        let coords = vec![0, 3, 0, 0, 0, 0, 0, 1, 0, 2, 1, 1, 0, 1, 1, 0, 1, 5, 5, 5];
        let feats = Tensor::new(&[[1f32], [2.], [3.], [4.], [5.]], &dev).unwrap();
        let x = SparseTensor::new(coords.clone(), feats).unwrap();
        let d = SparseDownsample::new(2).forward(&x).unwrap();
        // (0,0,0,0) <- rows 1,3; (0,1,0,0) <- rows 0,2; (1,2,2,2) <- row 4.
        assert_eq!(d.coords(), &[0, 0, 0, 0, 0, 1, 0, 0, 1, 2, 2, 2]);
        let f: Vec<f32> = d.feats().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(f, vec![2.0, 4.0 / 3.0, 2.5]);
        let u = SparseUpsample::new(2).forward(&d).unwrap();
        assert_eq!(u.coords(), coords.as_slice());
        let f: Vec<f32> = u.feats().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(f, vec![4.0 / 3.0, 2.0, 4.0 / 3.0, 2.0, 2.5]);
        assert!(SparseUpsample::new(2).forward(&x).is_err());
    }

    #[test]
    fn subdivide_orders_children() {
        let dev = Device::Cpu;
        let x = SparseTensor::new(vec![0, 1, 2, 3], Tensor::new(&[[7f32]], &dev).unwrap()).unwrap();
        let s = SparseSubdivide.forward(&x).unwrap();
        assert_eq!(&s.coords()[4..8], &[0, 2, 4, 7]);
        assert_eq!(&s.coords()[16..20], &[0, 3, 4, 6]);
        assert_eq!(s.rows(), 8);
    }
}
