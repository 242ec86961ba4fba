//! The sparse-structure networks built from the manifests of the full-size official checkpoints ask
//! for exactly the manifest's tensor names and shapes, and (with the float16 torso these checkpoints
//! use) for exactly the manifest's dtype per entry.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use trellis::models::config::ModelConfig;
use trellis::models::ss_flow::SparseStructureFlowModel;
use trellis::models::ss_vae::{SparseStructureDecoder, SparseStructureEncoder};
use trellis::runtime::weights::{Manifest, ManifestFill};

/// Hands out broadcast zeros and remembers the dtype the network asked for each name.
struct DtypeRecorder {
    names: Vec<String>,
    asked: Arc<Mutex<BTreeMap<String, DType>>>,
}

impl SimpleBackend for DtypeRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.asked.lock().unwrap().insert(name.to_string(), dtype);
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.asked.lock().unwrap().insert(name.to_string(), dtype);
        Tensor::zeros((), dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }
}

fn build(config: &ModelConfig, vb: VarBuilder<'static>, torso: DType) {
    match config {
        ModelConfig::SparseStructureEncoder(c) => {
            SparseStructureEncoder::new(c, vb, torso).unwrap();
        }
        ModelConfig::SparseStructureDecoder(c) => {
            SparseStructureDecoder::new(c, vb, torso).unwrap();
        }
        ModelConfig::SparseStructureFlow(c) => {
            SparseStructureFlowModel::new(c, vb, torso).unwrap();
        }
        _ => panic!("not a sparse-structure network"),
    }
}

fn check_manifest(stem: &str) {
    let path = trellis::reference_dir()
        .join("manifests")
        .join(format!("{stem}.json"));
    let manifest = Manifest::load(&path).unwrap();
    let config = ModelConfig::from_json(stem, &manifest.config).unwrap();
    let use_fp16 = manifest.config["args"]["use_fp16"]
        .as_bool()
        .unwrap_or(false);
    let torso = if use_fp16 { DType::F16 } else { DType::F32 };
    let dev = Device::Cpu;

    // names and shapes
    let (vb, check) = manifest.var_builder(ManifestFill::Zeros, DType::F32, &dev);
    build(&config, vb, torso);
    check.finish().unwrap();

    // dtypes
    let asked = Arc::new(Mutex::new(BTreeMap::new()));
    let backend = DtypeRecorder {
        names: manifest.entries.keys().cloned().collect(),
        asked: asked.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, dev.clone());
    build(&config, vb, torso);
    let asked = asked.lock().unwrap();
    assert_eq!(asked.len(), manifest.entries.len(), "{stem}: entry count");
    let mut wrong = Vec::new();
    for (name, spec) in &manifest.entries {
        match asked.get(name) {
            Some(d) if *d == spec.dtype => {}
            other => wrong.push(format!(
                "{name}: manifest {:?}, network {other:?}",
                spec.dtype
            )),
        }
    }
    assert!(
        wrong.is_empty(),
        "{stem}: dtype mismatches:\n{}",
        wrong.join("\n")
    );
    // the fp16 checkpoints really do mix both dtypes
    if use_fp16 {
        assert!(
            asked.values().any(|d| *d == DType::F16),
            "{stem}: no float16 entry"
        );
        assert!(
            asked.values().any(|d| *d == DType::F32),
            "{stem}: no float32 entry"
        );
    }
}

#[test]
fn ss_encoder_manifest() {
    check_manifest("ss_enc_conv3d_16l8_fp16");
}

#[test]
fn ss_decoder_manifest() {
    check_manifest("ss_dec_conv3d_16l8_fp16");
}

#[test]
fn ss_flow_img_large_manifest() {
    check_manifest("ss_flow_img_dit_L_16l8_fp16");
}

#[test]
fn ss_flow_txt_manifests() {
    for size in ["B", "L", "XL"] {
        check_manifest(&format!("ss_flow_txt_dit_{size}_16l8_fp16"));
    }
}
