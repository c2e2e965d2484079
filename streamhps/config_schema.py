"""``schemas/config.schema.json``, generated from the settings dataclasses of :mod:`streamhps.config`.

Types and defaults come from the fields, limits from each field's ``schema`` metadata,
descriptions from the ``` ``field``: text``` lines of each class docstring. Regenerate after
changing a setting::

    python -m streamhps.config_schema > schemas/config.schema.json

``tests/test_config_schema.py`` fails while the committed file differs from this output.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
from typing import Any

from streamhps.config import (
    DEFAULT_BOOTSTRAP,
    ENV_BOOTSTRAP,
    Config,
    ProcessorSettings,
    ServingSettings,
    TableSpec,
)

SCHEMA_ID = "https://streamhps.dev/schemas/config.schema.json"
_SCALARS = {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}
# a docstring line that starts a field's description: ``a``: ... or ``a`` / ``b``: ...
_ENTRY_RE = re.compile(r"^((?:``\w+``(?:\s*/\s*)?)+):\s*(.*)$")


def field_docs(klass: type) -> dict[str, str]:
    """Each field's description from ``klass``'s docstring (lines ``` ``name``: text```, text
    continuing up to the next such line or a blank line), in one line."""
    docs: dict[str, str] = {}
    names: list[str] = []
    for line in inspect.cleandoc(klass.__doc__ or "").splitlines():
        line = line.strip()
        m = _ENTRY_RE.match(line)
        if m:
            names = re.findall(r"``(\w+)``", m.group(1))
            for n in names:
                docs[n] = m.group(2)
        elif not line:
            names = []
        else:
            for n in names:
                docs[n] += " " + line
    return {n: _plain(d) for n, d in docs.items()}


def _plain(text: str) -> str:
    """reST markup out: ``x`` -> x, :class:`~a.b.C` -> C."""
    text = re.sub(r":\w+:`~?(?:[\w.]*\.)?(\w+)`", r"\1", text)
    return " ".join(text.replace("``", "").split())


def _object(klass: type, title: str) -> dict[str, Any]:
    docs = field_docs(klass)
    props: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(klass):
        prop: dict[str, Any] = {"type": _SCALARS[str(f.type)]}
        prop.update(f.metadata.get("schema", {}))
        if f.default is not dataclasses.MISSING:
            prop["default"] = f.default
        else:
            required.append(f.name)
        if f.name not in docs:
            raise ValueError(
                f"{klass.__name__}.{f.name} has no ``{f.name}``: line in the docstring"
            )
        prop["description"] = docs[f.name]
        props[f.name] = prop
    out: dict[str, Any] = {"type": "object", "title": title, "additionalProperties": False}
    if required:
        out["required"] = required
    out["properties"] = props
    return out


def config_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the TOML deployment config :meth:`Config.load` reads."""
    top = {f.name: f for f in dataclasses.fields(Config)}
    prefix = top["topic_prefix"]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "streamhps deployment config (TOML)",
        "description": "Generated from streamhps/config.py by `python -m streamhps.config_schema`;"
        " do not edit by hand.",
        "type": "object",
        "additionalProperties": False,
        "required": ["tables"],
        "properties": {
            "topic_prefix": {
                "type": "string",
                **prefix.metadata.get("schema", {}),
                "default": prefix.default,
                "description": "prefix of every topic: <topic_prefix>.<table>, <topic_prefix>.dense",
            },
            "kafka": {
                "type": "object",
                "description": "librdkafka configuration keys, passed through as they are to every"
                f" Kafka client; ${ENV_BOOTSTRAP} overrides bootstrap.servers"
                f" (default {DEFAULT_BOOTSTRAP})",
                "additionalProperties": {"type": ["string", "integer", "number", "boolean"]},
            },
            "tables": {
                "type": "array",
                "minItems": 1,
                "description": "the embedding tables ([[tables]]); names must be unique",
                "items": {"$ref": "#/$defs/table"},
            },
            "serving": {"$ref": "#/$defs/serving"},
            "processor": {"$ref": "#/$defs/processor"},
        },
        "$defs": {
            "table": _object(TableSpec, "[[tables]]: one embedding table"),
            "serving": _object(ServingSettings, "[serving]: inference-worker settings"),
            "processor": _object(ProcessorSettings, "[processor]: stream-processor settings"),
        },
    }


def render() -> str:
    """The schema as committed: indented JSON, keys in declaration order, trailing newline."""
    return json.dumps(config_schema(), indent=2) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
