"""The one FLOP count: passes, reports, tests and benchmarks all use it.

Weight FLOPs = 2 x multiply-accumulates of weight layers (Linear, Conv1d, Conv2d: the layers whose
`siftc.layers` entry is `counted`), each counted at its non-zeros: a SparseLinear with nnz non-zeros
producing P output positions costs 2 * nnz * P. Embeddings are look-ups (0 FLOPs). Non-weight work that
a transformation adds (the BatchNorms in parallel branches or the factorized middle, the norms and
attention products of a wider stream) is counted apart and never hidden in the total.
"""
import contextvars
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from siftc import layers
from siftc.nn.sparse import SPARSE_LAYERS

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def nonzeros(layer: nn.Module) -> int:
    """Weights a layer multiplies by: a sparse layer's non-zeros, else the whole weight."""
    return layer.nnz if isinstance(layer, SPARSE_LAYERS) else layer.weight.numel()


def positions(layer: nn.Module, out_shape) -> int:
    """Output positions per output channel: tokens for a Linear, B*L' for a Conv1d, B*H'*W' for a Conv2d."""
    return math.prod(out_shape) // layers.layer_type(layer).out_channels(layer)


def layer_flops(layer: nn.Module, pos: int, dense: bool = False) -> int:
    """2 x the weights `layer` multiplies by (all of them if `dense`) x its `pos` output positions."""
    return 2 * (math.prod(layers.shape(layer)) if dense else nonzeros(layer)) * pos


def module_flops(module: nn.Module, pos: int) -> int:
    """Weight FLOPs of `module` and every weight layer inside it, all at `pos` positions: what replaced
    a dense layer runs at that layer's output positions (a transformation changes channels only)."""
    return sum(layer_flops(m, pos) for m in module.modules() if layers.counted(m))


def graph_positions(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Weight layer name -> output positions per channel summed over its calls, read from the shapes
    tracing recorded (`node.meta["tensor_meta"]`): no forward runs."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if layers.counted(mod):
                out[node.target] = out.get(node.target, 0) + positions(mod, node.meta["tensor_meta"].shape)
    return out


def norm_flops(shape) -> int:
    """A norm as an engine runs it: scale and shift, 2 FLOPs per element."""
    return 2 * math.prod(shape)


def attention_flops(q, v) -> int:
    """softmax(q k^T) v: (.., L, E) x (.., S, E) -> (.., L, S), then x (.., S, Ev) -> (.., L, Ev)."""
    return 2 * math.prod(q) * v[-2] + 2 * math.prod(q[:-1]) * v[-2] * v[-1]


def non_weight(gm: torch.fx.GraphModule, shape) -> int:
    """Norm and scaled_dot_product_attention FLOPs of `gm`'s graph, with `shape(node)` the size of a
    node's output (the graph's shapes before or after a transformation)."""
    modules = dict(gm.named_modules())
    total = 0
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(modules[n.target], NORMS) or \
                n.op == "call_function" and n.target is torch.nn.functional.layer_norm:
            total += norm_flops(shape(n))
        elif n.op == "call_function" and n.target is torch.nn.functional.scaled_dot_product_attention:
            total += attention_flops(shape(n.args[0]), shape(n.args[2]))
    return total


@dataclass
class FlopCount:
    layers: dict            # leaf module name -> weight FLOPs of one forward
    dense: dict             # leaf module name -> FLOPs of that leaf with all its weights
    extra: dict             # module name -> non-weight FLOPs added by a transformation
    positions: dict         # leaf module name -> output positions per channel, summed over its calls

    @property
    def total(self) -> int:
        return sum(self.layers.values())

    @property
    def extra_total(self) -> int:
        return sum(self.extra.values())


@torch.no_grad()
def count(model: nn.Module, example_inputs: tuple, extra_under: tuple[str, ...] = ()) -> FlopCount:
    """Run one forward on `example_inputs` and count every weight layer's FLOPs.

    `extra_under` names modules (the transformed layers) whose BatchNorms are extra work of the
    transformation; their cost is 2 FLOPs per element (scale and shift, as an engine runs it).
    """
    with counting(model, extra_under) as fc:
        was_training = model.training
        model.eval()
        try:
            model(*example_inputs)
        finally:
            model.train(was_training)
    return fc


@contextmanager
def counting(model: nn.Module, extra_under: tuple[str, ...] = ()):
    """`count` of whatever runs `model`'s layers inside the block, once: its own forward, or a
    GraphModule traced from it (siftc.convert counts during the shape propagation it runs anyway)."""
    fc = FlopCount({}, {}, {}, {})
    handles = []

    def on_weight(name):
        def hook(mod, args, out):
            _count(out, lambda: _add_weight_layer(fc, name, mod, positions(mod, out.shape)))
        return hook

    def on_norm(name):
        def hook(mod, args, out):
            _count(out, lambda: fc.extra.__setitem__(name, fc.extra.get(name, 0) + norm_flops(out.shape)))
        return hook

    prefixes = tuple(p + "." for p in extra_under)
    for name, mod in model.named_modules():
        if layers.counted(mod):
            handles.append(mod.register_forward_hook(on_weight(name)))
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and name.startswith(prefixes):
            handles.append(mod.register_forward_hook(on_norm(name)))
    try:
        yield fc
    finally:
        for h in handles:
            h.remove()


def _is_fake(t) -> bool:
    return isinstance(t, torch._subclasses.FakeTensor)


_PENDING: contextvars.ContextVar = contextvars.ContextVar("siftc_fake_forward", default=None)


def _count(out, add):
    """Count a layer call now (a real forward), on success of the fake forward it is part of, or not at
    all (a call on fake tensors outside `fake_forward`: the concrete tracer computing shapes)."""
    if not _is_fake(out):
        add()
    elif (pending := _PENDING.get()) is not None:
        pending.append(add)


@contextmanager
def fake_forward():
    """Inside, `counting` takes layer calls on fake tensors as the forward, and counts them only if the
    block ends without an exception (a failed fake forward is re-run for real, and counted then)."""
    pending = []
    token = _PENDING.set(pending)
    try:
        yield
    finally:
        _PENDING.reset(token)
    for add in pending:
        add()


def _add_weight_layer(fc: FlopCount, name: str, mod: nn.Module, pos: int):
    fc.layers[name] = fc.layers.get(name, 0) + layer_flops(mod, pos)
    fc.dense[name] = fc.dense.get(name, 0) + layer_flops(mod, pos, dense=True)
    fc.positions[name] = fc.positions.get(name, 0) + pos


def count_transformed(model: nn.Module, dense: FlopCount, extra_under: tuple[str, ...] = ()) -> FlopCount:
    """`count` for `model`, a Sparse-IFT copy of the model `dense` was counted on, without running it.

    A transformation changes channels, never output positions (tokens, B*H'*W'): a weight layer at a
    dense layer's name, or inside the block that replaced it, runs at that layer's positions, and a
    BatchNorm there normalises its num_features channels at them. Same numbers as `count` (tested on
    every example), but a 90%-sparse model computes up to 10x the dense FLOPs when run masked-dense.
    """
    fc = FlopCount({}, {}, {}, {})
    prefixes = tuple(p + "." for p in extra_under)
    for name, mod in model.named_modules():
        owner = _owner(name, dense.positions)
        if owner is None:
            continue
        if layers.counted(mod):
            _add_weight_layer(fc, name, mod, dense.positions[owner])
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and name.startswith(prefixes):
            fc.extra[name] = norm_flops((mod.num_features, dense.positions[owner]))
    return fc


def _owner(name: str, dense_names: dict) -> str | None:
    """The dense layer `name` is, or sits inside: "layer1.0.conv1.branches.0.0" -> "layer1.0.conv1"."""
    while name:
        if name in dense_names:
            return name
        name = name.rpartition(".")[0]
    return None
