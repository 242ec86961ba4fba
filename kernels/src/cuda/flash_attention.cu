// Fused attention on the tensor cores, FlashAttention-2 style, for head dimensions 64 and 80 and
// float16 or bfloat16 operands (float32 scores, softmax and accumulators):
//   out[q, h, :] = softmax_j(scale * <Q[q, h, :], K[j, h, :]>) V[j, h, :]
// over the keys j of q's group, with a running (online) softmax: no score matrix exists in memory.
//
// Layouts: row r of q (k, v) starts q_stride (k_stride, v_stride) elements after row r - 1 and
// holds heads x HD contiguous values (so q, k and v can be views into one packed projection);
// out is [nq, heads, HD] contiguous. With `perm` (nullable), logical row r of q, k, v and out is
// physical row perm[r]: windows are attended in window order without gathering. Group g covers
// query rows [q_start[g], q_end[g]) and keys [kv_start[g], kv_end[g]): one group per batch
// element gives dense (self or cross) attention, one per sparse batch element variable-length
// attention, one per window windowed attention.
//
// Work: block (tile, head) computes 64 * MF query rows of one group: 4 warps, each MF fragments
// of 16 rows, so every K and V fragment read from shared memory feeds MF tensor-core products.
// tile_group[t] and tile_q0[t] name the group and the first row. Keys are walked in tiles of 64
// staged in shared memory; S = Q K^T and O += P V use mma.sync m16n8k16 (sm_80 and later), K's B
// fragments come from ldmatrix, V's from ldmatrix.trans, and P is re-packed from the S
// accumulators into A fragments without leaving registers. Rows of an empty key range are
// written as zeros. No headers: halves are moved as raw 16-bit words and converted with cvt.
//
// With `q_gamma` (nullable, float32 [heads, HD]) the queries are MultiHeadRMSNorm'ed as their
// fragments are loaded: q / max(||q||, 1e-12) * q_gamma[h, :] * q_scale in float32, rounded to
// the storage type, the per-element operations of `rms_norm_heads` (fused.cu) in the same order,
// so the result is that kernel's up to the order of the float32 sum of squares. The separate
// launch (a read and a write of all of q) disappears.

#define BN 64      // keys per tile

__device__ __forceinline__ void ldmatrix_x4_trans(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x2(u32* r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(addr));
}

// Copies rows [j0, j0 + BN) of one head of `src` (rows `stride` apart, HD values per head) into
// `dst` (BN rows, LDS halves apart) through registers with 16-byte loads and stores; rows at or
// past `j1` are zero-filled.
template <int HD, int LDS>
__device__ __forceinline__ void stage_tile(u16* dst, const u16* __restrict__ src, int j0, int j1,
                                           long long stride, const int* perm, int h, int tid) {
    constexpr int CPR = HD / 8;   // 16-byte chunks per row
    #pragma unroll
    for (int i = 0; i < (BN * CPR) / 128; ++i) {
        const int idx = tid + i * 128;
        const int row = idx / CPR, chunk = idx % CPR;
        const int j = j0 + row;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (j < j1)
            val = *reinterpret_cast<const uint4*>(src + (long long)(perm ? perm[j] : j) * stride +
                                                  h * HD + chunk * 8);
        *reinterpret_cast<uint4*>(dst + row * LDS + chunk * 8) = val;
    }
}

// The same tile through cp.async (16-byte copies, rows past `j1` zero-filled), so it lands while
// the current tile is computed; completion is waited for with cp.async.wait_group before the
// barrier that publishes it.
template <int HD, int LDS>
__device__ __forceinline__ void stage_tile_async(u16* dst, const u16* __restrict__ src, int j0,
                                                 int j1, long long stride, const int* perm, int h,
                                                 int tid) {
    constexpr int CPR = HD / 8;
    #pragma unroll
    for (int i = 0; i < (BN * CPR) / 128; ++i) {
        const int idx = tid + i * 128;
        const int row = idx / CPR, chunk = idx % CPR;
        const int j = j0 + row;
        const bool ok = j < j1;
        const int jr = ok ? j : j0;
        cp_async16(dst + row * LDS + chunk * 8,
                   src + (long long)(perm ? perm[jr] : jr) * stride + h * HD + chunk * 8, ok);
    }
}

// HD: head dimension (a multiple of 16); MF: 16-row fragments per warp (rows per block 64 * MF);
// ASYNC: K/V tiles double-buffered through cp.async (the next tile is copied while this one is
// computed) instead of one buffer loaded through registers between two barriers. (Skipping the
// rescale for tiles that raise no row's maximum was measured on an H100: no faster, so removed.)
template <bool BF16, int HD, int MF, bool ASYNC>
__device__ void flash_attention(const u16* __restrict__ q, const u16* __restrict__ k,
                                const u16* __restrict__ v, const int* __restrict__ tile_group,
                                const int* __restrict__ tile_q0, const int* __restrict__ q_end,
                                const int* __restrict__ kv_start, const int* __restrict__ kv_end,
                                int heads, float scale_log2, u16* __restrict__ out,
                                long long q_stride, long long k_stride, long long v_stride,
                                const int* __restrict__ perm, const float* __restrict__ q_gamma,
                                float q_scale) {
    constexpr int KS = HD / 16;    // k-steps of the Q K^T product
    constexpr int ND = HD / 8;     // 8-wide blocks of output dims
    constexpr int LDS = HD + 8;    // shared row stride in halves: conflict-free ldmatrix rows
    __shared__ __align__(16) u16 kbuf[ASYNC ? 2 : 1][BN * LDS];
    __shared__ __align__(16) u16 vbuf[ASYNC ? 2 : 1][BN * LDS];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int tile = blockIdx.x, h = blockIdx.y;
    const int grp = tile_group[tile];
    const int r_end = q_end[grp];
    const int r0 = tile_q0[tile] + warp * 16 * MF;   // this warp's first query row
    const int j_begin = kv_start[grp], j_end = kv_end[grp];

    // Q fragments (A operands), KS k-steps of 16 dims per fragment, straight from global memory.
    u32 qa[MF][KS][4];
    #pragma unroll
    for (int f = 0; f < MF; ++f) {
        const int ra = r0 + f * 16 + g, rb = ra + 8;
        const int pra = ra < r_end ? (perm ? perm[ra] : ra) : 0;
        const int prb = rb < r_end ? (perm ? perm[rb] : rb) : 0;
        const u16* pa = q + (long long)pra * q_stride + h * HD;
        const u16* pb = q + (long long)prb * q_stride + h * HD;
        #pragma unroll
        for (int s = 0; s < KS; ++s) {
            const int c = s * 16 + 2 * t;
            qa[f][s][0] = ra < r_end ? *reinterpret_cast<const u32*>(pa + c) : 0u;
            qa[f][s][1] = rb < r_end ? *reinterpret_cast<const u32*>(pb + c) : 0u;
            qa[f][s][2] = ra < r_end ? *reinterpret_cast<const u32*>(pa + c + 8) : 0u;
            qa[f][s][3] = rb < r_end ? *reinterpret_cast<const u32*>(pb + c + 8) : 0u;
        }
    }
    if (q_gamma) rms_norm_q<BF16, HD, MF>(qa, q_gamma, q_scale, h, r0, r_end, g, t);

    float o[MF][ND][4];
    float m[MF][2], l[MF][2];   // running max and sum of rows g and g + 8 of each fragment
    #pragma unroll
    for (int f = 0; f < MF; ++f) {
        #pragma unroll
        for (int n = 0; n < ND; ++n) o[f][n][0] = o[f][n][1] = o[f][n][2] = o[f][n][3] = 0.f;
        m[f][0] = m[f][1] = NEG_INF;
        l[f][0] = l[f][1] = 0.f;
    }

    if constexpr (ASYNC) {
        if (j_begin < j_end) {
            stage_tile_async<HD, LDS>(kbuf[0], k, j_begin, j_end, k_stride, perm, h, tid);
            stage_tile_async<HD, LDS>(vbuf[0], v, j_begin, j_end, v_stride, perm, h, tid);
        }
        cp_async_commit();
    }
    int buf = 0;
    for (int j0 = j_begin; j0 < j_end; j0 += BN, buf ^= (ASYNC ? 1 : 0)) {
        __syncthreads();   // every warp is done with the buffer the next tile goes into
        if constexpr (ASYNC) {
            if (j0 + BN < j_end) {
                stage_tile_async<HD, LDS>(kbuf[buf ^ 1], k, j0 + BN, j_end, k_stride, perm, h, tid);
                stage_tile_async<HD, LDS>(vbuf[buf ^ 1], v, j0 + BN, j_end, v_stride, perm, h, tid);
            }
            cp_async_commit();
            cp_async_wait_one();   // this tile's copies (all but the newest group) have landed
        } else {
            stage_tile<HD, LDS>(kbuf[0], k, j0, j_end, k_stride, perm, h, tid);
            stage_tile<HD, LDS>(vbuf[0], v, j0, j_end, v_stride, perm, h, tid);
        }
        __syncthreads();
        const u16* ks = kbuf[buf];
        const u16* vs = vbuf[buf];
        const bool partial = j0 + BN > j_end;   // keys past the group's end in this tile

        // S = Q K^T: 16 rows x 64 keys per fragment, 8 blocks of 8 keys; each block's K
        // fragments are loaded once for all MF fragments.
        float s[MF][8][4];
        #pragma unroll
        for (int n = 0; n < 8; ++n) {
            u32 kb[KS][2];
            const u16* krow = ks + (n * 8 + (lane & 7)) * LDS;
            #pragma unroll
            for (int st = 0; st < KS; st += 2) {
                if (st + 1 < KS) {
                    u32 r[4];
                    ldmatrix_x4(r, smem_addr(krow + st * 16 + (lane >> 3) * 8));
                    kb[st][0] = r[0]; kb[st][1] = r[1];
                    kb[st + 1][0] = r[2]; kb[st + 1][1] = r[3];
                } else {
                    u32 r[2];
                    ldmatrix_x2(r, smem_addr(krow + st * 16 + ((lane >> 3) & 1) * 8));
                    kb[st][0] = r[0]; kb[st][1] = r[1];
                }
            }
            #pragma unroll
            for (int f = 0; f < MF; ++f) {
                s[f][n][0] = s[f][n][1] = s[f][n][2] = s[f][n][3] = 0.f;
                #pragma unroll
                for (int st = 0; st < KS; ++st) mma16816<BF16>(s[f][n], qa[f][st], kb[st][0], kb[st][1]);
            }
        }
        // Mask keys past the group's end; online softmax per fragment row.
        #pragma unroll
        for (int f = 0; f < MF; ++f) {
            float mx_a = NEG_INF, mx_b = NEG_INF;
            #pragma unroll
            for (int n = 0; n < 8; ++n) {
                if (partial) {
                    const int j = j0 + n * 8 + 2 * t;
                    if (j >= j_end) { s[f][n][0] = NEG_INF; s[f][n][2] = NEG_INF; }
                    if (j + 1 >= j_end) { s[f][n][1] = NEG_INF; s[f][n][3] = NEG_INF; }
                }
                mx_a = fmaxf(mx_a, fmaxf(s[f][n][0], s[f][n][1]));
                mx_b = fmaxf(mx_b, fmaxf(s[f][n][2], s[f][n][3]));
            }
            mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
            mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
            mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
            mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
            const float mn_a = fmaxf(m[f][0], mx_a), mn_b = fmaxf(m[f][1], mx_b);
            // Every tile holds at least one valid key, so mn_* is finite from the first tile on.
            const float corr_a = ex2((m[f][0] - mn_a) * scale_log2);
            const float corr_b = ex2((m[f][1] - mn_b) * scale_log2);
            m[f][0] = mn_a;
            m[f][1] = mn_b;
            const float off_a = mn_a * scale_log2, off_b = mn_b * scale_log2;
            float sum_a = 0.f, sum_b = 0.f;
            #pragma unroll
            for (int n = 0; n < 8; ++n) {
                s[f][n][0] = ex2(fmaf(s[f][n][0], scale_log2, -off_a));
                s[f][n][1] = ex2(fmaf(s[f][n][1], scale_log2, -off_a));
                s[f][n][2] = ex2(fmaf(s[f][n][2], scale_log2, -off_b));
                s[f][n][3] = ex2(fmaf(s[f][n][3], scale_log2, -off_b));
                sum_a += s[f][n][0] + s[f][n][1];
                sum_b += s[f][n][2] + s[f][n][3];
            }
            l[f][0] = l[f][0] * corr_a + sum_a;
            l[f][1] = l[f][1] * corr_b + sum_b;
            #pragma unroll
            for (int n = 0; n < ND; ++n) {
                o[f][n][0] *= corr_a; o[f][n][1] *= corr_a;
                o[f][n][2] *= corr_b; o[f][n][3] *= corr_b;
            }
        }
        // O += P V: P's accumulators become A fragments (16 keys each), V's B fragments come
        // transposed out of shared memory, two 8-wide blocks of dims per ldmatrix, each used by
        // all MF fragments.
        #pragma unroll
        for (int kb = 0; kb < 4; ++kb) {
            u32 pa[MF][4];
            #pragma unroll
            for (int f = 0; f < MF; ++f) {
                pa[f][0] = pack2<BF16>(s[f][2 * kb][0], s[f][2 * kb][1]);
                pa[f][1] = pack2<BF16>(s[f][2 * kb][2], s[f][2 * kb][3]);
                pa[f][2] = pack2<BF16>(s[f][2 * kb + 1][0], s[f][2 * kb + 1][1]);
                pa[f][3] = pack2<BF16>(s[f][2 * kb + 1][2], s[f][2 * kb + 1][3]);
            }
            const int key = kb * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
            #pragma unroll
            for (int nd = 0; nd < ND; nd += 2) {
                const int col = nd * 8 + (lane >> 4) * 8;
                u32 b[4];
                ldmatrix_x4_trans(b, smem_addr(vs + key * LDS + col));
                #pragma unroll
                for (int f = 0; f < MF; ++f) {
                    mma16816<BF16>(o[f][nd], pa[f], b[0], b[1]);
                    mma16816<BF16>(o[f][nd + 1], pa[f], b[2], b[3]);
                }
            }
        }
    }

    #pragma unroll
    for (int f = 0; f < MF; ++f) {
        float la = l[f][0], lb = l[f][1];
        la += __shfl_xor_sync(0xffffffffu, la, 1);
        la += __shfl_xor_sync(0xffffffffu, la, 2);
        lb += __shfl_xor_sync(0xffffffffu, lb, 1);
        lb += __shfl_xor_sync(0xffffffffu, lb, 2);
        const float inv_a = la > 0.f ? 1.f / la : 0.f;
        const float inv_b = lb > 0.f ? 1.f / lb : 0.f;
        const int ra = r0 + f * 16 + g, rb = ra + 8;
        const int pra = ra < r_end ? (perm ? perm[ra] : ra) : 0;
        const int prb = rb < r_end ? (perm ? perm[rb] : rb) : 0;
        #pragma unroll
        for (int n = 0; n < ND; ++n) {
            const int c = n * 8 + 2 * t;
            if (ra < r_end)
                *reinterpret_cast<u32*>(out + ((long long)pra * heads + h) * HD + c) =
                    pack2<BF16>(o[f][n][0] * inv_a, o[f][n][1] * inv_a);
            if (rb < r_end)
                *reinterpret_cast<u32*>(out + ((long long)prb * heads + h) * HD + c) =
                    pack2<BF16>(o[f][n][2] * inv_b, o[f][n][3] * inv_b);
        }
    }
}

// Entry points: flash_attention_{async_}{f16,bf16}_d{HD}_m{MF}, async_ for the cp.async variant.
// (Builds capped for three or four blocks per multiprocessor were measured slower on an H100:
// 175-205 against 242-262 TFLOP/s on the SS flow's attention; the register-hungry 128-row blocks
// at two per multiprocessor stay.)
#define FLASH_ENTRY(NAME, BF16, HD, MF, ASYNC)                                                  \
    extern "C" __global__ void __launch_bounds__(128) NAME(                                     \
        const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,        \
        const int* __restrict__ tile_group, const int* __restrict__ tile_q0,                    \
        const int* __restrict__ q_end, const int* __restrict__ kv_start,                        \
        const int* __restrict__ kv_end, int heads, float scale_log2, u16* __restrict__ out,     \
        long long q_stride, long long k_stride, long long v_stride,                             \
        const int* __restrict__ perm, const float* __restrict__ q_gamma, float q_scale) {       \
        flash_attention<BF16, HD, MF, ASYNC>(q, k, v, tile_group, tile_q0, q_end, kv_start,     \
                                             kv_end, heads, scale_log2, out, q_stride, k_stride, \
                                             v_stride, perm, q_gamma, q_scale);                  \
    }

#define FLASH_ENTRIES(TY, BF16, HD)                                                             \
    FLASH_ENTRY(flash_attention_##TY##_d##HD##_m1, BF16, HD, 1, false)                          \
    FLASH_ENTRY(flash_attention_##TY##_d##HD##_m2, BF16, HD, 2, false)                          \
    FLASH_ENTRY(flash_attention_async_##TY##_d##HD##_m1, BF16, HD, 1, true)                     \
    FLASH_ENTRY(flash_attention_async_##TY##_d##HD##_m2, BF16, HD, 2, true)

FLASH_ENTRIES(f16, false, 64)
FLASH_ENTRIES(f16, false, 80)
FLASH_ENTRIES(bf16, true, 64)
FLASH_ENTRIES(bf16, true, 80)
