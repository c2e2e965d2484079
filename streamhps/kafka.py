"""Every Kafka client streamhps makes is built here, from the deployment's one ``[kafka]`` table.

::

    producer = make_producer(config.kafka)                      # publisher, dead letters
    consumer = make_consumer(config.kafka, overrides={"group.id": "..."})
    admin = make_admin(config.kafka)                            # topics, head probes

``[kafka]`` holds librdkafka keys (``CONFIGURATION.md`` of librdkafka) for every process. A
key librdkafka scopes to producers (``P``) is dropped from consumer and admin configs, one
scoped to consumers (``C``) from producer and admin configs; every other key reaches every
client unchanged: ``bootstrap.servers``, ``client.id``, ``security.protocol``, ``sasl.*``,
``ssl.*`` and the rest of librdkafka's global (``*``) properties. So one TLS/SASL setup in the
config secures the publisher, the processor (consumer, admin, dead-letter producer), every
worker (consumer, head-probe admin) and ``streamhps topics``.

Precedence, lowest first: the role's defaults below (or the caller's ``defaults``), the
``[kafka]`` keys of the role, the caller's ``overrides`` (what the caller's correctness rests
on, e.g. a consumer that never auto-commits). Every client logs through the
``streamhps.kafka`` logger.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

Role = Literal["producer", "consumer", "admin"]

#: librdkafka properties of scope ``P`` (global and topic tables), plus confluent-kafka's
#: producer-only ``on_delivery``.
PRODUCER_ONLY = frozenset({
    "transactional.id", "transaction.timeout.ms", "enable.idempotence", "enable.gapless.guarantee",
    "queue.buffering.max.messages", "queue.buffering.max.kbytes", "queue.buffering.max.ms",
    "linger.ms", "message.send.max.retries", "retries", "queue.buffering.backpressure.threshold",
    "compression.codec", "compression.type", "compression.level", "batch.num.messages",
    "batch.size", "delivery.report.only.error", "dr_cb", "dr_msg_cb",
    "sticky.partitioning.linger.ms", "request.required.acks", "acks", "request.timeout.ms",
    "message.timeout.ms", "delivery.timeout.ms", "queuing.strategy", "produce.offset.report",
    "partitioner", "partitioner_cb", "msg_order_cmp", "on_delivery",
})  # fmt: skip

#: librdkafka properties of scope ``C`` (global and topic tables), plus confluent-kafka's
#: consumer-only ``on_commit``.
CONSUMER_ONLY = frozenset({
    "group.id", "group.instance.id", "partition.assignment.strategy", "session.timeout.ms",
    "heartbeat.interval.ms", "group.protocol.type", "group.protocol", "group.remote.assignor",
    "coordinator.query.interval.ms", "max.poll.interval.ms", "enable.auto.commit",
    "auto.commit.interval.ms", "auto.commit.enable", "enable.auto.offset.store",
    "queued.min.messages", "queued.max.messages.kbytes", "fetch.wait.max.ms",
    "fetch.queue.backoff.ms", "fetch.message.max.bytes", "max.partition.fetch.bytes",
    "fetch.max.bytes", "fetch.min.bytes", "fetch.error.backoff.ms", "offset.store.method",
    "offset.store.path", "offset.store.sync.interval.ms", "isolation.level", "consume_cb",
    "rebalance_cb", "offset_commit_cb", "enable.partition.eof", "check.crcs",
    "auto.offset.reset", "consume.callback.max.messages", "on_commit",
})  # fmt: skip

_FOREIGN: dict[str, frozenset[str]] = {
    "producer": CONSUMER_ONLY,
    "consumer": PRODUCER_ONLY,
    "admin": PRODUCER_ONLY | CONSUMER_ONLY,
}

#: Producer defaults; ``[kafka]`` keys win.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,  # implies acks=all and ordered retries per partition
    "acks": "all",
    "linger.ms": 5,
    "queue.buffering.max.kbytes": 1 << 20,  # 1 GiB of queued batches before produce() blocks
    "message.max.bytes": 1 << 20 | 4096,
    "message.timeout.ms": 30_000,  # an unacknowledged message fails (and flush raises) after this
}

#: Consumer settings nothing may change: offsets live in LMDB (invariant 5), never in Kafka's
#: auto-commit.
CONSUMER_FIXED: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
}

_LOG = logging.getLogger("streamhps.kafka")


def client_config(
    kafka_config: Mapping[str, Any],
    role: Role,
    *,
    defaults: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The librdkafka config of a ``role`` client: defaults < ``[kafka]`` keys of the role <
    overrides (see the module docstring)."""
    foreign = _FOREIGN[role]
    if defaults is None:
        defaults = PRODUCER_DEFAULTS if role == "producer" else {}
    fixed = CONSUMER_FIXED if role == "consumer" else {}
    mine = {k: v for k, v in kafka_config.items() if k not in foreign}
    return {**defaults, **mine, **fixed, **dict(overrides or {})}


def max_message_bytes(kafka_config: Mapping[str, Any]) -> int:
    """The largest message the deployment's producers may send (``message.max.bytes``): a
    consumed message above it was not written by a streamhps publisher and is refused."""
    return int(kafka_config.get("message.max.bytes", PRODUCER_DEFAULTS["message.max.bytes"]))


def make_producer(
    kafka_config: Mapping[str, Any],
    *,
    defaults: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Producer:
    conf = client_config(kafka_config, "producer", defaults=defaults, overrides=overrides)
    return Producer(conf, logger=_LOG)


def make_consumer(
    kafka_config: Mapping[str, Any],
    *,
    defaults: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Consumer:
    conf = client_config(kafka_config, "consumer", defaults=defaults, overrides=overrides)
    return Consumer(conf, logger=_LOG)


def make_admin(kafka_config: Mapping[str, Any]) -> AdminClient:
    return AdminClient(client_config(kafka_config, "admin"), logger=_LOG)


__all__ = [
    "CONSUMER_FIXED",
    "CONSUMER_ONLY",
    "PRODUCER_DEFAULTS",
    "PRODUCER_ONLY",
    "client_config",
    "make_admin",
    "make_consumer",
    "make_producer",
    "max_message_bytes",
]
