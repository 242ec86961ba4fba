//! `assets/example.png`, the image of the README's first command: an RGBA picture whose
//! background is transparent and whose object is opaque (what TRELLIS' preprocessing expects:
//! it crops to the alpha bounding box).

#[test]
fn example_image_is_rgba_with_a_transparent_background() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/example.png");
    let img = image::open(&path).unwrap();
    assert!(img.color().has_alpha(), "{:?}", img.color());
    let rgba = img.to_rgba8();
    let (w, h) = rgba.dimensions();
    assert_eq!((w, h), (256, 256));
    for (x, y) in [(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1)] {
        assert_eq!(rgba.get_pixel(x, y)[3], 0, "corner {x},{y}");
    }
    assert_eq!(rgba.get_pixel(w / 2, h / 2)[3], 255);
    let opaque = rgba.pixels().filter(|p| p[3] > 204).count();
    let share = opaque as f64 / (w * h) as f64;
    assert!((0.2..0.8).contains(&share), "{share}");
}
