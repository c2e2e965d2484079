"""What a request body and query say, checked: the tables, keys, consistency and dense features
of lookups and predicts, or an :class:`~servers.errors.HTTPError` that names what was wrong.

The binary and JSON forms of each route are described in :mod:`servers.app`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from servers.errors import HTTPError
from streamhps.config import TableSpec
from streamhps.consistency import CONSISTENCY
from streamhps.errors import ValidationError
from streamhps.keys import as_int64_keys

if TYPE_CHECKING:
    from servers.model import ServedModel


Query = dict[str, list[str]]
"""A parsed query string (``urllib.parse.parse_qs``)."""


class RequestPayloads:
    """Decodes the payloads of the lookup and predict routes for one deployment's tables."""

    def __init__(self, tables: dict[str, TableSpec], max_keys: int) -> None:
        self.tables = tables
        self.max_keys = max_keys

    def table(self, name: Any) -> str:
        if not isinstance(name, str):
            raise HTTPError(
                400, f"'table' must be a string naming a table, got {type(name).__name__}"
            )
        if name not in self.tables:
            raise HTTPError(
                404, f"unknown table {name!r}; tables: {sorted(self.tables)}", "UnknownTableError"
            )
        return name

    def consistency(self, c: Any) -> str:
        if c is None:
            return "eventual"
        if c not in CONSISTENCY:
            raise HTTPError(400, f"'consistency' must be one of {list(CONSISTENCY)}, got {c!r}")
        return str(c)

    def keys(self, raw: Any, what: str = "keys") -> np.ndarray:
        if not isinstance(raw, list):
            raise HTTPError(
                400, f"'{what}' must be a JSON array of integer ids, got {type(raw).__name__}"
            )
        if len(raw) > self.max_keys:
            raise HTTPError(413, f"{len(raw)} {what} in one request; the limit is {self.max_keys}")
        if not raw:
            return np.empty(0, dtype=np.int64)
        try:
            a = np.asarray(raw)
        except (ValueError, OverflowError) as e:
            raise HTTPError(400, f"'{what}' must be a flat array of integer ids: {e}") from None
        try:
            return as_int64_keys(a, what)  # ids above 2**63 keep their bits, as in the publisher
        except ValidationError:
            bad = next((x for x in raw if isinstance(x, bool) or not isinstance(x, int)), raw[0])
            raise HTTPError(
                400, f"'{what}' must be integer ids (int64); found {bad!r} ({type(bad).__name__})"
            ) from None

    def lookup_many_binary(self, query: Query, body: bytes) -> tuple[dict[str, np.ndarray], str]:
        """``?tables=A,B&counts=nA,nB[&consistency=]``, body: every table's int64 keys."""
        names = (query.get("tables") or [""])[0].split(",")
        try:
            counts = [int(c) for c in (query.get("counts") or [""])[0].split(",")]
        except ValueError:
            raise HTTPError(
                400, "'counts' must be comma-separated key counts, one per table"
            ) from None
        if len(names) != len(counts) or not all(names) or min(counts) < 0:
            raise HTTPError(400, "give ?tables=A,B&counts=nA,nB: one count >= 0 per table")
        if len(set(names)) != len(names):
            raise HTTPError(400, f"a table appears twice in 'tables': {names}")
        tables = [self.table(t) for t in names]
        if len(body) != 8 * sum(counts):
            raise HTTPError(
                400, f"binary body is {len(body)} bytes; counts {counts} need {8 * sum(counts)}"
            )
        if sum(counts) > self.max_keys:
            raise HTTPError(413, f"{sum(counts)} keys in one request; the limit is {self.max_keys}")
        consistency = self.consistency(
            query["consistency"][0] if query.get("consistency") else None
        )
        allkeys = np.frombuffer(body, dtype="<i8").astype(np.int64, copy=False)
        bounds = np.cumsum([0, *counts])
        keys = {t: allkeys[bounds[i] : bounds[i + 1]] for i, t in enumerate(tables)}
        return keys, consistency

    def lookup_json(self, body: Any) -> tuple[str, np.ndarray, str]:
        """``{"table", "keys", "consistency"?}``."""
        if not isinstance(body, dict):
            raise HTTPError(400, 'the body must be a JSON object {"table": ..., "keys": [...]}')
        unknown = sorted(set(body) - {"table", "keys", "consistency"})
        if unknown:
            raise HTTPError(400, f"unknown field(s) {unknown}; allowed: table, keys, consistency")
        if "table" not in body or "keys" not in body:
            raise HTTPError(400, 'the body needs "table" and "keys"')
        table = self.table(body["table"])
        keys = self.keys(body["keys"])
        return table, keys, self.consistency(body.get("consistency"))

    def lookup_binary(self, query: Query, body: bytes) -> tuple[str, np.ndarray, str]:
        """``?table=NAME[&consistency=]``, body: little-endian int64 keys."""
        table = self.table(query["table"][0] if query.get("table") else None)
        consistency = self.consistency(
            query["consistency"][0] if query.get("consistency") else None
        )
        if len(body) % 8:
            raise HTTPError(
                400, f"binary body is {len(body)} bytes, not a multiple of 8 (int64 keys)"
            )
        if len(body) // 8 > self.max_keys:
            raise HTTPError(
                413, f"{len(body) // 8} keys in one request; the limit is {self.max_keys}"
            )
        keys = np.frombuffer(body, dtype="<i8").astype(np.int64, copy=False)
        return table, keys, consistency

    def predict_binary(
        self, query: Query, body: bytes, model: Callable[[], ServedModel]
    ) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
        """``?tables=A,B&counts=n,n[&consistency=]``, body: each table's ``n`` int64 ids in
        that order, then ``[n, num_dense]`` float32. ``model`` gives the model in service."""
        served = model()
        names = [t for t in (query.get("tables") or [""])[0].split(",") if t]
        try:
            counts = [int(c) for c in (query.get("counts") or [""])[0].split(",")]
        except ValueError:
            raise HTTPError(
                400, "binary predict needs ?tables=A,B&counts=nA,nB (ids per table)"
            ) from None
        for t in names:
            self.table(t)
        if len(set(names)) != len(names) or len(counts) != len(names):
            raise HTTPError(
                400,
                f"give each table once with one count each; got tables {names}, counts {counts}",
            )
        missing = [t for t in served.tables if t not in names]
        if missing:
            raise HTTPError(
                400,
                f"'features' lacks ids for table(s) {missing}; the model uses {list(served.tables)}",
            )
        if len(set(counts)) != 1:
            raise HTTPError(
                400,
                f"every table needs one id per example; got lengths {dict(zip(names, counts, strict=True))}",
            )
        n, d = counts[0], served.num_dense
        if n < 0:
            raise HTTPError(400, f"counts must be >= 0, got {counts}")
        if n > self.max_keys:
            raise HTTPError(413, f"{n} ids per table in one request; the limit is {self.max_keys}")
        if len(body) < 8 * n * len(names):
            raise HTTPError(
                400,
                f"binary predict body is {len(body)} bytes; {n} int64 ids of each of "
                f"{len(names)} tables need {8 * n * len(names)} before the dense features",
            )
        floats, rest = divmod(len(body) - 8 * n * len(names), 4)
        if floats != n * d or rest:
            if floats == 0 and d and not rest:
                raise HTTPError(400, f"'dense' is required: [n, {d}] float32 after the ids")
            shape = (
                f"[{floats // d}, {d}]"
                if d and floats > 0 and not floats % d
                else f"{floats} values"
            )
            raise HTTPError(
                400,
                f"'dense' has shape {shape} ({len(body)} body bytes); expected [{n}, {d}] float32 "
                f"after {n} int64 ids of each of {len(names)} tables",
            )
        keys = np.frombuffer(body, dtype="<i8", count=n * len(names)).astype(np.int64, copy=False)
        ids = {t: keys[i * n : (i + 1) * n] for i, t in enumerate(names) if t in served.tables}
        x = np.frombuffer(body, dtype="<f4", offset=8 * n * len(names)).reshape(n, d)
        x = x.astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise HTTPError(400, "'dense' contains NaN or Inf")
        consistency = self.consistency(
            query["consistency"][0] if query.get("consistency") else None
        )
        return ids, x, consistency

    def predict_json(
        self, body: Any, model: Callable[[], ServedModel]
    ) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
        """``{"features": {table: [ids]}, "dense": [[...]]?, "consistency"?}``; ``model`` is
        asked for once the body's shape is known to be a predict."""
        if not isinstance(body, dict) or "features" not in body:
            raise HTTPError(
                400, 'the body must be a JSON object {"features": {table: [ids]}, "dense": [[...]]}'
            )
        unknown = sorted(set(body) - {"features", "dense", "consistency"})
        if unknown:
            raise HTTPError(
                400, f"unknown field(s) {unknown}; allowed: features, dense, consistency"
            )
        served = model()
        feats = body["features"]
        if not isinstance(feats, dict):
            raise HTTPError(
                400, "'features' must be an object mapping table name to an array of ids"
            )
        for name in feats:
            self.table(name)
        missing = [t for t in served.tables if t not in feats]
        if missing:
            raise HTTPError(
                400,
                f"'features' lacks ids for table(s) {missing}; the model uses {list(served.tables)}",
            )
        ids = {t: self.keys(feats[t], f"features.{t}") for t in served.tables}
        sizes = {t: int(a.size) for t, a in ids.items()}
        if len(set(sizes.values())) != 1:
            raise HTTPError(400, f"every table needs one id per example; got lengths {sizes}")
        n = next(iter(sizes.values()))
        dense = body.get("dense")
        if served.num_dense:
            if dense is None:
                raise HTTPError(
                    400, f"'dense' is required: [n, {served.num_dense}] numbers per example"
                )
            try:
                x = np.asarray(dense, dtype=np.float32)
            except (ValueError, TypeError) as e:
                raise HTTPError(
                    400, f"'dense' must be an [n, {served.num_dense}] array of numbers: {e}"
                ) from None
            if x.shape != (n, served.num_dense):
                raise HTTPError(
                    400, f"'dense' has shape {list(x.shape)}; expected [{n}, {served.num_dense}]"
                )
            if not np.isfinite(x).all():
                raise HTTPError(400, "'dense' contains NaN or Inf")
        else:
            x = np.zeros((n, 0), dtype=np.float32)
        return ids, x, self.consistency(body.get("consistency"))
