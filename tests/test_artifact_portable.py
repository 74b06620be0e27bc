"""Artifacts travel (issue 14, part 1): moved elsewhere with the model file gone, an artifact loads in a
fresh process from its stored graph and module tree, with bit-identical outputs; export and train
work on it; a stored graph naming anything off the allow-list is refused and runs nothing; a user's
--leaf module needs trust_source; version-2 artifacts load only trusted; an edited siftc.json is
refused."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import siftc
from siftc.artifact import GRAPH, write_meta
from siftc.errors import ArtifactError
from siftc.store import file_sha256

from conftest import EXAMPLES

KINDS = ["wide", "parallel", "factorized", "doped"]
MODELS = {"mlp": ("mlp.py:mlp", (3, 64)), "resnet": ("resnet.py:resnet18_cifar", (2, 3, 32, 32))}

FRESH = """
import sys, torch, siftc
torch.set_num_threads(int(sys.argv[1]))  # the parent's: another thread count sums in another order
x, expected = torch.load("io.pt")
for name in sys.argv[2:]:
    gm = siftc.set_backend(siftc.load(name), "torch").eval()  # the default, auto, times each layer: it may choose otherwise here
    with torch.no_grad():
        assert torch.equal(gm(x[name]), expected[name]), name
assert "transformers" not in sys.modules  # imported only for an artifact naming one of its classes
print("ok")
"""


def _moved(tmp_path, model: str, kinds) -> tuple[dict, dict]:
    """Convert a copy of the example, save each kind, move the artifacts, delete the model file."""
    spec, shape = MODELS[model]
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    shutil.copy(EXAMPLES / spec.split(":")[0], src)
    x, expected = {}, {}
    for kind in kinds:
        gm = siftc.set_backend(siftc.convert(str(src / spec), kind, 0.5, seed=3), "torch")  # bit-exact: one backend
        siftc.save(gm, src / f"{model}-{kind}")
        x[f"{model}-{kind}"] = torch.randn(shape)
        with torch.no_grad():
            expected[f"{model}-{kind}"] = gm.eval()(x[f"{model}-{kind}"])
        shutil.move(src / f"{model}-{kind}", tmp_path / f"{model}-{kind}")
    shutil.rmtree(src)  # the model file is gone
    return x, expected


@pytest.mark.parametrize("model", MODELS)
def test_moved_artifact_loads_in_a_fresh_process_bit_exact(tmp_path, model):
    x, expected = _moved(tmp_path, model, KINDS)
    torch.save((x, expected), tmp_path / "io.pt")
    run = subprocess.run([sys.executable, "-c", FRESH, str(torch.get_num_threads()), *x], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


def test_export_and_train_a_moved_artifact(tmp_path):
    _moved(tmp_path, "mlp", ["parallel"])
    art = tmp_path / "mlp-parallel"
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((64, 64)).astype(np.float32), y=rng.integers(0, 10, 64))
    for args in (["export", str(art), "-o", str(tmp_path / "m.onnx")],
                 ["train", str(art), "--data", str(tmp_path / "d.npz"), "-o", str(tmp_path / "run"),
                  "--steps", "2", "--batch-size", "8", "--quiet"]):
        run = subprocess.run([sys.executable, "-m", "siftc", *args], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr
    assert (tmp_path / "m.onnx").is_file() and (tmp_path / "run" / "model" / GRAPH).is_file()


def _rewrite(art, change_graph=None, change_meta=None):
    """Edit an artifact's graph.json and/or siftc.json, keeping its checksums and digest consistent
    (what a careful tamperer does), so only the allow-list stands in the way."""
    meta = json.loads((art / "siftc.json").read_text())
    if change_graph:
        data = json.loads((art / GRAPH).read_text())
        change_graph(data)
        (art / GRAPH).write_text(json.dumps(data))
        meta["sha256"][GRAPH] = file_sha256(art / GRAPH)
    if change_meta:
        change_meta(meta)
    write_meta(art, meta)


LOAD = "import sys, siftc\ntry:\n    siftc.load(sys.argv[1])\nexcept siftc.errors.ArtifactError as e:\n" \
       "    print(e)\n    sys.exit(2)\n"


def test_a_graph_naming_os_system_is_refused_and_runs_nothing(tmp_path):
    _moved(tmp_path, "mlp", ["wide"])
    art, marker = tmp_path / "mlp-wide", tmp_path / "pwned"

    def evil(data):
        node = next(n for n in data["nodes"] if n["op"] == "call_module")
        node.update(op="call_function", target="os:system", args={"tuple": [f"touch {marker}"]})

    _rewrite(art, evil)
    for cmd in ([sys.executable, "-c", LOAD, str(art)], [sys.executable, "-m", "siftc", "export", str(art), "-o",
                                                         str(tmp_path / "m.onnx")]):
        run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        out = (run.stdout + run.stderr).strip()
        assert run.returncode == 2 and len(out.splitlines()) == 1 and "os.system" in out, out
        assert "not on the allow-list" in out and not marker.exists()


def test_a_getattr_of_a_private_attribute_is_refused(tmp_path):
    _moved(tmp_path, "mlp", ["wide"])
    art = tmp_path / "mlp-wide"

    def evil(data):
        node = next(n for n in data["nodes"] if n["op"] == "call_module")
        node.update(op="call_function", target="builtins:getattr", args={"tuple": [{"node": "x"}, "__class__"]})

    _rewrite(art, evil)
    with pytest.raises(ArtifactError, match=r"getattr.*__class__.*public attributes.*nothing was run"):
        siftc.load(art)


LEAF_MODEL = """
import torch
from torch import nn


class Gate(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


def build():
    return nn.Sequential(nn.Linear(8, 32), Gate(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def example_inputs():
    return (torch.randn(2, 8),)
"""


def test_a_user_leaf_module_needs_trust_source(tmp_path):
    (tmp_path / "leafy.py").write_text(LEAF_MODEL)
    gm = siftc.convert(str(tmp_path / "leafy.py"), "parallel", 0.5, leaf=("1",))
    art = siftc.save(gm, tmp_path / "art")
    meta = json.loads((art / "siftc.json").read_text())
    assert "Gate" in meta["needs_source"] and not (art / GRAPH).exists()
    with pytest.raises(ArtifactError, match=r"needs its model file.*Gate.*trust_source=True") as e:
        siftc.load(art)
    assert len(str(e.value).splitlines()) == 1
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(siftc.set_backend(siftc.load(art, trust_source=True), "torch").eval()(x),
                           siftc.set_backend(gm, "torch").eval()(x))  # exact: one backend on both sides
    run = subprocess.run([sys.executable, "-m", "siftc", "inspect", str(art)], capture_output=True, text=True)
    assert "needs its model file to load (--trust-source)" in run.stdout and "leafy.py:build" in run.stdout


def test_a_version_2_artifact_loads_only_trusted(tmp_path):
    gm = siftc.convert(str(EXAMPLES / "mlp.py:mlp"), "doped", 0.5)
    art = siftc.save(gm, tmp_path / "art")
    (art / GRAPH).unlink()
    meta = json.loads((art / "siftc.json").read_text())
    meta = {k: v for k, v in meta.items() if k not in ("digest", "needs_source")}
    meta["version"], meta["sha256"] = 2, {k: v for k, v in meta["sha256"].items() if k != GRAPH}
    (art / "siftc.json").write_text(json.dumps(meta))  # as siftc wrote version 2: no digest
    with pytest.raises(ArtifactError, match=r"version-2 artifact.*siftc convert \S+mlp.py:mlp --kind doped "
                                            r"--sparsity 0.5 -o NEW.*trust_source=True"):
        siftc.load(art)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(siftc.set_backend(siftc.load(art, trust_source=True), "torch").eval()(x),
                           siftc.set_backend(gm, "torch").eval()(x))  # exact: one backend on both sides


def test_an_edited_siftc_json_is_refused(tmp_path):
    art = siftc.save(siftc.convert(str(EXAMPLES / "mlp.py:mlp"), "wide", 0.5), tmp_path / "art")
    meta = json.loads((art / "siftc.json").read_text())
    meta["source"]["path"] = str(tmp_path / "other.py")
    (art / "siftc.json").write_text(json.dumps(meta))
    for trust in (False, True):
        with pytest.raises(ArtifactError, match=r"siftc\.json was edited after it was written"):
            siftc.load(art, trust_source=trust)
