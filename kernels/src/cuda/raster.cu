// Triangle rasteriser and the bake's texel projection, the GPU twins of
// trellis_kernels::raster::triangles (rasterize / rasterize_screen) and
// trellis_kernels::raster::texels::accumulate_view. Compiled with --fmad=false, so every float
// and double expression below rounds like the CPU code it mirrors (same operations, same order):
// triangle ids, depths and barycentrics are bit-identical to the CPU's.
//
// Depth test: each covered pixel takes atomicMin of a 64-bit key (depth bits << 32 | triangle
// id); positive float depths order like their bit patterns, so the nearest triangle wins and a
// depth tie goes to the lower id, whatever order the threads run in (the CPU's rule).
//
// Camera parameters (CAM_FLOATS floats per camera, see trellis_kernels::cuda::CAM_FLOATS):
// rot[9] (rows), trans[3], fx, fy, cx, cy, width, height, near, far, eye[3], pad.
#define CAM_FLOATS 24
#define NO_FACE 0xffffffffu
#define EMPTY_KEY 0xffffffffffffffffull
// Triangles whose pixel box holds more pixels than this go to the block-per-triangle kernel.
#define SMALL_TRI_PIXELS 64

__device__ __forceinline__ bool finite_f(float v) { return !isinf(v) && !isnan(v); }

// World-space vertices -> (pixel x, pixel y, depth); outside [near, far] or behind the camera:
// (NaN, NaN, -1), which the rasteriser skips (Camera::project + rasterize's filter).
extern "C" __global__ void project_vertices(const float* __restrict__ v, int nv,
                                            const float* __restrict__ cam,
                                            float* __restrict__ out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nv) return;
    const float* r = cam;
    const float* t = cam + 9;
    float x = v[3 * i], y = v[3 * i + 1], z = v[3 * i + 2];
    float c0 = r[0] * x + r[1] * y + r[2] * z + t[0];
    float c1 = r[3] * x + r[4] * y + r[5] * z + t[1];
    float c2 = r[6] * x + r[7] * y + r[8] * z + t[2];
    float fx = cam[12], fy = cam[13], cx = cam[14], cy = cam[15];
    float w = cam[16], h = cam[17], near_ = cam[18], far_ = cam[19];
    float px = __int_as_float(0x7fc00000), py = px, pz = -1.f;
    if (!(c2 <= 1e-8f)) {
        float qx = (fx * c0 / c2 + cx) * w;
        float qy = (fy * c1 / c2 + cy) * h;
        if (c2 >= near_ && c2 <= far_) { px = qx; py = qy; pz = c2; }
    }
    out[3 * i] = px;
    out[3 * i + 1] = py;
    out[3 * i + 2] = pz;
}

// A triangle set up for pixel tests (double precision, as the CPU's raster_one).
struct Tri {
    double p[3][3];
    double inv_area;
    double inv_z[3];
    int x0, x1, y0, y1;   // inclusive pixel box, clipped to the image
};

// false: the triangle draws nothing.
__device__ bool setup_tri(const float* __restrict__ pts, const unsigned* __restrict__ faces,
                          int f, int width, int height, Tri* t) {
    for (int k = 0; k < 3; ++k) {
        unsigned vi = faces[3 * f + k];
        float qx = pts[3 * vi], qy = pts[3 * vi + 1], qz = pts[3 * vi + 2];
        if (isnan(qz) || qz <= 0.f || !finite_f(qx) || !finite_f(qy)) return false;
        t->p[k][0] = (double)qx;
        t->p[k][1] = (double)qy;
        t->p[k][2] = (double)qz;
    }
    const double (*p)[3] = t->p;
    double area = (p[1][0] - p[0][0]) * (p[2][1] - p[0][1]) - (p[2][0] - p[0][0]) * (p[1][1] - p[0][1]);
    if (area == 0.0 || isinf(area) || isnan(area)) return false;
    t->inv_area = 1.0 / area;
    double xlo = fmin(fmin(p[0][0], p[1][0]), p[2][0]);
    double xhi = fmax(fmax(p[0][0], p[1][0]), p[2][0]);
    double ylo = fmin(fmin(p[0][1], p[1][1]), p[2][1]);
    double yhi = fmax(fmax(p[0][1], p[1][1]), p[2][1]);
    double x0 = fmax(ceil(xlo - 0.5), 0.0);
    double x1 = fmin(floor(xhi - 0.5), (double)width - 1.0);
    double y0 = fmax(ceil(ylo - 0.5), 0.0);
    double y1 = fmin(floor(yhi - 0.5), (double)height - 1.0);
    if (x1 < 0.0 || y1 < 0.0 || x0 > x1 || y0 > y1) return false;
    t->x0 = (int)x0; t->x1 = (int)x1; t->y0 = (int)y0; t->y1 = (int)y1;
    for (int k = 0; k < 3; ++k) t->inv_z[k] = 1.0 / p[k][2];
    return true;
}

__device__ __forceinline__ double edge_fn(const double* a, const double* b, double x, double y,
                                          double inv_area) {
    return ((b[0] - a[0]) * (y - a[1]) - (b[1] - a[1]) * (x - a[0])) * inv_area;
}

// The fragment of `t` at pixel (x, y): false when the pixel centre is outside.
__device__ bool frag_at(const Tri* t, int x, int y, float* depth, float* b1, float* b2) {
    double px = (double)x + 0.5, py = (double)y + 0.5;
    double l0 = edge_fn(t->p[1], t->p[2], px, py, t->inv_area);
    double l1 = edge_fn(t->p[2], t->p[0], px, py, t->inv_area);
    double l2 = edge_fn(t->p[0], t->p[1], px, py, t->inv_area);
    if (l0 < 0.0 || l1 < 0.0 || l2 < 0.0) return false;
    double w0 = l0 * t->inv_z[0], w1 = l1 * t->inv_z[1], w2 = l2 * t->inv_z[2];
    double s = w0 + w1 + w2;
    if (isnan(s) || s <= 0.0) return false;
    *depth = (float)(1.0 / s);
    *b1 = (float)(w1 / s);
    *b2 = (float)(w2 / s);
    return true;
}

__device__ __forceinline__ void depth_test(unsigned long long* keys, int width, int x, int y,
                                           float depth, unsigned f) {
    unsigned long long key = ((unsigned long long)__float_as_uint(depth) << 32) | f;
    atomicMin(&keys[(long long)y * width + x], key);
}

extern "C" __global__ void clear_keys(unsigned long long* keys, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) keys[i] = EMPTY_KEY;
}

// One thread per triangle: small triangles are drawn here, larger ones are appended to `large`
// (order irrelevant: the depth test commutes).
extern "C" __global__ void raster_small(const float* __restrict__ pts,
                                        const unsigned* __restrict__ faces, int nf, int width,
                                        int height, unsigned long long* keys,
                                        unsigned* large, unsigned* nlarge) {
    int f = blockIdx.x * blockDim.x + threadIdx.x;
    if (f >= nf) return;
    Tri t;
    if (!setup_tri(pts, faces, f, width, height, &t)) return;
    long long count = (long long)(t.x1 - t.x0 + 1) * (long long)(t.y1 - t.y0 + 1);
    if (count > SMALL_TRI_PIXELS) {
        unsigned slot = atomicAdd(nlarge, 1u);
        large[slot] = (unsigned)f;
        return;
    }
    for (int y = t.y0; y <= t.y1; ++y)
        for (int x = t.x0; x <= t.x1; ++x) {
            float d, b1, b2;
            if (frag_at(&t, x, y, &d, &b1, &b2)) depth_test(keys, width, x, y, d, (unsigned)f);
        }
}

// Blocks stride over the large triangles; a block's threads stride over one triangle's pixels.
extern "C" __global__ void raster_large(const float* __restrict__ pts,
                                        const unsigned* __restrict__ faces, int width,
                                        int height, unsigned long long* keys,
                                        const unsigned* __restrict__ large,
                                        const unsigned* __restrict__ nlarge) {
    const unsigned n = *nlarge;
    for (unsigned li = blockIdx.x; li < n; li += gridDim.x) {
        int f = (int)large[li];
        Tri t;
        if (!setup_tri(pts, faces, f, width, height, &t)) continue;
        int bw = t.x1 - t.x0 + 1;
        long long count = (long long)bw * (long long)(t.y1 - t.y0 + 1);
        for (long long k = threadIdx.x; k < count; k += blockDim.x) {
            int x = t.x0 + (int)(k % bw), y = t.y0 + (int)(k / bw);
            float d, b1, b2;
            if (frag_at(&t, x, y, &d, &b1, &b2)) depth_test(keys, width, x, y, d, (unsigned)f);
        }
    }
}

// Per pixel: depth bits, triangle id, barycentric bits (b1, b2) of the winning triangle, as the
// CPU's Fragment (empty: +inf, NO_FACE, 0, 0).
extern "C" __global__ void resolve_frags(const float* __restrict__ pts,
                                         const unsigned* __restrict__ faces, int width, int height,
                                         const unsigned long long* __restrict__ keys,
                                         unsigned* __restrict__ out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= width * height) return;
    unsigned long long key = keys[i];
    unsigned depth = 0x7f800000u, face = NO_FACE, b1 = 0, b2 = 0;
    if (key != EMPTY_KEY) {
        face = (unsigned)(key & 0xffffffffull);
        depth = (unsigned)(key >> 32);
        Tri t;
        float d, fb1, fb2;
        if (setup_tri(pts, faces, (int)face, width, height, &t) &&
            frag_at(&t, i % width, i / width, &d, &fb1, &fb2)) {
            b1 = __float_as_uint(fb1);
            b2 = __float_as_uint(fb2);
        }
    }
    out[4 * i] = depth;
    out[4 * i + 1] = face;
    out[4 * i + 2] = b1;
    out[4 * i + 3] = b2;
}

// The depth a key holds (+inf where empty).
__device__ __forceinline__ float key_depth(unsigned long long k) {
    return k == EMPTY_KEY ? __int_as_float(0x7f800000) : __uint_as_float((unsigned)(k >> 32));
}

// One view of the bake: each texel's surface point is projected into the view; when the mesh's
// depth buffer (keys, 3x3 neighbourhood) does not hide it and the Gaussians cover it, it adds
// the view's colour weighted by cos^4 * alpha (acc: r, g, b, weight per texel).
extern "C" __global__ void bake_accumulate(const float* __restrict__ pos,
                                           const float* __restrict__ normal, int n,
                                           const float* __restrict__ cam,
                                           const unsigned long long* __restrict__ keys,
                                           const float* __restrict__ color,
                                           const float* __restrict__ alpha,
                                           float* __restrict__ acc) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float* r = cam;
    const float* tr = cam + 9;
    float fx = cam[12], fy = cam[13], cx = cam[14], cy = cam[15];
    int w = (int)cam[16], h = (int)cam[17];
    float wf = cam[16], hf = cam[17];
    float ex = cam[20], ey = cam[21], ez = cam[22];
    float x = pos[3 * i], y = pos[3 * i + 1], z = pos[3 * i + 2];
    float c0 = r[0] * x + r[1] * y + r[2] * z + tr[0];
    float c1 = r[3] * x + r[4] * y + r[5] * z + tr[1];
    float c2 = r[6] * x + r[7] * y + r[8] * z + tr[2];
    if (c2 <= 1e-8f) return;
    float p0 = (fx * c0 / c2 + cx) * wf;
    float p1 = (fy * c1 / c2 + cy) * hf;
    float p2 = c2;
    if (p0 < 0.f || p1 < 0.f || p0 >= wf || p1 >= hf) return;
    float vx = ex - x, vy = ey - y, vz = ez - z;
    float nx = normal[3 * i], ny = normal[3 * i + 1], nz = normal[3 * i + 2];
    float cosv = (vx * nx + vy * ny + vz * nz) / fmaxf(sqrtf(vx * vx + vy * vy + vz * vz), 1e-12f);
    if (cosv <= 0.05f) return;
    int ix = (int)p0, iy = (int)p1;
    float front = __int_as_float(0x7f800000);
    for (int yy = max(iy - 1, 0); yy < min(iy + 2, h); ++yy)
        for (int xx = max(ix - 1, 0); xx < min(ix + 2, w); ++xx)
            front = fminf(front, key_depth(keys[(long long)yy * w + xx]));
    float pix = 1.f / (fx * wf);
    float tol = 4.f * pix * p2 / fmaxf(cosv, 0.2f) + 2e-3f;
    if (p2 > front + tol) return;
    // Bilinear colour and alpha (texels::sample_view).
    float sx = fminf(fmaxf(p0 - 0.5f, 0.f), wf - 1.f);
    float sy = fminf(fmaxf(p1 - 0.5f, 0.f), hf - 1.f);
    int x0 = (int)floorf(sx), y0 = (int)floorf(sy);
    int x1 = min(x0 + 1, w - 1), y1 = min(y0 + 1, h - 1);
    float ffx = sx - (float)x0, ffy = sy - (float)y0;
    int idx[4] = {y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1};
    float wts[4] = {(1.f - ffx) * (1.f - ffy), ffx * (1.f - ffy), (1.f - ffx) * ffy, ffx * ffy};
    float c[3] = {0.f, 0.f, 0.f};
    float a = 0.f;
    for (int k = 0; k < 4; ++k) {
        for (int ch = 0; ch < 3; ++ch) c[ch] += color[3 * idx[k] + ch] * wts[k];
        a += alpha[idx[k]] * wts[k];
    }
    if (a < 0.05f) return;
    float c2w = cosv * cosv;
    float wt = c2w * c2w * a;
    for (int ch = 0; ch < 3; ++ch) acc[4 * i + ch] += wt * c[ch] / a;
    acc[4 * i + 3] += wt;
}
