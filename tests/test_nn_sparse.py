"""siftc.nn.sparse: masks with an exact non-zero count at uniformly random, seeded positions, and the
dense layers' own init drawn only where the mask is on."""
import math

import pytest
import torch
from torch import nn

from siftc.nn.sparse import SparseConv2d, SparseLinear, random_mask


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# small (one exact round), bulk (draws with replacement, then exact), dense side (complement), edges
@pytest.mark.parametrize("shape,nnz", [((1,), 0), ((1,), 1), ((2,), 1), ((3, 3), 4), ((100,), 100),
                                       ((5000,), 10), ((5000,), 2600), ((300, 300), 8100),
                                       ((64, 64, 3, 3), 3686), ((64, 64, 3, 3), 33178)])
def test_exact_count_and_seeded(shape, nnz):
    mask = random_mask(shape, nnz, seeded(1))
    assert mask.dtype == torch.bool and mask.shape == shape
    assert int(mask.count_nonzero()) == nnz
    assert torch.equal(mask, random_mask(shape, nnz, seeded(1)))
    if 0 < nnz < math.prod(shape) - 1:
        assert not torch.equal(mask, random_mask(shape, nnz, seeded(2)))


@pytest.mark.parametrize("nnz", [300, 1500, 4500])  # the small path, the bulk path, the complement
def test_every_position_equally_likely(nnz):
    n, trials = 6000, 400
    gen = seeded(0)
    hits = sum(random_mask((n,), nnz, gen).double() for _ in range(trials))
    p = nnz / n
    z = (hits - trials * p) / math.sqrt(trials * p * (1 - p))
    assert z.abs().max() < 5                       # no position favoured
    assert abs(z[: n // 2].mean() - z[n // 2:].mean()) < 0.2  # nor low or high indices
    assert abs(float((z ** 2).mean()) - 1) < 0.1   # spread as binomial counts


def test_bad_count_is_refused():
    with pytest.raises(ValueError, match="nnz=7"):
        random_mask((2, 3), 7)


@pytest.mark.parametrize("make,dense", [
    (lambda: SparseLinear(300, 200, nnz=6000), lambda: nn.Linear(300, 200)),
    (lambda: SparseConv2d(16, 32, 3, nnz=1000), lambda: nn.Conv2d(16, 32, 3)),
])
@torch.no_grad()
def test_init_is_the_dense_init_on_the_mask(make, dense):
    torch.manual_seed(0)
    layer, ref = make(), dense()
    bound = 1 / math.sqrt(layer.weight[0].numel())
    on = layer.weight[layer.mask]
    assert not layer.weight[~layer.mask].any()
    assert on.abs().max() <= bound and on.abs().min() > 0
    assert float(on.std()) == pytest.approx(float(ref.weight.std()), rel=0.1)   # U(-bound, bound), as nn's own init
    assert layer.bias.abs().max() <= bound and float(layer.bias.std()) == pytest.approx(float(ref.bias.std()), rel=0.3)
    torch.manual_seed(0)
    assert torch.equal(make().weight, layer.weight)  # seeded
