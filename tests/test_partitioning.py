from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from streamhps.partitioning import first_outside, fmix64, partition_of

DOC = Path(__file__).resolve().parents[1] / "schemas" / "PARTITIONING.md"


def _vectors() -> list[tuple[int, int, int, int, int]]:
    rows = re.findall(
        r"^\| (-?\d+) \| 0x([0-9a-f]{16}) \| (\d+) \| (\d+) \| (\d+) \|$", DOC.read_text(), re.M
    )
    assert len(rows) >= 8, "test vectors missing from schemas/PARTITIONING.md"
    return [(int(k), int(h, 16), int(a), int(b), int(c)) for k, h, a, b, c in rows]


@pytest.mark.parametrize(("key", "hashed", "p4", "p16", "p1000"), _vectors())
def test_documented_vectors(key: int, hashed: int, p4: int, p16: int, p1000: int) -> None:
    k = np.array([key], dtype=np.int64)
    assert int(fmix64(k)[0]) == hashed
    assert [int(partition_of(k, n)[0]) for n in (4, 16, 1000)] == [p4, p16, p1000]


def test_uint64_and_int64_keys_with_same_bits_agree() -> None:
    u = np.array([2**64 - 1, 2**63], dtype=np.uint64)
    assert np.array_equal(
        partition_of(u.view(np.int64), 7), partition_of(np.array([-1, -(2**63)]), 7)
    )


def test_sequential_ids_spread_evenly() -> None:
    counts = np.bincount(partition_of(np.arange(100_000), 8), minlength=8)
    assert counts.min() > 0.95 * 100_000 / 8


def test_input_is_not_modified() -> None:
    k = np.arange(10, dtype=np.int64)
    partition_of(k, 3)
    assert np.array_equal(k, np.arange(10))


@pytest.mark.parametrize("partitions", [1, 3, 4, 1000])
def test_first_outside_agrees_with_partition_of(partitions: int) -> None:
    """The compiled check a consumer runs on every message: the first key of another
    partition, or -1, as ``partition_of`` says (negative keys and the int64 extremes too)."""
    rng = np.random.default_rng(partitions)
    keys = np.concatenate([rng.integers(-(1 << 62), 1 << 62, 4000), [-1, 0, 2**63 - 1, -(2**63)]])
    parts = partition_of(keys, partitions)
    for p in range(min(partitions, 4)):
        mine = keys[parts == p]
        assert first_outside(mine, partitions, p) == -1
        mixed = keys[:200]
        wrong = np.flatnonzero(parts[:200] != p)
        assert first_outside(mixed, partitions, p) == (int(wrong[0]) if wrong.size else -1)
    assert first_outside(keys[:0], partitions, 0) == -1
