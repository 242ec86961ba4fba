//! What a job is asked to do, and the checks that can be made before any network is loaded
//! (input files exist and decode, step counts, the prompt fits the kind of job). Both front ends
//! build these: the command line from its flags, the daemon from a request.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use image::RgbaImage;

use crate::models::conditioners::preprocess::{
    load_image, normalize, preprocess_rgba, TRELLIS_IMAGE_SIZE,
};
use crate::models::config::SamplerParams;
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

    fn name(&self) -> String {
        match self {
            ImageSource::Path(p) | ImageSource::Decoded { path: p, .. } => {
                format!("image {}", p.display())
            }
            ImageSource::Rgba(img) => format!("uploaded image {}x{}", img.width(), img.height()),
        }
    }

    /// Checks the image decodes and can be preprocessed (an alpha channel with an object).
    pub fn check(&self) -> Result<()> {
        let img = self.load()?;
        preprocess_rgba(&img, TRELLIS_IMAGE_SIZE).with_context(|| self.name())?;
        Ok(())
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
    Decode(DecodeJob),
}

fn check_prompt(prompt: &Prompt, cond: &ConditionerOverrides) -> Result<()> {
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
                i.check()?;
            }
        }
    }
    Ok(())
}

impl Job {
    pub fn kind(&self) -> &'static str {
        match self {
            Job::Generate(_) => "generate",
            Job::Variant(_) => "variant",
            Job::Decode(_) => "decode",
        }
    }

    /// Every check that needs no network: run before queueing or loading anything.
    pub fn validate(&self) -> Result<()> {
        match self {
            Job::Generate(g) => {
                g.sampling.check()?;
                check_prompt(&g.prompt, &g.conditioners)?;
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
                check_prompt(&v.prompt, &v.conditioners)?;
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
