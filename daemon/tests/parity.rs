//! The parity harness over `$TRELLIS_REFERENCE_DIR` (default `../shared/reference`): every fixture
//! must pass or be a known-but-unimplemented kind; an empty directory or an unknown kind fails.

use candle_core::Device;

#[test]
fn every_reference_fixture_passes() {
    let dir = trellis::reference_dir();
    let mut out = Vec::new();
    let s = trellis::parity::run(&dir, &Device::Cpu, None, &mut out).expect("parity run");
    let text = String::from_utf8_lossy(&out);
    println!("{text}");
    assert!(s.checked > 0, "no fixture found under {}", dir.display());
    // Every failure must be a documented divergence of the reference itself
    // (`parity::known`); anything else (a new mismatch, an error) fails the suite.
    let unexplained: Vec<_> = s.failures.iter().filter(|f| !f.all_known()).collect();
    assert!(
        unexplained.is_empty(),
        "unexplained parity failures {unexplained:?}\n{text}"
    );
    assert_eq!(s.checked, s.passed + s.failed + s.skipped);
}

#[test]
fn empty_or_missing_directory_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let mut out = Vec::new();
    assert!(trellis::parity::run(tmp.path(), &Device::Cpu, None, &mut out).is_err());
    let missing = tmp.path().join("nope");
    assert!(trellis::parity::run(&missing, &Device::Cpu, None, &mut out).is_err());
}

#[test]
fn unknown_kind_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = tmp.path().join("weird");
    std::fs::create_dir(&fx).unwrap();
    std::fs::write(fx.join("meta.json"), r#"{"kind": "module:DoesNotExist"}"#).unwrap();
    let mut out = Vec::new();
    let s = trellis::parity::run(tmp.path(), &Device::Cpu, None, &mut out).unwrap();
    let text = String::from_utf8_lossy(&out);
    assert_eq!(s.failed, 1, "{text}");
    assert!(!s.ok());
    assert!(text.contains("unknown fixture kind"), "{text}");
    assert!(
        text.contains("parity: 1 checked, 0 passed, 1 failed, 0 skipped"),
        "{text}"
    );
}

/// The visible fixture set against the original code's deterministic re-run values
/// (`tests/reference-rerun`, made by `tools/reference/`): every fixture must pass outright, the
/// overlay must apply to each fixture it names, and no known divergence may be used.
#[test]
fn visible_set_passes_against_rerun_values() {
    let manifest = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = manifest.join("../../shared/reference");
    let overlay_dir = manifest.join("../tests/reference-rerun");
    let overlay = trellis::parity::rerun::Overlay::open(&overlay_dir).expect("overlay");
    let named = walk_overlay(&overlay_dir);
    assert!(
        !named.is_empty(),
        "no rerun.safetensors under {}",
        overlay_dir.display()
    );
    // Only the fixtures the overlay names (the rest is the test above).
    for fixture in &named {
        let rel = fixture
            .strip_prefix(&overlay_dir)
            .expect("under the overlay")
            .to_string_lossy()
            .to_string();
        let mut out = Vec::new();
        let opts = trellis::parity::RunOptions {
            only: Some(&rel),
            overlay: Some(&overlay),
            ..Default::default()
        };
        let s = trellis::parity::run_with(&dir, &Device::Cpu, &opts, &mut out).expect("parity run");
        let text = String::from_utf8_lossy(&out);
        println!("{text}");
        assert!(s.ok(), "{text}");
        assert_eq!(s.passed, s.checked, "{text}");
        let line = text
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(rel.as_str()))
            .unwrap_or_default();
        assert!(
            line.contains("(re-run reference:"),
            "the overlay of {rel} must apply\n{text}"
        );
    }
}

/// Directories holding a `rerun.safetensors` under `root`.
fn walk_overlay(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        if d.join(trellis::parity::rerun::FILE).is_file() {
            found.push(d.clone());
        }
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.path().is_dir() {
                    stack.push(e.path());
                }
            }
        }
    }
    found
}

/// A second fixture set recorded from the original (`tests/reference-alt`, see its README): every
/// fixture must pass outright.
#[test]
fn alternate_set_passes() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/reference-alt");
    let fixtures = trellis::parity::find_fixtures(&dir).expect("fixture dir");
    assert!(fixtures.len() >= 20, "{} fixtures", fixtures.len());
    let mut out = Vec::new();
    let s = trellis::parity::run(&dir, &Device::Cpu, None, &mut out).expect("parity run");
    let text = String::from_utf8_lossy(&out);
    println!("{text}");
    assert_eq!(s.checked, fixtures.len(), "{text}");
    assert_eq!(s.passed, s.checked, "{text}");
}
