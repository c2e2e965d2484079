// CUDA kernels of the request path (compiled at run time by CuPy/NVRTC), beside kernels.cu:
// the fused pooled (multi-hot) lookup and the per-table miss counts of a request.
//
// Table layout: as in kernels.cu (n_buckets buckets of SLOTS slots; a digest byte per slot, 0 =
// empty; meta[2*slot] = key, meta[2*slot+1] = eviction score; values [slots, NVEC] of VEC_T).
// The hash (place) and the score rule (touched_score) are the ones of kernels.cu.
//
// Build macros: VEC_T (uint4 / uint2 / unsigned int / unsigned short: the widest type that
// divides a row), NVEC (VEC_T per row), ELEM_T (float, or unsigned short for float16 rows,
// converted by PTX cvt so that no CUDA header is needed).

typedef unsigned long long u64;
typedef long long i64;

#ifndef VEC_T
#define VEC_T uint4
#endif
#ifndef NVEC
#define NVEC 16
#endif
#ifndef ELEM_T
#define ELEM_T float
#endif
#define SLOTS 32

constexpr int E = sizeof(VEC_T) / sizeof(ELEM_T);  // elements per vector
// G lanes share one row (a power of two covering NVEC, at most 32); a warp pass gathers RPP rows
constexpr int G = NVEC >= 32 ? 32 : NVEC > 8 ? 16 : NVEC > 4 ? 8 : NVEC > 2 ? 4 : NVEC > 1 ? 2 : 1;
constexpr int RPP = 32 / G;
constexpr int JV = (NVEC + G - 1) / G;  // vectors of one row per lane
constexpr int UNROLL = 4;               // rows per lane in flight

union Pack {
    VEC_T v;
    ELEM_T e[E];
};

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ void from_f(float x, float* o) { *o = x; }
__device__ __forceinline__ void from_f(float x, unsigned short* o) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    *o = h;
}

__device__ __forceinline__ void place(i64 key, u64 nb, u64* bucket, unsigned* digest) {
    u64 h = (u64)key;
    h ^= h >> 30; h *= 0xbf58476d1ce4e5b9ULL;
    h ^= h >> 27; h *= 0x94d049bb133111ebULL;
    h ^= h >> 31;
    *bucket = ((h & 0xffffffffULL) * nb) >> 32;
    unsigned d = (unsigned)(h >> 56);
    *digest = d ? d : 1u;
}

__device__ __forceinline__ u64 touched_score(u64 sc, u64 clock, int lfu) {
    if (!lfu) return clock;
    u64 c32 = clock & 0xffffffffULL;
    if ((sc & 0xffffffffULL) == c32) return sc;  // already counted in this call
    u64 cnt = (sc >> 32) + 1;
    if (cnt > 0xffffffffULL) cnt = 0xffffffffULL;
    return (cnt << 32) | c32;
}

// One warp per bag. For every 32 keys of the bag, lane i probes key i (its bucket's 32 digest
// bytes in two 16-byte loads, then the key of each matching slot) and refreshes the score of
// the slot it finds; then the warp gathers those rows, RPP rows per pass with G lanes a row,
// UNROLL passes of loads in flight before their sums, accumulating in float. The RPP partial sums
// are combined by shuffles and the first G lanes write the bag (times 1 / length for "mean").
// Each row is read once; missed keys add nothing (hit[i] = false, counted into misses[0]).
extern "C" __global__ void cache_pooled(
    const i64* __restrict__ keys, const i64* __restrict__ offsets, i64 n_bags,
    const unsigned char* __restrict__ digests, i64* meta, const VEC_T* __restrict__ values,
    VEC_T* __restrict__ out, bool* __restrict__ hit, u64 nb, u64 clock, int lfu, int mean,
    u64* counters, unsigned* misses)
{
    const int lane = threadIdx.x & 31;
    const i64 bag = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (bag >= n_bags) return;  // uniform across the warp
    const i64 start = offsets[bag], end = offsets[bag + 1];
    const int sub = lane / G, vl = lane % G;
    float acc[JV][E];
#pragma unroll
    for (int j = 0; j < JV; ++j)
#pragma unroll
        for (int e = 0; e < E; ++e) acc[j][e] = 0.f;
    unsigned n_hit = 0, n_miss = 0;
    for (i64 c = start; c < end; c += 32) {
        const i64 idx = c + lane;
        i64 slot = -1;
        if (idx < end) {
            const i64 key = keys[idx];
            u64 b;
            unsigned d;
            place(key, nb, &b, &d);
            const uint4* dw = reinterpret_cast<const uint4*>(digests + b * SLOTS);
            const uint4 w0 = dw[0], w1 = dw[1];
            const unsigned words[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
            const unsigned dd = d * 0x01010101u;
#pragma unroll
            for (int w = 0; w < 8; ++w) {
                unsigned m = __vcmpeq4(words[w], dd);
                while (m && slot < 0) {
                    const int byte = (__ffs(m) - 1) >> 3;
                    m &= ~(0xffu << (byte * 8));
                    const i64 s = (i64)b * SLOTS + w * 4 + byte;
                    if (meta[2 * s] == key) slot = s;
                }
            }
            if (slot >= 0) {
                const u64 sc = (u64)meta[2 * slot + 1];
                const u64 ns = touched_score(sc, clock, lfu);
                if (ns != sc) meta[2 * slot + 1] = (i64)ns;
                ++n_hit;
            } else {
                ++n_miss;
            }
            hit[idx] = slot >= 0;
        }
        const int cnt = (int)min((i64)32, end - c);
        for (int r0 = 0; r0 < cnt; r0 += RPP * UNROLL) {
            Pack reg[UNROLL][JV];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int r = r0 + sub + RPP * u;
                const i64 s = __shfl_sync(0xffffffffu, slot, r & 31);
                const bool valid = r < cnt && s >= 0;
#pragma unroll
                for (int j = 0; j < JV; ++j) {
                    const int v = vl + G * j;
                    if (valid && v < NVEC) {
                        reg[u][j].v = values[s * NVEC + v];
                    } else {
#pragma unroll
                        for (int e = 0; e < E; ++e) from_f(0.f, &reg[u][j].e[e]);
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u)
#pragma unroll
                for (int j = 0; j < JV; ++j)
#pragma unroll
                    for (int e = 0; e < E; ++e) acc[j][e] += to_f(reg[u][j].e[e]);
        }
    }
#pragma unroll
    for (int off = G; off < 32; off <<= 1)
#pragma unroll
        for (int j = 0; j < JV; ++j)
#pragma unroll
            for (int e = 0; e < E; ++e) acc[j][e] += __shfl_xor_sync(0xffffffffu, acc[j][e], off);
    const float scale = (mean && end > start) ? 1.f / (float)(end - start) : 1.f;
    if (sub == 0) {
#pragma unroll
        for (int j = 0; j < JV; ++j) {
            const int v = vl + G * j;
            if (v < NVEC) {
                Pack p;
#pragma unroll
                for (int e = 0; e < E; ++e) from_f(acc[j][e] * scale, &p.e[e]);
                out[bag * NVEC + v] = p.v;
            }
        }
    }
    for (int off = 16; off > 0; off >>= 1) {
        n_hit += __shfl_xor_sync(0xffffffffu, n_hit, off);
        n_miss += __shfl_xor_sync(0xffffffffu, n_miss, off);
    }
    if (lane == 0) {
        if (n_hit) atomicAdd(counters, (u64)n_hit);
        if (n_miss) atomicAdd(misses, n_miss);
    }
}

// counts[t] = misses (false entries) of hit[seg_end[t - 1] : seg_end[t]] (seg_end[-1] = 0): one
// block per table of a request, whose hit masks lie side by side in one array.
extern "C" __global__ void segment_misses(
    const bool* __restrict__ hit, const i64* __restrict__ seg_end, int n_seg,
    unsigned* __restrict__ counts)
{
    __shared__ unsigned part[32];
    const int t = blockIdx.x;
    if (t >= n_seg) return;
    const i64 lo = t ? seg_end[t - 1] : 0, hi = seg_end[t];
    unsigned c = 0;
    for (i64 i = lo + threadIdx.x; i < hi; i += blockDim.x) c += hit[i] ? 0u : 1u;
    for (int off = 16; off > 0; off >>= 1) c += __shfl_xor_sync(0xffffffffu, c, off);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = c;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned total = 0;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += part[w];
        counts[t] = total;
    }
}
