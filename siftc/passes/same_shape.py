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

With `--pattern P` (siftc.sparse.patterns) every layer gets P, or the fallback `fit` chooses for its
shape (the report says which), and the masks have its structure (siftc.sparse.structured):
    magnitude  block:RxC  the whole blocks of largest L1 norm, the count a whole number of blocks
               nm:N:M     the N largest |w| of every group of M consecutive inputs (density N/M, so
                          --sparsity is overridden; the report gives the effective one)
               nm:N:M:t   N per row and column of every M x M tile, greedy by |w| then completed
                          (siftc.sparse.transposable)
    random     random positions with the structure
    zeros      the smallest mask with the structure that holds every non-zero (blocks: each block
               holding one; N:M: the zeros a group needs to reach N): a checkpoint pruned to P elsewhere
               keeps exactly its non-zeros; one with more than N non-zeros in a group is refused, since
               keeping N would prune weights it kept (prune it with --mask-from magnitude instead)
Kept positions hold the given weights' values either way (init: kept in the report).
"""
import math
from typing import TYPE_CHECKING

import torch
import torch.fx

from siftc import flops
from siftc.errors import UsageError
from siftc.layers import layer_type
from siftc.passes.record import LayerRecord, PassResult
from siftc.passes.select import choose, replace_submodule
from siftc.solve import whole_blocks
from siftc.sparse import structured
from siftc.sparse.distribution import distribute
from siftc.sparse.patterns import Pattern, fit

if TYPE_CHECKING:
    from siftc.config import ConvertConfig

SPARSITY_CHECK = 0.005  # --mask-from zeros with --sparsity: the zeros must give it within half a point


def _magnitude(w: torch.Tensor, pattern: Pattern, nnz: int, generator) -> torch.Tensor:
    return structured.magnitude_positions(w, pattern, nnz)


def _zeros(w: torch.Tensor, pattern: Pattern, nnz: int, generator) -> torch.Tensor:
    return structured.containing(w, pattern)


def _random(w: torch.Tensor, pattern: Pattern, nnz: int, generator) -> torch.Tensor:
    return structured.random_positions(w.shape, pattern, nnz, generator)


# name -> (dense weight, the layer's pattern, non-zeros (unused by zeros), generator) -> flat positions
MASKS = {"magnitude": _magnitude, "zeros": _zeros, "random": _random}


def _count(w: torch.Tensor, pattern: Pattern, sparsity: float | None) -> int | None:
    """Non-zeros a layer keeps at `sparsity`: a whole number of `pattern`'s blocks, or N:M's fixed
    count (None for --mask-from zeros, whose non-zeros decide)."""
    fixed = pattern.fixed_nnz(w.shape)
    if fixed is not None or sparsity is None:
        return fixed
    return whole_blocks(w.numel() - round(sparsity * w.numel()), pattern.unit, w.numel())


def _sparse_at(dense, pattern: Pattern | None, positions: torch.Tensor, generator):
    """A sparse layer of `dense`'s shape with `pattern` (None: unstructured, as before patterns), holding
    `dense`'s weights at `positions`, and its bias."""
    t = layer_type(dense)
    layer = t.sparse_copy(dense, 0, generator)  # no random draw: the positions are set next
    layer.pattern = pattern
    layer.set_positions(positions.sort().values)
    layer.load_state_dict(t.torch_state(dense), strict=False)  # a dense weight is packed at the positions
    layer.train(dense.training)
    return layer


def _pick(cfg, name: str, w: torch.Tensor, pattern: Pattern, nnz: int | None, generator) -> torch.Tensor:
    try:
        return MASKS[cfg.mask_from](w, pattern, nnz, generator)
    except ValueError as e:  # only zeros refuses: the checkpoint's non-zeros do not have the pattern
        raise UsageError(f"--mask-from zeros --pattern {pattern}: layer {name}'s weights have {e}, so they were "
                         f"not pruned to {pattern}; prune them to it with --mask-from magnitude") from None


def run(gm: torch.fx.GraphModule, cfg: "ConvertConfig", generator: torch.Generator):
    """Make every chosen weight layer of `gm` a sparse layer of its own shape. Returns (gm, PassResult)."""
    asked = Pattern.parse(cfg.pattern)
    choices, positions = choose(gm, cfg.keep_dense, cfg.strict), flops.graph_positions(gm)
    weights = {}  # name -> the dense weight (out, in, *kernel) of every layer made sparse
    for c in (c for c in choices if c.transform):
        w = layer_type(c.module).torch_state(c.module)["weight"]
        pattern = fit(asked, w.shape).pattern  # siftc.passes.patterns reports the fallback and why
        nnz = _count(w, pattern, cfg.sparsity)
        weights[c.name] = w
        layer = _sparse_at(c.module, pattern if asked.structured else None,
                           _pick(cfg, c.name, w, pattern, nnz, generator), generator)
        replace_submodule(gm, c.name, layer)
    gm.graph.lint()
    gm.recompile()
    if cfg.distribution != "uniform" and weights:
        _redistribute(gm, cfg, choices, weights, generator)
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


def _redistribute(gm, cfg, choices, weights: dict, generator):
    """The counts of `cfg.distribution` (ERK: the same total FLOPs as uniform, in whole blocks of each
    layer's pattern), each layer's mask picked again at its count."""
    counts = distribute(gm, cfg.distribution, _placeholder_inputs(gm))
    for c in (c for c in choices if c.name in weights):
        pattern = gm.get_submodule(c.name).pattern
        if counts[c.name] != gm.get_submodule(c.name).nnz:
            positions = _pick(cfg, c.name, weights[c.name], pattern or Pattern(), counts[c.name], generator)
            replace_submodule(gm, c.name, _sparse_at(c.module, pattern, positions, generator))


def _placeholder_inputs(gm) -> tuple:
    """Inputs of the shapes and dtypes the graph was traced with (zeros: only their shapes matter here)."""
    return tuple(torch.zeros(n.meta["tensor_meta"].shape, dtype=n.meta["tensor_meta"].dtype)
                 for n in gm.graph.nodes if n.op == "placeholder")


def _check_sparsity(cfg, measured: float):
    if cfg.mask_from == "zeros" and cfg.sparsity is not None and abs(measured - cfg.sparsity) > SPARSITY_CHECK:
        pattern = Pattern.parse(cfg.pattern)
        source = f"the {pattern} masks holding the weights' non-zeros give" if pattern.structured else \
            "the weights' zeros give"
        raise UsageError(f"--mask-from zeros: {source} sparsity {measured:.4f} over the layers made sparse, not "
                         f"{cfg.sparsity:g}; drop --sparsity to take it from the zeros, or pass the pruned weights "
                         f"(--weights)")
