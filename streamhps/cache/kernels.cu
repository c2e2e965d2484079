// CUDA kernels of the streamhps embedding cache (compiled at run time by CuPy/NVRTC).
//
// Layout: n_buckets buckets of SLOTS (32) slots. Per slot: a digest byte (0 = empty, else the
// top byte of the key's hash), meta[2*slot] = key and meta[2*slot+1] = eviction score (kept
// side by side so the key check and the score update touch one 32-byte sector), a version,
// and the low 32 bits of the clock of the call that last wrote it (stamp).
//
// Build macros: VEC_T (uint4 / uint2 / unsigned int / unsigned short: the widest type that
// divides a row), GROUP (lanes per key in cache_lookup: 8, 16 or 32).
//
// Ordering: all kernels of a cache run on one stream, so a lookup never overlaps a write.
// Writers (apply / insert / remove) serialise per bucket with a spin lock, so duplicate keys
// and competing inserts inside one launch are safe; their loads of the table are volatile.

typedef unsigned long long u64;
typedef long long i64;

#ifndef VEC_T
#define VEC_T uint4
#endif
#ifndef GROUP
#define GROUP 32
#endif
#define SLOTS 32

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

// Fused probe + gather: GROUP lanes per key; lanes 0..7 of the group test one 32-bit word of
// digests each (4 slots), then the group copies the row with VEC_T loads (or writes zeros).
extern "C" __global__ void cache_lookup(
    const i64* __restrict__ keys, i64 n,
    const unsigned* __restrict__ digest_words, i64* meta,
    const VEC_T* __restrict__ values, VEC_T* __restrict__ out, bool* __restrict__ hit,
    u64 nb, int nvec, u64 clock, int lfu, u64* counters)
{
    const int lane = threadIdx.x & 31;
    const int g_lane = lane & (GROUP - 1);
    const int g_base = lane & ~(GROUP - 1);
    const unsigned gmask = (GROUP == 32) ? 0xffffffffu : (((1u << GROUP) - 1u) << g_base);
    const i64 gid = ((i64)blockIdx.x * blockDim.x + threadIdx.x) / GROUP;
    int is_hit = 0;
    if (gid < n) {
        const i64 key = keys[gid];
        u64 b; unsigned d;
        place(key, nb, &b, &d);
        int found = -1;
        if (g_lane < SLOTS / 4) {
            unsigned m = __vcmpeq4(digest_words[b * (SLOTS / 4) + g_lane], d * 0x01010101u);
            while (m) {
                const int byte = (__ffs(m) - 1) >> 3;
                m &= ~(0xffu << (byte * 8));
                const int s = g_lane * 4 + byte;
                i64* mp = meta + 2 * (b * SLOTS + s);
                if (mp[0] == key) {
                    found = s;
                    const u64 sc = (u64)mp[1];
                    const u64 ns = touched_score(sc, clock, lfu);
                    if (ns != sc) mp[1] = (i64)ns;
                    break;
                }
            }
        }
        const unsigned bal = __ballot_sync(gmask, found >= 0);
        VEC_T* o = out + gid * nvec;
        if (bal) {
            const int s = __shfl_sync(gmask, found, __ffs(bal) - 1);
            const VEC_T* src = values + (b * SLOTS + s) * (i64)nvec;
            for (int v = g_lane; v < nvec; v += GROUP) o[v] = src[v];
            is_hit = (g_lane == 0);
        } else {
            VEC_T z = {0};
            for (int v = g_lane; v < nvec; v += GROUP) o[v] = z;
        }
        if (g_lane == 0) hit[gid] = bal != 0;
    }
    const int block_hits = __syncthreads_count(is_hit);
    if (threadIdx.x == 0 && block_hits) atomicAdd(counters, (u64)block_hits);
}

// Probe only (one warp per key, a lane per slot): the slot of each key, or -1.
extern "C" __global__ void cache_find(
    const i64* __restrict__ keys, i64 n, const unsigned char* __restrict__ digests,
    const i64* __restrict__ meta, u64 nb, i64* __restrict__ slot_out)
{
    const int lane = threadIdx.x & 31;
    const i64 w = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (w >= n) return;
    const i64 key = keys[w];
    u64 b; unsigned d;
    place(key, nb, &b, &d);
    const i64 slot = b * SLOTS + lane;
    const bool match = digests[slot] == d && meta[2 * slot] == key;
    const unsigned bal = __ballot_sync(0xffffffffu, match);
    if (lane == 0) slot_out[w] = bal ? (i64)(b * SLOTS + __ffs(bal) - 1) : -1;
}

__device__ __forceinline__ void lock_bucket(int* locks, u64 b, int lane) {
    if (lane == 0) {
        while (atomicCAS(locks + b, 0, 1) != 0) __nanosleep(32);
        __threadfence();
    }
    __syncwarp();
}

__device__ __forceinline__ void unlock_bucket(int* locks, u64 b, int lane) {
    __threadfence();  // every lane's writes are visible before the lock is seen free
    __syncwarp();
    if (lane == 0) atomicExch(locks + b, 0);
}

// counters: 0 hits (lookup), 1 inserted into empty, 2 evictions, 3 updates, 4 dropped,
//           5 absent (apply: keys not resident), 6 removed
#define C_EMPTY 1
#define C_EVICT 2
#define C_UPDATE 3
#define C_DROP 4
#define C_ABSENT 5
#define C_REMOVED 6

__device__ __forceinline__ void flush_counts(unsigned* sh, u64* counters) {
    __syncthreads();
    if (threadIdx.x < 8 && sh[threadIdx.x]) atomicAdd(counters + threadIdx.x, (u64)sh[threadIdx.x]);
}

// Write one row into a resident slot if its version is newer; the warp holds the bucket lock.
// Counts an update only the first time this call writes the slot (duplicates count once).
__device__ __forceinline__ void apply_row(
    i64 slot, i64 ver, const VEC_T* src, VEC_T* values, volatile i64* versions,
    volatile int* stamps, int stamp, int nvec, int lane, unsigned* sh)
{
    if (ver > versions[slot]) {
        VEC_T* dst = values + slot * (i64)nvec;
        for (int v = lane; v < nvec; v += 32) dst[v] = src[v];
        if (lane == 0) {
            versions[slot] = ver;
            if (stamps[slot] != stamp) { stamps[slot] = stamp; atomicAdd(sh + C_UPDATE, 1u); }
        }
    }
}

// Phase A of upsert (and all of update_if_present): rows of resident keys. absent[i] = 1 for
// keys not resident (phase B inserts those).
extern "C" __global__ void cache_apply(
    const i64* __restrict__ keys, i64 n, const VEC_T* __restrict__ vals,
    const i64* __restrict__ vers, volatile unsigned char* digests, volatile i64* meta,
    volatile i64* versions, volatile int* stamps, VEC_T* values, int* locks,
    u64 nb, int nvec, int stamp, unsigned char* absent, u64* counters)
{
    __shared__ unsigned sh[8];
    if (threadIdx.x < 8) sh[threadIdx.x] = 0;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const i64 w = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (w < n) {
        const i64 key = keys[w];
        u64 b; unsigned d;
        place(key, nb, &b, &d);
        lock_bucket(locks, b, lane);
        const i64 slot = b * SLOTS + lane;
        const bool match = digests[slot] == d && meta[2 * slot] == key;
        const unsigned bal = __ballot_sync(0xffffffffu, match);
        if (bal) {
            apply_row(b * SLOTS + __ffs(bal) - 1, vers[w], vals + w * (i64)nvec, values,
                      versions, stamps, stamp, nvec, lane, sh);
        } else if (lane == 0) {
            atomicAdd(sh + C_ABSENT, 1u);
        }
        if (lane == 0) absent[w] = bal ? 0 : 1;
        unlock_bucket(locks, b, lane);
    }
    flush_counts(sh, counters);
}

// Phase B of upsert: insert keys that phase A found absent. Empty slot first, else the
// eligible slot (not written by this call) with the lowest (score, key); none -> dropped.
extern "C" __global__ void cache_insert(
    const i64* __restrict__ keys, i64 n, const VEC_T* __restrict__ vals,
    const i64* __restrict__ vers, volatile unsigned char* digests, volatile i64* meta,
    volatile i64* versions, volatile int* stamps, VEC_T* values, int* locks,
    u64 nb, int nvec, int stamp, u64 insert_score, const unsigned char* __restrict__ absent,
    u64* counters)
{
    __shared__ unsigned sh[8];
    if (threadIdx.x < 8) sh[threadIdx.x] = 0;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const i64 w = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (w < n && absent[w]) {
        const i64 key = keys[w];
        const i64 ver = vers[w];
        u64 b; unsigned d;
        place(key, nb, &b, &d);
        lock_bucket(locks, b, lane);
        const i64 slot = b * SLOTS + lane;
        const unsigned dg = digests[slot];
        const i64 k = meta[2 * slot];
        const unsigned bal = __ballot_sync(0xffffffffu, dg == d && k == key);
        if (bal) {  // a duplicate of this key was inserted earlier in this call
            apply_row(b * SLOTS + __ffs(bal) - 1, ver, vals + w * (i64)nvec, values,
                      versions, stamps, stamp, nvec, lane, sh);
        } else {
            const unsigned empty = __ballot_sync(0xffffffffu, dg == 0);
            int target = -1;
            bool evicting = false;
            if (empty) {
                target = __ffs(empty) - 1;
            } else {
                const bool eligible = stamps[slot] != stamp;
                u64 sc = eligible ? (u64)meta[2 * slot + 1] : ~0ULL;
                i64 kk = eligible ? k : 0x7fffffffffffffffLL;
                int who = lane;
                for (int off = 16; off > 0; off >>= 1) {
                    const u64 sc2 = __shfl_xor_sync(0xffffffffu, sc, off);
                    const i64 kk2 = __shfl_xor_sync(0xffffffffu, kk, off);
                    const int who2 = __shfl_xor_sync(0xffffffffu, who, off);
                    if (sc2 < sc || (sc2 == sc && (kk2 < kk || (kk2 == kk && who2 < who)))) {
                        sc = sc2; kk = kk2; who = who2;
                    }
                }
                if (__ballot_sync(0xffffffffu, eligible)) { target = who; evicting = true; }
            }
            if (target >= 0) {
                const i64 ts = b * SLOTS + target;
                VEC_T* dst = values + ts * (i64)nvec;
                const VEC_T* src = vals + w * (i64)nvec;
                for (int v = lane; v < nvec; v += 32) dst[v] = src[v];
                if (lane == 0) {
                    meta[2 * ts] = key;
                    meta[2 * ts + 1] = (i64)insert_score;
                    versions[ts] = ver;
                    stamps[ts] = stamp;
                    digests[ts] = (unsigned char)d;
                    atomicAdd(sh + (evicting ? C_EVICT : C_EMPTY), 1u);
                }
            } else if (lane == 0) {
                atomicAdd(sh + C_DROP, 1u);
            }
        }
        unlock_bucket(locks, b, lane);
    }
    flush_counts(sh, counters);
}

// evict(keys): clear the slot of each resident key; counts distinct keys removed.
extern "C" __global__ void cache_remove(
    const i64* __restrict__ keys, i64 n, volatile unsigned char* digests, volatile i64* meta,
    volatile i64* versions, volatile int* stamps, int* locks, u64 nb, u64* counters)
{
    __shared__ unsigned sh[8];
    if (threadIdx.x < 8) sh[threadIdx.x] = 0;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const i64 w = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (w < n) {
        const i64 key = keys[w];
        u64 b; unsigned d;
        place(key, nb, &b, &d);
        lock_bucket(locks, b, lane);
        const i64 slot = b * SLOTS + lane;
        const bool match = digests[slot] == d && meta[2 * slot] == key;
        const unsigned bal = __ballot_sync(0xffffffffu, match);
        if (match) {
            digests[slot] = 0;
            meta[2 * slot + 1] = 0;
            versions[slot] = 0;
            stamps[slot] = 0;
        }
        if (bal && lane == 0) atomicAdd(sh + C_REMOVED, 1u);
        unlock_bucket(locks, b, lane);
    }
    flush_counts(sh, counters);
}
