//! Background removal for input images without transparency: the `rembg.remove(image,
//! session=new_session("u2net"))` call of TRELLIS' `preprocess_image`, native.
//!
//! The network is U²-Net ([`u2net`], Apache-2.0), the one rembg's `u2net` session runs (rembg ships
//! it as an ONNX export of the same checkpoint). Its weights are the original release `u2net.pth`
//! (SHA-256 [`WEIGHTS_SHA256`], 176,290,937 bytes), read from the Hugging Face repository
//! [`DEFAULT_MODEL`], which mirrors that file byte for byte, through the hub cache like every other
//! checkpoint; `--background-model` takes another hub id or a local folder. The `.pth` is read
//! directly (zip or legacy serialisation, [`crate::runtime::pth`]); a folder may hold a
//! `model.safetensors` instead. The tensor names are the checkpoint's own; `num_batches_tracked`
//! counters (unused in evaluation, and absent from checkpoints saved before PyTorch 0.4.1) are
//! ignored as `load_state_dict` ignores their absence.
//!
//! [`rembg`] holds the pre- and post-processing around the network.

pub mod rembg;
pub mod u2net;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::{GrayImage, RgbImage, RgbaImage};

use crate::hub::remote::{is_repo_id, Fetched, Remote};
use crate::hub::{HubOptions, CACHE_ONLY_HINT};
use crate::runtime::weights;
use u2net::{U2Net, U2NetConfig};

/// The hub repository the U²-Net weights come from by default.
pub const DEFAULT_MODEL: &str = "leonelhs/u2net";
/// The weights file in a hub repository.
pub const WEIGHTS_FILE: &str = "u2net.pth";
/// SHA-256 of the original `u2net.pth` (xuebinqin/U-2-Net release), which [`DEFAULT_MODEL`] holds.
pub const WEIGHTS_SHA256: &str = "10025a17f49cd3208afc342b589890e402ee63123d6f2d289a4a0903695cce58";
/// Weight files a local folder may hold, in order of preference.
pub const LOCAL_WEIGHTS: [&str; 4] = [
    "model.safetensors",
    "u2net.safetensors",
    "u2net.pth",
    "model.pth",
];

/// Where a background model's weights are, and its widths.
#[derive(Debug, Clone)]
pub struct ModelSource {
    pub config: U2NetConfig,
    pub weights: PathBuf,
}

/// `config.json` of a local folder: `{"name": "U2NET", "args": {...widths...}}` (the parity
/// fixture's form), or `{"name": "U2NET"}` / `{"name": "U2NETP"}` for the published widths.
fn read_config(path: &Path) -> Result<U2NetConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: not valid JSON: {e}", path.display()))?;
    let name = v.get("name").and_then(|n| n.as_str()).unwrap_or("U2NET");
    let config = match (name, v.get("args")) {
        (_, Some(args)) if args.get("stage1").is_some() => serde_json::from_value(args.clone())
            .map_err(|e| anyhow!("{}: bad U2NET widths: {e}", path.display()))?,
        ("U2NET", _) => U2NetConfig::u2net(),
        ("U2NETP", _) => U2NetConfig::u2netp(),
        (other, _) => bail!(
            "{}: unknown background network {other:?} (expected U2NET or U2NETP)",
            path.display()
        ),
    };
    config
        .validate()
        .with_context(|| format!("{}", path.display()))?;
    Ok(config)
}

/// Finds the weights: `spec` is a local folder or a hub id (default [`DEFAULT_MODEL`]); a hub file
/// missing from the cache is downloaded unless `opts.offline`.
pub fn resolve(spec: Option<&str>, opts: &HubOptions) -> Result<ModelSource> {
    let spec = spec.unwrap_or(DEFAULT_MODEL);
    let p = Path::new(spec);
    if p.is_dir() {
        let cfg = p.join("config.json");
        let config = if cfg.is_file() {
            read_config(&cfg)?
        } else {
            U2NetConfig::u2net()
        };
        let weights = LOCAL_WEIGHTS
            .iter()
            .map(|f| p.join(f))
            .find(|f| f.is_file())
            .ok_or_else(|| {
                anyhow!(
                    "background model folder {spec} holds no weights (expected one of: {})",
                    LOCAL_WEIGHTS.join(", ")
                )
            })?;
        return Ok(ModelSource { config, weights });
    }
    if p.exists() {
        bail!("--background-model {spec} is a file; expected a folder or a hub id (owner/name)");
    }
    if !is_repo_id(spec) {
        bail!(
            "--background-model {spec}: no such folder, and not a hub repository id (owner/name)"
        );
    }
    let mut remote = Remote::new(opts);
    match remote
        .get(spec, WEIGHTS_FILE)
        .with_context(|| format!("background model {spec}"))?
    {
        Fetched::Present(weights) => {
            if spec == DEFAULT_MODEL {
                check_pinned_blob(&weights)?;
            }
            Ok(ModelSource {
                config: U2NetConfig::u2net(),
                weights,
            })
        }
        Fetched::Absent if opts.offline => bail!(
            "background model {spec}: {spec}/{WEIGHTS_FILE} is not in the hub cache {} and \
             HF_HUB_OFFLINE is set; pass a local copy with `--background-model DIR` (a folder \
             holding u2net.pth), unset HF_HUB_OFFLINE to download it, or give an RGBA image with a \
             transparent background and `--no-background-removal` ({CACHE_ONLY_HINT})",
            opts.cache_dir.display()
        ),
        Fetched::Absent => bail!(
            "background model {spec}: the hub has no file {spec}/{WEIGHTS_FILE} (check the id)"
        ),
    }
}

/// The default repository is a third-party mirror: its file must still be the original release.
/// The cache stores an LFS file under its SHA-256 (`blobs/<sha256>`, linked from the snapshot), so
/// the link target names it without hashing 176 MB.
fn check_pinned_blob(weights: &Path) -> Result<()> {
    let Ok(target) = std::fs::read_link(weights) else {
        return Ok(()); // not a link (a copied cache): nothing cheap to compare
    };
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let looks_like_sha = name.len() == 64 && name.chars().all(|c| c.is_ascii_hexdigit());
    if looks_like_sha && name != WEIGHTS_SHA256 {
        bail!(
            "{DEFAULT_MODEL}/{WEIGHTS_FILE} in the cache ({}) is not the original U²-Net release \
             (SHA-256 {name}, expected {WEIGHTS_SHA256}); pass the original u2net.pth with \
             `--background-model DIR`",
            weights.display()
        );
    }
    Ok(())
}

/// The state dict of a weights file (safetensors or PyTorch `.pth`).
pub fn read_weights(path: &Path) -> Result<HashMap<String, Tensor>> {
    let t = if path.extension().is_some_and(|e| e == "safetensors") {
        candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
            anyhow!(
                "{}: not a readable safetensors file (truncated or corrupt?): {e}",
                path.display()
            )
        })?
    } else {
        crate::runtime::pth::read_state_dict(path)?
    };
    Ok(t)
}

/// Builds the network from a checkpoint's state dict: every name and shape must match the network
/// exactly (all problems reported at once); `num_batches_tracked` counters are ignored.
pub fn network_from_state_dict(
    mut tensors: HashMap<String, Tensor>,
    config: &U2NetConfig,
    origin: &str,
    device: &Device,
) -> Result<U2Net> {
    tensors.retain(|k, _| !k.ends_with(".num_batches_tracked"));
    let (vb, check) = weights::from_tensors(tensors, origin, DType::F32, device);
    let net = U2Net::new(config, vb)?;
    check.finish()?;
    Ok(net)
}

/// A loaded U²-Net and the device it runs on.
pub struct BackgroundModel {
    net: U2Net,
    device: Device,
}

impl BackgroundModel {
    /// Builds the network from its weights; every missing, wrong-shaped or unexpected tensor is
    /// reported at once.
    pub fn load(src: &ModelSource, device: &Device) -> Result<Self> {
        let tensors = read_weights(&src.weights)?;
        let origin = src.weights.display().to_string();
        let net = network_from_state_dict(tensors, &src.config, &origin, device)?;
        Ok(Self {
            net,
            device: device.clone(),
        })
    }

    /// A network already built (tests, benchmarks).
    pub fn from_network(net: U2Net, device: &Device) -> Self {
        Self {
            net,
            device: device.clone(),
        }
    }

    pub fn network(&self) -> &U2Net {
        &self.net
    }

    /// The matte of an RGB image, at the image's size (rembg's `U2netSession.predict`).
    pub fn matte(&self, rgb: &RgbImage) -> Result<GrayImage> {
        let x = rembg::net_input(rgb, &self.device)?;
        let pred = self.net.matte(&x)?;
        rembg::matte_from_prediction(&pred, rgb.width(), rgb.height())
    }

    /// The no-alpha branch of `preprocess_image` up to the crop: RGB, at most 1024 px, matte,
    /// cutout. Returns the cutout (RGBA) and the matte.
    pub fn remove(&self, img: &RgbaImage) -> Result<(RgbaImage, GrayImage)> {
        let rgb = rembg::downscale(&rembg::to_rgb(img))?;
        let matte = self.matte(&rgb)?;
        let cut = rembg::cutout(&rgb, &matte)?;
        Ok((cut, matte))
    }
}

/// Whether `preprocess_image` uses the image's own alpha: some pixel is not fully opaque.
/// (The original tests this on RGBA images only; grey+alpha and palette images with transparency
/// are decoded to RGBA here, so their alpha is used too.)
pub fn has_useful_alpha(img: &RgbaImage) -> bool {
    img.as_raw().chunks_exact(4).any(|p| p[3] != 255)
}

/// Writes a matte as a PNG, atomically.
pub fn write_mask(path: &Path, matte: &GrayImage) -> Result<()> {
    let mut png = Vec::new();
    matte
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .with_context(|| format!("encoding the matte for {}", path.display()))?;
    crate::export::atomic::write_atomic(path, |w| Ok(w.write_all(&png)?))
}

/// The `--save-mask` path of input `i` when `n` images had their background removed: the path
/// itself for one, `<stem>_<i>.<ext>` otherwise.
pub fn mask_path(base: &Path, i: usize, n: usize) -> PathBuf {
    if n <= 1 {
        return base.to_path_buf();
    }
    let stem = base
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let ext = base
        .extension()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "png".into());
    base.with_file_name(format!("{stem}_{i}.{ext}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_paths_get_an_index_only_for_several_images() {
        let b = Path::new("/tmp/m.png");
        assert_eq!(mask_path(b, 3, 1), PathBuf::from("/tmp/m.png"));
        assert_eq!(mask_path(b, 3, 2), PathBuf::from("/tmp/m_3.png"));
    }

    #[cfg(unix)]
    #[test]
    fn the_default_mirror_must_hold_the_original_file() {
        let d = tempfile::tempdir().unwrap();
        let other = "ab".repeat(32);
        for (blob, ok) in [(WEIGHTS_SHA256, true), (other.as_str(), false)] {
            let b = d.path().join(blob);
            std::fs::write(&b, b"x").unwrap();
            let link = d.path().join(format!("link-{ok}"));
            std::os::unix::fs::symlink(&b, &link).unwrap();
            let r = check_pinned_blob(&link);
            assert_eq!(r.is_ok(), ok, "{r:?}");
        }
        // A plain file (no link): nothing to compare cheaply.
        let plain = d.path().join("u2net.pth");
        std::fs::write(&plain, b"x").unwrap();
        assert!(check_pinned_blob(&plain).is_ok());
    }

    #[test]
    fn alpha_is_useful_when_any_pixel_is_not_opaque() {
        let mut img = RgbaImage::from_pixel(3, 2, image::Rgba([1, 2, 3, 255]));
        assert!(!has_useful_alpha(&img));
        img.put_pixel(2, 1, image::Rgba([1, 2, 3, 254]));
        assert!(has_useful_alpha(&img));
    }
}
