//! What a job is asked to do, and the checks that can be made before any network is loaded
//! (input files exist and decode, step counts, the prompt fits the kind of job). Both front ends
//! build these: the command line from its flags, the daemon from a request.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use image::RgbaImage;

use crate::models::background::has_useful_alpha;
use crate::models::conditioners::preprocess::{
    load_image, normalize, preprocess_rgba, TRELLIS_IMAGE_SIZE,
};
use crate::models::config::SamplerParams;
use crate::pipelines::edit::{Region, Resampling};
use crate::pipelines::image_to_3d::MultiImageMode;
use crate::pipelines::loader::Formats;
use crate::pipelines::mesh_input::load_mesh;
use crate::pipelines::voxelize::TriMesh;

/// An input image: a file, or pixels already in memory (an upload).
#[derive(Debug, Clone)]
pub enum ImageSource {
    Path(PathBuf),
    Rgba(Arc<RgbaImage>),
    /// A file already decoded (and its background removed where it had none).
    Decoded {
        path: PathBuf,
        image: Arc<RgbaImage>,
    },
}

impl ImageSource {
    pub fn load(&self) -> Result<RgbaImage> {
        match self {
            ImageSource::Path(p) => {
                ensure!(p.is_file(), "image {} does not exist", p.display());
                load_image(p)
            }
            ImageSource::Rgba(img) | ImageSource::Decoded { image: img, .. } => {
                Ok(img.as_ref().clone())
            }
        }
    }

    /// How the asset metadata records it.
    pub fn describe(&self) -> serde_json::Value {
        match self {
            ImageSource::Path(p) | ImageSource::Decoded { path: p, .. } => serde_json::json!(p),
            ImageSource::Rgba(img) => {
                serde_json::json!(format!("uploaded {}x{}", img.width(), img.height()))
            }
        }
    }

    pub fn name(&self) -> String {
        match self {
            ImageSource::Path(p) | ImageSource::Decoded { path: p, .. } => {
                format!("image {}", p.display())
            }
            ImageSource::Rgba(img) => format!("uploaded image {}x{}", img.width(), img.height()),
        }
    }

    /// Checks the image decodes and either can be preprocessed (an alpha channel with an
    /// object) or, without useful alpha, will have its background removed (`removal`). Returns
    /// whether it needs background removal.
    pub fn check(&self, removal: bool) -> Result<bool> {
        let img = self.load()?;
        if !has_useful_alpha(&img) {
            ensure!(
                removal,
                "{}: the image has no transparency and background removal is off \
                 (--no-background-removal, or no_background_removal in the request); give an \
                 RGBA image with a transparent background, or allow background removal",
                self.name()
            );
            return Ok(true);
        }
        preprocess_rgba(&img, TRELLIS_IMAGE_SIZE).with_context(|| self.name())?;
        Ok(false)
    }

    /// The normalised `[1, 3, 518, 518]` tensor the image conditioner takes.
    pub fn tensor(&self, device: &Device) -> Result<Tensor> {
        let img = self.load()?;
        let rgb = preprocess_rgba(&img, TRELLIS_IMAGE_SIZE).with_context(|| self.name())?;
        normalize(&[&rgb], device)
    }
}

/// What conditions a job.
#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    Images(Vec<ImageSource>),
}

impl Prompt {
    pub fn is_text(&self) -> bool {
        matches!(self, Prompt::Text(_))
    }
}

/// The base mesh of a variant.
#[derive(Debug, Clone)]
pub enum MeshSource {
    Path(PathBuf),
    Mesh(Arc<TriMesh>),
}

impl MeshSource {
    pub fn load(&self) -> Result<Arc<TriMesh>> {
        match self {
            MeshSource::Path(p) => {
                ensure!(p.is_file(), "mesh {} does not exist", p.display());
                Ok(Arc::new(load_mesh(p)?))
            }
            MeshSource::Mesh(m) => Ok(m.clone()),
        }
    }

    pub fn describe(&self) -> serde_json::Value {
        match self {
            MeshSource::Path(p) => serde_json::json!(p),
            MeshSource::Mesh(m) => serde_json::json!(format!(
                "uploaded mesh of {} vertices, {} triangles",
                m.vertices.len(),
                m.faces.len()
            )),
        }
    }
}

/// Seed and sampler overrides (pipeline.json's value where unset).
#[derive(Debug, Clone, Default)]
pub struct Sampling {
    pub seed: u64,
    pub ss: SamplerParams,
    pub slat: SamplerParams,
}

impl Sampling {
    fn check(&self) -> Result<()> {
        for (p, what) in [
            (&self.ss, "sparse-structure"),
            (&self.slat, "structured-latent"),
        ] {
            if let Some(s) = p.steps {
                ensure!(
                    s >= 1,
                    "the number of {what} sampling steps must be at least 1"
                );
            }
            if let Some(c) = p.cfg_strength {
                ensure!(c.is_finite(), "the {what} guidance strength must be finite");
            }
        }
        Ok(())
    }
}

/// Conditioner overrides (hub id or folder); pipeline.json's names otherwise.
#[derive(Debug, Clone, Default)]
pub struct ConditionerOverrides {
    pub image: Option<String>,
    pub text: Option<String>,
}

/// How input images without useful alpha are handled: matted with U²-Net
/// ([`crate::models::background`]) in the job, or refused.
#[derive(Debug, Clone)]
pub struct BackgroundRemoval {
    /// `false`: an image without transparency is an error (checked before the job runs).
    pub enabled: bool,
    /// Hub id or local folder of the U²-Net weights (default
    /// [`crate::models::background::DEFAULT_MODEL`]).
    pub model: Option<String>,
    /// Keep the mattes in the job's output ([`super::JobOutput::masks`]).
    pub keep_masks: bool,
}

impl Default for BackgroundRemoval {
    fn default() -> Self {
        Self {
            enabled: true,
            model: None,
            keep_masks: false,
        }
    }
}

/// Image(s) or text → 3D.
#[derive(Debug, Clone)]
pub struct GenerateJob {
    /// Hub id or folder; default: the official model of the prompt's kind.
    pub model: Option<String>,
    pub prompt: Prompt,
    pub multi_image_mode: MultiImageMode,
    pub sampling: Sampling,
    pub formats: Formats,
    pub conditioners: ConditionerOverrides,
    pub background: BackgroundRemoval,
}

/// A new appearance for an existing mesh.
#[derive(Debug, Clone)]
pub struct VariantJob {
    pub model: Option<String>,
    pub mesh: MeshSource,
    /// Text, or exactly one image.
    pub prompt: Prompt,
    pub voxel_resolution: Option<usize>,
    pub sampling: Sampling,
    pub formats: Formats,
    pub conditioners: ConditionerOverrides,
    pub background: BackgroundRemoval,
}

/// What an edit starts from.
#[derive(Debug, Clone)]
pub enum EditInput {
    /// A `.trellis` bundle; `id` names it in the daemon's asset store.
    Asset { path: PathBuf, id: Option<String> },
    /// A mesh, voxelised on the structure grid (its structure latent encoded).
    Mesh(MeshSource),
}

impl EditInput {
    pub fn describe(&self) -> serde_json::Value {
        match self {
            EditInput::Asset { path, id: None } => serde_json::json!({ "asset": path }),
            EditInput::Asset { path, id: Some(id) } => {
                serde_json::json!({ "asset": path, "asset_id": id })
            }
            EditInput::Mesh(m) => serde_json::json!({ "mesh": m.describe() }),
        }
    }
}

/// Regenerate a region of an asset (or of a mesh) under a prompt, the rest kept (`docs/EDIT.md`).
#[derive(Debug, Clone)]
pub struct EditJob {
    /// Default: the model recorded in the asset, else the official model of the prompt's kind.
    pub model: Option<String>,
    pub source: EditInput,
    pub region: Region,
    /// Text, or exactly one image.
    pub prompt: Prompt,
    pub sampling: Sampling,
    pub resampling: Resampling,
    pub formats: Formats,
    pub conditioners: ConditionerOverrides,
    pub background: BackgroundRemoval,
}

/// Decode a saved `.trellis` asset again (no sampling).
#[derive(Debug, Clone)]
pub struct DecodeJob {
    pub asset: PathBuf,
    /// Default: the model recorded in the asset.
    pub model: Option<String>,
    pub formats: Formats,
}

/// Any job.
#[derive(Debug, Clone)]
pub enum Job {
    Generate(GenerateJob),
    Variant(VariantJob),
    Edit(EditJob),
    Decode(DecodeJob),
}

fn check_prompt(
    prompt: &Prompt,
    cond: &ConditionerOverrides,
    background: &BackgroundRemoval,
) -> Result<()> {
    match prompt {
        Prompt::Text(t) => {
            ensure!(!t.trim().is_empty(), "the text prompt is empty");
            ensure!(
                cond.image.is_none(),
                "an image conditioner (--image-cond-model) does not apply to a text prompt"
            );
        }
        Prompt::Images(images) => {
            ensure!(!images.is_empty(), "give images or a text prompt");
            ensure!(
                cond.text.is_none(),
                "a text conditioner (--text-cond-model) does not apply to images"
            );
            for i in images {
                i.check(background.enabled)?;
            }
        }
    }
    Ok(())
}

impl Job {
    /// The background-removal settings of a job some of whose input images have no useful
    /// alpha and will be matted (`None`: no image needs it, or removal is off).
    pub fn background_removal(&self) -> Option<&BackgroundRemoval> {
        let (prompt, bg) = match self {
            Job::Generate(g) => (&g.prompt, &g.background),
            Job::Variant(v) => (&v.prompt, &v.background),
            Job::Edit(e) => (&e.prompt, &e.background),
            Job::Decode(_) => return None,
        };
        let Prompt::Images(images) = prompt else {
            return None;
        };
        let needed = images
            .iter()
            .any(|i| i.load().is_ok_and(|img| !has_useful_alpha(&img)));
        (bg.enabled && needed).then_some(bg)
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Job::Generate(_) => "generate",
            Job::Variant(_) => "variant",
            Job::Edit(_) => "edit",
            Job::Decode(_) => "decode",
        }
    }

    /// Every check that needs no network: run before queueing or loading anything.
    pub fn validate(&self) -> Result<()> {
        match self {
            Job::Generate(g) => {
                g.sampling.check()?;
                check_prompt(&g.prompt, &g.conditioners, &g.background)?;
            }
            Job::Variant(v) => {
                ensure!(
                    v.sampling.ss.steps.is_none() && v.sampling.ss.cfg_strength.is_none(),
                    "a variant keeps the structure of the mesh: --ss-steps / --ss-cfg do not apply"
                );
                v.sampling.check()?;
                if let Some(r) = v.voxel_resolution {
                    ensure!(
                        (1..=1024).contains(&r),
                        "--voxel-resolution must be between 1 and 1024 (got {r})"
                    );
                }
                if let Prompt::Images(i) = &v.prompt {
                    ensure!(i.len() == 1, "a variant takes one image (got {})", i.len());
                }
                v.mesh.load()?;
                check_prompt(&v.prompt, &v.conditioners, &v.background)?;
            }
            Job::Edit(e) => {
                e.sampling.check()?;
                if let Prompt::Images(i) = &e.prompt {
                    ensure!(i.len() == 1, "an edit takes one image (got {})", i.len());
                }
                check_prompt(&e.prompt, &e.conditioners, &e.background)?;
                // The region, the source and the resampling against the model's grid and
                // sampler (configs and the source only, no network).
                super::run::plan_edit(e, &Device::Cpu)?;
            }
            Job::Decode(d) => {
                ensure!(
                    d.asset.is_file(),
                    "asset {} does not exist",
                    d.asset.display()
                );
                if !d.formats.any() {
                    bail!("no output format asked for");
                }
            }
        }
        Ok(())
    }
}
