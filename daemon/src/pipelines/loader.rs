//! Building the networks of a pipeline repository (twin of `Pipeline.from_pretrained` in
//! `trellis/pipelines/base.py`, which calls `models.from_pretrained` per entry): config class
//! checked, every weight checked (missing / wrong shape / unexpected reported at once).
//!
//! Precision: checkpoints saved with `use_fp16` run their torso in float16 on CUDA (as the
//! original does); on the CPU everything runs in float32.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

use crate::hub::{ModelFiles, PipelineRepo};
use crate::models::config::ModelConfig;
use crate::models::ss_flow::SparseStructureFlowModel;
use crate::models::ss_vae::SparseStructureDecoder;
use crate::runtime::weights;

/// The torso dtype for a checkpoint saved with `use_fp16` on `device`.
pub fn torso_dtype(use_fp16: bool, device: &Device) -> DType {
    if use_fp16 && device.is_cuda() {
        DType::F16
    } else {
        DType::F32
    }
}

fn config_of(files: &ModelFiles) -> Result<ModelConfig> {
    ModelConfig::from_file(&files.config)
}

/// `sparse_structure_flow_model`.
pub fn load_ss_flow(repo: &PipelineRepo, device: &Device) -> Result<SparseStructureFlowModel> {
    let files = repo.model("sparse_structure_flow_model")?;
    let ModelConfig::SparseStructureFlow(cfg) = config_of(files)? else {
        bail!(
            "{}: sparse_structure_flow_model must be a SparseStructureFlowModel",
            files.config.display()
        );
    };
    let (vb, check) = weights::from_safetensors(&files.weights, DType::F32, device)?;
    let m = SparseStructureFlowModel::new(&cfg, vb, torso_dtype(cfg.use_fp16, device))?;
    check
        .finish()
        .with_context(|| format!("weights {}", files.weights.display()))?;
    Ok(m)
}

/// `sparse_structure_decoder`.
pub fn load_ss_decoder(repo: &PipelineRepo, device: &Device) -> Result<SparseStructureDecoder> {
    let files = repo.model("sparse_structure_decoder")?;
    let ModelConfig::SparseStructureDecoder(cfg) = config_of(files)? else {
        bail!(
            "{}: sparse_structure_decoder must be a SparseStructureDecoder",
            files.config.display()
        );
    };
    let (vb, check) = weights::from_safetensors(&files.weights, DType::F32, device)?;
    let m = SparseStructureDecoder::new(&cfg, vb, torso_dtype(cfg.use_fp16, device))?;
    check
        .finish()
        .with_context(|| format!("weights {}", files.weights.display()))?;
    Ok(m)
}
