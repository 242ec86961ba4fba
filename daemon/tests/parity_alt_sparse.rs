//! Parity handlers on fixture variants the visible set does not have (found with the alternate
//! sets of `tools/reference/gen_sparse.py` / `gen_slat_models.py`).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

/// The visible `models/slat_encoder` fixture turned into a `use_fp16` one, as the original saves
/// such a checkpoint (the Linear layers inside `blocks` in float16): the handler must run it through
/// the float16 torso and allow float16 rounding against the recorded float32 outputs.
#[test]
fn fp16_slat_encoder_fixture_runs_the_f16_torso() {
    let Some(reference) = trellis::reference_dir_or_skip("the fp16 variant of models/slat_encoder")
    else {
        return;
    };
    let src = reference.join("models/slat_encoder");
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("slat_encoder_fp16");
    std::fs::create_dir(&dst).unwrap();
    for f in ["meta.json", "io.safetensors"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["args"]["use_fp16"] = serde_json::Value::Bool(true);
    std::fs::write(dst.join("config.json"), cfg.to_string()).unwrap();
    let weights =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut converted = 0;
    let fp16: HashMap<String, Tensor> = weights
        .into_iter()
        .map(|(k, v)| {
            if k.starts_with("blocks.") && !k.contains("norm") {
                converted += 1;
                (k, v.to_dtype(DType::F16).unwrap())
            } else {
                (k, v)
            }
        })
        .collect();
    assert!(converted > 0);
    candle_core::safetensors::save(&fp16, dst.join("model.safetensors")).unwrap();

    let mut out = Vec::new();
    let s = trellis::parity::run(tmp.path(), &Device::Cpu, None, &mut out).unwrap();
    let text = String::from_utf8_lossy(&out);
    assert_eq!((s.checked, s.passed), (1, 1), "{text}");
    assert!(text.contains("tol 1e-1"), "{text}");
}
