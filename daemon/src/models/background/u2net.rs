//! U²-Net (Qin et al., "U²-Net: Going Deeper with Nested U-Structure for Salient Object
//! Detection", Pattern Recognition 2020): the salient-object network behind rembg's `u2net` session,
//! which TRELLIS' `preprocess_image` uses for images without alpha. Twin of `U2NET` / `U2NETP` in
//! `model/u2net.py` of github.com/xuebinqin/U-2-Net (Apache-2.0); state-dict names unchanged.
//!
//! Building blocks, as there:
//! * `REBNCONV`: 3x3 convolution (padding = dilation = `dirate`, bias) → BatchNorm2d (eval: running
//!   statistics, eps 1e-5, folded into a per-channel scale and shift as torch's CPU inference
//!   kernel does) → ReLU. Keys `conv_s1.{weight,bias}`, `bn_s1.{weight,bias,running_mean,running_var}`.
//! * `RSU-L` (L = 7, 6, 5, 4): `rebnconvin`, an encoder `rebnconv1..L-1` with 2x2 max pools
//!   (stride 2, `ceil_mode`), `rebnconvL` at dilation 2, a decoder `rebnconv{L-1..1}d` on
//!   `cat(up, skip)` with bilinear upsampling to the skip's size (`align_corners=False`); returns
//!   `hx1d + hxin`.
//! * `RSU-4F`: the same without pooling, dilations 1, 2, 4, 8 (decoder 4, 2, 1).
//! * `U2NET`: stages 1..6 with pools between them, decoder stages 5d..1d, side 3x3 convolutions on
//!   1d, 2d, 3d, 4d, 5d and 6 upsampled to the full size, a 1x1 `outconv` over their
//!   concatenation; outputs `sigmoid(d0..d6)`.
//!
//! Channel widths are a config ([`U2NetConfig`]): the full network (`u2net.pth`), the small one
//! (`u2netp.pth`) and the tiny widths of the parity fixture differ only there.

use anyhow::{bail, ensure, Result};
use candle_core::{Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, VarBuilder};
use serde::{Deserialize, Serialize};

/// BatchNorm2d's default eps.
const BN_EPS: f64 = 1e-5;

/// `(in_ch, mid_ch, out_ch)` of one RSU block.
pub type Widths = [usize; 3];

/// The channel widths of every stage (the constructor arguments of its RSU blocks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct U2NetConfig {
    pub in_ch: usize,
    pub out_ch: usize,
    pub stage1: Widths,
    pub stage2: Widths,
    pub stage3: Widths,
    pub stage4: Widths,
    pub stage5: Widths,
    pub stage6: Widths,
    pub stage5d: Widths,
    pub stage4d: Widths,
    pub stage3d: Widths,
    pub stage2d: Widths,
    pub stage1d: Widths,
}

impl U2NetConfig {
    /// `U2NET(3, 1)`: the full network of `u2net.pth` (176 MB), rembg's `u2net`.
    pub fn u2net() -> Self {
        Self {
            in_ch: 3,
            out_ch: 1,
            stage1: [3, 32, 64],
            stage2: [64, 32, 128],
            stage3: [128, 64, 256],
            stage4: [256, 128, 512],
            stage5: [512, 256, 512],
            stage6: [512, 256, 512],
            stage5d: [1024, 256, 512],
            stage4d: [1024, 128, 256],
            stage3d: [512, 64, 128],
            stage2d: [256, 32, 64],
            stage1d: [128, 16, 64],
        }
    }

    /// `U2NETP(3, 1)`: the small network of `u2netp.pth` (4.7 MB).
    pub fn u2netp() -> Self {
        Self {
            in_ch: 3,
            out_ch: 1,
            stage1: [3, 16, 64],
            stage2: [64, 16, 64],
            stage3: [64, 16, 64],
            stage4: [64, 16, 64],
            stage5: [64, 16, 64],
            stage6: [64, 16, 64],
            stage5d: [128, 16, 64],
            stage4d: [128, 16, 64],
            stage3d: [128, 16, 64],
            stage2d: [128, 16, 64],
            stage1d: [128, 16, 64],
        }
    }

    /// Checks that consecutive stages fit together (the concatenations of the decoder).
    pub fn validate(&self) -> Result<()> {
        let c = self;
        let all = [
            ("stage1", c.stage1),
            ("stage2", c.stage2),
            ("stage3", c.stage3),
            ("stage4", c.stage4),
            ("stage5", c.stage5),
            ("stage6", c.stage6),
            ("stage5d", c.stage5d),
            ("stage4d", c.stage4d),
            ("stage3d", c.stage3d),
            ("stage2d", c.stage2d),
            ("stage1d", c.stage1d),
        ];
        for (name, w) in all {
            ensure!(
                w.iter().all(|&x| x > 0),
                "U2NET config: {name} has a zero width"
            );
        }
        ensure!(c.in_ch > 0 && c.out_ch > 0, "U2NET config: zero channels");
        let chain = [
            ("stage1.in", c.stage1[0], "in_ch", c.in_ch),
            ("stage2.in", c.stage2[0], "stage1.out", c.stage1[2]),
            ("stage3.in", c.stage3[0], "stage2.out", c.stage2[2]),
            ("stage4.in", c.stage4[0], "stage3.out", c.stage3[2]),
            ("stage5.in", c.stage5[0], "stage4.out", c.stage4[2]),
            ("stage6.in", c.stage6[0], "stage5.out", c.stage5[2]),
            (
                "stage5d.in",
                c.stage5d[0],
                "stage6.out + stage5.out",
                c.stage6[2] + c.stage5[2],
            ),
            (
                "stage4d.in",
                c.stage4d[0],
                "stage5d.out + stage4.out",
                c.stage5d[2] + c.stage4[2],
            ),
            (
                "stage3d.in",
                c.stage3d[0],
                "stage4d.out + stage3.out",
                c.stage4d[2] + c.stage3[2],
            ),
            (
                "stage2d.in",
                c.stage2d[0],
                "stage3d.out + stage2.out",
                c.stage3d[2] + c.stage2[2],
            ),
            (
                "stage1d.in",
                c.stage1d[0],
                "stage2d.out + stage1.out",
                c.stage2d[2] + c.stage1[2],
            ),
        ];
        for (a, av, b, bv) in chain {
            if av != bv {
                bail!("U2NET config: {a} = {av} must equal {b} = {bv}");
            }
        }
        Ok(())
    }
}

/// `REBNCONV`: conv 3x3 (dilated) → BatchNorm (eval) → ReLU.
struct RebnConv {
    conv: Conv2d,
    /// BatchNorm folded: `x * scale + shift`, both `[1, C, 1, 1]`.
    scale: Tensor,
    shift: Tensor,
}

impl RebnConv {
    fn new(in_ch: usize, out_ch: usize, dirate: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: dirate,
            dilation: dirate,
            ..Default::default()
        };
        let conv = candle_nn::conv2d(in_ch, out_ch, 3, cfg, vb.pp("conv_s1"))?;
        let bn = vb.pp("bn_s1");
        let weight = bn.get(out_ch, "weight")?;
        let bias = bn.get(out_ch, "bias")?;
        let mean = bn.get(out_ch, "running_mean")?;
        let var = bn.get(out_ch, "running_var")?;
        let scale = (weight / (var + BN_EPS)?.sqrt()?)?;
        let shift = (bias - (&mean * &scale)?)?;
        Ok(Self {
            conv,
            scale: scale.reshape((1, out_ch, 1, 1))?,
            shift: shift.reshape((1, out_ch, 1, 1))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.conv.forward(x)?;
        Ok(y.broadcast_mul(&self.scale)?
            .broadcast_add(&self.shift)?
            .relu()?)
    }
}

/// `nn.MaxPool2d(2, stride=2, ceil_mode=True)`: an odd last row/column forms a window of its own
/// (padding by repeating it leaves that window's maximum unchanged).
fn pool(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let mut x = x.clone();
    if h % 2 == 1 {
        x = x.pad_with_same(2, 0, 1)?;
    }
    if w % 2 == 1 {
        x = x.pad_with_same(3, 0, 1)?;
    }
    Ok(x.max_pool2d(2)?)
}

/// `_upsample_like(src, tar)`: bilinear, `align_corners=False`, to `tar`'s height and width.
fn upsample_like(src: &Tensor, tar: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = tar.dims4()?;
    let (_, _, sh, sw) = src.dims4()?;
    if (sh, sw) == (h, w) {
        // torch's bilinear kernel copies the input when the sizes match.
        return Ok(src.clone());
    }
    Ok(src.upsample_bilinear2d(h, w, false)?)
}

fn cat2(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(Tensor::cat(&[a, b], 1)?)
}

/// `RSU-L` (L = `height`, 4..=7) or `RSU-4F` (`dilated`).
struct Rsu {
    conv_in: RebnConv,
    /// `rebnconv1..rebnconv{L}`.
    enc: Vec<RebnConv>,
    /// `rebnconv{L-1}d .. rebnconv1d`.
    dec: Vec<RebnConv>,
    dilated: bool,
}

impl Rsu {
    fn new(height: usize, dilated: bool, w: Widths, vb: VarBuilder) -> Result<Self> {
        let [in_ch, mid, out] = w;
        let conv_in = RebnConv::new(in_ch, out, 1, vb.pp("rebnconvin"))?;
        let mut enc = Vec::with_capacity(height);
        for i in 1..=height {
            let cin = if i == 1 { out } else { mid };
            let d = if dilated {
                1 << (i - 1)
            } else if i == height {
                2
            } else {
                1
            };
            enc.push(RebnConv::new(cin, mid, d, vb.pp(format!("rebnconv{i}")))?);
        }
        let mut dec = Vec::with_capacity(height - 1);
        for i in (1..height).rev() {
            let cout = if i == 1 { out } else { mid };
            let d = if dilated { 1 << (i - 1) } else { 1 };
            dec.push(RebnConv::new(
                2 * mid,
                cout,
                d,
                vb.pp(format!("rebnconv{i}d")),
            )?);
        }
        Ok(Self {
            conv_in,
            enc,
            dec,
            dilated,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let hxin = self.conv_in.forward(x)?;
        let height = self.enc.len();
        // Encoder: hx_i for i = 1..L; pools after 1..L-2 (not before the last two).
        let mut skips: Vec<Tensor> = Vec::with_capacity(height);
        let mut h = hxin.clone();
        for (i, conv) in self.enc.iter().enumerate() {
            let level = i + 1;
            let input = if level == height {
                // rebnconvL reads hx_{L-1} itself (no pool in between).
                skips[level - 2].clone()
            } else if level >= 2 && !self.dilated {
                h = pool(&h)?;
                h.clone()
            } else {
                h.clone()
            };
            let out = conv.forward(&input)?;
            h = out.clone();
            skips.push(out);
        }
        // Decoder: d_{L-1} = conv(cat(hx_L, hx_{L-1})), then d_i = conv(cat(up(d_{i+1}), hx_i)).
        let mut d = skips[height - 1].clone();
        for (j, conv) in self.dec.iter().enumerate() {
            let level = height - 1 - j;
            let skip = &skips[level - 1];
            let up = if j == 0 || self.dilated {
                d
            } else {
                upsample_like(&d, skip)?
            };
            d = conv.forward(&cat2(&up, skip)?)?;
        }
        Ok((d + hxin)?)
    }
}

/// Every output of [`U2Net::forward`]; the intermediates are kept for parity checks.
pub struct U2NetOutput {
    /// `sigmoid(d0), sigmoid(d1), ..., sigmoid(d6)`, each `[B, out_ch, H, W]`; `d[0]` is the matte.
    pub d: Vec<Tensor>,
    /// Stage outputs by name (`hx1`..`hx6`, `hx5d`..`hx1d`).
    pub stages: Vec<(&'static str, Tensor)>,
}

/// The U²-Net.
pub struct U2Net {
    config: U2NetConfig,
    stage1: Rsu,
    stage2: Rsu,
    stage3: Rsu,
    stage4: Rsu,
    stage5: Rsu,
    stage6: Rsu,
    stage5d: Rsu,
    stage4d: Rsu,
    stage3d: Rsu,
    stage2d: Rsu,
    stage1d: Rsu,
    sides: Vec<Conv2d>,
    outconv: Conv2d,
}

impl U2Net {
    pub fn new(config: &U2NetConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let c = config;
        let rsu = |h, dil, w, name: &str| Rsu::new(h, dil, w, vb.pp(name));
        let side_in = [
            c.stage1d[2],
            c.stage2d[2],
            c.stage3d[2],
            c.stage4d[2],
            c.stage5d[2],
            c.stage6[2],
        ];
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let sides = side_in
            .iter()
            .enumerate()
            .map(|(i, &cin)| {
                candle_nn::conv2d(cin, c.out_ch, 3, pad1, vb.pp(format!("side{}", i + 1)))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let outconv = candle_nn::conv2d(
            6 * c.out_ch,
            c.out_ch,
            1,
            Default::default(),
            vb.pp("outconv"),
        )?;
        Ok(Self {
            config: config.clone(),
            stage1: rsu(7, false, c.stage1, "stage1")?,
            stage2: rsu(6, false, c.stage2, "stage2")?,
            stage3: rsu(5, false, c.stage3, "stage3")?,
            stage4: rsu(4, false, c.stage4, "stage4")?,
            stage5: rsu(4, true, c.stage5, "stage5")?,
            stage6: rsu(4, true, c.stage6, "stage6")?,
            stage5d: rsu(4, true, c.stage5d, "stage5d")?,
            stage4d: rsu(4, false, c.stage4d, "stage4d")?,
            stage3d: rsu(5, false, c.stage3d, "stage3d")?,
            stage2d: rsu(6, false, c.stage2d, "stage2d")?,
            stage1d: rsu(7, false, c.stage1d, "stage1d")?,
            sides,
            outconv,
        })
    }

    pub fn config(&self) -> &U2NetConfig {
        &self.config
    }

    /// `[B, in_ch, H, W]` → the seven side outputs (after sigmoid) and the stage outputs.
    pub fn forward(&self, x: &Tensor) -> Result<U2NetOutput> {
        let (_, c, h, w) = x.dims4()?;
        ensure!(
            c == self.config.in_ch,
            "U2NET: the input has {c} channels, the network takes {}",
            self.config.in_ch
        );
        ensure!(h > 0 && w > 0, "U2NET: empty input ({h}x{w})");
        let hx1 = self.stage1.forward(x)?;
        let hx2 = self.stage2.forward(&pool(&hx1)?)?;
        let hx3 = self.stage3.forward(&pool(&hx2)?)?;
        let hx4 = self.stage4.forward(&pool(&hx3)?)?;
        let hx5 = self.stage5.forward(&pool(&hx4)?)?;
        let hx6 = self.stage6.forward(&pool(&hx5)?)?;
        let hx5d = self
            .stage5d
            .forward(&cat2(&upsample_like(&hx6, &hx5)?, &hx5)?)?;
        let hx4d = self
            .stage4d
            .forward(&cat2(&upsample_like(&hx5d, &hx4)?, &hx4)?)?;
        let hx3d = self
            .stage3d
            .forward(&cat2(&upsample_like(&hx4d, &hx3)?, &hx3)?)?;
        let hx2d = self
            .stage2d
            .forward(&cat2(&upsample_like(&hx3d, &hx2)?, &hx2)?)?;
        let hx1d = self
            .stage1d
            .forward(&cat2(&upsample_like(&hx2d, &hx1)?, &hx1)?)?;
        let feeds = [&hx1d, &hx2d, &hx3d, &hx4d, &hx5d, &hx6];
        let mut sides = Vec::with_capacity(6);
        for (i, (conv, f)) in self.sides.iter().zip(feeds).enumerate() {
            let s = conv.forward(f)?;
            sides.push(if i == 0 { s } else { upsample_like(&s, &hx1)? });
        }
        let d0 = self.outconv.forward(&Tensor::cat(&sides, 1)?)?;
        let mut d = Vec::with_capacity(7);
        d.push(candle_nn::ops::sigmoid(&d0)?);
        for s in &sides {
            d.push(candle_nn::ops::sigmoid(s)?);
        }
        let stages = vec![
            ("hx1", hx1),
            ("hx2", hx2),
            ("hx3", hx3),
            ("hx4", hx4),
            ("hx5", hx5),
            ("hx6", hx6),
            ("hx5d", hx5d),
            ("hx4d", hx4d),
            ("hx3d", hx3d),
            ("hx2d", hx2d),
            ("hx1d", hx1d),
        ];
        Ok(U2NetOutput { d, stages })
    }

    /// The matte only: `sigmoid(d0)` with shape `[B, out_ch, H, W]`.
    pub fn matte(&self, x: &Tensor) -> Result<Tensor> {
        let mut out = self.forward(x)?;
        Ok(out.d.swap_remove(0))
    }
}
