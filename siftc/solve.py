"""Iso-FLOP shapes and non-zero counts (docs/design.md section 2).

For a layer with D_in inputs and D_out outputs (a conv counts D_in = C_in*kh*kw), dense FLOPs are
proportional to its weight count B = D_in*D_out. Every transformation keeps the output positions of the
layer, so a layer is iso-FLOP exactly when the non-zeros of its parts add up to B. The structural number
(N branches, hidden width d) is rounded first; the non-zero counts are then solved to sum to B exactly.
Densities are derived from them, not taken as input.
"""
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """A solved layer: the structural number and the non-zeros of each sparse part."""
    structure: int          # parallel: N branches; factorized/doped: hidden width (rank) d
    nnz: tuple[int, ...]    # non-zeros of each sparse part, in build order
    capacity: tuple[int, ...]  # weights of each sparse part (nnz / capacity = density)
    dense_weights: int = 0  # weights in parts that stay dense (doped U and V)

    @property
    def density(self) -> float:
        return sum(self.nnz) / sum(self.capacity) if sum(self.capacity) else 1.0

    @property
    def search_space(self) -> int:
        return sum(self.capacity) + self.dense_weights


def split(budget: int, capacities: list[int]) -> tuple[int, ...]:
    """Split `budget` non-zeros over parts in proportion to their capacities, as integers that sum to
    `budget` exactly and never exceed a part's capacity (largest remainders get the leftovers)."""
    total = sum(capacities)
    if not 0 <= budget <= total:
        raise ValueError(f"budget {budget} does not fit capacities {capacities}")
    exact = [budget * c / total for c in capacities]
    out = [min(c, math.floor(e)) for c, e in zip(capacities, exact)]
    order = sorted(range(len(out)), key=lambda i: exact[i] - out[i], reverse=True)
    left = budget - sum(out)
    while left:
        for i in order:
            if left and out[i] < capacities[i]:
                out[i] += 1
                left -= 1
    return tuple(out)


def parallel(d_in: int, d_out: int, s: float) -> Shape:
    """N = round(1/(1-s)) branches of the dense shape, sharing the dense weight budget."""
    b = d_in * d_out
    n = max(1, round(1 / (1 - s)))
    return Shape(n, split(b, [b] * n), (b,) * n)


def factorized(d_in: int, d_out: int, s: float) -> Shape:
    """V g(U x): U is D_in->d, V is d->D_out, d = D_in*D_out / ((D_in+D_out)(1-s)).

    d is rounded, but never below the width whose two dense factors hold the budget (at s=0 the
    factors are dense and carry exactly the dense FLOPs)."""
    b = d_in * d_out
    d = max(round(b / ((d_in + d_out) * (1 - s))), math.ceil(b / (d_in + d_out)), 1)
    caps = [d_in * d, d * d_out]
    return Shape(d, split(b, caps), tuple(caps))


def doped(d_in: int, d_out: int, s: float) -> Shape:
    """V U x + M x: U, V dense of rank d = s*D_in*D_out/(D_in+D_out), M sparse with what is left."""
    b = d_in * d_out
    d = min(round(s * b / (d_in + d_out)), b // (d_in + d_out))
    low_rank = (d_in + d_out) * d
    return Shape(d, (b - low_rank,), (b,), dense_weights=low_rank)


SOLVERS = {"parallel": parallel, "factorized": factorized, "doped": doped}


# ---- Sparse Wide (docs/design.md section 2.3) ----------------------------------------------------
def wide_k(s: float) -> float:
    """The widening factor: k^2 x the weights at density 1/k^2 keeps the FLOPs (k = 1 at s = 0)."""
    return math.sqrt(1 / (1 - s))


def wide_width(width: int, s: float, multiple: int = 1) -> int:
    """k * width rounded to the nearest multiple of `multiple`, never below `width`; s = 0 keeps it.

    The paper's GPT-3 Small with multiple=12: 768 -> 1092 and 3072 -> 4344 at s=0.5 (k*768 = 1086.1,
    k*3072 = 4344.5), 768 -> 1536 and 3072 -> 6144 at s=0.75."""
    if s == 0:
        return width
    n = math.floor(wide_k(s) * width / multiple + 0.5) * multiple
    return max(n, -(-width // multiple) * multiple)


def wide_nnz(budgets: list[int], capacities: list[int], positions: list[int], extra: int) -> list[int]:
    """Non-zeros of the sparse layers of a widened model, in closed form.

    Layer i may use `budgets[i]` weights (its dense count) at `positions[i]` output positions; layers
    kept dense cost `extra` FLOPs more than before. FLOPs are linear in the non-zeros, so every sparse
    layer keeps the same fraction alpha of its budget, with sum_i 2 alpha b_i p_i = sum_i 2 b_i p_i - extra.
    A layer widened on one side only gets its own density b_i / capacity_i. Raises ValueError when the
    kept-dense layers alone cost more than the budget."""
    total = sum(2 * b * p for b, p in zip(budgets, positions))
    alpha = (total - extra) / total if total else 1.0
    if alpha <= 0:
        raise ValueError(f"kept-dense layers need {extra} more FLOPs, the sparse layers have {total}")
    return [min(c, max(0, round(alpha * b))) for b, c in zip(budgets, capacities)]


# ---- Sparse Wide at a fixed density (N:M patterns) ----------------------------------------------
# N:M fixes every sparse layer's density, so the non-zeros cannot pay for the kept-dense layers' growth
# or for rounding: the widths must. A widened model's weight FLOPs are a quadratic in the common factor
# k (each layer's weight count is a product of two sides, each linear in k; a grouped conv's is linear),
# so k has a closed form; the widths are then rounded, each group down or up to its multiple.
def wide_factor(flops_at, target: float) -> float:
    """The k >= 1 at which `flops_at(k)` (a model's weight FLOPs with every widening group at k times
    its width) equals `target`. `flops_at` is called at k = 1, 2, 3 only, where widths are exact
    integers, and the quadratic through those points is solved; k = 1 when the model at k = 1 already
    costs `target` or more."""
    f1, f2, f3 = (flops_at(k) for k in (1, 2, 3))
    a = (f3 - 2 * f2 + f1) / 2
    b = f2 - f1 - 3 * a
    c = f1 - a - b
    if f1 >= target or a == b == 0:
        return 1.0
    # The root of a k^2 + b k + c = target in the form that stays exact as a -> 0 (a model of one-sided
    # layers only is linear in k); a, b >= 0, since every side is k x its widening part + its fixed part.
    return 2 * (target - c) / (b + math.sqrt(b * b + 4 * a * (target - c)))


def nearest_widths(exact: dict, multiples: dict, least: dict, flops_of, target: float) -> dict:
    """Integer widths near `exact` (group -> k x dense width) whose FLOPs come near `target`.

    Every width is a multiple of `multiples[g]`, never below `least[g]` (the smallest multiple at or
    above its dense width). First each group rounds down or up, up in order of largest remainder, the
    prefix nearest `target` kept; then, while it brings the FLOPs nearer, one group steps by its multiple
    (or, when no single step helps, two step in opposite directions), so the groups that step finest
    absorb the rounding of the coarse ones. `flops_of(widths)` counts a choice."""
    down = {g: max(math.floor(exact[g] / multiples[g]) * multiples[g], least[g]) for g in exact}
    order = sorted(exact, key=lambda g: (exact[g] - down[g]) / multiples[g], reverse=True)
    miss = lambda widths: abs(flops_of(widths) - target)
    widths = min(({g: down[g] + multiples[g] * (g in order[:j]) for g in exact} for j in range(len(order) + 1)),
                 key=miss)
    step = lambda w, *moves: {**w, **{g: w[g] + s * multiples[g] for g, s in moves}}
    fits = lambda w: all(w[g] >= least[g] for g in w)
    while True:
        singles = [step(widths, (g, s)) for g in exact for s in (-1, 1)]
        best = min(filter(fits, singles), key=miss, default=widths)
        if miss(best) >= miss(widths):
            pairs = [step(widths, (g, 1), (h, -1)) for g in exact for h in exact if g != h]
            best = min(filter(fits, pairs), key=miss, default=widths)
        if miss(best) >= miss(widths):
            return widths
        widths = best


# ---- whole blocks (structured patterns, siftc.sparse.patterns) -----------------------------------
# A layer with a block pattern holds a whole number of blocks of `block` (= Pattern.unit) weights; FLOPs
# are 2 x non-zeros x output positions, so a count within half a block of the budget has FLOPs within
# half a block's. N:M fixes the count instead (Pattern.fixed_nnz); solve the structure around its
# density with siftc.sparse.patterns.effective_sparsity.
def whole_blocks(nnz: float, block: int, capacity: int) -> int:
    """The multiple of `block` nearest `nnz` (a budget in weights, e.g. wide_nnz's count for a layer),
    within [0, capacity]; `capacity` (the layer's weights) is a multiple of `block` when the pattern
    fits the layer."""
    if block < 1 or capacity % block:
        raise ValueError(f"capacity {capacity} is not a whole number of {block}-weight blocks")
    return min(capacity, max(0, math.floor(nnz / block + 0.5) * block))


def split_blocks(budget: int, capacities: list[int], blocks: list[int]) -> tuple[int, ...]:
    """`split` in whole blocks: part i gets a multiple of blocks[i] (its pattern's block size), at most
    its capacity, in proportion to the capacities, summing to within half the largest block of
    `budget` (largest remainders get the leftover blocks)."""
    total = sum(capacities)
    if not 0 <= budget <= total:
        raise ValueError(f"budget {budget} does not fit capacities {capacities}")
    if any(b < 1 or c % b for c, b in zip(capacities, blocks)):
        raise ValueError(f"capacities {capacities} are not whole numbers of blocks {blocks}")
    exact = [budget * c / total for c in capacities]
    out = [math.floor(e / b) * b for e, b in zip(exact, blocks)]
    left = budget - sum(out)
    order = sorted(range(len(out)), key=lambda i: exact[i] - out[i], reverse=True)
    grew = True
    while grew:  # rounds over the parts, so leftover blocks spread as evenly as they fit
        grew = False
        for i in order:
            if 2 * left >= blocks[i] and out[i] + blocks[i] <= capacities[i]:
                out[i] += blocks[i]
                left -= blocks[i]
                grew = True
    return tuple(out)
