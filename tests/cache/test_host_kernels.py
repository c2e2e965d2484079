"""The numpy backend's compiled kernels against the numpy definitions they must agree with."""

from __future__ import annotations

import mmap
import multiprocessing
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from streamhps.cache import host_kernels as hk
from streamhps.cache.base import hash_keys
from streamhps.cache.numpy_backend import NumpyCache
from streamhps.errors import CacheError


@pytest.mark.parametrize("n_buckets", [1, 7, 1 << 15, (1 << 31) + 3])
def test_kernel_hash_is_hash_keys(n_buckets: int) -> None:
    """A key the kernels place in another bucket than ``hash_keys`` (the GPU's and the
    reference's) would be found by one backend and not the other."""
    rng = np.random.default_rng(n_buckets)
    keys = np.concatenate(
        [
            rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 4096, dtype=np.int64),
            np.array([0, 1, -1, np.iinfo(np.int64).min, np.iinfo(np.int64).max], dtype=np.int64),
        ]
    )
    b = np.empty(keys.shape[0], dtype=np.int64)
    d = np.empty(keys.shape[0], dtype=np.uint8)
    hk.bucket_digest(keys, n_buckets, b, d)
    want_b, want_d = hash_keys(keys, n_buckets)
    np.testing.assert_array_equal(b, want_b)
    np.testing.assert_array_equal(d, want_d)
    assert (d != 0).all()


@pytest.mark.parametrize(
    "dim,dtype", [(3, "float32"), (5, "float16"), (64, "float16"), (6, "float16")]
)
def test_rows_of_every_word_width_round_trip(dim: int, dtype: str) -> None:
    """Rows are copied as the widest word dividing their bytes (12, 10, 128, 12 bytes here)."""
    c = NumpyCache(256, dim, dtype)
    keys = np.arange(-50, 50, dtype=np.int64) * 7919
    rows = np.random.default_rng(1).standard_normal((100, dim)).astype(dtype)
    c.upsert(keys, rows, np.ones(100, dtype=np.int64))
    got, hit = c.lookup(keys[::-1])
    assert hit.all()
    np.testing.assert_array_equal(got, rows[::-1])


def test_lookups_keep_their_pace_beside_a_busy_python_thread() -> None:
    """The kernels run without the GIL, so a lookup hands the interpreter over once or twice,
    not once per numpy step: beside a thread that never releases it (a pure-Python loop, with
    the interpreter's 5 ms switch interval), lookups keep more than 0.4 of their pace alone (0.6 measured). Before the
    kernels (about 30 numpy calls per lookup, each waiting up to 5 ms to get the GIL back) they
    fell to 0.04."""
    c = NumpyCache(1 << 16, 16)
    keys = np.arange(1 << 15, dtype=np.int64)
    c.upsert(keys, np.ones((keys.shape[0], 16), np.float32), np.ones(keys.shape[0], np.int64))
    big = np.tile(keys, 8)
    c.lookup(big)  # compiled and warm

    def lookups_in(seconds: float, beside: bool) -> int:
        done = threading.Event()
        spins = [0]

        def spin() -> None:
            while not done.is_set():
                spins[0] += 1

        th = threading.Thread(target=spin) if beside else None
        if th is not None:
            th.start()
        n, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            c.lookup(big)
            n += 1
        done.set()
        if th is not None:
            th.join()
            assert spins[0] > 0
        return n

    old = sys.getswitchinterval()
    sys.setswitchinterval(0.005)  # a worker test may have lowered it for this process
    try:
        alone = lookups_in(0.5, beside=False)
        beside = lookups_in(0.5, beside=True)
    finally:
        sys.setswitchinterval(old)
    assert alone >= 4, alone
    assert beside >= 0.4 * alone, (alone, beside)


KERNELS = (
    hk.find, hk.lookup, hk.write_resident, hk.insert_absent, hk.upsert_distinct, hk.lookup_gated,
    hk.upsert_batch_gated,
)  # fmt: skip


def test_no_compile_after_the_cache_is_built() -> None:
    """Every variant the cache calls is compiled at construction: the stream's first rows
    (read-only arrays decoded from Kafka bytes) and the first lookup compile nothing more
    (a compile there stalled the first apply by a second)."""
    c = NumpyCache(1 << 12, 32)
    before = [len(k.signatures) for k in KERNELS]
    rng = np.random.default_rng(3)
    keys = np.frombuffer(rng.permutation(4096).astype(np.int64).tobytes(), dtype=np.int64)
    rows = np.frombuffer(np.ones((4096, 32), np.float32).tobytes(), np.float32).reshape(4096, 32)
    vers = np.frombuffer(np.full(4096, 3, np.int64).tobytes(), dtype=np.int64)
    assert not keys.flags.writeable and not rows.flags.writeable
    c.upsert_async(keys, [rows[:1000], rows[1000:]], vers)
    c.upsert(np.sort(keys[:100]), rows[:100], vers[:100] + 1)
    c.update_if_present(keys[:10], np.ones((10, 32)), vers[:10] + 2)  # float64 rows, converted
    c.upsert(np.repeat(keys[:5], 2), rows[:10], np.arange(1, 11))  # repeated keys
    c.lookup(keys[:64])
    c.lookup_pooled(keys[:8], np.array([0, 4, 8]))
    c.get_versions(keys[:64])
    c.evict(keys[:3])
    assert [len(k.signatures) for k in KERNELS] == before


def _long_write(c: NumpyCache, pieces: int) -> tuple[np.ndarray, np.ndarray]:
    n = pieces * c.write_piece_rows
    keys = np.random.default_rng(5).permutation(n).astype(np.int64)
    return keys, np.ones((n, c.dim), np.float32)


def _beside_a_write(
    c: NumpyCache, keys: np.ndarray, rows: np.ndarray, pause: float
) -> tuple[float, list[float]]:
    """(seconds the write took, latencies of 1024-key lookups every ``pause`` s beside it)."""
    done: list[float] = []

    def write() -> None:
        c.upsert_async(keys, rows, np.ones(keys.shape[0], np.int64))
        done.append(time.perf_counter())

    th = threading.Thread(target=write)
    t0 = time.perf_counter()
    th.start()
    lat = []
    while not done:
        t = time.perf_counter()
        c.lookup(keys[:1024])
        lat.append(time.perf_counter() - t)
        if pause:
            time.sleep(pause)
    th.join()
    return done[0] - t0, lat


def test_a_lookup_gets_in_between_the_pieces_of_a_long_write() -> None:
    """A stream write of many pieces lets lookups in between them, and keeps its pace beside a
    reader in a tight loop. Python locks are not fair: the writer yields when a reader waits
    (without it, 3-6 lookups every 2 ms beside a 600-piece write, p90 60-70 ms), and readers let
    the writer back in (without that, one lookup in 20 waited ~60 ms, and a tight loop of
    lookups stretched a 200-piece write 10-40x). With the worker's GIL switch interval."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(0.0001)
    try:
        c = NumpyCache(1 << 20, 32)
        c.lookup(np.arange(8, dtype=np.int64))
        keys, rows = _long_write(c, 600)
        _, lat = _beside_a_write(c, keys, rows, 0.002)
        p90 = sorted(lat)[len(lat) * 9 // 10]
        assert len(lat) >= 10 and p90 < 0.01, (len(lat), p90)
        c.clear()
        keys, rows = _long_write(c, 200)
        t0 = time.perf_counter()
        c.upsert_async(keys, rows, np.ones(keys.shape[0], np.int64))
        alone = time.perf_counter() - t0
        c.clear()
        took, lat = _beside_a_write(c, keys, rows, 0.0)
        assert len(lat) >= 20, len(lat)
        assert took < 8 * alone, f"the write took {took:.3f} s beside a reader, {alone:.3f} s alone"
    finally:
        sys.setswitchinterval(old)


def test_a_stream_write_with_a_bad_row_changes_nothing() -> None:
    """The stream writer checks the whole batch before its first piece: a version of 0 in the
    last piece refuses the batch, and no earlier piece was written."""
    c = NumpyCache(1 << 14, 8)
    n = 3 * c.write_piece_rows
    keys = np.arange(n, dtype=np.int64)
    vers = np.ones(n, dtype=np.int64)
    vers[-1] = 0
    with pytest.raises(CacheError, match="versions must be > 0"):
        c.upsert_async(keys, [np.ones((n, 8), np.float32)], vers)
    assert len(c) == 0 and not c.lookup(keys)[1].any()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_stream_batch_reads_its_rows_from_every_message(dtype: str) -> None:
    """The batch writer reads rows straight from the decoded messages: pieces that lie in one
    message, span two or three (small messages, empty ones between them), the last short one.
    Same table as ``upsert`` of the rows stacked, also when the messages' dtype differs."""
    sizes = [3, 0, 2, 1, 5, 0, 9, 4, 0]
    n = sum(sizes)
    rng = np.random.default_rng(5)
    keys = rng.permutation(1000)[:n].astype(np.int64)
    rows = rng.standard_normal((n, 6)).astype(np.float64)  # converted to the cache's dtype
    parts = np.split(rows, np.cumsum(sizes)[:-1])
    vers = np.arange(1, n + 1, dtype=np.int64)
    a, b = NumpyCache(1 << 12, 6, dtype), NumpyCache(1 << 12, 6, dtype)
    b.write_piece_rows = 4
    a.upsert(keys, rows, vers)
    b.upsert_async(keys, parts, vers)
    np.testing.assert_array_equal(a.lookup(keys)[0], b.lookup(keys)[0])
    np.testing.assert_array_equal(a.get_versions(keys)[0], b.get_versions(keys)[0])
    assert len(b) == n and b.stats()["inserts"] == n


def test_the_cache_works_where_numba_cannot_cache_its_code() -> None:
    """A read-only install with no user cache directory leaves numba no place to cache compiled
    code; ``cache=True`` then raised at import and the numpy backend could not be imported.
    Simulated by allowing only numba's zip-file locator (it serves no plain file)."""
    code = (
        "import numpy as np\n"
        "from streamhps.cache.numpy_backend import NumpyCache\n"
        "from streamhps import compiled\n"
        "c = NumpyCache(64, 4)\n"
        "c.upsert(np.arange(3), np.ones((3, 4)), np.ones(3, np.int64))\n"
        "assert c.lookup(np.arange(4))[1].tolist() == [True, True, True, False]\n"
        "assert 'lookup' in compiled.uncached, compiled.uncached\n"
    )
    env = {**os.environ, "NUMBA_CACHE_LOCATOR_CLASSES": "numba.core.caching.ZipCacheLocator"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "NUMBA_CACHE_DIR" in r.stderr  # the operator is told what to do


def test_the_gate_serves_in_turn_and_counts_exactly() -> None:
    """Four threads through the gate 50 000 times each, a plain (non-atomic) increment inside:
    nothing lost, every ticket served, and the gate free afterwards (on 2 cores too: waiters
    yield their core instead of spinning against a descheduled holder)."""
    gate = np.zeros(hk.GATE_WORDS, dtype=np.int64)
    ctr = np.zeros(hk.COUNTERS, dtype=np.int64)
    keys = hk.ro(np.arange(4, dtype=np.int64))
    c = NumpyCache(1 << 10, 2)
    out = np.empty((4, 2), dtype=np.float32)
    hit = np.empty(4, dtype=bool)

    def work() -> None:
        for _ in range(50_000):
            hk.lookup_gated(
                keys, c.n_buckets, c._dig_words, c._ktab, c._words, c._score,
                hk.row_words(out.copy()), hit.copy(), False, gate, ctr,
            )  # fmt: skip

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert ctr[hk.CLOCK] == 200_000 and ctr[hk.LOOKED_UP] == 800_000
    assert gate[0] == gate[hk.GATE_SERVING] == 200_000
    assert hk.gate_try_enter(gate)


def test_the_gate_works_across_processes() -> None:
    """The gate and the counters in memory two processes share (what ingest in a process of
    its own needs: ``bench/ingest_apply.py --writer-process``): a forked process and this one
    through the gate 30 000 times each, a plain increment inside, nothing lost."""
    shared = np.frombuffer(mmap.mmap(-1, 8 * (hk.GATE_WORDS + hk.COUNTERS)), dtype=np.int64)
    gate, ctr = shared[: hk.GATE_WORDS], shared[hk.GATE_WORDS :]
    keys = hk.ro(np.arange(4, dtype=np.int64))
    c = NumpyCache(1 << 10, 2)

    def work() -> None:
        out, hit = np.empty((4, 2), dtype=np.float32), np.empty(4, dtype=bool)
        for _ in range(30_000):
            hk.lookup_gated(
                keys, c.n_buckets, c._dig_words, c._ktab, c._words, c._score,
                hk.row_words(out), hit, False, gate, ctr,
            )  # fmt: skip

    child = multiprocessing.get_context("fork").Process(target=work)
    child.start()
    work()
    child.join(60)
    assert child.exitcode == 0
    assert ctr[hk.CLOCK] == 60_000 and ctr[hk.LOOKED_UP] == 240_000
    assert gate[0] == gate[hk.GATE_SERVING] == 60_000


def test_an_operation_under_the_lock_holds_off_gated_lookups_and_writes() -> None:
    """Lookups and stream writes enter the gate inside their compiled call; every other
    operation holds it through ``_lock`` for its whole length: neither runs beside it."""
    c = NumpyCache(1 << 12, 4)
    keys = np.arange(100, dtype=np.int64)
    c.upsert(keys, np.ones((100, 4), np.float32), np.ones(100, np.int64))
    done: list[str] = []

    def lookup() -> None:
        c.lookup(keys)
        done.append("lookup")

    def write() -> None:
        c.upsert_async(keys, np.full((100, 4), 2, np.float32), np.full(100, 2, np.int64))
        done.append("write")

    with c._lock, c._lock:  # re-entrant, as the base class's lock
        threads = [threading.Thread(target=f) for f in (lookup, write)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        assert done == []
    for t in threads:
        t.join(10)
    assert sorted(done) == ["lookup", "write"]
    v, hit = c.get_versions(keys)
    assert hit.all() and (v == 2).all()
    assert c.stats()["hits"] >= 100 and len(c) == 100


def test_a_table_in_shared_memory_is_one_table_for_two_processes() -> None:
    """``NumpyCache(memory=...)``: a process that attaches to the memory sees the rows the
    first one wrote, and rows it writes are looked up by the first (a worker's ingest process
    and its serving process, streamhps.worker.ingest_process); a fresh table zeroes it."""
    nbytes = NumpyCache.table_bytes(1 << 12, 8, "float16")
    memory = mmap.mmap(-1, nbytes)
    np.frombuffer(memory, dtype=np.uint8)[:] = 0xAB  # garbage a fresh table must clear
    here = NumpyCache(1 << 12, 8, "float16", memory=memory)
    assert here.stats()["size"] == 0 and not here.lookup(np.arange(10, dtype=np.int64))[1].any()
    keys = np.arange(1000, dtype=np.int64) * 7
    here.upsert(keys, np.full((1000, 8), 1, np.float16), np.ones(1000, np.int64))

    def other() -> None:
        there = NumpyCache(1 << 12, 8, "float16", memory=memory, attach=True)
        rows, hit = there.lookup(keys)
        assert hit.all() and (rows == 1).all()
        there.upsert_async(keys[:500], np.full((500, 8), 2, np.float16), np.full(500, 2))
        os._exit(0)

    child = multiprocessing.get_context("fork").Process(target=other)
    child.start()
    child.join(60)
    assert child.exitcode == 0
    rows, hit = here.lookup(keys)
    assert hit.all() and (rows[:500] == 2).all() and (rows[500:] == 1).all()
    versions, _ = here.get_versions(keys)
    assert (versions[:500] == 2).all() and (versions[500:] == 1).all()
    # the operation clock is one for both: lookups there advanced it here
    assert here._clock >= 4


def test_memory_too_small_or_read_only_is_refused() -> None:
    need = NumpyCache.table_bytes(1 << 10, 4)
    with pytest.raises(CacheError, match=f"needs {need}"):
        NumpyCache(1 << 10, 4, memory=bytearray(need - 1))
    with pytest.raises(CacheError, match="writable"):
        NumpyCache(1 << 10, 4, memory=bytes(need))
