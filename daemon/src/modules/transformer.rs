//! Dense transformer pieces: twin of trellis/modules/transformer/{blocks,modulated}.py
//! (`FeedForwardNet`, `ModulatedTransformerCrossBlock`) and `modulate` of trellis/modules/utils.py.

use anyhow::{bail, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::attention::MultiHeadAttention;
use super::context::CrossContext;
use super::dense::{self, Dense};
use super::gpu_fused::{self, Act};
use super::norm::{fused_block_residual, LayerNorm32};

/// adaLN modulation `x * (1 + scale) + shift`. With `x` `[B, L, C]` and `shift`/`scale` `[B, C]`, the
/// modulation is broadcast over L (torch's `unsqueeze(1)`); otherwise the shapes must broadcast
/// as they are (e.g. `x` `[N, C]` with `[1, C]` or `[C]`).
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let lift = |t: &Tensor| -> Result<Tensor> {
        Ok(if x.rank() == 3 && t.rank() == 2 {
            t.unsqueeze(1)?
        } else {
            t.clone()
        })
    };
    let (shift, scale) = (lift(shift)?, lift(scale)?);
    let one_plus = (scale + 1.0)?;
    Ok(x.broadcast_mul(&one_plus)?.broadcast_add(&shift)?)
}

/// `FeedForwardNet(channels, mlp_ratio)`: Linear(C, int(C * ratio)), GELU (tanh approximation),
/// Linear back to C. Keys `mlp.0.*`, `mlp.2.*` under the given builder. Any rank, last dim C.
#[derive(Debug, Clone)]
pub struct FeedForwardNet {
    fc1: Dense,
    fc2: Dense,
}

impl FeedForwardNet {
    pub fn new(vb: VarBuilder, channels: usize, mlp_ratio: f64) -> Result<Self> {
        let hidden = (channels as f64 * mlp_ratio) as usize;
        if hidden == 0 {
            bail!("FeedForwardNet: hidden width int({channels} * {mlp_ratio}) is 0");
        }
        Ok(Self {
            fc1: dense::linear(channels, hidden, vb.pp("mlp.0"))?,
            fc2: dense::linear(hidden, channels, vb.pp("mlp.2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // GELU with the tanh approximation, as the original's `nn.GELU(approximate="tanh")`.
        let h = gpu_fused::linear(&self.fc1, x, Act::GeluTanh)?;
        gpu_fused::linear(&self.fc2, &h, Act::None)
    }
}

/// Constructor arguments of [`ModulatedTransformerCrossBlock`] (attention mode is always "full").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrossBlockConfig {
    pub channels: usize,
    pub ctx_channels: usize,
    pub num_heads: usize,
    pub mlp_ratio: f64,
    pub qk_rms_norm: bool,
    pub qk_rms_norm_cross: bool,
    pub qkv_bias: bool,
    pub share_mod: bool,
}

/// What one block computed, for parity: the 6C modulation vector and the residual stream after each
/// sub-layer.
#[derive(Debug, Clone)]
pub struct CrossBlockTrace {
    pub adaln: Tensor,
    pub after_self_attn: Tensor,
    pub after_cross_attn: Tensor,
    pub out: Tensor,
}

/// `ModulatedTransformerCrossBlock`: adaLN-modulated self-attention, plain cross-attention (after the
/// affine `norm2`), adaLN-modulated MLP. Norms: LayerNorm32 eps 1e-6, only `norm2` affine.
/// Linear layers take `vb`'s dtype (float16 in fp16 torsos); norm parameters stay float32.
#[derive(Debug, Clone)]
pub struct ModulatedTransformerCrossBlock {
    norm1: LayerNorm32,
    norm2: LayerNorm32,
    norm3: LayerNorm32,
    self_attn: MultiHeadAttention,
    cross_attn: MultiHeadAttention,
    mlp: FeedForwardNet,
    ada_ln: Option<Dense>,
    channels: usize,
}

impl ModulatedTransformerCrossBlock {
    pub fn new(vb: VarBuilder, cfg: &CrossBlockConfig) -> Result<Self> {
        let c = cfg.channels;
        let ada_ln = if cfg.share_mod {
            None
        } else {
            Some(dense::linear(c, 6 * c, vb.pp("adaLN_modulation.1"))?)
        };
        Ok(Self {
            norm1: LayerNorm32::new(vb.pp("norm1"), c, false, 1e-6)?,
            norm2: LayerNorm32::new(vb.pp("norm2"), c, true, 1e-6)?,
            norm3: LayerNorm32::new(vb.pp("norm3"), c, false, 1e-6)?,
            self_attn: MultiHeadAttention::new_self(
                vb.pp("self_attn"),
                c,
                cfg.num_heads,
                cfg.qkv_bias,
                cfg.qk_rms_norm,
            )?,
            cross_attn: MultiHeadAttention::new_cross(
                vb.pp("cross_attn"),
                c,
                cfg.ctx_channels,
                cfg.num_heads,
                cfg.qkv_bias,
                cfg.qk_rms_norm_cross,
            )?,
            mlp: FeedForwardNet::new(vb.pp("mlp"), c, cfg.mlp_ratio)?,
            ada_ln,
            channels: c,
        })
    }

    /// `modulate(norm(x), shift, scale)` for `x` `[B, L, C]`, fused on the CPU.
    fn modulated_norm(
        &self,
        norm: &LayerNorm32,
        x: &Tensor,
        shift: &Tensor,
        scale: &Tensor,
    ) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let rows = (0..b).map(|i| i * l..(i + 1) * l).collect();
        match norm.forward_modulated(x, shift, scale, rows)? {
            Some(h) => Ok(h),
            None => modulate(&norm.forward(x)?, shift, scale),
        }
    }

    /// `x` `[B, L, C]`, `modulation` `[B, C]` (or the shared `[B, 6C]` when `share_mod`), `context`
    /// `[B, Lc, Cc]`.
    pub fn forward(&self, x: &Tensor, modulation: &Tensor, context: &Tensor) -> Result<Tensor> {
        Ok(self.forward_trace(x, modulation, context)?.out)
    }

    /// [`Self::forward`] keeping the intermediates.
    pub fn forward_trace(
        &self,
        x: &Tensor,
        modulation: &Tensor,
        context: &Tensor,
    ) -> Result<CrossBlockTrace> {
        self.forward_with(x, modulation, CrossContext::Tokens(context))
    }

    /// [`Self::forward_trace`] attending to `context`: the tokens, or a context kept across
    /// calls ([`crate::modules::context`]).
    pub fn forward_with(
        &self,
        x: &Tensor,
        modulation: &Tensor,
        context: CrossContext<'_>,
    ) -> Result<CrossBlockTrace> {
        let (adaln, after_self_attn, after_cross_attn, last) =
            self.run(BlockInput::Tokens(x.clone()), modulation, None, context)?;
        Ok(CrossBlockTrace {
            adaln,
            after_self_attn,
            after_cross_attn,
            out: last.finish()?,
        })
    }

    /// [`Self::forward_with`] from `input`, leaving the block's last residual to the caller: a
    /// run of blocks passes each one's [`PendingResidual`] to the next, whose first norm adds it
    /// in the same pass, and finishes the last. `act`: `silu(modulation)` when the caller made it
    /// once for all blocks (used when it is in the `adaLN_modulation` Linear's dtype).
    pub fn forward_deferred(
        &self,
        input: BlockInput,
        modulation: &Tensor,
        act: Option<&Tensor>,
        context: CrossContext<'_>,
    ) -> Result<PendingResidual> {
        Ok(self.run(input, modulation, act, context)?.3)
    }

    /// The block: its modulation, the residual stream after the self- and the cross-attention,
    /// and the MLP's residual still to be added.
    fn run(
        &self,
        input: BlockInput,
        modulation: &Tensor,
        act: Option<&Tensor>,
        context: CrossContext<'_>,
    ) -> Result<(Tensor, Tensor, Tensor, PendingResidual)> {
        let c = self.channels;
        let adaln = match &self.ada_ln {
            Some(l) => match act.filter(|a| a.dtype() == l.dtype()) {
                Some(a) => gpu_fused::linear(l, a, Act::None)?,
                None => gpu_fused::linear(l, &modulation.silu()?, Act::None)?,
            },
            None => modulation.clone(),
        };
        if adaln.rank() != 2 || adaln.dim(1)? != 6 * c {
            bail!(
                "ModulatedTransformerCrossBlock: modulation gives {:?}, expected [B, {}]",
                adaln.dims(),
                6 * c
            );
        }
        let chunk = |i: usize| adaln.narrow(1, i * c, c);
        let (shift_msa, scale_msa, gate_msa) = (chunk(0)?, chunk(1)?, chunk(2)?);
        let (shift_mlp, scale_mlp, gate_mlp) = (chunk(3)?, chunk(4)?, chunk(5)?);

        let (bsz, l, _) = match &input {
            BlockInput::Tokens(x) => x.dims3()?,
            BlockInput::Pending(p) => p.x.dims3()?,
        };
        let rows: Vec<_> = (0..bsz).map(|i| i * l..(i + 1) * l).collect();
        // Each residual and the norm after it are one pass on the GPU (the previous block's last
        // residual and this block's first norm unless `TRELLIS_FUSED_BLOCK_RESIDUAL=0`).
        let (x, h) = match input {
            BlockInput::Tokens(x) => {
                let h = self.modulated_norm(&self.norm1, &x, &shift_msa, &scale_msa)?;
                (x, h)
            }
            BlockInput::Pending(p) => {
                let fused = if fused_block_residual() {
                    self.norm1.forward_after_residual(
                        &p.x,
                        &p.h,
                        Some(&p.gate),
                        Some((&shift_msa, &scale_msa)),
                        &rows,
                    )?
                } else {
                    None
                };
                match fused {
                    Some(pair) => pair,
                    None => {
                        let x = p.finish()?;
                        let h = self.modulated_norm(&self.norm1, &x, &shift_msa, &scale_msa)?;
                        (x, h)
                    }
                }
            }
        };
        let h = self.self_attn.forward(&h, None)?;
        let (after_self_attn, h) =
            match self
                .norm2
                .forward_after_residual(&x, &h, Some(&gate_msa), None, &rows)?
            {
                Some(p) => p,
                None => {
                    let a = gated_residual(&x, &h, &gate_msa)?;
                    let n = self.norm2.forward(&a)?;
                    (a, n)
                }
            };
        let h = match context {
            CrossContext::Tokens(t) => self.cross_attn.forward(&h, Some(t))?,
            CrossContext::Cached(c) => self.cross_attn.forward_cross_cached(&h, c)?,
        };
        let (after_cross_attn, h) = match self.norm3.forward_after_residual(
            &after_self_attn,
            &h,
            None,
            Some((&shift_mlp, &scale_mlp)),
            &rows,
        )? {
            Some(p) => p,
            None => {
                let a = match gpu_fused::add(&after_self_attn, &h)? {
                    Some(y) => y,
                    None => (&after_self_attn + h)?,
                };
                let n = self.modulated_norm(&self.norm3, &a, &shift_mlp, &scale_mlp)?;
                (a, n)
            }
        };
        let h = self.mlp.forward(&h)?;
        let last = PendingResidual {
            x: after_cross_attn.clone(),
            h,
            gate: gate_mlp,
        };
        Ok((adaln, after_self_attn, after_cross_attn, last))
    }
}

/// A block's last residual, `x + h * gate[b]`, not added yet: the next block adds it, on the GPU
/// in the pass of its first norm (unless `TRELLIS_FUSED_BLOCK_RESIDUAL=0`) (one pass over the tokens
/// fewer per block, the same numbers as the two kernels); [`Self::finish`] adds it alone.
pub struct PendingResidual {
    x: Tensor,
    h: Tensor,
    gate: Tensor,
}

impl PendingResidual {
    /// `x + h * gate[b]`.
    pub fn finish(self) -> Result<Tensor> {
        gated_residual(&self.x, &self.h, &self.gate)
    }
}

/// What a block starts from: tokens `[B, L, C]`, or the previous block's residual still to be
/// added.
pub enum BlockInput {
    Tokens(Tensor),
    Pending(PendingResidual),
}

/// `x + h * gate` with `x`, `h` `[B, L, C]` and `gate` `[B, C]` broadcast over L.
fn gated_residual(x: &Tensor, h: &Tensor, gate: &Tensor) -> Result<Tensor> {
    let (b, l, _) = x.dims3()?;
    let rows: Vec<_> = (0..b).map(|i| i * l..(i + 1) * l).collect();
    if let Some(y) = gpu_fused::gated_add(x, h, gate, &rows)? {
        return Ok(y);
    }
    match super::cpu_fused::gated_add(x, h, gate, rows)? {
        Some(y) => Ok(y),
        None => Ok((x + h.broadcast_mul(&gate.unsqueeze(1)?)?)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn modulate_broadcasts_over_tokens() {
        let x = Tensor::ones((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let shift = Tensor::new(&[[1f32, 0., 0., 0.], [0., 2., 0., 0.]], &Device::Cpu).unwrap();
        let scale = Tensor::new(&[[1f32, 1., 1., 1.], [0., 0., 0., -1.]], &Device::Cpu).unwrap();
        let y: Vec<Vec<Vec<f32>>> = modulate(&x, &shift, &scale).unwrap().to_vec3().unwrap();
        assert_eq!(y[0][2], vec![3., 2., 2., 2.]);
        assert_eq!(y[1][1], vec![1., 3., 1., 0.]);
        // [N, C] with [1, C]
        let xs = Tensor::ones((5, 4), DType::F32, &Device::Cpu).unwrap();
        let y2 = modulate(
            &xs,
            &shift.narrow(0, 0, 1).unwrap(),
            &scale.narrow(0, 0, 1).unwrap(),
        )
        .unwrap();
        assert_eq!(y2.to_vec2::<f32>().unwrap()[4], vec![3., 2., 2., 2.]);
    }

    #[test]
    fn ffn_uses_tanh_gelu() {
        let dev = Device::Cpu;
        let mut t = std::collections::HashMap::new();
        t.insert(
            "mlp.0.weight".to_string(),
            Tensor::new(&[[1f32], [2.0]], &dev).unwrap(),
        );
        t.insert(
            "mlp.0.bias".to_string(),
            Tensor::zeros(2, DType::F32, &dev).unwrap(),
        );
        t.insert(
            "mlp.2.weight".to_string(),
            Tensor::new(&[[1f32, 0.0]], &dev).unwrap(),
        );
        t.insert(
            "mlp.2.bias".to_string(),
            Tensor::zeros(1, DType::F32, &dev).unwrap(),
        );
        let vb = VarBuilder::from_tensors(t, DType::F32, &dev);
        let ffn = FeedForwardNet::new(vb, 1, 2.0).unwrap();
        let x = Tensor::new(&[[1.5f32]], &dev).unwrap();
        let y = ffn.forward(&x).unwrap().to_vec2::<f32>().unwrap()[0][0];
        let v = 1.5f32;
        let tanh_gelu = 0.5
            * v
            * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh());
        assert!((y - tanh_gelu).abs() < 1e-6, "{y} vs {tanh_gelu}");
    }
}
