"""The library depends on nothing above it: ``streamhps/`` never imports its applications.

Two proofs: an AST scan of every import statement (function-local imports included), and the
library copied alone into an empty directory where every one of its modules is imported with
the applications unreachable, and its command line still starts.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import streamhps

LIBRARY = Path(streamhps.__file__).parent
APPLICATIONS = ("servers", "trainers", "demo")


def _library_modules(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__main__":  # runs the CLI when imported
            continue
        if parts[-1] == "__init__":
            parts.pop()
        out.append(".".join(parts))
    return out


def _imported_roots(tree: ast.AST) -> list[tuple[int, str]]:
    roots = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.append((node.lineno, node.module.split(".")[0]))
    return roots


def test_no_library_module_names_an_application_in_an_import() -> None:
    offenders = []
    files = sorted(LIBRARY.rglob("*.py"))
    assert len(files) > 30, f"expected the whole library under {LIBRARY}, found {len(files)} files"
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for lineno, root in _imported_roots(tree):
            if root in APPLICATIONS:
                offenders.append(f"{path.relative_to(LIBRARY.parent)}:{lineno} imports {root}")
    assert not offenders, "the library imports its applications:\n" + "\n".join(offenders)


def test_the_ast_scan_sees_function_local_imports() -> None:
    src = "def f():\n    from servers.app import make_server\n    import trainers.dlrm\n"
    assert [r for _, r in _imported_roots(ast.parse(src))] == ["servers", "trainers"]


# Run in a fresh interpreter: only the copy of the library is importable as ``streamhps``, and
# the applications cannot be found even through the editable install's finder.
_ISOLATED = textwrap.dedent(
    """
    import importlib, importlib.abc, sys

    root, apps, modules = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")

    class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in apps:
                raise ModuleNotFoundError(f"No module named {name!r} (absent here)", name=name)
            return None

    sys.meta_path.insert(0, Absent())
    sys.path.insert(0, root)
    import streamhps
    assert streamhps.__file__.startswith(root), streamhps.__file__
    for m in modules:
        importlib.import_module(m)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in apps)
    assert not leaked, leaked

    from streamhps.cli import build_parser, main
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    print("COMMANDS", ",".join(sorted(sub.choices)), flush=True)
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0, e.code
    """
)


def test_the_library_alone_imports_every_module_and_starts_its_cli(tmp_path: Path) -> None:
    shutil.copytree(LIBRARY, tmp_path / "streamhps", ignore=shutil.ignore_patterns("__pycache__"))
    modules = _library_modules(tmp_path / "streamhps")
    assert "streamhps.worker.core" in modules and "streamhps.cli" in modules
    r = subprocess.run(
        [sys.executable, "-c", _ISOLATED, str(tmp_path), ",".join(APPLICATIONS), ",".join(modules)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    commands = next(ln for ln in r.stdout.splitlines() if ln.startswith("COMMANDS ")).split()[1]
    # The library's own commands are there without any application installed.
    assert {"broker", "topics", "processor", "inspect", "snapshot", "plan"} <= set(
        commands.split(",")
    )
    assert not set(commands.split(",")) & {"serve", "train", "demo"}
    # A declared application that is absent is named, not a traceback.
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("command", ["serve", "train", "demo"])
def test_applications_plug_their_commands_in_through_entry_points(command: str) -> None:
    from streamhps.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert command in sub.choices, (
        f"`streamhps {command}` is missing: is the package installed (pip install -e .) so that "
        "its streamhps.commands entry points are in the metadata?"
    )
