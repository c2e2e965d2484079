"""What every benchmark ends with: its results as JSON at ``--out``, and where they went."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: str | Path, results: Any) -> Path:
    """``results`` as indented JSON at ``path`` (parents created; values JSON does not know,
    as ``str``); prints the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out}")
    return out
