"""The processor as a faust-streaming worker: faust owns the process, the consumer loop the data.

``streamhps processor`` runs :func:`run_worker`: a faust ``App`` whose own Kafka consumer,
producer, conductor and table manager are off (``BootStrategy(app, enable_kafka=False)``) and
whose one service, :class:`ProcessorService`, runs the consumer loop of :mod:`.loop` in a
thread. faust gives the process its worker lifecycle (SIGTERM/SIGINT stop every service in
order and the loop finishes its batch; a loop that dies stops the worker with its error), a
web server and a timer:

    GET /metrics    Prometheus text: messages, rows in/written, DLQ, batches, history lost,
                    applied version per table, whether the loop is running
    GET /healthz    200 while the consumer loop runs, 503 otherwise
    timer           a progress log line every ``[processor] progress_interval_s``

The web server binds ``127.0.0.1`` on a port free at start unless told otherwise (several
processors, one per shard, share a host); its address is logged. faust's data directory is
``<store>/faust`` (faust's empty directories only: the app has no faust tables).

Why the loop and not a faust agent: faust seeks every assigned partition back to its
*Kafka*-committed offset after assignment (``Consumer.perform_seek`` from table recovery),
overriding a seek to the LMDB offset in ``on_partitions_assigned``, and an agent is a
consumer-group member whose partitions wait for the group to rebalance after ``kill -9`` (a
prototype agent with ``perform_seek`` overridden resumed in 2.8 s, as a static member in
~9.8 s). Hosted by faust, the loop resumes 0.92-0.97 s after ``kill -9`` (median; worst
1.37 s; bare loop 0.57-0.58 s) at 96-108 % of the bare loop's median rows/s, 0 rows lost or
replayed (``bench/processor_faust.py``, three runs, 2 cores, embedded broker).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faust
from faust.app.base import BootStrategy
from faust.web import Request, Response, View
from mode import Service

from streamhps.config import Config
from streamhps.errors import StoreError, StreamHPSError
from streamhps.processor.loop import Processor

log = logging.getLogger(__name__)

DEFAULT_WEB_HOST = "127.0.0.1"


def free_port(host: str) -> int:
    """A port free on ``host`` now (faust refuses port 0; the short race is accepted)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ProcessorService(Service):
    """Runs :meth:`Processor.run` in a thread for as long as the faust worker runs.

    Stopping the service stops the loop (it finishes its batch and closes the store); the
    loop ending on its own, with an error or without, crashes the worker, which then exits.
    """

    def __init__(self, processor: Processor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.processor = processor
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def on_start(self) -> None:
        loop = asyncio.get_running_loop()

        def run() -> None:
            try:
                self.processor.run()
            except BaseException as e:  # noqa: BLE001 - handed to the worker below
                self.error = e
            loop.call_soon_threadsafe(self._loop_ended)

        self._thread = threading.Thread(target=run, name="processor", daemon=True)
        self._thread.start()

    def _loop_ended(self) -> None:
        if self.should_stop:
            return  # asked to stop: on_stop is joining the thread
        if self.error is None:
            self.error = StreamHPSError("the processor's consumer loop ended without being asked")
        asyncio.ensure_future(self.crash(self.error))

    async def on_stop(self) -> None:
        self.processor.stop()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)


class ProcessorApp:
    """The faust ``App`` of one processor shard, its :class:`ProcessorService` and web views."""

    def __init__(
        self,
        config: Config,
        store_dir: str,
        *,
        shard: tuple[int, int] = (0, 1),
        web_host: str = DEFAULT_WEB_HOST,
        web_port: int = 0,
    ) -> None:
        self.processor = Processor(config, store_dir, shard=shard)
        i, n = shard
        datadir = Path(store_dir) / "faust"
        try:  # faust creates its datadir (no parents) before the loop opens the store
            datadir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # as LmdbStore.open
        except OSError as e:
            raise StoreError(f"cannot create the store directory {store_dir}: {e}") from None
        self.app = faust.App(
            f"{config.topic_prefix}.processor.{i}-of-{n}",
            autodiscover=False,
            datadir=str(datadir),
            web_enabled=True,
            web_bind=web_host,
            web_host=web_host,
            web_port=web_port or free_port(web_host),
            web_in_thread=False,
            web_router_enabled=False,  # key -> worker routing of faust tables: there are none
            web_tables_enabled=False,
        )
        # faust's own consumer would join a group and seek to Kafka's offsets; the loop owns Kafka.
        self.app.boot_strategy = BootStrategy(self.app, enable_kafka=False, enable_sensors=False)
        self.service = ProcessorService(self.processor)
        # the first child of the app: the loop starts before faust's web server and timers
        self.app.add_dependency(self.service)
        self._last_progress = (0, time.monotonic())

        async def metrics(web: View, request: Request) -> Response:
            return web.text(self.metrics_text(), content_type="text/plain; version=0.0.4")

        async def healthz(web: View, request: Request) -> Response:
            if self.service.running:
                return web.text("ok\n")
            return web.text("consumer loop not running\n", status=503)

        self.app.page("/metrics")(metrics)
        self.app.page("/healthz")(healthz)
        self.app.timer(config.processor.progress_interval_s)(self._progress)

    @property
    def web_address(self) -> tuple[str, int] | None:
        """``(host, port)`` the web server listens on, once it is started (the bound port)."""
        runner = getattr(self.app.web, "_runner", None)
        addresses = getattr(runner, "addresses", None) or []
        for addr in addresses:
            if isinstance(addr, tuple) and len(addr) >= 2:
                return str(addr[0]), int(addr[1])
        return None

    def metrics_text(self) -> str:
        s = self.processor.stats
        shard = "%d/%d" % self.processor.shard
        lines = []
        for name, help_, value in (
            ("messages_total", "table messages consumed (good ones)", s.messages),
            ("rows_in_total", "rows of the consumed messages", s.rows_in),
            ("rows_written_total", "rows written to LMDB (newer than held)", s.rows_written),
            ("dlq_total", "messages sent to the dead-letter topic", s.dlq),
            ("batches_total", "LMDB write transactions committed", s.batches),
            ("history_lost_total", "partitions whose broker history was lost", s.history_lost),
        ):
            metric = f"streamhps_processor_{name}"
            lines += [f"# HELP {metric} {help_}", f"# TYPE {metric} counter",
                      f'{metric}{{shard="{shard}"}} {value}']  # fmt: skip
        metric = "streamhps_processor_applied_version"
        lines += [f"# HELP {metric} highest complete version applied to LMDB",
                  f"# TYPE {metric} gauge"]  # fmt: skip
        for table, version in sorted(s.applied.items()):
            if version is not None:
                lines.append(f'{metric}{{shard="{shard}",table="{table}"}} {version}')
        metric = "streamhps_processor_running"
        lines += [f"# HELP {metric} 1 while the consumer loop runs", f"# TYPE {metric} gauge",
                  f'{metric}{{shard="{shard}"}} {int(self.service.running)}']  # fmt: skip
        return "\n".join(lines) + "\n"

    async def _progress(self) -> None:
        s = self.processor.stats
        rows, then = self._last_progress
        now = time.monotonic()
        self._last_progress = (s.rows_in, now)
        log.info(
            "processor: %.0f rows/s in, %d rows written, %d messages, %d to DLQ, applied versions %s",
            (s.rows_in - rows) / max(now - then, 1e-9), s.rows_written, s.messages, s.dlq, s.applied,
        )  # fmt: skip


class ProcessorWorker(faust.Worker):
    """faust's worker, closing its event loop without mode's extra second of sleep."""

    async def _sentinel_task(self) -> None:
        # mode sleeps 1 s here before closing the event loop; every service has stopped by then
        await asyncio.sleep(0.05)


def run_worker(
    processor_app: ProcessorApp, *, on_ready: Callable[[ProcessorApp], None] | None = None
) -> None:
    """Run the faust worker until SIGTERM/SIGINT; re-raise the consumer loop's error, if any.

    ``on_ready(processor_app)`` is called once the web server listens and the loop started.
    """
    app = processor_app.app

    @app.task
    async def _ready() -> None:
        if processor_app.service.error is not None:
            return  # the loop already failed: the worker is stopping
        addr = processor_app.web_address
        log.info("processor web server at http://%s:%s (/metrics, /healthz)", *(addr or ("?", "?")))
        if on_ready is not None:
            on_ready(processor_app)

    worker = ProcessorWorker(
        app, quiet=True, override_logging=False, redirect_stdouts=False, loglevel=None
    )
    worker.spinner = None  # the CLI prints; a spinner would write terminal escapes into logs
    code: Any = 0
    cause: BaseException | None = None
    try:
        worker.execute_from_commandline()
    except SystemExit as e:  # mode exits; the caller decides from the outcome below
        code, cause = e.code, e.__context__
    err = processor_app.service.error or worker.crash_reason
    if err is not None:
        raise err
    if code not in (0, None):  # faust itself failed (e.g. the web port is taken)
        raise StreamHPSError(f"the processor's faust worker failed: {cause}") from cause
