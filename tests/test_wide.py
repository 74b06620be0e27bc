"""Sparse Wide on whole graphs: every shipped example and the test graphs, at several sparsities.

Each (model, sparsity) point is converted once (a module-scoped fixture) and every check reads that one
conversion. Inputs are small where the model allows: the ResNets run at 16x16 (CIFAR stem) and 64x64
(ImageNet stem: still through its 7x7 stride-2 conv and max-pool), 2x2 pixels at the last stage; their
shipped 32x32 and 224x224 inputs cost 4x and 12x more per forward and check nothing more.
"""

import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import siftc
from siftc import flops, layers, solve
from siftc.errors import UsageError
from siftc.nn.sparse import SPARSE_LAYERS
from siftc.passes.groups import analyse
from siftc.passes.reshape_rules import HEADS
from siftc.source import load_model
from siftc.trace import trace

from conftest import EXAMPLE_SPECS, spec_path
from models_wide import GRAPHS, NoRule

SPARSITIES = [0.0, 0.5, 0.75, 0.9]
SMALL_INPUTS = {"examples/resnet.py:resnet18_cifar": lambda: (torch.randn(1, 3, 16, 16),),
                "examples/resnet.py:resnet18_imagenet": lambda: (torch.randn(1, 3, 64, 64),)}
# Why a group may keep its width in these models; any other reason is a width the analysis lost.
FIXED_OK = ("model input", "model output", HEADS, "reaches cumsum")


def _example(spec):
    def build():
        loaded = load_model(spec_path(spec))
        return loaded.model, SMALL_INPUTS.get(spec, lambda: loaded.example_inputs)()
    return build


def _graph(graph):
    return lambda: (graph(), graph.inputs())


CASES = {**{spec.rpartition(":")[2]: _example(spec) for spec in EXAMPLE_SPECS},
         **{g.__name__: _graph(g) for g in GRAPHS}}


@dataclass
class Point:
    """One conversion: the dense model, its inputs, the sparsity, the wide model, and the shape of every
    tensor of one eval forward of the wide model (node name -> shape), run before anything trains it."""
    dense: nn.Module
    inputs: tuple
    s: float
    gm: torch.fx.GraphModule
    output: torch.Tensor = field(init=False)
    shapes: dict = field(init=False)

    def __post_init__(self):
        self.gm.eval()
        with torch.no_grad():
            self.output = ShapeProp(self.gm).propagate(*self.inputs)
        self.shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in self.gm.graph.nodes
                       if hasattr(n.meta.get("tensor_meta"), "shape")}

    @property
    def report(self):
        return self.gm.siftc_info.report


@pytest.fixture(scope="module", params=[(c, s) for c in CASES for s in SPARSITIES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def point(request):
    case, s = request.param
    torch.manual_seed(0)
    dense, inputs = CASES[case]()
    dense.eval()
    return Point(dense, inputs, s, siftc.convert(dense, "wide", s, inputs))


def test_forward_keeps_the_output_shape(point):
    with torch.no_grad():
        ref = point.dense(*point.inputs)
    assert point.output.shape == ref.shape
    if point.s == 0:  # sparsity 0 is the dense model: same parameters, same outputs
        shapes = lambda m: {n: layers.shape(w) for n, w in m.named_modules() if hasattr(w, "weight")}
        assert shapes(point.gm) == shapes(point.dense)
        torch.testing.assert_close(point.output, ref)


def test_flops_equal_the_dense_model(point):
    # Widening moves no spatial size, so every layer keeps its dense output positions and costs
    # 2 x its non-zeros x those positions: counted here without running the wide model.
    dense = flops.count(point.dense, point.inputs)
    wide = 0
    for name, dense_flops in dense.dense.items():
        positions = dense_flops // (2 * point.dense.get_submodule(name).weight.numel())
        wide += 2 * flops.nonzeros(point.gm.get_submodule(name)) * positions
    assert abs(wide / dense.total - 1) <= 0.005
    assert wide == point.report["flops"]
    assert point.report["non_weight_flops"]["extra"] >= 0


def wide_width(size: int, s: float, round_to: int) -> int:
    """The issue's rule, written out: round(k x size), or the nearest multiple of round_to (never below
    size rounded up to one); sparsity 0 keeps every width."""
    if s == 0:
        return size
    return max(round(math.sqrt(1 / (1 - s)) * size / round_to), math.ceil(size / round_to)) * round_to


def check_widths(p: Point, round_to: int = 1):
    """Every tensor of the wide model has the width the dense model's groups predict: a group that
    widens goes from w to wide_width(w), a dimension made of pieces (after a cat or a split) is the sum
    of its pieces. Expected widths come from the dense model alone, never from the wide one."""
    dense = trace(p.dense, p.inputs).gm
    a = analyse(dense)
    new = a.widths(lambda size, divisors, scale: wide_width(size, p.s, round_to))
    assert all(not g.divisors and g.scale == 1 for g in a.groups)  # no other multiple in these models
    width = lambda label: sum(new[g] * m for g, m in label)
    checked = 0
    for node in dense.graph.nodes:
        dims = node.meta.get("siftc.dims")
        if isinstance(dims, tuple) and node.name in p.shapes:
            assert p.shapes[node.name] == tuple(width(l) for l in dims), node.name
            checked += 1
    calls = [n for n in dense.graph.nodes if n.op == "call_module"]
    assert all(n.name in p.shapes for n in calls) and checked >= len(calls)
    # The report lists the same groups, with the same widths.
    members = a.members()
    for g in p.report["groups"]:
        assert (g["members"], g["width"], g["new_width"]) == (members[g["id"]], a.groups[g["id"]].size,
                                                              new[g["id"]])
        assert g["widened"] == (g["new_width"] != g["width"])
        assert not g["fixed"] or g["fixed"].startswith(FIXED_OK), g
    assert len(p.report["groups"]) == len(members)
    assert any(g["widened"] for g in p.report["groups"]) == (p.s > 0)


def test_every_tensor_width_is_k_times_its_dense_width(point):
    check_widths(point)


@pytest.mark.parametrize("graph", GRAPHS, ids=lambda g: g.__name__)
def test_round_to_makes_every_widened_width_a_multiple(graph):
    torch.manual_seed(0)
    dense, inputs = graph().eval(), graph.inputs()
    p = Point(dense, inputs, 0.5, siftc.convert(dense, "wide", 0.5, inputs, round_to=8))
    check_widths(p, round_to=8)
    assert all(g["new_width"] % 8 == 0 for g in p.report["groups"] if g["widened"])
    assert abs(p.report["flop_ratio"] - 1) <= 0.005


def test_training_step_keeps_masked_weights_zero(point):
    gm = point.gm
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    gm(*point.inputs).float().pow(2).mean().backward()
    opt.step()
    sparse = [m for m in gm.modules() if isinstance(m, SPARSE_LAYERS)]
    assert sparse and all(m.values.grad is not None and m.values.grad.shape == (m.nnz,) for m in sparse)
    assert not any(((m.weight != 0) & ~m.mask).any() for m in sparse)  # (no 100M-element gather)


def test_cat_width_is_the_sum_of_its_widened_branches():
    from models_wide import CatBranches
    gm = siftc.convert(CatBranches(), "wide", 0.5, CatBranches.inputs())
    assert gm.bn.num_features == gm.mix.in_channels == gm.a.out_channels + gm.b.out_channels
    assert (gm.a.out_channels, gm.b.out_channels) == (solve.wide_width(6, 0.5), solve.wide_width(10, 0.5))


@pytest.mark.parametrize("s,d_model,d_ff", [(0.5, 1092, 4344), (0.75, 1536, 6144)])
def test_gpt3_small_shapes_match_the_paper(s, d_model, d_ff):
    import sys
    sys.path.insert(0, spec_path("examples"))
    from gpt import GPT, GPTConfig
    # One block of GPT-3 Small's widths: its shapes are the same in all 12.
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=12, n_embd=768))
    x = torch.randint(0, 64, (1, 8))
    gm = siftc.convert(model, "wide", s, (x,), round_to=12)
    attn, mlp = gm.get_submodule("blocks.0.attn"), gm.get_submodule("blocks.0.mlp")
    assert (attn.c_attn.in_features, attn.c_attn.out_features) == (d_model, 3 * 768)  # heads 12 x 64 kept
    assert (attn.c_proj.in_features, attn.c_proj.out_features) == (768, d_model)
    assert (mlp.c_fc.in_features, mlp.c_fc.out_features) == (d_model, d_ff)
    assert gm.wte.embedding_dim == d_model and gm.lm_head.out_features == 64
    assert abs(gm.siftc_info.report["flop_ratio"] - 1) <= 0.005
    assert gm(x).shape == (1, 8, 64)


def test_widen_heads_widens_head_dim():
    loaded = load_model(spec_path("examples/gpt.py:gpt"))
    gm = siftc.convert(loaded.model, "wide", 0.75, loaded.example_inputs, widen_heads=True)
    attn = gm.get_submodule("blocks.0.attn")
    assert attn.c_attn.out_features == 3 * 256 and attn.c_proj.in_features == 256
    assert not any(g["fixed"] == HEADS for g in gm.siftc_info.report["groups"])
    assert abs(gm.siftc_info.report["flop_ratio"] - 1) <= 0.005


def test_tied_head_stays_tied():
    gm = siftc.convert(spec_path("examples/gpt.py:gpt_tied"), "wide", 0.75)
    assert gm.lm_head.weight is gm.wte.weight and gm.wte.weight.shape == (256, 256)


def test_kept_dense_layers_grow_and_are_paid_for():
    gm = siftc.convert(spec_path("examples/mlp.py:mlp"), "wide", 0.75)
    layers = {r["name"]: r for r in gm.siftc_info.report["layers"]}
    assert layers["net.0"]["kind"] == "dense" and layers["net.0"]["new_shape"] == "512x64"
    assert layers["net.0"]["flops"] == 2 * layers["net.0"]["dense_flops"]
    sparse = [r for r in layers.values() if r["kind"] == "wide"]
    assert sparse and all(r["density"] < 0.25 for r in sparse)  # below 1/k^2: paying for net.0, net.6


def test_depthwise_convs_widen_with_their_groups_and_say_so():
    gm = siftc.convert(spec_path("examples/mobilenetv2.py:mobilenetv2"), "wide", 0.75)
    dw = [r for r in gm.siftc_info.report["layers"] if "depthwise" in r["reason"]]
    assert dw and all(r["kind"] == "dense" and "paid for" in r["reason"] for r in dw)
    for r in dw:
        m = gm.get_submodule(r["name"])
        assert m.groups == m.in_channels == m.out_channels == 2 * r["dense_shape"][0]


def test_op_without_rule_is_reported_and_strict_refuses():
    gm = siftc.convert(NoRule(), "wide", 0.5, NoRule.inputs())
    fixed = [g for g in gm.siftc_info.report["groups"] if g["fixed"] and "cumsum" in g["fixed"]]
    assert fixed and "b:out" in fixed[0]["members"] and not fixed[0]["widened"]
    with pytest.raises(UsageError, match="cumsum"):
        siftc.convert(NoRule(), "wide", 0.5, NoRule.inputs(), strict=True)


def test_conversion_is_deterministic_and_round_trips(tmp_path):
    spec = spec_path("examples/mlp.py:mlp")
    gm = siftc.convert(spec, "wide", 0.9, seed=1)
    again = siftc.convert(spec, "wide", 0.9, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(gm.state_dict().values(), again.state_dict().values()))
    siftc.save(gm, tmp_path / "art")
    loaded = siftc.load(tmp_path / "art")
    x = gm.siftc_info.example_inputs
    gm.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*x), gm(*x))


def test_bad_inputs_are_one_line_errors():
    from models_wide import TwoLayers
    with pytest.raises(UsageError, match="nothing to widen"):
        siftc.convert(TwoLayers(), "wide", 0.5, TwoLayers.inputs())
    with pytest.raises(UsageError, match="round-to"):
        siftc.convert(TwoLayers(), "wide", 0.5, TwoLayers.inputs(), round_to=0)
    with pytest.raises(UsageError, match="kept-dense"):  # net.0 alone outgrows the model at k = 10
        siftc.convert(spec_path("examples/mlp.py:mlp"), "wide", 0.99)
