//! Reading the base mesh of `trellisd variant`: OBJ, PLY (ascii / binary) and glTF 2.0 (`.glb`,
//! `.gltf`). The original takes an `open3d.geometry.TriangleMesh` (`run_variant`); here any of
//! these files becomes a [`TriMesh`] (positions and triangles; polygons are fan-triangulated, glTF
//! node transforms applied). Malformed files are errors that name the file and the problem.

use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};

use super::voxelize::TriMesh;

/// Loads a mesh, choosing the reader by extension.
pub fn load_mesh(path: &Path) -> Result<TriMesh> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    let mesh = match ext.as_str() {
        "obj" => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            parse_obj(&text)
        }
        "ply" => {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            parse_ply(&bytes)
        }
        "glb" | "gltf" => load_gltf(path),
        _ => bail!("unsupported mesh format {ext:?} (expected .obj, .ply, .glb or .gltf)"),
    }
    .with_context(|| format!("mesh {}", path.display()))?;
    mesh.validate()
        .with_context(|| format!("mesh {}", path.display()))?;
    Ok(mesh)
}

/// Wavefront OBJ: `v x y z` and `f i j k ...` (`i`, `i/t`, `i//n`, `i/t/n`, negative = relative).
pub fn parse_obj(text: &str) -> Result<TriMesh> {
    let mut m = TriMesh::default();
    for (ln, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("");
        let mut it = line.split_whitespace();
        match it.next() {
            Some("v") => {
                let mut p = [0.0f64; 3];
                for c in p.iter_mut() {
                    let s = it
                        .next()
                        .ok_or_else(|| anyhow!("line {}: vertex needs 3 coordinates", ln + 1))?;
                    *c = s
                        .parse()
                        .map_err(|_| anyhow!("line {}: bad coordinate {s:?}", ln + 1))?;
                }
                m.vertices.push(p);
            }
            Some("f") => {
                let mut idx = Vec::new();
                for tok in it {
                    let first = tok.split('/').next().unwrap_or("");
                    let i: i64 = first
                        .parse()
                        .map_err(|_| anyhow!("line {}: bad face index {tok:?}", ln + 1))?;
                    let n = m.vertices.len() as i64;
                    let abs = if i > 0 {
                        i - 1
                    } else if i < 0 {
                        n + i
                    } else {
                        -1
                    };
                    ensure!(
                        (0..n).contains(&abs),
                        "line {}: face index {i} refers to no vertex (only {n} defined so far)",
                        ln + 1
                    );
                    idx.push(abs as u32);
                }
                ensure!(
                    idx.len() >= 3,
                    "line {}: a face needs at least 3 vertices",
                    ln + 1
                );
                for k in 1..idx.len() - 1 {
                    m.faces.push([idx[0], idx[k], idx[k + 1]]);
                }
            }
            _ => {}
        }
    }
    Ok(m)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PlyFormat {
    Ascii,
    Le,
    Be,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PlyType {
    I8,
    U8,
    I16,
    U16,
    I32,
    U32,
    F32,
    F64,
}

impl PlyType {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "char" | "int8" => Self::I8,
            "uchar" | "uint8" => Self::U8,
            "short" | "int16" => Self::I16,
            "ushort" | "uint16" => Self::U16,
            "int" | "int32" => Self::I32,
            "uint" | "uint32" => Self::U32,
            "float" | "float32" => Self::F32,
            "double" | "float64" => Self::F64,
            other => bail!("unknown PLY property type {other:?}"),
        })
    }
    fn size(self) -> usize {
        match self {
            Self::I8 | Self::U8 => 1,
            Self::I16 | Self::U16 => 2,
            Self::I32 | Self::U32 | Self::F32 => 4,
            Self::F64 => 8,
        }
    }
}

#[derive(Debug)]
struct PlyProp {
    name: String,
    /// `Some(count type)` for list properties.
    list: Option<PlyType>,
    ty: PlyType,
}

#[derive(Debug)]
struct PlyElement {
    name: String,
    count: usize,
    props: Vec<PlyProp>,
}

/// Reads values of a PLY body one at a time.
struct PlyReader<'a> {
    fmt: PlyFormat,
    bytes: &'a [u8],
    pos: usize,
    tokens: std::str::SplitAsciiWhitespace<'a>,
}

impl PlyReader<'_> {
    fn read(&mut self, ty: PlyType) -> Result<f64> {
        if self.fmt == PlyFormat::Ascii {
            let t = self
                .tokens
                .next()
                .ok_or_else(|| anyhow!("the PLY body ends early"))?;
            return t.parse::<f64>().map_err(|_| anyhow!("bad PLY value {t:?}"));
        }
        let n = ty.size();
        ensure!(self.pos + n <= self.bytes.len(), "the PLY body ends early");
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&self.bytes[self.pos..self.pos + n]);
        self.pos += n;
        if self.fmt == PlyFormat::Be {
            b[..n].reverse();
        }
        Ok(match ty {
            PlyType::I8 => b[0] as i8 as f64,
            PlyType::U8 => b[0] as f64,
            PlyType::I16 => i16::from_le_bytes([b[0], b[1]]) as f64,
            PlyType::U16 => u16::from_le_bytes([b[0], b[1]]) as f64,
            PlyType::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            PlyType::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            PlyType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            PlyType::F64 => f64::from_le_bytes(b),
        })
    }
}

/// Stanford PLY (ascii, binary little / big endian): `vertex` x, y, z and `face`
/// `vertex_indices` (or `vertex_index`) lists; other elements and properties are skipped.
pub fn parse_ply(bytes: &[u8]) -> Result<TriMesh> {
    const END: &[u8] = b"end_header";
    let end = bytes
        .windows(END.len())
        .position(|w| w == END)
        .ok_or_else(|| anyhow!("not a PLY file (no end_header)"))?;
    let header =
        std::str::from_utf8(&bytes[..end]).map_err(|_| anyhow!("PLY header is not text"))?;
    let mut body_start = end + END.len();
    // The header line ends with "\n" or "\r\n".
    while body_start < bytes.len() && bytes[body_start] != b'\n' {
        body_start += 1;
    }
    body_start += 1;
    let mut lines = header.lines();
    ensure!(
        lines.next().map(str::trim) == Some("ply"),
        "not a PLY file (no \"ply\" magic)"
    );
    let mut fmt = None;
    let mut elements: Vec<PlyElement> = Vec::new();
    for line in lines {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["format", f, _] => {
                fmt = Some(match *f {
                    "ascii" => PlyFormat::Ascii,
                    "binary_little_endian" => PlyFormat::Le,
                    "binary_big_endian" => PlyFormat::Be,
                    other => bail!("unknown PLY format {other:?}"),
                })
            }
            ["element", name, count] => elements.push(PlyElement {
                name: name.to_string(),
                count: count
                    .parse()
                    .map_err(|_| anyhow!("bad PLY element count {count:?}"))?,
                props: vec![],
            }),
            ["property", "list", ct, ty, name] => elements
                .last_mut()
                .ok_or_else(|| anyhow!("PLY property before any element"))?
                .props
                .push(PlyProp {
                    name: name.to_string(),
                    list: Some(PlyType::parse(ct)?),
                    ty: PlyType::parse(ty)?,
                }),
            ["property", ty, name] => elements
                .last_mut()
                .ok_or_else(|| anyhow!("PLY property before any element"))?
                .props
                .push(PlyProp {
                    name: name.to_string(),
                    list: None,
                    ty: PlyType::parse(ty)?,
                }),
            _ => {}
        }
    }
    let fmt = fmt.ok_or_else(|| anyhow!("PLY header has no format line"))?;
    let body = bytes.get(body_start..).unwrap_or(&[]);
    let text = if fmt == PlyFormat::Ascii {
        std::str::from_utf8(body).map_err(|_| anyhow!("ascii PLY body is not text"))?
    } else {
        ""
    };
    let mut rd = PlyReader {
        fmt,
        bytes: body,
        pos: 0,
        tokens: text.split_ascii_whitespace(),
    };
    let mut m = TriMesh::default();
    for el in &elements {
        let is_vertex = el.name == "vertex";
        let is_face = el.name == "face";
        let axis = |n: &str| ["x", "y", "z"].iter().position(|a| *a == n);
        if is_vertex {
            ensure!(
                ["x", "y", "z"]
                    .iter()
                    .all(|a| el.props.iter().any(|p| p.name == *a && p.list.is_none())),
                "PLY vertex element lacks x, y or z"
            );
        }
        for _ in 0..el.count {
            let mut p = [0.0f64; 3];
            for prop in &el.props {
                match prop.list {
                    Some(ct) => {
                        let n = rd.read(ct)?;
                        ensure!((0.0..=1e6).contains(&n), "bad PLY list length {n}");
                        let mut idx = Vec::with_capacity(n as usize);
                        for _ in 0..n as usize {
                            idx.push(rd.read(prop.ty)?);
                        }
                        if is_face && (prop.name == "vertex_indices" || prop.name == "vertex_index")
                        {
                            ensure!(idx.len() >= 3, "a PLY face needs at least 3 vertices");
                            let mut u = Vec::with_capacity(idx.len());
                            for i in idx {
                                ensure!(
                                    i >= 0.0 && i < u32::MAX as f64 && i.fract() == 0.0,
                                    "bad PLY vertex index {i}"
                                );
                                u.push(i as u32);
                            }
                            for k in 1..u.len() - 1 {
                                m.faces.push([u[0], u[k], u[k + 1]]);
                            }
                        }
                    }
                    None => {
                        let v = rd.read(prop.ty)?;
                        if is_vertex {
                            if let Some(a) = axis(&prop.name) {
                                p[a] = v;
                            }
                        }
                    }
                }
            }
            if is_vertex {
                m.vertices.push(p);
            }
        }
    }
    Ok(m)
}

/// glTF 2.0: every triangle primitive of every mesh node in the default scene (or every node
/// when there is no scene), with the node transforms applied.
pub fn load_gltf(path: &Path) -> Result<TriMesh> {
    let gltf = gltf::Gltf::open(path).map_err(|e| anyhow!("invalid glTF: {e}"))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let buffers = gltf::import_buffers(&gltf.document, Some(base), gltf.blob.clone())
        .map_err(|e| anyhow!("glTF buffers: {e}"))?;
    let mut m = TriMesh::default();
    let roots: Vec<gltf::Node> = match gltf
        .document
        .default_scene()
        .or_else(|| gltf.document.scenes().next())
    {
        Some(s) => s.nodes().collect(),
        None => gltf.document.nodes().collect(),
    };
    let identity = [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    let mut stack: Vec<(gltf::Node, [[f64; 4]; 4], usize)> =
        roots.into_iter().map(|n| (n, identity, 0)).collect();
    while let Some((node, parent, depth)) = stack.pop() {
        ensure!(depth < 256, "glTF node hierarchy too deep (cycle?)");
        let local = node.transform().matrix();
        let world = mat_mul(&parent, &local);
        if let Some(mesh) = node.mesh() {
            for prim in mesh.primitives() {
                let reader = prim.reader(|b| buffers.get(b.index()).map(|d| &d.0[..]));
                let Some(pos) = reader.read_positions() else {
                    continue;
                };
                let base_idx = m.vertices.len() as u32;
                for p in pos {
                    m.vertices.push(transform_point(&world, p));
                }
                let n = m.vertices.len() as u32 - base_idx;
                let idx: Vec<u32> = match reader.read_indices() {
                    Some(i) => i.into_u32().collect(),
                    None => (0..n).collect(),
                };
                use gltf::mesh::Mode;
                let tris: Vec<[u32; 3]> = match prim.mode() {
                    Mode::Triangles => idx.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect(),
                    Mode::TriangleStrip => (2..idx.len())
                        .map(|i| {
                            if i % 2 == 0 {
                                [idx[i - 2], idx[i - 1], idx[i]]
                            } else {
                                [idx[i - 1], idx[i - 2], idx[i]]
                            }
                        })
                        .collect(),
                    Mode::TriangleFan => (2..idx.len())
                        .map(|i| [idx[0], idx[i - 1], idx[i]])
                        .collect(),
                    _ => continue,
                };
                for t in tris {
                    ensure!(
                        t.iter().all(|&i| i < n),
                        "glTF index out of range of its primitive"
                    );
                    m.faces
                        .push([t[0] + base_idx, t[1] + base_idx, t[2] + base_idx]);
                }
            }
        }
        for c in node.children() {
            stack.push((c, world, depth + 1));
        }
    }
    Ok(m)
}

/// Column-major 4×4 (glTF's layout: `m[col][row]`).
fn mat_mul(a: &[[f64; 4]; 4], b: &[[f32; 4]; 4]) -> [[f64; 4]; 4] {
    let mut o = [[0.0; 4]; 4];
    for (c, oc) in o.iter_mut().enumerate() {
        for (r, orc) in oc.iter_mut().enumerate() {
            *orc = (0..4).map(|k| a[k][r] * b[c][k] as f64).sum();
        }
    }
    o
}

fn transform_point(m: &[[f64; 4]; 4], p: [f32; 3]) -> [f64; 3] {
    let mut o = [0.0; 3];
    for (r, or) in o.iter_mut().enumerate() {
        *or = m[0][r] * p[0] as f64 + m[1][r] * p[1] as f64 + m[2][r] * p[2] as f64 + m[3][r];
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn obj_polygons_negative_indices_and_errors() {
        let m =
            parse_obj("# quad\nv 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nf 1/1/1 2//2 3 4\nf -1 -2 -3\n")
                .unwrap();
        assert_eq!(m.vertices.len(), 4);
        assert_eq!(m.faces, vec![[0, 1, 2], [0, 2, 3], [3, 2, 1]]);
        assert!(parse_obj("v 0 0 0\nf 1 2 3\n")
            .unwrap_err()
            .to_string()
            .contains("refers to no vertex"));
        assert!(parse_obj("v 0 zero 0\n").is_err());
        assert!(parse_obj("v 0 0 0\nv 1 0 0\nf 1 2\n").is_err());
    }

    #[test]
    fn ply_ascii_and_binary_agree() {
        let ascii = b"ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\nproperty uchar red\nelement face 1\nproperty list uchar int vertex_indices\nend_header\n0 0 0 9\n1 0 0 9\n0 1 0 9\n3 0 1 2\n";
        let a = parse_ply(ascii).unwrap();
        let mut bin = b"ply\nformat binary_big_endian 1.0\nelement vertex 3\nproperty double x\nproperty double y\nproperty double z\nelement face 1\nproperty list uchar uint vertex_indices\nend_header\n".to_vec();
        for v in [[0.0f64, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]] {
            for c in v {
                bin.extend_from_slice(&c.to_be_bytes());
            }
        }
        bin.push(3);
        for i in [0u32, 1, 2] {
            bin.extend_from_slice(&i.to_be_bytes());
        }
        let b = parse_ply(&bin).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.faces, vec![[0, 1, 2]]);
        assert!(parse_ply(&bin[..bin.len() - 2])
            .unwrap_err()
            .to_string()
            .contains("ends early"));
        assert!(parse_ply(b"hello").is_err());
    }
}
