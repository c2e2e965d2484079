"""The dynamic batcher: concurrent requests merge into one batch and split back in order."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from servers.batching import DynamicBatcher


class Recorder:
    """A batch runner whose score of a row is its user id plus its dense feature."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[int] = []
        self.delay = delay
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, ids, dense, consistency):  # type: ignore[no-untyped-def]
        with self.lock:
            self.batches.append(int(dense.shape[0]))
        time.sleep(self.delay)
        if self.fail_on is not None and (ids["user"] == self.fail_on).any():
            raise KeyError(f"user {self.fail_on} was never published")
        return (ids["user"] + ids["item"] * 1000 + dense[:, 0]).astype(np.float32), len(
            self.batches
        )


def _req(i: int, n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    users = np.arange(n, dtype=np.int64) + 100 * i
    return {"user": users, "item": np.full(n, i, np.int64)}, np.full((n, 2), 0.5, np.float32)


def test_concurrent_requests_merge_into_batches_and_each_gets_its_own_rows_in_order() -> None:
    run = Recorder(delay=0.02)  # a slow device: requests pile up behind the running batch
    b = DynamicBatcher(run, max_batch_rows=256, max_queue_delay_s=0.005)
    out: dict[int, tuple[np.ndarray, int]] = {}

    def client(i: int) -> None:
        ids, x = _req(i, 8 + i % 5)
        out[i] = b.submit(ids, x)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    b.close()
    assert len(out) == 40
    for i, (scores, version) in out.items():
        ids, x = _req(i, 8 + i % 5)
        np.testing.assert_array_equal(scores, ids["user"] + ids["item"] * 1000 + 0.5)
        assert 1 <= version <= len(run.batches)
    assert len(run.batches) < 40 and max(run.batches) > 13  # merged
    assert max(run.batches) <= 256 and sum(run.batches) == sum(8 + i % 5 for i in range(40))
    assert b.stats.max_requests_in_batch > 1 and b.stats.requests == 40


def test_max_batch_rows_caps_a_batch_and_a_larger_request_runs_alone() -> None:
    run = Recorder(delay=0.05)
    b = DynamicBatcher(run, max_batch_rows=20, max_queue_delay_s=0.0)
    sizes = [30, 8, 8, 8, 8, 8]
    results: list[np.ndarray] = [np.zeros(0)] * len(sizes)

    def client(i: int) -> None:
        ids, x = _req(i, sizes[i])
        results[i] = b.submit(ids, x)[0]

    first = threading.Thread(target=client, args=(0,))
    first.start()
    time.sleep(0.01)  # the big one runs; the small ones queue behind it
    rest = [threading.Thread(target=client, args=(i,)) for i in range(1, len(sizes))]
    for t in rest:
        t.start()
    for t in [first, *rest]:
        t.join(30)
    b.close()
    assert run.batches[0] == 30 and all(n <= 20 for n in run.batches[1:])
    assert sum(run.batches) == sum(sizes)
    for i, r in enumerate(results):
        assert r.shape == (sizes[i],)


def test_a_failing_request_does_not_fail_the_others_merged_with_it() -> None:
    run = Recorder(delay=0.02, fail_on=300)  # user 300 is request 3's first row
    b = DynamicBatcher(run, max_batch_rows=1000, max_queue_delay_s=0.01)
    errors: dict[int, BaseException] = {}
    scores: dict[int, np.ndarray] = {}

    def client(i: int) -> None:
        ids, x = _req(i, 4)
        try:
            scores[i] = b.submit(ids, x)[0]
        except KeyError as e:
            errors[i] = e

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    b.close()
    assert set(errors) == {3} and "user 300" in str(errors[3])
    assert set(scores) == set(range(8)) - {3}


def test_requests_of_other_consistency_are_not_merged_and_a_lone_request_does_not_wait() -> None:
    seen: list[tuple[str, int]] = []

    def run(ids, dense, consistency):  # type: ignore[no-untyped-def]
        seen.append((consistency, int(dense.shape[0])))
        time.sleep(0.02)
        return np.zeros(dense.shape[0], np.float32), 1

    b = DynamicBatcher(run, max_batch_rows=1000, max_queue_delay_s=5.0)
    t0 = time.monotonic()
    b.submit(*_req(0, 3))
    assert time.monotonic() - t0 < 1.0  # nobody else arriving: no 5 s wait
    threads = [
        threading.Thread(target=b.submit, args=(*_req(i, 2), "bounded" if i % 2 else "eventual"))
        for i in range(10)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    b.close()
    assert sum(n for _, n in seen) == 3 + 20
    assert {c for c, _ in seen} == {"eventual", "bounded"}


def test_arriving_requests_are_waited_for_up_to_the_delay() -> None:
    sizes: list[int] = []

    def run(ids, dense, consistency):  # type: ignore[no-untyped-def]
        sizes.append(int(dense.shape[0]))
        return np.zeros(dense.shape[0], np.float32), 1

    b = DynamicBatcher(run, max_batch_rows=1000, max_queue_delay_s=2.0)
    entered = threading.Event()

    def second() -> None:
        with b.arriving() as a:  # being parsed while the first waits
            entered.set()
            time.sleep(0.2)
            b.submit(*_req(1, 5), arrival=a)

    with b.arriving():
        t = threading.Thread(target=second)
        t.start()
        assert entered.wait(10)
    b.submit(*_req(0, 3))
    t.join(10)
    b.close()
    assert sizes == [8]  # one batch of both


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch_rows"):
        DynamicBatcher(lambda *a: (np.zeros(0), 0), max_batch_rows=0)
