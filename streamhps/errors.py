"""Every error streamhps raises, in one tree.

::

    StreamHPSError                  root: catch this to catch everything below
    ├── ConfigError                 the config file or arguments are wrong; fix them and restart
    │   └── PlacementError          a placement plan does not fit, or does not match the config
    ├── WireError                   bytes that are not a valid streamhps message
    │   └── SchemaVersionError      a message written by a newer/older, incompatible schema
    ├── ValidationError             a publish call was refused before anything was sent
    │   ├── UnknownTableError       the table is not in the configuration
    │   └── VersionError            version <= 0, or not newer than the last committed one
    ├── PublishError                the broker did not acknowledge every message
    ├── TopicError                  topics missing, or existing with another partition count
    ├── BrokerError                 the embedded broker could not be found or started
    ├── StoreError                  the LMDB persistent tier cannot be opened or read
    ├── CacheError                  an embedding cache was used wrongly (capacity, dim, dtype)
    ├── MissingKeyError             a key was never seen and the table's policy is "error"
    ├── StaleReadError              a bounded read found the worker past its staleness bound
    │   └── ShardUnavailableError   a sparse shard a request needs cannot be reached
    ├── NotOwnedError               a sharded worker was asked for a key another shard serves
    ├── HistoryLostError            the broker no longer holds offsets that were stored
    └── ServerError                 the inference server answered with an error
"""

from __future__ import annotations


class StreamHPSError(Exception):
    """Root of every streamhps error."""

    status: int | None = None
    """The HTTP status of the server's answer this error was raised from (None: raised here)."""
    kind: str | None = None
    """The error ``type`` that answer named (the server-side exception class name)."""


class ConfigError(StreamHPSError, ValueError):
    """The configuration is invalid; the message names the key. Fix the file and restart."""


class PlacementError(ConfigError):
    """A placement plan does not fit the shards' capacity (the message says by how much), or the
    placement file does not match the config. Plan again with ``streamhps plan``."""


class WireError(StreamHPSError, ValueError):
    """Bytes that do not decode as a streamhps message; the message says which field broke."""


class SchemaVersionError(WireError):
    """The message was written with a schema this build does not understand: upgrade the reader."""


class ValidationError(StreamHPSError, ValueError):
    """A publish call was refused before sending: nothing of it reached the broker."""


class UnknownTableError(ValidationError, KeyError):
    """The table is not configured. Add it to ``tables`` in the config (or the TableSpec list)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class VersionError(ValidationError):
    """The version is <= 0 or not newer than the last committed one; versions must only grow."""


class PublishError(StreamHPSError):
    """The broker did not acknowledge every message; treat all of the batch as unsent and retry."""


class TopicError(StreamHPSError):
    """Topics are missing or disagree with the config (partition count); fix the topic or config."""


class BrokerError(StreamHPSError):
    """The embedded broker could not be located or started; see the message for the binary path."""


class StoreError(StreamHPSError):
    """The LMDB tier cannot be opened or read; check the path, permissions and free disk."""


class CacheError(StreamHPSError, ValueError):
    """An embedding cache was called with wrong shapes, dtypes or capacity."""


class MissingKeyError(StreamHPSError, KeyError):
    """A key was never published and the table's ``missing`` policy is ``"error"``."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StaleReadError(StreamHPSError):
    """A bounded-consistency read found the worker further behind than ``max_staleness_s``."""


class ShardUnavailableError(StaleReadError):
    """A sparse shard that serves some of the request's keys cannot be reached or is not ready;
    the message names it. Restart the shard (or wait for it) and retry."""


class NotOwnedError(StreamHPSError, KeyError):
    """A sharded worker was asked for keys of partitions another shard serves; the message names
    the owner. Send lookups through the main shard or a ``ShardedClient``, which route by owner."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class HistoryLostError(StreamHPSError):
    """The broker lost history the tier depends on (topic recreated, retention, restart)."""


class ServerError(StreamHPSError):
    """The inference server answered with an error; the message is the server's."""
