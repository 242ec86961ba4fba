//! What surrounds the network when TRELLIS removes a background: the no-alpha branch of
//! `TrellisImageTo3DPipeline.preprocess_image` and the parts of rembg it calls
//! (`rembg.remove(image, session=new_session("u2net"))`: `BaseSession.normalize`,
//! `U2netSession.predict`, `naive_cutout`), computed the way numpy and Pillow compute them.
//!
//! 1. `convert("RGB")`, then, when the longer side exceeds 1024 px, Pillow `resize(LANCZOS)` to
//!    `(int(w * s), int(h * s))` with `s = 1024 / max(w, h)` ([`downscale`]).
//! 2. Network input ([`net_input`]): Pillow `resize((320, 320), LANCZOS)` of the RGB image, divided
//!    by its largest sample, ImageNet mean/std per channel, `[1, 3, 320, 320]` float32.
//! 3. Matte ([`matte_from_prediction`]): `d0[0, 0]` min-max normalised, clipped to [0, 1],
//!    `uint8(x * 255)` (truncation), then Pillow `resize(image size, LANCZOS)` of that 8-bit image.
//! 4. Cutout ([`cutout`]): `Image.composite(rgb, transparent, matte)`: every channel, alpha
//!    included, is blended with transparent black by the matte in Pillow's rounded fixed point, so
//!    RGB comes out multiplied by the matte and alpha equals it.
//!
//! Not reproduced: rembg's `exif_transpose` (the decoder here ignores EXIF orientation for every
//! image, with or without alpha).

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor};
use image::{GrayImage, RgbImage, RgbaImage};

use crate::models::conditioners::resample::{resample_rgba8, Filter};

/// The longest side an image keeps before background removal.
pub const MAX_SIDE: u32 = 1024;
/// The square side rembg's `u2net` session feeds the network.
pub const NET_SIZE: u32 = 320;

/// Pillow's `resize(LANCZOS)` of a 3-channel 8-bit image (the bands are resampled independently;
/// an RGB image is stored with a fourth padding band, which changes nothing).
pub fn resize_rgb(img: &RgbImage, w: u32, h: u32) -> RgbImage {
    if img.dimensions() == (w, h) {
        return img.clone();
    }
    let (iw, ih) = img.dimensions();
    let raw = img.as_raw();
    let row_len = iw as usize * 3;
    let out = resample_rgba8(
        iw as usize,
        ih as usize,
        w as usize,
        h as usize,
        Filter::Lanczos,
        |y, buf| {
            let src = &raw[y * row_len..(y + 1) * row_len];
            for (d, s) in buf.chunks_exact_mut(4).zip(src.chunks_exact(3)) {
                d[..3].copy_from_slice(s);
                d[3] = 255;
            }
        },
    );
    let rgb: Vec<u8> = out
        .chunks_exact(4)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect();
    RgbImage::from_raw(w, h, rgb).unwrap_or_else(|| RgbImage::new(w, h))
}

/// Pillow's `resize(LANCZOS)` of an 8-bit grey image.
pub fn resize_gray(img: &GrayImage, w: u32, h: u32) -> GrayImage {
    if img.dimensions() == (w, h) {
        return img.clone();
    }
    let (iw, ih) = img.dimensions();
    let raw = img.as_raw();
    let out = resample_rgba8(
        iw as usize,
        ih as usize,
        w as usize,
        h as usize,
        Filter::Lanczos,
        |y, buf| {
            let src = &raw[y * iw as usize..(y + 1) * iw as usize];
            for (d, &s) in buf.chunks_exact_mut(4).zip(src) {
                d[0] = s;
            }
        },
    );
    let g: Vec<u8> = out.chunks_exact(4).map(|p| p[0]).collect();
    GrayImage::from_raw(w, h, g).unwrap_or_else(|| GrayImage::new(w, h))
}

/// The image's RGB bands (`convert("RGB")` of an opaque RGBA image).
pub fn to_rgb(img: &RgbaImage) -> RgbImage {
    let rgb: Vec<u8> = img
        .as_raw()
        .chunks_exact(4)
        .flat_map(|p| [p[0], p[1], p[2]])
        .collect();
    RgbImage::from_raw(img.width(), img.height(), rgb)
        .unwrap_or_else(|| RgbImage::new(img.width(), img.height()))
}

/// The size `preprocess_image` gives an image before background removal.
pub fn downscaled_size(w: u32, h: u32) -> (u32, u32) {
    let max = w.max(h);
    let scale = (f64::from(MAX_SIDE) / f64::from(max)).min(1.0);
    if scale < 1.0 {
        ((f64::from(w) * scale) as u32, (f64::from(h) * scale) as u32)
    } else {
        (w, h)
    }
}

/// Step 1: the image at most 1024 px a side.
pub fn downscale(img: &RgbImage) -> Result<RgbImage> {
    let (w, h) = downscaled_size(img.width(), img.height());
    ensure!(
        w > 0 && h > 0,
        "the image ({}x{}) is too thin to remove its background",
        img.width(),
        img.height()
    );
    Ok(resize_rgb(img, w, h))
}

/// rembg's mean and std, as Python floats (float64).
const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const STD: [f64; 3] = [0.229, 0.224, 0.225];

/// Step 2: `BaseSession.normalize(img, mean, std, (320, 320))` → `[1, 3, 320, 320]` float32.
pub fn net_input(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let small = resize_rgb(img, NET_SIZE, NET_SIZE);
    let n = (NET_SIZE * NET_SIZE) as usize;
    let max = f64::from(small.as_raw().iter().copied().max().unwrap_or(0)).max(1e-6);
    let mut data = vec![0f32; 3 * n];
    for (i, p) in small.pixels().enumerate() {
        for c in 0..3 {
            let x = f64::from(p.0[c]) / max;
            data[c * n + i] = ((x - MEAN[c]) / STD[c]) as f32;
        }
    }
    Ok(Tensor::from_vec(
        data,
        (1, 3, NET_SIZE as usize, NET_SIZE as usize),
        device,
    )?)
}

/// Step 3: the matte at `(w, h)` from the network's `sigmoid(d0)` of shape `[1, 1, H, W]`.
pub fn matte_from_prediction(pred: &Tensor, w: u32, h: u32) -> Result<GrayImage> {
    let (b, c, ph, pw) = pred.dims4()?;
    ensure!(
        b == 1 && c >= 1,
        "matte: unexpected prediction shape {:?}",
        pred.dims()
    );
    let p = pred
        .narrow(1, 0, 1)?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?;
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in &p {
        if !v.is_finite() {
            bail!("background removal: the network produced a non-finite value");
        }
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if hi <= lo {
        bail!(
            "background removal found no object (the matte is constant); give an RGBA image with \
             a transparent background instead"
        );
    }
    let span = hi - lo;
    let m: Vec<u8> = p
        .iter()
        .map(|&v| (((v - lo) / span).clamp(0.0, 1.0) * 255.0) as u8)
        .collect();
    let small = GrayImage::from_raw(pw as u32, ph as u32, m)
        .ok_or_else(|| anyhow::anyhow!("matte: internal size mismatch"))?;
    Ok(resize_gray(&small, w, h))
}

/// Pillow's `DIV255(v + 128)` rounding of `c * m / 255`.
#[inline]
fn blend(c: u8, m: u8) -> u8 {
    let t = u32::from(c) * u32::from(m) + 128;
    (((t >> 8) + t) >> 8) as u8
}

/// Step 4: `naive_cutout(rgb, matte)`.
pub fn cutout(img: &RgbImage, matte: &GrayImage) -> Result<RgbaImage> {
    ensure!(
        img.dimensions() == matte.dimensions(),
        "cutout: image {:?} and matte {:?} differ in size",
        img.dimensions(),
        matte.dimensions()
    );
    let mut out = Vec::with_capacity(img.as_raw().len() / 3 * 4);
    for (p, m) in img.pixels().zip(matte.pixels()) {
        let m = m.0[0];
        out.extend_from_slice(&[blend(p.0[0], m), blend(p.0[1], m), blend(p.0[2], m), m]);
    }
    RgbaImage::from_raw(img.width(), img.height(), out)
        .ok_or_else(|| anyhow::anyhow!("cutout: internal size mismatch"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downscale_keeps_small_images_and_truncates_like_python() {
        assert_eq!(downscaled_size(800, 600), (800, 600));
        assert_eq!(downscaled_size(1024, 10), (1024, 10));
        // int(w * (1024 / max)) in float64, as Python computes it.
        let (w, h) = downscaled_size(3000, 2001);
        assert_eq!(h, (2001.0 * (1024.0 / 3000.0)) as u32);
        assert_eq!(w, (3000.0 * (1024.0 / 3000.0)) as u32);
        assert!((1023..=1024).contains(&w));
        assert_eq!(downscaled_size(1100, 700), (1024, 651));
    }

    #[test]
    fn cutout_blends_every_band_with_transparent_black() {
        let img = RgbImage::from_raw(2, 1, vec![200, 100, 0, 255, 255, 255]).unwrap();
        let m = GrayImage::from_raw(2, 1, vec![128, 255]).unwrap();
        let c = cutout(&img, &m).unwrap();
        assert_eq!(c.get_pixel(0, 0).0, [100, 50, 0, 128]);
        assert_eq!(c.get_pixel(1, 0).0, [255, 255, 255, 255]);
        let zero = GrayImage::new(2, 1);
        assert_eq!(cutout(&img, &zero).unwrap().get_pixel(0, 0).0, [0, 0, 0, 0]);
    }

    #[test]
    fn matte_is_min_max_normalised_and_truncated() {
        let p = Tensor::from_vec(vec![0.2f32, 0.4, 0.6, 0.3], (1, 1, 2, 2), &Device::Cpu).unwrap();
        let m = matte_from_prediction(&p, 2, 2).unwrap();
        // (x - 0.2) / 0.4 * 255: 0, 127.5 -> 127, 255, 63.75 -> 63 (float32 rounding allowed).
        let v = m.as_raw();
        assert_eq!(v[0], 0);
        assert_eq!(v[2], 255);
        assert!((126..=127).contains(&v[1]), "{v:?}");
        assert!((63..=64).contains(&v[3]), "{v:?}");
        let flat = Tensor::ones((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(matte_from_prediction(&flat, 2, 2).is_err());
    }

    #[test]
    fn net_input_is_divided_by_the_largest_sample() {
        let img = RgbImage::from_pixel(5, 3, image::Rgb([100, 50, 0]));
        let x = net_input(&img, &Device::Cpu).unwrap();
        assert_eq!(x.dims(), &[1, 3, 320, 320]);
        let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let n = 320 * 320;
        assert!((v[0] - (1.0 - 0.485) / 0.229).abs() < 1e-5);
        assert!((v[n] - (0.5 - 0.456) / 0.224).abs() < 1e-5);
        assert!((v[2 * n] - (0.0 - 0.406) / 0.225).abs() < 1e-5);
    }
}
