"""The dense model in torch: one module for trainer and server, the numpy head as the oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from servers.model import DenseModel, ServedModel
from streamhps.config import Config, TableSpec
from streamhps.errors import ValidationError
from streamhps.models import DLRMDense
from trainers.dlrm import OnlineTrainer


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def random_state(rng: np.random.Generator, tables: int, bottom=(32, 16), top=(24, 8), num_dense=5):  # type: ignore[no-untyped-def]
    m = DLRMDense(num_dense, bottom, top, tables)
    return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in m.dense_state().items()}


def test_served_model_equals_the_numpy_oracle(device: str) -> None:
    rng = np.random.default_rng(0)
    tables = ["a", "b", "c"]
    state = random_state(rng, 3)
    served = ServedModel(state, tables, version=7, device=device)
    oracle = DenseModel(state, tables, 7)
    n = 300
    rows = {t: rng.standard_normal((n, 16)).astype(np.float32) for t in tables}
    x = rng.standard_normal((n, 5)).astype(np.float32)
    want = oracle.predict([rows[t] for t in tables], x)
    got = served.predict(rows, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # rows as torch tensors on the device (what a cuda worker's lookup_many returns), fp16 too
    dev_rows = {t: torch.from_numpy(r).to(device) for t, r in rows.items()}
    np.testing.assert_allclose(served.predict(dev_rows, x), want, rtol=1e-4, atol=1e-6)
    half = {t: r.half() for t, r in dev_rows.items()}
    want16 = oracle.predict([rows[t].astype(np.float16) for t in tables], x)
    np.testing.assert_allclose(served.predict(half, x), want16, rtol=1e-3, atol=1e-5)
    assert served.predict({t: r[:0] for t, r in rows.items()}, x[:0]).shape == (0,)
    d = served.describe()
    assert d["version"] == 7 and d["num_dense"] == 5 and d["dim"] == 16
    assert str(d["device"]).startswith(device)
    assert all(p.device.type == device for p in served.module.parameters())
    assert not any(p.requires_grad for p in served.module.parameters())


def test_the_trainers_published_state_loads_into_the_same_module() -> None:
    cfg = Config(
        tables=(TableSpec("user", 16, missing="zeros"), TableSpec("item", 16, missing="zeros"))
    )
    tr = OnlineTrainer(cfg, publish=False)
    tr.run(steps=20)
    assert isinstance(tr.model.dense, DLRMDense)  # the trainer trains the library's module
    b = tr.stream.sample(20, 128, np.random.default_rng(2))
    ids = {"user": torch.from_numpy(b.users), "item": torch.from_numpy(b.items)}
    with torch.no_grad():
        want = torch.sigmoid(tr.model(ids, torch.from_numpy(b.dense))).numpy()
        rows = {t: tr.model.emb[t](ids[t]).numpy() for t in ("user", "item")}
    served = ServedModel(tr.model.dense_state(), ["user", "item"], 20)
    np.testing.assert_allclose(served.predict(rows, b.dense), want, rtol=1e-5, atol=1e-6)
    assert set(tr.model.dense_state()) == {
        "bottom.0.weight", "bottom.0.bias", "top.0.weight", "top.0.bias", "top.2.weight", "top.2.bias"
    }  # fmt: skip


def test_layer_indices_need_only_increase() -> None:
    rng = np.random.default_rng(1)
    state = random_state(rng, 2, bottom=(8,), top=(4,), num_dense=3)
    renamed = {k.replace("top.2.", "top.7."): v for k, v in state.items()}
    a = ServedModel(state, ["u", "i"], 1)
    b = ServedModel(renamed, ["u", "i"], 1)
    rows = {t: rng.standard_normal((10, 8)).astype(np.float32) for t in ("u", "i")}
    x = rng.standard_normal((10, 3)).astype(np.float32)
    np.testing.assert_array_equal(a.predict(rows, x), b.predict(rows, x))


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda s: {k: v for k, v in s.items() if not k.startswith("top.")}, "lacks bottom"),
        (lambda s: {k: v for k, v in s.items() if k != "top.0.bias"}, "lacks its weight or bias"),
        (lambda s: {**s, "top.0.weight": s["top.0.weight"][:, :-1]}, "top MLP takes"),
        (lambda s: {**s, "bottom.0.bias": s["bottom.0.bias"][:-1]}, "has weight"),
        (lambda s: {**s, "top.2.weight": s["top.2.weight"][:, :-1]}, "do not chain"),
    ],
)
def test_states_that_do_not_fit_are_refused_saying_why(mutate, needle) -> None:  # type: ignore[no-untyped-def]
    state = random_state(np.random.default_rng(3), 2, bottom=(8,), top=(4,), num_dense=3)
    with pytest.raises(ValidationError, match=needle):
        ServedModel(mutate(state), ["u", "i"], 9)
