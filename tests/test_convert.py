"""convert on every shipped example x kind x sparsity: shapes, FLOPs, densities, masks, round trip."""
import pytest
import torch
from torch import nn

import siftc
from siftc import flops, solve
from siftc.nn.sparse import SPARSE_LAYERS
from siftc.layers import fan_in_out
from siftc.errors import UsageError
from siftc.source import load_model

from conftest import EXAMPLE_SPECS, spec_path

KINDS = ["parallel", "factorized", "doped"]
SPARSITIES = [0.0, 0.5, 0.75, 0.9]

_dense_cache = {}


def dense(spec):
    if spec not in _dense_cache:
        loaded = load_model(spec_path(spec))
        _dense_cache[spec] = loaded
    return _dense_cache[spec]


def _loss(out):
    return out.float().pow(2).mean()


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spec", EXAMPLE_SPECS)
def test_example_converts_iso_flop_and_trains(spec, kind, sparsity, tmp_path):
    loaded = dense(spec)
    inputs = loaded.example_inputs
    gm = siftc.convert(spec_path(spec), kind=kind, sparsity=sparsity)
    report = gm.siftc_info.report

    # Same output shape as the dense model.
    gm.eval()
    loaded.model.eval()
    with torch.no_grad():
        out = gm(*inputs)
        assert out.shape == loaded.model(*inputs).shape

    # Whole-model weight FLOPs equal the dense model's within 0.5%, counted independently here.
    dense_total = flops.count(loaded.model, inputs).total
    total = flops.count(gm, inputs).total
    assert abs(total / dense_total - 1) <= 0.005
    assert report["dense_flops"] == dense_total and report["flops"] == total

    # Each transformed layer: non-zeros equal the dense weight count (exact), densities as solved.
    transformed = [r for r in report["layers"] if r["kind"] == kind]
    assert transformed, "every example has layers to transform"
    for r in transformed:
        sub = gm.get_submodule(r["name"])
        nnz = sum(m.nnz for m in sub.modules() if isinstance(m, SPARSE_LAYERS))
        low_rank = sum(m.weight.numel() for m in sub.modules()
                       if type(m) in (nn.Linear, nn.Conv2d))
        dense_layer = loaded.model.get_submodule(r["name"])
        assert nnz + low_rank == dense_layer.weight.numel()
        assert r["flops"] == r["dense_flops"]
        shape = solve.SOLVERS[kind](*fan_in_out(dense_layer), sparsity)
        assert r["density"] == pytest.approx(shape.density)

    if spec == "examples/resnet.py:resnet18_imagenet":
        return  # the CIFAR ResNet-18 trains and round-trips the same layers (only the stem differs), 10x cheaper

    # A sparse layer's only weight is its non-zeros: gradients and optimizer state are nnz-sized, and
    # its dense weight stays exactly zero outside the mask after an optimizer step.
    gm.train()
    opt = torch.optim.AdamW(gm.parameters(), lr=1e-2, weight_decay=0.1)
    _loss(gm(*inputs)).backward()
    opt.step()
    for m in gm.modules():
        if isinstance(m, SPARSE_LAYERS):
            assert {n for n, _ in m.named_parameters(recurse=False)} <= {"values", "bias"}
            assert m.values.grad.shape == opt.state[m.values]["exp_avg"].shape == (m.nnz,)
            assert not m.weight[~m.mask].any() and int(m.mask.sum()) == m.nnz

    # Save / load round trip gives the same outputs.
    siftc.save(gm, tmp_path / "art")
    again = siftc.load(tmp_path / "art")
    gm.eval()
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(*inputs), gm(*inputs))


@pytest.mark.parametrize("kind", KINDS)
def test_sparsity_zero_keeps_the_dense_structure(kind):
    gm = siftc.convert(spec_path("examples/mlp.py:mlp"), kind=kind, sparsity=0.0)
    for r in gm.siftc_info.report["layers"]:
        if r["kind"] != kind:
            continue
        sub = gm.get_submodule(r["name"])
        if kind == "factorized":
            assert r["structure"]["rank"] >= 1 and r["density"] == 1.0
        else:  # parallel N=1 and doped rank 0 are the dense layer itself
            assert isinstance(sub, SPARSE_LAYERS) and sub.density == 1.0


@pytest.mark.parametrize("kind", ["parallel", "doped"])
def test_sparsity_zero_reproduces_dense_outputs(kind):
    loaded = dense("examples/resnet.py:resnet18_cifar")
    gm = siftc.convert(loaded.model, kind, 0.0, loaded.example_inputs)
    gm.eval()
    loaded.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(*loaded.example_inputs), loaded.model(*loaded.example_inputs))


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.6, 0.85, 0.95, 0.99])
@pytest.mark.parametrize("kind", KINDS)
def test_other_sparsities_are_iso_flop(kind, sparsity):
    gm = siftc.convert(spec_path("examples/mlp.py:mlp"), kind=kind, sparsity=sparsity)
    assert abs(gm.siftc_info.report["flop_ratio"] - 1) <= 0.005


def test_masks_are_seeded():
    a = siftc.convert(spec_path("examples/mlp.py:mlp"), "parallel", 0.75, seed=3)
    b = siftc.convert(spec_path("examples/mlp.py:mlp"), "parallel", 0.75, seed=3)
    c = siftc.convert(spec_path("examples/mlp.py:mlp"), "parallel", 0.75, seed=4)
    masks = lambda g: [m.mask for m in g.modules() if isinstance(m, SPARSE_LAYERS)]
    assert all(torch.equal(x, y) for x, y in zip(masks(a), masks(b)))
    assert not all(torch.equal(x, y) for x, y in zip(masks(a), masks(c)))


def test_user_model_is_not_modified():
    loaded = load_model(spec_path("examples/mlp.py:mlp"))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    siftc.convert(loaded.model, "parallel", 0.9, loaded.example_inputs)
    after = loaded.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_keep_dense_patterns_and_no_keep_dense():
    spec = spec_path("examples/resnet.py:resnet18_cifar")
    default = siftc.convert(spec, "parallel", 0.5).siftc_info.report["layers"]
    assert default[0]["kind"] == "dense" and default[-1]["kind"] == "dense"
    none = siftc.convert(spec, "parallel", 0.5, keep_dense=()).siftc_info.report["layers"]
    assert none[0]["kind"] == "parallel" and none[-1]["kind"] == "parallel"
    kept = siftc.convert(spec, "parallel", 0.5, keep_dense=["stages.0.*"]).siftc_info.report["layers"]
    assert all(r["kind"] == "dense" for r in kept if r["name"].startswith("stages.0."))
    assert any(r["kind"] == "parallel" for r in kept if r["name"].startswith("stages.1."))


def test_depthwise_convs_are_left_and_listed():
    gm = siftc.convert(spec_path("examples/mobilenetv2.py:mobilenetv2"), "factorized", 0.75)
    skipped = [r for r in gm.siftc_info.report["layers"] if r["kind"] == "skipped"]
    assert skipped and all("grouped conv" in r["reason"] for r in skipped)
    for r in skipped:
        assert type(gm.get_submodule(r["name"])) is nn.Conv2d


def test_tied_head_is_not_untied():
    gm = siftc.convert(spec_path("examples/gpt.py:gpt_tied"), "parallel", 0.5, keep_dense=())
    layers = {r["name"]: r for r in gm.siftc_info.report["layers"]}
    tied = [r for r in layers.values() if "tied" in r["reason"]]
    assert tied and tied[0]["kind"] == "skipped"


@pytest.mark.parametrize("act,expected", [("gelu", nn.GELU), ("identity", nn.Identity)])
def test_branch_activation_is_configurable(act, expected):
    gm = siftc.convert(spec_path("examples/mlp.py:mlp"), "parallel", 0.75, branch_act=act)
    assert any(isinstance(m, expected) for m in gm.modules())
    gm = siftc.convert(spec_path("examples/resnet.py:resnet18_cifar"), "factorized", 0.75, branch_act=act)
    assert any(isinstance(m, nn.BatchNorm2d) for r in gm.siftc_info.report["layers"] if r["kind"] == "factorized"
               for m in gm.get_submodule(r["name"]).modules())


def test_extra_branch_norm_flops_are_reported_apart():
    gm = siftc.convert(spec_path("examples/resnet.py:resnet18_cifar"), "parallel", 0.75)
    report = gm.siftc_info.report
    assert report["extra_flops"] > 0 and report["flop_ratio"] == pytest.approx(1, abs=0.005)


class _TwiceConv(nn.Module):
    """Convs with BatchNorm, a strided conv, and one conv called twice (its positions add up)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, bias=False)
        self.again = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.down(torch.relu(self.bn(self.stem(x))))
        x = self.again(torch.relu(self.again(x)))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("kind", KINDS + ["wide"])
def test_report_flops_are_the_one_count(kind):
    """The report counts the converted model without running it (at the dense layers' positions):
    per layer, in total, and the branch norms' extra FLOPs, it must equal a forward's count."""
    x = (torch.randn(2, 3, 12, 12),)
    gm = siftc.convert(_TwiceConv(), kind, 0.75, x, keep_dense=())
    report = gm.siftc_info.report
    names = tuple(r["name"] for r in report["layers"])
    forward = flops.count(gm, x, extra_under=names)
    assert report["flops"] == forward.total and report["extra_flops"] == forward.extra_total
    assert report["dense_flops"] == flops.count(_TwiceConv(), x).total
    for r in report["layers"]:
        inside = [k for k in forward.layers if k == r["name"] or k.startswith(r["name"] + ".")]
        assert r["flops"] == sum(forward.layers[k] for k in inside)
    assert (report["extra_flops"] > 0) == (kind in ("parallel", "factorized"))  # their branch norms


@pytest.mark.parametrize("kind", ["parallel", "factorized", "doped"])
def test_a_conversion_that_transforms_nothing_is_an_error(kind):
    two = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))  # both kept dense (first and last)
    with pytest.raises(UsageError, match=f"{kind}: nothing to transform: every weight layer is left as it is"):
        siftc.convert(two, kind, 0.5, (torch.randn(2, 8),))
