// Fused attention on Hopper's warpgroup tensor-core instructions (wgmma, sm_90a only): the
// contract, arguments (q's fused RMS norm included) and online softmax of flash_attention.cu, with both products issued by a
// warpgroup (4 warps, 64 query rows) as asynchronous wgmma.mma_async:
//   S = Q K^T: m64nBNk16, A = Q from registers (the same fragments mma.sync takes), B = the K tile
//              in shared memory (K-major: each key's HD dims contiguous);
//   O += P V:  m64nHDk16, A = P re-packed from the S accumulators (the accumulator layout of a
//              wgmma D fragment is the m16n8 layout repeated along N, so the packing is the
//              mma.sync kernel's), B = the V tile in shared memory read N-major (transposed).
// Block: NWG warpgroups (64 * NWG query rows) share each K/V tile; tiles of BN keys are
// double-buffered through cp.async in dynamic shared memory, in the no-swizzle "core matrix"
// layout wgmma reads: 8 rows x 16 bytes per 128-byte core matrix, core matrix (row block rb,
// 8-dim block cb) at ((rb * HD / 8) + cb) * 128 bytes. A descriptor names a tile by its start,
// the byte distance between core matrices along K (leading) and along M/N (stride), as the
// PTX ISA reads them for both major-nesses (checked on an H100 against the other readings).

typedef unsigned long long u64;

#define WGMMA_RS_N64(NAME, TY, TRANS_B, OUT)                                                \
    __device__ __forceinline__ void NAME(float* d, const u32* a, u64 desc, int accumulate) { \
        asm volatile(                                                                    \
            "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                   \
            "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " {"              \
            "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, " \
            "{%32, %33, %34, %35}, %36, p, 1, 1, " TRANS_B ";\n}\n" \
            : OUT(d[0]), OUT(d[1]), OUT(d[2]), OUT(d[3]), OUT(d[4]), OUT(d[5]), OUT(d[6]), OUT(d[7]), \
              OUT(d[8]), OUT(d[9]), OUT(d[10]), OUT(d[11]), OUT(d[12]), OUT(d[13]), OUT(d[14]), OUT(d[15]), \
              OUT(d[16]), OUT(d[17]), OUT(d[18]), OUT(d[19]), OUT(d[20]), OUT(d[21]), OUT(d[22]), OUT(d[23]), \
              OUT(d[24]), OUT(d[25]), OUT(d[26]), OUT(d[27]), OUT(d[28]), OUT(d[29]), OUT(d[30]), OUT(d[31]) \
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate)); \
    }

#define WGMMA_RS_N80(NAME, TY, TRANS_B, OUT)                                                \
    __device__ __forceinline__ void NAME(float* d, const u32* a, u64 desc, int accumulate) { \
        asm volatile(                                                                    \
            "{\n.reg .pred p;\nsetp.ne.b32 p, %45, 0;\n"                                   \
            "wgmma.mma_async.sync.aligned.m64n80k16.f32." TY "." TY " {"              \
            "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
            "%32, %33, %34, %35, %36, %37, %38, %39}, " \
            "{%40, %41, %42, %43}, %44, p, 1, 1, " TRANS_B ";\n}\n" \
            : OUT(d[0]), OUT(d[1]), OUT(d[2]), OUT(d[3]), OUT(d[4]), OUT(d[5]), OUT(d[6]), OUT(d[7]), \
              OUT(d[8]), OUT(d[9]), OUT(d[10]), OUT(d[11]), OUT(d[12]), OUT(d[13]), OUT(d[14]), OUT(d[15]), \
              OUT(d[16]), OUT(d[17]), OUT(d[18]), OUT(d[19]), OUT(d[20]), OUT(d[21]), OUT(d[22]), OUT(d[23]), \
              OUT(d[24]), OUT(d[25]), OUT(d[26]), OUT(d[27]), OUT(d[28]), OUT(d[29]), OUT(d[30]), OUT(d[31]), \
              OUT(d[32]), OUT(d[33]), OUT(d[34]), OUT(d[35]), OUT(d[36]), OUT(d[37]), OUT(d[38]), OUT(d[39]) \
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate)); \
    }

#define WGMMA_RS_N128(NAME, TY, TRANS_B, OUT)                                                \
    __device__ __forceinline__ void NAME(float* d, const u32* a, u64 desc, int accumulate) { \
        asm volatile(                                                                    \
            "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                   \
            "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {"              \
            "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
            "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
            "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, " \
            "{%64, %65, %66, %67}, %68, p, 1, 1, " TRANS_B ";\n}\n" \
            : OUT(d[0]), OUT(d[1]), OUT(d[2]), OUT(d[3]), OUT(d[4]), OUT(d[5]), OUT(d[6]), OUT(d[7]), \
              OUT(d[8]), OUT(d[9]), OUT(d[10]), OUT(d[11]), OUT(d[12]), OUT(d[13]), OUT(d[14]), OUT(d[15]), \
              OUT(d[16]), OUT(d[17]), OUT(d[18]), OUT(d[19]), OUT(d[20]), OUT(d[21]), OUT(d[22]), OUT(d[23]), \
              OUT(d[24]), OUT(d[25]), OUT(d[26]), OUT(d[27]), OUT(d[28]), OUT(d[29]), OUT(d[30]), OUT(d[31]), \
              OUT(d[32]), OUT(d[33]), OUT(d[34]), OUT(d[35]), OUT(d[36]), OUT(d[37]), OUT(d[38]), OUT(d[39]), \
              OUT(d[40]), OUT(d[41]), OUT(d[42]), OUT(d[43]), OUT(d[44]), OUT(d[45]), OUT(d[46]), OUT(d[47]), \
              OUT(d[48]), OUT(d[49]), OUT(d[50]), OUT(d[51]), OUT(d[52]), OUT(d[53]), OUT(d[54]), OUT(d[55]), \
              OUT(d[56]), OUT(d[57]), OUT(d[58]), OUT(d[59]), OUT(d[60]), OUT(d[61]), OUT(d[62]), OUT(d[63]) \
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate)); \
    }


// OUT "+f": D += A B (D read when `accumulate` is nonzero); "=f" (the _z wrappers, called with
// accumulate 0): D = A B, D only written, so the instructions that read and rewrite D after the
// product has landed do not count as redefining a wgmma input while later products are in flight.
WGMMA_RS_N64(wgmma_n64_f16_k, "f16", "0", "+f")
WGMMA_RS_N64(wgmma_n64_bf16_k, "bf16", "0", "+f")
WGMMA_RS_N64(wgmma_n64_f16_kz, "f16", "0", "=f")
WGMMA_RS_N64(wgmma_n64_bf16_kz, "bf16", "0", "=f")
WGMMA_RS_N64(wgmma_n64_f16_t, "f16", "1", "+f")
WGMMA_RS_N64(wgmma_n64_bf16_t, "bf16", "1", "+f")
WGMMA_RS_N80(wgmma_n80_f16_t, "f16", "1", "+f")
WGMMA_RS_N80(wgmma_n80_bf16_t, "bf16", "1", "+f")
WGMMA_RS_N128(wgmma_n128_f16_k, "f16", "0", "+f")
WGMMA_RS_N128(wgmma_n128_bf16_k, "bf16", "0", "+f")
WGMMA_RS_N128(wgmma_n128_f16_kz, "f16", "0", "=f")
WGMMA_RS_N128(wgmma_n128_bf16_kz, "bf16", "0", "=f")

// D (+)= A B for one k-step of 16: N columns, B K-major (TRANS false) or N-major (TRANS true).
template <bool BF16, int N, bool TRANS>
__device__ __forceinline__ void wgmma_rs(float* d, const u32* a, u64 desc, int accumulate) {
    if constexpr (N == 64 && !TRANS) {
        if constexpr (BF16) wgmma_n64_bf16_k(d, a, desc, accumulate);
        else wgmma_n64_f16_k(d, a, desc, accumulate);
    } else if constexpr (N == 64 && TRANS) {
        if constexpr (BF16) wgmma_n64_bf16_t(d, a, desc, accumulate);
        else wgmma_n64_f16_t(d, a, desc, accumulate);
    } else if constexpr (N == 80 && TRANS) {
        if constexpr (BF16) wgmma_n80_bf16_t(d, a, desc, accumulate);
        else wgmma_n80_f16_t(d, a, desc, accumulate);
    } else {
        static_assert(N == 128 && !TRANS, "no wgmma wrapper for this shape");
        if constexpr (BF16) wgmma_n128_bf16_k(d, a, desc, accumulate);
        else wgmma_n128_f16_k(d, a, desc, accumulate);
    }
}

// D = A B (D not read) for one k-step of 16, B K-major: the first k-step of S = Q K^T.
template <bool BF16, int N>
__device__ __forceinline__ void wgmma_rs_zero(float* d, const u32* a, u64 desc) {
    if constexpr (N == 64) {
        if constexpr (BF16) wgmma_n64_bf16_kz(d, a, desc, 0);
        else wgmma_n64_f16_kz(d, a, desc, 0);
    } else {
        static_assert(N == 128, "no zero-init wgmma wrapper for this shape");
        if constexpr (BF16) wgmma_n128_bf16_kz(d, a, desc, 0);
        else wgmma_n128_f16_kz(d, a, desc, 0);
    }
}

__device__ __forceinline__ void wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wgmma_wait_all() {
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
}
// Shared-memory writes of the generic proxy (cp.async, plain stores) made visible to the async
// proxy that wgmma reads shared memory through.
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// A shared-memory matrix descriptor, no swizzle: start address, leading and stride byte offsets
// (all in 16-byte units, 14 bits each).
__device__ __forceinline__ u64 smem_desc(const void* p, u32 leading, u32 stride) {
    return (u64)((smem_addr(p) & 0x3FFFFu) >> 4) | ((u64)((leading >> 4) & 0x3FFFu) << 16) |
           ((u64)((stride >> 4) & 0x3FFFu) << 32);
}

// Rows [j0, j0 + BN) of one head of `src` into a core-matrix tile (rows past j1 zero-filled)
// through cp.async. Eight consecutive threads fill one 128-byte core matrix (conflict-free
// stores); a warp reads 8 rows x 64 contiguous bytes.
template <int HD, int BN, int NT>
__device__ __forceinline__ void stage_core_tile(u16* dst, const u16* __restrict__ src, int j0,
                                                int j1, long long stride,
                                                const int* __restrict__ perm, int h, int tid) {
    constexpr int CPR = HD / 8;   // 16-byte chunks per row = core matrices per row block
    constexpr int CHUNKS = BN * CPR;
    #pragma unroll
    for (int i = 0; i < (CHUNKS + NT - 1) / NT; ++i) {
        const int idx = tid + i * NT;
        if (CHUNKS % NT != 0 && idx >= CHUNKS) break;
        const int r8 = idx & 7, c = (idx >> 3) % CPR, rb = (idx >> 3) / CPR;
        const int j = j0 + rb * 8 + r8;
        const bool ok = j < j1;
        const int jr = ok ? j : j0;
        cp_async16(dst + ((rb * CPR + c) * 64 + r8 * 8),
                   src + (long long)(perm ? perm[jr] : jr) * stride + h * HD + c * 8, ok);
    }
}

// This warp's Q fragments (16 rows from r0, A operands of S = Q K^T) straight from global memory;
// rows at or past r_end are zeros.
template <int HD>
__device__ __forceinline__ void load_q_frags(u32 (&qa)[HD / 16][4], const u16* __restrict__ q,
                                             int r0, int r_end, long long q_stride,
                                             const int* __restrict__ perm, int h, int g, int t) {
    const int ra = r0 + g, rb = ra + 8;
    const int pra = ra < r_end ? (perm ? perm[ra] : ra) : 0;
    const int prb = rb < r_end ? (perm ? perm[rb] : rb) : 0;
    const u16* pa = q + (long long)pra * q_stride + h * HD;
    const u16* pb = q + (long long)prb * q_stride + h * HD;
    #pragma unroll
    for (int s = 0; s < HD / 16; ++s) {
        const int c = s * 16 + 2 * t;
        qa[s][0] = ra < r_end ? *reinterpret_cast<const u32*>(pa + c) : 0u;
        qa[s][1] = rb < r_end ? *reinterpret_cast<const u32*>(pb + c) : 0u;
        qa[s][2] = ra < r_end ? *reinterpret_cast<const u32*>(pa + c + 8) : 0u;
        qa[s][3] = rb < r_end ? *reinterpret_cast<const u32*>(pb + c + 8) : 0u;
    }
}

// The running softmax of rows g (a) and g + 8 (b) over one tile of S (NS blocks of 8 keys from
// j0; keys at or past j_end masked): updates the maxima and sums, turns s into the unnormalised
// probabilities and returns the factors the accumulated output must be scaled by.
template <int NS>
__device__ __forceinline__ void softmax_tile(float (&s)[NS * 4], bool partial, int j0, int j_end,
                                             int t, float scale_log2, float& m_a, float& m_b,
                                             float& l_a, float& l_b, float& corr_a,
                                             float& corr_b) {
    float mx_a = NEG_INF, mx_b = NEG_INF;
    #pragma unroll
    for (int n = 0; n < NS; ++n) {
        if (partial) {
            const int j = j0 + n * 8 + 2 * t;
            if (j >= j_end) { s[4 * n] = NEG_INF; s[4 * n + 2] = NEG_INF; }
            if (j + 1 >= j_end) { s[4 * n + 1] = NEG_INF; s[4 * n + 3] = NEG_INF; }
        }
        mx_a = fmaxf(mx_a, fmaxf(s[4 * n], s[4 * n + 1]));
        mx_b = fmaxf(mx_b, fmaxf(s[4 * n + 2], s[4 * n + 3]));
    }
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
    const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
    corr_a = ex2((m_a - mn_a) * scale_log2);
    corr_b = ex2((m_b - mn_b) * scale_log2);
    m_a = mn_a;
    m_b = mn_b;
    const float off_a = mn_a * scale_log2, off_b = mn_b * scale_log2;
    float sum_a = 0.f, sum_b = 0.f;
    #pragma unroll
    for (int n = 0; n < NS; ++n) {
        s[4 * n] = ex2(fmaf(s[4 * n], scale_log2, -off_a));
        s[4 * n + 1] = ex2(fmaf(s[4 * n + 1], scale_log2, -off_a));
        s[4 * n + 2] = ex2(fmaf(s[4 * n + 2], scale_log2, -off_b));
        s[4 * n + 3] = ex2(fmaf(s[4 * n + 3], scale_log2, -off_b));
        sum_a += s[4 * n] + s[4 * n + 1];
        sum_b += s[4 * n + 2] + s[4 * n + 3];
    }
    l_a = l_a * corr_a + sum_a;
    l_b = l_b * corr_b + sum_b;
}

// o (ND blocks of 8 dims, rows g and g + 8) scaled by the softmax corrections; P (the
// probabilities in s) packed into the A fragments of O += P V, KV k-steps of 16 keys.
template <bool BF16, int ND, int KV>
__device__ __forceinline__ void rescale_and_pack(float (&o)[ND * 4], const float (&s)[KV * 8],
                                                 u32 (&pa)[KV][4], float corr_a, float corr_b) {
    #pragma unroll
    for (int n = 0; n < ND; ++n) {
        o[4 * n] *= corr_a; o[4 * n + 1] *= corr_a;
        o[4 * n + 2] *= corr_b; o[4 * n + 3] *= corr_b;
    }
    #pragma unroll
    for (int kb = 0; kb < KV; ++kb) {
        pa[kb][0] = pack2<BF16>(s[8 * kb], s[8 * kb + 1]);
        pa[kb][1] = pack2<BF16>(s[8 * kb + 2], s[8 * kb + 3]);
        pa[kb][2] = pack2<BF16>(s[8 * kb + 4], s[8 * kb + 5]);
        pa[kb][3] = pack2<BF16>(s[8 * kb + 6], s[8 * kb + 7]);
    }
}

// The normalised output rows g and g + 8 of this warp (from r0; rows at or past r_end skipped).
template <bool BF16, int HD>
__device__ __forceinline__ void store_out(const float (&o)[HD / 2], float l_a, float l_b,
                                          u16* __restrict__ out, int r0, int r_end,
                                          const int* __restrict__ perm, int heads, int h, int g,
                                          int t) {
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
    const float inv_a = l_a > 0.f ? 1.f / l_a : 0.f;
    const float inv_b = l_b > 0.f ? 1.f / l_b : 0.f;
    const int ra = r0 + g, rb = ra + 8;
    const int pra = ra < r_end ? (perm ? perm[ra] : ra) : 0;
    const int prb = rb < r_end ? (perm ? perm[rb] : rb) : 0;
    #pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
        const int c = n * 8 + 2 * t;
        if (ra < r_end)
            *reinterpret_cast<u32*>(out + ((long long)pra * heads + h) * HD + c) =
                pack2<BF16>(o[4 * n] * inv_a, o[4 * n + 1] * inv_a);
        if (rb < r_end)
            *reinterpret_cast<u32*>(out + ((long long)prb * heads + h) * HD + c) =
                pack2<BF16>(o[4 * n + 2] * inv_b, o[4 * n + 3] * inv_b);
    }
}

// Keeps the compiler from moving accumulator registers an asynchronous wgmma still writes.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
    #pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

__device__ __forceinline__ void wgmma_wait_one() {
    asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
}

// HD: head dimension (64 or 80); NWG: warpgroups per block; BN: keys per tile (64 or 128).
// PIPE > 0: each tile's S = Q K^T is issued together with the previous tile's O += P V, and the
// softmax of the tile runs while that product is still on the tensor cores (one barrier per
// tile), with K/V tiles copied PIPE tiles ahead (PIPE + 2 stages); PIPE 0: each product is
// waited for before the next step (two stages, one tile ahead).
template <bool BF16, int HD, int NWG, int BN, int PIPE>
__device__ void flash_wgmma(const u16* __restrict__ q, const u16* __restrict__ k,
                            const u16* __restrict__ v, const int* __restrict__ tile_group,
                            const int* __restrict__ tile_q0, const int* __restrict__ q_end,
                            const int* __restrict__ kv_start, const int* __restrict__ kv_end,
                            int heads, float scale_log2, u16* __restrict__ out,
                            long long q_stride, long long k_stride, long long v_stride,
                            const int* __restrict__ perm, const float* __restrict__ q_gamma,
                            float q_scale) {
    constexpr int NT = 128 * NWG;   // threads
    constexpr int KS = HD / 16;     // k-steps of S = Q K^T
    constexpr int ND = HD / 8;      // 8-wide blocks of output dims
    constexpr int NS = BN / 8;      // 8-wide blocks of keys in S
    constexpr int KV = BN / 16;     // k-steps of O += P V
    constexpr int CPR = HD / 8;
    constexpr int TILE = BN * HD;   // halves per K (or V) tile
    constexpr int STAGES = PIPE > 0 ? PIPE + 2 : 2;
    static_assert(PIPE >= 0 && PIPE <= 2, "K/V copies run one or two tiles ahead");
    extern __shared__ __align__(128) u16 smem[];   // [stage][K tile, V tile]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int tile = blockIdx.x, h = blockIdx.y;
    const int grp = tile_group[tile];
    const int r_end = q_end[grp];
    const int r0 = tile_q0[tile] + warp * 16;   // this warp's 16 rows (warpgroup warp / 4)
    const int j_begin = kv_start[grp], j_end = kv_end[grp];
    // K tile: along K (dims) core matrices are 128 bytes apart, along N (keys) CPR * 128.
    // V tile, read N-major: along K (keys) CPR * 128, along N (dims) 128.
    constexpr u32 k_lead = 128, k_stride_b = CPR * 128;
    constexpr u32 v_lead = CPR * 128, v_stride_b = 128;

    u32 qa[1][KS][4];
    load_q_frags<HD>(qa[0], q, r0, r_end, q_stride, perm, h, g, t);
    if (q_gamma) rms_norm_q<BF16, HD, 1>(qa, q_gamma, q_scale, h, r0, r_end, g, t);
    float o[ND * 4];
    #pragma unroll
    for (int i = 0; i < ND * 4; ++i) o[i] = 0.f;
    float m_a = NEG_INF, m_b = NEG_INF, l_a = 0.f, l_b = 0.f;   // rows g and g + 8

    if (j_begin < j_end) {
        stage_core_tile<HD, BN, NT>(smem, k, j_begin, j_end, k_stride, perm, h, tid);
        stage_core_tile<HD, BN, NT>(smem + TILE, v, j_begin, j_end, v_stride, perm, h, tid);
    }
    cp_async_commit();
    if constexpr (PIPE == 2) {   // the second tile too, in its own group
        if (j_begin + BN < j_end) {
            stage_core_tile<HD, BN, NT>(smem + 2 * TILE, k, j_begin + BN, j_end, k_stride, perm,
                                        h, tid);
            stage_core_tile<HD, BN, NT>(smem + 3 * TILE, v, j_begin + BN, j_end, v_stride, perm,
                                        h, tid);
        }
        cp_async_commit();
    }
    float s[NS * 4];   // S of the current tile (set by its first k-step)
    #pragma unroll
    for (int i = 0; i < NS * 4; ++i) s[i] = 0.f;
    u32 pa[KV][4];
    const int tiles = j_begin < j_end ? (j_end - j_begin + BN - 1) / BN : 0;
    if constexpr (PIPE > 0) {
        // Tile `it`'s copies (the oldest of the PIPE groups in flight) land and are published;
        // after the barrier every warpgroup is also done with the tile two back (its V was read
        // by the product waited for in the previous step), whose stage tile `it + PIPE` goes into.
        auto publish_and_prefetch = [&](int it) {
            if constexpr (PIPE == 1) cp_async_wait_all();
            else cp_async_wait_one();
            fence_proxy_async();
            __syncthreads();
            if (it + PIPE < tiles) {
                u16* nxt = smem + ((it + PIPE) % STAGES) * 2 * TILE;
                const int j1 = j_begin + (it + PIPE) * BN;
                stage_core_tile<HD, BN, NT>(nxt, k, j1, j_end, k_stride, perm, h, tid);
                stage_core_tile<HD, BN, NT>(nxt + TILE, v, j1, j_end, v_stride, perm, h, tid);
            }
            cp_async_commit();
        };
        auto issue_s = [&](int it) {
            const u64 kd = smem_desc(smem + (it % STAGES) * 2 * TILE, k_lead, k_stride_b);
            wgmma_rs_zero<BF16, BN>(s, qa[0][0], kd);
            #pragma unroll
            for (int st = 1; st < KS; ++st)
                wgmma_rs<BF16, BN, false>(s, qa[0][st], kd + (u64)(st * 2 * 64 * 2 / 16), 1);
            wgmma_commit();
        };
        auto issue_pv = [&](int it) {
            const u64 vd = smem_desc(smem + (it % STAGES) * 2 * TILE + TILE, v_lead, v_stride_b);
            #pragma unroll
            for (int kb = 0; kb < KV; ++kb)
                wgmma_rs<BF16, HD, true>(o, pa[kb], vd + (u64)(kb * 2 * CPR * 64 * 2 / 16), 1);
            wgmma_commit();
        };
        float corr_a, corr_b;
        if (tiles > 0) {   // tile 0: S alone
            publish_and_prefetch(0);
            wgmma_fence();
            issue_s(0);
            wgmma_wait_all();
            softmax_tile<NS>(s, BN > j_end - j_begin, j_begin, j_end, t, scale_log2, m_a, m_b,
                             l_a, l_b, corr_a, corr_b);
            rescale_and_pack<BF16, ND, KV>(o, s, pa, corr_a, corr_b);
        }
        for (int it = 1; it < tiles; ++it) {
            // S of this tile and P V of the previous one go out together; the softmax runs
            // while P V is still on the tensor cores.
            const int j0 = j_begin + it * BN;
            publish_and_prefetch(it);
            wgmma_fence();
            issue_s(it);
            issue_pv(it - 1);
            wgmma_wait_one();   // S has landed
            softmax_tile<NS>(s, j0 + BN > j_end, j0, j_end, t, scale_log2, m_a, m_b, l_a, l_b,
                             corr_a, corr_b);
            wgmma_wait_all();   // o and pa are free again
            fence_regs(o);
            rescale_and_pack<BF16, ND, KV>(o, s, pa, corr_a, corr_b);
        }
        if (tiles > 0) {   // the last tile's P V
            wgmma_fence();
            issue_pv(tiles - 1);
            wgmma_wait_all();
            fence_regs(o);
        }
    } else {
        for (int it = 0; it < tiles; ++it) {
            const int j0 = j_begin + it * BN;
            const u16* ks = smem + (it % STAGES) * 2 * TILE;
            const u16* vs = ks + TILE;
            __syncthreads();   // every warpgroup is done with the stage the next tile goes into
            if (it + 1 < tiles) {
                u16* nxt = smem + ((it + 1) % STAGES) * 2 * TILE;
                stage_core_tile<HD, BN, NT>(nxt, k, j0 + BN, j_end, k_stride, perm, h, tid);
                stage_core_tile<HD, BN, NT>(nxt + TILE, v, j0 + BN, j_end, v_stride, perm, h, tid);
            }
            cp_async_commit();
            cp_async_wait_one();   // this tile's copies have landed
            fence_proxy_async();
            __syncthreads();
            wgmma_fence();
            #pragma unroll
            for (int st = 0; st < KS; ++st)
                wgmma_rs<BF16, BN, false>(s, qa[0][st],
                                          smem_desc(ks + st * 2 * 64, k_lead, k_stride_b), st);
            wgmma_commit();
            wgmma_wait_all();
            float corr_a, corr_b;
            softmax_tile<NS>(s, j0 + BN > j_end, j0, j_end, t, scale_log2, m_a, m_b, l_a, l_b,
                             corr_a, corr_b);
            rescale_and_pack<BF16, ND, KV>(o, s, pa, corr_a, corr_b);
            wgmma_fence();
            #pragma unroll
            for (int kb = 0; kb < KV; ++kb)
                wgmma_rs<BF16, HD, true>(o, pa[kb],
                                         smem_desc(vs + kb * 2 * CPR * 64, v_lead, v_stride_b), 1);
            wgmma_commit();
            wgmma_wait_all();
        }
    }
    store_out<BF16, HD>(o, l_a, l_b, out, r0, r_end, perm, heads, h, g, t);
}

// Entries flash_wgmma_{f16,bf16}_d{HD}_w{NWG}_n{BN} and, pipelined, flash_wgmma_pipe_... (K/V
// one tile ahead) and flash_wgmma_pipe2_... (two tiles ahead): 128 * NWG threads, 2 (pipelined:
// PIPE + 2) stages * 2 * BN * HD * 2 bytes of dynamic shared memory (a K and a V tile per stage).
#define WGMMA_ENTRY(PFX, PIPE, TY, BF16, HD, NWG, BN)                                           \
    extern "C" __global__ void __launch_bounds__(128 * NWG)                                     \
        PFX##TY##_d##HD##_w##NWG##_n##BN(                                                       \
            const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,    \
            const int* __restrict__ tile_group, const int* __restrict__ tile_q0,                \
            const int* __restrict__ q_end, const int* __restrict__ kv_start,                    \
            const int* __restrict__ kv_end, int heads, float scale_log2, u16* __restrict__ out, \
            long long q_stride, long long k_stride, long long v_stride,                         \
            const int* __restrict__ perm, const float* __restrict__ q_gamma, float q_scale) {   \
        flash_wgmma<BF16, HD, NWG, BN, PIPE>(q, k, v, tile_group, tile_q0, q_end, kv_start,     \
                                             kv_end, heads, scale_log2, out, q_stride,          \
                                             k_stride, v_stride, perm, q_gamma, q_scale);       \
    }

#define WGMMA_ENTRIES(TY, BF16, HD)                              \
    WGMMA_ENTRY(flash_wgmma_, 0, TY, BF16, HD, 1, 64)            \
    WGMMA_ENTRY(flash_wgmma_, 0, TY, BF16, HD, 2, 64)            \
    WGMMA_ENTRY(flash_wgmma_, 0, TY, BF16, HD, 3, 64)            \
    WGMMA_ENTRY(flash_wgmma_, 0, TY, BF16, HD, 1, 128)           \
    WGMMA_ENTRY(flash_wgmma_, 0, TY, BF16, HD, 2, 128)           \
    WGMMA_ENTRY(flash_wgmma_, 0, TY, BF16, HD, 3, 128)           \
    WGMMA_ENTRY(flash_wgmma_pipe_, 1, TY, BF16, HD, 1, 64)       \
    WGMMA_ENTRY(flash_wgmma_pipe_, 1, TY, BF16, HD, 2, 64)       \
    WGMMA_ENTRY(flash_wgmma_pipe_, 1, TY, BF16, HD, 1, 128)      \
    WGMMA_ENTRY(flash_wgmma_pipe_, 1, TY, BF16, HD, 2, 128)      \
    WGMMA_ENTRY(flash_wgmma_pipe2_, 2, TY, BF16, HD, 2, 64)      \
    WGMMA_ENTRY(flash_wgmma_pipe2_, 2, TY, BF16, HD, 3, 64)      \
    WGMMA_ENTRY(flash_wgmma_pipe2_, 2, TY, BF16, HD, 4, 64)

WGMMA_ENTRIES(f16, false, 64)
WGMMA_ENTRIES(bf16, true, 64)
WGMMA_ENTRIES(f16, false, 80)
WGMMA_ENTRIES(bf16, true, 80)
