"""Sparsity patterns: parsing, fitting to layers, structured positions, structured swaps, whole blocks."""
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from siftc import solve
from siftc.errors import UsageError
from siftc.sparse import transposable
from siftc.sparse.patterns import (FORMS, UNSTRUCTURED, Pattern, Tiling, check_structure, effective_sparsity,
                                   fallbacks, fit, fits)
from siftc.sparse.structured import magnitude_positions, random_positions, swap

TEXTS = ["unstructured", "block:4x1", "block:8x1", "block:16x1", "block:1x4", "block:4x4", "block:2x2",
         "nm:2:4", "nm:1:4", "nm:4:8", "nm:2:4:t", "nm:4:8:t", "nm:1:8:t"]
patterns = st.sampled_from(TEXTS).map(Pattern.parse)


@st.composite
def layer_shapes(draw, pattern: Pattern):
    """A Linear, Conv1d or Conv2d weight shape that `pattern`'s tiles divide."""
    rows, cols = pattern.tile
    o, i = rows * draw(st.integers(1, 4)), cols * draw(st.integers(1, 4))
    kernel = draw(st.sampled_from([(), (3,), (1, 1), (3, 3), (1, 2)]))
    return (o, i) + kernel


@st.composite
def pattern_and_shape(draw):
    pattern = draw(patterns)
    return pattern, draw(layer_shapes(pattern))


def _nnz(pattern, shape, draw_fraction):
    """A valid non-zero count: N:M's fixed one, else a whole number of blocks."""
    fixed = pattern.fixed_nnz(shape)
    if fixed is not None:
        return fixed
    blocks = math.prod(shape) // pattern.unit
    return max(1, round(draw_fraction * blocks)) * pattern.unit


# ---- the Pattern type -----------------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_parse_round_trips(text):
    p = Pattern.parse(text)
    assert str(p) == text and Pattern.parse(str(p)) == p and eval(repr(p)) == p
    assert p.structured == (text != "unstructured")


def test_pattern_fields():
    assert Pattern.parse("block:8x1").tile == (8, 1) and Pattern.parse("block:8x1").unit == 8
    assert Pattern.parse("nm:2:4").tile == (1, 4) and Pattern.parse("nm:2:4:t").tile == (4, 4)
    assert Pattern.parse("nm:2:8").density == 0.25 and Pattern.parse("block:4x4").density is None
    assert Pattern.parse("nm:2:4").fixed_nnz((8, 12, 3, 3)) == 8 * 12 * 9 // 2
    assert Pattern.parse("block:1x1") == UNSTRUCTURED == Pattern() and Pattern.parse(" NM:2:4 ") == Pattern.nm(2, 4)
    assert effective_sparsity(Pattern.parse("nm:1:8:t"), 0.5) == 0.875
    assert effective_sparsity(Pattern.parse("block:4x1"), 0.9) == 0.9 and effective_sparsity(None, 0.3) == 0.3


@pytest.mark.parametrize("text", ["", "block", "block:4", "block:4x", "block:0x4", "block:-4x1", "block:4x1:t",
                                  "nm:2", "nm:4:4", "nm:5:4", "nm:0:4", "nm:2:4:x", "nm:2:4:t:t", "nm:a:b",
                                  "dense", "4x1", "unstructured:1"])
def test_bad_patterns_are_one_line_usage_errors_listing_the_forms(text):
    with pytest.raises(UsageError) as e:
        Pattern.parse(text)
    message = str(e.value)
    assert "\n" not in message and FORMS in message and repr(text) in message


# ---- fitting a pattern to a layer -----------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(pattern=patterns, o=st.integers(1, 40), i=st.integers(1, 40), kernel=st.sampled_from([(), (3, 3), (5,)]))
def test_fit_takes_the_first_fitting_pattern_of_the_chain(pattern, o, i, kernel):
    shape = (o, i) + kernel
    fitted, reason = fit(pattern, shape)
    chain = fallbacks(pattern)
    assert chain[0] == pattern and chain[-1] == UNSTRUCTURED
    assert fits(fitted, shape)
    assert not any(fits(p, shape) for p in chain[:chain.index(fitted)])  # nothing better fits
    assert (reason is None) == (fitted == pattern)
    if reason is not None:
        assert str(pattern) in reason and str(fitted) in reason and "not a multiple" in reason
    if pattern.kind == "nm" and fitted.kind == "nm":
        assert fitted.density == pattern.density  # the fallback keeps N/M
    if pattern.kind == "block" and fitted.structured:
        assert pattern.rows % fitted.rows == 0 and pattern.cols % fitted.cols == 0


def test_fit_examples():
    assert fit(Pattern.parse("block:16x1"), (24, 10)) == (Pattern.parse("block:8x1"),
                                                          "block:16x1 does not fit a 24x10 weight "
                                                          "(out=24 is not a multiple of 16): block:8x1")
    assert fit(Pattern.parse("block:4x4"), (6, 8)).pattern == Pattern.parse("block:2x4")
    assert fit(Pattern.parse("nm:4:8:t"), (12, 16, 3, 3)).pattern == Pattern.parse("nm:2:4:t")
    assert fit(Pattern.parse("nm:4:8:t"), (6, 16)).pattern == Pattern.parse("nm:1:2:t")  # transposable first
    assert fit(Pattern.parse("nm:4:8:t"), (5, 16)).pattern == Pattern.parse("nm:4:8")  # no square tile fits
    assert fit(Pattern.parse("nm:3:8"), (8, 12)).pattern == UNSTRUCTURED
    assert fit(None, (3, 3)) == (UNSTRUCTURED, None)


# ---- the tiling -----------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(ps=pattern_and_shape())
def test_tiling_views_and_locate_agree(ps):
    pattern, shape = ps
    tiling = Tiling(shape, pattern)
    dense = torch.arange(math.prod(shape))
    tiles = tiling.tiles_of(dense)
    assert tiles.shape == (tiling.n_tiles, *pattern.tile)
    assert torch.equal(tiling.dense_of(tiles), dense)
    tile, cell = tiling.locate(dense)
    assert torch.equal(tiles.reshape(tiling.n_tiles, -1)[tile, cell], dense)  # same cell both ways
    o, i, k = shape[0], shape[1], math.prod(shape[2:])
    w = dense.view(o, i, k)
    r, c = pattern.tile
    assert torch.equal(tiles[0], w[:r, :c, 0])  # tile 0: the first rows x cols at kernel position 0
    chosen = torch.tensor([0, tiling.n_tiles - 1])
    assert torch.equal(tiling.expand(chosen).long(), tiles[chosen].reshape(-1).sort().values)


# ---- structured positions -------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(ps=pattern_and_shape(), fraction=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_random_and_magnitude_positions_have_the_structure(ps, fraction, seed):
    pattern, shape = ps
    nnz = _nnz(pattern, shape, fraction)
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g)
    for positions in (random_positions(shape, pattern, nnz, g), magnitude_positions(weight, pattern, nnz)):
        assert positions.dtype == torch.int32 and positions.numel() == nnz
        assert check_structure(positions, shape, pattern) is None
    if pattern.kind in ("unstructured", "block"):  # magnitude: no unchosen block beats a chosen one
        tiling = Tiling(shape, pattern)
        norms = tiling.tiles_of(weight.abs()).sum((1, 2))
        chosen = torch.zeros(tiling.n_tiles, dtype=torch.bool)
        chosen[tiling.locate(magnitude_positions(weight, pattern, nnz))[0]] = True
        if (~chosen).any():
            assert norms[chosen].min() >= norms[~chosen].max()
    elif not pattern.transposable:  # each group's chosen are its top N
        tiling = Tiling(shape, pattern)
        mask = torch.zeros(tiling.numel, dtype=torch.bool)
        mask[magnitude_positions(weight, pattern).long()] = True
        mag, chosen = tiling.tiles_of(weight.abs()), tiling.tiles_of(mask)
        low = mag.masked_fill(~chosen, math.inf).amin(-1)
        high = mag.masked_fill(chosen, -math.inf).amax(-1)
        assert torch.all(low >= high)


def test_random_block_positions_are_uniform_over_blocks():
    pattern, shape = Pattern.parse("block:4x1"), (8, 6)     # 12 blocks, 3 chosen each time
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(12)
    tiling = Tiling(shape, pattern)
    for _ in range(1200):
        counts[tiling.locate(random_positions(shape, pattern, 12, g))[0].unique()] += 1
    assert counts.sum() == 3600 and torch.all((counts - 300).abs() < 60)  # ~5 standard deviations


@pytest.mark.parametrize("text", ["nm:2:4:t", "nm:4:8:t", "nm:1:8:t"])
def test_transposable_magnitude_finds_a_planted_mask(text):
    """Weights large exactly on a transposable mask: that mask is the unique best and must be found."""
    pattern = Pattern.parse(text)
    m, n = pattern.m, pattern.n
    rows = torch.arange(2 * m)[:, None]
    cols = torch.arange(3 * m)[None, :]
    planted = ((rows * 5 + cols * 3) % m) < n             # a circulant: n per row and column of each tile
    g = torch.Generator().manual_seed(1)
    weight = torch.rand(2 * m, 3 * m, generator=g) + 10 * planted
    positions = magnitude_positions(weight, pattern)
    assert check_structure(positions, weight.shape, pattern) is None
    assert torch.equal(positions.long(), planted.reshape(-1).nonzero().squeeze(1))
    # the transposed weight is n:m along its rows too
    mask_t = torch.zeros(weight.numel(), dtype=torch.bool)
    mask_t[positions.long()] = True
    mask_t = mask_t.view(weight.shape).t().reshape(-1)
    assert check_structure(mask_t.nonzero().squeeze(1), (3 * m, 2 * m), Pattern.nm(n, m)) is None


def test_transposable_fill_completes_what_greedy_leaves_short():
    g = torch.Generator().manual_seed(0)
    t, m, n = 2000, 8, 4
    score = torch.rand(t, m, m, generator=g)
    need = torch.full((t, m), n)
    greedy_need = need.clone()
    greedy = transposable._greedy(score, torch.ones(t, m, m, dtype=torch.bool), greedy_need, need.clone())
    assert (greedy_need.sum(1) > 0).sum() > 100  # greedy alone gets stuck in many tiles
    chosen = transposable.fill(score, torch.ones(t, m, m, dtype=torch.bool), need, need)
    assert torch.all(chosen.sum(1) == n) and torch.all(chosen.sum(2) == n)
    # never far below the greedy pass's score (the 2-approximation it completes)
    assert (score * chosen).sum() >= 0.9 * (score * greedy).sum()


@settings(max_examples=60, deadline=None)
@given(m=st.sampled_from([2, 4, 8]), data=st.data())
def test_transposable_fill_respects_allowed_cells(m, data):
    n = data.draw(st.integers(1, m - 1))
    t, seed = data.draw(st.integers(1, 30)), data.draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    # a feasible target (shifted circulants under random row/col permutations) inside random allowed cells
    base = ((torch.arange(m)[:, None] + torch.arange(m)[None, :]) % m) < n
    target = torch.stack([base[torch.randperm(m, generator=g)][:, torch.randperm(m, generator=g)] for _ in range(t)])
    kept = target & (torch.rand(t, m, m, generator=g) < 0.5)
    allowed = ~kept & (target | (torch.rand(t, m, m, generator=g) < 0.5))
    need = target & ~kept
    chosen = transposable.fill(torch.rand(t, m, m, generator=g), allowed, need.sum(2), need.sum(1))
    assert not torch.any(chosen & ~allowed)
    assert torch.equal(chosen.sum(2), need.sum(2)) and torch.equal(chosen.sum(1), need.sum(1))


def test_transposable_fill_refuses_an_impossible_tile():
    allowed = torch.zeros(1, 2, 2, dtype=torch.bool)
    allowed[0, 0, 0] = allowed[0, 1, 0] = True   # both rows may use only column 0
    with pytest.raises(ValueError, match="cannot be completed"):
        transposable.fill(torch.rand(1, 2, 2), allowed, torch.ones(1, 2, dtype=torch.long),
                          torch.ones(1, 2, dtype=torch.long))


# ---- the structure check --------------------------------------------------------------------------
@pytest.mark.parametrize("text, shape, positions, wrong", [
    ("block:2x2", (4, 4), [0, 1, 2, 5], "the block at rows 0-1, inputs 0-1 holds 3 of its 4"),
    ("block:4x1", (4, 2, 3, 3), [0, 18, 36], "the block at rows 0-3, input 0 at kernel position 0 holds 3"),
    ("nm:2:4", (4, 4), [0, 1, 4, 5, 8, 9], "the group at row 3, inputs 0-3 holds 0 non-zeros, not 2"),
    ("nm:2:4:t", (4, 4), [0, 1, 4, 5, 8, 9, 12, 13], "column 0 of the tile at rows 0-3, inputs 0-3 holds 4"),
    ("nm:1:2", (2, 2), [0, 1], "row 0, inputs 0-1 holds 2 non-zeros, not 1"),
    ("unstructured", (4, 4), [3, 1], "not strictly ascending"),
    ("unstructured", (4, 4), [1, 1], "not strictly ascending"),
    ("block:4x1", (4, 4), [0, 4, 8, 16], "in [0, 16)"),
    ("block:4x1", (6, 4), [0], "does not tile"),
])
def test_check_structure_names_what_is_wrong(text, shape, positions, wrong):
    problem = check_structure(torch.tensor(positions, dtype=torch.int32), shape, Pattern.parse(text))
    assert problem is not None and wrong in problem and "\n" not in problem


def test_check_structure_accepts_valid_and_empty():
    assert check_structure(torch.tensor([0, 1, 6, 7, 8, 9, 14, 15]), (4, 4), Pattern.parse("nm:2:4:t")) is None
    assert check_structure(torch.tensor([], dtype=torch.int32), (8, 4), Pattern.parse("block:4x1")) is None
    assert check_structure(torch.tensor([2, 6, 10, 14]), (4, 4), Pattern.parse("block:4x1")) is None


# ---- structured swaps -----------------------------------------------------------------------------
@settings(max_examples=120, deadline=None)
@given(ps=pattern_and_shape(), fraction=st.floats(0.05, 0.95), drop=st.floats(0.0, 1.0),
       rigl=st.booleans(), seed=st.integers(0, 2**31))
def test_swap_keeps_structure_and_count_and_drops_the_smallest(ps, fraction, drop, rigl, seed):
    pattern, shape = ps
    g = torch.Generator().manual_seed(seed)
    positions = random_positions(shape, pattern, _nnz(pattern, shape, fraction), g)
    values = torch.randn(positions.shape, generator=g)
    count = round(drop * positions.numel())
    grad = torch.randn(shape, generator=g) if rigl else None
    new, regrown = swap(positions, values, shape, pattern, count, grad=grad, generator=g)
    assert new.dtype == torch.int32 and new.numel() == positions.numel() and regrown.shape == new.shape
    assert check_structure(new, shape, pattern) is None
    moved = round(count / pattern.unit) * pattern.unit if pattern.kind != "nm" else count
    moved = min(moved, positions.numel())
    assert int(regrown.sum()) == moved
    survivors = new[~regrown].long()                     # kept through the update
    assert bool(torch.isin(survivors, positions.long()).all())
    assert survivors.numel() == positions.numel() - moved
    if pattern.kind == "nm" and 0 < moved < positions.numel():  # the dropped weights were the smallest
        survived = torch.isin(positions.long(), survivors)
        assert values.abs()[survived].min() >= values.abs()[~survived].max()


def test_swap_refuses_positions_without_the_structure():
    with pytest.raises(ValueError, match="lost its structure"):
        swap(torch.tensor([0, 1, 2]), torch.ones(3), (4, 4), Pattern.parse("block:4x1"), 1)


# ---- whole blocks in the solver -------------------------------------------------------------------
@given(nnz=st.floats(0, 10**6), block=st.sampled_from([1, 4, 8, 16]), blocks=st.integers(1, 10**5))
def test_whole_blocks_is_the_nearest_multiple(nnz, block, blocks):
    capacity = block * blocks
    out = solve.whole_blocks(nnz, block, capacity)
    assert out % block == 0 and 0 <= out <= capacity
    assert abs(out - nnz) <= block / 2 or out == capacity


@given(budget_fraction=st.floats(0, 1), parts=st.lists(st.tuples(st.sampled_from([1, 2, 4, 16]),
                                                                  st.integers(1, 500)), min_size=1, max_size=8))
def test_split_blocks_is_whole_blocks_within_half_a_block(budget_fraction, parts):
    blocks = [b for b, _ in parts]
    caps = [b * n for b, n in parts]
    budget = round(budget_fraction * sum(caps))
    out = solve.split_blocks(budget, caps, blocks)
    assert all(o % b == 0 and 0 <= o <= c for o, b, c in zip(out, blocks, caps))
    assert abs(sum(out) - budget) <= max(blocks) / 2
    if all(b == 1 for b in blocks):
        assert out == solve.split(budget, caps)
    with pytest.raises(ValueError):
        solve.split_blocks(sum(caps) + 1, caps, blocks)


def test_split_blocks_rejects_capacities_that_are_not_whole_blocks():
    with pytest.raises(ValueError, match="whole numbers"):
        solve.split_blocks(10, [12, 10], [4, 4])


def test_permutation_brute_force_small_tiles():
    """Every 2-regular 4x4 0/1 tile passes check_structure for nm:2:4:t; every other 8-cell tile fails."""
    pattern, ok = Pattern.parse("nm:2:4:t"), 0
    for cells in itertools.combinations(range(16), 8):
        t = torch.zeros(16, dtype=torch.bool)
        t[list(cells)] = True
        regular = bool((t.view(4, 4).sum(0) == 2).all() and (t.view(4, 4).sum(1) == 2).all())
        ok += regular
        assert (check_structure(torch.tensor(cells), (4, 4), pattern) is None) == regular
    assert ok == 90  # the number of 4x4 0/1 matrices with all row and column sums 2
