//! Text → 3D; twin of `trellis/pipelines/trellis_text_to_3d.py` (`TrellisTextTo3DPipeline.run`).
//!
//! Conditioning: CLIP text features of the prompt (77 tokens); the negative condition is the
//! CLIP features of the empty prompt `""`.

use anyhow::Result;
use candle_core::Tensor;

use super::base::{Generation, RunControl, RunParams, Stage, TrellisPipeline};
use super::noise::NoiseSource;
use super::samplers::Conditioning;
use crate::models::conditioners::clip::TextConditioner;

pub struct TextTo3D {
    pub pipeline: TrellisPipeline,
    pub conditioner: TextConditioner,
}

/// `get_cond`: (CLIP(prompt) `[1, 77, C]`, CLIP("") `[1, 77, C]`).
pub fn text_cond(conditioner: &TextConditioner, prompt: &str) -> Result<(Tensor, Tensor)> {
    let cond = conditioner.encode(&[prompt])?;
    let neg = conditioner.encode(&[""])?;
    Ok((cond, neg))
}

impl TextTo3D {
    pub fn run(
        &self,
        prompt: &str,
        noise: &mut dyn NoiseSource,
        params: &RunParams,
        ctl: &mut RunControl<'_>,
    ) -> Result<(Tensor, Generation)> {
        ctl.emit(Stage::Conditioning, 0, 1, None);
        let (cond, neg) = text_cond(&self.conditioner, prompt)?;
        ctl.emit(Stage::Conditioning, 1, 1, None);
        let g = self.pipeline.generate(
            &Conditioning::Single {
                cond: &cond,
                neg: &neg,
            },
            1,
            noise,
            params,
            ctl,
        )?;
        Ok((cond, g))
    }
}
