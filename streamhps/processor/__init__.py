"""The stream processor: table topics -> versioned, compacted rows + offsets in LMDB.

``streamhps processor --config PATH --store DIR [--shard I/N]`` runs it; see :mod:`.app`.
"""

from streamhps.processor.app import Processor, ProcessorStats, shard_partitions

__all__ = ["Processor", "ProcessorStats", "shard_partitions"]
