//! `SparseMultiHeadAttention` (twin of `trellis/modules/sparse/attention/{modules,full_attn,
//! windowed_attn}.py`): self-attention over each batch element ("full") or over each
//! (batch, window) group ("windowed", the swin mode of the SLat VAEs, with a shift), and
//! cross-attention from the voxels of batch element b to a dense context `[B, L, C_ctx]`.
//!
//! Fused projections: `to_qkv(x).reshape(N, 3, H, D)`, `to_kv(ctx).reshape(B, L, 2, H, D)`. The
//! optional q/k RMS norm is `normalize(x) * gamma[H, D] * sqrt(D)` in f32. Attention itself runs in
//! `trellis_kernels::attention::varlen_attention` (f32, tiled, softmax scale 1/sqrt(D)).

use anyhow::{bail, ensure, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use trellis_kernels::attention::{varlen_attention, AttnGroup, AttnShape};

use super::linear::SparseLinear;
use super::tensor::{to_f32_vec, SparseTensor};
use crate::modules::context::{select_rows, CrossKv, LayerContext};
use crate::modules::norm::MultiHeadRMSNorm;

/// How self-attention groups tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnMode {
    /// Every voxel of a batch element attends to every other voxel of it.
    Full,
    /// Swin: groups = (batch, window) with window index `(coord + shift) // window` per axis.
    Windowed { window: usize, shift: usize },
}

impl AttnMode {
    /// From the constructor arguments `attn_mode` / `window_size` / `shift_window`.
    pub fn from_args(mode: &str, window: Option<usize>, shift: Option<usize>) -> Result<Self> {
        match mode {
            "full" => Ok(Self::Full),
            "windowed" => {
                let Some(window) = window else {
                    bail!("windowed attention needs a window_size")
                };
                Ok(Self::Windowed {
                    window,
                    shift: shift.unwrap_or(0),
                })
            }
            other => bail!("sparse attention mode {other:?} is not supported (full, windowed)"),
        }
    }
}

#[derive(Debug, Clone)]
enum Projection {
    SelfAttn {
        to_qkv: SparseLinear,
        mode: AttnMode,
    },
    Cross {
        to_q: SparseLinear,
        to_kv: SparseLinear,
    },
}

#[derive(Debug, Clone)]
pub struct SparseMultiHeadAttention {
    channels: usize,
    heads: usize,
    proj: Projection,
    rms: Option<(MultiHeadRMSNorm, MultiHeadRMSNorm)>,
    to_out: SparseLinear,
}

/// What the self-attention projections produce (for parity checks of intermediates).
pub struct SelfAttnTrace {
    /// `[N, 3, H, D]`, before the RMS norm.
    pub qkv: Tensor,
    /// `[N, H, D]` after the RMS norm (None without `qk_rms_norm`).
    pub q_normed: Option<Tensor>,
    pub k_normed: Option<Tensor>,
}

impl SparseMultiHeadAttention {
    /// Self-attention (`type="self"`).
    pub fn new_self(
        channels: usize,
        heads: usize,
        mode: AttnMode,
        qk_rms_norm: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        Self::check_heads(channels, heads)?;
        let to_qkv = SparseLinear::new(channels, 3 * channels, vb.pp("to_qkv"))?;
        Self::finish(
            channels,
            heads,
            Projection::SelfAttn { to_qkv, mode },
            qk_rms_norm,
            vb,
        )
    }

    /// Cross-attention to a dense context (`type="cross"`, always full).
    pub fn new_cross(
        channels: usize,
        ctx_channels: usize,
        heads: usize,
        qk_rms_norm: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        Self::check_heads(channels, heads)?;
        let to_q = SparseLinear::new(channels, channels, vb.pp("to_q"))?;
        let to_kv = SparseLinear::new(ctx_channels, 2 * channels, vb.pp("to_kv"))?;
        Self::finish(
            channels,
            heads,
            Projection::Cross { to_q, to_kv },
            qk_rms_norm,
            vb,
        )
    }

    fn check_heads(channels: usize, heads: usize) -> Result<()> {
        ensure!(
            heads > 0 && channels.is_multiple_of(heads),
            "attention: {channels} channels are not divisible by {heads} heads"
        );
        Ok(())
    }

    fn finish(
        channels: usize,
        heads: usize,
        proj: Projection,
        qk_rms_norm: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let d = channels / heads;
        let rms = if qk_rms_norm {
            Some((
                MultiHeadRMSNorm::new(vb.pp("q_rms_norm"), d, heads)?,
                MultiHeadRMSNorm::new(vb.pp("k_rms_norm"), d, heads)?,
            ))
        } else {
            None
        };
        let to_out = SparseLinear::new(channels, channels, vb.pp("to_out"))?;
        Ok(Self {
            channels,
            heads,
            proj,
            rms,
            to_out,
        })
    }

    fn head_dim(&self) -> usize {
        self.channels / self.heads
    }

    /// `to_qkv(x)` as `[N, 3, H, D]`.
    fn self_qkv(&self, x: &SparseTensor) -> Result<Tensor> {
        let Projection::SelfAttn { to_qkv, .. } = &self.proj else {
            bail!("self_projections called on a cross-attention module")
        };
        Ok(to_qkv
            .forward(x)?
            .feats()
            .reshape((x.rows(), 3, self.heads, self.head_dim()))?)
    }

    /// The self-attention projections: `qkv [N, 3, H, D]` and the normed q / k.
    pub fn self_projections(&self, x: &SparseTensor) -> Result<SelfAttnTrace> {
        let qkv = self.self_qkv(x)?;
        let (q_normed, k_normed) = match &self.rms {
            Some((qn, kn)) => (
                Some(qn.forward(&qkv.narrow(1, 0, 1)?.squeeze(1)?)?),
                Some(kn.forward(&qkv.narrow(1, 1, 1)?.squeeze(1)?)?),
            ),
            None => (None, None),
        };
        Ok(SelfAttnTrace {
            qkv,
            q_normed,
            k_normed,
        })
    }

    /// Self-attention forward.
    pub fn forward(&self, x: &SparseTensor) -> Result<SparseTensor> {
        let Projection::SelfAttn { mode, .. } = &self.proj else {
            bail!("this SparseMultiHeadAttention is a cross-attention: call forward_cross")
        };
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return self.forward_self_cuda(x, *mode, &self.self_qkv(x)?);
        }
        let t = self.self_projections(x)?;
        let q = match &t.q_normed {
            Some(q) => q.clone(),
            None => t.qkv.narrow(1, 0, 1)?.squeeze(1)?,
        };
        let k = match &t.k_normed {
            Some(k) => k.clone(),
            None => t.qkv.narrow(1, 1, 1)?.squeeze(1)?,
        };
        let v = t.qkv.narrow(1, 2, 1)?.squeeze(1)?;
        let (q, k, v) = (to_f32_vec(&q)?, to_f32_vec(&k)?, to_f32_vec(&v)?);
        let shape = AttnShape {
            heads: self.heads,
            head_dim: self.head_dim(),
            v_dim: self.head_dim(),
        };
        let scale = 1.0 / (self.head_dim() as f32).sqrt();
        let out = match *mode {
            AttnMode::Full => {
                let groups: Vec<AttnGroup> = x
                    .layout()
                    .iter()
                    .map(|r| AttnGroup {
                        q: r.clone(),
                        kv: r.clone(),
                    })
                    .collect();
                varlen_attention(&q, &k, &v, &groups, shape, scale)?
            }
            AttnMode::Windowed { window, shift } => {
                let p = x
                    .geometry()
                    .window_partition([window; 3], [shift as i32; 3])?;
                let row = self.channels;
                let permute = |src: &[f32]| -> Vec<f32> {
                    let mut dst = vec![0f32; src.len()];
                    for (i, &r) in p.fwd.iter().enumerate() {
                        let r = r as usize;
                        dst[i * row..(i + 1) * row].copy_from_slice(&src[r * row..(r + 1) * row]);
                    }
                    dst
                };
                let (q, k, v) = (permute(&q), permute(&k), permute(&v));
                let mut groups = Vec::with_capacity(p.seq_lens.len());
                let mut start = 0;
                for &len in &p.seq_lens {
                    groups.push(AttnGroup {
                        q: start..start + len,
                        kv: start..start + len,
                    });
                    start += len;
                }
                let o = varlen_attention(&q, &k, &v, &groups, shape, scale)?;
                let mut out = vec![0f32; o.len()];
                for (i, &r) in p.fwd.iter().enumerate() {
                    let r = r as usize;
                    out[r * row..(r + 1) * row].copy_from_slice(&o[i * row..(i + 1) * row]);
                }
                out
            }
        };
        self.output(x, out)
    }

    /// Cross-attention forward: `context` is dense `[B, L, C_ctx]`.
    pub fn forward_cross(&self, x: &SparseTensor, context: &Tensor) -> Result<SparseTensor> {
        let Projection::Cross { to_q, to_kv } = &self.proj else {
            bail!("this SparseMultiHeadAttention is a self-attention: call forward")
        };
        ensure!(
            context.rank() == 3 && context.dim(0)? == x.batch_size(),
            "cross-attention: context {:?} must be [B={}, L, C]",
            context.dims(),
            x.batch_size()
        );
        if self.rms.is_some() {
            // The original's unbind on a dense [B, L, 2, H, D] context is broken for L != 2.
            bail!("cross-attention with qk_rms_norm and a dense context is not supported (broken upstream)");
        }
        let l = context.dims3()?.1;
        let (k, v) = self.context_kv(to_kv, context)?;
        let groups: Vec<AttnGroup> = x
            .layout()
            .iter()
            .enumerate()
            .map(|(i, r)| AttnGroup {
                q: r.clone(),
                kv: i * l..(i + 1) * l,
            })
            .collect();
        x.replace(self.cross_rows(to_q, x.feats(), &k, &v, &groups)?)
    }

    /// The keys and values of a dense context `[B, L, C_ctx]`, `[B * L, H, D]` each.
    fn context_kv(&self, to_kv: &SparseLinear, context: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, l, _) = context.dims3()?;
        let (h, d) = (self.heads, self.head_dim());
        let kv = to_kv.forward_dense(context)?.reshape((b * l, 2, h, d))?;
        Ok((
            kv.narrow(1, 0, 1)?.squeeze(1)?,
            kv.narrow(1, 1, 1)?.squeeze(1)?,
        ))
    }

    /// `to_out` of the attention from `to_q(feats)` (`[n, C]` in the tokens' dtype) to `k` / `v`
    /// by `groups` (query ranges into the `n` rows): on the GPU the fused kernel, elsewhere the
    /// float32 varlen kernel; `[n, C]` in `feats`' dtype.
    fn cross_rows(
        &self,
        to_q: &SparseLinear,
        feats: &Tensor,
        k: &Tensor,
        v: &Tensor,
        groups: &[AttnGroup],
    ) -> Result<Tensor> {
        let (h, d, c) = (self.heads, self.head_dim(), self.channels);
        let n = feats.dim(0)?;
        let q = to_q.forward_dense(feats)?;
        #[cfg(feature = "cuda")]
        if feats.device().is_cuda() {
            let q = q.reshape((n, h, d))?;
            let o = crate::runtime::cuda_ops::attention(&q, k, v, groups)?;
            let o = o.reshape((n, c))?.to_dtype(feats.dtype())?;
            return self.to_out.forward_dense(&o);
        }
        let shape = AttnShape {
            heads: h,
            head_dim: d,
            v_dim: d,
        };
        let o = varlen_attention(
            &to_f32_vec(&q)?,
            &to_f32_vec(k)?,
            &to_f32_vec(v)?,
            groups,
            shape,
            1.0 / (d as f32).sqrt(),
        )?;
        let o = Tensor::from_vec(o, (n, c), feats.device())?.to_dtype(feats.dtype())?;
        self.to_out.forward_dense(&o)
    }

    /// Cross-attention to a context kept across calls ([`crate::modules::context`]): the keys
    /// and values are this layer's `ctx.kv` (projected on the first call), and the rows of batch
    /// elements whose context is all zeros get the constant row `to_out(v(0))` without `to_q`,
    /// the attention or `to_out`. The same result as [`Self::forward_cross`] with `ctx.tokens`.
    pub fn forward_cross_cached(
        &self,
        x: &SparseTensor,
        ctx: LayerContext<'_>,
    ) -> Result<SparseTensor> {
        let Projection::Cross { to_q, to_kv } = &self.proj else {
            bail!("this SparseMultiHeadAttention is a self-attention: call forward")
        };
        let b = x.batch_size();
        ensure!(
            ctx.tokens.rank() == 3 && ctx.tokens.dim(0)? == b && ctx.zero.len() == b,
            "cross-attention: context {:?} must be [B={b}, L, C]",
            ctx.tokens.dims(),
        );
        if self.rms.is_some() {
            bail!("cross-attention with qk_rms_norm and a dense context is not supported (broken upstream)");
        }
        let l = ctx.tokens.dims3()?.1;
        let c = self.channels;
        if ctx.kv.is_none() {
            let project = |t: &Tensor| self.context_kv(to_kv, t);
            let zero_row = |z: &Tensor| -> Result<Tensor> {
                let v0 = to_kv.forward_dense(z)?.narrow(2, c, c)?;
                self.to_out
                    .forward_dense(&v0)?
                    .reshape(c)
                    .map_err(Into::into)
            };
            *ctx.kv = Some(CrossKv::make(ctx.tokens, ctx.zero, project, zero_row)?);
        }
        let Some(kv) = ctx.kv.as_ref() else {
            bail!("cross-attention: context projections missing");
        };
        let layout = x.layout();
        // the rows of the non-zero elements and their groups (keys of the j-th non-zero element)
        let ranges: Vec<std::ops::Range<usize>> =
            kv.nonzero.iter().map(|&i| layout[i].clone()).collect();
        let mut groups = Vec::with_capacity(ranges.len());
        let mut start = 0;
        for (j, r) in ranges.iter().enumerate() {
            groups.push(AttnGroup {
                q: start..start + r.len(),
                kv: j * l..(j + 1) * l,
            });
            start += r.len();
        }
        let computed = match (&kv.k, &kv.v) {
            (Some(k), Some(v)) if kv.nonzero.len() == b => {
                return x.replace(self.cross_rows(to_q, x.feats(), k, v, &groups)?);
            }
            (Some(k), Some(v)) if start > 0 => {
                let feats = select_rows(x.feats(), &ranges)?;
                Some(self.cross_rows(to_q, &feats, k, v, &groups)?)
            }
            _ => None,
        };
        let lens: Vec<usize> = layout.iter().map(|r| r.len()).collect();
        x.replace(kv.join(ctx.zero, &lens, computed.as_ref(), x.dtype())?)
    }

    /// Self-attention on the GPU from `qkv` `[N, 3, H, D]`: q/k/v stay on the device as views of
    /// it. Where the flash kernel takes the dtype and head dim, it attends windows in window order
    /// through its row permutation and applies q's RMS norm as it loads q (k is normalised by its
    /// own launch); otherwise both norms run first and windows are a gather into window order
    /// and back.
    #[cfg(feature = "cuda")]
    fn forward_self_cuda(
        &self,
        x: &SparseTensor,
        mode: AttnMode,
        qkv: &Tensor,
    ) -> Result<SparseTensor> {
        use crate::runtime::cuda_ops::{
            attention as gpu_attention, flash_attention_rows_qnorm, flash_attention_supports,
        };
        let part = |i: usize| -> Result<Tensor> { Ok(qkv.narrow(1, i, 1)?.squeeze(1)?) };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let d = self.head_dim();
        // q, k and v are views of one tensor: one dtype.
        let flash = flash_attention_supports(qkv.dtype(), d, d);
        let (q, k, q_norm) = match &self.rms {
            Some((qn, kn)) if flash => (q, kn.forward(&k)?, Some((qn.gamma(), qn.scale() as f32))),
            Some((qn, kn)) => (qn.forward(&q)?, kn.forward(&k)?, None),
            None => (q, k, None),
        };
        let (q, k, v) = (&q, &k, &v);
        let o = match mode {
            AttnMode::Full => {
                let groups: Vec<AttnGroup> = x
                    .layout()
                    .iter()
                    .map(|r| AttnGroup {
                        q: r.clone(),
                        kv: r.clone(),
                    })
                    .collect();
                if flash {
                    flash_attention_rows_qnorm(q, k, v, &groups, None, q_norm)?
                } else {
                    gpu_attention(q, k, v, &groups)?
                }
            }
            AttnMode::Windowed { window, shift } => {
                let p = x
                    .geometry()
                    .window_partition([window; 3], [shift as i32; 3])?;
                let dev = x.device();
                let mut groups = Vec::with_capacity(p.seq_lens.len());
                let mut start = 0;
                for &len in &p.seq_lens {
                    groups.push(AttnGroup {
                        q: start..start + len,
                        kv: start..start + len,
                    });
                    start += len;
                }
                if flash {
                    // Window order through the kernel's row permutation: no gather, no scatter.
                    let o = flash_attention_rows_qnorm(q, k, v, &groups, Some(&p.fwd), q_norm)?;
                    return self.output_tensor(x, o.reshape((x.rows(), self.channels))?);
                }
                let fwd = Tensor::from_slice(&p.fwd, p.fwd.len(), dev)?;
                // (candle's CUDA index_select reads contiguous tensors only; q/k/v are views)
                let (qw, kw, vw) = (
                    q.contiguous()?.index_select(&fwd, 0)?,
                    k.contiguous()?.index_select(&fwd, 0)?,
                    v.contiguous()?.index_select(&fwd, 0)?,
                );
                let o = gpu_attention(&qw, &kw, &vw, &groups)?;
                // row fwd[i] of the input is row i of `o`
                let mut inv = vec![0u32; p.fwd.len()];
                for (i, &r) in p.fwd.iter().enumerate() {
                    inv[r as usize] = i as u32;
                }
                o.index_select(&Tensor::from_vec(inv, p.fwd.len(), dev)?, 0)?
            }
        };
        self.output_tensor(x, o.reshape((x.rows(), self.channels))?)
    }

    #[cfg(feature = "cuda")]
    fn output_tensor(&self, x: &SparseTensor, out: Tensor) -> Result<SparseTensor> {
        self.to_out.forward(&x.replace(out.to_dtype(x.dtype())?)?)
    }

    fn output(&self, x: &SparseTensor, out: Vec<f32>) -> Result<SparseTensor> {
        let t =
            Tensor::from_vec(out, (x.rows(), self.channels), x.device())?.to_dtype(x.dtype())?;
        self.to_out.forward(&x.replace(t)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modules::context::ContextCache;
    use candle_core::{DType, Device};

    #[test]
    fn cached_cross_attention_matches_and_skips_zero_contexts() {
        let dev = Device::Cpu;
        let (c, cc, heads) = (16, 12, 2);
        let mut t = std::collections::HashMap::new();
        for (name, shape) in [
            ("to_q.weight", vec![c, c]),
            ("to_q.bias", vec![c]),
            ("to_kv.weight", vec![2 * c, cc]),
            ("to_kv.bias", vec![2 * c]),
            ("to_out.weight", vec![c, c]),
            ("to_out.bias", vec![c]),
        ] {
            t.insert(
                name.to_string(),
                Tensor::randn(0f32, 0.3, shape, &dev).unwrap(),
            );
        }
        let vb = VarBuilder::from_tensors(t, DType::F32, &dev);
        let attn = SparseMultiHeadAttention::new_cross(c, cc, heads, false, vb).unwrap();
        // batch elements of 4, 5 and 3 voxels
        let mut coords = Vec::new();
        for (b, n) in [(0, 4), (1, 5), (2, 3)] {
            for i in 0..n {
                coords.extend([b, i, 2 * i, 1]);
            }
        }
        let feats = Tensor::randn(0f32, 1.0, (12, c), &dev).unwrap();
        let x = SparseTensor::new(coords, feats).unwrap();
        let ctx1 = Tensor::randn(0f32, 1.0, (1, 6, cc), &dev).unwrap();
        for pattern in 0..8u32 {
            let parts: Vec<Tensor> = (0..3)
                .map(|i| {
                    if pattern & (1 << i) != 0 {
                        ctx1.zeros_like().unwrap()
                    } else {
                        (&ctx1 * (1.0 + i as f64)).unwrap()
                    }
                })
                .collect();
            let ctx = Tensor::cat(&parts, 0).unwrap();
            let want = attn.forward_cross(&x, &ctx).unwrap();
            let mut cache = ContextCache::new();
            for _ in 0..2 {
                let entry = cache.get(&ctx, DType::F32).unwrap();
                let got = attn.forward_cross_cached(&x, entry.layer(5)).unwrap();
                assert_eq!(got.rows(), 12);
                let err = crate::parity::fixture::rel_l2(got.feats(), want.feats()).unwrap();
                assert!(err < 1e-5, "pattern {pattern}: {err}");
            }
        }
        // a context of the wrong batch is an error, not a panic
        let mut cache = ContextCache::new();
        let entry = cache.get(&ctx1, DType::F32).unwrap();
        assert!(attn.forward_cross_cached(&x, entry.layer(0)).is_err());
    }
}
