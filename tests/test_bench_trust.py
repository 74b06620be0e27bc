"""`siftc bench`'s torch engine rebuilds the PyTorch model a file's sidecar names: from an artifact
with no code but siftc's and torch's; from a model.py (which it would import and run) only with
--trust-source, else a note naming the flag while the other engines run. A sidecar edited to name
another file runs nothing without it."""
import json
import subprocess
import sys

import siftc
from siftc.export import export as export_onnx
from siftc.store import sidecar_path

from conftest import spec_path

HELPER = """
import pathlib

import torch
from torch import nn

pathlib.Path("ran").write_text("x")  # what a file a sidecar names could do


def build():
    return nn.Linear(64, 10)


def example_inputs():
    return (torch.randn(1, 64),)
"""


def _bench(tmp_path, *args):
    run = subprocess.run([sys.executable, "-m", "siftc", "bench", *args, "--engine", "onnxruntime,torch", "--batch",
                          "4", "--iterations", "2", "--turns", "1", "--warmup", "1", "--json", "out.json", "--force"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return json.loads((tmp_path / "out.json").read_text())


def test_torch_engine_imports_a_model_file_only_with_trust_source(tmp_path):
    siftc.save(siftc.convert(spec_path("examples/mlp.py:mlp"), "parallel", 0.9), tmp_path / "art")
    export_onnx(tmp_path / "art", tmp_path / "sparse.onnx", batch=4)
    export_onnx(spec_path("examples/mlp.py:mlp"), tmp_path / "dense.onnx", batch=4)
    (tmp_path / "helper.py").write_text(HELPER)
    side = json.loads(sidecar_path(tmp_path / "dense.onnx").read_text())
    side["source"]["spec"] = str(tmp_path / "helper.py:build")  # a sidecar is a file anyone can edit
    sidecar_path(tmp_path / "dense.onnx").write_text(json.dumps(side))

    result = _bench(tmp_path, "sparse.onnx", "dense.onnx")
    rows = {(r["model"].rpartition("/")[2], r["engine"]) for r in result["results"] if r["status"] == "ok"}
    assert rows == {("sparse.onnx", "onnxruntime"), ("sparse.onnx", "torch"), ("dense.onnx", "onnxruntime")}
    note = next(n for n in result["notes"] if "dense.onnx" in n and "torch" in n)
    assert "helper.py:build" in note and "--trust-source" in note, note
    assert not (tmp_path / "ran").exists()  # nothing of helper.py ran

    result = _bench(tmp_path, "dense.onnx", "--trust-source")
    assert {r["engine"] for r in result["results"] if r["status"] == "ok"} == {"onnxruntime", "torch"}
    assert (tmp_path / "ran").exists()  # trusted: the torch engine imported the file the sidecar names


def test_library_bench_takes_trust_source(tmp_path):
    """siftc.bench(trust_source=...) is the flag from Python: the torch engine rebuilds a model.py-sourced
    file only when it is True."""
    export_onnx(spec_path("examples/mlp.py:mlp"), tmp_path / "dense.onnx", batch=4)

    def torch_rows(**kw):
        result = siftc.bench(tmp_path / "dense.onnx", engines=("torch",), batches=(4,), iterations=2, turns=1,
                             warmup=1, **kw)
        return [r for r in result["results"] if r["status"] == "ok"]
    assert torch_rows() == [] and torch_rows(trust_source=False) == []
    assert len(torch_rows(trust_source=True)) == 1
