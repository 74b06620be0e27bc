"""Densify (issue 14, part 4): every weight of a sparse model trains again. Sparse layers become the
dense torch layers of their (wide) shapes holding the folded weights: outputs unchanged, previously-zero
weights receive gradients and change (while sparse, they stay exactly zero), the artifact stores and
reloads it, the report's FLOPs are the dense-shaped ones, and `siftc densify` -> train -> export runs."""
import json
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

import siftc
from siftc import flops
from siftc.cli import main
from siftc.densify import densify_artifact
from siftc.nn.sparse import SPARSE_LAYERS, set_backend
from siftc.sparse import sparse_layers

from conftest import ROOT, spec_path

MLP = spec_path("examples/mlp.py:mlp")
RESNET = spec_path("examples/resnet.py:resnet18_cifar")


def _step(model, x, y, lr=0.1):
    """One SGD step on cross-entropy; returns the optimizer."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return opt


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)


def test_zeros_stay_zero_while_sparse_and_learn_once_densified():
    gm = siftc.convert(MLP, "wide", 0.9, seed=0)
    x, y = _batch()
    names = list(sparse_layers(gm))
    masks = {n: sparse_layers(gm)[n].mask.clone() for n in names}

    sparse = siftc.densify(gm)  # taken before the sparse model trains: the same starting weights
    _step(gm, x, y)
    for n in names:  # sparse: the zeros cannot move
        w = sparse_layers(gm)[n].weight.detach()
        assert torch.count_nonzero(w[~masks[n]]) == 0, n

    before = {n: sparse.get_submodule(n).weight.detach().clone() for n in names}
    assert all(torch.count_nonzero(before[n][~masks[n]]) == 0 for n in names)  # zeros stay zero initially
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1)
    opt.zero_grad()
    F.cross_entropy(sparse(x), y).backward()
    for n in names:
        layer = sparse.get_submodule(n)
        assert type(layer) is nn.Linear and layer.weight.requires_grad
        off = ~masks[n]
        grad = layer.weight.grad[off]
        assert torch.count_nonzero(grad) > 0.5 * off.sum(), n  # previously-zero weights get gradient
    opt.step()
    for n in names:
        after = sparse.get_submodule(n).weight.detach()
        off = ~masks[n]
        assert torch.count_nonzero(after[off]) > 0.5 * off.sum(), n  # ... and change
        assert not torch.equal(after[~off], before[n][~off])        # the non-zeros train on too


@pytest.mark.parametrize("spec,kind,shape", [(MLP, "wide", (5, 64)), (MLP, "parallel", (5, 64)),
                                             (MLP, "factorized", (5, 64)), (MLP, "doped", (5, 64)),
                                             (RESNET, "parallel", (2, 3, 32, 32))])
def test_outputs_are_the_same_before_and_after(spec, kind, shape):
    gm = siftc.convert(spec, kind, 0.75, seed=2)
    x = torch.randn(shape)
    dense = siftc.densify(gm)
    assert not [m for m in dense.modules() if isinstance(m, SPARSE_LAYERS)]
    for mode in ("eval", "train"):
        getattr(gm, mode)(), getattr(dense, mode)()
        with torch.no_grad():
            want = set_backend(gm, "torch")(x)  # masked dense: the same products, in the same order
            assert torch.equal(dense(x), want), mode
            if spec == MLP:  # the native kernels too (their convolutions at batch 2 take tens of seconds here)
                assert torch.allclose(set_backend(gm, "native")(x), dense(x), atol=1e-5, rtol=1e-4), mode


def test_densified_artifact_reloads_with_dense_shaped_flops(tmp_path):
    gm = siftc.convert(MLP, "wide", 0.9, seed=0)
    siftc.save(gm, tmp_path / "sparse")
    dense = densify_artifact(tmp_path / "sparse", tmp_path / "dense")
    again = siftc.load(tmp_path / "dense")
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), dense.eval()(x))
        assert torch.allclose(again(x), gm.eval()(x), atol=1e-5, rtol=1e-4)
    report, before = again.siftc_info.report, gm.siftc_info.report
    assert not sparse_layers(again) and report["kind"] == "densified" and report["sparsity"] == 0.0
    # FLOPs: every weight of the wide shapes, counted by siftc.flops, layer by layer
    fc = flops.count(again, again.siftc_info.example_inputs)
    assert report["flops"] == fc.total == sum(r["flops"] for r in report["layers"])
    for r in report["layers"]:
        assert r["density"] == 1.0 and r["flops"] == fc.dense[r["name"]]
    assert report["flops"] > 8 * before["flops"]  # 90% sparse: ~10x once every weight counts
    was = report["densified"]
    assert (was["kind"], was["sparsity"], was["flops"], was["sparse_layers"]) == ("wide", 0.9, before["flops"], 2)
    assert report["params"] == sum(p.numel() for p in again.parameters()) > 8 * before["nonzero_params"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_round_trip_densify_train_export(tmp_path):
    """As a user runs it: siftc densify, then train a few steps on the result, then export it."""
    siftc.save(siftc.convert(MLP, "wide", 0.75, seed=0), tmp_path / "sparse")
    run = [sys.executable, "-m", "siftc"]
    done = subprocess.run([*run, "densify", tmp_path / "sparse", "-o", tmp_path / "dense"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert re.search(r"2 sparse layers densified.*\nweight FLOPs are now the dense-shaped ones: [\d,]+ \([\d.]+x",
                     done.stdout), done.stdout
    trained = subprocess.run([*run, "train", tmp_path / "dense", "--data", ROOT / "data/digits.npz", "--steps", "3",
                              "--method", "rigl", "-o", tmp_path / "run", "--quiet"],
                             capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["nnz"] == {}  # nothing sparse left to mask
    said = [w for w in summary["warnings"] if "no sparse layers" in w]  # rigl has nothing to update, and says so
    assert said and "makes no mask update" not in " ".join(summary["warnings"]), summary["warnings"]
    exported = subprocess.run([*run, "export", tmp_path / "run" / "model", "-o", tmp_path / "m.onnx"],
                              capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    assert side["kind"] == "densified" and side["nonzero_params"] == side["params"]  # trained: no zeros left


def _one_line_error(result, *patterns):
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("siftc: error: "), result.stderr
    for p in patterns:
        assert re.search(p, lines[0]), (p, lines[0])


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path):
    siftc.save(siftc.convert(MLP, "parallel", 0.5, seed=0), tmp_path / "sparse")
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    _one_line_error(cli("densify", stranger, "-o", tmp_path / "out"), "is not a siftc artifact")
    _one_line_error(cli("densify", tmp_path / "nothing", "-o", tmp_path / "out"), "not found")
    assert not (tmp_path / "out").exists()

    assert cli("densify", tmp_path / "sparse", "-o", tmp_path / "dense").exit_code == 0
    _one_line_error(cli("densify", tmp_path / "dense", "-o", tmp_path / "out"), "no sparse layers",
                    "densified it already")
    assert not (tmp_path / "out").exists()
    _one_line_error(cli("densify", tmp_path / "sparse", "-o", tmp_path / "dense"), "already exists", "--force")
    _one_line_error(cli("densify", tmp_path / "sparse", "-o", stranger, "--force"), "siftc did not write")
    assert (stranger / "notes.txt").read_text() == "mine"
    _one_line_error(cli("densify", tmp_path / "sparse", "-o", tmp_path / "sparse", "--force"), "input")
    assert sparse_layers(siftc.load(tmp_path / "sparse"))  # the input is untouched
    assert cli("densify", tmp_path / "sparse", "-o", tmp_path / "dense", "--force").exit_code == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary dir left

    with pytest.raises(siftc.SiftcError, match="no sparse layers"):
        siftc.densify(nn.Linear(3, 4))
