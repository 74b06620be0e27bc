"""Sparse Parallel, Factorized and Doped: passes that replace one layer at a time.

Before (a Linear 256->256 in an MLP, --kind parallel --sparsity 0.75):
    fc2: Linear(256, 256)                           # 65,536 weights, all used
After:
    fc2: SparseParallel(4 x SparseLinear(256, 256, density 0.25) + ReLU, summed)
                                                    # 4 x 16,384 non-zeros = 65,536: same FLOPs
Each layer's output positions do not change, so the layer is iso-FLOP exactly when its parts'
non-zeros add up to the dense weight count, which `siftc.solve` guarantees.
"""
import torch
import torch.fx
from torch import nn

from siftc import solve
from siftc.config import ConvertConfig
from siftc.nn.blocks import BLOCKS, sparse_copy
from siftc.passes.record import LayerRecord
from siftc.passes.select import choose, fan_in_out, replace_submodule


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
    layer = sparse_copy(dense, dense.weight.numel(), bias=dense.bias is not None, generator=generator)
    layer.load_state_dict(dense.state_dict(), strict=False)
    return layer


def run(gm: torch.fx.GraphModule, cfg: ConvertConfig, generator: torch.Generator):
    """Replace every chosen Linear/Conv2d of `gm` by the `cfg.kind` block. Returns (gm, records)."""
    records = []
    for choice in choose(gm, cfg.keep_dense, cfg.strict):
        dense = choice.module
        if not choice.transform:
            records.append(LayerRecord(choice.name, "dense" if "kept dense" in choice.reason else "skipped",
                                       list(dense.weight.shape), reason=choice.reason,
                                       search_space=dense.weight.numel()))
            continue
        shape = solve.SOLVERS[cfg.kind](*fan_in_out(dense), cfg.sparsity)
        degenerate = (cfg.kind == "parallel" and shape.structure == 1) or \
                     (cfg.kind == "doped" and shape.structure == 0)
        new = _same_as_dense(dense, generator) if degenerate else \
            BLOCKS[cfg.kind](dense, shape, cfg.branch_act, generator=generator)
        replace_submodule(gm, choice.name, new)
        new_shape, structure = _describe(cfg.kind, dense, shape)
        records.append(LayerRecord(choice.name, cfg.kind, list(dense.weight.shape), new_shape, structure,
                                   density=shape.density, search_space=shape.search_space))
    kinds = {r.name: r.kind for r in records}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            node.meta["siftc.kind"] = kinds.get(node.target)
    gm.graph.lint()
    gm.recompile()
    return gm, records
