"""Sparse Parallel, Factorized and Doped: passes that replace one layer at a time.

Before (a Linear 256->256 in an MLP, --kind parallel --sparsity 0.75):
    fc2: Linear(256, 256)                           # 65,536 weights, all used
After:
    fc2: SparseParallel(4 x SparseLinear(256, 256, density 0.25) + ReLU, summed)
                                                    # 4 x 16,384 non-zeros = 65,536: same FLOPs
Each layer's output positions do not change, so the layer is iso-FLOP exactly when its parts'
non-zeros add up to the dense weight count, which `siftc.solve` guarantees.
"""
from typing import TYPE_CHECKING

import torch
import torch.fx
from torch import nn

from siftc import flops, solve
from siftc.layers import fan_in_out, layer_type
from siftc.nn.blocks import block
from siftc.passes.record import LayerRecord, PassResult
from siftc.passes.select import choose, replace_submodule

if TYPE_CHECKING:  # the config validates kinds against KINDS here: no import back at run time
    from siftc.config import ConvertConfig


def _describe(kind: str, dense: nn.Module, shape: solve.Shape) -> tuple[str, dict]:
    w = "x".join(map(str, dense.weight.shape))
    d_in, d_out = fan_in_out(dense)
    if kind == "parallel":
        return f"{shape.structure} x ({w})", {"branches": shape.structure}
    if kind == "factorized":
        return f"{d_in}->{shape.structure}->{d_out}", {"rank": shape.structure}
    return f"rank {shape.structure} + ({w})", {"rank": shape.structure}


def _same_as_dense(dense: nn.Module, generator) -> nn.Module:
    """The degenerate structure (parallel N=1, doped rank 0): the dense layer itself, weights kept."""
    t = layer_type(dense)
    layer = t.sparse_copy(dense, dense.weight.numel(), generator)
    layer.load_state_dict(t.torch_state(dense), strict=False)
    return layer


def run(gm: torch.fx.GraphModule, cfg: "ConvertConfig", generator: torch.Generator):
    """Replace every chosen weight layer of `gm` by the `cfg.kind` block. Returns (gm, PassResult)."""
    records, positions = [], flops.graph_positions(gm)
    for choice in choose(gm, cfg.keep_dense, cfg.strict):
        dense, pos = choice.module, positions.get(choice.name, 0)
        dense_flops = flops.module_flops(dense, pos)
        if not choice.transform:
            records.append(choice.left_as_is(dense_flops))
            continue
        shape = solve.SOLVERS[cfg.kind](*fan_in_out(dense), cfg.sparsity)
        degenerate = (cfg.kind == "parallel" and shape.structure == 1) or \
                     (cfg.kind == "doped" and shape.structure == 0)
        new = _same_as_dense(dense, generator) if degenerate else \
            block(cfg.kind, dense, shape, cfg.branch_act, generator)
        replace_submodule(gm, choice.name, new)
        new_shape, structure = _describe(cfg.kind, dense, shape)
        records.append(LayerRecord(choice.name, cfg.kind, list(dense.weight.shape), new_shape, structure,
                                   density=shape.density, search_space=shape.search_space,
                                   dense_flops=dense_flops, flops=flops.module_flops(new, pos)))
    gm.graph.lint()
    gm.recompile()
    return gm, PassResult(records)
