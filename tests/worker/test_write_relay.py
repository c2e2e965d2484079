"""The cache-write relay (streamhps.worker.write_relay) on its own: a writer thread standing in
for the ingest process, the applier writing a real numpy cache, a real socket pair and memory
between them. The whole worker over the relay runs in test_worker_integration.py (``relay``) and,
with the cuda cache, in test_worker_gpu.py."""

from __future__ import annotations

import socket
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pytest

from streamhps.cache import make_cache
from streamhps.errors import CacheError, StreamHPSError
from streamhps.worker.write_relay import RelayApplier, WriteRelay, relay_bytes

DIM = 8


def _pair(caches: dict[str, Any], slot_bytes: int) -> tuple[WriteRelay, RelayApplier]:
    here, there = socket.socketpair()
    memory = np.zeros(2 * slot_bytes, dtype=np.uint8)
    applier = RelayApplier(Connection(here.detach()), memory, caches).start()
    return WriteRelay(Connection(there.detach()), memory), applier


def _facts(cache: Any) -> dict[str, Any]:
    return {"capacity": cache.capacity, "dim": cache.dim, "dtype": cache.dtype.name,
            "policy": cache.policy, "resolves_duplicates": cache.resolves_duplicates}  # fmt: skip


def test_a_write_larger_than_a_slot_lands_whole_and_in_order() -> None:
    cache = make_cache("numpy", capacity=1 << 14, dim=DIM)
    relay, applier = _pair({"t": cache}, slot_bytes=48 * 100)  # 100 rows of 48 bytes a slot
    remote = relay.cache("t", _facts(cache))
    keys = np.arange(1000, dtype=np.int64)
    rows = np.repeat(np.arange(1000, dtype=np.float32)[:, None], DIM, axis=1)
    # the rows given as two arrays, cut into slots across their boundary
    remote.upsert_async(keys, [rows[:333], rows[333:]], np.full(1000, 2, np.int64))
    # returned: every piece applied on the other side
    got, hit = cache.lookup(keys)
    assert hit.all() and applier.stats()["writes"] == 10 and applier.stats()["rows"] == 1000
    np.testing.assert_array_equal(got, rows)
    # an older version relayed later changes nothing (the cache's version rule, across the relay)
    remote.upsert_async(keys[:10], np.zeros((10, DIM), np.float32), np.ones(10, np.int64))
    np.testing.assert_array_equal(cache.lookup(keys[:10])[0], rows[:10])
    assert remote.relayed_rows == 1010


def test_bad_input_is_refused_before_it_is_relayed() -> None:
    cache = make_cache("numpy", capacity=1024, dim=DIM)
    relay, applier = _pair({"t": cache}, slot_bytes=4096)
    remote = relay.cache("t", _facts(cache))
    k = np.arange(3, dtype=np.int64)
    with pytest.raises(CacheError, match="versions must be > 0"):
        remote.upsert_async(k, np.ones((3, DIM), np.float32), np.array([1, 0, 1]))
    with pytest.raises(CacheError, match=r"values must have shape \(3, 8\)"):
        remote.upsert_async(k, np.ones((3, 4), np.float32), np.ones(3, np.int64))
    with pytest.raises(CacheError, match="lives in the serving process"):
        len(remote)
    assert applier.stats()["writes"] == 0 and len(cache) == 0


class _Refusing:
    """A cache whose writes fail on the serving side (a GPU out of memory, say)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.dim, self.dtype = inner, inner.dim, inner.dtype
        self.refuse = True

    def upsert_async(self, *args: Any, **kw: Any) -> None:
        if self.refuse:
            raise CacheError("out of memory on the serving side")
        self.inner.upsert_async(*args, **kw)


def test_a_write_that_fails_on_the_serving_side_is_raised_in_the_writer() -> None:
    inner = make_cache("numpy", capacity=1024, dim=DIM)
    refusing = _Refusing(inner)
    relay, applier = _pair({"t": refusing}, slot_bytes=48 * 10)
    remote = relay.cache("t", _facts(inner))
    k = np.arange(25, dtype=np.int64)  # three pieces: the error ends the write
    with pytest.raises(CacheError, match="out of memory on the serving side"):
        remote.upsert_async(k, np.ones((25, DIM), np.float32), np.ones(25, np.int64))
    refusing.refuse = False  # the relay itself is still in step: the next write lands
    remote.upsert_async(k, np.ones((25, DIM), np.float32), np.ones(25, np.int64))
    assert inner.lookup(k)[1].all()


def test_a_writer_whose_serving_process_went_away_is_told_so() -> None:
    cache = make_cache("numpy", capacity=1024, dim=DIM)
    here, there = socket.socketpair()
    memory = np.zeros(relay_bytes({"t": DIM * 4}), dtype=np.uint8)
    relay = WriteRelay(Connection(there.detach()), memory)
    here.close()  # the serving process's end
    remote = relay.cache("t", _facts(cache))
    with pytest.raises(StreamHPSError, match="serving process closed the cache-write relay"):
        remote.upsert_async(np.arange(3), np.ones((3, DIM), np.float32), np.ones(3, np.int64))


def test_tables_of_different_widths_share_the_slots() -> None:
    narrow = make_cache("numpy", capacity=1024, dim=4)
    wide = make_cache("numpy", capacity=1024, dim=96, dtype="float16")
    size = relay_bytes({"narrow": 4 * 4, "wide": 96 * 2}) // 2
    relay, applier = _pair({"narrow": narrow, "wide": wide}, slot_bytes=size)
    a, b = relay.cache("narrow", _facts(narrow)), relay.cache("wide", _facts(wide))
    k = np.arange(300, dtype=np.int64)
    a.upsert_async(k, np.full((300, 4), 1.5, np.float32), np.ones(300, np.int64))
    # float32 rows into a float16 table: converted as the cache's own write would
    b.upsert_async(k, np.full((300, 96), 2.5, np.float32), np.ones(300, np.int64))
    assert (narrow.lookup(k)[0] == 1.5).all() and (wide.lookup(k)[0] == 2.5).all()
    assert wide.lookup(k)[0].dtype == np.float16 and applier.stats()["rows"] == 600
