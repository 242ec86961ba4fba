//! Image input of the image-to-3D pipeline: decoding, then the alpha path of
//! `TrellisImageTo3DPipeline.preprocess_image` and the tensor preparation of `encode_image`
//! (`trellis/pipelines/trellis_image_to_3d.py`).
//!
//! Alpha path, as the original computes it with numpy and Pillow:
//! 1. bbox of the pixels with `alpha > 0.8 * 255`; centre `((xmin+xmax)/2, (ymin+ymax)/2)`;
//!    side `int(max(xmax-xmin, ymax-ymin) * 1.2)`; crop box `centre ± side // 2`, each coordinate
//!    rounded half to even (Python `round`), pixels outside the image are transparent black;
//! 2. Pillow `resize((518, 518), LANCZOS)` of the RGBA crop: premultiply (`RGBA -> RGBa`,
//!    `(c*a + 128) / 255` in Pillow's shift form), the fixed-point resampler ([`super::resample`]),
//!    un-premultiply (`255*c / a`, truncated); no resize at all when the crop is already 518²;
//! 3. `uint8(float32(rgb)/255 * float32(a)/255 * 255)` (truncation), i.e. premultiplied RGB;
//! 4. `encode_image`: `/255` then ImageNet `Normalize` in float32 -> `[1, 3, 518, 518]`.
//!
//! Images without transparency go through background removal first (`models::background`, the
//! original's rembg branch), which hands this path an RGBA cutout; given here directly, they are
//! rejected with a clear error.

use std::io::Cursor;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageReader, RgbImage, RgbaImage};

use super::resample::{resample_rgba8, Filter};

/// The side of the square image the DINOv2 conditioner sees in TRELLIS.
pub const TRELLIS_IMAGE_SIZE: u32 = 518;
/// Largest accepted side of an input image, in pixels.
pub const MAX_SIDE: u32 = 16384;
/// Largest accepted input image, in pixels.
pub const MAX_PIXELS: u64 = 256_000_000;
/// Largest accepted image file.
pub const MAX_FILE_BYTES: u64 = 1 << 30;

/// ImageNet statistics of the torchvision `Normalize` in `_init_image_cond_model`.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Reads and decodes an image file (PNG, JPEG, WebP) to 8-bit RGBA.
pub fn load_image(path: &Path) -> Result<RgbaImage> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot read image {}", path.display()))?
        .len();
    if len > MAX_FILE_BYTES {
        bail!(
            "image {}: file of {len} bytes is too large (limit {MAX_FILE_BYTES})",
            path.display()
        );
    }
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
    decode_image(&bytes).with_context(|| format!("image {}", path.display()))
}

fn check_dimensions(w: u64, h: u64) -> Result<()> {
    if w == 0 || h == 0 {
        bail!("the image is empty ({w}x{h} pixels)");
    }
    if w > u64::from(MAX_SIDE) || h > u64::from(MAX_SIDE) {
        bail!("the image is too large ({w}x{h}; at most {MAX_SIDE} pixels a side)");
    }
    if w * h > MAX_PIXELS {
        bail!(
            "the image is too large ({w}x{h} = {} megapixels; at most {} megapixels)",
            w * h / 1_000_000,
            MAX_PIXELS / 1_000_000
        );
    }
    Ok(())
}

/// Decodes an encoded image (PNG, JPEG or WebP; grey, grey+alpha, palette, RGB, RGBA; 8 or 16 bit)
/// to 8-bit RGBA. 16-bit samples keep their high byte, as Pillow does when it opens 16-bit PNGs.
pub fn decode_image(bytes: &[u8]) -> Result<RgbaImage> {
    if bytes.is_empty() {
        bail!("cannot decode image: the file is empty");
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .context("cannot decode image")?;
    if reader.format().is_none() {
        bail!("cannot decode image: unknown format (expected PNG, JPEG or WebP)");
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| anyhow::anyhow!("cannot decode image (corrupt or unsupported file): {e}"))?;
    check_dimensions(u64::from(w), u64::from(h))?;
    let mut reader = ImageReader::new(Cursor::new(bytes)).with_guessed_format()?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    // 16-bit RGBA at the pixel limit, plus decoder scratch.
    limits.max_alloc = Some(MAX_PIXELS * 8 + (64 << 20));
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| anyhow::anyhow!("cannot decode image (corrupt or unsupported file): {e}"))?;
    Ok(to_rgba8(img))
}

fn to_rgba8(img: DynamicImage) -> RgbaImage {
    let hi = |v: u16| (v >> 8) as u8;
    match img {
        DynamicImage::ImageLuma16(b) => RgbaImage::from_fn(b.width(), b.height(), |x, y| {
            let g = hi(b.get_pixel(x, y).0[0]);
            image::Rgba([g, g, g, 255])
        }),
        DynamicImage::ImageLumaA16(b) => RgbaImage::from_fn(b.width(), b.height(), |x, y| {
            let [g, a] = b.get_pixel(x, y).0;
            image::Rgba([hi(g), hi(g), hi(g), hi(a)])
        }),
        DynamicImage::ImageRgb16(b) => RgbaImage::from_fn(b.width(), b.height(), |x, y| {
            let [r, g, bl] = b.get_pixel(x, y).0;
            image::Rgba([hi(r), hi(g), hi(bl), 255])
        }),
        DynamicImage::ImageRgba16(b) => RgbaImage::from_fn(b.width(), b.height(), |x, y| {
            let [r, g, bl, a] = b.get_pixel(x, y).0;
            image::Rgba([hi(r), hi(g), hi(bl), hi(a)])
        }),
        other => other.to_rgba8(),
    }
}

/// Python's `round` (half to even) of a crop coordinate, as Pillow's `Image.crop` applies it.
fn round_half_even(v: f64) -> i64 {
    v.round_ties_even() as i64
}

/// The crop box `(x0, y0, x1, y1)` of the alpha path, in integer pixels (may leave the image).
pub fn alpha_crop_box(img: &RgbaImage) -> Result<(i64, i64, i64, i64)> {
    let (w, h) = img.dimensions();
    check_dimensions(u64::from(w), u64::from(h))?;
    let mut any_transparent = false;
    let mut any_visible = false;
    let (mut xmin, mut ymin, mut xmax, mut ymax) = (u32::MAX, u32::MAX, 0u32, 0u32);
    for (x, y, p) in img.enumerate_pixels() {
        let a = p.0[3];
        any_transparent |= a != 255;
        any_visible |= a != 0;
        // numpy: alpha > 0.8 * 255 = 204.0
        if f64::from(a) > 0.8 * 255.0 {
            xmin = xmin.min(x);
            xmax = xmax.max(x);
            ymin = ymin.min(y);
            ymax = ymax.max(y);
        }
    }
    if !any_transparent {
        bail!(
            "the image has no transparency: it needs background removal first; give an RGBA image \
             with a transparent background"
        );
    }
    if !any_visible {
        bail!("the image is fully transparent: nothing to reconstruct");
    }
    if xmin == u32::MAX {
        bail!(
            "the image has no opaque object: no pixel has alpha > 0.8*255 (the object's pixels \
             must be mostly opaque)"
        );
    }
    let cx = (f64::from(xmin) + f64::from(xmax)) / 2.0;
    let cy = (f64::from(ymin) + f64::from(ymax)) / 2.0;
    let extent = (xmax - xmin).max(ymax - ymin);
    let side = (f64::from(extent) * 1.2) as i64;
    let half = (side / 2) as f64;
    let b = (
        round_half_even(cx - half),
        round_half_even(cy - half),
        round_half_even(cx + half),
        round_half_even(cy + half),
    );
    if b.2 <= b.0 || b.3 <= b.1 {
        bail!(
            "the opaque object is too small ({}x{} pixels) to crop around",
            xmax - xmin + 1,
            ymax - ymin + 1
        );
    }
    Ok(b)
}

/// Pillow's `RGBA -> RGBa` (premultiply) of one channel value.
#[inline]
fn muldiv255(c: u8, a: u8) -> u8 {
    let t = u32::from(c) * u32::from(a) + 128;
    (((t >> 8) + t) >> 8) as u8
}

/// Pillow's `RGBa -> RGBA` of one pixel.
#[inline]
fn unpremultiply(p: &mut [u8]) {
    let a = u32::from(p[3]);
    if a != 0 && a != 255 {
        for c in &mut p[..3] {
            *c = ((255 * u32::from(*c)) / a).min(255) as u8;
        }
    }
}

/// The alpha path of `preprocess_image` on an RGBA image: the premultiplied RGB `size x size`
/// image (the original's uint8 output).
pub fn preprocess_rgba(img: &RgbaImage, size: u32) -> Result<RgbImage> {
    if size == 0 {
        bail!("preprocess: output size must be positive");
    }
    let (x0, y0, x1, y1) = alpha_crop_box(img)?;
    let (cw, ch) = ((x1 - x0) as usize, (y1 - y0) as usize);
    let (w, h) = (img.width() as i64, img.height() as i64);
    let raw = img.as_raw();
    // One crop row (zero outside the image), optionally premultiplied.
    let crop_row = |y: usize, buf: &mut [u8], premultiply: bool| {
        buf.fill(0);
        let sy = y0 + y as i64;
        if sy < 0 || sy >= h {
            return;
        }
        let sx_from = x0.max(0);
        let sx_to = x1.min(w);
        for sx in sx_from..sx_to {
            let s = ((sy * w + sx) * 4) as usize;
            let d = ((sx - x0) * 4) as usize;
            let p = &raw[s..s + 4];
            if premultiply {
                let a = p[3];
                buf[d..d + 4].copy_from_slice(&[
                    muldiv255(p[0], a),
                    muldiv255(p[1], a),
                    muldiv255(p[2], a),
                    a,
                ]);
            } else {
                buf[d..d + 4].copy_from_slice(p);
            }
        }
    };
    let n = size as usize;
    let rgba: Vec<u8> = if cw == n && ch == n {
        // Pillow returns a plain copy when the size already matches.
        let mut v = vec![0u8; n * n * 4];
        for (y, row) in v.chunks_mut(n * 4).enumerate() {
            crop_row(y, row, false);
        }
        v
    } else {
        let mut v = resample_rgba8(cw, ch, n, n, Filter::Lanczos, |y, buf| {
            crop_row(y, buf, true)
        });
        for p in v.chunks_mut(4) {
            unpremultiply(p);
        }
        v
    };
    let mut out = Vec::with_capacity(n * n * 3);
    for p in rgba.chunks(4) {
        let a = f32::from(p[3]) / 255.0;
        for &c in &p[..3] {
            out.push(((f32::from(c) / 255.0) * a * 255.0) as u8);
        }
    }
    RgbImage::from_raw(size, size, out)
        .ok_or_else(|| anyhow::anyhow!("preprocess: internal buffer size mismatch"))
}

/// `encode_image`'s tensor preparation of a batch of preprocessed RGB images:
/// `[B, 3, H, W]` float32, `(u8/255 - mean) / std` per channel.
pub fn normalize(images: &[&RgbImage], device: &Device) -> Result<Tensor> {
    let Some(first) = images.first() else {
        bail!("normalize: no image given");
    };
    let (w, h) = first.dimensions();
    let plane = (w * h) as usize;
    let mut data = vec![0f32; images.len() * 3 * plane];
    for (b, img) in images.iter().enumerate() {
        if img.dimensions() != (w, h) {
            bail!(
                "normalize: images of different sizes in one batch ({w}x{h} and {}x{})",
                img.width(),
                img.height()
            );
        }
        for (i, p) in img.pixels().enumerate() {
            for c in 0..3 {
                let x = f32::from(p.0[c]) / 255.0;
                data[(b * 3 + c) * plane + i] = (x - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            }
        }
    }
    Ok(Tensor::from_vec(
        data,
        (images.len(), 3, h as usize, w as usize),
        device,
    )?)
}

/// File -> the normalised `[1, 3, 518, 518]` tensor the image conditioner takes.
pub fn preprocess_file(path: &Path, device: &Device) -> Result<Tensor> {
    let rgba = load_image(path)?;
    preprocess_decoded(&rgba, device).with_context(|| format!("image {}", path.display()))
}

/// A decoded RGBA image (with transparency, e.g. after background removal) -> the normalised
/// `[1, 3, 518, 518]` tensor the image conditioner takes.
pub fn preprocess_decoded(rgba: &RgbaImage, device: &Device) -> Result<Tensor> {
    let rgb = preprocess_rgba(rgba, TRELLIS_IMAGE_SIZE)?;
    normalize(&[&rgb], device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn premultiply_matches_the_exact_rounded_division() {
        for c in 0..=255u32 {
            for a in 0..=255u32 {
                let exact = (c * a + 127) / 255;
                assert_eq!(u32::from(muldiv255(c as u8, a as u8)), exact, "{c} {a}");
            }
        }
    }

    #[test]
    fn crop_box_rounds_half_to_even_and_may_leave_the_image() {
        // Opaque block x 3..=8, y 2..=4 in a 12x10 image: extent 5 -> side int(6.0) = 6, half 3,
        // centre (5.5, 3.0) -> x 2.5 -> 2, 8.5 -> 8; y 0, 6.
        let mut img = RgbaImage::new(12, 10);
        for y in 2..=4 {
            for x in 3..=8 {
                img.put_pixel(x, y, image::Rgba([9, 9, 9, 255]));
            }
        }
        assert_eq!(alpha_crop_box(&img).unwrap(), (2, 0, 8, 6));
        // An object in the corner: the box extends past the border.
        // Extent 10 -> side 12, half 6, centre 5 -> box (-1, -1, 11, 11).
        let mut img = RgbaImage::new(20, 20);
        for y in 0..=10 {
            for x in 0..=10 {
                img.put_pixel(x, y, image::Rgba([1, 2, 3, 210]));
            }
        }
        assert_eq!(alpha_crop_box(&img).unwrap(), (-1, -1, 11, 11));
    }

    #[test]
    fn alpha_just_above_threshold_counts_and_at_threshold_does_not() {
        let mut img = RgbaImage::new(8, 8);
        img.put_pixel(1, 1, image::Rgba([0, 0, 0, 204]));
        assert!(alpha_crop_box(&img).is_err());
        for x in 2..7 {
            img.put_pixel(x, 3, image::Rgba([0, 0, 0, 205]));
        }
        let b = alpha_crop_box(&img).unwrap();
        assert_eq!(b.2 - b.0, 4);
    }
}
