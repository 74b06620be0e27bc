"""Same-shape sparse (`--kind sparse`): every transformable weight layer keeps its shape and becomes a
sparse layer at sparsity s, its mask taken from the weights it has: SparseProp's case, fine-tuning a
pruned (pretrained) model on the sparse runtime. This is *not* an iso-FLOP transformation: the model
runs the kept fraction of the dense model's weight FLOPs, and the report says so.

Before (examples/mlp.py, --kind sparse --sparsity 0.9 --mask-from magnitude):
    net.2: Linear(256, 256)                      # 65,536 weights
After:
    net.2: SparseLinear(256, 256, nnz 6,554)     # net.2's 6,554 largest |w|, their values kept
                                                 # 0.1x its dense FLOPs

Masks (`--mask-from`, `MASKS`):
    magnitude  one-shot magnitude pruning: each layer keeps its largest |w|
    zeros      the weights' own zeros (a checkpoint pruned elsewhere): each layer keeps its non-zeros,
               and the sparsity is what they give (a given sparsity is checked against it)
    random     uniformly random positions, the weights' values at them
How many each layer keeps (`--distribution`, magnitude and random): uniform, s in every layer; or ERK
(`siftc.sparse.distribution.erk`), whose total FLOPs equal uniform's.
"""
import math
from typing import TYPE_CHECKING

import torch
import torch.fx

from siftc import flops
from siftc.errors import UsageError
from siftc.layers import layer_type
from siftc.nn.sparse import random_positions
from siftc.passes.record import LayerRecord, PassResult
from siftc.passes.select import choose, replace_submodule
from siftc.sparse.distribution import distribute

if TYPE_CHECKING:
    from siftc.config import ConvertConfig

SPARSITY_CHECK = 0.005  # --mask-from zeros with --sparsity: the zeros must give it within half a point


def _magnitude(w: torch.Tensor, nnz: int, generator) -> torch.Tensor:
    """The flat positions of the `nnz` largest |w| (ties broken by position, lowest first)."""
    flat = w.detach().reshape(-1).abs()
    order = torch.sort(flat, descending=True, stable=True).indices  # stable: reproducible on ties
    return order[:nnz]


def _zeros(w: torch.Tensor, nnz: int, generator) -> torch.Tensor:
    return w.detach().reshape(-1).nonzero().squeeze(1)


def _random(w: torch.Tensor, nnz: int, generator) -> torch.Tensor:
    return random_positions(w.shape, nnz, generator).long()


MASKS = {"magnitude": _magnitude, "zeros": _zeros, "random": _random}


def _sparse_at(dense, positions: torch.Tensor, generator):
    """A sparse layer of `dense`'s shape holding `dense`'s weights at `positions`, and its bias."""
    t = layer_type(dense)
    layer = t.sparse_copy(dense, 0, generator)  # no random draw: the positions are set next
    layer.set_positions(positions.sort().values)
    layer.load_state_dict(t.torch_state(dense), strict=False)  # a dense weight is packed at the positions
    layer.train(dense.training)
    return layer


def run(gm: torch.fx.GraphModule, cfg: "ConvertConfig", generator: torch.Generator):
    """Make every chosen weight layer of `gm` a sparse layer of its own shape. Returns (gm, PassResult)."""
    pick = MASKS[cfg.mask_from]
    choices, positions = choose(gm, cfg.keep_dense, cfg.strict), flops.graph_positions(gm)
    weights = {}  # name -> the dense weight (out, in, *kernel) of every layer made sparse
    for c in (c for c in choices if c.transform):
        w = layer_type(c.module).torch_state(c.module)["weight"]
        nnz = int(w.count_nonzero()) if cfg.mask_from == "zeros" else w.numel() - round(cfg.sparsity * w.numel())
        weights[c.name] = w
        replace_submodule(gm, c.name, _sparse_at(c.module, pick(w, nnz, generator), generator))
    gm.graph.lint()
    gm.recompile()
    if cfg.distribution != "uniform" and weights:
        _redistribute(gm, choices, weights, cfg.distribution, pick, generator)
    kept = sum(gm.get_submodule(name).nnz for name in weights)
    total = sum(w.numel() for w in weights.values())
    sparsity = 1 - kept / total if total else 0.0
    _check_sparsity(cfg, sparsity)
    records = [_record(c, gm.get_submodule(c.name), positions.get(c.name, 0), cfg) for c in choices]
    entries = {"mask_from": cfg.mask_from, "distribution": cfg.distribution, "measured_sparsity": sparsity,
               **({"sparsity": sparsity} if cfg.sparsity is None else {})}  # zeros: the sparsity they give
    return gm, PassResult(records, iso_flop=False, entries=entries)


def _record(c, new, pos: int, cfg) -> LayerRecord:
    t, dense_flops = layer_type(c.module), flops.module_flops(c.module, pos)
    if not c.transform:
        return c.left_as_is(dense_flops)
    return LayerRecord(c.name, cfg.kind, t.dense_shape(c.module), "x".join(map(str, new.weight_shape)),
                       {"mask_from": cfg.mask_from}, density=new.density, search_space=math.prod(new.weight_shape),
                       dense_flops=dense_flops, flops=flops.module_flops(new, pos))


def _redistribute(gm, choices, weights, distribution: str, pick, generator):
    """The counts of `distribution` (ERK: the same total FLOPs as uniform), each layer's mask picked again
    at its count."""
    counts = distribute(gm, distribution, _placeholder_inputs(gm))
    for c in choices:
        if c.name in weights and counts[c.name] != gm.get_submodule(c.name).nnz:
            w = weights[c.name]
            replace_submodule(gm, c.name, _sparse_at(c.module, pick(w, counts[c.name], generator), generator))


def _placeholder_inputs(gm) -> tuple:
    """Inputs of the shapes and dtypes the graph was traced with (zeros: only their shapes matter here)."""
    return tuple(torch.zeros(n.meta["tensor_meta"].shape, dtype=n.meta["tensor_meta"].dtype)
                 for n in gm.graph.nodes if n.op == "placeholder")


def _check_sparsity(cfg, measured: float):
    if cfg.mask_from == "zeros" and cfg.sparsity is not None and abs(measured - cfg.sparsity) > SPARSITY_CHECK:
        raise UsageError(f"--mask-from zeros: the weights' zeros give sparsity {measured:.4f} over the layers "
                         f"made sparse, not {cfg.sparsity:g}; drop --sparsity to take it from the zeros, or pass "
                         f"the pruned weights (--weights)")
