"""Which partition a key belongs to: the same function in every process and language.

``partition(key, n) = fmix64(uint64(key)) mod n`` where ``uint64(key)`` is the key's 64-bit
two's-complement bit pattern and ``fmix64`` is MurmurHash3's 64-bit finalizer::

    k ^= k >> 33; k *= 0xff51afd7ed558ccd   (mod 2**64)
    k ^= k >> 33; k *= 0xc4ceb93fe53a2b9b   (mod 2**64)
    k ^= k >> 33

It spreads sequential ids evenly, costs a few instructions, and needs no library. Written
down for other languages in ``schemas/PARTITIONING.md``; the test vectors there are checked by
the test suite.
"""

from __future__ import annotations

import numpy as np

from streamhps.compiled import lazy_kernel

_C1 = np.uint64(0xFF51AFD7ED558CCD)
_C2 = np.uint64(0xC4CEB93FE53A2B9B)
_S = np.uint64(33)


def fmix64(keys: np.ndarray) -> np.ndarray:
    """MurmurHash3 fmix64 of each key's 64-bit pattern, as uint64 (vectorised, wraps mod 2**64)."""
    k = np.asarray(keys).astype(np.int64, copy=False).view(np.uint64).copy()
    with np.errstate(over="ignore"):
        k ^= k >> _S
        k *= _C1
        k ^= k >> _S
        k *= _C2
        k ^= k >> _S
    return k


def partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    """Partition of each key, as an int64 array in ``[0, partitions)``."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    if partitions == 1:
        return np.zeros(np.shape(keys), dtype=np.int64)
    return (fmix64(keys) % np.uint64(partitions)).astype(np.int64)


def first_outside(keys: np.ndarray, partitions: int, partition: int) -> int:
    """Index of the first key of ``keys`` whose partition is not ``partition``; -1 if none.
    One compiled pass without the GIL (a consumer checks every message it reads with it)."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    k = np.asarray(keys)
    if k.dtype != np.int64 or k.ndim != 1:
        k = np.ascontiguousarray(k, dtype=np.int64).reshape(-1)
    return int(_first_outside(k, partitions, partition))


@lazy_kernel
def _first_outside(keys, partitions, partition):
    n, p = np.uint64(partitions), np.uint64(partition)
    for i in range(keys.shape[0]):
        k = np.uint64(keys[i])
        k ^= k >> _S
        k *= _C1
        k ^= k >> _S
        k *= _C2
        k ^= k >> _S
        if k % n != p:
            return i
    return -1
