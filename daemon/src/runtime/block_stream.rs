//! A flow's transformer blocks kept in host memory and copied to the device [`AHEAD`] blocks
//! ahead of the one computing, every forward: what tier `minimal` does with the two flows
//! (`runtime::tiers`), so a flow needs its non-block layers and a few blocks on the device instead
//! of all of its weights. No TRELLIS twin: the original keeps every network on the GPU.
//!
//! * [`BlockStream`]: what `runtime::residency` hands a network's builder when the tier streams
//!   (each block's host weights, split once at placement; the device; the copy stream).
//! * [`Blocks`]: a network's list of blocks, either built on the device once (`Resident`) or
//!   rebuilt per forward from uploaded weights (`Streamed`); [`Blocks::for_each`] runs them in
//!   order either way.
//!
//! Ordering while streaming: block `i + AHEAD`'s copy is queued on the copy stream before block
//! `i` computes (`runtime::prefetch`: destinations allocated in candle's stream order, candle's
//! stream waits for the copy before the block uses it). The host waits for a block's copy before
//! it queues that block's kernels, which bounds what is on the device to `AHEAD + 1` blocks; a
//! block's weights are freed in stream order after its kernels. On the CPU nothing is copied
//! (the blocks are built over the host tensors), which is what the CPU tests check.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, ensure, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::prefetch::{CopyStream, Prefetch};
use super::weights::HostWeights;

/// Blocks whose copies are queued while an earlier block computes.
pub const AHEAD: usize = 2;

/// Whether the tiers that stream blocks do (`TRELLIS_STREAM_BLOCKS` unset or not `0`; read once
/// per process): `=0` places the flows whole at `minimal` too, to compare.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("TRELLIS_STREAM_BLOCKS").map_or(true, |v| v.trim() != "0"))
}

/// What a network's streamed blocks moved since it was placed (or since last read).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct StreamTotals {
    /// Blocks uploaded, and their bytes.
    pub blocks: usize,
    pub bytes: u64,
    /// Seconds the copies took on the copy stream (or, not pinned, on candle's stream).
    pub copy_s: f64,
    /// Seconds of that the host waited for before it could queue a block's kernels (the part
    /// not hidden behind the blocks before it).
    pub waited_s: f64,
}

impl std::ops::AddAssign for StreamTotals {
    fn add_assign(&mut self, o: Self) {
        self.blocks += o.blocks;
        self.bytes += o.bytes;
        self.copy_s += o.copy_s;
        self.waited_s += o.waited_s;
    }
}

/// A network's blocks' host weights and where to stream them to.
#[derive(Clone)]
pub struct BlockStream {
    /// The blocks' names start `{prefix}.{i}.`.
    prefix: String,
    /// Block `i`'s host weights at `parts[i]` (sharing the network's page-locked copies), split
    /// once when the network is placed.
    parts: Arc<Vec<HostWeights>>,
    origin: String,
    device: Device,
    copies: Option<CopyStream>,
    totals: Arc<Mutex<StreamTotals>>,
}

impl BlockStream {
    /// Streams the blocks under `prefix` of `host` (the whole network's weights) to `device`,
    /// copying on `copies` (a CUDA device's copy stream; `None` on the CPU).
    pub fn new(
        host: &HostWeights,
        prefix: &str,
        device: &Device,
        copies: Option<CopyStream>,
    ) -> Self {
        let count = block_bytes(host, prefix).len();
        let parts = (0..count)
            .map(|i| host.select(&format!("{prefix}.{i}."), device))
            .collect();
        Self {
            prefix: prefix.to_string(),
            parts: Arc::new(parts),
            origin: host.origin().to_string(),
            device: device.clone(),
            copies,
            totals: Arc::default(),
        }
    }

    /// The prefix of the blocks' names.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// What the blocks moved since the last call (and starts counting again).
    pub fn take_totals(&self) -> StreamTotals {
        std::mem::take(&mut *self.totals.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn count(&self, bytes: u64, copy_s: f64, waited_s: f64) {
        *self.totals.lock().unwrap_or_else(|e| e.into_inner()) += StreamTotals {
            blocks: 1,
            bytes,
            copy_s,
            waited_s,
        };
    }

    /// Bytes on the device while a network with `prefix` streamed runs: its other weights, and
    /// `AHEAD + 1` of its largest blocks.
    pub fn device_bytes(host: &HostWeights, prefix: &str) -> u64 {
        let blocks = block_bytes(host, prefix);
        let streamed: u64 = blocks.iter().sum();
        let largest = blocks.iter().copied().max().unwrap_or(0);
        host.bytes().saturating_sub(streamed)
            + (AHEAD as u64 + 1).min(blocks.len() as u64) * largest
    }

    /// Block `i`'s weights, on their way to the device.
    fn upload(&self, i: usize) -> Result<Upload> {
        let part = self
            .parts
            .get(i)
            .filter(|p| !p.is_empty())
            .cloned()
            .ok_or_else(|| anyhow!("{}: no weights under {}.{i}", self.origin, self.prefix))?;
        match Prefetch::start(&part, &self.device, self.copies.as_ref())? {
            Some(p) => Ok(Upload::Copying(part, p)),
            // Not pinned (`TRELLIS_PINNED=0`, a failed pinned allocation): copied when built.
            None => Ok(Upload::WhenBuilt(part)),
        }
    }
}

/// Bytes of each block under `prefix` (`prefix.0.…`, `prefix.1.…`), in block order.
fn block_bytes(host: &HostWeights, prefix: &str) -> Vec<u64> {
    let head = format!("{prefix}.");
    let mut per: Vec<u64> = Vec::new();
    for (name, dtype, elems) in host.entries() {
        let Some(rest) = name.strip_prefix(&head) else {
            continue;
        };
        let Some(i) = rest.split('.').next().and_then(|s| s.parse::<usize>().ok()) else {
            continue;
        };
        if per.len() <= i {
            per.resize(i + 1, 0);
        }
        per[i] += (elems * dtype.size_in_bytes()) as u64;
    }
    per
}

enum Upload {
    Copying(HostWeights, Prefetch),
    WhenBuilt(HostWeights),
}

type BlockBuilder<B> = Arc<dyn for<'a> Fn(VarBuilder<'a>) -> Result<B> + Send + Sync>;

/// A network's transformer blocks.
#[derive(Clone)]
pub enum Blocks<B> {
    /// Built once on the network's device.
    Resident(Vec<B>),
    /// Rebuilt from their host weights for every run ([`BlockStream`]).
    Streamed {
        count: usize,
        dtype: DType,
        stream: BlockStream,
        build: BlockBuilder<B>,
    },
}

impl<B: std::fmt::Debug> std::fmt::Debug for Blocks<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Resident(b) => f.debug_tuple("Resident").field(b).finish(),
            Self::Streamed { count, stream, .. } => f
                .debug_struct("Streamed")
                .field("count", count)
                .field("prefix", &stream.prefix)
                .finish(),
        }
    }
}

impl<B> Blocks<B> {
    /// `count` blocks under `vb` (block `i` at `vb.pp(i)`), built by `build`: now on `vb`'s
    /// device, or, with `stream`, per run from the host weights.
    pub fn new(
        count: usize,
        vb: VarBuilder<'_>,
        stream: Option<&BlockStream>,
        build: impl for<'a> Fn(VarBuilder<'a>) -> Result<B> + Send + Sync + 'static,
    ) -> Result<Self>
    where
        B: 'static,
    {
        match stream {
            None => {
                let mut blocks = Vec::with_capacity(count);
                for i in 0..count {
                    blocks.push(build(vb.pp(i.to_string()))?);
                }
                Ok(Self::Resident(blocks))
            }
            Some(s) => {
                ensure!(
                    vb.prefix() == s.prefix,
                    "blocks under {:?} cannot stream from {:?}",
                    vb.prefix(),
                    s.prefix
                );
                Ok(Self::Streamed {
                    count,
                    dtype: vb.dtype(),
                    stream: s.clone(),
                    build: Arc::new(build),
                })
            }
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Resident(b) => b.len(),
            Self::Streamed { count, .. } => *count,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the blocks are streamed from host memory.
    pub fn is_streamed(&self) -> bool {
        matches!(self, Self::Streamed { .. })
    }

    /// Runs `f(i, block)` for every block in order.
    pub fn for_each(&self, mut f: impl FnMut(usize, &B) -> Result<()>) -> Result<()> {
        let (count, dtype, stream, build) = match self {
            Self::Resident(blocks) => {
                for (i, b) in blocks.iter().enumerate() {
                    f(i, b)?;
                }
                return Ok(());
            }
            Self::Streamed {
                count,
                dtype,
                stream,
                build,
            } => (*count, *dtype, stream, build),
        };
        let prefix = stream.prefix();
        let mut queued = VecDeque::with_capacity(AHEAD + 1);
        let mut next = 0;
        for i in 0..count {
            while next < count && next <= i + AHEAD {
                queued.push_back(stream.upload(next)?);
                next += 1;
            }
            let upload = queued
                .pop_front()
                .ok_or_else(|| anyhow!("{prefix}.{i}: no upload queued"))?;
            let (part, vb, check, copied) = match upload {
                Upload::Copying(part, p) => {
                    let (tensors, time) = p.finish()?;
                    let (vb, check) = part.var_builder_from(tensors, &stream.device);
                    (part, vb, check, Some(time))
                }
                Upload::WhenBuilt(part) => {
                    let (vb, check) = part.var_builder(&stream.device);
                    (part, vb, check, None)
                }
            };
            let t = Instant::now();
            let block = build(vb.pp(prefix).pp(i.to_string()).to_dtype(dtype))
                .with_context(|| format!("building streamed block {prefix}.{i}"))?;
            // Not pinned, the tensors were copied (synchronously) while the block was built.
            let (copy_s, waited_s) = copied.map_or_else(
                || {
                    let s = t.elapsed().as_secs_f64();
                    (s, s)
                },
                |c| (c.copy_s, c.waited_s),
            );
            stream.count(part.bytes(), copy_s, waited_s);
            check
                .finish()
                .with_context(|| format!("streamed block {prefix}.{i} of {}", part.origin()))?;
            f(i, &block)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;
    use std::collections::HashMap;

    /// A "block" that scales its input by its weight and adds its bias.
    struct Affine {
        w: Tensor,
        b: Tensor,
    }

    fn affine(vb: VarBuilder<'_>) -> Result<Affine> {
        Ok(Affine {
            w: vb.get(4, "w")?,
            b: vb.get(4, "b")?,
        })
    }

    /// Weights of `n` blocks under `blocks.` and an `out` tensor beside them.
    fn host(n: usize) -> HostWeights {
        let mut t = HashMap::new();
        for i in 0..n {
            let v = |k: f32| Tensor::new(&[k, k + 1.0, k + 2.0, k + 3.0], &Device::Cpu).unwrap();
            t.insert(format!("blocks.{i}.w"), v(i as f32 + 1.0));
            t.insert(format!("blocks.{i}.b"), v(-(i as f32)));
        }
        t.insert(
            "out".to_string(),
            Tensor::zeros(10, DType::F32, &Device::Cpu).unwrap(),
        );
        HostWeights::new(t, "test")
    }

    fn run(blocks: &Blocks<Affine>) -> Vec<f32> {
        let mut x = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
        let mut order = Vec::new();
        blocks
            .for_each(|i, b| {
                order.push(i);
                x = ((&x * &b.w)? + &b.b)?;
                Ok(())
            })
            .unwrap();
        assert_eq!(order, (0..blocks.len()).collect::<Vec<_>>());
        x.to_vec1().unwrap()
    }

    #[test]
    fn streamed_blocks_run_in_order_like_the_resident_ones() {
        let host = host(5);
        let (vb, _) = host.var_builder(&Device::Cpu);
        let resident = Blocks::new(5, vb.pp("blocks"), None, affine).unwrap();
        assert!(!resident.is_streamed());
        let stream = BlockStream::new(&host, "blocks", &Device::Cpu, None);
        let streamed = Blocks::new(5, vb.pp("blocks"), Some(&stream), affine).unwrap();
        assert!(streamed.is_streamed() && streamed.len() == 5);
        let want = run(&resident);
        assert_eq!(run(&streamed), want);
        let once = stream.take_totals();
        assert_eq!((once.blocks, once.bytes), (5, 5 * 32));
        // Twice: every run copies and builds its blocks again.
        assert_eq!(run(&streamed), want);
        assert_eq!(stream.take_totals().blocks, 5);
        assert_eq!(stream.take_totals(), StreamTotals::default());
    }

    #[test]
    fn a_streamed_block_missing_its_weights_is_an_error_naming_it() {
        let host = host(2);
        let (vb, _) = host.var_builder(&Device::Cpu);
        let stream = BlockStream::new(&host, "blocks", &Device::Cpu, None);
        let blocks = Blocks::new(3, vb.pp("blocks"), Some(&stream), affine).unwrap();
        let e = blocks.for_each(|_, _| Ok(())).unwrap_err();
        assert!(format!("{e:#}").contains("blocks.2"), "{e:#}");
    }

    #[test]
    fn the_device_holds_the_other_weights_and_three_blocks() {
        // Five blocks of 32 bytes, 40 bytes beside them.
        let h = host(5);
        assert_eq!(h.bytes(), 5 * 32 + 40);
        assert_eq!(block_bytes(&h, "blocks"), vec![32; 5]);
        assert_eq!(BlockStream::device_bytes(&h, "blocks"), 40 + 3 * 32);
        // Fewer blocks than the look-ahead: all of them.
        let h = host(2);
        assert_eq!(BlockStream::device_bytes(&h, "blocks"), h.bytes());
        // A prefix no tensor has streams nothing.
        assert_eq!(BlockStream::device_bytes(&h, "layers"), h.bytes());
    }
}
