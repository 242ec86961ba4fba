//! Patch (un)folding of dense grids: twin of trellis/modules/spatial.py (`patchify`, `unpatchify`,
//! `pixel_shuffle_3d`), on candle tensors of any device and dtype.
//!
//! `patchify(x [B, C, S1..Sk], p)` → `[B, C·p^k, S1/p..Sk/p]` with channel index
//! `c·p^k + (offset along axis 1)·p^(k-1) + ... + (offset along axis k)`; `unpatchify` is its inverse;
//! `pixel_shuffle_3d(x, s)` is `unpatchify` of a 3-D grid with patch `s`.

use anyhow::{bail, Result};
use candle_core::Tensor;

/// `[B, C, S1..Sk]` → `[B, C·p^k, S1/p..Sk/p]`.
pub fn patchify(x: &Tensor, p: usize) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 3 || p == 0 {
        bail!("patchify: need [B, C, spatial...] and a positive patch, got {dims:?}, patch {p}");
    }
    let k = dims.len() - 2;
    if let Some(s) = dims[2..].iter().find(|s| !s.is_multiple_of(p)) {
        bail!("patchify: spatial size {s} is not a multiple of the patch size {p}");
    }
    // [B, C, S1/p, p, ..., Sk/p, p]
    let mut split = vec![dims[0], dims[1]];
    for s in &dims[2..] {
        split.extend([s / p, p]);
    }
    // → [B, C, p (axis 1), ..., p (axis k), S1/p, ..., Sk/p]
    let mut perm = vec![0, 1];
    perm.extend((0..k).map(|i| 2 * i + 3));
    perm.extend((0..k).map(|i| 2 * i + 2));
    let y = x.reshape(split)?.permute(perm)?;
    let mut out = vec![dims[0], dims[1] * p.pow(k as u32)];
    out.extend(dims[2..].iter().map(|s| s / p));
    Ok(y.contiguous()?.reshape(out)?)
}

/// `[B, C·p^k, S1..Sk]` → `[B, C, S1·p..Sk·p]`, the inverse of [`patchify`].
pub fn unpatchify(x: &Tensor, p: usize) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 3 || p == 0 {
        bail!("unpatchify: need [B, C, spatial...] and a positive patch, got {dims:?}, patch {p}");
    }
    let k = dims.len() - 2;
    let pk = p.pow(k as u32);
    if !dims[1].is_multiple_of(pk) {
        bail!(
            "unpatchify: {} channels are not a multiple of {p}^{k}",
            dims[1]
        );
    }
    // [B, C, p.. (k times), S1..Sk]
    let mut split = vec![dims[0], dims[1] / pk];
    split.extend(std::iter::repeat_n(p, k));
    split.extend(&dims[2..]);
    // → [B, C, S1, p, S2, p, ...]
    let mut perm = vec![0, 1];
    for i in 0..k {
        perm.extend([2 + k + i, 2 + i]);
    }
    let y = x.reshape(split)?.permute(perm)?;
    let mut out = vec![dims[0], dims[1] / pk];
    out.extend(dims[2..].iter().map(|s| s * p));
    Ok(y.contiguous()?.reshape(out)?)
}

/// `pixel_shuffle_3d(x [B, C·s³, H, W, D], s)` → `[B, C, H·s, W·s, D·s]`,
/// `out[b, c, s·h+i, s·w+j, s·d+k] = x[b, c·s³ + i·s² + j·s + k, h, w, d]`.
pub fn pixel_shuffle_3d(x: &Tensor, s: usize) -> Result<Tensor> {
    if x.rank() != 5 {
        bail!(
            "pixel_shuffle_3d: input must be [B, C, H, W, D], got {:?}",
            x.dims()
        );
    }
    unpatchify(x, s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn patchify_channel_order_and_inverse() {
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 64.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4, 4, 4))
            .unwrap();
        let p = patchify(&x, 2).unwrap();
        assert_eq!(p.dims(), &[2, 24, 2, 2, 2]);
        // channel c*8 + px*4 + py*2 + pz at (X, Y, Z) holds x[c, 2X+px, 2Y+py, 2Z+pz]
        let got: f32 = p
            .get(1)
            .unwrap()
            .get(2 * 8 + 4 + 1)
            .unwrap()
            .get(1)
            .unwrap()
            .get(0)
            .unwrap()
            .get(1)
            .unwrap()
            .to_scalar()
            .unwrap();
        let want: f32 = x
            .get(1)
            .unwrap()
            .get(2)
            .unwrap()
            .get(3)
            .unwrap()
            .get(0)
            .unwrap()
            .get(3)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(got, want);
        let back = unpatchify(&p, 2).unwrap();
        let d = (back - &x)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
        assert!(patchify(&x.narrow(2, 0, 3).unwrap(), 2).is_err());
    }

    #[test]
    fn pixel_shuffle_formula() {
        let x = Tensor::arange(0f32, 16.0 * 2.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 16, 2, 1, 1))
            .unwrap();
        let y = pixel_shuffle_3d(&x, 2).unwrap();
        assert_eq!(y.dims(), &[1, 2, 4, 2, 2]);
        // out[0, 1, 2*1+1, 0*2+1, 0] = x[0, 8 + 4 + 2 + 0, 1, 0, 0]
        let got: f32 = y
            .get(0)
            .unwrap()
            .get(1)
            .unwrap()
            .get(3)
            .unwrap()
            .get(1)
            .unwrap()
            .get(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        let want: f32 = x
            .get(0)
            .unwrap()
            .get(14)
            .unwrap()
            .get(1)
            .unwrap()
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(got, want);
    }
}
