"""streamhps: embedding updates from an online-training job to GPU inference.

Kafka carries the updates, LMDB keeps the persistent tier, inference workers keep a CUDA (or
numpy) cache fresh with bounded staleness. See README.md and docs/INVARIANTS.md.
"""

from streamhps.config import Config, TableSpec
from streamhps.errors import (
    BrokerError,
    CacheError,
    ConfigError,
    HistoryLostError,
    MissingKeyError,
    PublishError,
    SchemaVersionError,
    ServerError,
    StaleReadError,
    StoreError,
    StreamHPSError,
    TopicError,
    UnknownTableError,
    ValidationError,
    VersionError,
    WireError,
)
from streamhps.publish import Publisher

__version__ = "0.1.0"

__all__ = [
    "BrokerError",
    "CacheError",
    "Config",
    "ConfigError",
    "HistoryLostError",
    "MissingKeyError",
    "PublishError",
    "Publisher",
    "SchemaVersionError",
    "ServerError",
    "StaleReadError",
    "StoreError",
    "StreamHPSError",
    "TableSpec",
    "TopicError",
    "UnknownTableError",
    "ValidationError",
    "VersionError",
    "WireError",
    "__version__",
]
