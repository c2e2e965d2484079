"""A synthetic click stream with a hidden ground truth that drifts and grows.

Every user and item has a hidden vector that turns slowly in a plane of its own::

    u_j(t) = A_j cos(w_j t + p_j) + B_j sin(w_j t + p_j)

so the truth at any step ``t`` is a closed-form function of the seed and ``t`` (a traffic
generator in another thread or process sees the same truth as the trainer). The click
probability is ``sigmoid(scale * <u, i> + bias_i + 0.8 * x_0 - 0.3)`` for dense context
features ``x``. New ids keep arriving (``new_users_per_step``), and the newest ids are
over-sampled, as fresh users and items are in real traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StreamSpec:
    """Shape of the synthetic world. Every field is reproducible from ``seed``."""

    seed: int = 0
    truth_dim: int = 8
    users0: int = 500
    items0: int = 100
    new_users_per_step: float = 0.2
    new_items_per_step: float = 0.05
    max_users: int = 20_000  # ids stop arriving once reached
    max_items: int = 5_000
    drift_period_steps: float = 12000.0  # steps for an average hidden vector to turn once
    new_id_share: float = 0.25  # share of a batch drawn from the newest ids
    new_window: int = 300
    logit_scale: float = 2.5
    num_dense: int = 2


@dataclass(frozen=True)
class Batch:
    step: int
    users: np.ndarray  # int64 [n]
    items: np.ndarray  # int64 [n]
    dense: np.ndarray  # float32 [n, num_dense]
    labels: np.ndarray  # float32 [n] in {0, 1}
    p_true: np.ndarray  # float64 [n]


class _Hidden:
    def __init__(self, rng: np.random.Generator, n: int, k: int, period: float) -> None:
        self.a = rng.standard_normal((n, k)) / np.sqrt(k)
        self.b = rng.standard_normal((n, k)) / np.sqrt(k)
        self.w = 2 * np.pi / period * rng.uniform(0.5, 1.5, n)
        self.p = rng.uniform(0, 2 * np.pi, n)

    def at(self, ids: np.ndarray, t: float) -> np.ndarray:
        ang = self.w[ids] * t + self.p[ids]
        return self.a[ids] * np.cos(ang)[:, None] + self.b[ids] * np.sin(ang)[:, None]


class ClickStream:
    """The world: hidden truth plus samplers. ``sample(step, n, rng)`` draws one batch."""

    def __init__(self, spec: StreamSpec | None = None) -> None:
        self.spec = spec = spec or StreamSpec()
        rng = np.random.default_rng(spec.seed)
        self._users = _Hidden(rng, spec.max_users, spec.truth_dim, spec.drift_period_steps)
        self._items = _Hidden(rng, spec.max_items, spec.truth_dim, spec.drift_period_steps)
        self._item_bias = rng.normal(0.0, 0.5, spec.max_items)
        self._scale = spec.logit_scale * np.sqrt(spec.truth_dim)

    def active_users(self, step: int) -> int:
        s = self.spec
        return int(min(s.max_users, s.users0 + np.floor(step * s.new_users_per_step)))

    def active_items(self, step: int) -> int:
        s = self.spec
        return int(min(s.max_items, s.items0 + np.floor(step * s.new_items_per_step)))

    def _draw(self, rng: np.random.Generator, active: int, n: int) -> np.ndarray:
        # Power law over the established ids (low ids are the popular ones), plus a share of
        # the newest ids.
        ids = np.floor(active * rng.random(n) ** 2.0).astype(np.int64)
        fresh = rng.random(n) < self.spec.new_id_share
        window = min(self.spec.new_window, active)
        ids[fresh] = active - 1 - rng.integers(0, window, int(fresh.sum()))
        return ids

    def p_click(
        self, step: int, users: np.ndarray, items: np.ndarray, dense: np.ndarray
    ) -> np.ndarray:
        u = self._users.at(users, step)
        i = self._items.at(items, step)
        logit = (
            self._scale * np.einsum("nk,nk->n", u, i)
            + self._item_bias[items]
            + 0.8 * dense[:, 0]
            - 0.3
        )
        return 1.0 / (1.0 + np.exp(-logit))

    def sample(self, step: int, n: int, rng: np.random.Generator) -> Batch:
        users = self._draw(rng, self.active_users(step), n)
        items = self._draw(rng, self.active_items(step), n)
        dense = rng.standard_normal((n, self.spec.num_dense)).astype(np.float32)
        p = self.p_click(step, users, items, dense)
        labels = (rng.random(n) < p).astype(np.float32)
        return Batch(step, users, items, dense, labels, p)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (rank-based, ties averaged); NaN if only one class is present."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    ss = s[order]
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(ss)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [s.size]])
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
