"""Fixtures for the worker tests: a config per test, an LMDB store, a processor subprocess."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamhps import Config, Publisher
from streamhps.store import LmdbStore
from streamhps.worker import InferenceWorker

DIM = 8


@pytest.fixture(params=["thread", "process", "relay"])
def ingest(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The worker's ingest on threads beside the lookups, or in a process of its own
    (:mod:`streamhps.worker.ingest_process`): a cpu worker's cache in memory both processes map
    (``process``), or in the serving process with the child's writes relayed to it
    (``relay``: what a cuda worker does with its GPU cache, here on a numpy cache). The same
    behaviour every way."""
    if request.param == "relay":
        monkeypatch.setattr(InferenceWorker, "_relays_writes", lambda self: True)
        return "process"
    return str(request.param)


def table_rows(keys: np.ndarray, version: int, dim: int = DIM) -> np.ndarray:
    """Vectors that say what they are: column 0 = version, column 1 = key % 1000."""
    v = np.zeros((keys.shape[0], dim), dtype=np.float32)
    v[:, 0] = version
    v[:, 1] = keys % 1000
    return v


def write_config(path: Path, bootstrap: str, prefix: str, **over: Any) -> tuple[Path, Config]:
    table = {
        "name": "user",
        "dim": DIM,
        "partitions": 4,
        "missing": "error",
        "insert_on_update": True,
    }
    table.update(over.pop("table", {}))
    serving = {"max_staleness_s": 2.0, "cache_capacity": 1 << 14, "warm_from_store": True}
    serving.update(over.pop("serving", {}))
    lines = [
        f'topic_prefix = "{prefix}"',
        "[kafka]",
        f'"bootstrap.servers" = "{bootstrap}"',
        "[[tables]]",
    ]
    lines += [f"{k} = {_toml(v)}" for k, v in table.items()]
    lines += ["[serving]"] + [f"{k} = {_toml(v)}" for k, v in serving.items()]
    lines += ["[processor]", "batch_max_seconds = 0.02", "lmdb_sync = false"]
    path.write_text("\n".join(lines) + "\n")
    return path, Config.load(path)


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    return str(v)


def empty_store(cfg: Config, path: Path) -> Path:
    """An LMDB store holding the tables and nothing else (as a fresh processor leaves it)."""
    with LmdbStore.open(path, readonly=False) as st:
        st.ensure_tables({t.name: t for t in cfg.tables})
    return path


@pytest.fixture
def worker_env(
    bootstrap: str, prefix: str, tmp_path: Path
) -> Callable[..., tuple[Path, Config, Publisher]]:
    """Returns make(**config overrides) -> (config path, Config, Publisher with topics created)."""
    pubs: list[Publisher] = []

    def make(**over: Any) -> tuple[Path, Config, Publisher]:
        path, cfg = write_config(
            tmp_path / f"cfg-{uuid.uuid4().hex[:6]}.toml", bootstrap, prefix, **over
        )
        pub = Publisher.from_config(cfg)
        pub.create_topics()
        pubs.append(pub)
        return path, cfg, pub

    yield make  # type: ignore[misc]
    for p in pubs:
        p.close()


@pytest.fixture
def processor_factory(tmp_path: Path) -> Iterator[Callable[[Path, Path], Any]]:
    from streamhps.testing import start_processor, stop_processor

    procs: list[Any] = []

    def start(config_path: Path, store: Path) -> Any:
        proc = start_processor(config_path, store, log_path=tmp_path / "processor.log")
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        stop_processor(p)
