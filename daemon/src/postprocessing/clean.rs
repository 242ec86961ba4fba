//! Visibility clean-up and hole filling (the `_fill_holes` step of `postprocessing_utils.py`):
//! the mesh is rasterised from many views spread over the sphere; faces never seen are removed
//! (FlexiCubes leaves inner shells and hidden sheets), so are small components hardly ever seen;
//! the small holes this opens (and those the decoder left) are closed by fans around their
//! centroids. The original's min-cut refinement and its PyMeshFix call are replaced by this
//! simpler rule; no igraph or PyMeshFix code is involved.

use std::collections::HashMap;

use anyhow::Result;
use trellis_kernels::raster::camera::hammersley_cameras;
use trellis_kernels::raster::Rasterizer;

use super::topology::{norm, sub, TriMesh};

/// Options of [`remove_invisible_faces`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VisibilityOptions {
    /// Views on the sphere (radius 2, fov 40°, as the original).
    pub views: usize,
    /// Square image size of each view.
    pub resolution: usize,
    /// A connected component seen by fewer than this fraction of the views (area-weighted mean
    /// over its faces) and smaller than `max_hidden_area` of the total area is removed.
    pub min_component_visibility: f32,
    pub max_hidden_area: f32,
}

impl Default for VisibilityOptions {
    fn default() -> Self {
        Self {
            views: 64,
            resolution: 512,
            min_component_visibility: 0.02,
            max_hidden_area: 0.01,
        }
    }
}

/// For every face, in how many of `views` views it covers a pixel.
pub fn face_visibility(
    raster: &dyn Rasterizer,
    mesh: &TriMesh,
    views: usize,
    resolution: usize,
) -> Result<Vec<u32>> {
    let mut count = vec![0u32; mesh.faces.len()];
    for cam in hammersley_cameras(views, 2.0, 40.0, resolution) {
        let cam = cam.with_clip(1.0, 3.0);
        let r = raster.triangles(&cam, &mesh.vertices, &mesh.faces)?;
        for (c, seen) in count.iter_mut().zip(r.visible_faces(mesh.faces.len())) {
            *c += seen as u32;
        }
    }
    Ok(count)
}

/// Removes faces no view sees and small, rarely seen components. Returns the mesh and the
/// number of faces removed.
pub fn remove_invisible_faces(
    raster: &dyn Rasterizer,
    mesh: &TriMesh,
    opts: &VisibilityOptions,
) -> Result<(TriMesh, usize)> {
    if mesh.faces.is_empty() || opts.views == 0 {
        return Ok((mesh.clone(), 0));
    }
    let vis = face_visibility(raster, mesh, opts.views, opts.resolution)?;
    let keep: Vec<bool> = vis.iter().map(|&v| v > 0).collect();
    let seen = mesh.retain_faces(&keep);
    // Components of what is left.
    let vis_kept: Vec<u32> = vis.iter().copied().filter(|&v| v > 0).collect();
    let (comp, ncomp) = seen.face_components();
    let mut area = vec![0f64; ncomp];
    let mut weighted = vec![0f64; ncomp];
    for f in 0..seen.faces.len() {
        let a = seen.face_area(f) as f64;
        area[comp[f] as usize] += a;
        weighted[comp[f] as usize] += a * vis_kept[f] as f64 / opts.views as f64;
    }
    let total: f64 = area.iter().sum();
    let drop_comp: Vec<bool> = (0..ncomp)
        .map(|c| {
            area[c] < total * opts.max_hidden_area as f64
                && weighted[c] < area[c] * opts.min_component_visibility as f64
        })
        .collect();
    let keep2: Vec<bool> = comp.iter().map(|&c| !drop_comp[c as usize]).collect();
    let out = seen.retain_faces(&keep2);
    let removed = mesh.faces.len() - out.faces.len();
    Ok((out, removed))
}

/// Closes every boundary loop of at most `max_edges` edges whose perimeter is at most
/// `max_perimeter` with a fan of triangles around a new vertex at its centroid, wound like the
/// faces around it. Returns the mesh and the number of holes filled.
pub fn fill_small_holes(mesh: &TriMesh, max_edges: usize, max_perimeter: f32) -> (TriMesh, usize) {
    let mut out = mesh.clone();
    let mut filled = 0;
    // A vertex on several loops is non-manifold; skip those loops.
    let loops = mesh.boundary_loops();
    let mut uses: HashMap<u32, usize> = HashMap::new();
    for l in &loops {
        for &v in l {
            *uses.entry(v).or_default() += 1;
        }
    }
    for l in loops {
        if l.len() > max_edges || l.iter().any(|v| uses[v] > 1) {
            continue;
        }
        let n = l.len();
        let perimeter: f32 = (0..n)
            .map(|i| {
                norm(sub(
                    mesh.vertices[l[i] as usize],
                    mesh.vertices[l[(i + 1) % n] as usize],
                ))
            })
            .sum();
        if perimeter > max_perimeter {
            continue;
        }
        if n == 3 {
            out.faces.push([l[2], l[1], l[0]]);
        } else {
            let mut c = [0f32; 3];
            for &v in &l {
                for (ck, &x) in c.iter_mut().zip(&mesh.vertices[v as usize]) {
                    *ck += x / n as f32;
                }
            }
            let ci = out.vertices.len() as u32;
            out.vertices.push(c);
            // The loop runs a → b as the edge appears in its face; the new face holds b → a.
            for i in 0..n {
                out.faces.push([l[(i + 1) % n], l[i], ci]);
            }
        }
        filled += 1;
    }
    (out, filled)
}

#[cfg(test)]
mod tests {
    use super::super::topology::tests::cube;
    use super::*;
    use trellis_kernels::raster::CpuRasterizer;

    #[test]
    fn hidden_inner_cube_is_removed_and_outer_kept() {
        let outer = cube([0.0; 3], 0.45);
        let inner = cube([0.0; 3], 0.2);
        let mut m = outer.clone();
        m.vertices.extend(&inner.vertices);
        m.faces.extend(inner.faces.iter().map(|f| f.map(|i| i + 8)));
        let opts = VisibilityOptions {
            views: 24,
            resolution: 64,
            ..Default::default()
        };
        let (out, removed) = remove_invisible_faces(&CpuRasterizer, &m, &opts).unwrap();
        assert_eq!(removed, 12);
        assert_eq!(out.faces.len(), 12);
        assert_eq!(out.vertices.len(), 8);
        let vis = face_visibility(&CpuRasterizer, &outer, 24, 64).unwrap();
        assert!(vis.iter().all(|&v| v > 0), "{vis:?}");
    }

    #[test]
    fn small_holes_are_closed_with_consistent_winding() {
        let m = cube([0.0; 3], 0.5);
        let mut keep = vec![true; 12];
        keep[0] = false;
        keep[1] = false;
        let open = m.retain_faces(&keep);
        assert_eq!(open.boundary_loops().len(), 1);
        // Too long a perimeter (4): untouched.
        let (same, n) = fill_small_holes(&open, 32, 3.0);
        assert_eq!((n, same.faces.len()), (0, 10));
        let (closed, n) = fill_small_holes(&open, 32, 5.0);
        assert_eq!(n, 1);
        assert_eq!(closed.faces.len(), 14);
        // Closed and every edge used once in each direction (consistent orientation).
        let mut dir: HashMap<(u32, u32), i32> = HashMap::new();
        for f in &closed.faces {
            for k in 0..3 {
                *dir.entry((f[k], f[(k + 1) % 3])).or_default() += 1;
            }
        }
        for (&(a, b), &c) in &dir {
            assert_eq!(c, 1);
            assert_eq!(dir.get(&(b, a)), Some(&1), "edge {a}-{b} unmatched");
        }
    }
}
