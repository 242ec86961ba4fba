//! Resident models: the pipelines and conditioners a worker has loaded, kept between jobs so
//! that a second job on the same model starts sampling without reading weights again. The
//! command line uses a fresh cache per run; the daemon keeps one per worker (device).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device};

use crate::hub::{self, HubOptions, PipelineClass, PipelineRepo};
use crate::models::background::{self, BackgroundModel};
use crate::models::conditioners::clip::TextConditioner;
use crate::models::conditioners::dinov2::ImageConditioner;
use crate::models::ss_vae::SparseStructureEncoder;
use crate::pipelines::base::{RunControl, Stage, TrellisPipeline};
use crate::pipelines::loader::{self, Formats};
use crate::runtime::device::Fallback;
use crate::runtime::precision::PrecisionChoice;
use crate::runtime::residency::{MemoryOptions, Network, Residency};

pub const DEFAULT_IMAGE_MODEL: &str = "microsoft/TRELLIS-image-large";
pub const DEFAULT_TEXT_MODEL: &str = "microsoft/TRELLIS-text-large";

/// One pipeline with what has been loaded of it.
pub struct Resident {
    /// The model spec it was opened by (hub id or folder).
    pub spec: String,
    pub pipeline: TrellisPipeline,
    pub image_conditioner: Option<(PathBuf, Network<ImageConditioner>)>,
    pub text_conditioner: Option<(PathBuf, Network<TextConditioner>)>,
    /// The structure encoder (edits of a source without a structure latent).
    pub ss_encoder: Option<SparseStructureEncoder>,
    /// Networks loaded into it after it was opened.
    pub loads: usize,
}

/// The models one device holds, with the device and precision they run at.
pub struct ModelCache {
    pub device: Device,
    /// The device actually used (`cpu`, `cuda:0`, ...), after any fallback.
    pub device_name: String,
    /// The precision its jobs run at (`use_fp16` torsos on a GPU follow it).
    pub precision: PrecisionChoice,
    /// Most pipelines kept at once (the least recently used goes first).
    pub max_resident: usize,
    /// Where the networks' weights are placed on the device (tier, memory budget); the weights
    /// themselves stay in host memory for as long as their pipeline is resident.
    pub residency: Arc<Residency>,
    /// Most recently used last.
    entries: Vec<Resident>,
    /// Pipelines opened (weights read) so far.
    opened: usize,
    /// The background-removal network, with the spec it was loaded by.
    background: Option<(String, BackgroundModel)>,
    /// Background networks loaded so far.
    background_loads: usize,
}

impl ModelCache {
    /// Opens the device `spec` names (`auto`, `cpu`, `cuda[:N]`; a CUDA device that cannot be
    /// used falls back to the CPU with one warning line) and sets `precision`.
    pub fn new(spec: &str, precision: PrecisionChoice, max_resident: usize) -> Result<Self> {
        crate::runtime::precision::set(precision);
        let device = crate::runtime::device::open_str(spec, Fallback::CpuWithWarning)?;
        Ok(Self::on(device, precision, max_resident))
    }

    /// A cache on an already opened device, its tier chosen per job from free memory.
    pub fn on(device: Device, precision: PrecisionChoice, max_resident: usize) -> Self {
        let residency = Arc::new(Residency::auto(&device));
        Self::with_residency(device, precision, max_resident, residency)
    }

    /// A cache on an already opened device with `--vram-tier` / `--vram-budget` /
    /// `--vram-ballast` (the ballast is allocated now).
    pub fn with_memory(
        device: Device,
        precision: PrecisionChoice,
        max_resident: usize,
        memory: MemoryOptions,
    ) -> Result<Self> {
        let residency = Arc::new(Residency::new(&device, memory)?);
        Ok(Self::with_residency(
            device,
            precision,
            max_resident,
            residency,
        ))
    }

    fn with_residency(
        device: Device,
        precision: PrecisionChoice,
        max_resident: usize,
        residency: Arc<Residency>,
    ) -> Self {
        Self {
            residency,
            device_name: crate::runtime::device::device_name(&device),
            device,
            precision,
            max_resident: max_resident.max(1),
            entries: Vec::new(),
            opened: 0,
            background: None,
            background_loads: 0,
        }
    }

    /// Specs of the resident pipelines.
    pub fn resident(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.spec.clone()).collect()
    }

    /// The resident pipeline opened by `spec`, if any.
    pub fn resident_mut(&mut self, spec: &str) -> Option<&mut Resident> {
        self.entries.iter_mut().find(|e| e.spec == spec)
    }

    /// How many times weights were read (pipelines opened, networks or conditioners added):
    /// unchanged across a job that found everything resident.
    pub fn weight_loads(&self) -> usize {
        self.opened + self.background_loads + self.entries.iter().map(|e| e.loads).sum::<usize>()
    }

    /// Drops every resident model (frees their memory).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.background = None;
    }

    /// The U²-Net of `spec` (hub id or folder; default
    /// [`crate::models::background::DEFAULT_MODEL`]), loaded unless it is already.
    pub fn background_model(&mut self, spec: Option<&str>) -> Result<&BackgroundModel> {
        let spec = spec.unwrap_or(background::DEFAULT_MODEL);
        if self.background.as_ref().is_none_or(|(s, _)| s != spec) {
            self.background = None;
            let src = background::resolve(Some(spec), &HubOptions::from_env())?;
            let m = BackgroundModel::load(&src, &self.device)?;
            self.background = Some((spec.to_string(), m));
            self.background_loads += 1;
        }
        self.background
            .as_ref()
            .map(|(_, m)| m)
            .ok_or_else(|| anyhow!("background model not loaded"))
    }

    /// The pipeline `spec` with the structure networks (when `need_structure`) and the decoders
    /// of `formats` loaded, loading what is missing. Its class must be `want`.
    pub fn pipeline(
        &mut self,
        spec: &str,
        want: PipelineClass,
        need_structure: bool,
        formats: Formats,
        ctl: &mut RunControl<'_>,
    ) -> Result<&mut Resident> {
        ctl.emit(Stage::Loading, 0, 2, Some(spec.to_string()));
        // Torso dtypes follow the process precision: make it this cache's before loading.
        crate::runtime::precision::set(self.precision);
        let idx = match self.entries.iter().position(|e| e.spec == spec) {
            Some(i) => i,
            None => {
                let repo = open_repo(spec, want)?;
                // Make room first: the evicted model's memory is freed before the new one loads.
                while self.entries.len() >= self.max_resident {
                    self.entries.remove(0);
                }
                let pipeline =
                    TrellisPipeline::load(repo, self.residency.clone(), need_structure, formats)?;
                self.entries.push(Resident {
                    spec: spec.to_string(),
                    pipeline,
                    image_conditioner: None,
                    text_conditioner: None,
                    ss_encoder: None,
                    loads: 0,
                });
                self.opened += 1;
                self.entries.len() - 1
            }
        };
        // Most recently used last.
        let e = self.entries.remove(idx);
        self.entries.push(e);
        let dev = self.device.clone();
        let r = self
            .entries
            .last_mut()
            .ok_or_else(|| anyhow!("model cache is empty"))?;
        check_class(spec, &r.pipeline.repo, want)?;
        r.complete(need_structure, formats, &dev)?;
        ctl.emit(Stage::Loading, 1, 2, None);
        Ok(r)
    }
}

impl Resident {
    /// Loads what `need_structure` / `formats` need and this pipeline lacks.
    pub fn complete(&mut self, need_structure: bool, formats: Formats, dev: &Device) -> Result<()> {
        let p = &mut self.pipeline;
        if need_structure && p.ss_flow.is_none() {
            p.ss_flow = Some(loader::load_ss_flow(&p.repo, dev)?);
            self.loads += 1;
        }
        if need_structure && p.ss_decoder.is_none() {
            p.ss_decoder = Some(loader::load_ss_decoder(&p.repo, dev)?);
            self.loads += 1;
        }
        let missing = Formats {
            mesh: formats.mesh && p.decoders.mesh.is_none(),
            gaussian: formats.gaussian && p.decoders.gaussian.is_none(),
            radiance_field: formats.radiance_field && p.decoders.radiance_field.is_none(),
        };
        if missing.any() {
            let d = loader::load_decoders(&p.repo, missing, dev)?;
            self.loads += 1;
            if d.mesh.is_some() {
                p.decoders.mesh = d.mesh;
            }
            if d.gaussian.is_some() {
                p.decoders.gaussian = d.gaussian;
            }
            if d.radiance_field.is_some() {
                p.decoders.radiance_field = d.radiance_field;
            }
        }
        Ok(())
    }
}

fn check_class(spec: &str, repo: &PipelineRepo, want: PipelineClass) -> Result<()> {
    if repo.config.class != want {
        let input = match want {
            PipelineClass::TextTo3D => "a text prompt",
            PipelineClass::ImageTo3D => "images",
        };
        bail!(
            "model {spec} is a {} pipeline; it cannot take {input} (use a {} model)",
            repo.config.class.name(),
            want.name()
        );
    }
    Ok(())
}

/// The spec a job names, else the official model of its kind.
pub fn model_spec(model: Option<&str>, is_text: bool) -> &str {
    model.unwrap_or(if is_text {
        DEFAULT_TEXT_MODEL
    } else {
        DEFAULT_IMAGE_MODEL
    })
}

/// Opens a pipeline repository (reads configs only) and checks its class.
pub fn open_repo(spec: &str, want: PipelineClass) -> Result<PipelineRepo> {
    let repo = hub::open_pipeline(spec, &HubOptions::from_env())?;
    check_class(spec, &repo, want)?;
    Ok(repo)
}

/// Opens a pipeline repository of any class.
pub fn open_repo_any(spec: &str) -> Result<PipelineRepo> {
    hub::open_pipeline(spec, &HubOptions::from_env())
}

/// The conditioner folder: the override, else the name in pipeline.json (a hub name, or a folder
/// relative to the repository folder).
pub fn conditioner_dir(
    flag: Option<&str>,
    repo: &PipelineRepo,
    from_pipeline: Option<&str>,
    what: &str,
) -> Result<PathBuf> {
    let opts = HubOptions::from_env();
    if let Some(f) = flag {
        return hub::resolve_conditioner(f, &opts);
    }
    let name = from_pipeline.ok_or_else(|| {
        anyhow!("the pipeline names no {what} conditioner; give --{what}-cond-model")
    })?;
    let local = repo.root.join(name);
    if local.is_dir() {
        return hub::resolve_conditioner(&local.to_string_lossy(), &opts);
    }
    hub::resolve_conditioner(name, &opts)
}

impl Resident {
    /// The structure encoder of this pipeline (named in pipeline.json, or found beside its
    /// structure decoder), loaded unless it is already.
    pub fn structure_encoder(&mut self, dev: &Device) -> Result<&SparseStructureEncoder> {
        if self.ss_encoder.is_none() {
            let files = hub::structure_encoder(&self.pipeline.repo, &HubOptions::from_env())?;
            self.ss_encoder = Some(loader::load_ss_encoder(&files, dev)?);
            self.loads += 1;
        }
        self.ss_encoder
            .as_ref()
            .ok_or_else(|| anyhow!("structure encoder not loaded"))
    }

    /// The image conditioner in `dir`, read into host memory unless it is already (placed on
    /// the device by the conditioning stage).
    pub fn image_conditioner(&mut self, dir: &Path) -> Result<&Network<ImageConditioner>> {
        if self
            .image_conditioner
            .as_ref()
            .is_none_or(|(d, _)| d != dir)
        {
            self.image_conditioner = None;
            let c = ImageConditioner::load_host(dir, DType::F32)?;
            self.image_conditioner = Some((dir.to_path_buf(), c));
            self.loads += 1;
        }
        self.image_conditioner
            .as_ref()
            .map(|(_, c)| c)
            .ok_or_else(|| anyhow!("image conditioner not loaded"))
    }

    /// The text conditioner in `dir`, read into host memory unless it is already (placed on the
    /// device by the conditioning stage).
    pub fn text_conditioner(&mut self, dir: &Path) -> Result<&Network<TextConditioner>> {
        if self.text_conditioner.as_ref().is_none_or(|(d, _)| d != dir) {
            self.text_conditioner = None;
            let c = TextConditioner::load_host(dir, DType::F32)?;
            self.text_conditioner = Some((dir.to_path_buf(), c));
            self.loads += 1;
        }
        self.text_conditioner
            .as_ref()
            .map(|(_, c)| c)
            .ok_or_else(|| anyhow!("text conditioner not loaded"))
    }
}
