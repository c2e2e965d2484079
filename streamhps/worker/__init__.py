"""The inference worker: a stream-fed embedding cache with LMDB behind it and bounded staleness.

Modules: ``core`` (:class:`InferenceWorker`, lookups, readiness), ``ingest`` (the consume and
apply loop), ``window`` (rows consumed that LMDB may not hold yet), ``miss_path`` (what a cache
missed, from the window and LMDB), ``staleness`` (how far behind the head each partition is),
``head`` (the thread that probes the head of every partition), ``ownership`` (the partitions a
sharded worker serves), ``pooling`` (multi-hot bags), ``request`` (one request on the GPU),
``missing`` (never-seen keys), ``ingest_process`` (a cpu worker's ingest in a process of its own,
the cache in shared memory). Which messages are skipped:
:mod:`streamhps.validation`.
"""

from streamhps.worker.core import InferenceWorker
from streamhps.worker.missing import init_vectors

__all__ = ["InferenceWorker", "init_vectors"]
