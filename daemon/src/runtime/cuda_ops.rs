//! GPU versions of the CPU kernels in `trellis_kernels` (sparse conv, varlen attention, neighbour
//! maps): CUDA C++ from `trellis_kernels::cuda`, compiled with NVRTC for the GPU that is present
//! (cached on disk, `trellis_kernels::nvrtc`) and launched on candle's stream as custom ops, so they
//! order with candle's own kernels and no host round trip happens. No TRELLIS twin (the original
//! uses spconv / flash-attn / xformers). `cuda` builds only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};
use trellis_kernels::cuda::{self as k, KernelSource};
use trellis_kernels::nvrtc::{default_cache_dir, Nvrtc};

fn err(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(msg.to_string())
}

fn nvrtc() -> Result<&'static Nvrtc> {
    static N: OnceLock<std::result::Result<Nvrtc, String>> = OnceLock::new();
    N.get_or_init(|| Nvrtc::open_default().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| err(format!("NVRTC: {e}")))
}

type ModuleKey = (candle_core::cuda_backend::DeviceId, &'static str);

/// The compiled module of `src` on `dev` (compiled for its arch on first use, then cached).
pub(crate) fn module(dev: &CudaDevice, src: &KernelSource) -> Result<Arc<CudaModule>> {
    static MODULES: OnceLock<Mutex<HashMap<ModuleKey, Arc<CudaModule>>>> = OnceLock::new();
    let modules = MODULES.get_or_init(|| Mutex::new(HashMap::new()));
    let key = (dev.id(), src.name);
    if let Some(m) = modules.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(m.clone());
    }
    let ctx = dev.cuda_stream().context().clone();
    let (major, minor) = ctx.compute_capability().w()?;
    let arch = (major * 10 + minor) as u32;
    if !src.runs_on(arch) {
        return Err(err(format!(
            "{}: built for sm_{}a only, this GPU is sm_{arch}",
            src.name,
            src.arch_specific.unwrap_or(0)
        )));
    }
    let cubin = nvrtc()?
        .compile_cached(
            src.source,
            src.name,
            arch,
            src.arch_specific.is_some(),
            &default_cache_dir(),
        )
        .map_err(err)?;
    let m = ctx.load_module(Ptx::from_binary(cubin)).w()?;
    modules
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, m.clone());
    Ok(m)
}

/// A contiguous view's element range, or an error naming `what`.
fn range(l: &Layout, what: &str) -> Result<std::ops::Range<usize>> {
    l.contiguous_offsets()
        .map(|(a, b)| a..b)
        .ok_or_else(|| err(format!("{what} must be contiguous")))
}

/// A kernel variant's on/off switch `var`: `1` on, `0` off, unset (or anything else) the given
/// default. Read once per process.
fn env_switch(var: &'static str, cell: &'static OnceLock<bool>, default: bool) -> bool {
    *cell.get_or_init(|| match std::env::var(var).as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => default,
    })
}

/// `TRELLIS_FLASH_ASYNC`: whether flash blocks double-buffer K/V through cp.async (`1`, the
/// default: on an H100 242 against 204 TFLOP/s for 128-row blocks on the SS flow's
/// self-attention, 181 against 121 for 64-row ones) or load one tile at a time through registers
/// (`0`).
pub fn flash_async() -> bool {
    static C: OnceLock<bool> = OnceLock::new();
    env_switch("TRELLIS_FLASH_ASYNC", &C, true)
}

/// `TRELLIS_FUSED_QNORM`: whether [`flash_attention_rows_qnorm`] applies the queries'
/// MultiHeadRMSNorm inside the flash kernel as it loads them (`1`, the default: no
/// separate launch reading and writing all of q) or normalises q in its own launch first (`0`,
/// for measuring the difference). Read once per process.
pub fn fused_qnorm() -> bool {
    static C: OnceLock<bool> = OnceLock::new();
    env_switch("TRELLIS_FUSED_QNORM", &C, true)
}

/// How the flash kernel tiles the queries: rows per block and whether K/V are double-buffered
/// through cp.async (the mma.sync kernel, any sm_80+ GPU), or the Hopper kernel (wgmma, sm_90
/// only: 64 rows per warpgroup, K/V tiles of `wgmma_keys` keys, always cp.async; pipelined when
/// `prefetch` > 0: each tile's S = Q K^T goes out with the previous tile's P V and the softmax
/// overlaps it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlashTiling {
    pub rows: usize,
    pub staged_async: bool,
    /// Keys per K/V tile of the wgmma kernel (64 or 128); 0 for the mma.sync kernel.
    pub wgmma_keys: usize,
    /// The wgmma kernel's pipelined builds: K/V copies this many tiles ahead (1 or 2; 0 for the
    /// serial build and the mma.sync kernel).
    pub prefetch: usize,
}

impl FlashTiling {
    /// Every tiling a kernel is built for.
    pub const VARIANTS: [FlashTiling; 17] = [
        Self::new(64, false),
        Self::new(128, false),
        Self::new(64, true),
        Self::new(128, true),
        Self::wgmma(64, 64),
        Self::wgmma(128, 64),
        Self::wgmma(192, 64),
        Self::wgmma(64, 128),
        Self::wgmma(128, 128),
        Self::wgmma(192, 128),
        Self::wgmma_pipelined(64, 64),
        Self::wgmma_pipelined(128, 64),
        Self::wgmma_pipelined(64, 128),
        Self::wgmma_pipelined(128, 128),
        Self::wgmma_prefetch2(128),
        Self::wgmma_prefetch2(192),
        Self::wgmma_prefetch2(256),
    ];

    /// The mma.sync kernel with `rows` (64 or 128) query rows per block.
    pub const fn new(rows: usize, staged_async: bool) -> Self {
        Self {
            rows,
            staged_async,
            wgmma_keys: 0,
            prefetch: 0,
        }
    }

    /// The wgmma kernel: `rows` (64, 128 or 192: one warpgroup per 64) per block, `keys` per
    /// K/V tile (the builds: [`Self::VARIANTS`]).
    pub const fn wgmma(rows: usize, keys: usize) -> Self {
        Self {
            rows,
            staged_async: true,
            wgmma_keys: keys,
            prefetch: 0,
        }
    }

    /// The pipelined wgmma kernel: `rows` (64 or 128) per block, `keys` (64 or 128) per tile.
    pub const fn wgmma_pipelined(rows: usize, keys: usize) -> Self {
        Self {
            rows,
            staged_async: true,
            wgmma_keys: keys,
            prefetch: 1,
        }
    }

    /// The pipelined wgmma kernel with K/V copied two tiles ahead: `rows` (128, 192 or 256) per
    /// block, 64 keys per tile.
    pub const fn wgmma_prefetch2(rows: usize) -> Self {
        Self {
            rows,
            staged_async: true,
            wgmma_keys: 64,
            prefetch: 2,
        }
    }

    pub const fn is_wgmma(&self) -> bool {
        self.wgmma_keys > 0
    }

    /// The tiling picked for `groups` on a GPU of compute capability `arch` (`major * 10 +
    /// minor`): `TRELLIS_FLASH_TILING` when set; on sm_90 unless [`flash_wgmma`] says no, the
    /// pipelined wgmma kernel copying K/V two tiles ahead, with 256 rows per block (four
    /// warpgroups sharing each K/V tile) where [`flash_rows_for`] picks 128 and 256-row tiles
    /// would add at most 1/8 padded rows, else 128; otherwise [`flash_rows_for`] rows in the
    /// mma.sync kernel with [`flash_async`] staging.
    pub fn for_groups(groups: &[trellis_kernels::attention::AttnGroup], arch: u32) -> Self {
        if let Some(t) = flash_tiling_override() {
            return t;
        }
        let rows = flash_rows_for(groups);
        if arch == 90 && flash_wgmma().unwrap_or(rows == 128) {
            let wide = rows == 128 && 8 * padded_rows(groups, 256) <= 9 * padded_rows(groups, 128);
            return Self::wgmma_prefetch2(if wide { 256 } else { 128 });
        }
        Self::new(rows, flash_async())
    }

    /// Whether this tiling's kernel runs on a GPU of compute capability `arch`.
    pub fn runs_on(&self, arch: u32) -> bool {
        self.source().runs_on(arch)
    }

    /// `64`, `128a`, `128w128`, `128p64`, `128p64d2`, ...: rows, `a` for cp.async, `wN` for
    /// wgmma with N-key tiles, `pN` for the pipelined wgmma kernel (`d2`: copies two tiles ahead).
    pub fn label(&self) -> String {
        if self.is_wgmma() {
            return match self.prefetch {
                0 => format!("{}w{}", self.rows, self.wgmma_keys),
                1 => format!("{}p{}", self.rows, self.wgmma_keys),
                d => format!("{}p{}d{d}", self.rows, self.wgmma_keys),
            };
        }
        format!("{}{}", self.rows, if self.staged_async { "a" } else { "" })
    }

    fn source(&self) -> &'static KernelSource {
        if self.is_wgmma() {
            &k::FLASH_ATTENTION_SM90
        } else {
            &k::FLASH_ATTENTION
        }
    }

    /// The kernel entry for a dtype suffix (`f16` / `bf16`) and head dimension.
    fn entry(&self, ty: &str, head_dim: usize) -> String {
        if self.is_wgmma() {
            return format!(
                "flash_wgmma_{}{ty}_d{head_dim}_w{}_n{}",
                match self.prefetch {
                    0 => "",
                    1 => "pipe_",
                    _ => "pipe2_",
                },
                self.rows / 64,
                self.wgmma_keys
            );
        }
        format!(
            "flash_attention_{}{ty}_d{head_dim}_m{}",
            if self.staged_async { "async_" } else { "" },
            self.rows / 64
        )
    }

    /// Threads per block: 4 warps (mma.sync), one warpgroup per 64 rows (wgmma).
    fn threads(&self) -> u32 {
        if self.is_wgmma() {
            (self.rows as u32 / 64) * 128
        } else {
            k::FLASH_THREADS
        }
    }

    /// Dynamic shared memory per block: two stages (pipelined: prefetch + 2) of a K and a V
    /// tile (wgmma), none otherwise.
    fn shared_bytes(&self, head_dim: usize) -> u32 {
        if self.is_wgmma() {
            let stages = if self.prefetch > 0 {
                self.prefetch + 2
            } else {
                2
            };
            (stages * 2 * self.wgmma_keys * head_dim * 2) as u32
        } else {
            0
        }
    }
}

/// `TRELLIS_FLASH_WGMMA`: whether sm_90 GPUs (H100/H200) take the pipelined wgmma attention
/// kernel (K/V two tiles ahead, see [`FlashTiling::for_groups`]) or the mma.sync one every sm_80+
/// GPU runs. `1`: wgmma for every call; `0`: never; unset: wgmma wherever [`flash_rows_for`]
/// picks 128-row blocks (the mma.sync kernel keeps the short windows). Measured on an H100
/// (`bench attention`, session 15, call 7), TFLOP/s of `256p64d2` / `128p64d2` / mma.sync
/// `128a`: SS flow self-attention 2 x 4096 307.6 / 263.9 / 247.9, SLat varlen 287.8 / 249.1 /
/// 229.9, SS cross 252.0 / 225.4 / 219.4, text-xlarge self (head dim 80) 252.0 / 230.7 / 224.1,
/// decoder windows 126.1 / 137.4 / 138.2; image-large at high with `256p64d2` for every call: SS
/// flow 13.3 against 14.8 ms per forward, SLat flow 15.3 against 17.2.
pub fn flash_wgmma() -> Option<bool> {
    static C: OnceLock<Option<bool>> = OnceLock::new();
    *C.get_or_init(|| match std::env::var("TRELLIS_FLASH_WGMMA").as_deref() {
        Ok("1") => Some(true),
        Ok("0") => Some(false),
        _ => None,
    })
}

/// The compute capability of `dev` as `major * 10 + minor` (0 when the driver does not say).
pub fn device_arch(dev: &CudaDevice) -> u32 {
    type Entry = (candle_core::cuda_backend::DeviceId, u32);
    static CACHE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
    let id = dev.id();
    let mut c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, a)) = c.iter().find(|(d, _)| *d == id) {
        return *a;
    }
    let arch = dev
        .cuda_stream()
        .context()
        .compute_capability()
        .map(|(a, b)| (a * 10 + b) as u32)
        .unwrap_or(0);
    c.push((id, arch));
    arch
}

/// `TRELLIS_FLASH_TILING`: one of [`FlashTiling::VARIANTS`] by its label (`64`, `128a`, ...) for
/// every flash call (experiments); unset or unknown, the tiling is picked per call. Read once per
/// process.
fn flash_tiling_override() -> Option<FlashTiling> {
    static C: OnceLock<Option<FlashTiling>> = OnceLock::new();
    *C.get_or_init(|| {
        let v = std::env::var("TRELLIS_FLASH_TILING").ok()?;
        FlashTiling::VARIANTS
            .into_iter()
            .find(|t| t.label() == v.trim())
    })
}

/// `TRELLIS_FLASH_ROWS`: query rows per flash-attention block, `64` or `128`; unset (or anything
/// else), [`flash_rows_for`] picks per call. Read once per process.
fn flash_rows_override() -> Option<usize> {
    static C: OnceLock<Option<usize>> = OnceLock::new();
    *C.get_or_init(|| match std::env::var("TRELLIS_FLASH_ROWS").as_deref() {
        Ok("64") => Some(64),
        Ok("128") => Some(128),
        _ => None,
    })
}

/// Query rows per flash block for these groups: 128 (two 16-row fragments per warp, each K/V
/// fragment read from shared memory feeds two products) unless the groups are so short that
/// 128-row tiles would compute more than 1/8 more padded rows than 64-row ones (small windows).
pub fn flash_rows_for(groups: &[trellis_kernels::attention::AttnGroup]) -> usize {
    if let Some(r) = flash_rows_override() {
        return r;
    }
    if 8 * padded_rows(groups, 128) <= 9 * padded_rows(groups, 64) {
        128
    } else {
        64
    }
}

/// Query rows the groups take in tiles of `rows` (each group's rows rounded up).
fn padded_rows(groups: &[trellis_kernels::attention::AttnGroup], rows: usize) -> usize {
    groups.iter().map(|g| g.q.len().div_ceil(rows) * rows).sum()
}

/// `TRELLIS_CONV_ROWS`: rows per tile of the tensor-core sparse conv, `128` (default: each weight
/// tile read for twice the rows; on an H100 the SLat flow's forward took 21.8 ms against 22.9 ms
/// with `64`) or `64`. Read once per process.
pub fn conv_tile_rows() -> usize {
    static C: OnceLock<usize> = OnceLock::new();
    *C.get_or_init(|| match std::env::var("TRELLIS_CONV_ROWS").as_deref() {
        Ok("64") => 64,
        _ => 128,
    })
}

/// `TRELLIS_CONV_ASYNC`: the tensor-core sparse conv's tile staging (default: two stages through
/// cp.async; on an H100 the SLat flow's forward took 26.6 ms with it against 30.0 ms with one
/// stage through registers, `TRELLIS_CONV_ASYNC=0`).
pub fn conv_async() -> bool {
    static C: OnceLock<bool> = OnceLock::new();
    env_switch("TRELLIS_CONV_ASYNC", &C, true)
}

/// The tensor-core sparse conv's kernel family and tiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvTile {
    /// `sparse_conv_mma_*`: 32-channel reduction steps, `rows` (64 or 128) x 64 outputs per block
    /// of 4 warps, two cp.async stages (`staged_async`) or one through registers.
    Mma { rows: usize, staged_async: bool },
    /// `sparse_conv_k64_*`: 64-channel reduction steps through `stages` (2 or 3) cp.async stages
    /// in dynamic shared memory; `rows` (64 or 128) x 128 outputs per block when Cout >= 128
    /// (8 warps for 128 rows, 4 for 64), x 64 otherwise (4 warps).
    K64 { rows: usize, stages: usize },
    /// GEMM first, then a gather: `y = feats · W_k` for all kernel offsets in one dense cuBLASLt
    /// product (`[sources, K·Cout]`), then `sparse_conv_gather_sum_*` adds up each row's
    /// neighbours' slices of `y`. Every offset of every source row is multiplied (no skipping),
    /// but at cuBLAS's rate, and a subdivided input multiplies its coarse rows only.
    GemmGather,
}

impl ConvTile {
    /// The `TRELLIS_CONV_TILE` values of the `K64` tilings.
    pub const K64_LABELS: [(&'static str, ConvTile); 3] = [
        (
            "k64",
            ConvTile::K64 {
                rows: 128,
                stages: 3,
            },
        ),
        (
            "k64s2",
            ConvTile::K64 {
                rows: 128,
                stages: 2,
            },
        ),
        (
            "k64m64",
            ConvTile::K64 {
                rows: 64,
                stages: 3,
            },
        ),
    ];

    /// The `sparse_conv_k64_*` shape this tiling takes for `cout` output channels (`None` for
    /// [`ConvTile::Mma`]).
    pub fn k64_shape(&self, cout: usize) -> Option<k::ConvK64Shape> {
        let ConvTile::K64 { rows, stages } = *self else {
            return None;
        };
        let cols = if cout >= 128 { 128 } else { 64 };
        k::SPARSE_CONV_K64_SHAPES
            .into_iter()
            .find(|s| s.rows == rows && s.cols == cols && s.stages == stages)
    }
}

/// The tensor-core sparse conv's kernels for a conv with `cout` output channels. Unset
/// `TRELLIS_CONV_TILE`: `k64` (64-channel steps, 3 cp.async stages, 128 x 128 tiles of 8 warps)
/// when Cout >= 256, else the `sparse_conv_mma_*` kernels with [`conv_tile_rows`] rows and
/// [`conv_async`] staging. Measured on an H100 (`bench sparse-conv`, session 10): the SLat flow's
/// 1024 -> 1024 conv on 3,928 rows 1.022 ms with `k64` against 1.217 ms, 128 -> 1024 0.149 against
/// 0.171, but 2048 -> 128 on 20,000 rows 2.007 against 1.913 and 128 -> 128 0.151 against 0.139.
/// `TRELLIS_CONV_TILE` forces one build for every conv: `old` the `sparse_conv_mma_*` kernels,
/// `k64`, `k64s2` (2 stages) or `k64m64` (64-row tiles). Read once per process.
pub fn conv_tile_for(cout: usize) -> ConvTile {
    static C: OnceLock<Option<ConvTile>> = OnceLock::new();
    let forced = *C.get_or_init(|| {
        let v = std::env::var("TRELLIS_CONV_TILE").unwrap_or_default();
        if v.trim() == "old" {
            return Some(mma_conv_tile());
        }
        ConvTile::K64_LABELS
            .into_iter()
            .find(|(l, _)| *l == v.trim())
            .map(|(_, t)| t)
    });
    forced.unwrap_or(if cout >= 256 {
        ConvTile::K64 {
            rows: 128,
            stages: 3,
        }
    } else {
        mma_conv_tile()
    })
}

/// Most bytes the GEMM-first conv's intermediate `[sources, K, Cout]` may take (above it the
/// implicit-GEMM kernels run).
pub const CONV_GEMM_MAX_BYTES: usize = 320 << 20;

/// The sparse conv's kernels for one conv of `cout` output channels, kernel `volume`, on
/// `sources` input rows. [`ConvTile::GemmGather`] whenever its intermediate
/// `[sources, K, Cout]` fits [`CONV_GEMM_MAX_BYTES`], else [`conv_tile_for`]. Measured on an H100
/// (`bench sparse-conv`, session 11) against the best implicit-GEMM build: 2048 -> 128 on a
/// subdivided input 0.091 against 1.931 ms, 1024 -> 1024 on 3,928 rows 0.366 against 1.011,
/// 128 -> 128 on 20,000 rows 0.110 against 0.139, 128 -> 1024 on 3,928 rows 0.144 against 0.145.
/// `TRELLIS_CONV_GEMM=0` never takes the GEMM-first path. Read once per process.
pub fn conv_plan(cout: usize, volume: usize, sources: usize) -> ConvTile {
    static C: OnceLock<bool> = OnceLock::new();
    let on = env_switch("TRELLIS_CONV_GEMM", &C, true);
    let fits = sources
        .saturating_mul(volume)
        .saturating_mul(cout)
        .saturating_mul(2)
        <= CONV_GEMM_MAX_BYTES;
    if on && fits && cout.is_multiple_of(8) {
        ConvTile::GemmGather
    } else {
        conv_tile_for(cout)
    }
}

/// The GEMM-first conv's weight: `[Cout, K, Cin]` reordered to `[K·Cout, Cin]` (row `k·Cout + o`
/// is `weight[o, k, :]`), so `feats · wᵀ` is `[sources, K, Cout]`.
pub fn conv_gemm_weight(weight: &Tensor) -> anyhow::Result<Tensor> {
    let (cout, volume, cin) = weight.dims3()?;
    Ok(weight
        .permute((1, 0, 2))?
        .contiguous()?
        .reshape((volume * cout, cin))?)
}

/// The GEMM-first sparse conv ([`ConvTile::GemmGather`]): `feats` `[sources, Cin]` f16/bf16,
/// `w_kc` from [`conv_gemm_weight`] in the same dtype, `nbr` int32 `[rows * volume]` (−1 = no
/// neighbour; source row `nbr >> src_shift`), optional float32 `bias` `[Cout]`; `[rows, Cout]`
/// in the feats' dtype.
pub fn sparse_conv_gemm_gather(
    feats: &Tensor,
    nbr: &Tensor,
    w_kc: &Tensor,
    bias: Option<&Tensor>,
    src_shift: u32,
    volume: usize,
) -> anyhow::Result<Tensor> {
    use super::cuda_fused::{device_of, matmul_lt, view, wrap};
    let (sources, cin) = feats.dims2()?;
    let (kc, wcin) = w_kc.dims2()?;
    let dtype = feats.dtype();
    anyhow::ensure!(
        wcin == cin && volume > 0 && kc.is_multiple_of(volume),
        "sparse_conv_gemm_gather: weight [{kc}, {wcin}] for {cin} channels and volume {volume}"
    );
    let cout = kc / volume;
    anyhow::ensure!(
        cout.is_multiple_of(8) && matches!(dtype, DType::F16 | DType::BF16),
        "sparse_conv_gemm_gather: {dtype:?} with {cout} output channels (f16/bf16, Cout % 8 == 0)"
    );
    anyhow::ensure!(
        nbr.dtype() == DType::I32 && nbr.is_contiguous(),
        "sparse_conv: neighbour map must be contiguous int32"
    );
    if let Some(b) = bias {
        anyhow::ensure!(
            b.dtype() == DType::F32 && b.elem_count() == cout && b.is_contiguous(),
            "sparse_conv_gemm_gather: bias must be float32 [{cout}]"
        );
    }
    let n = nbr.elem_count();
    anyhow::ensure!(
        n.is_multiple_of(volume),
        "sparse_conv: neighbour map of {n} entries for kernel volume {volume}"
    );
    let rows = n / volume;
    let y = matmul_lt(&feats.contiguous()?, &w_kc.contiguous()?)?;
    debug_assert_eq!(y.dims(), &[sources, kc]);
    let dev = device_of(feats)?;
    let ty = if dtype == DType::F16 { "f16" } else { "bf16" };
    let func = module(&dev, &k::SPARSE_CONV)?
        .load_function(&format!("sparse_conv_gather_sum_{ty}"))
        .w()?;
    let stream = dev.cuda_stream();
    let threads = 256u32;
    let items = rows * (cout / 8);
    let cfg = LaunchConfig {
        grid_dim: (u32::try_from(items.div_ceil(threads as usize))?, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let (rows_i, vol_i, shift_i, cout_i) = (
        i32_arg(rows, "rows")?,
        i32_arg(volume, "volume")?,
        i32::try_from(src_shift)?,
        i32_arg(cout, "cout")?,
    );
    macro_rules! go {
        ($t:ty) => {{
            // SAFETY: the kernel writes every [rows, cout] element (one thread per 8 channels).
            let out = unsafe { dev.alloc::<$t>(rows * cout)? };
            let (gy, ly) = y.storage_and_layout();
            let (gn, ln) = nbr.storage_and_layout();
            let gb = bias.map(|b| b.storage_and_layout());
            let ys = view::<$t>(&gy, ly, "products")?;
            let ns = view::<i32>(&gn, ln, "neighbour map")?;
            let bs = match &gb {
                Some((g, l)) => Some(view::<f32>(g, l, "bias")?),
                None => None,
            };
            let null = 0u64;
            let mut b = stream.launch_builder(&func);
            b.arg(&ys).arg(&ns).arg(&rows_i).arg(&vol_i).arg(&shift_i);
            match &bs {
                Some(v) => b.arg(v),
                None => b.arg(&null),
            };
            b.arg(&cout_i).arg(&out);
            if items > 0 {
                // SAFETY: argument types and order match `sparse_conv_gather_sum_*`; y holds
                // [sources, volume, cout] (the map's sources are rows of `feats`, as for every
                // conv kernel), 16-byte aligned rows (cout % 8 == 0).
                unsafe { b.launch(cfg) }.w()?;
            }
            Ok(wrap(out, &dev, &[rows, cout]))
        }};
    }
    if dtype == DType::F16 {
        go!(half::f16)
    } else {
        go!(half::bf16)
    }
}

/// The `sparse_conv_mma_*` kernels as [`conv_tile_rows`] and [`conv_async`] pick them.
fn mma_conv_tile() -> ConvTile {
    ConvTile::Mma {
        rows: conv_tile_rows(),
        staged_async: conv_async(),
    }
}

/// `TRELLIS_CONV_ORDER`: whether the `sparse_conv_k64_*` kernels compute the rows of a geometry
/// in the order of their neighbour masks (`1`: the geometry's cached
/// [`crate::modules::sparse::tensor::Geometry::conv_order_cuda`], so a tile's rows share more
/// empty kernel offsets; on the SLat flow's 64^3 shell the lead measured 26.8 -> ~23.6 active
/// offsets per 128-row tile) or in storage order (`0`, the default: on an H100 the SLat flow took
/// 21.0 against 21.1 ms per forward with `k64`, and the order is made on the host for every new
/// geometry, which the decoders pay per job: job 2006.9 against 1950.7 ms). The
/// `sparse_conv_mma_*` kernels always use storage order. Read once per process.
pub fn conv_order() -> bool {
    static C: OnceLock<bool> = OnceLock::new();
    env_switch("TRELLIS_CONV_ORDER", &C, false)
}

/// Lets `func` launch with `bytes` of dynamic shared memory: a block's static plus dynamic
/// shared memory above 48 KB must be allowed per function (the k64 64-row conv builds have
/// 48 KB dynamic plus their static tables), so any dynamic amount is declared.
fn allow_dynamic_shared(func: &CudaFunction, bytes: u32) -> Result<()> {
    if bytes > 0 {
        use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum as A;
        let bytes = i32::try_from(bytes).map_err(|_| err("dynamic shared memory above 2 GiB"))?;
        func.set_attribute(A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes)
            .w()?;
    }
    Ok(())
}

fn i32_arg(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| err(format!("{what} = {v} does not fit in int32")))
}

struct SparseConvOp {
    rows: usize,
    cin: usize,
    volume: usize,
    cout: usize,
}

impl CustomOp3 for SparseConvOp {
    fn name(&self) -> &'static str {
        "trellis-sparse-conv"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        Err(err("trellis-sparse-conv: CUDA only"))
    }

    fn cuda_fwd(
        &self,
        feats: &CudaStorage,
        lf: &Layout,
        nbr: &CudaStorage,
        ln: &Layout,
        weight: &CudaStorage,
        lw: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = feats.device().clone();
        let f = feats.as_cuda_slice::<f32>()?.slice(range(lf, "feats")?);
        let n = nbr
            .as_cuda_slice::<i32>()?
            .slice(range(ln, "neighbour map")?);
        let w = weight.as_cuda_slice::<f32>()?.slice(range(lw, "weight")?);
        let out = unsafe { dev.alloc::<f32>(self.rows * self.cout) }?;
        let func = module(&dev, &k::SPARSE_CONV)?
            .load_function("sparse_conv_gather_gemm")
            .w()?;
        let stream = dev.cuda_stream();
        let (cin, rows, volume, cout) = (
            i32_arg(self.cin, "cin")?,
            i32_arg(self.rows, "rows")?,
            i32_arg(self.volume, "volume")?,
            i32_arg(self.cout, "cout")?,
        );
        let has_bias = 0i32;
        let tile = k::SPARSE_CONV_TILE;
        let cfg = LaunchConfig {
            grid_dim: (
                (self.cout as u32).div_ceil(tile),
                (self.rows as u32).div_ceil(tile),
                1,
            ),
            block_dim: (k::SPARSE_CONV_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&func);
        b.arg(&f)
            .arg(&cin)
            .arg(&n)
            .arg(&rows)
            .arg(&volume)
            .arg(&w)
            .arg(&w) // bias pointer (unused: has_bias = 0; the bias is added by candle)
            .arg(&has_bias)
            .arg(&cout)
            .arg(&out);
        // SAFETY: argument types and counts match the kernel's signature; every buffer holds the
        // elements the kernel reads/writes (checked by `sparse_conv`).
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((self.rows, self.cout)),
        ))
    }
}

/// `out[rows, Cout] = sum_k feats[nbr[i, k]] · weight[:, k, :]ᵀ (+ bias)` on the GPU: `feats`
/// `[N_in, Cin]`, `nbr` int32 `[rows * K]` (−1 = no neighbour), `weight` `[Cout, K, Cin]` f32.
pub fn sparse_conv(
    feats: &Tensor,
    nbr: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> anyhow::Result<Tensor> {
    let (cout, volume, cin) = weight.dims3()?;
    let (_, fc) = feats.dims2()?;
    anyhow::ensure!(
        fc == cin,
        "sparse_conv: feats have {fc} channels, weight {cin}"
    );
    let n = nbr.elem_count();
    anyhow::ensure!(
        volume > 0 && n.is_multiple_of(volume),
        "sparse_conv: neighbour map of {n} entries for kernel volume {volume}"
    );
    anyhow::ensure!(
        nbr.dtype() == DType::I32,
        "sparse_conv: neighbour map must be int32"
    );
    let op = SparseConvOp {
        rows: n / volume,
        cin,
        volume,
        cout,
    };
    let feats = feats.to_dtype(DType::F32)?.contiguous()?;
    let weight = weight.to_dtype(DType::F32)?.contiguous()?;
    let out = feats.apply_op3_no_bwd(&nbr.contiguous()?, &weight, &op)?;
    Ok(match bias {
        Some(b) => out.broadcast_add(&b.to_dtype(DType::F32)?)?,
        None => out,
    })
}

/// The tensor-core sparse conv (`sparse_conv_mma_*` / `sparse_conv_k64_*`, [`conv_tile_for`]):
/// `feats` `[N_in, Cin]` and `weight` `[Cout, K, Cin]` in float16 or bfloat16, `nbr` int32
/// `[rows * K]` (−1 = no neighbour; source row `nbr >> src_shift`), optional float32 `bias`
/// `[Cout]`; `[rows, Cout]` in the feats' dtype. Cin and Cout must be multiples of 8.
pub fn sparse_conv_half(
    feats: &Tensor,
    nbr: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    src_shift: u32,
) -> anyhow::Result<Tensor> {
    let (cout, volume, _) = weight.dims3()?;
    let tile = conv_plan(cout, volume, feats.dim(0)?);
    sparse_conv_half_with(feats, nbr, weight, bias, src_shift, tile, None)
}

/// [`sparse_conv_half`] with the `sparse_conv_mma_*` kernels of `tile_rows` (64 or 128) rows per
/// tile and [`conv_async`] staging.
pub fn sparse_conv_half_tiled(
    feats: &Tensor,
    nbr: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    src_shift: u32,
    tile_rows: usize,
) -> anyhow::Result<Tensor> {
    let tile = ConvTile::Mma {
        rows: tile_rows,
        staged_async: conv_async(),
    };
    sparse_conv_half_with(feats, nbr, weight, bias, src_shift, tile, None)
}

/// [`sparse_conv_half`] with an explicit `tile`, and for [`ConvTile::K64`] an optional row
/// `order`: an int32 permutation `[rows]` of the rows (tile row m computes row `order[row0 + m]`:
/// reads its neighbour-map row, writes its output row), e.g. `Geometry::conv_order_cuda`; a row
/// it leaves out is not written (entries out of range are skipped by the kernel). The
/// [`ConvTile::Mma`] kernels ignore `order` (the result is the same; only the grouping differs).
pub fn sparse_conv_half_with(
    feats: &Tensor,
    nbr: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    src_shift: u32,
    tile: ConvTile,
    order: Option<&Tensor>,
) -> anyhow::Result<Tensor> {
    use super::cuda_fused::{device_of, view, wrap};
    if let ConvTile::Mma { rows, .. } = tile {
        anyhow::ensure!(
            rows == 64 || rows == 128,
            "sparse_conv_half: {rows} rows per tile (64 or 128)"
        );
    }
    let (cout, volume, cin) = weight.dims3()?;
    let (_, fc) = feats.dims2()?;
    let dtype = feats.dtype();
    anyhow::ensure!(
        fc == cin,
        "sparse_conv: feats have {fc} channels, weight {cin}"
    );
    anyhow::ensure!(
        cin % 8 == 0 && cout % 8 == 0,
        "sparse_conv_half: channels {cin} -> {cout} must be multiples of 8"
    );
    anyhow::ensure!(
        weight.dtype() == dtype && matches!(dtype, DType::F16 | DType::BF16),
        "sparse_conv_half: feats {dtype:?} and weight {:?} must both be f16 or bf16",
        weight.dtype()
    );
    anyhow::ensure!(
        nbr.dtype() == DType::I32,
        "sparse_conv: neighbour map must be int32"
    );
    for (t, what) in [(feats, "feats"), (weight, "weight"), (nbr, "neighbour map")] {
        anyhow::ensure!(
            t.is_contiguous() && t.layout().start_offset() % 8 == 0,
            "sparse_conv_half: {what} must be contiguous and 16-byte aligned"
        );
    }
    if let Some(b) = bias {
        anyhow::ensure!(
            b.dtype() == DType::F32 && b.elem_count() == cout && b.is_contiguous(),
            "sparse_conv_half: bias must be float32 [{cout}]"
        );
    }
    let n = nbr.elem_count();
    anyhow::ensure!(
        volume > 0 && n.is_multiple_of(volume),
        "sparse_conv: neighbour map of {n} entries for kernel volume {volume}"
    );
    anyhow::ensure!(
        volume <= k::SPARSE_CONV_MMA_MAX_VOLUME,
        "sparse_conv_half: kernel volume {volume} above {}",
        k::SPARSE_CONV_MMA_MAX_VOLUME
    );
    let rows = n / volume;
    if let Some(o) = order {
        anyhow::ensure!(
            o.dtype() == DType::I32 && o.elem_count() == rows && o.is_contiguous(),
            "sparse_conv_half: row order must be int32 [{rows}]"
        );
    }
    let dev = device_of(feats)?;
    let ty = if dtype == DType::F16 { "f16" } else { "bf16" };
    // (entry, rows and columns per block, threads, dynamic shared memory)
    let (entry, tile_rows, tile_cols, threads, smem) = match tile {
        ConvTile::Mma { rows, staged_async } => (
            format!(
                "sparse_conv_mma_{}{ty}{}",
                if staged_async { "async_" } else { "" },
                if rows == 128 { "_m128" } else { "" }
            ),
            rows,
            k::SPARSE_CONV_MMA_COLS,
            k::SPARSE_CONV_MMA_THREADS,
            0u32,
        ),
        ConvTile::K64 { rows, stages } => {
            let s = tile.k64_shape(cout).ok_or_else(|| {
                anyhow::anyhow!("sparse_conv_half: no k64 build of {rows} rows, {stages} stages")
            })?;
            (
                s.entry(ty),
                s.rows,
                s.cols,
                s.threads(),
                s.dynamic_smem_bytes(),
            )
        }
        ConvTile::GemmGather => {
            let w_kc = conv_gemm_weight(weight)?;
            return sparse_conv_gemm_gather(feats, nbr, &w_kc, bias, src_shift, volume);
        }
    };
    let k64 = matches!(tile, ConvTile::K64 { .. });
    let func = module(&dev, &k::SPARSE_CONV)?.load_function(&entry).w()?;
    allow_dynamic_shared(&func, smem)?;
    let stream = dev.cuda_stream();
    let row_tiles = u32::try_from(rows.div_ceil(tile_rows))?;
    let col_tiles = u32::try_from(cout.div_ceil(tile_cols))?;
    let cfg = LaunchConfig {
        grid_dim: (col_tiles, row_tiles, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    };
    let (cin_i, rows_i, vol_i, cout_i, shift_i) = (
        i32_arg(cin, "cin")?,
        i32_arg(rows, "rows")?,
        i32_arg(volume, "volume")?,
        i32_arg(cout, "cout")?,
        i32::try_from(src_shift)?,
    );
    macro_rules! go {
        ($t:ty) => {{
            // SAFETY: the kernel writes every [rows, cout] element (cout % 8 == 0, full tiles
            // masked per pair of columns; with an order, a permutation of the rows).
            let out = unsafe { dev.alloc::<$t>(rows * cout)? };
            let (gf, lf) = feats.storage_and_layout();
            let (gn, ln) = nbr.storage_and_layout();
            let (gw, lw) = weight.storage_and_layout();
            let gb = bias.map(|b| b.storage_and_layout());
            let gord = order.map(|o| o.storage_and_layout());
            let fs = view::<$t>(&gf, lf, "feats")?;
            let ns = view::<i32>(&gn, ln, "neighbour map")?;
            let ws = view::<$t>(&gw, lw, "weight")?;
            let bs = match &gb {
                Some((g, l)) => Some(view::<f32>(g, l, "bias")?),
                None => None,
            };
            let os = match &gord {
                Some((g, l)) => Some(view::<i32>(g, l, "row order")?),
                None => None,
            };
            let null = 0u64;
            let mut b = stream.launch_builder(&func);
            b.arg(&fs).arg(&cin_i).arg(&ns);
            if k64 {
                match &os {
                    Some(v) => b.arg(v),
                    None => b.arg(&null),
                };
            }
            b.arg(&rows_i).arg(&vol_i).arg(&shift_i).arg(&ws);
            match &bs {
                Some(v) => b.arg(v),
                None => b.arg(&null),
            };
            b.arg(&cout_i).arg(&out);
            if rows > 0 {
                // SAFETY: argument types and order match `sparse_conv_mma_*` (no order) and
                // `sparse_conv_k64_*` (the order after nbr); shapes, dtypes and 16-byte alignment
                // checked above; the dynamic shared memory allowed above.
                unsafe { b.launch(cfg) }.w()?;
            }
            Ok(wrap(out, &dev, &[rows, cout]))
        }};
    }
    if dtype == DType::F16 {
        go!(half::f16)
    } else {
        go!(half::bf16)
    }
}

struct AttentionOp {
    nq: usize,
    heads: usize,
    d: usize,
    dv: usize,
    row_group: Vec<i32>,
    kv_start: Vec<i32>,
    kv_end: Vec<i32>,
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "trellis-varlen-attention"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        Err(err("trellis-varlen-attention: CUDA only"))
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        lq: &Layout,
        kk: &CudaStorage,
        lk: &Layout,
        v: &CudaStorage,
        lv: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = q.device().clone();
        let qs = q.as_cuda_slice::<f32>()?.slice(range(lq, "q")?);
        let ks = kk.as_cuda_slice::<f32>()?.slice(range(lk, "k")?);
        let vs = v.as_cuda_slice::<f32>()?.slice(range(lv, "v")?);
        let stream = dev.cuda_stream();
        let rg = stream.clone_htod(&self.row_group).w()?;
        let ks0 = stream.clone_htod(&self.kv_start).w()?;
        let ks1 = stream.clone_htod(&self.kv_end).w()?;
        let out = unsafe { dev.alloc::<f32>(self.nq * self.heads * self.dv) }?;
        let func = module(&dev, &k::ATTENTION)?
            .load_function("varlen_attention")
            .w()?;
        let (nq, heads, d, dv) = (
            i32_arg(self.nq, "query rows")?,
            i32_arg(self.heads, "heads")?,
            i32_arg(self.d, "head dim")?,
            i32_arg(self.dv, "value dim")?,
        );
        let scale = 1.0f32 / (self.d as f32).sqrt();
        let warps = (self.nq * self.heads) as u64;
        let per_block = (k::ATTENTION_THREADS / 32) as u64;
        let blocks = u32::try_from(warps.div_ceil(per_block).max(1))
            .map_err(|_| err("varlen attention: too many query rows"))?;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (k::ATTENTION_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&func);
        b.arg(&qs)
            .arg(&ks)
            .arg(&vs)
            .arg(&rg)
            .arg(&ks0)
            .arg(&ks1)
            .arg(&nq)
            .arg(&heads)
            .arg(&d)
            .arg(&dv)
            .arg(&scale)
            .arg(&out);
        // SAFETY: argument types and counts match the kernel's signature; sizes checked by
        // `varlen_attention`.
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((self.nq, self.heads, self.dv)),
        ))
    }
}

/// Checks every group against `nq` query rows and `nk` keys and returns the groups' key ranges
/// as int32 (`kv_start`, `kv_end`), as both attention kernels take them.
fn kv_ranges(
    groups: &[trellis_kernels::attention::AttnGroup],
    nq: usize,
    nk: usize,
    what: &str,
) -> anyhow::Result<(Vec<i32>, Vec<i32>)> {
    let mut kv_start = Vec::with_capacity(groups.len());
    let mut kv_end = Vec::with_capacity(groups.len());
    for (g, grp) in groups.iter().enumerate() {
        anyhow::ensure!(
            grp.q.start <= grp.q.end
                && grp.q.end <= nq
                && grp.kv.end <= nk
                && grp.kv.start <= grp.kv.end,
            "{what}: group {g} ({:?}, {:?}) out of range",
            grp.q,
            grp.kv
        );
        kv_start.push(i32::try_from(grp.kv.start)?);
        kv_end.push(i32::try_from(grp.kv.end)?);
    }
    Ok((kv_start, kv_end))
}

/// `out[Nq, H, Dv]`: per group, `softmax(q kᵀ / sqrt(D)) v` per head, on the GPU in f32; query
/// rows that no group names are zero. `q` `[Nq, H, D]`, `k` `[Nk, H, D]`, `v` `[Nk, H, Dv]`.
/// Same contract as `trellis_kernels::attention::varlen_attention`.
pub fn varlen_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    groups: &[trellis_kernels::attention::AttnGroup],
) -> anyhow::Result<Tensor> {
    let (nq, heads, d) = q.dims3()?;
    let (nk, hk, dk) = k.dims3()?;
    let (nv, hv, dv) = v.dims3()?;
    anyhow::ensure!(
        hk == heads && hv == heads && dk == d && nv == nk,
        "varlen attention: q {:?}, k {:?}, v {:?} do not match",
        q.dims(),
        k.dims(),
        v.dims()
    );
    anyhow::ensure!(
        d <= k::ATTENTION_MAX_DIM && dv <= k::ATTENTION_MAX_DIM,
        "varlen attention: head dims {d}/{dv} above {}",
        k::ATTENTION_MAX_DIM
    );
    let (kv_start, kv_end) = kv_ranges(groups, nq, nk, "varlen attention")?;
    let mut row_group = vec![-1i32; nq];
    for (g, grp) in groups.iter().enumerate() {
        for r in grp.q.clone() {
            row_group[r] = i32::try_from(g)?;
        }
    }
    let op = AttentionOp {
        nq,
        heads,
        d,
        dv,
        row_group,
        kv_start,
        kv_end,
    };
    let f = |t: &Tensor| -> anyhow::Result<Tensor> { Ok(t.to_dtype(DType::F32)?.contiguous()?) };
    Ok(f(q)?.apply_op3_no_bwd(&f(k)?, &f(v)?, &op)?)
}

/// Tiles of [`FlashAttentionOp`]: (group, first query row) per block of `rows` rows.
struct FlashAttentionOp {
    nq: usize,
    heads: usize,
    head_dim: usize,
    /// Rows per block, the K/V staging, the kernel (mma.sync or wgmma).
    tiling: FlashTiling,
    /// Logical row -> physical row of q, k, v and out (windows attended in window order).
    perm: Option<Vec<i32>>,
    /// The queries' MultiHeadRMSNorm applied in the kernel (mma.sync tilings only): gamma
    /// (float32 `[heads, head_dim]` contiguous, on q's device) and the scale.
    q_norm: Option<(Tensor, f32)>,
    tile_group: Vec<i32>,
    tile_q0: Vec<i32>,
    q_end: Vec<i32>,
    kv_start: Vec<i32>,
    kv_end: Vec<i32>,
    /// The groups' query ranges cover all `nq` rows (each exactly once).
    covers_all: bool,
}

impl CustomOp3 for FlashAttentionOp {
    fn name(&self) -> &'static str {
        "trellis-flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        Err(err("trellis-flash-attention: CUDA only"))
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        lq: &Layout,
        kk: &CudaStorage,
        lk: &Layout,
        v: &CudaStorage,
        lv: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = q.device().clone();
        let dtype = q.dtype();
        let shape = Shape::from((self.nq, self.heads, self.head_dim));
        let stream = dev.cuda_stream();
        let ty = match dtype {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            other => {
                return Err(err(format!(
                    "flash attention: {other:?} (f16 or bf16 only)"
                )))
            }
        };
        let entry = self.tiling.entry(ty, self.head_dim);
        let heads = i32_arg(self.heads, "heads")?;
        let scale_log2 = std::f32::consts::LOG2_E / (self.head_dim as f32).sqrt();
        let tiles = u32::try_from(self.tile_group.len())
            .map_err(|_| err("flash attention: too many tiles"))?;
        let shared = self.tiling.shared_bytes(self.head_dim);
        let cfg = LaunchConfig {
            grid_dim: (
                tiles,
                u32::try_from(self.heads).map_err(|_| err("flash attention: too many heads"))?,
                1,
            ),
            block_dim: (self.tiling.threads(), 1, 1),
            shared_mem_bytes: shared,
        };
        macro_rules! launch {
            ($t:ty) => {{
                // Rows the tiles do not cover (outside every group) stay zero; when the groups
                // cover every row the kernel writes them all and the memset is skipped.
                let out = if self.covers_all {
                    // SAFETY: every row is written by the tile that owns it.
                    unsafe { dev.alloc::<$t>(shape.elem_count()) }?
                } else {
                    dev.alloc_zeros::<$t>(shape.elem_count())?
                };
                if tiles > 0 {
                    // The five tables (and the permutation) as one device buffer, kept across
                    // calls: a flow's geometry is the same for every block of every step.
                    let parts: [&[i32]; 6] = [
                        &self.tile_group,
                        &self.tile_q0,
                        &self.q_end,
                        &self.kv_start,
                        &self.kv_end,
                        self.perm.as_deref().unwrap_or(&[]),
                    ];
                    let packed = device_tables(&dev, &parts)?;
                    let mut at = 0;
                    let mut next = |len: usize| {
                        let v = packed.slice(at..at + len);
                        at += len;
                        v
                    };
                    let (tg, tq, qe, k0, k1) = (
                        next(parts[0].len()),
                        next(parts[1].len()),
                        next(parts[2].len()),
                        next(parts[3].len()),
                        next(parts[4].len()),
                    );
                    let perm = self.perm.as_ref().map(|p| next(p.len()));
                    let func = module(&dev, self.tiling.source())?
                        .load_function(&entry)
                        .w()?;
                    allow_dynamic_shared(&func, shared)?;
                    let hd = self.head_dim;
                    let (q_at, q_stride) = row_layout(lq, self.heads, hd, "q")?;
                    let (k_at, k_stride) = row_layout(lk, self.heads, hd, "k")?;
                    let (v_at, v_stride) = row_layout(lv, self.heads, hd, "v")?;
                    let qs = q.as_cuda_slice::<$t>()?.slice(q_at..);
                    let ks = kk.as_cuda_slice::<$t>()?.slice(k_at..);
                    let vs = v.as_cuda_slice::<$t>()?.slice(v_at..);
                    let gq = self.q_norm.as_ref().map(|(g, _)| g.storage_and_layout());
                    let gamma = match &gq {
                        Some((g, l)) => Some(super::cuda_fused::view::<f32>(g, l, "q gamma")?),
                        None => None,
                    };
                    let q_scale = self.q_norm.as_ref().map_or(0f32, |(_, s)| *s);
                    let null = 0u64;
                    let mut b = stream.launch_builder(&func);
                    b.arg(&qs)
                        .arg(&ks)
                        .arg(&vs)
                        .arg(&tg)
                        .arg(&tq)
                        .arg(&qe)
                        .arg(&k0)
                        .arg(&k1)
                        .arg(&heads)
                        .arg(&scale_log2)
                        .arg(&out)
                        .arg(&q_stride)
                        .arg(&k_stride)
                        .arg(&v_stride);
                    match &perm {
                        Some(p) => b.arg(p),
                        None => b.arg(&null),
                    };
                    match &gamma {
                        Some(g) => b.arg(g),
                        None => b.arg(&null),
                    };
                    b.arg(&q_scale);
                    // SAFETY: argument types and counts match the kernel's signature; shapes,
                    // ranges and alignment checked by `flash_attention`, gamma's dtype, length
                    // and device by `flash_attention_with`.
                    unsafe { b.launch(cfg) }.w()?;
                }
                Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
            }};
        }
        match dtype {
            DType::F16 => launch!(half::f16),
            _ => launch!(half::bf16),
        }
    }
}

/// A few recently used device-side values in a process-wide list, most recently used last:
/// `hit` picks an entry, `make` builds (key, value) on a miss, which replaces the oldest entry
/// beyond `keep`. The flash-attention tables and the dense grids' neighbour tables are kept this
/// way (keyed by the candle device, so another device's stream never reads an upload it did not
/// wait for).
fn recently_used<K, V: Clone>(
    cache: &Mutex<Vec<(K, V)>>,
    keep: usize,
    hit: impl Fn(&K) -> bool,
    make: impl FnOnce() -> anyhow::Result<(K, V)>,
) -> anyhow::Result<V> {
    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = c.iter().position(|(k, _)| hit(k)) {
        let e = c.remove(i);
        let v = e.1.clone();
        c.push(e);
        return Ok(v);
    }
    let (k, v) = make()?;
    if c.len() >= keep {
        c.remove(0);
    }
    c.push((k, v.clone()));
    Ok(v)
}

/// `parts` concatenated in one int32 device buffer, kept by [`recently_used`] (keyed by device and
/// content): the attention of every block and step of a flow reuses one upload instead of
/// allocating and copying its tables again.
fn device_tables(dev: &CudaDevice, parts: &[&[i32]]) -> Result<Arc<CudaSlice<i32>>> {
    type Key = (candle_core::cuda_backend::DeviceId, Vec<i32>);
    static CACHE: Mutex<Vec<(Key, Arc<CudaSlice<i32>>)>> = Mutex::new(Vec::new());
    let id = dev.id();
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let same = |(d, v): &Key| {
        *d == id && v.len() == total && {
            let mut at = 0;
            parts.iter().all(|p| {
                let ok = v[at..at + p.len()] == **p;
                at += p.len();
                ok
            })
        }
    };
    recently_used(&CACHE, 16, same, || {
        let host: Vec<i32> = parts.concat();
        // (cuda streams need at least one element)
        let upload: &[i32] = if host.is_empty() { &[0] } else { &host };
        let t = Arc::new(dev.cuda_stream().clone_htod(upload).w()?);
        Ok(((id, host), t))
    })
    .map_err(|e| err(format!("flash attention tables: {e}")))
}

/// Attention on the GPU for every caller (dense, cross, variable-length, windowed): the
/// tensor-core kernel where it applies (float16/bfloat16, head dim 64 or 80), else the float32 kernel;
/// the output has `q`'s dtype.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    groups: &[trellis_kernels::attention::AttnGroup],
) -> anyhow::Result<Tensor> {
    let same = k.dtype() == q.dtype() && v.dtype() == q.dtype();
    if same && flash_attention_supports(q.dtype(), q.dim(2)?, v.dim(2)?) {
        return flash_attention(q, k, v, groups);
    }
    Ok(varlen_attention(q, k, v, groups)?.to_dtype(q.dtype())?)
}

/// Where the rows of a `[..., heads, hd]` view start and how far apart they are (elements): the
/// (heads, hd) block must be contiguous, the leading dims must flatten to one row stride, and
/// start and stride must keep the kernel's 16-byte loads aligned.
fn row_layout(l: &Layout, heads: usize, hd: usize, what: &str) -> Result<(usize, i64)> {
    let (dims, st) = (l.dims(), l.stride());
    let r = dims.len();
    let bad = || {
        err(format!(
            "flash attention: {what} layout {dims:?} / {st:?} not supported"
        ))
    };
    if r < 3 || dims[r - 1] != hd || dims[r - 2] != heads || st[r - 1] != 1 || st[r - 2] != hd {
        return Err(bad());
    }
    let row = st[r - 3];
    let mut expect = row;
    for i in (0..r - 3).rev() {
        expect *= dims[i + 1];
        if dims[i] > 1 && st[i] != expect {
            return Err(bad());
        }
    }
    if !l.start_offset().is_multiple_of(8) || row % 8 != 0 {
        return Err(bad());
    }
    Ok((l.start_offset(), row as i64))
}

/// Whether [`row_layout`] accepts `t` (else the caller makes a contiguous copy).
fn rows_ok(t: &Tensor, heads: usize, hd: usize) -> bool {
    row_layout(t.layout(), heads, hd, "").is_ok()
}

/// Whether [`flash_attention`] takes tensors of this dtype and head dimension.
pub fn flash_attention_supports(dtype: DType, head_dim: usize, v_dim: usize) -> bool {
    matches!(dtype, DType::F16 | DType::BF16)
        && k::FLASH_HEAD_DIMS.contains(&head_dim)
        && v_dim == head_dim
}

/// [`varlen_attention`]'s contract on the tensor cores: `q` `[Nq, H, D]`, `k`/`v` `[Nk, H, D]`
/// (D 64 or 80),
/// all float16 or all bfloat16; scores, softmax and accumulation in float32; the output in the
/// inputs' dtype. Query rows that no group names are zero.
pub fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    groups: &[trellis_kernels::attention::AttnGroup],
) -> anyhow::Result<Tensor> {
    flash_attention_rows(q, k, v, groups, None)
}

/// `[rows, heads, dim]` of a `[..., heads, dim]` tensor (leading dims flattened).
fn rows3(t: &Tensor) -> anyhow::Result<(usize, usize, usize)> {
    let d = t.dims();
    anyhow::ensure!(
        d.len() >= 3,
        "flash attention: {:?} is not [..., heads, dim]",
        d
    );
    let r = d.len();
    Ok((d[..r - 2].iter().product(), d[r - 2], d[r - 1]))
}

/// [`flash_attention`] on strided views (`q`, `k`, `v` may be `[..., H, 64]` slices of a packed
/// projection: rows a fixed stride apart, no copy) and, with `perm`, in a permuted row order:
/// logical row `r` (what `groups` index) is physical row `perm[r]` of q, k, v and of the output,
/// so windowed attention needs no gather or scatter. Output `[rows, H, 64]` contiguous.
pub fn flash_attention_rows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    groups: &[trellis_kernels::attention::AttnGroup],
    perm: Option<&[u32]>,
) -> anyhow::Result<Tensor> {
    flash_attention_tiled(q, k, v, groups, perm, None)
}

/// [`flash_attention_rows`] of the queries' MultiHeadRMSNorm: with `q_norm` = (gamma, scale)
/// (gamma float32 `[heads, dim]` contiguous on q's device) the attention of
/// `q / max(||q||, 1e-12) * gamma * scale` (per row and head, float32, rounded to q's dtype) to
/// `k` and `v`, the norm applied by the flash kernel as it loads q (no launch reading and
/// writing all of q; the same values up to the order of the float32 sum of squares), or by
/// `cuda_fused::rms_norm_heads` first under `TRELLIS_FUSED_QNORM=0`.
/// `None`: [`flash_attention_rows`].
pub fn flash_attention_rows_qnorm(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    groups: &[trellis_kernels::attention::AttnGroup],
    perm: Option<&[u32]>,
    q_norm: Option<(&Tensor, f32)>,
) -> anyhow::Result<Tensor> {
    flash_attention_with(q, k, v, groups, perm, None, q_norm, fused_qnorm())
}

/// [`flash_attention_rows`] with the tiling given (`None`: [`FlashTiling::for_groups`]), for the
/// checks and `bench attention`.
pub fn flash_attention_tiled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    groups: &[trellis_kernels::attention::AttnGroup],
    perm: Option<&[u32]>,
    tiling: Option<FlashTiling>,
) -> anyhow::Result<Tensor> {
    flash_attention_with(q, k, v, groups, perm, tiling, None, false)
}

/// The flash attention behind the public calls: `tiling` `None` picks one per call, `q_norm` as
/// [`flash_attention_rows_qnorm`], applied in the kernel when `fuse`, else in a launch of its own
/// first.
#[allow(clippy::too_many_arguments)]
fn flash_attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    groups: &[trellis_kernels::attention::AttnGroup],
    perm: Option<&[u32]>,
    tiling: Option<FlashTiling>,
    q_norm: Option<(&Tensor, f32)>,
    fuse: bool,
) -> anyhow::Result<Tensor> {
    let (nq, heads, d) = rows3(q)?;
    let (nk, hk, dk) = rows3(k)?;
    let (nv, hv, dv) = rows3(v)?;
    anyhow::ensure!(
        hk == heads && hv == heads && dk == d && nv == nk && dv == d,
        "flash attention: q {:?}, k {:?}, v {:?} do not match",
        q.dims(),
        k.dims(),
        v.dims()
    );
    anyhow::ensure!(
        flash_attention_supports(q.dtype(), d, dv)
            && k.dtype() == q.dtype()
            && v.dtype() == q.dtype(),
        "flash attention: {:?}/{:?}/{:?} with head dim {d} (float16 or bfloat16, head dim one of {:?})",
        q.dtype(),
        k.dtype(),
        v.dtype(),
        k::FLASH_HEAD_DIMS
    );
    let (kv_start, kv_end) = kv_ranges(groups, nq, nk, "flash attention")?;
    let perm = match perm {
        Some(p) => {
            anyhow::ensure!(
                p.len() == nq && nq == nk && p.iter().all(|&r| (r as usize) < nq),
                "flash attention: permutation of {} rows for {nq} queries / {nk} keys",
                p.len()
            );
            Some(p.iter().map(|&r| r as i32).collect())
        }
        None => None,
    };
    let arch = match q.device() {
        candle_core::Device::Cuda(dev) => device_arch(dev),
        _ => anyhow::bail!("flash attention: CUDA tensors only"),
    };
    let tiling = tiling.unwrap_or_else(|| FlashTiling::for_groups(groups, arch));
    let rows = tiling.rows;
    anyhow::ensure!(
        FlashTiling::VARIANTS.contains(&tiling),
        "flash attention: tiling {tiling:?} is not one of the builds ({:?})",
        FlashTiling::VARIANTS.map(|t| t.label())
    );
    anyhow::ensure!(
        tiling.runs_on(arch),
        "flash attention: tiling {} needs an sm_90 GPU (this one is sm_{arch})",
        tiling.label()
    );
    if let Some((gamma, _)) = q_norm {
        anyhow::ensure!(
            gamma.dtype() == DType::F32
                && gamma.is_contiguous()
                && gamma.elem_count() == heads * d
                && gamma.device().same_device(q.device()),
            "flash attention: q gamma {:?} {:?} on {:?} (float32 [{heads}, {d}] contiguous on q's device)",
            gamma.dims(),
            gamma.dtype(),
            gamma.device().location()
        );
    }
    let mut op = FlashAttentionOp {
        nq,
        heads,
        head_dim: d,
        tiling,
        perm,
        q_norm: None,
        tile_group: Vec::new(),
        tile_q0: Vec::new(),
        q_end: Vec::with_capacity(groups.len()),
        kv_start,
        kv_end,
        covers_all: {
            let mut q: Vec<_> = groups.iter().map(|g| g.q.clone()).collect();
            q.sort_by_key(|r| r.start);
            let mut at = 0;
            q.iter().all(|r| {
                let ok = r.start == at;
                at = r.end;
                ok
            }) && at == nq
        },
    };
    for (g, grp) in groups.iter().enumerate() {
        let gi = i32::try_from(g)?;
        op.q_end.push(i32::try_from(grp.q.end)?);
        let mut r = grp.q.start;
        while r < grp.q.end {
            op.tile_group.push(gi);
            op.tile_q0.push(i32::try_from(r)?);
            r += rows;
        }
    }
    // Views the kernel can stride through go as they are; others are made contiguous, and
    // re-made in a fresh allocation (`affine(1, 0)`: exact) when their start is not 16-byte aligned.
    let fit = |t: &Tensor| -> anyhow::Result<Tensor> {
        if rows_ok(t, heads, d) {
            return Ok(t.clone());
        }
        let c = t.contiguous()?;
        Ok(if rows_ok(&c, heads, d) {
            c
        } else {
            c.affine(1.0, 0.0)?
        })
    };
    let mut q = fit(q)?;
    if let Some((gamma, scale)) = q_norm {
        if fuse {
            op.q_norm = Some((gamma.clone(), scale));
        } else {
            q = super::cuda_fused::rms_norm_heads(&q, gamma, f64::from(scale))?;
        }
    }
    Ok(q.apply_op3_no_bwd(&fit(k)?, &fit(v)?, &op)?)
}

struct NeighboursOp {
    kernel: [usize; 3],
}

impl CustomOp1 for NeighboursOp {
    fn name(&self) -> &'static str {
        "trellis-submanifold-neighbours"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        Err(err("trellis-submanifold-neighbours: CUDA only"))
    }

    fn cuda_fwd(&self, coords: &CudaStorage, lc: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = coords.device().clone();
        let c = coords.as_cuda_slice::<i32>()?.slice(range(lc, "coords")?);
        let rows = lc.shape().dims()[0];
        let volume: usize = self.kernel.iter().product();
        let cap = (2 * rows).max(16).next_power_of_two();
        let stream = dev.cuda_stream();
        let keys = unsafe { dev.alloc::<u64>(cap) }?;
        let vals = unsafe { dev.alloc::<i32>(cap) }?;
        let nbr = unsafe { dev.alloc::<i32>(rows * volume) }?;
        let m = module(&dev, &k::NEIGHBOURS)?;
        let (n, capi) = (i32_arg(rows, "rows")?, i32_arg(cap, "hash capacity")?);
        let [kx, ky, kz] = self.kernel.map(|v| v as i32);
        let blocks = |n: usize| -> Result<LaunchConfig> {
            Ok(LaunchConfig {
                grid_dim: (
                    u32::try_from(n.div_ceil(256).max(1)).map_err(|_| err("too many rows"))?,
                    1,
                    1,
                ),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        };
        let clear = m.load_function("hash_clear").w()?;
        let mut b = stream.launch_builder(&clear);
        b.arg(&keys).arg(&vals).arg(&capi);
        // SAFETY: `keys`/`vals` hold `cap` entries.
        unsafe { b.launch(blocks(cap)?) }.w()?;
        let insert = m.load_function("hash_insert").w()?;
        let mut b = stream.launch_builder(&insert);
        b.arg(&c).arg(&n).arg(&keys).arg(&vals).arg(&capi);
        // SAFETY: `c` holds `rows * 4` coordinates; the table `cap` entries.
        unsafe { b.launch(blocks(rows)?) }.w()?;
        let query = m.load_function("submanifold_query").w()?;
        let mut b = stream.launch_builder(&query);
        b.arg(&c)
            .arg(&n)
            .arg(&keys)
            .arg(&vals)
            .arg(&capi)
            .arg(&kx)
            .arg(&ky)
            .arg(&kz)
            .arg(&nbr);
        // SAFETY: `nbr` holds `rows * volume` entries, one per thread launched.
        unsafe { b.launch(blocks(rows * volume)?) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(nbr, dev),
            Shape::from(rows * volume),
        ))
    }
}

/// The submanifold neighbour map of `coords` (int32 `[N, 4]` on a CUDA device), built on the GPU:
/// int32 `[N * K]` in `trellis_kernels::sparse_conv::NeighbourMap`'s order.
pub fn submanifold_neighbours(coords: &Tensor, kernel: [usize; 3]) -> anyhow::Result<Tensor> {
    let (_, four) = coords.dims2()?;
    anyhow::ensure!(four == 4, "neighbours: coords must be [N, 4]");
    anyhow::ensure!(
        kernel.iter().all(|k| k % 2 == 1),
        "neighbours: kernel {kernel:?} must be odd"
    );
    let c = coords.to_dtype(DType::I32)?.contiguous()?;
    Ok(c.apply_op1_no_bwd(&NeighboursOp { kernel })?)
}

/// The neighbour table of every voxel of a dense `[batch, D, H, W]` grid for a cubic `kernel`
/// (int32 `[rows · k³]`, rows in `(b, d, h, w)` order, taps in the conv3d weight's `(kd, kh, kw)`
/// order, −1 outside the grid), built on `dev` by [`submanifold_neighbours`] over the grid's
/// coordinates. The last few grids are kept (a 64³ table is 28 MiB), so the SS decoder's
/// convolutions at one resolution share one table.
pub fn dense_neighbours(
    dev: &candle_core::Device,
    batch: usize,
    dims: [usize; 3],
    kernel: usize,
) -> anyhow::Result<Tensor> {
    type Key = (
        candle_core::cuda_backend::DeviceId,
        usize,
        [usize; 3],
        usize,
    );
    // a 64³ table is 28 MiB: the last four grids
    static CACHE: Mutex<Vec<(Key, Tensor)>> = Mutex::new(Vec::new());
    let candle_core::Device::Cuda(cuda) = dev else {
        anyhow::bail!("dense neighbours: {dev:?} is not a CUDA device");
    };
    let key: Key = (cuda.id(), batch, dims, kernel);
    recently_used(
        &CACHE,
        4,
        |k| *k == key,
        || {
            let [d, h, w] = dims;
            anyhow::ensure!(
                d.max(h).max(w) < 65536 && batch < 65536,
                "dense neighbours: grid {dims:?} x {batch} too large"
            );
            let rows = batch * d * h * w;
            let mut coords = Vec::with_capacity(rows * 4);
            for b in 0..batch as i32 {
                for x in 0..d as i32 {
                    for y in 0..h as i32 {
                        for z in 0..w as i32 {
                            coords.extend_from_slice(&[b, x, y, z]);
                        }
                    }
                }
            }
            let c = Tensor::from_vec(coords, (rows, 4), dev)?;
            Ok((key, submanifold_neighbours(&c, [kernel; 3])?))
        },
    )
}

/// Each GPU kernel against its CPU twin in `trellis_kernels` on seeded random inputs: the unit
/// tests below and `trellisd doctor --check-kernels` run these. Returns (what, relative error);
/// exact checks report 0 or fail.
pub mod checks {
    use super::*;
    use candle_core::Device;
    use trellis_kernels::attention::{AttnGroup, AttnShape};

    fn rel_err(a: &[f32], b: &[f32]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (num / den.max(1e-30)).sqrt()
    }

    /// Deterministic pseudo-random values in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// A voxel shell at 32³ with its second part moved to batch 1.
    fn shell(n: usize) -> Vec<i32> {
        let mut c = crate::bench::shell_coords(32, n);
        let half = c.len() / 8;
        for row in c.chunks_exact_mut(4).skip(half) {
            row[0] = 1;
        }
        c
    }

    /// `SparseConv3d::forward_upsampled` (the coarse rows read through the fine neighbour map
    /// composed with the upsample's index) against the upsampled tensor convolved, both on the
    /// GPU in `dtype`, 64 -> 32 channels on a shell downsampled 2x.
    pub fn upsampled_conv_vs_materialised(
        dev: &Device,
        dtype: DType,
        tol: f64,
    ) -> anyhow::Result<f64> {
        use crate::modules::sparse::conv::SparseConv3d;
        use crate::modules::sparse::spatial::{SparseDownsample, SparseUpsample};
        use crate::modules::sparse::tensor::SparseTensor;
        let coords = shell(3000);
        let rows = coords.len() / 4;
        let (cin, cout) = (64, 32);
        let feats = Tensor::from_vec(noise(rows * cin, 21), (rows, cin), dev)?.to_dtype(dtype)?;
        let coarse = SparseDownsample::new(2).forward(&SparseTensor::new(coords, feats)?)?;
        let mut t = std::collections::HashMap::new();
        t.insert(
            "conv.weight".to_string(),
            Tensor::from_vec(noise(cout * 27 * cin, 22), (cout, 3, 3, 3, cin), dev)?,
        );
        t.insert(
            "conv.bias".to_string(),
            Tensor::from_vec(noise(cout, 23), cout, dev)?,
        );
        let vb = candle_nn::VarBuilder::from_tensors(t, DType::F32, dev);
        let conv = SparseConv3d::new(cin, cout, 3, vb)?;
        let up = SparseUpsample::new(2);
        let flat = |t: &Tensor| -> anyhow::Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        let direct = conv.forward_upsampled(&coarse, &up)?;
        let copied = conv.forward(&up.forward(&coarse)?)?;
        anyhow::ensure!(
            direct.rows() == rows && direct.coords() == copied.coords(),
            "upsampled conv: {} rows / coords differ from the copied path's",
            direct.rows()
        );
        let e = rel_err(&flat(direct.feats())?, &flat(copied.feats())?);
        anyhow::ensure!(e < tol, "upsampled conv {dtype:?}: relative error {e}");
        Ok(e)
    }

    /// GPU neighbour map == CPU neighbour map, entry for entry.
    pub fn neighbours(dev: &Device) -> anyhow::Result<f64> {
        let coords = shell(3000);
        let rows = coords.len() / 4;
        let cpu = trellis_kernels::sparse_conv::submanifold_neighbours(&coords, [3, 3, 3])?;
        let t = Tensor::from_slice(&coords, (rows, 4), dev)?;
        let g: Vec<i32> = submanifold_neighbours(&t, [3, 3, 3])?.to_vec1()?;
        anyhow::ensure!(g == cpu.table, "GPU neighbour map differs from the CPU's");
        Ok(0.0)
    }

    /// GPU sparse conv vs `submanifold_conv` (relative error, must be < 1e-5).
    pub fn sparse_conv_vs_cpu(dev: &Device) -> anyhow::Result<f64> {
        let coords = shell(2000);
        let rows = coords.len() / 4;
        let (cin, cout) = (40, 72);
        let map = trellis_kernels::sparse_conv::submanifold_neighbours(&coords, [3, 3, 3])?;
        let feats = noise(rows * cin, 1);
        let w = noise(cout * 27 * cin, 2);
        let b = noise(cout, 3);
        let cpu =
            trellis_kernels::sparse_conv::submanifold_conv(&feats, cin, &map, &w, Some(&b), cout)?;
        let ft = Tensor::from_slice(&feats, (rows, cin), dev)?;
        let nt = Tensor::from_slice(&map.table, map.table.len(), dev)?;
        let wt = Tensor::from_slice(&w, (cout, 27, cin), dev)?;
        let bt = Tensor::from_slice(&b, cout, dev)?;
        let g: Vec<f32> = sparse_conv(&ft, &nt, &wt, Some(&bt))?
            .flatten_all()?
            .to_vec1()?;
        let e = rel_err(&g, &cpu);
        anyhow::ensure!(e < 1e-5, "sparse conv: relative error {e}");
        Ok(e)
    }

    /// GPU varlen attention vs the CPU kernel (relative error, must be < 1e-5), including rows
    /// outside every group (must be zero).
    pub fn attention_vs_cpu(dev: &Device) -> anyhow::Result<f64> {
        let (heads, d, dv) = (4, 64, 48);
        let (nq, nk) = (300, 420);
        let groups = vec![
            AttnGroup {
                q: 0..100,
                kv: 0..37,
            },
            AttnGroup {
                q: 100..250,
                kv: 37..400,
            },
        ];
        let q = noise(nq * heads * d, 4);
        let kk = noise(nk * heads * d, 5);
        let v = noise(nk * heads * dv, 6);
        let shape = AttnShape {
            heads,
            head_dim: d,
            v_dim: dv,
        };
        let scale = 1.0 / (d as f32).sqrt();
        let cpu = trellis_kernels::attention::varlen_attention(&q, &kk, &v, &groups, shape, scale)?;
        let t = |x: &[f32], n: usize, w: usize| Tensor::from_slice(x, (n, heads, w), dev);
        let g: Vec<f32> =
            varlen_attention(&t(&q, nq, d)?, &t(&kk, nk, d)?, &t(&v, nk, dv)?, &groups)?
                .flatten_all()?
                .to_vec1()?;
        anyhow::ensure!(
            g[250 * heads * dv..].iter().all(|x| *x == 0.0),
            "rows outside every group are not zero"
        );
        let e = rel_err(&g, &cpu);
        anyhow::ensure!(e < 1e-5, "attention: relative error {e}");
        Ok(e)
    }

    /// Tensor-core attention vs the CPU kernel on the same (rounded) inputs, in `dtype`: dense,
    /// cross (77 keys), variable-length groups of odd sizes, an empty key range and rows outside
    /// every group (zero); head dim `d`, the given tiling. Relative error below `tol`.
    pub fn flash_attention_vs_cpu(
        dev: &Device,
        dtype: DType,
        d: usize,
        tiling: FlashTiling,
        tol: f64,
    ) -> anyhow::Result<f64> {
        let heads = 3;
        let (nq, nk) = (530, 700);
        let groups = vec![
            AttnGroup {
                q: 0..200,
                kv: 0..200,
            },
            AttnGroup {
                q: 200..330,
                kv: 200..277,
            },
            AttnGroup {
                q: 330..401,
                kv: 277..690,
            },
            AttnGroup {
                q: 401..470,
                kv: 690..690,
            },
            AttnGroup {
                q: 470..471,
                kv: 0..1,
            },
        ];
        let mk = |n: usize, seed: u64| -> anyhow::Result<(Tensor, Vec<f32>)> {
            let x: Vec<f32> = noise(n * heads * d, seed).iter().map(|v| 2.0 * v).collect();
            let t = Tensor::from_slice(&x, (n, heads, d), dev)?.to_dtype(dtype)?;
            let r: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            Ok((t, r))
        };
        let (q, qr) = mk(nq, 7)?;
        let (kk, kr) = mk(nk, 8)?;
        let (v, vr) = mk(nk, 9)?;
        let shape = AttnShape {
            heads,
            head_dim: d,
            v_dim: d,
        };
        let scale = 1.0 / (d as f32).sqrt();
        let cpu =
            trellis_kernels::attention::varlen_attention(&qr, &kr, &vr, &groups, shape, scale)?;
        let g: Vec<f32> = flash_attention_tiled(&q, &kk, &v, &groups, None, Some(tiling))?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        anyhow::ensure!(g.iter().all(|x| x.is_finite()), "non-finite output");
        anyhow::ensure!(
            g[401 * heads * d..470 * heads * d]
                .iter()
                .all(|x| *x == 0.0)
                && g[471 * heads * d..].iter().all(|x| *x == 0.0),
            "rows with no keys or outside every group are not zero"
        );
        let e = rel_err(&g, &cpu);
        anyhow::ensure!(
            e < tol,
            "flash attention {dtype:?} d{d} {tiling:?}: relative error {e}"
        );
        Ok(e)
    }

    /// The tensor-core sparse conv in `dtype` vs the CPU's f32 `submanifold_conv` on the same
    /// (rounded) inputs; `subdivided`: the rows read their parent row (`nbr >> 3`) of a feats
    /// table 8x smaller, against the CPU conv of the explicit 8x copy. Every tiling (the
    /// `sparse_conv_mma_*` kernels of 64 and 128 rows, every `TRELLIS_CONV_TILE=k64...` one, and
    /// `k64` with the mask-sorted row order).
    pub fn sparse_conv_half_vs_cpu(
        dev: &Device,
        dtype: DType,
        subdivided: bool,
        tol: f64,
    ) -> anyhow::Result<f64> {
        sparse_conv_half_shape_vs_cpu(dev, dtype, subdivided, 96, 136, tol)
    }

    /// [`sparse_conv_half_vs_cpu`] for `cin` -> `cout` channels.
    pub fn sparse_conv_half_shape_vs_cpu(
        dev: &Device,
        dtype: DType,
        subdivided: bool,
        cin: usize,
        cout: usize,
        tol: f64,
    ) -> anyhow::Result<f64> {
        let coords = shell(2000);
        let rows = coords.len() / 4;
        let map = trellis_kernels::sparse_conv::submanifold_neighbours(&coords, [3, 3, 3])?;
        let parents = if subdivided { rows.div_ceil(8) } else { rows };
        let round = |v: Vec<f32>| -> anyhow::Result<Vec<f32>> {
            Ok(Tensor::from_vec(v.clone(), v.len(), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_dtype(DType::F32)?
                .to_vec1()?)
        };
        let pf = round(noise(parents * cin, 11))?;
        let w = round(noise(cout * 27 * cin, 12))?;
        let b = noise(cout, 13);
        let feats: Vec<f32> = if subdivided {
            (0..rows)
                .flat_map(|r| pf[(r / 8) * cin..(r / 8 + 1) * cin].to_vec())
                .collect()
        } else {
            pf.clone()
        };
        let cpu =
            trellis_kernels::sparse_conv::submanifold_conv(&feats, cin, &map, &w, Some(&b), cout)?;
        let ft = Tensor::from_slice(&pf, (parents, cin), dev)?.to_dtype(dtype)?;
        let nt = Tensor::from_slice(&map.table, map.table.len(), dev)?;
        let wt = Tensor::from_slice(&w, (cout, 27, cin), dev)?.to_dtype(dtype)?;
        let bt = Tensor::from_slice(&b, cout, dev)?;
        let order = trellis_kernels::sparse_conv::mask_order(&map.table, 27);
        let ot = Tensor::from_vec(order, rows, dev)?;
        let shift = if subdivided { 3 } else { 0 };
        let mut tilings: Vec<(ConvTile, bool)> = vec![
            (
                ConvTile::Mma {
                    rows: 64,
                    staged_async: conv_async(),
                },
                false,
            ),
            (
                ConvTile::Mma {
                    rows: 128,
                    staged_async: conv_async(),
                },
                false,
            ),
        ];
        tilings.extend(ConvTile::K64_LABELS.iter().map(|(_, t)| (*t, false)));
        tilings.push((ConvTile::K64_LABELS[0].1, true));
        tilings.push((ConvTile::GemmGather, false));
        let mut worst = 0f64;
        for (tile, ordered) in tilings {
            let order = if ordered { Some(&ot) } else { None };
            let g: Vec<f32> = sparse_conv_half_with(&ft, &nt, &wt, Some(&bt), shift, tile, order)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            let e = rel_err(&g, &cpu);
            anyhow::ensure!(
                e < tol,
                "sparse conv {dtype:?} {cin} -> {cout}, {tile:?}, ordered {ordered}: relative \
                 error {e}"
            );
            worst = worst.max(e);
        }
        Ok(worst)
    }

    /// The fused block kernels (`cuda_fused`) in `dtype` against candle's ops on the CPU in f32
    /// with the same roundings: Linear bias + GELU, LayerNorm + modulation, gated residual,
    /// per-head RMS norm of a strided q view.
    pub fn fused_vs_cpu(dev: &Device, dtype: DType, tol: f64) -> anyhow::Result<f64> {
        use crate::runtime::cuda_fused as f;
        let (b, l, c, heads) = (2usize, 300usize, 256usize, 4usize);
        let on = |v: Vec<f32>, shape: &[usize]| -> anyhow::Result<(Tensor, Tensor)> {
            let cpu = Tensor::from_vec(v, shape, &Device::Cpu)?
                .to_dtype(dtype)?
                .to_dtype(DType::F32)?;
            Ok((cpu.to_device(dev)?.to_dtype(dtype)?, cpu))
        };
        let back = |t: &Tensor| -> anyhow::Result<Tensor> {
            Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
        };
        let rnd =
            |t: Tensor| -> anyhow::Result<Tensor> { Ok(t.to_dtype(dtype)?.to_dtype(DType::F32)?) };
        let err_of = |g: &Tensor, c: &Tensor| -> anyhow::Result<f64> {
            let g: Vec<f32> = back(g)?.flatten_all()?.to_vec1()?;
            let c: Vec<f32> = c.flatten_all()?.to_vec1()?;
            Ok(rel_err(&g, &c))
        };
        let (x, xc) = on(noise(b * l * c, 21), &[b, l, c])?;
        let (bias, bias_c) = on(noise(c, 22), &[c])?;
        let (h, hc) = on(noise(b * l * c, 23), &[b, l, c])?;
        let (m6, m6c) = on(noise(b * 6 * c, 24), &[b, 6 * c])?;
        let w = Tensor::from_vec(noise(c, 25), c, &Device::Cpu)?;
        let bb = Tensor::from_vec(noise(c, 26), c, &Device::Cpu)?;
        let mut worst = 0f64;
        // bias + GELU
        let g = f::bias_act(&x, Some(&bias), f::Act::GeluTanh)?;
        let cpu = rnd(xc.broadcast_add(&bias_c)?)?.gelu()?;
        worst = worst.max(err_of(&g, &cpu)?);
        // LayerNorm (affine) + modulation with strided shift / scale
        let (shift, scale) = (m6.narrow(1, 0, c)?, m6.narrow(1, c, c)?);
        let seg = f::Segments::dense(b, l).ok_or_else(|| anyhow::anyhow!("segments"))?;
        let g = f::layer_norm(
            &x,
            1e-6,
            Some((&w.to_device(dev)?, &bb.to_device(dev)?)),
            Some(f::Modulation {
                shift: &shift,
                scale: &scale,
                segments: seg,
            }),
        )?;
        let mean = xc.mean_keepdim(2)?;
        let xm = xc.broadcast_sub(&mean)?;
        let var = xm.sqr()?.mean_keepdim(2)?;
        let y = xm.broadcast_div(&(var + 1e-6)?.sqrt()?)?;
        let y = rnd(y.broadcast_mul(&w)?.broadcast_add(&bb)?)?;
        let (sc, shc) = (
            m6c.narrow(1, c, c)?.unsqueeze(1)?,
            m6c.narrow(1, 0, c)?.unsqueeze(1)?,
        );
        let one_plus = rnd((sc + 1.0)?)?;
        let cpu = rnd(rnd(y.broadcast_mul(&one_plus)?)?.broadcast_add(&shc)?)?;
        worst = worst.max(err_of(&g, &cpu)?);
        // gated residual with a strided gate
        let gate = m6.narrow(1, 2 * c, c)?;
        let g = f::gated_add(&x, &h, &gate, seg)?;
        let gc = m6c.narrow(1, 2 * c, c)?.unsqueeze(1)?;
        let cpu = rnd((&xc + rnd(hc.broadcast_mul(&gc)?)?)?)?;
        worst = worst.max(err_of(&g, &cpu)?);
        // A residual and the norm after it in one pass: bit for bit the two kernels, with a
        // strided gate and the affine norm, without a gate with the modulation, and at a width
        // the 16-byte vectors do not fit (the scalar path).
        // (width, gate, modulation): the blocks' norm2 (gate, affine), norm3 (modulation) and,
        // across blocks, norm1 after the previous block's gated residual (both)
        for (cc, gated, modulated) in [
            (c, true, false),
            (c, false, true),
            (250, true, false),
            (c, true, true),
        ] {
            let (x2, _) = on(noise(b * l * cc, 32), &[b, l, cc])?;
            let (h2, _) = on(noise(b * l * cc, 33), &[b, l, cc])?;
            let (m2, _) = on(noise(b * 3 * cc, 34), &[b, 3 * cc])?;
            let (gate2, sh2, sc2) = (
                m2.narrow(1, 0, cc)?,
                m2.narrow(1, cc, cc)?,
                m2.narrow(1, 2 * cc, cc)?,
            );
            let w2 = Tensor::from_vec(noise(cc, 35), cc, dev)?;
            let b2 = Tensor::from_vec(noise(cc, 36), cc, dev)?;
            let affine = (!modulated).then_some((&w2, &b2));
            let modulation = || {
                modulated.then_some(f::Modulation {
                    shift: &sh2,
                    scale: &sc2,
                    segments: seg,
                })
            };
            let (sum, y) = f::add_layer_norm(
                &x2,
                f::Residual {
                    h: &h2,
                    gate: gated.then_some(&gate2),
                    segments: seg,
                },
                1e-6,
                affine,
                modulation(),
            )?;
            let sum2 = if gated {
                f::gated_add(&x2, &h2, &gate2, seg)?
            } else {
                f::add(&x2, &h2)?
            };
            let y2 = f::layer_norm(&sum2, 1e-6, affine, modulation())?;
            for (what, a, b) in [("sum", &sum, &sum2), ("norm", &y, &y2)] {
                let a: Vec<f32> = back(a)?.flatten_all()?.to_vec1()?;
                let b: Vec<f32> = back(b)?.flatten_all()?.to_vec1()?;
                anyhow::ensure!(
                    a == b,
                    "add_layer_norm {dtype:?} ({cc} wide, gate {gated}, modulation {modulated}): its {what} differs from the two kernels'"
                );
            }
        }
        // RMS norm of q sliced out of a packed [b, l, 3, heads, d] projection
        let d = c / heads;
        let (qkv, qkv_c) = on(noise(b * l * 3 * c, 27), &[b, l, 3, heads, d])?;
        let gamma = Tensor::from_vec(noise(heads * d, 28), (heads, d), &Device::Cpu)?;
        let q = qkv.get_on_dim(2, 1)?;
        let g = f::rms_norm_heads(&q, &gamma.to_device(dev)?, (d as f64).sqrt())?;
        let qc = qkv_c.get_on_dim(2, 1)?;
        let nrm = qc
            .sqr()?
            .sum_keepdim(3)?
            .sqrt()?
            .clamp(1e-12f32, f32::INFINITY)?;
        let cpu = rnd((qc.broadcast_div(&nrm)?.broadcast_mul(&gamma)? * (d as f64).sqrt())?)?;
        worst = worst.max(err_of(&g, &cpu)?);
        // cuBLASLt Linear with the bias and GELU in its epilogue (half types only)
        if dtype != DType::F32 {
            let (xw, xw_c) = on(noise(l * c, 29), &[l, c])?;
            let (ww, ww_c) = on(noise(96 * c, 30), &[96, c])?;
            let (wb, wb_c) = on(noise(96, 31), &[96])?;
            let g = f::linear_lt(&xw, &ww, &wb, f::Act::GeluTanh)?;
            let cpu = xw_c.matmul(&ww_c.t()?)?.broadcast_add(&wb_c)?.gelu()?;
            worst = worst.max(err_of(&g, &cpu)?);
        }
        anyhow::ensure!(
            worst < tol,
            "fused kernels {dtype:?}: relative error {worst}"
        );
        Ok(worst)
    }

    /// q, k and v as `[n, heads, d]` views of one packed `[n, 3, heads, d]` projection of noise
    /// times `amp` (rows `3 · heads · d` apart, as the layers slice them).
    fn packed_qkv(
        dev: &Device,
        dtype: DType,
        [n, heads, d]: [usize; 3],
        seed: u64,
        amp: f32,
    ) -> anyhow::Result<(Tensor, Tensor, Tensor)> {
        let packed: Vec<f32> = noise(n * 3 * heads * d, seed)
            .iter()
            .map(|v| amp * v)
            .collect();
        let qkv = Tensor::from_slice(&packed, (n, 3, heads, d), dev)?.to_dtype(dtype)?;
        Ok((
            qkv.get_on_dim(1, 0)?,
            qkv.get_on_dim(1, 1)?,
            qkv.get_on_dim(1, 2)?,
        ))
    }

    /// Windows of uneven sizes (1, 64, 65, 200, 7 and 263 rows) over `n` = 600 rows.
    fn uneven_windows(n: usize) -> anyhow::Result<Vec<AttnGroup>> {
        let mut groups = Vec::new();
        let mut s = 0;
        for len in [1usize, 64, 65, 200, 7, 263] {
            groups.push(AttnGroup {
                q: s..s + len,
                kv: s..s + len,
            });
            s += len;
        }
        anyhow::ensure!(s == n, "check setup: windows cover {s} of {n} rows");
        Ok(groups)
    }

    /// The flash kernel on strided views (q, k, v sliced out of one packed `[N, 3, H, 64]`
    /// projection) in a permuted row order (windows), against the CPU kernel on the gathered rows.
    pub fn flash_attention_rows_vs_cpu(
        dev: &Device,
        dtype: DType,
        tiling: FlashTiling,
        tol: f64,
    ) -> anyhow::Result<f64> {
        let (heads, d, n) = (2usize, 64usize, 600usize);
        let (q, k, v) = packed_qkv(dev, dtype, [n, heads, d], 17, 2.0)?;
        // A permutation: odd rows first (reversed), then even rows; windows of uneven sizes.
        let mut perm: Vec<u32> = (0..n as u32).filter(|r| r % 2 == 1).rev().collect();
        perm.extend((0..n as u32).filter(|r| r % 2 == 0));
        let groups = uneven_windows(n)?;
        let g: Vec<f32> = flash_attention_tiled(&q, &k, &v, &groups, Some(&perm), Some(tiling))?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let host = |t: &Tensor| -> anyhow::Result<Vec<f32>> {
            let all: Vec<f32> = t
                .to_dtype(DType::F32)?
                .contiguous()?
                .flatten_all()?
                .to_vec1()?;
            let w = heads * d;
            Ok(perm
                .iter()
                .flat_map(|&r| all[r as usize * w..(r as usize + 1) * w].to_vec())
                .collect())
        };
        let shape = AttnShape {
            heads,
            head_dim: d,
            v_dim: d,
        };
        let scale = 1.0 / (d as f32).sqrt();
        let o = trellis_kernels::attention::varlen_attention(
            &host(&q)?,
            &host(&k)?,
            &host(&v)?,
            &groups,
            shape,
            scale,
        )?;
        // Back to physical row order: window-order row i is input row perm[i].
        let w = heads * d;
        let mut cpu = vec![0f32; n * w];
        for (i, &r) in perm.iter().enumerate() {
            cpu[r as usize * w..(r as usize + 1) * w].copy_from_slice(&o[i * w..(i + 1) * w]);
        }
        let e = rel_err(&g, &cpu);
        anyhow::ensure!(
            e < tol,
            "flash attention rows {dtype:?}: relative error {e}"
        );
        Ok(e)
    }

    /// The queries' MultiHeadRMSNorm applied by the flash kernel (q, k, v strided views of one
    /// packed `[N, 3, H, d]` projection, gamma away from 1) against `cuda_fused::rms_norm_heads`
    /// then the same attention, in `dtype` with head dim `d` and the given tiling: once over
    /// windows in a permuted row order (groups of 1 to 263 rows, so fragments run past their
    /// group's end) and once without a permutation over groups that leave rows outside every
    /// group (zero in both). The two differ only where the float32 sums of squares, taken in
    /// another order, round a normalised q element the other way.
    pub fn flash_attention_qnorm_vs_separate(
        dev: &Device,
        dtype: DType,
        d: usize,
        tiling: FlashTiling,
        tol: f64,
    ) -> anyhow::Result<f64> {
        let (heads, n) = (3usize, 600usize);
        let (q, k, v) = packed_qkv(dev, dtype, [n, heads, d], 23, 3.0)?;
        let gamma: Vec<f32> = noise(heads * d, 29).iter().map(|v| 1.0 + 0.5 * v).collect();
        let gamma = Tensor::from_slice(&gamma, (heads, d), dev)?;
        let scale = (d as f32).sqrt();
        let q_normed = crate::runtime::cuda_fused::rms_norm_heads(&q, &gamma, f64::from(scale))?;
        let mut perm: Vec<u32> = (0..n as u32).filter(|r| r % 3 != 1).rev().collect();
        perm.extend((0..n as u32).filter(|r| r % 3 == 1));
        let windows = uneven_windows(n)?;
        let partial = vec![
            AttnGroup {
                q: 0..130,
                kv: 0..300,
            },
            AttnGroup {
                q: 150..151,
                kv: 150..420,
            },
            AttnGroup {
                q: 200..517,
                kv: 100..600,
            },
        ];
        let mut worst = 0f64;
        for (groups, perm) in [(&windows, Some(&perm[..])), (&partial, None)] {
            let host = |t: Tensor| -> anyhow::Result<Vec<f32>> {
                Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
            };
            let fused = host(flash_attention_with(
                &q,
                &k,
                &v,
                groups,
                perm,
                Some(tiling),
                Some((&gamma, scale)),
                true,
            )?)?;
            let separate = host(flash_attention_tiled(
                &q_normed,
                &k,
                &v,
                groups,
                perm,
                Some(tiling),
            )?)?;
            anyhow::ensure!(fused.iter().all(|x| x.is_finite()), "non-finite output");
            if perm.is_none() {
                let w = heads * d;
                anyhow::ensure!(
                    fused[130 * w..150 * w]
                        .iter()
                        .chain(&fused[151 * w..200 * w])
                        .chain(&fused[517 * w..])
                        .all(|x| *x == 0.0),
                    "rows outside every group are not zero"
                );
            }
            let e = rel_err(&fused, &separate);
            anyhow::ensure!(
                e < tol,
                "flash attention with q's RMS norm fused, {dtype:?} d{d} {}, {}: relative error {e} against the separate norm",
                tiling.label(),
                if perm.is_some() { "windows" } else { "groups" }
            );
            worst = worst.max(e);
        }
        Ok(worst)
    }

    /// [`flash_attention_qnorm_vs_separate`] for every build this GPU runs (the wgmma builds on
    /// sm_90), both dtypes and head dimensions: the worst relative error.
    fn flash_qnorm_builds(dev: &Device) -> anyhow::Result<f64> {
        let arch = match dev {
            Device::Cuda(d) => device_arch(d),
            _ => 0,
        };
        let mut worst = 0f64;
        for t in FlashTiling::VARIANTS
            .into_iter()
            .filter(|t| t.runs_on(arch))
        {
            for (dtype, tol) in [(DType::F16, 1e-3), (DType::BF16, 5e-3)] {
                for d in [64, 80] {
                    let e = flash_attention_qnorm_vs_separate(dev, dtype, d, t, tol)?;
                    worst = worst.max(e);
                }
            }
        }
        Ok(worst)
    }

    /// The SS decoder's dense conv3d on the GPU (`modules::conv3d`: channels-last rows over the
    /// grid's neighbour table; float16/bfloat16 on the tensor cores, float32 on the gather-GEMM)
    /// against the CPU float32 kernel on the same (rounded) input and weights: a 24 → 40 and a
    /// 32 → 1 convolution (Cout padded to 8 on the tensor cores) on a 2 × 9 × 7 × 5 grid, zero
    /// padding at every face.
    pub fn dense_conv3d_vs_cpu(dev: &Device, dtype: DType, tol: f64) -> anyhow::Result<f64> {
        use crate::modules::conv3d::Conv3d;
        let mut worst = 0f64;
        for (cin, cout, seed) in [(24usize, 40usize, 31u64), (32, 1, 37)] {
            let round = |v: Vec<f32>, shape: &[usize]| -> anyhow::Result<Tensor> {
                Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
                    .to_dtype(dtype)?
                    .to_dtype(DType::F32)?)
            };
            let x = round(noise(2 * cin * 9 * 7 * 5, seed), &[2, cin, 9, 7, 5])?;
            let w = round(
                noise(cout * cin * 27, seed + 1)
                    .iter()
                    .map(|v| 0.2 * v)
                    .collect(),
                &[cout, cin, 3, 3, 3],
            )?;
            let b = Tensor::from_vec(noise(cout, seed + 2), cout, &Device::Cpu)?;
            let make = |d: &Device, dt: DType| -> anyhow::Result<Conv3d> {
                let mut t = std::collections::HashMap::new();
                t.insert("weight".to_string(), w.to_device(d)?.to_dtype(dt)?);
                t.insert("bias".to_string(), b.to_device(d)?.to_dtype(dt)?);
                let vb = candle_nn::VarBuilder::from_tensors(t, dt, d);
                Conv3d::new(vb, cin, cout, 3, 1, 1)
            };
            let cpu: Vec<f32> = make(&Device::Cpu, DType::F32)?
                .forward(&x)?
                .flatten_all()?
                .to_vec1()?;
            let y = make(dev, dtype)?.forward(&x.to_device(dev)?.to_dtype(dtype)?)?;
            anyhow::ensure!(
                y.dims() == [2, cout, 9, 7, 5] && y.dtype() == dtype,
                "conv3d on the tensor cores: {:?} {:?}",
                y.dims(),
                y.dtype()
            );
            let g: Vec<f32> = y.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let e = rel_err(&g, &cpu);
            anyhow::ensure!(
                e < tol,
                "conv3d {cin} -> {cout} over the grid's neighbours, {dtype:?}: relative error {e}"
            );
            worst = worst.max(e);
        }
        Ok(worst)
    }

    const T64: FlashTiling = FlashTiling::new(64, false);
    const T128: FlashTiling = FlashTiling::new(128, false);
    const T128A: FlashTiling = FlashTiling::new(128, true);

    /// The flash builds the other checks leave out (64-row cp.async), each dtype and head
    /// dimension: the worst relative error.
    fn other_flash_builds(dev: &Device) -> anyhow::Result<f64> {
        let mut worst = 0f64;
        for t in FlashTiling::VARIANTS {
            if [T64, T128, T128A].contains(&t) || t.is_wgmma() {
                continue;
            }
            for (dtype, tol) in [(DType::F16, 4e-3), (DType::BF16, 3e-2)] {
                for d in [64, 80] {
                    let e = flash_attention_vs_cpu(dev, dtype, d, t, tol).map_err(|e| {
                        anyhow::anyhow!("tiling {}, {dtype:?}, d{d}: {e:#}", t.label())
                    })?;
                    worst = worst.max(e);
                }
            }
        }
        Ok(worst)
    }

    /// The wgmma (sm_90) flash builds: every build in both dtypes and head dimensions, and the
    /// permuted-rows (windows) path.
    fn wgmma_flash_builds(dev: &Device) -> anyhow::Result<f64> {
        let mut worst = 0f64;
        for t in FlashTiling::VARIANTS.into_iter().filter(|t| t.is_wgmma()) {
            for (dtype, tol) in [(DType::F16, 4e-3), (DType::BF16, 3e-2)] {
                for d in [64, 80] {
                    let e = flash_attention_vs_cpu(dev, dtype, d, t, tol).map_err(|e| {
                        anyhow::anyhow!("tiling {}, {dtype:?}, d{d}: {e:#}", t.label())
                    })?;
                    worst = worst.max(e);
                }
            }
            worst = worst.max(flash_attention_rows_vs_cpu(dev, DType::F16, t, 4e-3)?);
        }
        Ok(worst)
    }

    /// Every check: (name, result).
    pub fn all(dev: &Device) -> Vec<(&'static str, anyhow::Result<f64>)> {
        let mut checks = all_builds(dev);
        if let Device::Cuda(d) = dev {
            if device_arch(d) == 90 {
                checks.push((
                    "flash attention wgmma (sm_90), every build",
                    wgmma_flash_builds(dev),
                ));
            }
        }
        checks
    }

    /// The checks every sm_80+ GPU runs.
    fn all_builds(dev: &Device) -> Vec<(&'static str, anyhow::Result<f64>)> {
        vec![
            ("neighbour map (exact)", neighbours(dev)),
            ("sparse conv gather-GEMM", sparse_conv_vs_cpu(dev)),
            (
                "sparse conv tensor cores f16",
                sparse_conv_half_vs_cpu(dev, DType::F16, false, 2e-3),
            ),
            (
                "sparse conv tensor cores bf16, subdivided",
                sparse_conv_half_vs_cpu(dev, DType::BF16, true, 1e-2),
            ),
            (
                "sparse conv tensor cores f16, 256 -> 128, subdivided",
                sparse_conv_half_shape_vs_cpu(dev, DType::F16, true, 256, 128, 2e-3),
            ),
            (
                "sparse conv tensor cores bf16, 128 -> 128",
                sparse_conv_half_shape_vs_cpu(dev, DType::BF16, false, 128, 128, 1e-2),
            ),
            (
                "sparse conv f16 on an upsample's coarse rows",
                upsampled_conv_vs_materialised(dev, DType::F16, 2e-3),
            ),
            (
                "sparse conv tensor cores f16, 64 -> 64",
                sparse_conv_half_shape_vs_cpu(dev, DType::F16, false, 64, 64, 2e-3),
            ),
            (
                "sparse conv tensor cores f16, 136 -> 264",
                sparse_conv_half_shape_vs_cpu(dev, DType::F16, false, 136, 264, 2e-3),
            ),
            (
                "fused block kernels f32",
                fused_vs_cpu(dev, DType::F32, 1e-5),
            ),
            (
                "fused block kernels f16",
                fused_vs_cpu(dev, DType::F16, 2e-3),
            ),
            (
                "fused block kernels bf16",
                fused_vs_cpu(dev, DType::BF16, 1.6e-2),
            ),
            (
                "dense conv3d f32 (gather-GEMM)",
                dense_conv3d_vs_cpu(dev, DType::F32, 1e-5),
            ),
            (
                "dense conv3d f16 (tensor cores)",
                dense_conv3d_vs_cpu(dev, DType::F16, 2e-3),
            ),
            (
                "dense conv3d bf16 (tensor cores)",
                dense_conv3d_vs_cpu(dev, DType::BF16, 1e-2),
            ),
            ("varlen attention", attention_vs_cpu(dev)),
            (
                "flash attention f16, d64, 64 rows",
                flash_attention_vs_cpu(dev, DType::F16, 64, T64, 4e-3),
            ),
            (
                "flash attention f16, d64, 128 rows",
                flash_attention_vs_cpu(dev, DType::F16, 64, T128, 4e-3),
            ),
            (
                "flash attention f16, d64, 128 rows, cp.async",
                flash_attention_vs_cpu(dev, DType::F16, 64, T128A, 4e-3),
            ),
            (
                "flash attention f16 and bf16, d64 and d80, every other build",
                other_flash_builds(dev),
            ),
            (
                "flash attention bf16, d64, 128 rows",
                flash_attention_vs_cpu(dev, DType::BF16, 64, T128, 3e-2),
            ),
            (
                "flash attention f16, d80, 64 rows",
                flash_attention_vs_cpu(dev, DType::F16, 80, T64, 4e-3),
            ),
            (
                "flash attention bf16, d80, 128 rows, cp.async",
                flash_attention_vs_cpu(dev, DType::BF16, 80, T128A, 3e-2),
            ),
            (
                "flash attention f16, strided views + windows, 64 rows",
                flash_attention_rows_vs_cpu(dev, DType::F16, T64, 4e-3),
            ),
            (
                "flash attention f16, strided views + windows, 128 rows",
                flash_attention_rows_vs_cpu(dev, DType::F16, T128, 4e-3),
            ),
            (
                "flash attention f16, strided views + windows, 128 rows, cp.async",
                flash_attention_rows_vs_cpu(dev, DType::F16, T128A, 4e-3),
            ),
            (
                "flash attention with q's RMS norm fused vs separate, f16 and bf16, d64 and d80, every build",
                flash_qnorm_builds(dev),
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    //! The GPU kernels against their CPU twins; skipped (and saying so) without a usable GPU.
    use candle_core::Device;

    fn gpu() -> Option<Device> {
        match crate::runtime::device::open(
            crate::runtime::device::DeviceRequest::Cuda(0),
            crate::runtime::device::Fallback::Fail,
        ) {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("skipped: no usable GPU ({e:#})");
                None
            }
        }
    }

    #[test]
    fn gpu_kernels_match_their_cpu_twins() {
        let Some(dev) = gpu() else { return };
        for (name, r) in super::checks::all(&dev) {
            let e = r.unwrap_or_else(|e| panic!("{name}: {e:#}"));
            eprintln!("{name}: relative error {e:.2e}");
        }
    }
}
