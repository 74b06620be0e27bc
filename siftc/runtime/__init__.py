"""Runtime backends for sparse layers. A backend computes `layer(x)` for a SparseLinear or
SparseConv2d; it owns any per-layer cache (keyed on `layer.mask_version`).

BACKENDS maps the CLI's `--backend` names to backend objects with `.linear(layer, x)` and
`.conv2d(layer, x)`. Constructing them is cheap: nothing compiles or imports an optional package until a
layer first runs on it.
"""
from siftc.errors import UsageError
from siftc.runtime.auto import AutoBackend
from siftc.runtime.masked import MaskedDense
from siftc.runtime.native import Native
from siftc.runtime.sparseprop_backend import SparseProp

BACKENDS = {
    "torch": MaskedDense(),  # masked dense: the reference, and the fallback without a compiler
    "native": Native(),      # siftc's C++ kernels, compiled on first use (siftc.runtime.build)
    "auto": AutoBackend(),   # per layer, the faster of native and torch, timed once and recorded
    "sparseprop": SparseProp(),  # SparseProp's kernels (see sparseprop_backend.INSTALL), a peer to compare
}


def get_backend(name: str):
    try:
        return BACKENDS[name]
    except KeyError:
        raise UsageError(f"unknown backend {name!r}; choose one of: {', '.join(sorted(BACKENDS))}") from None


def set_backend(model, name: str):
    """Run every sparse layer of `model` on backend `name`. Returns the model."""
    from siftc.nn.sparse import SPARSE_LAYERS
    get_backend(name)
    for m in model.modules():
        if isinstance(m, SPARSE_LAYERS):
            m.backend = name
    return model
