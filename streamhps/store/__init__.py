"""The persistent tier: rows with versions, Kafka offsets and applied versions in LMDB.

::

    st = LmdbStore.open(path, readonly=True)
    values, versions, found = st.get("user", keys)
    st.applied_version("user"); st.offsets(); st.tables(); st.stats(); st.close()
"""

from streamhps.store.base import StoreReader, StoreWriter, TableRows, TableWriteResult, WriteBatch
from streamhps.store.lmdb_store import LmdbStore

__all__ = ["LmdbStore", "StoreReader", "StoreWriter", "TableRows", "TableWriteResult", "WriteBatch"]
