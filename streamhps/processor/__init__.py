"""The stream processor: table topics -> versioned, compacted rows + offsets in LMDB.

``streamhps processor --config PATH --store DIR [--shard I/N] [--web-port P]`` runs a
faust-streaming worker (:mod:`.service`) whose one service runs the consumer loop
(:mod:`.loop`, :class:`Processor`), the data path that writes rows and offsets in one LMDB
transaction and resumes at the LMDB offsets.
"""

from streamhps.processor.loop import Processor, ProcessorStats, shard_partitions

# the faust side (streamhps.processor.service) is imported by the CLI only: users of the loop
# alone do not pay for importing faust
__all__ = ["Processor", "ProcessorStats", "shard_partitions"]
