//! The background-removal flags of the commands that take input images (`generate`, `variant`).

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;

use super::progress::Reporter;
use crate::hub::HubOptions;
use crate::models::background::{BackgroundOptions, PreparedImages, DEFAULT_MODEL};
use crate::pipelines::base::Stage;

/// How input images without transparency are handled.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct BackgroundArgs {
    /// Do not remove backgrounds: an input image without transparency is an error.
    #[arg(long)]
    pub no_background_removal: bool,
    /// U²-Net weights for background removal: a hub id (default leonelhs/u2net, file u2net.pth)
    /// or a local folder holding u2net.pth or model.safetensors (and optionally config.json).
    #[arg(long, value_name = "ID|DIR", conflicts_with = "no_background_removal")]
    pub background_model: Option<String>,
    /// Write the matte of the background-removed image as a PNG (several images: FILE_<i>.png).
    #[arg(
        long,
        value_name = "FILE.png",
        conflicts_with = "no_background_removal"
    )]
    pub save_mask: Option<PathBuf>,
}

impl BackgroundArgs {
    pub fn options(&self) -> BackgroundOptions {
        BackgroundOptions {
            enabled: !self.no_background_removal,
            model: self.background_model.clone(),
            save_mask: self.save_mask.clone(),
        }
    }

    /// Decodes the input images, removing the background of those without transparency.
    pub fn prepare(
        &self,
        images: &[PathBuf],
        device: &Device,
        rep: &mut Reporter,
    ) -> Result<PreparedImages> {
        let opts = self.options();
        let model = opts
            .model
            .clone()
            .unwrap_or_else(|| DEFAULT_MODEL.to_string());
        opts.prepare(images, &HubOptions::from_env(), device, |done, total| {
            rep.emit(Stage::RemovingBackground, done, total, Some(model.clone()))
        })
    }
}
