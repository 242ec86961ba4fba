//! `trellisd edit` end to end on the tiny model repositories (random weights, structure grid 32³,
//! structure latent 8³): the voxels and latents outside the region come out bit-identical to the
//! input asset's, the inside changes, a seed reproduces its result, a mesh is edited through the
//! structure encoder, and bad regions fail before anything is written. Few steps (CI has 2 cores).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use trellis::export::asset::Asset;

/// The structure grid and latent resolutions of the tiny repositories.
const R: i32 = 32;
const LATENT: usize = 8;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_trellisd"));
    c.env("HF_HUB_OFFLINE", "1");
    c
}

fn s(p: &Path) -> String {
    p.to_string_lossy().to_string()
}

/// The tiny text pipeline and its CLIP conditioner.
struct Tiny {
    model: PathBuf,
    clip: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

/// The one place that finds the tiny repositories: `trellisd tiny-repos --out DIR` when the binary
/// has that command, else the reference fixtures (`$TRELLIS_REFERENCE_DIR` or
/// `../shared/reference`). `None` (the test prints that it is skipped) when neither exists.
fn tiny() -> Option<Tiny> {
    let find = |root: &Path, sub: &str, name: &str| {
        [root.join(sub).join(name), root.join(name)]
            .into_iter()
            .find(|p| p.is_dir())
    };
    let dir = tempfile::tempdir().unwrap();
    let made = bin()
        .args(["tiny-repos", "--out", &s(dir.path())])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    let (root, keep) = if made {
        (dir.path().to_path_buf(), Some(dir))
    } else {
        (trellis::reference_dir(), None)
    };
    match (
        find(&root, "pipelines", "TRELLIS-text-tiny"),
        find(&root, "conditioners", "clip_text_tiny"),
    ) {
        (Some(model), Some(clip)) => Some(Tiny {
            model,
            clip,
            _dir: keep,
        }),
        _ => {
            eprintln!(
                "SKIPPED: no tiny repositories (no `trellisd tiny-repos`, and {} lacks pipelines/TRELLIS-text-tiny)",
                root.display()
            );
            None
        }
    }
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

fn a(x: &str) -> String {
    x.to_string()
}

/// Common arguments of the tiny text pipeline.
fn model_args(t: &Tiny) -> Vec<String> {
    vec![
        a("--model"),
        s(&t.model),
        a("--text-cond-model"),
        s(&t.clip),
    ]
}

fn load(p: &Path) -> Asset {
    Asset::load(p, &Device::Cpu).unwrap()
}

/// (x, y, z) → row of the asset's voxels.
fn rows(asset: &Asset) -> Vec<([i32; 3], Vec<u32>)> {
    let c: Vec<Vec<i32>> = asset.coords.to_vec2().unwrap();
    let l: Vec<Vec<f32>> = asset.slat.to_vec2().unwrap();
    c.iter()
        .zip(&l)
        .map(|(c, l)| {
            assert_eq!(c[0], 0);
            ([c[1], c[2], c[3]], l.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

/// The structure latent's bits per latent cell `(x, y, z)`.
fn latent_cells(asset: &Asset) -> HashMap<[usize; 3], Vec<u32>> {
    let z = asset.ss_latent.as_ref().expect("ss_latent");
    let (_, ch, r, _, _) = z.dims5().unwrap();
    assert_eq!(r, LATENT);
    let v: Vec<f32> = z.flatten_all().unwrap().to_vec1().unwrap();
    let mut m = HashMap::new();
    for x in 0..r {
        for y in 0..r {
            for zz in 0..r {
                let bits = (0..ch)
                    .map(|c| v[((c * r + x) * r + y) * r + zz].to_bits())
                    .collect();
                m.insert([x, y, zz], bits);
            }
        }
    }
    m
}

/// Outside/inside split of an asset's voxels with their latent bits.
type Split = (Vec<([i32; 3], Vec<u32>)>, Vec<([i32; 3], Vec<u32>)>);

fn split(asset: &Asset, inside: &dyn Fn([i32; 3]) -> bool) -> Split {
    rows(asset).into_iter().partition(|(v, _)| !inside(*v))
}

fn generate_asset(t: &Tiny, dir: &Path) -> PathBuf {
    let p = dir.join("in.trellis");
    let mut args = vec![a("generate")];
    args.extend(model_args(t));
    args.extend([
        a("--text"),
        a("a wooden chair"),
        a("--ss-steps"),
        a("2"),
        a("--slat-steps"),
        a("2"),
        a("--seed"),
        a("1"),
        a("--asset"),
        s(&p),
        a("--quiet"),
    ]);
    assert!(run(&args).status.success());
    p
}

fn edit_args(t: &Tiny, source: &[String], region: &str, seed: &str) -> Vec<String> {
    let mut args = vec![a("edit")];
    args.extend(source.iter().cloned());
    args.extend(model_args(t));
    args.extend([
        a("--region"),
        a(region),
        a("--text"),
        a("a stone lantern"),
        a("--ss-steps"),
        a("2"),
        a("--slat-steps"),
        a("2"),
        a("--seed"),
        a(seed),
    ]);
    args
}

/// Voxels with x >= 16 (the box 0..0.5 on x), i.e. latent cells with x >= 4.
fn right_half(v: [i32; 3]) -> bool {
    v[0] >= R / 2
}

#[test]
fn editing_an_asset_keeps_the_outside_bit_identical() {
    let Some(t) = tiny() else { return };
    let d = tempfile::tempdir().unwrap();
    let input = generate_asset(&t, d.path());
    let src = load(&input);
    let source = [a("--asset"), s(&input)];
    let region = "box:0,-0.5,-0.5,0.5,0.5,0.5";

    let (e1, glb) = (d.path().join("e1.trellis"), d.path().join("e1.glb"));
    let mut args = edit_args(&t, &source, region, "5");
    args.extend([a("--save-asset"), s(&e1), a("--out"), s(&glb), a("--json")]);
    let out = run(&args);
    assert!(out.status.success());
    assert!(std::fs::metadata(&glb).unwrap().len() > 0);
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for stage in ["sparse_structure", "structured_latent"] {
        let steps = events
            .iter()
            .filter(|e| e["stage"] == stage && e["step"].as_u64().unwrap_or(0) > 0)
            .count();
        assert_eq!(steps, 2, "{stage}: {events:?}");
    }
    assert_eq!(events.last().unwrap()["event"], "done");

    let edited = load(&e1);
    assert_eq!(edited.meta["task"], "edit");
    assert_eq!(edited.meta["edit"]["slat_regenerated_everywhere"], false);

    // Voxels and latents outside the region: bit-identical, same order.
    let (src_out, src_in) = split(&src, &right_half);
    let (ed_out, ed_in) = split(&edited, &right_half);
    assert!(
        !src_out.is_empty(),
        "the input has voxels outside the region"
    );
    assert_eq!(src_out, ed_out, "outside the region nothing changes");
    assert_eq!(
        edited.meta["edit"]["kept_voxels"].as_u64().unwrap() as usize,
        src_out.len()
    );
    // Inside, the voxels or their latents change.
    assert_ne!(src_in, ed_in, "the region was regenerated");
    // The structure latent: cells of the left half (x < 4) kept bit for bit, the right half new.
    let (zs, ze) = (latent_cells(&src), latent_cells(&edited));
    let mut changed = 0;
    for (cell, bits) in &zs {
        if cell[0] < LATENT / 2 {
            assert_eq!(bits, &ze[cell], "latent cell {cell:?} outside the region");
        } else if bits != &ze[cell] {
            changed += 1;
        }
    }
    assert_eq!(
        changed,
        LATENT * LATENT * LATENT / 2,
        "every regenerated cell changes"
    );

    // The same seed gives the same result, bit for bit.
    let e2 = d.path().join("e2.trellis");
    let mut args = edit_args(&t, &source, region, "5");
    args.extend([a("--save-asset"), s(&e2), a("--quiet")]);
    assert!(run(&args).status.success());
    let again = load(&e2);
    assert_eq!(rows(&again), rows(&edited));
    assert_eq!(latent_cells(&again), ze);

    // Another seed changes the inside only.
    let e3 = d.path().join("e3.trellis");
    let mut args = edit_args(&t, &source, region, "6");
    args.extend([a("--save-asset"), s(&e3), a("--quiet")]);
    assert!(run(&args).status.success());
    let other = load(&e3);
    let (o_out, o_in) = split(&other, &right_half);
    assert_eq!(o_out, src_out);
    assert_ne!(o_in, ed_in);
}

#[test]
fn a_voxel_mask_with_resampling_keeps_the_outside_too() {
    let Some(t) = tiny() else { return };
    let d = tempfile::tempdir().unwrap();
    let input = generate_asset(&t, d.path());
    let src = load(&input);
    // The mask: the top quarter (z >= 24), latent cells z >= 6.
    let top = |v: [i32; 3]| v[2] >= 3 * R / 4;
    let r = R as usize;
    let mut m = vec![0u8; r * r * r];
    for x in 0..r {
        for y in 0..r {
            for z in 3 * r / 4..r {
                m[(x * r + y) * r + z] = 1;
            }
        }
    }
    let npy = d.path().join("mask.npy");
    Tensor::from_vec(m, (r, r, r), &Device::Cpu)
        .unwrap()
        .write_npy(&npy)
        .unwrap();
    let e = d.path().join("m.trellis");
    let mut args = edit_args(
        &t,
        &[a("--asset"), s(&input)],
        &format!("mask:{}", s(&npy)),
        "9",
    );
    args.extend([
        a("--jumps"),
        a("1"),
        a("--jump-length"),
        a("1"),
        a("--save-asset"),
        s(&e),
        a("--json"),
    ]);
    let out = run(&args);
    assert!(out.status.success());
    // With one jump back at every step, 2 steps take 2 + 2 denoising steps per stage.
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last_step = events
        .iter()
        .filter(|e| e["stage"] == "sparse_structure")
        .filter_map(|e| e["steps"].as_u64())
        .max();
    assert_eq!(last_step, Some(4), "{events:?}");
    let edited = load(&e);
    let (src_out, src_in) = split(&src, &top);
    let (ed_out, ed_in) = split(&edited, &top);
    assert_eq!(src_out, ed_out);
    assert_ne!(src_in, ed_in);
    let (zs, ze) = (latent_cells(&src), latent_cells(&edited));
    for (cell, bits) in &zs {
        if cell[2] < 3 * LATENT / 4 {
            assert_eq!(bits, &ze[cell], "latent cell {cell:?}");
        }
    }
    assert_eq!(edited.meta["resampling"]["jumps"], 1);
}

/// A unit cube as OBJ (quads, 1-based indices).
fn write_obj(path: &Path) {
    let text = "v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nv 0 0 1\nv 1 0 1\nv 1 1 1\nv 0 1 1\n\
                f 1 4 3 2\nf 5 6 7 8\nf 1 2 6 5\nf 2 3 7 6\nf 3 4 8 7\nf 4 1 5 8\n";
    std::fs::write(path, text).unwrap();
}

#[test]
fn editing_a_mesh_encodes_its_structure_and_samples_every_latent() {
    let Some(t) = tiny() else { return };
    let d = tempfile::tempdir().unwrap();
    let obj = d.path().join("cube.obj");
    write_obj(&obj);
    let mesh = trellis::pipelines::mesh_input::load_mesh(&obj).unwrap();
    let cube: Vec<[i32; 3]> = trellis::pipelines::voxelize::voxelize(&mesh, R as usize).unwrap();
    let e = d.path().join("mesh.trellis");
    let mut args = edit_args(
        &t,
        &[a("--mesh"), s(&obj)],
        "box:-0.5,-0.5,0,0.5,0.5,0.5",
        "2",
    );
    args.extend([a("--save-asset"), s(&e)]);
    let out = run(&args);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("every voxel's latent was sampled anew"),
        "{err}"
    );
    let edited = load(&e);
    assert_eq!(edited.meta["edit"]["slat_regenerated_everywhere"], true);
    assert_eq!(edited.meta["source"]["mesh"], s(&obj));
    let upper = |v: [i32; 3]| v[2] >= R / 2;
    let got: Vec<[i32; 3]> = rows(&edited)
        .into_iter()
        .map(|(v, _)| v)
        .filter(|v| !upper(*v))
        .collect();
    let mut want: Vec<[i32; 3]> = cube.into_iter().filter(|v| !upper(*v)).collect();
    want.sort_unstable();
    assert!(!want.is_empty());
    assert_eq!(got, want, "the lower half is the voxelised cube, exactly");
    assert!(edited.ss_latent.is_some());
}

#[test]
fn bad_regions_fail_with_a_clear_error_and_write_nothing() {
    let Some(t) = tiny() else { return };
    let d = tempfile::tempdir().unwrap();
    let input = generate_asset(&t, d.path());
    let small = d.path().join("small.npy");
    Tensor::ones((16, 16, 16), DType::U8, &Device::Cpu)
        .unwrap()
        .write_npy(&small)
        .unwrap();
    let zeros = d.path().join("zeros.npy");
    Tensor::zeros((32, 32, 32), DType::U8, &Device::Cpu)
        .unwrap()
        .write_npy(&zeros)
        .unwrap();
    let (glb, saved) = (d.path().join("x.glb"), d.path().join("x.trellis"));
    let outputs = [a("--out"), s(&glb), a("--save-asset"), s(&saved)];
    let source = [a("--asset"), s(&input)];
    let small_mask = format!("mask:{}", s(&small));
    let zero_mask = format!("mask:{}", s(&zeros));
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        ("box:0,0,0,0,0.2,0.2", vec![], "the region is empty"),
        ("box:0.1,0,0,-0.1,0.2,0.2", vec![], "the region is empty"),
        ("box:0.6,0.6,0.6,0.9,0.9,0.9", vec![], "outside the grid"),
        (&small_mask, vec![], "shape [16, 16, 16]"),
        (&zero_mask, vec![], "the region is empty"),
        ("sphere:0,0,0,1", vec![], "expected box:"),
        (
            "box:0,0,0,0.5,0.5,0.5",
            vec![a("--jumps"), a("1"), a("--jump-length"), a("3")],
            "longer than the 2 sampler steps",
        ),
    ];
    for (region, extra, needle) in cases {
        let mut args = edit_args(&t, &source, region, "1");
        args.extend(extra);
        args.extend(outputs.iter().cloned());
        let out = bin().args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{region}: succeeded");
        assert!(err.contains(needle), "{region}: {err}");
        assert!(
            !glb.exists() && !saved.exists(),
            "{region}: wrote an output"
        );
    }
    // Nothing to write, and a wrong output extension.
    let out = bin()
        .args(edit_args(&t, &source, "box:0,0,0,0.5,0.5,0.5", "1"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--save-asset FILE.trellis"));
    let mut args = edit_args(&t, &source, "box:0,0,0,0.5,0.5,0.5", "1");
    args.extend([a("--save-asset"), s(&d.path().join("x.glb"))]);
    let out = bin().args(&args).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("must end in .trellis"));
    let left: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n != "in.trellis" && !n.ends_with(".npy"))
        .collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

#[test]
fn a_variant_asset_has_no_structure_latent_and_is_encoded() {
    let Some(t) = tiny() else { return };
    let d = tempfile::tempdir().unwrap();
    let obj = d.path().join("cube.obj");
    write_obj(&obj);
    let v = d.path().join("variant.trellis");
    let mut args = vec![a("variant"), a("--mesh"), s(&obj)];
    args.extend(model_args(&t));
    args.extend([
        a("--text"),
        a("a crate"),
        a("--slat-steps"),
        a("2"),
        a("--asset"),
        s(&v),
        a("--quiet"),
    ]);
    assert!(run(&args).status.success());
    let src = load(&v);
    assert!(src.ss_latent.is_none());
    let e = d.path().join("e.trellis");
    let mut args = edit_args(
        &t,
        &[a("--asset"), s(&v)],
        "box:-0.5,0,-0.5,0.5,0.5,0.5",
        "4",
    );
    args.extend([a("--save-asset"), s(&e), a("--quiet")]);
    assert!(run(&args).status.success());
    let edited = load(&e);
    let back = |v: [i32; 3]| v[1] >= R / 2;
    let (src_out, _) = split(&src, &back);
    let (ed_out, _) = split(&edited, &back);
    assert!(!src_out.is_empty());
    assert_eq!(src_out, ed_out, "voxels and latents outside the region");
    assert_eq!(edited.meta["edit"]["slat_regenerated_everywhere"], false);
    assert!(edited.ss_latent.is_some());
    // A variant voxelised on another grid cannot be edited on this one.
    let v16 = d.path().join("v16.trellis");
    let mut args = vec![a("variant"), a("--mesh"), s(&obj)];
    args.extend(model_args(&t));
    args.extend([
        a("--text"),
        a("a crate"),
        a("--slat-steps"),
        a("1"),
        a("--voxel-resolution"),
        a("16"),
        a("--asset"),
        s(&v16),
        a("--quiet"),
    ]);
    assert!(run(&args).status.success());
    let mut args = edit_args(&t, &[a("--asset"), s(&v16)], "box:0,0,0,0.5,0.5,0.5", "4");
    args.extend([a("--save-asset"), s(&d.path().join("no.trellis"))]);
    let out = bin().args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("16³ grid") && err.contains("32³"), "{err}");
    assert!(!d.path().join("no.trellis").exists());
}
