//! Decimation to a target triangle count with meshoptimizer (the `meshopt` crate), in place of
//! the original's `pyvista.PolyData.decimate` (quadric edge collapse in both).

use anyhow::{anyhow, Result};

use super::topology::TriMesh;

/// Simplifies to at most about `target_faces` triangles (quadric error; borders and topology
/// are kept, so a mesh can stay above the target, then meshopt's sloppy mode finishes the job).
pub fn simplify(mesh: &TriMesh, target_faces: usize) -> Result<TriMesh> {
    if target_faces == 0 || mesh.faces.len() <= target_faces {
        return Ok(mesh.clone());
    }
    let indices: Vec<u32> = mesh.faces.iter().flatten().copied().collect();
    let bytes = meshopt::typed_to_bytes(&mesh.vertices);
    let adapter =
        meshopt::VertexDataAdapter::new(bytes, 12, 0).map_err(|e| anyhow!("simplify: {e}"))?;
    let mut err = 0f32;
    let mut out = meshopt::simplify(
        &indices,
        &adapter,
        target_faces * 3,
        1.0,
        meshopt::SimplifyOptions::None,
        Some(&mut err),
    );
    if out.len() > target_faces * 3 * 5 / 4 {
        out = meshopt::simplify_sloppy(&out, &adapter, target_faces * 3, 1.0, Some(&mut err));
    }
    let faces = out.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect();
    Ok(TriMesh::new(mesh.vertices.clone(), faces).compact())
}

#[cfg(test)]
mod tests {
    use super::super::topology::tests::sphere;
    use super::*;

    #[test]
    fn decimates_a_sphere_to_the_target_and_keeps_its_shape() {
        let m = sphere(60);
        assert_eq!(m.faces.len(), 2 * 60 * 2 * 59);
        let s = simplify(&m, 1000).unwrap();
        assert!(
            s.faces.len() <= 1000 && s.faces.len() > 600,
            "{}",
            s.faces.len()
        );
        for v in &s.vertices {
            let r = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
            assert!((r - 0.5).abs() < 0.02, "{r}");
        }
        // Closed still.
        assert!(s.edge_faces().values().all(|f| f.len() == 2));
        // Nothing to do: unchanged.
        assert_eq!(simplify(&m, 100_000).unwrap(), m);
    }
}
