"""Wire format: round trips, zero-copy decode, compatibility with a real Avro reader, garbage."""

from __future__ import annotations

import io
import json
from pathlib import Path

import fastavro
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamhps import StreamHPSError, wire
from streamhps.errors import SchemaVersionError, WireError

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"


@st.composite
def batches(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    n = draw(st.integers(0, 300))
    dim = draw(st.sampled_from([1, 2, 3, 7, 16, 64, 129]))
    dtype = draw(st.sampled_from(["float32", "float16"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    keys = rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64)
    vectors = rng.standard_normal((n, dim)).astype(dtype)
    rv = rng.integers(1, 2**62, size=n, dtype=np.int64) if draw(st.booleans()) else None
    return keys, vectors, rv


@settings(max_examples=150, deadline=None)
@given(batch=batches(), version=st.integers(1, 2**63 - 1), partition=st.integers(0, 9999),
       table=st.text(min_size=1, max_size=20), run_id=st.text(max_size=12))  # fmt: skip
def test_update_round_trip(batch, version, partition, table, run_id) -> None:
    keys, vectors, rv = batch
    data = wire.encode_update(
        table, keys, vectors, version, partition=partition, row_versions=rv, run_id=run_id,
        producer_seq=5, publish_ts_us=1_700_000_000_000_000,
    )  # fmt: skip
    m = wire.decode(data)
    assert (m.kind, m.table, m.version, m.partition, m.run_id) == (
        "UPDATE",
        table,
        version,
        partition,
        run_id,
    )
    assert m.producer_seq == 5 and m.publish_ts_us == 1_700_000_000_000_000
    assert m.keys.dtype == np.int64 and np.array_equal(m.keys, keys)
    assert m.vectors.shape == vectors.shape and m.vectors.dtype == vectors.dtype
    assert np.array_equal(m.vectors, vectors)
    if rv is None:
        assert m.row_versions is None
        assert np.array_equal(m.versions(), np.full(len(keys), version))
    else:
        assert np.array_equal(m.row_versions, rv)
    # arrays are aligned views into the message, not copies
    for arr in (m.keys, m.vectors):
        assert arr.flags.aligned and not arr.flags.owndata and not arr.flags.writeable


@settings(max_examples=60, deadline=None)
@given(batch=batches())
def test_standard_avro_reader_agrees(batch) -> None:
    """Another language's Avro library reads the same bytes: fastavro with schemas/envelope.avsc."""
    keys, vectors, rv = batch
    data = wire.encode_update("user", keys, vectors, 9, partition=3, row_versions=rv)
    schema = fastavro.parse_schema(json.loads((SCHEMAS / "envelope.avsc").read_text()))
    assert data[:2] == b"\xc3\x01"
    rec = fastavro.schemaless_reader(io.BytesIO(data[10:]), schema, None)
    assert rec["kind"] == "UPDATE" and rec["table"] == "user" and rec["version"] == 9
    assert rec["row_count"] == len(keys) and rec["dim"] == vectors.shape[1]
    n = len(keys)
    payload = rec["payload"]
    assert np.array_equal(np.frombuffer(payload, "<i8", n), keys)
    off = 8 * n + (8 * n if rv is not None else 0)
    got = np.frombuffer(payload, vectors.dtype, vectors.size, off).reshape(vectors.shape)
    assert np.array_equal(got, vectors)


def test_schema_file_and_fingerprint_match_code() -> None:
    on_disk = json.loads((SCHEMAS / "envelope.avsc").read_text())
    assert on_disk == wire.SCHEMA
    canonical = fastavro.schema.to_parsing_canonical_form(fastavro.parse_schema(on_disk))
    assert canonical == wire.CANONICAL_FORM
    fp = fastavro.schema.fingerprint(canonical, "CRC-64-AVRO")
    assert bytes.fromhex(fp) == wire.MAGIC[2:]


def test_marker_decodes_with_empty_keys() -> None:
    m = wire.decode(wire.encode_marker("user", 12, partition=2, dim=8))
    assert m.is_marker and m.version == 12 and m.partition == 2
    assert m.keys.shape == (0,) and m.vectors.shape == (0, 8)


def test_dense_round_trip() -> None:
    torch = pytest.importorskip("torch")
    state = {"mlp.0.weight": torch.randn(8, 4), "mlp.0.bias": torch.zeros(8), "steps": np.arange(3)}
    m = wire.decode(wire.encode_dense(state, 4))
    assert m.is_dense and m.version == 4 and set(m.tensors) == set(state)
    assert np.array_equal(m.tensors["mlp.0.weight"], state["mlp.0.weight"].numpy())
    assert m.tensors["steps"].dtype == np.int64


def test_messages_stay_under_kafka_limit_when_split_by_publisher() -> None:
    # The publisher sizes batches by MAX_MESSAGE_BYTES; the header allowance must cover the header.
    data = wire.encode_update(
        "t" * 200, np.arange(10), np.zeros((10, 4), np.float32), 2**62, run_id="r" * 64
    )
    assert len(data) - (10 * 8 + 10 * 16) < 1024


GOOD = wire.encode_update("user", np.arange(4), np.ones((4, 3), np.float32), 7)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "shorter than the 10-byte header"),
        (b"hello world, not avro", "C3 01"),
        (b"\xc3\x01" + b"\x00" * 8 + GOOD[10:], "fingerprint"),
        (GOOD[:-5], "bytes but only"),
        (GOOD + b"xx", "trailing bytes"),
        (GOOD[:12], "truncated"),
    ],
)
def test_garbage_raises_clear_error(data: bytes, fragment: str) -> None:
    with pytest.raises(StreamHPSError) as ei:
        wire.decode(data)
    assert isinstance(ei.value, WireError)
    assert fragment in str(ei.value)


def test_unknown_schema_is_schema_version_error() -> None:
    with pytest.raises(SchemaVersionError):
        wire.decode(b"\xc3\x01" + b"\x01" * 8 + GOOD[10:])


def test_none_value_is_wire_error() -> None:
    with pytest.raises(WireError, match="no value"):
        wire.decode(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", ">f4"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_any_bad_element(dtype: str, bad: float) -> None:
    """On the exponent bits (native widths) or numpy (a big-endian array): every bad element
    in any position, read-only and strided arrays too; the extremes of the finite range pass."""
    a = np.random.default_rng(0).standard_normal((50, 9)).astype(dtype)
    assert wire.all_finite(a)
    a[37, 4] = bad
    assert not wire.all_finite(a)
    assert not wire.all_finite(a[30:, 4:])  # a strided view of it
    view = a.view()
    view.flags.writeable = False
    assert not wire.all_finite(view)
    info = np.finfo(a.dtype)
    for fine in (info.max, -info.max, info.smallest_subnormal, -0.0):
        a[37, 4] = fine
        assert wire.all_finite(a), fine
    assert wire.all_finite(a[:0])


@settings(max_examples=60, deadline=None)
@given(batch=batches(), seed=st.integers(0, 1000))
def test_gathering_encoder_matches_plain_encoder(batch, seed) -> None:
    keys, vectors, rv = batch
    rows = np.random.default_rng(seed).permutation(len(keys))[: max(0, len(keys) - 3)]
    kw = {"partition": 2, "run_id": "r", "producer_seq": 9, "publish_ts_us": 123}
    plain = wire.encode_update(
        "t", keys[rows], vectors[rows], 5, row_versions=None if rv is None else rv[rows], **kw
    )
    gathered = wire.encode_update_rows("t", keys, vectors, rows, 5, row_versions=rv, **kw)
    assert gathered.tobytes() == plain
    m = wire.decode(gathered.tobytes())
    assert np.array_equal(m.keys, keys[rows])
