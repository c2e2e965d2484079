"""The wire format: one Kafka message = one update batch, commit marker or dense update.

Every message is an Avro *single-object encoding* of the record in
``schemas/envelope.avsc``: the two bytes ``C3 01``, the 8-byte little-endian CRC-64-AVRO
fingerprint of the schema's canonical form, then the Avro binary datum. Any Avro library can
read it; this module encodes and decodes it by hand so that decoding never copies the arrays.

The arrays travel in one ``payload`` bytes field, little-endian, in this order:
``keys`` (int64 ``[n]``), ``row_versions`` (int64 ``[n]``, only if ``has_row_versions``),
``vectors`` (``dtype`` ``[n, dim]``, row-major). The ``padding`` field before it holds 0..7 zero
bytes so that the payload starts 8-byte aligned in the message, which lets
:func:`decode` return ``np.frombuffer`` views into the message itself.

A dense update carries a safetensors file in ``payload`` (``table`` is ``""``).
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamhps.compiled import lazy_kernel
from streamhps.errors import SchemaVersionError, WireError

SCHEMA_VERSION = 1
KINDS = ("UPDATE", "MARKER", "DENSE")
DTYPES = ("float32", "float16")
"""Row dtypes, in wire order (a message carries the index); config and caches take these."""
# One message stays under Kafka's default 1 MiB limit (message.max.bytes = 1048588).
MAX_MESSAGE_BYTES = 1_000_000

SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Envelope",
    "namespace": "io.streamhps.wire",
    "doc": "One streamhps Kafka message: an update batch, a commit marker or a dense update.",
    "fields": [
        {"name": "schema_version", "type": "int"},
        {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": list(KINDS)}},
        {"name": "table", "type": "string"},
        {"name": "partition", "type": "int"},
        {
            "name": "dtype",
            "type": {"type": "enum", "name": "DType", "symbols": ["FLOAT32", "FLOAT16"]},
        },
        {"name": "dim", "type": "int"},
        {"name": "row_count", "type": "long"},
        {"name": "version", "type": "long"},
        {"name": "run_id", "type": "string"},
        {"name": "producer_seq", "type": "long"},
        {"name": "publish_ts_us", "type": "long"},
        {"name": "has_row_versions", "type": "boolean"},
        {"name": "padding", "type": "bytes"},
        {"name": "payload", "type": "bytes"},
    ],
}


def _canonical_form(schema: dict[str, Any]) -> str:
    """Avro Parsing Canonical Form of this module's schema (records, enums, primitives only)."""

    def canon(s: Any, ns: str | None) -> str:
        if isinstance(s, str):
            return json.dumps(s)
        if s["type"] == "record":
            full = f"{s.get('namespace', ns)}.{s['name']}" if "." not in s["name"] else s["name"]
            space = full.rsplit(".", 1)[0]
            fs = ",".join(
                '{"name":%s,"type":%s}' % (json.dumps(f["name"]), canon(f["type"], space))
                for f in s["fields"]
            )
            return '{"name":%s,"type":"record","fields":[%s]}' % (json.dumps(full), fs)
        if s["type"] == "enum":
            full = f"{ns}.{s['name']}" if ns else s["name"]
            syms = ",".join(json.dumps(x) for x in s["symbols"])
            return '{"name":%s,"type":"enum","symbols":[%s]}' % (json.dumps(full), syms)
        return json.dumps(s["type"])

    return canon(schema, None)


def _crc64_avro(data: bytes) -> int:
    """The CRC-64-AVRO (Rabin) fingerprint from the Avro specification."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for b in data:
        fp = (fp >> 8) ^ table[(fp ^ b) & 0xFF]
    return fp


CANONICAL_FORM = _canonical_form(SCHEMA)
FINGERPRINT = _crc64_avro(CANONICAL_FORM.encode())
MAGIC = b"\xc3\x01" + struct.pack("<Q", FINGERPRINT)


@dataclass(frozen=True, slots=True)
class Message:
    """A decoded (or to-be-encoded) streamhps message.

    ``keys`` is int64 ``[n]``; ``vectors`` is ``[n, dim]`` of ``dtype``; both are read-only
    views into the message bytes after :func:`decode`. A commit marker has ``n == 0``.
    """

    kind: str
    table: str
    version: int
    keys: np.ndarray
    vectors: np.ndarray
    partition: int = 0
    row_versions: np.ndarray | None = None
    run_id: str = ""
    producer_seq: int = 0
    publish_ts_us: int = 0
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def is_marker(self) -> bool:
        return self.kind == "MARKER"

    @property
    def is_dense(self) -> bool:
        return self.kind == "DENSE"

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def dtype(self) -> str:
        return str(self.vectors.dtype)

    @property
    def row_count(self) -> int:
        return int(self.keys.shape[0])

    @property
    def publish_time(self) -> float:
        """Publish wall-clock time in seconds since the epoch."""
        return self.publish_ts_us / 1e6

    def versions(self) -> np.ndarray:
        """The version of every row: ``row_versions`` if present, else ``version`` repeated."""
        if self.row_versions is not None:
            return self.row_versions
        return np.full(self.row_count, self.version, dtype=np.int64)


# ---------------------------------------------------------------- Avro primitives


def _zz(n: int) -> bytes:
    """Avro long: zig-zag then base-128 varint."""
    u = (n << 1) ^ (n >> 63)
    out = bytearray()
    while u > 0x7F:
        out.append((u & 0x7F) | 0x80)
        u >>= 7
    out.append(u)
    return bytes(out)


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return _zz(len(b)) + b


class _Reader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def long(self, what: str) -> int:
        shift = 0
        u = 0
        buf = self.buf
        while True:
            if self.pos >= len(buf):
                raise WireError(f"message truncated while reading {what!r} at byte {self.pos}")
            b = buf[self.pos]
            self.pos += 1
            u |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
            if shift > 63:
                raise WireError(f"varint too long in field {what!r} at byte {self.pos}")
        return (u >> 1) ^ -(u & 1)

    def raw(self, what: str) -> tuple[int, int]:
        n = self.long(what)
        if n < 0 or self.pos + n > len(self.buf):
            raise WireError(
                f"field {what!r} claims {n} bytes but only {len(self.buf) - self.pos} remain"
            )
        start = self.pos
        self.pos += n
        return start, n

    def string(self, what: str) -> str:
        start, n = self.raw(what)
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise WireError(f"field {what!r} is not valid UTF-8") from e

    def boolean(self, what: str) -> bool:
        if self.pos >= len(self.buf):
            raise WireError(f"message truncated while reading {what!r}")
        b = self.buf[self.pos]
        self.pos += 1
        if b > 1:
            raise WireError(f"field {what!r} is not a boolean (byte {b})")
        return bool(b)


# ---------------------------------------------------------------- encode


def encode_update(
    table: str,
    keys: np.ndarray,
    vectors: np.ndarray,
    version: int,
    *,
    partition: int = 0,
    row_versions: np.ndarray | None = None,
    run_id: str = "",
    producer_seq: int = 0,
    publish_ts_us: int | None = None,
) -> bytes:
    """Encode an update batch. ``keys`` int64 ``[n]``, ``vectors`` float32/float16 ``[n, dim]``.

    Checks shapes and dtypes only; value checks (NaN, versions) belong to the publisher.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise WireError(f"vectors must be 2-D [n, dim], got shape {vectors.shape}")
    if vectors.dtype.name not in DTYPES:
        raise WireError(f"vectors dtype must be one of {DTYPES}, got {vectors.dtype}")
    keys = np.ascontiguousarray(keys, dtype="<i8")
    if keys.ndim != 1 or keys.shape[0] != vectors.shape[0]:
        raise WireError(f"keys shape {keys.shape} does not match vectors shape {vectors.shape}")
    parts: list[Any] = [keys]
    if row_versions is not None:
        row_versions = np.ascontiguousarray(row_versions, dtype="<i8")
        if row_versions.shape != keys.shape:
            raise WireError(f"row_versions shape {row_versions.shape} != keys shape {keys.shape}")
        parts.append(row_versions)
    parts.append(np.ascontiguousarray(vectors, dtype=vectors.dtype.newbyteorder("<")))
    return _encode(
        "UPDATE", table, partition, vectors.dtype.name, vectors.shape[1], keys.shape[0], version,
        run_id, producer_seq, publish_ts_us, row_versions is not None, parts,
    )  # fmt: skip


def encode_marker(
    table: str,
    version: int,
    *,
    partition: int = 0,
    dtype: str = "float32",
    dim: int = 1,
    run_id: str = "",
    producer_seq: int = 0,
    publish_ts_us: int | None = None,
) -> bytes:
    """Encode a commit marker: "every row of ``version`` for this partition has been sent"."""
    return _encode(
        "MARKER", table, partition, dtype, dim, 0, version, run_id, producer_seq, publish_ts_us,
        False, [],
    )  # fmt: skip


def encode_dense(
    tensors: dict[str, Any],
    version: int,
    *,
    run_id: str = "",
    producer_seq: int = 0,
    publish_ts_us: int | None = None,
) -> bytes:
    """Encode a whole dense model (name -> array or torch tensor) as a safetensors payload."""
    return _encode(
        "DENSE", "", 0, "float32", 1, 0, version, run_id, producer_seq, publish_ts_us, False,
        [safetensors_dumps(tensors)],
    )  # fmt: skip


def _encode(
    kind: str,
    table: str,
    partition: int,
    dtype: str,
    dim: int,
    row_count: int,
    version: int,
    run_id: str,
    producer_seq: int,
    publish_ts_us: int | None,
    has_row_versions: bool,
    payload_parts: list[Any],
) -> bytes:
    views = [_byte_view(p) for p in payload_parts]
    head = _head(
        kind, table, partition, dtype, dim, row_count, version, run_id, producer_seq,
        publish_ts_us, has_row_versions, sum(v.nbytes for v in views),
    )  # fmt: skip
    return b"".join([head, *views])


def _head(
    kind: str,
    table: str,
    partition: int,
    dtype: str,
    dim: int,
    row_count: int,
    version: int,
    run_id: str,
    producer_seq: int,
    publish_ts_us: int | None,
    has_row_versions: bool,
    payload_len: int,
) -> bytes:
    """Everything before the payload bytes, padded so that the payload starts 8-byte aligned."""
    if publish_ts_us is None:
        publish_ts_us = time.time_ns() // 1000
    head = b"".join(
        [
            MAGIC,
            _zz(SCHEMA_VERSION),
            _zz(KINDS.index(kind)),
            _str(table),
            _zz(partition),
            _zz(DTYPES.index(dtype)),
            _zz(dim),
            _zz(row_count),
            _zz(int(version)),
            _str(run_id),
            _zz(producer_seq),
            _zz(publish_ts_us),
            b"\x01" if has_row_versions else b"\x00",
        ]
    )
    len_prefix = _zz(payload_len)
    # 1 byte of padding length (0..7 zig-zags to 0..14) then the padding itself.
    pad = (-(len(head) + 1 + len(len_prefix))) % 8
    return b"".join([head, _zz(pad), bytes(pad), len_prefix])


def encode_update_rows(
    table: str,
    keys: np.ndarray,
    vectors: np.ndarray,
    rows: np.ndarray,
    version: int,
    *,
    partition: int = 0,
    row_versions: np.ndarray | None = None,
    run_id: str = "",
    producer_seq: int = 0,
    publish_ts_us: int | None = None,
) -> np.ndarray:
    """Encode the rows ``rows`` (indices) of ``keys``/``vectors`` as one update message.

    Same bytes as ``encode_update(table, keys[rows], vectors[rows], ...)``, but gathered straight
    into the message buffer: one copy of the rows instead of three. Returns a uint8 array
    (a read-only-compatible buffer that ``Producer.produce`` accepts). Inputs must be valid
    (int64 keys, float32/float16 ``[N, dim]`` vectors): the publisher checked them.
    """
    n = int(rows.shape[0])
    dim = int(vectors.shape[1])
    itemsize = vectors.dtype.itemsize
    has_rv = row_versions is not None
    payload_len = n * (8 + (8 if has_rv else 0) + dim * itemsize)
    head = _head(
        "UPDATE", table, partition, vectors.dtype.name, dim, n, version, run_id, producer_seq,
        publish_ts_us, has_rv, payload_len,
    )  # fmt: skip
    h = len(head)
    buf = np.empty(h + payload_len, dtype=np.uint8)
    buf[:h] = np.frombuffer(head, dtype=np.uint8)
    np.take(keys, rows, out=buf[h : h + 8 * n].view("<i8"))
    off = h + 8 * n
    if row_versions is not None:
        np.take(row_versions, rows, out=buf[off : off + 8 * n].view("<i8"))
        off += 8 * n
    out = buf[off:].view(vectors.dtype).reshape(n, dim)
    np.take(vectors, rows, axis=0, out=out)
    return buf


def _byte_view(part: Any) -> memoryview:
    if isinstance(part, np.ndarray):
        return memoryview(part.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    return memoryview(part).cast("B")


# ---------------------------------------------------------------- decode


def decode(data: bytes | bytearray | memoryview | None) -> Message:
    """Decode one message. Arrays are read-only views into ``data`` (no copy).

    Raises :class:`WireError` (or :class:`SchemaVersionError`) naming what is wrong.
    """
    if data is None:
        raise WireError("message has no value (None): not a streamhps message")
    buf = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    if len(buf) < len(MAGIC):
        raise WireError(f"message is {len(buf)} bytes, shorter than the 10-byte header")
    if buf[:2] != MAGIC[:2]:
        raise WireError(
            f"message does not start with the Avro single-object marker C3 01 (got {bytes(buf[:2]).hex()})"
        )
    if buf[: len(MAGIC)] != MAGIC:
        fp = struct.unpack("<Q", buf[2:10])[0]
        raise SchemaVersionError(
            f"message written with schema fingerprint {fp:#018x}; this reader knows {FINGERPRINT:#018x}"
        )
    r = _Reader(buf)
    r.pos = len(MAGIC)
    schema_version = r.long("schema_version")
    if schema_version != SCHEMA_VERSION:
        raise SchemaVersionError(f"schema_version {schema_version} is not {SCHEMA_VERSION}")
    kind_i = r.long("kind")
    if not 0 <= kind_i < len(KINDS):
        raise WireError(f"kind index {kind_i} is not one of {KINDS}")
    kind = KINDS[kind_i]
    table = r.string("table")
    partition = r.long("partition")
    dtype_i = r.long("dtype")
    if not 0 <= dtype_i < len(DTYPES):
        raise WireError(f"dtype index {dtype_i} is not one of {DTYPES}")
    dtype = np.dtype(DTYPES[dtype_i]).newbyteorder("<")
    dim = r.long("dim")
    n = r.long("row_count")
    version = r.long("version")
    run_id = r.string("run_id")
    producer_seq = r.long("producer_seq")
    publish_ts_us = r.long("publish_ts_us")
    has_rv = r.boolean("has_row_versions")
    r.raw("padding")
    start, plen = r.raw("payload")
    if r.pos != len(buf):
        raise WireError(f"{len(buf) - r.pos} trailing bytes after the payload")
    if dim < 1 or n < 0:
        raise WireError(f"invalid shape: row_count={n}, dim={dim}")
    if kind == "DENSE":
        tensors = safetensors_loads(buf[start : start + plen])
        empty = np.zeros(0, dtype=np.int64)
        return Message(
            kind, table, version, empty, np.zeros((0, 1), np.float32), partition, None, run_id,
            producer_seq, publish_ts_us, tensors,
        )  # fmt: skip
    expected = n * (8 + (8 if has_rv else 0) + dim * dtype.itemsize)
    if plen != expected:
        raise WireError(
            f"payload is {plen} bytes but row_count={n}, dim={dim}, dtype={dtype.name}, "
            f"row_versions={has_rv} need {expected}"
        )
    keys = np.frombuffer(buf, dtype="<i8", count=n, offset=start)
    off = start + 8 * n
    row_versions = None
    if has_rv:
        row_versions = np.frombuffer(buf, dtype="<i8", count=n, offset=off)
        off += 8 * n
    vectors = np.frombuffer(buf, dtype=dtype, count=n * dim, offset=off).reshape(n, dim)
    return Message(
        kind, table, version, keys, vectors, partition, row_versions, run_id, producer_seq,
        publish_ts_us,
    )  # fmt: skip


def all_finite(a: np.ndarray) -> bool:
    """True if no element is NaN or Inf: checked on the exponent bits (all ones only in NaN and
    Inf) in one compiled pass without the GIL, for native float16/32/64; numpy otherwise."""
    mask = _EXPONENT_BITS.get(a.dtype.itemsize) if a.dtype.kind == "f" else None
    if mask is None or not a.dtype.isnative:
        return bool(np.isfinite(a).all())
    bits = np.ascontiguousarray(a).reshape(-1).view(mask.dtype)
    return int(_count_exponent_all_ones(bits, mask)) == 0


#: the exponent field of an IEEE float of each width, as an unsigned int of that width
_EXPONENT_BITS: dict[int, np.unsignedinteger[Any]] = {
    2: np.uint16(0x7C00), 4: np.uint32(0x7F800000), 8: np.uint64(0x7FF0000000000000),
}  # fmt: skip


@lazy_kernel
def _count_exponent_all_ones(bits, mask):
    # a count, not an early exit: the loop vectorises (2x numpy's isfinite, 18x a loop that
    # stops at the first)
    c = 0
    for i in range(bits.shape[0]):
        c += (bits[i] & mask) == mask
    return c


# ---------------------------------------------------------------- safetensors (dense payload)

_ST_DTYPES = {
    "F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4", "I16": "<i2",
    "I8": "i1", "U8": "u1", "BOOL": "?",
}  # fmt: skip
_NP_TO_ST = {np.dtype(v).str: k for k, v in _ST_DTYPES.items()}


def safetensors_dumps(tensors: dict[str, Any]) -> bytes:
    """Serialise name -> array (numpy or torch, on any device) in the safetensors format."""
    arrays: dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        if hasattr(t, "detach"):  # torch tensor
            t = t.detach().cpu().numpy()
        a = np.ascontiguousarray(t)
        if a.dtype.str not in _NP_TO_ST and a.dtype.newbyteorder("<").str not in _NP_TO_ST:
            raise WireError(f"dense tensor {name!r} has unsupported dtype {a.dtype}")
        arrays[str(name)] = a.astype(a.dtype.newbyteorder("<"), copy=False)
    header: dict[str, Any] = {}
    offset = 0
    for name, a in arrays.items():
        header[name] = {
            "dtype": _NP_TO_ST[a.dtype.str],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((-len(hb)) % 8)
    return b"".join([struct.pack("<Q", len(hb)), hb, *(_byte_view(a) for a in arrays.values())])


def safetensors_loads(buf: memoryview | bytes) -> dict[str, np.ndarray]:
    """Parse a safetensors blob into read-only numpy views."""
    buf = memoryview(buf)
    if len(buf) < 8:
        raise WireError("dense payload shorter than the safetensors header")
    (hlen,) = struct.unpack("<Q", buf[:8])
    if hlen > len(buf) - 8:
        raise WireError(f"dense payload header claims {hlen} bytes, only {len(buf) - 8} present")
    try:
        header = json.loads(bytes(buf[8 : 8 + hlen]))
    except ValueError as e:
        raise WireError(f"dense payload header is not JSON: {e}") from e
    base = 8 + hlen
    out: dict[str, np.ndarray] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dt = np.dtype(_ST_DTYPES[meta["dtype"]])
            begin, end = meta["data_offsets"]
            shape = tuple(meta["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise WireError(f"dense tensor {name!r} has a malformed header entry: {e}") from e
        count = int(np.prod(shape)) if shape else 1
        if end - begin != count * dt.itemsize or base + end > len(buf):
            raise WireError(f"dense tensor {name!r} offsets do not match its shape {shape}")
        out[name] = np.frombuffer(buf, dtype=dt, count=count, offset=base + begin).reshape(shape)
    return out
