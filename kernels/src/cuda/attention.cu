// Variable-length attention, float32: for every query row q of group g and head h,
//   out[q, h, :] = softmax_j(scale * <Q[q, h, :], K[j, h, :]>) V[j, h, :]  over j in the group's
// key range, with an online (running max) softmax, so no N x N matrix exists anywhere.
// One warp per (query row, head); keys are processed in tiles of 32, one key per lane for the dot
// products, then the warp accumulates the tile's values (each lane owns dv / 32 output dims).
// Query rows outside every group are written as zeros. Twin of the CPU kernel
// trellis_kernels::attention::varlen_attention. Requires d <= 256 and dv <= 256.
#define MAXD 8   // per-lane slots: dims up to 256
#define NEG_INF __int_as_float(0xff800000)

extern "C" __global__ void varlen_attention(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const int* __restrict__ row_group,      // [nq]: group of each query row, -1 for none
    const int* __restrict__ kv_start, const int* __restrict__ kv_end,   // [groups]
    int nq, int heads, int d, int dv, float scale, float* __restrict__ out)
{
    const int lane = threadIdx.x & 31;
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= (long long)nq * heads) return;
    const int row = (int)(warp / heads), h = (int)(warp % heads);
    float* o = out + ((long long)row * heads + h) * dv;
    const int g = row_group[row];
    if (g < 0) {
        for (int e = lane; e < dv; e += 32) o[e] = 0.f;
        return;
    }
    const int j0 = kv_start[g], j1 = kv_end[g];
    const float* qr = q + ((long long)row * heads + h) * d;
    float acc[MAXD];
    for (int s = 0; s < MAXD; ++s) acc[s] = 0.f;
    float m = NEG_INF, l = 0.f;
    for (int t0 = j0; t0 < j1; t0 += 32) {
        const int j = t0 + lane;
        float s = NEG_INF;
        if (j < j1) {
            const float* kr = k + ((long long)j * heads + h) * d;
            float dot = 0.f;
            for (int e = 0; e < d; ++e) dot += qr[e] * kr[e];
            s = dot * scale;
        }
        float tmax = s;
        for (int off = 16; off > 0; off >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, off));
        const float mnew = fmaxf(m, tmax);
        const float corr = (m == NEG_INF) ? 0.f : expf(m - mnew);
        const float p = (j < j1) ? expf(s - mnew) : 0.f;
        float psum = p;
        for (int off = 16; off > 0; off >>= 1) psum += __shfl_xor_sync(0xffffffffu, psum, off);
        l = l * corr + psum;
        for (int sl = 0; sl < MAXD; ++sl) acc[sl] *= corr;
        const int n = min(32, j1 - t0);
        for (int u = 0; u < n; ++u) {
            const float pu = __shfl_sync(0xffffffffu, p, u);
            const float* vr = v + ((long long)(t0 + u) * heads + h) * dv;
            #pragma unroll
            for (int sl = 0; sl < MAXD; ++sl) {
                const int e = lane + 32 * sl;
                if (e < dv) acc[sl] += pu * vr[e];
            }
        }
        m = mnew;
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    #pragma unroll
    for (int sl = 0; sl < MAXD; ++sl) {
        const int e = lane + 32 * sl;
        if (e < dv) o[e] = acc[sl] * inv;
    }
}
