//! The SLat decoders built from the manifests of the full-size official checkpoints ask for exactly
//! the manifest's tensor names and shapes and, with the float16 torso these checkpoints were saved
//! with, for exactly the manifest's dtype per entry (blocks and the mesh decoder's upsampling
//! convolutions float16; input/output layers, norms and the Gaussian offset buffer float32).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use trellis::models::config::ModelConfig;
use trellis::models::slat_vae::decoder_gs::SLatGaussianDecoder;
use trellis::models::slat_vae::decoder_mesh::SLatMeshDecoder;
use trellis::models::slat_vae::decoder_rf::SLatRadianceFieldDecoder;
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
        ModelConfig::SLatGaussianDecoder { config, .. } => {
            SLatGaussianDecoder::new(config, vb, torso).unwrap();
        }
        ModelConfig::SLatRadianceFieldDecoder { config, .. } => {
            SLatRadianceFieldDecoder::new(config, vb, torso).unwrap();
        }
        ModelConfig::SLatMeshDecoder { config, .. } => {
            SLatMeshDecoder::new(config, vb, torso).unwrap();
        }
        _ => panic!("not a SLat decoder"),
    }
}

fn check_manifest(stem: &str, expected_class: &str) {
    let path = trellis::reference_dir()
        .join("manifests")
        .join(format!("{stem}.json"));
    let manifest = Manifest::load(&path).unwrap();
    let config = ModelConfig::from_json(stem, &manifest.config).unwrap();
    assert_eq!(config.class_name(), expected_class);
    let use_fp16 = manifest.config["args"]["use_fp16"]
        .as_bool()
        .unwrap_or(false);
    assert!(
        use_fp16,
        "{stem}: the official decoders are fp16 checkpoints"
    );
    let dev = Device::Cpu;

    // names and shapes
    let (vb, check) = manifest.var_builder(ManifestFill::Zeros, DType::F32, &dev);
    build(&config, vb, DType::F16);
    check.finish().unwrap();

    // dtypes
    let asked = Arc::new(Mutex::new(BTreeMap::new()));
    let backend = DtypeRecorder {
        names: manifest.entries.keys().cloned().collect(),
        asked: asked.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, dev.clone());
    build(&config, vb, DType::F16);
    let asked = asked.lock().unwrap();
    assert_eq!(asked.len(), manifest.entries.len(), "{stem}: entry count");
    let wrong: Vec<String> = manifest
        .entries
        .iter()
        .filter(|(name, spec)| asked.get(*name) != Some(&spec.dtype))
        .map(|(name, spec)| {
            format!(
                "{name}: manifest {:?}, network {:?}",
                spec.dtype,
                asked.get(name)
            )
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{stem}: dtype mismatches:\n{}",
        wrong.join("\n")
    );
    assert!(asked.values().any(|d| *d == DType::F16));
    assert!(asked.values().any(|d| *d == DType::F32));
}

#[test]
fn gaussian_decoder_manifest() {
    check_manifest("slat_dec_gs_swin8_B_64l8gs32_fp16", "SLatGaussianDecoder");
}

#[test]
fn radiance_field_decoder_manifest() {
    check_manifest(
        "slat_dec_rf_swin8_B_64l8r16_fp16",
        "SLatRadianceFieldDecoder",
    );
}

#[test]
fn mesh_decoder_manifest() {
    check_manifest("slat_dec_mesh_swin8_B_64l8m256c_fp16", "SLatMeshDecoder");
}
