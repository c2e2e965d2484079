"""The repository's documents cite what exists: docs/INVARIANTS.md names real tests, code
cites invariants it defines, and nothing cites a DESIGN.md the repository does not hold."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INVARIANTS = ROOT / "docs" / "INVARIANTS.md"
SOURCES = ["streamhps", "servers", "trainers", "demo", "tests", "bench", "schemas"]


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        n.name
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test_")
    }


def test_invariants_are_numbered_one_to_eight() -> None:
    numbers = re.findall(r"^## (\d+)\. ", INVARIANTS.read_text(), re.M)
    assert numbers == [str(i) for i in range(1, 9)]


def test_every_test_the_invariants_name_exists() -> None:
    cited = 0
    for line in INVARIANTS.read_text().splitlines():
        if not line.startswith("- `"):
            continue
        path = None
        for ref in re.findall(r"`([^`]+)`", line):
            if "::" not in ref and not ref.endswith(".py"):
                continue  # prose in backquotes (`kill -9`)
            file, _, name = ref.partition("::")
            if file:
                path = ROOT / "tests" / file
                assert path.is_file(), (
                    f"docs/INVARIANTS.md names tests/{file}, which does not exist"
                )
            if name:
                assert path is not None, line
                assert name in _test_names(path), f"docs/INVARIANTS.md: no {name} in {path}"
                cited += 1
    assert cited >= 30


def test_code_cites_only_documents_and_invariants_that_exist() -> None:
    for top in SOURCES:
        for path in (ROOT / top).rglob("*"):
            if path.suffix not in {".py", ".md", ".sh"} or path.name in {
                "gpu_limits.py",
                "test_docs.py",
            }:
                continue
            text = path.read_text()
            assert "DESIGN.md" not in text, f"{path} cites DESIGN.md: cite docs/INVARIANTS.md"
            for n in re.findall(r"[Ii]nvariants? (\d+)", text):
                assert 1 <= int(n) <= 8, f"{path} cites invariant {n}"


def test_the_demo_says_where_it_turns_fsync_off_and_what_that_risks() -> None:
    from demo.app import CONFIG_TEMPLATE

    lines = CONFIG_TEMPLATE.splitlines()
    at = lines.index("lmdb_sync = false")
    comment = " ".join(lines[at - 2 : at])
    assert "corrupt" in comment and "streamhps.store.lmdb_store" in comment, comment
    store_doc = (ROOT / "streamhps" / "store" / "lmdb_store.py").read_text()
    for knob in ("sync", "metasync", "writemap", "map_async", "map_size"):
        assert f"* ``{knob}" in store_doc, f"lmdb_store.py does not document {knob}"
    assert "streamhps demo`` runs its processor with" in store_doc
