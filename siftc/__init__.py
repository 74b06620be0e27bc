"""siftc: Sparse Iso-FLOP Transformations for PyTorch models."""
from siftc.api import convert, load, save
from siftc.errors import SiftcError

__all__ = ["convert", "load", "save", "SiftcError"]
