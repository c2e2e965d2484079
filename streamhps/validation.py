"""Whether a consumed message may be applied: the one decision the processor and the worker share.

::

    verdict = check_table_message(msg.value(), spec, msg.partition(), known_tables)
    if isinstance(verdict, Rejected):
        ...  # verdict.reason is a Reason (the DLQ ``reason`` header), verdict.detail says why
    else:
        ...  # verdict is the decoded wire.Message

The checks, in order (the first that fails names the reason): the message is no larger than
the deployment's ``message.max.bytes`` (``oversized``), the bytes decode
(``undecodable``, ``schema_version``), the kind fits the topic (``unexpected_kind``), the
table is the topic's (``wrong_table``, ``unknown_table``), the version is positive
(``version_not_positive``), the rows fit the table (``wrong_dim``, ``wrong_dtype``,
``non_finite``) and the partition (``wrong_partition``: the envelope's partition and every
key's hash must be the Kafka partition the message is in; schemas/PARTITIONING.md).

The processor routes a rejected message to ``<topic>.dlq`` (:mod:`streamhps.deadletters`);
a worker skips it and counts it by reason (``InferenceWorker.stats()["rejected"]``), so a
message rejected by one is rejected by the other for the same reason and no tier ever holds
its rows.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from streamhps import wire
from streamhps.config import TableSpec
from streamhps.errors import SchemaVersionError, WireError
from streamhps.partitioning import first_outside, partition_of


class Reason(StrEnum):
    """Why a message was rejected; the value is the DLQ ``reason`` header (schemas/README.md)."""

    OVERSIZED = "oversized"  # larger than the deployment's producers may send
    UNDECODABLE = "undecodable"  # not a streamhps message (garbage, truncated, empty, tombstone)
    SCHEMA_VERSION = "schema_version"  # written with a schema this reader does not know
    UNEXPECTED_KIND = "unexpected_kind"  # DENSE on a table topic, or rows on the dense topic
    UNKNOWN_TABLE = "unknown_table"  # names a table the config does not have
    WRONG_TABLE = "wrong_table"  # names another configured table than the topic's
    VERSION_NOT_POSITIVE = "version_not_positive"  # version (or a row version) <= 0
    WRONG_DIM = "wrong_dim"
    WRONG_DTYPE = "wrong_dtype"
    NON_FINITE = "non_finite"  # a NaN or Inf in the vectors
    WRONG_PARTITION = "wrong_partition"  # rows of another partition than the one it is in


@dataclass(frozen=True)
class Rejected:
    """A message that must not be applied: the reason, and a detail for the operator."""

    reason: Reason
    detail: str


def check_rows(msg: wire.Message, spec: TableSpec) -> Rejected | None:
    """Why the decoded update or marker ``msg`` cannot be applied to ``spec``, or None."""
    if msg.version <= 0:
        return Rejected(Reason.VERSION_NOT_POSITIVE, f"version {msg.version} <= 0")
    if msg.is_marker:
        return None
    if msg.dim != spec.dim:
        return Rejected(Reason.WRONG_DIM, f"dim {msg.dim}; table {spec.name!r} has {spec.dim}")
    if msg.dtype != spec.dtype:
        return Rejected(
            Reason.WRONG_DTYPE, f"dtype {msg.dtype}; table {spec.name!r} stores {spec.dtype}"
        )
    if msg.row_versions is not None and msg.row_count and int(msg.row_versions.min()) <= 0:
        return Rejected(Reason.VERSION_NOT_POSITIVE, "a row version <= 0")
    if msg.row_count and not wire.all_finite(msg.vectors):
        return Rejected(Reason.NON_FINITE, "NaN or Inf in the vectors")
    return None


def check_partition(msg: wire.Message, spec: TableSpec, partition: int) -> Rejected | None:
    """Why ``msg``, consumed from Kafka partition ``partition``, holds rows of another one."""
    if msg.partition != partition:
        return Rejected(
            Reason.WRONG_PARTITION,
            f"the envelope says partition {msg.partition}; the message is in {partition}",
        )
    if msg.row_count and spec.partitions > 1:
        if first_outside(msg.keys, spec.partitions, partition) < 0:
            return None
        parts = partition_of(msg.keys, spec.partitions)  # a wrong message: say how wrong
        wrong = np.flatnonzero(parts != partition)
        if wrong.size:
            return Rejected(
                Reason.WRONG_PARTITION,
                f"{wrong.size} key(s) hash to other partitions (first: key {int(msg.keys[wrong[0]])}"
                f" -> {int(parts[wrong[0]])}) in partition {partition}",
            )
    return None


def warm(dtypes: Iterable[Any]) -> None:
    """Compile (or load from numba's cache) the compiled checks of :func:`check_table_message`
    for rows of ``dtypes``, as a consumer's messages reach them (read-only arrays): when the
    consumer starts, not on its first message."""
    keys = np.zeros(1, dtype=np.int64)
    keys.flags.writeable = False
    first_outside(keys, 2, 0)
    for dt in {np.dtype(d) for d in dtypes}:
        rows = np.zeros((1, 1), dtype=dt)
        rows.flags.writeable = False
        wire.all_finite(rows)


def decode(value: bytes | None) -> wire.Message | Rejected:
    """The decoded message, or why its bytes are not one."""
    try:
        return wire.decode(value)  # None (a tombstone) raises WireError
    except SchemaVersionError as e:
        return Rejected(Reason.SCHEMA_VERSION, str(e))
    except WireError as e:
        return Rejected(Reason.UNDECODABLE, str(e))


def check_table_message(
    value: bytes | None,
    spec: TableSpec,
    partition: int,
    known_tables: Container[str],
    max_bytes: int | None = None,
) -> wire.Message | Rejected:
    """Decode and check a message consumed from partition ``partition`` of ``spec``'s topic.

    ``known_tables``: the configured table names (a message naming one of them on another
    table's topic is ``wrong_table``, any other name ``unknown_table``). ``max_bytes``: the
    deployment's ``message.max.bytes`` (:func:`streamhps.kafka.max_message_bytes`); a larger
    message is ``oversized`` (a raw producer with a raised limit wrote it).
    """
    if max_bytes is not None and value is not None and len(value) > max_bytes:
        return Rejected(
            Reason.OVERSIZED,
            f"{len(value)} bytes, over the deployment's message.max.bytes {max_bytes}",
        )
    msg = decode(value)
    if isinstance(msg, Rejected):
        return msg
    if msg.is_dense:
        return Rejected(Reason.UNEXPECTED_KIND, "a DENSE message on a table topic")
    if msg.table != spec.name:
        if msg.table in known_tables:
            return Rejected(
                Reason.WRONG_TABLE,
                f"a message of table {msg.table!r} on the topic of {spec.name!r}",
            )
        return Rejected(Reason.UNKNOWN_TABLE, f"table {msg.table!r} is not configured")
    return check_rows(msg, spec) or check_partition(msg, spec, partition) or msg


def check_dense_message(value: bytes | None) -> wire.Message | Rejected:
    """Decode and check a message consumed from the dense-model topic."""
    msg = decode(value)
    if isinstance(msg, Rejected):
        return msg
    if not msg.is_dense:
        return Rejected(Reason.UNEXPECTED_KIND, f"a {msg.kind} message on the dense topic")
    if msg.version <= 0:
        return Rejected(Reason.VERSION_NOT_POSITIVE, f"version {msg.version} <= 0")
    return msg


__all__ = [
    "Reason",
    "Rejected",
    "check_dense_message",
    "check_partition",
    "check_rows",
    "check_table_message",
    "decode",
    "warm",
]
