//! The daemon's `edit` on the tiny repositories (structure grid 32³, structure latent 8³): an
//! asset made by a `generate` job is edited through the socket, the voxels and latents outside the
//! region come out bit-identical, the same seed gives the same result, the result is a stored
//! asset that can be fetched and edited again (with a voxel mask), bad requests are refused with
//! nothing written while the daemon keeps serving, and a running edit can be cancelled.
#![cfg(unix)]

mod serve_common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::Device;
use serve_common::*;
use trellis::client::{Client, RemoteError};
use trellis::export::asset::Asset;
use trellis_ipc_protocol::{
    AssetInfo, AssetRef, BinaryBuilder, DType, EditParams, ErrorCode, Format, GenerateParams,
    JobInfo, JobRef, JobState, Op, RegionBox, RegionParams, Transport,
};

/// The structure grid and latent resolutions of the tiny repositories.
const R: i32 = 32;
const LATENT: usize = 8;

fn text_job(steps: u32) -> Op {
    Op::Generate(GenerateParams {
        text: Some("a small wooden chair".into()),
        ss_steps: Some(steps),
        slat_steps: Some(steps),
        seed: Some(3),
        wait: true,
        ..Default::default()
    })
}

fn boxed(min: [f64; 3], max: [f64; 3]) -> RegionParams {
    RegionParams {
        region_box: Some(RegionBox { min, max }),
        mask: None,
    }
}

fn edit(asset: &str, region: RegionParams, seed: u64, steps: u32, wait: bool) -> EditParams {
    EditParams {
        asset: asset.to_string(),
        region,
        model: None,
        text: Some("a red roof".into()),
        image: None,
        seed: Some(seed),
        ss_steps: Some(steps),
        ss_cfg: None,
        slat_steps: Some(steps),
        slat_cfg: None,
        jumps: None,
        jump_length: None,
        formats: Vec::new(),
        glb: None,
        no_background_removal: false,
        save_mask: false,
        wait,
    }
}

fn run_waited(c: &mut Client, op: Op, b: BinaryBuilder) -> (JobInfo, Vec<(String, u32, u32)>) {
    let mut seen = Vec::new();
    let a = c
        .call_with(op, b.arrays, b.binary, |p| {
            seen.push((p.stage.clone(), p.step, p.total))
        })
        .expect("job");
    (serde_json::from_value(a.result).unwrap(), seen)
}

fn bundle(d: &Daemon, id: &str) -> Asset {
    let p = d.data.join("assets").join(id).join("asset.trellis");
    Asset::load(&p, &Device::Cpu).unwrap()
}

/// (x, y, z) and the latent's bits of each voxel.
type Rows = Vec<([i32; 3], Vec<u32>)>;

fn rows(a: &Asset) -> Rows {
    let c: Vec<Vec<i32>> = a.coords.to_vec2().unwrap();
    let l: Vec<Vec<f32>> = a.slat.to_vec2().unwrap();
    c.iter()
        .zip(&l)
        .map(|(c, l)| ([c[1], c[2], c[3]], l.iter().map(|x| x.to_bits()).collect()))
        .collect()
}

fn split(a: &Asset, inside: impl Fn([i32; 3]) -> bool) -> (Rows, Rows) {
    rows(a).into_iter().partition(|(v, _)| !inside(*v))
}

/// The structure latent's bits per latent cell.
fn latent_cells(a: &Asset) -> HashMap<[usize; 3], Vec<u32>> {
    let z = a.ss_latent.as_ref().expect("ss_latent");
    let (_, ch, r, _, _) = z.dims5().unwrap();
    assert_eq!(r, LATENT);
    let v: Vec<f32> = z.flatten_all().unwrap().to_vec1().unwrap();
    let mut m = HashMap::new();
    for x in 0..r {
        for y in 0..r {
            for zz in 0..r {
                let bits = (0..ch)
                    .map(|c| v[((c * r + x) * r + y) * r + zz].to_bits())
                    .collect();
                m.insert([x, y, zz], bits);
            }
        }
    }
    m
}

fn asset_dirs(data: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(data.join("assets"))
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn code_of(e: &anyhow::Error) -> (ErrorCode, String) {
    let r = e.downcast_ref::<RemoteError>().expect("a daemon error");
    (r.0.code, r.0.message.clone())
}

/// A `u8 [n, n, n]` mask of the voxels `inside` picks.
fn mask_bytes(n: usize, inside: impl Fn([usize; 3]) -> bool) -> Vec<u8> {
    let mut v = vec![0u8; n * n * n];
    for x in 0..n {
        for y in 0..n {
            for z in 0..n {
                v[(x * n + y) * n + z] = u8::from(inside([x, y, z]));
            }
        }
    }
    v
}

#[test]
fn edit_a_generated_asset_through_the_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(tiny) = tiny_repos(tmp.path()) else {
        return;
    };
    let d = Daemon::start(tmp.path(), &tiny, "cpu");
    let mut c = d.client();
    let hello = c
        .call(Op::Hello(trellis_ipc_protocol::HelloParams {
            protocol: trellis_ipc_protocol::PROTOCOL_VERSION,
            client: "serve_edit".into(),
        }))
        .unwrap();
    let caps = hello["capabilities"].as_array().unwrap();
    assert!(caps.iter().any(|o| o == "edit"), "{caps:?}");
    let (made, _) = run_waited(&mut c, text_job(2), BinaryBuilder::default());
    let src_id = made.asset.unwrap();
    let src = bundle(&d, &src_id);

    // The right half of the grid (x >= 0), followed with progress to the end.
    let region = || boxed([0.0, -0.5, -0.5], [0.5, 0.5, 0.5]);
    let right = |v: [i32; 3]| v[0] >= R / 2;
    let (e1, progress) = run_waited(
        &mut c,
        Op::Edit(edit(&src_id, region(), 5, 2, true)),
        BinaryBuilder::default(),
    );
    assert_eq!(e1.state, JobState::Done, "{e1:?}");
    assert_eq!(e1.kind, "edit");
    for stage in ["sparse_structure", "structured_latent"] {
        let steps: Vec<u32> = progress
            .iter()
            .filter(|(s, _, n)| s == stage && *n == 2)
            .map(|(_, k, _)| *k)
            .collect();
        assert!(steps.iter().any(|k| *k >= 1), "{stage}: {progress:?}");
    }
    let e1_id = e1.asset.clone().unwrap();
    assert_ne!(e1_id, src_id);
    let edited = bundle(&d, &e1_id);
    let (src_out, src_in) = split(&src, right);
    let (ed_out, ed_in) = split(&edited, right);
    assert!(!src_out.is_empty());
    assert_eq!(src_out, ed_out, "outside the region: bit-identical");
    assert_ne!(src_in, ed_in, "inside the region: regenerated");
    let (zs, ze) = (latent_cells(&src), latent_cells(&edited));
    let mut changed = 0;
    for (cell, bits) in &zs {
        if cell[0] < LATENT / 2 {
            assert_eq!(bits, &ze[cell], "latent cell {cell:?} outside the region");
        } else if bits != &ze[cell] {
            changed += 1;
        }
    }
    assert_eq!(changed, LATENT * LATENT * LATENT / 2);

    // A stored asset like any other: listed, fetched.
    let info: AssetInfo = serde_json::from_value(
        c.call(Op::AssetsGet(AssetRef {
            asset: e1_id.clone(),
        }))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(info.task, "edit");
    assert_eq!(info.formats, vec![Format::Mesh, Format::Gaussian]);
    assert_eq!(info.meta["source"]["asset_id"], src_id.as_str());
    assert_eq!(
        info.meta["region"]["box"][0],
        serde_json::json!([0.0, -0.5, -0.5])
    );
    assert_eq!(info.meta["edit"]["slat_regenerated_everywhere"], false);
    let m = c.fetch(&e1_id, Format::Mesh, Transport::Inline).unwrap();
    assert!(!m.u32("triangles").unwrap().is_empty());

    // The same seed: the same result, bit for bit.
    let (e2, _) = run_waited(
        &mut c,
        Op::Edit(edit(&src_id, region(), 5, 2, true)),
        BinaryBuilder::default(),
    );
    let again = bundle(&d, &e2.asset.unwrap());
    assert_eq!(rows(&again), rows(&edited));
    assert_eq!(latent_cells(&again), ze);

    // The result edited again, with an uploaded voxel mask (the back half, y >= 16) and a
    // RePaint jump.
    let mut b = BinaryBuilder::default();
    let n = R as usize;
    let back = mask_bytes(n, |v| v[1] >= n / 2);
    b.push("m", DType::U8, &[n as u64; 3], &back).unwrap();
    let mut p = edit(
        &e1_id,
        RegionParams {
            region_box: None,
            mask: Some("m".into()),
        },
        7,
        2,
        true,
    );
    p.jumps = Some(1);
    let (e3, _) = run_waited(&mut c, Op::Edit(p), b);
    assert_eq!(e3.state, JobState::Done, "{e3:?}");
    let twice = bundle(&d, &e3.asset.unwrap());
    let back_half = |v: [i32; 3]| v[1] >= R / 2;
    assert_eq!(split(&twice, back_half).0, split(&edited, back_half).0);
    assert_eq!(twice.meta["resampling"]["jumps"], 1);
    assert_eq!(twice.meta["source"]["asset_id"], e1_id.as_str());
}

#[test]
fn bad_edits_are_refused_and_a_running_edit_cancels() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(tiny) = tiny_repos(tmp.path()) else {
        return;
    };
    let d = Daemon::start(tmp.path(), &tiny, "cpu");
    let mut c = d.client();
    let (made, _) = run_waited(&mut c, text_job(1), BinaryBuilder::default());
    let id = made.asset.unwrap();
    let before = asset_dirs(&d.data);
    let ok_box = || boxed([0.0, 0.0, 0.0], [0.5, 0.5, 0.5]);
    let n = R as usize;
    let with_mask = |name: &str, shape: [u64; 3], dtype: DType, bytes: Vec<u8>| {
        let mut b = BinaryBuilder::default();
        b.push(name, dtype, &shape, &bytes).unwrap();
        let p = edit(
            &id,
            RegionParams {
                region_box: None,
                mask: Some(name.into()),
            },
            1,
            1,
            true,
        );
        (p, b)
    };
    let mut cases: Vec<(EditParams, BinaryBuilder, ErrorCode, &str)> = Vec::new();
    let plain = |p: EditParams, code, needle| (p, BinaryBuilder::default(), code, needle);
    cases.push(plain(
        edit("no-such-asset", ok_box(), 1, 1, true),
        ErrorCode::NotFound,
        "no asset",
    ));
    cases.push(plain(
        edit(&id, boxed([0.1, 0.0, 0.0], [0.1, 0.2, 0.2]), 1, 1, true),
        ErrorCode::BadRequest,
        "the region is empty",
    ));
    cases.push(plain(
        edit(&id, boxed([0.6, 0.6, 0.6], [0.9, 0.9, 0.9]), 1, 1, true),
        ErrorCode::BadRequest,
        "outside the grid",
    ));
    cases.push(plain(
        edit(&id, RegionParams::default(), 1, 1, true),
        ErrorCode::BadRequest,
        "region: give a box",
    ));
    let mut none = edit(&id, ok_box(), 1, 1, true);
    none.text = None;
    cases.push(plain(none, ErrorCode::BadRequest, "give text or image"));
    let mut blank = edit(&id, ok_box(), 1, 1, true);
    blank.text = Some("  ".into());
    cases.push(plain(blank, ErrorCode::BadRequest, "empty"));
    let mut jumps = edit(&id, ok_box(), 1, 2, true);
    jumps.jumps = Some(1);
    jumps.jump_length = Some(3);
    cases.push(plain(
        jumps,
        ErrorCode::BadRequest,
        "longer than the 2 sampler steps",
    ));
    let (p, b) = with_mask("m", [16, 16, 16], DType::U8, vec![1; 16 * 16 * 16]);
    cases.push((p, b, ErrorCode::BadRequest, "shape [16, 16, 16]"));
    let (p, b) = with_mask("m", [32, 32, 32], DType::U8, vec![0; n * n * n]);
    cases.push((p, b, ErrorCode::BadRequest, "the region is empty"));
    let (p, b) = with_mask("m", [8, 8, 8], DType::F32, vec![0; 8 * 8 * 8 * 4]);
    cases.push((p, b, ErrorCode::BadRequest, "expected u8 [R, R, R]"));
    let mut p = edit(&id, RegionParams::default(), 1, 1, true);
    p.region.mask = Some("not-uploaded".into());
    cases.push((
        p,
        BinaryBuilder::default(),
        ErrorCode::BadRequest,
        "no array",
    ));
    for (p, b, code, needle) in cases {
        let what = format!("{:?}", p.region);
        let Err(e) = c.call_with(Op::Edit(p), b.arrays, b.binary, |_| {}) else {
            panic!("{what}: accepted");
        };
        let (got, msg) = code_of(&e);
        assert_eq!(got, code, "{what}: {msg}");
        assert!(msg.contains(needle), "{what}: {msg}");
        c.call(Op::Ping {}).expect("still serving");
    }
    assert_eq!(asset_dirs(&d.data), before, "nothing written");

    // Cancel a running edit within a step or so; nothing is stored.
    let a = c
        .call(Op::Edit(edit(&id, ok_box(), 1, 1000, false)))
        .unwrap();
    let job: JobInfo = serde_json::from_value(a).unwrap();
    let status = |c: &mut Client| -> JobInfo {
        serde_json::from_value(c.call(Op::Status(JobRef { job: job.job })).unwrap()).unwrap()
    };
    let t = Instant::now();
    let running = loop {
        let s = status(&mut c);
        if s.stage.as_deref() == Some("sparse_structure") && s.step >= 2 {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "never ran: {s:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    c.call(Op::Cancel(JobRef { job: job.job })).unwrap();
    let t = Instant::now();
    let after = loop {
        let s = status(&mut c);
        if s.state.is_final() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "not cancelled: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(after.state, JobState::Cancelled, "{after:?}");
    assert!(after.step <= running.step + 3, "{running:?} -> {after:?}");
    eprintln!(
        "edit cancelled at step {} of {}, stopped at step {} after {:.3} s",
        running.step,
        running.total,
        after.step,
        t.elapsed().as_secs_f64()
    );
    assert_eq!(
        asset_dirs(&d.data),
        before,
        "a cancelled edit stores nothing"
    );
}
