//! Normalisation layers: twin of trellis/modules/norm.py (`LayerNorm32`, `GroupNorm32`,
//! `ChannelLayerNorm32`), `MultiHeadRMSNorm` (trellis/modules/attention/modules.py), the flows' final
//! `F.layer_norm`, and the statistics of `SparseGroupNorm32` (trellis/modules/sparse/norm.py) as a
//! plain function on `(feats [N, C], batch row ranges)`.
//!
//! Every layer computes in float32 whatever the input dtype and returns the input dtype, as the
//! `*32` classes do. Statistics are two-pass (mean, then mean of squared deviations: biased variance).

use std::ops::Range;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

use super::{cpu_fused, gpu_fused};

/// `(x - mean) / sqrt(var + eps)` with the statistics taken over `dims` (biased variance), float32.
fn standardize(x: &Tensor, dims: &[usize], eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(dims)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(dims)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    Ok(xc.broadcast_mul(&rstd)?)
}

/// Multiplies by `weight` and adds `bias` (each optional), both reshaped to `shape` for broadcasting.
fn affine(
    x: Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    shape: &[usize],
) -> Result<Tensor> {
    let mut y = x;
    if let Some(w) = weight {
        y = y.broadcast_mul(&w.to_dtype(DType::F32)?.reshape(shape)?)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(&b.to_dtype(DType::F32)?.reshape(shape)?)?;
    }
    Ok(y)
}

/// A 1-D parameter of `channels` entries, always float32 (norm parameters stay float32 in fp16 torsos).
fn param(vb: &VarBuilder, channels: usize, name: &str) -> Result<Tensor> {
    Ok(vb.to_dtype(DType::F32).get(channels, name)?)
}

/// `TRELLIS_FUSED_RESIDUAL_NORM=0`: the residual and the norm after it as two kernels (to compare);
/// default one fused pass. Read once per process.
fn fused_residual() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("TRELLIS_FUSED_RESIDUAL_NORM").map_or(true, |v| v.trim() != "0")
    })
}

/// `TRELLIS_FUSED_BLOCK_RESIDUAL`: whether a flow's transformer block adds the previous block's
/// last residual in the pass of its first norm on the GPU (`add_layer_norm` with a gate and a
/// modulation at once; `doctor --check-kernels` checks that combination bit for bit). On by
/// default (H100, session 15: SLat flow 17.0 against 17.2-17.3 ms per forward, SS 14.9 against
/// 15.0-15.1); `0` adds the residual alone, as before. Read once per process.
pub fn fused_block_residual() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("TRELLIS_FUSED_BLOCK_RESIDUAL").map_or(true, |v| v.trim() != "0")
    })
}

/// `LayerNorm32(channels, elementwise_affine, eps)` over the last dimension; any rank (`[B, L, C]`,
/// `[N, C]`, ...).
#[derive(Debug, Clone)]
pub struct LayerNorm32 {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm32 {
    /// Reads `weight` / `bias` (float32) when `affine`.
    pub fn new(vb: VarBuilder, channels: usize, affine: bool, eps: f64) -> Result<Self> {
        let (weight, bias) = if affine {
            (
                Some(param(&vb, channels, "weight")?),
                Some(param(&vb, channels, "bias")?),
            )
        } else {
            (None, None)
        };
        Ok(Self { weight, bias, eps })
    }

    pub fn from_parts(weight: Option<Tensor>, bias: Option<Tensor>, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    fn affine_params(&self) -> Option<(&Tensor, &Tensor)> {
        self.weight.as_ref().zip(self.bias.as_ref())
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.weight.is_some() == self.bias.is_some() {
            if let Some(y) = cpu_fused::layer_norm(x, self.eps, self.affine_params(), None)? {
                return Ok(y);
            }
            if let Some(y) = gpu_fused::layer_norm(x, self.eps, self.affine_params(), None)? {
                return Ok(y);
            }
        }
        self.forward_candle(x)
    }

    /// The norm followed by the adaLN modulation `y * (1 + scale[b]) + shift[b]` in one fused
    /// pass, where batch element `b` (`shift`, `scale` `[B, C]`) owns the rows `rows[b]` of `x`
    /// seen as `[rows, C]`. `None` (nothing computed) unless `x` is a float32 CPU tensor or a GPU
    /// tensor the fused kernels cover.
    pub fn forward_modulated(
        &self,
        x: &Tensor,
        shift: &Tensor,
        scale: &Tensor,
        rows: Vec<Range<usize>>,
    ) -> Result<Option<Tensor>> {
        if self.weight.is_some() != self.bias.is_some() {
            return Ok(None);
        }
        if x.device().is_cuda() {
            let m = Some((shift, scale, &rows[..]));
            return gpu_fused::layer_norm(x, self.eps, self.affine_params(), m);
        }
        if !(x.device().is_cpu() && x.dtype() == DType::F32) {
            return Ok(None);
        }
        let m = cpu_fused::RowModulation::new(shift, scale, rows)?;
        cpu_fused::layer_norm(x, self.eps, self.affine_params(), Some(m))
    }

    /// `x + h` (or `x + h * gate[b]`), then the norm of that sum with the optional modulation
    /// `(shift, scale)`, in one fused pass on the GPU: `(sum, normed)`, batch element `b` owning
    /// the rows `rows[b]` of `x` seen as `[rows, C]`. `None` (nothing computed) off the GPU or
    /// where the fused kernels do not apply; the caller then runs the residual and the norm.
    pub fn forward_after_residual(
        &self,
        x: &Tensor,
        h: &Tensor,
        gate: Option<&Tensor>,
        modulation: Option<(&Tensor, &Tensor)>,
        rows: &[Range<usize>],
    ) -> Result<Option<(Tensor, Tensor)>> {
        if self.weight.is_some() != self.bias.is_some()
            || !x.device().is_cuda()
            || !fused_residual()
        {
            return Ok(None);
        }
        gpu_fused::add_layer_norm(x, h, gate, rows, self.eps, self.affine_params(), modulation)
    }

    /// The norm with candle ops (any device and dtype).
    pub fn forward_candle(&self, x: &Tensor) -> Result<Tensor> {
        let c = x.dim(D::Minus1).context("LayerNorm32: scalar input")?;
        let last = x.rank() - 1;
        let y = standardize(&x.to_dtype(DType::F32)?, &[last], self.eps)?;
        let y = affine(y, self.weight.as_ref(), self.bias.as_ref(), &[c])?;
        Ok(y.to_dtype(x.dtype())?)
    }
}

/// `F.layer_norm(x, x.shape[-1:])`: no affine, eps 1e-5 (the final norm of the flows and VAEs).
pub fn f_layer_norm(x: &Tensor) -> Result<Tensor> {
    LayerNorm32::from_parts(None, None, 1e-5).forward(x)
}

/// The `[1, C, 1, ..., 1]` shape that broadcasts a per-channel vector over `[B, C, spatial...]`.
fn channel_shape(rank: usize, c: usize) -> Vec<usize> {
    let mut s = vec![1; rank];
    s[1] = c;
    s
}

/// `GroupNorm32(num_groups, channels, eps)` over `[B, C, spatial...]` (affine).
#[derive(Debug, Clone)]
pub struct GroupNorm32 {
    num_groups: usize,
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

impl GroupNorm32 {
    pub fn new(vb: VarBuilder, num_groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if num_groups == 0 || !channels.is_multiple_of(num_groups) {
            bail!("GroupNorm32: {channels} channels do not split into {num_groups} groups");
        }
        Ok(Self {
            num_groups,
            weight: Some(param(&vb, channels, "weight")?),
            bias: Some(param(&vb, channels, "bias")?),
            eps,
        })
    }

    pub fn from_parts(
        num_groups: usize,
        weight: Option<Tensor>,
        bias: Option<Tensor>,
        eps: f64,
    ) -> Self {
        Self {
            num_groups,
            weight,
            bias,
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        if dims.len() < 2 {
            bail!("GroupNorm32: input must be [B, C, ...], got {dims:?}");
        }
        let (b, c) = (dims[0], dims[1]);
        let g = self.num_groups;
        if g == 0 || !c.is_multiple_of(g) {
            bail!("GroupNorm32: {c} channels do not split into {g} groups");
        }
        let rest = x.elem_count() / (b * g).max(1);
        let xg = x.to_dtype(DType::F32)?.reshape((b, g, rest))?;
        let y = standardize(&xg, &[2], self.eps)?.reshape(dims.as_slice())?;
        let y = affine(
            y,
            self.weight.as_ref(),
            self.bias.as_ref(),
            &channel_shape(dims.len(), c),
        )?;
        Ok(y.to_dtype(x.dtype())?)
    }
}

/// `ChannelLayerNorm32(channels, eps)`: LayerNorm over the channel dimension of `[B, C, spatial...]`.
#[derive(Debug, Clone)]
pub struct ChannelLayerNorm32 {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

impl ChannelLayerNorm32 {
    /// Affine, as every TRELLIS use of it.
    pub fn new(vb: VarBuilder, channels: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: Some(param(&vb, channels, "weight")?),
            bias: Some(param(&vb, channels, "bias")?),
            eps,
        })
    }

    pub fn from_parts(weight: Option<Tensor>, bias: Option<Tensor>, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        if dims.len() < 2 {
            bail!("ChannelLayerNorm32: input must be [B, C, ...], got {dims:?}");
        }
        if x.device().is_cpu() {
            return self.forward_cpu(x);
        }
        let y = standardize(&x.to_dtype(DType::F32)?, &[1], self.eps)?;
        let y = affine(
            y,
            self.weight.as_ref(),
            self.bias.as_ref(),
            &channel_shape(dims.len(), dims[1]),
        )?;
        Ok(y.to_dtype(x.dtype())?)
    }

    /// The same on the CPU kernel (three passes over the volume instead of candle's many).
    fn forward_cpu(&self, x: &Tensor) -> Result<Tensor> {
        use crate::modules::conv3d::with_f32;
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let p = x.elem_count() / (b * c).max(1);
        let vec_of = |t: &Option<Tensor>| -> Result<Option<Vec<f32>>> {
            t.as_ref()
                .map(|t| Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?))
                .transpose()
        };
        let (w, bias) = (vec_of(&self.weight)?, vec_of(&self.bias)?);
        let y = with_f32(x, |v| {
            trellis_kernels::conv3d::channel_layer_norm(
                v,
                b,
                c,
                p,
                w.as_deref(),
                bias.as_deref(),
                self.eps as f32,
            )
            .map_err(|e| anyhow::anyhow!("ChannelLayerNorm32: {e}"))
        })?;
        Ok(Tensor::from_vec(y, dims.as_slice(), x.device())?.to_dtype(x.dtype())?)
    }
}

/// The SS VAE's `norm_layer(norm_type, channels)`: `"group"` → GroupNorm32(32, C), `"layer"` →
/// ChannelLayerNorm32(C); eps 1e-5 (torch's default) for both.
#[derive(Debug, Clone)]
pub enum ChannelNorm {
    Group(GroupNorm32),
    Layer(ChannelLayerNorm32),
}

impl ChannelNorm {
    pub fn new(vb: VarBuilder, norm_type: &str, channels: usize) -> Result<Self> {
        Ok(match norm_type {
            "group" => Self::Group(GroupNorm32::new(vb, 32, channels, 1e-5)?),
            "layer" => Self::Layer(ChannelLayerNorm32::new(vb, channels, 1e-5)?),
            other => bail!("unknown norm_type {other:?} (expected \"group\" or \"layer\")"),
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Group(n) => n.forward(x),
            Self::Layer(n) => n.forward(x),
        }
    }
}

/// `MultiHeadRMSNorm(dim, heads)`: `normalize(x) * gamma * sqrt(dim)` over the last dimension of
/// `[..., heads, dim]`, in float32 (`F.normalize`: divide by `max(||x||, 1e-12)`).
#[derive(Debug, Clone)]
pub struct MultiHeadRMSNorm {
    gamma: Tensor,
    scale: f64,
}

impl MultiHeadRMSNorm {
    /// Reads `gamma` `[heads, dim]` (float32).
    pub fn new(vb: VarBuilder, dim: usize, heads: usize) -> Result<Self> {
        let gamma = vb.to_dtype(DType::F32).get((heads, dim), "gamma")?;
        Ok(Self::from_gamma(gamma, dim))
    }

    pub fn from_gamma(gamma: Tensor, dim: usize) -> Self {
        Self {
            gamma,
            scale: (dim as f64).sqrt(),
        }
    }

    /// `gamma` `[heads, dim]` (float32 when read by [`Self::new`]).
    pub fn gamma(&self) -> &Tensor {
        &self.gamma
    }

    /// The factor after gamma, `sqrt(dim)`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = gpu_fused::rms_norm_heads(x, &self.gamma, self.scale)? {
            return Ok(y);
        }
        let xf = x.to_dtype(DType::F32)?;
        let norm = xf
            .sqr()?
            .sum_keepdim(D::Minus1)?
            .sqrt()?
            .clamp(1e-12f32, f32::INFINITY)?;
        let y = xf.broadcast_div(&norm)?;
        let y = y.broadcast_mul(&self.gamma.to_dtype(DType::F32)?)?;
        let y = (y * self.scale)?;
        Ok(y.to_dtype(x.dtype())?)
    }
}

/// Checks that `ranges` are consecutive, start at 0 and end at `n` (batch blocks of a sparse tensor).
fn check_ranges(ranges: &[Range<usize>], n: usize, what: &str) -> Result<()> {
    let mut next = 0;
    for r in ranges {
        if r.start != next || r.end < r.start {
            bail!("{what}: batch row ranges {ranges:?} are not consecutive blocks from 0");
        }
        next = r.end;
    }
    if next != n {
        bail!("{what}: batch row ranges end at {next}, the tensor has {n} rows");
    }
    Ok(())
}

/// `SparseGroupNorm32(num_groups, C)`: a GroupNorm per batch element over all of its rows
/// (statistics over rows × channels of a group). `feats` `[N, C]`; `ranges` are the row blocks of
/// each batch element, consecutive from 0 to N. Computes in float32, returns `feats`' dtype.
pub fn sparse_group_norm(
    feats: &Tensor,
    ranges: &[Range<usize>],
    num_groups: usize,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let (n, c) = feats
        .dims2()
        .context("sparse_group_norm: feats must be [N, C]")?;
    if num_groups == 0 || !c.is_multiple_of(num_groups) {
        bail!("sparse_group_norm: {c} channels do not split into {num_groups} groups");
    }
    check_ranges(ranges, n, "sparse_group_norm")?;
    let xf = feats.to_dtype(DType::F32)?;
    let cg = c / num_groups;
    let mut parts = Vec::with_capacity(ranges.len());
    for r in ranges.iter().filter(|r| !r.is_empty()) {
        let block = xf
            .narrow(0, r.start, r.len())?
            .reshape((r.len(), num_groups, cg))?;
        parts.push(standardize(&block, &[0, 2], eps)?.reshape((r.len(), c))?);
    }
    let y = if parts.is_empty() {
        xf
    } else {
        Tensor::cat(&parts, 0)?
    };
    let y = affine(y, weight, bias, &[c])?;
    Ok(y.to_dtype(feats.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ramp(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i * 37 % 23) as f32) * 0.3 - 2.0).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn layer_norm_rows_have_zero_mean_unit_var() {
        let x = ramp(&[3, 5, 16]);
        let y = LayerNorm32::from_parts(None, None, 0.0)
            .forward(&x)
            .unwrap();
        let m: Vec<f32> = y
            .mean_keepdim(2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let v: Vec<f32> = y
            .sqr()
            .unwrap()
            .mean_keepdim(2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(m.iter().all(|a| a.abs() < 1e-5));
        assert!(v.iter().all(|a| (a - 1.0).abs() < 1e-4));
    }

    #[test]
    fn layer_norm_keeps_f16_dtype() {
        let x = ramp(&[4, 8]).to_dtype(DType::F16).unwrap();
        let y = f_layer_norm(&x).unwrap();
        assert_eq!(y.dtype(), DType::F16);
    }

    #[test]
    fn channel_layer_norm_equals_layer_norm_on_permuted_input() {
        let x = ramp(&[2, 6, 3, 2, 2]);
        let w = ramp(&[6]);
        let b = ramp(&[6]).affine(0.5, 0.1).unwrap();
        let y = ChannelLayerNorm32::from_parts(Some(w.clone()), Some(b.clone()), 1e-5)
            .forward(&x)
            .unwrap();
        let xp = x.permute((0, 2, 3, 4, 1)).unwrap().contiguous().unwrap();
        let yp = LayerNorm32::from_parts(Some(w), Some(b), 1e-5)
            .forward(&xp)
            .unwrap()
            .permute((0, 4, 1, 2, 3))
            .unwrap();
        let d = (y - yp)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn channel_layer_norm_cpu_kernel_equals_tensor_ops() {
        let x = ramp(&[2, 6, 3, 5, 2]);
        let w = ramp(&[6]);
        let b = ramp(&[6]).affine(0.5, 0.1).unwrap();
        let n = ChannelLayerNorm32::from_parts(Some(w.clone()), Some(b.clone()), 1e-5);
        let fast = n.forward(&x).unwrap();
        let slow = affine(
            standardize(&x, &[1], 1e-5).unwrap(),
            Some(&w),
            Some(&b),
            &channel_shape(5, 6),
        )
        .unwrap();
        let d = (fast - slow)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{d}");
    }

    #[test]
    fn sparse_group_norm_equals_group_norm_per_batch() {
        let feats = ramp(&[7, 8]);
        let y = sparse_group_norm(&feats, &[0..3, 3..7], 2, None, None, 1e-5).unwrap();
        // batch 1 alone, as a [1, C, n] dense tensor
        let b1 = feats
            .narrow(0, 3, 4)
            .unwrap()
            .t()
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let d1 = GroupNorm32::from_parts(2, None, None, 1e-5)
            .forward(&b1)
            .unwrap();
        let got = y
            .narrow(0, 3, 4)
            .unwrap()
            .t()
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let d = (got - d1)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{d}");
        assert!(sparse_group_norm(&feats, &[0..3, 4..7], 2, None, None, 1e-5).is_err());
        let all = vec![Range { start: 0, end: 7 }];
        assert!(sparse_group_norm(&feats, &all, 3, None, None, 1e-5).is_err());
    }

    #[test]
    fn rms_norm_unit_rows_times_gamma_sqrt_d() {
        let x = ramp(&[2, 3, 2, 4]);
        let gamma = Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap();
        let y = MultiHeadRMSNorm::from_gamma(gamma, 4).forward(&x).unwrap();
        let n: Vec<f32> = y
            .sqr()
            .unwrap()
            .sum_keepdim(3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(n.iter().all(|a| (a - 4.0).abs() < 1e-4), "{n:?}");
    }
}
