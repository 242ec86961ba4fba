//! One client connection: frames in, one task per request, replies out through one writer task
//! (replies of different requests may interleave). Buffers fetched on the connection are
//! deleted when it closes; requests still waiting on jobs are dropped (the jobs go on).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use interprocess::local_socket::tokio::{prelude::*, Stream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use trellis_ipc_protocol::{
    self as proto, ErrorCode, ErrorInfo, FetchResult, Format, Frame, FrameHeader, HelloResult,
    JobInfo, JobState, LimitsInfo, ModelInfo, Op, Outcome, ProgressInfo, ProtocolError, Reply,
    Request, ShmBuffer, Transport, HEADER_LEN, PROTOCOL_VERSION,
};

use super::queue::Destination;
use super::requests::{self, Refusal};
use super::Ctx;
use crate::jobs::{DecodeJob, Job};

/// One reply on its way out: the frame's JSON, its binary section, and who to tell once the
/// bytes are written (the `shutdown` reply must reach the client before the daemon stops).
type Outgoing = (Reply, Vec<u8>, Option<tokio::sync::oneshot::Sender<()>>);
type Out = mpsc::UnboundedSender<Outgoing>;
type Owned = Arc<Mutex<BTreeSet<String>>>;

/// The peer's effective uid is ours (always true where the OS gives no uid).
pub fn peer_is_this_user(s: &Stream) -> bool {
    match s.peer_creds() {
        #[cfg(unix)]
        Ok(c) => c.euid().is_none_or(|u| u == super::paths::uid()),
        #[cfg(not(unix))]
        Ok(_) => true,
        Err(_) => false,
    }
}

fn send(out: &Out, reply: Reply) {
    let _ = out.send((reply, Vec::new(), None));
}

fn refuse(out: &Out, id: u64, (code, msg): Refusal) {
    send(out, Reply::error(id, code, msg));
}

fn ok(out: &Out, id: u64, v: impl serde::Serialize) {
    match serde_json::to_value(v) {
        Ok(v) => send(out, Reply::ok(id, v)),
        Err(e) => refuse(out, id, (ErrorCode::Internal, e.to_string())),
    }
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
async fn read_frame(mut rd: &Stream) -> Result<Option<Frame>, Refusal> {
    let mut head = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match rd.read(&mut head[got..]).await {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err((ErrorCode::BadRequest, "truncated frame header".into())),
            Ok(n) => got += n,
            Err(e) => return Err((ErrorCode::Internal, e.to_string())),
        }
    }
    let h = FrameHeader::decode(&head, &proto::Limits::requests()).map_err(|e| {
        let code = match e {
            ProtocolError::UnsupportedVersion { .. } => ErrorCode::VersionMismatch,
            ProtocolError::JsonTooLarge { .. } | ProtocolError::BinaryTooLarge { .. } => {
                ErrorCode::TooLarge
            }
            _ => ErrorCode::BadRequest,
        };
        (code, e.to_string())
    })?;
    let mut json = vec![0u8; h.json_len as usize];
    let mut binary = vec![0u8; h.binary_len as usize];
    let truncated = |_| (ErrorCode::BadRequest, "truncated frame".to_string());
    rd.read_exact(&mut json).await.map_err(truncated)?;
    rd.read_exact(&mut binary).await.map_err(truncated)?;
    Ok(Some(Frame { json, binary }))
}

async fn write_replies(stream: Arc<Stream>, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    let limits = proto::Limits::default();
    let mut wr = &*stream;
    while let Some((reply, binary, written)) = rx.recv().await {
        let bytes = Frame::from_message(&reply, binary).and_then(|f| f.encode(&limits));
        let bytes = match bytes {
            Ok(b) => b,
            Err(e) => {
                let r = Reply::error(reply.id, ErrorCode::Internal, e.to_string());
                match Frame::from_message(&r, Vec::new()).and_then(|f| f.encode(&limits)) {
                    Ok(b) => b,
                    Err(_) => continue,
                }
            }
        };
        let sent = wr.write_all(&bytes).await.is_ok() && wr.flush().await.is_ok();
        if let Some(w) = written {
            let _ = w.send(());
        }
        if !sent {
            break;
        }
    }
}

pub async fn serve_connection(stream: Stream, ctx: Arc<Ctx>) {
    let stream = Arc::new(stream);
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_replies(stream.clone(), rx));
    let owned: Owned = Arc::new(Mutex::new(BTreeSet::new()));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        match read_frame(&stream).await {
            Ok(None) => break,
            Ok(Some(frame)) => {
                tasks.spawn(handle(frame, ctx.clone(), tx.clone(), owned.clone()));
                // Reap finished request tasks.
                while tasks.try_join_next().is_some() {}
            }
            Err(r) => {
                // The framing is broken: answer once and close.
                refuse(&tx, 0, r);
                break;
            }
        }
    }
    tasks.abort_all();
    drop(tx);
    let _ = writer.await;
    let ids = owned.lock().map(|s| s.clone()).unwrap_or_default();
    ctx.buffers.release_all(&ids);
}

async fn handle(frame: Frame, ctx: Arc<Ctx>, out: Out, owned: Owned) {
    let req = match proto::parse_request(&frame.json) {
        Ok(r) => r,
        Err((id, code, msg)) => return refuse(&out, id, (code, msg)),
    };
    let id = req.id;
    let binary = frame.binary;
    match &req.op {
        Op::Hello(h) => {
            if h.protocol != PROTOCOL_VERSION {
                return refuse(
                    &out,
                    id,
                    (
                        ErrorCode::VersionMismatch,
                        format!(
                            "this daemon speaks protocol {PROTOCOL_VERSION}, the client {}",
                            h.protocol
                        ),
                    ),
                );
            }
            ok(&out, id, hello(&ctx));
        }
        Op::Ping {} => ok(&out, id, serde_json::json!({})),
        Op::Generate(_) | Op::Variant(_) | Op::Edit(_) => submit(req, binary, ctx, out).await,
        Op::Decode(p) => {
            let p = p.clone();
            let formats = match requests::decode_formats(&p.formats) {
                Ok(f) => f,
                Err(r) => return refuse(&out, id, r),
            };
            let glb = match requests::glb_options(p.glb.as_ref(), &p.formats) {
                Ok(g) => g,
                Err(r) => return refuse(&out, id, r),
            };
            let dir = match ctx
                .store
                .get(&p.asset)
                .and_then(|_| ctx.store.dir(&p.asset))
            {
                Ok(d) => d,
                Err(e) => return refuse(&out, id, (ErrorCode::NotFound, format!("{e:#}"))),
            };
            let job = Job::Decode(DecodeJob {
                asset: dir.join("asset.trellis"),
                model: None,
                formats,
            });
            let model = String::new();
            enqueue(
                job,
                model,
                Destination::AddTo(p.asset.clone(), glb),
                p.wait,
                id,
                &ctx,
                &out,
            )
            .await;
        }
        Op::Status(j) => match ctx.queue.status(j.job) {
            Some(i) => ok(&out, id, i),
            None => refuse(&out, id, not_found_job(j.job)),
        },
        Op::Jobs {} => ok(&out, id, serde_json::json!({ "jobs": ctx.queue.list() })),
        Op::Cancel(j) => match ctx.queue.cancel(j.job) {
            Some(i) => ok(&out, id, i),
            None => refuse(&out, id, not_found_job(j.job)),
        },
        Op::Fetch(p) => {
            let (p, c, o) = (p.clone(), ctx.clone(), owned.clone());
            let r = tokio::task::spawn_blocking(move || fetch(&c, &p, &o)).await;
            match r {
                Ok(Ok((reply_json, arrays, bin))) => {
                    let _ = out.send((
                        Reply {
                            id,
                            outcome: Outcome::Ok {
                                result: reply_json,
                                arrays,
                            },
                        },
                        bin,
                        None,
                    ));
                }
                Ok(Err(r)) => refuse(&out, id, r),
                Err(e) => refuse(&out, id, (ErrorCode::Internal, e.to_string())),
            }
        }
        Op::Release(r) => {
            let mine = owned
                .lock()
                .map(|mut s| s.remove(&r.buffer))
                .unwrap_or(false);
            if mine && ctx.buffers.release(&r.buffer) {
                ok(&out, id, serde_json::json!({}));
            } else {
                refuse(
                    &out,
                    id,
                    (
                        ErrorCode::NotFound,
                        format!("no buffer {:?} fetched on this connection", r.buffer),
                    ),
                );
            }
        }
        Op::AssetsList {} => match ctx.store.list() {
            Ok(a) => ok(&out, id, serde_json::json!({ "assets": a })),
            Err(e) => refuse(&out, id, (ErrorCode::Internal, format!("{e:#}"))),
        },
        Op::AssetsGet(a) => match ctx.store.get(&a.asset) {
            Ok(a) => ok(&out, id, a),
            Err(e) => refuse(&out, id, (ErrorCode::NotFound, format!("{e:#}"))),
        },
        Op::AssetsDelete(a) => match ctx.store.delete(&a.asset) {
            Ok(()) => ok(&out, id, serde_json::json!({})),
            Err(e) => refuse(&out, id, (ErrorCode::NotFound, format!("{e:#}"))),
        },
        Op::Shutdown {} => {
            // Stop only once the reply is on the wire (or the client is gone), at most 2 s later.
            let (written, done) = tokio::sync::oneshot::channel();
            let reply = Reply::ok(id, serde_json::json!({}));
            if out.send((reply, Vec::new(), Some(written))).is_ok() {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), done).await;
            }
            ctx.shutdown.notify_one();
        }
    }
}

fn not_found_job(job: u64) -> Refusal {
    (ErrorCode::NotFound, format!("no job {job}"))
}

fn hello(ctx: &Ctx) -> HelloResult {
    let limits = proto::Limits::requests();
    // `cpu` when every worker is on the CPU; else the GPU tier the jobs start at (`auto`: chosen
    // from free memory at each job's start).
    let tier = if ctx.devices.iter().all(|d| d == "cpu") {
        "cpu".to_string()
    } else {
        ctx.vram_tier
            .map_or_else(|| "auto".to_string(), |t| t.name().to_string())
    };
    HelloResult {
        protocol: PROTOCOL_VERSION,
        daemon: format!("trellis-rs {}", env!("CARGO_PKG_VERSION")),
        pid: std::process::id(),
        address: ctx.address.clone(),
        capabilities: proto::OPS.iter().map(|o| o.to_string()).collect(),
        devices: ctx.devices.clone(),
        tier,
        models: ctx
            .served
            .iter()
            .map(|s| ModelInfo {
                name: s.name.clone(),
                class: match s.is_text {
                    Some(true) => "text_to_3d",
                    Some(false) => "image_to_3d",
                    None => "unknown",
                }
                .into(),
                resident: ctx.queue.is_resident(&s.name),
            })
            .collect(),
        limits: LimitsInfo {
            max_json: limits.max_json,
            max_binary: limits.max_binary,
            max_images: proto::MAX_IMAGES as u64,
            max_image_side: proto::MAX_IMAGE_SIDE,
            max_text_bytes: proto::MAX_TEXT_BYTES as u64,
            max_steps: proto::MAX_STEPS,
            max_mesh_vertices: proto::MAX_MESH_VERTICES,
            max_mesh_faces: proto::MAX_MESH_FACES,
            inline_auto_max: proto::INLINE_AUTO_MAX,
        },
        shm_dir: ctx.buffers.dir.display().to_string(),
        asset_dir: ctx.store.root.display().to_string(),
    }
}

async fn submit(req: Request, binary: Vec<u8>, ctx: Arc<Ctx>, out: Out) {
    let id = req.id;
    let c = ctx.clone();
    // Decoding uploads and checking inputs is CPU work: off the async threads.
    let built = tokio::task::spawn_blocking(move || -> Result<_, Refusal> {
        let bg = c.background_model.as_deref();
        let (job, model, glb, wait) = match &req.op {
            Op::Generate(p) => {
                let glb = requests::glb_options(p.glb.as_ref(), &p.formats)?;
                requests::generate_job(&req, &binary, p, &c.served, &c.conditioners, bg)
                    .map(|(j, m)| (j, m, glb, p.wait))?
            }
            Op::Variant(p) => {
                let glb = requests::glb_options(p.glb.as_ref(), &p.formats)?;
                requests::variant_job(&req, &binary, p, &c.served, &c.conditioners, bg)
                    .map(|(j, m)| (j, m, glb, p.wait))?
            }
            Op::Edit(p) => {
                let glb = requests::glb_options(p.glb.as_ref(), &p.formats)?;
                requests::edit_job(&req, &binary, p, &c.served, &c.conditioners, bg, &c.store)
                    .map(|(j, m)| (j, m, glb, p.wait))?
            }
            _ => return Err((ErrorCode::Internal, "not a job".into())),
        };
        check_background_weights(&job)?;
        Ok((job, model, glb, wait))
    })
    .await;
    match built {
        Ok(Ok((job, model, glb, wait))) => {
            enqueue(job, model, Destination::NewAsset(glb), wait, id, &ctx, &out).await
        }
        Ok(Err(r)) => refuse(&out, id, r),
        Err(e) => refuse(&out, id, (ErrorCode::Internal, e.to_string())),
    }
}

/// Offline, a job that must remove a background is refused at once when the U²-Net weights are
/// not at hand (online they are downloaded by the job).
fn check_background_weights(job: &Job) -> Result<(), Refusal> {
    let opts = crate::hub::HubOptions::from_env();
    if !opts.offline {
        return Ok(());
    }
    if let Some(bg) = job.background_removal() {
        crate::models::background::resolve(bg.model.as_deref(), &opts)
            .map_err(|e| (ErrorCode::ModelUnavailable, format!("{e:#}")))?;
    }
    Ok(())
}

async fn enqueue(
    job: Job,
    model: String,
    dest: Destination,
    wait: bool,
    id: u64,
    ctx: &Ctx,
    out: &Out,
) {
    let Some((info, rx)) = ctx.queue.submit(job, model, dest) else {
        return refuse(
            out,
            id,
            (ErrorCode::ShuttingDown, "the daemon is stopping".into()),
        );
    };
    if wait {
        follow(id, rx, out).await;
    } else {
        ok(out, id, info);
    }
}

/// Sends progress replies until the job ends, then the final reply.
async fn follow(id: u64, mut rx: tokio::sync::watch::Receiver<JobInfo>, out: &Out) {
    let mut last = None;
    loop {
        let info = rx.borrow_and_update().clone();
        if info.state.is_final() {
            return finish(id, info, out);
        }
        let key = (info.stage.clone(), info.step, info.total);
        if last.as_ref() != Some(&key) {
            send(
                out,
                Reply {
                    id,
                    outcome: Outcome::Progress(ProgressInfo {
                        job: info.job,
                        stage: info.stage.clone().unwrap_or_else(|| "queued".into()),
                        step: info.step,
                        total: info.total,
                        eta_s: info.eta_s,
                        detail: info.message.clone(),
                    }),
                },
            );
            last = Some(key);
        }
        if rx.changed().await.is_err() {
            return refuse(out, id, (ErrorCode::Internal, "the job vanished".into()));
        }
    }
}

fn finish(id: u64, info: JobInfo, out: &Out) {
    let err = |code, msg: String| Reply {
        id,
        outcome: Outcome::Error(ErrorInfo {
            code,
            message: msg,
            job: Some(info.job),
        }),
    };
    match info.state {
        JobState::Done => ok(out, id, info),
        JobState::Cancelled => send(
            out,
            err(
                ErrorCode::Cancelled,
                format!("job {} was cancelled", info.job),
            ),
        ),
        _ => {
            let msg = info.message.clone().unwrap_or_else(|| "failed".into());
            let code = if msg.to_lowercase().contains("out of memory") {
                ErrorCode::OutOfMemory
            } else {
                ErrorCode::JobFailed
            };
            send(out, err(code, format!("job {} failed: {msg}", info.job)));
        }
    }
}

type Fetched = (serde_json::Value, Vec<proto::ArrayDesc>, Vec<u8>);

fn fetch(ctx: &Ctx, p: &proto::FetchParams, owned: &Owned) -> Result<Fetched, Refusal> {
    if p.what == Format::RadianceField {
        return Err((
            ErrorCode::Unsupported,
            "fetch: radiance fields have no array form; fetch mesh or gaussian".into(),
        ));
    }
    let (arrays, bin) = ctx
        .store
        .arrays(&p.asset, p.what)
        .map_err(|e| (ErrorCode::NotFound, format!("{e:#}")))?;
    let size = std::fs::metadata(&bin)
        .map_err(|e| (ErrorCode::Internal, format!("{}: {e}", bin.display())))?
        .len();
    let transport = match p.transport {
        Transport::Auto if size <= proto::INLINE_AUTO_MAX => Transport::Inline,
        Transport::Auto => Transport::Shm,
        t => t,
    };
    let internal = |e: anyhow::Error| (ErrorCode::Internal, format!("{e:#}"));
    let mut result = FetchResult {
        asset: p.asset.clone(),
        what: p.what,
        transport,
        buffer: None,
    };
    let bytes = if transport == Transport::Inline {
        std::fs::read(&bin).map_err(|e| internal(e.into()))?
    } else {
        let (buffer, path, size) = ctx.buffers.from_file(&bin).map_err(internal)?;
        if let Ok(mut s) = owned.lock() {
            s.insert(buffer.clone());
        }
        result.buffer = Some(ShmBuffer {
            buffer,
            path: path.display().to_string(),
            size,
        });
        Vec::new()
    };
    let json = serde_json::to_value(result).map_err(|e| internal(e.into()))?;
    Ok((json, arrays, bytes))
}
