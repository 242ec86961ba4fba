//! The tiny repositories made from seeded random weights (`trellisd tiny-repos`): the command
//! writes all four, one seed gives the same bytes, and (where the reference set is present) every
//! checkpoint has the names, shapes and configs of the reference set's tiny repositories.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use trellis::tiny_repos::{self, TinyRepos};

/// name -> shape of every tensor of a safetensors file.
fn layout(path: &Path) -> BTreeMap<String, Vec<usize>> {
    let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    t.into_iter().map(|(k, v)| (k, v.dims().to_vec())).collect()
}

fn files(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_command_writes_four_repositories_and_a_seed_gives_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("repos");
    let run = Command::new(env!("CARGO_BIN_EXE_trellisd"))
        .args(["tiny-repos", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let r = TinyRepos::at(&out);
    for p in [&r.image, &r.text] {
        assert!(p.join("pipeline.json").is_file(), "{}", p.display());
    }
    for p in [&r.dinov2, &r.clip] {
        assert!(p.join("config.json").is_file() && p.join("model.safetensors").is_file());
    }
    assert!(r.clip.join("tokenizer.json").is_file());
    assert_eq!(files(&r.image.join("ckpts")).len(), 14);
    // The library with the default seed writes the same bytes; another seed other weights.
    let again = tiny_repos::write(&tmp.path().join("again"), tiny_repos::DEFAULT_SEED).unwrap();
    let other = tiny_repos::write(&tmp.path().join("other"), 7).unwrap();
    let (a, b, c) = (files(&r.root), files(&again.root), files(&other.root));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            std::fs::read(x).unwrap(),
            std::fs::read(y).unwrap(),
            "{}",
            x.display()
        );
    }
    let w = "TRELLIS-image-tiny/ckpts/slat_flow_img_dit_tiny.safetensors";
    assert_ne!(
        std::fs::read(r.root.join(w)).unwrap(),
        std::fs::read(other.root.join(w)).unwrap()
    );
    assert_eq!(a.len(), c.len());
}

/// Every checkpoint and conditioner has the tensor names and shapes of the reference set's tiny
/// repositories, and the same configs.
#[test]
fn layouts_match_the_reference_tiny_repositories() {
    let Some(reference) = trellis::reference_dir_or_skip("the tiny repositories' layout check")
    else {
        return;
    };
    let r = trellis::test_tiny_repos();
    let pairs = [
        (
            r.image.join("ckpts"),
            reference.join("pipelines/TRELLIS-image-tiny/ckpts"),
        ),
        (
            r.text.join("ckpts"),
            reference.join("pipelines/TRELLIS-text-tiny/ckpts"),
        ),
    ];
    let mut n = 0;
    for (ours, theirs) in &pairs {
        for p in files(ours) {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            let q = theirs.join(&name);
            if name.ends_with(".safetensors") {
                assert_eq!(layout(&p), layout(&q), "{name}");
                n += 1;
            } else {
                let a: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
                let b: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&q).unwrap()).unwrap();
                assert_eq!(a, b, "{name}");
            }
        }
    }
    assert_eq!(n, 9);
    for (ours, rel) in [(&r.dinov2, "dinov2_reg_tiny"), (&r.clip, "clip_text_tiny")] {
        let theirs = reference.join("conditioners").join(rel);
        let (mut a, b) = (
            layout(&ours.join("model.safetensors")),
            layout(&theirs.join("model.safetensors")),
        );
        // HF's mask_token is saved by the original but never used at inference; we do not write it.
        if let Some(s) = b.get("embeddings.mask_token") {
            a.insert("embeddings.mask_token".into(), s.clone());
        }
        assert_eq!(a, b, "{rel}");
    }
    for repo in ["TRELLIS-image-tiny", "TRELLIS-text-tiny"] {
        let a: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(r.root.join(repo).join("pipeline.json")).unwrap(),
        )
        .unwrap();
        let b: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(reference.join("pipelines").join(repo).join("pipeline.json"))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(a, b, "{repo}");
    }
}
