//! Sinusoidal embedders: twin of `TimestepEmbedder` (trellis/models/sparse_structure_flow.py, also
//! used by the SLat flow) and `AbsolutePositionEmbedder` (trellis/modules/transformer/blocks.py).
//!
//! Both tables are computed in float32 on the host exactly as torch does (same operation order), then
//! moved to the device of the input.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::dense::{self, Dense};

/// The sinusoidal timestep features `[cos(t f_k), sin(t f_k)]` (cos first), `f_k = exp(-ln(10000) k / half)`,
/// `k < half = dim / 2`, zero-padded by one column when `dim` is odd. `t` is `[N]`, already the
/// sampler's `1000 * t`. Returns `[N, dim]` float32.
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    if t.rank() != 1 {
        bail!("timestep_embedding: t must be [N], got {:?}", t.dims());
    }
    let ts: Vec<f32> = t
        .to_dtype(DType::F32)?
        .to_vec1()
        .context("timestep_embedding: reading t")?;
    let half = dim / 2;
    // torch: exp(-ln(10000) * arange(half, f32) / half), every step in float32.
    let neg_log = -(10000f64.ln() as f32);
    let freqs: Vec<f32> = (0..half)
        .map(|k| ((neg_log * k as f32) / half as f32).exp())
        .collect();
    let mut out = Vec::with_capacity(ts.len() * dim);
    for &tv in &ts {
        let args = freqs.iter().map(|&f| tv * f);
        out.extend(args.clone().map(f32::cos));
        out.extend(args.map(f32::sin));
        if dim % 2 == 1 {
            out.push(0.0);
        }
    }
    Ok(Tensor::from_vec(out, (ts.len(), dim), t.device())?)
}

/// `TimestepEmbedder`: sinusoidal features, then `Linear, SiLU, Linear` (keys `mlp.0`, `mlp.2`).
#[derive(Debug, Clone)]
pub struct TimestepEmbedder {
    fc1: Dense,
    fc2: Dense,
    frequency_embedding_size: usize,
}

impl TimestepEmbedder {
    pub fn new(
        vb: VarBuilder,
        hidden_size: usize,
        frequency_embedding_size: usize,
    ) -> Result<Self> {
        let fc1 = dense::linear(frequency_embedding_size, hidden_size, vb.pp("mlp.0"))?;
        let fc2 = dense::linear(hidden_size, hidden_size, vb.pp("mlp.2"))?;
        Ok(Self {
            fc1,
            fc2,
            frequency_embedding_size,
        })
    }

    /// `t`: `[N]` timesteps (the sampler's `1000 * t`). Returns `[N, hidden]` in the layers' dtype.
    pub fn forward(&self, t: &Tensor) -> Result<Tensor> {
        let freq = timestep_embedding(t, self.frequency_embedding_size)?;
        let freq = freq.to_dtype(self.fc1.dtype())?;
        let h = self.fc1.forward(&freq)?.silu()?;
        self.fc2.forward(&h)
    }
}

/// `AbsolutePositionEmbedder(channels, in_channels)`: for each of the `in_channels` axes a block
/// `[sin(p f), cos(p f)]` (sin first) of `2 * freq_dim` columns, `f_k = 1 / 10000^(k / freq_dim)`,
/// `freq_dim = channels / in_channels / 2`; blocks concatenated in axis order, zero-padded to `channels`.
#[derive(Debug, Clone)]
pub struct AbsolutePositionEmbedder {
    channels: usize,
    in_channels: usize,
    freqs: Vec<f32>,
}

impl AbsolutePositionEmbedder {
    pub fn new(channels: usize, in_channels: usize) -> Result<Self> {
        if in_channels == 0 {
            bail!("AbsolutePositionEmbedder: in_channels must be positive");
        }
        let freq_dim = channels / in_channels / 2;
        // torch: 1 / 10000 ** (arange(freq_dim, f32) / freq_dim), in float32.
        let freqs = (0..freq_dim)
            .map(|k| 1.0 / 10000f32.powf(k as f32 / freq_dim as f32))
            .collect();
        Ok(Self {
            channels,
            in_channels,
            freqs,
        })
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The table for positions given as rows of `in_channels` numbers (row-major), `[N, channels]`.
    pub fn embed_rows(&self, pos: &[f32]) -> Result<Vec<f32>> {
        if !pos.len().is_multiple_of(self.in_channels) {
            bail!(
                "AbsolutePositionEmbedder: {} values are not rows of {}",
                pos.len(),
                self.in_channels
            );
        }
        let n = pos.len() / self.in_channels;
        let mut out = vec![0f32; n * self.channels];
        let fd = self.freqs.len();
        for (row, p) in out
            .chunks_mut(self.channels.max(1))
            .zip(pos.chunks(self.in_channels))
        {
            for (a, &pa) in p.iter().enumerate() {
                let block = &mut row[a * 2 * fd..(a + 1) * 2 * fd];
                for (k, &f) in self.freqs.iter().enumerate() {
                    let arg = pa * f;
                    block[k] = arg.sin();
                    block[fd + k] = arg.cos();
                }
            }
        }
        Ok(out)
    }

    /// `pos`: `[N, in_channels]` integer or float positions (dense grid indices or sparse coords
    /// without the batch column). Returns `[N, channels]` float32 on `pos`'s device.
    pub fn forward(&self, pos: &Tensor) -> Result<Tensor> {
        let (n, d) = pos
            .dims2()
            .context("AbsolutePositionEmbedder: positions must be [N, D]")?;
        if d != self.in_channels {
            bail!(
                "AbsolutePositionEmbedder: positions have {d} columns, expected {}",
                self.in_channels
            );
        }
        // Read on the host (the GPU has no int32 casts; the table is built on the host anyway).
        let p: Vec<f32> = pos
            .to_device(&candle_core::Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let table = self.embed_rows(&p)?;
        Ok(Tensor::from_vec(table, (n, self.channels), pos.device())?)
    }

    /// The table of a dense `res^in_channels` grid in row-major order (first axis slowest), as the
    /// SparseStructureFlowModel's `pos_emb` buffer is laid out.
    pub fn grid(&self, res: usize, device: &candle_core::Device) -> Result<Tensor> {
        let count = res.pow(self.in_channels as u32);
        let mut pos = Vec::with_capacity(count * self.in_channels);
        for i in 0..count {
            let mut rem = i;
            let mut idx = vec![0f32; self.in_channels];
            for a in (0..self.in_channels).rev() {
                idx[a] = (rem % res) as f32;
                rem /= res;
            }
            pos.extend(idx);
        }
        let table = self.embed_rows(&pos)?;
        Ok(Tensor::from_vec(table, (count, self.channels), device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn timestep_features_cos_first_and_odd_padding() {
        let t = Tensor::new(&[0f32, 500.0], &Device::Cpu).unwrap();
        let e = timestep_embedding(&t, 7).unwrap();
        assert_eq!(e.dims(), &[2, 7]);
        let v: Vec<Vec<f32>> = e.to_vec2().unwrap();
        // t = 0: cos = 1, sin = 0, pad 0.
        assert_eq!(&v[0][..3], &[1.0, 1.0, 1.0]);
        assert_eq!(&v[0][3..], &[0.0, 0.0, 0.0, 0.0]);
        // k = 0 has frequency 1.
        assert!((v[1][0] - 500f32.cos()).abs() < 1e-6);
        assert!((v[1][3] - 500f32.sin()).abs() < 1e-6);
        assert_eq!(v[1][6], 0.0);
    }

    #[test]
    fn ape_layout_and_padding() {
        let ape = AbsolutePositionEmbedder::new(14, 3).unwrap(); // freq_dim 2, 12 used, 2 zero
        let pos = Tensor::new(&[[1i64, 2, 3]], &Device::Cpu).unwrap();
        let v: Vec<Vec<f32>> = ape.forward(&pos).unwrap().to_vec2().unwrap();
        let f1 = 1.0 / 10000f32.powf(0.5);
        let expect = [
            1f32.sin(),
            f1.sin(),
            1f32.cos(),
            f1.cos(),
            2f32.sin(),
            (2.0 * f1).sin(),
            2f32.cos(),
            (2.0 * f1).cos(),
            3f32.sin(),
            (3.0 * f1).sin(),
            3f32.cos(),
            (3.0 * f1).cos(),
            0.0,
            0.0,
        ];
        for (a, b) in v[0].iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let grid = ape.grid(3, &Device::Cpu).unwrap();
        let row: Vec<f32> = grid.get(5).unwrap().to_vec1().unwrap(); // (0, 1, 2)
        let direct: Vec<Vec<f32>> = ape
            .forward(&Tensor::new(&[[0f32, 1.0, 2.0]], &Device::Cpu).unwrap())
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(row, direct[0]);
    }
}
