//! The sparse networks built from the manifests of the full-size official checkpoints expect
//! exactly the checkpoint's tensor names and shapes, and ask for float16 exactly where the
//! checkpoint stores float16 (the `use_fp16` torso placement) when built with an F16 torso.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use trellis::models::config::ModelConfig;
use trellis::models::slat_flow::SLatFlowModel;
use trellis::models::slat_vae::encoder::SLatEncoder;
use trellis::runtime::weights::{Manifest, ManifestFill};

/// Records the dtype every tensor is requested in; hands back broadcast zeros.
struct DtypeRecorder {
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
    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

fn manifest(stem: &str) -> Manifest {
    let p = trellis::reference_dir()
        .join("manifests")
        .join(format!("{stem}.json"));
    Manifest::load(&p).unwrap()
}

/// Builds the network twice: against the manifest (names + shapes must match exactly) and against
/// a recorder (each entry's requested dtype must equal the manifest's).
fn check(stem: &str, build: &dyn Fn(&ModelConfig, VarBuilder<'static>)) {
    let m = manifest(stem);
    let cfg = ModelConfig::from_json(stem, &m.config).unwrap();
    let dev = Device::Cpu;
    let (vb, chk) = m.var_builder(ManifestFill::Zeros, DType::F32, &dev);
    build(&cfg, vb);
    chk.finish().unwrap_or_else(|e| panic!("{stem}: {e}"));

    let asked = Arc::new(Mutex::new(BTreeMap::new()));
    let rec = DtypeRecorder {
        asked: asked.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(rec), DType::F32, dev.clone());
    build(&cfg, vb);
    let asked = asked.lock().unwrap();
    assert_eq!(asked.len(), m.entries.len(), "{stem}: entry count");
    let mut f16 = 0;
    for (name, spec) in &m.entries {
        let got = asked
            .get(name)
            .unwrap_or_else(|| panic!("{stem}: {name} never requested"));
        assert_eq!(*got, spec.dtype, "{stem}: {name} requested as {got:?}");
        f16 += (spec.dtype == DType::F16) as usize;
    }
    assert!(
        f16 > 0,
        "{stem}: a use_fp16 checkpoint with no float16 entry"
    );
}

fn flow(stem: &str) {
    check(stem, &|cfg, vb| {
        let ModelConfig::SLatFlow { config, .. } = cfg else {
            panic!("{stem} is not an SLatFlowModel: {cfg:?}")
        };
        assert!(config.use_fp16);
        SLatFlowModel::new(config, vb, DType::F16).unwrap();
    });
}

#[test]
fn slat_flow_img_l() {
    flow("slat_flow_img_dit_L_64l8p2_fp16");
}

#[test]
fn slat_flow_txt_b() {
    flow("slat_flow_txt_dit_B_64l8p2_fp16");
}

#[test]
fn slat_flow_txt_l() {
    flow("slat_flow_txt_dit_L_64l8p2_fp16");
}

#[test]
fn slat_flow_txt_xl() {
    flow("slat_flow_txt_dit_XL_64l8p2_fp16");
}

#[test]
fn slat_encoder_swin_b() {
    check("slat_enc_swin8_B_64l8_fp16", &|cfg, vb| {
        let ModelConfig::SLatEncoder { config, .. } = cfg else {
            panic!("not an SLatEncoder: {cfg:?}")
        };
        SLatEncoder::new(config, vb, DType::F16).unwrap();
    });
}
