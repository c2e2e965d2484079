"""The dense part of a DLRM as a ``torch.nn.Module``: one definition for the trainer and the server.

::

    from streamhps.models import DLRMDense

    model = DLRMDense(num_dense=13, bottom=(512, 256, 64), top=(512, 256), num_tables=8)
    logits = model([emb_0, ..., emb_7], dense)          # embeddings [n, d] each; dense [n, 13]
    published = model.dense_state()                    # name -> float32 numpy: Publisher.publish_dense
    served = DLRMDense.from_state(published, num_tables=8, device="cuda")   # the server's copy

Layout (the published parameter names are those of ``nn.Sequential``)::

    bottom.<i>.weight/bias   dense features -> ... -> [d], ReLU after every layer
    top.<i>.weight/bias      [d + F*(F-1)/2] -> ... -> [1], ReLU between layers

with ``F = 1 + num_tables`` vectors (the bottom output, then one embedding per table in the
config's order) whose pairwise dot products (the strict upper triangle, row by row) are the
interaction, as in DLRM. The trainer (:mod:`trainers.dlrm`) trains this module under its own
``nn.Embedding`` tables; the server loads the published state dict into the same class on the
worker's device (:meth:`DLRMDense.from_state`). ``servers.model.DenseModel`` (numpy) computes the
same function and remains only as a test oracle.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from streamhps.errors import ValidationError

_LAYER_RE = re.compile(r"^(bottom|top)\.(\d+)\.(weight|bias)$")


def _mlp(widths: Sequence[int], relu_last: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if relu_last or i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRMDense(nn.Module):
    """Bottom MLP over the dense features, dot interactions with the embeddings, top MLP.

    ``bottom``: widths of the bottom layers, the last one the embedding dim; ``top``: widths of
    the hidden top layers (an output layer of one logit follows); ``num_tables``: embeddings per
    example. ``forward(embeddings, dense)`` returns logits ``[n]``: ``embeddings`` is a sequence
    of ``[n, dim]`` tensors (any float dtype; computed in the parameters' dtype) or one
    ``[n, num_tables, dim]`` tensor.
    """

    def __init__(
        self, num_dense: int, bottom: Sequence[int], top: Sequence[int], num_tables: int
    ) -> None:
        super().__init__()
        if not bottom or num_tables < 1:
            raise ValidationError("DLRMDense needs at least one bottom layer and one table")
        self.num_dense = int(num_dense)
        self.dim = int(bottom[-1])
        self.num_tables = int(num_tables)
        f = 1 + self.num_tables
        self.bottom = _mlp([self.num_dense, *bottom], relu_last=True)
        self.top = _mlp([self.dim + f * (f - 1) // 2, *top, 1], relu_last=False)
        iu = torch.triu_indices(f, f, offset=1)
        self.register_buffer("_iu", iu[0] * f + iu[1], persistent=False)

    def forward(
        self, embeddings: Sequence[torch.Tensor] | torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        x = self.bottom(dense)
        if isinstance(embeddings, torch.Tensor):
            vecs = torch.cat([x.unsqueeze(1), embeddings.to(x.dtype)], dim=1)
        else:
            vecs = torch.stack([x, *(e.to(x.dtype) for e in embeddings)], dim=1)
        iu = self._iu
        assert isinstance(iu, torch.Tensor)
        inter = torch.bmm(vecs, vecs.transpose(1, 2)).flatten(1)[:, iu]
        return self.top(torch.cat([x, inter], dim=1)).squeeze(1)

    def dense_state(self) -> dict[str, np.ndarray]:
        """The parameters as float32 numpy arrays under their published names."""
        return {
            k: v.detach().cpu().numpy().astype(np.float32, copy=True)
            for k, v in self.state_dict().items()
        }

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, Any],
        num_tables: int,
        device: str | torch.device = "cpu",
        version: int | None = None,
    ) -> DLRMDense:
        """A module holding a published state dict (``bottom.<i>.*``/``top.<i>.*`` arrays or
        tensors), on ``device``, in eval mode without gradients. Layer widths come from the
        arrays; layer indices need only be increasing (they are renumbered as this class lays
        them out). :class:`ValidationError` says what does not fit (``version`` names it)."""
        what = f"dense model v{version}" if version is not None else "dense model"
        layers: dict[str, dict[int, dict[str, Any]]] = {"bottom": {}, "top": {}}
        for name, a in state.items():
            m = _LAYER_RE.match(name)
            if m:
                layers[m.group(1)].setdefault(int(m.group(2)), {})[m.group(3)] = a
        if not layers["bottom"] or not layers["top"]:
            raise ValidationError(f"{what} lacks bottom.* or top.* layers; got {sorted(state)}")
        shapes: dict[str, list[tuple[int, int]]] = {}
        for part, found in layers.items():
            shapes[part] = []
            for idx in sorted(found):
                wb = found[idx]
                if "weight" not in wb or "bias" not in wb:
                    raise ValidationError(f"{what}: layer {part}.{idx} lacks its weight or bias")
                w, b = np.shape(wb["weight"]), np.shape(wb["bias"])
                if len(w) != 2 or b != (w[0],):
                    raise ValidationError(
                        f"{what}: layer {part}.{idx} has weight {list(w)} and bias {list(b)}"
                    )
                shapes[part].append((int(w[1]), int(w[0])))
        for part, sh in shapes.items():
            for (_, out), (inp, _) in zip(sh[:-1], sh[1:], strict=True):
                if out != inp:
                    raise ValidationError(f"{what}: {part} layers do not chain ({sh})")
        f = 1 + num_tables
        dim = shapes["bottom"][-1][1]
        want = dim + f * (f - 1) // 2
        if shapes["top"][0][0] != want:
            raise ValidationError(
                f"{what}: top MLP takes {shapes['top'][0][0]} inputs, but {num_tables} tables of "
                f"dim {dim} give {want}; the model was trained for other tables"
            )
        if shapes["top"][-1][1] != 1:
            raise ValidationError(f"{what}: top MLP must end in one output")
        model = cls(
            shapes["bottom"][0][0],
            [o for _, o in shapes["bottom"]],
            [o for _, o in shapes["top"][:-1]],
            num_tables,
        )
        ours: dict[str, torch.Tensor] = {}
        for part in ("bottom", "top"):
            seq = getattr(model, part)
            linear = [i for i, m in enumerate(seq) if isinstance(m, nn.Linear)]
            for pos, idx in zip(linear, sorted(layers[part]), strict=True):
                for k in ("weight", "bias"):
                    ours[f"{part}.{pos}.{k}"] = torch.tensor(
                        np.asarray(layers[part][idx][k], dtype=np.float32)
                    )
        model.load_state_dict(ours)
        return model.to(device).eval().requires_grad_(False)
