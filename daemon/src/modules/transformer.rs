//! Dense transformer pieces: twin of trellis/modules/transformer/{blocks,modulated}.py
//! (`FeedForwardNet`, `ModulatedTransformerCrossBlock`) and `modulate` of trellis/modules/utils.py.

use anyhow::{bail, Result};
use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarBuilder};

/// adaLN modulation `x * (1 + scale) + shift`. With `x` `[B, L, C]` and `shift`/`scale` `[B, C]`, the
/// modulation is broadcast over L (torch's `unsqueeze(1)`); otherwise the shapes must broadcast
/// as they are (e.g. `x` `[N, C]` with `[1, C]` or `[C]`).
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let lift = |t: &Tensor| -> Result<Tensor> {
        Ok(if x.rank() == 3 && t.rank() == 2 {
            t.unsqueeze(1)?
        } else {
            t.clone()
        })
    };
    let (shift, scale) = (lift(shift)?, lift(scale)?);
    let one_plus = (scale + 1.0)?;
    Ok(x.broadcast_mul(&one_plus)?.broadcast_add(&shift)?)
}

/// `FeedForwardNet(channels, mlp_ratio)`: Linear(C, int(C * ratio)), GELU (tanh approximation),
/// Linear back to C. Keys `mlp.0.*`, `mlp.2.*` under the given builder. Any rank, last dim C.
#[derive(Debug, Clone)]
pub struct FeedForwardNet {
    fc1: Linear,
    fc2: Linear,
}

impl FeedForwardNet {
    pub fn new(vb: VarBuilder, channels: usize, mlp_ratio: f64) -> Result<Self> {
        let hidden = (channels as f64 * mlp_ratio) as usize;
        if hidden == 0 {
            bail!("FeedForwardNet: hidden width int({channels} * {mlp_ratio}) is 0");
        }
        Ok(Self {
            fc1: candle_nn::linear(channels, hidden, vb.pp("mlp.0"))?,
            fc2: candle_nn::linear(hidden, channels, vb.pp("mlp.2"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's `gelu` is the tanh approximation (`gelu_erf` is the exact one).
        let h = self.fc1.forward(x)?.gelu()?;
        Ok(self.fc2.forward(&h)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn modulate_broadcasts_over_tokens() {
        let x = Tensor::ones((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let shift = Tensor::new(&[[1f32, 0., 0., 0.], [0., 2., 0., 0.]], &Device::Cpu).unwrap();
        let scale = Tensor::new(&[[1f32, 1., 1., 1.], [0., 0., 0., -1.]], &Device::Cpu).unwrap();
        let y: Vec<Vec<Vec<f32>>> = modulate(&x, &shift, &scale).unwrap().to_vec3().unwrap();
        assert_eq!(y[0][2], vec![3., 2., 2., 2.]);
        assert_eq!(y[1][1], vec![1., 3., 1., 0.]);
        // [N, C] with [1, C]
        let xs = Tensor::ones((5, 4), DType::F32, &Device::Cpu).unwrap();
        let y2 = modulate(
            &xs,
            &shift.narrow(0, 0, 1).unwrap(),
            &scale.narrow(0, 0, 1).unwrap(),
        )
        .unwrap();
        assert_eq!(y2.to_vec2::<f32>().unwrap()[4], vec![3., 2., 2., 2.]);
    }

    #[test]
    fn ffn_uses_tanh_gelu() {
        let dev = Device::Cpu;
        let mut t = std::collections::HashMap::new();
        t.insert(
            "mlp.0.weight".to_string(),
            Tensor::new(&[[1f32], [2.0]], &dev).unwrap(),
        );
        t.insert(
            "mlp.0.bias".to_string(),
            Tensor::zeros(2, DType::F32, &dev).unwrap(),
        );
        t.insert(
            "mlp.2.weight".to_string(),
            Tensor::new(&[[1f32, 0.0]], &dev).unwrap(),
        );
        t.insert(
            "mlp.2.bias".to_string(),
            Tensor::zeros(1, DType::F32, &dev).unwrap(),
        );
        let vb = VarBuilder::from_tensors(t, DType::F32, &dev);
        let ffn = FeedForwardNet::new(vb, 1, 2.0).unwrap();
        let x = Tensor::new(&[[1.5f32]], &dev).unwrap();
        let y = ffn.forward(&x).unwrap().to_vec2::<f32>().unwrap()[0][0];
        let v = 1.5f32;
        let tanh_gelu = 0.5
            * v
            * (1.0 + ((2.0 / std::f32::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh());
        assert!((y - tanh_gelu).abs() < 1e-6, "{y} vs {tanh_gelu}");
    }
}
