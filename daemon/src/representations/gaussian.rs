//! 3-D Gaussians (twin of `trellis/representations/gaussian/gaussian_model.py` `Gaussian`): the
//! raw parameters the decoder writes and the activations that turn them into positions, scales,
//! rotations and opacities. All arithmetic is float32 in the original's order.

use anyhow::{bail, Result};

/// `scaling_activation` of the original: `exp` (inverse `log`) or `softplus` (inverse
/// `x + log(-expm1(-x))`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalingActivation {
    Exp,
    Softplus,
}

impl ScalingActivation {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "exp" => Ok(Self::Exp),
            "softplus" => Ok(Self::Softplus),
            other => bail!("unknown Gaussian scaling_activation {other:?} (known: exp, softplus)"),
        }
    }

    pub fn apply(self, x: f32) -> f32 {
        match self {
            Self::Exp => x.exp(),
            Self::Softplus => softplus(x),
        }
    }

    pub fn inverse(self, x: f32) -> f32 {
        match self {
            Self::Exp => x.ln(),
            Self::Softplus => x + (-(-x).exp_m1()).ln(),
        }
    }
}

/// `torch.nn.functional.softplus` (beta 1, threshold 20).
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `inverse_sigmoid` of the original: `log(x / (1 - x))`.
pub fn inverse_sigmoid(x: f32) -> f32 {
    (x / (1.0 - x)).ln()
}

/// The constructor arguments of a `Gaussian`.
#[derive(Debug, Clone, PartialEq)]
pub struct GaussianParams {
    /// `[x0, y0, z0, sx, sy, sz]`: positions are `_xyz * aabb[3:] + aabb[:3]`.
    pub aabb: [f32; 6],
    pub sh_degree: usize,
    /// `mininum_kernel_size` (the original's spelling): the 3-D filter added to every scale.
    pub minimum_kernel_size: f64,
    /// Applied through a float32 tensor, as `torch.tensor(scaling_bias)` does.
    pub scaling_bias: f64,
    /// Applied through a float32 tensor, as `torch.tensor(opacity_bias)` does.
    pub opacity_bias: f64,
    pub scaling_activation: ScalingActivation,
}

/// A set of 3-D Gaussians (sh_degree 0) with the raw parameters of the original, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Gaussian {
    pub params: GaussianParams,
    /// `_xyz` `[N, 3]` (normalised to the aabb).
    pub xyz: Vec<f32>,
    /// `_features_dc` `[N, 1, 3]`.
    pub features_dc: Vec<f32>,
    /// `_scaling` `[N, 3]` (before the activation and its bias).
    pub scaling: Vec<f32>,
    /// `_rotation` `[N, 4]` quaternion (w, x, y, z) before adding `[1, 0, 0, 0]`.
    pub rotation: Vec<f32>,
    /// `_opacity` `[N, 1]` (a logit before its bias).
    pub opacity: Vec<f32>,
}

impl Gaussian {
    /// Checks that every field holds `n` rows of its width.
    pub fn new(
        params: GaussianParams,
        xyz: Vec<f32>,
        features_dc: Vec<f32>,
        scaling: Vec<f32>,
        rotation: Vec<f32>,
        opacity: Vec<f32>,
    ) -> Result<Self> {
        if params.sh_degree != 0 {
            bail!(
                "Gaussian: sh_degree {} is not supported (TRELLIS decoders use 0)",
                params.sh_degree
            );
        }
        let n = xyz.len() / 3;
        for (name, len, width) in [
            ("_xyz", xyz.len(), 3),
            ("_features_dc", features_dc.len(), 3),
            ("_scaling", scaling.len(), 3),
            ("_rotation", rotation.len(), 4),
            ("_opacity", opacity.len(), 1),
        ] {
            if len != n * width {
                bail!(
                    "Gaussian: {name} has {len} values, expected {n} rows of {width} (from _xyz)"
                );
            }
        }
        Ok(Self {
            params,
            xyz,
            features_dc,
            scaling,
            rotation,
            opacity,
        })
    }

    pub fn len(&self) -> usize {
        self.xyz.len() / 3
    }

    pub fn is_empty(&self) -> bool {
        self.xyz.is_empty()
    }

    /// The activation-space bias of `_scaling` (`inverse_scaling_activation(scaling_bias)`).
    pub fn scale_bias(&self) -> f32 {
        self.params
            .scaling_activation
            .inverse(self.params.scaling_bias as f32)
    }

    /// The logit bias of `_opacity` (`inverse_sigmoid(opacity_bias)`).
    pub fn opacity_logit_bias(&self) -> f32 {
        inverse_sigmoid(self.params.opacity_bias as f32)
    }

    /// `get_xyz`: `[N, 3]` world positions.
    pub fn get_xyz(&self) -> Vec<f32> {
        let a = self.params.aabb;
        self.xyz
            .iter()
            .enumerate()
            .map(|(i, &x)| x * a[3 + i % 3] + a[i % 3])
            .collect()
    }

    /// `get_scaling`: `sqrt(act(_scaling + bias)^2 + minimum_kernel_size^2)`, `[N, 3]`.
    pub fn get_scaling(&self) -> Vec<f32> {
        let bias = self.scale_bias();
        // a Python float squared, then applied to a float32 tensor
        let k2 = self.params.minimum_kernel_size.powi(2) as f32;
        let act = self.params.scaling_activation;
        self.scaling
            .iter()
            .map(|&s| {
                let v = act.apply(s + bias);
                (v * v + k2).sqrt()
            })
            .collect()
    }

    /// `_rotation + [1, 0, 0, 0]` (unnormalised), `[N, 4]`.
    pub fn biased_rotation(&self) -> Vec<f32> {
        self.rotation
            .iter()
            .enumerate()
            .map(|(i, &r)| if i % 4 == 0 { r + 1.0 } else { r })
            .collect()
    }

    /// `get_rotation`: the biased rotation normalised (`F.normalize`, eps 1e-12), `[N, 4]`.
    pub fn get_rotation(&self) -> Vec<f32> {
        let mut q = self.biased_rotation();
        for row in q.chunks_mut(4) {
            let n = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            row.iter_mut().for_each(|x| *x /= n);
        }
        q
    }

    /// `get_opacity`: `sigmoid(_opacity + logit(opacity_bias))`, `[N, 1]`.
    pub fn get_opacity(&self) -> Vec<f32> {
        let bias = self.opacity_logit_bias();
        self.opacity.iter().map(|&o| sigmoid(o + bias)).collect()
    }

    /// `get_features` (sh_degree 0: `_features_dc`), `[N, 1, 3]`.
    pub fn get_features(&self) -> &[f32] {
        &self.features_dc
    }
}

/// Rotation matrix of quaternions `(w, x, y, z)` as utils3d's numpy `quaternion_to_matrix`
/// (normalised first, float32 arithmetic).
pub fn quaternion_to_matrix(q: [f32; 4]) -> [[f32; 3]; 3] {
    let n = (q.iter().map(|x| x * x).sum::<f32>()).sqrt().max(1e-12);
    let [w, x, y, z] = q.map(|v| v / n);
    let v = [x, y, z];
    let sq = x * x + y * y + z * z;
    let b = [[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]];
    std::array::from_fn(|i| {
        std::array::from_fn(|j| {
            let eye = if i == j { 1.0 } else { 0.0 };
            let a = v[i] * v[j] - eye * sq;
            eye + 2.0 * (a + w * b[i][j])
        })
    })
}

/// Quaternion `(w, x, y, z)` of a rotation matrix as utils3d's numpy `matrix_to_quaternion`
/// (float64): magnitudes from the diagonal, signs relative to the largest component, normalised.
pub fn matrix_to_quaternion(m: [[f64; 3]; 3]) -> [f64; 4] {
    let d = [m[0][0], m[1][1], m[2][2]];
    let signs = [
        [1.0, 1.0, 1.0],
        [1.0, -1.0, -1.0],
        [-1.0, 1.0, -1.0],
        [-1.0, -1.0, 1.0],
    ];
    let wxyz: [f64; 4] = std::array::from_fn(|k| {
        let s = d[0] * signs[k][0] + d[1] * signs[k][1] + d[2] * signs[k][2];
        0.5 * (1.0 + s).max(0.0).sqrt()
    });
    // first index of the maximum (np.argmax)
    let mut max_idx = 0;
    for k in 1..4 {
        if wxyz[k] > wxyz[max_idx] {
            max_idx = k;
        }
    }
    let sign = |x: f64| {
        if x > 0.0 {
            1.0
        } else if x < 0.0 {
            -1.0
        } else {
            0.0
        }
    };
    let xw = sign(m[2][1] - m[1][2]);
    let yw = sign(m[0][2] - m[2][0]);
    let zw = sign(m[1][0] - m[0][1]);
    let yz = sign(m[2][1] + m[1][2]);
    let xz = sign(m[0][2] + m[2][0]);
    let xy = sign(m[0][1] + m[1][0]);
    let s = match max_idx {
        0 => [1.0, xw, yw, zw],
        1 => [xw, 1.0, xy, xz],
        2 => [yw, xy, 1.0, yz],
        _ => [zw, xz, yz, 1.0],
    };
    let q: [f64; 4] = std::array::from_fn(|k| s[k] * wxyz[k]);
    let n = q.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    q.map(|x| x / n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> GaussianParams {
        GaussianParams {
            aabb: [-0.5, -0.5, -0.5, 1.0, 1.0, 1.0],
            sh_degree: 0,
            minimum_kernel_size: 0.0009,
            scaling_bias: 0.004,
            opacity_bias: 0.1,
            scaling_activation: ScalingActivation::Softplus,
        }
    }

    #[test]
    fn zero_parameters_give_the_biases_back() {
        let g = Gaussian::new(
            params(),
            vec![0.5; 3],
            vec![0.0; 3],
            vec![0.0; 3],
            vec![0.0; 4],
            vec![0.0],
        )
        .unwrap();
        assert_eq!(g.get_xyz(), vec![0.0; 3]);
        let s = (0.004f64.powi(2) + 0.0009f64.powi(2)).sqrt();
        for v in g.get_scaling() {
            assert!((v as f64 - s).abs() < 1e-8, "{v} vs {s}");
        }
        assert!((g.get_opacity()[0] - 0.1).abs() < 1e-7);
        assert_eq!(g.get_rotation(), vec![1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn inverse_activations_invert() {
        for act in [ScalingActivation::Exp, ScalingActivation::Softplus] {
            for x in [0.004f32, 0.1, 1.0, 3.0] {
                assert!((act.apply(act.inverse(x)) - x).abs() < 1e-6 * x.max(1.0));
            }
        }
        assert!(ScalingActivation::parse("relu").is_err());
        assert_eq!(softplus(30.0), 30.0);
        assert!((inverse_sigmoid(sigmoid(0.7)) - 0.7).abs() < 1e-6);
    }

    #[test]
    fn mismatched_lengths_are_rejected() {
        let e = Gaussian::new(
            params(),
            vec![0.0; 6],
            vec![0.0; 6],
            vec![0.0; 6],
            vec![0.0; 4],
            vec![0.0; 2],
        )
        .unwrap_err();
        assert!(e.to_string().contains("_rotation"), "{e}");
    }

    #[test]
    fn quaternion_round_trips_through_the_matrix() {
        let qs = [
            [1.0f32, 0.0, 0.0, 0.0],
            [0.3, -0.5, 0.7, 0.1],
            [-0.2, 0.9, 0.1, -0.3],
            [0.0, 0.0, 1.0, 0.0],
            [0.01, -0.2, -0.3, 0.9],
        ];
        for q in qs {
            let m = quaternion_to_matrix(q);
            // orthonormal
            for i in 0..3 {
                for j in 0..3 {
                    let dot: f32 = (0..3).map(|k| m[i][k] * m[j][k]).sum();
                    assert!((dot - if i == j { 1.0 } else { 0.0 }).abs() < 1e-5);
                }
            }
            let md = m.map(|r| r.map(|x| x as f64));
            let back = matrix_to_quaternion(md);
            let n = q.iter().map(|x| x * x).sum::<f32>().sqrt();
            let qn = q.map(|x| (x / n) as f64);
            // same rotation: equal up to a global sign
            let dot: f64 = (0..4).map(|k| back[k] * qn[k]).sum();
            assert!((dot.abs() - 1.0).abs() < 1e-5, "{q:?} -> {back:?}");
        }
    }
}
