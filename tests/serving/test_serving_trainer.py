"""The online DLRM trainer and its synthetic world."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from confluent_kafka import Consumer, TopicPartition

from servers.model import DenseModel
from streamhps import wire
from streamhps.config import Config, TableSpec
from trainers.dlrm import OnlineTrainer
from trainers.synthetic import ClickStream, StreamSpec, auc

TABLES = (
    TableSpec("user", 16, missing="zeros", partitions=2),
    TableSpec("item", 16, missing="zeros", partitions=2),
)


def _brute_auc(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (pos.size * neg.size))


def test_auc_matches_the_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 300)
        s = np.round(rng.standard_normal(300), 1)  # many ties
        assert auc(y, s) == pytest.approx(_brute_auc(y, s), abs=1e-12)
    assert np.isnan(auc(np.ones(5), np.arange(5)))


def test_stream_is_reproducible_grows_and_drifts() -> None:
    a, b = ClickStream(StreamSpec(seed=3)), ClickStream(StreamSpec(seed=3))
    ba = a.sample(100, 512, np.random.default_rng(1))
    bb = b.sample(100, 512, np.random.default_rng(1))
    np.testing.assert_array_equal(ba.users, bb.users)
    np.testing.assert_array_equal(ba.labels, bb.labels)
    assert a.active_users(5000) > a.active_users(0)  # new ids arrive
    late = a.sample(5000, 4096, np.random.default_rng(2))
    assert late.users.max() >= a.active_users(0)  # and are drawn
    assert late.users.max() < a.active_users(5000)
    # the truth drifts: the same pairs click with other probabilities a quarter-turn later
    p0 = a.p_click(0, late.users, late.items, late.dense)
    p1 = a.p_click(3000, late.users, late.items, late.dense)
    assert np.corrcoef(p0, p1)[0, 1] < 0.8
    assert auc(late.labels, late.p_true) > 0.8  # the labels follow the truth


def test_numpy_serving_head_equals_the_torch_model() -> None:
    tr = OnlineTrainer(Config(tables=TABLES), publish=False)
    tr.run(steps=30)
    b = tr.stream.sample(30, 200, np.random.default_rng(9))
    with torch.no_grad():
        want = torch.sigmoid(
            tr.model(
                {"user": torch.from_numpy(b.users), "item": torch.from_numpy(b.items)},
                torch.from_numpy(b.dense),
            )
        ).numpy()
    embs = [
        tr._weight(t).detach().numpy()[ids] for t, ids in (("user", b.users), ("item", b.items))
    ]
    got = DenseModel(tr.model.dense_state(), ["user", "item"], 30).predict(embs, b.dense)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert (
        sum(a.nbytes for a in tr.model.dense_state().values()) < 100_000
    )  # dense payload well under 1 MB


@pytest.mark.slow
def test_trainer_learns_the_hidden_truth() -> None:
    tr = OnlineTrainer(Config(tables=TABLES), publish=False)
    tr.run(steps=600)
    assert tr.stats.auc_ewma > 0.7  # progressive validation: scored before training on each batch


def test_trainer_rejects_configs_it_cannot_train() -> None:
    from streamhps.errors import ConfigError

    with pytest.raises(ConfigError, match="exactly two tables"):
        OnlineTrainer(Config(tables=TABLES[:1]), publish=False)
    with pytest.raises(ConfigError, match="one dim"):
        OnlineTrainer(Config(tables=(TABLES[0], TableSpec("item", 8))), publish=False)


def _consume_all(bootstrap: str, topics: dict[str, int], idle: float = 2.0) -> list[wire.Message]:
    """Every message of ``topics`` from the start, until none arrived for ``idle`` seconds
    (the embedded broker's ListOffsets can under-report the end, so no watermark is trusted)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"t-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    try:
        c.assign([TopicPartition(t, p, 0) for t, n in topics.items() for p in range(n)])
        got: list[wire.Message] = []
        last = time.monotonic()
        deadline = last + 60
        while time.monotonic() - last < idle and time.monotonic() < deadline:
            m = c.poll(0.2)
            if m is None or m.error():
                continue
            got.append(wire.decode(m.value()))
            last = time.monotonic()
        return got
    finally:
        c.close()


@pytest.mark.integration
def test_trainer_publishes_only_touched_rows_then_commits_and_dense(
    bootstrap: str, prefix: str
) -> None:
    cfg = Config(tables=TABLES, topic_prefix=prefix, kafka={"bootstrap.servers": bootstrap})
    touched: dict[int, dict[str, set[int]]] = {}
    current: dict[str, set[int]] = {"user": set(), "item": set()}

    def on_step(tr: OnlineTrainer) -> None:
        current["user"].update(tr.last_batch.users.tolist())
        current["item"].update(tr.last_batch.items.tolist())

    def on_publish(tr: OnlineTrainer) -> None:
        touched[tr.stats.last_version] = {k: set(v) for k, v in current.items()}
        for v in current.values():
            v.clear()

    with OnlineTrainer(cfg, publish_every=10) as tr:
        tr.run(steps=30, on_step=on_step, on_publish=on_publish)
        final_dense = tr.model.dense_state()
    assert sorted(touched) == [10, 20, 30]
    msgs = _consume_all(bootstrap, {f"{prefix}.user": 2, f"{prefix}.item": 2, f"{prefix}.dense": 1})
    for version, tables in touched.items():
        for table, ids in tables.items():
            keys = [
                m.keys
                for m in msgs
                if m.kind == "UPDATE" and m.table == table and m.version == version
            ]
            assert set(np.concatenate(keys).tolist()) == ids, (version, table)
            markers = {
                m.partition
                for m in msgs
                if m.is_marker and m.table == table and m.version == version
            }
            assert markers == {0, 1}
    dense = [m for m in msgs if m.is_dense]
    assert [m.version for m in dense] == [10, 20, 30]
    for name, a in final_dense.items():
        np.testing.assert_array_equal(dense[-1].tensors[name], a)
    rows = sum(m.row_count for m in msgs if m.kind == "UPDATE")
    assert (
        rows == tr.stats.rows_published == sum(len(s) for t in touched.values() for s in t.values())
    )


@pytest.mark.integration
def test_a_restarted_trainer_resumes_above_the_committed_version(
    bootstrap: str, prefix: str
) -> None:
    """A trainer restarted at step 0 would publish versions every tier drops as older: it
    resumes above the version committed on the stream instead."""
    cfg = Config(tables=TABLES, topic_prefix=prefix, kafka={"bootstrap.servers": bootstrap})
    with OnlineTrainer(cfg, publish_every=10) as tr:
        tr.run(steps=20)
    assert tr.stats.last_version == 20
    with OnlineTrainer(cfg, publish_every=10) as again:
        assert again.stats.step == 20
        again.run(steps=10)
    assert again.stats.last_version == 30 and again.stats.commits == 1
    msgs = _consume_all(bootstrap, {f"{prefix}.user": 2})
    assert sorted({m.version for m in msgs if m.is_marker}) == [10, 20, 30]
    assert sorted({m.version for m in msgs if m.kind == "UPDATE"}) == [10, 20, 30]


@pytest.mark.integration
@pytest.mark.slow
def test_train_cli_exits_cleanly_on_sigterm(bootstrap: str, prefix: str, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'topic_prefix = "{prefix}"\n[kafka]\n"bootstrap.servers" = "{bootstrap}"\n'
        '[[tables]]\nname = "user"\ndim = 16\n[[tables]]\nname = "item"\ndim = 16\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamhps", "train", "--config", str(cfg), "--publish-every", "10",
         "--steps-per-second", "50"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    # SIGTERM once a commit and a dense update are on the stream (the CLI's start, imports
    # included, took over 8 s on a loaded 2-core machine: a fixed sleep stopped it before its
    # first commit)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex[:8]}"})
    c.assign([TopicPartition(f"{prefix}.user", 0, 0), TopicPartition(f"{prefix}.dense", 0, 0)])
    marker = dense = False
    deadline = time.monotonic() + 120
    try:
        while not (marker and dense) and time.monotonic() < deadline and proc.poll() is None:
            m = c.poll(0.2)
            if m is not None and not m.error():
                msg = wire.decode(m.value())
                marker, dense = marker or msg.is_marker, dense or msg.is_dense
    finally:
        c.close()
    assert marker and dense and proc.poll() is None, (marker, dense, proc.poll())
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-2000:]
    assert "published" in out and "commits" in out
