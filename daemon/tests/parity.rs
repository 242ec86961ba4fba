//! The parity harness over `$TRELLIS_REFERENCE_DIR` (default `../shared/reference`): every fixture
//! must pass (none skipped); an empty directory or an unknown kind fails.

use candle_core::Device;

#[test]
fn every_reference_fixture_passes() {
    let dir = trellis::reference_dir();
    let mut out = Vec::new();
    let s = trellis::parity::run(&dir, &Device::Cpu, None, &mut out).expect("parity run");
    let text = String::from_utf8_lossy(&out);
    println!("{text}");
    assert!(s.checked > 0, "no fixture found under {}", dir.display());
    // Nothing is excused: every fixture passes, none is skipped.
    assert!(
        s.failures.is_empty(),
        "parity failures {:?}\n{text}",
        s.failures
    );
    assert_eq!((s.failed, s.skipped), (0, 0), "{text}");
    assert_eq!(s.passed, s.checked, "{text}");
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
