//! Image decoding and preprocessing: formats, bit depths and every rejected input.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::{ImageBuffer, ImageFormat, Luma, LumaA, Rgb, Rgba, RgbaImage};
use trellis::models::conditioners::preprocess::{
    decode_image, load_image, preprocess_file, preprocess_rgba, MAX_SIDE,
};

/// An RGBA test picture: a transparent background with an opaque, textured disc.
fn disc(w: u32, h: u32) -> RgbaImage {
    RgbaImage::from_fn(w, h, |x, y| {
        let (dx, dy) = (x as f32 - w as f32 * 0.45, y as f32 - h as f32 * 0.55);
        let r = (dx * dx + dy * dy).sqrt();
        let a = if r < w.min(h) as f32 * 0.3 { 255 } else { 0 };
        Rgba([(x * 7 % 256) as u8, (y * 5 % 256) as u8, 128, a])
    })
}

fn err_of(r: anyhow::Result<impl Sized>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn png_webp_and_16_bit_decode_to_the_same_rgba() {
    let dir = tempfile::tempdir().unwrap();
    let img = disc(40, 30);
    let png = dir.path().join("a.png");
    img.save_with_format(&png, ImageFormat::Png).unwrap();
    assert_eq!(load_image(&png).unwrap(), img);
    let webp = dir.path().join("a.webp");
    img.save_with_format(&webp, ImageFormat::WebP).unwrap();
    assert_eq!(load_image(&webp).unwrap(), img, "lossless WebP");
    // 16-bit: the high byte survives (value v*257 + 3 -> v).
    let img16: ImageBuffer<Rgba<u16>, Vec<u16>> = ImageBuffer::from_fn(40, 30, |x, y| {
        let p = img.get_pixel(x, y).0;
        Rgba(p.map(|v| u16::from(v) * 257 + if v < 255 { 3 } else { 0 }))
    });
    let p16 = dir.path().join("b16.png");
    img16.save(&p16).unwrap();
    assert_eq!(load_image(&p16).unwrap(), img);
}

#[test]
fn grey_alpha_expands_to_rgba_and_preprocesses() {
    let dir = tempfile::tempdir().unwrap();
    let la: ImageBuffer<LumaA<u8>, Vec<u8>> = ImageBuffer::from_fn(50, 50, |x, y| {
        let a = if (10..40).contains(&x) && (15..35).contains(&y) {
            255
        } else {
            0
        };
        LumaA([(x * 5) as u8, a])
    });
    let p = dir.path().join("la.png");
    la.save(&p).unwrap();
    let rgba = load_image(&p).unwrap();
    let px = rgba.get_pixel(20, 20).0;
    assert_eq!(px, [100, 100, 100, 255]);
    let t = preprocess_file(&p, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[1, 3, 518, 518]);
    assert_eq!(t.dtype(), DType::F32);
}

/// A palette PNG with a tRNS chunk, written by hand (the `image` encoder has no indexed mode).
fn palette_png(
    w: u32,
    h: u32,
    index: impl Fn(u32, u32) -> u8,
    plte: &[[u8; 3]],
    trns: &[u8],
) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }
    let mut raw = Vec::new();
    for y in 0..h {
        raw.push(0u8); // filter: none
        for x in 0..w {
            raw.push(index(x, y));
        }
    }
    // zlib stream with one stored (uncompressed) block.
    let mut z = vec![0x78, 0x01, 1];
    z.extend_from_slice(&(raw.len() as u16).to_le_bytes());
    z.extend_from_slice(&(!(raw.len() as u16)).to_le_bytes());
    z.extend_from_slice(&raw);
    let (mut a, mut b) = (1u32, 0u32);
    for &v in &raw {
        a = (a + u32::from(v)) % 65521;
        b = (b + a) % 65521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 3, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"PLTE", &plte.concat());
    chunk(&mut out, b"tRNS", trns);
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}

#[test]
fn palette_with_transparency_decodes() {
    let bytes = palette_png(
        30,
        20,
        |x, y| u8::from((5..25).contains(&x) && (4..16).contains(&y)),
        &[[0, 0, 0], [200, 50, 10]],
        &[0, 255],
    );
    let img = decode_image(&bytes).unwrap();
    assert_eq!(img.dimensions(), (30, 20));
    assert_eq!(img.get_pixel(0, 0).0, [0, 0, 0, 0]);
    assert_eq!(img.get_pixel(10, 10).0, [200, 50, 10, 255]);
    let rgb = preprocess_rgba(&img, 518).unwrap();
    // The object fills the middle of the crop; its centre keeps its colour.
    assert_eq!(rgb.get_pixel(259, 259).0, [200, 50, 10]);
}

#[test]
fn image_without_transparency_asks_for_background_removal() {
    let dir = tempfile::tempdir().unwrap();
    let rgb: ImageBuffer<Rgb<u8>, Vec<u8>> =
        ImageBuffer::from_fn(32, 32, |x, _| Rgb([x as u8, 0, 0]));
    let jpg = dir.path().join("c.jpg");
    rgb.save_with_format(&jpg, ImageFormat::Jpeg).unwrap();
    let e = err_of(preprocess_file(&jpg, &Device::Cpu));
    assert!(e.contains("needs background removal"), "{e}");
    assert!(e.contains("transparent background"), "{e}");
    // An RGBA PNG whose alpha is 255 everywhere is the same case.
    let opaque = RgbaImage::from_pixel(16, 16, Rgba([1, 2, 3, 255]));
    let e = err_of(preprocess_rgba(&opaque, 518));
    assert!(e.contains("needs background removal"), "{e}");
}

#[test]
fn corrupt_empty_and_transparent_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // Truncated PNG.
    let p = dir.path().join("t.png");
    disc(64, 64).save(&p).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = err_of(load_image(&p));
    assert!(e.contains("cannot decode image"), "{e}");
    // Not an image at all.
    let e = err_of(decode_image(b"hello, this is not an image"));
    assert!(e.contains("cannot decode image"), "{e}");
    // Empty file.
    let empty = dir.path().join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    let e = err_of(load_image(&empty));
    assert!(e.contains("empty"), "{e}");
    // Missing file.
    let e = err_of(load_image(Path::new("/nonexistent/x.png")));
    assert!(e.contains("cannot read image"), "{e}");
    // 0 pixels.
    let e = err_of(preprocess_rgba(&RgbaImage::new(0, 0), 518));
    assert!(e.contains("empty"), "{e}");
    // Fully transparent.
    let e = err_of(preprocess_rgba(&RgbaImage::new(20, 20), 518));
    assert!(e.contains("fully transparent"), "{e}");
    // Only faint pixels (alpha <= 0.8*255).
    let faint = RgbaImage::from_pixel(20, 20, Rgba([9, 9, 9, 100]));
    let e = err_of(preprocess_rgba(&faint, 518));
    assert!(e.contains("alpha > 0.8*255"), "{e}");
    // A single opaque pixel: nothing to crop around.
    let mut dot = RgbaImage::new(20, 20);
    dot.put_pixel(5, 5, Rgba([1, 1, 1, 255]));
    let e = err_of(preprocess_rgba(&dot, 518));
    assert!(e.contains("too small"), "{e}");
}

/// Rewrites the IHDR size of a PNG (with a correct CRC) so the header claims `w x h`.
fn with_claimed_size(png: &[u8], w: u32, h: u32) -> Vec<u8> {
    let mut out = png.to_vec();
    out[16..20].copy_from_slice(&w.to_be_bytes());
    out[20..24].copy_from_slice(&h.to_be_bytes());
    let mut c = 0xffff_ffffu32;
    for &b in &out[12..29] {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    out[29..33].copy_from_slice(&(!c).to_be_bytes());
    out
}

#[test]
fn absurdly_large_images_are_refused_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("small.png");
    disc(8, 8).save(&p).unwrap();
    let png = std::fs::read(&p).unwrap();
    // A side over the limit.
    let e = err_of(decode_image(&with_claimed_size(&png, MAX_SIDE + 1, 10)));
    assert!(e.contains("too large"), "{e}");
    // Both sides at the limit: the pixel count check.
    let e = err_of(decode_image(&with_claimed_size(&png, MAX_SIDE, MAX_SIDE)));
    assert!(e.contains("megapixels"), "{e}");
    // A real (cheap) image over the side limit: 16385 x 1.
    let wide = RgbaImage::new(MAX_SIDE + 1, 1);
    let wp = dir.path().join("wide.png");
    wide.save(&wp).unwrap();
    let e = err_of(load_image(&wp));
    assert!(e.contains("too large"), "{e}");
}

#[test]
fn grey_16_bit_keeps_the_high_byte() {
    let dir = tempfile::tempdir().unwrap();
    let g: ImageBuffer<Luma<u16>, Vec<u16>> =
        ImageBuffer::from_fn(4, 4, |x, _| Luma([(x as u16) * 0x1234 + 0x00ff]));
    let p = dir.path().join("g16.png");
    g.save(&p).unwrap();
    let img = load_image(&p).unwrap();
    for x in 0..4u32 {
        let v = ((x as u16 * 0x1234 + 0xff) >> 8) as u8;
        assert_eq!(img.get_pixel(x, 0).0, [v, v, v, 255]);
    }
}

#[test]
fn fixture_image_through_a_png_file_matches_the_reference_tensor() {
    let Some(root) = trellis::reference_dir_or_skip("the recorded preprocess images") else {
        return;
    };
    let pre = root.join("preprocess/io.safetensors");
    let dino = root.join("conditioners/dinov2_reg_tiny/io.safetensors");
    let io = candle_core::safetensors::load(&pre, &Device::Cpu).unwrap();
    let t = &io["rgba_in_0"];
    let (h, w, _) = t.dims3().unwrap();
    let data = t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let img = RgbaImage::from_raw(w as u32, h as u32, data).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("in.png");
    img.save(&p).unwrap();
    let ours = preprocess_file(&p, &Device::Cpu).unwrap();
    let expected: Tensor = candle_core::safetensors::load(&dino, &Device::Cpu).unwrap()
        ["image_normalized_0"]
        .unsqueeze(0)
        .unwrap();
    let diff = (ours - expected)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff <= 1e-6, "max abs {diff}");
}
