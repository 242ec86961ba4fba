//! The background-removal flags of the commands that take input images (`generate`, `variant`,
//! `edit`). The removal itself runs in the job ([`crate::jobs`]), the same path the daemon takes.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};

use crate::jobs::{BackgroundRemoval, JobOutput};
use crate::models::background::{has_useful_alpha, mask_path};
use crate::models::conditioners::preprocess::load_image;

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
    /// The job's background-removal settings.
    pub fn removal(&self) -> BackgroundRemoval {
        BackgroundRemoval {
            enabled: !self.no_background_removal,
            model: self.background_model.clone(),
            keep_masks: self.save_mask.is_some(),
        }
    }

    /// `--save-mask` checks, before any work: a `.png` that can be written, and some input image
    /// without transparency (whose matte it would be).
    pub fn check(&self, images: &[PathBuf]) -> Result<()> {
        let Some(m) = &self.save_mask else {
            return Ok(());
        };
        let ok = m
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("png"));
        ensure!(
            ok,
            "--save-mask {}: the file name must end in .png",
            m.display()
        );
        crate::export::atomic::check_output_path(m)
            .with_context(|| format!("--save-mask {}", m.display()))?;
        let mut any = false;
        for p in images {
            ensure!(p.is_file(), "image {} does not exist", p.display());
            any |= !has_useful_alpha(&load_image(p)?);
        }
        ensure!(
            any,
            "--save-mask {}: no input image needs background removal (each has transparency)",
            m.display()
        );
        Ok(())
    }

    /// Writes the job's mattes to `--save-mask` (atomically); adds `mask` (`mask<i>` for input
    /// `i` when several were matted) to `written`.
    pub fn write_masks(&self, out: &JobOutput, written: &mut serde_json::Value) -> Result<()> {
        let Some(base) = &self.save_mask else {
            return Ok(());
        };
        let removed: Vec<usize> = out.meta()["background_removed"]["images"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| i.as_u64().map(|i| i as usize))
                    .collect()
            })
            .unwrap_or_default();
        let masks = out.masks();
        for (k, m) in masks.iter().enumerate() {
            let i = removed.get(k).copied().unwrap_or(k);
            let p = mask_path(base, i, masks.len());
            crate::models::background::write_mask(&p, m)?;
            let key = if masks.len() == 1 {
                "mask".to_string()
            } else {
                format!("mask{i}")
            };
            written[key] = serde_json::json!(p);
        }
        Ok(())
    }
}
