"""Positions with a pattern's structure: made at random or by magnitude, and moved by SET / RigL.

Every function takes and returns positions the way sparse layers hold them (flat, ascending, int32
indices into the dense weight; siftc.sparse.patterns for the geometry), so a caller does

    layer.set_positions(random_positions(layer.weight_shape, pattern, nnz, generator))
    layer.set_positions(magnitude_positions(dense_weight, pattern, nnz))
    layer.set_positions(containing(pruned_weight, pattern))       # the smallest mask holding its non-zeros
    new, regrown = swap(layer.positions, layer.values, layer.weight_shape, pattern, k, grad=g)
    src, kept = layer.set_positions(new); kept &= ~regrown          # regrown entries start at zero

and the result passes `check_structure`. Unstructured patterns give what the unstructured code does
(`siftc.nn.sparse.random_positions`, top-|w|), so a caller need not tell them apart.

    pattern       random / magnitude                  swap: drop                 grow
    block:RxC     nnz / (R*C) whole blocks: uniformly  the active blocks of       empty blocks: random
                  random, or the largest L1 norms      smallest L1 norm           (SET) or largest L1
                                                                                  norm of |grad| (RigL)
    nm:N:M        N per group: random, or the top-N    the smallest-magnitude     in each group as many
                  magnitudes of each group             active weights             as it lost
    nm:N:M:t      N per row and column of each tile,   the smallest-magnitude     in each tile, cells
                  greedy by score (random, or |w|)     active weights             restoring N per row
                  then completed exactly                                          and column
                  (siftc.sparse.transposable)

`count` (weights to move, the scheduler's round(drop_fraction * nnz)) becomes round(count / (R*C))
blocks; N:M moves `count` weights. As in the unstructured schedulers, grow candidates are all cells not
kept, those just dropped included: a dropped cell can come straight back, and then starts at zero.
"""
import math

import torch

from siftc.nn import sparse as nn_sparse
from siftc.sparse import transposable
from siftc.sparse.patterns import UNSTRUCTURED, Pattern, Tiling, check_structure


def _check_nnz(shape, pattern: Pattern, nnz: int | None) -> int:
    numel, fixed = math.prod(shape), pattern.fixed_nnz(shape)
    if fixed is not None:
        if nnz is not None and nnz != fixed:
            raise ValueError(f"{pattern} fixes {fixed} non-zeros for a weight of shape {tuple(shape)}, not {nnz}")
        return fixed
    if nnz is None or not 0 <= nnz <= numel or nnz % pattern.unit:
        raise ValueError(f"nnz={nnz} must be a multiple of {pattern.unit} in [0, {numel}] for {pattern} on a "
                         f"weight of shape {tuple(shape)}")
    return nnz


def random_positions(shape, pattern: Pattern | None, nnz: int | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(nnz,) int32 ascending: random positions with `pattern`'s structure (`nnz` may be omitted for
    N:M, which fixes it). Blocks are a uniformly random set of nnz / (R*C) blocks, N:M groups a
    uniformly random N of their M; nm:t tiles are filled greedily in random order (random, not uniform
    over all transposable masks)."""
    pattern = pattern or UNSTRUCTURED
    nnz = _check_nnz(shape, pattern, nnz)
    if pattern.kind == "unstructured":
        return nn_sparse.random_positions(shape, nnz, generator)
    tiling = Tiling(shape, pattern)
    if pattern.kind == "block":
        return tiling.expand(nn_sparse.random_positions((tiling.n_tiles,), nnz // pattern.unit, generator))
    return _by_score(torch.rand(tiling.numel, generator=generator), tiling)


def magnitude_positions(weight: torch.Tensor, pattern: Pattern | None, nnz: int | None = None) -> torch.Tensor:
    """(nnz,) int32 ascending: the positions of the largest |weight| with `pattern`'s structure: the
    largest |w| (ties to the lower position), the blocks of largest L1 norm, the top-N magnitudes of
    every N:M group (ties to the lower position), or nm:t tiles filled greedily by magnitude and
    completed exactly."""
    pattern = pattern or UNSTRUCTURED
    shape = tuple(weight.shape)
    nnz = _check_nnz(shape, pattern, nnz)
    magnitude = weight.detach().abs().reshape(-1).float()
    if pattern.kind == "unstructured":  # stable: what one-shot pruning (--kind sparse) always kept on ties
        return torch.sort(magnitude, descending=True, stable=True).indices[:nnz].sort().values.to(torch.int32)
    tiling = Tiling(shape, pattern)
    if pattern.kind == "block":
        norms = tiling.tiles_of(magnitude).sum((1, 2))   # (tiles,) L1 norm of each block
        return tiling.expand(_top(norms, nnz // pattern.unit))
    return _by_score(magnitude, tiling)


def containing(weight: torch.Tensor, pattern: Pattern | None) -> torch.Tensor:
    """int32 ascending: the smallest positions with `pattern`'s structure that hold every non-zero of
    `weight` (a checkpoint pruned elsewhere): its non-zeros; every block holding one; for N:M each
    group's non-zeros and then its lowest zeros up to N; for nm:t its non-zeros completed with zeros to
    N per row and column of each tile. ValueError, naming the first group, row or column, when the
    non-zeros do not fit (more than N in one): the weight was not pruned to that pattern."""
    pattern = pattern or UNSTRUCTURED
    nonzero = weight.detach().reshape(-1) != 0
    if pattern.kind == "unstructured":
        return nonzero.nonzero().squeeze(1).to(torch.int32)
    tiling = Tiling(tuple(weight.shape), pattern)
    held = tiling.tiles_of(nonzero)                                        # (T, rows, cols)
    if pattern.kind == "block":
        return tiling.expand(held.flatten(1).any(1).nonzero().squeeze(1))
    n = pattern.n
    need_rows, need_cols = n - held.sum(-1), n - held.sum(-2)              # (T, rows), (T, M)
    for name, need in (("group" if not pattern.transposable else "row", need_rows),
                       *((("column", need_cols),) if pattern.transposable else ())):
        over = (need < 0).nonzero()
        if over.numel():
            t, j = (int(x) for x in over[0])
            where = f"the group at {tiling.where(t)}" if name == "group" else \
                f"{name} {j} of the tile at {tiling.where(t)}"
            raise ValueError(f"{int(n - need[t, j])} non-zeros in {where}, more than {pattern}'s {n}")
    score = torch.zeros(held.shape)  # every zero scores the same: ties go to the lower position
    return tiling.positions_of(held | _fill(score, ~held, need_rows, need_cols, pattern))


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in no order (topk: ~7x a stable argsort at 1M; ties are broken
    the same way on every run)."""
    return torch.topk(score, k, sorted=False).indices


def _by_score(score: torch.Tensor, tiling: Tiling) -> torch.Tensor:
    """N:M positions of a whole weight, the best cells of each tile by `score` (numel,)."""
    tiles = tiling.tiles_of(score)                                       # (T, rows, M)
    n = tiling.pattern.n
    need = torch.full(tiles.shape[:2], n), torch.full((tiles.shape[0], tiles.shape[2]), n)
    return tiling.positions_of(_fill(tiles, torch.ones_like(tiles, dtype=torch.bool), *need, tiling.pattern))


def _fill(score, allowed, need_rows, need_cols, pattern: Pattern) -> torch.Tensor:
    """(T, rows, M) bool, a subset of `allowed`: need_rows (T, rows) cells in each tile row, the ones of
    highest score; for nm:t also need_cols (T, M) in each column (siftc.sparse.transposable)."""
    if pattern.transposable:
        return transposable.fill(score, allowed, need_rows, need_cols)
    ranked = score.masked_fill(~allowed, -math.inf).argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(ranked).scatter_(-1, ranked, torch.arange(score.shape[-1]).expand_as(ranked))
    return rank < need_rows[..., None]


# ---- SET / RigL updates ---------------------------------------------------------------------------
def swap(positions: torch.Tensor, values: torch.Tensor, shape, pattern: Pattern | None, count: int, *,
         grad: torch.Tensor | None = None, generator: torch.Generator | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """One mask update of a layer whose `positions` (and their `values`) have `pattern`'s structure:
    drop about `count` weights' worth of the smallest (whole blocks by L1 norm, or single weights for
    N:M), grow as many where `grad` (the dense gradient, `shape`) is largest (RigL) or, without it, at
    random from `generator` (SET), restoring the structure (table in the module docstring).

    Returns (new positions, int32 ascending, as many as before; regrown, bool per new entry: grown
    by this update, so its value and optimizer state start at zero)."""
    pattern = pattern or UNSTRUCTURED
    problem = check_structure(positions, shape, pattern)
    if problem:
        raise ValueError(f"cannot update a mask that lost its structure: {problem}")
    if values.shape != positions.shape:
        raise ValueError(f"values {tuple(values.shape)} do not match positions {tuple(positions.shape)}")
    tiling = Tiling(shape, pattern)
    magnitude = values.detach().abs()
    if pattern.kind == "nm":
        return _swap_nm(tiling, positions, magnitude, min(count, positions.numel()), grad, generator)
    return _swap_blocks(tiling, positions, magnitude, count, grad, generator)


def _swap_blocks(tiling: Tiling, positions, magnitude, count: int, grad, generator):
    tile, _ = tiling.locate(positions)
    active, inverse = torch.unique(tile, return_inverse=True)            # ascending block ids
    norms = magnitude.new_zeros(active.numel()).index_add_(0, inverse, magnitude)
    k = min(round(count / tiling.pattern.unit), active.numel())
    kept = torch.zeros(tiling.n_tiles, dtype=torch.bool)
    kept[active] = True
    kept[active[_bottom(norms, k)]] = False
    if grad is not None:
        score = tiling.tiles_of(grad.detach().abs().reshape(-1)).sum((1, 2))   # (T,) L1 norm of |grad|
    else:
        score = torch.rand(tiling.n_tiles, generator=generator)
    grown = torch.zeros_like(kept)
    grown[_top(score.masked_fill(kept, -math.inf), k)] = True
    new = tiling.expand((kept | grown).nonzero().squeeze(1))
    return new, grown[tiling.locate(new)[0]]


def _swap_nm(tiling: Tiling, positions, magnitude, count: int, grad, generator):
    kept = torch.zeros(tiling.numel, dtype=torch.bool)
    kept[positions.long()] = True
    kept[positions.long()[_bottom(magnitude, count)]] = False
    kept = tiling.tiles_of(kept)                                          # (T, rows, M)
    n = tiling.pattern.n
    need_rows, need_cols = n - kept.sum(-1), n - kept.sum(-2)
    if grad is not None:
        score = tiling.tiles_of(grad.detach().abs().reshape(-1))
    else:
        score = tiling.tiles_of(torch.rand(tiling.numel, generator=generator))
    grown = _fill(score, ~kept, need_rows, need_cols, tiling.pattern)
    new = tiling.positions_of(kept | grown)
    return new, tiling.dense_of(grown)[new.long()]


def _bottom(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k smallest scores, in no order."""
    return torch.topk(score, k, largest=False, sorted=False).indices
