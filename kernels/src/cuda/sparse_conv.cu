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
// Tile: 64 rows x 64 output channels per block of 4 warps (16 rows each), the reduction over
// (kernel offset, 32-channel slices) staged in shared memory; mma.sync m16n8k16 (sm_80+).
// Requires cin % 8 == 0 and cout % 8 == 0 (16-byte rows), checked by the caller.
typedef unsigned short u16;
typedef unsigned int u32;
#define CM 64
#define CN 64
#define CK 32
#define CLD 40  // shared row stride in halves: 80 bytes, conflict-free fragment loads

template <bool BF16>
__device__ __forceinline__ void conv_mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    if (BF16)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <bool BF16>
__device__ __forceinline__ u32 conv_pack2(float lo, float hi) {
    u32 r;
    if (BF16) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

template <bool BF16>
__device__ void conv_mma(const u16* __restrict__ feats, int cin, const int* __restrict__ nbr,
                         int rows, int volume, int src_shift, const u16* __restrict__ weight,
                         const float* __restrict__ bias, int cout, u16* __restrict__ out) {
    __shared__ __align__(16) u16 As[CM][CLD];
    __shared__ __align__(16) u16 Bs[CN][CLD];
    __shared__ int rowsrc[CM];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.y * CM, col0 = blockIdx.x * CN;
    float acc[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    for (int k = 0; k < volume; ++k) {
        int src = -1;
        if (tid < CM) {
            const int r = row0 + tid;
            src = r < rows ? nbr[(long long)r * volume + k] : -1;
            if (src >= 0) src >>= src_shift;
            rowsrc[tid] = src;
        }
        // Every thread passes this barrier; it also publishes rowsrc.
        if (!__syncthreads_or(src >= 0)) continue;
        for (int c0 = 0; c0 < cin; c0 += CK) {
            for (int e = tid; e < CM * (CK / 8); e += 128) {
                const int m = e >> 2, q = e & 3, c = c0 + q * 8, s = rowsrc[m];
                *(uint4*)&As[m][q * 8] =
                    (s >= 0 && c < cin) ? *(const uint4*)(feats + (long long)s * cin + c) : zero;
            }
            for (int e = tid; e < CN * (CK / 8); e += 128) {
                const int n = e >> 2, q = e & 3, c = c0 + q * 8, o = col0 + n;
                *(uint4*)&Bs[n][q * 8] =
                    (o < cout && c < cin)
                        ? *(const uint4*)(weight + ((long long)o * volume + k) * cin + c)
                        : zero;
            }
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < CK; kk += 16) {
                u32 a[4];
                const int ar = warp * 16 + g;
                a[0] = *(const u32*)&As[ar][kk + 2 * t];
                a[1] = *(const u32*)&As[ar + 8][kk + 2 * t];
                a[2] = *(const u32*)&As[ar][kk + 2 * t + 8];
                a[3] = *(const u32*)&As[ar + 8][kk + 2 * t + 8];
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const u32 b0 = *(const u32*)&Bs[j * 8 + g][kk + 2 * t];
                    const u32 b1 = *(const u32*)&Bs[j * 8 + g][kk + 2 * t + 8];
                    conv_mma16816<BF16>(acc[j], a, b0, b1);
                }
            }
            __syncthreads();
        }
    }
    const int r0 = row0 + warp * 16 + g, r1 = r0 + 8;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int col = col0 + j * 8 + 2 * t;
        if (col >= cout) continue;
        const float b0 = bias ? bias[col] : 0.f, b1 = bias ? bias[col + 1] : 0.f;
        if (r0 < rows)
            *(u32*)(out + (long long)r0 * cout + col) =
                conv_pack2<BF16>(acc[j][0] + b0, acc[j][1] + b1);
        if (r1 < rows)
            *(u32*)(out + (long long)r1 * cout + col) =
                conv_pack2<BF16>(acc[j][2] + b0, acc[j][3] + b1);
    }
}

extern "C" __global__ void sparse_conv_mma_f16(const u16* feats, int cin, const int* nbr,
                                               int rows, int volume, int src_shift,
                                               const u16* weight, const float* bias, int cout,
                                               u16* out) {
    conv_mma<false>(feats, cin, nbr, rows, volume, src_shift, weight, bias, cout, out);
}

extern "C" __global__ void sparse_conv_mma_bf16(const u16* feats, int cin, const int* nbr,
                                                int rows, int volume, int src_shift,
                                                const u16* weight, const float* bias, int cout,
                                                u16* out) {
    conv_mma<true>(feats, cin, nbr, rows, volume, src_shift, weight, bias, cout, out);
}
