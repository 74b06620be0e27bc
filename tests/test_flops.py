"""siftc.flops, the one FLOP count: weight layers at 2 x MACs (sparse ones at their non-zeros), positions
summed over calls, the count without a forward agreeing with the forward's, and the non-weight work
(norms, attention products) counted apart, each against a number worked out by hand."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import siftc
from siftc import flops
from siftc.nn.sparse import SparseConv2d, SparseLinear


def traced(model, x):
    """An fx graph of `model` with the shapes of one run on `x` recorded (`tensor_meta`)."""
    gm = torch.fx.symbolic_trace(model)
    ShapeProp(gm).propagate(*x)
    return gm


def node_shape(node):
    return tuple(node.meta["tensor_meta"].shape)


def test_linear_is_two_macs_per_weight_per_token():
    fc = flops.count(nn.Linear(10, 7), (torch.randn(3, 5, 10),))
    assert fc.total == 2 * 10 * 7 * 15  # 3 x 5 tokens
    assert fc.positions == {"": 15}


def test_conv_counts_its_output_positions_after_stride_and_padding():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    fc = flops.count(conv, (torch.randn(2, 3, 9, 9),))
    # H' = W' = (9 + 2*1 - 3) // 2 + 1 = 5, so 2 x 5 x 5 = 50 positions; 8 x 3 x 3 x 3 = 216 weights
    assert fc.positions[""] == 50
    assert fc.total == 2 * 216 * 50
    assert flops.positions(conv, (2, 8, 5, 5)) == 50


@pytest.mark.parametrize("layer,x,nnz,numel,pos", [
    (lambda: SparseLinear(10, 7, nnz=20), torch.randn(4, 10), 20, 70, 4),
    (lambda: SparseConv2d(4, 6, 3, padding=1, nnz=50), torch.randn(1, 4, 5, 5), 50, 216, 25),
])
def test_sparse_layer_is_counted_at_its_nonzeros(layer, x, nnz, numel, pos):
    torch.manual_seed(0)
    layer = layer()
    fc = flops.count(layer, (x,))
    assert fc.total == 2 * nnz * pos and fc.dense[""] == 2 * numel * pos
    assert flops.layer_flops(layer, pos) == 2 * nnz * pos
    assert flops.layer_flops(layer, pos, dense=True) == 2 * numel * pos


def test_embedding_is_a_lookup():
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 3))
    fc = flops.count(model, (torch.randint(0, 50, (2, 6)),))
    assert fc.total == 2 * 8 * 3 * 12 and set(fc.layers) == {"1"}


class _Net(nn.Module):
    """A conv called twice (its positions add up), a strided conv, BatchNorm, a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.again = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):  # (B, 3, 8, 8)
        x = self.down(torch.relu(self.bn(self.stem(x))))  # (B, 16, 4, 4)
        x = self.again(torch.relu(self.again(x)))
        return self.head(x.mean((2, 3)))


def test_positions_add_up_over_calls_and_graph_positions_agree():
    x = (torch.randn(2, 3, 8, 8),)
    model = _Net()
    fc = flops.count(model, x)
    assert fc.positions == {"stem": 128, "down": 32, "again": 64, "head": 2}
    assert flops.graph_positions(traced(model, x)) == fc.positions  # from recorded shapes, no forward


@pytest.mark.parametrize("kind", ["wide", "parallel", "factorized", "doped"])
def test_count_transformed_agrees_with_a_forward(kind):
    x = (torch.randn(2, 3, 8, 8),)
    torch.manual_seed(0)
    dense_model = _Net().eval()
    gm = siftc.convert(dense_model, kind, 0.75, x, keep_dense=())
    names = tuple(r["name"] for r in gm.siftc_info.report["layers"])
    dense = flops.count(dense_model, x)
    without = flops.count_transformed(gm, dense, extra_under=names)
    forward = flops.count(gm, x, extra_under=names)
    assert without.layers == forward.layers and without.extra == forward.extra
    assert without.total == gm.siftc_info.report["flops"]
    assert abs(without.total / dense.total - 1) <= 0.005
    for r in gm.siftc_info.report["layers"]:  # each record's FLOPs: what replaced it, at its positions
        assert r["flops"] == flops.module_flops(gm.get_submodule(r["name"]), dense.positions[r["name"]])
        assert r["dense_flops"] == dense.layers[r["name"]]


def test_branch_batchnorm_is_extra_at_two_per_element():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    fc = flops.count(model, (torch.randn(2, 3, 5, 5),), extra_under=("1",))  # "1." prefixes nothing
    assert fc.extra == {}
    wrapped = nn.Sequential(model)
    fc = flops.count(wrapped, (torch.randn(2, 3, 5, 5),), extra_under=("0",))
    assert fc.extra == {"0.1": 2 * 2 * 4 * 5 * 5} and fc.extra_total == 400


def test_attention_products_by_hand():
    # q k^T: (2, 3, 4) x (2, 5, 4) -> (2, 3, 5): 2*3*5*4 = 120 MACs; then x v (2, 5, 6): 2*3*6*5 = 180 MACs
    assert flops.attention_flops((2, 3, 4), (2, 5, 6)) == 2 * 120 + 2 * 180
    assert flops.norm_flops((2, 3, 4)) == 48


class _Attend(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):  # (1, 4, 8)
        h = self.ln(x)
        y = F.scaled_dot_product_attention(h, h, h)  # (1, 4, 8)
        return self.proj(F.layer_norm(y, (8,)))


def test_non_weight_on_a_traced_graph():
    gm = traced(_Attend(), (torch.randn(1, 4, 8),))
    # two norms over 1*4*8 = 32 elements: 2 x 32 each; attention with L = S = 4, E = Ev = 8:
    # q k^T 4*4*8 = 128 MACs, x v 4*8*4 = 128 MACs
    assert flops.non_weight(gm, node_shape) == 2 * (2 * 32) + 2 * 128 + 2 * 128
    doubled = flops.non_weight(gm, lambda n: (2, *node_shape(n)))  # the shapes given, not the graph's own
    assert doubled == 2 * flops.non_weight(gm, node_shape)


def test_wide_reports_the_non_weight_work_of_its_wider_stream():
    torch.manual_seed(0)
    model, x = _Attend(), (torch.randn(1, 4, 8),)
    gm = siftc.convert(nn.Sequential(nn.Linear(8, 8), model, nn.Linear(8, 8)), "wide", 0.75, x, keep_dense=())
    nw = gm.siftc_info.report["non_weight_flops"]
    assert nw["dense"] == 2 * (2 * 32) + 2 * 128 + 2 * 128
    # the stream inside widens 8 -> 16 (k = 2): norms over 64 elements, attention at E = Ev = 16
    assert nw["wide"] == 2 * (2 * 64) + 2 * 256 + 2 * 256 == flops.non_weight(traced(gm, x), node_shape)
    assert nw["extra"] == nw["wide"] - nw["dense"] > 0
