"""The persistent tier: rows with versions, Kafka offsets and applied versions in LMDB.

::

    st = LmdbStore.open(path, readonly=True)
    values, versions, found = st.get("user", keys)
    st.applied_version("user"); st.offsets(); st.tables(); st.stats(); st.close()
    st = open_stores(["stores/0", "stores/1"])   # one environment per processor shard, read as one
"""

from streamhps.store.base import StoreReader, StoreWriter, TableRows, TableWriteResult, WriteBatch
from streamhps.store.lmdb_store import LmdbStore
from streamhps.store.memory import MemoryStore
from streamhps.store.shards import ShardedStore, open_stores

__all__ = ["LmdbStore", "MemoryStore", "ShardedStore", "StoreReader", "StoreWriter", "TableRows",
           "TableWriteResult", "WriteBatch", "open_stores"]  # fmt: skip
