//! Image → 3D; twin of `trellis/pipelines/trellis_image_to_3d.py` (`TrellisImageTo3DPipeline`):
//! `run` (one image) and `run_multi_image` (several views, "stochastic" or "multidiffusion").
//!
//! Conditioning: each image is preprocessed (alpha crop, 518², premultiplied), encoded by
//! DINOv2-with-registers and layer-normalised; the negative condition is zeros of one image's shape.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::Tensor;
use image::RgbaImage;

use super::base::{Generation, RunControl, RunParams, Stage, TrellisPipeline};
use super::noise::NoiseSource;
use super::samplers::Conditioning;
use crate::models::conditioners::dinov2::ImageConditioner;
use crate::models::conditioners::preprocess::{load_image, preprocess_decoded};

/// How several images condition one generation (`run_multi_image`'s `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MultiImageMode {
    /// Step i of each sampler conditions on image `i % n`.
    #[default]
    Stochastic,
    /// Every step averages the velocity predicted for each image.
    Multidiffusion,
}

pub struct ImageTo3D {
    pub pipeline: TrellisPipeline,
    pub conditioner: ImageConditioner,
}

impl ImageTo3D {
    /// `get_cond`: (cond `[n, L, C]`, neg_cond zeros `[1, L, C]`) of the image files.
    pub fn get_cond(&self, images: &[&Path]) -> Result<(Tensor, Tensor)> {
        let decoded = images
            .iter()
            .map(|p| load_image(p))
            .collect::<Result<Vec<_>>>()?;
        self.get_cond_images(&decoded)
    }

    /// `get_cond` of decoded RGBA images (with transparency: the alpha path of `preprocess_image`;
    /// images without it have been through `models::background` already).
    pub fn get_cond_images(&self, images: &[RgbaImage]) -> Result<(Tensor, Tensor)> {
        ensure!(!images.is_empty(), "no input image");
        let dev = &self.pipeline.device;
        let batch: Vec<Tensor> = images
            .iter()
            .enumerate()
            .map(|(i, img)| {
                preprocess_decoded(img, dev).with_context(|| format!("input image {}", i + 1))
            })
            .collect::<Result<_>>()?;
        let x = Tensor::cat(&batch, 0)?;
        let cond = self.conditioner.encode(&x)?;
        let neg = cond.narrow(0, 0, 1)?.zeros_like()?;
        Ok((cond, neg))
    }

    /// Runs the whole pipeline on already encoded conditions (one image → `run`, several →
    /// `run_multi_image` with `mode`).
    pub fn run_with_cond(
        &self,
        cond: &Tensor,
        neg: &Tensor,
        mode: MultiImageMode,
        noise: &mut dyn NoiseSource,
        params: &RunParams,
        ctl: &mut RunControl<'_>,
    ) -> Result<Generation> {
        let c = if cond.dim(0)? == 1 {
            Conditioning::Single { cond, neg }
        } else {
            match mode {
                MultiImageMode::Stochastic => Conditioning::Stochastic { conds: cond, neg },
                MultiImageMode::Multidiffusion => Conditioning::MultiDiffusion { conds: cond, neg },
            }
        };
        self.pipeline.generate(&c, 1, noise, params, ctl)
    }

    /// Image files → 3D.
    pub fn run(
        &self,
        images: &[&Path],
        mode: MultiImageMode,
        noise: &mut dyn NoiseSource,
        params: &RunParams,
        ctl: &mut RunControl<'_>,
    ) -> Result<(Tensor, Generation)> {
        let decoded = images
            .iter()
            .map(|p| load_image(p))
            .collect::<Result<Vec<_>>>()?;
        self.run_images(&decoded, mode, noise, params, ctl)
    }

    /// Decoded RGBA images → 3D.
    pub fn run_images(
        &self,
        images: &[RgbaImage],
        mode: MultiImageMode,
        noise: &mut dyn NoiseSource,
        params: &RunParams,
        ctl: &mut RunControl<'_>,
    ) -> Result<(Tensor, Generation)> {
        ctl.emit(Stage::Conditioning, 0, images.len(), None);
        let (cond, neg) = self.get_cond_images(images)?;
        ctl.emit(Stage::Conditioning, images.len(), images.len(), None);
        let g = self.run_with_cond(&cond, &neg, mode, noise, params, ctl)?;
        Ok((cond, g))
    }
}
