//! Parity of the SLat decoders and their representations (Gaussians, radiance field, mesh).
//!
//! Each representation is built from the reference `raw_out` (isolating `to_representation` /
//! FlexiCubes from the network) and compared with every per-element tensor of the fixture; the
//! Gaussian fixture's PLY file is compared header byte for byte and value by value. Meshes are
//! compared independently of vertex and face order: vertices are matched to their nearest
//! counterpart (absolute tolerance), faces as oriented triples of matched vertices.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::fixture::{tol, Report};
use super::{Fixture, Outcome};
use crate::export::ply;
use crate::models::config::{
    SLatGaussianDecoderConfig, SLatMeshDecoderConfig, SLatRadianceFieldDecoderConfig,
};
use crate::models::slat_vae::decoder_gs;
use crate::representations::mesh::{MeshExtractResult, SparseFeatures2Mesh};
use crate::representations::strivec::Strivec;

pub const KINDS: &[&str] = &[
    "model:SLatGaussianDecoder",
    "model:SLatRadianceFieldDecoder",
    "model:SLatMeshDecoder",
];

pub fn check(fx: &mut Fixture) -> Result<Outcome> {
    fx.load_io()?;
    let mut report = Report::default();
    match fx.kind.as_str() {
        "model:SLatGaussianDecoder" => check_gaussian(fx, &mut report)?,
        "model:SLatRadianceFieldDecoder" => check_radiance_field(fx, &mut report)?,
        "model:SLatMeshDecoder" => check_mesh(fx, &mut report)?,
        k => bail!("decoders: kind {k:?} is not handled here"),
    }
    if std::env::var_os("TRELLIS_PARITY_DEBUG").is_some() {
        for c in &report.checks {
            eprintln!(
                "    {:<40} {:.3e} (tol {:.0e})",
                c.name, c.error, c.tolerance
            );
        }
    }
    Ok(Outcome::Checked(report))
}

fn config<T: serde::de::DeserializeOwned>(fx: &Fixture) -> Result<T> {
    serde_json::from_value(fx.config_args()?.clone())
        .with_context(|| format!("{}: config.json args", fx.dir.display()))
}

/// One batch element of a sparse tensor: its rows and their `(x, y, z)`.
pub struct BatchRows {
    pub rows: std::ops::Range<usize>,
    pub xyz: Vec<[i32; 3]>,
}

/// The batch elements of `[N, 4]` (batch, x, y, z) coordinates: contiguous blocks in batch order.
pub fn split_batches(coords: &Tensor) -> Result<Vec<BatchRows>> {
    let rows = coords
        .to_dtype(DType::I64)?
        .to_vec2::<i64>()
        .context("coords must be [N, 4] integers")?;
    let mut out: Vec<BatchRows> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        if r.len() != 4 {
            bail!("coords rows have {} columns, expected 4", r.len());
        }
        let b = usize::try_from(r[0]).map_err(|_| anyhow!("negative batch index {}", r[0]))?;
        if b + 1 < out.len() || b > out.len() {
            bail!("coords: batch blocks are not contiguous in batch order (row {i}, batch {b})");
        }
        if b == out.len() {
            out.push(BatchRows {
                rows: i..i,
                xyz: Vec::new(),
            });
        }
        let e = &mut out[b];
        e.rows.end = i + 1;
        e.xyz.push([r[1] as i32, r[2] as i32, r[3] as i32]);
    }
    Ok(out)
}

fn rows_f32(t: &Tensor, range: std::ops::Range<usize>) -> Result<Vec<f32>> {
    Ok(t.narrow(0, range.start, range.len())?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Compares a flat vector with a fixture tensor of the same element count (shape taken from it).
fn close_vec(
    report: &mut Report,
    fx: &Fixture,
    name: &str,
    actual: &[f32],
    tolerance: f64,
) -> Result<()> {
    let expected = fx.io(name)?;
    if actual.len() != expected.elem_count() {
        eprintln!(
            "  {name}: {} values, expected {:?}",
            actual.len(),
            expected.dims()
        );
        report.record(name, f64::INFINITY, tolerance);
        return Ok(());
    }
    let a = Tensor::from_slice(actual, expected.shape(), &Device::Cpu)?;
    report.close(name, &a, &expected.to_device(&Device::Cpu)?, tolerance)
}

fn exact_vec<T: candle_core::WithDType>(
    report: &mut Report,
    fx: &Fixture,
    name: &str,
    actual: &[T],
) -> Result<()> {
    let expected = fx.io(name)?;
    if actual.len() != expected.elem_count() {
        eprintln!(
            "  {name}: {} values, expected {:?}",
            actual.len(),
            expected.dims()
        );
        report.record(name, f64::INFINITY, 0.0);
        return Ok(());
    }
    let a = Tensor::from_slice(actual, expected.shape(), &Device::Cpu)?;
    report.exact(name, &a, &expected.to_device(&Device::Cpu)?)
}

fn check_gaussian(fx: &Fixture, report: &mut Report) -> Result<()> {
    let cfg: SLatGaussianDecoderConfig = config(fx)?;
    let rep = &cfg.representation_config;
    let coords = fx.io("coords")?;
    let raw = fx.io("raw_out")?;
    let f = tol::FORWARD;

    // the buffer recomputed from its definition
    let pert = decoder_gs::offset_perturbation(rep.num_gaussians, rep.voxel_size);
    close_vec(report, fx, "offset_perturbation", &pert, f)?;
    let pert_ref = fx
        .io("offset_perturbation")?
        .flatten_all()?
        .to_vec1::<f32>()?;

    for (i, BatchRows { rows, xyz }) in split_batches(&coords)?.into_iter().enumerate() {
        let p = format!("g{i}_");
        if !fx.has_io(&format!("{p}xyz")) {
            continue;
        }
        let g = decoder_gs::to_gaussian(&cfg, &pert_ref, &xyz, &rows_f32(&raw, rows)?)?;
        close_vec(report, fx, &format!("{p}xyz"), &g.xyz, f)?;
        close_vec(report, fx, &format!("{p}features_dc"), &g.features_dc, f)?;
        close_vec(report, fx, &format!("{p}scaling"), &g.scaling, f)?;
        close_vec(report, fx, &format!("{p}rotation"), &g.rotation, f)?;
        close_vec(report, fx, &format!("{p}opacity"), &g.opacity, f)?;
        close_vec(report, fx, &format!("{p}get_xyz"), &g.get_xyz(), f)?;
        close_vec(report, fx, &format!("{p}get_scaling"), &g.get_scaling(), f)?;
        close_vec(
            report,
            fx,
            &format!("{p}get_rotation"),
            &g.get_rotation(),
            f,
        )?;
        close_vec(report, fx, &format!("{p}get_opacity"), &g.get_opacity(), f)?;
        close_vec(report, fx, &format!("{p}get_features"), g.get_features(), f)?;
        if i == 0 {
            check_ply(fx, report, &g)?;
        }
    }
    Ok(())
}

/// The fixture's `Gaussian.save_ply` file of element 0: same header bytes, every property within
/// the forward tolerance (relative L2 per property).
fn check_ply(
    fx: &Fixture,
    report: &mut Report,
    g: &crate::representations::gaussian::Gaussian,
) -> Result<()> {
    let file = fx
        .meta
        .get("ply")
        .and_then(|p| p.get("file"))
        .and_then(|f| f.as_str())
        .unwrap_or("gaussian0.ply");
    let path = fx.dir.join(file);
    if !path.is_file() {
        return Ok(());
    }
    let expected_bytes = std::fs::read(&path)?;
    // written through the real writer, then read back
    let dir = tempfile::tempdir()?;
    let ours_path = dir.path().join("gaussian0.ply");
    ply::save_gaussian_ply(g, &ours_path)?;
    let ours_bytes = std::fs::read(&ours_path)?;
    let (he, ho) = (
        ply::header_len(&expected_bytes),
        ply::header_len(&ours_bytes),
    );
    let same_header = match (he, ho) {
        (Some(a), Some(b)) => expected_bytes[..a] == ours_bytes[..b],
        _ => false,
    };
    report.record("ply_header", if same_header { 0.0 } else { 1.0 }, 0.0);
    let exp = ply::parse_vertex_ply(&expected_bytes)?;
    let ours = ply::parse_vertex_ply(&ours_bytes)?;
    report.record(
        "ply_vertex_count",
        if exp.count == ours.count { 0.0 } else { 1.0 },
        0.0,
    );
    for name in &exp.names {
        let e = exp.column(name).unwrap_or_default();
        let Some(o) = ours.column(name) else {
            report.record(&format!("ply_{name}"), f64::INFINITY, tol::FORWARD);
            continue;
        };
        let err = if e.len() == o.len() {
            let num: f64 = e
                .iter()
                .zip(&o)
                .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                .sum();
            let den: f64 = e.iter().map(|a| (*a as f64).powi(2)).sum();
            if den > 0.0 {
                (num / den).sqrt()
            } else {
                num.sqrt()
            }
        } else {
            f64::INFINITY
        };
        report.record(&format!("ply_{name}"), err, tol::FORWARD);
    }
    Ok(())
}

fn check_radiance_field(fx: &Fixture, report: &mut Report) -> Result<()> {
    let cfg: SLatRadianceFieldDecoderConfig = config(fx)?;
    let rep = &cfg.representation_config;
    let coords = fx.io("coords")?;
    let raw = fx.io("raw_out")?;
    let f = tol::FORWARD;
    for (i, BatchRows { rows, xyz }) in split_batches(&coords)?.into_iter().enumerate() {
        let p = format!("rf{i}_");
        if !fx.has_io(&format!("{p}trivec")) {
            continue;
        }
        let s = Strivec::from_decoder_output(
            cfg.resolution,
            rep.rank,
            rep.dim,
            &xyz,
            &rows_f32(&raw, rows)?,
        )?;
        close_vec(report, fx, &format!("{p}position"), &s.position, f)?;
        exact_vec(report, fx, &format!("{p}depth"), &s.depth)?;
        close_vec(report, fx, &format!("{p}trivec"), &s.trivec, f)?;
        close_vec(report, fx, &format!("{p}density"), &s.density, f)?;
        close_vec(report, fx, &format!("{p}features_dc"), &s.features_dc, f)?;
    }
    Ok(())
}

/// The mesh resolution of a mesh-decoder fixture: meta's `mesh_resolution`, else 4 x resolution.
fn mesh_resolution(fx: &Fixture, cfg: &SLatMeshDecoderConfig) -> usize {
    fx.meta
        .get("mesh_resolution")
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .unwrap_or(cfg.resolution * 4)
}

fn check_mesh(fx: &Fixture, report: &mut Report) -> Result<()> {
    let cfg: SLatMeshDecoderConfig = config(fx)?;
    let res = mesh_resolution(fx, &cfg);
    let s2m = SparseFeatures2Mesh::new(res, cfg.representation_config.use_color);
    let coords = fx.io("raw_out_coords")?;
    let raw = fx.io("raw_out")?;
    for (i, BatchRows { rows, xyz }) in split_batches(&coords)?.into_iter().enumerate() {
        let p = format!("mesh{i}_");
        if !fx.has_io(&format!("{p}vertices")) {
            continue;
        }
        let mut feats = rows_f32(&raw, rows)?;
        s2m.apply_sdf_bias(&mut feats)?;
        let (mesh, grid) = s2m.extract(&xyz, &feats)?;
        let gc: Vec<i32> = grid.coords.iter().flatten().copied().collect();
        exact_vec(report, fx, &format!("{p}grid_vertex_coords"), &gc)?;
        close_vec(
            report,
            fx,
            &format!("{p}grid_vertex_attrs"),
            &grid.attrs,
            tol::FORWARD,
        )?;
        let gd: Vec<f32> = grid.deformed.iter().flatten().copied().collect();
        close_vec(
            report,
            fx,
            &format!("{p}grid_vertex_deformed"),
            &gd,
            tol::FORWARD,
        )?;
        compare_mesh(fx, report, &p, &mesh)?;
    }
    Ok(())
}

/// Order-independent mesh comparison: every reference vertex must have a counterpart within
/// `tol::MESH_ABS` and vice versa (one to one), faces must be the same oriented triples, and the
/// vertex attributes / face normals of matched elements must agree.
fn compare_mesh(
    fx: &Fixture,
    report: &mut Report,
    p: &str,
    mesh: &MeshExtractResult,
) -> Result<()> {
    let ev: Vec<[f32; 3]> = to_triples(&fx.io(&format!("{p}vertices"))?)?;
    let ef: Vec<[u32; 3]> = fx
        .io(&format!("{p}faces"))?
        .to_dtype(DType::I64)?
        .to_vec2::<i64>()?
        .into_iter()
        .map(|r| [r[0] as u32, r[1] as u32, r[2] as u32])
        .collect();
    let tol_abs = tol::MESH_ABS;
    // ours -> reference vertex
    let (map, dist) = match_points(&mesh.vertices, &ev, tol_abs as f32);
    let unmatched = map.iter().filter(|m| m.is_none()).count();
    let mut used = vec![false; ev.len()];
    let mut collisions = 0;
    for &j in map.iter().flatten() {
        if std::mem::replace(&mut used[j], true) {
            collisions += 1;
        }
    }
    let missing = used.iter().filter(|u| !**u).count();
    report.record(
        &format!("{p}vertices (max distance)"),
        if unmatched + collisions + missing == 0 && mesh.vertices.len() == ev.len() {
            dist as f64
        } else {
            eprintln!(
                "  {p}vertices: {} ours / {} reference, {unmatched} unmatched, {missing} reference vertices without a match",
                mesh.vertices.len(),
                ev.len()
            );
            f64::INFINITY
        },
        tol_abs,
    );
    // faces as rotation-normalised triples of reference indices
    let canon = |f: [u32; 3]| {
        let k = (0..3).min_by_key(|&k| f[k]).unwrap_or(0);
        [f[k], f[(k + 1) % 3], f[(k + 2) % 3]]
    };
    let ref_faces: HashMap<[u32; 3], usize> =
        ef.iter().enumerate().map(|(i, &f)| (canon(f), i)).collect();
    let mut face_map = Vec::with_capacity(mesh.faces.len());
    for f in &mesh.faces {
        let mapped = f.map(|i| map[i as usize].map(|j| j as u32));
        let key = match mapped {
            [Some(a), Some(b), Some(c)] => Some(canon([a, b, c])),
            _ => None,
        };
        face_map.push(key.and_then(|k| ref_faces.get(&k).copied()));
    }
    let found = face_map.iter().flatten().count();
    let face_err = if mesh.faces.len() == ef.len() && found == ef.len() {
        0.0
    } else {
        1.0 - found as f64 / ef.len().max(mesh.faces.len()).max(1) as f64
    };
    report.record(&format!("{p}faces (fraction unmatched)"), face_err, 0.0);

    // attributes of matched vertices, in reference order
    let attr_name = format!("{p}vertex_attrs");
    if fx.has_io(&attr_name) && mesh.attr_dim > 0 {
        let d = mesh.attr_dim;
        let mut a = vec![f32::NAN; ev.len() * d];
        for (i, m) in map.iter().enumerate() {
            if let Some(j) = m {
                a[j * d..(j + 1) * d].copy_from_slice(&mesh.vertex_attrs[i * d..(i + 1) * d]);
            }
        }
        close_vec(report, fx, &attr_name, &a, tol::FORWARD)?;
    }
    let normal_name = format!("{p}face_normal");
    if fx.has_io(&normal_name) {
        // the normal computation itself, on the reference mesh
        let on_ref = MeshExtractResult::new(ev.clone(), ef.clone(), vec![], 0, mesh.res)?;
        let n: Vec<f32> = on_ref.face_normal.iter().flatten().copied().collect();
        close_vec(report, fx, &normal_name, &n, tol::FORWARD)?;
        // ours, matched face by face: a normal is the cross product of two edges, so a vertex
        // error e moves it by about e / edge length; tiny FlexiCubes triangles (edges ~1e-4 of
        // the unit box) turn float32 vertex noise (~1e-7) into ~1e-3
        let mut n = vec![f32::NAN; ef.len() * 3];
        for (i, m) in face_map.iter().enumerate() {
            if let Some(j) = m {
                n[j * 3..j * 3 + 3].copy_from_slice(&mesh.face_normal[i]);
            }
        }
        let name = format!("{p}face_normal (ours, matched faces)");
        let expected = fx.io(&normal_name)?;
        let a = Tensor::from_slice(&n, expected.shape(), &Device::Cpu)?;
        report.close(&name, &a, &expected, NORMAL_TOL)?;
    }
    Ok(())
}

/// Tolerance of face normals recomputed from our own (float32-noisy) vertices; see above.
const NORMAL_TOL: f64 = 1e-3;

fn to_triples(t: &Tensor) -> Result<Vec<[f32; 3]>> {
    Ok(t.to_dtype(DType::F32)?
        .to_vec2::<f32>()?
        .into_iter()
        .map(|r| [r[0], r[1], r[2]])
        .collect())
}

/// For each point of `a`, the nearest point of `b` within `tol` (a hash grid of cell `tol`), and
/// the largest matched distance.
pub fn match_points(a: &[[f32; 3]], b: &[[f32; 3]], tol: f32) -> (Vec<Option<usize>>, f32) {
    let cell = tol.max(f32::MIN_POSITIVE);
    let key = |p: [f32; 3]| p.map(|v| (v / cell).floor() as i64);
    let mut grid: HashMap<[i64; 3], Vec<usize>> = HashMap::new();
    for (j, &p) in b.iter().enumerate() {
        grid.entry(key(p)).or_default().push(j);
    }
    let mut worst = 0f32;
    let map = a
        .iter()
        .map(|&p| {
            let k = key(p);
            let mut best: Option<(usize, f32)> = None;
            for dx in -1..=1 {
                for dy in -1..=1 {
                    for dz in -1..=1 {
                        let Some(js) = grid.get(&[k[0] + dx, k[1] + dy, k[2] + dz]) else {
                            continue;
                        };
                        for &j in js {
                            let q = b[j];
                            let d = (0..3).map(|i| (p[i] - q[i]).abs()).fold(0f32, f32::max);
                            if d <= tol && best.is_none_or(|(_, bd)| d < bd) {
                                best = Some((j, d));
                            }
                        }
                    }
                }
            }
            if let Some((_, d)) = best {
                worst = worst.max(d);
            }
            best.map(|(j, _)| j)
        })
        .collect();
    (map, worst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_split_into_contiguous_blocks() {
        let c = Tensor::new(&[[0i32, 1, 2, 3], [0, 4, 5, 6], [1, 7, 8, 9]], &Device::Cpu).unwrap();
        let b = split_batches(&c).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].rows, 0..2);
        assert_eq!(b[1].xyz, vec![[7, 8, 9]]);
        let bad = Tensor::new(&[[1i32, 0, 0, 0], [0, 0, 0, 0]], &Device::Cpu).unwrap();
        assert!(split_batches(&bad).is_err());
    }

    #[test]
    fn points_match_within_tolerance_only() {
        let a = [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]];
        let b = [[1.0, 1.0, 1.00005], [0.00002, 0.0, 0.0]];
        let (m, d) = match_points(&a, &b, 1e-4);
        assert_eq!(m, vec![Some(1), Some(0), None]);
        assert!((d - 5e-5).abs() < 1e-6);
    }
}
