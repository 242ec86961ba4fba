//! Surface voxelisation of a triangle mesh; twin of `TrellisTextTo3DPipeline.voxelize`
//! (trellis/pipelines/trellis_text_to_3d.py), which calls open3d's
//! `VoxelGrid.create_from_triangle_mesh_within_bounds`.
//!
//! Semantics reproduced exactly (float64 throughout, like numpy/open3d):
//! 1. normalise: `v <- (v - center) / scale` with `center` the middle of the axis-aligned bounding box
//!    and `scale` its largest side, then clip every coordinate to `[-0.5 + 1e-6, 0.5 - 1e-6]`;
//! 2. a grid of `R³` boxes of side `1/R` over `[-0.5, 0.5]³`, box `(i, j, k)` centred at
//!    `(-0.5 + 1/(2R)) + (i, j, k) / R`;
//! 3. open3d 0.20 walks the triangles; for each one it tests only the boxes from
//!    `floor((min - min_bound) / voxel_size)` to that index plus `round((max - min) / voxel_size) + 1`
//!    per axis (min / max over the triangle's vertices), and a box is occupied when the triangle
//!    overlaps it, closed, by the Akenine-Möller separating-axis test (`triBoxOverlap`, which open3d
//!    ships): the nine edge × axis tests, the three box axes, then the triangle plane.
//!
//! The candidate range is what makes a tie one-sided: a triangle whose lowest coordinate lies
//! exactly on a voxel plane touches the box below it (closed boxes), but that box is never tested,
//! so only the box above is occupied; the highest coordinate on a plane occupies both boxes. Every
//! step is float64 with open3d's own expressions, so the same doubles decide every tie. The order of
//! the result is lexicographic (open3d returns hash-map order, which carries no meaning).

use anyhow::{bail, ensure, Result};

/// A triangle soup: float64 vertices and vertex-index triples.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TriMesh {
    pub vertices: Vec<[f64; 3]>,
    pub faces: Vec<[u32; 3]>,
}

impl TriMesh {
    /// Rejects meshes that cannot be voxelised, with a message saying why.
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.vertices.is_empty(), "the mesh has no vertices");
        ensure!(!self.faces.is_empty(), "the mesh has no triangles");
        if let Some(v) = self
            .vertices
            .iter()
            .find(|v| v.iter().any(|c| !c.is_finite()))
        {
            bail!("the mesh has a vertex with a non-finite coordinate: {v:?}");
        }
        let n = self.vertices.len();
        if let Some((i, f)) = self
            .faces
            .iter()
            .enumerate()
            .find(|(_, f)| f.iter().any(|&k| k as usize >= n))
        {
            bail!("triangle {i} refers to vertex {f:?}, but the mesh has only {n} vertices");
        }
        Ok(())
    }
}

/// The vertices after the original's normalisation into the unit cube (step 1 above).
pub fn normalize_to_unit_cube(mesh: &TriMesh) -> Result<Vec<[f64; 3]>> {
    mesh.validate()?;
    let mut lo = [f64::INFINITY; 3];
    let mut hi = [f64::NEG_INFINITY; 3];
    // Only vertices count for the bounding box (numpy uses all of them, referenced or not).
    for v in &mesh.vertices {
        for a in 0..3 {
            lo[a] = lo[a].min(v[a]);
            hi[a] = hi[a].max(v[a]);
        }
    }
    let center = [
        (lo[0] + hi[0]) / 2.0,
        (lo[1] + hi[1]) / 2.0,
        (lo[2] + hi[2]) / 2.0,
    ];
    let scale = (0..3)
        .map(|a| hi[a] - lo[a])
        .fold(f64::NEG_INFINITY, f64::max);
    ensure!(
        scale > 0.0 && scale.is_finite(),
        "the mesh is degenerate: all its vertices are one point"
    );
    let (cmin, cmax) = (-0.5 + 1e-6, 0.5 - 1e-6);
    Ok(mesh
        .vertices
        .iter()
        .map(|v| {
            let mut o = [0.0; 3];
            for a in 0..3 {
                o[a] = ((v[a] - center[a]) / scale).clamp(cmin, cmax);
            }
            o
        })
        .collect())
}

/// Occupied voxels `(x, y, z)` in `0..resolution`, lexicographically sorted.
pub fn voxelize(mesh: &TriMesh, resolution: usize) -> Result<Vec<[i32; 3]>> {
    ensure!(
        (1..=1024).contains(&resolution),
        "voxel resolution must be between 1 and 1024 (got {resolution})"
    );
    let verts = normalize_to_unit_cube(mesh)?;
    let r = resolution;
    let mut occupied = vec![0u64; (r * r * r).div_ceil(64)];
    for f in &mesh.faces {
        let tri = [
            verts[f[0] as usize],
            verts[f[1] as usize],
            verts[f[2] as usize],
        ];
        for [i, j, k] in occupied_by_triangle(&tri, r) {
            let lin = (i * r + j) * r + k;
            occupied[lin / 64] |= 1 << (lin % 64);
        }
    }
    let mut out = Vec::new();
    for (w, &bits) in occupied.iter().enumerate() {
        let mut b = bits;
        while b != 0 {
            let lin = w * 64 + b.trailing_zeros() as usize;
            b &= b - 1;
            out.push([
                (lin / (r * r)) as i32,
                (lin / r % r) as i32,
                (lin % r) as i32,
            ]);
        }
    }
    Ok(out)
}

/// The voxels of a `resolution`³ grid over `[-0.5, 0.5]³` that open3d's
/// `CreateFromTriangleMeshWithinBounds` marks for one triangle (module docs, step 3). Candidate
/// boxes outside the grid are left out: with the vertices clipped inside the cube, the closed test
/// can never accept one.
fn occupied_by_triangle(tri: &[[f64; 3]; 3], resolution: usize) -> Vec<[usize; 3]> {
    let voxel_size = 1.0 / resolution as f64;
    let min_bound = -0.5;
    let half = [voxel_size / 2.0; 3];
    let mut first = [0i64; 3];
    let mut count = [0i64; 3];
    for a in 0..3 {
        let lo = tri[0][a].min(tri[1][a].min(tri[2][a]));
        let hi = tri[0][a].max(tri[1][a].max(tri[2][a]));
        first[a] = ((lo - min_bound) / voxel_size).floor() as i64;
        count[a] = ((hi - lo) / voxel_size).round() as i64 + 2;
    }
    let inside = |i: i64| (0..resolution as i64).contains(&i);
    let mut out = Vec::new();
    for i in (first[0]..first[0] + count[0]).filter(|&i| inside(i)) {
        for j in (first[1]..first[1] + count[1]).filter(|&j| inside(j)) {
            for k in (first[2]..first[2] + count[2]).filter(|&k| inside(k)) {
                // min_bound + box_half_size + index * voxel_size, in open3d's order
                let c = [
                    (min_bound + half[0]) + i as f64 * voxel_size,
                    (min_bound + half[1]) + j as f64 * voxel_size,
                    (min_bound + half[2]) + k as f64 * voxel_size,
                ];
                if tri_box_overlap(c, half, tri) {
                    out.push([i as usize, j as usize, k as usize]);
                }
            }
        }
    }
    out
}

/// Does the triangle overlap the closed box `center ± half`? (separating axis theorem, the
/// Akenine-Möller formulation with its exact comparisons).
pub fn tri_box_overlap(center: [f64; 3], half: [f64; 3], tri: &[[f64; 3]; 3]) -> bool {
    let sub = |a: [f64; 3], b: [f64; 3]| [a[0] - b[0], a[1] - b[1], a[2] - b[2]];
    let v0 = sub(tri[0], center);
    let v1 = sub(tri[1], center);
    let v2 = sub(tri[2], center);
    let e0 = sub(v1, v0);
    let e1 = sub(v2, v1);
    let e2 = sub(v0, v2);
    // Projections of two vertices onto an edge × axis direction, against the box radius.
    let sep = |p: f64, q: f64, rad: f64| {
        let (mn, mx) = if p < q { (p, q) } else { (q, p) };
        mn > rad || mx < -rad
    };
    // Axis x × edge: p = a*v[y] - b*v[z] with (a, b) = (e[z], e[y]).
    let px = |e: [f64; 3], v: [f64; 3]| e[2] * v[1] - e[1] * v[2];
    let py = |e: [f64; 3], v: [f64; 3]| -e[2] * v[0] + e[0] * v[2];
    let pz = |e: [f64; 3], v: [f64; 3]| e[1] * v[0] - e[0] * v[1];
    let rx = |e: [f64; 3]| e[2].abs() * half[1] + e[1].abs() * half[2];
    let ry = |e: [f64; 3]| e[2].abs() * half[0] + e[0].abs() * half[2];
    let rz = |e: [f64; 3]| e[1].abs() * half[0] + e[0].abs() * half[1];
    // Edge 0: vertices 0 and 2 for x/y, 1 and 2 for z.
    if sep(px(e0, v0), px(e0, v2), rx(e0))
        || sep(py(e0, v0), py(e0, v2), ry(e0))
        || sep(pz(e0, v1), pz(e0, v2), rz(e0))
    {
        return false;
    }
    // Edge 1: 0/2 for x and y, 0/1 for z.
    if sep(px(e1, v0), px(e1, v2), rx(e1))
        || sep(py(e1, v0), py(e1, v2), ry(e1))
        || sep(pz(e1, v0), pz(e1, v1), rz(e1))
    {
        return false;
    }
    // Edge 2: 0/1 for x and y, 1/2 for z.
    if sep(px(e2, v0), px(e2, v1), rx(e2))
        || sep(py(e2, v0), py(e2, v1), ry(e2))
        || sep(pz(e2, v1), pz(e2, v2), rz(e2))
    {
        return false;
    }
    for a in 0..3 {
        let mn = v0[a].min(v1[a]).min(v2[a]);
        let mx = v0[a].max(v1[a]).max(v2[a]);
        if mn > half[a] || mx < -half[a] {
            return false;
        }
    }
    let n = [
        e0[1] * e1[2] - e0[2] * e1[1],
        e0[2] * e1[0] - e0[0] * e1[2],
        e0[0] * e1[1] - e0[1] * e1[0],
    ];
    plane_box_overlap(n, v0, half)
}

fn plane_box_overlap(normal: [f64; 3], vert: [f64; 3], maxbox: [f64; 3]) -> bool {
    let mut vmin = [0.0; 3];
    let mut vmax = [0.0; 3];
    for q in 0..3 {
        let v = vert[q];
        if normal[q] > 0.0 {
            vmin[q] = -maxbox[q] - v;
            vmax[q] = maxbox[q] - v;
        } else {
            vmin[q] = maxbox[q] - v;
            vmax[q] = -maxbox[q] - v;
        }
    }
    let dot = |a: [f64; 3], b: [f64; 3]| a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
    if dot(normal, vmin) > 0.0 {
        return false;
    }
    dot(normal, vmax) >= 0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A triangle whose lowest coordinate lies on a voxel plane occupies only the box above that
    /// plane; one whose highest coordinate lies on a plane occupies the boxes on both sides (open3d
    /// tests boxes from `floor(min)` on, each closed).
    #[test]
    fn ties_on_voxel_planes_are_one_sided_below() {
        let g = 1.0 / 64.0;
        // The frame's two corner triangles keep the normalisation the identity (centre 0, scale 1).
        let frame = [
            [-0.5, -0.5, -0.5],
            [-0.5 + g / 4.0, -0.5, -0.5],
            [-0.5, -0.5 + g / 4.0, -0.5],
            [0.5, 0.5, 0.5],
            [0.5 - g / 4.0, 0.5, 0.5],
            [0.5, 0.5 - g / 4.0, 0.5],
        ];
        let at = |k: f64| k * g - 0.5;
        // A small triangle in the plane z = 48/64 - 1/2, inside column (20, 20).
        let (a, b) = (at(20.25), at(20.5));
        let mut vertices = frame.to_vec();
        vertices.extend([[a, a, at(48.0)], [b, a, at(48.0)], [a, b, at(48.0)]]);
        let mesh = TriMesh {
            vertices,
            faces: vec![[0, 1, 2], [3, 4, 5], [6, 7, 8]],
        };
        let got = voxelize(&mesh, 64).unwrap();
        assert!(got.contains(&[20, 20, 48]), "{got:?}");
        assert!(!got.contains(&[20, 20, 47]), "{got:?}");
        // The same triangle tilted so that z runs from 47.5 to 48 (its highest z on the plane).
        let mut tilted = mesh.clone();
        tilted.vertices[6][2] = at(47.5);
        tilted.vertices[7][2] = at(47.5);
        let got = voxelize(&tilted, 64).unwrap();
        assert!(
            got.contains(&[20, 20, 47]) && got.contains(&[20, 20, 48]),
            "{got:?}"
        );
    }

    #[test]
    fn bad_meshes_are_errors_not_panics() {
        let empty = TriMesh::default();
        assert!(voxelize(&empty, 8)
            .unwrap_err()
            .to_string()
            .contains("no vertices"));
        let point = TriMesh {
            vertices: vec![[1.0, 1.0, 1.0]; 3],
            faces: vec![[0, 1, 2]],
        };
        assert!(voxelize(&point, 8)
            .unwrap_err()
            .to_string()
            .contains("degenerate"));
        let oob = TriMesh {
            vertices: vec![[0.0; 3], [1.0, 0.0, 0.0]],
            faces: vec![[0, 1, 5]],
        };
        assert!(voxelize(&oob, 8)
            .unwrap_err()
            .to_string()
            .contains("vertex"));
        let nan = TriMesh {
            vertices: vec![[0.0; 3], [f64::NAN, 0.0, 0.0], [0.0, 1.0, 0.0]],
            faces: vec![[0, 1, 2]],
        };
        assert!(voxelize(&nan, 8).is_err());
        // A degenerate (zero-area) triangle next to a real one is handled.
        let sliver = TriMesh {
            vertices: vec![[0.0; 3], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [2.0, 0.0, 0.0]],
            faces: vec![[0, 1, 2], [0, 1, 3]],
        };
        assert!(!voxelize(&sliver, 8).unwrap().is_empty());
        assert!(voxelize(&sliver, 0).is_err());
    }
}

#[cfg(test)]
mod fixture_tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use std::collections::BTreeSet;

    /// Every `voxelize_<name>_*` triple recorded from the original (`tools/reference/gen_voxelize.py`),
    /// compared as sets, one assertion per shape.
    #[test]
    fn matches_the_recorded_open3d_voxelisation() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/reference-alt/voxelize/io.safetensors");
        let io = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
        let mut n = 0;
        for name in io
            .keys()
            .filter_map(|k| k.strip_prefix("voxelize_")?.strip_suffix("_coords"))
        {
            let t = |s: &str| -> &Tensor { &io[&format!("voxelize_{name}_{s}")] };
            let v: Vec<Vec<f32>> = t("mesh_vertices").to_vec2().unwrap();
            let f: Vec<Vec<i32>> = t("mesh_faces").to_vec2().unwrap();
            let want: Vec<Vec<i32>> = t("coords").to_vec2().unwrap();
            let mesh = TriMesh {
                vertices: v
                    .iter()
                    .map(|r| [r[0] as f64, r[1] as f64, r[2] as f64])
                    .collect(),
                faces: f
                    .iter()
                    .map(|r| [r[0] as u32, r[1] as u32, r[2] as u32])
                    .collect(),
            };
            let got: BTreeSet<[i32; 3]> = voxelize(&mesh, 64).unwrap().into_iter().collect();
            let want: BTreeSet<[i32; 3]> = want.iter().map(|r| [r[0], r[1], r[2]]).collect();
            let missing = want.difference(&got).count();
            let extra = got.difference(&want).count();
            assert_eq!(
                (missing, extra),
                (0, 0),
                "{name}: {} voxels expected",
                want.len()
            );
            n += 1;
        }
        assert!(n >= 17, "{n} shapes");
    }
}
