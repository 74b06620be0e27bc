"""How non-zeros are spread over the sparse layers of a converted model.

    uniform  every sparse layer keeps the non-zero count the conversion solved for it, so each layer
             is iso-FLOP on its own (the default, and what `siftc convert` produces);
    erk      Erdos-Renyi-Kernel densities, density_l ~ (sum of the layer's dims) / (product of its dims),
             scaled so the *total* weight FLOPs of the sparse layers stay what they were (so the model
             keeps the dense model's FLOPs). Layers whose ERK density would exceed 1 become dense and the
             rest is solved again, in closed form (FLOPs are linear in density).

A layer with a sparsity pattern (`layer.pattern`, siftc.sparse.patterns) keeps it: ERK gives it whole
blocks, an N:M layer keeps its N/M, and `apply` draws structured masks (siftc.sparse.structured).

    >>> nnz = distribute(model, "erk", example_inputs)     # {layer name: non-zeros}
    >>> apply(model, nnz, generator)                       # new random masks with those counts
    >>> impose_pattern(layer, Pattern.parse("block:4x1"), nnz, generator)   # a layer's pattern, fitted
"""
import math

import torch
from torch import nn

from siftc import flops, solve
from siftc.errors import UsageError
from siftc.nn.sparse import SPARSE_LAYERS, random_mask
from siftc.sparse import structured
from siftc.sparse.patterns import UNSTRUCTURED, Fitted, Pattern, fit


def sparse_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> SparseLinear/SparseConv2d, in module order (through a DDP wrapper too)."""
    model = getattr(model, "module", model) if not isinstance(model, SPARSE_LAYERS) else model
    return {name: m for name, m in model.named_modules() if isinstance(m, SPARSE_LAYERS)}


def uniform(model: nn.Module, example_inputs=None) -> dict[str, int]:
    """The conversion's per-layer counts, unchanged: every layer iso-FLOP by itself."""
    return {name: layer.nnz for name, layer in sparse_layers(model).items()}


def _erk_score(layer: nn.Module) -> float:
    """(sum of dims) / (product of dims): out, in (and kh, kw for a conv)."""
    dims = list(layer.weight_shape)
    prod = 1
    for d in dims:
        prod *= d
    return sum(dims) / prod


def _pattern(layer: nn.Module) -> Pattern:
    return getattr(layer, "pattern", None) or UNSTRUCTURED


def erk(model: nn.Module, example_inputs: tuple) -> dict[str, int]:
    """ERK counts whose total FLOPs equal the current total of the sparse layers (within one weight, or
    one block of a layer with a block pattern). A layer with a pattern (`layer.pattern`) gets whole
    blocks; an N:M layer keeps the count N/M fixes, and the others share what it leaves."""
    layers = sparse_layers(model)
    if not layers:
        return {}
    fc = flops.count(getattr(model, "module", model), example_inputs)
    pos = {name: fc.positions.get(name, 0) for name in layers}
    budget = sum(layer.nnz * pos[name] for name, layer in layers.items())  # MACs of one forward
    numel = {name: math.prod(layer.weight_shape) for name, layer in layers.items()}
    score = {name: _erk_score(layer) for name, layer in layers.items()}
    unit = {name: _pattern(layer).unit for name, layer in layers.items()}
    fixed = {name: n for name, layer in layers.items()
             if (n := _pattern(layer).fixed_nnz(layer.weight_shape)) is not None}
    dense: set[str] = set()
    while True:
        free = [n for n in layers if n not in dense and n not in fixed]
        left = budget - sum(numel[n] * pos[n] for n in dense) - sum(fixed[n] * pos[n] for n in fixed)
        denom = sum(score[n] * numel[n] * pos[n] for n in free)
        eps = left / denom if denom else 0.0
        over = [n for n in free if eps * score[n] > 1]
        if not over:
            break
        dense.add(max(over, key=lambda n: score[n]))  # cap the densest first, then solve again
    counts = {n: fixed[n] if n in fixed else numel[n] if n in dense else
              int(eps * score[n] * numel[n]) // unit[n] * unit[n] for n in layers}
    # Rounding down leaves a few MACs of budget: give them back one weight (block) at a time, to the
    # layer that needs the fewest positions per weight first, while the total stays within budget.
    spent = sum(counts[n] * pos[n] for n in layers)
    for n in sorted((n for n in free if pos[n] > 0), key=lambda n: pos[n]):
        extra = min((budget - spent) // (pos[n] * unit[n]), (numel[n] - counts[n]) // unit[n]) * unit[n]
        if extra > 0:
            counts[n] += extra
            spent += extra * pos[n]
    return counts


DISTRIBUTIONS = {"uniform": uniform, "erk": erk}


def distribute(model: nn.Module, name: str, example_inputs=None) -> dict[str, int]:
    """Non-zeros per sparse layer under distribution `name`."""
    if name not in DISTRIBUTIONS:
        raise UsageError(f"unknown mask distribution {name!r}; choose one of: {', '.join(DISTRIBUTIONS)}")
    if name != "uniform" and example_inputs is None:
        info = getattr(getattr(model, "module", model), "siftc_info", None)
        if info is None:
            raise UsageError(f"the {name} distribution needs example_inputs to count FLOPs")
        example_inputs = info.example_inputs
    return DISTRIBUTIONS[name](model, example_inputs)


@torch.no_grad()
def apply(model: nn.Module, counts: dict[str, int], generator: torch.Generator | None = None) -> None:
    """Give every layer whose count changes a new random mask with that many non-zeros (with the
    structure of its `layer.pattern`, if it has one); a layer whose count is unchanged keeps its mask.
    Weights that stay in the mask keep their values; newly active ones are drawn the way PyTorch
    initialises the layer (U(-1/sqrt(fan_in), 1/sqrt(fan_in)))."""
    for name, layer in sparse_layers(model).items():
        if counts[name] != layer.nnz:
            reposition(layer, _random_positions(layer, counts[name], generator), generator)


def _random_positions(layer: nn.Module, nnz: int, generator) -> torch.Tensor:
    pattern = _pattern(layer)
    if pattern.structured:
        return structured.random_positions(layer.weight_shape, pattern, nnz, generator)
    return random_mask(layer.weight_shape, nnz, generator).reshape(-1).nonzero().squeeze(1)


@torch.no_grad()
def reposition(layer: nn.Module, positions: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Move `layer`'s non-zeros to `positions` (flat, ascending): weights that stay keep their values,
    new ones are drawn the way PyTorch initialises the layer (U(-1/sqrt(fan_in), 1/sqrt(fan_in)))."""
    shape = layer.weight_shape
    bound = 1 / math.sqrt(math.prod(shape[1:]))  # fan_in = in * kh * kw
    fresh = (torch.rand(shape, generator=generator) * 2 - 1) * bound
    _, kept = layer.set_positions(positions)
    new = layer.positions.long()[~kept]
    layer.values[~kept] = fresh.reshape(-1)[new].to(layer.values.dtype)


@torch.no_grad()
def impose_pattern(layer: nn.Module, pattern: Pattern | None, nnz: int | None = None,
                   generator: torch.Generator | None = None) -> Fitted:
    """Give a sparse layer `pattern`, or the best of its fallbacks that fits the layer's shape
    (siftc.sparse.patterns.fit): sets `layer.pattern`, rounds `nnz` (default: the layer's count) to
    whole blocks (N:M: its fixed N/M count instead), and draws random positions with that structure
    (values as `reposition`). Returns what the layer got and why, for the report."""
    fitted = fit(pattern, layer.weight_shape)
    numel = math.prod(layer.weight_shape)
    want = layer.nnz if nnz is None else nnz
    count = fitted.pattern.fixed_nnz(layer.weight_shape)
    if count is None:
        count = solve.whole_blocks(want, fitted.pattern.unit, numel)
    layer.pattern = fitted.pattern
    reposition(layer, structured.random_positions(layer.weight_shape, fitted.pattern, count, generator), generator)
    return fitted
