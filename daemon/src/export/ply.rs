//! PLY files of 3-D Gaussians (twin of `Gaussian.save_ply` in
//! `trellis/representations/gaussian/gaussian_model.py`): one binary little-endian `vertex`
//! element of float32 properties `x y z nx ny nz f_dc_0.. opacity scale_0.. rot_0..`, as written by
//! `plyfile`. Also a small reader for float32 vertex PLYs (tests, round trips).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use crate::representations::gaussian::{
    inverse_sigmoid, matrix_to_quaternion, quaternion_to_matrix, Gaussian,
};

/// The default `transform` of `save_ply`: y-up to z-up (`xyz @ T^T`, rotations `T @ R`).
pub const Z_UP: [[f64; 3]; 3] = [[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]];

/// Property names in file order (`construct_list_of_attributes`).
pub fn gaussian_attributes(g: &Gaussian) -> Vec<String> {
    let mut names: Vec<String> = ["x", "y", "z", "nx", "ny", "nz"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let n = g.len().max(1);
    names.extend((0..g.features_dc.len() / n).map(|i| format!("f_dc_{i}")));
    names.push("opacity".into());
    names.extend((0..3).map(|i| format!("scale_{i}")));
    names.extend((0..4).map(|i| format!("rot_{i}")));
    names
}

/// The header `plyfile` writes for one float32 vertex element.
fn header(count: usize, names: &[String]) -> String {
    let mut h = String::from("ply\nformat binary_little_endian 1.0\n");
    h.push_str(&format!("element vertex {count}\n"));
    for n in names {
        h.push_str(&format!("property float {n}\n"));
    }
    h.push_str("end_header\n");
    h
}

/// The rows `save_ply` writes, `[N, 17]` for sh_degree 0. With a `transform`, positions are
/// `xyz @ T^T` and rotations the quaternion of `T @ R(q)` (utils3d conventions, float64 as numpy
/// promotes it); without, the biased rotation is written as is.
pub fn gaussian_rows(g: &Gaussian, transform: Option<[[f64; 3]; 3]>) -> Vec<f32> {
    let xyz = g.get_xyz();
    let opacity = g.get_opacity();
    let scaling = g.get_scaling();
    let rotation = g.biased_rotation();
    let n = g.len();
    let fdc = g.features_dc.len() / n.max(1);
    let width = 6 + fdc + 1 + 3 + 4;
    let mut rows = Vec::with_capacity(n * width);
    for i in 0..n {
        let p = [xyz[3 * i], xyz[3 * i + 1], xyz[3 * i + 2]];
        let q = [
            rotation[4 * i],
            rotation[4 * i + 1],
            rotation[4 * i + 2],
            rotation[4 * i + 3],
        ];
        let (p, q) = match transform {
            Some(t) => {
                let p: [f32; 3] = std::array::from_fn(|r| {
                    (0..3).map(|c| p[c] as f64 * t[r][c]).sum::<f64>() as f32
                });
                let rm = quaternion_to_matrix(q);
                let m: [[f64; 3]; 3] = std::array::from_fn(|r| {
                    std::array::from_fn(|c| (0..3).map(|k| t[r][k] * rm[k][c] as f64).sum())
                });
                (p, matrix_to_quaternion(m).map(|x| x as f32))
            }
            None => (p, q),
        };
        rows.extend_from_slice(&p);
        rows.extend_from_slice(&[0.0; 3]);
        // _features_dc [N, 1, 3] transposed to [N, 3, 1] and flattened: the same order for sh 0
        rows.extend_from_slice(&g.features_dc[i * fdc..(i + 1) * fdc]);
        rows.push(inverse_sigmoid(opacity[i]));
        rows.extend(scaling[3 * i..3 * i + 3].iter().map(|s| s.ln()));
        rows.extend_from_slice(&q);
    }
    rows
}

/// The complete file `save_ply` writes.
pub fn gaussian_ply_bytes(g: &Gaussian, transform: Option<[[f64; 3]; 3]>) -> Vec<u8> {
    let names = gaussian_attributes(g);
    let rows = gaussian_rows(g, transform);
    let mut out = header(g.len(), &names).into_bytes();
    out.reserve(rows.len() * 4);
    for v in rows {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Writes `bytes` to `path` atomically (see [`super::atomic::write_atomic`]).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    super::atomic::write_atomic(path, |w| {
        w.write_all(bytes)
            .with_context(|| format!("writing {}", path.display()))
    })
}

/// `Gaussian.save_ply(path)` with the default z-up transform.
pub fn save_gaussian_ply(g: &Gaussian, path: &Path) -> Result<()> {
    write_atomically(path, &gaussian_ply_bytes(g, Some(Z_UP)))
}

/// A float32 vertex PLY as read back: property names and `[count, names.len()]` values.
#[derive(Debug, Clone, PartialEq)]
pub struct PlyVertices {
    pub names: Vec<String>,
    pub count: usize,
    pub values: Vec<f32>,
}

impl PlyVertices {
    /// One property across all vertices.
    pub fn column(&self, name: &str) -> Option<Vec<f32>> {
        let k = self.names.iter().position(|n| n == name)?;
        let w = self.names.len();
        Some((0..self.count).map(|i| self.values[i * w + k]).collect())
    }
}

/// Parses a binary little-endian PLY whose only element is `vertex` with float properties.
pub fn parse_vertex_ply(bytes: &[u8]) -> Result<PlyVertices> {
    let end = header_len(bytes).ok_or_else(|| anyhow!("PLY: no end_header line"))?;
    let head = std::str::from_utf8(&bytes[..end]).context("PLY: header is not UTF-8")?;
    let mut lines = head.lines();
    if lines.next() != Some("ply") {
        bail!("PLY: missing magic line \"ply\"");
    }
    let mut count = None;
    let mut names = Vec::new();
    for line in lines {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["format", "binary_little_endian", "1.0"] => {}
            ["format", other, ..] => bail!("PLY: unsupported format {other:?}"),
            ["element", "vertex", n] => {
                if count.is_some() {
                    bail!("PLY: more than one vertex element");
                }
                count = Some(n.parse::<usize>().context("PLY: bad vertex count")?);
            }
            ["element", other, ..] => bail!("PLY: unsupported element {other:?}"),
            ["property", "float", name] => names.push(name.to_string()),
            ["property", ty, ..] => bail!("PLY: unsupported property type {ty:?}"),
            ["comment", ..] | ["obj_info", ..] | ["end_header"] => {}
            _ => bail!("PLY: unexpected header line {line:?}"),
        }
    }
    let count = count.ok_or_else(|| anyhow!("PLY: no vertex element"))?;
    let body = &bytes[end..];
    let expected = count * names.len() * 4;
    if body.len() != expected {
        bail!(
            "PLY: body has {} bytes, expected {count} vertices x {} floats = {expected}",
            body.len(),
            names.len()
        );
    }
    let values = body
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok(PlyVertices {
        names,
        count,
        values,
    })
}

pub fn read_vertex_ply(path: &Path) -> Result<PlyVertices> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    parse_vertex_ply(&bytes).with_context(|| format!("{}", path.display()))
}

/// Length of the header of a PLY file (through `end_header\n`), if it has one.
pub fn header_len(bytes: &[u8]) -> Option<usize> {
    const END: &[u8] = b"end_header\n";
    bytes
        .windows(END.len())
        .position(|w| w == END)
        .map(|p| p + END.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::representations::gaussian::{GaussianParams, ScalingActivation};

    fn two() -> Gaussian {
        Gaussian::new(
            GaussianParams {
                aabb: [-0.5, -0.5, -0.5, 1.0, 1.0, 1.0],
                sh_degree: 0,
                minimum_kernel_size: 0.0009,
                scaling_bias: 0.004,
                opacity_bias: 0.1,
                scaling_activation: ScalingActivation::Softplus,
            },
            vec![0.1, 0.2, 0.3, 0.9, 0.8, 0.7],
            vec![1.0, 2.0, 3.0, -1.0, -2.0, -3.0],
            vec![0.5, -0.5, 1.0, 0.0, 0.0, 0.0],
            vec![0.0, 0.0, 0.0, 0.0, -1.0, 0.5, 0.5, 0.5],
            vec![0.3, -2.0],
        )
        .unwrap()
    }

    #[test]
    fn file_round_trips_with_the_stated_conventions() {
        let g = two();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.ply");
        save_gaussian_ply(&g, &path).unwrap();
        let ply = read_vertex_ply(&path).unwrap();
        assert_eq!(ply.count, 2);
        assert_eq!(ply.names, gaussian_attributes(&g));
        assert_eq!(ply.names.len(), 17);
        // y-up -> z-up: (x, y, z) -> (x, -z, y)
        let xyz = g.get_xyz();
        assert_eq!(ply.column("y").unwrap(), vec![-xyz[2], -xyz[5]]);
        assert_eq!(ply.column("z").unwrap(), vec![xyz[1], xyz[4]]);
        assert_eq!(ply.column("nx").unwrap(), vec![0.0, 0.0]);
        assert_eq!(ply.column("f_dc_2").unwrap(), vec![3.0, -3.0]);
        let op = ply.column("opacity").unwrap();
        assert!((op[0] - (0.3 + inverse_sigmoid(0.1))).abs() < 1e-5);
        // identity rotation becomes the quaternion of T (a +90 degree turn about x)
        let h = std::f32::consts::FRAC_1_SQRT_2;
        let r: Vec<f32> = (0..4)
            .map(|k| ply.column(&format!("rot_{k}")).unwrap()[0])
            .collect();
        for (a, b) in r.iter().zip([h, h, 0.0, 0.0]) {
            assert!((a - b).abs() < 1e-6, "{r:?}");
        }
        // no temporary file left behind
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn without_transform_rows_are_the_raw_activations() {
        let g = two();
        let rows = gaussian_rows(&g, None);
        assert_eq!(rows.len(), 2 * 17);
        assert_eq!(&rows[0..3], &g.get_xyz()[0..3]);
        assert_eq!(&rows[13..17], &[1.0, 0.0, 0.0, 0.0]);
        assert_eq!(rows[10], g.get_scaling()[0].ln());
    }

    #[test]
    fn malformed_files_are_errors() {
        assert!(parse_vertex_ply(b"ply\nformat ascii 1.0\nend_header\n").is_err());
        assert!(parse_vertex_ply(b"ply\nformat binary_little_endian 1.0\nelement vertex 1\nproperty float x\nend_header\n\0\0").is_err());
        assert!(parse_vertex_ply(b"nothing").is_err());
        let ok = parse_vertex_ply(
            b"ply\nformat binary_little_endian 1.0\nelement vertex 1\nproperty float x\nend_header\n\0\0\x80\x3f",
        )
        .unwrap();
        assert_eq!(ok.values, vec![1.0]);
    }

    #[test]
    fn failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        // the target is an existing directory: the rename fails
        let target = dir.path().join("sub");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("keep"), b"x").unwrap();
        assert!(write_atomically(&target, b"data").is_err());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}
