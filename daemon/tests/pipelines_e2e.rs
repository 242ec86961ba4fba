//! End-to-end runs of the built `trellisd` binary on the tiny model repositories (generated from
//! seeded random weights, offline, from files): image → 3D, text → 3D, a variant of an OBJ mesh, decoding a
//! saved asset, and argument errors. Step counts are kept small (CI has 2 cores).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_trellisd"));
    c.env("HF_HUB_OFFLINE", "1");
    c
}

/// The tiny repositories, generated from seeded random weights (`trellisd tiny-repos`).
fn reference() -> PathBuf {
    trellis::test_tiny_repos().root
}

fn s(p: &Path) -> String {
    p.to_string_lossy().to_string()
}

fn run(args: &[String]) -> Output {
    let out = bin().args(args).output().expect("run trellisd");
    if !out.status.success() {
        eprintln!(
            "trellisd {:?} failed:\n{}\n{}",
            args,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// An RGBA PNG: a coloured disc on a transparent background.
fn write_png(path: &Path) {
    let mut img = image::RgbaImage::new(96, 80);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let (dx, dy) = (x as f32 - 50.0, y as f32 - 38.0);
        if dx * dx + dy * dy < 28.0 * 28.0 {
            *p = image::Rgba([(x * 2) as u8, 120, (y * 3) as u8, 255]);
        }
    }
    img.save(path).unwrap();
}

/// A unit cube as OBJ (quads, 1-based indices).
fn write_obj(path: &Path) {
    let text = "v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nv 0 0 1\nv 1 0 1\nv 1 1 1\nv 0 1 1\n\
                f 1 4 3 2\nf 5 6 7 8\nf 1 2 6 5\nf 2 3 7 6\nf 3 4 8 7\nf 4 1 5 8\n";
    std::fs::write(path, text).unwrap();
}

/// Loads and validates a GLB with the gltf crate: a baked one has a base-colour texture of
/// `texture` pixels and UVs in [0, 1], an unbaked one vertex colours. Returns (vertices,
/// triangles).
fn check_glb(path: &Path, texture: Option<u32>) -> (usize, usize) {
    let (doc, buffers, images) =
        gltf::import(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let prim = doc.meshes().next().unwrap().primitives().next().unwrap();
    let r = prim.reader(|b| Some(&buffers[b.index()]));
    let pos: Vec<[f32; 3]> = r.read_positions().unwrap().collect();
    let idx: Vec<u32> = r.read_indices().unwrap().into_u32().collect();
    assert!(!pos.is_empty() && idx.len().is_multiple_of(3) && !idx.is_empty());
    assert!(idx.iter().all(|&i| (i as usize) < pos.len()));
    let pbr = prim.material().pbr_metallic_roughness();
    assert_eq!((pbr.metallic_factor(), pbr.roughness_factor()), (0.0, 1.0));
    match texture {
        Some(size) => {
            let uv: Vec<[f32; 2]> = r.read_tex_coords(0).unwrap().into_f32().collect();
            assert_eq!(uv.len(), pos.len());
            assert!(uv.iter().flatten().all(|x| (0.0..=1.0).contains(x)));
            let t = pbr.base_color_texture().expect("a base-colour texture");
            let img = &images[t.texture().source().index()];
            assert_eq!((img.width, img.height), (size, size));
            assert_eq!(img.format, gltf::image::Format::R8G8B8);
            // Not a blank texture.
            let first = &img.pixels[..3];
            assert!(img.pixels.chunks(3).any(|p| p != first), "uniform texture");
        }
        None => {
            let cols: Vec<[f32; 3]> = r.read_colors(0).unwrap().into_rgb_f32().collect();
            assert_eq!(cols.len(), pos.len());
        }
    }
    (pos.len(), idx.len() / 3)
}

/// Parses a binary Gaussian PLY header; checks the body size; returns the vertex count.
fn check_ply(path: &Path) -> usize {
    let bytes = std::fs::read(path).unwrap();
    let end = bytes
        .windows(11)
        .position(|w| w == b"end_header\n")
        .expect("PLY header")
        + 11;
    let header = std::str::from_utf8(&bytes[..end]).unwrap();
    assert!(
        header.starts_with("ply\nformat binary_little_endian 1.0\n"),
        "{header}"
    );
    let n: usize = header
        .lines()
        .find_map(|l| l.strip_prefix("element vertex "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let props = header
        .lines()
        .filter(|l| l.starts_with("property float "))
        .count();
    assert_eq!(props, 17, "{header}");
    assert_eq!(bytes.len() - end, n * props * 4);
    assert!(n > 0);
    n
}

fn no_output_left(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| {
            n.ends_with(".glb")
                || n.ends_with(".ply")
                || n.ends_with(".trellis")
                || n.starts_with(".trellis-tmp")
        })
        .collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

#[test]
fn image_to_3d_then_decode_the_asset() {
    let r = reference();
    let d = tempfile::tempdir().unwrap();
    let png = d.path().join("in.png");
    write_png(&png);
    let (glb, ply, asset) = (
        d.path().join("a.glb"),
        d.path().join("a.ply"),
        d.path().join("a.trellis"),
    );
    let out = run(&[
        "generate".into(),
        "--model".into(),
        s(&r.join("TRELLIS-image-tiny")),
        "--image-cond-model".into(),
        s(&r.join("dinov2_reg_tiny")),
        "--image".into(),
        s(&png),
        "--ss-steps".into(),
        "2".into(),
        "--slat-steps".into(),
        "2".into(),
        "--seed".into(),
        "3".into(),
        "--out".into(),
        s(&glb),
        "--ply".into(),
        s(&ply),
        "--asset".into(),
        s(&asset),
        "--texture-size".into(),
        "512".into(),
        "--preview".into(),
        s(&d.path().join("a.png")),
        "--quiet".into(),
    ]);
    assert!(out.status.success());
    let (nv, nf) = check_glb(&glb, Some(512));
    assert!(nv > 0 && nf > 0);
    // The preview: 4 views of 256² over 2 rows (mesh, Gaussians).
    let pv = image::open(d.path().join("a.png")).unwrap();
    assert_eq!((pv.width(), pv.height()), (1024, 512));
    let ng = check_ply(&ply);
    let a = trellis::export::asset::Asset::load(&asset, &candle_core::Device::Cpu).unwrap();
    assert_eq!(a.meta["seed"], 3);
    assert_eq!(a.meta["sparse_structure_sampler"]["steps"], 2);
    assert_eq!(a.coords.dim(1).unwrap(), 4);
    assert!(a.ss_latent.is_some() && a.cond_summary.is_some());
    // Gaussians per voxel are fixed by the decoder config: the PLY has N_voxels * G rows.
    assert_eq!(ng % a.coords.dim(0).unwrap(), 0);

    // Decode the asset again: same mesh, no sampling (same post-processing: same triangles).
    let (glb2, ply2) = (d.path().join("b.glb"), d.path().join("b.ply"));
    let out = run(&[
        "decode".into(),
        "--asset".into(),
        s(&asset),
        "--out".into(),
        s(&glb2),
        "--ply".into(),
        s(&ply2),
        "--texture-size".into(),
        "512".into(),
        "--json".into(),
    ]);
    assert!(out.status.success());
    assert_eq!(check_glb(&glb2, Some(512)).1, nf);
    assert_eq!(std::fs::read(&ply2).unwrap(), std::fs::read(&ply).unwrap());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "done");
}

#[test]
fn text_to_3d_with_json_progress() {
    let r = reference();
    let d = tempfile::tempdir().unwrap();
    let (glb, ply) = (d.path().join("t.glb"), d.path().join("t.ply"));
    let out = run(&[
        "generate".into(),
        "--model".into(),
        s(&r.join("TRELLIS-text-tiny")),
        "--text-cond-model".into(),
        s(&r.join("clip_text_tiny")),
        "--text".into(),
        "a small wooden chair".into(),
        "--ss-steps".into(),
        "2".into(),
        "--slat-steps".into(),
        "2".into(),
        "--out".into(),
        s(&glb),
        "--ply".into(),
        s(&ply),
        "--no-bake".into(),
        "--json".into(),
    ]);
    assert!(out.status.success());
    check_glb(&glb, None);
    check_ply(&ply);
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps = |stage: &str| {
        events
            .iter()
            .filter(|e| e["stage"] == stage && e["step"].as_u64().unwrap_or(0) > 0)
            .count()
    };
    assert_eq!(steps("sparse_structure"), 2, "{events:?}");
    assert_eq!(steps("structured_latent"), 2);
    assert_eq!(events.last().unwrap()["event"], "done");
}

#[test]
fn variant_of_an_obj_mesh() {
    let r = reference();
    let d = tempfile::tempdir().unwrap();
    let obj = d.path().join("cube.obj");
    write_obj(&obj);
    let (glb, asset) = (d.path().join("v.glb"), d.path().join("v.trellis"));
    let out = run(&[
        "variant".into(),
        "--model".into(),
        s(&r.join("TRELLIS-text-tiny")),
        "--text-cond-model".into(),
        s(&r.join("clip_text_tiny")),
        "--mesh".into(),
        s(&obj),
        "--text".into(),
        "a stone block".into(),
        "--slat-steps".into(),
        "2".into(),
        "--voxel-resolution".into(),
        "16".into(),
        "--out".into(),
        s(&glb),
        "--asset".into(),
        s(&asset),
        "--texture-size".into(),
        "512".into(),
        "--quiet".into(),
    ]);
    assert!(out.status.success());
    check_glb(&glb, Some(512));
    let a = trellis::export::asset::Asset::load(&asset, &candle_core::Device::Cpu).unwrap();
    // The structure is the voxelised cube surface at 16³: 16³ - 14³ voxels.
    assert_eq!(a.coords.dim(0).unwrap(), 16 * 16 * 16 - 14 * 14 * 14);
    assert!(a.ss_latent.is_none());
    assert_eq!(a.meta["voxel_resolution"], 16);
}

#[test]
fn bad_arguments_fail_early_and_write_nothing() {
    let r = reference();
    let d = tempfile::tempdir().unwrap();
    let png = d.path().join("in.png");
    write_png(&png);
    let img_model = s(&r.join("TRELLIS-image-tiny"));
    let txt_model = s(&r.join("TRELLIS-text-tiny"));
    let glb = s(&d.path().join("x.glb"));
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "generate".into(),
                "--model".into(),
                img_model.clone(),
                "--image".into(),
                s(&d.path().join("missing.png")),
                "--out".into(),
                glb.clone(),
            ],
            "does not exist",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                img_model.clone(),
                "--image".into(),
                s(&png),
                "--ss-steps".into(),
                "0".into(),
                "--out".into(),
                glb.clone(),
            ],
            "at least 1",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                txt_model.clone(),
                "--image".into(),
                s(&png),
                "--out".into(),
                glb.clone(),
            ],
            "TrellisTextTo3DPipeline",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                img_model.clone(),
                "--image".into(),
                s(&png),
                "--out".into(),
                s(&d.path().join("no/such/dir/x.glb")),
            ],
            "does not exist",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                img_model.clone(),
                "--image".into(),
                s(&png),
                "--out".into(),
                s(&d.path().join("x.obj")),
            ],
            ".glb",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                img_model.clone(),
                "--image".into(),
                s(&png),
            ],
            "nothing to write",
        ),
        (
            vec![
                "generate".into(),
                "--model".into(),
                img_model,
                "--image".into(),
                s(&png),
                "--formats".into(),
                "gaussian,voxels".into(),
                "--ply".into(),
                s(&d.path().join("x.ply")),
            ],
            "unknown format",
        ),
        (
            vec![
                "variant".into(),
                "--model".into(),
                txt_model,
                "--mesh".into(),
                s(&png),
                "--text".into(),
                "x".into(),
                "--out".into(),
                glb,
            ],
            "unsupported mesh format",
        ),
        (
            vec![
                "decode".into(),
                "--asset".into(),
                s(&png),
                "--out".into(),
                s(&d.path().join("y.glb")),
            ],
            "asset",
        ),
    ];
    let obj = d.path().join("cube.obj");
    write_obj(&obj);
    let mut cases = cases;
    cases.push((
        vec![
            "variant".into(),
            "--model".into(),
            s(&r.join("TRELLIS-text-tiny")),
            "--mesh".into(),
            s(&obj),
            "--text".into(),
            "x".into(),
            "--voxel-resolution".into(),
            "64".into(),
            "--out".into(),
            s(&d.path().join("z.glb")),
        ],
        "finer than",
    ));
    for (args, needle) in cases {
        let out = bin().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    std::fs::remove_file(&png).unwrap();
    no_output_left(d.path());
}

/// Without CUDA in this build, `--device cuda:0 --precision half` runs on the CPU after exactly
/// one warning line, and the asset records the device actually used.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_request_falls_back_to_the_cpu_with_one_warning() {
    let r = reference();
    let d = tempfile::tempdir().unwrap();
    let asset = d.path().join("t.trellis");
    let out = run(&[
        "generate".into(),
        "--model".into(),
        s(&r.join("TRELLIS-text-tiny")),
        "--text-cond-model".into(),
        s(&r.join("clip_text_tiny")),
        "--text".into(),
        "a chair".into(),
        "--ss-steps".into(),
        "1".into(),
        "--slat-steps".into(),
        "1".into(),
        "--formats".into(),
        "mesh".into(),
        "--asset".into(),
        s(&asset),
        "--device".into(),
        "cuda:0".into(),
        "--precision".into(),
        "half".into(),
        "--quiet".into(),
    ]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("cuda:0") && warnings[0].ends_with("running on the CPU"));
    let a = trellis::export::asset::Asset::load(&asset, &candle_core::Device::Cpu).unwrap();
    assert_eq!(a.meta["device"], "cpu");

    // A precision that does not exist is refused before anything runs.
    let bad = run(&[
        "generate".into(),
        "--model".into(),
        s(&r.join("TRELLIS-text-tiny")),
        "--text".into(),
        "a chair".into(),
        "--asset".into(),
        s(&d.path().join("u.trellis")),
        "--precision".into(),
        "quarter".into(),
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown precision"));
    assert!(!d.path().join("u.trellis").exists());
}
