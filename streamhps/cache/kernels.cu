// CUDA kernels of the streamhps embedding cache (compiled at run time by CuPy/NVRTC).
//
// Layout: n_buckets buckets of SLOTS (32) slots. Per slot: a digest byte (0 = empty, else the
// top byte of the key's hash), meta[2*slot] = key and meta[2*slot+1] = eviction score (kept
// side by side so the key check and the score update touch one 32-byte sector), a version,
// and the low 32 bits of the clock of the call that last wrote it (stamp).
//
// Build macros: VEC_T (uint4 / uint2 / unsigned int / unsigned short: the widest type that
// divides a row), NVEC (VEC_T per row), KPW (keys per warp in cache_lookup: 4, 8 or 16).
//
// Ordering: all kernels of a cache run on one stream, so a lookup never overlaps a write.
// Writers (apply / insert / remove) serialise per bucket with a spin lock, so duplicate keys
// and competing inserts inside one launch are safe; their loads of the table are volatile.

typedef unsigned long long u64;
typedef long long i64;

#ifndef VEC_T
#define VEC_T uint4
#endif
#ifndef NVEC
#define NVEC 32
#endif
#ifndef KPW
#define KPW 8
#endif
#define SLOTS 32
typedef VEC_T vec_t;

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

// Fused probe + gather, KPW keys per warp so that each lane keeps several independent loads in
// flight: 8 lanes probe one key (each tests one 32-bit word of digests = 4 slots), the finding
// lane refreshes the score, then the warp copies the KPW rows with VEC_T loads (all loads of a
// lane issued before its stores; misses write zeros).
extern "C" __global__ void cache_lookup(
    const i64* __restrict__ keys, i64 n,
    const unsigned* __restrict__ digest_words, i64* meta,
    const VEC_T* __restrict__ values, VEC_T* __restrict__ out, bool* __restrict__ hit,
    u64 nb, int nvec_unused, u64 clock, int lfu, u64* counters)
{
    const int lane = threadIdx.x & 31;
    const int sub = lane >> 3, wl = lane & 7;
    const i64 base = (((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5) * KPW;
    constexpr int R = KPW / 4;
    i64 found[R];
    unsigned m[R];
    u64 b[R];
    i64 key[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const i64 idx = base + sub + 4 * r;
        found[r] = -1;
        m[r] = 0;
        if (idx < n) {
            key[r] = keys[idx];
            unsigned d;
            place(key[r], nb, &b[r], &d);
            m[r] = __vcmpeq4(digest_words[b[r] * (SLOTS / 4) + wl], d * 0x01010101u);
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        unsigned mm = m[r];
        while (mm) {
            const int byte = (__ffs(mm) - 1) >> 3;
            mm &= ~(0xffu << (byte * 8));
            const i64 slot = (i64)b[r] * SLOTS + wl * 4 + byte;
            i64* mp = meta + 2 * slot;
            if (mp[0] == key[r]) {
                found[r] = slot;
                const u64 sc = (u64)mp[1];
                const u64 ns = touched_score(sc, clock, lfu);
                if (ns != sc) mp[1] = (i64)ns;
                break;
            }
        }
    }
    // lane L < KPW takes the slot of key base + L (sub L & 3, round L >> 2)
    i64 myslot = -1;
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const unsigned bal = __ballot_sync(0xffffffffu, found[r] >= 0);
        const int s = lane & 3;
        const unsigned part = (bal >> (8 * s)) & 0xffu;
        const int src = part ? 8 * s + __ffs(part) - 1 : 0;
        const i64 v = __shfl_sync(0xffffffffu, found[r], src);
        if ((lane >> 2) == r && part) myslot = v;
    }
    // copy KPW rows: vector t of the warp's KPW * NVEC belongs to row t / NVEC
    constexpr int T = KPW * NVEC;
    constexpr int J = (T + 31) / 32;
    VEC_T reg[J];
    i64 rowslot[J];
#pragma unroll
    for (int j = 0; j < J; ++j) {
        const int t = lane + 32 * j;
        const int row = (t < T) ? t / NVEC : 0;
        rowslot[j] = __shfl_sync(0xffffffffu, myslot, row);
    }
#pragma unroll
    for (int j = 0; j < J; ++j) {
        const int t = lane + 32 * j;
        reg[j] = vec_t{};
        if (t < T && rowslot[j] >= 0) reg[j] = values[rowslot[j] * NVEC + (t % NVEC)];
    }
#pragma unroll
    for (int j = 0; j < J; ++j) {
        const int t = lane + 32 * j;
        const i64 q = base + t / NVEC;
        if (t < T && q < n) __stcs(out + q * NVEC + (t % NVEC), reg[j]);
    }
    const bool mine = lane < KPW && base + lane < n;
    if (mine) hit[base + lane] = myslot >= 0;
    const int block_hits = __syncthreads_count(mine && myslot >= 0);
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
        // no fence after: the table is read with volatile (L2) loads, and the holder before
        // fenced its writes before releasing
        while (atomicCAS(locks + b, 0, 1) != 0) __nanosleep(32);
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

// Rows of the input are loaded into registers before the bucket lock is taken, so the locked
// section holds no load of row data.
constexpr int JR = (NVEC + 31) / 32;

__device__ __forceinline__ void load_row(const VEC_T* src, vec_t* reg, int lane) {
#pragma unroll
    for (int j = 0; j < JR; ++j) {
        const int v = lane + 32 * j;
        if (v < NVEC) reg[j] = src[v];
    }
}

__device__ __forceinline__ void store_row(VEC_T* dst, const vec_t* reg, int lane) {
#pragma unroll
    for (int j = 0; j < JR; ++j) {
        const int v = lane + 32 * j;
        if (v < NVEC) dst[v] = reg[j];
    }
}

// Write one row into a resident slot if its version is newer; the warp holds the bucket lock.
// Counts an update only the first time this call writes the slot (duplicates count once).
__device__ __forceinline__ void apply_row(
    i64 slot, i64 ver, const vec_t* reg, VEC_T* values, volatile i64* versions,
    volatile int* stamps, int stamp, int lane, unsigned* sh)
{
    if (ver > versions[slot]) {
        store_row(values + slot * (i64)NVEC, reg, lane);
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
        const i64 ver = vers[w];
        vec_t reg[JR];
        load_row(vals + w * (i64)NVEC, reg, lane);
        lock_bucket(locks, b, lane);
        const i64 slot = b * SLOTS + lane;
        const bool match = digests[slot] == d && meta[2 * slot] == key;
        const unsigned bal = __ballot_sync(0xffffffffu, match);
        if (bal) {
            apply_row(b * SLOTS + __ffs(bal) - 1, ver, reg, values, versions, stamps, stamp,
                      lane, sh);
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
        vec_t reg[JR];
        load_row(vals + w * (i64)NVEC, reg, lane);
        lock_bucket(locks, b, lane);
        const i64 slot = b * SLOTS + lane;
        const unsigned dg = digests[slot];
        const i64 k = meta[2 * slot];
        const unsigned bal = __ballot_sync(0xffffffffu, dg == d && k == key);
        if (bal) {  // a duplicate of this key was inserted earlier in this call
            apply_row(b * SLOTS + __ffs(bal) - 1, ver, reg, values, versions, stamps, stamp,
                      lane, sh);
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
                store_row(values + ts * (i64)NVEC, reg, lane);
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
