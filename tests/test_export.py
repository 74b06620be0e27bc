"""siftc.export: every example x kind exports to plain ONNX that passes its checks; the checks catch a
tampered file; the sidecar says what the file is; the CLI's errors are one line with exit code 2.

The heavy examples (ResNet-18, MobileNetV2) run with SIFTC_SLOW=1; the rest run every time."""
import json
import os
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
from siftc import export as ex
from siftc.cli import main
from siftc.errors import UsageError
from siftc.passes import KINDS

SLOW = os.environ.get("SIFTC_SLOW") == "1"
LIGHT = {"examples/mlp.py:mlp", "examples/gpt.py:gpt", "examples/gpt.py:gpt_tied"}
CASES = [pytest.param(spec, kind, id=f"{spec.rsplit(':', 1)[1]}-{kind}",
                      marks=[] if spec in LIGHT or SLOW else pytest.mark.skip(reason="heavy; SIFTC_SLOW=1 runs it"))
         for spec in EXAMPLE_SPECS for kind in sorted(KINDS)]


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
    art = tmp_path / "art"
    gm = siftc.convert(spec_path(spec), kind=kind, sparsity=0.5)
    siftc.save(gm, art)
    done = ex.export(art, tmp_path / "m.onnx", batch=2)
    meta, model = done.meta, onnx.load(str(done.path))

    onnx.checker.check_model(model)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), "only standard ONNX ops"
    assert not any(t.data_type == onnx.TensorProto.BOOL for t in model.graph.initializer), "no masks stored"
    # Independent of export's own check: ORT on the file against the converted (masked) model itself.
    inputs = ex.make_inputs(gm.siftc_info.example_inputs, 2, seed=5)
    with torch.no_grad():
        want = gm.eval()(*inputs)
    np.testing.assert_allclose(_ort(done.path, inputs)[0], want.numpy(), atol=ex.ATOL, rtol=ex.RTOL)
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
    assert meta["kind"] == kind and meta["sparsity"] == 0.5 and meta["batch"] == 2 and meta["opset"] == ex.DEFAULT_OPSET
    assert meta["source"]["type"] == "artifact"
    assert meta["flops"] == gm.siftc_info.report["flops"] == sum(layer["flops"] for layer in meta["layers"])
    assert meta["checks"]["sparsity"] == "passed" and meta["checks"]["max_abs_error"] <= ex.ATOL


def test_dense_model_py_dynamic_batch(tmp_path):
    done = ex.export(spec_path("examples/gpt.py:gpt"), tmp_path / "gpt.onnx", dynamic_batch=True)
    assert done.meta["kind"] == "dense" and done.meta["sparsity"] == 0 and done.meta["dynamic_batch"]
    assert done.meta["inputs"][0]["shape"] == ["batch", 64] and done.meta["inputs"][0]["dtype"] == "int64"
    folded, masks, example = ex.rebuild(done.path)  # same weights again: the factory ran under a seed
    assert masks == {}
    for batch in (1, 5):
        x = ex.make_inputs(example, batch, seed=batch)
        np.testing.assert_allclose(_ort(done.path, x)[0], folded(*x).detach().numpy(), atol=1e-4, rtol=1e-3)


def test_no_mask_multiply_and_batchnorm_left_for_the_engine(tmp_path):
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    gm = siftc.convert(dense, kind="parallel", sparsity=0.75, example_inputs=(torch.randn(1, 3, 8, 8),))
    done = ex.export(gm, tmp_path / "m.onnx")
    ops = [n.op_type for n in onnx.load(str(done.path)).graph.node]
    assert "BatchNormalization" in ops
    assert "Mul" not in ops
    assert done.meta["source"]["type"] == "in-memory"


def test_tampered_weight_is_caught(tmp_path, mlp_artifact):
    path = ex.export(mlp_artifact, tmp_path / "m.onnx", batch=1).path
    assert ex.verify(path)["sparsity"] == "passed"
    meta = ex.read_sidecar(path)
    target = next(layer["initializer"] for layer in meta["layers"] if layer["initializer"])
    model = onnx.load(str(path))
    for t in model.graph.initializer:
        if t.name == target:  # make this one weight dense: fill its zeros
            arr = numpy_helper.to_array(t).copy()
            arr[arr == 0] = 0.01
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    onnx.save(model, str(path))
    with pytest.raises(ex.ExportCheckError, match="outside the mask"):
        ex.verify(path)


def test_refuses_to_overwrite_without_force(tmp_path, mlp_artifact):
    out = tmp_path / "m.onnx"
    ex.export(mlp_artifact, out)
    with pytest.raises(UsageError, match="--force"):
        ex.export(mlp_artifact, out)
    assert ex.export(mlp_artifact, out, batch=3, force=True).meta["batch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx", "m.onnx.json"] or \
        sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]  # no temp leftovers


@pytest.mark.parametrize("kwargs,match", [({"opset": 11}, "opset"), ({"batch": 0}, "batch"),
                                          ({"batch": 4, "dynamic_batch": True}, "contradict")])
def test_bad_settings(tmp_path, mlp_artifact, kwargs, match):
    with pytest.raises(UsageError, match=match):
        ex.export(mlp_artifact, tmp_path / "m.onnx", **kwargs)
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export(tmp_path, mlp_artifact):
    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(main, ["export", str(mlp_artifact), "-o", str(out), "--batch", "4"])
    assert res.exit_code == 0, res.output
    assert "checked" in res.output and json.loads((tmp_path / "m.onnx.json").read_text())["batch"] == 4
    res = CliRunner().invoke(main, ["export", str(tmp_path / "missing"), "-o", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and "siftc: error:" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["export", str(mlp_artifact), "-o", str(out), "--batch", "2", "--dynamic-batch"])
    assert res.exit_code == 2 and "contradict" in res.output


def test_cli_export_subprocess(tmp_path):
    out = tmp_path / "mlp.onnx"
    proc = subprocess.run([str(Path(sys.executable).parent / "siftc"), "export", spec_path("examples/mlp.py"), "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and ex.read_sidecar(out)["kind"] == "dense"
