"""siftc: Sparse Iso-FLOP Transformations for PyTorch models.

    gm = siftc.convert("examples/resnet.py:resnet18_cifar", kind="wide", sparsity=0.9)
    sched = siftc.sparse.RigL(gm, optimizer, total_steps=10_000)
"""
from siftc import sparse
from siftc.api import convert, load, save  # after the submodules: `siftc.convert` is the function
from siftc.errors import SiftcError

__all__ = ["convert", "load", "save", "sparse", "SiftcError"]
