// Forward 3-D Gaussian splatting, the GPU twin of trellis_kernels::raster::splat::render:
// projection (EWA, Mip-Splatting's 2-D filter), one (tile, depth) key per tile a Gaussian's 3-sigma
// box meets, a stable radix sort of the keys (sort.cu), per-tile ranges, and front-to-back
// alpha blending per 8x8 tile with the CPU's cut-offs (alpha < 1/255 skipped, alpha capped at
// 0.99, stop before the transmittance drops below 1e-4). Compiled with --fmad=false and written
// in the CPU's operation order, so projections match it bit for bit; expf may differ from the
// CPU's exp by an ulp or two, hence the blended images agree to rounding, not bits.
//
// Camera layout: as raster.cu (CAM_FLOATS floats).
#define TILE 8
#define TILE_PIXELS (TILE * TILE)

__device__ __forceinline__ bool finite_f(float v) { return !isinf(v) && !isnan(v); }

// Per Gaussian: xy[2], conic[3], opacity, depth, tile box rect[4] (t0x, t1x, t0y, t1y) and the
// number of tiles it meets (0: culled).
extern "C" __global__ void splat_preprocess(
    const float* __restrict__ means, const float* __restrict__ covs,
    const float* __restrict__ opac, int n, const float* __restrict__ cam,
    float kernel_size, float near_, int tiles_x, int tiles_y,
    float* __restrict__ xy, float* __restrict__ conic, float* __restrict__ op_out,
    float* __restrict__ depth, int* __restrict__ rect, unsigned* __restrict__ count) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    count[i] = 0u;
    const float* r = cam;
    const float* tr = cam + 9;
    float mx = means[3 * i], my = means[3 * i + 1], mz = means[3 * i + 2];
    float t0 = r[0] * mx + r[1] * my + r[2] * mz + tr[0];
    float t1 = r[3] * mx + r[4] * my + r[5] * mz + tr[1];
    float t2 = r[6] * mx + r[7] * my + r[8] * mz + tr[2];
    if (!finite_f(t0) || !finite_f(t1) || !finite_f(t2) || t2 <= near_) return;
    float w = cam[16], h = cam[17];
    float fxp = cam[12] * w, fyp = cam[13] * h;
    float x = fxp * t0 / t2 + cam[14] * w;
    float y = fyp * t1 / t2 + cam[15] * h;
    float limx = 1.3f * 0.5f / cam[12];
    float limy = 1.3f * 0.5f / cam[13];
    float tx = fminf(fmaxf(t0 / t2, -limx), limx) * t2;
    float ty = fminf(fmaxf(t1 / t2, -limy), limy) * t2;
    float j[2][3] = {{fxp / t2, 0.f, -fxp * tx / (t2 * t2)},
                     {0.f, fyp / t2, -fyp * ty / (t2 * t2)}};
    float tm[2][3];
    for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 3; ++b) {
            float s = 0.f;
            for (int k = 0; k < 3; ++k) s += j[a][k] * r[3 * k + b];
            tm[a][b] = s;
        }
    const float* c = covs + 6 * (long long)i;
    float sig[3][3] = {{c[0], c[1], c[2]}, {c[1], c[3], c[4]}, {c[2], c[4], c[5]}};
    float c2[2][2];
    for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 2; ++b) {
            float acc = 0.f;
            for (int k = 0; k < 3; ++k)
                for (int l = 0; l < 3; ++l) acc += tm[a][k] * sig[k][l] * tm[b][l];
            c2[a][b] = acc;
        }
    float det0 = c2[0][0] * c2[1][1] - c2[0][1] * c2[0][1];
    float ca = c2[0][0] + kernel_size, cb = c2[0][1], cc = c2[1][1] + kernel_size;
    float det = ca * cc - cb * cb;
    if (isnan(det) || det <= 0.f) return;
    float o = opac[i] * sqrtf(fmaxf(fmaxf(det0, 0.f) / det, 2.5e-5f));
    float mid = 0.5f * (ca + cc);
    float lambda = mid + sqrtf(fmaxf(mid * mid - det, 0.1f));
    float radius = ceilf(3.f * sqrtf(lambda));
    if (!finite_f(radius) || !finite_f(x) || !finite_f(y)) return;
    float ft = (float)TILE;
    float a0 = fmaxf(floorf((x - radius) / ft), 0.f);
    float a1 = fminf(ceilf((x + radius) / ft), (float)tiles_x);
    float b0 = fmaxf(floorf((y - radius) / ft), 0.f);
    float b1 = fminf(ceilf((y + radius) / ft), (float)tiles_y);
    if (a1 <= a0 || b1 <= b0) return;
    xy[2 * i] = x;
    xy[2 * i + 1] = y;
    conic[3 * i] = cc / det;
    conic[3 * i + 1] = -cb / det;
    conic[3 * i + 2] = ca / det;
    op_out[i] = o;
    depth[i] = t2;
    int ix0 = (int)a0, ix1 = (int)a1, iy0 = (int)b0, iy1 = (int)b1;
    rect[4 * i] = ix0;
    rect[4 * i + 1] = ix1;
    rect[4 * i + 2] = iy0;
    rect[4 * i + 3] = iy1;
    count[i] = (unsigned)((ix1 - ix0) * (iy1 - iy0));
}

// Keys (tile << 32 | depth bits) and Gaussian ids, Gaussian by Gaussian from `offsets` (the
// exclusive scan of the counts), tiles row by row: the order the CPU pushes them in.
extern "C" __global__ void splat_keys(const int* __restrict__ rect,
                                      const float* __restrict__ depth,
                                      const unsigned* __restrict__ count,
                                      const unsigned* __restrict__ offsets, int n, int tiles_x,
                                      unsigned long long* __restrict__ keys,
                                      unsigned* __restrict__ vals) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n || count[i] == 0u) return;
    unsigned o = offsets[i];
    unsigned long long d = (unsigned long long)__float_as_uint(depth[i]);
    for (int ty = rect[4 * i + 2]; ty < rect[4 * i + 3]; ++ty)
        for (int tx = rect[4 * i]; tx < rect[4 * i + 1]; ++tx) {
            unsigned long long tile = (unsigned long long)(ty * tiles_x + tx);
            keys[o] = (tile << 32) | d;
            vals[o] = (unsigned)i;
            ++o;
        }
}

// ranges[2 t], ranges[2 t + 1]: the sorted entries of tile t (zeroed beforehand).
extern "C" __global__ void tile_ranges(const unsigned long long* __restrict__ keys, int m,
                                       unsigned* __restrict__ ranges) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= m) return;
    unsigned t = (unsigned)(keys[i] >> 32);
    if (i == 0 || (unsigned)(keys[i - 1] >> 32) != t) ranges[2 * t] = (unsigned)i;
    if (i == m - 1 || (unsigned)(keys[i + 1] >> 32) != t) ranges[2 * t + 1] = (unsigned)(i + 1);
}

// One block of TILE_PIXELS threads per tile, one thread per pixel; the tile's list is read in
// batches of TILE_PIXELS Gaussians through shared memory. Output: colour over the background
// (3 floats), alpha = 1 - T, depth = opacity-weighted depth / alpha (0 where alpha is 0).
extern "C" __global__ void splat_render(
    const unsigned* __restrict__ ranges, const unsigned* __restrict__ vals,
    const float* __restrict__ xy, const float* __restrict__ conic,
    const float* __restrict__ opac, const float* __restrict__ depth,
    const float* __restrict__ colors, int width, int height, int tiles_x,
    float bg0, float bg1, float bg2,
    float* __restrict__ out_color, float* __restrict__ out_alpha,
    float* __restrict__ out_depth) {
    __shared__ float s_xy[TILE_PIXELS][2];
    __shared__ float s_con[TILE_PIXELS][3];
    __shared__ float s_op[TILE_PIXELS];
    __shared__ float s_d[TILE_PIXELS];
    __shared__ float s_col[TILE_PIXELS][3];
    const int t = blockIdx.x;
    const int tid = threadIdx.x;
    const int px = (t % tiles_x) * TILE + tid % TILE;
    const int py = (t / tiles_x) * TILE + tid / TILE;
    const bool inside = px < width && py < height;
    const float x = (float)px + 0.5f, y = (float)py + 0.5f;
    const unsigned start = ranges[2 * t], end = ranges[2 * t + 1];
    float tr = 1.f, c0 = 0.f, c1 = 0.f, c2 = 0.f, d = 0.f;
    bool done = !inside;
    for (unsigned b = start; b < end; b += TILE_PIXELS) {
        if (__syncthreads_count(!done) == 0) break;
        unsigned e = b + tid;
        if (e < end) {
            unsigned g = vals[e];
            s_xy[tid][0] = xy[2 * g];
            s_xy[tid][1] = xy[2 * g + 1];
            s_con[tid][0] = conic[3 * g];
            s_con[tid][1] = conic[3 * g + 1];
            s_con[tid][2] = conic[3 * g + 2];
            s_op[tid] = opac[g];
            s_d[tid] = depth[g];
            s_col[tid][0] = colors[3 * g];
            s_col[tid][1] = colors[3 * g + 1];
            s_col[tid][2] = colors[3 * g + 2];
        }
        __syncthreads();
        const int nb = (int)min((unsigned)TILE_PIXELS, end - b);
        for (int k = 0; k < nb && !done; ++k) {
            float dx = s_xy[k][0] - x;
            float dy = s_xy[k][1] - y;
            float power = -0.5f * (s_con[k][0] * dx * dx + s_con[k][2] * dy * dy) -
                          s_con[k][1] * dx * dy;
            if (power > 0.f) continue;
            float alpha = fminf(s_op[k] * expf(power), 0.99f);
            if (alpha < 1.f / 255.f) continue;
            float next = tr * (1.f - alpha);
            if (next < 1e-4f) { done = true; break; }
            float wgt = alpha * tr;
            c0 += s_col[k][0] * wgt;
            c1 += s_col[k][1] * wgt;
            c2 += s_col[k][2] * wgt;
            d += s_d[k] * wgt;
            tr = next;
        }
    }
    if (!inside) return;
    const int i = py * width + px;
    const float a = 1.f - tr;
    out_color[3 * i] = c0 + tr * bg0;
    out_color[3 * i + 1] = c1 + tr * bg1;
    out_color[3 * i + 2] = c2 + tr * bg2;
    out_alpha[i] = a;
    out_depth[i] = a > 0.f ? d / a : 0.f;
}
