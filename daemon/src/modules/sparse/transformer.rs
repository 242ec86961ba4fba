//! Sparse transformer blocks (twin of `trellis/modules/sparse/transformer/{blocks,modulated}.py`):
//! `SparseFeedForwardNet`, `SparseTransformerBlock` (the swin torso of the SLat VAEs) and
//! `ModulatedSparseTransformerCrossBlock` (the DiT block of the SLat flow).
//!
//! dtype: the blocks run in the dtype of their weights' `VarBuilder` (f16 for `use_fp16` torsos);
//! the layer norms compute in f32 with f32 affine parameters (`LayerNorm32`).

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::attention::{AttnMode, SparseMultiHeadAttention};
use super::linear::SparseLinear;
use super::norm::SparseLayerNorm32;
use super::tensor::SparseTensor;
use crate::modules::context::CrossContext;
use crate::modules::dense::{self, Dense};
use crate::modules::gpu_fused::Act;
use crate::modules::norm::fused_block_residual;

/// `Linear(C, C*ratio) -> GELU(tanh) -> Linear(C*ratio, C)`, tensors `mlp.0.*` / `mlp.2.*`.
#[derive(Debug, Clone)]
pub struct SparseFeedForwardNet {
    fc1: SparseLinear,
    fc2: SparseLinear,
}

impl SparseFeedForwardNet {
    pub fn new(channels: usize, mlp_ratio: f64, vb: VarBuilder) -> Result<Self> {
        let hidden = (channels as f64 * mlp_ratio) as usize;
        let vb = vb.pp("mlp");
        Ok(Self {
            fc1: SparseLinear::new(channels, hidden, vb.pp("0"))?,
            fc2: SparseLinear::new(hidden, channels, vb.pp("2"))?,
        })
    }

    pub fn forward(&self, x: &SparseTensor) -> Result<SparseTensor> {
        let h = self.fc1.forward_act(x, Act::GeluTanh)?;
        self.fc2.forward(&h)
    }
}

/// `SparseTransformerBlock`: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`; norms without affine
/// (the VAEs' `ln_affine=False`), eps 1e-6.
#[derive(Debug, Clone)]
pub struct SparseTransformerBlock {
    norm1: SparseLayerNorm32,
    norm2: SparseLayerNorm32,
    attn: SparseMultiHeadAttention,
    mlp: SparseFeedForwardNet,
}

impl SparseTransformerBlock {
    pub fn new(
        channels: usize,
        heads: usize,
        mlp_ratio: f64,
        mode: AttnMode,
        qk_rms_norm: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            norm1: SparseLayerNorm32::new(channels, false, 1e-6, vb.pp("norm1"))?,
            norm2: SparseLayerNorm32::new(channels, false, 1e-6, vb.pp("norm2"))?,
            attn: SparseMultiHeadAttention::new_self(
                channels,
                heads,
                mode,
                qk_rms_norm,
                vb.pp("attn"),
            )?,
            mlp: SparseFeedForwardNet::new(channels, mlp_ratio, vb.pp("mlp"))?,
        })
    }

    pub fn forward(&self, x: &SparseTensor) -> Result<SparseTensor> {
        let h = self.attn.forward(&self.norm1.forward(x)?)?;
        let x = x.add(&h)?;
        let h = self.mlp.forward(&self.norm2.forward(&x)?)?;
        x.add(&h)
    }
}

/// `ModulatedSparseTransformerCrossBlock` (share_mod = False): adaLN-modulated self-attention,
/// cross-attention to the condition (norm2 with affine), modulated MLP.
#[derive(Debug, Clone)]
pub struct ModulatedSparseTransformerCrossBlock {
    channels: usize,
    norm1: SparseLayerNorm32,
    norm2: SparseLayerNorm32,
    norm3: SparseLayerNorm32,
    self_attn: SparseMultiHeadAttention,
    cross_attn: SparseMultiHeadAttention,
    mlp: SparseFeedForwardNet,
    ada_ln: Option<Dense>,
}

/// Constructor arguments of [`ModulatedSparseTransformerCrossBlock`].
#[derive(Debug, Clone, Copy)]
pub struct CrossBlockArgs {
    pub channels: usize,
    pub ctx_channels: usize,
    pub heads: usize,
    pub mlp_ratio: f64,
    pub mode: AttnMode,
    pub qk_rms_norm: bool,
    pub qk_rms_norm_cross: bool,
    pub share_mod: bool,
}

impl ModulatedSparseTransformerCrossBlock {
    pub fn new(a: CrossBlockArgs, vb: VarBuilder) -> Result<Self> {
        let c = a.channels;
        let ada_ln = if a.share_mod {
            None
        } else {
            Some(dense::linear(c, 6 * c, vb.pp("adaLN_modulation").pp("1"))?)
        };
        Ok(Self {
            channels: c,
            norm1: SparseLayerNorm32::new(c, false, 1e-6, vb.pp("norm1"))?,
            norm2: SparseLayerNorm32::new(c, true, 1e-6, vb.pp("norm2"))?,
            norm3: SparseLayerNorm32::new(c, false, 1e-6, vb.pp("norm3"))?,
            self_attn: SparseMultiHeadAttention::new_self(
                c,
                a.heads,
                a.mode,
                a.qk_rms_norm,
                vb.pp("self_attn"),
            )?,
            cross_attn: SparseMultiHeadAttention::new_cross(
                c,
                a.ctx_channels,
                a.heads,
                a.qk_rms_norm_cross,
                vb.pp("cross_attn"),
            )?,
            mlp: SparseFeedForwardNet::new(c, a.mlp_ratio, vb.pp("mlp"))?,
            ada_ln,
        })
    }

    /// `x`: tokens; `modulation`: `t_emb [B, C]` (or, with `share_mod`, the shared `[B, 6C]`
    /// modulation); `context`: `[B, L, C_ctx]`.
    pub fn forward(
        &self,
        x: &SparseTensor,
        modulation: &Tensor,
        context: &Tensor,
    ) -> Result<SparseTensor> {
        self.forward_with(x, modulation, CrossContext::Tokens(context))
    }

    /// [`Self::forward`] attending to `context`: the tokens (any dtype), or a context kept
    /// across calls ([`crate::modules::context`]).
    pub fn forward_with(
        &self,
        x: &SparseTensor,
        modulation: &Tensor,
        context: CrossContext<'_>,
    ) -> Result<SparseTensor> {
        let m = self.modulation(modulation, None, x.dtype())?;
        self.forward_modulated(BlockInput::Tokens(x.clone()), &m, context)?
            .finish()
    }

    /// The block's own `[B, 6C]` modulation in `dtype`: `adaLN_modulation(modulation)` (SiLU,
    /// Linear; `act` is `silu(modulation)` already made by the caller, used when it is in the
    /// Linear's dtype), or with `share_mod` the shared modulation itself.
    pub fn modulation(
        &self,
        modulation: &Tensor,
        act: Option<&Tensor>,
        dtype: DType,
    ) -> Result<Tensor> {
        let m = match &self.ada_ln {
            Some(l) => {
                let w = l.dtype();
                match act.filter(|a| a.dtype() == w) {
                    Some(a) => l.forward(a)?,
                    None => l.forward(&modulation.to_dtype(w)?.silu()?)?,
                }
            }
            None => modulation.clone(),
        };
        Ok(m.to_dtype(dtype)?)
    }

    /// [`Self::forward_with`] from `input` given the block's modulation `m`
    /// ([`Self::modulation`]), leaving the block's last residual to the caller: a run of blocks
    /// passes each one's [`PendingResidual`] to the next, whose first norm adds it in the same
    /// pass, and finishes the last.
    pub fn forward_modulated(
        &self,
        input: BlockInput,
        m: &Tensor,
        context: CrossContext<'_>,
    ) -> Result<PendingResidual> {
        ensure!(
            m.dim(1)? == 6 * self.channels,
            "modulation has {} channels, expected {}",
            m.dim(1)?,
            6 * self.channels
        );
        let chunk = |i: usize| m.narrow(1, i * self.channels, self.channels);
        let (shift_msa, scale_msa, gate_msa) = (chunk(0)?, chunk(1)?, chunk(2)?);
        let (shift_mlp, scale_mlp, gate_mlp) = (chunk(3)?, chunk(4)?, chunk(5)?);
        // Each residual and the norm after it are one pass on the GPU (the previous block's last
        // residual and this block's first norm unless `TRELLIS_FUSED_BLOCK_RESIDUAL=0`).
        let (x, h) = match input {
            BlockInput::Tokens(x) => {
                let h = self.norm1.forward_modulated(&x, &shift_msa, &scale_msa)?;
                (x, h)
            }
            BlockInput::Pending(p) => {
                let fused = if fused_block_residual() {
                    self.norm1.forward_after_residual(
                        &p.x,
                        &p.h,
                        Some(&p.gate),
                        Some((&shift_msa, &scale_msa)),
                    )?
                } else {
                    None
                };
                match fused {
                    Some(pair) => pair,
                    None => {
                        let x = p.finish()?;
                        let h = self.norm1.forward_modulated(&x, &shift_msa, &scale_msa)?;
                        (x, h)
                    }
                }
            }
        };
        let h = self.self_attn.forward(&h)?;
        let (x, h) = match self
            .norm2
            .forward_after_residual(&x, &h, Some(&gate_msa), None)?
        {
            Some(p) => p,
            None => {
                let x = x.gated_add(&h, &gate_msa)?;
                let h = self.norm2.forward(&x)?;
                (x, h)
            }
        };
        let h = match context {
            CrossContext::Tokens(t) => {
                self.cross_attn.forward_cross(&h, &t.to_dtype(x.dtype())?)?
            }
            CrossContext::Cached(c) => self.cross_attn.forward_cross_cached(&h, c)?,
        };
        let (x, h) =
            match self
                .norm3
                .forward_after_residual(&x, &h, None, Some((&shift_mlp, &scale_mlp)))?
            {
                Some(p) => p,
                None => {
                    let x = x.add(&h)?;
                    let h = self.norm3.forward_modulated(&x, &shift_mlp, &scale_mlp)?;
                    (x, h)
                }
            };
        let h = self.mlp.forward(&h)?;
        Ok(PendingResidual {
            x,
            h,
            gate: gate_mlp,
        })
    }
}

/// A block's last residual, `x + h * gate[b]`, not added yet: the next block adds it, on the GPU
/// in the pass of its first norm (unless `TRELLIS_FUSED_BLOCK_RESIDUAL=0`) (one pass over the tokens
/// fewer per block, the same numbers as the two kernels); [`Self::finish`] adds it alone.
pub struct PendingResidual {
    x: SparseTensor,
    h: SparseTensor,
    gate: Tensor,
}

impl PendingResidual {
    /// `x + h * gate[b]`.
    pub fn finish(self) -> Result<SparseTensor> {
        self.x.gated_add(&self.h, &self.gate)
    }
}

/// What a block starts from: tokens, or the previous block's residual still to be added.
pub enum BlockInput {
    Tokens(SparseTensor),
    Pending(PendingResidual),
}
