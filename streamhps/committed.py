"""The committed version of each table, read back from the stream's commit markers.

A trainer that restarts with no memory of what it committed would publish versions every tier
drops as older. :func:`read_committed_versions` finds, per table, the highest version a
commit marker on any partition of ``<prefix>.<table>`` carries: the publisher learns it on
start and refuses lower versions.

The markers are near the end of each partition (one per commit per partition), so each
partition is read backwards in growing windows from its high watermark until a marker is
found or its log start is reached: a partition of a finished commit costs one small fetch,
a partition whose tail holds rows of an unfinished version a few more. The first window is
read to the end of the partition that the fetch reports, not to the listed high watermark:
the embedded broker (Tansu) can list a watermark one batch short of the log end.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from streamhps.config import TableSpec, table_topic
from streamhps.errors import PublishError
from streamhps.kafka import make_admin, make_consumer
from streamhps.validation import Rejected, check_table_message

log = logging.getLogger(__name__)

_FIRST_WINDOW = 16  # messages read back from the end of a partition at first; x4 per retry


def read_committed_versions(
    kafka_config: Mapping[str, Any],
    prefix: str,
    tables: Iterable[TableSpec],
    *,
    timeout: float = 30.0,
) -> dict[str, int]:
    """Table -> the highest committed version found on its topic (tables with no marker, or no
    topic yet, are absent). Raises :class:`PublishError` if the broker does not answer within
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    topics = {table_topic(prefix, t.name): t for t in tables}
    bootstrap = kafka_config.get("bootstrap.servers")
    # Listing every topic, not the wanted ones: a metadata request naming a topic may create it.
    try:
        md = make_admin(kafka_config).list_topics(timeout=max(0.1, deadline - time.monotonic()))
    except KafkaException as e:
        raise PublishError(
            f"cannot read the committed versions from the broker at {bootstrap}: {e}. Start the "
            "broker, or tell the Publisher where to resume (last_committed_version=...) or that "
            "this is a new numbering (learn_committed=False)"
        ) from e
    partitions = {
        name: len(md.topics[name].partitions)
        for name in topics
        if name in md.topics and md.topics[name].error is None
    }
    found: dict[str, int] = {}
    if not partitions:
        return found
    consumer = make_consumer(
        kafka_config,
        overrides={
            "group.id": f"streamhps-committed-{uuid.uuid4().hex[:12]}",  # never joins: assign()
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,  # the end of a partition answers at once, not after 500 ms
            "auto.offset.reset": "earliest",
        },
    )
    try:
        for topic, n in partitions.items():
            spec = topics[topic]
            best = _scan_topic(consumer, topic, spec, n, deadline, bootstrap)
            if best is not None:
                found[spec.name] = best
    finally:
        consumer.close()
    log.info("committed versions on the stream under prefix %r: %s", prefix, found or "none")
    return found


def _scan_topic(
    consumer: Any, topic: str, spec: TableSpec, n: int, deadline: float, bootstrap: Any
) -> int | None:
    # partition -> (log start, end of the window still to read)
    todo: dict[int, tuple[int, int]] = {}
    for p in range(n):
        try:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=max(0.1, deadline - time.monotonic())
            )
        except KafkaException as e:
            raise PublishError(
                f"cannot read the watermarks of {topic}[{p}] at {bootstrap}: {e}"
            ) from e
        if high > low:
            todo[p] = (low, high)
    best: int | None = None
    window = _FIRST_WINDOW
    first = True
    while todo:
        starts = {p: max(low, end - window) for p, (low, end) in todo.items()}
        ends: dict[int, int | None] = {p: None if first else e for p, (_, e) in todo.items()}
        first = False
        marks = _last_markers(consumer, topic, spec, starts, ends, deadline, bootstrap)
        if marks:
            newest = max(marks.values())
            best = newest if best is None else max(best, newest)
        # A partition's last marker is its newest commit; the others read further back.
        todo = {
            p: (todo[p][0], starts[p]) for p in todo if p not in marks and starts[p] > todo[p][0]
        }
        window *= 4
    return best


def _last_markers(
    consumer: Any,
    topic: str,
    spec: TableSpec,
    starts: Mapping[int, int],
    ends: Mapping[int, int | None],
    deadline: float,
    bootstrap: Any,
) -> dict[int, int]:
    """Partition -> version of the last marker in offsets ``[start, end)`` (if any); an end of
    None reads to the end of the partition."""
    consumer.assign([TopicPartition(topic, p, o) for p, o in starts.items()])
    pending = set(starts)
    found: dict[int, int] = {}
    while pending:
        if time.monotonic() > deadline:
            raise PublishError(
                f"timed out reading the commit markers of {topic} at {bootstrap} (partitions "
                f"{sorted(pending)} unread); tell the Publisher where to resume with "
                "last_committed_version=..."
            )
        for m in consumer.consume(num_messages=256, timeout=0.05):
            p = m.partition()
            if p not in pending:
                continue
            err = m.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    pending.discard(p)
                    continue
                log.warning("reading %s[%d] for commit markers: %s", topic, p, err.str())
                continue
            off = m.offset()
            end = ends[p]
            if end is not None and off >= end:
                pending.discard(p)
                continue
            # What the processor would reject (poison, another table's marker) commits nothing.
            msg = check_table_message(m.value(), spec, p, ())
            if not isinstance(msg, Rejected) and msg.is_marker:
                found[p] = msg.version  # offsets rise: the last one seen is the newest
            if end is not None and off >= end - 1:
                pending.discard(p)
    consumer.unassign()
    return found
