//! The parity harness over the fixture sets: `tests/reference-alt` (in the repository, always) and
//! `$TRELLIS_REFERENCE_DIR` (default `../shared/reference`) when present. Every fixture must pass
//! (none skipped); an empty directory or an unknown kind fails. Which sets ran is written to the
//! terminal past the harness's output capture.

use std::io::Write;

use candle_core::Device;

/// A line on the terminal even when the test passes (stderr directly, not the captured macros).
fn note(line: &str) {
    let _ = writeln!(std::io::stderr(), "note: {line}");
}

#[test]
fn every_reference_fixture_passes() {
    let Some(dir) = trellis::reference_dir_or_skip("parity over the reference fixture set") else {
        return;
    };
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
    note(&format!("parity set {}: {s}", dir.display()));
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
    note(&format!("parity set tests/reference-alt: {s}"));
}

/// A copy of the in-repository SS VAE fixture with intermediates, with `edit` applied to its
/// meta.json `tensors`; returns the parity output and summary.
fn edited_ss_encoder(
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> (trellis::parity::Summary, String) {
    let src = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/reference-alt/models/dn_ss_encoder_blocks_b2");
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("enc");
    std::fs::create_dir(&dst).unwrap();
    for f in ["config.json", "model.safetensors", "io.safetensors"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("meta.json")).unwrap()).unwrap();
    edit(meta["tensors"].as_object_mut().unwrap());
    std::fs::write(dst.join("meta.json"), meta.to_string()).unwrap();
    let mut out = Vec::new();
    let s = trellis::parity::run(tmp.path(), &Device::Cpu, None, &mut out).expect("parity run");
    (s, String::from_utf8_lossy(&out).to_string())
}

/// The SS VAE's optional intermediates are checked, and names the handler does not understand
/// fail the fixture: an unknown name, a block index past the network, a recorded tensor that
/// meta.json does not list.
#[test]
fn ss_vae_intermediates_are_checked_and_unknown_names_fail() {
    let (s, text) = edited_ss_encoder(|_| {});
    assert_eq!((s.checked, s.passed), (1, 1), "{text}");
    let (s, text) = edited_ss_encoder(|t| {
        t.insert("enc_blockx".into(), t["enc_block0"].clone());
    });
    assert_eq!(s.failed, 1, "{text}");
    assert!(text.contains("does not know"), "{text}");
    let (s, text) = edited_ss_encoder(|t| {
        t.insert("enc_block5".into(), t["enc_block0"].clone());
    });
    assert_eq!(s.failed, 1, "{text}");
    assert!(text.contains("has 5 entries"), "{text}");
    let (s, text) = edited_ss_encoder(|t| {
        t.remove("enc_block4");
    });
    assert_eq!(s.failed, 1, "{text}");
    assert!(text.contains("does not list"), "{text}");
}
