//! The TRELLIS networks, one file per network (twins of `trellis/models/*`).

pub mod background;
pub mod conditioners;
pub mod config;
pub mod slat_flow;
pub mod slat_vae;
pub mod ss_flow;
pub mod ss_vae;

use anyhow::Result;
use candle_core::DType;
use candle_nn::VarBuilder;

use config::ModelConfig;

/// Any TRELLIS network, built from its checkpoint config.
pub enum Network {
    SparseStructureEncoder(ss_vae::SparseStructureEncoder),
    SparseStructureDecoder(ss_vae::SparseStructureDecoder),
    SparseStructureFlow(ss_flow::SparseStructureFlowModel),
    SLatFlow(slat_flow::SLatFlowModel),
    SLatEncoder(slat_vae::encoder::SLatEncoder),
    SLatGaussianDecoder(slat_vae::decoder_gs::SLatGaussianDecoder),
    SLatRadianceFieldDecoder(slat_vae::decoder_rf::SLatRadianceFieldDecoder),
    SLatMeshDecoder(slat_vae::decoder_mesh::SLatMeshDecoder),
}

impl Network {
    /// Builds the network `config` describes; `torso` is the dtype of its float16-able blocks.
    pub fn build(config: &ModelConfig, vb: VarBuilder, torso: DType) -> Result<Self> {
        Ok(match config {
            ModelConfig::SparseStructureEncoder(c) => {
                Self::SparseStructureEncoder(ss_vae::SparseStructureEncoder::new(c, vb, torso)?)
            }
            ModelConfig::SparseStructureDecoder(c) => {
                Self::SparseStructureDecoder(ss_vae::SparseStructureDecoder::new(c, vb, torso)?)
            }
            ModelConfig::SparseStructureFlow(c) => {
                Self::SparseStructureFlow(ss_flow::SparseStructureFlowModel::new(c, vb, torso)?)
            }
            ModelConfig::SLatFlow { config, .. } => {
                Self::SLatFlow(slat_flow::SLatFlowModel::new(config, vb, torso)?)
            }
            ModelConfig::SLatEncoder { config, .. } => {
                Self::SLatEncoder(slat_vae::encoder::SLatEncoder::new(config, vb, torso)?)
            }
            ModelConfig::SLatGaussianDecoder { config, .. } => Self::SLatGaussianDecoder(
                slat_vae::decoder_gs::SLatGaussianDecoder::new(config, vb, torso)?,
            ),
            ModelConfig::SLatRadianceFieldDecoder { config, .. } => Self::SLatRadianceFieldDecoder(
                slat_vae::decoder_rf::SLatRadianceFieldDecoder::new(config, vb, torso)?,
            ),
            ModelConfig::SLatMeshDecoder { config, .. } => Self::SLatMeshDecoder(
                slat_vae::decoder_mesh::SLatMeshDecoder::new(config, vb, torso)?,
            ),
        })
    }
}
