//! Parity of the conditioners (DINOv2 with registers, CLIP text) and image preprocessing.
//!
//! * `conditioner:dinov2_with_registers`: the fixture's `image_normalized_<i>` inputs, plus, for
//!   batch entries without one, `Normalize(rgb518_<i> / 255)` of the preprocessing fixture its
//!   meta.json points to; compares `x_prenorm` and `cond` (and our normalisation of the
//!   reference uint8 image against `image_normalized_<i>` where both exist).
//! * `conditioner:clip_text`: meta.json's prompts through our tokenizer (`input_ids`,
//!   `attention_mask` exact) and text transformer (`last_hidden_state`).
//! * `preprocess:image`: every `rgba_in_<i>` through the alpha path (`rgb518_<i>` exact) and, where
//!   meta.json names the tensor, the normalised image.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::{RgbImage, RgbaImage};

use super::fixture::tol;
use super::{Fixture, Outcome, Report};
use crate::models::conditioners::dinov2::Dinov2Config;
use crate::models::conditioners::preprocess::{normalize, preprocess_rgba};
use crate::models::conditioners::{ImageConditioner, TextConditioner};

pub const KINDS: &[&str] = &[
    "conditioner:dinov2_with_registers",
    "conditioner:clip_text",
    "preprocess:image",
];

pub fn check(fx: &mut Fixture) -> Result<Outcome> {
    fx.load_io()?;
    let report = match fx.kind.as_str() {
        "conditioner:dinov2_with_registers" => dinov2(fx)?,
        "conditioner:clip_text" => clip(fx)?,
        "preprocess:image" => preprocess(fx)?,
        other => bail!("conditioners: unexpected kind {other}"),
    };
    Ok(Outcome::Checked(report))
}

/// The tolerance meta.json states for `name` (per tensor, else the fixture-wide `tolerance`
/// string's number), else `default`.
fn tolerance(fx: &Fixture, name: &str, default: f64) -> f64 {
    if let Some(t) = fx.stated_tolerance(name) {
        return t;
    }
    fx.meta_str("tolerance")
        .and_then(|t| {
            // "input_ids exact; last_hidden_state rel_l2 1e-5": the number after the tensor's
            // name if it is mentioned, else the first number.
            let part = t.split(';').find(|p| p.contains(name)).unwrap_or(t);
            part.split_whitespace().find_map(|w| {
                w.trim_matches(|c: char| ",;()".contains(c))
                    .parse::<f64>()
                    .ok()
            })
        })
        .unwrap_or(default)
}

/// Indices `i` of the io tensors named `<prefix><i>`, sorted.
fn indexed(fx: &Fixture, prefix: &str) -> Vec<usize> {
    let mut v: Vec<usize> = fx
        .io_names()
        .iter()
        .filter_map(|n| n.strip_prefix(prefix)?.parse().ok())
        .collect();
    v.sort_unstable();
    v
}

/// Every relative path mentioned in meta.json's strings, resolved against the fixture directory
/// and its ancestors, that leads to an `io.safetensors`.
fn referenced_io_files(fx: &Fixture) -> Vec<PathBuf> {
    let mut texts = Vec::new();
    collect_strings(&fx.meta, &mut texts);
    let mut out = Vec::new();
    for t in texts {
        for tok in t.split(|c: char| c.is_whitespace() || "(),;\"'".contains(c)) {
            if !tok.contains('/') || tok.contains("://") {
                continue;
            }
            let tok = tok.trim_end_matches(['.', ':']);
            let mut base: Option<&Path> = Some(fx.dir.as_path());
            while let Some(b) = base {
                let p = b.join(tok);
                let p = if p.is_dir() {
                    p.join("io.safetensors")
                } else {
                    p
                };
                if p.is_file() && p.file_name().is_some_and(|n| n == "io.safetensors") {
                    if !out.contains(&p) {
                        out.push(p);
                    }
                    break;
                }
                base = b.parent();
            }
        }
    }
    out
}

fn collect_strings<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
    match v {
        serde_json::Value::String(s) => out.push(s),
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_strings(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| collect_strings(x, out)),
        _ => {}
    }
}

fn load_io_file(p: &Path) -> Result<std::collections::HashMap<String, Tensor>> {
    candle_core::safetensors::load(p, &Device::Cpu)
        .with_context(|| format!("reading {}", p.display()))
}

/// A uint8 `[H, W, C]` tensor as raw bytes with its sizes.
fn u8_image(t: &Tensor, channels: usize) -> Result<(u32, u32, Vec<u8>)> {
    let (h, w, c) = t.dims3()?;
    if c != channels {
        bail!("expected {channels} channels, got {c}");
    }
    let data = t.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?;
    Ok((w as u32, h as u32, data))
}

fn rgb_image(t: &Tensor) -> Result<RgbImage> {
    let (w, h, d) = u8_image(t, 3)?;
    RgbImage::from_raw(w, h, d).ok_or_else(|| anyhow!("bad RGB buffer"))
}

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        return Ok(f64::INFINITY);
    }
    Ok((a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()?)
}

fn dinov2(fx: &Fixture) -> Result<Report> {
    let cfg = Dinov2Config::from_json(fx.config_args()?)?;
    let (vb, check) = fx.weights(DType::F32)?;
    let enc = ImageConditioner::from_parts(&cfg, vb, check)?;
    let expected_cond = fx.io("cond")?;
    let batch = expected_cond.dim(0)?;
    let mut report = Report::default();

    // Reference uint8 images of the preprocessing fixture, if meta.json points at one.
    let mut rgb_refs = std::collections::HashMap::new();
    for p in referenced_io_files(fx) {
        for (k, v) in load_io_file(&p)? {
            if let Some(i) = k
                .strip_prefix("rgb518_")
                .and_then(|i| i.parse::<usize>().ok())
            {
                rgb_refs.entry(i).or_insert(v);
            }
        }
    }
    let mut inputs = Vec::new();
    for i in 0..batch {
        let name = format!("image_normalized_{i}");
        let from_rgb = match rgb_refs.get(&i) {
            Some(t) => Some(normalize(&[&rgb_image(t)?], &fx.device)?),
            None => None,
        };
        let x = if fx.has_io(&name) {
            let given = fx.io(&name)?;
            let given = if given.rank() == 3 {
                given.unsqueeze(0)?
            } else {
                given
            };
            if let Some(ours) = &from_rgb {
                report.record(
                    &format!("{name} (Normalize of rgb518_{i}, max abs)"),
                    max_abs(ours, &given)?,
                    1e-6,
                );
            }
            given
        } else if let Some(ours) = from_rgb {
            ours
        } else {
            break;
        };
        inputs.push(x);
    }
    if inputs.is_empty() {
        bail!(
            "no input image: neither image_normalized_<i> nor a referenced preprocessing fixture"
        );
    }
    let n = inputs.len();
    let images = Tensor::cat(&inputs, 0)?;
    let prenorm = enc.model.forward_prenorm(&images)?;
    let cond = enc.encode(&images)?;
    let suffix = if n < batch {
        format!("[0..{n} of {batch}]")
    } else {
        String::new()
    };
    for (name, ours) in [("x_prenorm", &prenorm), ("cond", &cond)] {
        if fx.has_io(name) {
            let exp = fx.io(name)?.narrow(0, 0, n)?;
            report.close(
                &format!("{name}{suffix}"),
                ours,
                &exp,
                tolerance(fx, name, tol::FORWARD),
            )?;
        }
    }
    if n < batch {
        // Entries whose input could not be found count as failed comparisons.
        report.record(
            &format!("cond[{n}..{batch}] (input not found)"),
            f64::INFINITY,
            0.0,
        );
    }
    Ok(report)
}

fn clip(fx: &Fixture) -> Result<Report> {
    let enc = TextConditioner::load(&fx.dir, &fx.device, DType::F32)?;
    let prompts: Vec<String> = fx
        .meta
        .get("prompts")
        .and_then(|p| p.as_array())
        .ok_or_else(|| anyhow!("meta.json has no \"prompts\" list"))?
        .iter()
        .map(|p| {
            p.as_str()
                .map(str::to_string)
                .ok_or_else(|| anyhow!("non-string prompt"))
        })
        .collect::<Result<_>>()?;
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let tokens = enc.tokenize_with_mask(&refs)?;
    let to_tensor = |v: &[Vec<u32>]| -> Result<Tensor> {
        let len = v.first().map_or(0, Vec::len);
        Ok(Tensor::from_vec(v.concat(), (v.len(), len), &fx.device)?)
    };
    let mut report = Report::default();
    report.exact("input_ids", &to_tensor(&tokens.ids)?, &fx.io("input_ids")?)?;
    if fx.has_io("attention_mask") {
        report.exact(
            "attention_mask",
            &to_tensor(&tokens.masks)?,
            &fx.io("attention_mask")?,
        )?;
    }
    let hidden = enc.encode(&refs)?;
    report.close(
        "last_hidden_state",
        &hidden,
        &fx.io("last_hidden_state")?,
        tolerance(fx, "last_hidden_state", tol::FORWARD),
    )?;
    // The network alone, on the reference ids.
    let ref_ids = fx.io("input_ids")?.to_dtype(DType::U32)?;
    report.close(
        "last_hidden_state (reference ids)",
        &enc.model.forward(&ref_ids)?,
        &fx.io("last_hidden_state")?,
        tolerance(fx, "last_hidden_state", tol::FORWARD),
    )?;
    Ok(report)
}

fn preprocess(fx: &Fixture) -> Result<Report> {
    let mut report = Report::default();
    let mut normalized_refs = std::collections::HashMap::new();
    for p in referenced_io_files(fx) {
        for (k, v) in load_io_file(&p)? {
            if let Some(i) = k
                .strip_prefix("image_normalized_")
                .and_then(|i| i.parse::<usize>().ok())
            {
                normalized_refs.entry(i).or_insert(v);
            }
        }
    }
    let ids = indexed(fx, "rgba_in_");
    if ids.is_empty() {
        bail!("no rgba_in_<i> tensor");
    }
    for i in ids {
        let (w, h, data) = u8_image(&fx.io(&format!("rgba_in_{i}"))?, 4)?;
        let img = RgbaImage::from_raw(w, h, data).ok_or_else(|| anyhow!("bad RGBA buffer"))?;
        let out_name = format!("rgb518_{i}");
        let expected = fx.io(&out_name)?;
        let size = expected.dim(0)?;
        let ours = preprocess_rgba(&img, size as u32)?;
        let ours_t = Tensor::from_vec(ours.as_raw().clone(), (size, size, 3), &fx.device)?;
        report.exact(&out_name, &ours_t, &expected)?;
        report.record(
            &format!("{out_name} (max abs)"),
            max_abs(&ours_t, &expected)?,
            0.0,
        );
        // Normalised tensor: ours from our uint8 image vs the reference (where the meta names it),
        // and ours vs Normalize(reference uint8) (exact float path).
        let ours_n = normalize(&[&ours], &fx.device)?;
        let ref_n = normalize(&[&rgb_image(&expected)?], &fx.device)?;
        if let Some(given) = normalized_refs.get(&i) {
            let given = if given.rank() == 3 {
                given.unsqueeze(0)?
            } else {
                given.clone()
            };
            report.record(
                &format!("image_normalized_{i} (max abs)"),
                max_abs(&ours_n, &given.to_device(&fx.device)?)?,
                1e-6,
            );
            report.record(
                &format!("Normalize(rgb518_{i}) vs image_normalized_{i} (max abs)"),
                max_abs(&ref_n, &given.to_device(&fx.device)?)?,
                1e-6,
            );
        }
    }
    Ok(report)
}
