//! Building the networks of a pipeline repository (twin of `Pipeline.from_pretrained` in
//! `trellis/pipelines/base.py`, which calls `models.from_pretrained` per entry): config class
//! checked, every weight checked (missing / wrong shape / unexpected reported at once).
//!
//! Every network is read once into host memory, in the dtype it runs in on the target device, and
//! returned as a [`Network`] that `runtime::residency` places on the device per stage (the file is
//! never read again). Precision: checkpoints saved with `use_fp16` run their torso in float16 on CUDA (as the
//! original does) unless `--precision` says otherwise (`runtime::precision`); on the CPU everything
//! runs in float32.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

use crate::hub::{ModelFiles, PipelineRepo};
use crate::models::config::ModelConfig;
use crate::models::slat_flow::SLatFlowModel;
use crate::models::slat_vae::decoder_gs::SLatGaussianDecoder;
use crate::models::slat_vae::decoder_mesh::SLatMeshDecoder;
use crate::models::slat_vae::decoder_rf::SLatRadianceFieldDecoder;
use crate::models::ss_flow::SparseStructureFlowModel;
use crate::models::ss_vae::{SparseStructureDecoder, SparseStructureEncoder};
use crate::runtime::block_stream::BlockStream;
use crate::runtime::residency::{Network, Placeable};
use crate::runtime::weights;

/// The torso dtype for a checkpoint saved with `use_fp16` on `device` (see `runtime::precision`).
pub fn torso_dtype(use_fp16: bool, device: &Device) -> DType {
    crate::runtime::precision::torso_dtype(use_fp16, device)
}

fn config_of(files: &ModelFiles) -> Result<ModelConfig> {
    ModelConfig::from_file(&files.config)
}

/// Builds a network once on the CPU from `vb` (opened on the CPU) with its torso in `dtype`,
/// keeping the tensors it was handed as its host copy; `finish` checks the weights. The returned
/// [`Network`] is placed on no device yet (`runtime::residency` places it per stage).
pub fn host_network<C, M>(
    name: &str,
    built: (candle_nn::VarBuilder<'static>, weights::WeightCheck),
    cfg: C,
    dtype: DType,
    build: impl Fn(&C, candle_nn::VarBuilder<'static>, DType) -> Result<M> + Send + Sync + 'static,
    finish: impl FnOnce(weights::WeightCheck) -> Result<()>,
) -> Result<Network<M>>
where
    C: Send + Sync + 'static,
    M: Send + Sync + 'static,
{
    host_network_streaming(
        name,
        built,
        cfg,
        dtype,
        None,
        move |c, vb, dt, _| build(c, vb, dt),
        finish,
    )
}

/// [`host_network`] for a network whose transformer blocks (`{streams}.{i}.…`) stream from host
/// memory at the tiers that say so (`runtime::block_stream`): `build` gets the stream then.
pub fn host_network_streaming<C, M>(
    name: &str,
    (vb, check): (candle_nn::VarBuilder<'static>, weights::WeightCheck),
    cfg: C,
    dtype: DType,
    streams: Option<&str>,
    build: impl Fn(&C, candle_nn::VarBuilder<'static>, DType, Option<&BlockStream>) -> Result<M>
        + Send
        + Sync
        + 'static,
    finish: impl FnOnce(weights::WeightCheck) -> Result<()>,
) -> Result<Network<M>>
where
    C: Send + Sync + 'static,
    M: Send + Sync + 'static,
{
    check.capture_host();
    let vb_dtype = vb.dtype();
    let m = build(&cfg, vb, dtype, None).with_context(|| format!("building {name}"))?;
    drop(m);
    let host = check.host_weights();
    finish(check)?;
    let place = move |vb: candle_nn::VarBuilder<'static>, stream: Option<&BlockStream>| {
        build(&cfg, vb.to_dtype(vb_dtype), dtype, stream)
    };
    Ok(match streams {
        Some(prefix) => Network::with_streamed_blocks(name, host, prefix, place),
        None => Network::new(name, host, move |vb| place(vb, None)),
    })
}

/// Opens `files`' safetensors on the CPU and builds network `name` (config class picked by
/// `pick`) into host memory, its torso dtype the one `device` runs it in; `streams` names the
/// blocks that may stream from host memory ([`host_network_streaming`]: the two flows).
fn load_net<C, M>(
    files: &ModelFiles,
    name: &str,
    dtype_of: impl Fn(bool) -> DType,
    pick: impl Fn(ModelConfig) -> Option<C>,
    use_fp16: impl Fn(&C) -> bool,
    streams: Option<&str>,
    build: impl Fn(&C, candle_nn::VarBuilder<'static>, DType, Option<&BlockStream>) -> Result<M>
        + Send
        + Sync
        + 'static,
) -> Result<Network<M>>
where
    C: Send + Sync + 'static,
    M: Send + Sync + 'static,
{
    let cfg = config_of(files)?;
    let class = cfg.class_name();
    let Some(cfg) = pick(cfg) else {
        bail!(
            "{}: {name} has the unexpected class {class}",
            files.config.display()
        );
    };
    let dtype = dtype_of(use_fp16(&cfg));
    let vb = weights::from_safetensors(&files.weights, DType::F32, &Device::Cpu)?;
    let weights_path = files.weights.display().to_string();
    let config_path = files.config.display().to_string();
    host_network_streaming(name, vb, cfg, dtype, streams, build, move |check| {
        check
            .finish()
            .with_context(|| format!("weights {weights_path}"))
    })
    .with_context(|| format!("{name} from {config_path}"))
}

/// `sparse_structure_flow_model`.
pub fn load_ss_flow(
    repo: &PipelineRepo,
    device: &Device,
) -> Result<Network<SparseStructureFlowModel>> {
    load_net(
        repo.model("sparse_structure_flow_model")?,
        "sparse_structure_flow_model",
        |f| torso_dtype(f, device),
        |c| match c {
            ModelConfig::SparseStructureFlow(c) => Some(c),
            _ => None,
        },
        |c| c.use_fp16,
        Some("blocks"),
        |c, vb, dt, stream| SparseStructureFlowModel::placed(c, vb, dt, stream),
    )
}

/// `sparse_structure_decoder`.
pub fn load_ss_decoder(
    repo: &PipelineRepo,
    device: &Device,
) -> Result<Network<SparseStructureDecoder>> {
    load_net(
        repo.model("sparse_structure_decoder")?,
        "sparse_structure_decoder",
        |f| torso_dtype(f, device),
        |c| match c {
            ModelConfig::SparseStructureDecoder(c) => Some(c),
            _ => None,
        },
        |c| c.use_fp16,
        None,
        |c, vb, dt, _| SparseStructureDecoder::new(c, vb, dt),
    )
}

/// A `SparseStructureEncoder` from its files (see [`crate::hub::structure_encoder`]), on `device`
/// (edits only; it stays resident while its pipeline is).
pub fn load_ss_encoder(files: &ModelFiles, device: &Device) -> Result<SparseStructureEncoder> {
    let ModelConfig::SparseStructureEncoder(cfg) = config_of(files)? else {
        bail!(
            "{}: expected a SparseStructureEncoder",
            files.config.display()
        );
    };
    let (vb, check) = weights::from_safetensors(&files.weights, DType::F32, device)?;
    let m = SparseStructureEncoder::new(&cfg, vb, torso_dtype(cfg.use_fp16, device))?;
    check
        .finish()
        .with_context(|| format!("weights {}", files.weights.display()))?;
    Ok(m)
}

/// Which decoded representations a run produces (`formats` of the original's `run`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Formats {
    pub mesh: bool,
    pub gaussian: bool,
    pub radiance_field: bool,
}

impl Formats {
    pub const ALL: Formats = Formats {
        mesh: true,
        gaussian: true,
        radiance_field: true,
    };

    /// `mesh,gaussian,radiance_field` (any subset; `rf` and `gs` accepted).
    pub fn parse(list: &str) -> Result<Self> {
        let mut f = Formats::default();
        for w in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            match w {
                "mesh" => f.mesh = true,
                "gaussian" | "gs" => f.gaussian = true,
                "radiance_field" | "rf" => f.radiance_field = true,
                other => {
                    bail!("unknown format {other:?} (expected mesh, gaussian or radiance_field)")
                }
            }
        }
        Ok(f)
    }

    pub fn names(&self) -> Vec<&'static str> {
        let mut v = vec![];
        if self.mesh {
            v.push("mesh");
        }
        if self.gaussian {
            v.push("gaussian");
        }
        if self.radiance_field {
            v.push("radiance_field");
        }
        v
    }

    pub fn any(&self) -> bool {
        self.mesh || self.gaussian || self.radiance_field
    }
}

/// `slat_flow_model`.
pub fn load_slat_flow(repo: &PipelineRepo, device: &Device) -> Result<Network<SLatFlowModel>> {
    load_net(
        repo.model("slat_flow_model")?,
        "slat_flow_model",
        |f| torso_dtype(f, device),
        |c| match c {
            ModelConfig::SLatFlow { config, .. } => Some(config),
            _ => None,
        },
        |c| c.use_fp16,
        Some("blocks"),
        |c, vb, dt, stream| SLatFlowModel::placed(c, vb, dt, stream),
    )
}

/// The SLat decoders a set of formats needs.
#[derive(Default)]
pub struct Decoders {
    pub mesh: Option<Network<SLatMeshDecoder>>,
    pub gaussian: Option<Network<SLatGaussianDecoder>>,
    pub radiance_field: Option<Network<SLatRadianceFieldDecoder>>,
}

impl Decoders {
    /// The loaded decoders `formats` asks for, as stages place them (for
    /// `Residency::prefetch_next`).
    pub fn placeables(&self, formats: Formats) -> Vec<&dyn Placeable> {
        let mut v: Vec<&dyn Placeable> = Vec::new();
        if let (true, Some(m)) = (formats.mesh, &self.mesh) {
            v.push(m);
        }
        if let (true, Some(g)) = (formats.gaussian, &self.gaussian) {
            v.push(g);
        }
        if let (true, Some(r)) = (formats.radiance_field, &self.radiance_field) {
            v.push(r);
        }
        v
    }
}

pub fn load_decoders(repo: &PipelineRepo, formats: Formats, device: &Device) -> Result<Decoders> {
    let mesh = if formats.mesh {
        Some(load_net(
            repo.model("slat_decoder_mesh")?,
            "slat_decoder_mesh",
            |f| torso_dtype(f, device),
            |c| match c {
                ModelConfig::SLatMeshDecoder { config, .. } => Some(config),
                _ => None,
            },
            |c| c.use_fp16,
            None,
            |c, vb, dt, _| SLatMeshDecoder::new(c, vb, dt),
        )?)
    } else {
        None
    };
    let gaussian = if formats.gaussian {
        Some(load_net(
            repo.model("slat_decoder_gs")?,
            "slat_decoder_gs",
            |f| torso_dtype(f, device),
            |c| match c {
                ModelConfig::SLatGaussianDecoder { config, .. } => Some(config),
                _ => None,
            },
            |c| c.use_fp16,
            None,
            |c, vb, dt, _| SLatGaussianDecoder::new(c, vb, dt),
        )?)
    } else {
        None
    };
    let radiance_field = if formats.radiance_field {
        Some(load_net(
            repo.model("slat_decoder_rf")?,
            "slat_decoder_rf",
            |f| torso_dtype(f, device),
            |c| match c {
                ModelConfig::SLatRadianceFieldDecoder { config, .. } => Some(config),
                _ => None,
            },
            |c| c.use_fp16,
            None,
            |c, vb, dt, _| SLatRadianceFieldDecoder::new(c, vb, dt),
        )?)
    } else {
        None
    };
    Ok(Decoders {
        mesh,
        gaussian,
        radiance_field,
    })
}

/// Resolution of the occupancy grid the structure decoder produces (the flow's latent resolution
/// times 2 per upsampling stage): 64 for the official models, 32 for the tiny ones. Reads the
/// configs only.
pub fn structure_resolution(repo: &PipelineRepo) -> Result<usize> {
    let flow = config_of(repo.model("sparse_structure_flow_model")?)?;
    let dec = config_of(repo.model("sparse_structure_decoder")?)?;
    match (flow, dec) {
        (ModelConfig::SparseStructureFlow(f), ModelConfig::SparseStructureDecoder(d)) => {
            Ok(f.resolution << d.channels.len().saturating_sub(1))
        }
        _ => bail!(
            "pipeline {}: unexpected structure flow/decoder classes",
            repo.root.display()
        ),
    }
}

/// The voxel resolution the mesh decoder was built for (its FlexiCubes grid is 4× this): a
/// structure at a finer resolution cannot be meshed.
pub fn mesh_decoder_resolution(repo: &PipelineRepo) -> Result<usize> {
    let files = repo.model("slat_decoder_mesh")?;
    match config_of(files)? {
        ModelConfig::SLatMeshDecoder { config, .. } => Ok(config.resolution),
        other => bail!(
            "{}: slat_decoder_mesh is a {}",
            files.config.display(),
            other.class_name()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::residency::{Placeable, Residency};

    /// On a GPU the networks are first built on the CPU with float16 torsos (to capture their
    /// host copy): every constructor must accept that, and the rebuilt network must hold the
    /// float16 weights.
    #[test]
    fn networks_build_on_the_cpu_in_float16_and_rebuild_from_the_host_copy() {
        let tiny = crate::test_tiny_repos();
        let repo = crate::hub::open_pipeline(
            &tiny.image.to_string_lossy(),
            &crate::hub::HubOptions::from_env(),
        )
        .unwrap();
        let half = |_: bool| DType::F16;
        let res = Residency::keep_all(&Device::Cpu);
        let flow = load_net(
            repo.model("slat_flow_model").unwrap(),
            "slat_flow_model",
            half,
            |c| match c {
                ModelConfig::SLatFlow { config, .. } => Some(config),
                _ => None,
            },
            |c| c.use_fp16,
            None,
            |c, vb, dt, _| SLatFlowModel::new(c, vb, dt),
        )
        .unwrap();
        let dtypes: Vec<DType> = flow.host().entries().iter().map(|e| e.1).collect();
        assert!(dtypes.contains(&DType::F16), "{dtypes:?}");
        flow.place(&res).unwrap();
        assert!(flow.is_placed());
        for name in ["slat_decoder_mesh", "slat_decoder_gs", "slat_decoder_rf"] {
            let files = repo.model(name).unwrap();
            match name {
                "slat_decoder_mesh" => {
                    let n = load_net(
                        files,
                        name,
                        half,
                        |c| match c {
                            ModelConfig::SLatMeshDecoder { config, .. } => Some(config),
                            _ => None,
                        },
                        |c| c.use_fp16,
                        None,
                        |c, vb, dt, _| SLatMeshDecoder::new(c, vb, dt),
                    )
                    .unwrap();
                    n.place(&res).unwrap();
                }
                "slat_decoder_gs" => {
                    let n = load_net(
                        files,
                        name,
                        half,
                        |c| match c {
                            ModelConfig::SLatGaussianDecoder { config, .. } => Some(config),
                            _ => None,
                        },
                        |c| c.use_fp16,
                        None,
                        |c, vb, dt, _| SLatGaussianDecoder::new(c, vb, dt),
                    )
                    .unwrap();
                    n.place(&res).unwrap();
                }
                _ => {
                    let n = load_net(
                        files,
                        name,
                        half,
                        |c| match c {
                            ModelConfig::SLatRadianceFieldDecoder { config, .. } => Some(config),
                            _ => None,
                        },
                        |c| c.use_fp16,
                        None,
                        |c, vb, dt, _| SLatRadianceFieldDecoder::new(c, vb, dt),
                    )
                    .unwrap();
                    n.place(&res).unwrap();
                }
            }
        }
        for name in ["sparse_structure_flow_model", "sparse_structure_decoder"] {
            let files = repo.model(name).unwrap();
            if name == "sparse_structure_flow_model" {
                let n = load_net(
                    files,
                    name,
                    half,
                    |c| match c {
                        ModelConfig::SparseStructureFlow(c) => Some(c),
                        _ => None,
                    },
                    |c| c.use_fp16,
                    None,
                    |c, vb, dt, _| SparseStructureFlowModel::new(c, vb, dt),
                )
                .unwrap();
                n.place(&res).unwrap();
            } else {
                let n = load_net(
                    files,
                    name,
                    half,
                    |c| match c {
                        ModelConfig::SparseStructureDecoder(c) => Some(c),
                        _ => None,
                    },
                    |c| c.use_fp16,
                    None,
                    |c, vb, dt, _| SparseStructureDecoder::new(c, vb, dt),
                )
                .unwrap();
                n.place(&res).unwrap();
            }
        }
    }
}
