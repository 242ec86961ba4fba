//! `SLatEncoder` (twin of `trellis/models/structured_latent_vae/encoder.py`): the swin torso, then
//! `F.layer_norm` (eps 1e-5, no affine) and `out_layer` → `[N, 2 * latent]` = (mean, logvar).
//! `ElasticSLatEncoder` checkpoints load into the same network.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::base::{SparseTransformerBase, TorsoArgs};
use crate::models::config::SLatEncoderConfig;
use crate::modules::norm::f_layer_norm;
use crate::modules::sparse::linear::SparseLinear;
use crate::modules::sparse::tensor::SparseTensor;

#[derive(Debug, Clone)]
pub struct SLatEncoder {
    base: SparseTransformerBase,
    out_layer: SparseLinear,
    latent_channels: usize,
}

/// The posterior: `z` (sampled, or the mean), `mean`, `logvar`, all on the input's coords.
#[derive(Debug, Clone)]
pub struct SLatPosterior {
    pub z: SparseTensor,
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl SLatEncoder {
    /// `torso_dtype`: F16 runs the blocks like the original with `use_fp16`, F32 in full precision.
    pub fn new(cfg: &SLatEncoderConfig, vb: VarBuilder, torso_dtype: DType) -> Result<Self> {
        let base =
            SparseTransformerBase::new(&TorsoArgs::from_encoder(cfg), vb.clone(), torso_dtype)?;
        let out_layer = SparseLinear::new(
            cfg.model_channels,
            2 * cfg.latent_channels,
            vb.pp("out_layer"),
        )?;
        Ok(Self {
            base,
            out_layer,
            latent_channels: cfg.latent_channels,
        })
    }

    pub fn torso(&self) -> &SparseTransformerBase {
        &self.base
    }

    /// `noise` (standard normal, `[N, latent]`) samples the posterior; `None` returns the mean as z
    /// (`sample_posterior=False`).
    pub fn forward(&self, x: &SparseTensor, noise: Option<&Tensor>) -> Result<SLatPosterior> {
        self.forward_traced(x, noise, &mut |_, _| Ok(()))
    }

    /// Like `forward`, calling `hook(i, h)` after torso block i.
    pub fn forward_traced(
        &self,
        x: &SparseTensor,
        noise: Option<&Tensor>,
        hook: &mut dyn FnMut(usize, &SparseTensor) -> Result<()>,
    ) -> Result<SLatPosterior> {
        let h = self.base.forward_traced(x, hook)?.to_dtype(x.dtype())?;
        let h = h.replace(f_layer_norm(h.feats())?)?;
        let h = self.out_layer.forward(&h)?;
        let l = self.latent_channels;
        let mean = h.feats().narrow(1, 0, l)?;
        let logvar = h.feats().narrow(1, l, l)?;
        let z = match noise {
            Some(n) => {
                ensure!(
                    n.dims() == mean.dims(),
                    "SLatEncoder: noise {:?} must match the latent {:?}",
                    n.dims(),
                    mean.dims()
                );
                let std = (&logvar * 0.5)?.exp()?;
                (&mean + std.mul(&n.to_dtype(mean.dtype())?)?)?
            }
            None => mean.clone(),
        };
        Ok(SLatPosterior {
            z: h.replace(z)?,
            mean,
            logvar,
        })
    }
}
