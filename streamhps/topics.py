"""Creating and checking the Kafka topics of a deployment.

For each table ``<prefix>.<table>`` (the table's partition count) and its dead-letter topic
``<prefix>.<table>.dlq``; one ``<prefix>.dense`` topic (1 partition) for dense-model updates.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from streamhps.config import TableSpec, dense_topic, dlq_topic, table_topic
from streamhps.errors import TopicError
from streamhps.kafka import make_admin

log = logging.getLogger(__name__)


def planned_topics(prefix: str, tables: Iterable[TableSpec]) -> dict[str, int]:
    """Topic name -> partition count for a deployment."""
    plan: dict[str, int] = {}
    for t in tables:
        topic = table_topic(prefix, t.name)
        plan[topic] = t.partitions
        plan[dlq_topic(topic)] = 1
    plan[dense_topic(prefix)] = 1
    return plan


def existing_partitions(admin: AdminClient, timeout: float = 10.0) -> dict[str, int]:
    try:
        md = admin.list_topics(timeout=timeout)
    except KafkaException as e:
        raise TopicError(f"cannot list topics: {e}; is the broker at bootstrap.servers up?") from e
    return {name: len(t.partitions) for name, t in md.topics.items() if t.error is None}


def ensure_topics(
    kafka_config: Mapping[str, Any],
    plan: Mapping[str, int],
    *,
    timeout: float = 15.0,
) -> list[str]:
    """Create every topic of ``plan`` that is missing; return the names created.

    Idempotent. Raises :class:`TopicError` if a topic exists with another partition count
    (rows would land in partitions that workers and the processor do not expect).
    """
    admin = make_admin(kafka_config)
    have = existing_partitions(admin, timeout)
    _check_counts(plan, have)
    missing = [NewTopic(name, num_partitions=n, replication_factor=-1)
               for name, n in plan.items() if name not in have]  # fmt: skip
    created: list[str] = []
    if missing:
        futures = admin.create_topics(missing, operation_timeout=timeout, request_timeout=timeout)
        for name, fut in futures.items():
            try:
                fut.result(timeout)
                created.append(name)
                log.info("created topic %s with %d partition(s)", name, plan[name])
            except KafkaException as e:
                if e.args and getattr(e.args[0], "name", lambda: "")() == "TOPIC_ALREADY_EXISTS":
                    continue  # raced with another creator; checked below
                raise TopicError(f"cannot create topic {name}: {e}") from e
    _check_counts(plan, existing_partitions(admin, timeout))
    return created


def _check_counts(plan: Mapping[str, int], have: Mapping[str, int]) -> None:
    for name, n in plan.items():
        if name in have and have[name] != n:
            raise TopicError(
                f"topic {name} exists with {have[name]} partitions but the config says {n}; "
                "keys would be routed to other partitions. Delete and recreate the topic, or set "
                f"partitions = {have[name]} for this table"
            )
