"""Runtime backends for sparse layers. A backend computes `layer(x)` for a SparseLinear or
SparseConv2d; it owns any per-layer cache (keyed on `layer.mask_version`).

BACKENDS maps the CLI's `--backend` names to backend objects with `.linear(layer, x)` and
`.conv2d(layer, x)`. Constructing them is cheap: nothing compiles or imports an optional package until a
layer first runs on it. The runtime does not import the layers (`siftc.nn.sparse` imports it, and
holds `set_backend`), so the import graph has no cycle.
"""
from siftc.errors import UsageError
from siftc.runtime.auto import AutoBackend
from siftc.runtime.masked import MaskedDense
from siftc.runtime.native import Native
from siftc.runtime.shapes import ShapesOnly
from siftc.runtime.sparseprop_backend import SparseProp

_TORCH, _NATIVE = MaskedDense(), Native()
BACKENDS = {
    "torch": _TORCH,         # masked dense: the reference, and the fallback without a compiler
    "native": _NATIVE,       # siftc's C++ kernels, compiled on first use (siftc.runtime.build)
    "auto": AutoBackend({"native": _NATIVE, "torch": _TORCH}),  # per layer, the faster, timed once and recorded
    "sparseprop": SparseProp(),  # SparseProp's kernels (see sparseprop_backend.INSTALL), a peer to compare
}
DEFAULT = "auto"  # the one default: every sparse layer starts on it (convert, load, Python), and `siftc train`
INTERNAL = {"shapes": ShapesOnly()}  # not a --backend choice: siftc.nn.sparse.shapes_only uses it


def get_backend(name: str):
    try:
        return BACKENDS[name] if name in BACKENDS else INTERNAL[name]
    except KeyError:
        raise UsageError(f"unknown backend {name!r}; choose one of: {', '.join(sorted(BACKENDS))}") from None
