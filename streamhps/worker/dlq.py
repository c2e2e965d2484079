"""Dead letters: messages the worker cannot apply go to ``<topic>.dlq`` and ingestion moves on.

Each dead letter keeps the original key and value bytes and carries the headers ``reason``
(``wire.check_update``'s reasons, ``undecodable`` or ``unknown_table``), ``source_topic``,
``source_partition``, ``source_offset`` and ``dlq_origin`` (``worker``; the processor routes
the same messages to the same topic, so the origin tells the two copies apart). The producer
is idempotent: a retry neither duplicates nor reorders dead letters.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, Producer

from streamhps.config import dlq_topic

log = logging.getLogger(__name__)

_CONSUMER_ONLY = ("group.", "auto.offset", "enable.auto", "session.timeout", "fetch.", "max.poll",
                  "isolation.level", "enable.partition.eof", "queued.")  # fmt: skip


class DeadLetters:
    """Routes unusable messages to their topic's DLQ. ``send`` is called from one thread."""

    def __init__(self, kafka_config: Mapping[str, Any], *, origin: str = "worker") -> None:
        conf = {k: v for k, v in kafka_config.items() if not k.startswith(_CONSUMER_ONLY)}
        conf.update({"enable.idempotence": True, "acks": "all", "linger.ms": 5})
        self._producer = Producer(conf, logger=logging.getLogger("streamhps.kafka"))
        self.origin = origin
        self.sent: Counter[str] = Counter()
        self.failed = 0
        self._lock = threading.Lock()

    def send(self, msg: Any, reason: str) -> None:
        """Queue a copy of the confluent-kafka message ``msg`` with the DLQ headers."""
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        headers = [
            ("reason", reason.encode()),
            ("source_topic", topic.encode()),
            ("source_partition", str(partition).encode()),
            ("source_offset", str(offset).encode()),
            ("dlq_origin", self.origin.encode()),
        ]
        log.warning("dead letter %s[%d]@%d: %s", topic, partition, offset, reason)
        while True:
            try:
                self._producer.produce(
                    dlq_topic(topic),
                    msg.value(),
                    key=msg.key(),
                    headers=headers,
                    on_delivery=self._delivered,
                )
                break
            except BufferError:
                self._producer.poll(0.05)
        self._producer.poll(0)
        with self._lock:
            self.sent[reason] += 1

    def poll(self) -> None:
        self._producer.poll(0)

    def flush(self, timeout: float = 5.0) -> int:
        """Wait for acknowledgements; returns how many are still unacknowledged."""
        return int(self._producer.flush(timeout))

    def _delivered(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            with self._lock:
                self.failed += 1
            log.error("dead letter to %s was not acknowledged: %s", msg.topic(), err.str())

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self.sent.values())
