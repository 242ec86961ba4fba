// Submanifold neighbour maps on the GPU: an open-addressing hash table (linear probing) from
// packed (b, x, y, z) coordinates to rows, then one query per (row, kernel offset).
// Coordinates must lie in [0, 65535]; the batch index in [0, 65535]. Offsets are enumerated
// x-major, z fastest, centred (as trellis_kernels::sparse_conv::NeighbourMap).
#define EMPTY 0xffffffffffffffffull

__device__ __forceinline__ unsigned long long pack(int b, int x, int y, int z) {
    return ((unsigned long long)(unsigned)b << 48) | ((unsigned long long)(unsigned)x << 32) |
           ((unsigned long long)(unsigned)y << 16) | (unsigned long long)(unsigned)z;
}

__device__ __forceinline__ unsigned int slot_of(unsigned long long key, unsigned int mask) {
    key ^= key >> 33; key *= 0xff51afd7ed558ccdull; key ^= key >> 33;
    key *= 0xc4ceb9fe1a85ec53ull; key ^= key >> 33;
    return (unsigned int)key & mask;
}

extern "C" __global__ void hash_clear(unsigned long long* keys, int* vals, int cap) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < cap) { keys[i] = EMPTY; vals[i] = -1; }
}

extern "C" __global__ void hash_insert(const int* __restrict__ coords, int n,
                                       unsigned long long* keys, int* vals, int cap) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int* c = coords + 4 * (long long)i;
    unsigned long long key = pack(c[0], c[1], c[2], c[3]);
    unsigned int mask = (unsigned int)cap - 1u, s = slot_of(key, mask);
    for (int probe = 0; probe < cap; ++probe) {
        unsigned long long prev = atomicCAS(&keys[s], EMPTY, key);
        if (prev == EMPTY || prev == key) { atomicMax(&vals[s], i); return; }
        s = (s + 1u) & mask;
    }
}

extern "C" __global__ void submanifold_query(const int* __restrict__ coords, int n,
                                             const unsigned long long* __restrict__ keys,
                                             const int* __restrict__ vals, int cap,
                                             int kx, int ky, int kz, int* __restrict__ nbr) {
    const int volume = kx * ky * kz;
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)n * volume) return;
    const int i = (int)(t / volume), k = (int)(t % volume);
    const int ox = k / (ky * kz) - kx / 2, oy = (k / kz) % ky - ky / 2, oz = k % kz - kz / 2;
    const int* c = coords + 4 * (long long)i;
    const int x = c[1] + ox, y = c[2] + oy, z = c[3] + oz;
    int found = -1;
    if (x >= 0 && y >= 0 && z >= 0 && x < 65536 && y < 65536 && z < 65536) {
        unsigned long long key = pack(c[0], x, y, z);
        unsigned int mask = (unsigned int)cap - 1u, s = slot_of(key, mask);
        for (int probe = 0; probe < cap; ++probe) {
            unsigned long long kk = keys[s];
            if (kk == key) { found = vals[s]; break; }
            if (kk == EMPTY) break;
            s = (s + 1u) & mask;
        }
    }
    nbr[t] = found;
}
