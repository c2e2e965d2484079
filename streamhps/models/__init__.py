"""Models in torch shared by the trainer and the server (imports torch)."""

from streamhps.models.dlrm import DLRMDense

__all__ = ["DLRMDense"]
