"""The iso-FLOP solver: closed forms, exact budgets, derived densities."""
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from siftc import solve

dims = st.integers(min_value=1, max_value=5000)
sparsities = st.floats(min_value=0.0, max_value=0.99)


@settings(max_examples=300, deadline=None)
@given(d_in=dims, d_out=dims, s=sparsities, kind=st.sampled_from(sorted(solve.SOLVERS)))
def test_every_shape_spends_exactly_the_dense_budget(d_in, d_out, s, kind):
    shape = solve.SOLVERS[kind](d_in, d_out, s)
    budget = d_in * d_out
    assert sum(shape.nnz) + shape.dense_weights == budget
    assert all(0 <= n <= c for n, c in zip(shape.nnz, shape.capacity))


@settings(max_examples=200, deadline=None)
@given(d_in=st.integers(16, 4096), d_out=st.integers(16, 4096), s=sparsities)
def test_structures_follow_the_papers_closed_forms(d_in, d_out, s):
    b = d_in * d_out
    assert solve.parallel(d_in, d_out, s).structure == max(1, round(1 / (1 - s)))
    d_fac = solve.factorized(d_in, d_out, s).structure
    assert d_fac >= math.ceil(b / (d_in + d_out))
    assert abs(d_fac - b / ((d_in + d_out) * (1 - s))) <= 0.5 or d_fac == math.ceil(b / (d_in + d_out))
    d_dop = solve.doped(d_in, d_out, s).structure
    assert d_dop <= s * b / (d_in + d_out) + 0.5


@settings(max_examples=200, deadline=None)
@given(d_in=st.integers(64, 4096), d_out=st.integers(64, 4096), s=st.floats(0.0, 0.95))
def test_parallel_and_factorized_densities_are_one_minus_sparsity(d_in, d_out, s):
    # With rounded structure the derived density is close to, not exactly, 1 - s.
    par = solve.parallel(d_in, d_out, s)
    assert par.density == pytest.approx(1 / par.structure, abs=1e-9)
    fac = solve.factorized(d_in, d_out, s)
    assert fac.density == pytest.approx(d_in * d_out / ((d_in + d_out) * fac.structure))


@pytest.mark.parametrize("kind", sorted(solve.SOLVERS))
def test_sparsity_zero_is_the_dense_layer(kind):
    shape = solve.SOLVERS[kind](300, 200, 0.0)
    assert shape.density == 1.0
    if kind == "parallel":
        assert shape.structure == 1
    if kind == "doped":
        assert shape.structure == 0 and shape.nnz == (60000,)


@given(budget=st.integers(0, 10**6), caps=st.lists(st.integers(1, 10**5), min_size=1, max_size=12))
def test_split_is_exact_and_within_capacity(budget, caps):
    if budget > sum(caps):
        with pytest.raises(ValueError):
            solve.split(budget, caps)
        return
    parts = solve.split(budget, caps)
    assert sum(parts) == budget
    assert all(0 <= p <= c for p, c in zip(parts, caps))
    assert all(abs(p - budget * c / sum(caps)) < 1 + 1e-9 or p == c for p, c in zip(parts, caps))


@settings(max_examples=200, deadline=None)
@given(a=st.integers(0, 10**6), b=st.integers(0, 10**6), c=st.integers(0, 10**6), grow=st.floats(1.01, 8))
def test_wide_factor_is_the_root_of_the_quadratic_it_samples(a, b, c, grow):
    f = lambda k: a * k * k + b * k + c
    target = f(grow)
    if a == b == 0:
        assert solve.wide_factor(f, target) == 1.0
        return
    assert solve.wide_factor(f, target) == pytest.approx(grow, rel=1e-9)
    assert solve.wide_factor(f, f(1) - 1) == 1.0  # already at (or over) the target at k = 1


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(8, 300), min_size=1, max_size=5),
       steps=st.lists(st.sampled_from([1, 2, 4, 8]), min_size=5, max_size=5), k=st.floats(1.0, 3.0))
def test_nearest_widths_are_multiples_no_single_step_brings_nearer_and_beat_plain_rounding(sizes, steps, k):
    groups = range(len(sizes))
    flops_of = lambda w: sum(w[g] * w[(g + 1) % len(sizes)] + 3 * w[g] for g in groups)  # a ring of layers
    exact = {g: k * sizes[g] for g in groups}
    target = flops_of(exact)
    mult = {g: steps[g] for g in groups}
    least = {g: -(-sizes[g] // mult[g]) * mult[g] for g in groups}
    got = solve.nearest_widths(exact, mult, least, flops_of, target)
    assert all(got[g] % mult[g] == 0 and got[g] >= least[g] for g in groups)
    miss = lambda w: abs(flops_of(w) - target)
    for g in groups:
        for s in (-1, 1):
            w = {**got, g: got[g] + s * mult[g]}
            assert w[g] < least[g] or miss(w) >= miss(got)
    rounded = {g: max(least[g], round(exact[g] / mult[g]) * mult[g]) for g in groups}
    assert miss(got) <= miss(rounded)
