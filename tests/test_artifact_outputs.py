"""Artifacts of models that return structures and were traced concretely (issue 14, part 1): the
output structure (a HuggingFace ModelOutput, or a plain dict in place of a class from elsewhere, with a
note) and the input guard are stored as data and load in a fresh process with the model file gone;
a tampered output class or shape guard is refused before anything runs; transformers is imported only
for an artifact that names one of its classes, and its absence is a one-line error naming the extra."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

import siftc
from siftc import graph_data
from siftc.artifact import GRAPH
from siftc.errors import ArtifactError

from test_artifact_portable import LOAD, _rewrite

pytest.importorskip("transformers")

MODEL = '''
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import ModelOutput


@dataclass
class MyOutput(ModelOutput):
    logits: torch.Tensor = None
    hidden: torch.Tensor = None


class Net(nn.Module):
    def __init__(self, own=False):
        super().__init__()
        self.own = own
        self.a, self.b, self.c = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        if x.size(-1) != 8:  # a decision on a shape: traced concretely, with an input guard
            raise ValueError("8 features")
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return MyOutput(logits=self.c(h), hidden=h) if self.own else SequenceClassifierOutput(logits=self.c(h))


def hf_out():
    return Net()


def own_out():
    return Net(own=True)


def example_inputs():
    return (torch.randn(2, 8),)
'''

FRESH = """
import sys, torch, siftc
torch.set_num_threads(int(sys.argv[1]))
x, expected = torch.load("io.pt")
for name, (cls, keys, leaves) in expected.items():
    gm = siftc.set_backend(siftc.load(name), "torch").eval()  # exact: one backend on both sides
    with torch.no_grad():
        out = gm(x)
    assert type(out).__module__ + "." + type(out).__name__ == cls, (name, type(out))
    assert list(out.keys()) == keys and all(torch.equal(out[k], v) for k, v in zip(keys, leaves)), name
print("ok")
"""


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    """hf_out (returns a transformers SequenceClassifierOutput) and own_out (a ModelOutput class of the
    model file), converted, saved and moved away from the deleted model file; with the outputs."""
    tmp = tmp_path_factory.mktemp("outputs")
    (tmp / "src").mkdir()
    (tmp / "src" / "outs.py").write_text(MODEL)
    x, expected = torch.randn(3, 8), {}
    for name in ("hf_out", "own_out"):
        gm = siftc.set_backend(siftc.convert(str(tmp / "src" / f"outs.py:{name}"), "parallel", 0.5, seed=2), "torch")
        siftc.save(gm, tmp / "src" / name)
        with torch.no_grad():
            out = gm.eval()(x)
        expected[name] = (type(out), list(out.keys()), [out[k] for k in out.keys()])
        shutil.move(tmp / "src" / name, tmp / name)
    shutil.rmtree(tmp / "src")
    return tmp, x, expected


def test_output_structures_load_in_a_fresh_process_without_the_model_file(arts):
    tmp, x, expected = arts
    meta = {n: json.loads((tmp / n / "siftc.json").read_text()) for n in expected}
    assert meta["hf_out"]["needs_source"] is None and meta["hf_out"]["notes"] == []
    assert meta["own_out"]["needs_source"] is None
    note, = meta["own_out"]["notes"]
    assert "MyOutput" in note and "plain dict with its keys (logits, hidden)" in note, note
    classes = {"hf_out": "transformers.modeling_outputs.SequenceClassifierOutput", "own_out": "builtins.dict"}
    torch.save((x, {n: (classes[n], keys, leaves) for n, (_, keys, leaves) in expected.items()}), tmp / "io.pt")
    run = subprocess.run([sys.executable, "-c", FRESH, str(torch.get_num_threads()), *expected], cwd=tmp,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    run = subprocess.run([sys.executable, "-m", "siftc", "inspect", "own_out"], cwd=tmp, capture_output=True,
                         text=True, timeout=120)
    assert "self-contained" in run.stdout and "note: outputs of MyOutput" in run.stdout, run.stdout


def test_the_input_guard_still_refuses_what_the_trace_assumed(arts):
    tmp, _, _ = arts
    gm = siftc.load(tmp / "hf_out")
    with pytest.raises(ValueError, match=r"input x dim 1 = 9: the graph was specialised by `if x.size\(-1\) != 8"):
        gm(torch.randn(3, 9))


def _copy(arts, name, to):
    tmp = arts[0]
    shutil.copytree(tmp / name, tmp / to)
    return tmp / to


def _load_cli(art, cwd):
    run = subprocess.run([sys.executable, "-c", LOAD, str(art)], cwd=cwd, capture_output=True, text=True,
                         timeout=300)
    return run.returncode, (run.stdout + run.stderr).strip()


@pytest.mark.parametrize("cls", ["os.system", "transformers.modeling_outputs.torch",
                                 "transformers.utils.generic.ModelOutput"])
def test_a_tampered_output_class_is_refused(arts, cls):
    art = _copy(arts, "hf_out", f"out-{cls}")

    def evil(data):
        data["codegen"]["out_spec"]["type"] = cls

    _rewrite(art, evil)
    with pytest.raises(ArtifactError, match=rf"names output class {cls}, which is not .*nothing was run") as e:
        siftc.load(art)
    assert len(str(e.value).splitlines()) == 1


def test_a_tampered_shape_guard_is_refused_and_runs_nothing(arts):
    tmp = arts[0]
    art, marker = _copy(arts, "hf_out", "guard-evil"), tmp / "pwned"

    def evil(data):
        guard = next(m for m in data["modules"] if "guards" in m)["guards"]
        spec = next(s for s in guard["specializations"] if s["guard"])
        spec["guard"] = f"__import__('os').system('touch {marker}') or {spec['guard']}"

    _rewrite(art, evil)
    code, out = _load_cli(art, tmp)
    assert code == 2 and len(out.splitlines()) == 1 and "not arithmetic on input sizes" in out, out
    assert not marker.exists()
    with pytest.raises(graph_data.Refused, match="Attribute is not allowed"):
        from siftc.guard_data import check_guard
        check_guard("s1.__class__ > 2", {"s1"})


NO_TRANSFORMERS = """
import sys
sys.modules["transformers"] = None  # as if it were not installed: importing it raises ImportError
from siftc.cli import main
sys.exit(main(["export", sys.argv[1], "-o", "m.onnx"], prog_name="siftc"))
"""


def test_transformers_is_imported_only_when_an_artifact_names_its_classes(arts, tmp_path):
    tmp = arts[0]
    run = subprocess.run([sys.executable, "-c", NO_TRANSFORMERS, str(tmp / "hf_out")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    err = run.stderr.strip()
    assert run.returncode == 2 and len(err.splitlines()) == 1, err
    assert "SequenceClassifierOutput needs transformers" in err and "pip install 'siftc[transformers]'" in err
    assert not (tmp_path / "m.onnx").exists()
    run = subprocess.run([sys.executable, "-c", NO_TRANSFORMERS, str(tmp / "own_out")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and (tmp_path / "m.onnx").is_file(), run.stderr  # a plain dict: no transformers
    assert (tmp / "own_out" / GRAPH).is_file()
