//! Benchmarks of the full-size conditioners with random weights (f32, CPU): DINOv2-L with
//! registers on one 518x518 image, and the CLIP ViT-L/14 text transformer on a cond + neg batch.

use std::collections::HashMap;
use std::io::Write;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::peak_rss_kib;
use crate::models::conditioners::clip::{ClipTextConfig, ClipTextTransformer};
use crate::models::conditioners::dinov2::{Dinov2Config, Dinov2WithRegisters};
use crate::runtime::residency::Network;
use crate::runtime::weights;

/// Random weights N(0, 1/fan_in) (1-D: N(0, 0.05²)), the same on every run: each call takes the
/// next seed.
fn randn(shape: &[usize], dev: &Device) -> Result<Tensor> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT_SEED: AtomicU64 = AtomicU64::new(1);
    let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
    let std = if shape.len() >= 2 {
        (1.0 / fan_in as f64).sqrt()
    } else {
        0.05
    };
    let seed = NEXT_SEED.fetch_add(1, Ordering::Relaxed);
    Ok((super::randn(shape, seed, dev)? * std)?)
}

fn linear(
    t: &mut HashMap<String, Tensor>,
    p: &str,
    i: usize,
    o: usize,
    dev: &Device,
) -> Result<()> {
    t.insert(format!("{p}.weight"), randn(&[o, i], dev)?);
    t.insert(format!("{p}.bias"), randn(&[o], dev)?);
    Ok(())
}

fn norm(t: &mut HashMap<String, Tensor>, p: &str, c: usize, dev: &Device) -> Result<()> {
    t.insert(format!("{p}.weight"), (randn(&[c], dev)? + 1.0)?);
    t.insert(format!("{p}.bias"), randn(&[c], dev)?);
    Ok(())
}

fn report(out: &mut dyn Write, what: &str, build: f64, runs: &[f64]) -> Result<()> {
    let best = runs.iter().cloned().fold(f64::INFINITY, f64::min);
    writeln!(
        out,
        "{what}: build {build:.2}s, forward {} (best {best:.2}s), peak RSS {} MiB",
        runs.iter()
            .map(|r| format!("{r:.2}s"))
            .collect::<Vec<_>>()
            .join(" "),
        peak_rss_kib().map_or("?".into(), |k| (k / 1024).to_string())
    )?;
    Ok(())
}

/// `facebook/dinov2-with-registers-large` sizes, one 518x518 image.
pub fn run_dinov2(dev: &Device, out: &mut dyn Write) -> Result<()> {
    let dev = dev.clone();
    let t0 = Instant::now();
    let (model, _) = random_dinov2_large(&dev)?;
    let build = t0.elapsed().as_secs_f64();
    let x = Tensor::randn(0f32, 1.0, (1, 3, 518, 518), &dev)?;
    let mut runs = Vec::new();
    for _ in 0..2 {
        let t1 = Instant::now();
        let y = model.forward_prenorm(&x)?;
        runs.push(t1.elapsed().as_secs_f64());
        anyhow::ensure!(
            y.dims() == [1, 1374, 1024],
            "unexpected output {:?}",
            y.dims()
        );
    }
    report(
        out,
        "dinov2-large [1,3,518,518] -> [1,1374,1024]",
        build,
        &runs,
    )
}

/// `facebook/dinov2-with-registers-large` with random weights, float32.
/// Also returns its parameter count.
pub fn random_dinov2_large(dev: &Device) -> Result<(Dinov2WithRegisters, usize)> {
    let (cfg, t, params) = dinov2_large_weights(dev)?;
    let (vb, check) = weights::from_tensors(t, "random dinov2-large", DType::F32, dev);
    let model = Dinov2WithRegisters::new(&cfg, vb)?;
    check.finish()?;
    Ok((model, params))
}

/// [`random_dinov2_large`] in host memory, as `runtime::residency` places it per stage.
pub fn random_dinov2_large_network() -> Result<(Network<Dinov2WithRegisters>, usize)> {
    let (cfg, t, params) = dinov2_large_weights(&Device::Cpu)?;
    let host = weights::HostWeights::new(t, "random dinov2-large");
    let net = Network::new("dinov2_vitl14_reg", host, move |vb| {
        Dinov2WithRegisters::new(&cfg, vb)
    });
    Ok((net, params))
}

type RandomWeights<C> = (C, HashMap<String, Tensor>, usize);

fn dinov2_large_weights(dev: &Device) -> Result<RandomWeights<Dinov2Config>> {
    let dev = dev.clone();
    let cfg = Dinov2Config::from_json(&serde_json::json!({
        "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "mlp_ratio": 4,
        "image_size": 518, "patch_size": 14, "num_register_tokens": 4, "layer_norm_eps": 1e-6
    }))?;
    let (c, p) = (cfg.hidden_size, cfg.patch_size);
    let g = cfg.image_size / p;
    let mut t = HashMap::new();
    t.insert("embeddings.cls_token".into(), randn(&[1, 1, c], &dev)?);
    t.insert(
        "embeddings.register_tokens".into(),
        randn(&[1, 4, c], &dev)?,
    );
    t.insert(
        "embeddings.position_embeddings".into(),
        randn(&[1, g * g + 1, c], &dev)?,
    );
    t.insert(
        "embeddings.patch_embeddings.projection.weight".into(),
        randn(&[c, 3, p, p], &dev)?,
    );
    t.insert(
        "embeddings.patch_embeddings.projection.bias".into(),
        randn(&[c], &dev)?,
    );
    for i in 0..cfg.num_hidden_layers {
        let l = format!("encoder.layer.{i}");
        for n in ["query", "key", "value"] {
            linear(&mut t, &format!("{l}.attention.attention.{n}"), c, c, &dev)?;
        }
        linear(&mut t, &format!("{l}.attention.output.dense"), c, c, &dev)?;
        linear(&mut t, &format!("{l}.mlp.fc1"), c, 4 * c, &dev)?;
        linear(&mut t, &format!("{l}.mlp.fc2"), 4 * c, c, &dev)?;
        norm(&mut t, &format!("{l}.norm1"), c, &dev)?;
        norm(&mut t, &format!("{l}.norm2"), c, &dev)?;
        t.insert(format!("{l}.layer_scale1.lambda1"), randn(&[c], &dev)?);
        t.insert(format!("{l}.layer_scale2.lambda1"), randn(&[c], &dev)?);
    }
    norm(&mut t, "layernorm", c, &dev)?;
    let params = t.values().map(|t| t.elem_count()).sum();
    Ok((cfg, t, params))
}

/// `openai/clip-vit-large-patch14` text sizes, batch 2 (a prompt and the empty negative).
pub fn run_clip(dev: &Device, out: &mut dyn Write) -> Result<()> {
    let dev = dev.clone();
    let t0 = Instant::now();
    let (model, _) = random_clip_large_text(&dev)?;
    let build = t0.elapsed().as_secs_f64();
    let ids = clip_ids(&dev)?;
    let mut runs = Vec::new();
    for _ in 0..3 {
        let t1 = Instant::now();
        let y = model.forward(&ids)?;
        runs.push(t1.elapsed().as_secs_f64());
        anyhow::ensure!(y.dims() == [2, 77, 768], "unexpected output {:?}", y.dims());
    }
    report(out, "clip-large text [2,77] -> [2,77,768]", build, &runs)
}

/// A prompt and the empty prompt as CLIP token ids `[2, 77]` (start, nine words, end padding).
pub fn clip_ids(dev: &Device) -> Result<Tensor> {
    let mut ids = vec![49407u32; 2 * 77];
    ids[0] = 49406;
    ids[77] = 49406;
    for (k, id) in ids[1..10].iter_mut().enumerate() {
        *id = 320 + k as u32;
    }
    Ok(Tensor::from_vec(ids, (2, 77), dev)?)
}

/// `openai/clip-vit-large-patch14`'s text transformer with random weights, float32.
/// Also returns its parameter count.
pub fn random_clip_large_text(dev: &Device) -> Result<(ClipTextTransformer, usize)> {
    let (cfg, t, params) = clip_large_text_weights(dev)?;
    let (vb, check) = weights::from_tensors(t, "random clip-large text", DType::F32, dev);
    let model = ClipTextTransformer::new(&cfg, vb)?;
    check.finish()?;
    Ok((model, params))
}

/// [`random_clip_large_text`] in host memory, as `runtime::residency` places it per stage.
pub fn random_clip_large_text_network() -> Result<(Network<ClipTextTransformer>, usize)> {
    let (cfg, t, params) = clip_large_text_weights(&Device::Cpu)?;
    let host = weights::HostWeights::new(t, "random clip-large text");
    let net = Network::new("clip-vit-large-patch14 (text)", host, move |vb| {
        ClipTextTransformer::new(&cfg, vb)
    });
    Ok((net, params))
}

fn clip_large_text_weights(dev: &Device) -> Result<RandomWeights<ClipTextConfig>> {
    let dev = dev.clone();
    let cfg = ClipTextConfig::from_json(&serde_json::json!({
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "max_position_embeddings": 77, "vocab_size": 49408
    }))?;
    let (c, f) = (cfg.hidden_size, cfg.intermediate_size);
    let mut t = HashMap::new();
    t.insert(
        "embeddings.token_embedding.weight".into(),
        randn(&[cfg.vocab_size, c], &dev)?,
    );
    t.insert(
        "embeddings.position_embedding.weight".into(),
        randn(&[77, c], &dev)?,
    );
    for i in 0..cfg.num_hidden_layers {
        let l = format!("encoder.layers.{i}");
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            linear(&mut t, &format!("{l}.self_attn.{n}"), c, c, &dev)?;
        }
        linear(&mut t, &format!("{l}.mlp.fc1"), c, f, &dev)?;
        linear(&mut t, &format!("{l}.mlp.fc2"), f, c, &dev)?;
        norm(&mut t, &format!("{l}.layer_norm1"), c, &dev)?;
        norm(&mut t, &format!("{l}.layer_norm2"), c, &dev)?;
    }
    norm(&mut t, "final_layer_norm", c, &dev)?;
    let params = t.values().map(|t| t.elem_count()).sum();
    Ok((cfg, t, params))
}
