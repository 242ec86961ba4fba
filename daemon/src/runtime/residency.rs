//! Where each network's weights are while a job runs: once in host memory (in the dtype the
//! network runs them in), and on the device for the stages that need them, as the memory tier
//! says (`runtime::tiers`). No TRELLIS twin: the original keeps every network on the GPU.
//!
//! * [`Network`]: one network, built from its host copy ([`HostWeights`]) whenever it is placed
//!   on the device. Placing never reads a file again; on the CPU the built network shares the
//!   host tensors (no copy).
//! * [`Residency`]: one per device (the daemon keeps it in its `ModelCache`, `bench pipeline`
//!   makes its own). [`Residency::stage`] runs one stage of a job: it places the stage's networks,
//!   runs it and, unless the tier keeps everything resident, frees them afterwards. A CUDA
//!   out-of-memory error inside the stage (or a placement beyond the memory budget, see below)
//!   frees what the stage holds, drops one tier, logs one line and runs the stage again.
//! * The memory budget ([`MemoryOptions::budget`], `--vram-budget` / `TRELLIS_VRAM_BUDGET`):
//!   placing a network whose weights would bring the networks on the device above it fails with
//!   [`OutOfDeviceMemory`], which the stage runner treats as a CUDA out-of-memory error. It makes
//!   the fallback testable on the CPU and lets a large GPU act as a small one; `--vram-ballast`
//!   holds device memory to shrink what is really free.
//!
//! What each tier does here: `high` (and `cpu`) keep every network placed once used; `medium`
//! places each stage's networks and frees them after the stage; `low` and `minimal` also run the
//! decoders one at a time ([`Tier::decoders_one_at_a_time`]); at `minimal` a network made with
//! [`Network::with_streamed_blocks`] (the two flows) is built without its transformer blocks,
//! which `runtime::block_stream` copies in per forward, and counts only what stays on the device
//! against the budget ([`Placeable::placed_bytes`]).
//!
//! Uploads ahead of time ([`Residency::prefetch_next`], `runtime::prefetch`): a caller names the
//! networks of the stage after the next one; when the next stage has placed its own networks it
//! starts copying those on the device's copy stream, so they arrive while it computes (tiers
//! `high`, `medium` and `low`, within the budget; an out-of-memory error there is no error, the
//! network is then uploaded when placed). The stage records say how much of each copy was hidden.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;

use super::block_stream::{BlockStream, StreamTotals};
use super::prefetch::{CopyStream, CopyTime, Prefetch};
use super::tiers::Tier;
use super::vram;
use super::weights::HostWeights;

/// A placement the memory budget refuses; treated like `CUDA_ERROR_OUT_OF_MEMORY`.
#[derive(Debug, thiserror::Error)]
#[error(
    "out of device memory (budget): placing {network} ({}) beside {} already placed exceeds the {} budget",
    size(*.bytes),
    size(*.placed),
    size(*.budget)
)]
pub struct OutOfDeviceMemory {
    pub network: String,
    pub bytes: u64,
    pub placed: u64,
    pub budget: u64,
}

/// Bytes as GiB, MiB or KiB text.
pub fn size(b: u64) -> String {
    const K: f64 = 1024.0;
    let f = b as f64;
    if f >= K * K * K {
        format!("{:.2} GiB", f / (K * K * K))
    } else if f >= K * K {
        format!("{:.1} MiB", f / (K * K))
    } else {
        format!("{:.1} KiB", f / K)
    }
}

/// Whether `e` is a device out-of-memory error: the budget's [`OutOfDeviceMemory`], or a CUDA
/// driver error `CUDA_ERROR_OUT_OF_MEMORY` anywhere in the chain (candle reports cudarc's
/// errors as text).
pub fn is_oom(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        if c.downcast_ref::<OutOfDeviceMemory>().is_some() {
            return true;
        }
        let text = format!("{c} {c:?}");
        text.contains("CUDA_ERROR_OUT_OF_MEMORY") || text.contains("cudaErrorMemoryAllocation")
    })
}

/// `--vram-tier`, `--vram-budget`, `--vram-ballast`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryOptions {
    /// The tier every job starts at; `None`: chosen from free device memory at each job's start.
    pub tier: Option<Tier>,
    /// Most bytes of weights placed on the device at once.
    pub budget: Option<u64>,
    /// Bytes of device memory held for the process's life (shrinks what is free; GPU only).
    pub ballast: Option<u64>,
}

impl MemoryOptions {
    /// From the command line's strings (`None`: not given), falling back to `TRELLIS_VRAM_TIER`,
    /// `TRELLIS_VRAM_BUDGET` and `TRELLIS_VRAM_BALLAST`.
    pub fn parse(tier: Option<&str>, budget: Option<&str>, ballast: Option<&str>) -> Result<Self> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let tier = tier.map(String::from).or_else(|| env("TRELLIS_VRAM_TIER"));
        let budget = budget
            .map(String::from)
            .or_else(|| env("TRELLIS_VRAM_BUDGET"));
        let ballast = ballast
            .map(String::from)
            .or_else(|| env("TRELLIS_VRAM_BALLAST"));
        Ok(Self {
            tier: match tier.as_deref().map(str::trim) {
                None | Some("auto") => None,
                Some(t) => {
                    Some(t.parse::<Tier>().with_context(|| {
                        "--vram-tier: expected auto, high, medium, low or minimal"
                    })?)
                }
            },
            budget: budget
                .map(|b| parse_bytes(&b).context("--vram-budget"))
                .transpose()?,
            ballast: ballast
                .map(|b| parse_bytes(&b).context("--vram-ballast"))
                .transpose()?,
        })
    }

    /// From the environment only.
    pub fn from_env() -> Result<Self> {
        Self::parse(None, None, None)
    }
}

/// `123`, `64KiB`, `512MiB`, `6GiB`, `1.5G` (binary units; `K`/`M`/`G` mean the same).
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow!("{s:?} is not a size (e.g. 6GiB, 512MiB, 1048576)"))?;
    let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => bail!("{s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB)"),
    };
    if !n.is_finite() || n < 0.0 {
        bail!("{s:?} is not a size");
    }
    Ok((n * mul as f64).round() as u64)
}

/// The placed copy of one network, shared with the [`Residency`] that may evict it, and its
/// weights on their way to the device when a prefetch was started.
struct Slot {
    name: String,
    bytes: u64,
    /// Bytes on the device while placed: `bytes`, or less when its blocks stream
    /// (`runtime::block_stream`).
    on_device: AtomicU64,
    /// The block stream of the placed copy, when its blocks stream.
    stream: Mutex<Option<BlockStream>>,
    model: Mutex<Option<Arc<dyn Any + Send + Sync>>>,
    prefetch: Mutex<Option<Prefetch>>,
}

impl Slot {
    fn is_placed(&self) -> bool {
        self.model
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
    fn clear(&self) {
        self.model.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.stream.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
    fn placed_bytes(&self) -> u64 {
        self.on_device.load(Ordering::Relaxed)
    }
    fn prefetch(&self) -> std::sync::MutexGuard<'_, Option<Prefetch>> {
        self.prefetch.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn is_prefetched(&self) -> bool {
        self.prefetch().is_some()
    }
    /// Drops a prefetch not used (it waits for its copy first).
    fn drop_prefetch(&self) {
        let p = self.prefetch().take();
        drop(p);
    }
}

/// A network a later stage needs, as [`Residency::prefetch_next`] keeps it.
#[derive(Clone)]
pub struct Upcoming {
    host: HostWeights,
    slot: Arc<Slot>,
}

type Builder<M> = Box<dyn Fn(VarBuilder<'static>, Option<&BlockStream>) -> Result<M> + Send + Sync>;

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// One network: its weights in host memory, and its placed copy while a stage holds it.
pub struct Network<M> {
    host: HostWeights,
    build: Builder<M>,
    /// The prefix of the blocks it streams at tiers that do (`blocks`), if it can.
    streams: Option<String>,
    slot: Arc<Slot>,
}

impl<M: Send + Sync + 'static> Network<M> {
    /// A network named `name` (for messages) built by `build` from `host`'s tensors.
    pub fn new(
        name: &str,
        host: HostWeights,
        build: impl Fn(VarBuilder<'static>) -> Result<M> + Send + Sync + 'static,
    ) -> Self {
        Self::make(name, host, None, Box::new(move |vb, _| build(vb)))
    }

    /// A network whose transformer blocks (`{prefix}.{i}.…`) stream from host memory at the
    /// tiers that say so ([`Tier::streams_blocks`]): `build` gets a [`BlockStream`] then, and
    /// builds its blocks with [`crate::runtime::block_stream::Blocks`].
    pub fn with_streamed_blocks(
        name: &str,
        host: HostWeights,
        prefix: &str,
        build: impl Fn(VarBuilder<'static>, Option<&BlockStream>) -> Result<M> + Send + Sync + 'static,
    ) -> Self {
        Self::make(name, host, Some(prefix.to_string()), Box::new(build))
    }

    fn make(name: &str, host: HostWeights, streams: Option<String>, build: Builder<M>) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Self {
            slot: Arc::new(Slot {
                name: format!("{name}#{id}"),
                bytes: host.bytes(),
                on_device: AtomicU64::new(host.bytes()),
                stream: Mutex::new(None),
                model: Mutex::new(None),
                prefetch: Mutex::new(None),
            }),
            host,
            build,
            streams,
        }
    }

    /// The placed network, if it is placed.
    pub fn placed(&self) -> Option<Arc<M>> {
        let m = self
            .slot
            .model
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        m.downcast::<M>().ok()
    }

    /// The placed network; an error when no stage placed it (a bug in the caller).
    pub fn get(&self) -> Result<Arc<M>> {
        self.placed()
            .ok_or_else(|| anyhow!("{} is not on the device (no stage placed it)", self.name()))
    }

    /// Places this network alone, outside any stage (kept until released): for callers that
    /// manage no stages (parity, tools). Checks the budget like a stage does.
    pub fn place_on(&self, res: &Residency) -> Result<Arc<M>> {
        self.place(res)?;
        self.get()
    }

    /// The host copy.
    pub fn host(&self) -> &HostWeights {
        &self.host
    }
}

/// What [`Residency::stage`] needs of a network, whatever its type.
pub trait Placeable: Sync {
    /// The network's name (with an instance number).
    fn name(&self) -> &str;
    /// Bytes of its weights.
    fn bytes(&self) -> u64;
    /// Bytes of its weights on the device while placed (less than [`Placeable::bytes`] when its
    /// blocks stream).
    fn placed_bytes(&self) -> u64;
    fn is_placed(&self) -> bool;
    /// Builds the network on `res`'s device from its host copy (or from the copy a prefetch made)
    /// unless it is there: how long the upload took and how much of it was hidden; `None` when
    /// it was already placed.
    fn place(&self, res: &Residency) -> Result<Option<CopyTime>>;
    /// Drops the placed copy (its device memory is freed once no stage holds it).
    fn release(&self);
    /// What [`Residency::prefetch_next`] keeps of it.
    fn upcoming(&self) -> Upcoming;
    /// What its streamed blocks moved since the last call (`None` unless placed streaming).
    fn take_streamed(&self) -> Option<StreamTotals>;
}

impl<M: Send + Sync + 'static> Placeable for Network<M> {
    fn name(&self) -> &str {
        &self.slot.name
    }
    fn bytes(&self) -> u64 {
        self.slot.bytes
    }
    fn placed_bytes(&self) -> u64 {
        self.slot.placed_bytes()
    }
    fn is_placed(&self) -> bool {
        self.slot.is_placed()
    }
    fn place(&self, res: &Residency) -> Result<Option<CopyTime>> {
        if self.is_placed() {
            res.register(&self.slot);
            return Ok(None);
        }
        if self.host.is_released() {
            bail!(
                "{} cannot be placed again: its host copy was released after it was placed on the CPU for good",
                self.name()
            );
        }
        let dev = &res.device;
        let prefetched = self.slot.prefetch().take();
        // A prefetched network was copied whole: it runs so.
        let streamed = match &self.streams {
            Some(p) if prefetched.is_none() && res.streams_blocks() => Some(p),
            _ => None,
        };
        let on_device = streamed.map_or(self.bytes(), |p| BlockStream::device_bytes(&self.host, p));
        if prefetched.is_none() {
            res.check_budget(self.name(), on_device)?;
        }
        dev.synchronize()?;
        let t = Instant::now();
        let (vb, check, copied) = match prefetched {
            // Its memory was checked against the budget when the prefetch started.
            Some(p) => {
                let (tensors, time) = p.finish()?;
                let (vb, check) = self.host.var_builder_from(tensors, dev);
                (vb, check, Some(time))
            }
            None => {
                let (vb, check) = self.host.var_builder(dev);
                (vb, check, None)
            }
        };
        let stream = streamed.map(|p| {
            check.used_elsewhere(&format!("{p}."));
            BlockStream::new(&self.host, p, dev, res.copy_stream())
        });
        let m = (self.build)(vb, stream.as_ref())
            .with_context(|| format!("placing {}", self.name()))?;
        check
            .finish()
            .with_context(|| format!("placing {}", self.name()))?;
        dev.synchronize()?;
        // Everything the stage waited for: the copies (or what was left of a prefetch's) and
        // the build.
        let waited_s = t.elapsed().as_secs_f64();
        self.slot.on_device.store(on_device, Ordering::Relaxed);
        *self.slot.stream.lock().unwrap_or_else(|e| e.into_inner()) = stream;
        *self.slot.model.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(m));
        res.register(&self.slot);
        if res.places_for_good() && dev.is_cpu() {
            // Nothing evicts it, and its packed float32 layers hold their own weights: the host
            // tensors they were packed from would only double the memory.
            self.host.release();
        }
        Ok(Some(CopyTime {
            copy_s: copied.map_or(waited_s, |c| c.copy_s),
            waited_s,
        }))
    }
    fn release(&self) {
        self.slot.clear();
    }
    fn upcoming(&self) -> Upcoming {
        Upcoming {
            host: self.host.clone(),
            slot: self.slot.clone(),
        }
    }
    fn take_streamed(&self) -> Option<StreamTotals> {
        let s = self.slot.stream.lock().unwrap_or_else(|e| e.into_inner());
        s.as_ref().map(BlockStream::take_totals)
    }
}

/// What one stage did (for `bench pipeline` and the job log).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StageRecord {
    pub stage: String,
    /// The tier the stage completed at.
    pub tier: String,
    /// Networks uploaded for it, their bytes, and the seconds the uploads took.
    pub uploads: usize,
    pub upload_bytes: u64,
    pub upload_s: f64,
    /// Upload seconds overlapped with compute (copies a prefetch made during an earlier stage).
    pub upload_hidden_s: f64,
    /// Wall seconds of the stage's own work (after its uploads).
    pub compute_s: f64,
    /// Out-of-memory fallbacks taken in this stage.
    pub fallbacks: usize,
    /// What the stage's networks streamed (their blocks, at `minimal`), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub streamed: Option<StreamTotals>,
    /// The memory pool's high-water marks over the stage (its uploads included, the ballast
    /// not); GPU only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vram: Option<vram::PoolStats>,
}

struct State {
    tier: Tier,
    /// Fallbacks of a stage given up by [`Residency::stage_or_drop`], counted in the next record.
    pending_fallbacks: usize,
    slots: Vec<Weak<Slot>>,
    log: Vec<StageRecord>,
    /// Networks [`Residency::prefetch_next`] named, for the next stage to start copying.
    next: Vec<Upcoming>,
}

/// The networks placed on one device and the tier they follow.
pub struct Residency {
    device: Device,
    options: MemoryOptions,
    state: Mutex<State>,
    /// `--vram-ballast`, held for the residency's life.
    _ballast: Option<Tensor>,
    /// The copy stream prefetches run on, made at the first one (`None` inside: the CPU, or it
    /// could not be made).
    copies: std::sync::OnceLock<Option<CopyStream>>,
}

impl Residency {
    /// A residency on `device` with `options` (the ballast, if any, is allocated now).
    pub fn new(device: &Device, options: MemoryOptions) -> Result<Self> {
        let ballast = match options.ballast {
            Some(b) if b > 0 && device.is_cuda() => Some(
                Tensor::zeros(b as usize, candle_core::DType::U8, device)
                    .with_context(|| format!("allocating a {} ballast", vram::gib(b)))?,
            ),
            _ => None,
        };
        let mut r = Self::unballasted(device, options);
        r._ballast = ballast;
        Ok(r)
    }

    /// No budget, no ballast, the tier chosen per job from free memory (`cpu` on the CPU).
    pub fn auto(device: &Device) -> Self {
        Self::unballasted(device, MemoryOptions::default())
    }

    /// Everything stays placed once used, no budget: for callers that run networks directly
    /// (parity, tools).
    pub fn keep_all(device: &Device) -> Self {
        let tier = if device.is_cuda() {
            Tier::High
        } else {
            Tier::Cpu
        };
        Self::unballasted(
            device,
            MemoryOptions {
                tier: Some(tier),
                ..MemoryOptions::default()
            },
        )
    }

    fn unballasted(device: &Device, options: MemoryOptions) -> Self {
        let tier = options.tier.unwrap_or(if device.is_cuda() {
            Tier::High
        } else {
            Tier::Cpu
        });
        Self {
            device: device.clone(),
            options,
            state: Mutex::new(State {
                tier,
                pending_fallbacks: 0,
                slots: Vec::new(),
                log: Vec::new(),
                next: Vec::new(),
            }),
            _ballast: None,
            copies: std::sync::OnceLock::new(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether a network placed now stays placed for the residency's life: tier `cpu` without a
    /// budget (no out-of-memory fallback can evict it).
    fn places_for_good(&self) -> bool {
        self.tier() == Tier::Cpu && self.options.budget.is_none()
    }

    /// Bytes of the `--vram-ballast` held.
    pub fn ballast_bytes(&self) -> u64 {
        self._ballast
            .as_ref()
            .map_or(0, |t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
    }

    /// The memory pool's counters without the ballast (`None` on the CPU).
    pub fn pool_stats(&self) -> Option<vram::PoolStats> {
        let b = self.ballast_bytes();
        vram::pool_stats(&self.device).map(|p| vram::PoolStats {
            used: p.used.saturating_sub(b),
            used_high: p.used_high.saturating_sub(b),
            reserved: p.reserved.saturating_sub(b),
            reserved_high: p.reserved_high.saturating_sub(b),
        })
    }

    pub fn options(&self) -> &MemoryOptions {
        &self.options
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The tier stages run at now.
    pub fn tier(&self) -> Tier {
        self.lock().tier
    }

    /// Whether networks that can stream their blocks do when placed now
    /// ([`Tier::streams_blocks`], unless `TRELLIS_STREAM_BLOCKS=0`).
    pub fn streams_blocks(&self) -> bool {
        self.tier().streams_blocks() && super::block_stream::enabled()
    }

    /// Starts a job: the tier is `--vram-tier`'s, else chosen from the device's free memory
    /// (plus what this process's networks and its pool's freed memory hold, capped by the
    /// budget); the stage log restarts.
    /// Returns the tier with the reason.
    pub fn begin_job(&self) -> (Tier, String) {
        let (tier, reason) = match self.options.tier {
            Some(t) => (t, format!("--vram-tier {t}")),
            None => match vram::mem_info(&self.device) {
                None => (Tier::Cpu, "CPU device".to_string()),
                Some((free, _)) => {
                    // Our own networks and the freed memory our pool keeps count as available.
                    let slack = vram::pool_stats(&self.device)
                        .map_or(0, |p| p.reserved.saturating_sub(p.used));
                    let mut avail = free + self.held_bytes() + slack;
                    if let Some(b) = self.options.budget {
                        avail = avail.min(b);
                    }
                    let plan = super::tiers::choose(super::tiers::Target::Cuda {
                        free_memory: avail,
                        compute_capability: Some((7, 0)),
                    });
                    (
                        plan.tier,
                        format!("{} available for this job", vram::gib(avail)),
                    )
                }
            },
        };
        let mut st = self.lock();
        st.tier = tier;
        st.log.clear();
        st.pending_fallbacks = 0;
        st.next.clear();
        drop(st);
        if !tier.keeps_resident() {
            self.evict_all();
        }
        (tier, reason)
    }

    /// The stages run since the job began.
    pub fn stage_log(&self) -> Vec<StageRecord> {
        self.lock().log.clone()
    }

    /// Bytes of the networks placed now.
    pub fn placed_bytes(&self) -> u64 {
        let st = self.lock();
        st.slots
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|s| s.is_placed())
            .map(|s| s.placed_bytes())
            .sum()
    }

    /// Bytes of the networks placed now and of those being prefetched.
    pub fn held_bytes(&self) -> u64 {
        let st = self.lock();
        st.slots
            .iter()
            .filter_map(Weak::upgrade)
            .map(|s| {
                let placed = if s.is_placed() { s.placed_bytes() } else { 0 };
                let coming = if s.is_prefetched() { s.bytes } else { 0 };
                placed + coming
            })
            .sum()
    }

    /// Names of the networks with a prefetch started and not yet used.
    pub fn prefetched(&self) -> Vec<String> {
        let st = self.lock();
        st.slots
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|s| s.is_prefetched())
            .map(|s| s.name.clone())
            .collect()
    }

    /// Drops every placed network of this device, and every prefetch.
    pub fn evict_all(&self) {
        let slots: Vec<Arc<Slot>> = {
            let mut st = self.lock();
            let live = st.slots.iter().filter_map(Weak::upgrade).collect();
            st.slots.clear();
            live
        };
        for s in slots {
            s.clear();
            s.drop_prefetch();
        }
    }

    fn drop_prefetches(&self) {
        let slots: Vec<Arc<Slot>> = self.lock().slots.iter().filter_map(Weak::upgrade).collect();
        for s in slots {
            s.drop_prefetch();
        }
    }

    /// Names the networks the stage after the next one needs: once the next stage has placed its
    /// own networks it starts copying these on the copy stream (at tiers `high`, `medium` and
    /// `low`, when the budget has room), so they are on the device when their stage begins.
    /// Replaces an earlier call's list; a job's start clears it.
    pub fn prefetch_next(&self, nets: &[&dyn Placeable]) {
        self.lock().next = nets.iter().map(|n| n.upcoming()).collect();
    }

    /// Starts `u`'s prefetch unless it is placed, prefetched, or over the budget. A failure
    /// (out of memory included) leaves it to be uploaded when placed.
    fn start_prefetch(&self, u: &Upcoming) {
        if u.slot.is_placed() || u.slot.is_prefetched() {
            return;
        }
        if let Some(budget) = self.options.budget {
            if self.held_bytes() + u.slot.bytes > budget {
                return;
            }
        }
        let copies = self.copy_stream();
        if self.device.is_cuda() && copies.is_none() {
            return;
        }
        match Prefetch::start(&u.host, &self.device, copies.as_ref()) {
            Ok(Some(p)) => {
                *u.slot.prefetch() = Some(p);
                self.register(&u.slot);
            }
            Ok(None) => {}
            Err(e) if is_oom(&e) => {}
            Err(e) => eprintln!(
                "warning: prefetching {} failed, it uploads when placed: {}",
                u.slot.name,
                first_line(&e)
            ),
        }
    }

    /// The device's copy stream, made at the first use (`None` on the CPU, or when it could not
    /// be made: then weights upload on candle's stream).
    fn copy_stream(&self) -> Option<CopyStream> {
        self.copies
            .get_or_init(|| match CopyStream::new(&self.device) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("warning: no copy stream, weights upload when placed: {e:#}");
                    None
                }
            })
            .clone()
    }

    fn evict_except(&self, keep: &[&dyn Placeable]) {
        let slots: Vec<Arc<Slot>> = self.lock().slots.iter().filter_map(Weak::upgrade).collect();
        for s in slots {
            if !keep.iter().any(|k| k.name() == s.name) {
                s.clear();
            }
        }
    }

    fn register(&self, slot: &Arc<Slot>) {
        let mut st = self.lock();
        st.slots.retain(|w| w.strong_count() > 0);
        if !st
            .slots
            .iter()
            .any(|w| w.upgrade().is_some_and(|s| Arc::ptr_eq(&s, slot)))
        {
            st.slots.push(Arc::downgrade(slot));
        }
    }

    fn check_budget(&self, network: &str, bytes: u64) -> Result<()> {
        let Some(budget) = self.options.budget else {
            return Ok(());
        };
        let placed = self.held_bytes();
        if placed + bytes > budget {
            return Err(OutOfDeviceMemory {
                network: network.split('#').next().unwrap_or(network).to_string(),
                bytes,
                placed,
                budget,
            }
            .into());
        }
        Ok(())
    }

    /// Runs stage `name` with `nets` placed on the device, then (below `high`) frees them. An
    /// out-of-memory error frees the stage's networks (and, leaving a resident tier, every other
    /// one), drops one tier, prints one line and runs the stage again; at `minimal` it is
    /// returned. `f` must give the same result when run again.
    pub fn stage<T>(
        &self,
        name: &str,
        nets: &[&dyn Placeable],
        f: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        self.run_stage(name, nets, f, true)
    }

    /// As [`Residency::stage`], but an out-of-memory error is returned after the tier dropped
    /// (the stage's networks freed) instead of running the stage again: for a caller that splits
    /// the work differently at the lower tier (the decoders: together at `medium`, one at a time
    /// below).
    pub fn stage_or_drop<T>(
        &self,
        name: &str,
        nets: &[&dyn Placeable],
        f: impl FnMut() -> Result<T>,
    ) -> Result<T> {
        self.run_stage(name, nets, f, false)
    }

    fn run_stage<T>(
        &self,
        name: &str,
        nets: &[&dyn Placeable],
        mut f: impl FnMut() -> Result<T>,
        retry: bool,
    ) -> Result<T> {
        let mut fallbacks = std::mem::take(&mut self.lock().pending_fallbacks);
        let next = std::mem::take(&mut self.lock().next);
        loop {
            let tier = self.tier();
            let mut uploads = 0;
            let mut upload_bytes = 0;
            let mut upload_s = 0.0;
            let mut upload_hidden_s = 0.0;
            let mut compute_s = 0.0;
            let _ = self.device.synchronize();
            vram::reset_peaks(&self.device);
            let attempt = (|| -> Result<T> {
                if !tier.keeps_resident() {
                    self.evict_except(nets);
                }
                for n in nets {
                    if let Some(c) = n.place(self)? {
                        uploads += 1;
                        upload_bytes += n.placed_bytes();
                        upload_s += c.copy_s;
                        upload_hidden_s += c.hidden_s();
                    }
                }
                if tier.prefetches() && super::prefetch::enabled() {
                    for u in &next {
                        self.start_prefetch(u);
                    }
                }
                let t = Instant::now();
                let v = f()?;
                self.device.synchronize()?;
                compute_s = t.elapsed().as_secs_f64();
                Ok(v)
            })();
            match attempt {
                Ok(v) => {
                    let streamed =
                        nets.iter()
                            .filter_map(|n| n.take_streamed())
                            .reduce(|mut a, b| {
                                a += b;
                                a
                            });
                    if !tier.keeps_resident() {
                        for n in nets {
                            n.release();
                        }
                    }
                    self.lock().log.push(StageRecord {
                        stage: name.to_string(),
                        tier: tier.name().to_string(),
                        uploads,
                        upload_bytes,
                        upload_s,
                        upload_hidden_s,
                        compute_s,
                        fallbacks,
                        streamed,
                        vram: self.pool_stats(),
                    });
                    return Ok(v);
                }
                Err(e) if is_oom(&e) => {
                    for n in nets {
                        n.release();
                    }
                    self.drop_prefetches();
                    let Some(lower) = tier.lower() else {
                        return Err(e.context(format!(
                            "stage {name}: out of device memory at the lowest tier ({tier})"
                        )));
                    };
                    if tier.keeps_resident() {
                        self.evict_all();
                    }
                    self.lock().tier = lower;
                    fallbacks += 1;
                    eprintln!(
                        "warning: {name}: out of device memory at tier {tier} ({}); {} at tier {lower}",
                        first_line(&e),
                        if retry { "retrying" } else { "going on" }
                    );
                    if !retry {
                        self.lock().pending_fallbacks = fallbacks;
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn first_line(e: &anyhow::Error) -> String {
    let s = format!("{e:#}");
    let s = s.lines().next().unwrap_or_default();
    if s.chars().count() > 160 {
        format!("{}…", s.chars().take(160).collect::<String>())
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A "network" of `n` float32 values whose forward sums them.
    struct Sum(Tensor);

    fn net(name: &str, n: usize) -> Network<Sum> {
        let mut t = HashMap::new();
        t.insert(
            "w".to_string(),
            Tensor::ones(n, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        Network::new(name, HostWeights::new(t, name), move |vb| {
            Ok(Sum(vb.get(n, "w")?))
        })
    }

    fn residency(tier: Option<Tier>, budget: Option<u64>) -> Residency {
        Residency::new(
            &Device::Cpu,
            MemoryOptions {
                tier,
                budget,
                ballast: None,
            },
        )
        .unwrap()
    }

    fn total(n: &Network<Sum>) -> Result<f32> {
        Ok(n.get()?.0.sum_all()?.to_scalar::<f32>()?)
    }

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_bytes("123").unwrap(), 123);
        assert_eq!(parse_bytes("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_bytes(" 6GiB ").unwrap(), 6 << 30);
        assert_eq!(parse_bytes("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("512mb").unwrap(), 512 << 20);
        assert!(parse_bytes("six").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
        let o = MemoryOptions::parse(Some("low"), Some("1MiB"), None).unwrap();
        assert_eq!((o.tier, o.budget), (Some(Tier::Low), Some(1 << 20)));
        assert_eq!(
            MemoryOptions::parse(Some("auto"), None, None).unwrap().tier,
            None
        );
        assert!(MemoryOptions::parse(Some("huge"), None, None).is_err());
    }

    #[test]
    fn cuda_out_of_memory_text_is_recognised_anywhere_in_the_chain() {
        let e = anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")")
            .context("SLat flow");
        assert!(is_oom(&e));
        assert!(!is_oom(&anyhow!("shape mismatch")));
        let b: anyhow::Error = OutOfDeviceMemory {
            network: "x".into(),
            bytes: 2,
            placed: 1,
            budget: 2,
        }
        .into();
        assert!(is_oom(&b.context("placing")));
    }

    #[test]
    fn high_keeps_networks_and_medium_frees_them_after_the_stage() {
        let (a, b) = (net("a", 10), net("b", 20));
        let high = residency(Some(Tier::High), None);
        assert_eq!(high.stage("a", &[&a], || total(&a)).unwrap(), 10.0);
        assert_eq!(high.stage("b", &[&b], || total(&b)).unwrap(), 20.0);
        assert_eq!(high.placed_bytes(), 120);
        // Already placed: no upload the second time.
        high.stage("a", &[&a], || total(&a)).unwrap();
        let log = high.stage_log();
        assert_eq!(
            log.iter().map(|r| r.uploads).collect::<Vec<_>>(),
            vec![1, 1, 0]
        );
        assert_eq!(log[0].upload_bytes, 40);

        let medium = residency(Some(Tier::Medium), None);
        medium.stage("a", &[&a], || total(&a)).unwrap();
        assert!(!a.is_placed() && medium.placed_bytes() == 0);
        // A network placed by a resident tier is evicted when a medium stage starts.
        high.stage("b", &[&b], || total(&b)).unwrap();
        assert!(b.is_placed());
        medium.begin_job();
        medium.stage("a", &[&a], || total(&a)).unwrap();
        assert_eq!(
            a.get().err().map(|e| e.to_string().contains("not on")),
            Some(true)
        );
    }

    #[test]
    fn a_stage_starts_the_prefetches_named_for_the_stage_after_it() {
        let (a, b, c) = (net("a", 10), net("b", 20), net("c", 5));
        let res = residency(Some(Tier::Medium), None);
        res.begin_job();
        res.prefetch_next(&[&b]);
        assert_eq!(res.stage("a", &[&a], || total(&a)).unwrap(), 10.0);
        // a is freed after its stage (medium); b's copy was started during it.
        assert!(!a.is_placed() && !b.is_placed());
        assert_eq!(res.prefetched().len(), 1);
        assert_eq!(res.held_bytes(), 80);
        // A stage for another network leaves the prefetch alone.
        res.stage("c", &[&c], || total(&c)).unwrap();
        assert_eq!(res.prefetched().len(), 1);
        // b's stage places it from the prefetch (one upload, its bytes).
        assert_eq!(res.stage("b", &[&b], || total(&b)).unwrap(), 20.0);
        assert!(res.prefetched().is_empty());
        let log = res.stage_log();
        assert_eq!(
            log.iter()
                .map(|r| (r.stage.as_str(), r.uploads, r.upload_bytes))
                .collect::<Vec<_>>(),
            vec![("a", 1, 40), ("c", 1, 20), ("b", 1, 80)]
        );
        // The list is used once: a later stage starts nothing.
        res.stage("a", &[&a], || total(&a)).unwrap();
        assert!(res.prefetched().is_empty());
        // A new job drops an unused prefetch.
        res.prefetch_next(&[&c]);
        res.stage("a", &[&a], || total(&a)).unwrap();
        assert_eq!(res.prefetched().len(), 1);
        res.begin_job();
        assert!(res.prefetched().is_empty() && res.held_bytes() == 0);
    }

    #[test]
    fn prefetches_stay_inside_the_budget_and_out_of_minimal() {
        let (a, b) = (net("a", 10), net("b", 10));
        // 60 bytes: a (40) is placed while its stage runs, b (40) does not fit beside it.
        let res = residency(Some(Tier::Medium), Some(60));
        res.begin_job();
        res.prefetch_next(&[&b]);
        res.stage("a", &[&a], || total(&a)).unwrap();
        assert!(res.prefetched().is_empty());
        // b is uploaded when its stage places it, as without a prefetch.
        assert_eq!(res.stage("b", &[&b], || total(&b)).unwrap(), 10.0);
        assert_eq!(res.tier(), Tier::Medium);

        let min = residency(Some(Tier::Minimal), None);
        min.begin_job();
        min.prefetch_next(&[&b]);
        min.stage("a", &[&a], || total(&a)).unwrap();
        assert!(min.prefetched().is_empty());

        // At high the prefetched network stays placed after its stage like any other.
        let high = residency(Some(Tier::High), None);
        high.begin_job();
        high.prefetch_next(&[&b]);
        high.stage("a", &[&a], || total(&a)).unwrap();
        assert_eq!(high.prefetched().len(), 1);
        high.stage("b", &[&b], || total(&b)).unwrap();
        assert!(a.is_placed() && b.is_placed() && high.prefetched().is_empty());
        assert_eq!(high.held_bytes(), 80);
    }

    #[test]
    fn out_of_memory_drops_one_tier_per_failure_and_the_stage_completes() {
        let (a, b, c) = (net("a", 10), net("b", 10), net("c", 10));
        // 80 bytes: two networks fit, three do not.
        let res = residency(Some(Tier::High), Some(80));
        res.begin_job();
        res.stage("a", &[&a], || total(&a)).unwrap();
        res.stage("b", &[&b], || total(&b)).unwrap();
        assert_eq!(res.tier(), Tier::High);
        // A third at high exceeds the budget: everything is freed, medium runs it alone.
        assert_eq!(res.stage("c", &[&c], || total(&c)).unwrap(), 10.0);
        assert_eq!(res.tier(), Tier::Medium);
        assert_eq!(res.placed_bytes(), 0);
        // Three in one stage do not fit at medium either: low (the stage itself cannot shrink
        // here, so it ends at minimal with an error).
        let e = res
            .stage("abc", &[&a, &b, &c], || {
                Ok(total(&a)? + total(&b)? + total(&c)?)
            })
            .unwrap_err();
        assert!(
            is_oom(&e) && format!("{e:#}").contains("lowest tier"),
            "{e:#}"
        );
        assert_eq!(res.tier(), Tier::Minimal);
        let log = res.stage_log();
        assert_eq!(
            log.last().map(|r| (r.stage.as_str(), r.fallbacks)),
            Some(("c", 1))
        );
        // The next job starts at the asked tier again.
        assert_eq!(res.begin_job().0, Tier::High);
    }

    /// A network of `n` blocks of 4 float32 values under `blocks.` whose forward sums them all.
    fn streaming_net(n: usize) -> Network<f32> {
        let mut t = HashMap::new();
        for i in 0..n {
            let w = Tensor::full(i as f32, 4, &Device::Cpu).unwrap();
            t.insert(format!("blocks.{i}.w"), w);
        }
        Network::with_streamed_blocks("s", HostWeights::new(t, "s"), "blocks", move |vb, s| {
            let blocks = crate::runtime::block_stream::Blocks::new(n, vb.pp("blocks"), s, |vb| {
                Ok(vb.get(4, "w")?)
            })?;
            let mut sum = 0.0;
            blocks.for_each(|_, w| {
                sum += w.sum_all()?.to_scalar::<f32>()?;
                Ok(())
            })?;
            Ok(sum)
        })
    }

    #[test]
    fn at_minimal_a_network_streams_its_blocks_and_counts_only_what_stays_placed() {
        let n = streaming_net(6);
        // 6 blocks of 16 bytes; streamed, three of them are on the device at once.
        assert_eq!(n.bytes(), 96);
        let res = residency(Some(Tier::Low), Some(60));
        res.begin_job();
        // Low places it whole: over the budget, so the stage falls to minimal, which streams.
        let sum = res.stage("s", &[&n], || Ok(*n.get()?)).unwrap();
        assert_eq!(sum, 4.0 * (0..6).sum::<i32>() as f32);
        assert_eq!(res.tier(), Tier::Minimal);
        let log = res.stage_log();
        let last = log.last().unwrap();
        assert_eq!((last.tier.as_str(), last.fallbacks), ("minimal", 1));
        assert_eq!(last.upload_bytes, 48);
        // Every block was copied in once, 16 bytes each.
        assert_eq!(last.streamed.map(|t| (t.blocks, t.bytes)), Some((6, 96)));
        // While placed it counts 48 bytes against the budget, not 96.
        let min = residency(Some(Tier::Minimal), Some(60));
        n.place_on(&min).unwrap();
        assert_eq!(min.placed_bytes(), 48);
        // A network that cannot stream is placed whole at minimal too.
        let plain = net("p", 24);
        assert!(plain.place_on(&min).is_err());
    }

    #[test]
    fn real_cuda_errors_inside_a_stage_retry_and_other_errors_do_not() {
        let a = net("a", 4);
        let res = residency(Some(Tier::High), None);
        let mut calls = 0;
        let v = res
            .stage("a", &[&a], || {
                calls += 1;
                if calls == 1 {
                    bail!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
                }
                total(&a)
            })
            .unwrap();
        assert_eq!((v, calls, res.tier()), (4.0, 2, Tier::Medium));
        let mut calls = 0;
        let e = res
            .stage("a", &[&a], || -> Result<f32> {
                calls += 1;
                bail!("a shape error")
            })
            .unwrap_err();
        assert_eq!((e.to_string(), calls), ("a shape error".to_string(), 1));
        assert_eq!(res.tier(), Tier::Medium);
    }

    #[test]
    fn dropping_a_network_frees_its_share() {
        let res = residency(Some(Tier::High), None);
        {
            let a = net("a", 8);
            res.stage("a", &[&a], || total(&a)).unwrap();
            assert_eq!(res.placed_bytes(), 32);
        }
        assert_eq!(res.placed_bytes(), 0);
    }
}
