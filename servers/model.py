"""The dense model in service: the published state dict in the trainer's own torch module.

:class:`ServedModel` loads a published dense state into :class:`streamhps.models.DLRMDense` (the
class the trainer trains) on the worker's device; the server swaps whole instances, so a request
sees one version. :class:`DenseModel` is the same DLRM head in numpy, kept only as the tests'
oracle. Layout (torch ``nn.Sequential`` names)::

    bottom.<i>.weight/bias   dense features -> [d], ReLU after every layer
    top.<i>.weight/bias      [d + F*(F-1)/2] -> ... -> [1], ReLU between layers

where ``F = 1 + number of tables`` (the bottom output plus one embedding per table, in the
config's table order) and the interaction is the pairwise dot product of those F vectors
(strict upper triangle), as in DLRM.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from streamhps.errors import ValidationError
from streamhps.models import DLRMDense

_LAYER_RE = re.compile(r"^(bottom|top)\.(\d+)\.(weight|bias)$")


class ServedModel:
    """One version of the dense model on ``device`` (``"cpu"`` or ``"cuda:N"``), immutable: build
    one per dense update and swap the reference. :meth:`predict` takes the rows a worker's
    ``lookup_many`` returned (numpy, or torch tensors already on the device) and host dense
    features, and returns host probabilities."""

    def __init__(
        self,
        state: Mapping[str, np.ndarray],
        tables: Sequence[str],
        version: int,
        device: str = "cpu",
    ) -> None:
        self.version = int(version)
        self.tables = tuple(tables)
        self.device = torch.device(device)
        self.module = DLRMDense.from_state(state, len(self.tables), self.device, self.version)
        self.num_dense = self.module.num_dense
        self.dim = self.module.dim
        self._staging = threading.local()  # pinned dense-feature buffer per thread (cuda)

    def _dense(self, dense: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.require(dense, np.float32, ["C_CONTIGUOUS", "WRITEABLE"]))
        if self.device.type != "cuda":
            return x
        buf = getattr(self._staging, "buf", None)
        if buf is None or buf.numel() < x.numel():
            buf = torch.empty(max(x.numel(), 1 << 16), dtype=torch.float32).pin_memory()
            self._staging.buf = buf
        staged = buf[: x.numel()].view(x.shape)
        staged.copy_(x)  # reused by this thread's next call: predict synchronises before it returns
        return staged.to(self.device, non_blocking=True)

    def predict(self, rows: Mapping[str, Any], dense: np.ndarray) -> np.ndarray:
        """Click probabilities ``[n]`` (float32 numpy) for ``rows[table]`` ``[n, dim]`` of every
        table of the model and ``dense`` ``[n, num_dense]``."""
        embs = [
            torch.from_numpy(r) if isinstance(r, np.ndarray) else r
            for r in (rows[t] for t in self.tables)
        ]
        embs = [e.to(self.device) for e in embs]  # no copy when already there
        with torch.inference_mode():
            p = torch.sigmoid(self.module(embs, self._dense(dense)))
        return p.cpu().numpy()

    def describe(self) -> dict[str, object]:
        return {
            "version": self.version,
            "tables": list(self.tables),
            "num_dense": self.num_dense,
            "dim": self.dim,
            "device": str(self.device),
            "parameters": int(sum(p.numel() for p in self.module.parameters())),
        }


class DenseModel:
    """The DLRM head in numpy: the tests' oracle for :class:`ServedModel` and the trainer."""

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
