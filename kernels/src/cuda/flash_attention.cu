// Fused attention on the tensor cores, FlashAttention-2 style, for head dimension 64 and float16
// or bfloat16 operands (float32 scores, softmax and accumulators):
//   out[q, h, :] = softmax_j(scale * <Q[q, h, :], K[j, h, :]>) V[j, h, :]
// over the keys j of q's group, with a running (online) softmax: no score matrix exists in memory.
//
// Layouts: row r of q (k, v) starts q_stride (k_stride, v_stride) elements after row r - 1 and
// holds heads x 64 contiguous values (so q, k and v can be views into one packed projection);
// out is [nq, heads, 64] contiguous. With `perm` (nullable), logical row r of q, k, v and out is
// physical row perm[r]: windows are attended in window order without gathering. Group g covers query rows [q_start[g], q_end[g]) and keys [kv_start[g],
// kv_end[g]): one group per batch element gives dense (self or cross) attention, one per sparse
// batch element variable-length attention, one per window windowed attention.
//
// Work: block (tile, head) computes 64 query rows of one group (4 warps x 16 rows); tile_group[t]
// and tile_q0[t] name the group and the first row. Keys are walked in tiles of 64 staged in shared
// memory; S = Q K^T and O += P V use mma.sync m16n8k16 (sm_80 and later), P is re-packed from the
// S accumulators into A fragments without leaving registers, V's B fragments come from
// ldmatrix.trans. Rows of an empty key range are written as zeros. No headers: halves are moved
// as raw 16-bit words and converted with cvt.

#define HD 64      // head dimension
#define BM 64      // query rows per block
#define BN 64      // keys per tile
#define LDS 72     // shared-memory row stride in halves (64 + 8: conflict-free fragment loads)
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// Copies rows [j0, j0 + BN) of one head of `src` ([n, heads, 64]) into `dst` (BN x LDS halves)
// through cp.async (128 threads, 16 bytes per copy; rows at or past `j1` zero-filled), so the
// next tile's loads fly while the current one is computed; completion is waited for with
// cp.async.wait_group before the barrier that publishes the tile.
__device__ __forceinline__ void stage_tile_async(u16* dst, const u16* __restrict__ src, int j0,
                                                 int j1, long long stride, const int* perm,
                                                 int h, int tid) {
    #pragma unroll
    for (int i = 0; i < (BN * HD / 8) / 128; ++i) {
        const int idx = tid + i * 128;
        const int row = idx >> 3, chunk = idx & 7;
        const int j = j0 + row;
        const bool ok = j < j1;
        const int jr = ok ? j : j0;
        const u16* g = src + (long long)(perm ? perm[jr] : jr) * stride + h * HD + chunk * 8;
        cp_async16(dst + row * LDS + chunk * 8, g, ok);
    }
}

// The same tile through registers (plain 16-byte loads and stores), for the single-buffered
// variant.
__device__ __forceinline__ void stage_tile_sync(u16* dst, const u16* __restrict__ src, int j0,
                                                int j1, long long stride, const int* perm, int h,
                                                int tid) {
    #pragma unroll
    for (int i = 0; i < (BN * HD / 8) / 128; ++i) {
        const int idx = tid + i * 128;
        const int row = idx >> 3, chunk = idx & 7;
        const int j = j0 + row;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (j < j1)
            val = *reinterpret_cast<const uint4*>(src + (long long)(perm ? perm[j] : j) * stride +
                                                  h * HD + chunk * 8);
        *reinterpret_cast<uint4*>(dst + row * LDS + chunk * 8) = val;
    }
}


// ASYNC: K/V double-buffered through cp.async (two 18 KiB stages); otherwise one stage loaded
// through registers between two barriers. Both are kept: which is faster depends on occupancy
// (`TRELLIS_FLASH_ASYNC` picks at run time; `bench attention` measures both).
template <bool BF16, bool ASYNC>
__device__ void flash_attention(const u16* __restrict__ q, const u16* __restrict__ k,
                                const u16* __restrict__ v, const int* __restrict__ tile_group,
                                const int* __restrict__ tile_q0, const int* __restrict__ q_end,
                                const int* __restrict__ kv_start, const int* __restrict__ kv_end,
                                int heads, float scale_log2, u16* __restrict__ out,
                                long long q_stride, long long k_stride, long long v_stride,
                                const int* __restrict__ perm) {
    // Two K/V buffers: tile i is computed from one while tile i + 1 is copied into the other.
    __shared__ __align__(16) u16 kbuf[ASYNC ? 2 : 1][BN * LDS];
    __shared__ __align__(16) u16 vbuf[ASYNC ? 2 : 1][BN * LDS];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int tile = blockIdx.x, h = blockIdx.y;
    const int grp = tile_group[tile];
    const int r_end = q_end[grp];
    const int r0 = tile_q0[tile] + warp * 16;   // this warp's first query row
    const int j_begin = kv_start[grp], j_end = kv_end[grp];

    // Q fragments (A operands), 4 k-steps of 16 dims, straight from global memory.
    u32 qa[4][4];
    {
        const int ra = r0 + g, rb = r0 + g + 8;
        const int pra = ra < r_end ? (perm ? perm[ra] : ra) : 0;
        const int prb = rb < r_end ? (perm ? perm[rb] : rb) : 0;
        const u16* pa = q + (long long)pra * q_stride + h * HD;
        const u16* pb = q + (long long)prb * q_stride + h * HD;
        #pragma unroll
        for (int s = 0; s < 4; ++s) {
            const int c = s * 16 + 2 * t;
            qa[s][0] = ra < r_end ? *reinterpret_cast<const u32*>(pa + c) : 0u;
            qa[s][1] = rb < r_end ? *reinterpret_cast<const u32*>(pb + c) : 0u;
            qa[s][2] = ra < r_end ? *reinterpret_cast<const u32*>(pa + c + 8) : 0u;
            qa[s][3] = rb < r_end ? *reinterpret_cast<const u32*>(pb + c + 8) : 0u;
        }
    }

    float o[8][4];
    #pragma unroll
    for (int n = 0; n < 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m_a = NEG_INF, m_b = NEG_INF, l_a = 0.f, l_b = 0.f;   // rows g and g + 8

    if constexpr (ASYNC) {
        if (j_begin < j_end) {
            stage_tile_async(kbuf[0], k, j_begin, j_end, k_stride, perm, h, tid);
            stage_tile_async(vbuf[0], v, j_begin, j_end, v_stride, perm, h, tid);
        }
        cp_async_commit();
    }
    int buf = 0;
    for (int j0 = j_begin; j0 < j_end; j0 += BN, buf ^= (ASYNC ? 1 : 0)) {
        __syncthreads();   // every warp is done with the buffer the next tile goes into
        if constexpr (ASYNC) {
            if (j0 + BN < j_end) {
                stage_tile_async(kbuf[buf ^ 1], k, j0 + BN, j_end, k_stride, perm, h, tid);
                stage_tile_async(vbuf[buf ^ 1], v, j0 + BN, j_end, v_stride, perm, h, tid);
            }
            cp_async_commit();
            cp_async_wait_one();   // this tile's copies (all but the newest group) have landed
        } else {
            stage_tile_sync(kbuf[0], k, j0, j_end, k_stride, perm, h, tid);
            stage_tile_sync(vbuf[0], v, j0, j_end, v_stride, perm, h, tid);
        }
        __syncthreads();
        const u16* ks = kbuf[buf];
        const u16* vs = vbuf[buf];

        // S = Q K^T: 16 rows x 64 keys per warp, 8 blocks of 8 keys.
        float s[8][4];
        #pragma unroll
        for (int n = 0; n < 8; ++n) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
            const u16* kr = ks + (n * 8 + g) * LDS + 2 * t;
            #pragma unroll
            for (int st = 0; st < 4; ++st) {
                const u32 b0 = *reinterpret_cast<const u32*>(kr + st * 16);
                const u32 b1 = *reinterpret_cast<const u32*>(kr + st * 16 + 8);
                mma16816<BF16>(s[n], qa[st], b0, b1);
            }
        }
        // Mask keys past the group's end; row maxima.
        float mx_a = NEG_INF, mx_b = NEG_INF;
        #pragma unroll
        for (int n = 0; n < 8; ++n) {
            const int j = j0 + n * 8 + 2 * t;
            if (j >= j_end) { s[n][0] = NEG_INF; s[n][2] = NEG_INF; }
            if (j + 1 >= j_end) { s[n][1] = NEG_INF; s[n][3] = NEG_INF; }
            mx_a = fmaxf(mx_a, fmaxf(s[n][0], s[n][1]));
            mx_b = fmaxf(mx_b, fmaxf(s[n][2], s[n][3]));
        }
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
        const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
        // Every tile holds at least one valid key, so mn_* is finite from the first tile on.
        const float corr_a = exp2f((m_a - mn_a) * scale_log2);
        const float corr_b = exp2f((m_b - mn_b) * scale_log2);
        m_a = mn_a;
        m_b = mn_b;
        const float off_a = mn_a * scale_log2, off_b = mn_b * scale_log2;
        float sum_a = 0.f, sum_b = 0.f;
        #pragma unroll
        for (int n = 0; n < 8; ++n) {
            s[n][0] = exp2f(fmaf(s[n][0], scale_log2, -off_a));
            s[n][1] = exp2f(fmaf(s[n][1], scale_log2, -off_a));
            s[n][2] = exp2f(fmaf(s[n][2], scale_log2, -off_b));
            s[n][3] = exp2f(fmaf(s[n][3], scale_log2, -off_b));
            sum_a += s[n][0] + s[n][1];
            sum_b += s[n][2] + s[n][3];
        }
        l_a = l_a * corr_a + sum_a;
        l_b = l_b * corr_b + sum_b;
        #pragma unroll
        for (int n = 0; n < 8; ++n) {
            o[n][0] *= corr_a; o[n][1] *= corr_a;
            o[n][2] *= corr_b; o[n][3] *= corr_b;
        }
        // O += P V: P's accumulators become A fragments (16 keys each), V's B fragments come
        // transposed out of shared memory, two 8-wide blocks of dims per ldmatrix.
        #pragma unroll
        for (int kb = 0; kb < 4; ++kb) {
            u32 pa[4];
            pa[0] = pack2<BF16>(s[2 * kb][0], s[2 * kb][1]);
            pa[1] = pack2<BF16>(s[2 * kb][2], s[2 * kb][3]);
            pa[2] = pack2<BF16>(s[2 * kb + 1][0], s[2 * kb + 1][1]);
            pa[3] = pack2<BF16>(s[2 * kb + 1][2], s[2 * kb + 1][3]);
            const int key = kb * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
            #pragma unroll
            for (int nd = 0; nd < 8; nd += 2) {
                const int col = nd * 8 + (lane >> 4) * 8;
                u32 b[4];
                ldmatrix_x4_trans(b, smem_addr(vs + key * LDS + col));
                mma16816<BF16>(o[nd], pa, b[0], b[1]);
                mma16816<BF16>(o[nd + 1], pa, b[2], b[3]);
            }
        }
    }

    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
    const float inv_a = l_a > 0.f ? 1.f / l_a : 0.f;
    const float inv_b = l_b > 0.f ? 1.f / l_b : 0.f;
    const int ra = r0 + g, rb = r0 + g + 8;
    const int pra = ra < r_end ? (perm ? perm[ra] : ra) : 0;
    const int prb = rb < r_end ? (perm ? perm[rb] : rb) : 0;
    #pragma unroll
    for (int n = 0; n < 8; ++n) {
        const int c = n * 8 + 2 * t;
        if (ra < r_end)
            *reinterpret_cast<u32*>(out + ((long long)pra * heads + h) * HD + c) =
                pack2<BF16>(o[n][0] * inv_a, o[n][1] * inv_a);
        if (rb < r_end)
            *reinterpret_cast<u32*>(out + ((long long)prb * heads + h) * HD + c) =
                pack2<BF16>(o[n][2] * inv_b, o[n][3] * inv_b);
    }
}

#define FLASH_ENTRY(NAME, BF16, ASYNC)                                                          \
    extern "C" __global__ void __launch_bounds__(128) NAME(                                     \
        const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,        \
        const int* __restrict__ tile_group, const int* __restrict__ tile_q0,                    \
        const int* __restrict__ q_end, const int* __restrict__ kv_start,                        \
        const int* __restrict__ kv_end, int heads, float scale_log2, u16* __restrict__ out,     \
        long long q_stride, long long k_stride, long long v_stride, const int* __restrict__ perm) { \
        flash_attention<BF16, ASYNC>(q, k, v, tile_group, tile_q0, q_end, kv_start, kv_end,     \
                                     heads, scale_log2, out, q_stride, k_stride, v_stride, perm); \
    }

FLASH_ENTRY(flash_attention_f16, false, false)
FLASH_ENTRY(flash_attention_bf16, true, false)
FLASH_ENTRY(flash_attention_async_f16, false, true)
FLASH_ENTRY(flash_attention_async_bf16, true, true)
