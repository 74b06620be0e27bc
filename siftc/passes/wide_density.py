"""Sparse Wide at a density the pattern fixes (N:M): the widths solve around N/M.

Before (examples/mlp.py, --kind wide --pattern nm:2:4, at any --sparsity):
    net.0: Linear(64, 256)   net.2: Linear(256, 256)   net.4: Linear(256, 256)   net.6: Linear(256, 10)
After:
    net.0: Linear(64, 352)                           # kept dense, out side widened
    net.2: SparseLinear(352, 352, nnz = 61,952)      # 2 in every 4 inputs: density exactly 1/2
    net.4: SparseLinear(352, 352, nnz = 61,952)
    net.6: Linear(352, 10)                           # kept dense, in side widened
    0.9996x the dense FLOPs (k = 1.375, not sqrt(2): the kept-dense layers' growth is paid in width)

Unstructured wide rounds the widths and solves the non-zeros around them (`siftc.solve.wide_nnz`). N:M
fixes every sparse layer's density, so the free variable is the width:
    1. the common factor k in closed form: the widened model's weight FLOPs, every sparse layer at N/M
       and the others dense, are a quadratic in k (`siftc.solve.wide_factor`);
    2. each width group's k x width rounded to its multiple (M where an N:M layer reads it, of both
       sides for nm:N:M:t, and --round-to), then stepped by it while that brings the FLOPs nearer the
       dense model's, so the groups that step finest absorb the coarse ones' rounding
       (`siftc.solve.nearest_widths`);
    3. the non-zeros (`nnz`): N/M of the weights of each layer that takes the pattern or an N:M fallback
       (both exactly N/M). A layer whose fallback is unstructured (no N:M tile fits a side that cannot
       widen: 3 input channels, 10 classes under :t) was counted at N/M in 1-2 and now absorbs the
       rounding: its count is solved in closed form (`siftc.solve.wide_nnz`) so the total meets the
       dense FLOPs. Without such a layer the widths alone must come within 0.5% of the dense FLOPs, or
       the conversion is a one-line UsageError (a smaller M or --round-to gives finer widths).
"""
from siftc import layers, solve
from siftc.errors import UsageError
from siftc.sparse.patterns import Pattern, fit


def width_of(a, new_width: dict):
    """label -> its size at the group widths `new_width` (of the analysis `a`)."""
    return lambda label: sum(new_width[g] * m for g, m in a.resolve(label))  # labels may predate a tie


def dense_cost(plans) -> int:
    """What the plans' layers cost in the dense model: the FLOPs the widths must meet."""
    return sum(2 * p.module.weight.numel() * p.positions for p in plans)


def widths(a, plans, density: float, multiple) -> dict:
    """Steps 1-2: the width of every root group of `a`, given the counted weight layers' plans (their
    sides, positions and sparse flags) and `multiple(divisors, scale)`, a widening group's step."""
    target = dense_cost(plans)
    spec = a.widths(lambda size, divs, scale: (size, multiple(divs, scale)))
    grows = {g: v for g, v in spec.items() if isinstance(v, tuple)}  # (dense width, multiple)
    fixed = {g: v for g, v in spec.items() if g not in grows}

    def flops_at(widths: dict) -> float:
        width = width_of(a, {**fixed, **widths})
        new = [(p, layers.new_weights(p.module, {s: width(l) for s, l in a.uses[p.name].items()})) for p in plans]
        return sum(2 * p.positions * w * (density if p.sparse else 1) for p, w in new)

    k = solve.wide_factor(lambda k: flops_at({g: k * size for g, (size, _) in grows.items()}), target)
    return {**fixed, **solve.nearest_widths({g: k * size for g, (size, _) in grows.items()},
                                            {g: m for g, (_, m) in grows.items()},
                                            {g: -(-size // m) * m for g, (size, m) in grows.items()}, flops_at,
                                            target)}


def nnz(plans, pattern: Pattern, round_to: int) -> None:
    """Step 3: set `p.nnz` of every sparse plan among `plans` (the counted weight layers, at their new
    widths); a UsageError when the total is still more than 0.5% off the dense FLOPs."""
    from siftc.convert import FLOP_TOLERANCE  # (siftc.convert imports the passes)
    sparse = [p for p in plans if p.sparse]
    capacity = {p.name: layers.new_weights(p.module, p.new) for p in sparse}
    fitted = {p.name: fit(pattern, (p.new["out"], p.new["in"])).pattern for p in sparse}  # as impose will
    free = [p for p in sparse if fitted[p.name].density is None]
    for p in sparse:
        f = fitted[p.name]
        p.nnz = capacity[p.name] * f.n // f.m if f.density is not None else round(capacity[p.name] * pattern.density)
    cost = lambda: sum(2 * p.positions * (p.nnz if p.sparse else layers.new_weights(p.module, p.new)) for p in plans)
    target = dense_cost(plans)
    if free:
        try:
            counts = solve.wide_nnz([p.nnz for p in free], [capacity[p.name] for p in free],
                                    [p.positions for p in free], cost() - target)
        except ValueError:  # the others overshoot by more than the free layers hold: the check says so
            counts = [p.nnz for p in free]
        for p, n in zip(free, counts):
            p.nnz = n
    ratio = cost() / target
    if abs(ratio - 1) > FLOP_TOLERANCE:
        raise UsageError(f"wide with {pattern}: at density {pattern.n}/{pattern.m} the nearest widths (multiples of "
                         f"{pattern.m} where an N:M layer reads them, and of --round-to {round_to}) cost "
                         f"{ratio:.4f}x the dense FLOPs, more than {FLOP_TOLERANCE:.1%} off; use an N:M with a "
                         f"smaller M, a smaller --round-to, or keep fewer layers dense")
