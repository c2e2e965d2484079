"""The dense part of the DLRM, evaluated with numpy on the serving side.

The trainer (:mod:`trainers.dlrm`) publishes its dense state dict; this module reads it with
the same layout and the same arithmetic, so a served prediction equals the trainer's own
forward pass on the same embeddings. Layout (torch ``nn.Sequential`` names)::

    bottom.<i>.weight/bias   dense features -> [d], ReLU after every layer
    top.<i>.weight/bias      [d + F*(F-1)/2] -> ... -> [1], ReLU between layers

where ``F = 1 + number of tables`` (the bottom output plus one embedding per table, in the
config's table order) and the interaction is the pairwise dot product of those F vectors
(strict upper triangle), as in DLRM.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from streamhps.errors import ValidationError

_LAYER_RE = re.compile(r"^(bottom|top)\.(\d+)\.(weight|bias)$")


class DenseModel:
    """An immutable numpy DLRM head. Build once per dense update; swap the reference atomically."""

    def __init__(
        self, state: Mapping[str, np.ndarray], tables: Sequence[str], version: int
    ) -> None:
        self.version = int(version)
        self.tables = tuple(tables)
        self.bottom = _layers(state, "bottom")
        self.top = _layers(state, "top")
        if not self.bottom or not self.top:
            raise ValidationError(
                f"dense model v{version} lacks bottom.* or top.* layers; got {sorted(state)}"
            )
        self.num_dense = int(self.bottom[0][0].shape[1])
        self.dim = int(self.bottom[-1][0].shape[0])
        f = 1 + len(self.tables)
        want = self.dim + f * (f - 1) // 2
        if self.top[0][0].shape[1] != want:
            raise ValidationError(
                f"dense model v{version}: top MLP takes {self.top[0][0].shape[1]} inputs, but "
                f"{len(self.tables)} tables of dim {self.dim} give {want}; the model was trained "
                "for other tables"
            )
        if self.top[-1][0].shape[0] != 1:
            raise ValidationError(f"dense model v{version}: top MLP must end in one output")
        self._iu = np.triu_indices(f, k=1)

    def logits(self, embeddings: Sequence[np.ndarray], dense: np.ndarray) -> np.ndarray:
        """``embeddings``: one ``[n, dim]`` array per table (config order); ``dense``: ``[n, num_dense]``."""
        x = np.asarray(dense, dtype=np.float32)
        for w, b in self.bottom:
            x = np.maximum(x @ w.T + b, 0.0)
        vecs = np.stack([x, *(np.asarray(e, dtype=np.float32) for e in embeddings)], axis=1)
        inter = np.einsum("nfd,ngd->nfg", vecs, vecs)[:, self._iu[0], self._iu[1]]
        h = np.concatenate([x, inter], axis=1)
        for i, (w, b) in enumerate(self.top):
            h = h @ w.T + b
            if i < len(self.top) - 1:
                h = np.maximum(h, 0.0)
        return h[:, 0]

    def predict(self, embeddings: Sequence[np.ndarray], dense: np.ndarray) -> np.ndarray:
        """Click probabilities ``[n]``."""
        return sigmoid(self.logits(embeddings, dense))

    def describe(self) -> dict[str, object]:
        return {
            "version": self.version,
            "tables": list(self.tables),
            "num_dense": self.num_dense,
            "dim": self.dim,
            "parameters": int(sum(w.size + b.size for w, b in (*self.bottom, *self.top))),
        }


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def _layers(state: Mapping[str, np.ndarray], part: str) -> list[tuple[np.ndarray, np.ndarray]]:
    found: dict[int, dict[str, np.ndarray]] = {}
    for name, a in state.items():
        m = _LAYER_RE.match(name)
        if m and m.group(1) == part:
            found.setdefault(int(m.group(2)), {})[m.group(3)] = np.asarray(a, dtype=np.float32)
    out = []
    for idx in sorted(found):
        wb = found[idx]
        if "weight" not in wb or "bias" not in wb:
            raise ValidationError(f"dense layer {part}.{idx} lacks its weight or bias")
        out.append((wb["weight"], wb["bias"]))
    return out
