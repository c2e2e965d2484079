"""The on-disk format of an LMDB store: named databases and how keys and values are encoded.

Layout: one LMDB environment (a directory holding ``data.mdb`` and ``lock.mdb``) per shard
of partitions, i.e. per processor. Named databases inside it:

* ``rows:<table>``: key = 8 bytes big-endian of ``uint64(key) ^ 1<<63`` (so rows sort by
  the signed key), value = version (int64 little-endian) then the vector bytes
  (little-endian ``dtype``, ``dim`` elements).
* ``offsets``: ``topic \\0 partition(u32 BE)`` -> next offset to consume (int64 LE).
* ``applied``: ``table \\0 partition(u32 BE)`` -> applied version (int64 LE).
* ``meta``: ``format``, ``tables`` (JSON: specs and held partitions), ``stats`` (JSON:
  compaction counters), ``max_versions:<table>`` (int64 LE per partition: the highest version
  ever written to a row of that partition; a row above it wins without reading the stored
  one; absent in stores written before it, then read once from the rows).
"""

from __future__ import annotations

import struct

import numpy as np

from streamhps.config import TableSpec

FORMAT = b"1"
"""The ``format`` a store records in ``meta``; a store of another format is refused."""
META, OFFSETS, APPLIED = b"meta", b"offsets", b"applied"
SIGN = np.uint64(1 << 63)


def encode_keys(keys: np.ndarray) -> list[bytes]:
    """int64 keys -> LMDB keys (8 bytes each) that sort like the signed keys."""
    u = np.ascontiguousarray(keys, dtype=np.int64).view(np.uint64) ^ SIGN
    keys_out: list[bytes] = u.astype(">u8").view("V8").tolist()
    return keys_out


def decode_keys(raw: bytes) -> np.ndarray:
    """LMDB keys, concatenated -> the int64 keys."""
    return (np.frombuffer(raw, dtype=">u8").astype(np.uint64) ^ SIGN).view(np.int64)


def partition_key(name: str, partition: int) -> bytes:
    """``name \\0 partition(u32 BE)``: the key of ``offsets`` and ``applied``."""
    return name.encode() + b"\0" + struct.pack(">I", partition)


def parse_partition_key(raw: bytes | memoryview) -> tuple[str, int]:
    raw = bytes(raw)
    return raw[:-5].decode(), struct.unpack(">I", raw[-4:])[0]


def encode_i64(v: int) -> bytes:
    """An offset or a version as LMDB stores it (int64 little-endian)."""
    return struct.pack("<q", v)


def row_dtype(spec: TableSpec) -> np.dtype:
    """A ``rows:<table>`` value: version (int64 LE) then ``dim`` little-endian elements."""
    return np.dtype([("version", "<i8"), ("vector", spec.np_dtype.newbyteorder("<"), (spec.dim,))])
