//! Every network built from a manifest of a full-size official checkpoint
//! (`shared/reference/manifests/*.json`) asks for exactly the manifest's tensor names and shapes
//! and, with the float16 torso those checkpoints use, for exactly each entry's stored dtype.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use trellis::models::config::ModelConfig;
use trellis::models::Network;
use trellis::runtime::weights::{Manifest, ManifestFill};

/// The manifests of the reference set; empty (with a note on the terminal) without one.
fn checkpoint_manifests() -> Vec<PathBuf> {
    let Some(reference) = trellis::reference_dir_or_skip("the official checkpoint manifests")
    else {
        return Vec::new();
    };
    let dir = reference.join("manifests");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.ends_with(".json") && !n.starts_with('_') && !n.starts_with("pipeline_")
        })
        .collect();
    v.sort();
    v
}

/// Builds the network with the given torso dtype; returns the manifest and the dtype mismatches.
fn build(path: &Path, torso: Option<DType>) -> (Manifest, Vec<String>) {
    let m = Manifest::load(path).unwrap();
    let name = path.display().to_string();
    let cfg = ModelConfig::from_json(&name, &m.config).unwrap();
    let fp16 = m.config["args"]["use_fp16"].as_bool().unwrap_or(false);
    let torso = torso.unwrap_or(if fp16 { DType::F16 } else { DType::F32 });
    let (vb, check) = m.var_builder(ManifestFill::Zeros, DType::F32, &Device::Cpu);
    if let Err(e) = Network::build(&cfg, vb, torso) {
        panic!("{name}: {e:#}");
    }
    let requested = check.requested_dtypes();
    let mismatches = m.dtype_mismatches(&requested);
    check.finish().unwrap_or_else(|e| panic!("{e}"));
    (m, mismatches)
}

#[test]
fn every_official_checkpoint_matches_its_network() {
    let paths = checkpoint_manifests();
    if paths.is_empty() {
        return; // no reference set: checkpoint_manifests() said so
    }
    // ss enc/dec/flow-img, 3 ss text flows, slat enc, 3 decoders, slat img flow, 3 slat text flows
    assert!(paths.len() >= 14, "only {} manifests", paths.len());
    for p in &paths {
        let (m, mismatches) = build(p, None);
        assert!(
            mismatches.is_empty(),
            "{}: dtype placement differs:\n{}",
            p.display(),
            mismatches.join("\n")
        );
        if m.config["args"]["use_fp16"].as_bool().unwrap_or(false) {
            let has = |d| m.entries.values().any(|e| e.dtype == d);
            assert!(has(DType::F16) && has(DType::F32), "{}", p.display());
        }
    }
}

#[test]
fn a_full_precision_torso_is_told_apart_from_the_checkpoint_layout() {
    let Some(reference) = trellis::reference_dir_or_skip("the ss_enc_conv3d_16l8_fp16 manifest")
    else {
        return;
    };
    let p = reference.join("manifests/ss_enc_conv3d_16l8_fp16.json");
    let (_, mismatches) = build(&p, Some(DType::F32));
    assert!(!mismatches.is_empty());
    assert!(
        mismatches.iter().all(|m| m.contains("stored F16")),
        "{mismatches:?}"
    );
}
