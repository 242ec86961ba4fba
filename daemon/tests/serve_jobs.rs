//! A real `trellisd serve` on the tiny repositories: two clients queueing at once on two CPU
//! workers, progress to done, fetch through shared memory and inline, release and disconnect
//! cleanup, cancel of a running job, kill -9 and restart with every asset listed, decode of a
//! stored asset without sampling.
#![cfg(unix)]

mod serve_common;

use std::time::{Duration, Instant};

use serve_common::*;
use trellis::client::{Client, RemoteError};
use trellis_ipc_protocol::{
    AssetInfo, BinaryBuilder, DType, DecodeParams, ErrorCode, Format, GenerateParams, GlbParams,
    ImageInput, JobInfo, JobRef, JobState, Op, Transport,
};

fn image_job(b: &mut BinaryBuilder, steps: u32, wait: bool) -> Op {
    let png = png_bytes();
    b.push("img", DType::U8, &[png.len() as u64], &png).unwrap();
    Op::Generate(GenerateParams {
        images: vec![ImageInput::Encoded("img".into())],
        ss_steps: Some(steps),
        slat_steps: Some(steps),
        seed: Some(5),
        wait,
        ..Default::default()
    })
}

fn text_job(steps: u32, wait: bool) -> Op {
    Op::Generate(GenerateParams {
        text: Some("a small wooden chair".into()),
        ss_steps: Some(steps),
        slat_steps: Some(steps),
        wait,
        ..Default::default()
    })
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

fn shm_files(d: &Daemon) -> Vec<String> {
    std::fs::read_dir(d.shm_dir())
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn two_clients_queue_progress_fetch_and_cleanup() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(tiny) = tiny_repos(tmp.path()) else {
        return;
    };
    let mut d = Daemon::start(tmp.path(), &tiny, "cpu,cpu");
    // Two clients submit at once; each follows its job to the end.
    let socket = d.socket.clone();
    let s2 = socket.clone();
    let t1 = std::thread::spawn(move || {
        let mut c = Client::connect(&socket).unwrap();
        let mut b = BinaryBuilder::default();
        let op = image_job(&mut b, 2, true);
        run_waited(&mut c, op, b)
    });
    let t2 = std::thread::spawn(move || {
        let mut c = Client::connect(&s2).unwrap();
        run_waited(&mut c, text_job(2, true), BinaryBuilder::default())
    });
    let (a, pa) = t1.join().unwrap();
    let (b, pb) = t2.join().unwrap();
    for (info, progress) in [(&a, &pa), (&b, &pb)] {
        assert_eq!(info.state, JobState::Done, "{info:?}");
        assert!(info.asset.is_some() && info.first_step_s.is_some());
        // Progress replies carry the job's latest state (steps may be coalesced): every
        // stage shows up in order, steps never go back within a stage, sampling reports steps.
        let order = [
            "queued",
            "loading",
            "conditioning",
            "sparse_structure",
            "structured_latent",
            "decoding",
        ];
        let pos: Vec<usize> = progress
            .iter()
            .filter_map(|(s, _, _)| order.iter().position(|o| o == s))
            .collect();
        assert!(pos.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
        for stage in ["sparse_structure", "structured_latent"] {
            let steps: Vec<u32> = progress
                .iter()
                .filter(|(s, _, n)| s == stage && *n == 2)
                .map(|(_, k, _)| *k)
                .collect();
            assert!(steps.iter().any(|k| *k >= 1), "{stage}: {progress:?}");
            assert!(steps.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
        }
    }
    assert_ne!(a.job, b.job);
    let mut c = d.client();
    let jobs = c.call(Op::Jobs {}).unwrap();
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 2);

    // Fetch: inline and through shared memory give the same arrays.
    let asset = a.asset.clone().unwrap();
    let inline = c.fetch(&asset, Format::Mesh, Transport::Inline).unwrap();
    let shm = c.fetch(&asset, Format::Mesh, Transport::Shm).unwrap();
    assert_eq!(inline.transport, Transport::Inline);
    assert_eq!(shm.transport, Transport::Shm);
    assert_eq!(inline.arrays, shm.arrays);
    assert_eq!(inline.data, shm.data);
    let pos = inline.f32("positions").unwrap();
    let tri = inline.u32("triangles").unwrap();
    assert!(!tri.is_empty() && tri.iter().all(|&i| (i as usize) < pos.len() / 3));
    assert_eq!(inline.f32("colors").unwrap().len(), pos.len());
    // Client::fetch released its buffer: nothing left.
    assert!(shm_files(&d).is_empty(), "{:?}", shm_files(&d));
    let g = c.fetch(&asset, Format::Gaussian, Transport::Auto).unwrap();
    let n = g.f32("opacities").unwrap().len();
    assert!(n > 0 && g.f32("rotations").unwrap().len() == 4 * n);

    // A buffer left unreleased goes when its connection closes.
    let mut c2 = d.client();
    let r = c2
        .call(Op::Fetch(trellis_ipc_protocol::FetchParams {
            asset: asset.clone(),
            what: Format::Gaussian,
            transport: Transport::Shm,
        }))
        .unwrap();
    let path = r["buffer"]["path"].as_str().unwrap().to_string();
    assert!(std::path::Path::new(&path).is_file());
    assert_eq!(shm_files(&d).len(), 1);
    // Another connection cannot release it.
    let e = c
        .call(Op::Release(trellis_ipc_protocol::ReleaseParams {
            buffer: r["buffer"]["buffer"].as_str().unwrap().into(),
        }))
        .unwrap_err();
    assert_eq!(
        e.downcast_ref::<RemoteError>().unwrap().0.code,
        ErrorCode::NotFound
    );
    drop(c2);
    let t = Instant::now();
    while !shm_files(&d).is_empty() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        shm_files(&d).is_empty(),
        "left after disconnect: {:?}",
        shm_files(&d)
    );

    // Shutdown: exit 0, socket and buffer folder gone.
    c.call(Op::Shutdown {}).unwrap();
    assert_eq!(d.wait(), Some(0));
    assert!(!d.shm_dir().exists(), "{} left", d.shm_dir().display());
    assert!(!d.socket.exists());
}

#[test]
fn cancel_a_running_job_within_one_step() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(tiny) = tiny_repos(tmp.path()) else {
        return;
    };
    let d = Daemon::start(tmp.path(), &tiny, "cpu");
    let mut c = d.client();
    let mut b = BinaryBuilder::default();
    let op = image_job(&mut b, 1000, false);
    let a = c.call_with(op, b.arrays, b.binary, |_| {}).unwrap();
    let job: JobInfo = serde_json::from_value(a.result).unwrap();
    assert_eq!(job.state, JobState::Queued);
    // A second job waits behind it and is cancelled while queued.
    let queued: JobInfo = serde_json::from_value(c.call(text_job(2, false)).unwrap()).unwrap();
    let status = |c: &mut Client, j: u64| -> JobInfo {
        serde_json::from_value(c.call(Op::Status(JobRef { job: j })).unwrap()).unwrap()
    };
    let t = Instant::now();
    let before = loop {
        let s = status(&mut c, job.job);
        if s.stage.as_deref() == Some("sparse_structure") && s.step >= 2 {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "never ran: {s:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status(&mut c, queued.job).queue_position, Some(0));
    let q: JobInfo =
        serde_json::from_value(c.call(Op::Cancel(JobRef { job: queued.job })).unwrap()).unwrap();
    assert_eq!(q.state, JobState::Cancelled);
    c.call(Op::Cancel(JobRef { job: job.job })).unwrap();
    let t = Instant::now();
    let after = loop {
        let s = status(&mut c, job.job);
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
    // The status polled before the cancel may lag the worker by a step or two; the sampler
    // checks the flag before every step, so at most one step runs after the cancel arrives.
    assert!(
        after.step <= before.step + 3 && after.step < 1000,
        "ran on: {before:?} -> {after:?}"
    );
    eprintln!(
        "cancel: at step {} of {}, stopped at step {} after {:.3} s",
        before.step,
        before.total,
        after.step,
        t.elapsed().as_secs_f64()
    );
    // The worker is free again.
    let (done, _) = run_waited(&mut c, text_job(1, true), BinaryBuilder::default());
    assert_eq!(done.state, JobState::Done);
    // A waited job that is cancelled ends with a `cancelled` error.
    let mut w = d.client();
    let waiter = std::thread::spawn(move || {
        let mut b = BinaryBuilder::default();
        let op = image_job(&mut b, 1000, true);
        w.call_with(op, b.arrays, b.binary, |_| {}).map(|_| ())
    });
    let t = Instant::now();
    loop {
        let jobs: Vec<JobInfo> =
            serde_json::from_value(c.call(Op::Jobs {}).unwrap()["jobs"].clone()).unwrap();
        if let Some(j) = jobs.iter().find(|j| j.state == JobState::Running) {
            c.call(Op::Cancel(JobRef { job: j.job })).unwrap();
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(10));
    }
    let e = waiter.join().unwrap().unwrap_err();
    assert_eq!(
        e.downcast_ref::<RemoteError>().unwrap().0.code,
        ErrorCode::Cancelled
    );
    // SIGTERM stops it cleanly: exit 0, buffers and socket gone.
    let mut d = d;
    c.call(Op::Fetch(trellis_ipc_protocol::FetchParams {
        asset: done.asset.clone().unwrap(),
        what: Format::Mesh,
        transport: Transport::Shm,
    }))
    .unwrap();
    assert_eq!(d.terminate(), Some(0));
    assert!(!d.shm_dir().exists() && !d.socket.exists());
}

#[test]
fn kill_9_then_restart_lists_every_asset_and_decodes_without_sampling() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(tiny) = tiny_repos(tmp.path()) else {
        return;
    };
    let mut d = Daemon::start(tmp.path(), &tiny, "cpu");
    let mut c = d.client();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (j, _) = run_waited(&mut c, text_job(1, true), BinaryBuilder::default());
        ids.push(j.asset.unwrap());
    }
    // Leave a buffer behind, then kill -9.
    c.call(Op::Fetch(trellis_ipc_protocol::FetchParams {
        asset: ids[0].clone(),
        what: Format::Mesh,
        transport: Transport::Shm,
    }))
    .unwrap();
    let old_shm = d.shm_dir();
    assert!(old_shm.is_dir());
    d.child.kill().unwrap();
    d.wait();
    drop(c);
    assert!(d.socket.exists(), "a killed daemon leaves its socket file");

    let d2 = Daemon::start(tmp.path(), &tiny, "cpu");
    assert!(
        !old_shm.exists(),
        "the dead daemon's buffers were not swept"
    );
    let mut c = d2.client();
    let list: Vec<AssetInfo> =
        serde_json::from_value(c.call(Op::AssetsList {}).unwrap()["assets"].clone()).unwrap();
    let listed: Vec<&str> = list.iter().map(|a| a.asset.as_str()).collect();
    assert_eq!(listed, ids.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(list.iter().all(|a| a.task == "text_to_3d"
        && a.formats == vec![Format::Mesh, Format::Gaussian]
        && a.files.contains_key("trellis")));

    // Decode again from the stored latent: no sampler step, identical mesh arrays.
    let dir = d2.data.join("assets").join(&ids[1]);
    let mesh_before = std::fs::read(dir.join("mesh.bin")).unwrap();
    let bundle_before = std::fs::read(dir.join("asset.trellis")).unwrap();
    std::fs::remove_file(dir.join("mesh.bin")).unwrap();
    let mut stages = Vec::new();
    let a = c
        .call_with(
            Op::Decode(DecodeParams {
                asset: ids[1].clone(),
                formats: vec![Format::Mesh],
                glb: None,
                wait: true,
            }),
            Vec::new(),
            Vec::new(),
            |p| stages.push(p.stage.clone()),
        )
        .unwrap();
    assert_eq!(a.result["state"], "done");
    assert!(
        !stages
            .iter()
            .any(|s| s == "sparse_structure" || s == "structured_latent"),
        "decode sampled: {stages:?}"
    );
    assert_eq!(std::fs::read(dir.join("mesh.bin")).unwrap(), mesh_before);
    assert_eq!(
        std::fs::read(dir.join("asset.trellis")).unwrap(),
        bundle_before
    );

    // Delete one; the other stays.
    c.call(Op::AssetsDelete(trellis_ipc_protocol::AssetRef {
        asset: ids[0].clone(),
    }))
    .unwrap();
    let list = c.call(Op::AssetsList {}).unwrap();
    assert_eq!(list["assets"].as_array().unwrap().len(), 1);
}

#[test]
fn second_identical_job_starts_sampling_without_reloading() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(tiny) = tiny_repos(tmp.path()) else {
        return;
    };
    let d = Daemon::start(tmp.path(), &tiny, "cpu");
    let mut c = d.client();
    let mut times = Vec::new();
    let mut resident = Vec::new();
    for _ in 0..2 {
        let mut b = BinaryBuilder::default();
        let op = image_job(&mut b, 2, true);
        let a = c.call_with(op, b.arrays, b.binary, |_| {}).unwrap();
        let j: JobInfo = serde_json::from_value(a.result).unwrap();
        times.push(j.first_step_s.unwrap());
        resident.push(j.models_resident);
    }
    // The first job read the weights; the second found them all resident.
    assert_eq!(resident, vec![Some(false), Some(true)]);
    let hello = c
        .call(Op::Hello(trellis_ipc_protocol::HelloParams {
            protocol: trellis_ipc_protocol::PROTOCOL_VERSION,
            client: "test".into(),
        }))
        .unwrap();
    let image_model = hello["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["class"] == "image_to_3d")
        .unwrap()
        .clone();
    assert_eq!(image_model["resident"], true, "{hello}");
    eprintln!(
        "time to first sampler step: first job {:.3} s, second identical job {:.3} s",
        times[0], times[1]
    );
}

#[test]
fn baked_glb_request_writes_a_textured_mesh_and_fetch_returns_uvs_and_texture() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(tiny) = tiny_repos(tmp.path()) else {
        return;
    };
    let mut d = Daemon::start(tmp.path(), &tiny, "cpu");
    let mut c = d.client();
    let bake = GlbParams {
        bake: true,
        texture_size: Some(512),
        target_faces: Some(400),
        ..Default::default()
    };
    // Baking needs the Gaussians: refused before anything is queued.
    let e = c
        .call(Op::Generate(GenerateParams {
            text: Some("a small wooden chair".into()),
            formats: vec![Format::Mesh],
            glb: Some(bake),
            wait: true,
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(
        e.downcast_ref::<RemoteError>().unwrap().0.code,
        ErrorCode::BadRequest
    );
    // Options without bake: refused too (they would be ignored).
    let e = c
        .call(Op::Generate(GenerateParams {
            text: Some("a small wooden chair".into()),
            glb: Some(GlbParams {
                texture_size: Some(512),
                ..Default::default()
            }),
            wait: true,
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(
        e.downcast_ref::<RemoteError>().unwrap().0.code,
        ErrorCode::BadRequest
    );

    let op = Op::Generate(GenerateParams {
        text: Some("a small wooden chair".into()),
        ss_steps: Some(2),
        slat_steps: Some(2),
        glb: Some(bake),
        wait: true,
        ..Default::default()
    });
    let (info, _) = run_waited(&mut c, op, BinaryBuilder::default());
    assert_eq!(info.state, JobState::Done, "{info:?}");
    let asset = info.asset.unwrap();
    let m = c.fetch(&asset, Format::Mesh, Transport::Inline).unwrap();
    let pos = m.f32("positions").unwrap();
    let tri = m.u32("triangles").unwrap();
    let v = pos.len() / 3;
    assert!(!tri.is_empty() && tri.iter().all(|&i| (i as usize) < v));
    assert!(tri.len() / 3 <= 400, "{} triangles", tri.len() / 3);
    let uvs = m.f32("uvs").unwrap();
    assert_eq!(uvs.len(), 2 * v);
    assert!(uvs.iter().all(|u| (0.0..=1.0).contains(u)));
    assert!(
        !m.has("colors"),
        "a baked mesh has a texture, not vertex colours"
    );
    let tex = m.arrays.iter().find(|a| a.name == "texture").unwrap();
    assert_eq!(tex.dtype, DType::U8);
    assert_eq!(tex.shape, vec![512, 512, 3]);
    let px = tex.slice(&m.data).unwrap();
    assert!(
        px.iter().any(|&b| b != px[0]),
        "the texture is one flat colour"
    );
    // The asset's GLB is that mesh, with its texture.
    let a: AssetInfo = serde_json::from_value(
        c.call(Op::AssetsGet(trellis_ipc_protocol::AssetRef {
            asset: asset.clone(),
        }))
        .unwrap(),
    )
    .unwrap();
    let glb = std::path::PathBuf::from(&a.files["glb"]);
    let (doc, _, images) = gltf::import(&glb).unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!((images[0].width, images[0].height), (512, 512));
    let prim = doc.meshes().next().unwrap().primitives().next().unwrap();
    assert!(prim.get(&gltf::Semantic::TexCoords(0)).is_some());
    assert_eq!(prim.indices().unwrap().count(), tri.len());
    // The thumbnail for job lists: the job names the asset's preview.png, four views of the
    // textured mesh above four of the Gaussians.
    let preview = info
        .preview
        .clone()
        .expect("a done job with a mesh has a preview");
    assert_eq!(a.files.get("preview"), Some(&preview));
    let img = image::open(&preview).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (4 * 128, 2 * 128));
    let (top, bottom) = img.as_raw().split_at(img.as_raw().len() / 2);
    let bg = [top[0], top[1], top[2]];
    for (row, half) in [("mesh", top), ("Gaussians", bottom)] {
        let drawn = half.chunks_exact(3).filter(|p| *p != bg).count();
        assert!(drawn > 200, "the {row} row shows {drawn} pixels only");
    }
    assert_eq!(d.terminate(), Some(0));
}

/// Without CUDA in this build, `--devices cuda:0,auto` starts two workers on the CPU (one warning
/// line for cuda:0) and `hello` reports the devices actually used.
#[cfg(not(feature = "cuda"))]
#[test]
fn hello_reports_the_devices_actually_used() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(tiny) = tiny_repos(tmp.path()) else {
        return;
    };
    let d = Daemon::start(tmp.path(), &tiny, "cuda:0,auto");
    let mut c = d.client();
    let hello = c
        .call(Op::Hello(trellis_ipc_protocol::HelloParams {
            protocol: trellis_ipc_protocol::PROTOCOL_VERSION,
            client: "test".into(),
        }))
        .unwrap();
    assert_eq!(
        hello["devices"],
        serde_json::json!(["cpu", "cpu"]),
        "{hello}"
    );
    assert_eq!(hello["tier"], "cpu", "{hello}");
    // A job runs on one of them and records it.
    let mut b = BinaryBuilder::default();
    let op = image_job(&mut b, 1, true);
    let a = c.call_with(op, b.arrays, b.binary, |_| {}).unwrap();
    let j: JobInfo = serde_json::from_value(a.result).unwrap();
    assert_eq!(j.state, JobState::Done, "{j:?}");
    assert_eq!(j.device.as_deref(), Some("cpu"));
}
