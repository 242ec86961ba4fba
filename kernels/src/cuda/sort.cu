// Device-wide primitives for the splatting renderer: an exclusive prefix sum of unsigned ints and
// a stable least-significant-digit radix sort of 64-bit keys with 32-bit values (8 bits per
// pass). Stable and free of atomics on the output positions, so the result is the same on
// every run: equal keys keep their input order.
//
// scan: scan_blocks scans SCAN_ITEMS per block and writes each block's total; the host scans the
// totals the same way (recursively) and scan_add adds them back.
// sort pass (digit = (key >> shift) & 255): radix_histogram counts each block's digits into
// hist[digit * nblocks + block]; the host scans hist; radix_scatter walks its block's chunk in
// rounds of 256 elements, ranks each element among equal digits (warp match + per-warp counts,
// warps in order) and writes it to its final place.
#define SCAN_THREADS 256
#define SCAN_ITEMS 1024
#define RADIX_THREADS 256
#define RADIX_ROUNDS 16
#define RADIX_CHUNK (RADIX_THREADS * RADIX_ROUNDS)
#define RADIX_WARPS (RADIX_THREADS / 32)

extern "C" __global__ void scan_blocks(const unsigned* __restrict__ in, unsigned* __restrict__ out,
                                       unsigned* __restrict__ sums, int n) {
    __shared__ unsigned s[SCAN_THREADS];
    const int tid = threadIdx.x;
    const long long base = (long long)blockIdx.x * SCAN_ITEMS + tid * 4;
    unsigned v[4];
    unsigned total = 0;
    for (int k = 0; k < 4; ++k) {
        v[k] = base + k < n ? in[base + k] : 0u;
        total += v[k];
    }
    s[tid] = total;
    __syncthreads();
    for (int off = 1; off < SCAN_THREADS; off <<= 1) {
        unsigned a = tid >= off ? s[tid - off] : 0u;
        __syncthreads();
        s[tid] += a;
        __syncthreads();
    }
    unsigned run = s[tid] - total;
    for (int k = 0; k < 4; ++k) {
        if (base + k < n) out[base + k] = run;
        run += v[k];
    }
    if (tid == SCAN_THREADS - 1) sums[blockIdx.x] = s[tid];
}

extern "C" __global__ void scan_add(unsigned* __restrict__ out,
                                    const unsigned* __restrict__ offsets, int n) {
    const long long base = (long long)blockIdx.x * SCAN_ITEMS + threadIdx.x * 4;
    const unsigned o = offsets[blockIdx.x];
    for (int k = 0; k < 4; ++k)
        if (base + k < n) out[base + k] += o;
}

extern "C" __global__ void radix_histogram(const unsigned long long* __restrict__ keys, int n,
                                           int shift, unsigned* __restrict__ hist) {
    __shared__ unsigned h[256];
    const int tid = threadIdx.x;
    h[tid] = 0u;
    __syncthreads();
    const long long base = (long long)blockIdx.x * RADIX_CHUNK;
    for (int r = 0; r < RADIX_ROUNDS; ++r) {
        long long i = base + (long long)r * RADIX_THREADS + tid;
        if (i < n) atomicAdd(&h[(unsigned)(keys[i] >> shift) & 255u], 1u);
    }
    __syncthreads();
    hist[(long long)tid * gridDim.x + blockIdx.x] = h[tid];
}

extern "C" __global__ void radix_scatter(const unsigned long long* __restrict__ keys_in,
                                         const unsigned* __restrict__ vals_in, int n, int shift,
                                         const unsigned* __restrict__ hist_scanned,
                                         unsigned long long* __restrict__ keys_out,
                                         unsigned* __restrict__ vals_out) {
    __shared__ unsigned next[256];                    // where this block's next digit-d element goes
    __shared__ unsigned wpos[RADIX_WARPS][256];       // per-warp counts, then per-warp starts
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    next[tid] = hist_scanned[(long long)tid * gridDim.x + blockIdx.x];
    const long long base = (long long)blockIdx.x * RADIX_CHUNK;
    const unsigned lanes_below = (1u << lane) - 1u;
    for (int r = 0; r < RADIX_ROUNDS; ++r) {
        for (int w = 0; w < RADIX_WARPS; ++w) wpos[w][tid] = 0u;
        __syncthreads();
        const long long i = base + (long long)r * RADIX_THREADS + tid;
        const bool valid = i < n;
        unsigned long long key = 0ull;
        unsigned val = 0u, digit = 256u;
        if (valid) {
            key = keys_in[i];
            val = vals_in[i];
            digit = (unsigned)(key >> shift) & 255u;
        }
        const unsigned peers = __match_any_sync(0xffffffffu, digit);
        const unsigned rank = __popc(peers & lanes_below);
        if (valid && rank == 0u) wpos[warp][digit] = __popc(peers);
        __syncthreads();
        // Thread d turns digit d's per-warp counts into starts, warps in order.
        unsigned run = next[tid];
        for (int w = 0; w < RADIX_WARPS; ++w) {
            unsigned c = wpos[w][tid];
            wpos[w][tid] = run;
            run += c;
        }
        next[tid] = run;
        __syncthreads();
        if (valid) {
            const unsigned dst = wpos[warp][digit] + rank;
            keys_out[dst] = key;
            vals_out[dst] = val;
        }
        __syncthreads();
    }
}
