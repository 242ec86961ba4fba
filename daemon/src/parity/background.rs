//! Parity of background removal (fixtures of `tools/reference/gen_u2net.py`, in `tests/reference-u2net`).
//!
//! * `model:U2NET`: the network of `config.json` (`args`: stage widths) from `model.safetensors` on
//!   `x`; compares `d0..d6` and every recorded stage output (`hx1`..`hx6`, `hx5d`..`hx1d`). Where the
//!   fixture also holds the same weights as PyTorch checkpoints (`model_zip.pth`,
//!   `model_legacy.pth`), the network is built from each of them too and `d0` compared again.
//! * `preprocess:rembg`: every `rgb_in_<i>` through [`BackgroundModel::remove`] (downscale, 320²
//!   network input, matte, cutout) and the alpha path of `preprocess_image`; compares the uint8
//!   `mask320_<i>`, `mask_<i>`, `cutout_<i>` and, where recorded, `rgb518_<i>` by their largest
//!   absolute difference (tolerance: one level, as meta.json states).

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Tensor};
use image::{RgbImage, RgbaImage};

use super::fixture::tol;
use super::{Fixture, Outcome, Report};
use crate::models::background::u2net::{U2Net, U2NetConfig};
use crate::models::background::{network_from_state_dict, rembg, BackgroundModel};
use crate::models::conditioners::preprocess::preprocess_rgba;
use crate::runtime::pth;

pub const KINDS: &[&str] = &["model:U2NET", "preprocess:rembg"];

/// Largest absolute difference accepted on uint8 images computed through float networks.
const U8_LEVELS: f64 = 1.0;

pub fn check(fx: &mut Fixture) -> Result<Outcome> {
    fx.load_io()?;
    let report = match fx.kind.as_str() {
        "model:U2NET" => network(fx)?,
        "preprocess:rembg" => removal(fx)?,
        other => bail!("background: unexpected kind {other}"),
    };
    Ok(Outcome::Checked(report))
}

fn config(fx: &Fixture) -> Result<U2NetConfig> {
    let args = fx.config_args()?.clone();
    serde_json::from_value(args).map_err(|e| anyhow!("{}: config.json args: {e}", fx.dir.display()))
}

fn build(fx: &Fixture) -> Result<U2Net> {
    let (vb, check) = fx.weights(DType::F32)?;
    let net = U2Net::new(&config(fx)?, vb)?;
    check.finish()?;
    Ok(net)
}

fn network(fx: &Fixture) -> Result<Report> {
    let tolerance = fx
        .meta_str("tolerance")
        .and_then(|t| t.split_whitespace().find_map(|w| w.parse::<f64>().ok()))
        .unwrap_or(tol::FORWARD);
    let net = build(fx)?;
    let x = fx.io("x")?;
    let out = net.forward(&x)?;
    let mut r = Report::default();
    for (i, d) in out.d.iter().enumerate() {
        let name = format!("d{i}");
        if fx.has_io(&name) {
            r.close(&name, d, &fx.io(&name)?, tolerance)?;
        }
    }
    for (name, t) in &out.stages {
        if fx.has_io(name) {
            r.close(name, t, &fx.io(name)?, tolerance)?;
        }
    }
    for file in ["model_zip.pth", "model_legacy.pth"] {
        let p = fx.dir.join(file);
        if !p.is_file() {
            continue;
        }
        let sd = pth::read_state_dict(&p)?;
        let net = network_from_state_dict(sd, &config(fx)?, file, &fx.device)?;
        let d0 = net.matte(&x)?;
        r.close(&format!("d0 ({file})"), &d0, &fx.io("d0")?, tolerance)?;
    }
    Ok(r)
}

/// Largest absolute difference between two uint8 tensors (infinite on a shape mismatch).
fn max_abs_u8(name: &str, ours: &[u8], ours_shape: &[usize], expected: &Tensor) -> Result<f64> {
    if ours_shape != expected.dims() {
        eprintln!(
            "  {name}: shape mismatch: got {ours_shape:?}, expected {:?}",
            expected.dims()
        );
        return Ok(f64::INFINITY);
    }
    let e = expected
        .flatten_all()?
        .to_dtype(DType::U8)?
        .to_vec1::<u8>()?;
    Ok(ours
        .iter()
        .zip(&e)
        .map(|(a, b)| (i16::from(*a) - i16::from(*b)).unsigned_abs())
        .max()
        .map(f64::from)
        .unwrap_or(0.0))
}

fn removal(fx: &Fixture) -> Result<Report> {
    let net = build(fx)?;
    let model = BackgroundModel::from_network(net, &fx.device);
    let mut r = Report::default();
    let mut indices: Vec<usize> = fx
        .io_names()
        .iter()
        .filter_map(|n| n.strip_prefix("rgb_in_")?.parse().ok())
        .collect();
    indices.sort_unstable();
    if indices.is_empty() {
        bail!("{}: no rgb_in_<i> tensor", fx.dir.display());
    }
    for i in indices {
        let t = fx.io(&format!("rgb_in_{i}"))?;
        let (h, w, c) = t.dims3()?;
        if c != 3 {
            bail!("rgb_in_{i}: expected [H, W, 3], got {:?}", t.dims());
        }
        let raw = t.flatten_all()?.to_dtype(DType::U8)?.to_vec1::<u8>()?;
        let rgb = RgbImage::from_raw(w as u32, h as u32, raw)
            .ok_or_else(|| anyhow!("rgb_in_{i}: bad size"))?;
        let rgba = RgbaImage::from_fn(rgb.width(), rgb.height(), |x, y| {
            let p = rgb.get_pixel(x, y).0;
            image::Rgba([p[0], p[1], p[2], 255])
        });
        let name = format!("mask320_{i}");
        if fx.has_io(&name) {
            let small = rembg::downscale(&rgb)?;
            let pred = model
                .network()
                .matte(&rembg::net_input(&small, &fx.device)?)?;
            let n = rembg::NET_SIZE;
            let m = rembg::matte_from_prediction(&pred, n, n)?;
            let e = max_abs_u8(&name, m.as_raw(), &[n as usize, n as usize], &fx.io(&name)?)?;
            r.record(&name, e, U8_LEVELS);
        }
        let (cut, matte) = model.remove(&rgba)?;
        let (cw, ch) = (cut.width() as usize, cut.height() as usize);
        let name = format!("mask_{i}");
        let e = max_abs_u8(&name, matte.as_raw(), &[ch, cw], &fx.io(&name)?)?;
        r.record(&name, e, U8_LEVELS);
        let name = format!("cutout_{i}");
        let e = max_abs_u8(&name, cut.as_raw(), &[ch, cw, 4], &fx.io(&name)?)?;
        r.record(&name, e, U8_LEVELS);
        let name = format!("rgb518_{i}");
        if fx.has_io(&name) {
            let out = preprocess_rgba(&cut, 518)?;
            let e = max_abs_u8(&name, out.as_raw(), &[518, 518, 3], &fx.io(&name)?)?;
            r.record(&name, e, U8_LEVELS);
        }
    }
    Ok(r)
}
