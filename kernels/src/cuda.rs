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
    /// `Some(arch)`: the source uses instructions of that one architecture's `a` feature set
    /// (wgmma for `sm_90a`), so it is compiled only for `sm_{arch}a` and only loaded there.
    pub arch_specific: Option<u32>,
}

impl KernelSource {
    /// Whether this source can run on a GPU of compute capability `arch` (`major * 10 + minor`).
    pub fn runs_on(&self, arch: u32) -> bool {
        self.arch_specific.is_none_or(|a| a == arch)
    }
}

/// Submanifold sparse convolution as one gather-GEMM over a neighbour map.
pub const SPARSE_CONV: KernelSource = KernelSource {
    name: "sparse_conv",
    source: concat!(
        include_str!("cuda/mma.cuh"),
        include_str!("cuda/sparse_conv.cu")
    ),
    entry_points: &[
        "sparse_conv_gather_gemm",
        "sparse_conv_mma_f16",
        "sparse_conv_mma_bf16",
        "sparse_conv_mma_async_f16",
        "sparse_conv_mma_async_bf16",
        "sparse_conv_mma_f16_m128",
        "sparse_conv_mma_bf16_m128",
        "sparse_conv_mma_async_f16_m128",
        "sparse_conv_mma_async_bf16_m128",
        "sparse_conv_k64_f16_m128n128s3",
        "sparse_conv_k64_bf16_m128n128s3",
        "sparse_conv_k64_f16_m128n64s3",
        "sparse_conv_k64_bf16_m128n64s3",
        "sparse_conv_k64_f16_m128n128s2",
        "sparse_conv_k64_bf16_m128n128s2",
        "sparse_conv_k64_f16_m128n64s2",
        "sparse_conv_k64_bf16_m128n64s2",
        "sparse_conv_k64_f16_m64n128s3",
        "sparse_conv_k64_bf16_m64n128s3",
        "sparse_conv_k64_f16_m64n64s3",
        "sparse_conv_k64_bf16_m64n64s3",
        "sparse_conv_gather_sum_f16",
        "sparse_conv_gather_sum_bf16",
    ],
    arch_specific: None,
};

/// Variable-length (and, through its groups, windowed and cross) attention with online softmax.
pub const ATTENTION: KernelSource = KernelSource {
    name: "attention",
    source: include_str!("cuda/attention.cu"),
    entry_points: &["varlen_attention"],
    arch_specific: None,
};

/// Fused tensor-core attention (float16 / bfloat16, head dims 64 and 80, 64 or 128 query rows per
/// block, K/V staged through registers or double-buffered through cp.async) with the same groups.
pub const FLASH_ATTENTION: KernelSource = KernelSource {
    name: "flash_attention",
    source: concat!(
        include_str!("cuda/mma.cuh"),
        include_str!("cuda/flash_attention.cu")
    ),
    entry_points: &[
        "flash_attention_f16_d64_m1",
        "flash_attention_f16_d64_m2",
        "flash_attention_async_f16_d64_m1",
        "flash_attention_async_f16_d64_m2",
        "flash_attention_f16_d80_m1",
        "flash_attention_f16_d80_m2",
        "flash_attention_async_f16_d80_m1",
        "flash_attention_async_f16_d80_m2",
        "flash_attention_bf16_d64_m1",
        "flash_attention_bf16_d64_m2",
        "flash_attention_async_bf16_d64_m1",
        "flash_attention_async_bf16_d64_m2",
        "flash_attention_bf16_d80_m1",
        "flash_attention_bf16_d80_m2",
        "flash_attention_async_bf16_d80_m1",
        "flash_attention_async_bf16_d80_m2",
    ],
    arch_specific: None,
};

/// The same attention on Hopper's warpgroup instructions (wgmma; `sm_90a` only): 64 query rows
/// per warpgroup, 1-3 warpgroups per block sharing K/V tiles of 64 or 128 keys
/// (`flash_wgmma_{ty}_d{hd}_w{warpgroups}_n{keys}`), and a pipelined build
/// (`flash_wgmma_pipe_...`, 1-2 warpgroups: a tile's S = Q K^T issued with the previous tile's
/// P V, the softmax overlapping that product; `flash_wgmma_pipe2_...`, 2-4 warpgroups, K/V
/// copied two tiles ahead). Opt-in (`TRELLIS_FLASH_WGMMA=1`): on an H100
/// it is about as fast as the mma.sync kernel, not faster (docs/BENCHMARKS.md, session 10).
pub const FLASH_ATTENTION_SM90: KernelSource = KernelSource {
    name: "flash_attention_sm90",
    source: concat!(
        include_str!("cuda/mma.cuh"),
        include_str!("cuda/flash_attention_sm90.cu")
    ),
    entry_points: &[
        "flash_wgmma_f16_d64_w1_n64",
        "flash_wgmma_f16_d64_w1_n128",
        "flash_wgmma_f16_d64_w2_n64",
        "flash_wgmma_f16_d64_w2_n128",
        "flash_wgmma_f16_d64_w3_n64",
        "flash_wgmma_f16_d64_w3_n128",
        "flash_wgmma_f16_d80_w1_n64",
        "flash_wgmma_f16_d80_w1_n128",
        "flash_wgmma_f16_d80_w2_n64",
        "flash_wgmma_f16_d80_w2_n128",
        "flash_wgmma_f16_d80_w3_n64",
        "flash_wgmma_f16_d80_w3_n128",
        "flash_wgmma_bf16_d64_w1_n64",
        "flash_wgmma_bf16_d64_w1_n128",
        "flash_wgmma_bf16_d64_w2_n64",
        "flash_wgmma_bf16_d64_w2_n128",
        "flash_wgmma_bf16_d64_w3_n64",
        "flash_wgmma_bf16_d64_w3_n128",
        "flash_wgmma_bf16_d80_w1_n64",
        "flash_wgmma_bf16_d80_w1_n128",
        "flash_wgmma_bf16_d80_w2_n64",
        "flash_wgmma_bf16_d80_w2_n128",
        "flash_wgmma_bf16_d80_w3_n64",
        "flash_wgmma_bf16_d80_w3_n128",
        "flash_wgmma_pipe_f16_d64_w1_n64",
        "flash_wgmma_pipe_f16_d64_w1_n128",
        "flash_wgmma_pipe_f16_d64_w2_n64",
        "flash_wgmma_pipe_f16_d64_w2_n128",
        "flash_wgmma_pipe_f16_d80_w1_n64",
        "flash_wgmma_pipe_f16_d80_w1_n128",
        "flash_wgmma_pipe_f16_d80_w2_n64",
        "flash_wgmma_pipe_f16_d80_w2_n128",
        "flash_wgmma_pipe_bf16_d64_w1_n64",
        "flash_wgmma_pipe_bf16_d64_w1_n128",
        "flash_wgmma_pipe_bf16_d64_w2_n64",
        "flash_wgmma_pipe_bf16_d64_w2_n128",
        "flash_wgmma_pipe_bf16_d80_w1_n64",
        "flash_wgmma_pipe_bf16_d80_w1_n128",
        "flash_wgmma_pipe_bf16_d80_w2_n64",
        "flash_wgmma_pipe_bf16_d80_w2_n128",
        "flash_wgmma_pipe2_f16_d64_w2_n64",
        "flash_wgmma_pipe2_f16_d64_w3_n64",
        "flash_wgmma_pipe2_f16_d64_w4_n64",
        "flash_wgmma_pipe2_f16_d80_w2_n64",
        "flash_wgmma_pipe2_f16_d80_w3_n64",
        "flash_wgmma_pipe2_f16_d80_w4_n64",
        "flash_wgmma_pipe2_bf16_d64_w2_n64",
        "flash_wgmma_pipe2_bf16_d64_w3_n64",
        "flash_wgmma_pipe2_bf16_d64_w4_n64",
        "flash_wgmma_pipe2_bf16_d80_w2_n64",
        "flash_wgmma_pipe2_bf16_d80_w3_n64",
        "flash_wgmma_pipe2_bf16_d80_w4_n64",
    ],
    arch_specific: Some(90),
};

/// Neighbour maps built on the GPU (hash table of coordinates).
pub const NEIGHBOURS: KernelSource = KernelSource {
    name: "neighbours",
    source: include_str!("cuda/neighbours.cu"),
    entry_points: &["hash_clear", "hash_insert", "submanifold_query"],
    arch_specific: None,
};

/// Triangle rasteriser (depth test on packed depth + id keys) and the bake's texel projection.
pub const RASTER: KernelSource = KernelSource {
    name: "raster",
    source: include_str!("cuda/raster.cu"),
    entry_points: &[
        "project_vertices",
        "clear_keys",
        "raster_small",
        "raster_large",
        "resolve_frags",
        "bake_accumulate",
    ],
    arch_specific: None,
};

/// Forward Gaussian splatting: projection, tile keys, tile ranges, blending.
pub const SPLAT: KernelSource = KernelSource {
    name: "splat",
    source: include_str!("cuda/splat.cu"),
    entry_points: &[
        "splat_preprocess",
        "splat_keys",
        "tile_ranges",
        "splat_render",
    ],
    arch_specific: None,
};

/// Exclusive prefix sum and stable radix sort (64-bit keys, 32-bit values).
pub const SORT: KernelSource = KernelSource {
    name: "sort",
    source: include_str!("cuda/sort.cu"),
    entry_points: &[
        "scan_blocks",
        "scan_add",
        "radix_histogram",
        "radix_scatter",
    ],
    arch_specific: None,
};

/// Fused elementwise / row-wise work of the transformer blocks: Linear bias (+ activation),
/// LayerNorm (+ adaLN modulation), gated residual, a residual and the norm after it in one pass,
/// per-head RMS norm.
pub const FUSED: KernelSource = KernelSource {
    name: "fused",
    source: include_str!("cuda/fused.cu"),
    entry_points: &[
        "bias_act_f32",
        "bias_act_f16",
        "bias_act_bf16",
        "layer_norm_f32",
        "layer_norm_f16",
        "layer_norm_bf16",
        "add_layer_norm_f32",
        "add_layer_norm_f16",
        "add_layer_norm_bf16",
        "gated_add_f32",
        "gated_add_f16",
        "gated_add_bf16",
        "rms_norm_heads_f32",
        "rms_norm_heads_f16",
        "rms_norm_heads_bf16",
        "segment_mean_f32",
        "segment_mean_f16",
        "segment_mean_bf16",
    ],
    arch_specific: None,
};

/// Batch segments the fused kernels take by value (`Segments` in fused.cu).
pub const FUSED_MAX_SEGMENTS: usize = 8;
/// Sparse FlexiCubes: grid vertices, surface cubes, case ids, dual vertices, surface edges and
/// faces (with `SORT` for its sorts and scans).
pub const FLEXICUBES: KernelSource = KernelSource {
    name: "flexicubes",
    source: include_str!("cuda/flexicubes.cu"),
    entry_points: &[
        "fc_corner_keys",
        "fc_unique_flags",
        "fc_unique_scatter",
        "fc_vertex_attrs",
        "fc_cube_keys",
        "fc_count_duplicates",
        "fc_neg_count",
        "fc_neg_cubes",
        "fc_surf_flags",
        "fc_surf_write",
        "fc_resolve_cases",
        "fc_vd_flags",
        "fc_vd_base",
        "fc_dual_vertices",
        "fc_edge_count",
        "fc_edge_keys",
        "fc_quads",
        "fc_faces",
    ],
    arch_specific: None,
};

/// Largest colour width the FlexiCubes kernels take per vertex.
pub const FLEXICUBES_MAX_COLOR: usize = 8;

/// Every kernel source, for the compile-only test.
pub const ALL: &[KernelSource] = &[
    SPARSE_CONV,
    FUSED,
    ATTENTION,
    FLASH_ATTENTION,
    FLASH_ATTENTION_SM90,
    NEIGHBOURS,
    RASTER,
    SPLAT,
    SORT,
    FLEXICUBES,
];

/// Floats per camera in the raster and splat kernels: rotation rows (9), translation (3), fx,
/// fy, cx, cy, width, height, near, far, eye (3), padding.
pub const CAM_FLOATS: usize = 24;
/// Side of a splatting tile (threads per block: its square), as the CPU renderer's.
pub const SPLAT_TILE: usize = 8;
/// Elements one `scan_blocks` block scans.
pub const SCAN_ITEMS: usize = 1024;
/// Threads per block of the scan kernels.
pub const SCAN_THREADS: u32 = 256;
/// Elements one radix-sort block handles per pass, and its threads.
pub const RADIX_CHUNK: usize = 4096;
pub const RADIX_THREADS: u32 = 256;

/// Threads per block of `varlen_attention` (8 warps).
pub const ATTENTION_THREADS: u32 = 256;
/// Threads per block of `sparse_conv_gather_gemm`, and the rows × channels each block computes.
pub const SPARSE_CONV_THREADS: u32 = 256;
pub const SPARSE_CONV_TILE: u32 = 64;
/// Threads of one `sparse_conv_mma_*` block (4 warps, 32 rows each by 32 or 64 channels).
pub const SPARSE_CONV_MMA_THREADS: u32 = 128;
/// Output channels per `sparse_conv_mma_*` tile; its rows are 64, or 128 for the `_m128` entries.
pub const SPARSE_CONV_MMA_COLS: usize = 64;
/// Largest kernel volume `sparse_conv_mma_*` and `sparse_conv_k64_*` take (`CONV_MAX_VOLUME`: a
/// 3x3x3 kernel).
pub const SPARSE_CONV_MMA_MAX_VOLUME: usize = 27;

/// One tile shape of the 64-channel-step tensor-core conv `sparse_conv_k64_*`: `rows` x `cols`
/// outputs per block, warps of 32 rows x `warp_cols` channels, `stages` cp.async stages in dynamic
/// shared memory. Its entries are `sparse_conv_k64_{f16,bf16}_m{rows}n{cols}s{stages}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvK64Shape {
    pub rows: usize,
    pub cols: usize,
    pub warp_cols: usize,
    pub stages: usize,
}

impl ConvK64Shape {
    /// Threads per block (one warp per 32 x `warp_cols` part).
    pub const fn threads(&self) -> u32 {
        (self.rows / 32 * (self.cols / self.warp_cols) * 32) as u32
    }

    /// Dynamic shared memory per block: `stages` x (`rows` + `cols`) rows of 64 halves.
    pub const fn dynamic_smem_bytes(&self) -> u32 {
        (self.stages * (self.rows + self.cols) * 64 * 2) as u32
    }

    /// The kernel entry for a dtype suffix (`f16` / `bf16`).
    pub fn entry(&self, ty: &str) -> String {
        format!(
            "sparse_conv_k64_{ty}_m{}n{}s{}",
            self.rows, self.cols, self.stages
        )
    }
}

/// Every shape `sparse_conv_k64_*` is built for (the `CONV_K64_ENTRY` lines of sparse_conv.cu).
pub const SPARSE_CONV_K64_SHAPES: [ConvK64Shape; 6] = [
    ConvK64Shape {
        rows: 128,
        cols: 128,
        warp_cols: 64,
        stages: 3,
    },
    ConvK64Shape {
        rows: 128,
        cols: 64,
        warp_cols: 64,
        stages: 3,
    },
    ConvK64Shape {
        rows: 128,
        cols: 128,
        warp_cols: 64,
        stages: 2,
    },
    ConvK64Shape {
        rows: 128,
        cols: 64,
        warp_cols: 64,
        stages: 2,
    },
    ConvK64Shape {
        rows: 64,
        cols: 128,
        warp_cols: 64,
        stages: 3,
    },
    ConvK64Shape {
        rows: 64,
        cols: 64,
        warp_cols: 32,
        stages: 3,
    },
];
/// Largest head dimension `varlen_attention` takes.
pub const ATTENTION_MAX_DIM: usize = 256;
/// `flash_attention_*`: threads per block (4 warps; 64 or 128 query rows per block, 16 per
/// warp-fragment, 1 or 2 fragments per warp: the `_m1` / `_m2` entries), and the head dimensions
/// of both flash kernels (`flash_wgmma_*` takes 128 threads per 64 rows).
pub const FLASH_THREADS: u32 = 128;
pub const FLASH_HEAD_DIMS: [usize; 2] = [64, 80];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_k64_shape_has_its_entries() {
        for s in SPARSE_CONV_K64_SHAPES {
            for ty in ["f16", "bf16"] {
                let e = s.entry(ty);
                assert!(SPARSE_CONV.entry_points.contains(&e.as_str()), "{e}");
            }
            assert!(s.threads() >= 128 && s.threads() <= 256);
            // below the 227 KB a block may take on sm_90 with the static part (< 15 KB)
            assert!(s.dynamic_smem_bytes() + 15 * 1024 <= 227 * 1024);
        }
        let k64 = SPARSE_CONV
            .entry_points
            .iter()
            .filter(|e| e.starts_with("sparse_conv_k64_"))
            .count();
        assert_eq!(k64, 2 * SPARSE_CONV_K64_SHAPES.len());
    }
}
