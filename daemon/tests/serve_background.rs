//! Background removal in the daemon (the job layer's path, shared with the command line): a JPEG
//! photo uploaded to `generate` is matted with a tiny random U²-Net (`serve --background-model
//! tests/reference-u2net/u2net_tiny`) and its matte stored on request; `no_background_removal`
//! gives the clear error; with the weights missing offline the request is refused with a clear
//! error, nothing is written and the daemon keeps serving.
#![cfg(unix)]

mod serve_common;

use std::path::{Path, PathBuf};

use serve_common::*;
use trellis::client::{Client, RemoteError};
use trellis_ipc_protocol::{
    AssetInfo, AssetRef, BinaryBuilder, DType, ErrorCode, GenerateParams, ImageInput, JobInfo,
    JobState, Op,
};

fn tiny_u2net() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/reference-u2net/u2net_tiny")
}

/// An opaque JPEG photo: a white disc on black (the tiny random network's matte then has a large
/// region above the 0.8 threshold the crop needs).
fn jpeg_bytes() -> Vec<u8> {
    let img = image::RgbImage::from_fn(120, 90, |x, y| {
        let (dx, dy) = (x as f32 - 64.0, y as f32 - 44.0);
        if dx * dx + dy * dy < 30.0 * 30.0 {
            image::Rgb([255, 255, 255])
        } else {
            image::Rgb([0, 0, 0])
        }
    });
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(
            &mut std::io::Cursor::new(&mut out),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    out
}

fn photo_job(b: &mut BinaryBuilder, save_mask: bool, no_removal: bool) -> Op {
    let jpg = jpeg_bytes();
    b.push("photo", DType::U8, &[jpg.len() as u64], &jpg)
        .unwrap();
    Op::Generate(GenerateParams {
        images: vec![ImageInput::Encoded("photo".into())],
        ss_steps: Some(2),
        slat_steps: Some(2),
        save_mask,
        no_background_removal: no_removal,
        wait: true,
        ..Default::default()
    })
}

fn call(c: &mut Client, op: Op, b: BinaryBuilder) -> anyhow::Result<(JobInfo, Vec<String>)> {
    let mut stages = Vec::new();
    let a = c.call_with(op, b.arrays, b.binary, |p| stages.push(p.stage.clone()))?;
    Ok((serde_json::from_value(a.result)?, stages))
}

fn code_of(e: &anyhow::Error) -> (ErrorCode, String) {
    let r = e.downcast_ref::<RemoteError>().expect("a daemon error");
    (r.0.code, r.0.message.clone())
}

fn asset_dirs(data: &Path) -> usize {
    std::fs::read_dir(data.join("assets"))
        .map(|r| r.count())
        .unwrap_or(0)
}

#[test]
fn a_jpeg_goes_through_the_daemon_with_background_removal() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(tiny) = tiny_repos(tmp.path()) else {
        return;
    };
    let d = Daemon::start_with(tmp.path(), &tiny, "cpu", |c| {
        c.arg("--background-model").arg(tiny_u2net());
    });
    let mut c = d.client();
    let mut b = BinaryBuilder::default();
    let (job, stages) = call(&mut c, photo_job(&mut b, true, false), b).expect("the photo job");
    assert_eq!(job.state, JobState::Done, "{job:?}");
    assert!(
        stages.iter().any(|s| s == "removing_background"),
        "{stages:?}"
    );
    let id = job.asset.unwrap();
    let info: AssetInfo =
        serde_json::from_value(c.call(Op::AssetsGet(AssetRef { asset: id })).unwrap()).unwrap();
    assert_eq!(
        info.meta["background_removed"]["images"],
        serde_json::json!([0])
    );
    let mask = image::open(&info.files["mask"]).unwrap();
    assert!(matches!(mask, image::DynamicImage::ImageLuma8(_)));
    assert_eq!((mask.width(), mask.height()), (120, 90));
    let luma = mask.to_luma8();
    assert!(luma.pixels().any(|p| p.0[0] > 200) && luma.pixels().any(|p| p.0[0] < 50));

    // An RGB array upload (what a client sends for a photo) takes the same path; no mask asked.
    let rgb: Vec<u8> = image::load_from_memory(&jpeg_bytes())
        .unwrap()
        .to_rgb8()
        .into_raw();
    let mut b = BinaryBuilder::default();
    b.push("rgb", DType::U8, &[90, 120, 3], &rgb).unwrap();
    let op = Op::Generate(GenerateParams {
        images: vec![ImageInput::Array("rgb".into())],
        ss_steps: Some(1),
        slat_steps: Some(1),
        wait: true,
        ..Default::default()
    });
    let (job, _) = call(&mut c, op, b).expect("the RGB job");
    assert_eq!(job.state, JobState::Done);
    // The second photo found the network resident.
    assert_eq!(job.models_resident, Some(true), "{job:?}");
    let info: AssetInfo = serde_json::from_value(
        c.call(Op::AssetsGet(AssetRef {
            asset: job.asset.unwrap(),
        }))
        .unwrap(),
    )
    .unwrap();
    assert!(!info.files.contains_key("mask"));

    // Without background removal: today's clear error, nothing written.
    let n = asset_dirs(&d.data);
    let mut b = BinaryBuilder::default();
    let e = call(&mut c, photo_job(&mut b, false, true), b).unwrap_err();
    let (code, msg) = code_of(&e);
    assert_eq!(code, ErrorCode::BadRequest, "{msg}");
    assert!(msg.contains("no transparency"), "{msg}");
    assert_eq!(asset_dirs(&d.data), n);
    c.call(Op::Ping {}).expect("still serving");
}

#[test]
fn missing_weights_offline_are_refused_and_the_daemon_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(tiny) = tiny_repos(tmp.path()) else {
        return;
    };
    let cache = tmp.path().join("empty-hub-cache");
    std::fs::create_dir(&cache).unwrap();
    let d = Daemon::start_with(tmp.path(), &tiny, "cpu", |c| {
        c.env("HF_HUB_CACHE", &cache)
            .env("HF_HOME", tmp.path().join("hf"));
    });
    let mut c = d.client();
    let mut b = BinaryBuilder::default();
    let e = call(&mut c, photo_job(&mut b, true, false), b).unwrap_err();
    let (code, msg) = code_of(&e);
    assert_eq!(code, ErrorCode::ModelUnavailable, "{msg}");
    assert!(msg.contains("leonelhs/u2net/u2net.pth"), "{msg}");
    assert!(msg.contains("HF_HUB_OFFLINE"), "{msg}");
    assert_eq!(asset_dirs(&d.data), 0, "nothing written");
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);
    // An image with transparency needs no weights: the daemon still makes it.
    let png = png_bytes();
    let mut b = BinaryBuilder::default();
    b.push("img", DType::U8, &[png.len() as u64], &png).unwrap();
    let op = Op::Generate(GenerateParams {
        images: vec![ImageInput::Encoded("img".into())],
        ss_steps: Some(1),
        slat_steps: Some(1),
        wait: true,
        ..Default::default()
    });
    let (job, _) = call(&mut c, op, b).expect("an RGBA job");
    assert_eq!(job.state, JobState::Done);
}
