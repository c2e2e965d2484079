"""The dead-letter writer: rejected messages go to ``<topic>.dlq``, acknowledged before moving on.

Only the processor writes dead letters (one copy per bad message: each partition has one
processor); workers reject the same messages for the same reasons
(:mod:`streamhps.validation`) and count them. A dead letter keeps the original key and value
bytes and carries the headers (``schemas/README.md``):

* ``reason``: a :class:`~streamhps.validation.Reason` value;
* ``detail``: what exactly was wrong, for the operator (at most 1000 bytes);
* ``source_topic``, ``source_partition``, ``source_offset``: where the message was;
* ``value_truncated_from``: only on the dead letter of a message larger than the writer may
  send (``oversized``): its value is cut to that size, this header holds the original length,
  and the whole message is still at its source coordinates. Refusing to cut it would stall
  the partition behind a dead letter the broker never takes.

:meth:`DeadLetterWriter.send` returns only once the broker acknowledged every dead letter, so
the caller may then commit the offsets past them: a crash never loses a bad message.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaError

from streamhps.config import dlq_topic
from streamhps.errors import PublishError
from streamhps.validation import Rejected

log = logging.getLogger(__name__)

DETAIL_MAX_BYTES = 1000


def dead_letter_headers(msg: Any, rejected: Rejected) -> list[tuple[str, bytes]]:
    """The headers of the dead letter of the consumed message ``msg``."""
    return [
        ("reason", str(rejected.reason).encode()),
        ("detail", rejected.detail.encode()[:DETAIL_MAX_BYTES]),
        ("source_topic", msg.topic().encode()),
        ("source_partition", str(msg.partition()).encode()),
        ("source_offset", str(msg.offset()).encode()),
    ]


class DeadLetterWriter:
    """Produces rejected messages to their topic's DLQ through ``producer`` (an idempotent
    confluent-kafka Producer: a retry neither duplicates nor reorders dead letters).

    ``on_failure`` is called between attempts (the processor recreates missing DLQ topics).
    """

    def __init__(
        self,
        producer: Any,
        *,
        attempts: int = 3,
        flush_timeout_s: float = 15.0,
        on_failure: Callable[[], None] | None = None,
        max_value_bytes: int | None = None,
    ) -> None:
        self._producer = producer
        # room for the key and the headers inside the producer's message.max.bytes
        self.max_value_bytes = None if max_value_bytes is None else max(0, max_value_bytes - 8192)
        self.attempts = attempts
        self.flush_timeout_s = flush_timeout_s
        self._on_failure = on_failure
        self.sent: Counter[str] = Counter()
        self._errors: list[str] = []

    def send(self, items: Sequence[tuple[Any, Rejected]]) -> None:
        """Dead-letter every ``(consumed message, rejection)`` and wait for the acks.

        Raises :class:`~streamhps.errors.PublishError` if some are still unacknowledged after
        ``attempts`` tries: the caller must not commit the offsets past them.
        """
        pending = list(items)
        for attempt in range(self.attempts):
            self._errors = []
            failed: list[tuple[Any, Rejected]] = []
            for item in pending:
                m, rejected = item
                log.warning(
                    "%s[%d]@%d -> DLQ (%s): %s",
                    m.topic(), m.partition(), m.offset(), rejected.reason, rejected.detail,
                )  # fmt: skip
                self._produce(item, failed)
            remaining = self._producer.flush(self.flush_timeout_s)
            if not failed and not remaining:
                for _, rejected in pending:
                    self.sent[str(rejected.reason)] += 1
                return
            log.error(
                "DLQ delivery failed for %d message(s) (attempt %d): %s",
                len(failed) or remaining, attempt + 1, self._errors[:3],
            )  # fmt: skip
            if self._on_failure is not None:
                self._on_failure()
            pending = failed or pending
        raise PublishError(
            f"cannot deliver {len(pending)} message(s) to the DLQ: {self._errors[:3]}"
        )

    def _produce(self, item: tuple[Any, Rejected], failed: list[tuple[Any, Rejected]]) -> None:
        m, rejected = item
        topic = dlq_topic(m.topic())

        def on_delivery(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                self._errors.append(f"{topic}: {err.str()}")
                failed.append(item)

        value = m.value()
        headers = dead_letter_headers(m, rejected)
        if (
            value is not None
            and self.max_value_bytes is not None
            and len(value) > self.max_value_bytes
        ):
            headers.append(("value_truncated_from", str(len(value)).encode()))
            value = value[: self.max_value_bytes]
        while True:
            try:
                self._producer.produce(
                    topic, value, key=m.key(), headers=headers, on_delivery=on_delivery
                )
                return
            except BufferError:
                self._producer.poll(0.05)

    @property
    def count(self) -> int:
        return sum(self.sent.values())
