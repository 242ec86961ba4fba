//! Tiny model repositories made from seeded random weights, so that a fresh clone can run the
//! whole command line and the test suite without the reference fixtures (`trellisd tiny-repos
//! --out DIR`, a hidden command, calls [`write`]).
//!
//! [`write`] creates, under one folder:
//! - `TRELLIS-image-tiny/`: `pipeline.json` (TrellisImageTo3DPipeline) and `ckpts/<stem>.{json,safetensors}`
//!   for the sparse-structure encoder, decoder and flow, the SLat flow and the Gaussian,
//!   radiance-field and mesh decoders;
//! - `TRELLIS-text-tiny/`: its own two flows; the decoders are named `../TRELLIS-image-tiny/ckpts/<stem>`;
//! - `dinov2_reg_tiny/`: a Hugging Face `Dinov2WithRegistersModel` (`config.json`, `model.safetensors`);
//! - `clip_text_tiny/`: a `CLIPTextModel` plus a small byte-level BPE `tokenizer.json` built here
//!   (CLIP's normaliser, pre-tokeniser, special tokens and ids 0-511; a handful of merges instead
//!   of CLIP's 48,894).
//!
//! The configurations are those of the reference set's tiny repositories (`shared/reference`
//! README, sections C and D): every architectural switch of the official ones, small widths, the
//! conditioners' widths equal to the pipelines' `cond_channels`. Weights follow the reference
//! README's initialisation: matrices and kernels N(0, 1/fan_in), biases N(0, 0.05²), 1-D scales and
//! RMS gammas 1 + N(0, 0.1²); the buffers the original computes (`pos_emb`, `offset_perturbation`)
//! are computed. The sparse-structure decoder's last bias is shifted so that about 0.6 % of the 32³
//! voxels of a decoded noise latent are occupied, as in the reference set. Every tensor comes from
//! [`TorchNoise`] seeded per checkpoint, so one seed gives the same bytes on every machine.
//!
//! The weight names and shapes are what our own networks ask for: each network is built over an
//! empty source and [`WeightCheck::missing`] lists its state dict. The shapes and names match the
//! official checkpoints (the manifests test proves the networks ask for exactly those).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::export::atomic::write_atomic;
use crate::models::conditioners::clip::{ClipTextConfig, ClipTextTransformer};
use crate::models::conditioners::dinov2::{Dinov2Config, Dinov2WithRegisters};
use crate::models::config::ModelConfig;
use crate::models::slat_vae::decoder_gs::offset_perturbation;
use crate::models::ss_vae::SparseStructureDecoder;
use crate::models::Network;
use crate::modules::embedders::AbsolutePositionEmbedder;
use crate::pipelines::noise::TorchNoise;
use crate::runtime::weights::{self, WeightCheck};

/// The repositories' folder names.
pub const IMAGE: &str = "TRELLIS-image-tiny";
pub const TEXT: &str = "TRELLIS-text-tiny";
pub const DINOV2: &str = "dinov2_reg_tiny";
pub const CLIP: &str = "clip_text_tiny";

/// The seed `trellisd tiny-repos` uses unless told otherwise.
pub const DEFAULT_SEED: u64 = 20_241_206;

/// Where [`write`] put each repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TinyRepos {
    pub root: PathBuf,
    pub image: PathBuf,
    pub text: PathBuf,
    pub dinov2: PathBuf,
    pub clip: PathBuf,
}

impl TinyRepos {
    /// The layout under `root` (nothing is checked or written).
    pub fn at(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            image: root.join(IMAGE),
            text: root.join(TEXT),
            dinov2: root.join(DINOV2),
            clip: root.join(CLIP),
        }
    }
}

/// Bumped whenever [`write`] would write other bytes for the same seed (keys [`cached`] folders).
pub const GENERATOR_VERSION: u32 = 2;

/// The repositories of [`DEFAULT_SEED`] under `parent/v<GENERATOR_VERSION>-<seed>`, written on the
/// first call and reused after (a `complete` marker is written last; a folder without it is
/// rebuilt). Safe to call from parallel tests and processes: each writer builds a private folder
/// and renames it into place.
pub fn cached(parent: &Path) -> Result<TinyRepos> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = parent.join(format!("v{GENERATOR_VERSION}-{DEFAULT_SEED}"));
    let marker = dir.join("complete");
    if marker.is_file() {
        return Ok(TinyRepos::at(&dir));
    }
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".tiny-repos-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a folder in {}", parent.display()))?;
    write(tmp.path(), DEFAULT_SEED)?;
    std::fs::write(
        tmp.path().join("complete"),
        format!("seed {DEFAULT_SEED}\n"),
    )?;
    if dir.exists() && !marker.is_file() {
        // an interrupted writer left it: replace it
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let built = tmp.keep();
    if std::fs::rename(&built, &dir).is_err() {
        // another process renamed its copy first: use that one
        std::fs::remove_dir_all(&built).ok();
        if !marker.is_file() {
            bail!(
                "tiny-repos: could not put the repositories at {}",
                dir.display()
            );
        }
    }
    Ok(TinyRepos::at(&dir))
}

/// Fraction of the decoded 32³ grid the structure decoder's bias is calibrated to occupy.
const OCCUPIED_FRACTION: f64 = 0.006;

/// The image pipeline's checkpoints: stem and config.
fn image_ckpts() -> Vec<(&'static str, Value)> {
    let swin = |channels: usize, mlp_ratio: usize| {
        json!({"model_channels": channels, "num_heads": 4, "mlp_ratio": mlp_ratio, "resolution": 32,
               "latent_channels": 8, "num_blocks": 2, "attn_mode": "swin", "window_size": 8, "use_fp16": false})
    };
    let with = |mut base: Value, key: &str, v: Value| {
        base[key] = v;
        base
    };
    vec![
        (
            "ss_enc_conv3d_tiny",
            json!({"name": "SparseStructureEncoder", "args": {"in_channels": 1, "latent_channels": 8,
                "num_res_blocks": 2, "channels": [8, 16, 32], "num_res_blocks_middle": 2, "use_fp16": false}}),
        ),
        (
            "ss_dec_conv3d_tiny",
            json!({"name": "SparseStructureDecoder", "args": {"out_channels": 1, "latent_channels": 8,
                "num_res_blocks": 1, "channels": [32, 16, 8], "num_res_blocks_middle": 1, "use_fp16": false}}),
        ),
        ("ss_flow_img_dit_tiny", ss_flow(32)),
        ("slat_flow_img_dit_tiny", slat_flow(32)),
        (
            "slat_dec_gs_swin8_tiny",
            json!({"name": "SLatGaussianDecoder", "args": with(swin(64, 4), "representation_config", json!({
                "lr": {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0, "_rotation": 0.1},
                "perturb_offset": true, "voxel_size": 1.5, "num_gaussians": 32, "2d_filter_kernel_size": 0.1,
                "3d_filter_kernel_size": 0.0009, "scaling_bias": 0.004, "opacity_bias": 0.1,
                "scaling_activation": "softplus"}))}),
        ),
        (
            "slat_dec_rf_swin8_tiny",
            json!({"name": "SLatRadianceFieldDecoder", "args": with(swin(64, 4), "representation_config",
                json!({"rank": 16, "dim": 8}))}),
        ),
        (
            "slat_dec_mesh_swin8_tiny",
            json!({"name": "SLatMeshDecoder", "args": with(swin(256, 1), "representation_config",
                json!({"use_color": true}))}),
        ),
    ]
}

fn ss_flow(cond_channels: usize) -> Value {
    json!({"name": "SparseStructureFlowModel", "args": {"resolution": 8, "in_channels": 8, "out_channels": 8,
        "model_channels": 64, "cond_channels": cond_channels, "num_blocks": 2, "num_heads": 4, "mlp_ratio": 4,
        "patch_size": 1, "pe_mode": "ape", "qk_rms_norm": true, "use_fp16": false}})
}

fn slat_flow(cond_channels: usize) -> Value {
    json!({"name": "SLatFlowModel", "args": {"resolution": 32, "in_channels": 8, "out_channels": 8,
        "model_channels": 64, "cond_channels": cond_channels, "num_blocks": 2, "num_heads": 4, "mlp_ratio": 4,
        "patch_size": 2, "num_io_res_blocks": 2, "io_block_channels": [16], "pe_mode": "ape",
        "qk_rms_norm": true, "use_fp16": false}})
}

/// The official slat normalisation (TRELLIS-image-large's `pipeline.json`).
fn slat_normalization() -> Value {
    json!({
        "mean": [-2.1687545776367188, -0.004347046371549368, -0.13352349400520325, -0.08418072760105133,
                 -0.5271206498146057, 0.7238689064979553, -1.1414450407028198, 1.2039363384246826],
        "std": [2.377650737762451, 2.386378288269043, 2.124418020248413, 2.1748552322387695,
                2.663944721221924, 2.371192216873169, 2.6217446327209473, 2.684523105621338]
    })
}

fn sampler(cfg_strength: f64) -> Value {
    json!({"name": "FlowEulerGuidanceIntervalSampler", "args": {"sigma_min": 1e-5},
           "params": {"steps": 4, "cfg_strength": cfg_strength, "cfg_interval": [0.5, 1.0], "rescale_t": 3.0}})
}

fn dinov2_config() -> Value {
    json!({"architectures": ["Dinov2WithRegistersModel"], "model_type": "dinov2_with_registers",
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 4,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02, "layer_norm_eps": 1e-6, "image_size": 518, "patch_size": 14,
        "num_channels": 3, "qkv_bias": true, "layerscale_value": 1.0, "drop_path_rate": 0.0,
        "use_swiglu_ffn": false, "num_register_tokens": 4, "apply_layernorm": true,
        "reshape_hidden_states": true, "dtype": "float32"})
}

fn clip_config() -> Value {
    json!({"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
        "hidden_size": 48, "intermediate_size": 192, "projection_dim": 48, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "initializer_range": 0.02,
        "initializer_factor": 1.0, "pad_token_id": 49407, "bos_token_id": 49406, "eos_token_id": 49407,
        "dtype": "float32"})
}

/// Writes the four tiny repositories under `out` (created if needed; existing files of the same
/// names are replaced, each atomically).
pub fn write(out: &Path, seed: u64) -> Result<TinyRepos> {
    let repos = TinyRepos::at(out);
    let dev = Device::Cpu;
    let ckpts = repos.image.join("ckpts");
    let mut models = serde_json::Map::new();
    for (stem, config) in image_ckpts() {
        write_ckpt(&ckpts, stem, &config, seed, &dev)?;
        let key = match stem {
            "ss_enc_conv3d_tiny" => continue, // shipped, not named (as in TRELLIS-image-large)
            "ss_dec_conv3d_tiny" => "sparse_structure_decoder",
            "ss_flow_img_dit_tiny" => "sparse_structure_flow_model",
            "slat_flow_img_dit_tiny" => "slat_flow_model",
            "slat_dec_gs_swin8_tiny" => "slat_decoder_gs",
            "slat_dec_rf_swin8_tiny" => "slat_decoder_rf",
            _ => "slat_decoder_mesh",
        };
        models.insert(key.into(), json!(format!("ckpts/{stem}")));
    }
    write_json(
        &repos.image.join("pipeline.json"),
        &json!({"name": "TrellisImageTo3DPipeline", "args": {
            "models": models,
            "sparse_structure_sampler": sampler(7.5),
            "slat_sampler": sampler(3.0),
            "slat_normalization": slat_normalization(),
            "image_cond_model": "dinov2_vitl14_reg"}}),
    )?;

    let text_ckpts = repos.text.join("ckpts");
    write_ckpt(
        &text_ckpts,
        "ss_flow_txt_dit_tiny",
        &ss_flow(48),
        seed,
        &dev,
    )?;
    write_ckpt(
        &text_ckpts,
        "slat_flow_txt_dit_tiny",
        &slat_flow(48),
        seed,
        &dev,
    )?;
    let shared = |stem: &str| json!(format!("../{IMAGE}/ckpts/{stem}"));
    write_json(
        &repos.text.join("pipeline.json"),
        &json!({"name": "TrellisTextTo3DPipeline", "args": {
            "models": {
                "sparse_structure_flow_model": "ckpts/ss_flow_txt_dit_tiny",
                "slat_flow_model": "ckpts/slat_flow_txt_dit_tiny",
                "sparse_structure_decoder": shared("ss_dec_conv3d_tiny"),
                "slat_decoder_gs": shared("slat_dec_gs_swin8_tiny"),
                "slat_decoder_rf": shared("slat_dec_rf_swin8_tiny"),
                "slat_decoder_mesh": shared("slat_dec_mesh_swin8_tiny")},
            "sparse_structure_sampler": sampler(7.5),
            "slat_sampler": sampler(7.5),
            "slat_normalization": slat_normalization(),
            "text_cond_model": "openai/clip-vit-large-patch14"}}),
    )?;

    write_dinov2(&repos.dinov2, seed, &dev)?;
    write_clip(&repos.clip, seed, &dev)?;
    Ok(repos)
}

/// One TRELLIS checkpoint: `<dir>/<stem>.json` and `<dir>/<stem>.safetensors`.
fn write_ckpt(dir: &Path, stem: &str, config: &Value, seed: u64, dev: &Device) -> Result<()> {
    let cfg = ModelConfig::from_json(stem, config)?;
    let specs = state_dict_of(|vb| Network::build(&cfg, vb, DType::F32).map(|_| ()))?;
    let mut noise = TorchNoise::new(seed ^ fnv1a(stem));
    let mut tensors = HashMap::new();
    for (name, shape) in &specs {
        let values = match name.as_str() {
            "pos_emb" => ape_table(config, shape)?,
            "offset_perturbation" => {
                let rep = &config["args"]["representation_config"];
                let voxel_size = rep["voxel_size"]
                    .as_f64()
                    .ok_or_else(|| anyhow!("{stem}: no representation_config.voxel_size"))?;
                offset_perturbation(shape[0], voxel_size)
            }
            _ => init_values(name, shape, &mut noise),
        };
        tensors.insert(
            name.clone(),
            Tensor::from_vec(values, shape.as_slice(), dev)?,
        );
    }
    if let ModelConfig::SparseStructureDecoder(c) = &cfg {
        calibrate_structure_decoder(c, &mut tensors, seed, dev)
            .with_context(|| format!("{stem}: calibrating the occupancy"))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_json(&dir.join(format!("{stem}.json")), config)?;
    write_safetensors(&dir.join(format!("{stem}.safetensors")), &tensors)
}

/// The state dict (names and shapes, in request order) a network asks for.
fn state_dict_of(
    build: impl FnOnce(candle_nn::VarBuilder<'static>) -> Result<()>,
) -> Result<Vec<(String, Vec<usize>)>> {
    let (vb, check): (_, WeightCheck) =
        weights::from_tensors(HashMap::new(), "tiny-repos", DType::F32, &Device::Cpu);
    build(vb)?;
    let mut specs = check.missing();
    specs.sort();
    specs.dedup();
    if specs.is_empty() {
        bail!("tiny-repos: the network asked for no weights");
    }
    Ok(specs)
}

/// The reference README's initialisation of one entry, drawn from `noise`.
fn init_values(name: &str, shape: &[usize], noise: &mut TorchNoise) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let z = noise.randn_vec(n);
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let (base, std) = if shape.len() >= 2 && leaf != "gamma" {
        let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
        (0.0, 1.0 / (fan_in as f32).sqrt())
    } else if leaf == "bias" {
        (0.0, 0.05)
    } else {
        // norm weights, RMS gammas, layer scales
        (1.0, 0.1)
    };
    z.into_iter().map(|v| base + std * v).collect()
}

/// The `pos_emb` buffer of a SparseStructureFlowModel: the APE of every patch position, x-major
/// and z fastest, `[tokens, model_channels]`.
fn ape_table(config: &Value, shape: &[usize]) -> Result<Vec<f32>> {
    let args = &config["args"];
    let get = |k: &str| {
        args[k]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| anyhow!("pos_emb: config has no integer {k}"))
    };
    let side = get("resolution")? / get("patch_size")?.max(1);
    let channels = get("model_channels")?;
    if shape != [side * side * side, channels] {
        bail!(
            "pos_emb: shape {shape:?} is not [{}, {channels}]",
            side.pow(3)
        );
    }
    let mut pos = Vec::with_capacity(side.pow(3) * 3);
    for x in 0..side {
        for y in 0..side {
            for z in 0..side {
                pos.extend([x as f32, y as f32, z as f32]);
            }
        }
    }
    AbsolutePositionEmbedder::new(channels, 3)?.embed_rows(&pos)
}

/// Shifts the decoder's last bias so that [`OCCUPIED_FRACTION`] of a decoded noise latent's voxels
/// have a positive logit.
fn calibrate_structure_decoder(
    cfg: &crate::models::config::SparseStructureDecoderConfig,
    tensors: &mut HashMap<String, Tensor>,
    seed: u64,
    dev: &Device,
) -> Result<()> {
    let key = "out_layer.2.bias";
    let (vb, check) = weights::from_tensors(tensors.clone(), "tiny-repos", DType::F32, dev);
    let dec = SparseStructureDecoder::new(cfg, vb, DType::F32)?;
    check.finish()?;
    let r = 8;
    let shape = [1, cfg.latent_channels, r, r, r];
    let z = TorchNoise::new(seed ^ fnv1a("calibration")).randn_vec(shape.iter().product());
    let logits = dec.forward(&Tensor::from_vec(z, shape.as_slice(), dev)?)?;
    let mut v: Vec<f32> = logits.flatten_all()?.to_vec1()?;
    v.sort_by(|a, b| b.total_cmp(a));
    let keep = ((v.len() as f64 * OCCUPIED_FRACTION).round() as usize).clamp(1, v.len() - 1);
    // halfway between the last kept logit and the first dropped one
    let threshold = (v[keep - 1] + v[keep]) / 2.0;
    let bias = tensors
        .get(key)
        .ok_or_else(|| anyhow!("no {key}"))?
        .affine(1.0, -(threshold as f64))?;
    tensors.insert(key.into(), bias);
    Ok(())
}

fn write_dinov2(dir: &Path, seed: u64, dev: &Device) -> Result<()> {
    let config = dinov2_config();
    let cfg = Dinov2Config::from_json(&config)?;
    let specs = state_dict_of(|vb| Dinov2WithRegisters::new(&cfg, vb).map(|_| ()))?;
    let tensors = random_tensors(&specs, seed ^ fnv1a(DINOV2), dev)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_json(&dir.join("config.json"), &config)?;
    write_safetensors(&dir.join("model.safetensors"), &tensors)
}

fn write_clip(dir: &Path, seed: u64, dev: &Device) -> Result<()> {
    let config = clip_config();
    let cfg = ClipTextConfig::from_json(&config)?;
    let specs = state_dict_of(|vb| ClipTextTransformer::new(&cfg, vb).map(|_| ()))?;
    let tensors = random_tensors(&specs, seed ^ fnv1a(CLIP), dev)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_json(&dir.join("config.json"), &config)?;
    write_safetensors(&dir.join("model.safetensors"), &tensors)?;
    write_json(&dir.join("tokenizer.json"), &clip_tokenizer())?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({"tokenizer_class": "CLIPTokenizer", "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>", "model_max_length": 77}),
    )
}

fn random_tensors(
    specs: &[(String, Vec<usize>)],
    seed: u64,
    dev: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut noise = TorchNoise::new(seed);
    specs
        .iter()
        .map(|(name, shape)| {
            let v = init_values(name, shape, &mut noise);
            Ok((name.clone(), Tensor::from_vec(v, shape.as_slice(), dev)?))
        })
        .collect()
}

/// GPT-2's byte-to-unicode table in CLIP's vocabulary order: the printable bytes first, then the
/// others mapped to U+0100 onwards.
fn byte_alphabet() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    let mut out: Vec<char> = (0u32..256)
        .filter(|&b| printable(b))
        .filter_map(char::from_u32)
        .collect();
    out.extend(
        (0u32..256)
            .filter(|&b| !printable(b))
            .enumerate()
            .filter_map(|(n, _)| char::from_u32(256 + n as u32)),
    );
    out
}

/// A CLIP-style `tokenizer.json`: CLIP's normaliser, pre-tokeniser, post-processor and special
/// tokens (ids 49406 / 49407), CLIP's ids 0-511 (the 256 byte symbols, then each with `</w>`), and
/// a few merges of common English pairs with ids from 512.
fn clip_tokenizer() -> Value {
    let alphabet = byte_alphabet();
    let mut vocab = serde_json::Map::new();
    for (i, c) in alphabet.iter().enumerate() {
        vocab.insert(c.to_string(), json!(i));
        vocab.insert(format!("{c}</w>"), json!(i + 256));
    }
    let pairs = [
        ("t", "h"),
        ("th", "e</w>"),
        ("a", "n"),
        ("an", "d</w>"),
        ("i", "n"),
        ("in", "g</w>"),
        ("e", "r"),
        ("o", "n</w>"),
        ("c", "h"),
        ("a", "i"),
        ("ch", "ai"),
        ("chai", "r</w>"),
    ];
    let mut merges = Vec::new();
    for (k, (a, b)) in pairs.iter().enumerate() {
        vocab.insert(format!("{a}{b}"), json!(512 + k));
        merges.push(json!(format!("{a} {b}")));
    }
    // as in CLIP's vocabulary, the specials are model tokens too (the added tokens point at them)
    vocab.insert("<|startoftext|>".into(), json!(49406));
    vocab.insert("<|endoftext|>".into(), json!(49407));
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(49406, "<|startoftext|>"), special(49407, "<|endoftext|>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex":
                "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
             "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "RobertaProcessing", "sep": ["<|endoftext|>", 49407],
            "cls": ["<|startoftext|>", 49406], "trim_offsets": false, "add_prefix_space": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<|endoftext|>",
            "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    })
}

/// FNV-1a of a name: a per-checkpoint seed offset.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    write_atomic(path, |w| {
        serde_json::to_writer_pretty(&mut *w, v)?;
        Ok(())
    })
}

fn write_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let bytes =
        safetensors::serialize(sorted, None).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    write_atomic(path, |w| Ok(w.write_all(&bytes)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_clips_order() {
        let a = byte_alphabet();
        assert_eq!(a.len(), 256);
        assert_eq!((a[0], a[93], a[255]), ('!', '~', 'Ń'));
        let unique: std::collections::BTreeSet<char> = a.iter().copied().collect();
        assert_eq!(unique.len(), 256);
    }

    #[test]
    fn init_follows_the_reference_rules() {
        let mut n = TorchNoise::new(1);
        let w = init_values("blocks.0.attn.to_qkv.weight", &[300, 400], &mut n);
        let std = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
        assert!((std - 0.05).abs() < 0.002, "{std}");
        let g = init_values("norm.weight", &[4000], &mut n);
        let mean = g.iter().sum::<f32>() / g.len() as f32;
        assert!((mean - 1.0).abs() < 0.01, "{mean}");
        let b = init_values("x.bias", &[4000], &mut n);
        assert!(b.iter().all(|v| v.abs() < 0.5));
    }
}
