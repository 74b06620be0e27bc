"""siftc: Sparse Iso-FLOP Transformations for PyTorch models.

    gm = siftc.convert("examples/resnet.py:resnet18_cifar", kind="wide", sparsity=0.9)
    sched = siftc.sparse.RigL(gm, optimizer, total_steps=10_000)
    siftc.export(gm, "model.onnx", batch=64)
    siftc.bench(["model.onnx"], batches=(64,))
"""
import warnings

# torch's own deepcopy of a pytree spec (a converted model returning a ModelOutput) warns about its
# internal LeafSpec deprecation; nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)

from siftc import sparse  # noqa: E402
from siftc.api import bench, convert, densify, export, load, save  # noqa: E402  after the submodules: siftc.convert/export/bench/densify are the functions
from siftc.errors import SiftcError  # noqa: E402
from siftc.nn.sparse import set_backend  # noqa: E402

__all__ = ["convert", "load", "save", "export", "bench", "densify", "set_backend", "sparse", "SiftcError"]
