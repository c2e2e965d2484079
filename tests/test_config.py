from __future__ import annotations

from pathlib import Path

import pytest

from streamhps import Config, ConfigError, TableSpec, UnknownTableError

EXAMPLE = """
topic_prefix = "demo"
[kafka]
"bootstrap.servers" = "127.0.0.1:9092"
"linger.ms" = 2
[[tables]]
name = "user"
dim = 64
dtype = "float32"
partitions = 4
[[tables]]
name = "item"
dim = 32
dtype = "float16"
missing = "zeros"
[serving]
max_staleness_s = 1.0
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "streamhps.toml"
    p.write_text(text)
    return p


def test_issue_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMHPS_BOOTSTRAP", raising=False)
    cfg = Config.load(write(tmp_path, EXAMPLE))
    assert cfg.topic_prefix == "demo"
    assert cfg.kafka == {"bootstrap.servers": "127.0.0.1:9092", "linger.ms": 2}
    assert cfg.table("user") == TableSpec("user", 64, "float32", 4)
    assert cfg.table("item").missing == "zeros" and cfg.table("item").partitions == 1
    assert cfg.serving.max_staleness_s == 1.0
    assert cfg.topic("user") == "demo.user"


def test_env_config_and_bootstrap_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMHPS_CONFIG", str(write(tmp_path, EXAMPLE)))
    monkeypatch.setenv("STREAMHPS_BOOTSTRAP", "10.1.2.3:19092")
    assert Config.load().bootstrap_servers == "10.1.2.3:19092"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (EXAMPLE + "\nretention = 3\n", "unknown key(s) ['retention']"),
        (EXAMPLE.replace('dtype = "float32"', 'dtype = "float64"'), "dtype must be one of"),
        (EXAMPLE.replace("dim = 64", "dim = 0"), "dim must be an integer"),
        (EXAMPLE.replace("dim = 64", 'dim = "64"'), "dim must be an integer"),
        (
            EXAMPLE.replace("partitions = 4", "partitons = 4"),
            "tables[0]: unknown key(s) ['partitons']",
        ),
        (EXAMPLE.replace("max_staleness_s = 1.0", "max_staleness_s = -1"), "max_staleness_s"),
        (EXAMPLE.replace("max_staleness_s", "max_stale"), "[serving]: unknown key(s)"),
        (
            EXAMPLE.replace(
                "max_staleness_s = 1.0", "max_staleness_s = 1.0\nswitch_interval_ms = -1"
            ),
            "serving.switch_interval_ms must be >= 0",
        ),
        (EXAMPLE.replace('name = "item"', 'name = "user"'), "unique"),
        (EXAMPLE.replace('missing = "zeros"', 'missing = "random"'), "missing must be"),
        ('topic_prefix = "x"\n', "at least one [[tables]]"),
        ("this is = = not toml", "not valid TOML"),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as ei:
        Config.load(write(tmp_path, text))
    assert fragment in str(ei.value)


def test_missing_file_and_no_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        Config.load(tmp_path / "nope.toml")
    monkeypatch.delenv("STREAMHPS_CONFIG", raising=False)
    with pytest.raises(ConfigError, match="STREAMHPS_CONFIG"):
        Config.load()


def test_unknown_table_lookup() -> None:
    cfg = Config(tables=(TableSpec("user", 4),))
    with pytest.raises(UnknownTableError, match="configured tables: \\['user'\\]"):
        cfg.table("items")


def test_reserved_table_name() -> None:
    with pytest.raises(ConfigError, match="reserved"):
        TableSpec("dense", 4)
