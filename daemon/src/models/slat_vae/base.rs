//! `SparseTransformerBase` (twin of `trellis/models/structured_latent_vae/base.py`): the swin
//! transformer torso shared by `SLatEncoder` and the three SLat decoders.
//!
//! `h = input_layer(x) (+ APE of the coords)`, cast to the torso dtype, then `num_blocks`
//! `SparseTransformerBlock`s. Block i's attention follows `block_attn_config`: "full", or "swin" =
//! windowed with shift `(window_size / 2) * (i % 2)` on every axis. Only the blocks hold float16
//! weights in `use_fp16` checkpoints; the input layer stays float32.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use crate::models::config::{SLatDecoderConfig, SLatEncoderConfig};
use crate::modules::embedders::AbsolutePositionEmbedder;
use crate::modules::sparse::attention::AttnMode;
use crate::modules::sparse::linear::SparseLinear;
use crate::modules::sparse::tensor::SparseTensor;
use crate::modules::sparse::transformer::SparseTransformerBlock;

/// Constructor arguments of the torso (the subset of the encoder/decoder configs it uses).
#[derive(Debug, Clone, PartialEq)]
pub struct TorsoArgs {
    pub in_channels: usize,
    pub model_channels: usize,
    pub num_blocks: usize,
    pub heads: usize,
    pub mlp_ratio: f64,
    pub attn_mode: String,
    pub window_size: usize,
    pub pe_mode: String,
    pub qk_rms_norm: bool,
}

impl TorsoArgs {
    pub fn from_encoder(c: &SLatEncoderConfig) -> Self {
        Self {
            in_channels: c.in_channels,
            model_channels: c.model_channels,
            num_blocks: c.num_blocks,
            heads: c.heads(),
            mlp_ratio: c.mlp_ratio,
            attn_mode: c.attn_mode.clone(),
            window_size: c.window_size,
            pe_mode: c.pe_mode.clone(),
            qk_rms_norm: c.qk_rms_norm,
        }
    }

    /// The decoders' torso reads the latent (`in_channels = latent_channels`).
    pub fn from_decoder<R>(c: &SLatDecoderConfig<R>) -> Self {
        Self {
            in_channels: c.latent_channels,
            model_channels: c.model_channels,
            num_blocks: c.num_blocks,
            heads: c.heads(),
            mlp_ratio: c.mlp_ratio,
            attn_mode: c.attn_mode.clone(),
            window_size: c.window_size,
            pe_mode: c.pe_mode.clone(),
            qk_rms_norm: c.qk_rms_norm,
        }
    }

    /// The attention mode of block `i` (`block_attn_config`).
    pub fn block_mode(&self, i: usize) -> Result<AttnMode> {
        match self.attn_mode.as_str() {
            "full" => Ok(AttnMode::Full),
            "swin" => Ok(AttnMode::Windowed {
                window: self.window_size,
                shift: self.window_size / 2 * (i % 2),
            }),
            other => bail!(
                "attn_mode {other:?} is not supported (full, swin); no official checkpoint uses it"
            ),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SparseTransformerBase {
    input_layer: SparseLinear,
    pos_embedder: Option<AbsolutePositionEmbedder>,
    blocks: Vec<SparseTransformerBlock>,
    dtype: DType,
}

impl SparseTransformerBase {
    /// `vb` is the network's root; `torso_dtype` the dtype of the blocks (F16 reproduces `use_fp16`).
    pub fn new(a: &TorsoArgs, vb: VarBuilder, torso_dtype: DType) -> Result<Self> {
        let pos_embedder = match a.pe_mode.as_str() {
            "ape" => Some(AbsolutePositionEmbedder::new(a.model_channels, 3)?),
            other => {
                bail!("pe_mode {other:?} is not supported (ape); no official checkpoint uses it")
            }
        };
        let input_layer = SparseLinear::new(a.in_channels, a.model_channels, vb.pp("input_layer"))?;
        let bvb = vb.pp("blocks").to_dtype(torso_dtype);
        let blocks = (0..a.num_blocks)
            .map(|i| {
                SparseTransformerBlock::new(
                    a.model_channels,
                    a.heads,
                    a.mlp_ratio,
                    a.block_mode(i)?,
                    a.qk_rms_norm,
                    bvb.pp(i.to_string()),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            input_layer,
            pos_embedder,
            blocks,
            dtype: torso_dtype,
        })
    }

    /// The torso dtype (what [`Self::forward`] returns).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn forward(&self, x: &SparseTensor) -> Result<SparseTensor> {
        self.forward_traced(x, &mut |_, _| Ok(()))
    }

    /// Like `forward`, calling `hook(i, h)` after block i.
    pub fn forward_traced(
        &self,
        x: &SparseTensor,
        hook: &mut dyn FnMut(usize, &SparseTensor) -> Result<()>,
    ) -> Result<SparseTensor> {
        let mut h = self.input_layer.forward(x)?;
        if let Some(pe) = &self.pos_embedder {
            h = h.replace(h.feats().add(&ape(pe, x)?.to_dtype(h.dtype())?)?)?;
        }
        let mut h = h.to_dtype(self.dtype)?;
        for (i, b) in self.blocks.iter().enumerate() {
            h = b.forward(&h)?;
            hook(i, &h)?;
        }
        Ok(h)
    }
}

/// The absolute position embedding of `x`'s spatial coords, `[N, C]` float32.
pub fn ape(pe: &AbsolutePositionEmbedder, x: &SparseTensor) -> Result<Tensor> {
    x.geometry().position_embedding((pe.channels(), 3), || {
        let pos: Vec<f32> = x
            .coords()
            .chunks_exact(4)
            .flat_map(|c| [c[1] as f32, c[2] as f32, c[3] as f32])
            .collect();
        let table = pe.embed_rows(&pos)?;
        Ok(Tensor::from_vec(
            table,
            (x.rows(), pe.channels()),
            x.device(),
        )?)
    })
}
