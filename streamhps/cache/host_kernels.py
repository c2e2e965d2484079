"""The ``numpy`` backend's kernels: the set-associative table's probe, lookup and write loops,
compiled by numba and run without the GIL.

The host's counterpart of ``kernels.cu``: one pass over the keys of a call, a probe per key
(its bucket's 32 one-byte digests, then the key where a digest matches), rows copied as
machine words. Written as loops, not as whole-array numpy steps, for two reasons the worker
sees: a loop reads each bucket once instead of gathering ``[n, 32]`` copies per step (a write
of 4 096 rows was ~50 numpy calls), and a compiled call releases the GIL for its whole
duration, so the ingest thread writing rows and the request threads reading them do not queue
for the interpreter between steps (every numpy call of the old path handed the GIL over).

Every function takes validated, contiguous arrays: keys and stored keys as ``int64``, the
digests as ``[buckets, 32]`` bytes (``dig``, written) and as ``[buckets, 4]`` uint64 words
(``dw``, the same memory, probed eight ways at a time), rows as ``[rows, words]`` views of the value table (``uint64`` words where the row's bytes allow,
see :func:`row_words`). The hash is ``base.hash_keys``'s splitmix64; ``tests/cache`` checks
both give the same bucket and digest. Input arrays are passed read-only (:func:`ro`: rows
decoded from Kafka are read-only, and numba compiles a function once per such flag), so every
kernel has one variant per row word; :func:`warm` compiles them, or loads them from numba's
cache (next to this file, or numba's user cache directory when that is read-only), when a
cache is built: not on the stream's first rows or a request's first lookup.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from streamhps.compiled import kernel as _kernel

SLOTS = 32  # base.SLOTS_PER_BUCKET (the kernels' loops need it as a literal)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_LOW32 = np.uint64(0xFFFFFFFF)
_S27, _S30, _S31, _S32, _S56 = (np.uint64(s) for s in (27, 30, 31, 32, 56))
_ONE = np.uint64(1)
_BYTE = np.uint64(0xFF)
_BYTES_ONES = np.uint64(0x0101010101010101)
_BYTES_HIGH = np.uint64(0x8080808080808080)


def row_words(table: np.ndarray) -> np.ndarray:
    """``table`` (``[rows, dim]``, C-contiguous) as ``[rows, words]`` of the widest unsigned
    integer that divides a row's bytes: the kernels copy rows as these words."""
    nbytes = table.shape[1] * table.dtype.itemsize
    word = next(
        w for w in (np.uint64, np.uint32, np.uint16, np.uint8) if nbytes % w().itemsize == 0
    )
    return table.view(word)


def ro(a: np.ndarray) -> np.ndarray:
    """A read-only view of ``a`` (no copy): how every input array reaches the kernels."""
    v = a.view()
    v.flags.writeable = False
    return v


_warmed: set[np.dtype] = set()
_warm_lock = threading.Lock()


def warm(word: np.dtype) -> None:
    """Compile or load every kernel for rows of ``word`` (see :func:`row_words`), once per
    process: a one-bucket table, one key through each."""
    with _warm_lock:
        if word in _warmed:
            return
        dig = np.zeros((1, SLOTS), dtype=np.uint8)
        ktab = np.full((1, SLOTS), np.iinfo(np.int64).min, dtype=np.int64)
        ver = np.zeros(SLOTS, dtype=np.int64)
        score = np.zeros(SLOTS, dtype=np.uint64)
        stamp = np.zeros(SLOTS, dtype=np.uint32)
        vals = np.zeros((SLOTS, 1), dtype=word)
        keys, versions = ro(np.array([7], dtype=np.int64)), ro(np.array([2], dtype=np.int64))
        src = ro(np.arange(1))
        rows = ro(np.ones((1, 1), dtype=word))
        miss = np.empty(1, dtype=np.int64)
        dw = dig.view(np.uint64)
        now = np.uint32(1)
        write_resident(keys, versions, src, rows, 1, dw, ktab, ver, stamp, vals, now, miss)
        insert_absent(
            ro(miss), keys, versions, src, rows, 1, dig, dw, ktab, ver, score, stamp, vals, now,
            np.uint64(1),
        )  # fmt: skip
        for insert in (True, False):
            upsert_distinct(
                keys, versions, rows, src, 1, dig, dw, ktab, ver, score, stamp, vals, now,
                np.uint64(1), insert,
            )  # fmt: skip
        slot = np.empty(1, dtype=np.int64)
        find(keys, 1, dw, ktab, slot)
        out = np.empty((1, 1), dtype=word)
        hit = np.empty(1, dtype=np.bool_)
        lookup(keys, 1, dw, ktab, vals, score, out, hit, 2, False)
        assert hit[0] and slot[0] >= 0, "host_kernels.warm: the one-key table lost its key"
        gate, ctr = np.zeros(GATE_WORDS, dtype=np.int64), np.zeros(COUNTERS, dtype=np.int64)
        lookup_gated(keys, 1, dw, ktab, vals, score, out, hit, False, gate, ctr)
        counts = np.zeros(5, dtype=np.int64)
        addresses = ro(np.array([rows.__array_interface__["data"][0]], dtype=np.int64))
        for insert in (True, False):
            upsert_batch_gated(
                keys, versions, src, addresses, ro(np.ones(1, dtype=np.int64)), 1, 1, dig, dw,
                ktab, ver, score, stamp, vals, insert, False, gate, ctr, counts,
            )  # fmt: skip
        assert gate_try_enter(gate), "host_kernels.warm: the gate was left taken"
        gate_leave(gate)
        _warmed.add(word)


@njit(inline="always")
def _bucket_digest(key: np.int64, n_buckets: np.uint64) -> tuple[np.int64, np.uint8]:
    h = np.uint64(key)
    h ^= h >> _S30
    h *= _C1
    h ^= h >> _S27
    h *= _C2
    h ^= h >> _S31
    b = np.int64(((h & _LOW32) * n_buckets) >> _S32)
    d = np.uint8(h >> _S56)
    if d == 0:
        d = np.uint8(1)
    return b, d


@njit(inline="always")
def _first_way(dw: np.ndarray, b: np.int64, d: np.uint8, key: np.int64, ktab: np.ndarray) -> int:
    """The way of bucket ``b`` whose digest is ``d`` and whose key is ``key``; -1 if none.
    ``dw`` is the digest table as ``[buckets, 4]`` uint64 words: eight ways are compared at
    once (a zero byte of the word xor ``d`` in every byte; the test may also flag a byte above
    a zero one, which the key comparison then rejects), the key only where a digest matched."""
    pattern = np.uint64(d) * _BYTES_ONES
    for w in range(SLOTS // 8):
        x = dw[b, w] ^ pattern
        if (x - _BYTES_ONES) & ~x & _BYTES_HIGH:  # some byte of x is zero: a digest matched
            for j in range(w * 8, w * 8 + 8):
                if ((x >> np.uint64((j - w * 8) * 8)) & _BYTE) == 0 and ktab[b, j] == key:
                    return j
    return -1


@njit(inline="always")
def _empty_way(dw: np.ndarray, b: np.int64) -> int:
    """The first way of bucket ``b`` with digest 0 (empty), -1 if the bucket is full."""
    for w in range(SLOTS // 8):
        x = dw[b, w]
        if (x - _BYTES_ONES) & ~x & _BYTES_HIGH:
            for j in range(8):
                if ((x >> np.uint64(j * 8)) & _BYTE) == 0:
                    return w * 8 + j
    return -1


@njit(inline="always")
def _slot_of(key: np.int64, b: np.int64, d: np.uint8, dw: np.ndarray, ktab: np.ndarray) -> np.int64:
    j = _first_way(dw, b, d, key, ktab)
    return np.int64(-1) if j < 0 else np.int64(b * SLOTS + j)


@_kernel
def bucket_digest(keys, n_buckets, bucket, digest):
    """``base.hash_keys`` as the kernels compute it (for the tests that compare the two)."""
    nb = np.uint64(n_buckets)
    for i in range(keys.shape[0]):
        bucket[i], digest[i] = _bucket_digest(keys[i], nb)


@_kernel
def find(keys, n_buckets, dw, ktab, slot):
    """``slot[i]`` = the slot holding ``keys[i]`` (bucket * 32 + way), -1 where absent."""
    nb = np.uint64(n_buckets)
    for i in range(keys.shape[0]):
        b, d = _bucket_digest(keys[i], nb)
        slot[i] = _slot_of(keys[i], b, d, dw, ktab)


@_kernel
def lookup(keys, n_buckets, dw, ktab, vals, score, out, hit, clock, lfu):
    """Rows of ``keys`` into ``out`` (zeros where absent), ``hit`` per key; hits refresh their
    score (lru: the clock; lfu: count + 1 once per call, then the clock). Returns the hits."""
    nb = np.uint64(n_buckets)
    c = np.uint64(clock)
    c32 = c & _LOW32
    words = vals.shape[1]
    n = keys.shape[0]
    # Probe every key first, then copy: the rows' loads are independent of each other, so the
    # copy loop keeps many in flight (one loop doing both waited for each probe's misses).
    slots = np.empty(n, dtype=np.int64)
    for i in range(n):
        b, d = _bucket_digest(keys[i], nb)
        slots[i] = _slot_of(keys[i], b, d, dw, ktab)
    hits = 0
    for i in range(n):
        s = slots[i]
        if s < 0:
            hit[i] = False
            for w in range(words):
                out[i, w] = 0
            continue
        hit[i] = True
        hits += 1
        for w in range(words):
            out[i, w] = vals[s, w]
        if lfu:
            old = score[s]
            if (old & _LOW32) != c32:  # once per lookup call, however often the key repeats
                count = min((old >> _S32) + _ONE, _LOW32)
                score[s] = (count << _S32) | c32
        else:
            score[s] = c
    return hits


@_kernel
def write_resident(keys, versions, src, values, n_buckets, dw, ktab, ver, stamp, vals, now, miss):  # noqa: E501
    """The first pass of an upsert (``keys`` distinct): a resident key whose version is newer
    takes row ``values[src[i]]`` and the call's stamp ``now`` (so this call never evicts it).
    The positions of absent keys go to ``miss`` in input order. Returns (updates, absent)."""
    nb = np.uint64(n_buckets)
    words = vals.shape[1]
    updates = 0
    absent = 0
    for i in range(keys.shape[0]):
        b, d = _bucket_digest(keys[i], nb)
        s = _slot_of(keys[i], b, d, dw, ktab)
        if s < 0:
            miss[absent] = i
            absent += 1
        elif versions[i] > ver[s]:
            ver[s] = versions[i]
            stamp[s] = now
            r = src[i]
            for w in range(words):
                vals[s, w] = values[r, w]
            updates += 1
    return updates, absent


@_kernel
def insert_absent(
    order, keys, versions, src, values, n_buckets, dig, dw, ktab, ver, score, stamp, vals, now,
    new_score,
):  # fmt: skip
    """The second pass: insert ``keys[order]`` (absent, in key order) into the first empty way
    of their bucket, else over the way with the lowest ``(score, key)`` not stamped ``now``;
    a key that finds neither is dropped. Returns (inserted into empty ways, evictions, dropped).
    """
    nb = np.uint64(n_buckets)
    words = vals.shape[1]
    empty = 0
    evicted = 0
    dropped = 0
    for o in range(order.shape[0]):
        i = order[o]
        b, d = _bucket_digest(keys[i], nb)
        way = _empty_way(dw, b)
        if way >= 0:
            empty += 1
        else:
            base = b * SLOTS
            for j in range(SLOTS):
                if stamp[base + j] == now:
                    continue
                if (
                    way < 0
                    or score[base + j] < score[base + way]
                    or (score[base + j] == score[base + way] and ktab[b, j] < ktab[b, way])
                ):
                    way = j
            if way < 0:
                dropped += 1
                continue
            evicted += 1
        s = b * SLOTS + way
        ktab[b, way] = keys[i]
        dig[b, way] = d
        ver[s] = versions[i]
        score[s] = new_score
        stamp[s] = now
        r = src[i]
        for w in range(words):
            vals[s, w] = values[r, w]
    return empty, evicted, dropped


@_kernel
def upsert_distinct(
    keys, versions, values, by_key, n_buckets, dig, dw, ktab, ver, score, stamp, vals, now,
    new_score, insert,
):  # fmt: skip
    """Both passes for distinct ``keys`` (the stream writer's pieces), the absent keys inserted
    in key order (``by_key``: the positions of ``keys`` in key order, numpy's argsort, several
    times faster than numba's): one call per piece. Returns (updates, absent, inserted into
    empty ways, evictions, dropped)."""
    n = keys.shape[0]
    src = np.arange(n)
    miss = np.empty(n, dtype=np.int64)
    updates, absent = write_resident(
        keys, versions, src, values, n_buckets, dw, ktab, ver, stamp, vals, now, miss
    )
    empty, evicted, dropped = 0, 0, 0
    if insert and absent:
        is_absent = np.zeros(n, dtype=np.bool_)
        for j in range(absent):
            is_absent[miss[j]] = True
        order = np.empty(absent, dtype=np.int64)
        j = 0
        for o in range(n):
            if is_absent[by_key[o]]:
                order[j] = by_key[o]
                j += 1
        empty, evicted, dropped = insert_absent(
            order, keys, versions, src, values, n_buckets, dig, dw, ktab, ver, score, stamp,
            vals, now, new_score,
        )  # fmt: skip
    return updates, absent, empty, evicted, dropped


# ---------------------------------------------------------------------- the gate
#
# The cache's lock for the two hot operations, taken and released inside compiled code: a
# stream writer's piece and a lookup enter it and leave it without the GIL. With a Python lock
# around a compiled call, the holder came back from the call and waited for the GIL before it
# could release the lock, and every waiting reader waited with it (bench/staleness.py
# --lookup-breakdown on the H200: lookups waited 1.2-2.0 ms p99 for a 1 024-row piece that
# takes ~0.5 ms). A ticket lock: first come, first served, so a writer between two pieces goes
# behind the readers that came meanwhile, and readers in a loop cannot starve it. A waiter spins
# briefly, then yields its core each turn (a pure spin never finished on 2 cores: the next
# ticket's owner was descheduled while the others spun).

#: int64 words of a gate: [0] the next ticket, [GATE_SERVING] the ticket served (another
#: cache line)
GATE_WORDS, GATE_SERVING = 16, 8
#: int64 counters the gated kernels keep: the operation clock, lookup positions, hits
COUNTERS, CLOCK, LOOKED_UP, HITS = 4, 0, 1, 2
_SPINS = 256  # busy turns before a waiter starts yielding its core


def _item_ptr(context: Any, builder: Any, arrty: Any, arr: Any, idx: Any) -> Any:
    ary = context.make_array(arrty)(context, builder, arr)
    return cgutils.get_item_pointer(context, builder, arrty, ary, [idx])


def _fetch_add_typing(typingctx: Any, arr: Any, idx: Any, val: Any) -> Any:
    sig = types.int64(arr, types.intp, types.int64)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        ptr = _item_ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")

    return sig, codegen


_fetch_add: Any = intrinsic(_fetch_add_typing)  # typed for the compiled callers only


def _load_acquire_typing(typingctx: Any, arr: Any, idx: Any) -> Any:
    sig = types.int64(arr, types.intp)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        ptr = _item_ptr(context, builder, sig.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "acquire", 8)

    return sig, codegen


_load_acquire: Any = intrinsic(_load_acquire_typing)  # typed for the compiled callers only


def _store_release_typing(typingctx: Any, arr: Any, idx: Any, val: Any) -> Any:
    sig = types.void(arr, types.intp, types.int64)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        ptr = _item_ptr(context, builder, sig.args[0], args[0], args[1])
        builder.store_atomic(args[2], ptr, "release", 8)
        return context.get_dummy_value()

    return sig, codegen


_store_release: Any = intrinsic(_store_release_typing)  # typed for the compiled callers only


def _compare_exchange_typing(typingctx: Any, arr: Any, idx: Any, expected: Any, new: Any) -> Any:
    sig = types.boolean(arr, types.intp, types.int64, types.int64)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        ptr = _item_ptr(context, builder, sig.args[0], args[0], args[1])
        res = builder.cmpxchg(ptr, args[2], args[3], "seq_cst", "seq_cst")
        return builder.extract_value(res, 1)

    return sig, codegen


_compare_exchange: Any = intrinsic(_compare_exchange_typing)  # typed for the compiled callers only


def _yield_core_typing(typingctx: Any) -> Any:
    sig = types.int32()

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        fnty = ir.FunctionType(ir.IntType(32), [])
        return builder.call(cgutils.get_or_insert_function(builder.module, fnty, "sched_yield"), [])

    return sig, codegen


_yield_core: Any = intrinsic(_yield_core_typing)  # typed for the compiled callers only


def _pointer_like_typing(typingctx: Any, address: Any, like: Any) -> Any:
    sig = types.CPointer(like.dtype)(types.int64, like)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return sig, codegen


#: ``address`` (an int) as a pointer to elements of ``like``'s type, for ``carray``
_pointer_like: Any = intrinsic(_pointer_like_typing)  # typed for the compiled callers only


@_kernel
def gate_enter(gate):
    """Take a ticket and wait for it to be served."""
    ticket = _fetch_add(gate, 0, 1)
    spins = 0
    while _load_acquire(gate, GATE_SERVING) != ticket:
        spins += 1
        if spins > _SPINS:
            _yield_core()


@_kernel
def gate_try_enter(gate):
    """Enter only if nobody holds or waits for the gate; True when entered."""
    serving = _load_acquire(gate, GATE_SERVING)
    return _compare_exchange(gate, 0, serving, serving + 1)


@_kernel
def gate_leave(gate):
    """Serve the next ticket (only the holder calls this)."""
    _store_release(gate, GATE_SERVING, _load_acquire(gate, GATE_SERVING) + 1)


@_kernel
def lookup_gated(keys, n_buckets, dw, ktab, vals, score, out, hit, lfu, gate, ctr):
    """:func:`lookup` inside the gate, the clock and the lookup counters (``ctr``) kept there
    too. Returns the hits."""
    n = keys.shape[0]
    gate_enter(gate)
    clock = ctr[CLOCK] + 1
    ctr[CLOCK] = clock
    ctr[LOOKED_UP] += n
    hits = lookup(keys, n_buckets, dw, ktab, vals, score, out, hit, clock, lfu)
    ctr[HITS] += hits
    gate_leave(gate)
    return hits


@_kernel
def upsert_distinct_gated(
    keys, versions, values, by_key, n_buckets, dig, dw, ktab, ver, score, stamp, vals, insert,
    lfu, gate, ctr,
):  # fmt: skip
    """:func:`upsert_distinct` inside the gate, with the next clock (the insert score from it:
    lru the clock, lfu one use then the clock). Returns what it returns."""
    gate_enter(gate)
    clock = ctr[CLOCK] + 1
    ctr[CLOCK] = clock
    c = np.uint64(clock)
    now = np.uint32(c & _LOW32)
    new_score = ((_ONE << _S32) | (c & _LOW32)) if lfu else c
    r = upsert_distinct(
        keys, versions, values, by_key, n_buckets, dig, dw, ktab, ver, score, stamp, vals, now,
        new_score, insert,
    )  # fmt: skip
    gate_leave(gate)
    return r


@_kernel
def upsert_batch_gated(
    keys, versions, by_key, addresses, ends, piece, n_buckets, dig, dw, ktab, ver, score, stamp,
    vals, insert, lfu, gate, ctr, counts,
):  # fmt: skip
    """:func:`upsert_distinct_gated` for each piece of ``piece`` rows of a batch (``keys``
    distinct), all in one call: the GIL is released once for the batch, not once per piece,
    and the gate is entered and left per piece, so a lookup waits for one piece at most.

    The batch's rows lie in several arrays (the decoded messages, never stacked on the host):
    array ``j`` holds rows ``ends[j - 1]:ends[j]`` (from 0 for the first), C-contiguous
    ``[rows, words]`` of ``vals``' word type at address ``addresses[j]``; the caller keeps
    them alive for the call. A piece that spans two arrays is copied into one first.
    ``by_key[lo:hi]``: the positions of the piece ``keys[lo:hi]`` in key order, relative to
    ``lo``. Adds (updates, absent, inserted into empty ways, evictions, dropped) to ``counts``.
    """
    n = keys.shape[0]
    words = vals.shape[1]
    joined = np.empty((min(piece, n), words), dtype=vals.dtype)
    j = 0  # the array holding row lo
    for lo in range(0, n, piece):
        hi = min(lo + piece, n)
        while ends[j] <= lo:
            j += 1
        start = ends[j - 1] if j > 0 else 0
        if hi <= ends[j]:
            held = carray(_pointer_like(addresses[j], vals), (ends[j] - start, words))
            rows = held[lo - start : hi - start]
        else:
            at, a, a_start = lo, j, start
            while at < hi:
                e = min(ends[a], hi)
                held = carray(_pointer_like(addresses[a], vals), (ends[a] - a_start, words))
                joined[at - lo : e - lo] = held[at - a_start : e - a_start]
                at, a_start, a = e, ends[a], a + 1
            rows = joined[: hi - lo]
        updates, absent, empty, evicted, dropped = upsert_distinct_gated(
            keys[lo:hi], versions[lo:hi], rows, by_key[lo:hi], n_buckets, dig, dw, ktab, ver,
            score, stamp, vals, insert, lfu, gate, ctr,
        )  # fmt: skip
        counts[0] += updates
        counts[1] += absent
        counts[2] += empty
        counts[3] += evicted
        counts[4] += dropped
