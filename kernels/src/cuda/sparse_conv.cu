// Submanifold sparse convolution as one gather-GEMM: out[i, o] = bias[o] +
//   sum_k sum_c weight[o, k, c] * feats[nbr[i * K + k], c]   (rows with nbr = -1 skipped).
// float32 in and out, float32 accumulation. Tile: 64 output rows x 64 output channels per block,
// 256 threads, each thread 4 x 4 outputs; the reduction runs over (k, c) in chunks of 16.
// Twin of the CPU kernel trellis_kernels::sparse_conv::submanifold_conv.
#define TM 64
#define TN 64
#define TK 16

extern "C" __global__ void sparse_conv_gather_gemm(
    const float* __restrict__ feats, int cin,
    const int* __restrict__ nbr, int rows, int volume,
    const float* __restrict__ weight, const float* __restrict__ bias, int has_bias,
    int cout, float* __restrict__ out)
{
    __shared__ float As[TK][TM + 1];
    __shared__ float Bs[TK][TN + 1];
    __shared__ int rowsrc[TM];
    const int tid = threadIdx.x;
    const int tx = tid % 16;   // output channel group
    const int ty = tid / 16;   // output row group
    const int row0 = blockIdx.y * TM;
    const int col0 = blockIdx.x * TN;
    float acc[4][4];
    for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b) acc[a][b] = 0.f;
    for (int k = 0; k < volume; ++k) {
        __syncthreads();
        if (tid < TM) {
            int r = row0 + tid;
            rowsrc[tid] = r < rows ? nbr[(long long)r * volume + k] : -1;
        }
        __syncthreads();
        // skip the whole offset when no row of the tile has a neighbour there
        int any = 0;
        for (int m = 0; m < TM; ++m) any |= (rowsrc[m] >= 0);
        if (!any) continue;
        for (int c0 = 0; c0 < cin; c0 += TK) {
            // A tile: TK x TM gathered feats (4 elements per thread)
            for (int e = tid; e < TK * TM; e += 256) {
                int m = e / TK, kk = e % TK;
                int src = rowsrc[m];
                int c = c0 + kk;
                As[kk][m] = (src >= 0 && c < cin) ? feats[(long long)src * cin + c] : 0.f;
            }
            // B tile: TK x TN weights (weight[o, k, c])
            for (int e = tid; e < TK * TN; e += 256) {
                int n = e / TK, kk = e % TK;
                int o = col0 + n, c = c0 + kk;
                Bs[kk][n] = (o < cout && c < cin) ? weight[((long long)o * volume + k) * cin + c] : 0.f;
            }
            __syncthreads();
            #pragma unroll
            for (int kk = 0; kk < TK; ++kk) {
                float a[4], b[4];
                #pragma unroll
                for (int i = 0; i < 4; ++i) a[i] = As[kk][ty * 4 + i];
                #pragma unroll
                for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx * 4 + j];
                #pragma unroll
                for (int i = 0; i < 4; ++i)
                    #pragma unroll
                    for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
            }
            __syncthreads();
        }
    }
    for (int i = 0; i < 4; ++i) {
        int r = row0 + ty * 4 + i;
        if (r >= rows) continue;
        for (int j = 0; j < 4; ++j) {
            int o = col0 + tx * 4 + j;
            if (o >= cout) continue;
            out[(long long)r * cout + o] = acc[i][j] + (has_bias ? bias[o] : 0.f);
        }
    }
}

// The same convolution on the tensor cores for float16 / bfloat16 feats and weights (float32
// accumulation, float32 bias, output rounded once to the input type), as spconv's half-precision
// implicit GEMM computes it. Source rows are `nbr >> src_shift`: 0 for a plain submanifold conv,
// 3 when the rows of a subdivided geometry (child c of parent p at row 8p + c) read their
// parent's feats directly, so the 8x copy of the coarse feats is never made.
// Tile: BM (64 or 128) rows x 64 output channels per block of 4 warps, each 32 rows (two 16-row
// fragments) by 64 * 32 / BM columns (2 x 2 warps of 32 x 32 for 64 rows, 4 x 1 of 32 x 64 for
// 128, which reads each weight tile for twice the rows), so every fragment read from shared
// memory feeds several products; the reduction over (kernel offset, 32-channel slices) staged in
// shared memory; A and B fragments through ldmatrix; mma.sync m16n8k16 (sm_80+). Requires
// cin % 8 == 0, cout % 8 == 0 (16-byte rows) and a kernel volume of at most 27, checked by the
// caller.
#define CN 64
#define CK 32
#define CLD 40  // shared row stride in halves: 80 bytes, conflict-free ldmatrix rows

#define CONV_MAX_VOLUME 27

// The kernel offsets for which some row of a BM-row tile has a neighbour (`rowsrc[k * ld + m]
// >= 0` for some m), listed in `active` with their count in `*n_active`: one warp per offset,
// then one thread writes the list. Called by every thread of the block; ends with a barrier.
template <int BM>
__device__ __forceinline__ void list_active_offsets(const int* rowsrc, int ld, int volume,
                                                    int warps, int* any_row, int* active,
                                                    int* n_active) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    for (int k = warp; k < volume; k += warps) {
        bool mine = false;
        for (int m = lane; m < BM; m += 32) mine |= rowsrc[k * ld + m] >= 0;
        const int any = __any_sync(0xffffffffu, mine);
        if (lane == 0) any_row[k] = any;
    }
    __syncthreads();
    if (tid == 0) {
        int n = 0;
        for (int k = 0; k < volume; ++k)
            if (any_row[k]) active[n++] = k;
        *n_active = n;
    }
    __syncthreads();
}

__device__ __forceinline__ void conv_ldmatrix_x4(u32* r, const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// ASYNC: two stages filled through cp.async while the other is multiplied; otherwise one stage
// filled through registers between two barriers (`TRELLIS_CONV_ASYNC` picks at run time).
template <bool BF16, bool ASYNC, int BM>
__device__ void conv_mma(const u16* __restrict__ feats, int cin, const int* __restrict__ nbr,
                         int rows, int volume, int src_shift, const u16* __restrict__ weight,
                         const float* __restrict__ bias, int cout, u16* __restrict__ out) {
    constexpr int WARPS_M = BM / 32;         // warps along the rows (2 or 4)
    constexpr int WN = CN * WARPS_M / 4;     // columns per warp (32 or 64)
    constexpr int NP = WN / 16;              // 16-column B loads per k-step (2 or 4)
    // Stages of A (gathered feats) and B (weights) tiles. A step is one (kernel offset with at
    // least one neighbour in the tile, 32-channel slice) pair; the tile's source rows of every
    // offset are read once up front.
    __shared__ __align__(16) u16 As[ASYNC ? 2 : 1][BM][CLD];
    __shared__ __align__(16) u16 Bs[ASYNC ? 2 : 1][CN][CLD];
    __shared__ int rowsrc[CONV_MAX_VOLUME][BM];
    __shared__ int any_row[CONV_MAX_VOLUME];
    __shared__ int active[CONV_MAX_VOLUME];
    __shared__ int n_active;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp % WARPS_M, wn = warp / WARPS_M;   // this warp's 32 x WN part
    const int row0 = blockIdx.y * BM, col0 = blockIdx.x * CN;
    for (int e = tid; e < volume * BM; e += 128) {
        const int k = e / BM, m = e % BM, r = row0 + m;
        int s = r < rows ? nbr[(long long)r * volume + k] : -1;
        if (s >= 0) s >>= src_shift;
        rowsrc[k][m] = s;
    }
    __syncthreads();
    list_active_offsets<BM>(&rowsrc[0][0], BM, volume, 4, any_row, active, &n_active);
    const int slices = (cin + CK - 1) / CK;
    const int steps = n_active * slices;
    float acc[2][2 * NP][4];
#pragma unroll
    for (int f = 0; f < 2; ++f)
#pragma unroll
        for (int j = 0; j < 2 * NP; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[f][j][e] = 0.f;

    auto issue = [&](int step, int buf) {
        const int k = active[step / slices], c0 = (step % slices) * CK;
        for (int e = tid; e < BM * (CK / 8); e += 128) {
            const int m = e >> 2, q = e & 3, c = c0 + q * 8, s = rowsrc[k][m];
            const bool ok = s >= 0 && c < cin;
            const u16* src = feats + (ok ? (long long)s * cin + c : 0);
            if constexpr (ASYNC) cp_async16(&As[buf][m][q * 8], src, ok);
            else *(uint4*)&As[buf][m][q * 8] = ok ? *(const uint4*)src : make_uint4(0, 0, 0, 0);
        }
        for (int e = tid; e < CN * (CK / 8); e += 128) {
            const int n = e >> 2, q = e & 3, c = c0 + q * 8, o = col0 + n;
            const bool ok = o < cout && c < cin;
            const u16* src = weight + (ok ? ((long long)o * volume + k) * cin + c : 0);
            if constexpr (ASYNC) cp_async16(&Bs[buf][n][q * 8], src, ok);
            else *(uint4*)&Bs[buf][n][q * 8] = ok ? *(const uint4*)src : make_uint4(0, 0, 0, 0);
        }
    };

    if constexpr (ASYNC) {
        if (steps > 0) issue(0, 0);
        cp_async_commit();
    }
    // ldmatrix row addresses: lane L feeds row L % 8 of matrix L / 8.
    const int a_row = wm * 32 + (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;
    const int b_row = wn * WN + (lane & 7) + (lane >> 4) * 8, b_col = ((lane >> 3) & 1) * 8;
    for (int step = 0; step < steps; ++step) {
        const int buf = ASYNC ? (step & 1) : 0;
        __syncthreads();   // every warp is done with the stage the next copies go into
        if constexpr (ASYNC) {
            if (step + 1 < steps) issue(step + 1, buf ^ 1);
            cp_async_commit();
            cp_async_wait_one();   // this step's copies have landed
        } else {
            issue(step, 0);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < CK; kk += 16) {
            u32 a[2][4], b[NP][4];
#pragma unroll
            for (int f = 0; f < 2; ++f) conv_ldmatrix_x4(a[f], &As[buf][a_row + f * 16][kk + a_col]);
#pragma unroll
            for (int p = 0; p < NP; ++p) conv_ldmatrix_x4(b[p], &Bs[buf][b_row + p * 16][kk + b_col]);
#pragma unroll
            for (int f = 0; f < 2; ++f)
#pragma unroll
                for (int p = 0; p < NP; ++p) {
                    mma16816<BF16>(acc[f][2 * p], a[f], b[p][0], b[p][1]);
                    mma16816<BF16>(acc[f][2 * p + 1], a[f], b[p][2], b[p][3]);
                }
        }
    }
#pragma unroll
    for (int f = 0; f < 2; ++f) {
        const int r0 = row0 + wm * 32 + f * 16 + g, r1 = r0 + 8;
#pragma unroll
        for (int j = 0; j < 2 * NP; ++j) {
            const int col = col0 + wn * WN + j * 8 + 2 * t;
            if (col >= cout) continue;
            const float b0 = bias ? bias[col] : 0.f, b1 = bias ? bias[col + 1] : 0.f;
            if (r0 < rows)
                *(u32*)(out + (long long)r0 * cout + col) =
                    pack2<BF16>(acc[f][j][0] + b0, acc[f][j][1] + b1);
            if (r1 < rows)
                *(u32*)(out + (long long)r1 * cout + col) =
                    pack2<BF16>(acc[f][j][2] + b0, acc[f][j][3] + b1);
        }
    }
}

// Entries sparse_conv_mma_{async_}{f16,bf16}{,_m128}: async_ double-buffers through cp.async,
// _m128 takes 128-row tiles (64 without).
#define CONV_ENTRY(NAME, BF16, ASYNC, BM)                                                        \
    extern "C" __global__ void NAME(const u16* feats, int cin, const int* nbr, int rows,        \
                                    int volume, int src_shift, const u16* weight,               \
                                    const float* bias, int cout, u16* out) {                    \
        conv_mma<BF16, ASYNC, BM>(feats, cin, nbr, rows, volume, src_shift, weight, bias, cout, \
                                  out);                                                         \
    }

CONV_ENTRY(sparse_conv_mma_f16, false, false, 64)
CONV_ENTRY(sparse_conv_mma_bf16, true, false, 64)
CONV_ENTRY(sparse_conv_mma_async_f16, false, true, 64)
CONV_ENTRY(sparse_conv_mma_async_bf16, true, true, 64)
CONV_ENTRY(sparse_conv_mma_f16_m128, false, false, 128)
CONV_ENTRY(sparse_conv_mma_bf16_m128, true, false, 128)
CONV_ENTRY(sparse_conv_mma_async_f16_m128, false, true, 128)
CONV_ENTRY(sparse_conv_mma_async_bf16_m128, true, true, 128)

// ---------------------------------------------------------------------------------------------
// The same tensor-core conv with 64-channel reduction steps and a STAGES-deep cp.async pipeline
// in dynamic shared memory (`TRELLIS_CONV_TILE=k64...` picks these; the kernels above stay the
// default until timed). Tile: BM rows x BN output channels, warps of 32 rows x WN channels
// (BM / 32 x BN / WN of them), so with BN = 128 the gathered A rows of a step are loaded once
// for 128 outputs. One __syncthreads per 64-channel step: the wait for step s's copies, the
// barrier, then the copies of step s + STAGES - 1 into the stage step s - 1 used (every warp is
// past the barrier, so done with it), then 4 x 16-channel slices of mma.sync on stage s (64
// products per 32 x 64 warp between barriers against 32 before).
// `order` (nullable): tile row m computes row order[row0 + m] (its nbr row, its out row), so a
// caller can group rows whose neighbour masks agree and skip more empty (offset, tile) steps. It
// must be a permutation of the rows: a row it leaves out is not written (an entry out of range
// is skipped, never followed).
//
// Shared memory per block: STAGES * (BM + BN) * 128 bytes dynamic (rows of 64 halves, unpadded:
// the 16-byte chunk q of row r is stored at chunk q ^ (r & 7), so the 8 rows one ldmatrix matrix
// reads, and the 8 chunks of a row that 8 threads copy, fall in 8 different bank quads) plus
// 27 * (BM + 1) * 4 + BM * 4 + 220 bytes static (the tile's source rows per offset). On sm_90
// (228 KB and 64K registers per SM, 1 KB reserved per block; registers from NVRTC 12.9, no
// spills; __launch_bounds__ asks for the blocks per SM below, which caps 8-warp blocks at 128):
//   m128 n128 s3, 8 warps, 128 regs: 98,304 + 14,672 = 112,976 B -> 2 blocks (16 warps) per SM
//   m128 n128 s2, 8 warps, 128 regs: 65,536 + 14,672 =  80,208 B -> 2 blocks (registers)
//   m128 n64  s3, 4 warps, 158 regs: 73,728 + 14,672 =  88,400 B -> 2 blocks (8 warps)
//   m128 n64  s2, 4 warps, 157 regs: 49,152 + 14,672 =  63,824 B -> 3 blocks (12 warps)
//   m64  n128 s3, 4 warps, 156 regs: 73,728 +  7,504 =  81,232 B -> 2 blocks (8 warps)
//   m64  n64  s3, 4 warps of 32 x 32, 118 regs: 49,152 + 7,504 = 56,656 B -> 4 blocks (16 warps)
// (rows padded to 72 halves instead of swizzled would make m128 n128 s3 125 KB: 1 block per SM).
#define CK2 64

// Offset in halves of 16-byte chunk q of row r in a swizzled 64-half row table.
__device__ __forceinline__ int conv_swz(int r, int q) { return r * CK2 + ((q ^ (r & 7)) << 3); }

template <int N>
__device__ __forceinline__ void conv_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

template <bool BF16, int BM, int BN, int WN, int STAGES>
__device__ void conv_mma_k64(const u16* __restrict__ feats, int cin, const int* __restrict__ nbr,
                             const int* __restrict__ order, int rows, int volume, int src_shift,
                             const u16* __restrict__ weight, const float* __restrict__ bias,
                             int cout, u16* __restrict__ out) {
    constexpr int WARPS_M = BM / 32, WARPS_N = BN / WN, WARPS = WARPS_M * WARPS_N;
    constexpr int THREADS = 32 * WARPS;
    constexpr int NP = WN / 16;   // 16-column B loads per 16-channel slice
    static_assert(BM % 32 == 0 && BN % WN == 0 && WN % 16 == 0, "tile shape");
    static_assert((BM * 8) % THREADS == 0 && (BN * 8) % THREADS == 0, "copy split");
    static_assert(STAGES >= 2, "stages");
    extern __shared__ __align__(16) unsigned char conv_dyn[];
    u16* const As = reinterpret_cast<u16*>(conv_dyn);        // [STAGES][BM * 64], swizzled
    u16* const Bs = As + STAGES * BM * CK2;                   // [STAGES][BN * 64], swizzled
    __shared__ int rowsrc[CONV_MAX_VOLUME][BM + 1];   // +1: the fill below is conflict-light
    __shared__ int prow[BM];                          // physical row of tile row m, -1 past the end
    __shared__ int any_row[CONV_MAX_VOLUME];
    __shared__ int active[CONV_MAX_VOLUME];
    __shared__ int n_active;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int wm = warp % WARPS_M, wn = warp / WARPS_M;
    const int row0 = blockIdx.y * BM, col0 = blockIdx.x * BN;
    for (int m = tid; m < BM; m += THREADS) {
        const int r = row0 + m;
        const int p = r < rows ? (order ? order[r] : r) : -1;
        prow[m] = p >= 0 && p < rows ? p : -1;   // an order entry out of range: no row
    }
    __syncthreads();
    // Consecutive threads read consecutive entries of the tile's nbr rows.
    for (int e = tid; e < volume * BM; e += THREADS) {
        const int m = e / volume, k = e - m * volume, r = prow[m];
        int s = r >= 0 ? nbr[(long long)r * volume + k] : -1;
        if (s >= 0) s >>= src_shift;
        rowsrc[k][m] = s;
    }
    __syncthreads();
    list_active_offsets<BM>(&rowsrc[0][0], BM + 1, volume, WARPS, any_row, active, &n_active);
    const int slices = (cin + CK2 - 1) / CK2;
    const int steps = n_active * slices;
    // A warp whose columns all lie past cout only copies (cout is not a multiple of BN).
    const bool live = col0 + wn * WN < cout;
    float acc[2][2 * NP][4];
#pragma unroll
    for (int f = 0; f < 2; ++f)
#pragma unroll
        for (int j = 0; j < 2 * NP; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[f][j][e] = 0.f;

    // Step `step` (active offset step / slices, channels from (step % slices) * 64) into stage
    // `buf`: BM gathered rows and BN weight rows of 8 16-byte chunks each.
    auto issue = [&](int step, int buf) {
        const int a = step / slices;
        const int k = active[a], c0 = (step - a * slices) * CK2;
#pragma unroll
        for (int i = 0; i < BM * 8 / THREADS; ++i) {
            const int e = tid + i * THREADS, m = e >> 3, q = e & 7, c = c0 + q * 8;
            const int s = rowsrc[k][m];
            const bool ok = s >= 0 && c < cin;
            cp_async16(As + buf * BM * CK2 + conv_swz(m, q), feats + (ok ? (long long)s * cin + c : 0), ok);
        }
#pragma unroll
        for (int i = 0; i < BN * 8 / THREADS; ++i) {
            const int e = tid + i * THREADS, n = e >> 3, q = e & 7, c = c0 + q * 8, o = col0 + n;
            const bool ok = o < cout && c < cin;
            cp_async16(Bs + buf * BN * CK2 + conv_swz(n, q),
                       weight + (ok ? ((long long)o * volume + k) * cin + c : 0), ok);
        }
    };

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < steps) issue(s, s);
        cp_async_commit();
    }
    // ldmatrix row addresses: lane L feeds row L % 8 of matrix L / 8.
    const int a_row = wm * 32 + (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;
    const int b_row = wn * WN + (lane & 7) + (lane >> 4) * 8, b_col = ((lane >> 3) & 1) * 8;
    int buf = 0, fill = STAGES - 1;   // the stage this step reads, the one the next copies fill
    for (int step = 0; step < steps; ++step) {
        conv_cp_async_wait<STAGES - 2>();   // this thread's copies of `step` have landed
        __syncthreads();                    // everyone's have; everyone is done with `fill`
        if (step + STAGES - 1 < steps) issue(step + STAGES - 1, fill);
        cp_async_commit();
        if (live) {
            const u16* As_buf = As + buf * BM * CK2;
            const u16* Bs_buf = Bs + buf * BN * CK2;
#pragma unroll
            for (int kk = 0; kk < CK2; kk += 16) {
                u32 a[2][4], b[NP][4];
#pragma unroll
                for (int f = 0; f < 2; ++f)
                    conv_ldmatrix_x4(a[f], As_buf + conv_swz(a_row + f * 16, (kk + a_col) >> 3));
#pragma unroll
                for (int p = 0; p < NP; ++p)
                    conv_ldmatrix_x4(b[p], Bs_buf + conv_swz(b_row + p * 16, (kk + b_col) >> 3));
#pragma unroll
                for (int f = 0; f < 2; ++f)
#pragma unroll
                    for (int p = 0; p < NP; ++p) {
                        mma16816<BF16>(acc[f][2 * p], a[f], b[p][0], b[p][1]);
                        mma16816<BF16>(acc[f][2 * p + 1], a[f], b[p][2], b[p][3]);
                    }
            }
        }
        buf = buf + 1 == STAGES ? 0 : buf + 1;
        fill = fill + 1 == STAGES ? 0 : fill + 1;
    }
    conv_cp_async_wait<0>();   // no copy outlives the block (only empty groups can be left)
    if (!live) return;
#pragma unroll
    for (int f = 0; f < 2; ++f) {
        const int r0 = prow[wm * 32 + f * 16 + g], r1 = prow[wm * 32 + f * 16 + g + 8];
#pragma unroll
        for (int j = 0; j < 2 * NP; ++j) {
            const int col = col0 + wn * WN + j * 8 + 2 * t;
            if (col >= cout) continue;
            const float b0 = bias ? bias[col] : 0.f, b1 = bias ? bias[col + 1] : 0.f;
            if (r0 >= 0)
                *(u32*)(out + (long long)r0 * cout + col) =
                    pack2<BF16>(acc[f][j][0] + b0, acc[f][j][1] + b1);
            if (r1 >= 0)
                *(u32*)(out + (long long)r1 * cout + col) =
                    pack2<BF16>(acc[f][j][2] + b0, acc[f][j][3] + b1);
        }
    }
}

// Entries sparse_conv_k64_{f16,bf16}_m{BM}n{BN}s{STAGES}: blocks of BM / 32 * BN / WN warps,
// STAGES * (BM + BN) * 128 bytes of dynamic shared memory (`cuda.rs` lists the shapes).
// MINB: the blocks per SM the launch bounds ask for (2 x 256 threads caps registers at 128).
#define CONV_K64_ENTRY(NAME, BF16, BM, BN, WN, STAGES, MINB)                                    \
    extern "C" __global__ void __launch_bounds__(BM / 32 * (BN / WN) * 32, MINB)                \
        NAME(const u16* feats, int cin, const int* nbr, const int* order, int rows, int volume, \
             int src_shift, const u16* weight, const float* bias, int cout, u16* out) {         \
        conv_mma_k64<BF16, BM, BN, WN, STAGES>(feats, cin, nbr, order, rows, volume, src_shift, \
                                               weight, bias, cout, out);                        \
    }

CONV_K64_ENTRY(sparse_conv_k64_f16_m128n128s3, false, 128, 128, 64, 3, 2)
CONV_K64_ENTRY(sparse_conv_k64_bf16_m128n128s3, true, 128, 128, 64, 3, 2)
CONV_K64_ENTRY(sparse_conv_k64_f16_m128n64s3, false, 128, 64, 64, 3, 2)
CONV_K64_ENTRY(sparse_conv_k64_bf16_m128n64s3, true, 128, 64, 64, 3, 2)
CONV_K64_ENTRY(sparse_conv_k64_f16_m128n128s2, false, 128, 128, 64, 2, 2)
CONV_K64_ENTRY(sparse_conv_k64_bf16_m128n128s2, true, 128, 128, 64, 2, 2)
CONV_K64_ENTRY(sparse_conv_k64_f16_m128n64s2, false, 128, 64, 64, 2, 2)
CONV_K64_ENTRY(sparse_conv_k64_bf16_m128n64s2, true, 128, 64, 64, 2, 2)
CONV_K64_ENTRY(sparse_conv_k64_f16_m64n128s3, false, 64, 128, 64, 3, 2)
CONV_K64_ENTRY(sparse_conv_k64_bf16_m64n128s3, true, 64, 128, 64, 3, 2)
CONV_K64_ENTRY(sparse_conv_k64_f16_m64n64s3, false, 64, 64, 32, 3, 4)
CONV_K64_ENTRY(sparse_conv_k64_bf16_m64n64s3, true, 64, 64, 32, 3, 4)

// The second half of the GEMM-first sparse conv. The caller has made y = feats · W_k for every
// kernel offset k at once (one dense cuBLAS product, y `[sources, K, Cout]` in the feats' type);
// here out[i, o] = bias[o] + sum_k y[nbr[i * K + k] >> src_shift, k, o] over the offsets with a
// neighbour, accumulated in float32 and rounded once. One thread per (row, 8 output channels):
// 16-byte loads and stores (cout % 8 == 0, checked by the caller).
template <bool BF16>
__device__ __forceinline__ void conv_gather_sum(const u16* __restrict__ y,
                                                const int* __restrict__ nbr, int rows, int volume,
                                                int src_shift, const float* __restrict__ bias,
                                                int cout, u16* __restrict__ out) {
    const int groups = cout >> 3;
    const long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= (long long)rows * groups) return;
    const int i = (int)(e / groups), c = (int)(e % groups) * 8;
    float acc[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = bias ? bias[c + j] : 0.f;
    const int* nb = nbr + (long long)i * volume;
    for (int k = 0; k < volume; ++k) {
        int s = __ldg(nb + k);
        if (s < 0) continue;
        s >>= src_shift;
        const uint4 v = __ldg((const uint4*)(y + ((long long)s * volume + k) * cout + c));
        const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            float lo, hi;
            unpack2<BF16>(w[j], lo, hi);
            acc[2 * j] += lo;
            acc[2 * j + 1] += hi;
        }
    }
    uint4 r;
    r.x = pack2<BF16>(acc[0], acc[1]);
    r.y = pack2<BF16>(acc[2], acc[3]);
    r.z = pack2<BF16>(acc[4], acc[5]);
    r.w = pack2<BF16>(acc[6], acc[7]);
    *(uint4*)(out + (long long)i * cout + c) = r;
}

extern "C" __global__ void sparse_conv_gather_sum_f16(const u16* y, const int* nbr, int rows,
                                                      int volume, int src_shift,
                                                      const float* bias, int cout, u16* out) {
    conv_gather_sum<false>(y, nbr, rows, volume, src_shift, bias, cout, out);
}

extern "C" __global__ void sparse_conv_gather_sum_bf16(const u16* y, const int* nbr, int rows,
                                                       int volume, int src_shift,
                                                       const float* bias, int cout, u16* out) {
    conv_gather_sum<true>(y, nbr, rows, volume, src_shift, bias, cout, out);
}
