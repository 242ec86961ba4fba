//! The CUDA C++ kernels compiled at run time with [`crate::nvrtc`] (sources in `src/cuda/`). Each
//! has a CPU twin in this crate that its GPU test compares against. No arch list: the caller
//! compiles for the GPU it finds.

/// One CUDA C++ translation unit and the `extern "C"` kernels it defines.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// Module name (also the cache file's stem).
    pub name: &'static str,
    pub source: &'static str,
    pub entry_points: &'static [&'static str],
}

/// Submanifold sparse convolution as one gather-GEMM over a neighbour map.
pub const SPARSE_CONV: KernelSource = KernelSource {
    name: "sparse_conv",
    source: include_str!("cuda/sparse_conv.cu"),
    entry_points: &["sparse_conv_gather_gemm"],
};

/// Variable-length (and, through its groups, windowed and cross) attention with online softmax.
pub const ATTENTION: KernelSource = KernelSource {
    name: "attention",
    source: include_str!("cuda/attention.cu"),
    entry_points: &["varlen_attention"],
};

/// Fused tensor-core attention (float16 / bfloat16, head dim 64) with the same groups.
pub const FLASH_ATTENTION: KernelSource = KernelSource {
    name: "flash_attention",
    source: include_str!("cuda/flash_attention.cu"),
    entry_points: &["flash_attention_f16", "flash_attention_bf16"],
};

/// Neighbour maps built on the GPU (hash table of coordinates).
pub const NEIGHBOURS: KernelSource = KernelSource {
    name: "neighbours",
    source: include_str!("cuda/neighbours.cu"),
    entry_points: &["hash_clear", "hash_insert", "submanifold_query"],
};

/// Every kernel source, for the compile-only test.
pub const ALL: &[KernelSource] = &[SPARSE_CONV, ATTENTION, FLASH_ATTENTION, NEIGHBOURS];

/// Threads per block of `varlen_attention` (8 warps).
pub const ATTENTION_THREADS: u32 = 256;
/// Threads per block of `sparse_conv_gather_gemm`, and the rows × channels each block computes.
pub const SPARSE_CONV_THREADS: u32 = 256;
pub const SPARSE_CONV_TILE: u32 = 64;
/// Largest head dimension `varlen_attention` takes.
pub const ATTENTION_MAX_DIM: usize = 256;
/// `flash_attention_*`: threads per block (4 warps), query rows per block, the one head dimension.
pub const FLASH_THREADS: u32 = 128;
pub const FLASH_ROWS: usize = 64;
pub const FLASH_HEAD_DIM: usize = 64;
