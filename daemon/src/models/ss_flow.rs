//! The sparse-structure flow transformer: twin of `SparseStructureFlowModel`
//! (trellis/models/sparse_structure_flow.py).
//!
//! `x [B, C, R, R, R]` → patchify → tokens `[B, (R/p)^3, C·p^3]` (x-major, z fastest) → `input_layer`
//! → `+ pos_emb` → (cast to the torso dtype) `ModulatedTransformerCrossBlock`s conditioned on the
//! timestep embedding and cross-attending to `cond` → (cast back to float32) `F.layer_norm` →
//! `out_layer` → unpatchify.
//!
//! With `use_fp16` the original stores and runs only the Linear layers inside `blocks` in float16;
//! build with `torso_dtype = F16` to do the same (norm parameters, `t_embedder`, `input_layer`,
//! `out_layer` and the `pos_emb` buffer stay float32).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::config::SparseStructureFlowConfig;
use crate::modules::context::{ContextCache, FlowContext};
use crate::modules::dense::{self, Dense};
use crate::modules::embedders::TimestepEmbedder;
use crate::modules::norm::f_layer_norm;
use crate::modules::patchify::{patchify, unpatchify};
use crate::modules::transformer::{
    BlockInput, CrossBlockConfig, ModulatedTransformerCrossBlock, PendingResidual,
};
use crate::runtime::block_stream::{BlockStream, Blocks};

/// Intermediates of one forward pass (for parity).
#[derive(Debug, Clone)]
pub struct SparseStructureFlowTrace {
    /// `input_layer(tokens)` before `+ pos_emb`, float32 `[B, L, model_channels]`.
    pub input_layer_out: Tensor,
    /// `t_embedder(t)` `[B, model_channels]` (before the shared adaLN when `share_mod`).
    pub t_emb: Tensor,
    /// The output of each block, in the torso dtype.
    pub blocks: Vec<Tensor>,
    /// The predicted velocity `[B, out_channels, R, R, R]`, float32.
    pub out: Tensor,
}

#[derive(Debug, Clone)]
pub struct SparseStructureFlowModel {
    cfg: SparseStructureFlowConfig,
    t_embedder: TimestepEmbedder,
    shared_ada_ln: Option<Dense>,
    pos_emb: Tensor,
    input_layer: Dense,
    blocks: Blocks<ModulatedTransformerCrossBlock>,
    out_layer: Dense,
    torso_dtype: DType,
}

impl SparseStructureFlowModel {
    pub fn new(
        cfg: &SparseStructureFlowConfig,
        vb: VarBuilder,
        torso_dtype: DType,
    ) -> Result<Self> {
        Self::placed(cfg, vb, torso_dtype, None)
    }

    /// [`Self::new`] with the transformer blocks streamed from host memory per forward when
    /// `stream` is given (tier `minimal`, `runtime::block_stream`).
    pub fn placed(
        cfg: &SparseStructureFlowConfig,
        vb: VarBuilder,
        torso_dtype: DType,
        stream: Option<&BlockStream>,
    ) -> Result<Self> {
        if cfg.pe_mode != "ape" {
            bail!(
                "SparseStructureFlowModel: pe_mode {:?} is not supported (only \"ape\"; no official checkpoint uses rope)",
                cfg.pe_mode
            );
        }
        let p = cfg.patch_size;
        if p == 0 || !cfg.resolution.is_multiple_of(p) {
            bail!(
                "SparseStructureFlowModel: resolution {} is not a multiple of patch_size {p}",
                cfg.resolution
            );
        }
        let c = cfg.model_channels;
        let heads = cfg.heads();
        if heads == 0 {
            bail!("SparseStructureFlowModel: 0 attention heads");
        }
        let f32vb = vb.to_dtype(DType::F32);
        let t_embedder = TimestepEmbedder::new(f32vb.pp("t_embedder"), c, 256)?;
        let shared_ada_ln = if cfg.share_mod {
            Some(dense::linear(c, 6 * c, f32vb.pp("adaLN_modulation.1"))?)
        } else {
            None
        };
        let tokens = (cfg.resolution / p).pow(3);
        let pos_emb = f32vb.get((tokens, c), "pos_emb")?;
        let p3 = p.pow(3);
        let input_layer = dense::linear(cfg.in_channels * p3, c, f32vb.pp("input_layer"))?;
        let block_cfg = CrossBlockConfig {
            channels: c,
            ctx_channels: cfg.cond_channels,
            num_heads: heads,
            mlp_ratio: cfg.mlp_ratio,
            qk_rms_norm: cfg.qk_rms_norm,
            qk_rms_norm_cross: cfg.qk_rms_norm_cross,
            qkv_bias: true,
            share_mod: cfg.share_mod,
        };
        let torso = vb.to_dtype(torso_dtype);
        let blocks = Blocks::new(cfg.num_blocks, torso.pp("blocks"), stream, move |vb| {
            ModulatedTransformerCrossBlock::new(vb, &block_cfg)
        })?;
        let out_layer = dense::linear(c, cfg.out_channels * p3, f32vb.pp("out_layer"))?;
        Ok(Self {
            cfg: cfg.clone(),
            t_embedder,
            shared_ada_ln,
            pos_emb,
            input_layer,
            blocks,
            out_layer,
            torso_dtype,
        })
    }

    pub fn config(&self) -> &SparseStructureFlowConfig {
        &self.cfg
    }

    /// `x` `[B, in_channels, R, R, R]`, `t` `[B]` (the sampler's `1000 * t`), `cond` `[B, L, cond_channels]`.
    /// Returns the velocity `[B, out_channels, R, R, R]` in float32.
    pub fn forward(&self, x: &Tensor, t: &Tensor, cond: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with(x, t, cond, None, false)?.out)
    }

    /// [`Self::forward`] with the condition's cross-attention projections kept in `cache` across
    /// calls (the sampler's steps; [`crate::modules::context`]).
    pub fn forward_cached(
        &self,
        x: &Tensor,
        t: &Tensor,
        cond: &Tensor,
        cache: &mut ContextCache,
    ) -> Result<Tensor> {
        Ok(self.forward_with(x, t, cond, Some(cache), false)?.out)
    }

    /// [`Self::forward`] keeping the intermediates.
    pub fn forward_trace(
        &self,
        x: &Tensor,
        t: &Tensor,
        cond: &Tensor,
    ) -> Result<SparseStructureFlowTrace> {
        self.forward_with(x, t, cond, None, true)
    }

    fn forward_with(
        &self,
        x: &Tensor,
        t: &Tensor,
        cond: &Tensor,
        cache: Option<&mut ContextCache>,
        keep_blocks: bool,
    ) -> Result<SparseStructureFlowTrace> {
        let cfg = &self.cfg;
        let r = cfg.resolution;
        let dims = x.dims();
        if dims.len() != 5 || dims[1] != cfg.in_channels || dims[2..] != [r, r, r] {
            bail!(
                "SparseStructureFlowModel: x is {dims:?}, expected [B, {}, {r}, {r}, {r}]",
                cfg.in_channels
            );
        }
        let b = dims[0];
        if t.dims() != [b] {
            bail!(
                "SparseStructureFlowModel: t is {:?}, expected [{b}]",
                t.dims()
            );
        }
        let (cb, _, cc) = cond
            .dims3()
            .context("SparseStructureFlowModel: cond must be [B, L, C]")?;
        if cb != b || cc != cfg.cond_channels {
            bail!(
                "SparseStructureFlowModel: cond is {:?}, expected [{b}, L, {}]",
                cond.dims(),
                cfg.cond_channels
            );
        }
        let p = cfg.patch_size;
        let x = x.to_dtype(DType::F32)?;
        let h = patchify(&x, p)?;
        let h = h.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
        let input_layer_out = self.input_layer.forward(&h)?;
        let h = input_layer_out.broadcast_add(&self.pos_emb.unsqueeze(0)?)?;

        let t_emb = self.t_embedder.forward(t)?;
        let modulation = match &self.shared_ada_ln {
            Some(l) => l.forward(&t_emb.silu()?)?,
            None => t_emb.clone(),
        };
        let td = self.torso_dtype;
        let modulation = modulation.to_dtype(td)?;
        let mut h = h.to_dtype(td)?;
        let mut outs = Vec::with_capacity(self.blocks.len());
        let mut ctx = FlowContext::new(cond, td, cache)?;
        if keep_blocks {
            self.blocks.for_each(|i, block| {
                h = block.forward_with(&h, &modulation, ctx.layer(i))?.out;
                outs.push(h.clone());
                Ok(())
            })?;
        } else {
            // Untraced, each block's last residual goes to the next block, which adds it
            // before its first norm (`modules::norm::fused_block_residual`: in one pass).
            // The blocks' adaLN SiLU is the same for all of them: made once (with a shared
            // modulation the blocks take it as it is).
            let act = match &self.shared_ada_ln {
                Some(_) => None,
                None => Some(modulation.silu()?),
            };
            let mut pending: Option<PendingResidual> = None;
            self.blocks.for_each(|i, block| {
                let input = match pending.take() {
                    Some(p) => BlockInput::Pending(p),
                    None => BlockInput::Tokens(h.clone()),
                };
                pending =
                    Some(block.forward_deferred(input, &modulation, act.as_ref(), ctx.layer(i))?);
                Ok(())
            })?;
            if let Some(p) = pending {
                h = p.finish()?;
            }
        }
        let h = f_layer_norm(&h.to_dtype(DType::F32)?)?;
        let h = self.out_layer.forward(&h)?;
        let rp = r / p;
        let h = h
            .transpose(1, 2)?
            .reshape((b, cfg.out_channels * p.pow(3), rp, rp, rp))?;
        let out = unpatchify(&h, p)?;
        Ok(SparseStructureFlowTrace {
            input_layer_out,
            t_emb,
            blocks: outs,
            out,
        })
    }
}
