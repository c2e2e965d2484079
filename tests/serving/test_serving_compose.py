"""compose.yaml and the Dockerfile: `docker compose config` where Compose exists, else a
structural check that runs every service's command through the real CLI parser and the inline
config through the real config loader."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamhps.cli import build_parser
from streamhps.config import Config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _has_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    r = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    return r.returncode == 0


def test_compose_config_validates_with_docker_compose_or_structure() -> None:
    if _has_compose():
        r = subprocess.run(
            ["docker", "compose", "-f", str(COMPOSE), "--profile", "gpu", "config", "--quiet"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
    doc = _compose()
    assert set(doc["services"]) >= {
        "kafka",
        "topics",
        "processor",
        "trainer",
        "server",
        "server-gpu",
    }
    assert set(doc["volumes"]) >= {"lmdb"}


def test_kafka_runs_in_kraft_mode_with_a_health_check() -> None:
    kafka = _compose()["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@kafka:")
    assert "CONTROLLER" in env["KAFKA_LISTENERS"]
    assert str(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == "1"
    assert str(env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"]) == "0"
    assert "healthcheck" in kafka


def test_every_service_command_is_a_valid_streamhps_command() -> None:
    doc = _compose()
    parser = build_parser()
    for name, svc in doc["services"].items():
        if name == "kafka":
            continue
        assert svc["image"].startswith("streamhps"), name
        args = parser.parse_args(svc["command"])  # SystemExit here means a wrong flag
        assert args.command in {"topics", "processor", "train", "serve"}, name
        assert svc["environment"]["STREAMHPS_BOOTSTRAP"] == "kafka:9092"


def test_inline_config_loads_and_points_at_kafka() -> None:
    doc = _compose()
    text = doc["configs"]["streamhps-config"]["content"]
    raw = tomllib.loads(text)
    assert raw["kafka"]["bootstrap.servers"] == "kafka:9092"
    cfg = Config.from_dict(raw, source="compose.yaml")  # the real loader: unknown keys refused
    assert [t.name for t in cfg.tables] == ["user", "item"]
    target = doc["services"]["processor"]["configs"][0]["target"]
    assert doc["services"]["processor"]["environment"]["STREAMHPS_CONFIG"] == target


def test_dependencies_wait_for_health_and_share_the_lmdb_volume() -> None:
    s = _compose()["services"]
    assert s["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert s["processor"]["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert s["trainer"]["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    for server in ("server", "server-gpu"):
        assert s[server]["depends_on"]["processor"]["condition"] == "service_healthy"
        assert "healthcheck" in s[server]
        assert "/readyz" in " ".join(s[server]["healthcheck"]["test"])
    assert "healthcheck" in s["processor"]
    proc = s["processor"]["command"]
    port = proc[proc.index("--web-port") + 1]  # the faust worker's /healthz: the loop runs
    assert f"127.0.0.1:{port}/healthz" in " ".join(s["processor"]["healthcheck"]["test"])
    store = s["processor"]["command"][s["processor"]["command"].index("--store") + 1]
    for name in ("processor", "server", "server-gpu"):
        assert "lmdb:/data" in s[name]["volumes"], name
        cmd = s[name]["command"]
        assert cmd[cmd.index("--store") + 1] == store, name


def test_gpu_profile_reserves_a_gpu_and_uses_the_cuda_cache() -> None:
    gpu = _compose()["services"]["server-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    cmd = gpu["command"]
    assert cmd[cmd.index("--device") + 1] == "cuda"
    assert "gpu" in gpu["build"]["args"]["EXTRAS"]
    assert "profiles" not in _compose()["services"]["server"]


def test_dockerfile_copies_what_exists_and_runs_the_cli() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    assert 'ENTRYPOINT ["streamhps"]' in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "tests" in ignored and ".git" in ignored


@pytest.mark.parametrize("service", ["server", "server-gpu"])
def test_servers_listen_on_all_interfaces_in_the_container(service: str) -> None:
    cmd = _compose()["services"][service]["command"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert any(p.endswith(":8000") for p in _compose()["services"][service]["ports"])
