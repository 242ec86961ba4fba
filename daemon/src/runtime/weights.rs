//! Checked weight loading.
//!
//! Every network is built through a [`candle_nn::VarBuilder`] whose backend is a [`CheckedBackend`].
//! The backend does not stop at the first problem: a missing or wrong-shaped tensor is recorded and a
//! zero placeholder (a broadcast scalar, no allocation) is handed back so that construction goes on.
//! [`WeightCheck::finish`] then reports every missing, wrong-shaped and unexpected entry in one error.
//!
//! Sources: memory-mapped safetensors files (mixed dtypes; each tensor is cast to the dtype the layer
//! asks for), in-memory tensors, or a checkpoint manifest (names, shapes and dtypes only) filled with
//! random values or with broadcast zeros (shape checks of full-size networks without the memory).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

/// What a checkpoint entry looks like, without its values.
#[derive(Debug, Clone)]
pub struct EntrySpec {
    pub shape: Vec<usize>,
    pub dtype: DType,
}

/// How a manifest-backed source produces values.
#[derive(Debug, Clone, Copy)]
pub enum ManifestFill {
    /// Zeros broadcast from one scalar: costs no memory, for shape and name checks.
    Zeros,
    /// Random N(0, 1/fan_in) values (biases and 1-D tensors small), seeded: for speed and memory work.
    Random { seed: u64 },
}

enum Source {
    Mmap(candle_core::safetensors::MmapedSafetensors),
    Tensors(HashMap<String, Tensor>),
    Host(HashMap<String, HostTensor>),
    Manifest(HashMap<String, EntrySpec>, ManifestFill),
}

impl Source {
    fn names(&self) -> Vec<String> {
        match self {
            Source::Mmap(m) => m.tensors().into_iter().map(|(n, _)| n).collect(),
            Source::Tensors(t) => t.keys().cloned().collect(),
            Source::Host(t) => t.keys().cloned().collect(),
            Source::Manifest(m, _) => m.keys().cloned().collect(),
        }
    }

    fn spec(&self, name: &str) -> Option<EntrySpec> {
        match self {
            Source::Mmap(m) => m.get(name).ok().map(|v| EntrySpec {
                shape: v.shape().to_vec(),
                dtype: safetensors_dtype(v.dtype()).unwrap_or(DType::F32),
            }),
            Source::Tensors(t) => t.get(name).map(|t| EntrySpec {
                shape: t.dims().to_vec(),
                dtype: t.dtype(),
            }),
            Source::Host(t) => t.get(name).map(HostTensor::spec),
            Source::Manifest(m, _) => m.get(name).cloned(),
        }
    }

    fn load(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        match self {
            Source::Mmap(m) => {
                let t = m.load(name, dev)?;
                // The tensor owns a copy now: hand the file's pages back so that the mapping and
                // the copies never both sit in memory (the whole-load peak stays ~1x the weights).
                if let Ok(view) = m.get(name) {
                    release_pages(view.data());
                }
                Ok(t)
            }
            Source::Tensors(t) => match t.get(name) {
                Some(t) => t.to_device(dev),
                None => candle_core::bail!("no tensor {name}"),
            },
            Source::Host(t) => match t.get(name) {
                Some(t) => t.to_device(dev),
                None => candle_core::bail!("no tensor {name}"),
            },
            Source::Manifest(m, fill) => {
                let Some(spec) = m.get(name) else {
                    candle_core::bail!("no tensor {name}")
                };
                match fill {
                    ManifestFill::Zeros => {
                        Tensor::zeros((), spec.dtype, dev)?.broadcast_as(spec.shape.as_slice())
                    }
                    ManifestFill::Random { seed } => random_entry(name, spec, *seed, dev),
                }
            }
        }
    }
}

/// Drops the resident pages of a read-only file mapping that lie wholly inside `bytes` (they are
/// read again from the file if touched later). Unix only; a no-op elsewhere.
fn release_pages(bytes: &[u8]) {
    #[cfg(unix)]
    {
        const PAGE: usize = 4096;
        let start = bytes.as_ptr() as usize;
        let first = start.div_ceil(PAGE) * PAGE;
        let end = (start + bytes.len()) / PAGE * PAGE;
        if end > first {
            // SAFETY: the range lies inside a live read-only mapping that nothing writes;
            // MADV_DONTNEED on a private file mapping only drops this process's copies.
            unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED);
            }
        }
    }
    #[cfg(not(unix))]
    let _ = bytes;
}

fn safetensors_dtype(d: safetensors::Dtype) -> Option<DType> {
    Some(match d {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F64 => DType::F64,
        safetensors::Dtype::I64 => DType::I64,
        safetensors::Dtype::U32 => DType::U32,
        safetensors::Dtype::I32 => DType::I32,
        safetensors::Dtype::U8 => DType::U8,
        _ => return None,
    })
}

/// Deterministic random values for a manifest entry: weights N(0, 1/fan_in), 1-D tensors small.
fn random_entry(
    name: &str,
    spec: &EntrySpec,
    seed: u64,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    use rand::{Rng, SeedableRng};
    let mut h: u64 = seed ^ 0x9e37_79b9_7f4a_7c15;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let n: usize = spec.shape.iter().product();
    let fan_in: usize = spec.shape.iter().skip(1).product::<usize>().max(1);
    let std = if spec.shape.len() >= 2 {
        (1.0 / fan_in as f32).sqrt()
    } else {
        0.05
    };
    let base = if spec.shape.len() == 1 && (name.ends_with("weight") || name.ends_with("gamma")) {
        1.0
    } else {
        0.0
    };
    // Chunks of 64k values, each from its own seeded stream, filled in parallel (full-size
    // networks have hundreds of millions of values).
    const CHUNK: usize = 1 << 16;
    let mut v = vec![0f32; n];
    {
        use rayon::prelude::*;
        v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
            let mut rng =
                rand::rngs::StdRng::seed_from_u64(h ^ (c as u64).wrapping_mul(0x9e37_79b9));
            for x in out.iter_mut() {
                // Box-Muller from two uniforms keeps this independent of rand_distr's API churn.
                let u1: f32 = rng.random::<f32>().max(1e-7);
                let u2: f32 = rng.random::<f32>();
                *x = base + std * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
            }
        });
    }
    Tensor::from_vec(v, spec.shape.as_slice(), dev)?.to_dtype(spec.dtype)
}

#[derive(Default)]
struct Record {
    used: BTreeSet<String>,
    /// The dtype each tensor was asked for (the layer's compute dtype).
    requested: BTreeMap<String, DType>,
    missing: Vec<(String, Vec<usize>)>,
    wrong_shape: Vec<(String, Vec<usize>, Vec<usize>)>,
    unreadable: Vec<(String, String)>,
    /// Every tensor handed out, as handed out (see [`WeightCheck::capture_host`]).
    host: Option<HashMap<String, Tensor>>,
}

/// The [`SimpleBackend`] behind every network's `VarBuilder`.
pub struct CheckedBackend {
    source: Arc<Source>,
    record: Arc<Mutex<Record>>,
}

impl SimpleBackend for CheckedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let placeholder = || Tensor::zeros((), dtype, dev)?.broadcast_as(s.clone());
        let mut rec = self.record.lock().unwrap_or_else(|e| e.into_inner());
        rec.used.insert(name.to_string());
        rec.requested.insert(name.to_string(), dtype);
        let Some(spec) = self.source.spec(name) else {
            rec.missing.push((name.to_string(), s.dims().to_vec()));
            return placeholder();
        };
        if spec.shape != s.dims() {
            rec.wrong_shape
                .push((name.to_string(), s.dims().to_vec(), spec.shape.clone()));
            return placeholder();
        }
        drop(rec);
        match self.source.load(name, dev).and_then(|t| t.to_dtype(dtype)) {
            Ok(t) => {
                let mut rec = self.record.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(host) = rec.host.as_mut() {
                    host.insert(name.to_string(), t.clone());
                }
                Ok(t)
            }
            Err(e) => {
                let mut rec = self.record.lock().unwrap_or_else(|e| e.into_inner());
                rec.unreadable.push((name.to_string(), e.to_string()));
                placeholder()
            }
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut rec = self.record.lock().unwrap_or_else(|e| e.into_inner());
        rec.used.insert(name.to_string());
        rec.requested.insert(name.to_string(), dtype);
        if self.source.spec(name).is_none() {
            rec.missing.push((name.to_string(), vec![]));
            drop(rec);
            return Tensor::zeros((), dtype, dev);
        }
        drop(rec);
        let t = self.source.load(name, dev)?.to_dtype(dtype)?;
        let mut rec = self.record.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(host) = rec.host.as_mut() {
            host.insert(name.to_string(), t.clone());
        }
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.source.spec(name).is_some()
    }
}

/// Problems found while building a network from a checkpoint, all of them at once.
#[derive(Debug, thiserror::Error)]
#[error("{origin}: checkpoint does not match the network:\n{}", .problems.join("\n"))]
pub struct WeightError {
    pub origin: String,
    pub problems: Vec<String>,
}

/// The handle that collects what a network asked for; call [`WeightCheck::finish`] after building.
pub struct WeightCheck {
    origin: String,
    source: Arc<Source>,
    record: Arc<Mutex<Record>>,
}

impl WeightCheck {
    /// Keeps every tensor the network is handed from now on (in the dtype it asked for, on the
    /// device the `VarBuilder` was opened on): build on the CPU after this call and
    /// [`WeightCheck::host_weights`] holds the host copy `runtime::residency` places from.
    pub fn capture_host(&self) {
        let mut rec = self.record.lock().unwrap_or_else(|e| e.into_inner());
        rec.host.get_or_insert_with(HashMap::new);
    }

    /// The tensors captured since [`WeightCheck::capture_host`] (empty without that call).
    pub fn host_weights(&self) -> HostWeights {
        let rec = self.record.lock().unwrap_or_else(|e| e.into_inner());
        HostWeights::new(rec.host.clone().unwrap_or_default(), &self.origin)
    }

    /// Names the source holds that the network never asked for, plus every recorded problem.
    pub fn finish(self) -> Result<(), WeightError> {
        let rec = self.record.lock().unwrap_or_else(|e| e.into_inner());
        let mut problems = Vec::new();
        for (n, s) in &rec.missing {
            problems.push(format!("  missing: {n} (expected shape {s:?})"));
        }
        for (n, want, got) in &rec.wrong_shape {
            problems.push(format!(
                "  wrong shape: {n}: the network expects {want:?}, the file has {got:?}"
            ));
        }
        for (n, e) in &rec.unreadable {
            problems.push(format!("  unreadable: {n}: {e}"));
        }
        let mut unexpected: Vec<String> = self
            .source
            .names()
            .into_iter()
            .filter(|n| !rec.used.contains(n))
            .collect();
        unexpected.sort();
        for n in unexpected {
            problems.push(format!("  unexpected: {n}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(WeightError {
                origin: self.origin.clone(),
                problems,
            })
        }
    }

    /// Counts every tensor whose name starts with `prefix` as used: a network that builds those
    /// later from the host copy itself (`runtime::block_stream`).
    pub fn used_elsewhere(&self, prefix: &str) {
        let mut rec = self.record.lock().unwrap_or_else(|e| e.into_inner());
        for n in self.source.names() {
            if n.starts_with(prefix) {
                rec.used.insert(n);
            }
        }
    }

    /// The dtype the network asked for each tensor (its compute dtype), by name.
    pub fn requested_dtypes(&self) -> BTreeMap<String, DType> {
        let rec = self.record.lock().unwrap_or_else(|e| e.into_inner());
        rec.requested.clone()
    }

    /// The entries the network asked for that the source lacks, with the shapes it asked for, in
    /// request order. Built over an empty source ([`from_tensors`] of nothing), this is the
    /// network's whole state dict (names and shapes), as random checkpoints are made.
    pub fn missing(&self) -> Vec<(String, Vec<usize>)> {
        let rec = self.record.lock().unwrap_or_else(|e| e.into_inner());
        rec.missing.clone()
    }

    /// The names the network asked for so far (sorted).
    pub fn used(&self) -> Vec<String> {
        let rec = self.record.lock().unwrap_or_else(|e| e.into_inner());
        rec.used.iter().cloned().collect()
    }
}

fn checked(
    source: Source,
    origin: String,
    dtype: DType,
    dev: &Device,
) -> (VarBuilder<'static>, WeightCheck) {
    let source = Arc::new(source);
    let record = Arc::new(Mutex::new(Record::default()));
    let backend = CheckedBackend {
        source: source.clone(),
        record: record.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, dev.clone());
    (
        vb,
        WeightCheck {
            origin,
            source,
            record,
        },
    )
}

/// Memory-maps a safetensors checkpoint. A truncated or corrupt file is an error naming the file.
pub fn from_safetensors(
    path: &Path,
    dtype: DType,
    dev: &Device,
) -> anyhow::Result<(VarBuilder<'static>, WeightCheck)> {
    if !path.is_file() {
        anyhow::bail!("weights file not found: {}", path.display());
    }
    // SAFETY: the file is mapped read-only; trellis-rs never writes checkpoint files while they
    // are mapped, and safetensors validates the header and every offset against the file length.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(|e| {
        anyhow::anyhow!(
            "{}: not a readable safetensors file (truncated or corrupt?): {e}",
            path.display()
        )
    })?;
    Ok(checked(
        Source::Mmap(st),
        path.display().to_string(),
        dtype,
        dev,
    ))
}

/// Networks built from tensors already in memory (fixtures, tests).
pub fn from_tensors(
    tensors: HashMap<String, Tensor>,
    origin: &str,
    dtype: DType,
    dev: &Device,
) -> (VarBuilder<'static>, WeightCheck) {
    checked(Source::Tensors(tensors), origin.to_string(), dtype, dev)
}

/// One host tensor of a [`HostWeights`]: pageable, or page-locked for fast GPU uploads.
#[derive(Clone)]
pub(crate) enum HostTensor {
    Pageable(Tensor),
    #[cfg(feature = "cuda")]
    Pinned(Arc<super::pinned::PinnedTensor>),
}

impl HostTensor {
    fn spec(&self) -> EntrySpec {
        match self {
            HostTensor::Pageable(t) => EntrySpec {
                shape: t.dims().to_vec(),
                dtype: t.dtype(),
            },
            #[cfg(feature = "cuda")]
            HostTensor::Pinned(p) => EntrySpec {
                shape: p.shape().dims().to_vec(),
                dtype: p.dtype(),
            },
        }
    }

    fn to_device(&self, dev: &Device) -> candle_core::Result<Tensor> {
        match self {
            HostTensor::Pageable(t) => t.to_device(dev),
            #[cfg(feature = "cuda")]
            HostTensor::Pinned(p) => p.upload(dev).map_err(candle_core::Error::wrap),
        }
    }
}

/// A network's weights in host memory, in the dtypes the network runs them in: what
/// `runtime::residency` uploads a network from (no file is read again). On the first upload to a
/// GPU (CUDA builds) they move into page-locked memory (`runtime::pinned`), still held once.
#[derive(Clone)]
pub struct HostWeights {
    tensors: Arc<Mutex<HashMap<String, HostTensor>>>,
    origin: String,
    bytes: u64,
    released: Arc<std::sync::atomic::AtomicBool>,
}

impl HostWeights {
    pub fn new(tensors: HashMap<String, Tensor>, origin: &str) -> Self {
        let bytes = tensors
            .values()
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum();
        Self {
            tensors: Arc::new(Mutex::new(
                tensors
                    .into_iter()
                    .map(|(k, t)| (k, HostTensor::Pageable(t)))
                    .collect(),
            )),
            origin: origin.to_string(),
            bytes,
            released: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HostTensor>> {
        self.tensors.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of the weights (what placing the network on a device takes).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// `(name, dtype, elements)` of every tensor.
    pub fn entries(&self) -> Vec<(String, DType, usize)> {
        self.lock()
            .iter()
            .map(|(k, t)| {
                let s = t.spec();
                (k.clone(), s.dtype, s.shape.iter().product())
            })
            .collect()
    }

    /// Where the weights came from (a file or a manifest).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Drops the host tensors (what a network built from them still references stays alive): for
    /// a network placed for good on the CPU, whose packed layers (`modules::dense`) keep their own
    /// copies. A released copy cannot be placed again ([`HostWeights::is_released`]).
    pub fn release(&self) {
        let mut map = self.lock();
        map.clear();
        self.released
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether [`HostWeights::release`] dropped the tensors.
    pub fn is_released(&self) -> bool {
        self.released.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the tensors sit in page-locked memory.
    pub fn is_pinned(&self) -> bool {
        #[cfg(feature = "cuda")]
        {
            self.lock()
                .values()
                .any(|t| matches!(t, HostTensor::Pinned(_)))
        }
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// Moves the pageable tensors into page-locked memory for uploads to `dev` (a CUDA device;
    /// a no-op elsewhere, when `TRELLIS_PINNED=0`, or when pinning fails: then they stay pageable).
    fn pin_for(&self, dev: &Device) {
        #[cfg(feature = "cuda")]
        {
            if !dev.is_cuda() || !super::pinned::enabled() {
                return;
            }
            let mut map = self.lock();
            for t in map.values_mut() {
                if let HostTensor::Pageable(p) = t {
                    match super::pinned::PinnedTensor::new(p, dev) {
                        Ok(Some(pinned)) => *t = HostTensor::Pinned(Arc::new(pinned)),
                        Ok(None) => {}
                        Err(_) => return,
                    }
                }
            }
        }
        #[cfg(not(feature = "cuda"))]
        let _ = dev;
    }

    /// A checked `VarBuilder` that copies each tensor to `dev` as the network asks for it (on the
    /// CPU the tensors are shared, not copied).
    pub fn var_builder(&self, dev: &Device) -> (VarBuilder<'static>, WeightCheck) {
        self.pin_for(dev);
        let map = self.lock().clone();
        checked(Source::Host(map), self.origin.clone(), DType::F32, dev)
    }

    /// The tensors whose names start with `prefix`, as weights of their own sharing these
    /// (pinned first for `dev` as [`HostWeights::var_builder`] does, so the part shares the
    /// page-locked copies instead of pinning its own): one block of a network
    /// (`runtime::block_stream`).
    pub fn select(&self, prefix: &str, dev: &Device) -> HostWeights {
        self.pin_for(dev);
        let part: HashMap<String, HostTensor> = self
            .lock()
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        let bytes = part
            .values()
            .map(|t| {
                let s = t.spec();
                (s.shape.iter().product::<usize>() * s.dtype.size_in_bytes()) as u64
            })
            .sum();
        Self {
            tensors: Arc::new(Mutex::new(part)),
            origin: self.origin.clone(),
            bytes,
            released: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        }
    }

    /// The host tensors, pinned first for `dev` as [`HostWeights::var_builder`] does (for
    /// `runtime::prefetch`, which copies them ahead of the stage that needs them).
    pub(crate) fn tensors_for(&self, dev: &Device) -> HashMap<String, HostTensor> {
        self.pin_for(dev);
        self.lock().clone()
    }

    /// A checked `VarBuilder` over device copies of these weights made beforehand
    /// (`runtime::prefetch`): the same checks as [`HostWeights::var_builder`], nothing copied.
    pub fn var_builder_from(
        &self,
        tensors: HashMap<String, Tensor>,
        dev: &Device,
    ) -> (VarBuilder<'static>, WeightCheck) {
        checked(
            Source::Tensors(tensors),
            self.origin.clone(),
            DType::F32,
            dev,
        )
    }
}

/// A checkpoint manifest of `../shared/reference/manifests`: its `config` and its state-dict specs.
pub struct Manifest {
    pub path: PathBuf,
    pub config: serde_json::Value,
    pub entries: HashMap<String, EntrySpec>,
}

impl Manifest {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: invalid JSON: {e}", path.display()))?;
        let config = v
            .get("config")
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("{}: no \"config\" key", path.display()))?;
        let sd = v
            .get("state_dict")
            .and_then(|s| s.as_array())
            .ok_or_else(|| anyhow::anyhow!("{}: no \"state_dict\" list", path.display()))?;
        let mut entries = HashMap::new();
        for e in sd {
            let key = e.get("key").and_then(|k| k.as_str());
            let shape = e.get("shape").and_then(|s| s.as_array());
            let dtype = e.get("dtype").and_then(|s| s.as_str());
            let (Some(key), Some(shape), Some(dtype)) = (key, shape, dtype) else {
                anyhow::bail!("{}: malformed state_dict entry {e}", path.display());
            };
            let shape = shape
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| anyhow::anyhow!("{}: bad shape for {key}", path.display()))?;
            let dtype = match dtype {
                "float32" => DType::F32,
                "float16" => DType::F16,
                "bfloat16" => DType::BF16,
                "int64" => DType::I64,
                other => anyhow::bail!("{}: unknown dtype {other} for {key}", path.display()),
            };
            entries.insert(key.to_string(), EntrySpec { shape, dtype });
        }
        Ok(Self {
            path: path.to_path_buf(),
            config,
            entries,
        })
    }

    /// Entries whose stored dtype differs from the dtype a network asked for (see
    /// [`WeightCheck::requested_dtypes`]), or that it never asked for: an empty list means the
    /// network keeps the checkpoint's float16/float32 placement exactly.
    pub fn dtype_mismatches(&self, requested: &BTreeMap<String, DType>) -> Vec<String> {
        let mut out: Vec<String> = self
            .entries
            .iter()
            .filter_map(|(name, spec)| match requested.get(name) {
                Some(d) if *d == spec.dtype => None,
                other => Some(format!(
                    "{name}: stored {:?}, the network asks for {other:?}",
                    spec.dtype
                )),
            })
            .collect();
        out.sort();
        out
    }

    /// A `VarBuilder` over this manifest's entries.
    pub fn var_builder(
        &self,
        fill: ManifestFill,
        dtype: DType,
        dev: &Device,
    ) -> (VarBuilder<'static>, WeightCheck) {
        checked(
            Source::Manifest(self.entries.clone(), fill),
            self.path.display().to_string(),
            dtype,
            dev,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_missing_wrong_shape_and_unexpected_together() {
        let dev = Device::Cpu;
        let mut t = HashMap::new();
        t.insert(
            "a.weight".to_string(),
            Tensor::ones((2, 3), DType::F32, &dev).unwrap(),
        );
        t.insert(
            "b.weight".to_string(),
            Tensor::ones((4,), DType::F32, &dev).unwrap(),
        );
        t.insert(
            "extra".to_string(),
            Tensor::ones((1,), DType::F32, &dev).unwrap(),
        );
        let (vb, check) = from_tensors(t, "test", DType::F32, &dev);
        assert!(vb.get((2, 3), "a.weight").is_ok());
        assert!(vb.get((5,), "b.weight").is_ok());
        assert!(vb.get((7,), "c.bias").is_ok());
        let err = check.finish().unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.problems.len(), 3, "{msg}");
        assert!(msg.contains("missing: c.bias"), "{msg}");
        assert!(msg.contains("wrong shape: b.weight"), "{msg}");
        assert!(msg.contains("unexpected: extra"), "{msg}");
    }

    #[test]
    fn casts_to_the_requested_dtype() {
        let dev = Device::Cpu;
        let mut t = HashMap::new();
        t.insert(
            "w".to_string(),
            Tensor::ones((2,), DType::F16, &dev).unwrap(),
        );
        let (vb, check) = from_tensors(t, "test", DType::F32, &dev);
        assert_eq!(vb.get(2, "w").unwrap().dtype(), DType::F32);
        assert_eq!(
            vb.to_dtype(DType::F16).get(2, "w").unwrap().dtype(),
            DType::F16
        );
        check.finish().unwrap();
    }

    #[test]
    fn corrupt_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.safetensors");
        std::fs::write(&p, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
        let err = from_safetensors(&p, DType::F32, &Device::Cpu)
            .err()
            .unwrap();
        assert!(err.to_string().contains("bad.safetensors"));
    }
}
