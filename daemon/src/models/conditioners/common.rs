//! Pieces shared by the Hugging Face conditioners (DINOv2 with registers, CLIP text): their
//! `config.json`, scaled dot-product attention as transformers' eager path computes it, a plain
//! `F.layer_norm`, and the weight check with explicitly accepted extra checkpoint entries.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Tensor, D};

use crate::modules::dense::Dense;
use crate::runtime::weights::WeightCheck;

/// Reads a `config.json` (or any JSON file) of a conditioner directory.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// Most score entries one attention chunk may hold (64 MiB of float32).
const MAX_SCORES: usize = 1 << 24;

/// Multi-head self-attention of the HF encoders: separate q/k/v projections of `h` [B, N, C],
/// split into `heads`, [`attention`] with scale 1/sqrt(D), heads merged back to [B, N, C] (the
/// output projection is the caller's).
pub fn self_attention(
    h: &Tensor,
    (q, k, v): (&Dense, &Dense, &Dense),
    heads: usize,
    causal: bool,
) -> Result<Tensor> {
    let (b, n, c) = h.dims3()?;
    let d = c / heads;
    if !causal && h.device().is_cpu() {
        let rows = |t: Tensor| -> Result<Tensor> { Ok(t.reshape((b, n, heads, d))?) };
        let (q, k, v) = (
            rows(q.forward(h)?)?,
            rows(k.forward(h)?)?,
            rows(v.forward(h)?)?,
        );
        if let Some(o) = crate::modules::attention::cpu_attention(&q, &k, &v)? {
            return Ok(o.reshape((b, n, c))?);
        }
    }
    let split = |t: Tensor| -> Result<Tensor> {
        Ok(t.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous()?)
    };
    let o = attention(
        &split(q.forward(h)?)?,
        &split(k.forward(h)?)?,
        &split(v.forward(h)?)?,
        1.0 / (d as f64).sqrt(),
        causal,
    )?;
    Ok(o.transpose(1, 2)?.reshape((b, n, c))?)
}

/// `softmax(q k^T * scale [+ causal mask]) v` over `[B, H, N, D]` tensors, softmax in float32.
/// Heads are processed in chunks so the score matrix never exceeds [`MAX_SCORES`] entries.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    let (b, h, n, d) = q.dims4()?;
    let m = k.dim(2)?;
    let (q, k, v) = (
        q.reshape((b * h, n, d))?,
        k.reshape((b * h, m, d))?,
        v.reshape((b * h, m, d))?,
    );
    let per = (MAX_SCORES / (n * m).max(1)).max(1);
    let mask = if causal {
        let mut mv = vec![0f32; n * m];
        for i in 0..n {
            for j in (i + 1)..m {
                mv[i * m + j] = f32::NEG_INFINITY;
            }
        }
        Some(Tensor::from_vec(mv, (1, n, m), q.device())?)
    } else {
        None
    };
    let mut outs = Vec::new();
    let mut s = 0;
    while s < b * h {
        let len = per.min(b * h - s);
        let (qc, kc, vc) = (
            q.narrow(0, s, len)?.contiguous()?,
            k.narrow(0, s, len)?.contiguous()?,
            v.narrow(0, s, len)?.contiguous()?,
        );
        let mut scores = (qc.matmul(&kc.t()?)? * scale)?.to_dtype(DType::F32)?;
        if let Some(mask) = &mask {
            scores = scores.broadcast_add(mask)?;
        }
        let p = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(vc.dtype())?;
        outs.push(p.matmul(&vc)?);
        s += len;
    }
    Ok(Tensor::cat(&outs, 0)?.reshape((b, h, n, d))?)
}

/// `F.layer_norm(x, x.shape[-1:])` without affine parameters (computed in float32).
pub fn layer_norm_plain(x: &Tensor, eps: f64) -> Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    let dev = x.device();
    let ones = Tensor::ones(c, DType::F32, dev)?;
    let zeros = Tensor::zeros(c, DType::F32, dev)?;
    let xf = x.to_dtype(DType::F32)?.contiguous()?;
    Ok(candle_nn::ops::layer_norm(&xf, &ones, &zeros, eps as f32)?)
}

/// [`WeightCheck::finish`], except that unexpected entries for which `harmless` returns true are
/// accepted (each conditioner names exactly which extras a checkpoint may carry). Missing,
/// wrong-shaped and other unexpected entries are still reported, all at once.
pub fn finish_accepting(check: WeightCheck, harmless: impl Fn(&str) -> bool) -> Result<()> {
    let Err(mut e) = check.finish() else {
        return Ok(());
    };
    e.problems.retain(|p| {
        p.trim_start()
            .strip_prefix("unexpected: ")
            .is_none_or(|name| !harmless(name))
    });
    if e.problems.is_empty() {
        Ok(())
    } else {
        Err(anyhow!(e))
    }
}

/// The activations a Hugging Face `hidden_act` may name (those these conditioners can meet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// `gelu`: exact (erf) GELU.
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh`: tanh approximation.
    GeluTanh,
    /// `quick_gelu`: `x * sigmoid(1.702 x)`.
    QuickGelu,
    Relu,
    /// `silu` / `swish`.
    Silu,
}

impl Act {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Act::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Act::GeluTanh,
            "quick_gelu" => Act::QuickGelu,
            "relu" => Act::Relu,
            "silu" | "swish" => Act::Silu,
            other => anyhow::bail!("unsupported hidden_act {other:?}"),
        })
    }

    /// `act(l(x))`, the activation fused into the layer where it is a GELU.
    pub fn after(self, l: &Dense, x: &Tensor) -> Result<Tensor> {
        use crate::modules::gpu_fused::Act as Fused;
        match self {
            Act::Gelu => l.forward_act(x, Fused::GeluErf),
            Act::GeluTanh => l.forward_act(x, Fused::GeluTanh),
            _ => self.apply(&l.forward(x)?),
        }
    }

    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Act::Gelu => crate::modules::cpu_fused::gelu_erf(x)?,
            Act::GeluTanh => crate::modules::cpu_fused::gelu_tanh(x)?,
            Act::QuickGelu => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
            Act::Relu => x.relu()?,
            Act::Silu => x.silu()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn causal_attention_first_token_sees_only_itself() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 5, 4), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, 2, 5, 4), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (1, 2, 5, 4), &dev).unwrap();
        let o = attention(&q, &k, &v, 0.5, true).unwrap();
        let first = o.narrow(2, 0, 1).unwrap();
        let v0 = v.narrow(2, 0, 1).unwrap();
        let diff = (first - v0).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }

    #[test]
    fn unlisted_extras_are_still_reported() {
        let dev = Device::Cpu;
        let mut t = std::collections::HashMap::new();
        for n in ["used", "ok_extra", "bad_extra"] {
            t.insert(n.to_string(), Tensor::ones(1, DType::F32, &dev).unwrap());
        }
        let (vb, check) = crate::runtime::weights::from_tensors(t, "t", DType::F32, &dev);
        vb.get(1, "used").unwrap();
        let err = finish_accepting(check, |n| n == "ok_extra").unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("bad_extra") && !msg.contains("ok_extra"),
            "{msg}"
        );
    }
}
