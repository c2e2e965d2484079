"""schemas/config.schema.json is what streamhps.config_schema generates from the settings
dataclasses, it agrees with what Config accepts, and the repository's example configs pass it."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from demo.app import CONFIG_TEMPLATE, DemoOptions
from streamhps import Config, ConfigError
from streamhps.config import ProcessorSettings, ServingSettings, TableSpec
from streamhps.config_schema import _object, config_schema, field_docs, render

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "schemas" / "config.schema.json"
jsonschema = pytest.importorskip("jsonschema")  # a [test] dependency


def test_committed_schema_is_generated_from_the_dataclasses() -> None:
    assert COMMITTED.read_text() == render(), (
        "schemas/config.schema.json is out of date: "
        "python -m streamhps.config_schema > schemas/config.schema.json"
    )
    jsonschema.Draft202012Validator.check_schema(config_schema())


def test_every_setting_is_described() -> None:
    for klass in (TableSpec, ServingSettings, ProcessorSettings):
        docs = field_docs(klass)
        assert {f.name for f in dataclasses.fields(klass)} <= set(docs), klass.__name__


def test_a_setting_without_a_description_is_refused() -> None:
    @dataclasses.dataclass
    class Knobs:
        """``a``: described.
        ``b`` / ``c``: described together,
        over two lines.
        """

        a: int = 1
        b: int = 2
        c: int = 3
        d: int = 4

    assert field_docs(Knobs) == {
        "a": "described.",
        "b": "described together, over two lines.",
        "c": "described together, over two lines.",
    }
    with pytest.raises(ValueError, match=r"Knobs\.d has no ``d``"):
        _object(Knobs, "knobs")


def _table(**over: Any) -> dict[str, Any]:
    return {"name": "user", "dim": 8, **over}


SECTIONS: dict[str, type] = {
    "tables": TableSpec,
    "serving": ServingSettings,
    "processor": ProcessorSettings,
}


def _doc(section: str, name: str, value: Any) -> dict[str, Any]:
    if section == "tables":
        return {"tables": [_table(**{name: value})]}
    return {"tables": [_table()], section: {name: value}}


def _boundaries() -> list[tuple[str, str, Any, bool]]:
    """(section, field, value, acceptable) at each numeric limit and for each enum/pattern."""
    cases: list[tuple[str, str, Any, bool]] = []
    for section, klass in SECTIONS.items():
        for f in dataclasses.fields(klass):
            lim = f.metadata.get("schema", {})
            step = 1 if str(f.type) == "int" else 1e-9
            if "minimum" in lim:
                cases += [(section, f.name, lim["minimum"], True)]
                cases += [(section, f.name, lim["minimum"] - step, False)]
            if "maximum" in lim:
                cases += [(section, f.name, lim["maximum"], True)]
                cases += [(section, f.name, lim["maximum"] + step, False)]
            if "exclusiveMinimum" in lim:
                cases += [(section, f.name, lim["exclusiveMinimum"], False)]
                cases += [(section, f.name, lim["exclusiveMinimum"] + step, True)]
            if "enum" in lim:
                cases += [(section, f.name, v, True) for v in lim["enum"]]
                cases += [(section, f.name, "float64", False)]
            # a value of the wrong type
            wrong = "1" if str(f.type) != "str" else 1
            cases += [(section, f.name, wrong, False)]
    cases += [("tables", "name", n, ok) for n, ok in [("a-b_1", True), ("dense", False)]]
    cases += [("tables", "name", n, False) for n in ["", "a b", "-a", "x" * 122]]
    cases += [("tables", "missing", m, True) for m in ["error", "zeros", "init:42"]]
    cases += [("tables", "missing", m, False) for m in ["random", "init:", "init:-1"]]
    return cases


@pytest.mark.parametrize(("section", "name", "value", "ok"), _boundaries())
def test_schema_and_config_agree(section: str, name: str, value: Any, ok: bool) -> None:
    doc = _doc(section, name, value)
    schema_ok = jsonschema.Draft202012Validator(config_schema()).is_valid(doc)
    try:
        Config.from_dict(doc)
        config_ok = True
    except ConfigError:
        config_ok = False
    assert (schema_ok, config_ok) == (ok, ok), f"{section}.{name} = {value!r}"


def _examples() -> dict[str, str]:
    """Every deployment config the repository ships or its tests and benchmarks write."""
    import yaml

    out = {}
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    out["compose.yaml"] = compose["configs"]["streamhps-config"]["content"]
    o = DemoOptions()
    out["demo"] = CONFIG_TEMPLATE.format(
        bootstrap="127.0.0.1:9092", dim=o.dim, partitions=o.partitions,
        max_staleness_s=o.max_staleness_s, cache_capacity=o.cache_capacity,
    )  # fmt: skip
    for i, block in enumerate(
        re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    ):
        if "[[tables]]" in block:
            out[f"README.md toml block {i}"] = block
    out["streamhps/config.py docstring"] = _docstring_example(ROOT / "streamhps" / "config.py")
    # TOML templates in the tests and benchmarks: placeholders filled with a valid value
    for path in sorted([*ROOT.glob("tests/**/*.py"), *ROOT.glob("bench/*.py")]):
        for j, text in enumerate(re.findall(r'"""\\?\n?(.*?)"""', path.read_text(), re.S)):
            if "[[tables]]" in text and "\n[" in text and text.lstrip().startswith("topic_prefix"):
                text = re.sub(r'"\{\w*\}"', '"x"', text)
                out[f"{path.relative_to(ROOT)} #{j}"] = re.sub(r"\{\w*\}", "1", text)
    return out


def _docstring_example(path: Path) -> str:
    """The indented block after the module docstring's first ``::``."""
    doc = path.read_text().split('"""')[1]
    block = doc.split("::\n\n", 1)[1].split("\n\n")[0]
    return "\n".join(line[4:] for line in block.splitlines())


EXAMPLES = _examples()


def test_examples_were_found() -> None:
    names = " ".join(EXAMPLES)
    for where in ["compose", "demo", "README", "config.py", "tests/serving", "tests/processor"]:
        assert where in names, f"no example config found in {where}: {sorted(EXAMPLES)}"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_configs_validate(name: str) -> None:
    data = tomllib.loads(EXAMPLES[name])
    errors = [e.message for e in jsonschema.Draft202012Validator(config_schema()).iter_errors(data)]
    assert not errors, f"{name}: {errors}"
    Config.from_dict(data, source=name)
