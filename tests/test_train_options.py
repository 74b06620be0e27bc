"""`siftc train`'s honesty and options: a warning when SET/RigL would make no mask update, the backend
each layer ran on, LR schedules with warmup, weight-decay groups, plain progress when piped."""
import json

import torch
from torch import nn

from siftc.nn.sparse import SparseLinear, set_backend
from siftc.runtime import BACKENDS
from siftc.runtime.auto import AutoBackend
from siftc.runtime.masked import MaskedDense
from siftc.sparse import sparse_layers
from siftc.train import loop
from test_train import cli, one_thread, work  # noqa: F401 (fixtures: the converted classifier, 1 thread)


def quick(work, run, *args):
    return cli("train", work / "clf", "--data", work / "data.npz", "--batch-size", 16, "--backend", "torch",
               "-o", run, "--quiet", *args)


def test_no_mask_update_warns_with_an_update_every_that_gives_some(work, tmp_path):
    r = quick(work, tmp_path / "r", "--method", "rigl", "--steps", 50, "--update-every", 100)
    assert r.exit_code == 0, r.output
    warning = next(l for l in r.stderr.splitlines() if l.startswith("siftc: warning:"))
    assert "no mask update" in warning and "step 37" in warning  # 75% of 50
    assert "--update-every 36 or less" in warning and "--update-every 9 gives 4 updates" in warning
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["mask_updates"] == 0 and summary["warnings"] == [warning.removeprefix("siftc: warning: ")]

    r = quick(work, tmp_path / "s", "--method", "set", "--steps", 50, "--update-every", 9)  # the advice
    assert r.exit_code == 0 and "warning" not in r.stderr, r.output
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["mask_updates"] == 4

    r = quick(work, tmp_path / "t", "--method", "static", "--steps", 5)  # static: nothing to warn about
    assert r.exit_code == 0 and "warning" not in r.stderr, r.output


def test_summary_and_final_line_name_each_layers_backend(work, tmp_path):
    r = quick(work, tmp_path / "r", "--method", "static", "--steps", 3)
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    n = len(summary["nnz"])
    assert n > 1 and summary["layer_backends"] == {name: "torch" for name in summary["nnz"]}
    assert summary["backends"] == f"{n} layers torch"
    assert f"on torch ({n} layers torch)" in r.output


def test_auto_backends_are_its_choices(monkeypatch):
    auto = AutoBackend({"native": MaskedDense(), "torch": MaskedDense()})
    monkeypatch.setitem(BACKENDS, "auto", auto)
    monkeypatch.setattr(loop, "AUTO", auto)
    g = torch.Generator().manual_seed(0)
    model = set_backend(nn.Sequential(SparseLinear(8, 6, nnz=20, generator=g), nn.ReLU(),
                                      SparseLinear(6, 4, nnz=10, generator=g)), "auto")
    assert loop.layer_backends(model, "auto") == {"0": "untimed", "2": "untimed"}
    model(torch.randn(5, 8))
    backends = loop.layer_backends(model, "auto")
    assert backends == {name: layer.auto_choice["choice"] for name, layer in sparse_layers(model).items()}
    assert loop.backends_in_short({"a": "native", "b": "torch", "c": "native"}) == "2 layers native, 1 torch"
    assert loop.backends_in_short({"a": "torch"}) == "1 layer torch"
