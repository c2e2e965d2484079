"""One Kafka client factory: every client gets the security keys, no client gets another role's."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from confluent_kafka import KafkaException

import streamhps
from streamhps import Config, Publisher, TableSpec
from streamhps.kafka import (
    CONSUMER_ONLY,
    PRODUCER_DEFAULTS,
    PRODUCER_ONLY,
    client_config,
)
from streamhps.processor.loop import Processor
from streamhps.store import LmdbStore
from streamhps.topics import ensure_topics
from streamhps.worker import InferenceWorker

SECURITY = {
    "security.protocol": "sasl_ssl",
    "sasl.mechanism": "SCRAM-SHA-512",
    "sasl.username": "svc",
    "sasl.password": "secret",
    "ssl.ca.location": "/etc/ca.pem",
    "ssl.endpoint.identification.algorithm": "https",
    "client.id": "streamhps",
}
KAFKA = {
    "bootstrap.servers": "b:9092",
    **SECURITY,
    "linger.ms": 20,  # producer only
    "compression.type": "zstd",  # producer only
    "fetch.wait.max.ms": 10,  # consumer only
    "group.id": "mine",  # consumer only
    "session.timeout.ms": 6000,  # consumer only
}


@pytest.mark.parametrize("role", ["producer", "consumer", "admin"])
def test_security_keys_reach_every_role_and_foreign_keys_do_not(role: str) -> None:
    conf = client_config(KAFKA, role)  # type: ignore[arg-type]
    for k, v in {"bootstrap.servers": "b:9092", **SECURITY}.items():
        assert conf[k] == v
    if role != "producer":
        assert not set(conf) & PRODUCER_ONLY
    if role != "consumer":
        assert not set(conf) & CONSUMER_ONLY


def test_precedence_defaults_then_config_then_overrides() -> None:
    p = client_config(KAFKA, "producer")
    assert p["linger.ms"] == 20 and p["compression.type"] == "zstd"  # [kafka] wins
    assert p["enable.idempotence"] is True  # default kept
    assert p["message.max.bytes"] == PRODUCER_DEFAULTS["message.max.bytes"]
    c = client_config(
        {**KAFKA, "enable.auto.commit": True},
        "consumer",
        defaults={"fetch.wait.max.ms": 50, "group.id": "default"},
        overrides={"group.id": "forced"},
    )
    assert c["fetch.wait.max.ms"] == 10 and c["group.id"] == "forced"
    assert c["enable.auto.commit"] is False  # offsets live in LMDB, whatever [kafka] says


def test_no_module_builds_a_kafka_client_by_hand() -> None:
    """Every Producer/Consumer/AdminClient of the library comes from streamhps.kafka."""
    root = Path(streamhps.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "kafka.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else getattr(f, "attr", "")
                if name in ("Producer", "Consumer", "AdminClient"):
                    offenders.append(f"{path.relative_to(root)}:{node.lineno} {name}(...)")
    assert not offenders, offenders


def test_an_ssl_setting_reaches_the_clients_of_every_process(tmp_path: Path) -> None:
    """A CA file that does not exist makes librdkafka refuse to create a client: each entry
    point fails at its first client, naming the key (no broker needed)."""
    bad = {"bootstrap.servers": "127.0.0.1:1", "security.protocol": "ssl",
           "ssl.ca.location": str(tmp_path / "no-such-ca.pem")}  # fmt: skip
    spec = TableSpec("user", dim=4)
    cfg = Config(tables=(spec,), topic_prefix="sec", kafka=bad)
    with pytest.raises(KafkaException, match="ssl.ca.location"):
        Publisher(tables=[spec], kafka_config=bad)
    with pytest.raises(KafkaException, match="ssl.ca.location"):
        ensure_topics(bad, {"sec.user": 1})
    with pytest.raises(KafkaException, match="ssl.ca.location"):
        Processor(cfg, str(tmp_path / "p")).run()
    with LmdbStore.open(tmp_path / "w", readonly=False) as st:
        st.ensure_tables({"user": spec})
    with pytest.raises(KafkaException, match="ssl.ca.location"):
        InferenceWorker(cfg, tmp_path / "w").start()
