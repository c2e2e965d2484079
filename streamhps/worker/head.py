"""The head of the stream: a thread that asks the broker for the end of every served partition.

Staleness is measured against these heads (:mod:`streamhps.worker.staleness`); when the broker
cannot be reached no probe lands and staleness grows until the worker turns not ready. A head
below the worker's position means the broker lost the partition's history (topic recreated or
broker restarted): reported once per partition, and the tracker rereads it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import TopicPartition
from confluent_kafka.admin import OffsetSpec

from streamhps.kafka import make_admin
from streamhps.worker.staleness import LagTracker

log = logging.getLogger(__name__)


class HeadProbe:
    """Probes ``partitions`` (topic -> (table, partitions)) every ``interval_s`` until stopped."""

    def __init__(
        self,
        kafka: Mapping[str, Any],
        partitions: Mapping[str, tuple[str, list[int]]],
        tracker: LagTracker,
        interval_s: float,
        timeout_s: float,
    ) -> None:
        self.kafka = dict(kafka)
        self.partitions = partitions
        self.tracker = tracker
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> HeadProbe:
        self._thread = threading.Thread(target=self._run, name="streamhps-probe", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        admin = make_admin(self.kafka)
        tps = [TopicPartition(topic, p) for topic, (_, ps) in self.partitions.items() for p in ps]
        names = {topic: name for topic, (name, _) in self.partitions.items()}
        lost_reported: set[tuple[str, int]] = set()
        timeout = self.timeout_s
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                futs = admin.list_offsets(
                    {tp: OffsetSpec.latest() for tp in tps}, request_timeout=timeout
                )
                got = {
                    (tp.topic, tp.partition): f.result(timeout=timeout).offset
                    for tp, f in futs.items()
                }
            except Exception as e:  # noqa: BLE001 - the broker is unreachable: staleness grows
                log.debug("head probe failed: %s", e)
                self._stop.wait(self.interval_s)
                continue
            positions = {name: self.tracker.position(name) for name in names.values()}
            # the consumer's watermarks as the ingest thread last read them (never the consumer
            # itself from this thread: see streamhps.worker.staleness)
            fetched = {name: self.tracker.fetched_high_watermarks(name) for name in names.values()}
            for (topic, p), hw in got.items():
                name = names[topic]
                cached = int(fetched[name][p])
                head = max(int(hw), cached)
                pos = int(positions[name][p])
                if cached >= 0 and head < pos and (topic, p) not in lost_reported:
                    lost_reported.add((topic, p))
                    self.tracker.note_history_lost(name, p, pos, head)
                    log.error(
                        "broker history lost: %s[%d] ends at offset %d but this worker is at %d "
                        "(topic recreated or broker restarted); it rereads the partition from the "
                        "beginning, keeping its cache", topic, p, head, pos,
                    )  # fmt: skip
                self.tracker.probed(name, p, head, sent)
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - sent)))
