"""The one FLOP count: passes, reports, tests and benchmarks all use it.

Weight FLOPs = 2 x multiply-accumulates of weight layers (Linear, Conv2d), each counted at its
non-zeros: a SparseLinear with nnz non-zeros producing P output positions costs 2 * nnz * P.
Embeddings are look-ups (0 FLOPs). Non-weight work that a transformation adds (the BatchNorms in
parallel branches or the factorized middle) is counted apart as `extra` and never hidden in the total.
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)


def nonzeros(layer: nn.Module) -> int:
    """Weights a layer multiplies by: its mask's count if it has one, else the whole weight."""
    mask = getattr(layer, "mask", None)
    return int(mask.count_nonzero()) if mask is not None else layer.weight.numel()


def positions(layer: nn.Module, out_shape) -> int:
    """Output positions per output channel: tokens for a Linear, B*H'*W' for a Conv2d."""
    channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    numel = 1
    for s in out_shape:
        numel *= s
    return numel // channels


def layer_flops(layer: nn.Module, out_shape) -> int:
    return 2 * nonzeros(layer) * positions(layer, out_shape)


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
            _add_weight_layer(fc, name, mod, positions(mod, out.shape))
        return hook

    def on_norm(name):
        def hook(mod, args, out):
            fc.extra[name] = fc.extra.get(name, 0) + 2 * out.numel()
        return hook

    prefixes = tuple(p + "." for p in extra_under)
    for name, mod in model.named_modules():
        if isinstance(mod, WEIGHT_LAYERS):
            handles.append(mod.register_forward_hook(on_weight(name)))
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and name.startswith(prefixes):
            handles.append(mod.register_forward_hook(on_norm(name)))
    try:
        yield fc
    finally:
        for h in handles:
            h.remove()


def _add_weight_layer(fc: FlopCount, name: str, mod: nn.Module, pos: int):
    fc.layers[name] = fc.layers.get(name, 0) + 2 * nonzeros(mod) * pos
    fc.dense[name] = fc.dense.get(name, 0) + 2 * mod.weight.numel() * pos
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
        if isinstance(mod, WEIGHT_LAYERS):
            _add_weight_layer(fc, name, mod, dense.positions[owner])
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and name.startswith(prefixes):
            fc.extra[name] = 2 * mod.num_features * dense.positions[owner]
    return fc


def _owner(name: str, dense_names: dict) -> str | None:
    """The dense layer `name` is, or sits inside: "layer1.0.conv1.branches.0.0" -> "layer1.0.conv1"."""
    while name:
        if name in dense_names:
            return name
        name = name.rpartition(".")[0]
    return None
