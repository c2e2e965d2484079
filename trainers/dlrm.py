"""A small DLRM trained online on the synthetic click stream, publishing as it learns.

::

    trainer = OnlineTrainer(config, stream=StreamSpec(seed=0), publish_every=20)
    with trainer:
        trainer.run(steps=2000)        # train, publish changed rows + commit + dense every N steps

A restarted trainer resumes the numbering: entering the trainer moves its step up to the
highest version committed on the stream (:meth:`OnlineTrainer.resume`).

Every ``publish_every`` steps the trainer publishes only the embedding rows touched since the
last publish (``np.unique`` of the ids seen), at ``version = step``, then ``commit(step)``,
then (every ``dense_every`` commits) the dense part. Run it as ``streamhps train --config PATH``
or ``python -m trainers.dlrm --config PATH``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from streamhps.config import Config
from streamhps.errors import ConfigError
from streamhps.models import DLRMDense
from streamhps.publish import Publisher
from trainers.synthetic import Batch, ClickStream, StreamSpec, auc

log = logging.getLogger(__name__)


class DLRM(nn.Module):
    """Embeddings per table plus the library's :class:`~streamhps.models.DLRMDense` (bottom MLP,
    dot interactions, top MLP): the server loads the published dense state into that same class.
    """

    def __init__(
        self,
        tables: dict[str, int],
        dim: int,
        num_dense: int,
        hidden: int = 32,
        max_norm: float | None = None,
    ) -> None:
        super().__init__()
        self.table_names = list(tables)
        # max_norm: rows are renormalised when looked up; keeps logits in range under drift
        self.emb = nn.ModuleDict(
            {
                name: nn.Embedding(rows, dim, sparse=True, max_norm=max_norm)
                for name, rows in tables.items()
            }
        )
        for e in self.emb.values():
            assert isinstance(e, nn.Embedding)
            nn.init.normal_(e.weight, std=0.2)
        self.dense = DLRMDense(num_dense, (dim,), (hidden,), len(tables))

    def forward(self, ids: dict[str, torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        return self.dense([self.emb[n](ids[n]) for n in self.table_names], dense)

    def dense_state(self) -> dict[str, np.ndarray]:
        """The dense part (everything but the embeddings) as float32 numpy arrays, under the
        names :meth:`DLRMDense.from_state` loads."""
        return self.dense.dense_state()


@dataclass
class TrainerStats:
    step: int = 0
    samples: int = 0
    rows_published: int = 0
    commits: int = 0
    dense_published: int = 0
    dense_version: int = 0  # version of the last dense update published
    last_version: int = 0
    loss_ewma: float = float("nan")
    auc_ewma: float = float("nan")  # progressive validation: scored before training on the batch
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class Snapshot:
    """What was published up to one commit: embeddings (unpublished rows zero) + dense model."""

    version: int
    embeddings: dict[str, np.ndarray]
    dense: DLRMDense
    tables: tuple[str, ...]

    def predict(self, tables: dict[str, np.ndarray], dense: np.ndarray) -> np.ndarray:
        embs = [
            torch.from_numpy(self.embeddings[t][np.asarray(tables[t], dtype=np.int64)])
            for t in self.tables
        ]
        with torch.inference_mode():
            logits = self.dense(embs, torch.as_tensor(np.asarray(dense, dtype=np.float32)))
        return torch.sigmoid(logits).numpy()


class OnlineTrainer:
    """Trains :class:`DLRM` on :class:`ClickStream` batches and publishes what changed.

    ``config`` supplies the tables (the first two are the user and item tables; every table
    must have the same ``dim``) and the Kafka settings. Pass ``publisher=None`` to train
    without publishing (tests of the model itself).
    """

    def __init__(
        self,
        config: Config,
        *,
        stream: StreamSpec | None = None,
        batch_size: int = 256,
        publish_every: int = 20,
        dense_every: int = 1,
        lr_embedding: float = 0.1,
        lr_dense: float = 0.01,
        max_norm: float | None = 2.0,
        publish: bool = True,
        torch_threads: int = 1,
    ) -> None:
        if len(config.tables) != 2:
            raise ConfigError(
                f"the DLRM trainer needs exactly two tables (users, items); config has "
                f"{[t.name for t in config.tables]}"
            )
        dims = {t.dim for t in config.tables}
        if len(dims) != 1:
            raise ConfigError(f"the DLRM trainer needs tables of one dim; got {sorted(dims)}")
        if any(t.dtype != "float32" for t in config.tables):
            raise ConfigError("the DLRM trainer publishes float32 tables; set dtype = 'float32'")
        if publish_every < 1 or dense_every < 1:
            raise ConfigError("publish_every and dense_every must be >= 1")
        torch.set_num_threads(torch_threads)
        self.config = config
        self.stream = ClickStream(stream)
        self.spec = self.stream.spec
        self.batch_size = batch_size
        self.publish_every = publish_every
        self.dense_every = dense_every
        self.user_table, self.item_table = (t.name for t in config.tables)
        seed = self.spec.seed
        torch.manual_seed(seed)
        self._rng = np.random.default_rng(seed + 1)
        self.dim = dims.pop()
        self.model = DLRM(
            {self.user_table: self.spec.max_users, self.item_table: self.spec.max_items},
            self.dim, self.spec.num_dense, max_norm=max_norm,
        )  # fmt: skip
        self._opt_sparse = torch.optim.SparseAdam(
            list(self.model.emb.parameters()), lr=lr_embedding
        )
        dense_params = [p for n, p in self.model.named_parameters() if not n.startswith("emb.")]
        self._opt_dense = torch.optim.Adam(dense_params, lr=lr_dense)
        self._loss = nn.BCEWithLogitsLoss()
        self._touched: dict[str, list[np.ndarray]] = {self.user_table: [], self.item_table: []}
        self._published = {
            self.user_table: np.zeros(self.spec.max_users, dtype=bool),
            self.item_table: np.zeros(self.spec.max_items, dtype=bool),
        }
        self.stats = TrainerStats()
        self.lock = threading.Lock()  # held while the model changes; snapshot() takes it
        self._publisher = Publisher.from_config(config) if publish else None
        self._commits_since_dense = 0
        self.last_batch: Batch | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> OnlineTrainer:
        if self._publisher is not None:
            self._publisher.create_topics()
            self.resume()
        return self

    def resume(self) -> int:
        """Continue the version numbering of a previous run: the step (= version) moves up to the
        highest version committed on the stream, so the next publish is newer than anything a
        tier holds. The model itself starts from its seed. Returns the step."""
        if self._publisher is None:
            return self.stats.step
        committed = [
            self._publisher.committed_version(t) for t in (self.user_table, self.item_table)
        ]
        last = max((v for v in committed if v is not None), default=0)
        if last > self.stats.step:
            log.info("resuming after version %d, committed on the stream by an earlier run", last)
            self.stats.step = self.stats.last_version = last
        return self.stats.step

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._publisher is not None:
            self._publisher.__exit__(None, None, None)
            self._publisher = None

    # ------------------------------------------------------------------ training

    def _weight(self, table: str) -> torch.Tensor:
        emb = self.model.emb[table]
        assert isinstance(emb, nn.Embedding)
        return emb.weight

    def step(self) -> float:
        """One optimisation step on a fresh batch; returns the loss."""
        t = self.stats.step
        b = self.stream.sample(t, self.batch_size, self._rng)
        self.last_batch = b
        ids = {
            self.user_table: torch.from_numpy(b.users),
            self.item_table: torch.from_numpy(b.items),
        }
        dense = torch.from_numpy(b.dense)
        y = torch.from_numpy(b.labels)
        with self.lock:
            logits = self.model(ids, dense)
            loss = self._loss(logits, y)
            self._opt_sparse.zero_grad()
            self._opt_dense.zero_grad()
            loss.backward()
            self._opt_sparse.step()
            self._opt_dense.step()
        self._touched[self.user_table].append(b.users)
        self._touched[self.item_table].append(b.items)
        lv = float(loss.detach())
        a = auc(b.labels, logits.detach().numpy())
        s = self.stats
        s.loss_ewma = lv if np.isnan(s.loss_ewma) else 0.98 * s.loss_ewma + 0.02 * lv
        if not np.isnan(a):
            s.auc_ewma = a if np.isnan(s.auc_ewma) else 0.98 * s.auc_ewma + 0.02 * a
        s.step = t + 1
        s.samples += self.batch_size
        return lv

    def publish(self) -> int:
        """Publish the rows touched since the last publish at ``version = step``, commit, and
        (every ``dense_every`` commits) the dense part. Returns the version."""
        version = self.stats.step
        if version <= self.stats.last_version:
            return self.stats.last_version
        rows = 0
        with self.lock:
            payload: dict[str, tuple[np.ndarray, np.ndarray]] = {}
            for table, chunks in self._touched.items():
                if not chunks:
                    continue
                keys = np.unique(np.concatenate(chunks))
                vecs = self._weight(table).detach()[torch.from_numpy(keys)].numpy().copy()
                payload[table] = (keys, vecs)
                chunks.clear()
            dense_state = self.model.dense_state()
        if self._publisher is not None:
            for table, (keys, vecs) in payload.items():
                self._publisher.publish(table, keys, vecs, version)
            self._publisher.commit(version)
        for table, (keys, _) in payload.items():
            self._published[table][keys] = True
            rows += keys.size
        self._commits_since_dense += 1
        if self._publisher is not None and (
            self._commits_since_dense >= self.dense_every or self.stats.dense_published == 0
        ):
            self._publisher.publish_dense(dense_state, version)
            self._publisher.flush()
            self._commits_since_dense = 0
            self.stats.dense_published += 1
            self.stats.dense_version = version
        self.stats.rows_published += rows
        self.stats.commits += 1
        self.stats.last_version = version
        self.stats.history.append(
            {
                "step": version,
                "rows": rows,
                "loss": self.stats.loss_ewma,
                "auc": self.stats.auc_ewma,
            }
        )
        log.info("published %d rows at version %d", rows, version)
        return version

    def snapshot(self) -> Snapshot:
        """A frozen copy of what has been published: rows never published read as zeros (the
        serving tables' ``missing = "zeros"``), plus the dense model."""
        with self.lock:
            embs = {}
            for table in (self.user_table, self.item_table):
                w = self._weight(table).detach().numpy().copy()
                w[~self._published[table]] = 0.0
                embs[table] = w
            dense = self.model.dense_state()
        return Snapshot(
            self.stats.last_version,
            embs,
            DLRMDense.from_state(dense, 2, version=max(1, self.stats.last_version)),
            (self.user_table, self.item_table),
        )

    def run(
        self,
        *,
        steps: int | None = None,
        duration: float | None = None,
        steps_per_second: float | None = None,
        stop: threading.Event | None = None,
        on_publish: Callable[[OnlineTrainer], None] | None = None,
        on_step: Callable[[OnlineTrainer], None] | None = None,
    ) -> TrainerStats:
        """Train until ``steps`` more steps, ``duration`` seconds or ``stop`` is set; publish every
        ``publish_every`` steps and once more at the end. ``steps_per_second`` throttles."""
        if steps is None and duration is None and stop is None:
            raise ConfigError("run() needs steps=, duration= or stop=")
        start = time.monotonic()
        first = self.stats.step
        while True:
            done = self.stats.step - first
            if steps is not None and done >= steps:
                break
            if duration is not None and time.monotonic() - start >= duration:
                break
            if stop is not None and stop.is_set():
                break
            if steps_per_second:
                ahead = done / steps_per_second - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
            self.step()
            if on_step is not None:
                on_step(self)
            if self.stats.step % self.publish_every == 0:
                self.publish()
                if on_publish is not None:
                    on_publish(self)
        if self.stats.step > self.stats.last_version:  # the steps since the last publish
            self.publish()
            if on_publish is not None:
                on_publish(self)
        return self.stats


# ---------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    from streamhps.cli import main as cli_main

    return cli_main(["train", *(argv or [])])


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
