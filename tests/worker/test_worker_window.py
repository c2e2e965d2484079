"""The window of consumed rows LMDB may not hold yet (invariant 3's memory)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from streamhps.worker.window import MERGE_CAP, RecentRows, latest_rows


def _add(w: RecentRows, keys, versions, part: int, offset: int, compact: bool = True) -> None:
    keys = np.asarray(keys, dtype=np.int64)
    versions = np.asarray(versions, dtype=np.int64)
    vec = np.repeat(versions[:, None].astype(np.float32), w.dim, axis=1)
    sel = latest_rows(keys, versions)
    n = sel.shape[0]
    w.add(
        keys[sel], versions[sel], vec[sel], np.full(n, part, np.int32),
        np.full(n, offset, np.int64), compact=compact,
    )  # fmt: skip


def test_latest_rows_keeps_highest_version_sorted() -> None:
    keys = np.array([5, 3, 5, 3, 9], dtype=np.int64)
    versions = np.array([2, 7, 4, 1, 1], dtype=np.int64)
    sel = latest_rows(keys, versions)
    k, v, tag = keys[sel], versions[sel], sel
    assert k.tolist() == [3, 5, 9]
    assert v.tolist() == [7, 4, 1]
    assert tag.tolist() == [1, 2, 4]


def test_get_returns_newest_version_across_chunks() -> None:
    w = RecentRows(dim=2, dtype=np.float32, partitions=2)
    _add(w, [1, 2, 3], [5, 5, 5], part=0, offset=10)
    _add(w, [2], [9], part=0, offset=11)
    _add(w, [3], [4], part=1, offset=3)  # older version arriving later: must not win
    vec, ver, found = w.get(np.array([1, 2, 3, 4], dtype=np.int64))
    assert found.tolist() == [True, True, True, False]
    assert ver.tolist() == [5, 9, 5, 0]
    assert vec[:, 0].tolist() == [5, 9, 5, 0]


def test_prune_drops_only_rows_the_store_holds() -> None:
    w = RecentRows(dim=1, dtype=np.float32, partitions=2)
    _add(w, np.arange(100), np.full(100, 1), part=0, offset=5)
    _add(w, np.arange(100, 110), np.full(10, 2), part=1, offset=7)
    epoch = w.epoch
    w.prune(np.array([6, 0]))  # the store holds partition 0 up to offset 5, nothing of partition 1
    vec, ver, found = w.get(np.array([0, 105], dtype=np.int64))
    # rows merged into one chunk with partition 1 stay until all of the chunk is stored
    assert found[1]
    w.prune(np.array([6, 8]))
    assert w.rows == 0
    assert w.epoch > epoch
    assert not w.get(np.array([0, 105], dtype=np.int64))[2].any()


def test_chunk_count_stays_logarithmic() -> None:
    w = RecentRows(dim=1, dtype=np.float32, partitions=1)
    for i in range(1000):
        _add(w, [i, i + 1], [i + 1, i + 1], part=0, offset=i)
    assert w.chunks <= 12
    _, ver, found = w.get(np.array([0, 500, 1000], dtype=np.int64))
    assert found.all()
    assert ver.tolist() == [1, 501, 1000]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(st.integers(0, 40), min_size=1, max_size=8), st.integers(1, 50)),
        min_size=1,
        max_size=30,
    ),
    st.integers(0, 30),
    st.sampled_from([MERGE_CAP, 4]),
    st.sampled_from([0, 1, 3]),
)
def test_window_matches_a_dict_model(
    batches: list[tuple[list[int], int]], stored_upto: int, merge_cap: int, merge_every: int
) -> None:
    """Whatever the merge pattern, get() returns the newest version of a key among rows not yet
    stored, or a newer one the store holds already (chunks leave the window whole); a key is
    absent only if the store holds it at a version no older than any unstored row of it (a
    merge keeps a key's newest row, so an older unstored row behind a newer stored one goes).
    ``merge_every``: 0 merges on add; k > 0 adds unmerged and compacts every k adds (as the
    worker's ingest thread does), before and after the prune."""
    w = RecentRows(dim=1, dtype=np.float32, partitions=1, merge_cap=merge_cap)
    newest: dict[int, int] = {}  # key -> highest version of any row
    unstored: dict[int, int] = {}  # key -> highest version among rows at offsets >= stored_upto
    stored: dict[int, int] = {}  # key -> highest version among rows the store holds
    for off, (keys, version) in enumerate(batches):
        _add(w, keys, [version] * len(keys), part=0, offset=off, compact=not merge_every)
        if merge_every and off % merge_every == merge_every - 1:
            w.compact()
        for k in keys:
            newest[k] = max(newest.get(k, 0), version)
            held = unstored if off >= stored_upto else stored
            held[k] = max(held.get(k, 0), version)
    w.prune(np.array([stored_upto]))
    assert w.compact() and w.pending == 0
    q = np.arange(41, dtype=np.int64)
    vec, ver, found = w.get(q)
    for k in range(41):
        if found[k]:
            assert k in newest and unstored.get(k, 0) <= ver[k] <= newest[k], k
            assert vec[k, 0] == ver[k], k  # the row of that version, not another one's
        else:
            # an unstored row is never lost unless the store holds the key at least as new
            assert k not in unstored or stored.get(k, 0) >= unstored[k], k


def test_deferred_merges_leave_the_chunks_that_merges_on_add_leave() -> None:
    """The ingest thread adds unmerged and compacts later: the same chunks, the same rows, and
    every row readable before the compaction too."""
    rng = np.random.default_rng(3)
    now = RecentRows(dim=2, dtype=np.float32, partitions=1, merge_cap=256)
    later = RecentRows(dim=2, dtype=np.float32, partitions=1, merge_cap=256)
    for i in range(300):
        keys = rng.integers(0, 500, int(rng.integers(1, 40)))
        _add(now, keys, np.full(keys.size, i + 1), part=0, offset=i)
        _add(later, keys, np.full(keys.size, i + 1), part=0, offset=i, compact=False)
        if i % 7 == 6:
            q = np.arange(500, dtype=np.int64)
            assert later.pending > 0
            np.testing.assert_array_equal(later.get(q)[1], now.get(q)[1])
            assert later.pending == 7 and not later.merged
            if i % 14 == 13:  # one merge at a time, as the ingest thread does between batches
                steps = 0
                while not later.compact(merges=1):
                    steps += 1
                assert steps > 0
            else:
                assert later.compact()
            assert later.pending == 0 and later.merged
            assert [c.keys.tolist() for c in later._chunks] == [
                c.keys.tolist() for c in now._chunks
            ]
    later.compact()
    assert [c.versions.tolist() for c in later._chunks] == [
        c.versions.tolist() for c in now._chunks
    ]
    q = np.arange(500, dtype=np.int64)
    np.testing.assert_array_equal(later.get(q)[0], now.get(q)[0])


def test_merges_stop_at_the_cap_and_full_chunks_leave_as_the_store_catches_up() -> None:
    """A lagging processor: the window keeps growing, but no merge copies more than the cap."""
    w = RecentRows(dim=2, dtype=np.float32, partitions=1, merge_cap=64)
    for i in range(200):
        _add(w, np.arange(8) + 8 * i, np.full(8, i + 1), part=0, offset=i)
    assert w.rows == 1600
    assert max(c.rows for c in w._chunks) <= 64
    _, ver, found = w.get(np.array([0, 800, 1599], dtype=np.int64))
    assert found.all() and ver.tolist() == [1, 101, 200]
    w.prune(np.array([100]))  # the store caught up to offset 100: the older full chunks go
    assert 0 < w.rows <= 1600 - 8 * 96
    _, ver, found = w.get(np.array([0, 800, 1599], dtype=np.int64))
    assert found.tolist() == [False, True, True]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(1, 4)), min_size=1, max_size=40))
def test_latest_rows_matches_a_dict_model(rows: list[tuple[int, int]]) -> None:
    keys = np.array([k for k, _ in rows], dtype=np.int64)
    versions = np.array([v for _, v in rows], dtype=np.int64)
    model: dict[int, tuple[int, int]] = {}  # key -> (version, row index); ties: the later row
    for i, (k, v) in enumerate(rows):
        if k not in model or v >= model[k][0]:
            model[k] = (v, i)
    idx = latest_rows(keys, versions)
    k, v = keys[idx], versions[idx]
    assert k.tolist() == sorted(model)
    assert [(int(a), int(b)) for a, b in zip(v, idx, strict=True)] == [model[x] for x in k.tolist()]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 30), st.integers(1, 9)), min_size=1, max_size=6),
        min_size=1,
        max_size=80,
    )
)
def test_rows_kept_in_the_message_arrays_read_back_as_the_newest(
    messages: list[list[tuple[int, int]]],
) -> None:
    """The ingest path: a batch's rows stay in the arrays they arrived in (one per message,
    read-only like decoded Kafka bytes); whatever merges and gathers happen, get() returns the
    vector of the newest version of each key."""
    w = RecentRows(dim=3, dtype=np.float32, partitions=1)
    newest: dict[int, int] = {}
    for off in range(0, len(messages), 3):  # batches of up to three messages
        batch = messages[off : off + 3]
        arrays = []
        for m in batch:
            a = np.array([[v, k, v * 100 + k] for k, v in m], dtype=np.float32)
            a.setflags(write=False)
            arrays.append(a)
        keys = np.array([k for m in batch for k, _ in m], dtype=np.int64)
        versions = np.array([v for m in batch for _, v in m], dtype=np.int64)
        src = np.repeat(np.arange(len(batch), dtype=np.int32), [len(m) for m in batch])
        row = np.concatenate([np.arange(len(m)) for m in batch]).astype(np.int64)
        sel = latest_rows(keys, versions)
        n = sel.shape[0]
        w.add(keys[sel], versions[sel], arrays, np.zeros(n, np.int32), np.full(n, off, np.int64),
              src=src[sel], row=row[sel])  # fmt: skip
        for k, v in zip(keys.tolist(), versions.tolist(), strict=True):
            newest[k] = max(newest.get(k, 0), v)
    vec, ver, found = w.get(np.arange(31, dtype=np.int64))
    assert found.tolist() == [k in newest for k in range(31)]
    for k in newest:
        assert ver[k] == newest[k]
        assert vec[k].tolist() == [newest[k], k, newest[k] * 100 + k]


def test_arrays_whose_rows_are_all_superseded_are_let_go() -> None:
    """A merge keeps only the arrays live rows point into: memory of superseded messages frees."""
    w = RecentRows(dim=2, dtype=np.float32, partitions=1)
    old = np.zeros((100, 2), dtype=np.float32)
    new = np.ones((100, 2), dtype=np.float32)
    keys = np.arange(100, dtype=np.int64)
    for version, (a, off) in enumerate([(old, 0), (new, 1)], start=1):
        w.add(keys, np.full(100, version, np.int64), [a], np.zeros(100, np.int32),
              np.full(100, off, np.int64), src=np.zeros(100, np.int32), row=keys)  # fmt: skip
    assert w.chunks == 1 and w._chunks[0].sources == (new,)
    assert w.nbytes == new.nbytes + 100 * 36
    vec, ver, _ = w.get(keys)
    assert (ver == 2).all() and (vec == 1).all()


def test_superseded_rows_do_not_keep_their_messages_alive() -> None:
    """A hot key set rewritten message after message: each message keeps one live row once the
    next one supersedes the rest. The window gathers the live rows instead of holding every
    message whole: memory stays within MAX_HELD_PER_LIVE_ROW times the live rows' (+ the last
    chunks not merged yet)."""
    dim, per_msg = 8, 512
    w = RecentRows(dim=dim, dtype=np.float32, partitions=1)
    hot = np.arange(per_msg, dtype=np.int64)
    for off in range(64):
        keys = hot.copy()
        keys[0] = 10_000 + off  # one key only this message has: stays live
        vec = np.full((per_msg, dim), off, dtype=np.float32)
        vec.setflags(write=False)
        w.add(keys, np.full(per_msg, off + 1, np.int64), [vec], np.zeros(per_msg, np.int32),
              np.full(per_msg, off, np.int64), src=np.zeros(per_msg, np.int32),
              row=np.arange(per_msg, dtype=np.int64))  # fmt: skip
    held = {id(a): a.nbytes for c in w._chunks for a in c.sources}
    every_message = 64 * per_msg * dim * 4  # what holding each message whole would take
    assert sum(held.values()) < every_message / 4
    assert w.nbytes < every_message / 4
    vec, ver, found = w.get(np.r_[hot[1:], 10_000 + np.arange(64)])
    assert found.all()
    assert (ver[: per_msg - 1] == 64).all() and (vec[: per_msg - 1] == 63).all()
    assert ver[per_msg - 1 :].tolist() == list(range(1, 65))
    assert vec[per_msg - 1 :, 0].tolist() == list(range(64))
