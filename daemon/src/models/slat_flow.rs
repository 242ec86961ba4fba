//! `SLatFlowModel` and its `SparseResBlock3d` (twin of `trellis/models/structured_latent_flow.py`):
//! the velocity network of the structured-latent flow.
//!
//! `input_layer` → input `SparseResBlock3d`s (the last of each stage downsamples by 2 *first*) →
//! `+ APE` of the coarse coords → `ModulatedSparseTransformerCrossBlock`s (full self-attention per
//! batch element, cross-attention to the condition) → output res blocks (the first of each stage
//! upsamples; input `cat([h, skip])`) → `F.layer_norm` → `out_layer`.
//!
//! `use_fp16`: `input_blocks`, `blocks` and `out_blocks` hold float16 Linear/conv weights and the
//! activations between `input_layer` and `out_layer` are float16; pass `torso_dtype = F16` to
//! reproduce that, `F32` to run everything in float32. `ElasticSLatFlowModel` checkpoints (a
//! training-time memory wrapper) load into this same network.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use crate::models::config::SLatFlowConfig;
use crate::models::slat_vae::base::ape;
use crate::modules::context::{ContextCache, FlowContext};
use crate::modules::dense::{self, Dense};
use crate::modules::embedders::{AbsolutePositionEmbedder, TimestepEmbedder};
use crate::modules::norm::f_layer_norm;
use crate::modules::sparse::attention::AttnMode;
use crate::modules::sparse::conv::SparseConv3d;
use crate::modules::sparse::linear::SparseLinear;
use crate::modules::sparse::norm::SparseLayerNorm32;
use crate::modules::sparse::spatial::{SparseDownsample, SparseUpsample};
use crate::modules::sparse::tensor::SparseTensor;
use crate::modules::sparse::transformer::{
    BlockInput, CrossBlockArgs, ModulatedSparseTransformerCrossBlock, PendingResidual,
};
use crate::runtime::block_stream::{BlockStream, Blocks};

/// `forward_traced`'s hook: called with each block's name and output, `Some(feats)` replaces them.
type BlockHook<'a> = dyn FnMut(&str, &SparseTensor) -> Result<Option<Tensor>> + 'a;

/// Resampling done at the start of a res block.
#[derive(Debug, Clone)]
pub enum Resample {
    None,
    Down(SparseDownsample),
    Up(SparseUpsample),
}

/// `SparseResBlock3d(channels, emb_channels, out_channels, downsample, upsample)`:
/// `h = conv2(SiLU(norm2(conv1(SiLU(norm1(x)))) * (1 + scale) + shift)) + skip(x)` with
/// `(scale, shift) = emb_layers(SiLU(emb))`, x resampled first.
#[derive(Debug)]
pub struct SparseResBlock3d {
    out_channels: usize,
    norm1: SparseLayerNorm32,
    norm2: SparseLayerNorm32,
    conv1: SparseConv3d,
    conv2: SparseConv3d,
    emb_layer: Dense,
    skip: Option<SparseLinear>,
    resample: Resample,
}

impl SparseResBlock3d {
    pub fn new(
        channels: usize,
        emb_channels: usize,
        out_channels: usize,
        resample: Resample,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            out_channels,
            norm1: SparseLayerNorm32::new(channels, true, 1e-6, vb.pp("norm1"))?,
            norm2: SparseLayerNorm32::new(out_channels, false, 1e-6, vb.pp("norm2"))?,
            conv1: SparseConv3d::new(channels, out_channels, 3, vb.pp("conv1"))?,
            conv2: SparseConv3d::new(out_channels, out_channels, 3, vb.pp("conv2"))?,
            emb_layer: dense::linear(emb_channels, 2 * out_channels, vb.pp("emb_layers").pp("1"))?,
            skip: if channels != out_channels {
                Some(SparseLinear::new(
                    channels,
                    out_channels,
                    vb.pp("skip_connection"),
                )?)
            } else {
                None
            },
            resample,
        })
    }

    /// `emb`: `[B, emb_channels]`.
    pub fn forward(&self, x: &SparseTensor, emb: &Tensor) -> Result<SparseTensor> {
        let e = self.embedding(emb, None, x.dtype())?;
        self.forward_embedded(x, &e)
    }

    /// `emb_layers(emb)` (SiLU, Linear) in `dtype`, `[B, 2 * out_channels]`; `act` is
    /// `silu(emb)` already made by the caller, used when it is in the Linear's dtype.
    pub fn embedding(&self, emb: &Tensor, act: Option<&Tensor>, dtype: DType) -> Result<Tensor> {
        let wd = self.emb_layer.dtype();
        let e = match act.filter(|a| a.dtype() == wd) {
            Some(a) => self.emb_layer.forward(a)?,
            None => self.emb_layer.forward(&emb.to_dtype(wd)?.silu()?)?,
        };
        Ok(e.to_dtype(dtype)?)
    }

    /// [`Self::forward`] given the block's [`Self::embedding`] `e`.
    pub fn forward_embedded(&self, x: &SparseTensor, e: &Tensor) -> Result<SparseTensor> {
        let c = self.out_channels;
        let (scale, shift) = (e.narrow(1, 0, c)?, e.narrow(1, c, c)?);
        // An upsampling block runs norm1, the SiLU and the skip Linear, which act on each row
        // alone, on the coarse rows before the upsample's row copy (the same values on 1/8 of
        // the rows), and conv1 reads the coarse rows through the upsample's index
        // (`SparseConv3d::forward_upsampled`): the wide input is never copied to the fine rows.
        let (x, up) = match &self.resample {
            Resample::None => (x.clone(), None),
            Resample::Down(d) => (d.forward(x)?, None),
            Resample::Up(u) => (x.clone(), Some(u)),
        };
        let h = self.norm1.forward(&x)?;
        let h = h.replace(h.feats().silu()?)?;
        let h = match up {
            Some(u) => self.conv1.forward_upsampled(&h, u)?,
            None => self.conv1.forward(&h)?,
        };
        let h = self.norm2.forward(&h)?.modulate(&shift, &scale)?;
        let h = h.replace(h.feats().silu()?)?;
        let h = self.conv2.forward(&h)?;
        let skip = match &self.skip {
            Some(s) => s.forward(&x)?,
            None => x,
        };
        let skip = match up {
            Some(u) => u.forward(&skip)?,
            None => skip,
        };
        h.add(&skip)
    }
}

/// `SLatFlowModel` (and `ElasticSLatFlowModel`).
#[derive(Debug)]
pub struct SLatFlowModel {
    t_embedder: TimestepEmbedder,
    shared_mod: Option<Dense>,
    pos_embedder: Option<AbsolutePositionEmbedder>,
    input_layer: SparseLinear,
    input_blocks: Vec<SparseResBlock3d>,
    blocks: Blocks<ModulatedSparseTransformerCrossBlock>,
    out_blocks: Vec<SparseResBlock3d>,
    out_layer: SparseLinear,
    use_skip: bool,
    dtype: DType,
}

/// `ElasticSLatFlowModel` is the same network with a training-time memory manager.
pub type ElasticSLatFlowModel = SLatFlowModel;

impl SLatFlowModel {
    /// `torso_dtype`: F16 runs `input_blocks`/`blocks`/`out_blocks` like the original with
    /// `use_fp16`; F32 runs everything in float32 (weights are cast on load either way).
    pub fn new(cfg: &SLatFlowConfig, vb: VarBuilder, torso_dtype: DType) -> Result<Self> {
        Self::placed(cfg, vb, torso_dtype, None)
    }

    /// [`Self::new`] with the transformer blocks streamed from host memory per forward when
    /// `stream` is given (tier `minimal`, `runtime::block_stream`).
    pub fn placed(
        cfg: &SLatFlowConfig,
        vb: VarBuilder,
        torso_dtype: DType,
        stream: Option<&BlockStream>,
    ) -> Result<Self> {
        let mc = cfg.model_channels;
        let io = &cfg.io_block_channels;
        if !io.is_empty() {
            ensure!(
                cfg.patch_size.is_power_of_two() && cfg.patch_size.trailing_zeros() as usize == io.len(),
                "SLatFlowModel: patch_size {} needs log2(patch_size) == {} io_block_channels stages",
                cfg.patch_size,
                io.len()
            );
            ensure!(
                cfg.num_io_res_blocks >= 1,
                "SLatFlowModel: num_io_res_blocks must be at least 1"
            );
        }
        let pos_embedder = match cfg.pe_mode.as_str() {
            "ape" => Some(AbsolutePositionEmbedder::new(mc, 3)?),
            other => bail!("SLatFlowModel: pe_mode {other:?} is not supported (ape); no official checkpoint uses it"),
        };
        let t_embedder = TimestepEmbedder::new(vb.pp("t_embedder"), mc, 256)?;
        let shared_mod = if cfg.share_mod {
            Some(dense::linear(
                mc,
                6 * mc,
                vb.pp("adaLN_modulation").pp("1"),
            )?)
        } else {
            None
        };
        let first = io.first().copied().unwrap_or(mc);
        let input_layer = SparseLinear::new(cfg.in_channels, first, vb.pp("input_layer"))?;
        let ivb = vb.pp("input_blocks").to_dtype(torso_dtype);
        let mut input_blocks = Vec::new();
        let nexts: Vec<usize> = io.iter().skip(1).copied().chain([mc]).collect();
        for (&chs, &next) in io.iter().zip(&nexts) {
            for _ in 0..cfg.num_io_res_blocks - 1 {
                let vb = ivb.pp(input_blocks.len().to_string());
                input_blocks.push(SparseResBlock3d::new(chs, mc, chs, Resample::None, vb)?);
            }
            let vb = ivb.pp(input_blocks.len().to_string());
            let down = Resample::Down(SparseDownsample::new(2));
            input_blocks.push(SparseResBlock3d::new(chs, mc, next, down, vb)?);
        }
        let bvb = vb.pp("blocks").to_dtype(torso_dtype);
        let args = CrossBlockArgs {
            channels: mc,
            ctx_channels: cfg.cond_channels,
            heads: cfg.heads(),
            mlp_ratio: cfg.mlp_ratio,
            mode: AttnMode::Full,
            qk_rms_norm: cfg.qk_rms_norm,
            qk_rms_norm_cross: cfg.qk_rms_norm_cross,
            share_mod: cfg.share_mod,
        };
        let blocks = Blocks::new(cfg.num_blocks, bvb, stream, move |vb| {
            ModulatedSparseTransformerCrossBlock::new(args, vb)
        })?;
        let use_skip = cfg.skip_connection();
        let widen = |c: usize| if use_skip { 2 * c } else { c };
        let ovb = vb.pp("out_blocks").to_dtype(torso_dtype);
        let mut out_blocks = Vec::new();
        let prevs: Vec<usize> = [mc]
            .into_iter()
            .chain(io.iter().skip(1).rev().copied())
            .collect();
        for (&chs, &prev) in io.iter().rev().zip(&prevs) {
            let vb = ovb.pp(out_blocks.len().to_string());
            let up = Resample::Up(SparseUpsample::new(2));
            out_blocks.push(SparseResBlock3d::new(widen(prev), mc, chs, up, vb)?);
            for _ in 0..cfg.num_io_res_blocks - 1 {
                let vb = ovb.pp(out_blocks.len().to_string());
                out_blocks.push(SparseResBlock3d::new(
                    widen(chs),
                    mc,
                    chs,
                    Resample::None,
                    vb,
                )?);
            }
        }
        let out_layer = SparseLinear::new(first, cfg.out_channels, vb.pp("out_layer"))?;
        Ok(Self {
            t_embedder,
            shared_mod,
            pos_embedder,
            input_layer,
            input_blocks,
            blocks,
            out_blocks,
            out_layer,
            use_skip,
            dtype: torso_dtype,
        })
    }

    /// `x`: noisy latents; `t`: `[B]` timesteps already multiplied by 1000; `cond`: `[B, L, C]`.
    /// Returns the predicted velocity on `x`'s coords, in `x`'s dtype.
    pub fn forward(&self, x: &SparseTensor, t: &Tensor, cond: &Tensor) -> Result<SparseTensor> {
        let t_emb = self.timestep_embedding(t)?;
        self.forward_with_t_emb(x, Timestep::Embedding(&t_emb, None), cond, None, None)
    }

    /// [`Self::forward`] with the condition's cross-attention projections kept in `cache` across
    /// calls (the sampler's steps; [`crate::modules::context`]), and the timestep embedding and
    /// every layer's modulation kept for the next call with the same `t` tensor (the other
    /// branch of a guided step).
    pub fn forward_cached(
        &self,
        x: &SparseTensor,
        t: &Tensor,
        cond: &Tensor,
        cache: &mut ContextCache,
    ) -> Result<SparseTensor> {
        if let Some(kept) = cache.timestep(t) {
            return self.forward_with_t_emb(x, Timestep::Kept(&kept), cond, Some(cache), None);
        }
        let t_emb = self.timestep_embedding(t)?;
        let mut made = Vec::new();
        let out = self.forward_with_t_emb(
            x,
            Timestep::Embedding(&t_emb, Some(&mut made)),
            cond,
            Some(cache),
            None,
        )?;
        cache.keep_timestep(t, made);
        Ok(out)
    }

    /// Like `forward`, calling `hook(name, h)` after every block, named `input_block{i}`,
    /// `block{i}`, `out_block{i}`. A hook returning `Some(feats)` replaces that block's output
    /// feats (same coords) for the rest of the network: teacher forcing, to check blocks one by one.
    pub fn forward_traced(
        &self,
        x: &SparseTensor,
        t: &Tensor,
        cond: &Tensor,
        hook: &mut dyn FnMut(&str, &SparseTensor) -> Result<Option<Tensor>>,
    ) -> Result<SparseTensor> {
        let t_emb = self.timestep_embedding(t)?;
        self.forward_with_t_emb(x, Timestep::Embedding(&t_emb, None), cond, None, Some(hook))
    }

    /// The timestep embedding `[B, C]` (float32; with `share_mod`, before the shared modulation).
    pub fn timestep_embedding(&self, t: &Tensor) -> Result<Tensor> {
        self.t_embedder.forward(t)
    }

    fn forward_with_t_emb(
        &self,
        x: &SparseTensor,
        timestep: Timestep<'_>,
        cond: &Tensor,
        cache: Option<&mut ContextCache>,
        mut hook: Option<&mut BlockHook<'_>>,
    ) -> Result<SparseTensor> {
        let dt = self.dtype;
        let mut layers = LayerModulations::new(timestep, |t_emb| {
            let t_emb = match &self.shared_mod {
                Some(l) => l.forward(&t_emb.silu()?)?,
                None => t_emb.clone(),
            };
            Ok(t_emb.to_dtype(dt)?)
        })?;
        let t_emb = layers.t_emb().clone();
        ensure!(
            t_emb.dim(0)? == x.batch_size(),
            "SLatFlowModel: {} timesteps for a batch of {}",
            t_emb.dim(0)?,
            x.batch_size()
        );
        ensure!(
            cond.rank() == 3 && cond.dim(0)? == x.batch_size(),
            "SLatFlowModel: cond {:?} must be [B={}, L, C]",
            cond.dims(),
            x.batch_size()
        );
        let tracing = hook.is_some();
        let mut h = self.input_layer.forward(x)?.to_dtype(dt)?;
        let mut ctx = FlowContext::new(cond, dt, cache)?;
        let mut skips = Vec::with_capacity(self.input_blocks.len());
        // A hook's replacement feats (same coords) for the rest of the network.
        let mut traced = |name: String, h: SparseTensor| -> Result<SparseTensor> {
            match hook.as_mut() {
                Some(hook) => match hook(&name, &h)? {
                    Some(f) => h.replace(f.to_dtype(dt)?),
                    None => Ok(h),
                },
                None => Ok(h),
            }
        };
        for (i, b) in self.input_blocks.iter().enumerate() {
            let e = layers.next(|act| b.embedding(&t_emb, Some(act), dt))?;
            h = traced(format!("input_block{i}"), b.forward_embedded(&h, &e)?)?;
            skips.push(h.feats().clone());
        }
        if let Some(pe) = &self.pos_embedder {
            h = h.replace(h.feats().add(&ape(pe, &h)?.to_dtype(dt)?)?)?;
        }
        if tracing {
            self.blocks.for_each(|i, b| {
                let m = layers.next(|act| b.modulation(&t_emb, Some(act), dt))?;
                h = traced(
                    format!("block{i}"),
                    b.forward_modulated(BlockInput::Tokens(h.clone()), &m, ctx.layer(i))?
                        .finish()?,
                )?;
                Ok(())
            })?;
        } else {
            // Untraced, each block's last residual goes to the next block, which adds it
            // before its first norm (`modules::norm::fused_block_residual`: in one pass).
            let mut pending: Option<PendingResidual> = None;
            self.blocks.for_each(|i, b| {
                let input = match pending.take() {
                    Some(p) => BlockInput::Pending(p),
                    None => BlockInput::Tokens(h.clone()),
                };
                let m = layers.next(|act| b.modulation(&t_emb, Some(act), dt))?;
                pending = Some(b.forward_modulated(input, &m, ctx.layer(i))?);
                Ok(())
            })?;
            if let Some(p) = pending {
                h = p.finish()?;
            }
        }
        for (i, (b, skip)) in self.out_blocks.iter().zip(skips.iter().rev()).enumerate() {
            let input = if self.use_skip { h.cat_feats(skip)? } else { h };
            let e = layers.next(|act| b.embedding(&t_emb, Some(act), dt))?;
            h = traced(format!("out_block{i}"), b.forward_embedded(&input, &e)?)?;
        }
        layers.finish()?;
        let h = h.replace(f_layer_norm(h.feats())?)?.to_dtype(x.dtype())?;
        self.out_layer.forward(&h)
    }
}

/// The timestep side of one flow forward: the raw embedding (with `Some(made)`, what the forward
/// makes from it is pushed there for [`ContextCache::keep_timestep`]), or what an earlier forward
/// at the same timesteps made ([`crate::modules::context::TimestepMemo`]'s layout).
pub enum Timestep<'a> {
    Embedding(&'a Tensor, Option<&'a mut Vec<Tensor>>),
    Kept(&'a [Tensor]),
}

/// Hands out a forward's timestep embedding and its layers' modulations in order: made from the
/// embedding (its SiLU computed once for all layers) or taken from a [`Timestep::Kept`] list.
pub struct LayerModulations<'a> {
    t_emb: Tensor,
    act: Option<Tensor>,
    kept: Option<&'a [Tensor]>,
    made: Option<&'a mut Vec<Tensor>>,
    next: usize,
}

impl<'a> LayerModulations<'a> {
    /// `embed` maps the raw embedding to the one the layers take (shared modulation, dtype).
    pub fn new(
        timestep: Timestep<'a>,
        embed: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Self> {
        Ok(match timestep {
            Timestep::Kept(kept) => Self {
                t_emb: kept
                    .first()
                    .cloned()
                    .context("kept timestep layers without the embedding")?,
                act: None,
                kept: Some(kept),
                made: None,
                next: 1,
            },
            Timestep::Embedding(raw, mut made) => {
                let t_emb = embed(raw)?;
                if let Some(m) = made.as_deref_mut() {
                    m.clear();
                    m.push(t_emb.clone());
                }
                Self {
                    t_emb,
                    act: None,
                    kept: None,
                    made,
                    next: 1,
                }
            }
        })
    }

    /// The embedding the layers take.
    pub fn t_emb(&self) -> &Tensor {
        &self.t_emb
    }

    /// The next layer's modulation: kept, or `make(silu(t_emb))`.
    pub fn next(&mut self, make: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let i = self.next;
        self.next += 1;
        if let Some(kept) = self.kept {
            return kept
                .get(i)
                .cloned()
                .with_context(|| format!("kept timestep layers: no layer {i}"));
        }
        let act = match &self.act {
            Some(a) => a.clone(),
            None => {
                let a = self.t_emb.silu()?;
                self.act = Some(a.clone());
                a
            }
        };
        let m = make(&act)?;
        if let Some(made) = self.made.as_deref_mut() {
            made.push(m.clone());
        }
        Ok(m)
    }

    /// Checks that a kept list had exactly the layers this forward took.
    pub fn finish(&self) -> Result<()> {
        if let Some(kept) = self.kept {
            ensure!(
                kept.len() == self.next,
                "kept timestep layers: {} kept, {} used",
                kept.len(),
                self.next
            );
        }
        Ok(())
    }
}
