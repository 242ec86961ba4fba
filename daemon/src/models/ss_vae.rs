//! The sparse-structure VAE: twin of trellis/models/sparse_structure_vae.py (`ResBlock3d`,
//! `DownsampleBlock3d`, `UpsampleBlock3d`, `SparseStructureEncoder`, `SparseStructureDecoder`).
//!
//! Dense 3-D convolutions run on the bounded-memory CPU kernel ([`crate::modules::conv3d`]). With
//! `use_fp16` the original stores the convolutions inside `blocks` and `middle_block` in float16;
//! build with `torso_dtype = F16` to request them so (activations are then float16 between the input
//! and output layers, as in the original), or with `F32` to run everything in float32.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::config::{SparseStructureDecoderConfig, SparseStructureEncoderConfig};
use crate::modules::conv3d::{pixel_shuffle_3d, Conv3d};
use crate::modules::norm::ChannelNorm;

/// `ResBlock3d(channels, out_channels, norm_type)`: norm, SiLU, conv3×3×3, norm, SiLU, conv3×3×3,
/// plus the input (through a 1×1×1 `skip_connection` when the widths differ).
#[derive(Debug, Clone)]
pub struct ResBlock3d {
    norm1: ChannelNorm,
    norm2: ChannelNorm,
    conv1: Conv3d,
    conv2: Conv3d,
    skip: Option<Conv3d>,
}

impl ResBlock3d {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        out_channels: usize,
        norm_type: &str,
    ) -> Result<Self> {
        Ok(Self {
            norm1: ChannelNorm::new(vb.pp("norm1"), norm_type, channels)?,
            norm2: ChannelNorm::new(vb.pp("norm2"), norm_type, out_channels)?,
            conv1: Conv3d::new(vb.pp("conv1"), channels, out_channels, 3, 1, 1)?,
            conv2: Conv3d::new(vb.pp("conv2"), out_channels, out_channels, 3, 1, 1)?,
            skip: if channels != out_channels {
                Some(Conv3d::new(
                    vb.pp("skip_connection"),
                    channels,
                    out_channels,
                    1,
                    1,
                    0,
                )?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward(x)?.silu()?;
        let h = self.conv1.forward(&h)?;
        let h = self.norm2.forward(&h)?.silu()?;
        let h = self.conv2.forward(&h)?;
        let skip = match &self.skip {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        Ok((h + skip)?)
    }
}

/// One entry of the encoder's / decoder's `blocks` list.
#[derive(Debug, Clone)]
enum Block {
    /// Boxed: with the `cuda` feature a res block is several times a conv's size.
    Res(Box<ResBlock3d>),
    /// `DownsampleBlock3d` (mode "conv"): conv 2×2×2, stride 2.
    Down(Conv3d),
    /// `UpsampleBlock3d` (mode "conv"): conv 3×3×3 to 8·C_out, then pixel_shuffle_3d(2).
    Up(Conv3d),
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Block::Res(r) => r.forward(x),
            Block::Down(c) => c.forward(x),
            Block::Up(c) => pixel_shuffle_3d(&c.forward(x)?, 2),
        }
    }
}

/// `out_layer = Sequential(norm_layer(norm_type, C), SiLU, Conv3d(C, out, 3, padding=1))`.
#[derive(Debug, Clone)]
struct OutLayer {
    norm: ChannelNorm,
    conv: Conv3d,
}

impl OutLayer {
    fn new(vb: VarBuilder, norm_type: &str, channels: usize, out: usize) -> Result<Self> {
        Ok(Self {
            norm: ChannelNorm::new(vb.pp("0"), norm_type, channels)?,
            conv: Conv3d::new(vb.pp("2"), channels, out, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(&self.norm.forward(x)?.silu()?)
    }
}

fn middle(vb: &VarBuilder, channels: usize, count: usize) -> Result<Vec<Block>> {
    (0..count)
        .map(|i| {
            let vb = vb.pp(format!("middle_block.{i}"));
            Ok(Block::Res(Box::new(ResBlock3d::new(
                vb, channels, channels, "layer",
            )?)))
        })
        .collect()
}

fn check_channels(what: &str, channels: &[usize]) -> Result<()> {
    if channels.is_empty() || channels.contains(&0) {
        bail!("{what}: channels {channels:?} must be a non-empty list of positive widths");
    }
    Ok(())
}

/// The encoder's `(mean, logvar)`, each `[B, latent_channels, r, r, r]`.
#[derive(Debug, Clone)]
pub struct Posterior {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl Posterior {
    /// `mean + exp(logvar / 2) * noise` (`sample_posterior=True` with explicit noise).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        let std = (&self.logvar * 0.5)?.exp()?;
        Ok((&self.mean + std.mul(noise)?)?)
    }
}

/// `SparseStructureEncoder`: occupancy `[B, in_channels, R, R, R]` → latent posterior at
/// `R / 2^(len(channels)-1)`.
#[derive(Debug, Clone)]
pub struct SparseStructureEncoder {
    input_layer: Conv3d,
    blocks: Vec<Block>,
    middle_block: Vec<Block>,
    out_layer: OutLayer,
    latent_channels: usize,
    torso_dtype: DType,
}

impl SparseStructureEncoder {
    pub fn new(
        cfg: &SparseStructureEncoderConfig,
        vb: VarBuilder,
        torso_dtype: DType,
    ) -> Result<Self> {
        let ch = &cfg.channels;
        check_channels("SparseStructureEncoder", ch)?;
        let f32vb = vb.to_dtype(DType::F32);
        let torso = vb.to_dtype(torso_dtype);
        let input_layer = Conv3d::new(f32vb.pp("input_layer"), cfg.in_channels, ch[0], 3, 1, 1)?;
        let mut blocks = Vec::new();
        for (i, &c) in ch.iter().enumerate() {
            for _ in 0..cfg.num_res_blocks {
                let vb = torso.pp(format!("blocks.{}", blocks.len()));
                blocks.push(Block::Res(Box::new(ResBlock3d::new(vb, c, c, "layer")?)));
            }
            if let Some(&next) = ch.get(i + 1) {
                let vb = torso.pp(format!("blocks.{}.conv", blocks.len()));
                blocks.push(Block::Down(Conv3d::new(vb, c, next, 2, 2, 0)?));
            }
        }
        let last = ch[ch.len() - 1];
        let middle_block = middle(&torso, last, cfg.num_res_blocks_middle)?;
        let out_layer = OutLayer::new(
            f32vb.pp("out_layer"),
            &cfg.norm_type,
            last,
            2 * cfg.latent_channels,
        )?;
        Ok(Self {
            input_layer,
            blocks,
            middle_block,
            out_layer,
            latent_channels: cfg.latent_channels,
            torso_dtype,
        })
    }

    /// The posterior (`return_raw=True`).
    pub fn forward_raw(&self, x: &Tensor) -> Result<Posterior> {
        self.run(x, None)
    }

    /// The posterior and the output of every entry of `blocks` then `middle_block`, in forward
    /// order (the fixtures' `enc_block<k>`), as float32.
    pub fn forward_raw_traced(&self, x: &Tensor) -> Result<(Posterior, Vec<Tensor>)> {
        let mut trace = Vec::new();
        let post = self.run(x, Some(&mut trace))?;
        Ok((post, trace))
    }

    fn run(&self, x: &Tensor, mut trace: Option<&mut Vec<Tensor>>) -> Result<Posterior> {
        if x.rank() != 5 {
            bail!(
                "SparseStructureEncoder: input must be [B, C, R, R, R], got {:?}",
                x.dims()
            );
        }
        let x = x.to_dtype(DType::F32)?;
        let mut h = self.input_layer.forward(&x)?.to_dtype(self.torso_dtype)?;
        for b in self.blocks.iter().chain(&self.middle_block) {
            h = b.forward(&h)?;
            if let Some(t) = trace.as_deref_mut() {
                t.push(h.to_dtype(DType::F32)?);
            }
        }
        let h = self.out_layer.forward(&h.to_dtype(DType::F32)?)?;
        let l = self.latent_channels;
        Ok(Posterior {
            mean: h.narrow(1, 0, l)?,
            logvar: h.narrow(1, l, l)?,
        })
    }

    /// The latent with `sample_posterior=False`: the posterior mean.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_raw(x)?.mean)
    }
}

/// `SparseStructureDecoder`: latent `[B, latent_channels, r, r, r]` → occupancy logits
/// `[B, out_channels, r·2^(len(channels)-1), ...]`.
#[derive(Debug, Clone)]
pub struct SparseStructureDecoder {
    input_layer: Conv3d,
    middle_block: Vec<Block>,
    blocks: Vec<Block>,
    out_layer: OutLayer,
    latent_channels: usize,
    torso_dtype: DType,
}

impl SparseStructureDecoder {
    pub fn new(
        cfg: &SparseStructureDecoderConfig,
        vb: VarBuilder,
        torso_dtype: DType,
    ) -> Result<Self> {
        let ch = &cfg.channels;
        check_channels("SparseStructureDecoder", ch)?;
        let f32vb = vb.to_dtype(DType::F32);
        let torso = vb.to_dtype(torso_dtype);
        let input_layer =
            Conv3d::new(f32vb.pp("input_layer"), cfg.latent_channels, ch[0], 3, 1, 1)?;
        let middle_block = middle(&torso, ch[0], cfg.num_res_blocks_middle)?;
        let mut blocks = Vec::new();
        for (i, &c) in ch.iter().enumerate() {
            for _ in 0..cfg.num_res_blocks {
                let vb = torso.pp(format!("blocks.{}", blocks.len()));
                blocks.push(Block::Res(Box::new(ResBlock3d::new(vb, c, c, "layer")?)));
            }
            if let Some(&next) = ch.get(i + 1) {
                let vb = torso.pp(format!("blocks.{}.conv", blocks.len()));
                blocks.push(Block::Up(Conv3d::new(vb, c, next * 8, 3, 1, 1)?));
            }
        }
        let last = ch[ch.len() - 1];
        let out_layer = OutLayer::new(
            f32vb.pp("out_layer"),
            &cfg.norm_type,
            last,
            cfg.out_channels,
        )?;
        Ok(Self {
            input_layer,
            middle_block,
            blocks,
            out_layer,
            latent_channels: cfg.latent_channels,
            torso_dtype,
        })
    }

    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        self.run(z, None)
    }

    /// The logits and the output of every entry of `middle_block` then `blocks`, in forward
    /// order (the fixtures' `dec_block<k>`), as float32.
    pub fn forward_traced(&self, z: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        let mut trace = Vec::new();
        let logits = self.run(z, Some(&mut trace))?;
        Ok((logits, trace))
    }

    fn run(&self, z: &Tensor, mut trace: Option<&mut Vec<Tensor>>) -> Result<Tensor> {
        let dims = z.dims();
        if dims.len() != 5 || dims[1] != self.latent_channels {
            bail!(
                "SparseStructureDecoder: latent is {dims:?}, expected [B, {}, r, r, r]",
                self.latent_channels
            );
        }
        let z = z.to_dtype(DType::F32)?;
        let mut h = self.input_layer.forward(&z)?.to_dtype(self.torso_dtype)?;
        for b in self.middle_block.iter().chain(&self.blocks) {
            h = b.forward(&h)?;
            if let Some(t) = trace.as_deref_mut() {
                t.push(h.to_dtype(DType::F32)?);
            }
        }
        self.out_layer.forward(&h.to_dtype(DType::F32)?)
    }
}

/// `argwhere(logits > 0)[:, [0, 2, 3, 4]]`: the occupied voxels `(b, x, y, z)` of `[B, 1, X, Y, Z]`
/// logits in lexicographic order, as int32 `[N, 4]`.
pub fn occupied_coords(logits: &Tensor) -> Result<Tensor> {
    let dims = logits.dims();
    if dims.len() != 5 || dims[1] != 1 {
        bail!("occupied_coords: logits must be [B, 1, X, Y, Z], got {dims:?}");
    }
    let (x, y, z) = (dims[2], dims[3], dims[4]);
    let v: Vec<f32> = logits
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()
        .context("occupied_coords")?;
    let mut out = Vec::new();
    for (i, &l) in v.iter().enumerate() {
        if l > 0.0 {
            let (zi, rest) = (i % z, i / z);
            let (yi, rest) = (rest % y, rest / y);
            let (xi, bi) = (rest % x, rest / x);
            out.extend([bi, xi, yi, zi].map(|c| c as i32));
        }
    }
    let n = out.len() / 4;
    Ok(Tensor::from_vec(out, (n, 4), logits.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn occupied_coords_lexicographic() {
        let mut v = vec![-1f32; 2 * 2 * 3 * 2];
        v[5] = 0.5; // b0 x0 y2 z1
        v[6] = 2.0; // b0 x1 y0 z0
        v[12 + 11] = 1.0; // b1 x1 y2 z1
        v[7] = 0.0; // not > 0
        let l = Tensor::from_vec(v, (2, 1, 2, 3, 2), &Device::Cpu).unwrap();
        let c: Vec<Vec<i32>> = occupied_coords(&l).unwrap().to_vec2().unwrap();
        assert_eq!(
            c,
            vec![vec![0, 0, 2, 1], vec![0, 1, 0, 0], vec![1, 1, 2, 1]]
        );
    }
}
