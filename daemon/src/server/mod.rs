//! `trellisd serve`: the resident daemon. A local socket (interprocess, tokio) takes framed
//! requests (`ipc-protocol`, docs/PROTOCOL.md); jobs go to one queue shared by every client and
//! run on one worker thread per device with resident models ([`queue`]); finished jobs land in
//! the asset store ([`assets`]); `fetch` hands arrays over inline or in shared-memory files
//! ([`buffers`]).

pub mod assets;
pub mod buffers;
mod conn;
pub mod paths;
pub mod queue;
pub mod requests;

use std::io::Write;
use std::sync::Arc;

use anyhow::{Context, Result};
use interprocess::local_socket::tokio::prelude::*;
use interprocess::local_socket::{GenericFilePath, ListenerOptions};

use crate::jobs::{ConditionerOverrides, ModelCache};
use crate::runtime::device::Fallback;
use assets::AssetStore;
use buffers::Buffers;
use queue::Queue;
use requests::Served;

/// What `trellisd serve` was started with.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub models: Vec<String>,
    pub conditioners: ConditionerOverrides,
    /// `auto`, `cpu`, `cuda[:N]` entries, one worker each.
    pub devices: Vec<String>,
    pub precision: crate::runtime::precision::PrecisionChoice,
    pub max_resident: usize,
    /// U²-Net weights (hub id or folder) for images without transparency; default
    /// [`crate::models::background::DEFAULT_MODEL`].
    pub background_model: Option<String>,
    /// `--vram-tier`, `--vram-budget`, `--vram-ballast` of every worker.
    pub memory: crate::runtime::residency::MemoryOptions,
}

/// Shared by every connection.
pub struct Ctx {
    pub queue: Arc<Queue>,
    pub store: Arc<AssetStore>,
    pub buffers: Arc<Buffers>,
    pub served: Vec<Served>,
    pub conditioners: ConditionerOverrides,
    /// `serve --background-model`.
    pub background_model: Option<String>,
    /// The devices the workers actually use (after any CPU fallback).
    pub devices: Vec<String>,
    /// `--vram-tier` as given (`None`: auto, chosen at each job's start).
    pub vram_tier: Option<crate::runtime::tiers::Tier>,
    pub address: String,
    pub shutdown: tokio::sync::Notify,
}

/// The served models with their kinds (configs only; weights load on first use).
fn served_models(models: &[String]) -> Vec<Served> {
    models
        .iter()
        .map(|m| {
            let is_text = match crate::jobs::models::open_repo_any(m) {
                Ok(r) => Some(r.config.class == crate::hub::PipelineClass::TextTo3D),
                Err(e) => {
                    eprintln!("note: model {m}: {e:#} (its kind is checked on first use)");
                    None
                }
            };
            Served {
                name: m.clone(),
                is_text,
            }
        })
        .collect()
}

/// Runs the daemon until SIGINT, SIGTERM or a `shutdown` request; returns the exit status.
pub fn serve(opts: ServeOptions) -> Result<i32> {
    anyhow::ensure!(
        !opts.devices.is_empty(),
        "--devices: give at least one device"
    );
    for d in &opts.devices {
        d.parse::<crate::runtime::device::DeviceRequest>()
            .with_context(|| format!("--devices {d}"))?;
    }
    let address = paths::socket_address();
    #[cfg(unix)]
    if let Some(parent) = address.parent().filter(|p| !p.as_os_str().is_empty()) {
        paths::private_dir(parent)?;
    }
    let _lock = match paths::DaemonLock::acquire(&address)? {
        Ok(l) => l,
        Err(pid) => {
            let who = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
            eprintln!(
                "error: a trellisd daemon is already serving {}{who}; stop it (trellisd client shutdown) or set TRELLIS_RS_SOCKET",
                address.display()
            );
            return Ok(1);
        }
    };
    for d in paths::sweep_dead_shm_dirs() {
        eprintln!(
            "removed the buffer folder of a stopped daemon: {}",
            d.display()
        );
    }
    let buffers = Arc::new(Buffers::create(paths::shm_dir())?);
    let result = serve_inner(opts, &address, buffers.clone());
    buffers.remove_dir();
    #[cfg(unix)]
    let _ = std::fs::remove_file(&address);
    result
}

fn serve_inner(
    opts: ServeOptions,
    address: &std::path::Path,
    buffers: Arc<Buffers>,
) -> Result<i32> {
    let store = Arc::new(AssetStore::open(paths::data_dir()?.join("assets"))?);
    let served = served_models(&opts.models);
    // Open every worker's device now, so that `hello` reports the ones actually used.
    crate::runtime::precision::set(opts.precision);
    let mut opened = Vec::new();
    for d in &opts.devices {
        let dev = crate::runtime::device::open_str(d, Fallback::CpuWithWarning)
            .with_context(|| format!("--devices {d}"))?;
        opened.push(dev);
    }
    let used: Vec<String> = opened
        .iter()
        .map(crate::runtime::device::device_name)
        .collect();
    let queue = Queue::new(store.clone(), opened.len());
    let mut workers = Vec::new();
    for (i, dev) in opened.into_iter().enumerate() {
        let q = queue.clone();
        let max = opts.max_resident;
        let precision = opts.precision;
        let cache = ModelCache::with_memory(dev, precision, max, opts.memory.clone())
            .with_context(|| format!("worker {i} on {}", used[i]))?;
        workers.push(
            std::thread::Builder::new()
                .name(format!("worker-{i}-{}", used[i]))
                .spawn(move || q.worker(i, cache))
                .context("starting a worker thread")?,
        );
    }
    let ctx = Arc::new(Ctx {
        queue: queue.clone(),
        store,
        buffers,
        served,
        conditioners: opts.conditioners.clone(),
        background_model: opts.background_model.clone(),
        devices: used,
        vram_tier: opts.memory.tier,
        address: address.display().to_string(),
        shutdown: tokio::sync::Notify::new(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let served_result = rt.block_on(accept_loop(ctx.clone(), address));
    // Stop: cancel queued and running jobs, let the workers finish their step.
    queue.stop();
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    for w in workers {
        let _ = w.join();
    }
    served_result?;
    eprintln!("trellisd stopped");
    Ok(0)
}

async fn accept_loop(ctx: Arc<Ctx>, address: &std::path::Path) -> Result<()> {
    #[cfg(unix)]
    if address.exists() {
        // We hold the lock: a socket file here is a dead daemon's.
        let _ = std::fs::remove_file(address);
    }
    let name = address
        .to_fs_name::<GenericFilePath>()
        .with_context(|| format!("socket address {}", address.display()))?;
    let listener = ListenerOptions::new()
        .name(name)
        .create_tokio()
        .with_context(|| format!("listening on {}", address.display()))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "READY {}", address.display())?;
        out.flush()?;
    }
    #[cfg(unix)]
    let (mut sigint, mut sigterm) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        )
    };
    loop {
        #[cfg(unix)]
        let stop = async {
            tokio::select! {
                _ = sigint.recv() => {},
                _ = sigterm.recv() => {},
                _ = ctx.shutdown.notified() => {},
            }
        };
        #[cfg(not(unix))]
        let stop = async {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = ctx.shutdown.notified() => {},
            }
        };
        tokio::select! {
            _ = stop => break,
            r = listener.accept() => match r {
                Ok(stream) => {
                    if !conn::peer_is_this_user(&stream) {
                        eprintln!("refused a connection from another user");
                        continue;
                    }
                    tokio::spawn(conn::serve_connection(stream, ctx.clone()));
                }
                Err(e) => eprintln!("accept: {e}"),
            },
        }
    }
    Ok(())
}
