"""`streamhps demo` end to end on the embedded broker: exit code, summary, clean-up."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _procs_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (this test's own excluded)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().split()[2]
        except OSError:
            continue
        if text in cmd and state != "Z":
            found.append(f"{d.name}: {cmd}")
    return found


def _wait_gone(text: str, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := _procs_mentioning(text)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_demo_runs_end_to_end_and_online_beats_frozen(tmp_path: Path) -> None:
    summary_path = tmp_path / "summary.json"
    workdir = tmp_path / "work"
    cmd = [sys.executable, "-m", "streamhps", "demo", "--duration", "20", "--warmup-steps", "1000",
           "--no-live", "--summary-json", str(summary_path), "--workdir", str(workdir)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "streamhps demo summary" in r.stdout
    s = json.loads(summary_path.read_text())
    assert s["rows_published"] > 0 and s["commits"] > 5
    # every committed version reached the server, and the dense model with it
    assert s["applied_version"] == s["last_committed_version"]
    assert s["versions_applied"] == s["commits"]
    assert s["dense_version_served"] == s["last_committed_version"]
    assert s["predictions_served"] > 0 and not s["predict_errors"]
    # Freshness (schemas/README.md): every row the server consumed was measured, and none took
    # longer than the staleness bound (2 s) from publish to visible. The demo's own target
    # (p99 <= 250 ms on 2 cores) is bench material; a loaded CI box only has to stay in bound.
    rows_after_start = s["rows_published"] - s["rows_published_at_server_start"]
    assert s["rows_visible_counted"] >= rows_after_start > 0
    assert s["rows_visible_ms_p50"] <= s["rows_visible_ms_p99"] <= s["rows_visible_ms_max"]
    assert s["rows_visible_ms_p99"] <= 1000 * s["max_staleness_s"]
    # ... and the probe's "behind the head" figure stayed in bound: the server was never unready
    assert s["staleness_s_p99"] is not None and s["staleness_s_p99"] <= s["max_staleness_s"]
    assert 0.0 <= s["cache_hit_ratio"] <= 1.0
    # the point of the system: fresh embeddings beat a copy that gets no updates
    assert s["auc_online_late"] > s["auc_frozen_late"] + 0.03, s["auc_windows"]
    assert s["auc_online_late"] < s["auc_oracle_mean"]  # and nobody beats the hidden truth
    assert not _wait_gone(str(workdir)), "demo left processes behind"


def test_demo_cleans_up_on_ctrl_c(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    cmd = [sys.executable, "-m", "streamhps", "demo", "--duration", "120", "--warmup-steps", "200",
           "--no-live", "--workdir", str(workdir)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    port = None
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"embedded broker on 127\.0\.0\.1:(\d+)", line)
        if m:
            port = m.group(1)
        if "inference server ready" in line or time.monotonic() > deadline:
            break
    assert port and any("inference server ready" in ln for ln in lines), "".join(lines)
    assert _procs_mentioning(str(workdir)), "processor and server should be running"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    # 130, or killed by the SIGINT itself (seen once in CI, after "interrupted" was printed:
    # a KeyboardInterrupt reached the interpreter's top level; not reproduced in 10 runs at
    # 0-100 ms after "ready"); a shell reports both as 130. What matters is below: no survivor.
    assert proc.returncode in (130, -signal.SIGINT), "".join(lines) + out
    assert "interrupted" in out, out
    assert not _wait_gone(str(workdir)), "processor or server survived Ctrl-C"
    assert not _wait_gone(f"127.0.0.1:{port}"), "the embedded broker survived Ctrl-C"
