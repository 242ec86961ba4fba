//! Triangle meshes from the mesh decoder (twin of `trellis/representations/mesh/cube2mesh.py`:
//! `MeshExtractResult` and `SparseFeatures2Mesh`). The surface extraction itself is the sparse
//! FlexiCubes of `trellis_kernels::flexicubes`.

use anyhow::{anyhow, bail, Result};
use candle_core::Tensor;
use trellis_kernels::flexicubes::{
    self, CornerLayout, ExtractTrace, FlexiCubesOptions, RowView, SparseGrid, WEIGHT_CHANNELS,
};

/// A mesh with per-vertex attributes (colours) and per-face normals (`MeshExtractResult`).
#[derive(Debug, Clone, PartialEq)]
pub struct MeshExtractResult {
    /// `[V, 3]` positions (in `[-0.5, 0.5]^3` for decoder meshes).
    pub vertices: Vec<[f32; 3]>,
    /// `[F, 3]` triangles, counter-clockwise seen from outside.
    pub faces: Vec<[u32; 3]>,
    /// `[V, attr_dim]` vertex attributes (the mesh decoder's 6 colour channels), possibly empty.
    pub vertex_attrs: Vec<f32>,
    pub attr_dim: usize,
    /// `[F, 3]` unit face normals (`comput_face_normals`; the original repeats each 3 times).
    pub face_normal: Vec<[f32; 3]>,
    /// Grid resolution the mesh was extracted at.
    pub res: usize,
    /// False when the mesh has no vertex or no face.
    pub success: bool,
}

fn sub(a: [f32; 3], b: [f32; 3]) -> [f32; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

fn cross(a: [f32; 3], b: [f32; 3]) -> [f32; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

/// `F.normalize` (eps 1e-12).
fn normalize(v: [f32; 3]) -> [f32; 3] {
    let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt().max(1e-12);
    v.map(|x| x / n)
}

impl MeshExtractResult {
    /// Builds the mesh and its face normals; every face index must name a vertex.
    pub fn new(
        vertices: Vec<[f32; 3]>,
        faces: Vec<[u32; 3]>,
        vertex_attrs: Vec<f32>,
        attr_dim: usize,
        res: usize,
    ) -> Result<Self> {
        let nv = vertices.len();
        if let Some(f) = faces.iter().find(|f| f.iter().any(|&i| i as usize >= nv)) {
            bail!("mesh: face {f:?} names a vertex beyond the {nv} vertices");
        }
        if vertex_attrs.len() != nv * attr_dim {
            bail!(
                "mesh: {} vertex attribute values for {nv} vertices x {attr_dim} channels",
                vertex_attrs.len()
            );
        }
        let face_normal = faces
            .iter()
            .map(|f| {
                let [a, b, c] = f.map(|i| vertices[i as usize]);
                normalize(cross(sub(b, a), sub(c, a)))
            })
            .collect();
        let success = nv != 0 && !faces.is_empty();
        Ok(Self {
            vertices,
            faces,
            vertex_attrs,
            attr_dim,
            face_normal,
            res,
            success,
        })
    }

    /// Unit vertex normals: the sum of the (area-weighted) normals of the faces around each
    /// vertex, normalised (`comput_v_normals`).
    pub fn vertex_normals(&self) -> Vec<[f32; 3]> {
        let mut n = vec![[0f32; 3]; self.vertices.len()];
        for f in &self.faces {
            let [a, b, c] = f.map(|i| self.vertices[i as usize]);
            let fn_ = cross(sub(b, a), sub(c, a));
            for &i in f {
                for k in 0..3 {
                    n[i as usize][k] += fn_[k];
                }
            }
        }
        n.into_iter().map(normalize).collect()
    }
}

/// The grid-vertex intermediates of one extraction (what the parity fixtures record).
#[derive(Debug, Clone, PartialEq)]
pub struct GridVertexData {
    /// `[V, 3]` grid vertices touched by active cubes, sorted by (x, y, z).
    pub coords: Vec<[i32; 3]>,
    /// `[V, attr_dim]` averaged `[sdf, deform 3, color 6?]`.
    pub attrs: Vec<f32>,
    pub attr_dim: usize,
    /// `[V, 3]` deformed positions.
    pub deformed: Vec<[f32; 3]>,
}

/// Channel ranges of a fine voxel's features: `[sdf 8 | deform 24 | weights 21 | color 48?]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeshFeatureLayout {
    pub use_color: bool,
}

impl MeshFeatureLayout {
    pub const SDF: usize = 0;
    pub const DEFORM: usize = 8;
    pub const WEIGHTS: usize = 8 + 24;
    pub const COLOR: usize = 8 + 24 + WEIGHT_CHANNELS;
    /// Colour channels per corner (RGB plus a normal-like map).
    pub const COLOR_DIM: usize = 6;

    pub fn channels(self) -> usize {
        Self::COLOR
            + if self.use_color {
                8 * Self::COLOR_DIM
            } else {
                0
            }
    }

    /// Per-corner attribute width `[sdf, deform 3, color 6?]`.
    pub fn corner_dim(self) -> usize {
        4 + if self.use_color { Self::COLOR_DIM } else { 0 }
    }
}

/// `SparseFeatures2Mesh`: turns per-fine-voxel features into a mesh with FlexiCubes at `res`.
#[derive(Debug, Clone, Copy)]
pub struct SparseFeatures2Mesh {
    pub res: usize,
    pub layout: MeshFeatureLayout,
    pub options: FlexiCubesOptions,
}

impl SparseFeatures2Mesh {
    pub fn new(res: usize, use_color: bool) -> Self {
        Self {
            res,
            layout: MeshFeatureLayout { use_color },
            options: FlexiCubesOptions::default(),
        }
    }

    /// Channels the network must output per fine voxel.
    pub fn feats_channels(&self) -> usize {
        self.layout.channels()
    }

    /// `-1 / res`, added to every corner SDF.
    pub fn sdf_bias(&self) -> f32 {
        (-1.0 / self.res as f64) as f32
    }

    /// Adds the SDF bias to the 8 SDF channels of every row, in place — the original does this on
    /// the network output itself (`sdf += self.sdf_bias` on a view of the feats).
    pub fn apply_sdf_bias(&self, feats: &mut [f32]) -> Result<()> {
        let c = self.feats_channels();
        if !feats.len().is_multiple_of(c) {
            bail!(
                "mesh features: {} values is not a multiple of {c} channels",
                feats.len()
            );
        }
        let b = self.sdf_bias();
        for row in feats.chunks_mut(c) {
            row[..8].iter_mut().for_each(|s| *s += b);
        }
        Ok(())
    }

    /// Extracts the mesh from active voxel coordinates `(x, y, z)` in `0..res` and their feature
    /// rows `[N, feats_channels]`, which must already carry the SDF bias (see
    /// [`Self::apply_sdf_bias`]); the grid-vertex intermediates come back too.
    pub fn extract(
        &self,
        coords: &[[i32; 3]],
        feats: &[f32],
    ) -> Result<(MeshExtractResult, GridVertexData)> {
        self.extract_traced(coords, feats, None)
    }

    /// [`Self::extract`], recording FlexiCubes' intermediates in `trace` when given.
    pub fn extract_traced(
        &self,
        coords: &[[i32; 3]],
        feats: &[f32],
        trace: Option<&mut ExtractTrace>,
    ) -> Result<(MeshExtractResult, GridVertexData)> {
        let c = self.feats_channels();
        if feats.len() != coords.len() * c {
            bail!(
                "mesh features: {} values, expected {} voxels x {c} channels",
                feats.len(),
                coords.len()
            );
        }
        let cd = self.layout.corner_dim();
        let color = self.layout.use_color;
        let segments = [
            (MeshFeatureLayout::SDF, 1),
            (MeshFeatureLayout::DEFORM, 3),
            (MeshFeatureLayout::COLOR, MeshFeatureLayout::COLOR_DIM),
        ];
        let corners = CornerLayout {
            stride: c,
            segments: if color { &segments[..] } else { &segments[..2] },
        };
        let verts = flexicubes::cube_corners_to_vertices(self.res, coords, feats, corners)
            .map_err(|e| anyhow!("{e}"))?;
        let deformed = flexicubes::deform_vertices(self.res, &verts.coords, &verts.attrs, cd, 1)
            .map_err(|e| anyhow!("{e}"))?;
        let sdf: Vec<f32> = verts.attrs.chunks(cd).map(|r| r[0]).collect();
        let colors: Vec<f32> = if color {
            verts
                .attrs
                .chunks(cd)
                .flat_map(|r| r[4..].iter().copied())
                .collect()
        } else {
            Vec::new()
        };
        let grid = SparseGrid {
            res: self.res,
            vertex_coords: &verts.coords,
            sdf: &sdf,
            positions: &deformed,
            colors: color.then_some(&colors[..]),
            color_dim: if color {
                MeshFeatureLayout::COLOR_DIM
            } else {
                0
            },
            cube_coords: coords,
            cube_weights: Some(RowView {
                data: feats,
                stride: c,
                offset: MeshFeatureLayout::WEIGHTS,
            }),
        };
        let m =
            flexicubes::extract_traced(&grid, self.options, trace).map_err(|e| anyhow!("{e}"))?;
        drop((sdf, colors));
        let faces = m.faces.iter().map(|f| f.map(|i| i as u32)).collect();
        let mesh = MeshExtractResult::new(m.vertices, faces, m.colors, m.color_dim, self.res)?;
        let data = GridVertexData {
            coords: verts.coords,
            attrs: verts.attrs,
            attr_dim: cd,
            deformed,
        };
        Ok((mesh, data))
    }

    /// Extracts the mesh from feature rows `[N, feats_channels]` that may live on a GPU and do
    /// NOT carry the SDF bias yet (it is added as [`Self::apply_sdf_bias`] adds it). On a CUDA
    /// device (`cuda` builds) the whole extraction runs there (`runtime::cuda_flexicubes`): the
    /// features stay on the device, the coordinates go up once, and only the mesh (with
    /// `keep_grid`, the grid vertices too) comes back. Elsewhere this is [`Self::extract`].
    pub fn extract_tensor(
        &self,
        coords: &[[i32; 3]],
        feats: &Tensor,
        keep_grid: bool,
        trace: Option<&mut ExtractTrace>,
    ) -> Result<(MeshExtractResult, Option<GridVertexData>)> {
        #[cfg(feature = "cuda")]
        if feats.device().is_cuda() {
            return self.extract_on_gpu(coords, feats, keep_grid, trace);
        }
        let mut host = crate::modules::sparse::tensor::to_f32_vec(feats)?;
        self.apply_sdf_bias(&mut host)?;
        let (mesh, grid) = self.extract_traced(coords, &host, trace)?;
        Ok((mesh, keep_grid.then_some(grid)))
    }

    #[cfg(feature = "cuda")]
    fn extract_on_gpu(
        &self,
        coords: &[[i32; 3]],
        feats: &Tensor,
        keep_grid: bool,
        trace: Option<&mut ExtractTrace>,
    ) -> Result<(MeshExtractResult, Option<GridVertexData>)> {
        use crate::runtime::cuda_flexicubes::{CudaFlexiCubes, FeatureLayout, Keep};
        let c = self.feats_channels();
        if feats.dims() != [coords.len(), c] {
            bail!(
                "mesh features: shape {:?}, expected [{} voxels, {c} channels]",
                feats.dims(),
                coords.len()
            );
        }
        let layout = FeatureLayout {
            stride: c,
            sdf: MeshFeatureLayout::SDF,
            deform: MeshFeatureLayout::DEFORM,
            weights: Some(MeshFeatureLayout::WEIGHTS),
            color: self
                .layout
                .use_color
                .then_some((MeshFeatureLayout::COLOR, MeshFeatureLayout::COLOR_DIM)),
            sdf_bias: self.sdf_bias(),
        };
        let gpu = CudaFlexiCubes::new(feats.device())?;
        let keep = Keep {
            grid: keep_grid,
            trace: trace.is_some(),
        };
        let r = gpu.extract(self.res, coords, feats, layout, self.options, keep)?;
        if let (Some(t), Some(rt)) = (trace, r.trace) {
            *t = rt;
        }
        let m = r.mesh;
        let faces = m.faces.iter().map(|f| f.map(|i| i as u32)).collect();
        let mesh = MeshExtractResult::new(m.vertices, faces, m.colors, m.color_dim, self.res)?;
        let grid = r.grid.map(|(g, deformed)| GridVertexData {
            coords: g.coords,
            attrs: g.attrs,
            attr_dim: g.dim,
            deformed,
        });
        Ok((mesh, grid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn face_normals_follow_the_winding() {
        let m = MeshExtractResult::new(
            vec![
                [0.0, 0.0, 0.0],
                [2.0, 0.0, 0.0],
                [0.0, 3.0, 0.0],
                [0.0, 0.0, 1.0],
            ],
            vec![[0, 1, 2], [0, 2, 3]],
            vec![],
            0,
            64,
        )
        .unwrap();
        assert_eq!(m.face_normal, vec![[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]);
        assert!(m.success);
        let vn = m.vertex_normals();
        // vertices 0 and 2 touch both faces: area-weighted (0,0,6) + (3,0,0)
        let both = normalize([3.0, 0.0, 6.0]);
        assert_eq!(vn, vec![both, [0.0, 0.0, 1.0], both, [1.0, 0.0, 0.0]]);
        assert!(MeshExtractResult::new(vec![[0.0; 3]], vec![[0, 0, 1]], vec![], 0, 1).is_err());
    }

    #[test]
    fn layout_matches_the_original_channel_count() {
        assert_eq!(SparseFeatures2Mesh::new(64, true).feats_channels(), 101);
        assert_eq!(SparseFeatures2Mesh::new(64, false).feats_channels(), 53);
        assert_eq!(SparseFeatures2Mesh::new(64, true).sdf_bias(), -1.0 / 64.0);
    }

    /// A solid ball of active voxels whose corner SDFs are the distance to a sphere: the mesh encloses
    /// the sphere, with colours in (0, 1).
    #[test]
    fn ball_of_voxels_gives_a_closed_coloured_mesh() {
        let res = 16;
        let s2m = SparseFeatures2Mesh::new(res, true);
        let c = s2m.feats_channels();
        let mut coords = Vec::new();
        let mut feats = Vec::new();
        for x in 0..res as i32 {
            for y in 0..res as i32 {
                for z in 0..res as i32 {
                    let p = [x, y, z].map(|v| (v as f32 + 0.5) / res as f32 - 0.5);
                    let r = (p[0] * p[0] + p[1] * p[1] + p[2] * p[2]).sqrt();
                    if r > 0.45 {
                        continue;
                    }
                    coords.push([x, y, z]);
                    let mut row = vec![0f32; c];
                    for (k, d) in flexicubes::CUBE_CORNERS.iter().enumerate() {
                        let q = [x + d[0], y + d[1], z + d[2]].map(|v| v as f32 / res as f32 - 0.5);
                        row[k] = (q[0] * q[0] + q[1] * q[1] + q[2] * q[2]).sqrt() - 0.3;
                        for ch in 0..6 {
                            row[MeshFeatureLayout::COLOR + 6 * k + ch] = ch as f32 - 2.5;
                        }
                    }
                    feats.extend(row);
                }
            }
        }
        let raw = feats.clone();
        s2m.apply_sdf_bias(&mut feats).unwrap();
        let (mesh, data) = s2m.extract(&coords, &feats).unwrap();
        assert!(mesh.success);
        assert_eq!(mesh.vertices.len(), 608); // cubes crossing the sphere
        assert_eq!(data.attrs.len(), data.coords.len() * 10);
        assert_eq!(mesh.vertex_attrs.len(), mesh.vertices.len() * 6);
        for (i, v) in mesh.vertices.iter().enumerate() {
            let r = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
            // the bias -1/res moves the zero level outwards
            assert!((r - (0.3 + 1.0 / 16.0)).abs() < 0.01, "radius {r}");
            // colour logits were constant per channel, so the interpolated colour is sigmoid(logit)
            for ch in 0..6 {
                let want = 1.0 / (1.0 + (-(ch as f32 - 2.5)).exp());
                assert!((mesh.vertex_attrs[i * 6 + ch] - want).abs() < 1e-5);
            }
        }
        // the normals point away from the centre
        for (f, n) in mesh.faces.iter().zip(&mesh.face_normal) {
            let centre = f.iter().fold([0f32; 3], |acc, &i| {
                let v = mesh.vertices[i as usize];
                [acc[0] + v[0], acc[1] + v[1], acc[2] + v[2]]
            });
            assert!(centre[0] * n[0] + centre[1] * n[1] + centre[2] * n[2] > 0.0);
        }
        assert!(s2m.extract(&coords, &feats[1..]).is_err());

        // the tensor entry point takes the rows without the bias and gives the same mesh
        let t = Tensor::from_slice(&raw, (coords.len(), c), &candle_core::Device::Cpu).unwrap();
        let mut trace = ExtractTrace::default();
        let (m2, g2) = s2m
            .extract_tensor(&coords, &t, true, Some(&mut trace))
            .unwrap();
        assert_eq!(m2, mesh);
        assert_eq!(g2.map(|g| g.coords), Some(data.coords));
        assert_eq!(trace.gammas.len(), mesh.vertices.len());
        assert!(!trace.edges.is_empty() && trace.cases.len() == trace.surf_cubes.len());
        let (_, none) = s2m.extract_tensor(&coords, &t, false, None).unwrap();
        assert!(none.is_none());
    }
}
