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
