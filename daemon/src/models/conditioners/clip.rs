//! CLIP text encoder, the text conditioner of TRELLIS (`_init_text_cond_model` and `encode_text`
//! of `TrellisTextTo3DPipeline`; the network is transformers' `CLIPTextModel`, layout of
//! `openai/clip-vit-large-patch14`).
//!
//! `encode_text`: the CLIP BPE tokenizer (`tokenizer.json`) with `max_length=77,
//! padding="max_length", truncation=True` (pad token `<|endoftext|>`), then the text transformer
//! WITHOUT an attention mask (pad tokens are attended to under the causal mask): token + position
//! embeddings, pre-LN blocks (causal self-attention, MLP with `hidden_act`), final layer norm ->
//! `last_hidden_state` `[B, 77, C]`. The negative condition of the text pipeline is `encode([""])`.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};

use serde::Deserialize;
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use super::common::{finish_accepting, read_json, self_attention, Act};
use crate::modules::dense::{self, Dense};
use crate::runtime::residency::Network;
use crate::runtime::weights;

/// The fields of transformers' `CLIPTextConfig` the network needs (defaults as there).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

fn d_vocab() -> usize {
    49408
}
fn d_hidden() -> usize {
    512
}
fn d_inter() -> usize {
    2048
}
fn d_layers() -> usize {
    12
}
fn d_heads() -> usize {
    8
}
fn d_pos() -> usize {
    77
}
fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    /// A `CLIPTextConfig` JSON, or a full `CLIPConfig` (its `text_config`).
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let v = v.get("text_config").unwrap_or(v);
        let c: Self = serde_json::from_value(v.clone()).context("invalid CLIP text config")?;
        if c.hidden_size == 0 || c.num_attention_heads == 0 || c.max_position_embeddings == 0 {
            bail!("invalid CLIP text config: sizes must be positive");
        }
        if !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            bail!(
                "invalid CLIP text config: hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden_size,
                c.num_attention_heads
            );
        }
        Ok(c)
    }
}

struct Layer {
    ln1: LayerNorm,
    q: Dense,
    k: Dense,
    v: Dense,
    out: Dense,
    ln2: LayerNorm,
    fc1: Dense,
    fc2: Dense,
    act: Act,
    heads: usize,
}

impl Layer {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.hidden_size;
        let ln = |vb: VarBuilder| candle_nn::layer_norm(c, cfg.layer_norm_eps, vb);
        let lin = |i, o, vb: VarBuilder| dense::linear(i, o, vb);
        let a = vb.pp("self_attn");
        Ok(Self {
            ln1: ln(vb.pp("layer_norm1"))?,
            q: lin(c, c, a.pp("q_proj"))?,
            k: lin(c, c, a.pp("k_proj"))?,
            v: lin(c, c, a.pp("v_proj"))?,
            out: lin(c, c, a.pp("out_proj"))?,
            ln2: ln(vb.pp("layer_norm2"))?,
            fc1: lin(c, cfg.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: lin(cfg.intermediate_size, c, vb.pp("mlp.fc2"))?,
            act: Act::parse(&cfg.hidden_act)?,
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.ln1.forward(x)?;
        let o = self_attention(&h, (&self.q, &self.k, &self.v), self.heads, true)?;
        let o = self.out.forward(&o)?;
        let x = (x + o)?;
        let m = self
            .fc2
            .forward(&self.act.after(&self.fc1, &self.ln2.forward(&x)?)?)?;
        Ok((x + m)?)
    }
}

/// transformers' `CLIPTextModel` (the `text_model` transformer, no projection).
pub struct ClipTextTransformer {
    pub config: ClipTextConfig,
    tokens: Embedding,
    positions: Tensor,
    layers: Vec<Layer>,
    final_ln: LayerNorm,
}

impl ClipTextTransformer {
    /// `vb` points at the text model (`embeddings.*`, `encoder.layers.N.*`, `final_layer_norm.*`).
    pub fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: cfg.clone(),
            tokens: candle_nn::embedding(cfg.vocab_size, c, emb.pp("token_embedding"))?,
            positions: emb.get(
                (cfg.max_position_embeddings, c),
                "position_embedding.weight",
            )?,
            layers,
            final_ln: candle_nn::layer_norm(c, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?,
        })
    }

    /// `[B, L]` token ids (u32) -> `last_hidden_state` `[B, L, C]` (no attention mask).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, l) = ids.dims2()?;
        if l > self.config.max_position_embeddings {
            bail!(
                "CLIP: {l} tokens exceed the {} positions of the model",
                self.config.max_position_embeddings
            );
        }
        let max = ids.max_all()?.to_dtype(DType::U32)?.to_scalar::<u32>()?;
        if max as usize >= self.config.vocab_size {
            bail!(
                "CLIP: token id {max} outside the vocabulary of {}",
                self.config.vocab_size
            );
        }
        let mut x = self
            .tokens
            .forward(ids)?
            .broadcast_add(&self.positions.narrow(0, 0, l)?)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        Ok(self.final_ln.forward(&x)?)
    }
}

/// Token ids and attention masks of a batch of prompts (`77` entries each).
pub struct Tokens {
    pub ids: Vec<Vec<u32>>,
    /// 1 = real token, 0 = padding (returned by the tokenizer, not used by TRELLIS).
    pub masks: Vec<Vec<u32>>,
}

/// The text conditioner of TRELLIS: CLIP tokenizer + text transformer.
pub struct TextConditioner {
    pub model: ClipTextTransformer,
    tokenizer: Tokenizer,
    length: usize,
    device: Device,
}

/// Entries of a Hugging Face CLIP checkpoint the text transformer never reads: the position-id
/// buffer some exports keep, and, in a full `CLIPModel` file, the vision tower and projections.
fn harmless_extra(name: &str) -> bool {
    let n = name.strip_prefix("text_model.").unwrap_or(name);
    n == "embeddings.position_ids"
        || name.starts_with("vision_model.")
        || matches!(
            name,
            "text_projection.weight" | "visual_projection.weight" | "logit_scale"
        )
}

impl TextConditioner {
    /// Loads `dir/config.json` (a `CLIPTextConfig` or a `CLIPConfig`), `dir/model.safetensors`
    /// (`CLIPTextModel` keys, with or without the `text_model.` prefix of a full `CLIPModel`) and
    /// `dir/tokenizer.json`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg = ClipTextConfig::from_json(&read_json(&cfg_path)?)
            .with_context(|| format!("{}", cfg_path.display()))?;
        let (vb, check) = weights::from_safetensors(&dir.join("model.safetensors"), dtype, device)?;
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let model = ClipTextTransformer::new(&cfg, vb)?;
        finish_accepting(check, harmless_extra)?;
        let tokenizer = load_tokenizer(&dir.join("tokenizer.json"), cfg.max_position_embeddings)?;
        Ok(Self {
            model,
            tokenizer,
            length: cfg.max_position_embeddings,
            device: device.clone(),
        })
    }

    /// [`Self::load`] into host memory only: a network `runtime::residency` places per stage.
    pub fn load_host(dir: &Path, dtype: DType) -> Result<Network<Self>> {
        let cfg_path = dir.join("config.json");
        let cfg = ClipTextConfig::from_json(&read_json(&cfg_path)?)
            .with_context(|| format!("{}", cfg_path.display()))?;
        let tokenizer = load_tokenizer(&dir.join("tokenizer.json"), cfg.max_position_embeddings)?;
        let vb = weights::from_safetensors(&dir.join("model.safetensors"), dtype, &Device::Cpu)?;
        crate::pipelines::loader::host_network(
            "text_conditioner",
            vb,
            (cfg, tokenizer),
            dtype,
            |(cfg, tokenizer), vb, _| {
                let device = vb.device().clone();
                let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
                    vb.pp("text_model")
                } else {
                    vb
                };
                Ok(Self {
                    model: ClipTextTransformer::new(cfg, vb)?,
                    tokenizer: tokenizer.clone(),
                    length: cfg.max_position_embeddings,
                    device,
                })
            },
            |check| finish_accepting(check, harmless_extra),
        )
    }

    /// Token ids of each prompt, `length` each: `<|startoftext|>`, BPE tokens (truncated),
    /// `<|endoftext|>`, then `<|endoftext|>` padding.
    pub fn tokenize(&self, prompts: &[&str]) -> Result<Vec<Vec<u32>>> {
        Ok(self.tokenize_with_mask(prompts)?.ids)
    }

    /// [`Self::tokenize`] plus the tokenizer's attention masks (1 = real token, 0 = padding), which
    /// TRELLIS does not pass to the model.
    pub fn tokenize_with_mask(&self, prompts: &[&str]) -> Result<Tokens> {
        let enc = self
            .tokenizer
            .encode_batch(prompts.to_vec(), true)
            .map_err(|e| anyhow!("CLIP tokenizer: {e}"))?;
        let ids: Vec<Vec<u32>> = enc.iter().map(|e| e.get_ids().to_vec()).collect();
        let masks: Vec<Vec<u32>> = enc
            .iter()
            .map(|e| e.get_attention_mask().to_vec())
            .collect();
        for (p, i) in prompts.iter().zip(&ids) {
            if i.len() != self.length {
                bail!(
                    "CLIP tokenizer produced {} tokens for {p:?}, expected {}",
                    i.len(),
                    self.length
                );
            }
        }
        Ok(Tokens { ids, masks })
    }

    /// Prompts -> conditioning `[B, 77, C]` in float32 (`""` gives the negative condition).
    pub fn encode(&self, prompts: &[&str]) -> Result<Tensor> {
        if prompts.is_empty() {
            bail!("CLIP: no prompt given");
        }
        let ids = self.tokenize(prompts)?;
        let flat: Vec<u32> = ids.concat();
        let ids = Tensor::from_vec(flat, (prompts.len(), self.length), &self.device)?;
        Ok(self.model.forward(&ids)?.to_dtype(DType::F32)?)
    }
}

/// `tokenizer.json` with TRELLIS' call options: pad to `length` with `<|endoftext|>`, truncate to
/// `length` (special tokens included).
pub fn load_tokenizer(path: &Path, length: usize) -> Result<Tokenizer> {
    let mut tok = Tokenizer::from_file(path)
        .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
    let pad = "<|endoftext|>";
    let pad_id = tok
        .token_to_id(pad)
        .ok_or_else(|| anyhow!("{}: no {pad} token", path.display()))?;
    tok.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::Fixed(length),
        direction: PaddingDirection::Right,
        pad_to_multiple_of: None,
        pad_id,
        pad_type_id: 0,
        pad_token: pad.to_string(),
    }));
    tok.with_truncation(Some(TruncationParams {
        direction: TruncationDirection::Right,
        max_length: length,
        strategy: TruncationStrategy::LongestFirst,
        stride: 0,
    }))
    .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_nested_text_config_and_defaults() {
        let c = ClipTextConfig::from_json(&serde_json::json!({
            "text_config": {"hidden_size": 768, "num_attention_heads": 12}
        }))
        .unwrap();
        assert_eq!((c.hidden_size, c.max_position_embeddings), (768, 77));
        assert_eq!(c.hidden_act, "quick_gelu");
    }

    #[test]
    fn extras_of_a_full_clip_checkpoint_are_known_but_others_are_not() {
        assert!(harmless_extra("text_model.embeddings.position_ids"));
        assert!(harmless_extra(
            "vision_model.encoder.layers.0.mlp.fc1.weight"
        ));
        assert!(harmless_extra("logit_scale"));
        assert!(!harmless_extra(
            "text_model.encoder.layers.0.mlp.fc1.weight"
        ));
        assert!(!harmless_extra("something_else"));
    }
}
