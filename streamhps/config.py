"""One typed configuration for every streamhps process.

Loaded from TOML (``--config PATH`` or ``$STREAMHPS_CONFIG``)::

    topic_prefix = "demo"
    [kafka]                       # librdkafka keys, passed through as they are
    "bootstrap.servers" = "127.0.0.1:9092"
    [[tables]]
    name = "user"
    dim = 64
    dtype = "float32"             # float32 | float16
    partitions = 4
    missing = "error"             # error | zeros | init:<seed>
    [serving]
    max_staleness_s = 1.0

``$STREAMHPS_BOOTSTRAP`` overrides ``kafka."bootstrap.servers"`` (tests and compose use it).
``[kafka]`` reaches every Kafka client of every process through :mod:`streamhps.kafka`
(``security.protocol``, ``sasl.*``, ``ssl.*`` included; role-only keys go to that role only).
Unknown keys are rejected with the key's name: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from streamhps.errors import ConfigError
from streamhps.wire import DTYPES

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,120}$")
_MISSING_RE = re.compile(r"^(error|zeros|init:\d+)$")

ENV_CONFIG = "STREAMHPS_CONFIG"
ENV_BOOTSTRAP = "STREAMHPS_BOOTSTRAP"
DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


_KINDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "bool": (bool, "true or false"),
    "int": (int, "an integer"),
    "float": ((int, float), "a number"),
    "str": (str, "a string"),
}


def _check_fields(obj: Any, where: str) -> None:
    """Each field's type and numeric ``_limits``; the error names ``<where><field>``."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        kind, what = _KINDS[str(f.type)]
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            raise ConfigError(f"{where}{f.name} must be {what}, got {value!r}")
        limits = f.metadata.get("schema", {})
        for key, op, ok in [
            ("minimum", ">=", lambda v, m: v >= m),
            ("maximum", "<=", lambda v, m: v <= m),
            ("exclusiveMinimum", ">", lambda v, m: v > m),
        ]:
            if key in limits and not ok(value, limits[key]):
                raise ConfigError(f"{where}{f.name} must be {op} {limits[key]}, got {value!r}")


def _limits(**schema: Any) -> dict[str, Any]:
    """Field metadata: the JSON Schema keywords (``minimum``, ``pattern``, ``enum``...) of what
    ``__post_init__`` accepts, copied into ``schemas/config.schema.json`` by
    :mod:`streamhps.config_schema` (``tests/test_config_schema.py`` checks the two agree)."""
    return {"schema": schema}


@dataclass(frozen=True)
class TableSpec:
    """One embedding table.

    Fields (each line below is that field's description in ``schemas/config.schema.json``):

    ``name``: the table's name; its updates travel on topic ``<topic_prefix>.<name>``
    (``dense`` is reserved for the dense-model topic).
    ``dim``: elements per row.
    ``dtype``: element type of the rows, on the wire and in LMDB and the caches.
    ``partitions``: partitions of the table's topic (a key's partition is fixed by
    ``schemas/PARTITIONING.md``).
    ``missing``: what a never-published key returns: ``"error"`` (raise
    :class:`~streamhps.errors.MissingKeyError`, the default, for lookups that must be exact),
    ``"zeros"``, or ``"init:<seed>"`` (a deterministic pseudo-random vector per key, the same in
    every process).
    ``insert_on_update``: whether a worker inserts streamed rows it does not hold yet into its
    cache (true) or only refreshes rows already resident (false).
    """

    name: str = field(metadata=_limits(pattern=_NAME_RE.pattern, **{"not": {"const": "dense"}}))
    dim: int = field(metadata=_limits(minimum=1, maximum=65536))
    dtype: str = field(default="float32", metadata=_limits(enum=list(DTYPES)))
    partitions: int = field(default=1, metadata=_limits(minimum=1, maximum=10000))
    missing: str = field(default="error", metadata=_limits(pattern=_MISSING_RE.pattern))
    insert_on_update: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ConfigError(
                f"table name {self.name!r} is not valid: use letters, digits, '_' and '-'"
            )
        if self.name == "dense":
            raise ConfigError("table name 'dense' is reserved for the dense-model topic")
        if (
            isinstance(self.dim, bool)
            or not isinstance(self.dim, int)
            or not 1 <= self.dim <= 65536
        ):
            raise ConfigError(
                f"table {self.name!r}: dim must be an integer in 1..65536, got {self.dim!r}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(
                f"table {self.name!r}: dtype must be one of {DTYPES}, got {self.dtype!r}"
            )
        if (
            isinstance(self.partitions, bool)
            or not isinstance(self.partitions, int)
            or not 1 <= self.partitions <= 10000
        ):
            raise ConfigError(
                f"table {self.name!r}: partitions must be an integer in 1..10000, got {self.partitions!r}"
            )
        if not isinstance(self.missing, str) or not _MISSING_RE.match(self.missing):
            raise ConfigError(
                f"table {self.name!r}: missing must be 'error', 'zeros' or 'init:<seed>', got {self.missing!r}"
            )
        _check_fields(self, f"table {self.name!r}: ")

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def row_bytes(self) -> int:
        return self.dim * self.np_dtype.itemsize


#: where a worker ingests (``serving.ingest``; :class:`ServingSettings` says what each means)
INGEST_MODES = ("auto", "thread", "process")


@dataclass(frozen=True)
class ServingSettings:
    """Inference-worker settings (``[serving]``).

    ``max_staleness_s``: past this many seconds behind the stream head, a worker reports
    not-ready and bounded reads raise :class:`~streamhps.errors.StaleReadError`.
    ``cache_capacity``: rows per table held by the worker's cache.
    ``warm_from_store``: fill the cache from LMDB on start (up to capacity).
    ``max_lookup_keys``: most keys one lookup request may carry; a larger request is refused.
    ``switch_interval_ms``: a starting worker lowers its process's Python thread switch
    interval (``sys.setswitchinterval``; Python's default is 5 ms) to this, so its fetch, apply
    and request threads hand the GIL to each other within it: at 5 ms every hand-over could
    cost a lookup or an apply up to 5 ms (publish -> visible p99 at 25 % load 90 ms vs 40 ms at
    0.1 ms, bench/staleness.py); 0 leaves the process's setting alone; never raised.
    ``ingest``: where a worker ingests. ``"thread"``: fetch and apply threads in the serving
    process. ``"process"``: a child process (:mod:`streamhps.worker.ingest_process`); a cpu
    worker's cache in memory both map, a cuda worker's on its GPU with the child's writes
    relayed to it (:mod:`streamhps.worker.write_relay`). Lookups no longer wait for the GIL
    behind ingest (H200, half the raw-consume rate: lookup p99 1.07-1.38x idle instead of
    3.4-4.0x on cpu, 1.12-1.66x instead of 3.2-3.8x on cuda), for one more process per worker,
    ~1-3 s more to start and a round trip to it per request that misses. ``"auto"``
    (default): ``"process"`` on a worker that may run on at least 4 cores, else ``"thread"``:
    on 2 cores the child and the serving threads compete for the cores instead of the GIL
    (there, at 25 % of the raw maximum, the child fell behind where threads kept up).
    """

    max_staleness_s: float = field(default=1.0, metadata=_limits(exclusiveMinimum=0))
    cache_capacity: int = field(default=1 << 20, metadata=_limits(minimum=1))
    warm_from_store: bool = True
    max_lookup_keys: int = 1 << 20
    switch_interval_ms: float = field(default=0.1, metadata=_limits(minimum=0))
    ingest: str = field(default="auto", metadata=_limits(enum=list(INGEST_MODES)))

    def __post_init__(self) -> None:
        if not (isinstance(self.max_staleness_s, (int, float)) and self.max_staleness_s > 0):
            raise ConfigError(
                f"serving.max_staleness_s must be > 0 seconds, got {self.max_staleness_s!r}"
            )
        ms = self.switch_interval_ms
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not 0 <= ms < 1000:
            raise ConfigError(
                f"serving.switch_interval_ms must be >= 0 milliseconds (0: leave Python's "
                f"setting), got {ms!r}"
            )
        if self.ingest not in INGEST_MODES:
            raise ConfigError(
                f"serving.ingest must be 'auto', 'thread' or 'process', got {self.ingest!r}"
            )
        if not (isinstance(self.cache_capacity, int) and self.cache_capacity > 0):
            raise ConfigError(
                f"serving.cache_capacity must be a positive row count, got {self.cache_capacity!r}"
            )
        _check_fields(self, "serving.")


@dataclass(frozen=True)
class ProcessorSettings:
    """Stream-processor settings (``[processor]``).

    ``batch_max_messages`` / ``batch_max_seconds``: how many messages (or how long) the processor
    gathers before one LMDB write transaction; bigger batches compact more and write faster,
    at the price of a longer window between publish and durability in LMDB.
    ``lmdb_sync`` / ``lmdb_metasync`` / ``lmdb_writemap`` / ``lmdb_map_async``: py-lmdb's
    ``sync``, ``metasync``, ``writemap`` and ``map_async`` of the processor's store; the
    defaults are the safe ones. What changing each risks on an OS crash (``lmdb_sync=false`` can
    lose or corrupt the store) is documented once, in :mod:`streamhps.store.lmdb_store`.
    ``map_size_bytes``: py-lmdb's ``map_size``: initial LMDB map size; a full map doubles and the
    batch is retried (:mod:`streamhps.store.lmdb_store`).
    ``progress_interval_s``: seconds between progress log lines (rows/s, applied versions).
    ``history_check_s``: seconds between checks of the topics' broker ids, which detect lost broker
    history (a restarted embedded broker, a recreated topic); smaller detects it sooner, at one
    DescribeTopics request per check.
    ``kafka_commit``: also commit offsets to Kafka (asynchronously, after the LMDB commit) so
    that lag tools see the processor; LMDB stays the source of truth for where to resume.
    """

    batch_max_messages: int = field(default=256, metadata=_limits(minimum=1))
    batch_max_seconds: float = field(default=0.05, metadata=_limits(exclusiveMinimum=0))
    lmdb_sync: bool = True
    map_size_bytes: int = field(default=1 << 30, metadata=_limits(minimum=1 << 20))
    lmdb_metasync: bool = True
    lmdb_writemap: bool = False
    lmdb_map_async: bool = False
    progress_interval_s: float = field(default=10.0, metadata=_limits(exclusiveMinimum=0))
    history_check_s: float = field(default=1.0, metadata=_limits(exclusiveMinimum=0))
    kafka_commit: bool = True

    def __post_init__(self) -> None:
        _check_fields(self, "processor.")


@dataclass(frozen=True)
class Config:
    """The whole configuration. ``kafka`` holds librdkafka dotted keys, passed through as they are."""

    tables: tuple[TableSpec, ...]
    topic_prefix: str = field(default="streamhps", metadata=_limits(pattern=_NAME_RE.pattern))
    kafka: dict[str, Any] = field(default_factory=lambda: {"bootstrap.servers": DEFAULT_BOOTSTRAP})
    serving: ServingSettings = field(default_factory=ServingSettings)
    processor: ProcessorSettings = field(default_factory=ProcessorSettings)

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.topic_prefix or ""):
            raise ConfigError(
                f"topic_prefix {self.topic_prefix!r} is not a valid Kafka topic prefix"
            )
        names = [t.name for t in self.tables]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"table names must be unique; repeated: {dupes}")

    @property
    def bootstrap_servers(self) -> str:
        return str(self.kafka.get("bootstrap.servers", DEFAULT_BOOTSTRAP))

    def table(self, name: str) -> TableSpec:
        from streamhps.errors import UnknownTableError

        for t in self.tables:
            if t.name == name:
                return t
        raise UnknownTableError(
            f"unknown table {name!r}; configured tables: {[t.name for t in self.tables]}"
        )

    def topic(self, table: str) -> str:
        return table_topic(self.topic_prefix, table)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> Config:
        data = dict(data)
        _reject_unknown(data, {"topic_prefix", "kafka", "tables", "serving", "processor"}, source)
        raw_tables = data.get("tables", [])
        if not isinstance(raw_tables, list) or not raw_tables:
            raise ConfigError(f"{source}: at least one [[tables]] entry is required")
        tables = tuple(
            _build(TableSpec, t, f"{source}: tables[{i}]") for i, t in enumerate(raw_tables)
        )
        kafka = data.get("kafka", {})
        if not isinstance(kafka, dict):
            raise ConfigError(f"{source}: [kafka] must be a table of librdkafka keys")
        kafka = {"bootstrap.servers": DEFAULT_BOOTSTRAP, **kafka}
        if os.environ.get(ENV_BOOTSTRAP):
            kafka["bootstrap.servers"] = os.environ[ENV_BOOTSTRAP]
        return cls(
            tables=tables,
            topic_prefix=data.get("topic_prefix", "streamhps"),
            kafka=kafka,
            serving=_build(ServingSettings, data.get("serving", {}), f"{source}: [serving]"),
            processor=_build(
                ProcessorSettings, data.get("processor", {}), f"{source}: [processor]"
            ),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> Config:
        """Load ``path``, else ``$STREAMHPS_CONFIG``; errors name the file and the key."""
        path = path or os.environ.get(ENV_CONFIG)
        if not path:
            raise ConfigError(f"no config given: pass --config PATH or set ${ENV_CONFIG}")
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read config {p}: {e.strerror}") from e
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p} is not valid TOML: {e}") from e
        return cls.from_dict(data, source=str(p))


def table_topic(prefix: str, table: str) -> str:
    """Kafka topic of a table's updates: ``<prefix>.<table>``."""
    return f"{prefix}.{table}"


def dlq_topic(topic: str) -> str:
    """Dead-letter topic of an update topic: ``<topic>.dlq``."""
    return f"{topic}.dlq"


def dense_topic(prefix: str) -> str:
    """Topic of whole dense-model updates: ``<prefix>.dense``."""
    return f"{prefix}.dense"


def _reject_unknown(data: dict[str, Any], allowed: set[str], source: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _build(klass: Any, data: Any, source: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a table, got {type(data).__name__}")
    _reject_unknown(data, {f.name for f in fields(klass)}, source)
    try:
        return klass(**data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from e
