//! Background removal with the full-size U²-Net (the `u2net.pth` layout from
//! `tests/reference-u2net/u2net_manifest.json`, random weights), f32: the network alone on the
//! 320x320 input rembg feeds it, and the whole removal of a 1024x768 photo (resize to 320, network,
//! matte back to 1024x768, cutout).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbaImage;

use super::peak_rss_kib;
use crate::models::background::u2net::{U2Net, U2NetConfig};
use crate::models::background::{network_from_state_dict, BackgroundModel};
use crate::runtime::weights::Manifest;

/// The full-size U2NET manifest kept in the repository: beside the sources this binary was built
/// from, else under the current directory (a binary carried to another machine, run from a
/// checkout).
pub fn manifest_file() -> PathBuf {
    let rel = "tests/reference-u2net/u2net_manifest.json";
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(rel);
    if built.is_file() {
        built
    } else {
        PathBuf::from(rel)
    }
}

/// A state dict with every name, shape and dtype of the full-size manifest and seeded random
/// values: conv weights N(0, 1/fan_in), biases N(0, 0.05²), BatchNorm weights 1 + N(0, 0.05²),
/// running variances |N(0, 1)| + 0.5, `num_batches_tracked` zero.
pub fn manifest_state_dict(seed: u64, dev: &Device) -> Result<HashMap<String, Tensor>> {
    let p = manifest_file();
    if !p.is_file() {
        bail!("{} not found (run from a checkout)", p.display());
    }
    let m = Manifest::load(&p)?;
    let mut names: Vec<&String> = m.entries.keys().collect();
    names.sort();
    let mut out = HashMap::new();
    for (i, name) in names.into_iter().enumerate() {
        let spec = &m.entries[name];
        let shape = spec.shape.as_slice();
        let r = || super::randn(shape, seed * 10_000 + i as u64, dev);
        let t = if spec.dtype != DType::F32 {
            Tensor::zeros(shape, spec.dtype, dev)?
        } else if name.ends_with("running_var") {
            (r()?.abs()? + 0.5)?
        } else if name.ends_with("bn_s1.weight") {
            ((r()? * 0.05)? + 1.0)?
        } else if shape.len() >= 2 {
            let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
            (r()? * (1.0 / fan_in as f64).sqrt())?
        } else {
            (r()? * 0.05)?
        };
        out.insert(name.clone(), t);
    }
    Ok(out)
}

/// The full-size network built through the loader from [`manifest_state_dict`].
pub fn random_full_size(seed: u64, dev: &Device) -> Result<U2Net> {
    let sd = manifest_state_dict(seed, dev)?;
    network_from_state_dict(sd, &U2NetConfig::u2net(), "u2net manifest", dev)
}

pub fn run(dev: &Device, out: &mut dyn Write) -> Result<()> {
    let dev = dev.clone();
    let t = Instant::now();
    let net = random_full_size(7, &dev)?;
    writeln!(out, "u2net: build {:.2}s", t.elapsed().as_secs_f64())?;
    let x = super::randn(&[1, 3, 320, 320], 1, &dev)?;
    let mut runs = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let m = net.matte(&x)?;
        runs.push(t.elapsed().as_secs_f64());
        if m.dims() != [1, 1, 320, 320] {
            bail!("u2net: unexpected matte shape {:?}", m.dims());
        }
    }
    writeln!(
        out,
        "u2net forward 1x3x320x320: {} (best {:.2}s), peak RSS {} MiB",
        runs.iter()
            .map(|r| format!("{r:.2}s"))
            .collect::<Vec<_>>()
            .join(" "),
        runs.iter().cloned().fold(f64::INFINITY, f64::min),
        peak_rss_kib().map_or("?".into(), |k| (k / 1024).to_string())
    )?;
    let model = BackgroundModel::from_network(net, &dev);
    let img = RgbaImage::from_fn(1024, 768, |x, y| {
        let inside = (x as i64 - 512).pow(2) + (y as i64 - 384).pow(2) < 250 * 250;
        if inside {
            image::Rgba([220, (x % 200) as u8, 40, 255])
        } else {
            image::Rgba([30, 60, (y % 100) as u8 + 100, 255])
        }
    });
    let t = Instant::now();
    let (cut, matte) = model.remove(&img)?;
    writeln!(
        out,
        "background removal of a 1024x768 image (resize, network, matte, cutout): {:.2}s -> {}x{} cutout, peak RSS {} MiB",
        t.elapsed().as_secs_f64(),
        cut.width(),
        matte.height(),
        peak_rss_kib().map_or("?".into(), |k| (k / 1024).to_string())
    )?;
    Ok(())
}
