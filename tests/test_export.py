"""siftc.export: every example x kind exports to plain ONNX that passes its checks; the checks catch a
tampered file; the sidecar says what the file is; the CLI's errors are one line with exit code 2.

Every example x kind runs every time, the ResNet-18s and MobileNetV2 included: exported from the
converted model in memory (batch 2, a few seconds each); the artifact route (save, load, export, verify)
runs for every kind on the small tied-weight GPT."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from conftest import EXAMPLE_SPECS, spec_path
from onnx import numpy_helper
from torch import nn

import siftc
from siftc.export import ATOL, DEFAULT_OPSET, ExportCheckError, RTOL, export as export_onnx, fold, rebuild, verify
from siftc import export_checks
from siftc.cli import main
from siftc.errors import UsageError
from siftc.passes import KINDS
from siftc.source import make_inputs
from siftc.store import read_sidecar

CASES = [pytest.param(spec, kind, id=f"{spec.rsplit(':', 1)[1]}-{kind}") for spec in EXAMPLE_SPECS for kind in sorted(KINDS)]


@pytest.fixture(scope="module")
def mlp_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "mlp-par90"
    siftc.save(siftc.convert(spec_path("examples/mlp.py:mlp"), kind="parallel", sparsity=0.9), out)
    return out


def _ort(path, inputs):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)})


@pytest.mark.parametrize("spec,kind", CASES)
def test_every_example_and_kind_exports_checked(tmp_path, spec, kind):
    gm = siftc.convert(spec_path(spec), kind=kind, sparsity=0.5)
    done = export_onnx(gm, tmp_path / "m.onnx", batch=2)
    meta, model = done.meta, onnx.load(str(done.path))

    onnx.checker.check_model(model)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), "only standard ONNX ops"
    assert not any(t.data_type == onnx.TensorProto.BOOL for t in model.graph.initializer), "no masks stored"
    # Independent of export's own check: ORT on the file against the converted (masked) model itself.
    inputs = make_inputs(gm.siftc_info.example_inputs, 2, seed=5)
    with torch.no_grad():
        want = gm.eval()(*inputs)
    np.testing.assert_allclose(_ort(done.path, inputs)[0], want.numpy(), atol=ATOL, rtol=RTOL)
    # Stored zeros: every sparse layer's initializer has exactly the mask's non-zeros.
    masks = {n: m.mask for n, m in gm.named_modules() if hasattr(m, "mask")}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    sparse = {layer["name"]: layer for layer in meta["layers"] if layer["initializer"]}
    assert sparse.keys() == masks.keys()
    for name, mask in masks.items():
        stored = inits[sparse[name]["initializer"]]
        assert np.count_nonzero(stored) == int(mask.sum())
        assert sparse[name]["density"] == pytest.approx(float(mask.float().mean()))
    # Sidecar: what the file is.
    assert meta["kind"] == kind and meta["sparsity"] == 0.5 and meta["batch"] == 2 and meta["opset"] == DEFAULT_OPSET
    assert meta["source"] == {"type": "in-memory", "converted_from": spec_path(spec)}
    assert meta["flops"] == gm.siftc_info.report["flops"] == sum(layer["flops"] for layer in meta["layers"])
    assert meta["checks"]["sparsity"] == "passed" and meta["checks"]["max_abs_error"] <= ATOL
    # The check could have failed: the outputs vary with the input, or else the sparse layers' were compared.
    assert meta["checks"]["discriminates"]
    assert meta["checks"]["outputs_vary"] or meta["checks"]["compared"] == "outputs and weight layer outputs"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_artifact_route_every_kind(tmp_path, kind):
    # What `siftc convert -o` then `siftc export` does, and what bench's torch engine rebuilds from.
    gm = siftc.convert(spec_path("examples/gpt.py:gpt_tied"), kind=kind, sparsity=0.5)
    siftc.save(gm, tmp_path / "art")
    done = export_onnx(tmp_path / "art", tmp_path / "m.onnx", batch=2)
    assert done.meta["source"]["type"] == "artifact" and done.meta["kind"] == kind
    assert verify(done.path)["sparsity"] == "passed"  # rebuilt from the artifact: same zeros, same outputs
    folded, _, _ = rebuild(done.path)
    x = make_inputs(gm.siftc_info.example_inputs, 2, seed=7)
    with torch.no_grad():
        np.testing.assert_allclose(folded(*x).numpy(), gm.eval()(*x).numpy(), atol=ATOL, rtol=RTOL)


def test_dense_model_py_dynamic_batch(tmp_path):
    done = export_onnx(spec_path("examples/gpt.py:gpt"), tmp_path / "gpt.onnx", dynamic_batch=True)
    assert done.meta["kind"] == "dense" and done.meta["sparsity"] == 0 and done.meta["dynamic_batch"]
    assert done.meta["inputs"][0]["shape"] == ["batch", 64] and done.meta["inputs"][0]["dtype"] == "int64"
    folded, masks, example = rebuild(done.path)  # same weights again: the factory ran under a seed
    assert masks == {}
    for batch in (1, 5):
        x = make_inputs(example, batch, seed=batch)
        np.testing.assert_allclose(_ort(done.path, x)[0], folded(*x).detach().numpy(), atol=1e-4, rtol=1e-3)


def test_no_mask_multiply_and_batchnorm_left_for_the_engine(tmp_path):
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    gm = siftc.convert(dense, kind="parallel", sparsity=0.75, example_inputs=(torch.randn(1, 3, 8, 8),))
    done = export_onnx(gm, tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(str(done.path)).graph.node]
    assert "BatchNormalization" in ops
    assert "Mul" not in ops
    assert done.meta["source"]["type"] == "in-memory"


def test_tampered_weight_is_caught(tmp_path, mlp_artifact):
    path = export_onnx(mlp_artifact, tmp_path / "m.onnx", batch=1).path
    assert verify(path)["sparsity"] == "passed"
    meta = read_sidecar(path)
    target = next(layer["initializer"] for layer in meta["layers"] if layer["initializer"])
    model = onnx.load(str(path))
    for t in model.graph.initializer:
        if t.name == target:  # make this one weight dense: fill its zeros
            arr = numpy_helper.to_array(t).copy()
            arr[arr == 0] = 0.01
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    onnx.save(model, str(path))
    with pytest.raises(ExportCheckError, match="outside the mask"):
        verify(path)


def test_refuses_to_overwrite_without_force(tmp_path, mlp_artifact):
    out = tmp_path / "m.onnx"
    export_onnx(mlp_artifact, out)
    with pytest.raises(UsageError, match="--force"):
        export_onnx(mlp_artifact, out)
    assert export_onnx(mlp_artifact, out, batch=3, force=True).meta["batch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx", "m.onnx.json"] or \
        sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]  # no temp leftovers


@pytest.mark.parametrize("kwargs,match", [({"opset": 10}, "opset"), ({"batch": 0}, "batch"),
                                          ({"batch": 4, "dynamic_batch": True}, "contradict")])
def test_bad_settings(tmp_path, mlp_artifact, kwargs, match):
    with pytest.raises(UsageError, match=match):
        export_onnx(mlp_artifact, tmp_path / "m.onnx", **kwargs)
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export(tmp_path, mlp_artifact):
    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(main, ["export", str(mlp_artifact), "-o", str(out), "--batch", "4"])
    assert res.exit_code == 0, res.output
    assert "checked" in res.output and json.loads((tmp_path / "m.onnx.json").read_text())["batch"] == 4


@pytest.mark.parametrize("source,extra,match", [
    ("{tmp}/missing.py", [], "missing.py not found"),
    ("{tmp}/missing/", [], "not found"),
    ("{onnx}", [], "neither an artifact directory nor a model.py"),  # was an AttributeError traceback
    ("{art}", ["--batch", "2", "--dynamic-batch"], "contradict"),
    ("{art}", ["--opset", "9"], "opset"),
])
def test_cli_export_errors(tmp_path, mlp_artifact, source, extra, match):
    not_a_model = tmp_path / "g.onnx"
    not_a_model.write_bytes(b"\x00not a model")
    out = tmp_path / "out" / "x.onnx"
    source = source.format(tmp=tmp_path, onnx=not_a_model, art=mlp_artifact)
    res = CliRunner().invoke(main, ["export", source, "-o", str(out), *extra])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("siftc: error:") and re.search(match, lines[0]), res.output
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # no partial file, no temp leftovers


def test_opset_too_old_for_the_model_is_one_clear_error(tmp_path):
    with pytest.raises(ExportCheckError, match=r"opset 13\) failed: .*scaled_dot_product_attention"):
        export_onnx(spec_path("examples/gpt.py:gpt"), tmp_path / "gpt.onnx", opset=13)
    assert list(tmp_path.iterdir()) == []


def test_failed_check_leaves_no_file(tmp_path, mlp_artifact, monkeypatch):
    def fails(*args, **kwargs):
        raise ExportCheckError("outputs off (test)")
    monkeypatch.setattr(export_checks, "check_outputs", fails)
    with pytest.raises(ExportCheckError, match="outputs off"):
        export_onnx(mlp_artifact, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []  # neither the file, its sidecar nor the temporary directory


def test_cli_export_subprocess(tmp_path):
    out = tmp_path / "mlp.onnx"
    proc = subprocess.run([str(Path(sys.executable).parent / "siftc"), "export", spec_path("examples/mlp.py"), "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and read_sidecar(out)["kind"] == "dense"


MASKED = '''
import torch
from torch import nn

class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, drop):  # (B, 4), (B, 4) bool: True drops a logit
        return torch.softmax(self.fc(x).masked_fill(drop, float("-inf")), -1)

def build():
    return Masked()

def example_inputs():
    return torch.randn(1, 4), torch.tensor([[True, False, False, True]])
'''


def test_a_bool_input_keeps_its_pattern_from_export_to_bench(tmp_path):
    from siftc.bench.runner import input_arrays, open_model
    (tmp_path / "masked.py").write_text(MASKED)
    done = export_onnx(str(tmp_path / "masked.py"), tmp_path / "m.onnx", batch=3)
    x, drop = input_arrays(open_model(done.path), 3, seed=0)
    assert (drop == np.array([[True, False, False, True]] * 3)).all()  # all True would drop every logit
    (y,) = ort.InferenceSession(str(done.path), providers=["CPUExecutionProvider"]).run(None, {"x": x, "drop": drop})
    assert np.isfinite(y).all() and np.allclose(y.sum(-1), 1)


DEAD_HEAD = '''
import torch
from torch import nn


def build():
    """An MLP with a zero-initialised head: its output is the head's bias, whatever the input."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                        nn.Linear(64, 4))
    nn.init.zeros_(net[6].weight)
    return net


def example_inputs():
    return (torch.randn(2, 8),)
'''


@pytest.fixture(scope="module")
def dead_head(tmp_path_factory):
    """A constant-output model: its file, and an export of its parallel-0.75 conversion (via an artifact)."""
    folder = tmp_path_factory.mktemp("dead")
    (folder / "dead.py").write_text(DEAD_HEAD)
    siftc.save(siftc.convert(str(folder / "dead.py"), kind="parallel", sparsity=0.75), folder / "art")
    return folder / "dead.py", export_onnx(folder / "art", folder / "dead.onnx", batch=2)


def _perturb(path, out, initializer, change):
    model = onnx.load(str(path))
    t = next(t for t in model.graph.initializer if t.name == initializer)
    t.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(t).copy()), t.name))
    onnx.save(model, str(out))
    (Path(str(out) + ".json")).write_text(Path(str(path) + ".json").read_text())  # the same sidecar


def test_constant_outputs_compare_the_layers(tmp_path, dead_head):
    _, done = dead_head
    c = done.meta["checks"]
    assert not c["outputs_vary"] and c["output_spread"] == 0  # the head is zero: outputs are its bias
    assert c["compared"] == "outputs and weight layer outputs" and c["discriminates"]
    sparse = {layer["name"] for layer in done.meta["layers"] if layer["initializer"]}
    assert {r["name"] for r in c["layers_compared"] if r["sparse"]} == sparse and len(sparse) == 8
    assert {r["name"] for r in c["layers_compared"] if not r["sparse"]} == {"0", "6"}  # kept dense: first, head
    assert c["layers_not_compared"] == {}
    assert all(r["max_abs_error"] <= ATOL * r["scale"] for r in c["layers_compared"])
    assert all(r["scale"] > 0 for r in c["layers_compared"] if r["name"] != "6")  # the zero head's output is its bias
    res = CliRunner().invoke(main, ["export", str(done.path.parent / "art"), "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code == 0, res.output
    assert re.search(r"outputs do not vary with the input \(spread 0\.00e\+00\), so 10 weight layers' outputs "
                     r"\(8 sparse\) were compared too", res.output), res.output


@pytest.mark.parametrize("initializer,change,match", [
    # None changes a sparse weight's zeros, so only the comparison of the layers' outputs sees them.
    ("2.branches.0.0.bias", lambda b: b + 0.5, r"sparse layer 2\.branches\.0\.0's output .* differs"),
    ("0.weight", lambda w: w * 1.5, r"sparse layer 2\.branches\.0\.0's output .* differs"),  # dense, upstream
    ("0.bias", lambda b: b + 0.5, r"dense layer 0's output .* differs"),
    ("4.branches.1.0.weight", lambda w: w * 1.5, r"no initializer stores the weight of sparse layer 4\.branches\.1\.0"),
])
def test_a_wrong_file_of_a_constant_output_model_is_caught(tmp_path, dead_head, initializer, change, match):
    _, done = dead_head
    wrong = tmp_path / "wrong.onnx"
    _perturb(done.path, wrong, initializer, change)
    folded, _, example = rebuild(wrong)
    x = make_inputs(example, 2, seed=2)
    assert export_checks.check_outputs(wrong, folded, x) == 0  # the outputs alone cannot tell
    with pytest.raises(ExportCheckError, match=match):
        verify(wrong)


ZERO = '''
import torch
from torch import nn


def build():
    """One Linear with zero weight and bias: every output is exactly 0, whatever the file holds."""
    net = nn.Sequential(nn.Linear(8, 4))
    nn.init.zeros_(net[0].weight), nn.init.zeros_(net[0].bias)
    return net


def example_inputs():
    return (torch.randn(1, 8),)
'''


def test_a_check_that_cannot_discriminate_says_so(tmp_path):
    (tmp_path / "zero.py").write_text(ZERO)
    res = CliRunner().invoke(main, ["export", f"{tmp_path / 'zero.py'}:build", "--batch", "2",
                                    "-o", str(tmp_path / "z.onnx")])
    assert res.exit_code == 0, res.output
    c = read_sidecar(tmp_path / "z.onnx")["checks"]
    assert c["compared"] == "outputs and weight layer outputs" and not c["discriminates"]
    assert [(r["name"], r["scale"]) for r in c["layers_compared"]] == [("0", 0.0)]
    assert "warning: the check could not discriminate: the outputs do not vary with the input (spread " \
           "0.00e+00), and no weight layer's output could stand in (1 with outputs ~0)" in res.output


def test_mobilenetv2_factorized_wrong_file_is_caught(tmp_path):
    # Its activations vanish at random init (outputs ~1e-22): the file's outputs are compared and so are
    # its layers', each relative to its own scale.
    gm = siftc.convert(spec_path("examples/mobilenetv2.py:mobilenetv2"), kind="factorized", sparsity=0.5)
    done = export_onnx(gm, tmp_path / "m.onnx", batch=2)
    c = done.meta["checks"]
    assert not c["outputs_vary"] and c["compared"] == "outputs and weight layer outputs" and c["discriminates"]
    assert sum(r["sparse"] for r in c["layers_compared"]) == sum(hasattr(m, "mask") for m in gm.modules()) == 40
    folded, masks = fold(gm)
    wrong = tmp_path / "wrong.onnx"
    _perturb(done.path, wrong, "blocks.0.depthwise.0.weight", lambda w: w * 1.5)  # dense, before sparse ones
    x = make_inputs(gm.siftc_info.example_inputs, 2)
    assert export_checks.check_outputs(wrong, folded, x) < ATOL  # the outputs alone cannot tell
    with pytest.raises(ExportCheckError, match=r"sparse layer blocks\.0\.project\.0\.u's output"):
        export_checks.check(wrong, folded, x, masks, example_inputs=gm.siftc_info.example_inputs)
    assert export_checks.check(done.path, folded, x, masks, example_inputs=gm.siftc_info.example_inputs)["discriminates"]
