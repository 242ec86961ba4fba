//! The Gaussian noise a pipeline draws (`torch.randn` in the original): a seeded generator owned
//! by the pipeline, or recorded tensors handed in (the parity fixtures store every draw).
//!
//! The seeded generator is not torch's Mersenne Twister: a seed reproduces this implementation's
//! results, not the original's (parity runs use the recorded noise instead).

use std::collections::VecDeque;

use anyhow::{anyhow, ensure, Result};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// Where `randn` draws come from, in call order.
pub trait NoiseSource {
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor>;
}

/// Standard normal float32 noise from a seeded ChaCha generator.
pub struct SeededNoise {
    rng: rand::rngs::StdRng,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }
}

impl NoiseSource for SeededNoise {
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect();
        Ok(Tensor::from_vec(v, shape, device)?)
    }
}

/// Pre-recorded draws, returned in order; a draw of the wrong shape is an error.
pub struct RecordedNoise {
    queue: VecDeque<Tensor>,
}

impl RecordedNoise {
    pub fn new(draws: Vec<Tensor>) -> Self {
        Self {
            queue: draws.into(),
        }
    }
}

impl NoiseSource for RecordedNoise {
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let t = self
            .queue
            .pop_front()
            .ok_or_else(|| anyhow!("recorded noise exhausted (asked for {shape:?})"))?;
        ensure!(
            t.dims() == shape,
            "recorded noise has shape {:?}, the pipeline asks for {shape:?}",
            t.dims()
        );
        Ok(t.to_device(device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_noise_is_reproducible_and_standard() {
        let d = Device::Cpu;
        let a = SeededNoise::new(3)
            .randn(&[4000], &d)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = SeededNoise::new(3)
            .randn(&[4000], &d)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let c = SeededNoise::new(4)
            .randn(&[4000], &d)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mean = a.iter().sum::<f32>() / 4000.0;
        let var = a.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / 4000.0;
        assert!(mean.abs() < 0.1 && (var - 1.0).abs() < 0.1, "{mean} {var}");
    }

    #[test]
    fn recorded_noise_checks_shapes_and_count() {
        let d = Device::Cpu;
        let mut r = RecordedNoise::new(vec![
            Tensor::zeros((2, 3), candle_core::DType::F32, &d).unwrap()
        ]);
        assert!(r.randn(&[3, 2], &d).is_err());
        assert!(r.randn(&[2, 3], &d).is_err(), "exhausted after one draw");
    }
}
