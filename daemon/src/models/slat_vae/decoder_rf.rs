//! `SLatRadianceFieldDecoder` (twin of `trellis/models/structured_latent_vae/decoder_rf.py`): the
//! swin torso, a float32 layer norm, `out_layer`, then one Strivec radiance field per batch
//! element. `ElasticSLatRadianceFieldDecoder` checkpoints load into the same network.

use anyhow::Result;
use candle_core::DType;
use candle_nn::VarBuilder;

use super::base::{SparseTransformerBase, TorsoArgs};
use crate::models::config::SLatRadianceFieldDecoderConfig;
use crate::modules::norm::f_layer_norm;
use crate::modules::sparse::linear::SparseLinear;
use crate::modules::sparse::tensor::{to_f32_vec, SparseTensor};
use crate::representations::strivec::{octree_depth, Strivec};

#[derive(Debug, Clone)]
pub struct SLatRadianceFieldDecoder {
    cfg: SLatRadianceFieldDecoderConfig,
    base: SparseTransformerBase,
    out_layer: SparseLinear,
}

impl SLatRadianceFieldDecoder {
    /// `torso_dtype`: F16 runs the blocks like the original with `use_fp16`, F32 in full precision.
    pub fn new(
        cfg: &SLatRadianceFieldDecoderConfig,
        vb: VarBuilder,
        torso_dtype: DType,
    ) -> Result<Self> {
        // the original asserts a power-of-two resolution when it builds a representation
        octree_depth(cfg.resolution)?;
        let rep = &cfg.representation_config;
        let base =
            SparseTransformerBase::new(&TorsoArgs::from_decoder(cfg), vb.clone(), torso_dtype)?;
        let out_layer = SparseLinear::new(
            cfg.model_channels,
            Strivec::channels(rep.rank, rep.dim),
            vb.pp("out_layer"),
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            base,
            out_layer,
        })
    }

    pub fn config(&self) -> &SLatRadianceFieldDecoderConfig {
        &self.cfg
    }

    /// The network output `[N, R*3*D + R + 3R]` on the input's coords.
    pub fn forward_raw(&self, x: &SparseTensor) -> Result<SparseTensor> {
        let h = self.base.forward(x)?.to_dtype(x.dtype())?;
        let h = h.replace(f_layer_norm(h.feats())?)?;
        self.out_layer.forward(&h)
    }

    /// One radiance field per batch element.
    pub fn forward(&self, x: &SparseTensor) -> Result<Vec<Strivec>> {
        let raw = self.forward_raw(x)?;
        self.to_representation(&raw)
    }

    /// `to_representation`: trivec = raw + 1, density, features_dc per voxel.
    pub fn to_representation(&self, raw: &SparseTensor) -> Result<Vec<Strivec>> {
        let rep = &self.cfg.representation_config;
        let feats = to_f32_vec(raw.feats())?;
        let c = raw.channels()?;
        let coords = raw.coords();
        raw.layout()
            .iter()
            .map(|r| {
                let xyz: Vec<[i32; 3]> = coords[r.start * 4..r.end * 4]
                    .chunks_exact(4)
                    .map(|p| [p[1], p[2], p[3]])
                    .collect();
                Strivec::from_decoder_output(
                    self.cfg.resolution,
                    rep.rank,
                    rep.dim,
                    &xyz,
                    &feats[r.start * c..r.end * c],
                )
            })
            .collect()
    }
}
