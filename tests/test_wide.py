"""Sparse Wide on whole graphs: every shipped example and the test graphs, at several sparsities."""
import math

import pytest
import torch
from torch import nn

import siftc
from siftc import flops, solve
from siftc.errors import SiftcError, UsageError
from siftc.nn.sparse import SPARSE_LAYERS
from siftc.trace import load_model

from conftest import EXAMPLE_SPECS, spec_path
from models_wide import GRAPHS, NoRule, TwoLayers

SPARSITIES = [0.0, 0.5, 0.75, 0.9]
RESIZED = (nn.Linear, nn.Conv2d, nn.Embedding, nn.BatchNorm2d, nn.LayerNorm)
_dense = {}


def _load(spec):
    if spec not in _dense:
        _dense[spec] = load_model(spec_path(spec))
    return _dense[spec]


def _sizes(m):
    """The widths a module is built from."""
    if isinstance(m, nn.Linear):
        return [m.in_features, m.out_features]
    if isinstance(m, nn.Conv2d):
        return [m.in_channels, m.out_channels]
    if isinstance(m, nn.Embedding):
        return [m.embedding_dim]
    if isinstance(m, nn.LayerNorm):
        return list(m.normalized_shape)
    return [m.num_features]


def check_wide(dense, inputs, gm, s, round_to=1):
    report = gm.siftc_info.report
    gm.eval()
    dense.eval()
    with torch.no_grad():
        assert gm(*inputs).shape == dense(*inputs).shape
    total, dense_total = flops.count(gm, inputs).total, flops.count(dense, inputs).total
    assert abs(total / dense_total - 1) <= 0.005
    # Every width is its dense size or k times it, rounded; the groups say which. A width made of
    # pieces (after a cat or a split) is the sum of its pieces, each widened: checked per group.
    pieced = {m.split(":")[0] for g in report["groups"] for m in g["members"] if "pieces" in m}
    for name, m in dense.named_modules():
        if isinstance(m, RESIZED) and name not in pieced:
            for old, new in zip(_sizes(m), _sizes(gm.get_submodule(name))):
                # a flattened (C*H*W) width widens per channel: wide(C) * H*W
                ok = {old} | {solve.wide_width(old // m, s, round_to) * m for m in range(1, old + 1) if old % m == 0}
                assert new in ok, name
    for g in report["groups"]:
        assert g["new_width"] == (solve.wide_width(g["width"], s, round_to) if not g["fixed"] else g["width"])
    if s > 0:
        assert any(g["widened"] for g in report["groups"])
    # A training step runs and keeps masked weights at zero.
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    gm(*inputs).float().pow(2).mean().backward()
    opt.step()
    for m in gm.modules():
        if isinstance(m, SPARSE_LAYERS):
            assert not m.weight[~m.mask].any()
    return report


@pytest.mark.parametrize("s", SPARSITIES)
@pytest.mark.parametrize("spec", EXAMPLE_SPECS)
def test_examples_widen_iso_flop_and_train(spec, s):
    loaded = _load(spec)
    gm = siftc.convert(spec_path(spec), kind="wide", sparsity=s)
    report = check_wide(loaded.model, loaded.example_inputs, gm, s)
    assert report["non_weight_flops"]["extra"] >= 0


@pytest.mark.parametrize("s", SPARSITIES)
@pytest.mark.parametrize("graph", GRAPHS, ids=lambda g: g.__name__)
def test_graphs_widen_iso_flop_and_train(graph, s):
    torch.manual_seed(0)
    model = graph()
    check_wide(model, graph.inputs(), siftc.convert(model, "wide", s, graph.inputs()), s)


def test_cat_width_is_the_sum_of_its_widened_branches():
    from models_wide import CatBranches
    gm = siftc.convert(CatBranches(), "wide", 0.5, CatBranches.inputs())
    assert gm.bn.num_features == gm.mix.in_channels == gm.a.out_channels + gm.b.out_channels
    assert (gm.a.out_channels, gm.b.out_channels) == (solve.wide_width(6, 0.5), solve.wide_width(10, 0.5))


@pytest.mark.parametrize("spec", ["examples/resnet.py:resnet18_cifar", "examples/gpt.py:gpt"])
def test_sparsity_zero_is_the_dense_model(spec):
    loaded = _load(spec)
    gm = siftc.convert(loaded.model, "wide", 0.0, loaded.example_inputs)
    for name, m in loaded.model.named_modules():
        if isinstance(m, RESIZED):
            assert _sizes(gm.get_submodule(name)) == _sizes(m)
    assert not any(g["widened"] for g in gm.siftc_info.report["groups"])
    gm.eval()
    loaded.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(*loaded.example_inputs), loaded.model(*loaded.example_inputs))


@pytest.mark.parametrize("s,d_model,d_ff", [(0.5, 1092, 4344), (0.75, 1536, 6144)])
def test_gpt3_small_shapes_match_the_paper(s, d_model, d_ff):
    import sys
    sys.path.insert(0, spec_path("examples"))
    from gpt import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=12, n_embd=768))
    x = torch.randint(0, 64, (1, 8))
    gm = siftc.convert(model, "wide", s, (x,), round_to=12)
    attn, mlp = gm.get_submodule("blocks.1.attn"), gm.get_submodule("blocks.1.mlp")
    assert (attn.c_attn.in_features, attn.c_attn.out_features) == (d_model, 3 * 768)  # heads 12 x 64 kept
    assert (attn.c_proj.in_features, attn.c_proj.out_features) == (768, d_model)
    assert (mlp.c_fc.in_features, mlp.c_fc.out_features) == (d_model, d_ff)
    assert gm.wte.embedding_dim == d_model and gm.lm_head.out_features == 64
    assert abs(gm.siftc_info.report["flop_ratio"] - 1) <= 0.005
    assert gm(x).shape == (1, 8, 64)


def test_widen_heads_widens_head_dim():
    loaded = _load("examples/gpt.py:gpt")
    gm = siftc.convert(loaded.model, "wide", 0.75, loaded.example_inputs, widen_heads=True)
    attn = gm.get_submodule("blocks.0.attn")
    assert attn.c_attn.out_features == 3 * 256 and attn.c_proj.in_features == 256
    check_wide(loaded.model, loaded.example_inputs, gm, 0.75)


def test_tied_head_stays_tied():
    gm = siftc.convert(spec_path("examples/gpt.py:gpt_tied"), "wide", 0.75)
    assert gm.lm_head.weight is gm.wte.weight and gm.wte.weight.shape == (256, 256)


def test_kept_dense_layers_grow_and_are_paid_for():
    gm = siftc.convert(spec_path("examples/mlp.py:mlp"), "wide", 0.75)
    layers = {r["name"]: r for r in gm.siftc_info.report["layers"]}
    assert layers["net.0"]["kind"] == "dense" and layers["net.0"]["new_shape"] == "[512, 64]"
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
    x = _load("examples/mlp.py:mlp").example_inputs
    gm.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*x), gm(*x))


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(UsageError, match="nothing to widen"):
        siftc.convert(TwoLayers(), "wide", 0.5, TwoLayers.inputs())
    with pytest.raises(UsageError, match="round-to"):
        siftc.convert(TwoLayers(), "wide", 0.5, TwoLayers.inputs(), round_to=0)
    with pytest.raises(UsageError, match="kept-dense"):  # net.0 alone outgrows the model at k = 10
        siftc.convert(spec_path("examples/mlp.py:mlp"), "wide", 0.99)


def test_cli_exits_2_and_writes_nothing(tmp_path):
    from click.testing import CliRunner
    from siftc.cli import main
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", spec_path("examples/mlp.py:mlp"), "--kind", "wide",
                                       "--sparsity", "0.5", "--round-to", "-3", "-o", str(out)])
    assert result.exit_code == 2 and "round-to" in result.output and not out.exists()
    result = CliRunner().invoke(main, ["convert", spec_path("examples/mlp.py:mlp"), "--kind", "wide",
                                       "--sparsity", "0.99", "-o", str(out)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1 and not out.exists()
