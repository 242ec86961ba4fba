//! Binary glTF 2.0 (`.glb`) output of a decoded mesh, the counterpart of
//! `trellis/utils/postprocessing_utils.py::to_glb`: either with a baked base-colour texture
//! (`TEXCOORD_0` + an embedded PNG, sRGB as glTF defines base colour; metallic 0, roughness 1,
//! like the original's `PBRMaterial`) or with per-vertex colours (`COLOR_0`, `--no-bake`).
//!
//! Axes: TRELLIS meshes are z-up, glTF is y-up. Like the original (`vertices @ [[1,0,0],[0,0,-1],
//! [0,1,0]]`), a vertex `(x, y, z)` is written as `(x, z, -y)` — a rotation of -90° about x, so
//! triangle winding is preserved.

use std::io::Write;
use std::path::Path;

use anyhow::{ensure, Result};
use serde_json::json;

use super::atomic::write_atomic;

/// A triangle mesh in TRELLIS axes (z-up) with optional RGB vertex colours in `[0, 1]`.
#[derive(Debug, Clone, Copy)]
pub struct GlbMesh<'a> {
    pub vertices: &'a [[f32; 3]],
    pub faces: &'a [[u32; 3]],
    pub colors: Option<&'a [[f32; 3]]>,
}

/// A base-colour texture: per-vertex glTF texture coordinates and the PNG bytes.
#[derive(Debug, Clone, Copy)]
pub struct GlbTexture<'a> {
    pub uvs: &'a [[f32; 2]],
    pub png: &'a [u8],
}

/// TRELLIS z-up → glTF y-up.
pub fn z_up_to_y_up(v: [f32; 3]) -> [f32; 3] {
    [v[0], v[2], -v[1]]
}

fn pad4(buf: &mut Vec<u8>, byte: u8) {
    while !buf.len().is_multiple_of(4) {
        buf.push(byte);
    }
}

/// The GLB bytes.
pub fn encode_glb(mesh: &GlbMesh<'_>) -> Result<Vec<u8>> {
    encode_glb_textured(mesh, None)
}

/// The GLB bytes, with a base-colour texture when given.
pub fn encode_glb_textured(mesh: &GlbMesh<'_>, texture: Option<GlbTexture<'_>>) -> Result<Vec<u8>> {
    let nv = mesh.vertices.len();
    ensure!(nv > 0, "cannot write an empty mesh to GLB (no vertices)");
    ensure!(
        !mesh.faces.is_empty(),
        "cannot write an empty mesh to GLB (no triangles)"
    );
    ensure!(nv <= u32::MAX as usize, "too many vertices for GLB");
    if let Some(f) = mesh
        .faces
        .iter()
        .find(|f| f.iter().any(|&i| i as usize >= nv))
    {
        anyhow::bail!("mesh triangle {f:?} refers past the {nv} vertices");
    }
    if let Some(c) = mesh.colors {
        ensure!(
            c.len() == nv,
            "{} vertex colours for {nv} vertices",
            c.len()
        );
    }
    let mut bin: Vec<u8> = Vec::new();
    let mut lo = [f32::INFINITY; 3];
    let mut hi = [f32::NEG_INFINITY; 3];
    for v in mesh.vertices {
        ensure!(
            v.iter().all(|c| c.is_finite()),
            "mesh vertex {v:?} is not finite"
        );
        let p = z_up_to_y_up(*v);
        for a in 0..3 {
            lo[a] = lo[a].min(p[a]);
            hi[a] = hi[a].max(p[a]);
            bin.extend_from_slice(&p[a].to_le_bytes());
        }
    }
    let pos_len = bin.len();
    let idx_off = bin.len();
    for f in mesh.faces {
        for i in f {
            bin.extend_from_slice(&i.to_le_bytes());
        }
    }
    let idx_len = bin.len() - idx_off;
    let col = mesh.colors.map(|cs| {
        let off = bin.len();
        for c in cs {
            for x in c {
                let x = if x.is_finite() {
                    x.clamp(0.0, 1.0)
                } else {
                    0.0
                };
                bin.extend_from_slice(&x.to_le_bytes());
            }
        }
        (off, bin.len() - off)
    });
    let tex = match texture {
        Some(t) => {
            ensure!(
                t.uvs.len() == nv,
                "{} texture coordinates for {nv} vertices",
                t.uvs.len()
            );
            ensure!(
                t.uvs.iter().flatten().all(|x| x.is_finite()),
                "non-finite texture coordinates"
            );
            ensure!(t.png.starts_with(b"\x89PNG"), "the texture is not a PNG");
            pad4(&mut bin, 0);
            let uv_off = bin.len();
            for uv in t.uvs {
                for x in uv {
                    bin.extend_from_slice(&x.to_le_bytes());
                }
            }
            let uv_len = bin.len() - uv_off;
            pad4(&mut bin, 0);
            let img_off = bin.len();
            bin.extend_from_slice(t.png);
            Some((uv_off, uv_len, img_off, t.png.len()))
        }
        None => None,
    };
    pad4(&mut bin, 0);
    let max_index = mesh
        .faces
        .iter()
        .flat_map(|f| f.iter().copied())
        .max()
        .unwrap_or(0);
    let min_index = mesh
        .faces
        .iter()
        .flat_map(|f| f.iter().copied())
        .min()
        .unwrap_or(0);

    let mut buffer_views = vec![
        json!({"buffer": 0, "byteOffset": 0, "byteLength": pos_len, "target": 34962}),
        json!({"buffer": 0, "byteOffset": idx_off, "byteLength": idx_len, "target": 34963}),
    ];
    let mut accessors = vec![
        json!({"bufferView": 0, "componentType": 5126, "count": nv, "type": "VEC3",
               "min": lo, "max": hi}),
        json!({"bufferView": 1, "componentType": 5125, "count": mesh.faces.len() * 3,
               "type": "SCALAR", "min": [min_index], "max": [max_index]}),
    ];
    let mut attributes = json!({"POSITION": 0});
    if let Some((off, len)) = col {
        buffer_views
            .push(json!({"buffer": 0, "byteOffset": off, "byteLength": len, "target": 34962}));
        accessors
            .push(json!({"bufferView": 2, "componentType": 5126, "count": nv, "type": "VEC3"}));
        attributes["COLOR_0"] = json!(accessors.len() - 1);
    }
    let mut material = json!({"pbrMetallicRoughness": {"baseColorFactor": [1.0, 1.0, 1.0, 1.0],
                        "metallicFactor": 0.0, "roughnessFactor": 1.0}, "doubleSided": true});
    let mut extra = serde_json::Map::new();
    if let Some((uv_off, uv_len, img_off, img_len)) = tex {
        buffer_views.push(
            json!({"buffer": 0, "byteOffset": uv_off, "byteLength": uv_len, "target": 34962}),
        );
        accessors.push(
            json!({"bufferView": buffer_views.len() - 1, "componentType": 5126,
                              "count": nv, "type": "VEC2"}),
        );
        attributes["TEXCOORD_0"] = json!(accessors.len() - 1);
        buffer_views.push(json!({"buffer": 0, "byteOffset": img_off, "byteLength": img_len}));
        extra.insert(
            "images".into(),
            json!([{"bufferView": buffer_views.len() - 1, "mimeType": "image/png"}]),
        );
        // Linear filtering with mipmaps; clamp to the edge (charts never wrap).
        extra.insert(
            "samplers".into(),
            json!([{"magFilter": 9729, "minFilter": 9987, "wrapS": 33071, "wrapT": 33071}]),
        );
        extra.insert("textures".into(), json!([{"sampler": 0, "source": 0}]));
        material["pbrMetallicRoughness"]["baseColorTexture"] = json!({"index": 0, "texCoord": 0});
    }
    let mut doc = json!({
        "asset": {"version": "2.0", "generator": "trellis-rs"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0}],
        "meshes": [{"primitives": [{"attributes": attributes, "indices": 1, "material": 0, "mode": 4}]}],
        "materials": [material],
        "buffers": [{"byteLength": bin.len()}],
        "bufferViews": buffer_views,
        "accessors": accessors,
    });
    if let Some(o) = doc.as_object_mut() {
        o.extend(extra);
    }
    let mut js = serde_json::to_vec(&doc)?;
    pad4(&mut js, b' ');
    let total = 12 + 8 + js.len() + 8 + bin.len();
    ensure!(
        total <= u32::MAX as usize,
        "mesh too large for one GLB file"
    );
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(b"glTF");
    out.extend_from_slice(&2u32.to_le_bytes());
    out.extend_from_slice(&(total as u32).to_le_bytes());
    out.extend_from_slice(&(js.len() as u32).to_le_bytes());
    out.extend_from_slice(b"JSON");
    out.extend_from_slice(&js);
    out.extend_from_slice(&(bin.len() as u32).to_le_bytes());
    out.extend_from_slice(b"BIN\0");
    out.extend_from_slice(&bin);
    Ok(out)
}

/// Writes the mesh as a `.glb` file, atomically.
pub fn write_glb(path: &Path, mesh: &GlbMesh<'_>) -> Result<()> {
    write_glb_textured(path, mesh, None)
}

/// Writes the mesh with an optional base-colour texture as a `.glb` file, atomically.
pub fn write_glb_textured(
    path: &Path,
    mesh: &GlbMesh<'_>,
    texture: Option<GlbTexture<'_>>,
) -> Result<()> {
    let bytes = encode_glb_textured(mesh, texture)?;
    write_atomic(path, |w: &mut dyn Write| Ok(w.write_all(&bytes)?))
}

/// PNG bytes of an 8-bit RGB image.
pub fn encode_png_rgb(width: usize, height: usize, rgb: &[u8]) -> Result<Vec<u8>> {
    ensure!(rgb.len() == width * height * 3, "texture size mismatch");
    let img = image::RgbImage::from_raw(width as u32, height as u32, rgb.to_vec())
        .ok_or_else(|| anyhow::anyhow!("texture size mismatch"))?;
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Tetra = (Vec<[f32; 3]>, Vec<[u32; 3]>, Vec<[f32; 3]>);

    fn tetra() -> Tetra {
        (
            vec![
                [0.0, 0.0, 0.0],
                [1.0, 0.0, 0.0],
                [0.0, 1.0, 0.0],
                [0.0, 0.0, 1.0],
            ],
            vec![[0, 2, 1], [0, 1, 3], [1, 2, 3], [0, 3, 2]],
            vec![
                [1.0, 0.0, 0.0],
                [0.0, 1.0, 0.0],
                [0.0, 0.0, 1.0],
                [2.0, -1.0, 0.5],
            ],
        )
    }

    #[test]
    fn glb_validates_with_the_gltf_crate_and_round_trips() {
        let (v, f, c) = tetra();
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.glb");
        write_glb(
            &p,
            &GlbMesh {
                vertices: &v,
                faces: &f,
                colors: Some(&c),
            },
        )
        .unwrap();
        // The gltf crate validates the document (accessor ranges, buffer lengths) on load.
        let (doc, buffers, _) = gltf::import(&p).unwrap();
        let prim = doc.meshes().next().unwrap().primitives().next().unwrap();
        let r = prim.reader(|b| Some(&buffers[b.index()]));
        let pos: Vec<[f32; 3]> = r.read_positions().unwrap().collect();
        assert_eq!(pos.len(), 4);
        // z-up -> y-up: (x, y, z) -> (x, z, -y).
        assert_eq!(pos[2], [0.0, 0.0, -1.0]);
        assert_eq!(pos[3], [0.0, 1.0, 0.0]);
        let idx: Vec<u32> = r.read_indices().unwrap().into_u32().collect();
        assert_eq!(idx, f.iter().flatten().copied().collect::<Vec<_>>());
        let cols: Vec<[f32; 3]> = r.read_colors(0).unwrap().into_rgb_f32().collect();
        assert_eq!(cols[3], [1.0, 0.0, 0.5], "colours clamped to [0, 1]");
        let bb = prim.bounding_box();
        assert_eq!(bb.min, [0.0, 0.0, -1.0]);
        assert_eq!(bb.max, [1.0, 1.0, 0.0]);
        // Chunk lengths add up and are 4-aligned.
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
            bytes.len()
        );
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn textured_glb_loads_with_texture_and_uvs() {
        let (v, f, _) = tetra();
        let uvs = [[0.1, 0.1], [0.9, 0.1], [0.1, 0.9], [0.9, 0.9]];
        let rgb: Vec<u8> = (0..4 * 4 * 3).map(|i| (i * 5) as u8).collect();
        let png = encode_png_rgb(4, 4, &rgb).unwrap();
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.glb");
        let mesh = GlbMesh {
            vertices: &v,
            faces: &f,
            colors: None,
        };
        write_glb_textured(
            &p,
            &mesh,
            Some(GlbTexture {
                uvs: &uvs,
                png: &png,
            }),
        )
        .unwrap();
        let (doc, buffers, images) = gltf::import(&p).unwrap();
        let prim = doc.meshes().next().unwrap().primitives().next().unwrap();
        let r = prim.reader(|b| Some(&buffers[b.index()]));
        let got: Vec<[f32; 2]> = r.read_tex_coords(0).unwrap().into_f32().collect();
        assert_eq!(got, uvs);
        let pbr = prim.material().pbr_metallic_roughness();
        assert_eq!(pbr.metallic_factor(), 0.0);
        assert_eq!(pbr.roughness_factor(), 1.0);
        let t = pbr.base_color_texture().unwrap();
        assert_eq!(t.tex_coord(), 0);
        assert_eq!(images.len(), 1);
        assert_eq!((images[0].width, images[0].height), (4, 4));
        assert_eq!(images[0].pixels, rgb);
        // Mismatched coordinates are an error.
        assert!(encode_glb_textured(
            &mesh,
            Some(GlbTexture {
                uvs: &uvs[..3],
                png: &png
            })
        )
        .is_err());
    }

    #[test]
    fn bad_meshes_are_rejected_without_writing() {
        let (v, _, _) = tetra();
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bad.glb");
        let bad = [[0u32, 1, 9]];
        assert!(write_glb(
            &p,
            &GlbMesh {
                vertices: &v,
                faces: &bad,
                colors: None
            }
        )
        .is_err());
        assert!(write_glb(
            &p,
            &GlbMesh {
                vertices: &v,
                faces: &[],
                colors: None
            }
        )
        .is_err());
        assert!(!p.exists());
    }
}
