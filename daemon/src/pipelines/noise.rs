//! The Gaussian noise a pipeline draws (`torch.randn` in the original): a seeded generator owned
//! by the pipeline, or recorded tensors handed in (the parity fixtures store every draw).
//!
//! [`TorchNoise`] is torch's own CPU generator: `torch.manual_seed(seed)` followed by
//! `torch.randn(...)` calls gives the same numbers here. The original pipelines draw their noise on
//! the CPU even when they run on a GPU (`torch.randn(...).to(device)`), so a seed given to
//! `trellisd` starts from the same noise as that seed given to the original.

use std::collections::VecDeque;

use anyhow::{anyhow, ensure, Result};
use candle_core::{Device, Tensor};

/// Where `randn` draws come from, in call order.
pub trait NoiseSource {
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor>;
}

/// torch's `mt19937` engine (ATen `MT19937RNGEngine.h`): the standard 32-bit Mersenne Twister,
/// seeded from the low 32 bits of the seed.
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; 624],
    next: usize,
}

impl Mt19937 {
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed as u32;
        for j in 1..624 {
            let p = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(p ^ (p >> 30))
                .wrapping_add(j as u32);
        }
        Self { state, next: 624 }
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        for i in 0..624 {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % 624] & LOWER);
            let mag = if y & 1 == 1 { 0x9908_b0df } else { 0 };
            self.state[i] = self.state[(i + 397) % 624] ^ (y >> 1) ^ mag;
        }
        self.next = 0;
    }

    /// The next 32-bit output (torch `CPUGeneratorImpl::random`).
    pub fn next_u32(&mut self) -> u32 {
        if self.next >= 624 {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// Two outputs as one 64-bit value, the first in the high half (`random64`).
    pub fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        (hi << 32) | self.next_u32() as u64
    }
}

/// `torch.manual_seed(seed)` + `torch.randn(shape)` (float32, CPU) in call order.
///
/// torch fills a float32 tensor of 16 or more elements with 24-bit uniforms from the 32-bit
/// outputs, then applies Box-Muller to each block of 16 (8 pairs: element `j` and `j + 8`); a
/// ragged tail re-draws the last 16 uniforms. Smaller tensors take the double-precision path, one
/// element at a time, each pair's second value cached in the generator.
pub struct TorchNoise {
    engine: Mt19937,
    cached_normal: Option<f64>,
}

impl TorchNoise {
    pub fn new(seed: u64) -> Self {
        Self {
            engine: Mt19937::new(seed),
            cached_normal: None,
        }
    }

    fn uniform_f32(&mut self) -> f32 {
        (self.engine.next_u32() & 0x00ff_ffff) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    fn uniform_f64(&mut self) -> f64 {
        (self.engine.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Box-Muller on 16 uniforms in place, as torch's scalar `NormalFill16`.
    fn fill16(d: &mut [f32]) {
        for j in 0..8 {
            let u1 = 1.0 - d[j];
            let u2 = d[j + 8];
            let radius = (-2.0 * u1.ln()).sqrt();
            let theta = (2.0 * std::f64::consts::PI * u2 as f64) as f32;
            d[j] = radius * theta.cos();
            d[j + 8] = radius * theta.sin();
        }
    }

    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.cached_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// The values of the next `torch.randn` of `n` elements.
    pub fn randn_vec(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut d: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for i in (0..n - 15).step_by(16) {
            Self::fill16(&mut d[i..i + 16]);
        }
        if !n.is_multiple_of(16) {
            for v in &mut d[n - 16..] {
                *v = self.uniform_f32();
            }
            Self::fill16(&mut d[n - 16..]);
        }
        d
    }
}

impl NoiseSource for TorchNoise {
    fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        Ok(Tensor::from_vec(self.randn_vec(n), shape, device)?)
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

    /// `torch.manual_seed(5007)` then `torch.randn(n)` for each n in turn: first three and last
    /// two values, printed by torch 2.15.0 on this CPU (both the small-tensor double path and the
    /// 16-block float path with its ragged tail are exercised, and the generator carries over).
    #[test]
    fn torch_noise_reproduces_torch_randn() {
        let expected: &[(usize, &[f64], &[f64])] = &[
            (1, &[3.7231565e-01], &[3.7231565e-01]),
            (
                3,
                &[4.4405040e-01, -5.4727590e-01, -8.5790431e-01],
                &[-5.4727590e-01, -8.5790431e-01],
            ),
            (
                15,
                &[-5.9043294e-01, 1.4463555e+00, 4.2449218e-01],
                &[-5.1632774e-01, 3.1438828e-02],
            ),
            (
                16,
                &[-1.8805497e+00, 1.4787823e+00, 1.3242331e+00],
                &[-6.0060388e-01, -1.3846381e+00],
            ),
            (
                17,
                &[1.5907496e+00, 1.1567276e+00, 1.8368839e+00],
                &[-9.1819662e-01, 2.2779861e-01],
            ),
            (
                40,
                &[2.2541778e-01, -1.1997267e+00, -6.6262597e-01],
                &[2.4763745e-01, 1.2870709e+00],
            ),
            (
                100,
                &[8.2321435e-01, -3.5523176e-01, -6.2022012e-01],
                &[4.6309903e-01, 1.2557061e+00],
            ),
        ];
        let mut g = TorchNoise::new(5007);
        for (n, head, tail) in expected {
            let v = g.randn_vec(*n);
            assert_eq!(v.len(), *n);
            let got: Vec<f32> = v[..head.len()]
                .iter()
                .chain(&v[n - tail.len()..])
                .copied()
                .collect();
            for (a, b) in got.iter().zip(head.iter().chain(tail.iter())) {
                assert!(
                    (*a as f64 - b).abs() <= 2e-6 * b.abs().max(1.0),
                    "n={n}: {got:?}"
                );
            }
        }
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
