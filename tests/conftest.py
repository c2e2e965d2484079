"""Shared fixtures.

Broker tiers (README.md, "Tests"): ``$STREAMHPS_BOOTSTRAP`` names an existing cluster; otherwise one
embedded Tansu broker is started for the session. ``docker`` tests get real Apache Kafka from
testcontainers and skip where no Docker daemon answers. ``gpu`` tests skip without CUDA.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from streamhps.broker import EmbeddedBroker


def _cuda_available() -> bool:
    try:
        import cupy

        return bool(cupy.cuda.runtime.getDeviceCount() > 0)
    except Exception:  # noqa: BLE001 - any failure means no usable GPU
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any("gpu" in item.keywords for item in items) and not _cuda_available():
        skip = pytest.mark.skip(reason="needs CUDA and CuPy (run on a GPU machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """bootstrap.servers of a live broker: $STREAMHPS_BOOTSTRAP, else an embedded one."""
    env = os.environ.get("STREAMHPS_BOOTSTRAP")
    if env:
        yield env
        return
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(port=0, log_path=log) as broker:
        yield broker.bootstrap_servers


@pytest.fixture
def restartable_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """A private embedded broker a test may stop, kill and restart (same port)."""
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    broker = EmbeddedBroker(port=0, log_path=log).start()
    yield broker
    broker.stop()


@pytest.fixture
def prefix() -> str:
    """A fresh topic prefix, so tests never see each other's topics."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def docker_kafka() -> Iterator[str]:
    """bootstrap.servers of a real Apache Kafka in Docker (testcontainers); skips without Docker."""
    try:
        import docker

        docker.from_env().ping()
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no Docker daemon ({type(e).__name__}); the docker tier needs one")
    from testcontainers.kafka import KafkaContainer

    with KafkaContainer("apache/kafka:3.8.0").with_kraft() as kafka:
        yield kafka.get_bootstrap_server()
