"""siftc.save / siftc.load: a round trip gives the same model; a fresh process, from any working
directory, rebuilds it with the same outputs and gradients for every weight; and loading never
unpickles code (torch.load(weights_only=True) plus JSON)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import siftc
from siftc.artifact import write_meta
from siftc.errors import ArtifactError
from siftc.nn.sparse import SPARSE_LAYERS
from siftc.store import file_sha256

from conftest import ROOT, spec_path

MLP = spec_path("examples/mlp.py:mlp")
KINDS = ["wide", "parallel", "factorized", "doped"]


def test_round_trip(tmp_path):
    gm = siftc.convert(MLP, "factorized", 0.75, seed=5)
    siftc.save(gm, tmp_path / "art")
    again = siftc.load(tmp_path / "art")
    assert again.siftc_info.report == gm.siftc_info.report
    assert again.siftc_info.config == gm.siftc_info.config
    mine, theirs = gm.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    x = torch.randn(4, 64)
    with torch.no_grad():
        # exact: one backend on both sides (under the default, auto, each model times its own layers)
        torch.testing.assert_close(siftc.set_backend(again, "torch").eval()(x),
                                   siftc.set_backend(gm, "torch").eval()(x), rtol=0, atol=0)


def test_a_model_file_without_example_inputs(tmp_path):
    """Converted with --input-shape: the file has no example_inputs(), the artifact brings its own."""
    (tmp_path / "tiny.py").write_text("from torch import nn\n\n\ndef build():\n    return nn.Sequential("
                                      "nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))\n")
    gm = siftc.convert(str(tmp_path / "tiny.py"), "parallel", 0.5, input_shape=(2, 8))
    siftc.save(gm, tmp_path / "art")
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(siftc.load(tmp_path / "art").eval()(x), gm.eval()(x))


FRESH = """
import sys, torch, siftc
from siftc.nn.sparse import SPARSE_LAYERS
torch.set_num_threads(int(sys.argv[1]))  # the parent's: another thread count sums in another order
x, expected = torch.load("io.pt")
for kind in sys.argv[2:]:
    gm = siftc.set_backend(siftc.load(kind), "torch")  # exact: one backend on both sides (auto may time otherwise)
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), expected[kind], rtol=0, atol=0)
    gm.train()
    gm(x).logsumexp(1).mean().backward()
    for name, p in gm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, (kind, name)
    for m in gm.modules():
        if isinstance(m, SPARSE_LAYERS):
            assert m.values.grad.shape == (m.nnz,), kind  # the gradient is the non-zeros' only
print("ok")
"""


def test_fresh_process_same_outputs_and_every_weight_learns(tmp_path, monkeypatch):
    """Converted from the repository with a relative path; loaded elsewhere, in a new interpreter."""
    monkeypatch.chdir(ROOT)
    x = torch.randn(3, 64)
    expected = {}
    for kind in KINDS:
        gm = siftc.set_backend(siftc.convert("examples/mlp.py:mlp", kind, 0.75, seed=1), "torch")
        siftc.save(gm, tmp_path / kind)
        with torch.no_grad():
            expected[kind] = gm.eval()(x)
    torch.save((x, expected), tmp_path / "io.pt")
    run = subprocess.run([sys.executable, "-c", FRESH, str(torch.get_num_threads()), *KINDS], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


class Payload:
    """Unpickled with weights_only=False, this would run os.mkdir(marker): stands in for any code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("target", ["weights.pt", "inputs.pt"])
def test_pickled_code_is_refused(tmp_path, target):
    gm = siftc.convert(MLP, "doped", 0.5)
    art = siftc.save(gm, tmp_path / "art")
    marker = tmp_path / "code-ran"
    bad = {"payload": Payload(marker)} if target == "weights.pt" else [Payload(marker)]
    torch.save(bad, art / target)
    meta = json.loads((art / "siftc.json").read_text())
    meta["sha256"][target] = file_sha256(art / target)  # a consistent artifact: only the pickle guard is left
    write_meta(art, meta)

    with pytest.raises(ArtifactError, match=rf"cannot read tensors of .*art.*convert again"):
        siftc.load(art)
    assert not marker.exists()
    torch.load(art / target, weights_only=False)  # the payload is live: this is what was refused
    assert marker.exists()


def test_masks_survive_the_round_trip(tmp_path):
    """Masks are state, not re-drawn: a mask changed after conversion (as SET/RigL do) comes back."""
    gm = siftc.convert(MLP, "parallel", 0.75)
    layer = next(m for m in gm.modules() if isinstance(m, SPARSE_LAYERS))
    layer.set_mask(torch.roll(layer.mask, 1, dims=1))
    siftc.save(gm, tmp_path / "art")
    again = next(m for m in siftc.load(tmp_path / "art").modules() if isinstance(m, SPARSE_LAYERS))
    assert torch.equal(again.mask, layer.mask) and torch.equal(again.weight, layer.weight)


def test_sparse_weights_are_stored_compactly(tmp_path):
    """A 90% parallel MLP stores its sparse layers as values + mask bits: the file is a fraction of the
    dense fp32 storage, and the model comes back exactly."""
    gm = siftc.convert(MLP, "parallel", 0.9)
    art = siftc.save(gm, tmp_path / "art")
    sparse = [m for m in gm.modules() if isinstance(m, SPARSE_LAYERS)]
    dense_bytes = sum(4 * math.prod(m.weight_shape) for m in sparse)  # the sparse layers stored dense, fp32
    assert (art / "weights.pt").stat().st_size < 0.3 * dense_bytes
    again = siftc.load(art)
    for (k, a), (k2, b) in zip(sorted(gm.state_dict().items()), sorted(again.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k


def test_values_that_do_not_fit_the_mask_are_refused(tmp_path):
    art = siftc.save(siftc.convert(MLP, "parallel", 0.9), tmp_path / "art")
    state = torch.load(art / "weights.pt", weights_only=True)
    key = next(k for k in state if k.endswith("weight@values"))
    state[key] = state[key][:-1]
    torch.save(state, art / "weights.pt")
    meta = json.loads((art / "siftc.json").read_text())
    meta["sha256"]["weights.pt"] = file_sha256(art / "weights.pt")  # consistent checksums: only the count is off
    write_meta(art, meta)
    with pytest.raises(ArtifactError, match=r"values for .*weight but its mask does not fit them.*corrupt"):
        siftc.load(art)


@pytest.mark.parametrize("sparsity, form", [(0.5, "mask@bits"), (0.9, "mask@gaps")])
def test_positions_are_stored_as_mask_bits_or_gaps_and_round_trip(tmp_path, sparsity, form):
    """At least 1/8 dense: the mask's bits; sparser: a byte per gap between non-zeros (cheaper to read)."""
    gm = siftc.convert(MLP, "parallel", sparsity)
    art = siftc.save(gm, tmp_path / "art")
    state = torch.load(art / "weights.pt", weights_only=True)
    assert any(k.endswith(form) for k in state) and not any(k.endswith("positions") for k in state)
    again = siftc.load(art)
    for (k, a), (k2, b) in zip(sorted(gm.state_dict().items()), sorted(again.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k


@pytest.mark.parametrize("edit", ["far", "past_the_end"])
def test_gaps_that_do_not_fit_the_layer_are_refused(tmp_path, edit):
    art = siftc.save(siftc.convert(MLP, "parallel", 0.9), tmp_path / "art")
    state = torch.load(art / "weights.pt", weights_only=True)
    key = next(k for k in state if k.endswith("mask@gaps"))
    if edit == "far":  # a gap marked far with no size for it
        state[key][0] = 255
    else:  # the last gap reaches past the layer's dense entries
        state[key][-1] = 254
        state[key][:-1] = 254
    torch.save(state, art / "weights.pt")
    meta = json.loads((art / "siftc.json").read_text())
    meta["sha256"]["weights.pt"] = file_sha256(art / "weights.pt")
    write_meta(art, meta)
    with pytest.raises(ArtifactError, match=r"values for .*weight but its mask does not fit them.*corrupt"):
        siftc.load(art)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_dtype_and_frozen_parameters_round_trip(tmp_path, dtype):
    """A model cast to another dtype, with a frozen dense and a frozen sparse parameter, loads from
    graph.json with the same dtypes, the same requires_grad flags and the same outputs."""
    gm = siftc.convert(MLP, "doped", 0.9, seed=1).to(dtype)
    sparse = next(m for m in gm.modules() if isinstance(m, SPARSE_LAYERS))
    sparse.values.requires_grad_(False)
    dense = next(m for m in gm.modules() if isinstance(m, torch.nn.Linear) and not isinstance(m, SPARSE_LAYERS))
    dense.weight.requires_grad_(False)
    art = siftc.save(gm, tmp_path / "art")
    assert json.loads((art / "siftc.json").read_text())["needs_source"] is None
    again = siftc.load(art)
    mine, theirs = dict(gm.named_parameters()), dict(again.named_parameters())
    assert list(mine) == list(theirs)
    assert [(p.dtype, p.requires_grad) for p in mine.values()] == [(p.dtype, p.requires_grad) for p in theirs.values()]
    assert sum(not p.requires_grad for p in theirs.values()) == 2
    assert all(b.dtype == a.dtype for a, b in zip(gm.buffers(), again.buffers()))
    x = torch.randn(4, 64, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(siftc.set_backend(again, "torch").eval()(x), siftc.set_backend(gm, "torch").eval()(x))


@pytest.mark.parametrize("edit", ["dense", "sparse"])
def test_a_layer_its_arguments_do_not_rebuild_is_not_stored_as_data(tmp_path, edit):
    """The save check rebuilds each layer as loading will (meta device, state assigned) and compares:
    a layer whose recorded arguments give another shape makes the artifact need its source."""
    gm = siftc.convert(MLP, "parallel", 0.9, seed=1)
    kind = SPARSE_LAYERS if edit == "sparse" else torch.nn.Linear
    layer = next(m for m in gm.modules() if isinstance(m, kind) and (edit == "sparse") == isinstance(m, SPARSE_LAYERS))
    layer.in_features += 1  # what the constructor would be called with no longer fits the weights
    meta = json.loads((siftc.save(gm, tmp_path / "art") / "siftc.json").read_text())
    assert meta["needs_source"] and ("does not take its own state" in meta["needs_source"] or
                                     "does not rebuild" in meta["needs_source"]), meta["needs_source"]
