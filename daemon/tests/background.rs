//! Background removal (U²-Net): parity with the reference code over `tests/reference-u2net`, the
//! full-size checkpoint manifest through the loader, output shapes and determinism of the
//! full-size network with random weights.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use trellis::bench::u2net::{manifest_state_dict, random_full_size};
use trellis::models::background::network_from_state_dict;
use trellis::models::background::u2net::U2NetConfig;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/reference-u2net")
}

#[test]
fn reference_fixtures_pass() {
    let mut out = Vec::new();
    let s = trellis::parity::run(&fixtures(), &Device::Cpu, None, &mut out).expect("parity run");
    let text = String::from_utf8_lossy(&out);
    println!("{text}");
    assert_eq!(s.checked, 2, "{text}");
    assert_eq!(s.passed, 2, "{text}");
    assert!(
        text.contains("ok   u2net_tiny") && text.contains("ok   rembg_tiny"),
        "{text}"
    );
}

#[test]
fn full_size_manifest_loads_exactly_and_nothing_else_does() {
    let dev = Device::Cpu;
    // Zeros in the manifest's shapes and dtypes, num_batches_tracked (int64) included.
    let m =
        trellis::runtime::weights::Manifest::load(&trellis::bench::u2net::manifest_file()).unwrap();
    assert_eq!(m.entries.len(), 798);
    let zeros = |m: &trellis::runtime::weights::Manifest| {
        m.entries
            .iter()
            .map(|(k, e)| {
                let t = Tensor::zeros((), e.dtype, &dev)
                    .unwrap()
                    .broadcast_as(e.shape.as_slice())
                    .unwrap();
                (k.clone(), t)
            })
            .collect::<std::collections::HashMap<_, _>>()
    };
    network_from_state_dict(zeros(&m), &U2NetConfig::u2net(), "manifest", &dev)
        .expect("the full-size manifest must load");
    // The small network's widths do not fit it: every mismatch is reported.
    let e = network_from_state_dict(zeros(&m), &U2NetConfig::u2netp(), "manifest", &dev)
        .err()
        .expect("U2NETP widths must not accept the U2NET checkpoint")
        .to_string();
    assert!(
        e.contains("wrong shape: stage1.rebnconv1.conv_s1.weight"),
        "{e}"
    );
    // A renamed and a missing tensor.
    let mut sd = zeros(&m);
    let w = sd.remove("outconv.weight").unwrap();
    sd.insert("outconv.weights".into(), w);
    sd.remove("side3.bias");
    let e = network_from_state_dict(sd, &U2NetConfig::u2net(), "manifest", &dev)
        .err()
        .expect("a damaged state dict must fail")
        .to_string();
    assert!(e.contains("missing: outconv.weight"), "{e}");
    assert!(e.contains("missing: side3.bias"), "{e}");
    assert!(e.contains("unexpected: outconv.weights"), "{e}");
}

#[test]
fn full_size_network_shapes_and_determinism() {
    let dev = Device::Cpu;
    let net = random_full_size(3, &dev).unwrap();
    // Odd, non-square input: ceil-mode pools down to 2x2 and back.
    let x = trellis::bench::randn(&[1, 3, 45, 62], 11, &dev).unwrap();
    let a = net.forward(&x).unwrap();
    assert_eq!(a.d.len(), 7);
    for d in &a.d {
        assert_eq!(d.dims(), &[1, 1, 45, 62]);
        let v = d.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|p| p.is_finite() && (0.0..=1.0).contains(p)));
    }
    let dims: Vec<(&str, Vec<usize>)> = a
        .stages
        .iter()
        .map(|(n, t)| (*n, t.dims().to_vec()))
        .collect();
    assert_eq!(dims[0], ("hx1", vec![1, 64, 45, 62]));
    assert_eq!(dims[5], ("hx6", vec![1, 512, 2, 2]));
    assert_eq!(dims[10], ("hx1d", vec![1, 64, 45, 62]));
    // Same input, same weights: bit-identical output, also from a second build.
    let b = net.matte(&x).unwrap();
    let again = random_full_size(3, &dev).unwrap().matte(&x).unwrap();
    let diff = |p: &Tensor, q: &Tensor| {
        (p - q)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert_eq!(diff(&a.d[0], &b), 0.0);
    assert_eq!(diff(&b, &again), 0.0);
    // The manifest's int64 counters are part of the state dict the loader ignores.
    let sd = manifest_state_dict(3, &dev).unwrap();
    assert!(sd.keys().any(|k| k.ends_with("num_batches_tracked")));
}

#[test]
fn pth_checkpoints_read_like_their_safetensors() {
    let d = fixtures().join("u2net_tiny");
    let st = candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for f in ["model_zip.pth", "model_legacy.pth"] {
        let sd = trellis::runtime::pth::read_state_dict(&d.join(f)).unwrap();
        let counters = sd
            .keys()
            .filter(|k| k.ends_with("num_batches_tracked"))
            .count();
        assert!(counters > 0, "{f}");
        assert_eq!(sd.len(), st.len() + counters, "{f}");
        for (k, v) in &st {
            let w = sd.get(k).unwrap_or_else(|| panic!("{f}: no {k}"));
            assert_eq!(w.dims(), v.dims(), "{f}: {k}");
            let same = w
                .eq(v)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .mean_all()
                .unwrap();
            assert_eq!(same.to_scalar::<f32>().unwrap(), 1.0, "{f}: {k} differs");
        }
        // A truncated copy is an error naming the file, never a panic.
        let bytes = std::fs::read(d.join(f)).unwrap();
        let cut = tmp.path().join(f);
        std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
        let e = trellis::runtime::pth::read_state_dict(&cut).expect_err("truncated");
        assert!(format!("{e:#}").contains(f), "{e:#}");
    }
    let junk = tmp.path().join("junk.pth");
    std::fs::write(&junk, b"not a checkpoint at all").unwrap();
    let e = trellis::runtime::pth::read_state_dict(&junk).expect_err("junk");
    assert!(format!("{e:#}").contains("junk.pth"), "{e:#}");
}

#[test]
fn background_model_folders_and_offline_hub_ids() {
    use trellis::hub::HubOptions;
    use trellis::models::background::{resolve, BackgroundModel};
    let tmp = tempfile::tempdir().unwrap();
    let mut opts = HubOptions::new("http://127.0.0.1:9", tmp.path().join("cache"));
    opts.offline = true;
    // The fixture folder: config.json widths + model.safetensors.
    let dir = fixtures().join("u2net_tiny");
    let src = resolve(Some(dir.to_str().unwrap()), &opts).unwrap();
    assert!(src.weights.ends_with("model.safetensors"));
    assert_eq!(src.config.stage1, [3, 4, 6]);
    let m = BackgroundModel::load(&src, &Device::Cpu).unwrap();
    let img = image::RgbaImage::from_fn(40, 30, |x, y| {
        image::Rgba([(x * 6) as u8, (y * 8) as u8, 90, 255])
    });
    let (cut, matte) = m.remove(&img).unwrap();
    assert_eq!(cut.dimensions(), (40, 30));
    assert_eq!(matte.dimensions(), (40, 30));
    // Deterministic.
    let (cut2, _) = m.remove(&img).unwrap();
    assert_eq!(cut.as_raw(), cut2.as_raw());
    // A folder without weights.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = resolve(Some(empty.to_str().unwrap()), &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("holds no weights"), "{e}");
    // A hub id missing from the cache, offline.
    let e = resolve(None, &opts).unwrap_err().to_string();
    assert!(
        e.contains("leonelhs/u2net/u2net.pth") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
}
