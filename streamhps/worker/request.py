"""One request's lookups, every table together: key checks and the GPU request path.

A request names keys for several tables (numpy, CuPy or torch; on the host or on the worker's
GPU). On a ``cuda`` worker :class:`DeviceRequests` runs it so that it stays on the device:

1. host keys of every table (and the tables' segment ends) go into one pinned buffer and cross
   to the GPU in ONE host-to-device copy; keys already on the worker's GPU are used in place;
2. one fused lookup per table, launched back to back on the worker's stream (every cache of a
   worker shares it, so no cross-stream events are needed), their hit masks side by side;
3. one kernel counts each table's misses, and ONE small device-to-host copy of those counts
   into pinned memory is the only host synchronisation of a request that hits everywhere;
4. only when something missed: the missed positions (and keys that came from the device) are
   read back, the worker resolves every table's misses together (window, then one LMDB read
   transaction), and the rows cross back in ONE host-to-device copy, scattered per table.

Results are CuPy arrays on the worker's device, complete when returned (the worker turns them
into torch tensors through DLPack, without a copy).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from streamhps.errors import ValidationError

_ALIGN = 16  # byte alignment of each table's rows inside the staging buffers


def torch_tensor_type() -> Any:
    """``torch.Tensor`` if torch is imported (no tensor can exist otherwise), else None."""
    torch = sys.modules.get("torch")
    return None if torch is None else torch.Tensor


def array_device(keys: Any) -> str:
    """``"cpu"``, ``"cuda:N"`` or another torch device name for an array-like."""
    tensor = torch_tensor_type()
    if tensor is not None and isinstance(keys, tensor):
        d = keys.device
        return f"cuda:{d.index if d.index is not None else 0}" if d.type == "cuda" else d.type
    if hasattr(keys, "__cuda_array_interface__"):
        dev = getattr(keys, "device", None)
        return f"cuda:{getattr(dev, 'id', 0)}"
    return "cpu"


def check_keys(table: str, keys: Any, device: str, limit: int, xp: Any = np) -> np.ndarray | Any:
    """Keys of one table as a 1-D int64 array: numpy for host input, CuPy (on the worker's GPU)
    for device input. ``device`` is the worker's (``"cpu"`` or ``"cuda:N"``). Refuses, with a
    message naming the table: keys on another device, non-integer dtypes, not 1-D, over the
    per-lookup limit."""
    where = array_device(keys)
    if where != "cpu" and where != device:
        hint = (
            "pass host arrays (numpy, or a CPU tensor)"
            if device == "cpu"
            else f"move them to {device} or pass host arrays"
        )
        raise ValidationError(
            f"keys of table {table!r} are on {where}, but this worker serves on {device}: {hint}"
        )
    tensor = torch_tensor_type()
    if tensor is not None and isinstance(keys, tensor):
        keys = keys.detach()
        a: Any = keys.numpy() if where == "cpu" else xp.from_dlpack(keys)
    elif where != "cpu":
        a = xp.asarray(keys)
    else:
        try:
            a = np.asarray(keys)
        except (ValueError, TypeError) as e:
            raise ValidationError(f"keys of table {table!r} are not an array of ids: {e}") from None
    if a.ndim != 1:
        raise ValidationError(
            f"keys of table {table!r} must be a 1-D array of int64 ids, got shape {tuple(a.shape)}"
        )
    if a.size and a.dtype.kind not in "iu":
        raise ValidationError(
            f"keys of table {table!r} must be integers (int64 ids), got dtype {a.dtype}"
        )
    if a.shape[0] > limit:
        raise ValidationError(
            f"{a.shape[0]} keys of table {table!r} in one lookup, over serving.max_lookup_keys = "
            f"{limit}; split the batch"
        )
    if a.dtype == np.uint64:
        a = a.view(np.int64)
    elif a.dtype != np.int64:
        a = a.astype(np.int64)
    if where != "cpu":
        return xp.ascontiguousarray(a)
    return a


class DeviceRequests:
    """The request path of one ``cuda`` worker: its device, its stream, pinned staging buffers
    (one set per calling thread, reused: each request has finished its copies when it returns).
    """

    def __init__(self, device_id: int, stream: Any) -> None:
        import cupy

        self.cp = cupy
        self.device = cupy.cuda.Device(device_id)
        self.stream = stream
        self._tls = threading.local()

    def _pinned(self, name: str, nbytes: int) -> np.ndarray:
        """A thread-local pinned host buffer of at least ``nbytes`` bytes (uint8)."""
        buf = getattr(self._tls, name, None)
        if buf is None or buf.nbytes < nbytes:
            size = 1 << max(12, (max(nbytes, 1) - 1).bit_length())
            mem = self.cp.cuda.alloc_pinned_memory(size)
            buf = np.frombuffer(mem, dtype=np.uint8, count=size)
            setattr(self._tls, name, buf)
        return buf

    def lookup(
        self,
        caches: Mapping[str, Any],
        keys: Mapping[str, Any],
        resolve: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    ) -> tuple[dict[str, Any], np.ndarray]:
        """Rows of every table's keys (CuPy, on the device) and the per-table miss counts.

        ``caches``: table -> CudaCache (all on this worker's stream); ``keys``: table -> int64
        keys (numpy or CuPy on this device); ``resolve``: table -> missed keys -> their rows (host,
        ``[n, dim]``: the worker's window/LMDB/missing-policy path, all tables at once)."""
        cp, s = self.cp, self.stream
        names = list(keys)
        t = len(names)
        sizes = np.fromiter((keys[n].shape[0] for n in names), dtype=np.int64, count=t)
        ends = np.cumsum(sizes)
        total = int(ends[-1]) if t else 0
        with self.device:
            current = cp.cuda.get_current_stream()
            if current.ptr != 0 and current != s:  # device keys made on the caller's stream
                s.wait_event(current.record())
            with s:
                # 1. segment ends + every host key in one pinned buffer, one H2D copy
                staged = self._pinned("keys", 8 * (t + total)).view(np.int64)[: t + total]
                staged[:t] = ends
                for i, name in enumerate(names):
                    k = keys[name]
                    if isinstance(k, np.ndarray):
                        staged[t + ends[i] - sizes[i] : t + ends[i]] = k
                dev_keys = cp.empty(t + total, dtype=cp.int64)
                dev_keys.set(staged, stream=s)
                # 2. one fused lookup per table, hit masks side by side
                hit = cp.empty(total, dtype=cp.bool_)
                outs: dict[str, Any] = {}
                for i, name in enumerate(names):
                    lo, hi = int(ends[i] - sizes[i]), int(ends[i])
                    k = keys[name]
                    kd = dev_keys[t + lo : t + hi] if isinstance(k, np.ndarray) else k
                    cache = caches[name]
                    out = cp.empty((hi - lo, cache.dim), dtype=cache.dtype)
                    cache.lookup_into(kd, out, hit[lo:hi])
                    outs[name] = out
                # 3. per-table miss counts: the one synchronisation of an all-hit request
                counts_dev = cp.empty(t, dtype=cp.uint32)
                caches[names[0]].segment_misses(hit, dev_keys[:t], counts_dev)
                counts = self._pinned("counts", 4 * t).view(np.uint32)[:t]
                counts_dev.get(stream=s, out=counts)
                counts = counts.copy()
                if not counts.any():
                    return outs, counts
                # 4. misses: positions back to the host, resolve all tables, one H2D of rows
                miss_pos = cp.flatnonzero(~hit)
                pos_h = miss_pos.get(stream=s)
                bounds = np.concatenate(([0], np.cumsum(counts, dtype=np.int64)))  # not float64
                missed: dict[str, np.ndarray] = {}
                local: dict[str, tuple[np.ndarray, Any]] = {}
                for i, name in enumerate(names):
                    if not counts[i]:
                        continue
                    lo = int(ends[i] - sizes[i])
                    p = pos_h[bounds[i] : bounds[i + 1]] - lo
                    k = keys[name]
                    mk = k[p] if isinstance(k, np.ndarray) else k[cp.asarray(p)].get(stream=s)
                    missed[name] = mk
                    local[name] = (p, miss_pos[bounds[i] : bounds[i + 1]] - lo)
                rows = resolve(missed)
                offs, nbytes = {}, 0
                for name, r in rows.items():
                    offs[name] = nbytes
                    nbytes += -(-r.nbytes // _ALIGN) * _ALIGN
                staged_rows = self._pinned("rows", nbytes)[:nbytes]
                for name, r in rows.items():
                    staged_rows[offs[name] : offs[name] + r.nbytes] = r.reshape(-1).view(np.uint8)
                dev_rows = cp.empty(nbytes, dtype=cp.uint8)
                dev_rows.set(staged_rows, stream=s)
                for name, r in rows.items():
                    view = dev_rows[offs[name] : offs[name] + r.nbytes].view(r.dtype)
                    outs[name][local[name][1]] = view.reshape(r.shape)
                s.synchronize()  # the staging buffers are reused by this thread's next request
        return outs, counts
