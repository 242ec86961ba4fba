// Tensor-core helpers shared by the half-precision kernels (flash_attention.cu,
// flash_attention_sm90.cu, sparse_conv.cu).
// NVRTC compiles each source alone without include paths, so `cuda.rs` puts this text in front of
// each source that uses it. sm_80 and later.
typedef unsigned short u16;
typedef unsigned int u32;

// Two float32 values rounded into one packed float16x2 / bfloat16x2 register (lo in bits 0-15).
template <bool BF16>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    if (BF16) asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// The two halves of a packed float16x2 / bfloat16x2 register as float32 (lo: bits 0-15).
template <bool BF16>
__device__ __forceinline__ void unpack2(u32 v, float& lo, float& hi) {
    if (BF16) {
        lo = __uint_as_float(v << 16);
        hi = __uint_as_float(v & 0xffff0000u);
    } else {
        asm("{ .reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }"
            : "=f"(lo), "=f"(hi) : "r"(v));
    }
}

// c += a · b for one m16n8k16 tile: a row-major (4 registers), b column-major (2), c float32.
template <bool BF16>
__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
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

// The 32-bit shared-memory address of a generic pointer into shared memory.
__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16-byte global -> shared copy through cp.async; `ok` false zero-fills the destination (`src`
// must still be a valid address).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool ok) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(ok ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
// Waits until at most the newest group of copies is still in flight.
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;"); }
// Waits until every group of copies has landed.
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;"); }

#define NEG_INF __int_as_float(0xff800000)

// 2^x on the special-function unit, flushing denormal results to zero (exp2f without fast math
// adds a denormal fix-up around the same instruction).
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// x / n rounded to nearest, given r = rcp_refined(n): the instructions NVCC emits for `/` on its
// fast path, without the call to the slow path it takes for operands near the ends of the float32
// range (with that call ptxas spilled in the 64-row head-dim-80 builds). Here |x| <= n and
// n >= 1e-12: float16 rows (norms below 2^20, nonzero values above 2^-25) stay well inside the
// range where the fast path is the IEEE quotient, and so do bfloat16 rows of ordinary magnitudes;
// a bfloat16 row whose sum of squares overflows (values beyond ~1e19) turns NaN, not zero.
__device__ __forceinline__ float rcp_refined(float n) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(n));
    return fmaf(r, fmaf(r, -n, 1.f), r);
}

__device__ __forceinline__ float div_rn(float x, float n, float r) {
    const float q = x * r;
    return fmaf(r, fmaf(q, -n, x), q);
}

// MultiHeadRMSNorm of the Q fragments qa[f][s][0..3] of head h in place (flash_attention.cu's
// header says what it computes; the wgmma kernel's A fragments have the same layout). A row's
// HD values are spread over the four lanes of a quad (registers 0 and 2 row g, 1 and 3 row g + 8
// of each fragment), so the sums of squares are reduced over the quad; every lane takes part in
// the shuffles. Rows at or past r_end hold zeros and stay zero.
template <bool BF16, int HD, int MF>
__device__ __forceinline__ void rms_norm_q(u32 (&qa)[MF][HD / 16][4], const float* __restrict__ gamma,
                                           float scale, int h, int r0, int r_end, int g, int t) {
    constexpr int KS = HD / 16;
    float norm[MF][2], rcp[MF][2];
    #pragma unroll
    for (int f = 0; f < MF; ++f) {
        float sa = 0.f, sb = 0.f;
        #pragma unroll
        for (int s = 0; s < KS; ++s) {
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                float lo, hi;
                unpack2<BF16>(qa[f][s][i], lo, hi);
                const float sq = lo * lo + hi * hi;
                if (i & 1) sb += sq; else sa += sq;
            }
        }
        sa += __shfl_xor_sync(0xffffffffu, sa, 1);
        sa += __shfl_xor_sync(0xffffffffu, sa, 2);
        sb += __shfl_xor_sync(0xffffffffu, sb, 1);
        sb += __shfl_xor_sync(0xffffffffu, sb, 2);
        norm[f][0] = fmaxf(sqrtf(sa), 1e-12f);
        norm[f][1] = fmaxf(sqrtf(sb), 1e-12f);
        rcp[f][0] = rcp_refined(norm[f][0]);
        rcp[f][1] = rcp_refined(norm[f][1]);
    }
    const float* gh = gamma + h * HD;
    #pragma unroll
    for (int s = 0; s < KS; ++s) {
        const int c = s * 16 + 2 * t;
        // gamma of columns c, c + 1 (registers 0, 1) and c + 8, c + 9 (registers 2, 3)
        const float gm[4] = {gh[c], gh[c + 1], gh[c + 8], gh[c + 9]};
        #pragma unroll
        for (int f = 0; f < MF; ++f) {
            const int ra = r0 + f * 16 + g;
            #pragma unroll
            for (int i = 0; i < 4; ++i) {
                const bool live = (i & 1 ? ra + 8 : ra) < r_end;
                const float n = norm[f][i & 1], r = rcp[f][i & 1];
                const int gi = (i >> 1) * 2;
                float lo, hi;
                unpack2<BF16>(qa[f][s][i], lo, hi);
                const u32 w = pack2<BF16>(div_rn(lo, n, r) * gm[gi] * scale,
                                          div_rn(hi, n, r) * gm[gi + 1] * scale);
                qa[f][s][i] = live ? w : 0u;
            }
        }
    }
}
