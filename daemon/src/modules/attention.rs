//! Dense multi-head attention: twin of trellis/modules/attention/{modules,full_attn}.py
//! (`MultiHeadAttention` self/cross, full mode, optional qk RMS norm; `scaled_dot_product_attention`).
//!
//! The attention product itself is computed in float32 (as the reference's float32 SDPA does for
//! float16 torsos) over chunks of queries, so memory stays `O(chunk * Lk)` per head instead of
//! `O(Lq * Lk)`.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use trellis_kernels::attention::{
    varlen_attention, varlen_attention_rows, AttnGroup, AttnShape, Rows,
};

use super::context::{select_batch, CrossKv, LayerContext};
use super::dense::{self, Dense};
use super::gpu_fused::{self, Act};
use super::norm::MultiHeadRMSNorm;

/// Largest number of attention scores materialised at once (per call, all heads and batch together).
const SCORE_BUDGET: usize = 1 << 24;

/// Softmax attention with scale `1/sqrt(D)`. `q` `[B, Lq, H, D]`, `k` `[B, Lk, H, D]`, `v` `[B, Lk, H, Dv]`
/// (any float dtype); computed in float32; returns `[B, Lq, H, Dv]` in `q`'s dtype.
pub fn scaled_dot_product_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    attention_in_chunks(q, k, v, SCORE_BUDGET)
}

/// On the CPU: the same attention through the blocked kernel `trellis_kernels::attention`
/// (one group per batch element, threads over query blocks, vectorised softmax), for shapes
/// already checked by the caller. `None` on other devices.
pub fn cpu_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Option<Tensor>> {
    if !q.device().is_cpu() {
        return Ok(None);
    }
    let (b, lq, h, d) = q.dims4()?;
    let lk = k.dim(1)?;
    let dv = v.dim(3)?;
    let rows = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let groups: Vec<AttnGroup> = (0..b)
        .map(|i| AttnGroup {
            q: i * lq..(i + 1) * lq,
            kv: i * lk..(i + 1) * lk,
        })
        .collect();
    let shape = AttnShape {
        heads: h,
        head_dim: d,
        v_dim: dv,
    };
    let scale = 1.0 / (d as f32).sqrt();
    let o = varlen_attention(&rows(q)?, &rows(k)?, &rows(v)?, &groups, shape, scale)?;
    Ok(Some(
        Tensor::from_vec(o, (b, lq, h, dv), q.device())?.to_dtype(q.dtype())?,
    ))
}

/// Self-attention on the CPU straight from a fused projection `qkv` `[B, L, 3·C]` (each row `q`,
/// `k`, `v` of `heads` heads one after the other, as a concatenated q|k|v `Linear` writes them):
/// the kernel reads the three parts in place (no copies); returns `[B, L, C]`, scale
/// `1/sqrt(C/heads)`. `None` unless `qkv` is a float32 CPU tensor.
pub fn cpu_self_attention_qkv(qkv: &Tensor, heads: usize) -> Result<Option<Tensor>> {
    if !qkv.device().is_cpu() || qkv.dtype() != DType::F32 {
        return Ok(None);
    }
    let (b, l, w) = qkv.dims3().context("attention: qkv must be [B, L, 3C]")?;
    if heads == 0 || !w.is_multiple_of(3 * heads) {
        bail!("attention: qkv width {w} is not 3 x {heads} heads");
    }
    let c = w / 3;
    let d = c / heads;
    let qkv = qkv.contiguous()?;
    let (storage, layout) = qkv.storage_and_layout();
    let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(all)) = &*storage else {
        return Ok(None);
    };
    let Some((s0, s1)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    let data = &all[s0..s1];
    let part = |i: usize| Rows {
        data: &data[(i * c).min(data.len())..],
        rows: b * l,
        stride: w,
    };
    let groups: Vec<AttnGroup> = (0..b)
        .map(|i| AttnGroup {
            q: i * l..(i + 1) * l,
            kv: i * l..(i + 1) * l,
        })
        .collect();
    let shape = AttnShape {
        heads,
        head_dim: d,
        v_dim: d,
    };
    let scale = 1.0 / (d as f32).sqrt();
    let o = varlen_attention_rows(part(0), part(1), part(2), &groups, shape, scale)?;
    drop(storage);
    Ok(Some(Tensor::from_vec(o, (b, l, c), qkv.device())?))
}

/// [`scaled_dot_product_attention`] materialising at most about `budget` scores at once.
fn attention_in_chunks(q: &Tensor, k: &Tensor, v: &Tensor, budget: usize) -> Result<Tensor> {
    let (b, lq, h, d) = q.dims4().context("attention: q must be [B, L, H, D]")?;
    let (bk, lk, hk, dk) = k.dims4().context("attention: k must be [B, L, H, D]")?;
    let (bv, lv, hv, _dv) = v.dims4().context("attention: v must be [B, L, H, D]")?;
    if b != bk || b != bv || h != hk || h != hv || d != dk || lk != lv {
        bail!(
            "attention: shapes do not match: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if budget == SCORE_BUDGET {
        if let Some(o) = cpu_attention(q, k, v)? {
            return Ok(o);
        }
        #[cfg(feature = "cuda")]
        if q.device().is_cuda()
            && k.dtype() == q.dtype()
            && v.dtype() == q.dtype()
            && crate::runtime::cuda_ops::flash_attention_supports(q.dtype(), d, _dv)
        {
            // The tensor-core kernel: one group per batch element, no score matrix in memory; q,
            // k and v go in as the (strided) views of their projections, no copies.
            let groups: Vec<AttnGroup> = (0..b)
                .map(|i| AttnGroup {
                    q: i * lq..(i + 1) * lq,
                    kv: i * lk..(i + 1) * lk,
                })
                .collect();
            let o = crate::runtime::cuda_ops::flash_attention(q, k, v, &groups)?;
            return Ok(o.reshape((b, lq, h, _dv))?);
        }
    }
    let out_dtype = q.dtype();
    let scale = 1.0 / (d as f64).sqrt();
    // [B, H, L, D], float32, contiguous
    let to_heads = |t: &Tensor| -> Result<Tensor> {
        Ok(t.to_dtype(DType::F32)?.transpose(1, 2)?.contiguous()?)
    };
    let (q, k, v) = (to_heads(q)?, to_heads(k)?, to_heads(v)?);
    let kt = k.transpose(2, 3)?.contiguous()?;
    let per_query = (b * h * lk).max(1);
    let chunk = (budget / per_query).clamp(1, lq.max(1));
    let mut outs = Vec::with_capacity(lq.div_ceil(chunk));
    let mut start = 0;
    while start < lq {
        let n = chunk.min(lq - start);
        let qc = q.narrow(2, start, n)?;
        let scores = (qc.matmul(&kt)? * scale)?;
        let p = candle_nn::ops::softmax_last_dim(&scores)?;
        outs.push(p.matmul(&v)?);
        start += n;
    }
    let o = if outs.len() == 1 {
        outs.remove(0)
    } else {
        Tensor::cat(&outs, 2)?
    };
    Ok(o.transpose(1, 2)?.contiguous()?.to_dtype(out_dtype)?)
}

/// Self (fused `to_qkv`) or cross (`to_q` + `to_kv` on the context) projections.
#[derive(Debug, Clone)]
enum Projection {
    SelfAttn { to_qkv: Dense },
    Cross { to_q: Dense, to_kv: Dense },
}

/// `MultiHeadAttention(channels, num_heads, ctx_channels, type, attn_mode="full", qkv_bias, qk_rms_norm)`.
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    proj: Projection,
    qk_norm: Option<(MultiHeadRMSNorm, MultiHeadRMSNorm)>,
    to_out: Dense,
    num_heads: usize,
    channels: usize,
}

fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Dense> {
    Ok(if bias {
        dense::linear(in_dim, out_dim, vb)?
    } else {
        dense::linear_no_bias(in_dim, out_dim, vb)?
    })
}

impl MultiHeadAttention {
    /// Self-attention (`to_qkv`, `to_out`, optional `q_rms_norm` / `k_rms_norm`). Linear layers take
    /// `vb`'s dtype; RMS gammas stay float32.
    pub fn new_self(
        vb: VarBuilder,
        channels: usize,
        num_heads: usize,
        qkv_bias: bool,
        qk_rms_norm: bool,
    ) -> Result<Self> {
        let to_qkv = linear(channels, 3 * channels, qkv_bias, vb.pp("to_qkv"))?;
        Self::finish(
            vb,
            Projection::SelfAttn { to_qkv },
            channels,
            num_heads,
            qk_rms_norm,
        )
    }

    /// Cross-attention to a context of `ctx_channels` (`to_q`, `to_kv`, `to_out`).
    pub fn new_cross(
        vb: VarBuilder,
        channels: usize,
        ctx_channels: usize,
        num_heads: usize,
        qkv_bias: bool,
        qk_rms_norm: bool,
    ) -> Result<Self> {
        let to_q = linear(channels, channels, qkv_bias, vb.pp("to_q"))?;
        let to_kv = linear(ctx_channels, 2 * channels, qkv_bias, vb.pp("to_kv"))?;
        Self::finish(
            vb,
            Projection::Cross { to_q, to_kv },
            channels,
            num_heads,
            qk_rms_norm,
        )
    }

    fn finish(
        vb: VarBuilder,
        proj: Projection,
        channels: usize,
        num_heads: usize,
        qk_rms_norm: bool,
    ) -> Result<Self> {
        if num_heads == 0 || !channels.is_multiple_of(num_heads) {
            bail!("MultiHeadAttention: {channels} channels do not split into {num_heads} heads");
        }
        let hd = channels / num_heads;
        let qk_norm = if qk_rms_norm {
            Some((
                MultiHeadRMSNorm::new(vb.pp("q_rms_norm"), hd, num_heads)?,
                MultiHeadRMSNorm::new(vb.pp("k_rms_norm"), hd, num_heads)?,
            ))
        } else {
            None
        };
        let to_out = dense::linear(channels, channels, vb.pp("to_out"))?;
        Ok(Self {
            proj,
            qk_norm,
            to_out,
            num_heads,
            channels,
        })
    }

    /// `x` `[B, L, C]`; `context` `[B, Lc, Cc]` for cross-attention (ignored / required by type).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let (b, l, c) = x
            .dims3()
            .context("MultiHeadAttention: x must be [B, L, C]")?;
        if c != self.channels {
            bail!(
                "MultiHeadAttention: x has {c} channels, expected {}",
                self.channels
            );
        }
        let h = self.num_heads;
        match &self.proj {
            Projection::SelfAttn { to_qkv } => {
                let qkv = gpu_fused::linear(to_qkv, x, Act::None)?.reshape((b, l, 3, h, c / h))?;
                let (q, k, v) = (
                    qkv.get_on_dim(2, 0)?,
                    qkv.get_on_dim(2, 1)?,
                    qkv.get_on_dim(2, 2)?,
                );
                #[cfg(feature = "cuda")]
                if let Some(o) = self.cuda_self_attention_qnorm(&q, &k, &v)? {
                    return gpu_fused::linear(&self.to_out, &o.reshape((b, l, c))?, Act::None);
                }
                let (q, k) = match &self.qk_norm {
                    Some((qn, kn)) => (qn.forward(&q)?, kn.forward(&k)?),
                    None => (q, k),
                };
                let o = scaled_dot_product_attention(&q, &k, &v)?.reshape((b, l, c))?;
                gpu_fused::linear(&self.to_out, &o, Act::None)
            }
            Projection::Cross { to_q, to_kv } => {
                let ctx = context.context("MultiHeadAttention (cross): no context given")?;
                let bc = ctx
                    .dims3()
                    .context("MultiHeadAttention: context must be [B, L, C]")?
                    .0;
                if bc != b {
                    bail!("MultiHeadAttention: context batch {bc} != x batch {b}");
                }
                let (k, v) = self.context_kv(to_kv, ctx)?;
                self.cross_output(to_q, x, &k, &v)
            }
        }
    }

    /// Self-attention of `[B, L, H, D]` views of the fused projection on the tensor-core kernel
    /// with q's RMS norm applied as the kernel loads q (k normalised by its own launch):
    /// `[B, L, H, D]`, or `None` without `qk_rms_norm`, off the GPU or where the kernel does not
    /// take the dtype or head dim ([`scaled_dot_product_attention`] then runs after both norms).
    #[cfg(feature = "cuda")]
    fn cuda_self_attention_qnorm(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Option<Tensor>> {
        use crate::runtime::cuda_ops::{flash_attention_rows_qnorm, flash_attention_supports};
        let Some((qn, kn)) = &self.qk_norm else {
            return Ok(None);
        };
        let (b, lq, h, d) = q.dims4()?;
        if !q.device().is_cuda()
            || k.dtype() != q.dtype()
            || v.dtype() != q.dtype()
            || !flash_attention_supports(q.dtype(), d, v.dim(3)?)
        {
            return Ok(None);
        }
        let lk = k.dim(1)?;
        let groups: Vec<AttnGroup> = (0..b)
            .map(|i| AttnGroup {
                q: i * lq..(i + 1) * lq,
                kv: i * lk..(i + 1) * lk,
            })
            .collect();
        let k = kn.forward(k)?;
        let q_norm = Some((qn.gamma(), qn.scale() as f32));
        let o = flash_attention_rows_qnorm(q, &k, v, &groups, None, q_norm)?;
        Ok(Some(o.reshape((b, lq, h, d))?))
    }

    /// The keys (after `k_rms_norm` when the layer has it) and values of a context `[B, Lc, Cc]`,
    /// `[B, Lc, H, D]` each.
    fn context_kv(&self, to_kv: &Dense, ctx: &Tensor) -> Result<(Tensor, Tensor)> {
        let (bc, lc, _) = ctx
            .dims3()
            .context("MultiHeadAttention: context must be [B, L, C]")?;
        let (h, c) = (self.num_heads, self.channels);
        let kv = gpu_fused::linear(to_kv, ctx, Act::None)?.reshape((bc, lc, 2, h, c / h))?;
        let k = kv.get_on_dim(2, 0)?;
        let k = match &self.qk_norm {
            Some((_, kn)) => kn.forward(&k)?,
            None => k,
        };
        Ok((k, kv.get_on_dim(2, 1)?))
    }

    /// `to_out(attention(to_q(x), k, v))` for `x` `[B, L, C]` and keys / values from
    /// [`Self::context_kv`] (`q_rms_norm` applied to the queries when the layer has it).
    fn cross_output(&self, to_q: &Dense, x: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (b, l, c) = x.dims3()?;
        let h = self.num_heads;
        let q = gpu_fused::linear(to_q, x, Act::None)?.reshape((b, l, h, c / h))?;
        let q = match &self.qk_norm {
            Some((qn, _)) => qn.forward(&q)?,
            None => q,
        };
        let o = scaled_dot_product_attention(&q, k, v)?.reshape((b, l, c))?;
        gpu_fused::linear(&self.to_out, &o, Act::None)
    }
}

impl MultiHeadAttention {
    /// Cross-attention to a context kept across calls ([`super::context`]): its keys and values
    /// are this layer's `ctx.kv` (projected here on the first call), and batch elements whose
    /// context is all zeros get the constant row `to_out(v(0))` without running `to_q`, the
    /// attention or `to_out`. The same result as [`Self::forward`] with `ctx.tokens`.
    pub fn forward_cross_cached(&self, x: &Tensor, ctx: LayerContext<'_>) -> Result<Tensor> {
        let Projection::Cross { to_q, to_kv } = &self.proj else {
            bail!("MultiHeadAttention: forward_cross_cached on a self-attention");
        };
        let (b, l, c) = x
            .dims3()
            .context("MultiHeadAttention: x must be [B, L, C]")?;
        let bc = ctx
            .tokens
            .dims3()
            .context("MultiHeadAttention: context must be [B, L, C]")?
            .0;
        if bc != b || ctx.zero.len() != b || c != self.channels {
            bail!(
                "MultiHeadAttention: context {:?} for x {:?}",
                ctx.tokens.dims(),
                x.dims()
            );
        }
        if ctx.kv.is_none() {
            let project = |t: &Tensor| self.context_kv(to_kv, t);
            let zero_row = |z: &Tensor| -> Result<Tensor> {
                let v0 = gpu_fused::linear(to_kv, z, Act::None)?.narrow(2, c, c)?;
                Ok(gpu_fused::linear(&self.to_out, &v0, Act::None)?.reshape(c)?)
            };
            *ctx.kv = Some(CrossKv::make(ctx.tokens, ctx.zero, project, zero_row)?);
        }
        let Some(kv) = ctx.kv.as_ref() else {
            bail!("MultiHeadAttention: context projections missing");
        };
        let computed = match (&kv.k, &kv.v) {
            (Some(k), Some(v)) if kv.nonzero.len() == b => return self.cross_output(to_q, x, k, v),
            (Some(k), Some(v)) => {
                let o = self.cross_output(to_q, &select_batch(x, &kv.nonzero)?, k, v)?;
                Some(o.reshape((kv.nonzero.len() * l, c))?)
            }
            _ => None,
        };
        let out = kv.join(ctx.zero, &vec![l; b], computed.as_ref(), x.dtype())?;
        Ok(out.reshape((b, l, c))?)
    }
}

/// Naive float64 attention for tests.
#[cfg(test)]
pub(crate) fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    use candle_core::D;
    let d = q.dim(D::Minus1).unwrap();
    let f = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let (q, k, v) = (f(q), f(k), f(v));
    let s = (q
        .matmul(&k.transpose(2, 3).unwrap().contiguous().unwrap())
        .unwrap()
        / (d as f64).sqrt())
    .unwrap();
    let m = s.max_keepdim(D::Minus1).unwrap();
    let e = s.broadcast_sub(&m).unwrap().exp().unwrap();
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
    p.matmul(&v).unwrap().transpose(1, 2).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn chunked_attention_matches_naive() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 37, 3, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 11, 3, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 11, 3, 5), &dev).unwrap();
        let got = scaled_dot_product_attention(&q, &k, &v).unwrap();
        assert_eq!(got.dims(), &[2, 37, 3, 5]);
        let want = naive_attention(&q, &k, &v);
        let err = crate::parity::fixture::rel_l2(&got, &want).unwrap();
        assert!(err < 1e-6, "{err}");
        // 2*3*11 scores per query: a budget of 200 gives chunks of 3 queries
        let chunked = attention_in_chunks(&q, &k, &v, 200).unwrap();
        let err = crate::parity::fixture::rel_l2(&chunked, &want).unwrap();
        assert!(err < 1e-6, "{err}");
        assert!(scaled_dot_product_attention(&q, &k, &q).is_err());
    }

    /// A cross-attention layer of random weights: `channels` -> `ctx` channels, `heads` heads.
    fn random_cross(channels: usize, ctx: usize, heads: usize, rms: bool) -> MultiHeadAttention {
        let dev = Device::Cpu;
        let mut t = std::collections::HashMap::new();
        let mut put = |name: &str, shape: &[usize]| {
            t.insert(
                name.to_string(),
                Tensor::randn(0f32, 0.3, shape, &dev).unwrap(),
            );
        };
        put("to_q.weight", &[channels, channels]);
        put("to_q.bias", &[channels]);
        put("to_kv.weight", &[2 * channels, ctx]);
        put("to_kv.bias", &[2 * channels]);
        put("to_out.weight", &[channels, channels]);
        put("to_out.bias", &[channels]);
        if rms {
            put("q_rms_norm.gamma", &[heads, channels / heads]);
            put("k_rms_norm.gamma", &[heads, channels / heads]);
        }
        let vb = VarBuilder::from_tensors(t, DType::F32, &dev);
        MultiHeadAttention::new_cross(vb, channels, ctx, heads, true, rms).unwrap()
    }

    #[test]
    fn cached_cross_attention_matches_and_skips_zero_contexts() {
        use crate::modules::context::ContextCache;
        let dev = Device::Cpu;
        for rms in [false, true] {
            let attn = random_cross(16, 12, 2, rms);
            let x = Tensor::randn(0f32, 1.0, (3, 7, 16), &dev).unwrap();
            let c = Tensor::randn(0f32, 1.0, (1, 5, 12), &dev).unwrap();
            let z = c.zeros_like().unwrap();
            // every pattern of zero and non-zero contexts over a batch of 3
            for pattern in 0..8u32 {
                let parts: Vec<Tensor> = (0..3)
                    .map(|i| {
                        if pattern & (1 << i) != 0 {
                            z.clone()
                        } else {
                            (&c + i as f64).unwrap()
                        }
                    })
                    .collect();
                let ctx = Tensor::cat(&parts, 0).unwrap();
                let want = attn.forward(&x, Some(&ctx)).unwrap();
                let mut cache = ContextCache::new();
                for _ in 0..2 {
                    let entry = cache.get(&ctx, DType::F32).unwrap();
                    let zeros = entry.zero().iter().filter(|&&z| z).count();
                    assert_eq!(zeros, pattern.count_ones() as usize);
                    let got = attn.forward_cross_cached(&x, entry.layer(0)).unwrap();
                    let err = crate::parity::fixture::rel_l2(&got, &want).unwrap();
                    assert!(err < 1e-5, "pattern {pattern} rms {rms}: {err}");
                }
            }
        }
    }

    #[test]
    fn fused_qkv_attention_matches_naive() {
        let dev = Device::Cpu;
        let (b, l, h, d) = (2, 45, 3, 16);
        let qkv = Tensor::randn(0f32, 1.0, (b, l, 3 * h * d), &dev).unwrap();
        let got = cpu_self_attention_qkv(&qkv, h).unwrap().unwrap();
        assert_eq!(got.dims(), &[b, l, h * d]);
        let parts = qkv.reshape((b, l, 3, h, d)).unwrap();
        let part = |i: usize| parts.get_on_dim(2, i).unwrap();
        let want = naive_attention(&part(0), &part(1), &part(2))
            .reshape((b, l, h * d))
            .unwrap();
        let err = crate::parity::fixture::rel_l2(&got, &want).unwrap();
        assert!(err < 1e-6, "{err}");
    }
}
