"""Mask distributions: uniform keeps the conversion's counts, ERK keeps the total FLOPs."""
import math

import pytest
import torch
from torch import nn

from siftc import flops
from siftc.errors import UsageError
from siftc.nn.sparse import SparseConv2d, SparseLinear
from siftc.sparse import apply, distribute, sparse_layers


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = SparseConv2d(3, 16, 3, padding=1, nnz=108, generator=g)    # 432 weights, 25%
        self.fc1 = SparseLinear(16 * 8 * 8, 64, nnz=16384, generator=g)         # 65536 weights, 25%
        self.fc2 = SparseLinear(64, 10, nnz=160, generator=g)                  # 640 weights, 25%

    def forward(self, x):  # (B, 3, 8, 8)
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def test_uniform_keeps_counts():
    net = Net()
    assert distribute(net, "uniform") == {"conv": 108, "fc1": 16384, "fc2": 160}


def test_erk_keeps_total_flops_and_favours_small_layers():
    net = Net()
    x = (torch.randn(1, 3, 8, 8),)
    before = flops.count(net, x)
    counts = distribute(net, "erk", x)
    apply(net, counts, torch.Generator().manual_seed(1))
    after = flops.count(net, x)
    assert {n: l.nnz for n, l in sparse_layers(net).items()} == counts
    # total FLOPs equal within one weight of the costliest layer (64 positions for the conv)
    assert before.total - 2 * 64 < after.total <= before.total
    density = {n: counts[n] / l.weight.numel() for n, l in sparse_layers(net).items()}
    assert density["fc2"] > density["fc1"] and density["conv"] > density["fc1"]
    assert all(0 < d <= 1 for d in density.values())
    assert all(torch.all(l.weight[~l.mask] == 0) for l in sparse_layers(net).values())


def test_erk_caps_dense_layers():
    net = Net()
    with torch.no_grad():  # a budget large enough that ERK wants the small layers above density 1
        for layer in sparse_layers(net).values():
            layer.set_mask(torch.rand(layer.weight.shape) < 0.9)
    x = (torch.randn(1, 3, 8, 8),)
    budget = flops.count(net, x).total
    counts = distribute(net, "erk", x)
    assert counts["fc2"] == 640
    apply(net, counts)
    assert budget - 2 * 64 < flops.count(net, x).total <= budget


def test_unknown_distribution():
    with pytest.raises(UsageError, match="uniform"):
        distribute(Net(), "lognormal")


def test_erk_and_apply_keep_layer_patterns():
    """A block layer gets whole blocks, an N:M layer keeps N/M, total FLOPs stay, masks stay structured."""
    from siftc.sparse.patterns import Pattern, check_structure
    from siftc.sparse.structured import random_positions
    net = Net()
    patterns = {"conv": Pattern.parse("block:4x1"), "fc1": Pattern.parse("block:4x4"), "fc2": Pattern.parse("nm:1:4")}
    g = torch.Generator().manual_seed(0)
    for name, layer in sparse_layers(net).items():
        layer.pattern = patterns[name]
        shape = layer.weight_shape
        nnz = layer.pattern.fixed_nnz(shape) or layer.nnz // layer.pattern.unit * layer.pattern.unit
        layer.set_positions(random_positions(shape, layer.pattern, nnz, g))
        layer.reset_parameters()
    x = (torch.randn(1, 3, 8, 8),)
    before = flops.count(net, x)
    counts = distribute(net, "erk", x)
    assert counts["fc2"] == 160                                    # 1:4 of 640, fixed
    assert counts["conv"] % 4 == 0 and counts["fc1"] % 16 == 0      # whole blocks
    assert counts["conv"] != sparse_layers(net)["conv"].nnz         # ERK did move the budget
    apply(net, counts, torch.Generator().manual_seed(1))
    after = flops.count(net, x)
    assert before.total - 2 * 64 * 4 < after.total <= before.total  # within one conv block (64 positions)
    for name, layer in sparse_layers(net).items():
        assert layer.nnz == counts[name]
        assert check_structure(layer.positions, layer.weight_shape, layer.pattern) is None
        assert layer.values.count_nonzero() == layer.nnz            # new weights drawn, not zero


@pytest.mark.parametrize("make, text, want, nnz, reason", [
    (lambda: SparseLinear(32, 24, nnz=100), "block:16x1", "block:8x1", 104, "out=24 is not a multiple of 16"),
    (lambda: SparseConv2d(8, 16, 3, nnz=300), "block:4x4", "block:4x4", 304, None),       # 18.75 blocks -> 19
    (lambda: SparseConv2d(3, 16, 3, nnz=100), "nm:2:4", "unstructured", 100, "in=3 is not a multiple of 4"),
    (lambda: SparseLinear(32, 12, nnz=100), "nm:4:8:t", "nm:2:4:t", 192, "out=12 is not a multiple of 8"),
])
def test_impose_pattern_fits_rounds_to_whole_blocks_and_draws(make, text, want, nnz, reason):
    from siftc.sparse.distribution import impose_pattern
    from siftc.sparse.patterns import Pattern, check_structure
    layer = make()
    fitted = impose_pattern(layer, Pattern.parse(text), generator=torch.Generator().manual_seed(0))
    assert str(fitted.pattern) == want and layer.pattern == fitted.pattern
    assert fitted.reason is None if reason is None else reason in fitted.reason
    assert layer.nnz == nnz
    assert check_structure(layer.positions, layer.weight_shape, layer.pattern) is None
    bound = 1 / math.sqrt(math.prod(layer.weight_shape[1:]))
    assert layer.values.abs().max() <= bound and layer.values.count_nonzero() == nnz  # drawn like the init
    assert layer(torch.randn(2, *([32] if isinstance(layer, SparseLinear) else [layer.in_channels, 5, 5]))).isfinite().all()
