//! `pipeline.json`, typed. Mirrors what `trellis/pipelines/base.py` (`Pipeline.from_pretrained`) and
//! the `from_pretrained` of `TrellisImageTo3DPipeline` / `TrellisTextTo3DPipeline` read from it.
//!
//! Unknown classes and unknown keys are errors naming the file and the key. Top-level keys that
//! start with `_` (annotations such as the `_provenance` of our manifests) are ignored.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::models::config::SamplerConfig;

/// The pipeline class named by `pipeline.json`'s `"name"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineClass {
    /// `TrellisImageTo3DPipeline` (conditioned on DINOv2 image features).
    ImageTo3D,
    /// `TrellisTextTo3DPipeline` (conditioned on CLIP text features).
    TextTo3D,
}

impl PipelineClass {
    /// The TRELLIS class name.
    pub fn name(self) -> &'static str {
        match self {
            PipelineClass::ImageTo3D => "TrellisImageTo3DPipeline",
            PipelineClass::TextTo3D => "TrellisTextTo3DPipeline",
        }
    }
}

/// Per-channel de-normalisation of the structured latent (`slat * std + mean`).
#[derive(Debug, Clone, PartialEq)]
pub struct SlatNormalization {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// The contents of a `pipeline.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineConfig {
    pub class: PipelineClass,
    /// Model name (`sparse_structure_flow_model`, `slat_decoder_gs`, ...) → entry (`ckpts/<stem>`,
    /// `../Other/ckpts/<stem>` or `<owner>/<repo>/ckpts/<stem>`), without file extension.
    pub models: BTreeMap<String, String>,
    pub sparse_structure_sampler: SamplerConfig,
    pub slat_sampler: SamplerConfig,
    pub slat_normalization: SlatNormalization,
    /// Image pipelines: the DINOv2 variant (`dinov2_vitl14_reg`).
    pub image_cond_model: Option<String>,
    /// Text pipelines: the CLIP model id (`openai/clip-vit-large-patch14`).
    pub text_cond_model: Option<String>,
}

/// Models every pipeline needs to sample a structured latent.
pub const REQUIRED_MODELS: [&str; 3] = [
    "sparse_structure_flow_model",
    "sparse_structure_decoder",
    "slat_flow_model",
];

impl PipelineConfig {
    /// Reads and checks `path` (a `pipeline.json`).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses the text of a `pipeline.json`; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let root: Value =
            serde_json::from_str(text).map_err(|e| anyhow!("{origin}: not valid JSON: {e}"))?;
        let top = root
            .as_object()
            .ok_or_else(|| anyhow!("{origin}: expected a JSON object at the top level"))?;
        for key in top.keys() {
            if key != "name" && key != "args" && !key.starts_with('_') {
                bail!("{origin}: unknown key \"{key}\" (expected \"name\" and \"args\")");
            }
        }
        let class = match top.get("name").and_then(Value::as_str) {
            Some("TrellisImageTo3DPipeline") => PipelineClass::ImageTo3D,
            Some("TrellisTextTo3DPipeline") => PipelineClass::TextTo3D,
            Some(other) => bail!(
                "{origin}: key \"name\": unknown pipeline class {other:?} (known: TrellisImageTo3DPipeline, TrellisTextTo3DPipeline)"
            ),
            None => bail!("{origin}: key \"name\" (the pipeline class) is missing or not a string"),
        };
        let args = top
            .get("args")
            .and_then(Value::as_object)
            .ok_or_else(|| anyhow!("{origin}: key \"args\" is missing or not an object"))?;
        let cond_key = match class {
            PipelineClass::ImageTo3D => "image_cond_model",
            PipelineClass::TextTo3D => "text_cond_model",
        };
        for key in args.keys() {
            let known = matches!(
                key.as_str(),
                "models" | "sparse_structure_sampler" | "slat_sampler" | "slat_normalization"
            ) || key == cond_key;
            if !known {
                bail!(
                    "{origin}: unknown key \"args.{key}\" for {} (expected models, sparse_structure_sampler, slat_sampler, slat_normalization, {cond_key})",
                    class.name()
                );
            }
        }
        let get = |key: &str| {
            args.get(key)
                .ok_or_else(|| anyhow!("{origin}: key \"args.{key}\" is missing"))
        };

        let models_v = get("models")?
            .as_object()
            .ok_or_else(|| anyhow!("{origin}: key \"args.models\" must be an object"))?;
        let mut models = BTreeMap::new();
        for (name, entry) in models_v {
            let entry = entry
                .as_str()
                .filter(|s| !s.trim().is_empty())
                .ok_or_else(|| {
                    anyhow!("{origin}: key \"args.models.{name}\" must be a non-empty string")
                })?;
            models.insert(name.clone(), entry.to_string());
        }
        for name in REQUIRED_MODELS {
            if !models.contains_key(name) {
                bail!("{origin}: key \"args.models.{name}\" is missing");
            }
        }
        if !models.keys().any(|k| k.starts_with("slat_decoder_")) {
            bail!("{origin}: \"args.models\" names no slat_decoder_* (gs, rf or mesh)");
        }

        let sparse_structure_sampler = SamplerConfig::from_json(
            origin,
            "args.sparse_structure_sampler",
            get("sparse_structure_sampler")?,
        )?;
        let slat_sampler =
            SamplerConfig::from_json(origin, "args.slat_sampler", get("slat_sampler")?)?;
        let slat_normalization = parse_normalization(origin, get("slat_normalization")?)?;

        let cond = get(cond_key)?
            .as_str()
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| anyhow!("{origin}: key \"args.{cond_key}\" must be a non-empty string"))?
            .to_string();
        let (image_cond_model, text_cond_model) = match class {
            PipelineClass::ImageTo3D => (Some(cond), None),
            PipelineClass::TextTo3D => (None, Some(cond)),
        };
        Ok(Self {
            class,
            models,
            sparse_structure_sampler,
            slat_sampler,
            slat_normalization,
            image_cond_model,
            text_cond_model,
        })
    }
}

fn parse_normalization(origin: &str, v: &Value) -> Result<SlatNormalization> {
    let obj = v
        .as_object()
        .ok_or_else(|| anyhow!("{origin}: key \"args.slat_normalization\" must be an object"))?;
    for key in obj.keys() {
        if key != "mean" && key != "std" {
            bail!("{origin}: unknown key \"args.slat_normalization.{key}\" (expected mean, std)");
        }
    }
    let list = |key: &str| -> Result<Vec<f32>> {
        let arr = obj.get(key).and_then(Value::as_array).ok_or_else(|| {
            anyhow!("{origin}: key \"args.slat_normalization.{key}\" must be a list of numbers")
        })?;
        arr.iter()
            .map(|x| {
                x.as_f64().map(|f| f as f32).ok_or_else(|| {
                    anyhow!(
                        "{origin}: key \"args.slat_normalization.{key}\" holds a non-number {x}"
                    )
                })
            })
            .collect()
    };
    let mean = list("mean")?;
    let std = list("std")?;
    if mean.is_empty() || mean.len() != std.len() {
        bail!(
            "{origin}: \"args.slat_normalization\": mean has {} values and std {}; expected the same non-zero count",
            mean.len(),
            std.len()
        );
    }
    if let Some(s) = std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
        bail!("{origin}: \"args.slat_normalization.std\" holds {s}; every std must be positive");
    }
    Ok(SlatNormalization { mean, std })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::config::SamplerKind;

    /// A file of the tiny repositories (generated from seeded random weights).
    fn tiny(name: &str) -> std::path::PathBuf {
        crate::test_tiny_repos().root.join(name)
    }

    #[test]
    fn parses_tiny_and_official_pipelines() {
        let img = PipelineConfig::load(&tiny("TRELLIS-image-tiny/pipeline.json")).unwrap();
        assert_eq!(img.class, PipelineClass::ImageTo3D);
        assert_eq!(img.image_cond_model.as_deref(), Some("dinov2_vitl14_reg"));
        assert_eq!(img.models.len(), 6);
        assert_eq!(
            img.sparse_structure_sampler.kind,
            SamplerKind::FlowEulerGuidanceInterval
        );
        assert_eq!(img.slat_sampler.params.cfg_strength, Some(3.0));
        assert_eq!(img.slat_normalization.mean.len(), 8);

        let txt = PipelineConfig::load(&tiny("TRELLIS-text-tiny/pipeline.json")).unwrap();
        assert_eq!(txt.class, PipelineClass::TextTo3D);
        assert_eq!(
            txt.text_cond_model.as_deref(),
            Some("openai/clip-vit-large-patch14")
        );
        assert!(txt.models["slat_decoder_gs"].starts_with("../TRELLIS-image-tiny/"));

        let Some(reference) = crate::reference_dir_or_skip("the official pipeline.json files")
        else {
            return;
        };
        for m in ["image-large", "text-base", "text-large", "text-xlarge"] {
            let p = reference.join(format!("manifests/pipeline_TRELLIS-{m}.json"));
            let c = PipelineConfig::load(&p).unwrap();
            assert_eq!(c.sparse_structure_sampler.params.steps, Some(25), "{m}");
        }
    }

    fn tiny_text() -> Value {
        let p = tiny("TRELLIS-image-tiny/pipeline.json");
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    fn err_of(v: &Value) -> String {
        format!(
            "{:#}",
            PipelineConfig::parse(&v.to_string(), "x/pipeline.json").unwrap_err()
        )
    }

    #[test]
    fn unknown_keys_and_classes_are_named() {
        let mut v = tiny_text();
        v["args"]["guidance"] = Value::from(1);
        let e = err_of(&v);
        assert!(
            e.contains("x/pipeline.json") && e.contains("args.guidance"),
            "{e}"
        );

        let mut v = tiny_text();
        v["name"] = Value::from("TrellisVideoPipeline");
        let e = err_of(&v);
        assert!(
            e.contains("TrellisVideoPipeline") && e.contains("\"name\""),
            "{e}"
        );

        let mut v = tiny_text();
        v["extra"] = Value::from(1);
        assert!(err_of(&v).contains("\"extra\""));

        let mut v = tiny_text();
        v["args"]["slat_sampler"]["name"] = Value::from("DDIM");
        assert!(err_of(&v).contains("args.slat_sampler.name"));

        // A text conditioner on an image pipeline is not silently ignored.
        let mut v = tiny_text();
        v["args"]["text_cond_model"] = Value::from("openai/clip-vit-large-patch14");
        assert!(err_of(&v).contains("args.text_cond_model"));
    }

    #[test]
    fn missing_and_malformed_values() {
        let mut v = tiny_text();
        v["args"]["models"]
            .as_object_mut()
            .unwrap()
            .remove("slat_flow_model");
        assert!(err_of(&v).contains("args.models.slat_flow_model"));

        let mut v = tiny_text();
        v["args"]["slat_normalization"]["std"] = Value::from(vec![1.0; 3]);
        assert!(err_of(&v).contains("slat_normalization"));

        let mut v = tiny_text();
        v["args"]
            .as_object_mut()
            .unwrap()
            .remove("image_cond_model");
        assert!(err_of(&v).contains("args.image_cond_model"));

        assert!(PipelineConfig::parse("{", "p").is_err());
        assert!(PipelineConfig::parse("[1]", "p").is_err());
    }
}
