//! The conditioners' loading API on the tiny repositories (generated from seeded random weights;
//! the reference set's, with their recorded outputs, where it is present), the weight check, and
//! the parity handler's comparisons.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use trellis::models::conditioners::{ImageConditioner, TextConditioner};

/// A fixture of the reference set, or `None` (with a note on the terminal) without one.
fn fixture(rel: &str, test: &str) -> Option<PathBuf> {
    let d = trellis::reference_dir_or_skip(test)?.join(rel);
    assert!(
        d.join("meta.json").is_file(),
        "{}: no meta.json",
        d.display()
    );
    Some(d)
}

fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let num = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let den = b
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (num / den).sqrt()
}

fn io(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn image_conditioner_loads_the_tiny_dir_and_matches_the_reference() {
    let Some(dir) = fixture(
        "conditioners/dinov2_reg_tiny",
        "the DINOv2 reference outputs",
    ) else {
        return;
    };
    let enc = ImageConditioner::load(&dir, &Device::Cpu, DType::F32).unwrap();
    let io = io(&dir);
    let x = io["image_normalized_0"].unsqueeze(0).unwrap();
    let cond = enc.encode(&x).unwrap();
    let c = io["cond"].dim(2).unwrap();
    assert_eq!(cond.dims(), &[1, enc.num_tokens(518, 518), c]);
    let exp = io["cond"].narrow(0, 0, 1).unwrap();
    let e = rel_l2(&cond, &exp);
    assert!(e < 1e-5, "cond rel L2 {e}");
}

#[test]
fn text_conditioner_loads_the_tiny_dir_and_matches_the_reference() {
    let Some(dir) = fixture(
        "conditioners/clip_text_tiny",
        "the CLIP reference outputs and CLIP's real tokenizer",
    ) else {
        return;
    };
    let enc = TextConditioner::load(&dir, &Device::Cpu, DType::F32).unwrap();
    // The public sanity check of the CLIP tokenizer (CLIP's own vocabulary).
    let ids = enc.tokenize(&["a photo of a cat"]).unwrap();
    assert_eq!(&ids[0][..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    assert!(ids[0][7..].iter().all(|&t| t == 49407));
    // The negative condition (prompt 0 of the fixture is "").
    let neg = enc.encode(&[""]).unwrap();
    let exp = io(&dir)["last_hidden_state"].narrow(0, 0, 1).unwrap();
    assert_eq!(neg.dims(), exp.dims());
    let e = rel_l2(&neg, &exp);
    assert!(e < 1e-5, "neg cond rel L2 {e}");
    // Long prompts are truncated to BOS + 75 tokens + EOS.
    let long = "word ".repeat(200);
    let ids = enc.tokenize(&[long.as_str()]).unwrap();
    assert_eq!(ids[0].len(), 77);
    assert_eq!((ids[0][0], ids[0][76]), (49406, 49407));
    assert!(enc.encode(&[]).is_err());
}

/// Copies a fixture's config/tokenizer and writes `model.safetensors` from `tensors`.
fn variant(src: &Path, tensors: &HashMap<String, Tensor>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        if src.join(f).is_file() {
            std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
        }
    }
    candle_core::safetensors::save(tensors, dir.path().join("model.safetensors")).unwrap();
    dir
}

#[test]
fn unknown_and_missing_weights_are_reported_but_known_extras_accepted() {
    let tiny = trellis::test_tiny_repos();
    let src = tiny.clip;
    let dev = Device::Cpu;
    let base = candle_core::safetensors::load(src.join("model.safetensors"), &dev).unwrap();
    let exp = TextConditioner::load(&src, &dev, DType::F32)
        .unwrap()
        .encode(&[""])
        .unwrap();

    // A known-harmless extra (HF's position_ids buffer) loads.
    let mut t = base.clone();
    t.insert(
        "embeddings.position_ids".into(),
        Tensor::arange(0i64, 77, &dev)
            .unwrap()
            .unsqueeze(0)
            .unwrap(),
    );
    let d = variant(&src, &t);
    TextConditioner::load(d.path(), &dev, DType::F32).unwrap();

    // An unknown extra and a missing tensor are both reported.
    let mut t = base.clone();
    t.insert(
        "encoder.layers.9.mlp.fc1.weight".into(),
        Tensor::zeros((4, 4), DType::F32, &dev).unwrap(),
    );
    t.remove("final_layer_norm.bias");
    let d = variant(&src, &t);
    let e = match TextConditioner::load(d.path(), &dev, DType::F32) {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("unexpected: encoder.layers.9.mlp.fc1.weight"),
        "{e}"
    );
    assert!(e.contains("missing: final_layer_norm.bias"), "{e}");

    // A full CLIPModel-style file (text_model. prefix + vision tower) loads the text part.
    let mut t: HashMap<String, Tensor> = base
        .iter()
        .map(|(k, v)| (format!("text_model.{k}"), v.clone()))
        .collect();
    t.insert(
        "vision_model.post_layernorm.weight".into(),
        Tensor::ones(8, DType::F32, &dev).unwrap(),
    );
    t.insert(
        "logit_scale".into(),
        Tensor::ones((), DType::F32, &dev).unwrap(),
    );
    let d = variant(&src, &t);
    let enc = TextConditioner::load(d.path(), &dev, DType::F32).unwrap();
    assert_eq!(rel_l2(&enc.encode(&[""]).unwrap(), &exp), 0.0);

    // DINOv2: mask_token (HF's, unused at inference) is accepted, an unknown entry is not.
    let dsrc = tiny.dinov2;
    let mut t = candle_core::safetensors::load(dsrc.join("model.safetensors"), &dev).unwrap();
    t.insert(
        "embeddings.mask_token".into(),
        Tensor::zeros((1, 32), DType::F32, &dev).unwrap(),
    );
    let d = variant(&dsrc, &t);
    ImageConditioner::load(d.path(), &dev, DType::F32).unwrap();
    t.insert(
        "pooler.weight".into(),
        Tensor::zeros(3, DType::F32, &dev).unwrap(),
    );
    let d = variant(&dsrc, &t);
    let e = match ImageConditioner::load(d.path(), &dev, DType::F32) {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("unexpected: pooler.weight") && !e.contains("mask_token"),
        "{e}"
    );
}

#[test]
fn parity_handler_compares_every_listed_tensor() {
    let Some(root) = trellis::reference_dir_or_skip("the conditioner parity handler's checks")
    else {
        return;
    };
    use trellis::parity::{conditioners, Fixture, Outcome};
    let cases: [(&str, &[&str]); 3] = [
        (
            "conditioners/dinov2_reg_tiny",
            &[
                "x_prenorm",
                "cond",
                "image_normalized_0 (Normalize of rgb518_0, max abs)",
            ],
        ),
        (
            "conditioners/clip_text_tiny",
            &["input_ids", "attention_mask", "last_hidden_state"],
        ),
        (
            "preprocess",
            &[
                "rgb518_0",
                "rgb518_1",
                "rgb518_2",
                "image_normalized_0 (max abs)",
            ],
        ),
    ];
    for (rel, names) in cases {
        let mut fx = Fixture::open(&root.join(rel), &Device::Cpu).unwrap();
        let Outcome::Checked(report) = conditioners::check(&mut fx).unwrap() else {
            panic!("{rel} skipped")
        };
        for n in names {
            assert!(
                report.checks.iter().any(|c| c.name == *n),
                "{rel}: no check {n}"
            );
        }
        assert!(report.passed(), "{rel}: {:?}", report.checks);
    }
}

#[test]
fn half_precision_loads_and_stays_close() {
    let tiny = trellis::test_tiny_repos();
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 3, 518, 518), &dev).unwrap();
    let full = ImageConditioner::load(&tiny.dinov2, &dev, DType::F32)
        .unwrap()
        .encode(&x)
        .unwrap();
    let half = ImageConditioner::load(&tiny.dinov2, &dev, DType::F16)
        .unwrap()
        .encode(&x)
        .unwrap();
    assert_eq!(half.dtype(), DType::F32);
    let e = rel_l2(&half, &full);
    assert!(e > 0.0 && e < 2e-2, "f16 image cond rel L2 {e}");
    let prompts = ["", "a chair"];
    let full = TextConditioner::load(&tiny.clip, &dev, DType::F32)
        .unwrap()
        .encode(&prompts)
        .unwrap();
    let half = TextConditioner::load(&tiny.clip, &dev, DType::F16)
        .unwrap()
        .encode(&prompts)
        .unwrap();
    let e = rel_l2(&half, &full);
    assert!(e > 0.0 && e < 2e-2, "f16 text cond rel L2 {e}");
}

/// The generated tiny conditioners: shapes of DINOv2-reg's tokens, and the tiny CLIP tokenizer
/// (CLIP's byte symbols and specials, a few merges).
#[test]
fn tiny_conditioners_encode_with_the_expected_shapes_and_tokens() {
    let tiny = trellis::test_tiny_repos();
    let dev = Device::Cpu;
    let enc = ImageConditioner::load(&tiny.dinov2, &dev, DType::F32).unwrap();
    let x = Tensor::zeros((2, 3, 518, 518), DType::F32, &dev).unwrap();
    let cond = enc.encode(&x).unwrap();
    assert_eq!(cond.dims(), &[2, 1 + 4 + 37 * 37, 32]);
    assert_eq!(enc.num_tokens(518, 518), 1374);
    let enc = TextConditioner::load(&tiny.clip, &dev, DType::F32).unwrap();
    let ids = enc.tokenize(&["A chair!", "the"]).unwrap();
    // a</w> = 320 as in CLIP; "chair" merges to id 523; "!</w>" = 256
    assert_eq!(&ids[0][..5], &[49406, 320, 523, 256, 49407]);
    assert_eq!(&ids[1][..3], &[49406, 513, 49407]);
    assert!(ids[0][5..].iter().all(|&t| t == 49407));
    let y = enc.encode(&["A chair!"]).unwrap();
    assert_eq!(y.dims(), &[1, 77, 48]);
}
