//! Typed configurations of every network class that appears in TRELLIS checkpoints
//! (`ckpts/<stem>.json` = `{"name": <class>, "args": {...}}`) and of the samplers in `pipeline.json`.
//!
//! Unknown classes and unknown arguments are errors that name the file and the key: a checkpoint we
//! do not understand must not be run with silently different settings.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Deserialize;

fn default_true() -> bool {
    true
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_ape() -> String {
    "ape".to_string()
}
fn default_swin() -> String {
    "swin".to_string()
}
fn default_window() -> usize {
    8
}
fn default_norm_type() -> String {
    "layer".to_string()
}

/// `SparseStructureEncoder` (trellis/models/sparse_structure_vae.py).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SparseStructureEncoderConfig {
    pub in_channels: usize,
    pub latent_channels: usize,
    pub num_res_blocks: usize,
    pub channels: Vec<usize>,
    #[serde(default = "num_res_blocks_middle_default")]
    pub num_res_blocks_middle: usize,
    #[serde(default = "default_norm_type")]
    pub norm_type: String,
    #[serde(default)]
    pub use_fp16: bool,
}

fn num_res_blocks_middle_default() -> usize {
    2
}

/// `SparseStructureDecoder` (trellis/models/sparse_structure_vae.py).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SparseStructureDecoderConfig {
    pub out_channels: usize,
    pub latent_channels: usize,
    pub num_res_blocks: usize,
    pub channels: Vec<usize>,
    #[serde(default = "num_res_blocks_middle_default")]
    pub num_res_blocks_middle: usize,
    #[serde(default = "default_norm_type")]
    pub norm_type: String,
    #[serde(default)]
    pub use_fp16: bool,
}

/// `SparseStructureFlowModel` (trellis/models/sparse_structure_flow.py).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SparseStructureFlowConfig {
    pub resolution: usize,
    pub in_channels: usize,
    pub model_channels: usize,
    pub cond_channels: usize,
    pub out_channels: usize,
    pub num_blocks: usize,
    #[serde(default)]
    pub num_heads: Option<usize>,
    #[serde(default = "num_head_channels_default")]
    pub num_head_channels: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "patch_size_default")]
    pub patch_size: usize,
    #[serde(default = "default_ape")]
    pub pe_mode: String,
    #[serde(default)]
    pub use_fp16: bool,
    #[serde(default)]
    pub use_checkpoint: bool,
    #[serde(default)]
    pub share_mod: bool,
    #[serde(default)]
    pub qk_rms_norm: bool,
    #[serde(default)]
    pub qk_rms_norm_cross: bool,
}

fn num_head_channels_default() -> usize {
    64
}
fn patch_size_default() -> usize {
    2
}

impl SparseStructureFlowConfig {
    pub fn heads(&self) -> usize {
        self.num_heads
            .unwrap_or(self.model_channels / self.num_head_channels)
    }
}

/// `SLatFlowModel` and `ElasticSLatFlowModel` (trellis/models/structured_latent_flow.py).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SLatFlowConfig {
    pub resolution: usize,
    pub in_channels: usize,
    pub model_channels: usize,
    pub cond_channels: usize,
    pub out_channels: usize,
    pub num_blocks: usize,
    #[serde(default)]
    pub num_heads: Option<usize>,
    #[serde(default = "num_head_channels_default")]
    pub num_head_channels: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "patch_size_default")]
    pub patch_size: usize,
    #[serde(default = "num_io_res_blocks_default")]
    pub num_io_res_blocks: usize,
    #[serde(default = "io_block_channels_default")]
    pub io_block_channels: Vec<usize>,
    #[serde(default = "default_ape")]
    pub pe_mode: String,
    #[serde(default)]
    pub use_fp16: bool,
    #[serde(default)]
    pub use_checkpoint: bool,
    #[serde(default)]
    pub use_skip_connection: Option<bool>,
    #[serde(default)]
    pub share_mod: bool,
    #[serde(default)]
    pub qk_rms_norm: bool,
    #[serde(default)]
    pub qk_rms_norm_cross: bool,
}

fn num_io_res_blocks_default() -> usize {
    2
}
fn io_block_channels_default() -> Vec<usize> {
    vec![]
}

impl SLatFlowConfig {
    pub fn heads(&self) -> usize {
        self.num_heads
            .unwrap_or(self.model_channels / self.num_head_channels)
    }
    /// `use_skip_connection` defaults to true in the original.
    pub fn skip_connection(&self) -> bool {
        self.use_skip_connection.unwrap_or(true)
    }
}

/// The swin transformer torso shared by `SLatEncoder` and the three SLat decoders
/// (trellis/models/structured_latent_vae/base.py `SparseTransformerBase`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SLatEncoderConfig {
    pub resolution: usize,
    pub in_channels: usize,
    pub model_channels: usize,
    pub latent_channels: usize,
    pub num_blocks: usize,
    #[serde(default)]
    pub num_heads: Option<usize>,
    #[serde(default = "num_head_channels_default")]
    pub num_head_channels: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "default_swin")]
    pub attn_mode: String,
    #[serde(default = "default_window")]
    pub window_size: usize,
    #[serde(default = "default_ape")]
    pub pe_mode: String,
    #[serde(default)]
    pub use_fp16: bool,
    #[serde(default)]
    pub use_checkpoint: bool,
    #[serde(default)]
    pub qk_rms_norm: bool,
}

/// `representation_config` of `SLatGaussianDecoder`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GaussianRepresentationConfig {
    pub lr: GaussianLr,
    #[serde(default = "default_true")]
    pub perturb_offset: bool,
    pub voxel_size: f64,
    pub num_gaussians: usize,
    #[serde(rename = "2d_filter_kernel_size")]
    pub filter_2d_kernel_size: f64,
    #[serde(rename = "3d_filter_kernel_size")]
    pub filter_3d_kernel_size: f64,
    pub scaling_bias: f64,
    pub opacity_bias: f64,
    pub scaling_activation: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GaussianLr {
    #[serde(rename = "_xyz")]
    pub xyz: f64,
    #[serde(rename = "_features_dc")]
    pub features_dc: f64,
    #[serde(rename = "_opacity")]
    pub opacity: f64,
    #[serde(rename = "_scaling")]
    pub scaling: f64,
    #[serde(rename = "_rotation")]
    pub rotation: f64,
}

/// `representation_config` of `SLatRadianceFieldDecoder`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StrivecRepresentationConfig {
    pub rank: usize,
    pub dim: usize,
}

/// `representation_config` of `SLatMeshDecoder`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MeshRepresentationConfig {
    #[serde(default)]
    pub use_color: bool,
}

/// The arguments every SLat decoder shares, plus its representation config.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SLatDecoderConfig<R> {
    pub resolution: usize,
    pub model_channels: usize,
    pub latent_channels: usize,
    pub num_blocks: usize,
    #[serde(default)]
    pub num_heads: Option<usize>,
    #[serde(default = "num_head_channels_default")]
    pub num_head_channels: usize,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "default_swin")]
    pub attn_mode: String,
    #[serde(default = "default_window")]
    pub window_size: usize,
    #[serde(default = "default_ape")]
    pub pe_mode: String,
    #[serde(default)]
    pub use_fp16: bool,
    #[serde(default)]
    pub use_checkpoint: bool,
    #[serde(default)]
    pub qk_rms_norm: bool,
    pub representation_config: R,
}

impl SLatEncoderConfig {
    pub fn heads(&self) -> usize {
        self.num_heads
            .unwrap_or(self.model_channels / self.num_head_channels)
    }
}

impl<R> SLatDecoderConfig<R> {
    pub fn heads(&self) -> usize {
        self.num_heads
            .unwrap_or(self.model_channels / self.num_head_channels)
    }
}

pub type SLatGaussianDecoderConfig = SLatDecoderConfig<GaussianRepresentationConfig>;
pub type SLatRadianceFieldDecoderConfig = SLatDecoderConfig<StrivecRepresentationConfig>;
pub type SLatMeshDecoderConfig = SLatDecoderConfig<MeshRepresentationConfig>;

/// A checkpoint config, dispatched on its class name.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    SparseStructureEncoder(SparseStructureEncoderConfig),
    SparseStructureDecoder(SparseStructureDecoderConfig),
    SparseStructureFlow(SparseStructureFlowConfig),
    /// `SLatFlowModel`; `elastic` is true for `ElasticSLatFlowModel` (same weights, memory-saving training wrapper).
    SLatFlow {
        config: SLatFlowConfig,
        elastic: bool,
    },
    SLatEncoder {
        config: SLatEncoderConfig,
        elastic: bool,
    },
    SLatGaussianDecoder {
        config: SLatGaussianDecoderConfig,
        elastic: bool,
    },
    SLatRadianceFieldDecoder {
        config: SLatRadianceFieldDecoderConfig,
        elastic: bool,
    },
    SLatMeshDecoder {
        config: SLatMeshDecoderConfig,
        elastic: bool,
    },
}

/// Every class name a checkpoint may carry.
pub const MODEL_CLASSES: &[&str] = &[
    "SparseStructureEncoder",
    "SparseStructureDecoder",
    "SparseStructureFlowModel",
    "SLatFlowModel",
    "ElasticSLatFlowModel",
    "SLatEncoder",
    "ElasticSLatEncoder",
    "SLatGaussianDecoder",
    "ElasticSLatGaussianDecoder",
    "SLatRadianceFieldDecoder",
    "ElasticSLatRadianceFieldDecoder",
    "SLatMeshDecoder",
    "ElasticSLatMeshDecoder",
];

fn parse_args<T: DeserializeOwned>(
    origin: &str,
    class: &str,
    args: &serde_json::Value,
) -> Result<T> {
    serde_json::from_value(args.clone()).map_err(|e| anyhow!("{origin}: arguments of {class}: {e}"))
}

impl ModelConfig {
    /// Parses `{"name": <class>, "args": {...}}`; `origin` names the file in errors.
    pub fn from_json(origin: &str, v: &serde_json::Value) -> Result<Self> {
        let class = v
            .get("name")
            .and_then(|n| n.as_str())
            .ok_or_else(|| anyhow!("{origin}: key \"name\" (the network class) is missing"))?;
        let empty = serde_json::Value::Object(Default::default());
        let args = v.get("args").unwrap_or(&empty);
        let (base, elastic) = match class.strip_prefix("Elastic") {
            Some(b) => (b, true),
            None => (class, false),
        };
        Ok(match (base, elastic) {
            ("SparseStructureEncoder", false) => {
                Self::SparseStructureEncoder(parse_args(origin, class, args)?)
            }
            ("SparseStructureDecoder", false) => {
                Self::SparseStructureDecoder(parse_args(origin, class, args)?)
            }
            ("SparseStructureFlowModel", false) => {
                Self::SparseStructureFlow(parse_args(origin, class, args)?)
            }
            ("SLatFlowModel", _) => Self::SLatFlow {
                config: parse_args(origin, class, args)?,
                elastic,
            },
            ("SLatEncoder", _) => Self::SLatEncoder {
                config: parse_args(origin, class, args)?,
                elastic,
            },
            ("SLatGaussianDecoder", _) => Self::SLatGaussianDecoder {
                config: parse_args(origin, class, args)?,
                elastic,
            },
            ("SLatRadianceFieldDecoder", _) => Self::SLatRadianceFieldDecoder {
                config: parse_args(origin, class, args)?,
                elastic,
            },
            ("SLatMeshDecoder", _) => Self::SLatMeshDecoder {
                config: parse_args(origin, class, args)?,
                elastic,
            },
            _ => bail!(
                "{origin}: key \"name\": unknown network class {class:?} (known: {})",
                MODEL_CLASSES.join(", ")
            ),
        })
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", path.display()))?;
        Self::from_json(&path.display().to_string(), &v)
    }

    pub fn class_name(&self) -> &'static str {
        match self {
            Self::SparseStructureEncoder(_) => "SparseStructureEncoder",
            Self::SparseStructureDecoder(_) => "SparseStructureDecoder",
            Self::SparseStructureFlow(_) => "SparseStructureFlowModel",
            Self::SLatFlow { .. } => "SLatFlowModel",
            Self::SLatEncoder { .. } => "SLatEncoder",
            Self::SLatGaussianDecoder { .. } => "SLatGaussianDecoder",
            Self::SLatRadianceFieldDecoder { .. } => "SLatRadianceFieldDecoder",
            Self::SLatMeshDecoder { .. } => "SLatMeshDecoder",
        }
    }
}

/// Sampler arguments (`args`) of pipeline.json.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SamplerArgs {
    #[serde(default = "sigma_min_default")]
    pub sigma_min: f64,
}

fn sigma_min_default() -> f64 {
    0.0
}

/// Sampler call parameters (`params`) of pipeline.json; every one optional, overridable per call.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SamplerParams {
    pub steps: Option<usize>,
    pub rescale_t: Option<f64>,
    pub cfg_strength: Option<f64>,
    pub cfg_interval: Option<(f64, f64)>,
}

impl SamplerParams {
    /// `self` with every key `over` sets replaced (the original's `{**defaults, **params}`).
    pub fn overridden_by(&self, over: &SamplerParams) -> SamplerParams {
        SamplerParams {
            steps: over.steps.or(self.steps),
            rescale_t: over.rescale_t.or(self.rescale_t),
            cfg_strength: over.cfg_strength.or(self.cfg_strength),
            cfg_interval: over.cfg_interval.or(self.cfg_interval),
        }
    }
}

/// Sampler classes of trellis/pipelines/samplers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    FlowEuler,
    FlowEulerCfg,
    FlowEulerGuidanceInterval,
}

/// A sampler entry of pipeline.json.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    pub kind: SamplerKind,
    pub args: SamplerArgs,
    pub params: SamplerParams,
}

impl SamplerConfig {
    pub fn from_json(origin: &str, key: &str, v: &serde_json::Value) -> Result<Self> {
        let name = v.get("name").and_then(|n| n.as_str()).ok_or_else(|| {
            anyhow!("{origin}: key \"{key}.name\" (the sampler class) is missing")
        })?;
        let kind = match name {
            "FlowEulerSampler" => SamplerKind::FlowEuler,
            "FlowEulerCfgSampler" => SamplerKind::FlowEulerCfg,
            "FlowEulerGuidanceIntervalSampler" => SamplerKind::FlowEulerGuidanceInterval,
            other => bail!(
                "{origin}: key \"{key}.name\": unknown sampler {other:?} (known: FlowEulerSampler, FlowEulerCfgSampler, FlowEulerGuidanceIntervalSampler)"
            ),
        };
        let empty = serde_json::Value::Object(Default::default());
        let args = serde_json::from_value(v.get("args").unwrap_or(&empty).clone())
            .map_err(|e| anyhow!("{origin}: key \"{key}.args\": {e}"))?;
        let params = serde_json::from_value(v.get("params").unwrap_or(&empty).clone())
            .map_err(|e| anyhow!("{origin}: key \"{key}.params\": {e}"))?;
        Ok(Self { kind, args, params })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_official_manifest_config() {
        let Some(reference) = crate::reference_dir_or_skip("the official manifest configs") else {
            return;
        };
        let dir = reference.join("manifests");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with('_') || name.starts_with("pipeline_") {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            ModelConfig::from_json(&name, &v["config"]).unwrap();
            n += 1;
        }
        assert!(n >= 13, "only {n} manifests parsed");
    }

    #[test]
    fn unknown_class_and_argument_name_file_and_key() {
        let v = serde_json::json!({"name": "Nope", "args": {}});
        let e = ModelConfig::from_json("x.json", &v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.json") && e.contains("Nope"), "{e}");
        let v = serde_json::json!({"name": "SparseStructureDecoder", "args": {
            "out_channels": 1, "latent_channels": 8, "num_res_blocks": 2, "channels": [4], "bogus": 3}});
        let e = ModelConfig::from_json("y.json", &v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("y.json") && e.contains("bogus"), "{e}");
        let v = serde_json::json!({"name": "Weird", "args": {}});
        let e = SamplerConfig::from_json("p.json", "slat_sampler", &v)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("p.json") && e.contains("slat_sampler") && e.contains("Weird"),
            "{e}"
        );
    }

    #[test]
    fn params_override_key_by_key() {
        let base = SamplerParams {
            steps: Some(25),
            rescale_t: Some(3.0),
            cfg_strength: Some(5.0),
            cfg_interval: Some((0.5, 1.0)),
        };
        let over = SamplerParams {
            steps: Some(10),
            ..Default::default()
        };
        let p = base.overridden_by(&over);
        assert_eq!(p.steps, Some(10));
        assert_eq!(p.cfg_strength, Some(5.0));
    }
}
