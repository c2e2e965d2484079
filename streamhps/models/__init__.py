"""torch modules (this package imports torch): the DLRM dense model that the trainer trains and
the server runs, and embedding modules backed by an inference worker for users' own models."""

from streamhps.models.dlrm import DLRMDense
from streamhps.models.embedding import (
    StreamingEmbedding,
    StreamingEmbeddingBag,
    StreamingEmbeddings,
)

__all__ = ["DLRMDense", "StreamingEmbedding", "StreamingEmbeddingBag", "StreamingEmbeddings"]
