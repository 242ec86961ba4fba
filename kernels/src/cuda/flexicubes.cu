// FlexiCubes surface extraction on a sparse grid, on the GPU: the twin of
// trellis_kernels::flexicubes (`cube_corners_to_vertices`, `deform_vertices`, `extract`), which is
// the reference. No dense grid: every set (grid vertices, candidate and surface cubes, surface
// edges) is a sorted array of packed int keys, built with the radix sort and prefix sum of
// sort.cu (driven by the host) and compacted through flags + exclusive scans, so the order of
// every output is the CPU's order. Lookups are binary searches in those sorted arrays. Indices are
// int32.
//
// Keys: a grid vertex is x * side^2 + y * side + z (side = res + 1), a cube the same on the res
// grid; a surface edge is v0 << vbits | v1 (vbits = bits of side^3), which sorts as (v0, v1).
//
// Arithmetic follows the CPU's operation order; the module is compiled with --fmad=false, so every
// product and sum rounds as Rust's do. tanh and exp go through double precision and are rounded
// once to float (the CPU's tanhf / expf are within an ulp of that).
//
// Stages (host order): fc_corner_keys -> sort -> fc_unique_flags -> scan -> fc_unique_scatter ->
// fc_vertex_attrs (grid vertices, averaged attributes, deformed positions); fc_cube_keys -> sort
// -> fc_count_duplicates (cube weight rows); fc_neg_count -> scan -> fc_neg_cubes -> sort ->
// fc_surf_flags -> scan -> fc_surf_write (surface cubes and raw cases) -> fc_resolve_cases;
// fc_vd_flags x4 -> scans -> fc_vd_base; fc_dual_vertices; fc_edge_count -> scan ->
// fc_edge_keys -> sort -> fc_unique_flags -> scan -> fc_unique_scatter -> fc_quads -> scans ->
// fc_faces.
typedef unsigned long long u64;
typedef unsigned int u32;

// Corner i = dx + 2 dy + 4 dz.
__constant__ int FC_CORNERS[8][3] = {{0, 0, 0}, {1, 0, 0}, {0, 1, 0}, {1, 1, 0},
                                      {0, 0, 1}, {1, 0, 1}, {0, 1, 1}, {1, 1, 1}};
// The 12 cube edges as corner pairs, in the DMC tables' order and orientation.
__constant__ int FC_EDGES[12][2] = {{0, 1}, {1, 5}, {4, 5}, {0, 4}, {2, 3}, {3, 7},
                                    {6, 7}, {2, 6}, {2, 0}, {3, 1}, {7, 5}, {6, 4}};

__device__ __forceinline__ long long fc_tid() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ u64 fc_id(int x, int y, int z, int side) {
    return ((u64)x * (u64)side + (u64)y) * (u64)side + (u64)z;
}

__device__ __forceinline__ void fc_coord(u64 id, int side, int* c) {
    const u64 s = (u64)side;
    c[0] = (int)(id / (s * s));
    c[1] = (int)((id / s) % s);
    c[2] = (int)(id % s);
}

__device__ __forceinline__ bool fc_in(int x, int y, int z, int limit) {
    return x >= 0 && y >= 0 && z >= 0 && x < limit && y < limit && z < limit;
}

// Row of `key` in the ascending array keys[0..n), or -1.
__device__ int fc_find(const u64* __restrict__ keys, int n, u64 key) {
    int lo = 0, hi = n;
    while (lo < hi) {
        const int mid = lo + ((hi - lo) >> 1);
        if (keys[mid] < key) lo = mid + 1;
        else hi = mid;
    }
    return (lo < n && keys[lo] == key) ? lo : -1;
}

__device__ __forceinline__ float fc_tanh(float x) { return (float)tanh((double)x); }

// 1 / (1 + exp(-x)) in float, as the CPU's sigmoid.
__device__ __forceinline__ float fc_sigmoid(float x) {
    const float e = (float)exp(-(double)x);
    return 1.0f / (1.0f + e);
}

// Scalar of a grid vertex row (-1 = absent: the dense default 1).
__device__ __forceinline__ float fc_sdf(const float* __restrict__ attrs, int dim, int row) {
    return row < 0 ? 1.0f : attrs[(long long)row * dim];
}

// ---------------------------------------------------------------- grid vertices

// keys[8 c + k] = vertex id of corner k of cube c; vals = 8 c + k.
extern "C" __global__ void fc_corner_keys(const int* __restrict__ cubes, int n, int side,
                                          u64* __restrict__ keys, u32* __restrict__ vals) {
    const long long t = fc_tid();
    if (t >= 8LL * n) return;
    const int c = (int)(t >> 3), k = (int)(t & 7);
    const int* p = cubes + 3LL * c;
    keys[t] = fc_id(p[0] + FC_CORNERS[k][0], p[1] + FC_CORNERS[k][1], p[2] + FC_CORNERS[k][2],
                    side);
    vals[t] = (u32)t;
}

// flags[i] = 1 where sorted keys[i] starts a run of equal keys; flags[n] = 0 (so that the
// exclusive scan's entry n is the number of runs).
extern "C" __global__ void fc_unique_flags(const u64* __restrict__ keys, int n,
                                           u32* __restrict__ flags) {
    const long long i = fc_tid();
    if (i > n) return;
    if (i == n) {
        flags[i] = 0u;
        return;
    }
    flags[i] = (i == 0 || keys[i] != keys[i - 1]) ? 1u : 0u;
}

// The first element of each run: its key and where the run starts.
extern "C" __global__ void fc_unique_scatter(const u64* __restrict__ keys, int n,
                                             const u32* __restrict__ flags,
                                             const u32* __restrict__ ranks,
                                             u64* __restrict__ ukeys, u32* __restrict__ ustart) {
    const long long i = fc_tid();
    if (i >= n || !flags[i]) return;
    ukeys[ranks[i]] = keys[i];
    ustart[ranks[i]] = (u32)i;
}

// Per grid vertex: the mean of its corners' attributes [sdf, deform 3, colour cd] over the cubes
// sharing it, summed in cube then corner order (the sorted run holds 8 c + k ascending: the sort is
// stable), the SDF bias added to each corner's scalar first; then its integer coordinates and its
// deformed position (v / res - 0.5) + k tanh(deform).
extern "C" __global__ void fc_vertex_attrs(
    const u64* __restrict__ ukeys, const u32* __restrict__ ustart, int nv, int nsorted,
    const u32* __restrict__ sorted_vals, const float* __restrict__ feats, int stride,
    int sdf_base, int deform_base, int color_base, int cd, float sdf_bias, int side, int res,
    float deform_k, float* __restrict__ attrs, int* __restrict__ coords, float* __restrict__ pos) {
    const long long v = fc_tid();
    if (v >= nv) return;
    const int dim = 4 + cd;
    float acc[16];
    for (int c = 0; c < 16; ++c) acc[c] = 0.0f;
    const u32 start = ustart[v];
    const u32 end = v + 1 < nv ? ustart[v + 1] : (u32)nsorted;
    for (u32 i = start; i < end; ++i) {
        const u32 j = sorted_vals[i];
        const int k = (int)(j & 7u);
        const float* row = feats + (long long)(j >> 3) * stride;
        acc[0] += row[sdf_base + k] + sdf_bias;
        for (int c = 0; c < 3; ++c) acc[1 + c] += row[deform_base + 3 * k + c];
        for (int c = 0; c < cd; ++c) acc[4 + c] += row[color_base + cd * k + c];
    }
    const float cnt = (float)(end - start);
    float* out = attrs + v * dim;
    for (int c = 0; c < dim; ++c) out[c] = acc[c] / cnt;
    int p[3];
    fc_coord(ukeys[v], side, p);
    const float r = (float)res;
    for (int c = 0; c < 3; ++c) {
        coords[3 * v + c] = p[c];
        pos[3 * v + c] = ((float)p[c] / r - 0.5f) + deform_k * fc_tanh(acc[1 + c] / cnt);
    }
}

// ---------------------------------------------------------------- active cubes (weights)

// keys[c] = cube id of active cube c; vals = c.
extern "C" __global__ void fc_cube_keys(const int* __restrict__ cubes, int n, int res,
                                        u64* __restrict__ keys, u32* __restrict__ vals) {
    const long long c = fc_tid();
    if (c >= n) return;
    const int* p = cubes + 3 * c;
    keys[c] = fc_id(p[0], p[1], p[2], res);
    vals[c] = (u32)c;
}

// out[0] += number of sorted keys equal to their predecessor (duplicate cubes).
extern "C" __global__ void fc_count_duplicates(const u64* __restrict__ keys, int n,
                                               u32* __restrict__ out) {
    const long long i = fc_tid();
    if (i >= n || i == 0) return;
    if (keys[i] == keys[i - 1]) atomicAdd(out, 1u);
}

// ---------------------------------------------------------------- surface cubes

// count[v] = number of in-grid cubes around vertex v when its scalar is negative, else 0;
// count[nv] = 0.
extern "C" __global__ void fc_neg_count(const u64* __restrict__ ukeys, const float* __restrict__ attrs,
                                        int dim, int nv, int side, int res,
                                        u32* __restrict__ count) {
    const long long v = fc_tid();
    if (v > nv) return;
    if (v == nv) {
        count[v] = 0u;
        return;
    }
    u32 n = 0u;
    if (attrs[v * dim] < 0.0f) {
        int p[3];
        fc_coord(ukeys[v], side, p);
        for (int k = 0; k < 8; ++k)
            n += fc_in(p[0] - FC_CORNERS[k][0], p[1] - FC_CORNERS[k][1], p[2] - FC_CORNERS[k][2],
                       res)
                     ? 1u
                     : 0u;
    }
    count[v] = n;
}

// The cube ids counted by fc_neg_count, at the scanned offsets.
extern "C" __global__ void fc_neg_cubes(const u64* __restrict__ ukeys, const float* __restrict__ attrs,
                                        int dim, int nv, int side, int res,
                                        const u32* __restrict__ offsets, u64* __restrict__ keys,
                                        u32* __restrict__ vals) {
    const long long v = fc_tid();
    if (v >= nv || !(attrs[v * dim] < 0.0f)) return;
    int p[3];
    fc_coord(ukeys[v], side, p);
    u32 o = offsets[v];
    for (int k = 0; k < 8; ++k) {
        const int x = p[0] - FC_CORNERS[k][0], y = p[1] - FC_CORNERS[k][1],
                  z = p[2] - FC_CORNERS[k][2];
        if (fc_in(x, y, z, res)) {
            keys[o] = fc_id(x, y, z, res);
            vals[o] = o;
            ++o;
        }
    }
}

// Corner vertex rows (-1 = absent) and case id (bit i = corner i negative) of cube `key`.
__device__ int fc_cube_case(u64 key, int side, int res, const u64* __restrict__ ukeys, int nv,
                            const float* __restrict__ attrs, int dim, int* rows) {
    int p[3];
    fc_coord(key, res, p);
    int c = 0;
    for (int k = 0; k < 8; ++k) {
        rows[k] = fc_find(ukeys, nv,
                          fc_id(p[0] + FC_CORNERS[k][0], p[1] + FC_CORNERS[k][1],
                                p[2] + FC_CORNERS[k][2], side));
        if (fc_sdf(attrs, dim, rows[k]) < 0.0f) c |= 1 << k;
    }
    return c;
}

// flags[i] = 1 where sorted candidate i is the first of its run and a surface cube (case not 0,
// not 255); flags[m] = 0.
extern "C" __global__ void fc_surf_flags(const u64* __restrict__ ckeys, int m,
                                         const u64* __restrict__ ukeys, int nv,
                                         const float* __restrict__ attrs, int dim, int side,
                                         int res, u32* __restrict__ flags) {
    const long long i = fc_tid();
    if (i > m) return;
    if (i == m) {
        flags[i] = 0u;
        return;
    }
    u32 f = 0u;
    if (i == 0 || ckeys[i] != ckeys[i - 1]) {
        int rows[8];
        const int c = fc_cube_case(ckeys[i], side, res, ukeys, nv, attrs, dim, rows);
        f = (c != 0 && c != 255) ? 1u : 0u;
    }
    flags[i] = f;
}

// Surface cube s (ascending id): its id, corner rows and raw case.
extern "C" __global__ void fc_surf_write(const u64* __restrict__ ckeys, int m,
                                         const u32* __restrict__ flags,
                                         const u32* __restrict__ ranks,
                                         const u64* __restrict__ ukeys, int nv,
                                         const float* __restrict__ attrs, int dim, int side,
                                         int res, u64* __restrict__ skeys,
                                         int* __restrict__ scorners, int* __restrict__ scase) {
    const long long i = fc_tid();
    if (i >= m || !flags[i]) return;
    const u32 s = ranks[i];
    int rows[8];
    scase[s] = fc_cube_case(ckeys[i], side, res, ukeys, nv, attrs, dim, rows);
    skeys[s] = ckeys[i];
    for (int k = 0; k < 8; ++k) scorners[8LL * s + k] = rows[k];
}

// The ambiguity check: a flagged cube whose neighbour in the table's direction is a flagged
// surface cube (by its raw case) takes the table's replacement case. check: [256][5].
extern "C" __global__ void fc_resolve_cases(const u64* __restrict__ skeys,
                                            const int* __restrict__ scase, int ns, int res,
                                            const int* __restrict__ check,
                                            int* __restrict__ rcase) {
    const long long s = fc_tid();
    if (s >= ns) return;
    const int c = scase[s];
    const int* ch = check + 5 * c;
    int out = c;
    if (ch[0] == 1) {
        int p[3];
        fc_coord(skeys[s], res, p);
        const int x = p[0] + ch[1], y = p[1] + ch[2], z = p[2] + ch[3];
        if (fc_in(x, y, z, res)) {
            const int j = fc_find(skeys, ns, fc_id(x, y, z, res));
            if (j >= 0 && check[5 * scase[j]] == 1) out = ch[4];
        }
    }
    rcase[s] = out;
}

// ---------------------------------------------------------------- dual vertices

// flags[s] = 1 where surface cube s has `num` dual vertices; flags[ns] = 0.
extern "C" __global__ void fc_vd_flags(const int* __restrict__ rcase, int ns,
                                       const int* __restrict__ num_vd, int num,
                                       u32* __restrict__ flags) {
    const long long s = fc_tid();
    if (s > ns) return;
    flags[s] = (s < ns && num_vd[rcase[s]] == num) ? 1u : 0u;
}

// First dual vertex of each surface cube: cubes grouped by their number of dual vertices (1..4,
// ascending), then in cube order. r1..r4: exclusive scans (ns + 1 entries) of fc_vd_flags for
// num 1..4. total[0] = number of dual vertices.
extern "C" __global__ void fc_vd_base(const int* __restrict__ rcase, int ns,
                                      const int* __restrict__ num_vd, const u32* __restrict__ r1,
                                      const u32* __restrict__ r2, const u32* __restrict__ r3,
                                      const u32* __restrict__ r4, u32* __restrict__ base,
                                      u32* __restrict__ total) {
    const long long s = fc_tid();
    if (s >= ns) return;
    const u32* ranks[4] = {r1, r2, r3, r4};
    u32 start[6];
    start[0] = 0u;
    start[1] = 0u;
    for (int n = 1; n <= 4; ++n) start[n + 1] = start[n] + ranks[n - 1][ns] * (u32)n;
    const int num = num_vd[rcase[s]];
    // every surface case has 1..4 dual vertices (the tables' invariant, tested on the CPU)
    base[s] = (num >= 1 && num <= 4) ? start[num] + ranks[num - 1][s] * (u32)num : 0u;
    if (s == 0) total[0] = start[5];
}

// The dual vertices of surface cube s: per group of its case, the beta-weighted mean of the
// alpha-weighted zero crossings of the group's edges (positions and sigmoid colours), and the
// cube's gamma. dmc: [256][4][7] edge ids (-1 ends a group); num_vd: [256].
// Weights: the active cube's raw row (sorted cube keys -> input row), zeros for a cube that is not
// active, all ones when has_weights is 0.
extern "C" __global__ void fc_dual_vertices(
    const u64* __restrict__ skeys, const int* __restrict__ scorners,
    const int* __restrict__ rcase, const u32* __restrict__ base, int ns, int res, int side,
    const float* __restrict__ attrs, int cd, const float* __restrict__ pos,
    const float* __restrict__ feats, int stride, int weight_base, int has_weights,
    const u64* __restrict__ cube_keys, const u32* __restrict__ cube_rows, int ncubes,
    float weight_scale, float gamma_shift, float deform_k, const int* __restrict__ dmc,
    const int* __restrict__ num_vd, float* __restrict__ vd, float* __restrict__ vd_color,
    float* __restrict__ vd_gamma) {
    const long long s = fc_tid();
    if (s >= ns) return;
    const int dim = 4 + cd;
    int p[3];
    fc_coord(skeys[s], res, p);
    const int* rows = scorners + 8 * s;
    float beta[12], alpha[8], gamma;
    if (has_weights) {
        const int r = fc_find(cube_keys, ncubes, skeys[s]);
        const float* w = r >= 0 ? feats + (long long)cube_rows[r] * stride + weight_base : nullptr;
        for (int i = 0; i < 12; ++i) beta[i] = fc_tanh(w ? w[i] : 0.0f) * weight_scale + 1.0f;
        for (int i = 0; i < 8; ++i) alpha[i] = fc_tanh(w ? w[12 + i] : 0.0f) * weight_scale + 1.0f;
        gamma = fc_sigmoid(w ? w[20] : 0.0f) * weight_scale + gamma_shift;
    } else {
        for (int i = 0; i < 12; ++i) beta[i] = 1.0f;
        for (int i = 0; i < 8; ++i) alpha[i] = 1.0f;
        gamma = 1.0f;
    }
    float cp[8][3], cs[8];
    const float r = (float)res;
    for (int k = 0; k < 8; ++k) {
        cs[k] = fc_sdf(attrs, dim, rows[k]);
        for (int c = 0; c < 3; ++c)
            cp[k][c] = rows[k] >= 0 ? pos[3LL * rows[k] + c]
                                    : ((float)(p[c] + FC_CORNERS[k][c]) / r - 0.5f) + deform_k * 0.0f;
    }
    const int cs_ = rcase[s];
    const int num = num_vd[cs_];
    for (int g = 0; g < num && g < 4; ++g) {
        const long long o = (long long)base[s] + g;
        float acc[3] = {0.0f, 0.0f, 0.0f};
        float acc_c[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        float beta_sum = 0.0f;
        for (int q = 0; q < 7; ++q) {
            const int e = dmc[(cs_ * 4 + g) * 7 + q];
            if (e < 0) break;
            const int a = FC_EDGES[e][0], b = FC_EDGES[e][1];
            const float w0 = cs[a] * alpha[a];
            const float w1 = cs[b] * alpha[b];
            const float n0 = w1, n1 = -w0;
            const float den = n0 + n1;
            const float be = beta[e];
            for (int c = 0; c < 3; ++c) {
                const float ue = (cp[a][c] * n0 + cp[b][c] * n1) / den;
                acc[c] += ue * be;
            }
            for (int c = 0; c < cd; ++c) {
                const float ca = fc_sigmoid(rows[a] >= 0 ? attrs[(long long)rows[a] * dim + 4 + c] : 0.0f);
                const float cb = fc_sigmoid(rows[b] >= 0 ? attrs[(long long)rows[b] * dim + 4 + c] : 0.0f);
                acc_c[c] += (ca * n0 + cb * n1) / den * be;
            }
            beta_sum += be;
        }
        for (int c = 0; c < 3; ++c) vd[3 * o + c] = acc[c] / beta_sum;
        for (int c = 0; c < cd; ++c) vd_color[o * cd + c] = acc_c[c] / beta_sum;
        vd_gamma[o] = gamma;
    }
}

// ---------------------------------------------------------------- surface edges and faces

// count[s] = sign-changing edges of surface cube s; count[ns] = 0.
extern "C" __global__ void fc_edge_count(const int* __restrict__ scorners, int ns,
                                         const float* __restrict__ attrs, int dim,
                                         u32* __restrict__ count) {
    const long long s = fc_tid();
    if (s > ns) return;
    if (s == ns) {
        count[s] = 0u;
        return;
    }
    const int* rows = scorners + 8 * s;
    u32 n = 0u;
    for (int e = 0; e < 12; ++e) {
        const bool a = fc_sdf(attrs, dim, rows[FC_EDGES[e][0]]) < 0.0f;
        const bool b = fc_sdf(attrs, dim, rows[FC_EDGES[e][1]]) < 0.0f;
        n += a != b ? 1u : 0u;
    }
    count[s] = n;
}

// The sign-changing edges of each surface cube as v0 << vbits | v1 (cube-edge orientation).
extern "C" __global__ void fc_edge_keys(const u64* __restrict__ skeys,
                                        const int* __restrict__ scorners, int ns,
                                        const float* __restrict__ attrs, int dim, int side,
                                        int res, int vbits, const u32* __restrict__ offsets,
                                        u64* __restrict__ keys, u32* __restrict__ vals) {
    const long long s = fc_tid();
    if (s >= ns) return;
    int p[3];
    fc_coord(skeys[s], res, p);
    const int* rows = scorners + 8 * s;
    u32 o = offsets[s];
    for (int e = 0; e < 12; ++e) {
        const int a = FC_EDGES[e][0], b = FC_EDGES[e][1];
        if ((fc_sdf(attrs, dim, rows[a]) < 0.0f) == (fc_sdf(attrs, dim, rows[b]) < 0.0f)) continue;
        const u64 va = fc_id(p[0] + FC_CORNERS[a][0], p[1] + FC_CORNERS[a][1],
                             p[2] + FC_CORNERS[a][2], side);
        const u64 vb = fc_id(p[0] + FC_CORNERS[b][0], p[1] + FC_CORNERS[b][1],
                             p[2] + FC_CORNERS[b][2], side);
        keys[o] = (va << vbits) | vb;
        vals[o] = o;
        ++o;
    }
}

// Per unique surface edge: the quad of dual vertex ids of the 4 surface cubes around it (in
// ascending cube id), or none when fewer than 4 of them are surface cubes. flag_out[i] = quad
// and the edge's first vertex is outside (s0 > 0); flag_in[i] = quad and not. Both have an entry
// [ne] = 0. egroup: [256][12] dual-vertex group of each edge per case (-1: none, read as 0).
extern "C" __global__ void fc_quads(const u64* __restrict__ ekeys, int ne, int vbits, int side,
                                    int res, const u64* __restrict__ skeys, int ns,
                                    const int* __restrict__ rcase, const u32* __restrict__ base,
                                    const int* __restrict__ egroup, const u64* __restrict__ ukeys,
                                    int nv, const float* __restrict__ attrs, int dim,
                                    int* __restrict__ quads, u32* __restrict__ flag_out,
                                    u32* __restrict__ flag_in) {
    const long long i = fc_tid();
    if (i > ne) return;
    if (i == ne) {
        flag_out[i] = 0u;
        flag_in[i] = 0u;
        return;
    }
    const u64 key = ekeys[i];
    const u64 va = key >> vbits, vb = key & ((1ull << vbits) - 1ull);
    int p0[3], p1[3], lo[3];
    fc_coord(va, side, p0);
    fc_coord(vb, side, p1);
    int axis = 0;
    for (int c = 2; c >= 0; --c) {
        lo[c] = min(p0[c], p1[c]);
        if (p0[c] != p1[c]) axis = c;
    }
    const int u = (axis + 1) % 3, w = (axis + 2) % 3;
    u64 fk[4];
    int fi[4];
    int n = 0;
    for (int j = 0; j < 2; ++j) {
        for (int k = 0; k < 2; ++k) {
            int c[3] = {lo[0], lo[1], lo[2]};
            c[u] -= j;
            c[w] -= k;
            if (!fc_in(c[0], c[1], c[2], res)) continue;
            const u64 ck = fc_id(c[0], c[1], c[2], res);
            const int si = fc_find(skeys, ns, ck);
            if (si >= 0) {
                fk[n] = ck;
                fi[n] = si;
                ++n;
            }
        }
    }
    if (n != 4) {
        flag_out[i] = 0u;
        flag_in[i] = 0u;
        return;
    }
    // ascending cube id (insertion sort of 4 distinct keys)
    for (int a = 1; a < 4; ++a) {
        for (int b = a; b > 0 && fk[b - 1] > fk[b]; --b) {
            const u64 tk = fk[b]; fk[b] = fk[b - 1]; fk[b - 1] = tk;
            const int ti = fi[b]; fi[b] = fi[b - 1]; fi[b - 1] = ti;
        }
    }
    for (int m = 0; m < 4; ++m) {
        int c[3];
        fc_coord(fk[m], res, c);
        const int ia = (p0[0] - c[0]) + 2 * (p0[1] - c[1]) + 4 * (p0[2] - c[2]);
        const int ib = (p1[0] - c[0]) + 2 * (p1[1] - c[1]) + 4 * (p1[2] - c[2]);
        int e = 0;
        for (int q = 0; q < 12; ++q) {
            const int a = FC_EDGES[q][0], b = FC_EDGES[q][1];
            if ((a == ia && b == ib) || (a == ib && b == ia)) {
                e = q;
                break;
            }
        }
        const int g = egroup[rcase[fi[m]] * 12 + e];
        quads[4 * i + m] = g < 0 ? 0 : (int)(base[fi[m]] + (u32)g);
    }
    const float s0 = fc_sdf(attrs, dim, fc_find(ukeys, nv, va));
    const bool out = s0 > 0.0f;
    flag_out[i] = out ? 1u : 0u;
    flag_in[i] = out ? 0u : 1u;
}

// Two triangles per quad by the gamma rule; the quads with s0 > 0 first (edge order), then the
// others. rank_out / rank_in: exclusive scans of the flags (entry [ne] = their counts).
__device__ __forceinline__ void fc_split(const int* q, const float* __restrict__ gam, int* f) {
    const float g0 = gam[q[0]], g1 = gam[q[1]], g2 = gam[q[2]], g3 = gam[q[3]];
    if (g0 * g2 > g1 * g3) {
        f[0] = q[0]; f[1] = q[1]; f[2] = q[2];
        f[3] = q[0]; f[4] = q[2]; f[5] = q[3];
    } else {
        f[0] = q[0]; f[1] = q[1]; f[2] = q[3];
        f[3] = q[3]; f[4] = q[1]; f[5] = q[2];
    }
}

extern "C" __global__ void fc_faces(const int* __restrict__ quads, int ne,
                                    const u32* __restrict__ flag_out,
                                    const u32* __restrict__ flag_in,
                                    const u32* __restrict__ rank_out,
                                    const u32* __restrict__ rank_in,
                                    const float* __restrict__ gam, int* __restrict__ faces) {
    const long long i = fc_tid();
    if (i >= ne) return;
    const int* q = quads + 4 * i;
    int quad[4];
    long long t;
    if (flag_out[i]) {
        // [a, b, d, c]
        quad[0] = q[0]; quad[1] = q[1]; quad[2] = q[3]; quad[3] = q[2];
        t = rank_out[i];
    } else if (flag_in[i]) {
        // [c, d, b, a]
        quad[0] = q[2]; quad[1] = q[3]; quad[2] = q[1]; quad[3] = q[0];
        t = (long long)rank_out[ne] + rank_in[i];
    } else {
        return;
    }
    fc_split(quad, gam, faces + 6 * t);
}
