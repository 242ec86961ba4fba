//! DINOv2 with registers, the image conditioner of TRELLIS (`TrellisImageTo3DPipeline`
//! `_init_image_cond_model` + `encode_image`; the network itself is transformers'
//! `Dinov2WithRegistersModel`, safetensors layout of `facebook/dinov2-with-registers-large`).
//!
//! Tokens: patch embedding (a `patch x patch` stride-`patch` convolution, computed as one matmul
//! over the flattened patches), `[CLS] + patches` plus the position table (interpolated with
//! antialiased bicubic when the patch grid differs from the trained one), then the register tokens
//! inserted after CLS. Blocks: pre-LN attention and MLP, each scaled by LayerScale before its
//! residual. TRELLIS' conditioning is `F.layer_norm` (no affine, eps 1e-5) of the last block's
//! output before the model's own final norm (torch.hub `x_prenorm`), all tokens in order.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{LayerNorm, VarBuilder};

use serde::Deserialize;

use super::common::{
    attention as attention_heads, finish_accepting, layer_norm_plain, read_json, self_attention,
    Act,
};
use super::resample::{resample_planes_f32, Filter};
use crate::modules::dense::{self, Dense};
use crate::modules::{attention, cpu_fused};
use crate::runtime::residency::Network;
use crate::runtime::weights;
use trellis_kernels::sgemm;

/// The fields of transformers' `Dinov2WithRegistersConfig` the network needs (defaults as there).
#[derive(Debug, Clone, Deserialize)]
pub struct Dinov2Config {
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_image")]
    pub image_size: usize,
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    #[serde(default = "d_true")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub use_swiglu_ffn: bool,
    #[serde(default = "d_registers")]
    pub num_register_tokens: usize,
}

fn d_hidden() -> usize {
    768
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    12
}
fn d_mlp_ratio() -> f64 {
    4.0
}
fn d_act() -> String {
    "gelu".into()
}
fn d_eps() -> f64 {
    1e-6
}
fn d_image() -> usize {
    224
}
fn d_patch() -> usize {
    16
}
fn d_channels() -> usize {
    3
}
fn d_true() -> bool {
    true
}
fn d_registers() -> usize {
    4
}

impl Dinov2Config {
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let c: Self = serde_json::from_value(v.clone()).context("invalid DINOv2 config")?;
        if c.hidden_size == 0 || c.num_attention_heads == 0 || c.patch_size == 0 {
            bail!("invalid DINOv2 config: hidden_size, num_attention_heads and patch_size must be positive");
        }
        if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            bail!(
                "invalid DINOv2 config: hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden_size,
                c.num_attention_heads
            );
        }
        if c.image_size < c.patch_size {
            bail!(
                "invalid DINOv2 config: image_size {} < patch_size {}",
                c.image_size,
                c.patch_size
            );
        }
        Ok(c)
    }

    /// Tokens per image for an `h x w` input: CLS, registers, patches.
    pub fn num_tokens(&self, h: usize, w: usize) -> usize {
        1 + self.num_register_tokens + (h / self.patch_size) * (w / self.patch_size)
    }
}

enum Ffn {
    Mlp { fc1: Dense, fc2: Dense, act: Act },
    SwiGlu { w_in: Dense, w_out: Dense },
}

impl Ffn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Ffn::Mlp { fc1, fc2, act } => fc2.forward(&act.after(fc1, x)?)?,
            Ffn::SwiGlu { w_in, w_out } => {
                let h = w_in.forward(x)?;
                let half = h.dim(D::Minus1)? / 2;
                let (a, b) = (
                    h.narrow(D::Minus1, 0, half)?,
                    h.narrow(D::Minus1, half, half)?,
                );
                w_out.forward(&(a.silu()? * b)?)?
            }
        })
    }
}

/// The query, key and value projections: three layers, or (float32 on a CPU that runs
/// `sgemm`) one layer whose weight is the three stacked, so one product writes `q | k | v` per
/// row and the attention kernel reads them in place.
enum Qkv {
    Split(Dense, Dense, Dense),
    Fused(Dense),
}

struct Layer {
    norm1: LayerNorm,
    qkv: Qkv,
    proj: Dense,
    ls1: Tensor,
    norm2: LayerNorm,
    ffn: Ffn,
    ls2: Tensor,
    /// `ls1`, `ls2` as float32 values, for the CPU path's fused residual stores.
    ls_values: Option<(Vec<f32>, Vec<f32>)>,
    heads: usize,
}

fn linear(i: usize, o: usize, bias: bool, vb: VarBuilder) -> Result<Dense> {
    dense::linear_b(i, o, bias, vb)
}

impl Layer {
    fn new(cfg: &Dinov2Config, vb: VarBuilder) -> Result<Self> {
        let c = cfg.hidden_size;
        let ln = |vb: VarBuilder| candle_nn::layer_norm(c, cfg.layer_norm_eps, vb);
        let att = vb.pp("attention");
        let hidden = (c as f64 * cfg.mlp_ratio) as usize;
        let ffn = if cfg.use_swiglu_ffn {
            let h = (hidden * 2 / 3).div_ceil(8) * 8;
            Ffn::SwiGlu {
                w_in: linear(c, 2 * h, true, vb.pp("mlp.weights_in"))?,
                w_out: linear(h, c, true, vb.pp("mlp.weights_out"))?,
            }
        } else {
            Ffn::Mlp {
                fc1: linear(c, hidden, true, vb.pp("mlp.fc1"))?,
                fc2: linear(hidden, c, true, vb.pp("mlp.fc2"))?,
                act: Act::parse(&cfg.hidden_act)?,
            }
        };
        let cpu_f32 = vb.device().is_cpu() && vb.dtype() == DType::F32;
        let sa = att.pp("attention");
        let qkv = if cpu_f32 && sgemm::available() {
            let parts = ["query", "key", "value"]
                .map(|name| candle_nn::linear_b(c, c, cfg.qkv_bias, sa.pp(name)));
            let [q, k, v] = parts;
            Qkv::Fused(dense::stacked(&[q?, k?, v?])?)
        } else {
            Qkv::Split(
                linear(c, c, cfg.qkv_bias, sa.pp("query"))?,
                linear(c, c, cfg.qkv_bias, sa.pp("key"))?,
                linear(c, c, cfg.qkv_bias, sa.pp("value"))?,
            )
        };
        let ls1 = vb.get(c, "layer_scale1.lambda1")?;
        let ls2 = vb.get(c, "layer_scale2.lambda1")?;
        let ls_values = if cpu_f32 {
            Some((ls1.to_vec1::<f32>()?, ls2.to_vec1::<f32>()?))
        } else {
            None
        };
        Ok(Self {
            norm1: ln(vb.pp("norm1"))?,
            qkv,
            proj: linear(c, c, true, att.pp("output.dense"))?,
            ls1,
            norm2: ln(vb.pp("norm2"))?,
            ffn,
            ls2,
            ls_values,
            heads: cfg.num_attention_heads,
        })
    }

    /// Layer norm `ln` of `x`: the fused CPU pass for float32 CPU tensors, else candle's.
    fn norm(ln: &LayerNorm, x: &Tensor) -> Result<Tensor> {
        if let Some(bias) = ln.bias() {
            if let Some(y) = cpu_fused::layer_norm(x, ln.eps(), Some((ln.weight(), bias)), None)? {
                return Ok(y);
            }
        }
        Ok(ln.forward(x)?)
    }

    /// `x + ls ⊙ layer(input)`, fused into the product where the layer is packed.
    fn scaled_residual(
        layer: &Dense,
        input: &Tensor,
        ls: &Tensor,
        ls_values: Option<&[f32]>,
        x: &Tensor,
    ) -> Result<Tensor> {
        if let Some(g) = ls_values {
            if let Some(y) = layer.forward_scaled_residual(input, g, x)? {
                return Ok(y);
            }
        }
        Ok((x + layer.forward(input)?.broadcast_mul(ls)?)?)
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = Self::norm(&self.norm1, x)?;
        let o = match &self.qkv {
            Qkv::Fused(qkv) => {
                let qkv_out = qkv.forward(&h)?;
                match attention::cpu_self_attention_qkv(&qkv_out, self.heads)? {
                    Some(o) => o,
                    None => {
                        let c = qkv_out.dim(D::Minus1)? / 3;
                        let (b, n, _) = qkv_out.dims3()?;
                        let part = |i: usize| -> Result<Tensor> {
                            Ok(qkv_out
                                .narrow(D::Minus1, i * c, c)?
                                .reshape((b, n, self.heads, c / self.heads))?
                                .transpose(1, 2)?
                                .contiguous()?)
                        };
                        let d = c / self.heads;
                        let o = attention_heads(
                            &part(0)?,
                            &part(1)?,
                            &part(2)?,
                            1.0 / (d as f64).sqrt(),
                            false,
                        )?;
                        o.transpose(1, 2)?.reshape((b, n, c))?
                    }
                }
            }
            Qkv::Split(q, k, v) => self_attention(&h, (q, k, v), self.heads, false)?,
        };
        let ls = self.ls_values.as_ref();
        let x = Self::scaled_residual(&self.proj, &o, &self.ls1, ls.map(|l| &l.0[..]), x)?;
        let h = Self::norm(&self.norm2, &x)?;
        match &self.ffn {
            Ffn::Mlp { fc1, fc2, act } => {
                let m = act.after(fc1, &h)?;
                Self::scaled_residual(fc2, &m, &self.ls2, ls.map(|l| &l.1[..]), &x)
            }
            Ffn::SwiGlu { .. } => {
                let m = self.ffn.forward(&h)?.broadcast_mul(&self.ls2)?;
                Ok((x + m)?)
            }
        }
    }
}

/// transformers' `Dinov2WithRegistersModel`.
pub struct Dinov2WithRegisters {
    pub config: Dinov2Config,
    patch_w: Tensor,
    patch_b: Tensor,
    cls: Tensor,
    registers: Tensor,
    pos: Tensor,
    layers: Vec<Layer>,
    layernorm: LayerNorm,
}

impl Dinov2WithRegisters {
    /// Builds the network from a checkpoint in the Hugging Face layout (`embeddings.*`,
    /// `encoder.layer.N.*`, `layernorm.*`).
    pub fn new(cfg: &Dinov2Config, vb: VarBuilder) -> Result<Self> {
        let c = cfg.hidden_size;
        let p = cfg.patch_size;
        let grid = cfg.image_size / p;
        let emb = vb.pp("embeddings");
        let proj = emb.pp("patch_embeddings.projection");
        let patch_w = proj
            .get((c, cfg.num_channels, p, p), "weight")?
            .reshape((c, cfg.num_channels * p * p))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, vb.pp(format!("encoder.layer.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: cfg.clone(),
            patch_w: patch_w.t()?.contiguous()?,
            patch_b: proj.get(c, "bias")?,
            cls: emb.get((1, 1, c), "cls_token")?,
            registers: emb.get((1, cfg.num_register_tokens, c), "register_tokens")?,
            pos: emb.get((1, grid * grid + 1, c), "position_embeddings")?,
            layers,
            layernorm: candle_nn::layer_norm(c, cfg.layer_norm_eps, vb.pp("layernorm"))?,
        })
    }

    /// The position table for an `h x w` pixel input (`[1, 1 + gh*gw, C]`), as transformers'
    /// `interpolate_pos_encoding`: unchanged when the patch count matches and the input is square,
    /// else the patch part resized with antialiased bicubic to the new grid.
    fn position_table(&self, h: usize, w: usize) -> Result<Tensor> {
        let p = self.config.patch_size;
        let (gh, gw) = (h / p, w / p);
        let num_pos = self.pos.dim(1)? - 1;
        if gh * gw == num_pos && h == w {
            return Ok(self.pos.clone());
        }
        let side = (num_pos as f64).sqrt().round() as usize;
        if side * side != num_pos {
            bail!("DINOv2: position table of {num_pos} patches is not a square grid");
        }
        let c = self.config.hidden_size;
        let dtype = self.pos.dtype();
        let table = self
            .pos
            .narrow(1, 1, num_pos)?
            .squeeze(0)?
            .to_dtype(DType::F32)?;
        // [side*side, C] -> channel planes [C, side, side]
        let planes: Vec<f32> = table.t()?.contiguous()?.flatten_all()?.to_vec1()?;
        let out = resample_planes_f32(&planes, c, side, side, gh, gw, Filter::Bicubic);
        let patch = Tensor::from_vec(out, (c, gh * gw), self.pos.device())?
            .t()?
            .to_dtype(dtype)?
            .unsqueeze(0)?;
        Ok(Tensor::cat(&[&self.pos.narrow(1, 0, 1)?, &patch], 1)?)
    }

    /// Token embeddings of `[B, 3, H, W]` normalised images: `[B, 1 + R + gh*gw, C]`.
    pub fn embeddings(&self, images: &Tensor) -> Result<Tensor> {
        let (b, ch, h, w) = images.dims4()?;
        let p = self.config.patch_size;
        if ch != self.config.num_channels {
            bail!(
                "DINOv2: images have {ch} channels, the model expects {}",
                self.config.num_channels
            );
        }
        if h < p || w < p {
            bail!("DINOv2: image {h}x{w} is smaller than one {p}x{p} patch");
        }
        let (gh, gw) = (h / p, w / p);
        let x = images
            .to_dtype(self.patch_w.dtype())?
            .narrow(2, 0, gh * p)?
            .narrow(3, 0, gw * p)?
            .reshape((b, ch, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, ch * p * p))?;
        let patches = x
            .broadcast_matmul(&self.patch_w)?
            .broadcast_add(&self.patch_b)?;
        let c = self.config.hidden_size;
        let cls = self.cls.expand((b, 1, c))?;
        let tokens = Tensor::cat(&[&cls, &patches], 1)?;
        let tokens = tokens.broadcast_add(&self.position_table(h, w)?)?;
        let regs = self
            .registers
            .expand((b, self.config.num_register_tokens, c))?;
        Ok(Tensor::cat(
            &[
                &tokens.narrow(1, 0, 1)?,
                &regs,
                &tokens.narrow(1, 1, gh * gw)?,
            ],
            1,
        )?)
    }

    /// The output of the last block before the final norm (transformers `hidden_states[-1]`,
    /// torch.hub `x_prenorm`).
    pub fn forward_prenorm(&self, images: &Tensor) -> Result<Tensor> {
        let mut x = self.embeddings(images)?;
        for l in &self.layers {
            x = l.forward(&x)?;
        }
        Ok(x)
    }

    /// transformers' `last_hidden_state` (after the final layer norm).
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        Ok(self.layernorm.forward(&self.forward_prenorm(images)?)?)
    }
}

/// The image conditioner of TRELLIS: DINOv2 with registers + the affine-free layer norm.
pub struct ImageConditioner {
    pub model: Dinov2WithRegisters,
}

/// Checkpoint entries a Hugging Face DINOv2-with-registers file carries that inference never
/// reads (the masked-image-modelling token).
fn harmless_extra(name: &str) -> bool {
    name == "embeddings.mask_token"
}

impl ImageConditioner {
    /// Loads `dir/config.json` + `dir/model.safetensors` (Hugging Face layout); every missing,
    /// wrong-shaped or unknown entry is reported.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let cfg = Dinov2Config::from_json(&read_json(&dir.join("config.json"))?)
            .with_context(|| format!("{}", dir.join("config.json").display()))?;
        let (vb, check) = weights::from_safetensors(&dir.join("model.safetensors"), dtype, device)?;
        Self::from_parts(&cfg, vb, check)
    }

    /// [`Self::load`] into host memory only: a network `runtime::residency` places per stage.
    pub fn load_host(dir: &Path, dtype: DType) -> Result<Network<Self>> {
        let cfg = Dinov2Config::from_json(&read_json(&dir.join("config.json"))?)
            .with_context(|| format!("{}", dir.join("config.json").display()))?;
        let vb = weights::from_safetensors(&dir.join("model.safetensors"), dtype, &Device::Cpu)?;
        crate::pipelines::loader::host_network(
            "image_conditioner",
            vb,
            cfg,
            dtype,
            |cfg, vb, _| {
                Ok(Self {
                    model: Dinov2WithRegisters::new(cfg, vb)?,
                })
            },
            |check| finish_accepting(check, harmless_extra),
        )
    }

    /// Builds from an already opened checked `VarBuilder`.
    pub fn from_parts(
        cfg: &Dinov2Config,
        vb: VarBuilder,
        check: weights::WeightCheck,
    ) -> Result<Self> {
        let model = Dinov2WithRegisters::new(cfg, vb)?;
        finish_accepting(check, harmless_extra)?;
        Ok(Self { model })
    }

    /// Tokens per image at TRELLIS' 518x518 input with this model's patch size.
    pub fn num_tokens(&self, h: usize, w: usize) -> usize {
        self.model.config.num_tokens(h, w)
    }

    /// `[B, 3, H, W]` normalised images -> conditioning `[B, 1 + R + (H/p)(W/p), C]` in float32:
    /// `F.layer_norm(x_prenorm)` without affine, eps 1e-5.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        let x = self.model.forward_prenorm(images)?;
        layer_norm_plain(&x, 1e-5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_cfg() -> Dinov2Config {
        Dinov2Config::from_json(&serde_json::json!({
            "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "image_size": 28, "patch_size": 14, "num_register_tokens": 2
        }))
        .unwrap()
    }

    #[test]
    fn config_defaults_follow_transformers() {
        let c = Dinov2Config::from_json(&serde_json::json!({})).unwrap();
        assert_eq!(
            (c.hidden_size, c.patch_size, c.num_register_tokens),
            (768, 16, 4)
        );
        assert_eq!(c.hidden_act, "gelu");
        assert!(Dinov2Config::from_json(
            &serde_json::json!({"hidden_size": 10, "num_attention_heads": 3})
        )
        .is_err());
    }

    #[test]
    fn token_layout_and_missing_weights_are_reported() {
        let dev = Device::Cpu;
        let cfg = tiny_cfg();
        let (vb, check) = weights::from_tensors(Default::default(), "empty", DType::F32, &dev);
        let m = Dinov2WithRegisters::new(&cfg, vb).unwrap();
        let err = check.finish().unwrap_err().to_string();
        assert!(err.contains("missing: embeddings.register_tokens"), "{err}");
        // 28x42 input: 2x3 patches; not the trained 2x2 grid -> interpolated table.
        let x = Tensor::zeros((2, 3, 28, 42), DType::F32, &dev).unwrap();
        assert_eq!(m.embeddings(&x).unwrap().dims(), &[2, 1 + 2 + 6, 8]);
        assert_eq!(cfg.num_tokens(518, 518), 1 + 2 + 37 * 37);
    }
}
