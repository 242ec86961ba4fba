// Fused elementwise and row-wise kernels of the transformer blocks, one launch where candle's
// generic kernels would make several full passes over the activations (the broadcast bias add, the
// float32 round trip of every norm, the adaLN modulation, the gated residual):
//   bias_act        out = act(y + bias[col])                       (Linear's bias, GELU of the MLP)
//   layer_norm      out = modulate(LN(x) * w + b)                  (LayerNorm32, adaLN modulation)
//   gated_add       out = x + h * gate[batch(row)]                 (the blocks' gated residuals)
//   add_layer_norm  xout = x + h [* gate]; out = layer_norm(xout)   (a residual, then the next norm)
//   rms_norm_heads  out = normalize(x[row, head, :]) * gamma * scale (MultiHeadRMSNorm of q and k)
// Every kernel computes in float32 and rounds to the storage type exactly where the original
// (PyTorch, float16/bfloat16 torsos with float32 norms) rounds, so the half-precision results are
// the original's up to the order of float32 sums. Types: float32, float16, bfloat16, moved as raw
// 16-bit words and converted with cvt (no headers under NVRTC).
typedef unsigned short u16;
typedef unsigned long long u64;

// Batch element of each row: rows [ends[b-1], ends[b]) belong to batch element b.
#define MAX_SEGMENTS 8
struct Segments {
    int n;
    int ends[MAX_SEGMENTS];
};

__device__ __forceinline__ int segment_of(const Segments& s, int row) {
    int b = 0;
    while (b + 1 < s.n && row >= s.ends[b]) ++b;
    return b;
}

__device__ __forceinline__ float ld(const float* p, u64 i) { return p[i]; }
__device__ __forceinline__ void st(float* p, u64 i, float v) { p[i] = v; }

// float16 and bfloat16 are distinct storage types so that overloads pick the conversion.
struct f16 { u16 bits; };
struct bf16 { u16 bits; };

__device__ __forceinline__ float ld(const f16* p, u64 i) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p[i].bits));
    return f;
}
__device__ __forceinline__ float ld(const bf16* p, u64 i) {
    return __uint_as_float(((unsigned int)p[i].bits) << 16);
}
__device__ __forceinline__ void st(f16* p, u64 i, float v) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    p[i].bits = h;
}
__device__ __forceinline__ void st(bf16* p, u64 i, float v) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    p[i].bits = h;
}

// Rounds a float32 value to the storage type T and back (identity for float32).
template <typename T>
__device__ __forceinline__ float rnd(float v) {
    T t[1];
    st(t, 0, v);
    return ld(t, 0);
}
template <>
__device__ __forceinline__ float rnd<float>(float v) { return v; }

// 16-byte vectors of T: V elements moved with one load or store (the fast paths below take them
// when every pointer is 16-byte aligned and the row lengths are multiples of V).
template <typename T>
struct Vec16 {
    static constexpr int V = 16 / sizeof(T);
    union {
        uint4 u;
        T t[16 / sizeof(T)];
    };
    __device__ __forceinline__ float get(int i) const { return ld(t, i); }
    __device__ __forceinline__ void set(int i, float v) { st(t, i, v); }
};

__device__ __forceinline__ bool aligned16(const void* p) {
    return ((unsigned long long)p & 15ull) == 0;
}

__device__ __forceinline__ float gelu_tanh(float x) {
    const float k = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

// act: 0 none, 1 GELU (tanh approximation), 2 SiLU. The bias add rounds to T before the
// activation, as a separate Linear then activation would.
template <typename T>
__device__ void bias_act(const T* y, const T* bias, T* out, u64 n, int cols, int act) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        float v = ld(y, i);
        if (bias) v = rnd<T>(v + ld(bias, i % (u64)cols));
        if (act == 1) v = gelu_tanh(v);
        else if (act == 2) v = v / (1.0f + expf(-v));
        st(out, i, v);
    }
}

__device__ __forceinline__ float block_sum(float v, float* shared) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    float t = 0.0f;
    for (int w = 0; w < warps; ++w) t += shared[w];
    return t;
}

// LayerNorm32 per row, one warp per row: two-pass statistics in float32 (mean, then the biased
// variance of the deviations), y = (x - mean) * rstd [* w + b] rounded to T (LayerNorm32's cast
// back), then, when `shift` is given, the adaLN modulation in T's arithmetic:
// y * (1 + scale[b]) + shift[b], each product and sum rounded to T as the original's float16
// elementwise ops do. shift/scale rows of batch element b start at b * mod_stride.
// The row is held in registers (LN_MAXV 16-byte vectors per lane: one read of x, shuffles only)
// when cols is a multiple of the vector width, at most 32 * LN_MAXV vectors, and every pointer
// is 16-byte aligned (`layer_norm_fits`); otherwise the warp walks the row in global memory.
#define LN_MAXV 8

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

template <typename T>
__device__ void layer_norm_scalar(const T* x, T* out, int row, int cols, float eps,
                                  const float* w, const float* b, const T* shift, const T* scale,
                                  int mod_stride, Segments seg) {
    const int lane = threadIdx.x & 31;
    const T* xr = x + (u64)row * cols;
    T* outr = out + (u64)row * cols;
    float s = 0.0f;
    for (int c = lane; c < cols; c += 32) s += ld(xr, c);
    const float mean = warp_sum(s) / cols;
    float q = 0.0f;
    for (int c = lane; c < cols; c += 32) {
        const float d = ld(xr, c) - mean;
        q += d * d;
    }
    const float rstd = 1.0f / sqrtf(warp_sum(q) / cols + eps);
    const int bi = shift ? segment_of(seg, row) : 0;
    for (int c = lane; c < cols; c += 32) {
        float y = (ld(xr, c) - mean) * rstd;
        if (w) y = y * w[c];
        if (b) y = y + b[c];
        y = rnd<T>(y);
        if (shift) {
            const float one_plus = rnd<T>(1.0f + ld(scale, (u64)bi * mod_stride + c));
            y = rnd<T>(rnd<T>(y * one_plus) + ld(shift, (u64)bi * mod_stride + c));
        }
        st(outr, c, y);
    }
}
template <typename T>
__device__ __forceinline__ bool layer_norm_fits(const T* x, T* out, int cols, const float* w,
                                                const float* b, const T* shift, const T* scale,
                                                int mod_stride) {
    constexpr int V = Vec16<T>::V;
    return cols % V == 0 && cols / V <= 32 * LN_MAXV && mod_stride % V == 0 && aligned16(x) &&
           aligned16(out) && aligned16(w) && aligned16(b) && aligned16(shift) && aligned16(scale);
}

// The fast path's second half: statistics of the row held in `r` (this lane's vectors v = lane +
// 32 j of the row's nv), the normalised, affine and modulated row written to `outr`.
template <typename T>
__device__ __forceinline__ void layer_norm_regs(const Vec16<T> (&r)[LN_MAXV], int nv, int cols,
                                                float eps, const float* w, const float* b,
                                                const T* shift, const T* scale, int mod_stride,
                                                int bi, uint4* outr) {
    constexpr int V = Vec16<T>::V;
    const int lane = threadIdx.x & 31;
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < LN_MAXV; ++j) {
        if (lane + 32 * j < nv) {
#pragma unroll
            for (int i = 0; i < V; ++i) s += r[j].get(i);
        }
    }
    const float mean = warp_sum(s) / cols;
    float q = 0.0f;
#pragma unroll
    for (int j = 0; j < LN_MAXV; ++j) {
        if (lane + 32 * j < nv) {
#pragma unroll
            for (int i = 0; i < V; ++i) {
                const float d = r[j].get(i) - mean;
                q += d * d;
            }
        }
    }
    const float rstd = 1.0f / sqrtf(warp_sum(q) / cols + eps);
#pragma unroll
    for (int j = 0; j < LN_MAXV; ++j) {
        const int v = lane + 32 * j;
        if (v >= nv) continue;
        Vec16<T> sh, sc, o;
        if (shift) {
            sh.u = *reinterpret_cast<const uint4*>(shift + (u64)bi * mod_stride + v * V);
            sc.u = *reinterpret_cast<const uint4*>(scale + (u64)bi * mod_stride + v * V);
        }
#pragma unroll
        for (int i = 0; i < V; ++i) {
            const int c = v * V + i;
            float y = (r[j].get(i) - mean) * rstd;
            if (w) y = y * w[c];
            if (b) y = y + b[c];
            y = rnd<T>(y);
            if (shift) {
                const float one_plus = rnd<T>(1.0f + sc.get(i));
                y = rnd<T>(rnd<T>(y * one_plus) + sh.get(i));
            }
            o.set(i, y);
        }
        outr[v] = o.u;
    }
}

template <typename T>
__device__ void layer_norm(const T* x, T* out, int rows, int cols, float eps, const float* w,
                           const float* b, const T* shift, const T* scale, int mod_stride,
                           Segments seg) {
    constexpr int V = Vec16<T>::V;
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    if (!layer_norm_fits<T>(x, out, cols, w, b, shift, scale, mod_stride)) {
        layer_norm_scalar<T>(x, out, row, cols, eps, w, b, shift, scale, mod_stride, seg);
        return;
    }
    const int nv = cols / V;
    const uint4* xr = reinterpret_cast<const uint4*>(x + (u64)row * cols);
    Vec16<T> r[LN_MAXV];
#pragma unroll
    for (int j = 0; j < LN_MAXV; ++j) {
        const int v = lane + 32 * j;
        if (v < nv) r[j].u = xr[v];
    }
    layer_norm_regs<T>(r, nv, cols, eps, w, b, shift, scale, mod_stride,
                       shift ? segment_of(seg, row) : 0,
                       reinterpret_cast<uint4*>(out + (u64)row * cols));
}

// A residual and the norm after it in one pass, one warp per row: xout = x + h * gate[b] (the
// product rounded to T first, as gated_add) or x + h without a gate, rounded to T and written;
// then out = layer_norm(xout) as layer_norm computes it, from the rounded values still in
// registers (so both outputs equal gated_add then layer_norm bit for bit). gate rows of batch
// element b start at b * gate_stride; the modulation's at b * mod_stride. Rows the vectors do not
// fit go through global memory (the warp's own writes, then the scalar norm).
template <typename T>
__device__ void add_layer_norm(const T* x, const T* h, const T* gate, int gate_stride, T* xout,
                               T* out, int rows, int cols, float eps, const float* w,
                               const float* b, const T* shift, const T* scale, int mod_stride,
                               Segments seg) {
    constexpr int V = Vec16<T>::V;
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int bi = segment_of(seg, row);
    if (!layer_norm_fits<T>(x, out, cols, w, b, shift, scale, mod_stride) || !aligned16(h) ||
        !aligned16(gate) || !aligned16(xout) || gate_stride % V != 0) {
        for (int c = lane; c < cols; c += 32) {
            const u64 i = (u64)row * cols + c;
            const float hg =
                gate ? rnd<T>(ld(h, i) * ld(gate, (u64)bi * gate_stride + c)) : ld(h, i);
            st(xout, i, ld(x, i) + hg);
        }
        __syncwarp();
        layer_norm_scalar<T>(xout, out, row, cols, eps, w, b, shift, scale, mod_stride, seg);
        return;
    }
    const int nv = cols / V;
    const uint4* xr = reinterpret_cast<const uint4*>(x + (u64)row * cols);
    const uint4* hr = reinterpret_cast<const uint4*>(h + (u64)row * cols);
    uint4* xo = reinterpret_cast<uint4*>(xout + (u64)row * cols);
    Vec16<T> r[LN_MAXV];
#pragma unroll
    for (int j = 0; j < LN_MAXV; ++j) {
        const int v = lane + 32 * j;
        if (v >= nv) continue;
        Vec16<T> xv, hv, gv;
        xv.u = xr[v];
        hv.u = hr[v];
        if (gate) gv.u = *reinterpret_cast<const uint4*>(gate + (u64)bi * gate_stride + v * V);
#pragma unroll
        for (int i = 0; i < V; ++i) {
            const float hg = gate ? rnd<T>(hv.get(i) * gv.get(i)) : hv.get(i);
            r[j].set(i, xv.get(i) + hg);
        }
        xo[v] = r[j].u;
    }
    layer_norm_regs<T>(r, nv, cols, eps, w, b, shift, scale, mod_stride, bi,
                       reinterpret_cast<uint4*>(out + (u64)row * cols));
}

// out = x + h * gate[b] with the product rounded to T first (two float16 ops in the original);
// without a gate (nullptr) out = x + h. 16-byte vectors with 32-bit indexing when the pointers,
// cols and the gate stride allow it, else one element per step.
template <typename T>
__device__ void gated_add(const T* x, const T* h, const T* gate, int gate_stride, T* out,
                          u64 rows, int cols, Segments seg) {
    constexpr int V = Vec16<T>::V;
    const u64 n = rows * (u64)cols;
    if (cols % V == 0 && gate_stride % V == 0 && n / V < (1ull << 31) && aligned16(x) &&
        aligned16(h) && aligned16(gate) && aligned16(out)) {
        const unsigned nv = (unsigned)(n / V), cv = (unsigned)(cols / V);
        for (unsigned v = blockIdx.x * blockDim.x + threadIdx.x; v < nv;
             v += gridDim.x * blockDim.x) {
            Vec16<T> xv, hv, gv, o;
            xv.u = reinterpret_cast<const uint4*>(x)[v];
            hv.u = reinterpret_cast<const uint4*>(h)[v];
            if (gate) {
                const unsigned row = v / cv, c = (v - row * cv) * V;
                gv.u = *reinterpret_cast<const uint4*>(
                    gate + (u64)segment_of(seg, (int)row) * gate_stride + c);
            }
#pragma unroll
            for (int i = 0; i < V; ++i) {
                const float hg = gate ? rnd<T>(hv.get(i) * gv.get(i)) : hv.get(i);
                o.set(i, xv.get(i) + hg);
            }
            reinterpret_cast<uint4*>(out)[v] = o.u;
        }
        return;
    }
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        const int row = (int)(i / cols), c = (int)(i % cols);
        const float hg = gate ? rnd<T>(ld(h, i) * ld(gate, (u64)segment_of(seg, row) * gate_stride + c))
                              : ld(h, i);
        st(out, i, ld(x, i) + hg);
    }
}

// One warp per (row, head) of a [rows, heads, dim] view whose rows are `row_stride` elements
// apart (q and k straight out of the packed qkv projection): F.normalize over dim in float32
// (x / max(||x||, 1e-12)), times gamma[head, :] (float32), times `scale`, rounded to T into a
// contiguous [rows, heads, dim] output.
// Fast path: dim / V lanes per (row, head) (dim a multiple of V, dim / V a power of two up to
// 32), one 16-byte vector each, the sum of squares through shuffles within the lane group, a
// grid-stride loop over (row, head, lane) (the host sizes the grid for it).
template <typename T>
__device__ __forceinline__ bool rms_norm_heads_fits(const T* x, u64 row_stride, T* out, int dim) {
    constexpr int V = Vec16<T>::V;
    const int lanes = dim / V;
    return dim % V == 0 && lanes >= 1 && lanes <= 32 && (lanes & (lanes - 1)) == 0 &&
           row_stride % V == 0 && aligned16(x) && aligned16(out);
}

template <typename T>
__device__ void rms_norm_heads_vec(const T* x, u64 row_stride, const float* gamma, T* out,
                                   int rows, int heads, int dim, float scale) {
    constexpr int V = Vec16<T>::V;
    const int lanes = dim / V;
    const unsigned total = (unsigned)rows * heads * lanes;
    const unsigned stride = gridDim.x * blockDim.x;
    // Every lane of a warp runs the same number of iterations (the shuffles need them all).
    const unsigned start = blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned span = (total + stride - 1) / stride * stride;
    for (unsigned t = start; t < span; t += stride) {
        const bool live = t < total;
        const unsigned tt = live ? t : 0;
        const unsigned pair = tt / lanes, part = tt % lanes;
        const unsigned row = pair / heads, head = pair % heads;
        Vec16<T> v, o;
        v.u = *reinterpret_cast<const uint4*>(x + (u64)row * row_stride + (u64)head * dim +
                                              part * V);
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < V; ++i) s += v.get(i) * v.get(i);
        for (int w = lanes >> 1; w > 0; w >>= 1) s += __shfl_xor_sync(0xffffffff, s, w);
        const float norm = fmaxf(sqrtf(s), 1e-12f);
#pragma unroll
        for (int i = 0; i < V; ++i)
            o.set(i, v.get(i) / norm * gamma[head * dim + part * V + i] * scale);
        if (live)
            *reinterpret_cast<uint4*>(out + ((u64)row * heads + head) * dim + part * V) = o.u;
    }
}

template <typename T>
__device__ void rms_norm_head(const T* x, u64 row_stride, const float* gamma, T* out, int row,
                              int head, int heads, int dim, float scale, int lane) {
    const T* xr = x + (u64)row * row_stride + (u64)head * dim;
    T* outr = out + ((u64)row * heads + head) * dim;
    float s = 0.0f;
    for (int c = lane; c < dim; c += 32) {
        const float v = ld(xr, c);
        s += v * v;
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
    const float norm = fmaxf(sqrtf(s), 1e-12f);
    for (int c = lane; c < dim; c += 32)
        st(outr, c, ld(xr, c) / norm * gamma[head * dim + c] * scale);
}

template <typename T>
__device__ void rms_norm_heads(const T* x, u64 row_stride, const float* gamma, T* out, int rows,
                               int heads, int dim, float scale) {
    const int lane = threadIdx.x & 31, warps = (gridDim.x * blockDim.x) >> 5;
    for (int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5; warp < rows * heads;
         warp += warps)
        rms_norm_head<T>(x, row_stride, gamma, out, warp / heads, warp % heads, heads, dim, scale,
                         lane);
}

// SparseDownsample's scatter-mean with the zero it starts from counted (include_self):
// out[j, :] = sum of feats[members[p], :] over p in [starts[j], starts[j+1]) / (count + 1), summed
// in float32 in the members' (ascending) order, rounded once to T.
template <typename T>
__device__ void segment_mean(const T* feats, const int* starts, const int* members, T* out,
                             int segments, int cols) {
    const u64 n = (u64)segments * cols;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        const int j = (int)(i / cols), c = (int)(i % cols);
        const int a = starts[j], b = starts[j + 1];
        float s = 0.0f;
        for (int p = a; p < b; ++p) s += ld(feats, (u64)members[p] * cols + c);
        st(out, i, s / (float)(b - a + 1));
    }
}

#define INSTANTIATE(T, SUFFIX)                                                                   \
    extern "C" __global__ void bias_act_##SUFFIX(const T* y, const T* bias, T* out, u64 n,       \
                                                 int cols, int act) {                             \
        bias_act<T>(y, bias, out, n, cols, act);                                                  \
    }                                                                                             \
    extern "C" __global__ void layer_norm_##SUFFIX(const T* x, T* out, int rows, int cols,       \
                                                   float eps, const float* w, const float* b,     \
                                                   const T* shift, const T* scale,               \
                                                   int mod_stride, Segments seg) {                \
        layer_norm<T>(x, out, rows, cols, eps, w, b, shift, scale, mod_stride, seg);             \
    }                                                                                             \
    extern "C" __global__ void add_layer_norm_##SUFFIX(                                         \
        const T* x, const T* h, const T* gate, int gate_stride, T* xout, T* out, int rows,       \
        int cols, float eps, const float* w, const float* b, const T* shift, const T* scale,     \
        int mod_stride, Segments seg) {                                                          \
        add_layer_norm<T>(x, h, gate, gate_stride, xout, out, rows, cols, eps, w, b, shift,      \
                          scale, mod_stride, seg);                                                \
    }                                                                                             \
    extern "C" __global__ void gated_add_##SUFFIX(const T* x, const T* h, const T* gate,         \
                                                  int gate_stride, T* out, u64 rows, int cols,   \
                                                  Segments seg) {                                 \
        gated_add<T>(x, h, gate, gate_stride, out, rows, cols, seg);                              \
    }                                                                                             \
    extern "C" __global__ void rms_norm_heads_##SUFFIX(const T* x, u64 row_stride,               \
                                                       const float* gamma, T* out, int rows,     \
                                                       int heads, int dim, float scale) {         \
        if (rms_norm_heads_fits<T>(x, row_stride, out, dim))                                     \
            rms_norm_heads_vec<T>(x, row_stride, gamma, out, rows, heads, dim, scale);            \
        else                                                                                      \
            rms_norm_heads<T>(x, row_stride, gamma, out, rows, heads, dim, scale);                \
    }                                                                                             \
    extern "C" __global__ void segment_mean_##SUFFIX(const T* feats, const int* starts,          \
                                                     const int* members, T* out, int segments,    \
                                                     int cols) {                                  \
        segment_mean<T>(feats, starts, members, out, segments, cols);                             \
    }

INSTANTIATE(float, f32)
INSTANTIATE(f16, f16)
INSTANTIATE(bf16, bf16)
