//! `Dense`: the networks' `nn.Linear`. On a CPU with AVX-512F and FMA, a float32 layer on the CPU
//! keeps its weight only in `trellis_kernels::sgemm`'s panel layout, packed once when the layer
//! is built (the candle weight is dropped, so the packed copy replaces it rather than adding to
//! it), and its forward is one `sgemm` call with the bias and the activation fused into the
//! store. Every other layer (GPU, half types, CPUs without AVX-512, `TRELLIS_SGEMM=off`) stays a
//! candle `Linear` and runs through [`gpu_fused::linear_candle`].

use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Storage, Tensor};
use candle_nn::{Linear, VarBuilder};
use trellis_kernels::sgemm::{self, Activation, Epilogue, PackedWeights};

use super::gpu_fused::{self, Act};

/// A linear layer `y = x Wᵀ + b` (see the module doc).
#[derive(Debug, Clone)]
pub struct Dense(Inner);

#[derive(Debug, Clone)]
enum Inner {
    Candle(Linear),
    Packed(Arc<Packed>),
}

#[derive(Debug)]
struct Packed {
    w: PackedWeights,
    bias: Option<Vec<f32>>,
}

/// `nn.Linear(i, o)` with bias, from `vb` (`weight`, `bias`).
pub fn linear(i: usize, o: usize, vb: VarBuilder) -> Result<Dense> {
    Dense::new(candle_nn::linear(i, o, vb)?)
}

/// `nn.Linear(i, o, bias=bias)`.
pub fn linear_b(i: usize, o: usize, bias: bool, vb: VarBuilder) -> Result<Dense> {
    Dense::new(candle_nn::linear_b(i, o, bias, vb)?)
}

/// `nn.Linear(i, o, bias=False)`.
pub fn linear_no_bias(i: usize, o: usize, vb: VarBuilder) -> Result<Dense> {
    Dense::new(candle_nn::linear_no_bias(i, o, vb)?)
}

/// One layer computing the layers `parts` (same input width) side by side: its output rows are the
/// parts' outputs one after the other (`q | k | v`). Packed straight from the parts' weights where
/// `sgemm` runs; otherwise a candle `Linear` on the concatenated weights.
pub fn stacked(parts: &[Linear]) -> Result<Dense> {
    let bias_all = parts.iter().all(|l| l.bias().is_some());
    let bias_none = parts.iter().all(|l| l.bias().is_none());
    if !bias_all && !bias_none {
        bail!("stacked linear: some parts have a bias and some do not");
    }
    let cat_bias = || -> Result<Option<Tensor>> {
        Ok(if bias_all {
            let bs: Vec<&Tensor> = parts.iter().filter_map(|l| l.bias()).collect();
            Some(Tensor::cat(&bs, 0)?)
        } else {
            None
        })
    };
    let ws: Vec<&Tensor> = parts.iter().map(|l| l.weight()).collect();
    let fits = sgemm::available()
        && ws
            .iter()
            .all(|w| w.device().is_cpu() && w.dtype() == DType::F32 && w.rank() == 2);
    if fits {
        let k = ws.first().map(|w| w.dim(1)).transpose()?.unwrap_or(0);
        let mut guards = Vec::with_capacity(ws.len());
        for w in &ws {
            guards.push(w.storage_and_layout());
        }
        let mut slices = Vec::with_capacity(ws.len());
        for (w, (storage, layout)) in ws.iter().zip(&guards) {
            match (&**storage, layout.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) if w.dim(1)? == k && k > 0 => {
                    slices.push(&v[a..b])
                }
                _ => break,
            }
        }
        if slices.len() == ws.len() {
            if let Some(w) = PackedWeights::pack_stacked(&slices, k) {
                let bias = match cat_bias()? {
                    Some(b) => match cpu_f32_values(&b) {
                        Some(v) if v.len() == w.n() => Some(v),
                        _ => bail!("stacked linear: biases do not match {} outputs", w.n()),
                    },
                    None => None,
                };
                return Ok(Dense(Inner::Packed(Arc::new(Packed { w, bias }))));
            }
        }
    }
    Dense::new(Linear::new(Tensor::cat(&ws, 0)?, cat_bias()?))
}

/// The contiguous float32 values of a CPU tensor, copied (`None` for anything else).
fn cpu_f32_values(t: &Tensor) -> Option<Vec<f32>> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(v)) = &*storage else {
        return None;
    };
    let (a, b) = layout.contiguous_offsets()?;
    Some(v[a..b].to_vec())
}

impl Dense {
    /// Wraps `l`, packing its weight for `sgemm` where that runs (see the module doc).
    pub fn new(l: Linear) -> Result<Self> {
        let w = l.weight();
        let fits = w.device().is_cpu()
            && w.dtype() == DType::F32
            && w.rank() == 2
            && sgemm::available()
            && l.bias()
                .is_none_or(|b| b.device().is_cpu() && b.dtype() == DType::F32 && b.rank() == 1);
        if !fits {
            return Ok(Dense(Inner::Candle(l)));
        }
        let (n, k) = w.dims2()?;
        let packed = {
            let (storage, layout) = w.storage_and_layout();
            match (&*storage, layout.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => {
                    PackedWeights::pack(&v[a..b], n, k)
                }
                _ => None,
            }
        };
        let Some(packed) = packed else {
            return Ok(Dense(Inner::Candle(l)));
        };
        let bias = match l.bias() {
            Some(b) => match cpu_f32_values(b) {
                Some(v) if v.len() == n => Some(v),
                _ => bail!("linear: bias {:?} does not match {n} outputs", b.dims()),
            },
            None => None,
        };
        Ok(Dense(Inner::Packed(Arc::new(Packed { w: packed, bias }))))
    }

    /// The candle layer, unless the weight lives only packed.
    pub fn candle(&self) -> Option<&Linear> {
        match &self.0 {
            Inner::Candle(l) => Some(l),
            Inner::Packed(_) => None,
        }
    }

    /// The weight's dtype (what inputs are computed in).
    pub fn dtype(&self) -> DType {
        match &self.0 {
            Inner::Candle(l) => l.weight().dtype(),
            Inner::Packed(_) => DType::F32,
        }
    }

    /// `x Wᵀ + b` over the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Act::None)
    }

    /// [`Self::forward`] then `act`, fused into the product's store where the layer is packed
    /// (and into the bias pass on the GPU).
    pub fn forward_act(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        let p = match &self.0 {
            Inner::Candle(l) => return gpu_fused::linear_candle(l, x, act),
            Inner::Packed(p) => p,
        };
        if !x.device().is_cpu() {
            bail!("linear: CPU layer given an input on {:?}", x.device());
        }
        let activation = match act {
            Act::None => Activation::None,
            Act::GeluTanh => Activation::GeluTanh,
            Act::GeluErf => Activation::GeluErf,
        };
        let op = PackedLinear {
            p: p.clone(),
            act: activation,
        };
        let xd = x.dtype();
        let y = x
            .to_dtype(DType::F32)?
            .contiguous()?
            .apply_op1_no_bwd(&op)?;
        Ok(if xd == DType::F32 { y } else { y.to_dtype(xd)? })
    }
}

impl Dense {
    /// `res + gamma ⊙ (x Wᵀ + b)` (a LayerScale'd residual branch, `gamma` one value per output
    /// feature, `res` the shape of the output) in the product's store, for a packed layer and
    /// float32 CPU tensors; `None` otherwise (the caller computes it apart).
    pub fn forward_scaled_residual(
        &self,
        x: &Tensor,
        gamma: &[f32],
        res: &Tensor,
    ) -> Result<Option<Tensor>> {
        let Inner::Packed(p) = &self.0 else {
            return Ok(None);
        };
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        if !cpu_f32(x) || !cpu_f32(res) || gamma.len() != p.w.n() {
            return Ok(None);
        }
        let op = PackedResidual { p, gamma };
        Ok(Some(
            x.contiguous()?.apply_op2_no_bwd(&res.contiguous()?, &op)?,
        ))
    }
}

/// The output shape of a packed layer for an input of `dims` (`[.., K]` → `[.., N]`) and its rows.
fn output_dims(p: &Packed, dims: &[usize]) -> candle_core::Result<(Vec<usize>, usize)> {
    let (n, k) = (p.w.n(), p.w.k());
    let mut dims = dims.to_vec();
    match dims.last_mut() {
        Some(last) if *last == k => *last = n,
        _ => candle_core::bail!("linear: input {:?} does not end in {k}", dims),
    }
    let m: usize = dims[..dims.len() - 1].iter().product();
    Ok((dims, m))
}

/// The contiguous float32 values of a CPU storage.
fn f32_values<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: expected float32 values")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: expected a contiguous tensor")
    };
    Ok(&v[a..b])
}

/// [`Dense::forward_scaled_residual`] as a candle op on (input, residual).
struct PackedResidual<'a> {
    p: &'a Packed,
    gamma: &'a [f32],
}

impl CustomOp2 for PackedResidual<'_> {
    fn name(&self) -> &'static str {
        "sgemm-linear-scaled-residual"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_values(xs, xl, "sgemm-linear")?;
        let res = f32_values(rs, rl, "sgemm-linear residual")?;
        let (dims, m) = output_dims(self.p, xl.dims())?;
        if rl.dims() != dims.as_slice() {
            candle_core::bail!(
                "linear: residual {:?} does not match the output {dims:?}",
                rl.dims()
            );
        }
        let epilogue = Epilogue::ScaledResidual {
            gamma: self.gamma,
            res,
        };
        let out = packed_products(self.p, x, m, epilogue);
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// `epilogue(x · Wᵀ + b)` for the `m` rows of `x` through the packed weights, in a new vector.
fn packed_products(p: &Packed, x: &[f32], m: usize, epilogue: Epilogue) -> Vec<f32> {
    let n = p.w.n();
    let mut out = Vec::with_capacity(m * n);
    sgemm::linear_epilogue_uninit(
        x,
        m,
        &p.w,
        p.bias.as_deref(),
        epilogue,
        &mut out.spare_capacity_mut()[..m * n],
    );
    // SAFETY: `linear_epilogue_uninit` writes all m * n values.
    unsafe { out.set_len(m * n) };
    out
}

/// The packed layer as a candle op on its input.
struct PackedLinear {
    p: Arc<Packed>,
    act: Activation,
}

impl CustomOp1 for PackedLinear {
    fn name(&self) -> &'static str {
        "sgemm-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_values(s, l, "sgemm-linear")?;
        let (dims, m) = output_dims(&self.p, l.dims())?;
        let out = packed_products(&self.p, x, m, Epilogue::Act(self.act));
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn packed_layer_matches_candle_linear() {
        let dev = Device::Cpu;
        for (k, n, bias) in [(48, 80, true), (37, 5, false), (1, 33, true)] {
            let w = Tensor::randn(0f32, 0.3, (n, k), &dev).unwrap();
            let b = bias.then(|| Tensor::randn(0f32, 0.3, n, &dev).unwrap());
            let l = Linear::new(w, b);
            let d = Dense::new(l.clone()).unwrap();
            assert_eq!(d.candle().is_none(), sgemm::available());
            let x = Tensor::randn(0f32, 1.0, (2, 19, k), &dev).unwrap();
            let want = l.forward(&x).unwrap();
            assert!(max_diff(&d.forward(&x).unwrap(), &want) < 1e-4);
            let g = d.forward_act(&x, Act::GeluTanh).unwrap();
            assert!(max_diff(&g, &want.gelu().unwrap()) < 1e-4);
            let g = d.forward_act(&x, Act::GeluErf).unwrap();
            assert!(max_diff(&g, &want.gelu_erf().unwrap()) < 1e-4);
            // a strided (transposed) input goes through a contiguous copy
            let xt = x.transpose(0, 1).unwrap();
            let want = l.forward(&xt.contiguous().unwrap()).unwrap();
            assert!(max_diff(&d.forward(&xt).unwrap(), &want) < 1e-4);
            // one row, rank 1
            let x1 = Tensor::randn(0f32, 1.0, k, &dev).unwrap();
            let want = l
                .forward(&x1.unsqueeze(0).unwrap())
                .unwrap()
                .squeeze(0)
                .unwrap();
            assert!(max_diff(&d.forward(&x1).unwrap(), &want) < 1e-4);
            // two layers stacked: the outputs side by side
            let l2 = Linear::new(
                Tensor::randn(0f32, 0.3, (n, k), &dev).unwrap(),
                bias.then(|| Tensor::randn(0f32, 0.3, n, &dev).unwrap()),
            );
            let st = stacked(&[l.clone(), l2.clone()]).unwrap();
            let want = Tensor::cat(&[l.forward(&x).unwrap(), l2.forward(&x).unwrap()], 2).unwrap();
            assert!(max_diff(&st.forward(&x).unwrap(), &want) < 1e-4);
            // LayerScale'd residual in the store
            let gamma = Tensor::randn(0f32, 0.5, n, &dev).unwrap();
            let res = Tensor::randn(0f32, 1.0, (2, 19, n), &dev).unwrap();
            let g: Vec<f32> = gamma.to_vec1().unwrap();
            let got = d.forward_scaled_residual(&x, &g, &res).unwrap();
            assert_eq!(got.is_some(), sgemm::available());
            if let Some(got) = got {
                let want = (&res + l.forward(&x).unwrap().broadcast_mul(&gamma).unwrap()).unwrap();
                assert!(max_diff(&got, &want) < 1e-4);
            }
        }
    }
}
