"""Runtime backends for sparse layers. A backend computes `layer(x)` for a SparseLinear or
SparseConv2d; it owns any per-layer cache (keyed on `layer.mask_version`).

BACKENDS maps the CLI's `--backend` names to backend objects with `.linear(layer, x)` and
`.conv2d(layer, x)`.
"""
from siftc.errors import UsageError
from siftc.runtime.masked import MaskedDense

BACKENDS = {
    "torch": MaskedDense(),
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
