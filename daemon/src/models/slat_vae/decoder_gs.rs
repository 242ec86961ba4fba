//! `SLatGaussianDecoder` (twin of `trellis/models/structured_latent_vae/decoder_gs.py`): the swin
//! torso, a float32 layer norm, `out_layer`, then per batch element the Gaussians of
//! `to_representation`.

use anyhow::{bail, Result};
use candle_core::DType;
use candle_nn::VarBuilder;

use super::base::{SparseTransformerBase, TorsoArgs};
use crate::models::config::{GaussianRepresentationConfig, SLatGaussianDecoderConfig};
use crate::modules::norm::f_layer_norm;
use crate::modules::sparse::linear::SparseLinear;
use crate::modules::sparse::tensor::{to_f32_vec, SparseTensor};
use crate::representations::gaussian::{Gaussian, GaussianParams, ScalingActivation};

/// The network: torso → `F.layer_norm` → `out_layer` → Gaussians. `ElasticSLatGaussianDecoder`
/// checkpoints load into the same network.
#[derive(Debug, Clone)]
pub struct SLatGaussianDecoder {
    cfg: SLatGaussianDecoderConfig,
    base: SparseTransformerBase,
    out_layer: SparseLinear,
    /// The `offset_perturbation` buffer `[G, 3]` (float32).
    offset_perturbation: Vec<f32>,
}

impl SLatGaussianDecoder {
    /// `torso_dtype`: F16 runs the blocks like the original with `use_fp16`, F32 in full precision.
    pub fn new(
        cfg: &SLatGaussianDecoderConfig,
        vb: VarBuilder,
        torso_dtype: DType,
    ) -> Result<Self> {
        let layout = GaussianLayout {
            num_gaussians: cfg.representation_config.num_gaussians,
        };
        // validated up front so that a bad config fails at load time
        ScalingActivation::parse(&cfg.representation_config.scaling_activation)?;
        let base =
            SparseTransformerBase::new(&TorsoArgs::from_decoder(cfg), vb.clone(), torso_dtype)?;
        let out_layer =
            SparseLinear::new(cfg.model_channels, layout.channels(), vb.pp("out_layer"))?;
        let pert = vb
            .to_dtype(DType::F32)
            .get((layout.num_gaussians, 3), "offset_perturbation")?;
        Ok(Self {
            cfg: cfg.clone(),
            base,
            out_layer,
            offset_perturbation: to_f32_vec(&pert)?,
        })
    }

    pub fn config(&self) -> &SLatGaussianDecoderConfig {
        &self.cfg
    }

    pub fn torso(&self) -> &SparseTransformerBase {
        &self.base
    }

    /// The network output `[N, 14 G]` on the input's coords (before `to_representation`).
    pub fn forward_raw(&self, x: &SparseTensor) -> Result<SparseTensor> {
        self.forward_raw_traced(x, &mut |_, _| Ok(()))
    }

    /// Like `forward_raw`, calling `hook(i, h)` after torso block i.
    pub fn forward_raw_traced(
        &self,
        x: &SparseTensor,
        hook: &mut dyn FnMut(usize, &SparseTensor) -> Result<()>,
    ) -> Result<SparseTensor> {
        let h = self.base.forward_traced(x, hook)?.to_dtype(x.dtype())?;
        let h = h.replace(f_layer_norm(h.feats())?)?;
        self.out_layer.forward(&h)
    }

    /// One `Gaussian` per batch element.
    pub fn forward(&self, x: &SparseTensor) -> Result<Vec<Gaussian>> {
        let raw = self.forward_raw(x)?;
        self.to_representation(&raw)
    }

    /// `to_representation`: the raw output of each batch element as Gaussians.
    pub fn to_representation(&self, raw: &SparseTensor) -> Result<Vec<Gaussian>> {
        let feats = to_f32_vec(raw.feats())?;
        let c = raw.channels()?;
        let coords = raw.coords();
        raw.layout()
            .iter()
            .map(|r| {
                let xyz: Vec<[i32; 3]> = coords[r.start * 4..r.end * 4]
                    .chunks_exact(4)
                    .map(|p| [p[1], p[2], p[3]])
                    .collect();
                to_gaussian(
                    &self.cfg,
                    &self.offset_perturbation,
                    &xyz,
                    &feats[r.start * c..r.end * c],
                )
            })
            .collect()
    }
}

/// Channel ranges of one voxel of the decoder output, `G` Gaussians each:
/// `[_xyz G*3 | _features_dc G*3 | _scaling G*3 | _rotation G*4 | _opacity G]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GaussianLayout {
    pub num_gaussians: usize,
}

impl GaussianLayout {
    pub fn xyz(self) -> std::ops::Range<usize> {
        0..3 * self.num_gaussians
    }
    pub fn features_dc(self) -> std::ops::Range<usize> {
        3 * self.num_gaussians..6 * self.num_gaussians
    }
    pub fn scaling(self) -> std::ops::Range<usize> {
        6 * self.num_gaussians..9 * self.num_gaussians
    }
    pub fn rotation(self) -> std::ops::Range<usize> {
        9 * self.num_gaussians..13 * self.num_gaussians
    }
    pub fn opacity(self) -> std::ops::Range<usize> {
        13 * self.num_gaussians..14 * self.num_gaussians
    }
    /// `out_channels` of the decoder.
    pub fn channels(self) -> usize {
        14 * self.num_gaussians
    }
}

/// The `offset_perturbation` buffer: `atanh((hammersley(3, j, G) * 2 - 1) / voxel_size)`, `[G, 3]`
/// (float32 after the Python-float sequence). Checkpoints store it; this recomputes it.
pub fn offset_perturbation(num_gaussians: usize, voxel_size: f64) -> Vec<f32> {
    let radical_inverse = |base: usize, mut n: usize| {
        let inv = 1.0 / base as f64;
        let (mut val, mut scale) = (0.0f64, inv);
        while n > 0 {
            val += (n % base) as f64 * scale;
            n /= base;
            scale *= inv;
        }
        val
    };
    let vs = voxel_size as f32;
    (0..num_gaussians)
        .flat_map(|j| {
            [
                j as f64 / num_gaussians as f64,
                radical_inverse(2, j),
                radical_inverse(3, j),
            ]
        })
        .map(|h| ((h as f32 * 2.0 - 1.0) / vs).atanh())
        .collect()
}

/// The `Gaussian` constructor arguments the decoder uses.
pub fn gaussian_params(rep: &GaussianRepresentationConfig) -> Result<GaussianParams> {
    Ok(GaussianParams {
        aabb: [-0.5, -0.5, -0.5, 1.0, 1.0, 1.0],
        sh_degree: 0,
        minimum_kernel_size: rep.filter_3d_kernel_size,
        scaling_bias: rep.scaling_bias,
        opacity_bias: rep.opacity_bias,
        scaling_activation: ScalingActivation::parse(&rep.scaling_activation)?,
    })
}

/// `to_representation` for one batch element: voxel coordinates `(x, y, z)`, their output rows
/// `[n, 14 G]` and the `[G, 3]` offset perturbation. Gaussian `voxel * G + g` belongs to voxel
/// `voxel`.
pub fn to_gaussian(
    cfg: &SLatGaussianDecoderConfig,
    offset_perturbation: &[f32],
    coords: &[[i32; 3]],
    feats: &[f32],
) -> Result<Gaussian> {
    let rep = &cfg.representation_config;
    let g = rep.num_gaussians;
    let layout = GaussianLayout { num_gaussians: g };
    let c = layout.channels();
    if feats.len() != coords.len() * c {
        bail!(
            "SLatGaussianDecoder: output has {} values, expected {} voxels x {c} channels",
            feats.len(),
            coords.len()
        );
    }
    if offset_perturbation.len() != g * 3 {
        bail!(
            "SLatGaussianDecoder: offset_perturbation has {} values, expected {g} x 3",
            offset_perturbation.len()
        );
    }
    let lr = &rep.lr;
    let (lr_xyz, lr_dc, lr_s, lr_r, lr_o) = (
        lr.xyz as f32,
        lr.features_dc as f32,
        lr.scaling as f32,
        lr.rotation as f32,
        lr.opacity as f32,
    );
    let res = cfg.resolution as f32;
    let vs = rep.voxel_size as f32;
    let n = coords.len() * g;
    let mut xyz = Vec::with_capacity(n * 3);
    let mut features_dc = Vec::with_capacity(n * 3);
    let mut scaling = Vec::with_capacity(n * 3);
    let mut rotation = Vec::with_capacity(n * 4);
    let mut opacity = Vec::with_capacity(n);
    for (p, row) in coords.iter().zip(feats.chunks(c)) {
        let centre = p.map(|v| (v as f32 + 0.5) / res);
        for (k, &raw) in row[layout.xyz()].iter().enumerate() {
            let mut o = raw * lr_xyz;
            if rep.perturb_offset {
                o += offset_perturbation[k];
            }
            let o = o.tanh() / res * 0.5 * vs;
            xyz.push(centre[k % 3] + o);
        }
        features_dc.extend(row[layout.features_dc()].iter().map(|x| x * lr_dc));
        scaling.extend(row[layout.scaling()].iter().map(|x| x * lr_s));
        rotation.extend(row[layout.rotation()].iter().map(|x| x * lr_r));
        opacity.extend(row[layout.opacity()].iter().map(|x| x * lr_o));
    }
    Gaussian::new(
        gaussian_params(rep)?,
        xyz,
        features_dc,
        scaling,
        rotation,
        opacity,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perturbation_follows_the_hammersley_points() {
        let p = offset_perturbation(4, 1.5);
        assert_eq!(p.len(), 12);
        // j = 0: (0, 0, 0) -> atanh(-1 / 1.5)
        let a = (-1.0f32 / 1.5).atanh();
        assert_eq!(&p[0..3], &[a, a, a]);
        // j = 3: (3/4, 0.75 (binary .11), 1/9 (ternary .01))
        let want = [0.75f32, 0.75, (1.0f64 / 9.0) as f32].map(|h| ((h * 2.0 - 1.0) / 1.5).atanh());
        assert_eq!(&p[9..12], &want);
    }

    #[test]
    fn layout_covers_the_channels_without_gaps() {
        let l = GaussianLayout { num_gaussians: 32 };
        assert_eq!(l.channels(), 448);
        assert_eq!(l.xyz().end, l.features_dc().start);
        assert_eq!(l.features_dc().end, l.scaling().start);
        assert_eq!(l.scaling().end, l.rotation().start);
        assert_eq!(l.rotation().end, l.opacity().start);
        assert_eq!(l.opacity().end, l.channels());
    }
}
