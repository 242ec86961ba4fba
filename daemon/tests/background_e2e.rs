//! `generate` on an ordinary photo (JPEG, no alpha): background removal with a tiny random U²-Net
//! (`tests/reference-u2net/u2net_tiny` as `--background-model`) on the tiny reference
//! repositories; `--no-background-removal`; the offline error when the weights are missing, with
//! nothing written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_trellisd"));
    c.env("HF_HUB_OFFLINE", "1");
    c
}

fn s(p: &Path) -> String {
    p.to_string_lossy().to_string()
}

fn run(args: &[String]) -> Output {
    bin().args(args).output().expect("run trellisd")
}

/// The tiny image repository and its conditioner: `../shared/reference` (or
/// `$TRELLIS_REFERENCE_DIR`), else what `trellisd tiny-repos` writes when the binary has it.
fn tiny_repos(scratch: &Path) -> Option<(PathBuf, PathBuf)> {
    let r = trellis::reference_dir();
    let found = |r: &Path| {
        let m = r.join("pipelines/TRELLIS-image-tiny");
        let c = r.join("conditioners/dinov2_reg_tiny");
        (m.is_dir() && c.is_dir()).then_some((m, c))
    };
    if let Some(x) = found(&r) {
        return Some(x);
    }
    let out = scratch.join("tiny");
    let ok = bin()
        .args(["tiny-repos", "--out", &s(&out)])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        for base in [out.clone(), out.join("reference")] {
            if let Some(x) = found(&base) {
                return Some(x);
            }
            let m = base.join("TRELLIS-image-tiny");
            let c = base.join("dinov2_reg_tiny");
            if m.is_dir() && c.is_dir() {
                return Some((m, c));
            }
        }
    }
    None
}

fn tiny_u2net() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/reference-u2net/u2net_tiny")
}

/// An opaque JPEG photo: a white disc on black (the tiny random network's matte then has a large
/// region above the 0.8 threshold the crop needs).
fn write_jpeg(path: &Path) {
    let img = image::RgbImage::from_fn(120, 90, |x, y| {
        let (dx, dy) = (x as f32 - 64.0, y as f32 - 44.0);
        if dx * dx + dy * dy < 30.0 * 30.0 {
            image::Rgb([255, 255, 255])
        } else {
            image::Rgb([0, 0, 0])
        }
    });
    img.save(path).unwrap();
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn a_jpeg_goes_through_generate_with_background_removal() {
    let d = tempfile::tempdir().unwrap();
    let Some((model, cond)) = tiny_repos(d.path()) else {
        eprintln!(
            "SKIPPED a_jpeg_goes_through_generate_with_background_removal: no tiny repositories \
             (../shared/reference missing and no `trellisd tiny-repos`)"
        );
        return;
    };
    let jpg = d.path().join("photo.jpg");
    write_jpeg(&jpg);
    let (asset, mask) = (d.path().join("a.trellis"), d.path().join("mask.png"));
    let out = run(&[
        "generate".into(),
        "--model".into(),
        s(&model),
        "--image-cond-model".into(),
        s(&cond),
        "--image".into(),
        s(&jpg),
        "--background-model".into(),
        s(&tiny_u2net()),
        "--save-mask".into(),
        s(&mask),
        "--ss-steps".into(),
        "2".into(),
        "--slat-steps".into(),
        "2".into(),
        "--asset".into(),
        s(&asset),
        "--json".into(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"removing_background\""), "{stdout}");
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "done");
    assert_eq!(last["outputs"]["mask"], serde_json::json!(mask));
    let m = image::open(&mask).unwrap();
    assert_eq!((m.width(), m.height()), (120, 90));
    assert!(matches!(m, image::DynamicImage::ImageLuma8(_)));
    let a = trellis::export::asset::Asset::load(&asset, &candle_core::Device::Cpu).unwrap();
    assert_eq!(a.coords.dim(1).unwrap(), 4);

    // The same photo without background removal: today's clear error, nothing written.
    let d2 = tempfile::tempdir().unwrap();
    let jpg2 = d2.path().join("photo.jpg");
    write_jpeg(&jpg2);
    let out = run(&[
        "generate".into(),
        "--model".into(),
        s(&model),
        "--image".into(),
        s(&jpg2),
        "--no-background-removal".into(),
        "--asset".into(),
        s(&d2.path().join("b.trellis")),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no transparency"), "{err}");
    assert_eq!(files_in(d2.path()), vec!["photo.jpg".to_string()]);
}

#[test]
fn missing_weights_offline_is_a_clear_error_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("empty-cache");
    std::fs::create_dir(&cache).unwrap();
    let jpg = d.path().join("photo.jpg");
    write_jpeg(&jpg);
    let model = tiny_repos(d.path())
        .map(|(m, _)| s(&m))
        .unwrap_or_else(|| "microsoft/TRELLIS-image-large".into());
    let out = bin()
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HOME", d.path())
        .args([
            "generate",
            "--model",
            &model,
            "--image",
            &s(&jpg),
            "--out",
            &s(&d.path().join("a.glb")),
            "--save-mask",
            &s(&d.path().join("m.png")),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("leonelhs/u2net/u2net.pth"), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    assert!(err.contains("--background-model DIR"), "{err}");
    let mut left = files_in(d.path());
    left.retain(|n| n != "photo.jpg" && n != "empty-cache" && n != "tiny");
    assert!(left.is_empty(), "files written: {left:?}");
    assert!(files_in(&cache).is_empty());
}

#[test]
fn save_mask_is_checked_before_any_work() {
    let d = tempfile::tempdir().unwrap();
    let jpg = d.path().join("photo.jpg");
    write_jpeg(&jpg);
    let out = run(&[
        "generate".into(),
        "--image".into(),
        s(&jpg),
        "--out".into(),
        s(&d.path().join("a.glb")),
        "--save-mask".into(),
        s(&d.path().join("m.jpg")),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--save-mask") && err.contains(".png"), "{err}");
}

#[test]
fn variant_takes_a_jpeg_prompt_too() {
    let d = tempfile::tempdir().unwrap();
    let Some((model, cond)) = tiny_repos(d.path()) else {
        eprintln!(
            "SKIPPED variant_takes_a_jpeg_prompt_too: no tiny repositories (../shared/reference \
             missing and no `trellisd tiny-repos`)"
        );
        return;
    };
    let jpg = d.path().join("photo.jpg");
    write_jpeg(&jpg);
    let obj = d.path().join("cube.obj");
    std::fs::write(
        &obj,
        "v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nv 0 0 1\nv 1 0 1\nv 1 1 1\nv 0 1 1\n\
         f 1 4 3 2\nf 5 6 7 8\nf 1 2 6 5\nf 2 3 7 6\nf 3 4 8 7\nf 4 1 5 8\n",
    )
    .unwrap();
    let (asset, mask) = (d.path().join("v.trellis"), d.path().join("vm.png"));
    let out = run(&[
        "variant".into(),
        "--model".into(),
        s(&model),
        "--image-cond-model".into(),
        s(&cond),
        "--mesh".into(),
        s(&obj),
        "--image".into(),
        s(&jpg),
        "--background-model".into(),
        s(&tiny_u2net()),
        "--save-mask".into(),
        s(&mask),
        "--slat-steps".into(),
        "2".into(),
        "--asset".into(),
        s(&asset),
        "--quiet".into(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(asset.is_file() && mask.is_file());
}
